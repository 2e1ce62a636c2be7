"""Image files as found on disk: which files count as images, and how they are meant to be shown.

Light on purpose (Pillow only, no torch): the metadata maker and the command line use it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import ExifTags, Image

__all__ = ["IMAGE_EXTENSIONS", "exif_orientation_of", "is_image_file"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def is_image_file(path: Path) -> bool:
    """An image by its extension (:data:`IMAGE_EXTENSIONS`, any case), not a hidden file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def exif_orientation_of(image: Image.Image) -> int:
    """The EXIF orientation tag of an opened image, 1 to 8; 1 (as stored) when there is none or
    it cannot be read (a damaged EXIF block does not make the pixels unreadable)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # PIL raises several types on a damaged EXIF block
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
