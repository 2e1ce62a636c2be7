"""Evaluation results for the report: what the pictures need, in a versioned file.

``mnpo evaluate --results FILE`` writes one ``.npz`` (a zip of ``.npy`` arrays, read with
``numpy.load(FILE, allow_pickle=False)``) beside ``--json``; ``mnpo report`` reads one or more.
Format ``mnpo-results``, version 1. Keys (N images, T score-map thresholds, G gallery images,
S = ``THUMBNAIL`` pixels):

``format``, ``version``
    ``"mnpo-results"`` and ``1``; a reader refuses a newer version.
``header``
    JSON text: ``label`` (the result's name in the report), ``kind`` (``box`` / ``mask``, or
    ``none`` for a split without localization labels, scored by faithfulness alone),
    ``split`` and ``val_split`` (``metadata``, ``num_images`` and ``digest``, the SHA-1 of the
    ``id<TAB>label`` lines; ``val_split`` is null without calibration), ``iou_thresholds``,
    ``num_classes``, ``info`` (``mnpo evaluate``'s report info; with ``--faithfulness`` its
    ``faithfulness`` entry holds the settings, each map source's means and the mean deletion /
    insertion curves with their fractions, see :mod:`mnpo.engine.faithfulness`) and
    ``gallery_gt`` (box splits: each gallery image's ground-truth boxes in the 224x224 frame).
``thresholds``
    float64 (T,), the score-map thresholds (empty for ``none``).
``test_*`` / ``val_*`` (val only when calibrated; neither for ``none``)
    the curves: box splits ``largest`` int64 (T,) (images with the largest-contour box at
    IoU >= 0.5), ``multi`` int64 (len(iou_thresholds), T), ``top`` int64 (2, T) (Top-1 / Top-5
    Loc counts) and ``num_images``; mask splits ``positive`` / ``negative`` float64 (T + 2,),
    pixel histograms.
``image_ids`` (N,) str, ``labels`` int64 (N,), ``top5`` int64 (N, 5)
    every evaluated image, its class and its five highest-scoring classes (best first; -1 pads
    when there are fewer than five classes, and fills the row of an image that could not be
    read, which ``evaluate --skip-unreadable`` counts as a miss; ``info["unreadable_images"]``
    lists those).
``iou_oracle``, ``iou_calibrated`` (box splits)
    float64 (N,), each image's largest-contour IoU at the MaxBoxAcc threshold of that protocol
    (``iou_calibrated`` is NaN without calibration).
``pxap`` (mask splits)
    float64 (N,), each image's own PxAP (NaN where the image has no foreground).
``gallery_ids`` (G,) str, ``gallery_image`` uint8 (G, S, S, 3), ``gallery_map`` uint8 (G, S, S)
    a fixed sample of the split (the same ids for every method: the first G by SHA-1 of the id):
    the network's 224 view and the score map (x 255), both resized to S.
``gallery_box_oracle``, ``gallery_box_calibrated`` (box splits)
    int64 (G, 4), the largest-contour box ``(x0, y0, x1, y1)`` in the 224 frame at each
    protocol's MaxBoxAcc threshold (all -1 without calibration or where there is no box).
``gallery_mask`` (mask splits)
    uint8 (G, S, S), the ground truth: 1 foreground, 0 background, 255 ignored.

Metrics are not stored: :meth:`EvaluationResults.report` recomputes both protocols from the
curves, so they always agree with what the file holds.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mnpo.io import atomic_path, decode_array, encode_array
from mnpo.metrics.localization import BoxCurves, MaskCurves, PerImage, calibrated_metrics, oracle_metrics

__all__ = [
    "FORMAT",
    "VERSION",
    "THUMBNAIL",
    "EvaluationResults",
    "GalleryItem",
    "ResultsFileError",
    "SplitDetails",
    "gallery_sample",
    "read_results",
    "split_digest",
    "write_results",
]

FORMAT = "mnpo-results"
VERSION = 1
#: Side (pixels) of the gallery's image and map thumbnails.
THUMBNAIL = 112


class ResultsFileError(ValueError):
    """A results file is missing, truncated, of another format or of a newer version."""


def split_digest(image_ids: Sequence[str], labels: Mapping[str, int]) -> str:
    """SHA-1 of the split's ``id<TAB>label`` lines: two results are of the same split iff equal."""
    h = hashlib.sha1()
    for image_id in image_ids:
        h.update(f"{image_id}\t{labels[image_id]}\n".encode())
    return h.hexdigest()


def gallery_sample(image_ids: Iterable[str], size: int) -> set[str]:
    """The ``size`` ids first by SHA-1: a sample that is the same for every method and rank."""
    return set(sorted(image_ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[: max(0, size)])


@dataclass(frozen=True)
class GalleryItem:
    """One sampled image as evaluated.

    image: uint8 (S, S, 3), the network's view resized to ``THUMBNAIL``. scoremap: uint8 (S, S),
    the 224 map x 255 resized likewise. boxes: int64 (T, 4) largest-contour box per threshold
    in the 224 frame (box splits), else None. gt: int64 (k, 4) boxes in the 224 frame, or uint8
    (S, S) mask (1 / 0 / 255 ignored).
    """

    image_id: str
    image: np.ndarray
    scoremap: np.ndarray
    boxes: np.ndarray | None
    gt: np.ndarray

    def to_state(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "image": encode_array(self.image), "scoremap": encode_array(self.scoremap),
                "boxes": None if self.boxes is None else encode_array(self.boxes), "gt": encode_array(self.gt)}

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> "GalleryItem":
        boxes = None if state["boxes"] is None else decode_array(state["boxes"])
        return GalleryItem(state["image_id"], decode_array(state["image"]), decode_array(state["scoremap"]),
                           boxes, decode_array(state["gt"]))


@dataclass
class SplitDetails:
    """Per-image results of one split (``EvalSettings.details``): the evaluator's records, each
    image's five best classes and the gallery sample."""

    records: PerImage
    top5: dict[str, np.ndarray] = field(default_factory=dict)
    gallery: dict[str, GalleryItem] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {"top5": {k: v.tolist() for k, v in self.top5.items()},
                "gallery": [g.to_state() for g in self.gallery.values()]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.top5 = {k: np.asarray(v, np.int64) for k, v in state["top5"].items()}
        self.gallery = {g["image_id"]: GalleryItem.from_state(g) for g in state["gallery"]}

    @staticmethod
    def merge(parts: Sequence["SplitDetails"]) -> "SplitDetails":
        """Several ranks' details as one."""
        merged = SplitDetails(PerImage.concat([p.records for p in parts]))
        for p in parts:
            merged.top5.update(p.top5)
            merged.gallery.update(p.gallery)
        return merged


def _top5_rows(top5: Mapping[str, np.ndarray], image_ids: Sequence[str]) -> np.ndarray:
    rows = np.full((len(image_ids), 5), -1, np.int64)
    for r, image_id in enumerate(image_ids):
        best = np.asarray(top5.get(image_id, ()), np.int64)[:5]  # none: an unreadable image, a miss
        rows[r, : len(best)] = best
    return rows


@dataclass(frozen=True)
class EvaluationResults:
    """One evaluation of one split, as a results file holds it (see the module docstring).

    ``test`` / ``val``: curves; ``per_image``: ``{"iou_oracle", "iou_calibrated"}`` or
    ``{"pxap"}``, each float64 (N,) aligned with ``image_ids``; ``gallery_boxes``: protocol ->
    int64 (G, 4) (box splits).
    """

    label: str
    kind: str
    split: dict[str, Any]
    val_split: dict[str, Any] | None
    num_classes: int
    info: dict[str, Any]
    thresholds: np.ndarray
    test: BoxCurves | MaskCurves | None
    val: BoxCurves | MaskCurves | None
    image_ids: tuple[str, ...]
    labels: np.ndarray
    top5: np.ndarray
    per_image: dict[str, np.ndarray]
    gallery_ids: tuple[str, ...]
    gallery_image: np.ndarray
    gallery_map: np.ndarray
    gallery_boxes: dict[str, np.ndarray]
    gallery_gt: list[np.ndarray]

    @property
    def calibrated(self) -> bool:
        return self.val is not None

    def metrics(self) -> dict[str, dict]:
        """``{"oracle": {name: Metric}, "calibrated": {...}}`` (calibrated only with val; no
        metric for a split without localization labels)."""
        if self.test is None:
            return {"oracle": {}}
        out = {"oracle": oracle_metrics(self.test)}
        if self.val is not None:
            out["calibrated"] = calibrated_metrics(self.val, self.test)
        return out

    def chosen_index(self, protocol: str) -> int | None:
        """Index into ``thresholds`` of MaxBoxAcc's threshold under ``protocol`` (box splits)."""
        if self.kind != "box" or (protocol == "calibrated" and self.val is None):
            return None
        t = self.metrics()[protocol]["max_box_acc"].threshold
        return int(np.flatnonzero(self.thresholds == t)[0])

    @staticmethod
    def build(label: str, test_curves, val_curves, details: SplitDetails, meta, val_meta,
              num_classes: int, info: Mapping[str, Any]) -> "EvaluationResults":
        """From ``evaluate_model``'s curves and details of the test (and val) split.

        meta / val_meta: the splits' ``SplitMetadata`` (val_meta None without calibration).
        """
        ids = details.records.image_ids
        order = {i: k for k, i in enumerate(meta.image_ids)}
        rank = np.argsort([order[i] for i in ids], kind="stable")  # metadata order
        ids = tuple(ids[k] for k in rank)
        values = details.records.values[rank]
        per_image: dict[str, np.ndarray]
        thresholds = np.zeros(0) if test_curves is None else np.asarray(test_curves.thresholds)
        boxes: dict[str, np.ndarray] = {}
        gallery_ids = tuple(sorted(details.gallery))
        items = [details.gallery[i] for i in gallery_ids]
        if isinstance(test_curves, BoxCurves):
            choice = {"oracle": oracle_metrics(test_curves)["max_box_acc"].threshold,
                      "calibrated": None if val_curves is None
                      else calibrated_metrics(val_curves, test_curves)["max_box_acc"].threshold}
            per_image = {}
            for protocol, t in choice.items():
                index = None if t is None else int(np.flatnonzero(thresholds == t)[0])
                per_image[f"iou_{protocol}"] = (np.full(len(ids), np.nan) if index is None else values[:, index])
                boxes[protocol] = (np.full((len(items), 4), -1, np.int64) if index is None
                                   else np.array([g.boxes[index] for g in items], np.int64).reshape(-1, 4))
        elif test_curves is None:
            per_image = {}
        else:
            per_image = {"pxap": values}

        def split_info(m) -> dict[str, Any]:
            return {"metadata": str(info.get("metadata", "")), "num_images": len(m.image_ids),
                    "digest": split_digest(m.image_ids, m.labels)}

        val_split = None
        if val_meta is not None:
            val_split = {**split_info(val_meta), "metadata": str(info.get("val_metadata", ""))}
        s = THUMBNAIL
        return EvaluationResults(
            label=label, kind=("none" if test_curves is None else "box" if isinstance(test_curves, BoxCurves)
                               else "mask"),
            split=split_info(meta), val_split=val_split, num_classes=int(num_classes),
            info=json.loads(json.dumps(dict(info))), thresholds=thresholds, test=test_curves, val=val_curves,
            image_ids=ids, labels=np.array([meta.labels[i] for i in ids], np.int64),
            top5=_top5_rows(details.top5, ids), per_image=per_image, gallery_ids=gallery_ids,
            gallery_image=np.array([g.image for g in items], np.uint8).reshape(-1, s, s, 3),
            gallery_map=np.array([g.scoremap for g in items], np.uint8).reshape(-1, s, s),
            gallery_boxes=boxes, gallery_gt=[g.gt for g in items])


def _curve_arrays(prefix: str, curves: BoxCurves | MaskCurves) -> dict[str, np.ndarray]:
    out = {f"{prefix}_num_images": np.int64(curves.num_images)}
    if isinstance(curves, MaskCurves):
        return {**out, f"{prefix}_positive": curves.positive, f"{prefix}_negative": curves.negative}
    out.update({f"{prefix}_largest": curves.largest, f"{prefix}_multi": curves.multi})
    if curves.top1 is not None:
        out[f"{prefix}_top"] = np.stack([curves.top1, curves.top5])
    return out


def write_results(path: str | Path, results: EvaluationResults) -> Path:
    """Write ``results`` to ``path`` (atomically; see the module docstring for the layout)."""
    header = {"label": results.label, "kind": results.kind, "split": results.split, "val_split": results.val_split,
              "num_classes": results.num_classes, "info": results.info,
              "iou_thresholds": list(results.test.iou_thresholds) if results.kind == "box" else None,
              "gallery_gt": [g.tolist() for g in results.gallery_gt] if results.kind == "box" else None}
    arrays: dict[str, Any] = {
        "format": np.array(FORMAT), "version": np.int64(VERSION), "header": np.array(json.dumps(header)),
        "thresholds": results.thresholds, **({} if results.test is None else _curve_arrays("test", results.test)),
        "image_ids": np.array(results.image_ids, dtype=str), "labels": results.labels, "top5": results.top5,
        "gallery_ids": np.array(results.gallery_ids, dtype=str), "gallery_image": results.gallery_image,
        "gallery_map": results.gallery_map,
        **{k: v for k, v in results.per_image.items()},
    }
    if results.val is not None:
        arrays.update(_curve_arrays("val", results.val))
    if results.kind == "box":
        arrays.update({f"gallery_box_{p}": b for p, b in results.gallery_boxes.items()})
    elif results.kind == "mask":
        arrays["gallery_mask"] = np.array(results.gallery_gt, np.uint8).reshape(results.gallery_map.shape)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def _curves(arrays: Mapping[str, np.ndarray], prefix: str, kind: str, thresholds: np.ndarray,
            iou_thresholds) -> BoxCurves | MaskCurves:
    n = int(arrays[f"{prefix}_num_images"])
    if kind == "mask":
        return MaskCurves(thresholds, n, arrays[f"{prefix}_positive"], arrays[f"{prefix}_negative"])
    top = arrays.get(f"{prefix}_top")
    return BoxCurves(thresholds, n, arrays[f"{prefix}_largest"], arrays[f"{prefix}_multi"], tuple(iou_thresholds),
                     None if top is None else top[0], None if top is None else top[1])


def read_results(path: str | Path) -> EvaluationResults:
    """Read a results file; :class:`ResultsFileError` naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"{path}: results file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ResultsFileError(f"{path}: not a readable results file, truncated or of another format "
                               f"({type(err).__name__}: {err})") from None
    if "format" not in arrays or str(arrays["format"]) != FORMAT:
        raise ResultsFileError(f"{path}: not an {FORMAT} file (format {arrays.get('format')!r}); "
                               "write one with `mnpo evaluate --results`")
    version = int(arrays.get("version", -1))
    if version > VERSION:
        raise ResultsFileError(f"{path}: written in {FORMAT} version {version}, newer than this mnpo reads "
                               f"(up to {VERSION}); upgrade mnpo")
    if version < 1:
        raise ResultsFileError(f"{path}: invalid {FORMAT} version {version}")
    try:
        header = json.loads(str(arrays["header"]))
        kind = header["kind"]
        thresholds = arrays["thresholds"]
        if kind not in ("box", "mask", "none"):
            raise ValueError(f"unknown kind {kind!r}")
        test = None if kind == "none" else _curves(arrays, "test", kind, thresholds, header["iou_thresholds"])
        val = (_curves(arrays, "val", kind, thresholds, header["iou_thresholds"])
               if header["val_split"] is not None else None)
        per_image_keys = {"box": ("iou_oracle", "iou_calibrated"), "mask": ("pxap",), "none": ()}[kind]
        per_image = {k: arrays[k] for k in per_image_keys}
        gallery_map = arrays["gallery_map"]
        if kind == "box":
            boxes = {p: arrays[f"gallery_box_{p}"] for p in ("oracle", "calibrated")}
            gt = [np.asarray(g, np.int64).reshape(-1, 4) for g in header["gallery_gt"]]
        elif kind == "none":
            boxes, gt = {}, [np.zeros((0, 4), np.int64) for _ in arrays["gallery_ids"]]
        else:
            boxes, gt = {}, list(arrays["gallery_mask"])
        results = EvaluationResults(
            label=header["label"], kind=kind, split=header["split"], val_split=header["val_split"],
            num_classes=int(header["num_classes"]), info=header["info"], thresholds=thresholds, test=test, val=val,
            image_ids=tuple(str(i) for i in arrays["image_ids"]), labels=arrays["labels"], top5=arrays["top5"],
            per_image=per_image, gallery_ids=tuple(str(i) for i in arrays["gallery_ids"]),
            gallery_image=arrays["gallery_image"], gallery_map=gallery_map, gallery_boxes=boxes, gallery_gt=gt)
    except KeyError as err:
        raise ResultsFileError(f"{path}: {FORMAT} file lacks {err.args[0]!r}") from None
    except (ValueError, TypeError) as err:
        raise ResultsFileError(f"{path}: malformed {FORMAT} file ({err})") from None
    n = len(results.image_ids)
    bad = [k for k, v in {"labels": results.labels, "top5": results.top5, **per_image}.items() if len(v) != n]
    if bad or len(results.gallery_ids) != len(results.gallery_image) or len(gt) != len(results.gallery_ids):
        raise ResultsFileError(f"{path}: arrays of different lengths ({bad or 'gallery'} vs {n} image ids)")
    return results

