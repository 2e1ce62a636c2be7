"""Localization metrics over a split: streaming evaluators and the two protocols.

An evaluator is fed score maps batch by batch (``update``) and returns, with
``compute``, per-threshold *curves*: how many images are correct at each
score-map threshold. Metrics are read off the curves in two ways, and both
are always labelled:

``oracle``
    the best threshold on the evaluated split itself (the MNPO paper's way,
    and wsolevaluation's ``compute``);
``calibrated``
    the threshold chosen on ``val`` (full supervision, few images per class)
    and applied to ``test`` (wsolevaluation's fair protocol): see
    :func:`calibrated_metrics`.

Metrics (percent), as wsolevaluation (CVPR 2020) and spec section 6 define them:

* ``max_box_acc``: largest contour, IoU >= 0.5, best threshold;
* ``gt_known_loc``: the same quantity under the name the MNPO paper uses
  (equal to ``max_box_acc`` on the same grid; kept for the paper's tables);
* ``max_box_acc_v2``: all contours, mean over IoU 0.3/0.5/0.7 of the best
  accuracy at each IoU (one threshold per IoU);
* ``top1_loc`` / ``top5_loc`` (when logits are given): correct box (largest
  contour, IoU >= 0.5) and the true class ranked first / within five, where a
  class's rank is its place in the logits sorted high to low, ties in class
  order (as ``argmax`` and ``torch.topk``: a constant classifier is right on
  class 0 only, not on every class);
* ``pxap`` (mask sets): area under the pixel precision-recall curve.

Score maps are float (H, W) in [0, 1] in the resized frame (224 x 224 by
default); ground-truth boxes are ``(x0, y0, x1, y1)`` in that frame.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mnpo.io import decode_array, encode_array
from mnpo.metrics.boxes import box_ious, cam_thresholds, check_scoremap

__all__ = [
    "BoxCurves",
    "NoLocalizationEvaluator",
    "PerImage",
    "BoxEvaluator",
    "MaskCurves",
    "MaskEvaluator",
    "Metric",
    "calibrated_metrics",
    "class_ranks",
    "oracle_metrics",
    "precision_recall",
    "pxap_from_histograms",
    "score_histogram",
]

#: IoU thresholds (percent) of MaxBoxAccV2.
IOU_THRESHOLDS_V2 = (30, 50, 70)


@dataclass(frozen=True)
class Metric:
    """One number of the report: ``value`` in percent and the score-map
    threshold(s) it was read at (one per IoU for ``max_box_acc_v2``, ``None``
    for threshold-free metrics such as PxAP)."""

    value: float
    threshold: float | tuple[float, ...] | None

    def to_json(self) -> dict:
        t = self.threshold
        return {"value": self.value, "threshold": list(t) if isinstance(t, tuple) else t}


def class_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank of the true class: its place among the logits sorted high to low, ties in class order.

    The count of classes with a larger logit, plus those with an equal logit and
    a smaller index; top-1 is then ``argmax`` (the first maximum), as
    wsolevaluation's accuracy and ``torch.topk``. Counting only strictly larger
    logits would call a constant classifier right on every image.

    Args:
        logits: float (B, C).
        labels: int (B,), in ``[0, C)``.
    Returns:
        int64 (B,); top-k is correct where ``rank < k``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (B, C) and labels (B,), got {logits.shape} and {labels.shape}")
    if np.isnan(logits).any():
        raise ValueError("logits contain NaN")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    true = logits[np.arange(len(labels)), labels][:, None]
    earlier = np.arange(logits.shape[1])[None, :] < labels[:, None]
    return (logits > true).sum(axis=1) + ((logits == true) & earlier).sum(axis=1)


@dataclass(frozen=True)
class BoxCurves:
    """Per-threshold correct counts of a box split.

    Attributes:
        thresholds: float64 (T,), score-map thresholds.
        num_images: images evaluated.
        largest: int64 (T,), images whose largest-contour box has IoU >= 0.5.
        multi: int64 (len(iou_thresholds), T), images with some contour box at
            IoU >= each of ``iou_thresholds``.
        iou_thresholds: IoU thresholds (percent) of ``multi``.
        top1, top5: int64 (T,), ``largest`` and the class in the top 1 / 5,
            or None when no logits were given.
    """

    thresholds: np.ndarray
    num_images: int
    largest: np.ndarray
    multi: np.ndarray
    iou_thresholds: tuple[int, ...] = IOU_THRESHOLDS_V2
    top1: np.ndarray | None = None
    top5: np.ndarray | None = None

    def accuracy(self, counts: np.ndarray) -> np.ndarray:
        """Counts -> accuracy in percent, as wsolevaluation: ``counts * 100. / n``."""
        if self.num_images == 0:
            raise ValueError("no image was evaluated")
        return counts * 100.0 / float(self.num_images)

    def named_curves(self) -> dict[str, np.ndarray]:
        """Accuracy curves (percent, (T,)) of every single-threshold metric."""
        curves = {"max_box_acc": self.accuracy(self.largest), "gt_known_loc": self.accuracy(self.largest)}
        if self.top1 is not None:
            curves["top1_loc"] = self.accuracy(self.top1)
            curves["top5_loc"] = self.accuracy(self.top5)
        return curves


@dataclass(frozen=True)
class MaskCurves:
    """Pixel score histograms of a mask split.

    Attributes:
        thresholds: float64 (T,), the bins' left edges (then 1, 2, 3).
        num_images: images evaluated.
        positive, negative: float64 (T + 2,), counts of foreground / background
            pixels (ignore pixels excluded) per bin ``[e_i, e_{i+1})``.
    """

    thresholds: np.ndarray
    num_images: int
    positive: np.ndarray
    negative: np.ndarray

    @property
    def pxap(self) -> float:
        return pxap_from_histograms(self.positive, self.negative)


@dataclass(frozen=True)
class PerImage:
    """What each image scored, for the report's per-class table, IoU distribution and gallery.

    Attributes:
        image_ids: (N,) ids in the order they were evaluated.
        values: float64, (N, T) for a box split: the IoU of the largest-contour box with the
            ground truth at each score-map threshold (the quantity MaxBoxAcc counts at IoU >= 0.5);
            (N,) for a mask split: the image's own PxAP (percent; NaN when it has no foreground).
    """

    image_ids: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self) -> None:
        if len(self.values) != len(self.image_ids):
            raise ValueError(f"{len(self.image_ids)} image ids but {len(self.values)} rows of values")

    @staticmethod
    def concat(parts: Sequence["PerImage"]) -> "PerImage":
        """Several ranks' records as one (an id twice is an error)."""
        ids = tuple(i for p in parts for i in p.image_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("an image was recorded by more than one part")
        values = [p.values for p in parts if len(p.values)]
        return PerImage(ids, np.concatenate(values) if values else parts[0].values[:0])

    def to_state(self) -> dict[str, Any]:
        """JSON-able: the ids and the values, exactly (see :func:`mnpo.io.encode_array`)."""
        return {"ids": list(self.image_ids), "values": encode_array(self.values)}

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> "PerImage":
        return PerImage(tuple(state["ids"]), decode_array(state["values"]))


def _threshold_value(thresholds: np.ndarray, index: int) -> float:
    return float(thresholds[index])


def oracle_metrics(curves: BoxCurves | MaskCurves) -> dict[str, Metric]:
    """Metrics at the best threshold of the evaluated split itself (first argmax)."""
    if isinstance(curves, MaskCurves):
        return {"pxap": Metric(curves.pxap, None)}
    t = curves.thresholds
    out = {}
    for name, acc in curves.named_curves().items():
        best = int(np.argmax(acc))
        out[name] = Metric(float(acc[best]), _threshold_value(t, best))
    accs = curves.accuracy(curves.multi)
    bests = [int(np.argmax(row)) for row in accs]
    out["max_box_acc_v2"] = Metric(float(np.mean([row.max() for row in accs])),
                                   tuple(_threshold_value(t, b) for b in bests))
    return _ordered(out)


def calibrated_metrics(val: BoxCurves | MaskCurves, test: BoxCurves | MaskCurves) -> dict[str, Metric]:
    """Metrics on ``test`` at the thresholds that are best on ``val``.

    Each metric picks its own threshold on its own ``val`` curve (first
    argmax); ``max_box_acc_v2`` picks one per IoU threshold. PxAP needs no
    threshold and is ``test``'s own.
    """
    if type(val) is not type(test):
        raise ValueError(f"val and test curves differ in kind: {type(val).__name__} vs {type(test).__name__}")
    if not np.array_equal(val.thresholds, test.thresholds):
        raise ValueError("val and test were evaluated on different threshold grids")
    if isinstance(test, MaskCurves):
        return {"pxap": Metric(test.pxap, None)}
    if val.iou_thresholds != test.iou_thresholds:
        raise ValueError(f"IoU thresholds differ: {val.iou_thresholds} vs {test.iou_thresholds}")
    t = test.thresholds
    val_curves, test_curves = val.named_curves(), test.named_curves()
    out = {}
    for name, acc in test_curves.items():
        if name not in val_curves:
            continue  # e.g. top-k needs logits on val too
        chosen = int(np.argmax(val_curves[name]))
        out[name] = Metric(float(acc[chosen]), _threshold_value(t, chosen))
    chosen = [int(np.argmax(row)) for row in val.accuracy(val.multi)]
    test_acc = test.accuracy(test.multi)
    out["max_box_acc_v2"] = Metric(float(np.mean([test_acc[i, c] for i, c in enumerate(chosen)])),
                                   tuple(_threshold_value(t, c) for c in chosen))
    return _ordered(out)


_ORDER = ("max_box_acc", "max_box_acc_v2", "gt_known_loc", "top1_loc", "top5_loc", "pxap")


def _ordered(metrics: dict[str, Metric]) -> dict[str, Metric]:
    return {k: metrics[k] for k in _ORDER if k in metrics}


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _as_maps(maps, count: int) -> list[np.ndarray]:
    """Accept (B, H, W) arrays or tensors, or a sequence of (H, W) arrays."""
    if hasattr(maps, "detach"):  # torch tensor, without importing torch here
        maps = maps.detach().cpu().numpy()
    if isinstance(maps, np.ndarray):
        if maps.ndim != 3:
            raise ValueError(f"expected maps of shape (B, H, W), got {maps.shape}")
        maps = list(maps)
    else:
        maps = list(maps)
    if len(maps) != count:
        raise ValueError(f"got {len(maps)} maps for {count} image ids")
    return maps


class _Streaming:
    """Shared bookkeeping: ids seen once, maps of the expected size, a thread pool."""

    def __init__(self, known_ids: Iterable[str], thresholds, image_size: int, workers: int | None,
                 per_image: bool = False):
        self.per_image = bool(per_image)
        self._records: dict[str, np.ndarray] = {}
        self.thresholds = cam_thresholds() if thresholds is None else np.asarray(thresholds, np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0:
            raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {self.thresholds.shape}")
        if ((self.thresholds < 0) | (self.thresholds >= 1)).any():
            raise ValueError("thresholds must lie in [0, 1)")
        self.image_size = int(image_size)
        self._known = set(known_ids)
        self._seen: set[str] = set()
        self._misses: set[str] = set()
        self.workers = _default_workers() if workers is None else int(workers)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def _check_batch(self, maps, image_ids: Sequence[str]) -> list[np.ndarray]:
        image_ids = list(image_ids)
        maps = _as_maps(maps, len(image_ids))
        for image_id, m in zip(image_ids, maps):
            if image_id not in self._known:
                raise KeyError(f"image id {image_id!r} is not in the split's metadata")
            if image_id in self._seen:
                raise ValueError(f"image id {image_id!r} was already evaluated")
            check_scoremap(m, name=f"score map of {image_id!r}")
            if m.shape != (self.image_size, self.image_size):
                raise ValueError(f"score map of {image_id!r} has shape {m.shape}, "
                                 f"expected ({self.image_size}, {self.image_size})")
        self._seen.update(image_ids)
        return maps

    def _check_new_ids(self, image_ids: Sequence[str]) -> list[str]:
        image_ids = list(image_ids)
        for image_id in image_ids:
            if image_id not in self._known:
                raise KeyError(f"image id {image_id!r} is not in the split's metadata")
            if image_id in self._seen:
                raise ValueError(f"image id {image_id!r} was already evaluated")
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("an image id is given twice")
        return image_ids

    @property
    def misses(self) -> set[str]:
        """Ids counted by :meth:`add_misses` (images that could not be evaluated)."""
        return set(self._misses)

    def _map(self, fn: Callable, *iterables) -> list:
        if self._pool is None:
            return list(map(fn, *iterables))
        return list(self._pool.map(fn, *iterables))

    @property
    def missing_ids(self) -> set[str]:
        """Ids of the split that have not been evaluated yet."""
        return self._known - self._seen

    @property
    def seen_ids(self) -> set[str]:
        """Ids evaluated so far."""
        return set(self._seen)

    def _base_state(self, kind: str) -> dict[str, Any]:
        state = {"kind": kind, "thresholds": self.thresholds.tolist(), "n": self._n, "seen": sorted(self._seen),
                 "misses": sorted(self._misses)}
        if self.per_image:
            state["per_image"] = self.records().to_state()
        return state

    _row_shape: tuple[int, ...] = ()  # of one image's record

    def _record(self, image_ids: Sequence[str], values: Sequence[np.ndarray]) -> None:
        if self.per_image:
            self._records.update(zip(image_ids, values))

    def records(self) -> PerImage:
        """Every evaluated image's values, in evaluation order (needs ``per_image=True``)."""
        if not self.per_image:
            raise ValueError("the evaluator was made with per_image=False: it keeps no per-image values")
        ids = tuple(self._records)
        values = np.array([self._records[i] for i in ids], np.float64).reshape(len(ids), *self._row_shape)
        return PerImage(ids, values)

    def _load_base_state(self, state: Mapping[str, Any], kind: str) -> None:
        if state.get("kind") != kind:
            raise ValueError(f"evaluator state of kind {state.get('kind')!r}, expected {kind!r}")
        if not np.array_equal(np.asarray(state["thresholds"], np.float64), self.thresholds):
            raise ValueError("evaluator state was computed at other thresholds")
        seen = set(state["seen"])
        unknown = seen - self._known
        if unknown:
            raise ValueError(f"evaluator state holds image ids the split does not have, e.g. {sorted(unknown)[:3]}")
        if len(seen) != int(state["n"]):
            raise ValueError(f"evaluator state counts {state['n']} images but lists {len(seen)}")
        misses = set(state.get("misses", ()))
        if not misses <= seen:
            raise ValueError("evaluator state lists misses it does not count")
        if self.per_image:
            if "per_image" not in state:
                raise ValueError("evaluator state keeps no per-image values, but this evaluator needs them")
            records = PerImage.from_state(state["per_image"])
            if set(records.image_ids) != seen:
                raise ValueError("evaluator state's per-image values do not cover the images it counts")
            self._records = dict(zip(records.image_ids, records.values))
        self._seen = seen
        self._misses = misses
        self._n = int(state["n"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BoxEvaluator(_Streaming):
    """Streaming box metrics (MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 / Top-5 Loc).

    Args:
        gt_boxes: image id -> int (k, 4) ground-truth boxes in the resized frame.
        labels: image id -> class, needed for Top-1 / Top-5 Loc.
        thresholds: float (T,) score-map thresholds in [0, 1); default
            ``cam_thresholds(0.01)``.
        iou_thresholds: IoU thresholds (percent) of MaxBoxAccV2.
        image_size: side of the square maps (224 in the protocol).
        workers: threads over the images of a batch (default: CPU count, <= 8).
        per_image: also keep each image's largest-contour IoU at every threshold
            (:meth:`records`; 8 T bytes per image).
    """

    def __init__(self, gt_boxes: Mapping[str, np.ndarray], labels: Mapping[str, int] | None = None,
                 thresholds=None, iou_thresholds: Sequence[int] = IOU_THRESHOLDS_V2,
                 image_size: int = 224, workers: int | None = None, per_image: bool = False):
        super().__init__(gt_boxes.keys(), thresholds, image_size, workers, per_image)
        self.gt_boxes = {k: np.ascontiguousarray(np.asarray(v, np.int64).reshape(-1, 4)) for k, v in gt_boxes.items()}
        self.labels = labels
        self.iou_thresholds = tuple(int(i) for i in iou_thresholds)
        if not all(0 < i <= 100 for i in self.iou_thresholds):
            raise ValueError(f"IoU thresholds are percentages in (0, 100], got {self.iou_thresholds}")
        t = len(self.thresholds)
        self._row_shape = (t,)
        self._n = 0
        self._largest = np.zeros(t, np.int64)
        self._multi = np.zeros((len(self.iou_thresholds), t), np.int64)
        self._top = None  # (2, T) once logits arrive

    def _one(self, scoremap: np.ndarray, image_id: str):
        scores = box_ious(scoremap, self.thresholds, self.gt_boxes[image_id])
        return scores.largest_iou >= 0.5, scores.multi_iou, scores.largest_iou

    def _ranks(self, logits, image_ids: list[str]) -> np.ndarray:
        if self.labels is None:
            raise ValueError("logits were given but the evaluator has no class labels")
        if self._top is None and self._n > len(self._misses):
            raise ValueError("logits must be given with every batch or with none")
        if hasattr(logits, "detach"):
            logits = logits.detach().cpu().numpy()
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(image_ids):
            raise ValueError(f"logits must be ({len(image_ids)}, C) for {len(image_ids)} image ids, "
                             f"got shape {logits.shape}")
        missing = [i for i in image_ids if i not in self.labels]
        if missing:
            raise KeyError(f"no class label for image id {missing[0]!r}")
        return class_ranks(logits, np.array([self.labels[i] for i in image_ids]))

    def update(self, maps, image_ids: Sequence[str], logits=None) -> None:
        """Add a batch.

        Args:
            maps: float (B, H, W) array or tensor, or B arrays (H, W), in [0, 1].
            image_ids: B ids of the split.
            logits: float (B, C) class scores (for Top-1 / Top-5 Loc), or None.
                Give them for every batch or for none.
        """
        image_ids = list(image_ids)
        ranks = None
        if logits is not None:
            ranks = self._ranks(logits, image_ids)
        elif self._top is not None:
            raise ValueError("logits must be given with every batch or with none")
        maps = self._check_batch(maps, image_ids)
        results = self._map(self._one, maps, image_ids)
        correct = np.array([r[0] for r in results]).reshape(len(results), -1)
        multi = np.array([r[1] for r in results]).reshape(len(results), -1)
        self._record(image_ids, [r[2] for r in results])
        if ranks is not None:
            if self._top is None:
                self._top = np.zeros((2, len(self.thresholds)), np.int64)
            self._top[0] += (correct & (ranks < 1)[:, None]).sum(axis=0)
            self._top[1] += (correct & (ranks < 5)[:, None]).sum(axis=0)
        self._largest += correct.sum(axis=0)
        for i, iou in enumerate(self.iou_thresholds):
            self._multi[i] += (multi >= iou / 100).sum(axis=0)
        self._n += len(image_ids)

    def add_misses(self, image_ids: Sequence[str]) -> None:
        """Count images that have no map (an unreadable file) as failing every metric: IoU 0 at
        every threshold and the class never in the top five. The denominators keep them."""
        image_ids = self._check_new_ids(image_ids)
        self._seen.update(image_ids)
        self._misses.update(image_ids)
        self._record(image_ids, [np.zeros(len(self.thresholds))] * len(image_ids))
        self._n += len(image_ids)

    def state_dict(self) -> dict[str, Any]:
        """Everything counted so far, as JSON-able data (to resume an interrupted evaluation)."""
        return {**self._base_state("box"), "iou_thresholds": list(self.iou_thresholds),
                "largest": self._largest.tolist(), "multi": self._multi.tolist(),
                "top": None if self._top is None else self._top.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of an evaluator of the same split and thresholds."""
        self._load_base_state(state, "box")
        if tuple(state["iou_thresholds"]) != self.iou_thresholds:
            raise ValueError(f"evaluator state has IoU thresholds {state['iou_thresholds']}, "
                             f"expected {list(self.iou_thresholds)}")
        t = len(self.thresholds)
        self._largest = np.asarray(state["largest"], np.int64).reshape(t)
        self._multi = np.asarray(state["multi"], np.int64).reshape(len(self.iou_thresholds), t)
        self._top = None if state["top"] is None else np.asarray(state["top"], np.int64).reshape(2, t)

    def compute(self) -> BoxCurves:
        """The per-threshold counts so far (see :class:`BoxCurves`)."""
        top1, top5 = (None, None) if self._top is None else (self._top[0].copy(), self._top[1].copy())
        return BoxCurves(self.thresholds.copy(), self._n, self._largest.copy(), self._multi.copy(),
                         self.iou_thresholds, top1, top5)


def score_histogram(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.histogram(scores, bins=edges)[0]`` for scores in ``[edges[0], edges[-1])``,
    by one ``searchsorted`` and a ``bincount``. float64 (len(edges) - 1,)."""
    index = np.searchsorted(edges, scores.ravel(), side="right") - 1
    return np.bincount(index, minlength=len(edges) - 1).astype(np.float64)


def pxap_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the pixel precision-recall curve, in percent.

    Args:
        positive, negative: float (K,), foreground / background pixel counts per
            score bin in ascending order.

    Cumulating from the highest bin down gives, at each operating point, the
    true and false positives; precision ``tp / (tp + fp)``, recall
    ``tp / (tp + fn)``; the area is ``sum(precision[1:] * diff(recall))`` over
    points with some prediction (wsolevaluation's definition).
    """
    precision, recall = precision_recall(positive, negative)
    predicted = ~np.isnan(precision)
    return float((precision[1:] * np.diff(recall))[predicted[1:]].sum() * 100)


def precision_recall(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel precision-recall curve of score histograms (see :func:`pxap_from_histograms`).

    Returns float64 (K,) precision and recall, one point per bin from the highest down
    (threshold lowered bin by bin); precision is NaN where nothing is predicted yet.
    """
    positive = np.asarray(positive, np.float64)
    negative = np.asarray(negative, np.float64)
    tp = positive[::-1].cumsum()
    fn = positive.sum() - tp
    fp = negative[::-1].cumsum()
    if ((tp + fn) <= 0).all():
        raise ValueError("PxAP: no foreground pixel in the evaluated set")
    if ((tp + fp) <= 0).all():
        raise ValueError("PxAP: no pixel was scored")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where((tp + fp) != 0, tp / (tp + fp), np.nan)
    return precision, tp / (tp + fn)


def _image_pxap(positive: np.ndarray, negative: np.ndarray) -> float:
    """One image's PxAP, NaN where it has no foreground pixel (nothing to find)."""
    if positive.sum() <= 0:
        return float("nan")
    return pxap_from_histograms(positive, negative)


class NoLocalizationEvaluator(_Streaming):
    """The evaluator of a split without localization labels (classification metadata only): it
    checks and counts the maps like the others (ids of the split, once each, in [0, 1], of the
    frame's size) but has no curve to compute (:meth:`compute` is None). Per-image records are
    empty rows."""

    _row_shape = (0,)

    def __init__(self, image_ids: Iterable[str], thresholds=None, image_size: int = 224, per_image: bool = False):
        super().__init__(image_ids, thresholds, image_size, workers=1, per_image=per_image)
        self._n = 0

    def update(self, maps, image_ids: Sequence[str], logits=None) -> None:
        image_ids = list(image_ids)
        self._check_batch(maps, image_ids)
        self._record(image_ids, [np.zeros(0)] * len(image_ids))
        self._n += len(image_ids)

    def add_misses(self, image_ids: Sequence[str]) -> None:
        image_ids = self._check_new_ids(image_ids)
        self._seen.update(image_ids)
        self._misses.update(image_ids)
        self._record(image_ids, [np.zeros(0)] * len(image_ids))
        self._n += len(image_ids)

    def state_dict(self) -> dict[str, Any]:
        return self._base_state("none")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_base_state(state, "none")

    def compute(self) -> None:
        return None


class MaskEvaluator(_Streaming):
    """Streaming PxAP over pixel masks.

    Args:
        load_mask: image id -> uint8 (H, W) mask in the resized frame: 1 on the
            foreground, 0 on the background, 255 where pixels are ignored (see
            :func:`mnpo.metrics.masks.load_gt_mask`).
        image_ids: the split's ids.
        thresholds: float (T,) bin edges in [0, 1) (bins ``[t_i, t_{i+1})``,
            then ``[t_last, 1)``, ``[1, 2)``, ``[2, 3]``), default ``cam_thresholds(0.01)``.
        per_image: also keep each image's own PxAP (:meth:`records`).
    """

    def __init__(self, load_mask: Callable[[str], np.ndarray], image_ids: Iterable[str],
                 thresholds=None, image_size: int = 224, workers: int | None = None, per_image: bool = False):
        super().__init__(image_ids, thresholds, image_size, workers, per_image)
        self.load_mask = load_mask
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        if not (np.diff(self.edges) > 0).all():
            raise ValueError("thresholds must be strictly increasing")
        self._n = 0
        self._positive = np.zeros(len(self.edges) - 1)
        self._negative = np.zeros(len(self.edges) - 1)

    def _one(self, scoremap: np.ndarray, image_id: str):
        mask = self.load_mask(image_id)
        if mask.shape != scoremap.shape:
            raise ValueError(f"mask of {image_id!r} has shape {mask.shape}, map {scoremap.shape}")
        return (score_histogram(scoremap[mask == 1], self.edges),
                score_histogram(scoremap[mask == 0], self.edges))

    def update(self, maps, image_ids: Sequence[str], logits=None) -> None:
        """Add a batch: maps float (B, H, W) in [0, 1] and their B ids (logits unused)."""
        image_ids = list(image_ids)
        maps = self._check_batch(maps, image_ids)
        histograms = self._map(self._one, maps, image_ids)
        for pos, neg in histograms:
            self._positive += pos
            self._negative += neg
        if self.per_image:
            self._record(image_ids, [_image_pxap(pos, neg) for pos, neg in histograms])
        self._n += len(image_ids)

    def add_misses(self, image_ids: Sequence[str]) -> None:
        """Count images that have no map (an unreadable file) as a map of zeros: their foreground
        pixels are missed at every threshold above 0, and the denominators keep them."""
        image_ids = self._check_new_ids(image_ids)
        self.update(np.zeros((len(image_ids), self.image_size, self.image_size), np.float32), image_ids)
        self._misses.update(image_ids)

    def state_dict(self) -> dict[str, Any]:
        """Everything counted so far, as JSON-able data (to resume an interrupted evaluation).
        The histograms are integer pixel counts held in float64, exact below 2**53."""
        return {**self._base_state("mask"), "positive": self._positive.tolist(), "negative": self._negative.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of an evaluator of the same split and thresholds."""
        self._load_base_state(state, "mask")
        self._positive = np.asarray(state["positive"], np.float64).reshape(len(self.edges) - 1)
        self._negative = np.asarray(state["negative"], np.float64).reshape(len(self.edges) - 1)

    def compute(self) -> MaskCurves:
        if self._n == 0:
            raise ValueError("no image was evaluated")
        return MaskCurves(self.thresholds.copy(), self._n, self._positive.copy(), self._negative.copy())
