"""Evaluate a model on a split: maps of any method, classification, every localization metric.

One pass over an ``evaluate``-mode ``WSOLDataset`` (each image decoded once for both views):
the 224x224 view gives the map of the ground-truth class (``compute_maps``), the ten-crop
view gives the classification logits (main branch, averaged over the crops, under
``inference_mode``: no graph is kept), and the streaming evaluators turn both into curves.
Under torchrun each rank takes every ``world``-th image and the curves' counts are summed,
so the numbers equal a single-process run.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mnpo.data.dataset import WSOLDataset, collate_evaluation
from mnpo.data.device_decode import DECODE_MODES, device_views
from mnpo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, normalize_batch, ten_crop_batch
from mnpo.engine.evaluate_maps import EVAL_SIZE, gallery_item, split_evaluator
from mnpo.engine.faithfulness import FaithfulnessAccumulator, FaithfulnessSettings, regions_of_split
from mnpo.engine.results import EvaluationResults, SplitDetails, gallery_sample
from mnpo.engine.runtime import DistContext, all_reduce_sum, autocast
from mnpo.engine.views import box_to_image, resize_for, ten_crop_logits
from mnpo.io import write_json_atomic
from mnpo.maps import compute_maps
from mnpo.metrics.localization import BoxCurves, MaskCurves, PerImage, class_ranks

log = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every image exactly once over the ranks (no padding)."""

    def __init__(self, size: int, ctx: DistContext) -> None:
        self.indices = list(range(ctx.rank, size, ctx.world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipUnreadable(torch.utils.data.Dataset):
    """Wraps a data set: an unreadable image becomes ``{"skipped": image_id, "reason": ...}``
    (the reason names the file). (Training has its own, seeded: ``train_input.TrainingItems``.)
    """

    def __init__(self, dataset: WSOLDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except ImageReadError as err:
            log.warning("skipping unreadable image %s", err)
            return {"skipped": self.dataset.image_ids[index], "reason": str(err)}


def collate_skipping(collate):
    """A collate function that drops skipped items and lists them under ``"skipped"``."""

    def run(items):
        kept = [i for i in items if "skipped" not in i]
        batch = collate(kept) if kept else {}
        batch["skipped"] = [i["skipped"] for i in items if "skipped" in i]
        batch["skipped_reasons"] = [i["reason"] for i in items if "skipped" in i]
        return batch

    return run


class UnreadableImagesError(ValueError):
    """Images of an evaluated split could not be read; ``images``: image id -> why (the reason
    names the file). Raised instead of metrics over the other images only."""

    def __init__(self, where: str, images: Mapping[str, str]) -> None:
        self.where = str(where)
        self.images = dict(images)
        listed = "; ".join(list(self.images.values())[:5]) + ("; ..." if len(self.images) > 5 else "")
        super().__init__(f"{self.where}: {len(self.images)} unreadable image(s), so no metric is computed "
                         f"(it would leave them out of its denominator): {listed}. Repair or replace them, "
                         f"or pass --skip-unreadable to count each as a miss")

    def __reduce__(self):
        return (type(self), (self.where, self.images))


def unreadable_headers(dataset: WSOLDataset, indices: Sequence[int], threads: int = 8) -> dict[str, str]:
    """The images among ``indices`` whose file is missing or not an image by its header (PIL
    opens it without decoding the pixels): image id -> why. Truncated data shows only when an
    image is decoded (:class:`SkipUnreadable`)."""
    from PIL import Image

    def problem(index: int) -> str | None:
        path = dataset.image_path(index)
        try:
            with Image.open(path):
                return None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
            return str(ImageReadError(path, f"{type(exc).__name__}: {exc}"))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(problem, indices))
    return {dataset.image_ids[i]: reason for i, reason in zip(indices, found) if reason is not None}


@dataclass
class SplitResult:
    """Curves (box or mask; None on a split without localization labels), classification counts
    and unreadable images of one split, its per-image details when ``EvalSettings.details`` asked
    for them, and its faithfulness result when ``EvalSettings.faithfulness`` did
    (:meth:`~mnpo.engine.faithfulness.FaithfulnessAccumulator.result`).

    num_images: every image of the split, read or not (unreadable ones count as misses).
    unreadable: image id -> why it could not be read (empty unless ``skip_unreadable``).
    """

    curves: BoxCurves | MaskCurves
    num_images: int
    top1_correct: int
    top5_correct: int
    unreadable: dict[str, str]
    details: SplitDetails | None = None
    faithfulness: dict[str, Any] | None = None

    @property
    def classification(self) -> dict[str, float]:
        n = max(self.num_images, 1)
        return {"top1_cls": 100.0 * self.top1_correct / n, "top5_cls": 100.0 * self.top5_correct / n}


def _sum_curves(curves: BoxCurves | MaskCurves | None, ctx: DistContext) -> BoxCurves | MaskCurves | None:
    if not ctx.enabled or curves is None:
        return curves
    n = int(all_reduce_sum(np.array([curves.num_images], np.int64), ctx)[0])
    if isinstance(curves, MaskCurves):
        return MaskCurves(curves.thresholds, n, all_reduce_sum(curves.positive, ctx),
                          all_reduce_sum(curves.negative, ctx))
    top = None if curves.top1 is None else all_reduce_sum(np.stack([curves.top1, curves.top5]), ctx)
    return BoxCurves(curves.thresholds, n, all_reduce_sum(curves.largest, ctx), all_reduce_sum(curves.multi, ctx),
                     curves.iou_thresholds, None if top is None else top[0], None if top is None else top[1])


def _read_state(path: Path, key: Mapping[str, Any]) -> dict[str, Any]:
    """The progress file of an interrupted evaluation, checked against this run's ``key``."""
    try:
        state = json.loads(path.read_text())
        saved = state["key"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an evaluation progress file ({type(err).__name__}: {err})") from None
    expected = json.loads(json.dumps(dict(key)))  # as it reads back (tuples become lists)
    differ = [f"{k}: {saved.get(k)!r} there, {expected.get(k)!r} now" for k in sorted(set(saved) | set(expected))
              if saved.get(k) != expected.get(k)]
    if differ:
        raise ValueError(f"{path} was written by another evaluation ({'; '.join(differ)}); delete it to start over")
    return state


@dataclass(frozen=True, eq=False)
class EvalSettings:
    """What ``evaluate_model`` computes, and how (as ``MapOptions`` is for maps).

    thresholds: the score-map thresholds swept (``(T,)`` in [0, 1]). method, map_options: of
    ``compute_maps``. precision: of the classification pass; map_precision: of the map pass;
    each ``fp32`` (strict: no TF32), ``tf32`` or ``bf16`` (see
    :func:`~mnpo.engine.runtime.resolve_precision`). Maps are fp32 by default because bf16
    moves normalized maps by 1e-2 to 4e-2 (README). batch_size: images per batch (the ten
    crops of a batch go through the network ``batch_size`` at a time, so memory stays that of
    one batch). workers: data loader processes. ten_crop: classify from the ten-crop average
    (the protocol) or from the 224 view (faster, used for per-epoch validation).
    channels_last: feed the network NHWC tensors (faster convolutions on GPUs).
    skip_unreadable: count an image that cannot be read as a miss for every metric (IoU 0 at
    every threshold, its class not in the top five; for PxAP a map of zeros), so that every
    denominator stays the split's size; when False (the default), any unreadable image raises
    :class:`UnreadableImagesError` listing all of them, before any metric is returned.
    metric_workers: threads of the box evaluator (default: its own).
    foreground: the model is a foreground model (one output, the FSL baseline): every map is of
    output 0, and nothing is classified (no classification or Top-k Loc; ten-crop is skipped).
    details: also keep what the report needs (``SplitResult.details``): each image's IoU at
    every threshold (box) or own PxAP (mask), its five best classes, and thumbnails of a fixed
    sample of ``gallery_size`` images (see :mod:`mnpo.engine.results`).
    faithfulness: also score the maps' faithfulness to the model (:mod:`mnpo.engine.faithfulness`);
    the only metrics of a split without localization labels.
    """

    thresholds: np.ndarray
    method: str = "mnpos"
    map_options: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    map_precision: str = "fp32"
    batch_size: int = 64
    workers: int = 0
    ten_crop: bool = True
    channels_last: bool = False
    skip_unreadable: bool = False
    metric_workers: int | None = None
    details: bool = False
    gallery_size: int = 128
    foreground: bool = False
    faithfulness: FaithfulnessSettings | None = None

    def run_key(self, dataset: WSOLDataset, ctx: DistContext) -> dict[str, Any]:
        """The settings a progress file must match to be continued (besides the caller's)."""
        return {"method": self.method, "map_options": dict(self.map_options), "ten_crop": self.ten_crop,
                "images": len(dataset), "rank": ctx.rank, "world": ctx.world, "foreground": self.foreground,
                "details": self.details, "gallery_size": self.gallery_size if self.details else None,
                "skip_unreadable": self.skip_unreadable, **({"decode": "device"} if dataset.device_decode else {}),
                "faithfulness": None if self.faithfulness is None else self.faithfulness.to_json()}


def _settings(settings: EvalSettings | None, fields_given: dict[str, Any]) -> EvalSettings:
    """``settings`` with the keyword fields applied (``map_options=None`` means none)."""
    if fields_given.get("map_options", {}) is None:
        fields_given = {**fields_given, "map_options": {}}
    known = {f.name for f in fields(EvalSettings)}
    unknown = sorted(set(fields_given) - known)
    if unknown:
        raise TypeError(f"unknown evaluation setting(s) {unknown}; settings are {sorted(known)}")
    if settings is None:
        if "thresholds" not in fields_given:
            raise TypeError("evaluate_model needs thresholds (or an EvalSettings)")
        return EvalSettings(**fields_given)
    return replace(settings, **fields_given)


def evaluate_model(model: torch.nn.Module, dataset: WSOLDataset, settings: EvalSettings | None = None, *,
                   device: torch.device = torch.device("cpu"), ctx: DistContext = DistContext(),
                   save_maps: str | Path | None = None, on_batch=None, progress: bool = False,
                   state_file: str | Path | None = None, run_key: Mapping[str, Any] | None = None,
                   save_every: float = 60.0, **setting_fields: Any) -> SplitResult:
    """Evaluate ``model`` (eval mode) on an ``evaluate``-mode data set.

    settings: an ``EvalSettings``; its fields may also be given (or overridden) as keywords.
    save_maps: write each 224x224 map as ``DIR/<image_id>.npy``. on_batch: called with
    ``(batch, maps)`` (e.g. to draw overlays). The box / mask metrics of a batch run in a
    background thread while the network works on the next one.
    state_file: keep the progress in this JSON file (atomically, every ``save_every`` seconds
    and at the end); when it exists, continue from it: the images it counts are not evaluated
    again, and the result equals an uninterrupted run's. ``run_key``: the caller's settings that
    must match for the file to be continued (checkpoint, metadata, ...); the method, map options,
    ten-crop, image count and rank are checked too. A mismatch raises ValueError.
    """
    settings = _settings(settings, setting_fields)
    if dataset.mode != "evaluate":
        raise ValueError(f"evaluate_model needs an 'evaluate'-mode data set, got {dataset.mode!r}")
    model.eval()
    faithfulness = None
    if settings.faithfulness is not None:
        if settings.foreground:
            raise ValueError("faithfulness metrics read a class's probability; a foreground model has no classes")
        faithfulness = FaithfulnessAccumulator(settings.faithfulness,
                                               regions_of_split(dataset.meta, dataset.mask_root, EVAL_SIZE))
    elif dataset.meta.kind == "none":
        raise ValueError("the evaluated split has no localization.txt, so there is no box or mask to "
                         "evaluate against; give --faithfulness to score the maps against the model instead")
    evaluator = split_evaluator(dataset.meta, settings.thresholds, dataset.mask_root, settings.metric_workers,
                                settings.details, classification_only=faithfulness is not None)
    counts: dict[str, Any] = {"top1": 0, "top5": 0, "unreadable": {}}
    details = SplitDetails(PerImage((), np.zeros(0))) if settings.details else None
    sample = gallery_sample(dataset.image_ids, settings.gallery_size) if settings.details else set()
    sampler = ShardSampler(len(dataset), ctx)
    key = {**dict(run_key or {}), **settings.run_key(dataset, ctx)}
    if state_file is not None and Path(state_file).is_file():
        counts = _resume(Path(state_file), key, evaluator, sampler, dataset, details, faithfulness)

    def unreadable(found: Mapping[str, str]) -> None:
        """Images that cannot be read: listed; counted as misses, or kept for the error at the end."""
        counts["unreadable"].update(found)
        if settings.skip_unreadable:
            evaluator.add_misses(list(found))
            if details is not None:
                details.top5.update({i: np.zeros(0, np.int64) for i in found})

    missing = unreadable_headers(dataset, sampler.indices)  # a wrong --data fails here, in seconds
    if not settings.skip_unreadable:
        everywhere = _gather_unreadable(missing, ctx)
        if everywhere:
            raise UnreadableImagesError(dataset.image_root, everywhere)
    elif missing:
        unreadable(missing)
        sampler.indices = [i for i in sampler.indices if dataset.image_ids[i] not in missing]

    def save_state() -> None:
        extra = {} if details is None else {"details": details.to_state()}
        if faithfulness is not None:
            extra["faithfulness"] = faithfulness.state_dict()
        write_json_atomic(state_file, {"key": key, "evaluator": evaluator.state_dict(), **counts, **extra})

    last_save = time.monotonic()
    loader = DataLoader(SkipUnreadable(dataset), batch_size=settings.batch_size, sampler=sampler,
                        num_workers=settings.workers, collate_fn=collate_skipping(collate_evaluation),
                        pin_memory=device.type == "cuda")
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(loader.sampler), desc="evaluate", unit="img", dynamic_ncols=True)
    pending = None  # the previous batch's metric update, running beside this batch's network work
    with evaluator, ThreadPoolExecutor(max_workers=1) as background:
        for batch in loader:
            if batch["skipped"]:
                if pending is not None:
                    pending.result()  # the evaluator is the background thread's until then
                    pending = None
                unreadable(dict(zip(batch["skipped"], batch["skipped_reasons"])))
            if "encoded" in batch:
                batch = _device_batch(batch, dataset, device, settings.skip_unreadable, unreadable)
            if "image" not in batch:
                continue
            maps, logits, hits = evaluate_batch(model, batch, settings, device, faithfulness)
            counts["top1"] += hits[0]
            counts["top5"] += hits[1]
            if pending is not None:
                pending.result()  # at most one update in flight; re-raises its errors here
            pending = background.submit(evaluator.update, maps, list(batch["image_id"]),
                                        logits if dataset.meta.kind == "box" and not settings.foreground else None)
            if details is not None:
                _keep_details(details, batch, maps, logits, evaluator, sample)
            if save_maps is not None:
                _save_maps(Path(save_maps), batch["image_id"], maps)
            if on_batch is not None:
                on_batch(batch, maps)
            if bar is not None:
                bar.update(len(maps) + len(batch["skipped"]))
            if state_file is not None and time.monotonic() - last_save >= save_every:
                pending.result()  # the state must hold this batch's counts
                save_state()
                last_save = time.monotonic()
        if pending is not None:
            pending.result()
        if state_file is not None:
            save_state()
    if bar is not None:
        bar.close()
    if details is not None:
        details.records = evaluator.records()
    if not settings.skip_unreadable:
        everywhere = _gather_unreadable(counts["unreadable"], ctx)
        if everywhere:  # the progress file keeps the rest: a rerun after the repair reads only them
            raise UnreadableImagesError(dataset.image_root, everywhere)
    return _gather(evaluator.compute(), counts, ctx, details, faithfulness, len(evaluator.seen_ids))


def _device_batch(batch: dict[str, Any], dataset: WSOLDataset, device: torch.device, skip_unreadable: bool,
                  unreadable) -> dict[str, Any]:
    """A batch of ``encoded`` images with its ``image`` and ``ten_crop_source`` made on the device
    (:func:`~mnpo.data.device_decode.device_views`). An image that does not decode there is, with
    ``skip_unreadable``, listed by ``unreadable`` and left out of the batch; else the error stands."""
    resize = dataset.resize_size if dataset.ten_crop else None
    while batch["encoded"]:
        try:
            views, sources = device_views(batch["encoded"], device, dataset.crop_size, resize, batch["image_id"])
        except ImageReadError as err:
            if not skip_unreadable or err.path not in batch["image_id"]:
                raise
            unreadable({err.path: str(err)})
            keep = [i for i, image_id in enumerate(batch["image_id"]) if image_id != err.path]
            batch = {k: v if k in ("skipped", "skipped_reasons") else
                     (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]) for k, v in batch.items()}
            continue
        out = {k: v for k, v in batch.items() if k != "encoded"}
        out["image"] = views
        if sources is not None:
            out["ten_crop_source"] = sources
        return out
    return {k: v for k, v in batch.items() if k in ("skipped", "skipped_reasons")}


def evaluate_batch(model: torch.nn.Module, batch: Mapping[str, Any], settings: EvalSettings,
                   device: torch.device, faithfulness: FaithfulnessAccumulator | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One batch of ``collate_evaluation``: the 224x224 maps of the ground-truth classes
    ``(B, 224, 224)``, the classification logits ``(B, K)`` (ten-crop average or 224 view) and
    the batch's top-1 and top-5 hits. ``faithfulness``: also score the maps there (on the
    device, at the classification's precision)."""
    images = batch["image"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # uint8 views: normalize (and crop, below) on the device
        images = normalize_batch(images)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device)
    options = {"size": (EVAL_SIZE, EVAL_SIZE), **dict(settings.map_options)}  # the protocol's frame
    targets = torch.zeros_like(labels) if settings.foreground else labels
    with autocast(device, settings.map_precision):
        maps, logits = compute_maps(model, images, targets, method=settings.method, **options)
    if faithfulness is not None:
        with autocast(device, settings.precision):
            faithfulness.update(model, images, maps, labels, list(batch["image_id"]))
    if settings.foreground:
        return maps.cpu().numpy(), logits.cpu().numpy(), (0, 0)
    if settings.ten_crop:
        if "ten_crop_source" in batch:
            sources = normalize_batch(batch["ten_crop_source"].to(device, non_blocking=True))
            crops = ten_crop_batch(sources, images.shape[-1])
        elif "ten_crop" in batch:
            crops = batch["ten_crop"].to(device, non_blocking=True)
        else:
            raise ValueError("ten-crop classification asked for, but the data set makes no ten crops "
                             "(WSOLDataset(..., ten_crop=False)); pass ten_crop=False to the evaluation too")
        with autocast(device, settings.precision):
            logits = ten_crop_logits(model, crops, settings.batch_size, settings.channels_last).float().mean(1)
    ranks = torch.from_numpy(class_ranks(logits.float().cpu().numpy(), labels.cpu().numpy()))
    hits = (int((ranks < 1).sum()), int((ranks < 5).sum()))
    return maps.cpu().numpy(), logits.cpu().numpy(), hits


def _resume(path: Path, key: Mapping[str, Any], evaluator, sampler: ShardSampler,
            dataset: WSOLDataset, details: SplitDetails | None,
            faithfulness: FaithfulnessAccumulator | None = None) -> dict[str, Any]:
    """Load an interrupted evaluation's progress; leave in ``sampler`` only the images it lacks."""
    state = _read_state(path, key)
    evaluator.load_state_dict(state["evaluator"])
    if faithfulness is not None:
        faithfulness.load_state_dict(state["faithfulness"])
    if details is not None:
        details.load_state(state["details"])
    misses = evaluator.misses  # unreadable images counted as misses; others are tried again
    counts = {"top1": int(state["top1"]), "top5": int(state["top5"]),
              "unreadable": {i: r for i, r in dict(state["unreadable"]).items() if i in misses}}
    done = evaluator.seen_ids
    sampler.indices = [i for i in sampler.indices if dataset.image_ids[i] not in done]
    log.info("%s: continuing after %d images (%d left)", path, len(done), len(sampler))
    return counts


def _save_maps(folder: Path, image_ids, maps: np.ndarray) -> None:
    for image_id, scoremap in zip(image_ids, maps):
        target = folder / f"{image_id}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, scoremap)


def _keep_details(details: SplitDetails, batch: Mapping[str, Any], maps: np.ndarray, logits: np.ndarray,
                  evaluator, sample: set[str]) -> None:
    """A batch's five best classes per image, and the gallery thumbnails of its sampled images."""
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    for k, image_id in enumerate(batch["image_id"]):
        details.top5[image_id] = top5[k]
        if image_id not in sample:
            continue
        view = batch["image"][k]
        if view.dtype != torch.uint8:  # a normalized float view
            mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
            view = ((view.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        details.gallery[image_id] = gallery_item(image_id, view.permute(1, 2, 0).cpu().numpy(), maps[k], evaluator)


def _gather(curves: BoxCurves | MaskCurves | None, counts: Mapping[str, Any], ctx: DistContext,
            details: SplitDetails | None = None, faithfulness: FaithfulnessAccumulator | None = None,
            seen: int = 0) -> SplitResult:
    """This rank's curves, counts, details and faithfulness summed over the ranks (a single
    process: as they are). ``seen``: this rank's images, counted when there are no curves."""
    curves = _sum_curves(curves, ctx)
    top1, top5 = (int(c) for c in all_reduce_sum(np.array([counts["top1"], counts["top5"]], np.int64), ctx))
    unreadable = _gather_unreadable(counts["unreadable"], ctx)
    if ctx.enabled:
        if details is not None:
            parts: list[SplitDetails | None] = [None] * ctx.world
            torch.distributed.all_gather_object(parts, details)
            details = SplitDetails.merge(parts)
        if faithfulness is not None:
            states: list[dict | None] = [None] * ctx.world
            torch.distributed.all_gather_object(states, faithfulness.state_dict())
            faithfulness.merge([_accumulator_from(faithfulness, st) for st in states[:ctx.rank] + states[ctx.rank + 1:]])
    faithful = None if faithfulness is None else faithfulness.result()
    if curves is None:  # no localization labels: every image the evaluator counted
        num_images = int(all_reduce_sum(np.array([seen], np.int64), ctx)[0])
    else:
        num_images = curves.num_images
    return SplitResult(curves, num_images, top1, top5, unreadable, details, faithful)


def _accumulator_from(like: FaithfulnessAccumulator, state: Mapping[str, Any]) -> FaithfulnessAccumulator:
    other = FaithfulnessAccumulator(like.settings, like.regions)
    other.load_state_dict(state)
    return other


def _gather_unreadable(found: Mapping[str, str], ctx: DistContext) -> dict[str, str]:
    """Every rank's unreadable images, on every rank (one process: ``found`` itself)."""
    if not ctx.enabled:
        return dict(found)
    gathered: list[dict[str, str]] = [{} for _ in range(ctx.world)]
    torch.distributed.all_gather_object(gathered, dict(found))
    return {k: v for part in gathered for k, v in part.items()}


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, metadata: str | Path, *,
                        val_metadata: str | Path | None = None, mask_root: str | Path | None = None,
                        method: str = "mnpos", map_options: Mapping[str, Any] | None = None,
                        cam_curve_interval: float = 0.01, threshold_grid: str = "full",
                        batch_size: int = 64, workers: int = 4,
                        device: str = "auto", precision: str = "auto", ten_crop: bool = True,
                        save_maps: str | Path | None = None, save_overlays: str | Path | None = None,
                        input_size: int = EVAL_SIZE, map_precision: str = "fp32", progress: bool = True,
                        state_dir: str | Path | None = None, results: str | Path | None = None,
                        report_html: str | Path | None = None, label: str | None = None, gallery_size: int = 128,
                        skip_unreadable: bool = False, model_spec: str | None = None,
                        weights: str | Path | None = None, num_classes: int | None = None,
                        faithfulness: FaithfulnessSettings | None = None, decode: str = "host"):
    """The ``mnpo evaluate`` job: both protocols (calibrated when ``val_metadata`` is given).

    The model: an mnpo ``checkpoint``, or (``checkpoint=None``) any classifier by ``model_spec``
    (``torchvision:NAME``, ``timm:NAME``, ``module:path.factory``; see
    :mod:`mnpo.models.external`) with an optional state dict file ``weights`` and its
    ``num_classes`` when not ImageNet's.

    ``input_size``: side of the network's input views (the protocol's 224; a model trained at
    another size, like the demo's, is evaluated at its own); maps are always scored in the
    224x224 frame. ``state_dir``: keep each split's progress there (``test.json``, ``val.json``;
    ``.rankN`` added under torchrun), so that the same call, run again after an interruption,
    continues where it stopped (see :func:`evaluate_model`). ``results``: also write the
    per-image results file (:mod:`mnpo.engine.results`); ``report_html``: also write the HTML report
    of this one result (:mod:`mnpo.engine.report`); ``label``: the result's name there (default:
    the method); ``gallery_size``: images sampled for the report's gallery. Returns the
    ``Report`` of the evaluated split; its ``info`` holds the classification accuracy
    (ten-crop), the unreadable images and what was evaluated. ``skip_unreadable``: count an
    unreadable image as a miss instead of raising :class:`UnreadableImagesError` (see
    :class:`EvalSettings`). ``faithfulness``: also score the maps' faithfulness to the model on
    the evaluated split (:mod:`mnpo.engine.faithfulness`; ``info["faithfulness"]``); on a split
    with classification labels only, the only metrics. ``decode``: ``host`` (PIL in the workers,
    wsolevaluation's pixels) or ``device`` (JPEGs decoded and every image resized on the device,
    :mod:`mnpo.data.device_decode`: within one level of those pixels, far less work per worker).
    """
    from mnpo.engine.evaluate_maps import build_report, write_evaluation
    from mnpo.engine.runtime import init_distributed, resolve_device, resolve_precision
    from mnpo.metrics.boxes import threshold_grid as make_grid
    from mnpo.models import load_model

    if (checkpoint is None) == (model_spec is None):
        raise ValueError("evaluate needs exactly one of a checkpoint and a model spec")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if checkpoint is not None and (weights is not None or num_classes is not None):
        raise ValueError("--weights and --num-classes go with --model, not --checkpoint")
    dev = resolve_device(device)
    prec, map_prec = resolve_precision(precision, dev), resolve_precision(map_precision, dev)
    ctx = init_distributed(dev)
    if model_spec is not None:
        from mnpo.models.external import build_external

        model = build_external(model_spec, weights, num_classes, input_size)
        payload, evaluated, key_file = {"meta": {"class_names": model.class_names}}, model_spec, weights
    else:
        model, payload = load_model(checkpoint)
        evaluated, key_file = str(checkpoint), checkpoint
    model.to(dev)
    channels_last = dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    details = results is not None or report_html is not None
    foreground = (payload.get("meta") or {}).get("task") == "foreground"  # an FSL baseline's checkpoint
    settings = EvalSettings(make_grid(threshold_grid, cam_curve_interval), method, dict(map_options or {}), prec,
                            map_prec, batch_size, workers, ten_crop and not foreground, channels_last,
                            skip_unreadable=skip_unreadable, details=details, gallery_size=gallery_size,
                            foreground=foreground, faithfulness=faithfulness)
    maps_dir = save_maps if save_maps is not None else (Path(save_overlays) / "maps" if save_overlays else None)

    stat = Path(key_file).stat() if key_file is not None else None
    run_key = {"checkpoint": evaluated, "checkpoint_bytes": stat and stat.st_size,
               "checkpoint_mtime_ns": stat and stat.st_mtime_ns, "data": str(data), "precision": prec,
               "map_precision": map_prec, "input_size": input_size}
    if model_spec is not None:
        run_key["weights"] = None if weights is None else str(weights)

    datasets = {}

    def split(name, meta_dir, maps_to):
        dataset = WSOLDataset(data, meta_dir, "evaluate", num_classes=None if foreground else model.num_classes,
                              mask_root=mask_root,
                              crop_size=input_size, resize_size=resize_for(input_size), uint8_views=True,
                              ten_crop=settings.ten_crop, device_decode=decode == "device")
        datasets[name] = dataset
        state_file = None
        if state_dir is not None:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            state_file = Path(state_dir) / f"{name}{'' if ctx.world == 1 else f'.rank{ctx.rank}'}.json"
        split_settings = replace(settings, details=details and name == "test",  # val: curves only
                                 faithfulness=settings.faithfulness if name == "test" else None)
        return evaluate_model(model, dataset, split_settings, device=dev, ctx=ctx, save_maps=maps_to, progress=progress,
                              state_file=state_file, run_key={**run_key, "metadata": str(meta_dir)})

    test = split("test", metadata, maps_dir)
    if test.curves is None and val_metadata is not None:
        raise ValueError(f"{metadata} has no localization labels, so there is no threshold to calibrate on "
                         f"{val_metadata}; leave --val-metadata out")
    val = None if val_metadata is None else split("val", val_metadata, None)
    info = {
        "checkpoint": evaluated, **({"weights": run_key["weights"]} if model_spec is not None else {}),
        "metadata": str(metadata), "kind": datasets["test"].meta.kind, "method": method,
        "map_options": dict(map_options or {}), "precision": prec, "map_precision": map_prec, "decode": decode,
        "num_images": test.num_images,
        "unreadable_images": [{"image_id": i, "reason": r} for i, r in sorted(test.unreadable.items())],
        "unreadable_policy": "counted as misses" if skip_unreadable else "an error",
        "classification": None if foreground else test.classification,
        "classification_view": "none: a foreground model" if foreground else ("ten-crop" if ten_crop else "224x224"),
        "cam_curve_interval": cam_curve_interval, "threshold_grid": threshold_grid,
        "oracle": "thresholds chosen on the evaluated split itself (optimistic; the MNPO paper's protocol)",
        "calibrated": ("thresholds chosen on val, applied to the evaluated split (wsolevaluation's protocol)"
                       if val is not None else "not computed: no --val-metadata given"),
    }
    if test.faithfulness is not None:
        info["faithfulness"] = test.faithfulness
    if val is not None:
        info.update(val_metadata=str(val_metadata), val_num_images=val.num_images,
                    val_unreadable_images=[{"image_id": i, "reason": r} for i, r in sorted(val.unreadable.items())],
                    val_classification=None if foreground else val.classification)
    report = build_report(test.curves, None if val is None else val.curves, info)
    if details and ctx.is_main:
        evaluation = EvaluationResults.build(
            label or method, test.curves, None if val is None else val.curves, test.details,
            datasets["test"].meta, None if val is None else datasets["val"].meta, model.num_classes, info)
        write_evaluation(evaluation, results, report_html)
    if save_overlays:  # every rank draws the images it evaluated (their maps are on its disk)
        protocol = report.calibrated or report.oracle
        threshold = protocol["max_box_acc"].threshold if "max_box_acc" in protocol else 0.5
        share = datasets["test"].image_ids[ctx.rank::ctx.world]  # the ShardSampler's share
        write_overlays(Path(save_overlays), data, metadata, maps_dir, threshold, image_ids=share)
    return report


def protocol_overlay(image, scoremap: np.ndarray, threshold: float, meta, image_id: str):
    """``image`` (PIL RGB) with its 224x224 ``scoremap`` as a heat map, the predicted box(es)
    (largest contour at ``threshold``, scaled from the map's frame) in green and, for a box
    split, the ground truth (scaled from the ``image_sizes.txt`` frame) in red."""
    from mnpo.engine.overlay import heatmap_overlay
    from mnpo.metrics.boxes import predicted_boxes

    w, h = image.size
    boxes = [box_to_image(b, w, h, EVAL_SIZE) for b in predicted_boxes(scoremap, threshold)]
    gt = np.zeros((0, 4), int)
    if meta.boxes is not None:  # boxes are in the image_sizes.txt frame; the file may differ
        sw, sh = meta.sizes[image_id] if meta.sizes is not None else image.size
        gt = (np.asarray(meta.boxes[image_id], float) * [w / sw, h / sh, w / sw, h / sh]).astype(int)
    return heatmap_overlay(image, scoremap, boxes=boxes, gt_boxes=gt)


def write_overlays(out: Path, data: str | Path, metadata: str | Path, maps_dir: str | Path, threshold: float,
                   image_ids: Sequence[str] | None = None) -> int:
    """One PNG per image under ``out`` (``<image_id>.png``): see :func:`protocol_overlay`. Of
    ``image_ids`` only (a rank's share), or of every image of the split. Returns how many."""
    from mnpo.data.metadata import read_split
    from mnpo.data.transforms import load_image

    meta = read_split(metadata)
    written = 0
    for image_id in meta.image_ids if image_ids is None else image_ids:
        map_path = Path(maps_dir) / f"{image_id}.npy"
        if not map_path.is_file():
            continue  # skipped image
        try:
            image = load_image(Path(data) / image_id)
        except ImageReadError:
            continue
        target = out / f"{image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        protocol_overlay(image, np.load(map_path), threshold, meta, image_id).save(target)
        written += 1
    return written
