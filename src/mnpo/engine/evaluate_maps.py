"""Evaluate saved score maps of any method against a split's metadata.

Maps are read in wsolevaluation's layout: one ``<image_id>.npy`` per image
under a folder (the image id keeps its sub-folders and extension, so
``val/a.jpg`` is read from ``DIR/val/a.jpg.npy``), float, (224, 224), in
[0, 1]. Box splits give MaxBoxAcc, MaxBoxAccV2, GT-known Loc and, with
logits, Top-1 / Top-5 Loc; mask splits give PxAP. The report holds the
oracle protocol (best threshold on the split itself) and, when val maps are
given, the calibrated one (thresholds chosen on val, applied to the split).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mnpo.data.dataset import resize_boxes
from mnpo.data.metadata import SplitMetadata, read_split
from mnpo.metrics.boxes import cam_thresholds, check_scoremap
from mnpo.metrics.boxes import threshold_grid as make_grid
from mnpo.metrics.localization import (
    BoxCurves,
    BoxEvaluator,
    MaskCurves,
    MaskEvaluator,
    Metric,
    calibrated_metrics,
    oracle_metrics,
)
from mnpo.metrics.masks import load_gt_mask

log = logging.getLogger(__name__)

#: Side of the evaluation frame (spec section 6).
EVAL_SIZE = 224


class MapFileError(ValueError):
    """A score-map file is missing, unreadable or not a valid map; the message names it."""


def load_map(path: str | os.PathLike, size: int = EVAL_SIZE) -> np.ndarray:
    """Read one ``.npy`` score map: float (size, size) in [0, 1], checked."""
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f"{path}: score map not found")
    try:
        scoremap = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise MapFileError(f"{path}: not a readable .npy array ({err})") from err
    if scoremap.shape != (size, size):
        raise MapFileError(f"{path}: score map has shape {scoremap.shape}, expected ({size}, {size})")
    try:
        check_scoremap(scoremap, name=str(path))
    except (TypeError, ValueError) as err:
        raise MapFileError(str(err)) from err
    return scoremap


def load_logits(path: str | os.PathLike, meta: SplitMetadata) -> np.ndarray:
    """Read class scores float (N, C), one row per image in ``image_ids.txt`` order."""
    path = Path(path)
    try:
        logits = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MapFileError(f"{path}: logits file not found") from None
    except (ValueError, OSError, EOFError) as err:
        raise MapFileError(f"{path}: not a readable .npy array ({err})") from err
    if logits.ndim != 2 or logits.shape[0] != len(meta.image_ids) or logits.dtype.kind not in "fiu":
        raise MapFileError(f"{path}: expected numeric logits of shape ({len(meta.image_ids)}, C), "
                           f"one row per image id, got {logits.dtype} {logits.shape}")
    if logits.shape[1] < meta.num_classes:
        raise MapFileError(f"{path}: {logits.shape[1]} classes, but labels go up to {meta.num_classes - 1}")
    return logits


def gt_boxes_in_frame(meta: SplitMetadata, size: int = EVAL_SIZE) -> dict[str, np.ndarray]:
    """Ground-truth boxes resized into the (size, size) frame, per image id."""
    if meta.boxes is None or meta.sizes is None:
        raise ValueError("box metrics need a split with boxes and image sizes")
    return {i: resize_boxes(meta.boxes[i], meta.sizes[i], size) for i in meta.image_ids}


def _batches(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])


def evaluate_split(maps_dir: str | os.PathLike | None, meta: SplitMetadata, *, mask_root=None, thresholds=None,
                   logits: np.ndarray | None = None, workers: int | None = None,
                   batch_size: int = 64, progress: bool = False) -> BoxCurves | MaskCurves:
    """Curves of one split from its saved maps (every image id must have a map); ``maps_dir``
    None scores the center baseline (:func:`mnpo.maps.center_map`, the same map for every image)."""
    thresholds = cam_thresholds() if thresholds is None else thresholds
    if maps_dir is None:
        from mnpo.maps import center_map, normalize_maps

        center = normalize_maps(center_map(EVAL_SIZE, EVAL_SIZE)[None])[0].numpy()

        def read(image_id: str) -> np.ndarray:
            return center
    else:
        maps_dir = Path(maps_dir)
        if not maps_dir.is_dir():
            raise MapFileError(f"{maps_dir}: maps folder not found")

        def read(image_id: str) -> np.ndarray:
            return load_map(maps_dir / f"{image_id}.npy")
    if meta.kind == "mask":
        if mask_root is None:
            raise ValueError("a mask split needs --mask-root, the folder its mask paths are relative to")
        root = Path(mask_root)

        def load_mask(image_id: str) -> np.ndarray:
            return load_gt_mask(root, meta.mask_paths[image_id], meta.ignore_paths.get(image_id, ""), EVAL_SIZE)

        evaluator = MaskEvaluator(load_mask, meta.image_ids, thresholds, EVAL_SIZE, workers)
    elif meta.kind == "box":
        evaluator = BoxEvaluator(gt_boxes_in_frame(meta), meta.labels, thresholds, image_size=EVAL_SIZE,
                                 workers=workers)
    else:
        raise ValueError("the split has no localization.txt: nothing to evaluate against")
    row = {image_id: k for k, image_id in enumerate(meta.image_ids)}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(meta.image_ids), desc=f"evaluating {maps_dir or 'the center baseline'}", unit="map")
    with evaluator:
        for ids in _batches(meta.image_ids, batch_size):
            maps = np.stack([read(i) for i in ids])
            batch_logits = None if logits is None else logits[[row[i] for i in ids]]
            evaluator.update(maps, ids, batch_logits)
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    return evaluator.compute()


@dataclass(frozen=True)
class Report:
    """Metrics under both protocols, plus what they were computed on."""

    oracle: dict[str, Metric]
    calibrated: dict[str, Metric] | None
    info: dict

    def to_json(self) -> dict:
        out = {"oracle": {k: m.to_json() for k, m in self.oracle.items()}}
        if self.calibrated is not None:
            out["calibrated"] = {k: m.to_json() for k, m in self.calibrated.items()}
        out["info"] = self.info
        return out

    def table(self) -> str:
        """A plain-text table: protocol, metric, value (percent), threshold(s)."""
        lines = [f"{'protocol':<11}{'metric':<16}{'value':>8}  threshold"]
        for name, metrics in (("oracle", self.oracle), ("calibrated", self.calibrated)):
            for key, m in (metrics or {}).items():
                t = m.threshold
                shown = "-" if t is None else (", ".join(f"{x:.2f}" for x in t) if isinstance(t, tuple) else f"{t:.2f}")
                lines.append(f"{name:<11}{key:<16}{m.value:8.2f}  {shown}")
        return "\n".join(lines)


def build_report(test: BoxCurves | MaskCurves, val: BoxCurves | MaskCurves | None, info: dict) -> Report:
    """Oracle metrics of ``test``, and calibrated ones when ``val`` is given."""
    calibrated = None if val is None else calibrated_metrics(val, test)
    return Report(oracle_metrics(test), calibrated, info)


def evaluate_map_folders(maps: str | os.PathLike | None, metadata: str | os.PathLike, *, val_maps=None,
                         val_metadata=None, mask_root=None, cam_curve_interval: float = 0.01,
                         threshold_grid: str = "full",
                         logits=None, val_logits=None, workers: int | None = None,
                         progress: bool = False, center: bool = False) -> Report:
    """The ``mnpo evaluate-maps`` job: read, evaluate, report (see module doc). ``center``:
    score the center baseline instead of saved maps (``maps`` and ``val_maps`` must be None;
    val is then scored when ``val_metadata`` is given)."""
    if center:
        if maps is not None or val_maps is not None:
            raise ValueError("the center baseline needs no maps: give --center or --maps, not both")
    elif maps is None:
        raise ValueError("give --maps (a folder of score maps) or --center (the center baseline)")
    elif (val_maps is None) != (val_metadata is None):
        raise ValueError("give both --val-maps and --val-metadata, or neither")
    thresholds = make_grid(threshold_grid, cam_curve_interval)
    meta = read_split(metadata)
    test_logits = None if logits is None else load_logits(logits, meta)
    test = evaluate_split(maps, meta, mask_root=mask_root, thresholds=thresholds, logits=test_logits,
                          workers=workers, progress=progress)
    val = None
    if val_metadata is not None:
        vmeta = read_split(val_metadata)
        if vmeta.kind != meta.kind:
            raise ValueError(f"val split is a {vmeta.kind} split but the evaluated one is a {meta.kind} split")
        v_logits = None if val_logits is None else load_logits(val_logits, vmeta)
        val = evaluate_split(val_maps, vmeta, mask_root=mask_root, thresholds=thresholds, logits=v_logits,
                             workers=workers, progress=progress)
    info = {
        "metadata": str(metadata),
        "maps": "center baseline" if center else str(maps),
        "kind": meta.kind,
        "num_images": test.num_images,
        "cam_curve_interval": cam_curve_interval,
        "threshold_grid": threshold_grid,
        "num_thresholds": int(len(thresholds)),
        "iou_thresholds_v2": list(test.iou_thresholds) if isinstance(test, BoxCurves) else None,
        "oracle": "thresholds chosen on the evaluated split itself (optimistic; the MNPO paper's protocol)",
        "calibrated": ("thresholds chosen on val, applied to the evaluated split (wsolevaluation's protocol)"
                       if val is not None else "not computed: no val maps given"),
    }
    if val is not None:
        info.update(val_metadata=str(val_metadata), val_maps="center baseline" if center else str(val_maps),
                    val_num_images=val.num_images)
    return build_report(test, val, info)
