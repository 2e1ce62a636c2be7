"""WSOL data: wsolevaluation metadata, protocol transforms and data sets.

The metadata names are imported eagerly (numpy only); the transform and data
set names load torch/torchvision, so they are imported on first use.  The
synthetic data sets live in :mod:`mnpo.data.synthetic` (import it directly).
"""

from __future__ import annotations

import importlib
from typing import Any

from mnpo.data.metadata import MetadataError, SplitMetadata, read_split, write_split

_LAZY = {
    "MODES": "mnpo.data.dataset",
    "WSOLDataset": "mnpo.data.dataset",
    "collate_evaluation": "mnpo.data.dataset",
    "resize_boxes": "mnpo.data.dataset",
    "subsample_per_class": "mnpo.data.dataset",
    "IMAGENET_MEAN": "mnpo.data.transforms",
    "IMAGENET_STD": "mnpo.data.transforms",
    "ImageReadError": "mnpo.data.transforms",
    "load_image": "mnpo.data.transforms",
    "localization_transform": "mnpo.data.transforms",
    "normalize_image": "mnpo.data.transforms",
    "ten_crop": "mnpo.data.transforms",
    "train_transform": "mnpo.data.transforms",
}

__all__ = sorted(["MetadataError", "SplitMetadata", "read_split", "write_split", *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
