"""Evaluate saved score maps of any method against a split's metadata.

Maps are read in wsolevaluation's layout: one ``<image_id>.npy`` per image
under a folder (the image id keeps its sub-folders and extension, so
``val/a.jpg`` is read from ``DIR/val/a.jpg.npy``), float, (224, 224), in
[0, 1]. Box splits give MaxBoxAcc, MaxBoxAccV2, GT-known Loc and, with
logits, Top-1 / Top-5 Loc; mask splits give PxAP. The report holds the
oracle protocol (best threshold on the split itself) and, when val maps are
given, the calibrated one (thresholds chosen on val, applied to the split).
With ``results`` / ``report_html`` it also writes the per-image results file and the HTML
report of :mod:`mnpo.engine.results` / :mod:`mnpo.engine.report`, as ``mnpo evaluate`` does, so
saved maps (another codebase's, the center baseline) sit in one report beside checkpoints.
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
from mnpo.engine.results import THUMBNAIL, EvaluationResults, GalleryItem, SplitDetails, gallery_sample
from mnpo.metrics.boxes import box_ious, cam_thresholds, check_scoremap
from mnpo.metrics.boxes import threshold_grid as make_grid
from mnpo.metrics.localization import (
    BoxCurves,
    BoxEvaluator,
    MaskCurves,
    MaskEvaluator,
    Metric,
    NoLocalizationEvaluator,
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


def renormalize(maps: np.ndarray, normalize: str | None, percentile: float | None = None) -> np.ndarray:
    """Saved maps ``(B, H, W)`` in [0, 1] normalized again by :func:`mnpo.maps.normalize_maps`
    (``normalize`` None: returned as they are), in float64 and back to their dtype.

    ``minmax``, ``pas`` and ``ivr`` give a raw map's result from its min-max normalized copy
    (they are unchanged by ``s -> a s + b``, ``a > 0``); ``max`` cannot (min-max removed the sign)
    and is the identity on min-max maps.
    """
    if normalize is None:
        if percentile is not None:
            raise ValueError(f"percentile {percentile} is IVR's: give it with normalize='ivr'")
        return maps
    import torch

    from mnpo.maps import normalize_maps
    from mnpo.maps.postprocess import IVR_PERCENTILE

    if percentile is not None and normalize != "ivr":
        raise ValueError(f"percentile {percentile} is IVR's: give it with normalize='ivr'")
    out = normalize_maps(torch.from_numpy(np.asarray(maps, np.float64)), normalize,
                         IVR_PERCENTILE if percentile is None else percentile)
    return out.numpy().astype(maps.dtype, copy=False)


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


def gallery_item(image_id: str, image: np.ndarray, scoremap: np.ndarray,
                 evaluator: BoxEvaluator | MaskEvaluator) -> GalleryItem:
    """One gallery entry: ``image`` uint8 (224, 224, 3), the evaluated view, and ``scoremap``
    float (224, 224) in [0, 1], both resized to ``THUMBNAIL``; on a box split the largest-contour
    box per threshold and the ground-truth boxes, on a mask split the ground-truth mask."""
    import cv2

    thumb = cv2.resize(np.ascontiguousarray(image), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    small = cv2.resize(scoremap.astype(np.float32), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    small = np.clip(np.round(small * 255), 0, 255).astype(np.uint8)
    if isinstance(evaluator, NoLocalizationEvaluator):
        return GalleryItem(image_id, thumb, small, None, np.zeros((0, 4), np.int64))
    if isinstance(evaluator, BoxEvaluator):
        gt = evaluator.gt_boxes[image_id]
        boxes = box_ious(scoremap, evaluator.thresholds, gt, multi=False).largest_boxes
        return GalleryItem(image_id, thumb, small, boxes, np.asarray(gt))
    mask = cv2.resize(evaluator.load_mask(image_id), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_NEAREST)
    return GalleryItem(image_id, thumb, small, None, np.asarray(mask))


def split_evaluator(meta: SplitMetadata, thresholds: np.ndarray, mask_root=None, workers: int | None = None,
                    per_image: bool = False, classification_only: bool = False,
                    ) -> BoxEvaluator | MaskEvaluator | NoLocalizationEvaluator:
    """The streaming evaluator of a box split (boxes in the 224 frame) or a mask split (its masks
    read under ``mask_root``); ``per_image``: it keeps every image's values too.
    ``classification_only``: a split without localization labels is allowed (its evaluator
    counts the maps and computes no curve)."""
    if meta.kind == "none" and classification_only:
        return NoLocalizationEvaluator(meta.image_ids, thresholds, EVAL_SIZE, per_image)
    if meta.kind == "box":
        return BoxEvaluator(gt_boxes_in_frame(meta), meta.labels, thresholds, image_size=EVAL_SIZE, workers=workers,
                            per_image=per_image)
    if meta.kind == "mask":
        if mask_root is None:
            raise ValueError("a mask split needs a mask root (--mask-root: the folder its mask paths are relative to)")
        root = Path(mask_root)

        def load_mask(image_id: str) -> np.ndarray:
            return load_gt_mask(root, meta.mask_paths[image_id], meta.ignore_paths.get(image_id, ""), EVAL_SIZE)

        return MaskEvaluator(load_mask, meta.image_ids, thresholds, EVAL_SIZE, workers, per_image)
    raise ValueError("the split has no localization.txt: nothing to evaluate against (its maps can still be "
                     "scored against a model with --faithfulness)")


def _batches(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])


def evaluate_split(maps_dir: str | os.PathLike | None, meta: SplitMetadata, *, mask_root=None, thresholds=None,
                   logits: np.ndarray | None = None, workers: int | None = None,
                   batch_size: int = 64, progress: bool = False, normalize: str | None = None,
                   percentile: float | None = None) -> BoxCurves | MaskCurves:
    """Curves of one split from its saved maps (every image id must have a map); ``maps_dir``
    None scores the center baseline (:func:`mnpo.maps.center_map`, the same map for every image);
    ``normalize`` / ``percentile``: each map normalized again first (:func:`renormalize`)."""
    return _score_split(maps_dir, meta, mask_root=mask_root, thresholds=thresholds, logits=logits, workers=workers,
                        batch_size=batch_size, progress=progress, normalize=normalize, percentile=percentile)[0]


def _score_split(maps_dir, meta: SplitMetadata, *, mask_root=None, thresholds=None, logits=None, workers=None,
                 batch_size: int = 64, progress: bool = False, images=None, gallery_size: int = 0,
                 classification_only: bool = False, normalize: str | None = None, percentile: float | None = None,
                 ) -> tuple[BoxCurves | MaskCurves | None, SplitDetails | None]:
    """``evaluate_split``; with ``images`` (an ``evaluate``-mode ``WSOLDataset`` of the split with
    ``uint8_views``) also the split's ``SplitDetails``: every image's values, its five best
    classes from ``logits`` (none without) and the gallery of ``gallery_size`` sampled images."""
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
    keep = images is not None
    evaluator = split_evaluator(meta, thresholds, mask_root, workers, per_image=keep,
                                classification_only=classification_only)
    row = {image_id: k for k, image_id in enumerate(meta.image_ids)}
    sample = gallery_sample(meta.image_ids, gallery_size) if keep else set()
    position = {image_id: k for k, image_id in enumerate(images.image_ids)} if keep else {}
    top5: dict[str, np.ndarray] = {}
    gallery: dict[str, GalleryItem] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(meta.image_ids), desc=f"evaluating {maps_dir or 'the center baseline'}", unit="map")
    with evaluator:
        for ids in _batches(meta.image_ids, batch_size):
            maps = renormalize(np.stack([read(i) for i in ids]), normalize, percentile)
            batch_logits = None if logits is None else logits[[row[i] for i in ids]]
            evaluator.update(maps, ids, batch_logits)
            if keep and batch_logits is not None:
                top5.update(zip(ids, np.argsort(-batch_logits, axis=1, kind="stable")[:, :5]))
            for k, image_id in enumerate(ids):
                if image_id in sample:
                    view = images[position[image_id]]["image"]
                    gallery[image_id] = gallery_item(image_id, view.permute(1, 2, 0).numpy(), maps[k], evaluator)
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    curves = evaluator.compute()
    if not keep:
        return curves, None
    return curves, SplitDetails(evaluator.records(), {i: top5.get(i, np.zeros(0, np.int64)) for i in meta.image_ids},
                                gallery)


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
        """A plain-text table: protocol, metric, value (percent), threshold(s); then the
        faithfulness metrics of the maps and the baselines, when computed."""
        lines = []
        if self.oracle:
            lines.append(f"{'protocol':<11}{'metric':<16}{'value':>8}  threshold")
        for name, metrics in (("oracle", self.oracle), ("calibrated", self.calibrated)):
            for key, m in (metrics or {}).items():
                t = m.threshold
                shown = "-" if t is None else (", ".join(f"{x:.2f}" for x in t) if isinstance(t, tuple) else f"{t:.2f}")
                lines.append(f"{name:<11}{key:<16}{m.value:8.2f}  {shown}")
        faithful = self.info.get("faithfulness")
        if faithful:
            from mnpo.engine.faithfulness import SUMMARY_NAMES

            summary = faithful["summary"]
            sources = list(summary)
            if lines:
                lines.append("")
            lines.append(f"{'faithfulness':<24}" + "".join(f"{s:>10}" for s in sources) + "  better")
            for key, (_, shown, higher) in SUMMARY_NAMES.items():
                if key in summary[sources[0]]:
                    lines.append(f"{shown:<24}" + "".join(f"{summary[s][key]:10.4f}" for s in sources)
                                 + ("  higher" if higher else "  lower"))
        return "\n".join(lines)


def build_report(test: BoxCurves | MaskCurves | None, val: BoxCurves | MaskCurves | None, info: dict) -> Report:
    """Oracle metrics of ``test``, and calibrated ones when ``val`` is given (none of either for a
    split without localization labels, ``test`` None)."""
    if test is None:
        return Report({}, None, info)
    calibrated = None if val is None else calibrated_metrics(val, test)
    return Report(oracle_metrics(test), calibrated, info)


def evaluate_map_folders(maps: str | os.PathLike | None, metadata: str | os.PathLike, *, val_maps=None,
                         val_metadata=None, mask_root=None, cam_curve_interval: float = 0.01,
                         threshold_grid: str = "full",
                         logits=None, val_logits=None, workers: int | None = None,
                         progress: bool = False, center: bool = False, data: str | os.PathLike | None = None,
                         results: str | os.PathLike | None = None, report_html: str | os.PathLike | None = None,
                         label: str | None = None, gallery_size: int = 128, faithfulness=None,
                         checkpoint: str | os.PathLike | None = None, model_spec: str | None = None,
                         weights: str | os.PathLike | None = None, num_classes: int | None = None,
                         input_size: int = EVAL_SIZE, device: str = "auto", batch_size: int = 64,
                         normalize: str | None = None, percentile: float | None = None) -> Report:
    """The ``mnpo evaluate-maps`` job: read, evaluate, report (see module doc). ``center``:
    score the center baseline instead of saved maps (``maps`` and ``val_maps`` must be None;
    val is then scored when ``val_metadata`` is given). ``results`` / ``report_html``: also write
    the results file / the HTML report of the evaluated split; both need ``data``, the image
    root, for the gallery's ``gallery_size`` images; ``label``: the result's name there (default
    ``center`` or the maps folder's name). ``faithfulness``
    (:class:`~mnpo.engine.faithfulness.FaithfulnessSettings`): also score the saved maps'
    faithfulness to a model, an mnpo ``checkpoint`` or ``model_spec`` (with ``weights`` and
    ``num_classes``, as ``mnpo evaluate --model``), on the images under ``data`` at the
    ``input_size`` view, ``batch_size`` at a time on ``device``; a split without localization
    labels is then scored by these alone. ``normalize`` / ``percentile``: every map (the center
    baseline's too) normalized again before it is scored (:func:`renormalize`)."""
    renormalize(np.zeros((0, 1, 1)), normalize, percentile)  # refuses a bad mode or a lone percentile first
    if faithfulness is not None:
        if center:
            raise ValueError("--faithfulness scores saved maps (its random and center baselines come with it); "
                             "give --maps, not --center")
        if data is None:
            raise ValueError("--faithfulness needs --data, the image root (the metrics perturb the images)")
        if (checkpoint is None) == (model_spec is None):
            raise ValueError("--faithfulness needs the model the maps explain: --checkpoint or --model")
    elif checkpoint is not None or model_spec is not None:
        raise ValueError("--checkpoint and --model go with --faithfulness (saved maps need no model otherwise)")
    if center:
        if maps is not None or val_maps is not None:
            raise ValueError("the center baseline needs no maps: give --center or --maps, not both")
    elif maps is None:
        raise ValueError("give --maps (a folder of score maps) or --center (the center baseline)")
    elif (val_maps is None) != (val_metadata is None):
        raise ValueError("give both --val-maps and --val-metadata, or neither")
    details = results is not None or report_html is not None
    if details and data is None:
        raise ValueError("--results and --report need --data, the image root (the report shows a gallery of images)")
    thresholds = make_grid(threshold_grid, cam_curve_interval)
    meta = read_split(metadata)
    test_logits = None if logits is None else load_logits(logits, meta)
    images = None
    if details:
        from mnpo.data.dataset import WSOLDataset

        images = WSOLDataset(data, meta, "evaluate", mask_root=mask_root, uint8_views=True, ten_crop=False)
    test, test_details = _score_split(maps, meta, mask_root=mask_root, thresholds=thresholds, logits=test_logits,
                                      workers=workers, progress=progress, images=images, gallery_size=gallery_size,
                                      classification_only=faithfulness is not None, normalize=normalize,
                                      percentile=percentile)
    val = vmeta = None
    if val_metadata is not None:
        if test is None:
            raise ValueError(f"{metadata} has no localization labels, so there is no threshold to calibrate on "
                             f"{val_metadata}; leave --val-maps and --val-metadata out")
        vmeta = read_split(val_metadata)
        if vmeta.kind != meta.kind:
            raise ValueError(f"val split is a {vmeta.kind} split but the evaluated one is a {meta.kind} split")
        v_logits = None if val_logits is None else load_logits(val_logits, vmeta)
        val = evaluate_split(val_maps, vmeta, mask_root=mask_root, thresholds=thresholds, logits=v_logits,
                             workers=workers, progress=progress, normalize=normalize, percentile=percentile)
    info = {
        "metadata": str(metadata),
        "maps": "center baseline" if center else str(maps),
        "method": "center" if center else "saved maps",
        "kind": meta.kind,
        "num_images": len(meta.image_ids) if test is None else test.num_images,
        "cam_curve_interval": cam_curve_interval,
        "threshold_grid": threshold_grid,
        "num_thresholds": int(len(thresholds)),
        "normalize": normalize or "as saved",
        "iou_thresholds_v2": list(test.iou_thresholds) if isinstance(test, BoxCurves) else None,
        "oracle": "thresholds chosen on the evaluated split itself (optimistic; the MNPO paper's protocol)",
        "calibrated": ("thresholds chosen on val, applied to the evaluated split (wsolevaluation's protocol)"
                       if val is not None else "not computed: no val maps given"),
    }
    if val is not None:
        info.update(val_metadata=str(val_metadata), val_maps="center baseline" if center else str(val_maps),
                    val_num_images=val.num_images)
    if faithfulness is not None:
        info["checkpoint"] = str(checkpoint) if checkpoint is not None else model_spec
        info["faithfulness"] = saved_maps_faithfulness(
            maps, data, meta, faithfulness, checkpoint=checkpoint, model_spec=model_spec, weights=weights,
            num_classes=num_classes, mask_root=mask_root, input_size=input_size, device=device,
            batch_size=batch_size, progress=progress, normalize=normalize, percentile=percentile)
    if normalize == "ivr":
        from mnpo.maps.postprocess import IVR_PERCENTILE

        info["percentile"] = IVR_PERCENTILE if percentile is None else percentile
    report = build_report(test, val, info)
    if details:
        num_classes = meta.num_classes if test_logits is None else max(meta.num_classes, test_logits.shape[1])
        evaluation = EvaluationResults.build(label or ("center" if center else Path(maps).name), test, val,
                                             test_details, meta, vmeta, num_classes, info)
        write_evaluation(evaluation, results, report_html)
    return report


def saved_maps_faithfulness(maps_dir: str | os.PathLike, data: str | os.PathLike, meta: SplitMetadata, settings, *,
                            checkpoint=None, model_spec: str | None = None, weights=None,
                            num_classes: int | None = None, mask_root=None, input_size: int = EVAL_SIZE,
                            device: str = "auto", batch_size: int = 64, progress: bool = False,
                            normalize: str | None = None, percentile: float | None = None) -> dict:
    """The faithfulness result (:meth:`~mnpo.engine.faithfulness.FaithfulnessAccumulator.result`)
    of saved 224 x 224 maps ``maps_dir/<image_id>.npy`` to a model, on the split's images at the
    evaluation's ``input_size`` view (resize ``resize_for(input_size)``, center crop)."""
    import torch

    from mnpo.data.dataset import WSOLDataset, collate_evaluation
    from mnpo.data.transforms import normalize_batch
    from mnpo.engine.faithfulness import FaithfulnessAccumulator, regions_of_split
    from mnpo.engine.runtime import resolve_device
    from mnpo.engine.views import resize_for

    dev = resolve_device(device)
    if model_spec is not None:
        from mnpo.models.external import build_external

        model = build_external(model_spec, weights, num_classes, input_size)
    else:
        from mnpo.models import load_model

        model, _ = load_model(checkpoint)
    model.to(dev).eval()
    dataset = WSOLDataset(data, meta, "evaluate", mask_root=mask_root, crop_size=input_size,
                          resize_size=resize_for(input_size), uint8_views=True, ten_crop=False)
    accumulator = FaithfulnessAccumulator(settings, regions_of_split(meta, mask_root, EVAL_SIZE))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_evaluation)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(dataset), desc="faithfulness", unit="img")
    for batch in loader:
        ids = list(batch["image_id"])
        saved = np.stack([load_map(Path(maps_dir) / f"{i}.npy") for i in ids])
        maps = torch.from_numpy(renormalize(saved, normalize, percentile)).float().to(dev)
        images = normalize_batch(batch["image"].to(dev))
        accumulator.update(model, images, maps, batch["label"].to(dev), ids)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    return accumulator.result()


def write_evaluation(evaluation: EvaluationResults, results: str | os.PathLike | None,
                     report_html: str | os.PathLike | None) -> None:
    """Write one evaluation's results file and / or its one-result HTML report (each when given)."""
    if results is not None:
        from mnpo.engine.results import write_results

        write_results(results, evaluation)
        log.info("wrote %s", results)
    if report_html is not None:
        from mnpo.engine.report import write_report

        write_report([evaluation], report_html)
        log.info("wrote %s", report_html)
