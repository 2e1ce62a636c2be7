"""Ground-truth pixel masks for PxAP.

Each instance mask and the image's ignore mask are read as the pixels whose
stored value is not 0 (:func:`mnpo.data.decode.read_mask`, at any bit depth,
the reader ``mnpo make-metadata`` checks masks with) and resized to the
evaluation frame by nearest neighbour. The ignore region is the ignore mask
minus the foreground. The result is one uint8 (H, W) array: 1 foreground,
0 background, 255 ignored.

wsolevaluation reads masks with ``cv2.imread(..., IMREAD_GRAYSCALE)`` and
keeps grey levels above 0.5: the same pixels for 8-bit grey masks (OpenImages30k's),
the same nearest-neighbour grid. It differs on 16-bit masks, which OpenCV reduces
to their high byte (a mask of value 1 becomes empty), and on colour masks whose
darkest object pixels have a weighted grey level under 0.5 (such as ``(1, 0, 0)``).
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from mnpo.data.decode import read_mask

__all__ = ["FOREGROUND", "BACKGROUND", "IGNORE", "load_gt_mask", "read_mask_file"]

FOREGROUND, BACKGROUND, IGNORE = 1, 0, 255


def read_mask_file(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """One mask file -> bool (size, size): its non-zero pixels after a
    nearest-neighbour resize. Raises FileNotFoundError (a missing file) or
    MaskReadError (a ValueError) naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: mask file not found")
    pixels = read_mask(path)
    return cv2.resize(pixels.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


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
