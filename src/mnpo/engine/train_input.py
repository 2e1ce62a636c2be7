"""The training input pipeline: one loader for the whole run, uint8 batches, randomness of its own.

* :class:`EpochSampler` yields ``(epoch, index)`` keys: rank ``r`` of ``W`` takes ``perm[r::W]``
  of the epoch's ``randperm(n)`` (``DistributedSampler``'s, seeded by ``(seed, epoch)``), so the
  W ranks' k-th batches together are exactly the k-th batch of one process.
* :class:`TrainingItems` turns a key into an item whose random draws (crop, flip, HaS cells,
  fsl's flip) come from a ``torch.Generator`` seeded by ``(seed, epoch, index)`` alone: not
  from torch's global generator, which the model's dropout uses in the main process. So the
  weights do not depend on the number of loader workers, and the key carries the epoch, so
  persistent workers need not be told it. Unreadable images become skipped items.
* :func:`training_loader` builds the run's single ``DataLoader`` (persistent workers, pinned
  memory on CUDA, a generator of its own for the workers' base seed).
* :func:`device_images` moves a batch to the device and normalizes it there (and hides HaS's
  cells), so workers send 150 KB a 224 x 224 image instead of 600 KB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from mnpo.data.transforms import ImageReadError, normalize_batch
from mnpo.engine.evaluate import collate_skipping
from mnpo.engine.training_methods import HideAndSeek

__all__ = ["EpochSampler", "TrainingItems", "device_images", "item_seed", "training_loader"]

log = logging.getLogger(__name__)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s draws in ``epoch`` of a run seeded ``seed``."""
    return (seed * 100003 + epoch) * 1_000_003 + index


class EpochSampler(Sampler):
    """This rank's ``(epoch, index)`` keys of the epoch set by :meth:`set_epoch` (drop_last:
    every rank gets ``n // W`` images)."""

    def __init__(self, size: int, world: int, rank: int, seed: int) -> None:
        self.indices = DistributedSampler(range(size), world, rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.indices.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainingItems(Dataset):
    """Items of ``dataset`` (``WSOLDataset`` in ``'train'`` mode or ``ForegroundDataset``) keyed
    by ``(epoch, index)``, drawn from a generator seeded by :func:`item_seed`.

    ``hide``: Hide-and-Seek; its cells are drawn here, after the view's draws, and come as
    ``hidden_cells`` bool ``(rows, cols)``, to be hidden on the device (:func:`device_images`).
    An unreadable image becomes ``{"skipped": image_id, "reason": ...}`` (see ``collate_skipping``).
    """

    def __init__(self, dataset: Dataset, seed: int, hide: HideAndSeek | None = None) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.hide = hide if hide is not None and hide.grid > 0 else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        try:
            item = self.dataset.item(index, generator)
        except ImageReadError as err:
            log.warning("skipping unreadable image %s", err)
            return {"skipped": self.dataset.image_ids[index], "reason": str(err)}
        if self.hide is not None:
            item["hidden_cells"] = self.hide.hidden_cells(*item["image"].shape[-2:], generator)
        return item


def training_loader(items: TrainingItems, sampler: EpochSampler, batch_size: int, workers: int,
                    device: torch.device, seed: int) -> DataLoader:
    """The run's one loader: call ``sampler.set_epoch(e)`` before iterating it for epoch ``e``.

    Workers stay alive between epochs (``persistent_workers``); batches are pinned for a CUDA
    device (so ``.to(device, non_blocking=True)`` overlaps the copy with compute); the workers'
    base seed comes from a generator seeded by ``seed``, not from torch's global generator
    (which a new iterator would otherwise advance, differently for 0 and for N workers).
    """
    return DataLoader(items, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping(default_collate), pin_memory=device.type == "cuda",
                      drop_last=False, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(int(seed)))


def device_images(batch: dict[str, Any], device: torch.device, hide: HideAndSeek | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """The batch's images on ``device``, as the network takes them: float32 ``(B, 3, H, W)``.

    uint8 images are normalized there (:func:`~mnpo.data.transforms.normalize_batch`); float
    images (a user's own transform) are taken as already normalized. HaS's ``hidden_cells``
    are zeroed after normalization, as wsolevaluation hides patches of the normalized image.
    """
    images = batch["image"].to(device, non_blocking=True)
    images = normalize_batch(images) if images.dtype == torch.uint8 else images.float()
    if hide is not None and "hidden_cells" in batch:
        images = hide.hide(images, batch["hidden_cells"].to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
