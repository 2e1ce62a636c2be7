"""Pixels out of image files of any bit depth: 8-bit RGB images and boolean masks.

PIL's ``convert("RGB")`` clips wider samples instead of scaling them: a 16-bit grey PNG of value
30000 comes out white, and a 16-bit RGB PNG keeps each sample's high byte. Here

* every 8-bit mode (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ``RGB``, ...) is
  converted exactly as ``convert("RGB")`` does, so CUB's, ILSVRC's and OpenImages' pixels
  (including ILSVRC's few CMYK and grey JPEGs) equal wsolevaluation's, which reads them that way;
* 16-bit samples (grey, grey and alpha, RGB, RGBA; PNG or TIFF) become ``round(v / 257)``,
  the scaling that takes 65535 to 255 and 257 to 1;
* 32-bit integer samples become ``round(v * 255 / (2**32 - 1))`` (unsigned) or
  ``round(max(v, 0) * 255 / (2**31 - 1))`` (signed);
* 32-bit float samples in [0, 1] become ``round(255 v)``; otherwise they are stretched from
  their own minimum and maximum to 0-255 (a constant image: 0). NaN or infinite samples are an
  error.

Alpha is dropped, not composited, as ``convert("RGB")`` does.

A mask (:func:`mask_pixels`) is the set of pixels whose stored value is not 0 in any colour
channel (alpha ignored), at any bit depth; for a palette image, whose colour is not black. Both
``mnpo make-metadata`` (which checks every mask) and PxAP's scoring read masks through it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["MaskReadError", "mask_pixels", "read_mask", "source_bits", "to_rgb8"]

_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_COLOUR_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _rawmode(image: Image.Image) -> str:
    """The decoder's raw mode of the file's first tile (``"RGB;16B"``, ``"I;32S"``, ...), or ""."""
    tiles = getattr(image, "tile", None) or []
    if not tiles:
        return ""
    args = tiles[0][3] if len(tiles[0]) > 3 else None
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def source_bits(image: Image.Image) -> int:
    """Bits per sample of an opened (not yet loaded) image as stored in its file: 8, 16 or 32.

    Call before ``image.load()``: PIL forgets the tiles (and so the raw mode) once it has decoded
    them. A 16-bit RGB PNG opens as mode ``RGB`` and says so only in its raw mode ``RGB;16B``.
    """
    if image.mode in _SIXTEEN_BIT_GREY:
        return 16
    if image.mode in ("I", "F"):
        return 16 if ";16" in _rawmode(image) else 32
    # 16 bits per sample only in PNG and TIFF: a 16-bit BMP's "BGR;16" is 16 bits per pixel (5-6-5)
    return 16 if image.format in ("PNG", "TIFF") and ";16" in _rawmode(image) else 8


def _scaled_16(values: np.ndarray) -> np.ndarray:
    """uint16-range samples -> uint8, ``round(v / 257)``."""
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _integer_32(image: Image.Image) -> np.ndarray:
    values = np.asarray(image)  # int32, PIL's mode "I"
    raw = _rawmode(image)
    if raw and "S" not in raw.split(";")[-1] and raw != "I":  # I;32, I;32N, I;32B: unsigned samples
        return np.rint(values.view(np.uint32).astype(np.float64) * (255.0 / 4294967295.0)).astype(np.uint8)
    return np.rint(np.clip(values, 0, None).astype(np.float64) * (255.0 / 2147483647.0)).astype(np.uint8)


def _float_32(image: Image.Image, where: str) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: float image with NaN or infinite samples")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _wide_colour(data: bytes, where: str) -> np.ndarray:
    """A 16-bit colour PNG or TIFF (with or without alpha), decoded by OpenCV at full depth:
    uint16 ``(h, w, 3)`` RGB (grey replicated, alpha dropped)."""
    import cv2

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.dtype != np.uint16:
        raise ValueError(f"{where}: a 16-bit image OpenCV cannot decode at 16 bits")
    if decoded.ndim == 2:
        return np.repeat(decoded[:, :, None], 3, axis=2)
    if decoded.shape[2] == 2:  # grey and alpha
        return np.repeat(decoded[:, :, :1], 3, axis=2)
    return decoded[:, :, 2::-1]  # BGR(A) -> RGB


def to_rgb8(image: Image.Image, bits: int, data: bytes | None = None, where: str = "image") -> Image.Image:
    """A loaded PIL image as 8-bit RGB, keeping its pixels at any bit depth (module docstring).

    bits: :func:`source_bits` of the image, taken before it was loaded. data: the file's bytes,
    needed only for 16-bit colour (PIL has already dropped their low bytes). where: the file, for
    messages.
    """
    if image.mode in _SIXTEEN_BIT_GREY or (image.mode == "I" and bits == 16):
        grey = _scaled_16(np.clip(np.asarray(image), 0, 65535))
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "I":
        return Image.fromarray(_integer_32(image), "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_float_32(image, where), "L").convert("RGB")
    if bits == 16:
        if data is None:
            raise ValueError(f"{where}: a 16-bit colour image needs the file's bytes to keep its low bytes")
        return Image.fromarray(np.ascontiguousarray(_scaled_16(_wide_colour(data, where))), "RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def mask_pixels(image: Image.Image, bits: int, data: bytes | None = None, where: str = "mask") -> np.ndarray:
    """A loaded mask image -> bool ``(h, w)``: True where any colour channel is non-zero.

    Alpha is ignored; a palette image is judged by its colours (black is background); 16-bit,
    32-bit and float masks by their stored values, so a 16-bit mask of value 1 is an object.
    """
    if image.mode in _SIXTEEN_BIT_GREY or image.mode in ("I", "1", "L"):
        return np.asarray(image) != 0
    if image.mode == "F":
        values = np.asarray(image)
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: float mask with NaN or infinite samples")
        return values != 0
    if bits == 16:
        if data is None:
            raise ValueError(f"{where}: a 16-bit colour mask needs the file's bytes")
        return (_wide_colour(data, where) != 0).any(axis=2)
    if image.mode in _COLOUR_WITH_ALPHA:
        image = image.convert(image.mode[0] if image.mode in ("LA", "La") else "RGB")
        if image.mode == "L":
            return np.asarray(image) != 0
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return (np.asarray(rgb) != 0).any(axis=2)


class MaskReadError(ValueError):
    """A mask file that is missing, unreadable, truncated or not an image; ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read mask: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def file_bytes(path: Path) -> bytes:
    """The bytes of an image file; an empty one is refused here (PIL would only say it cannot
    identify a BytesIO object)."""
    return nonempty(path.read_bytes())


def nonempty(data: bytes) -> bytes:
    """``data``, refused when it holds no byte (an empty image file)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    return data


def decode_problem(exc: BaseException) -> str:
    """Why a file could not be decoded, in words that do not name an in-memory buffer."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(exc, ValueError) and str(exc) == "empty file (0 bytes)":
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The mask file at ``path`` -> bool ``(h, w)`` in its stored pixel grid (no EXIF turn):
    :func:`mask_pixels`. Raises MaskReadError naming the file and why."""
    path = Path(path)
    try:
        data = file_bytes(path)
        with Image.open(io.BytesIO(data)) as image:
            bits = source_bits(image)
            image.load()
            return mask_pixels(image, bits, data if bits == 16 else None, str(path))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise MaskReadError(path, decode_problem(exc)) from exc
