"""Ground-truth pixel masks for PxAP, read as wsolevaluation reads them.

Each instance mask and the image's ignore mask are read as grey levels,
resized to the evaluation frame by nearest neighbour and binarized at 0.5
(on the 0-255 grey scale, so any non-zero pixel counts). The ignore region is
the ignore mask minus the foreground. The result is one uint8 (H, W) array:
1 foreground, 0 background, 255 ignored.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

__all__ = ["FOREGROUND", "BACKGROUND", "IGNORE", "load_gt_mask", "read_mask_file"]

FOREGROUND, BACKGROUND, IGNORE = 1, 0, 255


def read_mask_file(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """One mask file -> bool (size, size): grey level > 0.5 after a
    nearest-neighbour resize of the float32 image. Raises FileNotFoundError
    or ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: mask file not found")
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError(f"{path}: not a readable image")
    resized = cv2.resize(np.float32(grey), (size, size), interpolation=cv2.INTER_NEAREST)
    return resized > 0.5


def load_gt_mask(mask_root: str | os.PathLike, mask_paths: Sequence[str], ignore_path: str = "",
                 size: int = 224) -> np.ndarray:
    """The evaluation mask of one image.

    Args:
        mask_root: folder the paths are relative to.
        mask_paths: one path per instance (at least one).
        ignore_path: the ignore mask's path, or "" for none.
        size: side of the square evaluation frame.
    Returns:
        uint8 (size, size): 1 foreground, 0 background, 255 ignored.
    """
    if len(mask_paths) == 0:
        raise ValueError("an image needs at least one instance mask")
    foreground = np.zeros((size, size), bool)
    for p in mask_paths:
        foreground |= read_mask_file(os.path.join(mask_root, p), size)
    out = foreground.astype(np.uint8)
    if ignore_path:
        ignore = read_mask_file(os.path.join(mask_root, ignore_path), size) & ~foreground
        out[ignore] = IGNORE
    return out
