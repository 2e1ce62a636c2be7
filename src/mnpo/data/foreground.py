"""Images with per-pixel foreground targets, for the few-shot fully supervised baseline (FSL).

``ForegroundDataset`` yields the image resized straight to ``size x size`` (the evaluation
view: no crop, so every box stays whole) and its target, both flipped left-right with
probability 1/2 (a draw from the generator given to :meth:`ForegroundDataset.item`, torch's
global one for ``data[i]``):

``image``   uint8 (3, S, S) (normalize batches on the device with
            :func:`~mnpo.data.transforms.normalize_batch`);
``target``  uint8 (S, S): 1 foreground, 0 background, 255 ignored;
``label``, ``image_id``, ``index`` as in :class:`~mnpo.data.dataset.WSOLDataset`.

A box split's target is the union of its boxes (resized into the frame as the evaluation
resizes them, corners inclusive); a mask split's is the evaluation mask
(:func:`~mnpo.metrics.masks.load_gt_mask`: instances, ignore region).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mnpo.data.dataset import resize_boxes
from mnpo.data.metadata import SplitMetadata
from mnpo.data.transforms import load_image

__all__ = ["ForegroundDataset", "foreground_target"]


def foreground_target(meta: SplitMetadata, image_id: str, size: int, mask_root: str | os.PathLike | None = None,
                      decoded_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (size, size): 1 inside any box (or on the mask), 0 elsewhere, 255 ignored.

    Boxes come from the ``image_sizes.txt`` frame (``decoded_size``, the file's ``(w, h)``, where
    the split has none), as :func:`~mnpo.data.dataset.resize_boxes` moves them.
    """
    if meta.kind == "box":
        frame = meta.sizes[image_id] if meta.sizes is not None else decoded_size
        if frame is None:
            raise ValueError(f"{image_id}: no image size to place its boxes (no image_sizes.txt)")
        target = np.zeros((size, size), np.uint8)
        for x0, y0, x1, y1 in resize_boxes(meta.boxes[image_id], frame, size):
            target[y0:y1 + 1, x0:x1 + 1] = 1
        return target
    if meta.kind == "mask":
        if mask_root is None:
            raise ValueError("a mask split needs its mask root for foreground targets")
        from mnpo.metrics.masks import load_gt_mask

        return load_gt_mask(mask_root, meta.mask_paths[image_id], meta.ignore_paths.get(image_id, ""), size)
    raise ValueError("the split has no localization.txt: no foreground targets")


class ForegroundDataset(Dataset):
    """See the module docstring. ``flip=False`` gives the unaugmented view."""

    def __init__(self, image_root: str | os.PathLike, meta: SplitMetadata, *, size: int = 224,
                 mask_root: str | os.PathLike | None = None, flip: bool = True) -> None:
        if meta.kind not in ("box", "mask"):
            raise ValueError("foreground targets need a split with boxes or masks (localization.txt)")
        if meta.kind == "mask" and mask_root is None:
            raise ValueError("a mask split needs its mask root for foreground targets")
        self.image_root = Path(image_root)
        self.meta = meta
        self.size = int(size)
        self.mask_root = mask_root
        self.flip = flip

    @property
    def image_ids(self) -> tuple[str, ...]:
        return self.meta.image_ids

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def item(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Item ``index``, flipped by a draw from ``generator`` (when ``flip``)."""
        image_id = self.meta.image_ids[index]
        image = load_image(self.image_root / image_id)
        view = F.pil_to_tensor(F.resize(image, [self.size, self.size], interpolation=v2.InterpolationMode.BILINEAR))
        target = torch.from_numpy(foreground_target(self.meta, image_id, self.size, self.mask_root, image.size))
        if self.flip and torch.rand((), generator=generator) < 0.5:
            view, target = view.flip(-1), target.flip(-1)
        return {"image": view, "target": target, "label": self.meta.labels[image_id], "image_id": image_id,
                "index": int(index)}
