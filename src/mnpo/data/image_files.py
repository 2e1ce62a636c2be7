"""Image files as found on disk: which files count as images, and how they are meant to be shown.

Light on purpose (Pillow only, no torch): the metadata maker and the command line use it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import ExifTags, Image

__all__ = ["EXIF_TRANSPOSE", "IMAGE_EXTENSIONS", "exif_orientation_of", "is_image_file"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: EXIF orientation (2-8) -> the transpose that shows the stored pixels upright (the EXIF
#: specification's table, as ``PIL.ImageOps.exif_transpose`` applies it).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
