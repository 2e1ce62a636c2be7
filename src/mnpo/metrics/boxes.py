"""Boxes from score maps, and their IoU with ground truth, at many thresholds.

The protocol (wsolevaluation, CVPR 2020; spec section 6), for a score map
``s`` (H, W) in [0, 1] and a threshold ``t``:

1. ``u = (s * 255).astype(uint8)`` in float64 (floor), ``level = int(t * u.max())``;
2. foreground ``u > level`` (strictly greater, as ``cv2.THRESH_BINARY``);
3. contours by ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``;
4. *largest* mode keeps ``max(contours, key=cv2.contourArea)``; *multi* mode
   keeps them all; no contour gives the box ``(0, 0, 0, 0)``;
5. a contour's box is ``cv2.boundingRect`` as ``(x, y, min(x + w, W - 1),
   min(y + h, H - 1))``;
6. IoU in inclusive pixel coordinates (``+1`` in widths and heights); an image
   scores the best IoU over its ground-truth boxes (and, in multi mode, over
   its predicted boxes).

Boxes are ``(x0, y0, x1, y1)`` int64 in the map's frame. :func:`predicted_boxes`
gives the box(es) of one map at one threshold (steps 1-5). Two implementations
of the IoU sweep:
:func:`box_ious_reference` is the plain per-threshold OpenCV loop;
:func:`box_ious` answers every threshold from two union-find sweeps
(:mod:`mnpo.metrics._components`) and asks OpenCV only where the largest
contour is not settled by area bounds. Both return identical numbers (tested).
"""

from __future__ import annotations

import numbers
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from mnpo.metrics import _components

__all__ = [
    "BoxScores",
    "PAPER_THRESHOLDS",
    "threshold_grid",
    "box_ious",
    "box_ious_reference",
    "cam_thresholds",
    "check_scoremap",
    "predicted_boxes",
    "threshold_levels",
    "to_uint8",
]

#: The released MNPO code's sweep, 0.05, 0.06, ..., 0.34, built by the same expression
#: (``np.arange(0.05, 0.35, 0.01)``) so the float values, and the levels ``int(t * max)``, are
#: its own: its 0.29000000000000004 gives level 29 for a map maximum of 100 where 0.29 gives 28.
PAPER_THRESHOLDS = np.arange(0.05, 0.35, 0.01)


def threshold_grid(name: str = "full", interval: float = 0.01) -> np.ndarray:
    """``"full"``: wsolevaluation's ``cam_thresholds(interval)``; ``"paper"``: the release's sweep."""
    if name == "full":
        return cam_thresholds(interval)
    if name == "paper":
        return PAPER_THRESHOLDS.copy()
    raise ValueError(f"unknown threshold grid {name!r}; choose 'full' or 'paper'")


def cam_thresholds(interval: float = 0.01) -> np.ndarray:
    """Score-map thresholds ``0, interval, 2*interval, ... < 1`` (float64).

    Built with ``np.arange(0, 1, interval)`` exactly as wsolevaluation does, so
    the float values, and hence ``int(t * max)`` levels, match it bit for bit.
    """
    if not (0.0 < float(interval) < 1.0):
        raise ValueError(f"cam curve interval must be in (0, 1), got {interval!r}")
    return np.arange(0, 1, interval)


def check_scoremap(scoremap: np.ndarray, name: str = "score map") -> None:
    """Raise ValueError/TypeError unless ``scoremap`` is a 2-D float array in [0, 1]."""
    if not isinstance(scoremap, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(scoremap).__name__}")
    if scoremap.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {scoremap.dtype}")
    if scoremap.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) map, got shape {scoremap.shape}")
    if scoremap.size == 0:
        raise ValueError(f"{name}: empty map of shape {scoremap.shape}")
    if np.isnan(scoremap).any():
        raise ValueError(f"{name}: contains NaN")
    lo, hi = float(scoremap.min()), float(scoremap.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: values must lie in [0, 1], got min {lo!r}, max {hi!r}")


def to_uint8(scoremap: np.ndarray) -> np.ndarray:
    """``floor(scoremap * 255)`` as uint8 (H, W), computed in float64.

    wsolevaluation casts every map to float64 before this step (``t2n``), so
    float32 maps are widened first (exact) to give its levels bit for bit.
    """
    return (scoremap.astype(np.float64, copy=False) * 255).astype(np.uint8)


def threshold_levels(image: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Integer binarization levels ``int(t * image.max())`` for each threshold, int64 (T,)."""
    return (np.asarray(thresholds, dtype=np.float64) * image.max()).astype(np.int64)


@dataclass(frozen=True)
class BoxScores:
    """Per-threshold results for one score map.

    Attributes:
        largest_boxes: int64 (T, 4), box of the largest contour at each threshold.
        largest_iou: float64 (T,), best IoU of that box with the ground truth.
        multi_iou: float64 (T,), best IoU over the boxes of all contours.
    """

    largest_boxes: np.ndarray
    largest_iou: np.ndarray
    multi_iou: np.ndarray


def _as_gt(gt_boxes) -> np.ndarray:
    gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    if gt.shape[0] == 0:
        raise ValueError("at least one ground-truth box is needed")
    return np.ascontiguousarray(gt)


def _max_iou(boxes: np.ndarray, gt: np.ndarray) -> float:
    """Best IoU between any of ``boxes`` (N, 4) and any of ``gt`` (G, 4)."""
    a = boxes[:, None, :]
    b = gt[None, :, :]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denom = area_a + area_b - inter
    iou = np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)
    return float(iou.max())


def _contour_box(contour: np.ndarray, width: int, height: int, dx: int = 0, dy: int = 0) -> list[int]:
    x, y, w, h = cv2.boundingRect(contour)
    x, y = x + dx, y + dy
    return [x, y, min(x + w, width - 1), min(y + h, height - 1)]


def box_ious_reference(scoremap: np.ndarray, thresholds: np.ndarray, gt_boxes) -> BoxScores:
    """The plain protocol: one ``cv2.findContours`` per threshold (see module doc).

    Args:
        scoremap: float (H, W) in [0, 1].
        thresholds: float (T,) score-map thresholds.
        gt_boxes: int (G, 4) ground-truth boxes in the map's frame.
    """
    check_scoremap(scoremap)
    gt = _as_gt(gt_boxes)
    height, width = scoremap.shape
    image = to_uint8(scoremap)
    largest, largest_iou, multi_iou = [], [], []
    for t in thresholds:
        _, binary = cv2.threshold(image, int(t * np.max(image)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            boxes = np.zeros((1, 4), np.int64)
            best = boxes[0]
        else:
            boxes = np.array([_contour_box(c, width, height) for c in contours], np.int64)
            best = np.array(_contour_box(max(contours, key=cv2.contourArea), width, height))
        largest.append(best)
        largest_iou.append(_max_iou(best[None], gt))
        multi_iou.append(_max_iou(boxes, gt))
    return BoxScores(np.array(largest, np.int64).reshape(-1, 4),
                     np.array(largest_iou, np.float64), np.array(multi_iou, np.float64))


def predicted_boxes(scoremap: np.ndarray, threshold: float, multi: bool = False) -> np.ndarray:
    """The protocol's box(es) of one score map at one threshold (module doc, steps 1-5).

    Args:
        scoremap: float (H, W) in [0, 1] (checked by :func:`check_scoremap`).
        threshold: score-map threshold ``t`` in [0, 1]; the binarization level is
            ``int(t * max(uint8 map))``.
        multi: ``False`` keeps the largest contour (by ``cv2.contourArea``); ``True`` keeps
            the boxes of all contours, in OpenCV's order (holes included, as ``RETR_TREE``).

    Returns:
        int64 (k, 4) boxes ``(x0, y0, x1, y1)``, inclusive pixel coordinates in the map's
        frame; k is 1 for the largest contour, the contour count in multi mode, and 0 when
        nothing lies above the level (a zero map; at ``t = 1`` every map). Where
        :func:`box_ious_reference` scores the box ``(0, 0, 0, 0)`` for that case, this
        returns no box.
    """
    check_scoremap(scoremap)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    height, width = scoremap.shape
    image = to_uint8(scoremap)
    binary = (image > int(threshold * np.max(image))).astype(np.uint8)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.zeros((0, 4), np.int64)
    if not multi:
        contours = [max(contours, key=cv2.contourArea)]
    return np.array([_contour_box(c, width, height) for c in contours], np.int64).reshape(-1, 4)


def _largest_by_opencv(image: np.ndarray, level: int) -> list[int]:
    """Largest contour's box at ``level``, straight from OpenCV (breaks exact area ties).

    Nested contours can never be the largest (a hole's polygon lies inside its
    parent's), so only outer contours are traced; their order is the same.
    """
    height, width = image.shape
    binary = (image > level).astype(np.uint8)
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    return _contour_box(max(contours, key=cv2.contourArea), width, height)


_scratch = threading.local()


def _workspace(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's scratch buffers for the sweeps, grown on demand."""
    work = getattr(_scratch, "work", None)
    if work is None or work[0].shape[0] < (height + 2) * (width + 2):
        work = _scratch.work = _components.workspace(height, width)
    return work


def box_ious(scoremap: np.ndarray, thresholds: np.ndarray, gt_boxes, *, multi: bool = True) -> BoxScores:
    """Fast equivalent of :func:`box_ious_reference` (same arguments, same numbers).

    ``multi=False`` skips the hole sweep; ``multi_iou`` then covers outer
    contours only and must not be used. Without numba installed this is the plain loop.
    """
    if not _components.HAVE_NUMBA:
        return box_ious_reference(scoremap, thresholds, gt_boxes)
    check_scoremap(scoremap)
    gt = _as_gt(gt_boxes)
    image = np.ascontiguousarray(to_uint8(scoremap))
    levels = threshold_levels(image, thresholds)
    unique, inverse = np.unique(levels, return_inverse=True)
    work = _workspace(*image.shape)
    start = _components.sort_pixels(image, work[2])
    largest, decided, multi_iou, _ = _components.foreground_sweep(image, unique, gt, *work, start)
    for j in np.flatnonzero(~decided):
        largest[j] = _largest_by_opencv(image, int(unique[j]))
    if multi:
        hole_iou, _ = _components.hole_sweep(image, unique, gt, *work, start)
        multi_iou = np.maximum(multi_iou, hole_iou)
    largest_iou = _components.max_iou_rows(largest, gt)
    return BoxScores(largest[inverse], largest_iou[inverse], multi_iou[inverse])
