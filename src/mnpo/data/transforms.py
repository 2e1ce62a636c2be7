"""Image decoding and the WSOL protocol transforms (PIL image in, tensor out).

The evaluation transforms end in ImageNet normalization: a float32 tensor ``(3, H, W)``
holding ``(v / 255 - mean) / std`` per channel, with
``mean = (0.485, 0.456, 0.406)`` and ``std = (0.229, 0.224, 0.225)``.
Resizing is bilinear on the PIL image (PIL's own, antialiased), as
``torchvision.transforms.Resize`` does on PIL input.

``train_transform``
    wsolevaluation's training recipe: ``Resize((256, 256))``,
    ``RandomCrop(224)``, ``RandomHorizontalFlip()``, to tensor;
    or, with ``random_resized=True``, ``RandomResizedCrop(224)`` and the flip.
    It returns uint8 (a quarter of float32's bytes between processes and to the
    device), normalized there batch-wise by :func:`normalize_batch`; its draws
    come from a ``torch.Generator`` passed per image, so they do not depend on
    the process or on anything else that uses torch's global generator.
``localization_transform``
    ``Resize((224, 224))``, to tensor, normalize: the frame in which boxes,
    masks and score maps are compared.
``ten_crop``
    ``Resize((256, 256))`` then torchvision's ten-crop order (see its docstring).
``uint8_views`` + ``normalize_batch`` + ``ten_crop_batch``
    the same two evaluation views, split so that the loader makes small uint8
    tensors and the device normalizes and crops whole batches.

:func:`load_image` decodes a file completely, so that a truncated or corrupt
file fails there, with the file named, and not later inside a transform.  (It
cannot tell a truncated file if something in the process has set
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.)
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mnpo.data.decode import decode_problem, file_bytes, nonempty, source_bits, to_rgb8
from mnpo.data.image_files import EXIF_TRANSPOSE, exif_orientation_of

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageReadError",
    "load_image",
    "localization_transform",
    "normalize_image",
    "normalize_batch",
    "ten_crop",
    "ten_crop_batch",
    "TrainAugmentation",
    "train_transform",
    "uint8_views",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]

_warned_truncated = False


#: JPEG scales libjpeg decodes in the DCT domain (``load_image``'s ``draft_scale``).
DRAFT_SCALES = (1, 2, 4, 8)


def draft_scale(width: int, height: int, side: int) -> int:
    """The largest of :data:`DRAFT_SCALES` at which a ``width x height`` window still has at
    least ``side`` pixels each way, so that the resize to ``side`` only shrinks."""
    scale = 1
    while scale < DRAFT_SCALES[-1] and min(width, height) >= 2 * scale * side:
        scale *= 2
    return scale


class ImageReadError(OSError):
    """An image file that is missing, unreadable, truncated or not an image.

    ``path`` names the file; the original exception is chained as ``__cause__``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read image: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def load_image(path: str | os.PathLike[str], *, exif_orientation: bool = False, draft_scale: int = 1,
               data: bytes | None = None) -> Image.Image:
    """Open ``path`` with PIL, decode every pixel and return it as an 8-bit RGB image.

    8-bit images come out exactly as PIL's ``convert("RGB")`` gives them (wsolevaluation's
    pixels); 16-bit, 32-bit and float images are scaled to 8 bits, not clipped
    (:mod:`mnpo.data.decode`).

    exif_orientation: turn the image as its EXIF orientation tag says, as image viewers show it
    (a phone photo taken upright comes out upright); the tag's value is kept in
    ``image.info["exif_orientation"]`` (1: as stored). Off by default: the boxes and
    ``image_sizes.txt`` of CUB, ILSVRC and OpenImages are in the stored pixel grid.

    draft_scale: 2, 4 or 8 decode an 8-bit grey or colour JPEG at that fraction of its size in
    the DCT domain (libjpeg's scaled inverse DCT, PIL's ``draft``: ``ceil(W / s) x ceil(H /
    s)`` pixels, several times faster; not the pixels of a full decode resized; a side under
    ``2 s`` pixels is not scaled); other files are
    decoded whole. 1 (the default): every pixel.

    data: the file's bytes when the caller has read them already (the file is then not read
    again; ``path`` only names it in errors).

    Raises:
        ImageReadError: the file is missing, cannot be identified as an image,
            or fails to decode (truncated or corrupt data).
    """
    path = Path(path)
    if draft_scale not in DRAFT_SCALES:
        raise ValueError(f"draft_scale must be one of {DRAFT_SCALES}, got {draft_scale!r}")
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images will load "
                    "with missing pixels instead of raising ImageReadError")
    try:
        data = file_bytes(path) if data is None else nonempty(data)
        with Image.open(io.BytesIO(data)) as image:
            bits = source_bits(image)  # before load(): PIL then forgets the raw mode
            if draft_scale != 1 and image.format == "JPEG" and image.mode in ("L", "RGB"):
                width, height = image.size
                image.draft(image.mode, (width // draft_scale, height // draft_scale))  # gives ceil(W / s)
            image.load()
            orientation = exif_orientation_of(image) if exif_orientation else 1
            rgb = to_rgb8(image, bits, data if bits == 16 else None, str(path))
        if orientation != 1:
            rgb = rgb.transpose(EXIF_TRANSPOSE[orientation])
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageReadError(path, decode_problem(exc)) from exc
    if exif_orientation:
        rgb.info["exif_orientation"] = orientation
    return rgb


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _to_normalized() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]


def normalize_image(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image (w x h) as a normalized float32 tensor (3, h, w)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    tensor = F.to_dtype(F.to_image(image), torch.float32, scale=True)
    return F.normalize(tensor, list(IMAGENET_MEAN), list(IMAGENET_STD)).as_subclass(torch.Tensor)


class TrainAugmentation:
    """The training view: PIL RGB image -> uint8 tensor (3, crop, crop), drawn from ``generator``.

    Default (wsolevaluation): ``Resize((resize, resize))``, ``RandomCrop(crop)``,
    ``RandomHorizontalFlip()``.  ``random_resized=True``: ``RandomResizedCrop(crop)`` (scale
    (0.08, 1), ratio (3/4, 4/3), ten tries then the central crop), then the flip; ``resize`` is
    then unused.  The draws are torchvision's, in its order (crop offsets top then left, each
    only when there is room; the flip when ``rand() < 0.5``), so with ``generator`` seeded like
    torch's global generator the pixels equal those of the torchvision v2 pipeline; without
    ``generator`` they come from the global generator, as torchvision's do.

    ``draft=True`` (``data.jpeg_draft``) is for :meth:`from_file`: the window is drawn from the
    file's header first, and a JPEG is decoded at the largest scale 1/2, 1/4 or 1/8 at which the
    window still has ``crop`` (``resize`` for the whole-image recipe) pixels each way
    (:func:`draft_scale`), then resized from there (PIL's ``resize`` with the window as its
    ``box``). Where no scale applies (a window under twice the output side, a PNG, ...) the
    pixels are the default's exactly, and the draws are the same in every case.
    """

    takes_generator = True  # WSOLDataset passes each item's generator

    def __init__(self, crop: int = 224, resize: int = 256, random_resized: bool = False,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 draft: bool = False) -> None:
        self.crop = _check_size("crop", crop)
        self.resize = _check_size("resize", resize)
        if not random_resized and crop > resize:
            raise ValueError(f"crop {crop} is larger than the resized image {resize}")
        if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale {scale} and ratio {ratio} must be positive (low, high) pairs")
        self.random_resized = bool(random_resized)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.draft = bool(draft)

    def window(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """``RandomResizedCrop``'s window ``(top, left, h, w)`` in a ``width x height`` image."""
        area = height * width
        log_low, log_high = torch.log(torch.tensor(self.ratio)).tolist()
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_low, log_high, generator=generator)).item()  # float32, as torchvision
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        window = self.window(*image.size, generator) if self.random_resized else None
        return self._view(image, window, None, generator)

    def from_file(self, path: str | os.PathLike[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """The view of the image file ``path`` (:func:`load_image`; with ``draft``, decoded at a
        reduced scale where the view allows it: class docstring)."""
        if not self.draft:
            return self(load_image(path), generator)
        try:
            data = file_bytes(Path(path))
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Exception:  # let load_image say why, as without draft
            load_image(path)
            raise
        window = self.window(width, height, generator) if self.random_resized else None
        top, left, h, w = window if window is not None else (0, 0, height, width)
        scale = draft_scale(w, h, self.crop if self.random_resized else self.resize)
        image = load_image(path, draft_scale=scale, data=data)
        stored = (width, height) if image.size != (width, height) else None
        return self._view(image, window, stored, generator)

    def _view(self, image: Image.Image, window: tuple[int, int, int, int] | None,
              stored: tuple[int, int] | None, generator: torch.Generator | None) -> torch.Tensor:
        """The view of ``image``; ``window`` in the stored image's pixels, which are ``stored``
        ``(W, H)`` when ``image`` was decoded at a reduced scale (None: at full size)."""
        bilinear = v2.InterpolationMode.BILINEAR
        if self.random_resized and stored is None:
            top, left, h, w = window
            view = F.resized_crop(image, top, left, h, w, [self.crop, self.crop], interpolation=bilinear)
        elif self.random_resized:
            top, left, h, w = window
            sx, sy = image.width / stored[0], image.height / stored[1]
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            view = image.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=box)
        else:
            resized = F.resize(image, [self.resize, self.resize], interpolation=bilinear)
            room = self.resize - self.crop
            top = int(torch.randint(0, room + 1, (), generator=generator)) if room else 0
            left = int(torch.randint(0, room + 1, (), generator=generator)) if room else 0
            view = F.crop(resized, top, left, self.crop, self.crop)
        tensor = F.pil_to_tensor(view)
        if torch.rand(1, generator=generator) < 0.5:
            tensor = tensor.flip(-1)
        return tensor

    def __repr__(self) -> str:
        kind = "random_resized" if self.random_resized else f"resize={self.resize}"
        return f"TrainAugmentation(crop={self.crop}, {kind}{', draft' if self.draft else ''})"


def train_transform(crop: int = 224, resize: int = 256, random_resized: bool = False,
                    draft: bool = False) -> TrainAugmentation:
    """The training augmentation (:class:`TrainAugmentation`): PIL RGB image [, generator] ->
    uint8 tensor (3, crop, crop); :func:`normalize_batch` makes it the network's input."""
    return TrainAugmentation(crop, resize, random_resized, draft=draft)


def localization_transform(size: int = 224) -> Transform:
    """``Resize((size, size))`` and normalize: PIL RGB image -> tensor (3, size, size)."""
    size = _check_size("size", size)
    return v2.Compose([v2.Resize((size, size))] + _to_normalized())


def ten_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Ten normalized crops of ``image`` resized to ``(resize, resize)``: tensor (10, 3, crop, crop).

    torchvision's ``TenCrop`` order: crops 0-4 are the top-left, top-right,
    bottom-left, bottom-right and centre ``crop x crop`` windows of the
    resized image; crops 5-9 are the same five windows of the horizontally
    flipped resized image.  So crop 5 is the mirror image of crop 1 (the
    flipped image's top-left window is the original's top-right one,
    mirrored), 6 of 0, 7 of 3, 8 of 2 and 9 of 4.
    """
    resize = _check_size("resize", resize)
    crop = _check_size("crop", crop)
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized image {resize}")
    resized = F.resize(image, [resize, resize], interpolation=v2.InterpolationMode.BILINEAR)
    tensor = normalize_image(resized)
    return torch.stack(F.ten_crop(tensor, [crop, crop]))


def uint8_views(image: Image.Image, crop: int = 224, resize: int | None = 256):
    """Both evaluation views of one decoded image, resized but not normalized, as uint8.

    Returns the localization view (3, crop, crop) and the ten-crop source (3, resize, resize)
    (``resize=None``: the view alone, no tuple):
    the same PIL resizes as :func:`localization_transform` and :func:`ten_crop`, so that
    :func:`normalize_batch` and :func:`ten_crop_batch` on them give those functions' tensors
    exactly. 200 KB per image instead of 6.6 MB of float crops: cheap to make, to pass
    between processes and to copy to a GPU, where the rest happens batched.
    """
    crop = _check_size("crop", crop)
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    bilinear = v2.InterpolationMode.BILINEAR
    view = F.pil_to_tensor(F.resize(image, [crop, crop], interpolation=bilinear))
    if resize is None:
        return view
    resize = _check_size("resize", resize)
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized image {resize}")
    source = F.pil_to_tensor(F.resize(image, [resize, resize], interpolation=bilinear))
    return view, source


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float32 ``(v / 255 - mean) / std`` on the tensor's device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def ten_crop_batch(sources: torch.Tensor, crop: int = 224) -> torch.Tensor:
    """Normalized sources ``(B, 3, R, R)`` -> ``(B, 10, 3, crop, crop)`` in :func:`ten_crop`'s order
    (slices of each source and of its mirror image; one batched operation per crop)."""
    crop = _check_size("crop", crop)
    if sources.ndim != 4 or crop > min(sources.shape[-2:]):
        raise ValueError(f"expected (B, 3, R, R) sources with R >= {crop}, got {tuple(sources.shape)}")
    return torch.stack(F.ten_crop(sources, [crop, crop]), dim=1)
