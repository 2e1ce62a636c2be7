"""A WSOL data set over an image folder and a wsolevaluation split.

``WSOLDataset(image_root, metadata, mode)`` yields one dict per image:

``image``     tensor (3, 224, 224): the mode's view of the image;
``label``     int class index;
``image_id``  str, the image's relative path (``image_root / image_id``);
``index``     int position in the data set.

Mode ``'train'`` uses :func:`~mnpo.data.transforms.train_transform`: ``image`` is uint8
(normalize batches with :func:`~mnpo.data.transforms.normalize_batch`, on the device), drawn
from the generator given to :meth:`WSOLDataset.item` (torch's global one for ``data[i]``).
``'localization'`` uses :func:`~mnpo.data.transforms.localization_transform` (float32, normalized).
Mode ``'evaluate'`` decodes each image once and adds, from the same decoded
image, ``ten_crop`` (10, 3, 224, 224) (:func:`~mnpo.data.transforms.ten_crop`;
``ten_crop_source`` uint8 (3, 256, 256) with ``uint8_views``; neither with ``ten_crop=False``)
and, for box sets, ``boxes``: int64 (k, 4) boxes in the 224 x 224 frame,
resized as wsolevaluation does (:func:`resize_boxes`) from the size in
``image_sizes.txt`` (the original image size; the file on disk may have been
stored at another size), or from the decoded size where a split has no
``image_sizes.txt``.  For mask sets it adds ``mask_paths`` (tuple of str) and
``ignore_path`` (str, ``""`` for none), joined to ``mask_root`` when given.
Batch evaluation items with :func:`collate_evaluation` (boxes are ragged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mnpo.data.device_decode import encoded_image
from mnpo.data.metadata import SplitMetadata, read_split
from mnpo.data.transforms import load_image, localization_transform, ten_crop, train_transform, uint8_views

__all__ = ["MODES", "WSOLDataset", "collate_evaluation", "resize_boxes", "subsample_per_class"]

log = logging.getLogger(__name__)

MODES = ("train", "localization", "evaluate")


def resize_boxes(boxes: np.ndarray, sizes: Sequence[int] | np.ndarray, target: int = 224) -> np.ndarray:
    """Boxes of an image of size ``(w, h)`` moved into the ``target x target`` frame.

    wsolevaluation's scalar rule, vectorized: ``int(float(x) * target / float(w))``
    for ``x0, x1`` and the same with ``h`` for ``y0, y1`` (float64 arithmetic in
    that order, truncation toward zero).

    Args:
        boxes: (k, 4) integer ``x0, y0, x1, y1`` boxes.
        sizes: one ``(w, h)`` for all boxes, or a (k, 2) array, one per box.
        target: the side of the square frame, in pixels.

    Returns:
        int64 array (k, 4).
    """
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (k, 4), got {b.shape}")
    s = np.asarray(sizes, dtype=np.float64)
    if s.shape == (2,):
        s = s.reshape(1, 2)
    elif s.shape != (len(b), 2):
        raise ValueError(f"sizes must be (w, h) or shape ({len(b)}, 2), got shape {s.shape}")
    if not (s > 0).all():
        raise ValueError(f"image sizes must be positive, got {s[~(s > 0).all(axis=1)][:1].tolist()}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1:
        raise ValueError(f"target must be a positive int, got {target!r}")
    t = float(target)
    scaled = b.astype(np.float64) * t / s[:, [0, 1, 0, 1]]
    return scaled.astype(np.int64)  # truncation toward zero, as int()


def subsample_per_class(meta: SplitMetadata, num_per_class: int, seed: int = 0) -> SplitMetadata:
    """At most ``num_per_class`` images of each class, drawn without replacement.

    Deterministic for a given ``seed`` (``numpy.random.default_rng(seed)``,
    classes visited in increasing label order); the kept images keep the
    split's file order.  A class with fewer images keeps them all (logged).
    """
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
        raise ValueError(f"num_per_class must be a positive int, got {num_per_class!r}")
    labels = np.array([meta.labels[i] for i in meta.image_ids], dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    short = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= num_per_class:
            if len(members) < num_per_class:
                short.append(int(label))
            keep.append(members)
        else:
            keep.append(rng.choice(members, size=num_per_class, replace=False))
    if short:
        log.warning("%d classes have fewer than %d images and are kept whole (e.g. class %d)",
                    len(short), num_per_class, short[0])
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return meta.select(meta.image_ids[k] for k in chosen.tolist())


class WSOLDataset(Dataset):
    """Images of one split with their labels (and, in ``'evaluate'`` mode, localization).

    Args:
        image_root: folder the image ids are relative to.
        metadata: a split folder (read with :func:`~mnpo.data.metadata.read_split`)
            or a :class:`~mnpo.data.metadata.SplitMetadata`.
        mode: ``'train'``, ``'localization'`` or ``'evaluate'``.
        transform: replaces the mode's image transform (PIL RGB image ->
            tensor); in ``'evaluate'`` mode it makes ``image`` (not ``ten_crop``).
        num_per_class: keep at most this many images per class
            (:func:`subsample_per_class`, with ``seed``).
        seed: seed of the subsampling.
        num_classes: passed to ``read_split`` (labels must be below it).
        mask_root: folder the mask paths of a mask set are relative to.
        crop_size: side of ``image``, ``ten_crop`` crops and the box frame (224).
        resize_size: side of the square resize before cropping (256).
        random_resized: training view by ``RandomResizedCrop`` instead.
        uint8_views: ``'evaluate'`` mode: ``image`` and the ten-crop source as uint8
            (:func:`~mnpo.data.transforms.uint8_views`), normalized and cropped on the device.
        ten_crop: ``'evaluate'`` mode: also make the ten crops (or their source); off when
            only the 224 view is scored (training's validation), which halves the resizing.
        device_decode: with ``uint8_views``: an item carries ``encoded``, the file as
            :func:`~mnpo.data.device_decode.encoded_image` reads it (a JPEG's bytes), instead of
            ``image`` and ``ten_crop_source``; :func:`~mnpo.data.device_decode.device_views`
            makes those on the device.
    """

    def __init__(
        self,
        image_root: str | os.PathLike[str],
        metadata: str | os.PathLike[str] | SplitMetadata,
        mode: str = "train",
        transform: Callable[[Any], torch.Tensor] | None = None,
        *,
        num_per_class: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        mask_root: str | os.PathLike[str] | None = None,
        crop_size: int = 224,
        resize_size: int = 256,
        random_resized: bool = False,
        uint8_views: bool = False,
        ten_crop: bool = True,
        device_decode: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if uint8_views and (mode != "evaluate" or transform is not None):
            raise ValueError("uint8_views is an 'evaluate'-mode option and replaces the transform")
        if device_decode and not uint8_views:
            raise ValueError("device_decode goes with uint8_views (the device makes the uint8 views)")
        meta = metadata if isinstance(metadata, SplitMetadata) else read_split(metadata, num_classes)
        if num_classes is not None and meta.num_classes > num_classes:
            raise ValueError(f"labels go up to {meta.num_classes - 1}, beyond num_classes {num_classes}")
        if num_per_class is not None:
            before = len(meta)
            meta = subsample_per_class(meta, num_per_class, seed)
            log.info("kept %d of %d images (%d per class, seed %d)", len(meta), before, num_per_class, seed)
        self.image_root = Path(image_root)
        self.meta = meta
        self.mode = mode
        self.mask_root = None if mask_root is None else Path(mask_root)
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.uint8_views = uint8_views
        self.ten_crop = bool(ten_crop)
        self.device_decode = bool(device_decode)
        if transform is None:
            if mode == "train":
                transform = train_transform(crop_size, resize_size, random_resized=random_resized)
            else:
                transform = localization_transform(crop_size)
        self.transform = transform

    @property
    def image_ids(self) -> tuple[str, ...]:
        return self.meta.image_ids

    def __len__(self) -> int:
        return len(self.meta)

    def image_path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.image_root / self.meta.image_ids[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def item(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Item ``index``; a random transform draws from ``generator`` when it takes one
        (``takes_generator``, as :class:`~mnpo.data.transforms.TrainAugmentation` does)."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        image_id = self.meta.image_ids[index]
        if self.device_decode:
            return self._encoded_item(index, image_id)
        if self.mode == "train" and getattr(self.transform, "draft", False):  # decodes what the view needs
            return {"image": self.transform.from_file(self.image_root / image_id, generator),
                    "label": self.meta.labels[image_id], "image_id": image_id, "index": index}
        image = load_image(self.image_root / image_id)
        if self.uint8_views and self.ten_crop:
            view, source = uint8_views(image, self.crop_size, self.resize_size)
        elif self.uint8_views:
            view = uint8_views(image, self.crop_size, None)
        elif getattr(self.transform, "takes_generator", False):
            view = self.transform(image, generator)
        else:
            view = self.transform(image)
        item: dict[str, Any] = {
            "image": view,
            "label": self.meta.labels[image_id],
            "image_id": image_id,
            "index": index,
        }
        if self.mode != "evaluate":
            return item
        if self.ten_crop and self.uint8_views:
            item["ten_crop_source"] = source
        elif self.ten_crop:
            item["ten_crop"] = ten_crop(image, self.resize_size, self.crop_size)
        return self._with_localization(item, image_id, image.size)

    def _encoded_item(self, index: int, image_id: str) -> dict[str, Any]:
        encoded = encoded_image(self.image_root / image_id)
        item = {"encoded": encoded, "label": self.meta.labels[image_id], "image_id": image_id, "index": index}
        return self._with_localization(item, image_id, encoded.size)

    def _with_localization(self, item: dict[str, Any], image_id: str, decoded_size: tuple[int, int]) -> dict[str, Any]:
        """``item`` with the image's boxes in the crop frame, or its mask paths."""
        meta = self.meta
        if meta.boxes is not None:
            size = meta.sizes[image_id] if meta.sizes is not None else decoded_size
            if meta.sizes is not None and size != decoded_size:
                log.debug("%s: decoded size %s differs from image_sizes.txt %s; boxes use the latter",
                          image_id, decoded_size, size)
            item["boxes"] = resize_boxes(meta.boxes[image_id], size, self.crop_size)
        elif meta.mask_paths is not None and meta.ignore_paths is not None:
            root = self.mask_root
            masks = meta.mask_paths[image_id]
            ignore = meta.ignore_paths[image_id]
            if root is not None:
                masks = tuple(str(root / m) for m in masks)
                ignore = str(root / ignore) if ignore else ""
            item["mask_paths"] = masks
            item["ignore_path"] = ignore
        return item


def collate_evaluation(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``'evaluate'`` items: tensors stacked, ints as an int64 tensor, the rest as lists.

    ``image`` (B, 3, S, S), ``ten_crop`` (B, 10, 3, S, S), ``label`` and
    ``index`` int64 (B,), and lists of length B for ``image_id``, ``boxes``
    (int64 (k_i, 4) arrays, ragged), ``mask_paths`` and ``ignore_path``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0])
    for n, item in enumerate(batch[1:], 1):
        if list(item) != keys:
            raise ValueError(f"item {n} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out
