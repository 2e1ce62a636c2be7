"""Evaluation images decoded on the evaluation's device (``mnpo evaluate --decode device``).

The default evaluation pipeline decodes and resizes every image with PIL in the loader's workers
(wsolevaluation's pixels, :func:`~mnpo.data.transforms.uint8_views`). Decoding is about half of
that work, so a GPU consuming thousands of images a second needs many CPU workers to keep up.
Here a worker only reads the file: an 8-bit grayscale or YCbCr JPEG travels as its compressed
bytes (:func:`encoded_image`), and the main process decodes a batch of them in one call of
``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA, libjpeg-turbo on the CPU) and
resizes each image there (:func:`device_views`). Every other file (PNG, CMYK, 16-bit, ...) is
decoded by the worker as usual and resized on the device too.

Not wsolevaluation's pixels, by a little: the resize is bilinear with antialiasing in float and
rounded once, where PIL rounds its horizontal pass to 8 bits before the vertical one and uses
fixed-point weights, so a pixel differs from PIL's by at most 1 level (the error of PIL's
intermediate rounding is at most 1/2 before the final rounding); on this machine libjpeg-turbo
in torchvision decodes the same pixels as PIL's, while nvJPEG's inverse DCT may differ by a few
levels more. Metrics move accordingly little; numbers to put beside a paper's come from the
default (``--decode host``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.v2.functional import pil_to_tensor

from mnpo.data.decode import decode_problem, file_bytes
from mnpo.data.transforms import ImageReadError, load_image

__all__ = ["DECODE_MODES", "EncodedImage", "device_views", "encoded_image"]

#: ``--decode`` choices: PIL in the workers (wsolevaluation's pixels), or on the device.
DECODE_MODES = ("host", "device")
#: PIL modes of the JPEGs that travel compressed: 8-bit grayscale and YCbCr (decoded as RGB).
JPEG_MODES = ("L", "RGB")
_END_OF_IMAGE = b"\xff\xd9"


@dataclass(frozen=True)
class EncodedImage:
    """One evaluation image as a worker sends it: ``data`` the file's bytes ``(N,)`` uint8 when
    ``jpeg``, else the decoded pixels ``(3, H, W)`` uint8 (:func:`~mnpo.data.transforms.load_image`'s);
    ``size`` its ``(width, height)``."""

    data: Tensor
    jpeg: bool
    size: tuple[int, int]


def encoded_image(path: str | Path) -> EncodedImage:
    """Read ``path`` for device decoding: a complete 8-bit grayscale or YCbCr JPEG (by its
    content, not its name) as its bytes, anything else decoded here.

    A JPEG without its end-of-image marker (a truncated file) is decoded here too, so that it
    fails as :func:`~mnpo.data.transforms.load_image` fails, in the worker.

    Raises:
        ImageReadError: the file is missing, empty, not an image or fails to decode.
    """
    path = Path(path)
    try:
        data = file_bytes(path)
        with Image.open(io.BytesIO(data)) as image:  # the header only
            kind, mode, size = image.format, image.mode, image.size
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageReadError(path, decode_problem(exc)) from exc
    if kind == "JPEG" and mode in JPEG_MODES and data.rstrip(b"\x00").endswith(_END_OF_IMAGE):
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, size)
    return EncodedImage(pil_to_tensor(load_image(path, data=data)), False, size)


def _decode_jpegs(encoded: list[Tensor], device: torch.device) -> list[Tensor]:
    """``torchvision.io.decode_jpeg`` of a list in one call (batched by nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _resized(image: Tensor, side: int) -> Tensor:
    """``(3, H, W)`` uint8 -> ``(3, side, side)`` uint8: bilinear, antialiased (PIL's filter
    support when shrinking), half-pixel centres, in float32, rounded once."""
    out = F.interpolate(image[None].float(), size=(side, side), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def device_views(images: Sequence[EncodedImage], device: torch.device | str, crop: int = 224,
                 resize: int | None = 256, image_ids: Sequence[str] | None = None,
                 ) -> tuple[Tensor, Tensor | None]:
    """The evaluation views of a batch on ``device``: the localization view ``(B, 3, crop,
    crop)`` and the ten-crop source ``(B, 3, resize, resize)`` (None when ``resize`` is None),
    uint8, as :func:`~mnpo.data.transforms.uint8_views` makes them on the host (within one
    level; module docstring).

    The batch's JPEGs are decoded in one ``decode_jpeg`` call; should it fail (a JPEG nvJPEG
    cannot read), each is decoded alone, on the CPU, and the one that still fails raises
    :class:`~mnpo.data.transforms.ImageReadError` naming ``image_ids[i]``.
    """
    device = torch.device(device)
    if not images:
        raise ValueError("no images to decode")
    names = list(image_ids) if image_ids is not None else [f"image {i} of the batch" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} image ids for {len(images)} images")
    jpegs = [i for i, image in enumerate(images) if image.jpeg]
    pixels: list[Tensor | None] = [None if image.jpeg else image.data.to(device, non_blocking=True)
                                   for image in images]
    if jpegs:
        try:
            decoded = _decode_jpegs([images[i].data for i in jpegs], device)
        except RuntimeError:
            decoded = [_decode_one(images[i].data, names[i]).to(device) for i in jpegs]
        for i, image in zip(jpegs, decoded):
            pixels[i] = image
    for i, (image, encoded) in enumerate(zip(pixels, images)):
        if tuple(image.shape[1:]) != encoded.size[::-1]:
            raise ImageReadError(names[i], f"decoded to {tuple(image.shape[1:])} (H, W), its header says "
                                           f"{encoded.size[::-1]}")
    views = torch.stack([_resized(p, crop) for p in pixels])
    sources = None if resize is None else torch.stack([_resized(p, resize) for p in pixels])
    return views, sources


def _decode_one(data: Tensor, name: str) -> Tensor:
    try:
        return _decode_jpegs([data], torch.device("cpu"))[0]
    except RuntimeError as exc:
        raise ImageReadError(name, f"the JPEG does not decode: {exc}") from exc
