"""Faithfulness metrics in an evaluation run: settings, a streaming accumulator, the summary.

``mnpo evaluate --faithfulness avgdrop,deletion,insertion,road,pointing`` (or ``all``) scores the
method's maps, and by default a random-map and a center-map baseline too, with
:mod:`mnpo.metrics.faithfulness` on every batch, beside the box or mask metrics (or alone, on a
split with classification labels only). The target is the ground-truth class; the model input is
the evaluation's view (normalized, ``input_size``), the maps are the protocol's 224 x 224 maps
(resized to the view when it is of another size). Metrics of one image do not depend on its
batch: the random baseline and ROAD's noise are seeded per image (``seed`` and the image id).

Per image the accumulator keeps each metric's value (percent for Average Drop, Increase in
Confidence and the pointing game; probabilities for the areas and ROAD) and the sum of the
deletion / insertion curves, so the summary holds the mean curves (the results file stores
them; per-image curves of 50,000 images x 113 points x 3 maps would outweigh the rest).

Cost per image and map (1 + the baselines' count maps): avgdrop 2 forwards, deletion and
insertion ``len(perturbation_counts(H W, steps))`` (113 at 224 in 112 steps) each, road
``1 + 2 P`` (19 for the 9 default percentiles) and ``2 P`` sparse solves, pointing none.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mnpo.metrics import faithfulness as fm

__all__ = ["BASELINES", "FAITHFULNESS_METRICS", "SUMMARY_NAMES", "FaithfulnessAccumulator",
           "FaithfulnessSettings", "parse_metrics", "regions_of_split"]

#: The metric names ``--faithfulness`` takes, in the order they are reported.
FAITHFULNESS_METRICS = ("avgdrop", "deletion", "insertion", "road", "pointing")
#: The baselines scored beside the method's maps.
BASELINES = ("random", "center")
#: Summary value -> (its metric, its name in tables, higher is better).
SUMMARY_NAMES = {
    "average_drop": ("avgdrop", "Avg Drop %", False),
    "increase_in_confidence": ("avgdrop", "Incr Conf %", True),
    "deletion_auc": ("deletion", "Deletion AUC", False),
    "insertion_auc": ("insertion", "Insertion AUC", True),
    "road_morf": ("road", "ROAD MoRF", False),
    "road_lerf": ("road", "ROAD LeRF", True),
    "road_combined": ("road", "ROAD combined", True),
    "pointing_game": ("pointing", "Pointing %", True),
    "pointing_energy": ("pointing", "Energy %", True),
}


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"road,deletion"`` or ``"all"`` -> the metric names in report order; refuses unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return FAITHFULNESS_METRICS
    unknown = [n for n in names if n not in FAITHFULNESS_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown faithfulness metric(s) {unknown or names!r}; choose from "
                         f"{', '.join(FAITHFULNESS_METRICS)} or all")
    return tuple(n for n in FAITHFULNESS_METRICS if n in names)


@dataclass(frozen=True)
class FaithfulnessSettings:
    """What an evaluation's faithfulness pass computes. Defaults are the papers': 112 steps of
    deletion / insertion (RISE: 448 pixels a step at 224), ROAD at 10 .. 90 percent with noise
    0.01 (pytorch-grad-cam's), both baselines."""

    metrics: tuple[str, ...] = FAITHFULNESS_METRICS
    steps: int = 112
    road_percentiles: tuple[int, ...] = fm.ROAD_PERCENTILES
    road_noise: float = 0.01
    seed: int = 0
    chunk_size: int = 16
    baselines: tuple[str, ...] = BASELINES

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        object.__setattr__(self, "road_percentiles", tuple(self.road_percentiles))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        for name in ("steps", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"faithfulness {name} must be a positive int, got {value!r}")
        if not self.road_percentiles or any(not 0 < p < 100 for p in self.road_percentiles):
            raise ValueError(f"ROAD percentiles must lie in (0, 100), got {self.road_percentiles!r}")
        if not self.road_noise >= 0:
            raise ValueError(f"ROAD noise must be >= 0, got {self.road_noise!r}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad or len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines must be distinct names of {BASELINES}, got {self.baselines!r}")

    def forwards_per_image(self, size: int) -> dict[str, int]:
        """Model forwards per image for each metric at a ``size x size`` view, over the method's
        maps and the baselines'."""
        points = len(fm.perturbation_counts(size * size, self.steps))
        per_map = {"avgdrop": 2, "deletion": points, "insertion": points,
                   "road": 1 + 2 * len(self.road_percentiles), "pointing": 0}
        return {m: per_map[m] * (1 + len(self.baselines)) for m in self.metrics}

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def image_seed(seed: int, image_id: str) -> int:
    """A generator seed of one image: ``seed`` and the id's CRC-32 (independent of batching)."""
    return (int(seed) * 1_000_003 + zlib.crc32(image_id.encode())) % (2 ** 63)


#: Per-image values kept for each metric (keys of the accumulator's rows).
_VALUES = {"avgdrop": ("drop", "increase"), "deletion": ("deletion_auc",), "insertion": ("insertion_auc",),
           "road": ("road_morf", "road_lerf"), "pointing": ("pointing_hit", "pointing_energy")}


class FaithfulnessAccumulator:
    """Streaming faithfulness values of the method's maps and the baselines'.

    ``regions``: image ids -> ``(B, 224, 224)`` bool object regions (boxes or masks in the
    maps' frame), needed by the pointing game; None on a split without localization labels.
    """

    def __init__(self, settings: FaithfulnessSettings,
                 regions: Callable[[Sequence[str]], Tensor] | None = None) -> None:
        if "pointing" in settings.metrics and regions is None:
            raise ValueError("the pointing game needs boxes or masks, and this split has no localization.txt; "
                             "leave pointing out of --faithfulness")
        self.settings = settings
        self.regions = regions
        self.sources = ("maps", *settings.baselines)
        self.image_ids: list[str] = []
        self.values: dict[str, dict[str, list[float]]] = {
            s: {k: [] for m in settings.metrics for k in _VALUES[m]} for s in self.sources}
        self.curve_sums: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.sources}
        self.fractions: dict[str, np.ndarray] = {}
        self.view_size: int | None = None

    def _maps_of(self, source: str, maps: Tensor, image_ids: Sequence[str]) -> Tensor:
        if source == "maps":
            return maps
        if source == "center":
            return fm.center_maps(tuple(maps.shape), maps.device)
        return torch.stack([fm.random_maps((1, *maps.shape[1:]), image_seed(self.settings.seed, i))[0]
                            for i in image_ids]).to(maps.device)

    def update(self, model: torch.nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
               image_ids: Sequence[str]) -> None:
        """One batch: ``images`` ``(B, 3, S, S)`` the model's input, ``maps`` ``(B, 224, 224)``
        in [0, 1], ``targets`` ``(B,)``, their ids."""
        image_ids = list(image_ids)
        if len(image_ids) != len(images):
            raise ValueError(f"{len(image_ids)} image ids for {len(images)} images")
        s = self.settings
        targets = targets.to(images.device)
        regions = None if "pointing" not in s.metrics else self.regions(image_ids).to(maps.device)
        seeds = [image_seed(s.seed, i) for i in image_ids]
        for source in self.sources:
            frame_maps = self._maps_of(source, maps.float(), image_ids)
            view_maps = frame_maps
            if frame_maps.shape[-2:] != images.shape[-2:]:
                view_maps = F.interpolate(frame_maps[:, None], size=images.shape[-2:], mode="bilinear",
                                          align_corners=False)[:, 0].clamp(0, 1)
            view_maps = view_maps.to(images.dtype)
            row = self.values[source]
            if "avgdrop" in s.metrics:
                change = fm.confidence_change(model, images, view_maps, targets, s.chunk_size)
                row["drop"] += (100 * change.drop).tolist()
                row["increase"] += (100 * change.increase.double()).tolist()
            for mode in ("deletion", "insertion"):
                if mode in s.metrics:
                    curves = fm.deletion_insertion(model, images, view_maps, targets, mode, s.steps,
                                                   chunk_size=s.chunk_size)
                    row[f"{mode}_auc"] += curves.auc.tolist()
                    total = curves.curves.sum(0).cpu().numpy()
                    sums = self.curve_sums[source]
                    sums[mode] = total if mode not in sums else sums[mode] + total
                    self.fractions[mode] = curves.fractions.cpu().numpy()
            if "road" in s.metrics:
                scores = fm.road(model, images, view_maps, targets, s.road_percentiles, s.road_noise, seeds,
                                 s.chunk_size)
                row["road_morf"] += scores.morf.mean(1).tolist()
                row["road_lerf"] += scores.lerf.mean(1).tolist()
            if "pointing" in s.metrics:
                game = fm.pointing_game(frame_maps, regions)
                row["pointing_hit"] += (100 * game.hit.double()).tolist()
                row["pointing_energy"] += (100 * game.energy).tolist()
        self.image_ids += image_ids
        self.view_size = int(images.shape[-1])

    def summary(self) -> dict[str, dict[str, float]]:
        """Per source (``maps``, ``random``, ``center``): the split's mean of each value
        (:data:`SUMMARY_NAMES`), and ``num_images``."""
        out = {}
        for source, row in self.values.items():
            mean = {k: float(np.mean(v)) if v else float("nan") for k, v in row.items()}
            values: dict[str, float] = {}
            if "drop" in mean:
                values.update(average_drop=mean["drop"], increase_in_confidence=mean["increase"])
            for mode in ("deletion", "insertion"):
                if f"{mode}_auc" in mean:
                    values[f"{mode}_auc"] = mean[f"{mode}_auc"]
            if "road_morf" in mean:
                values.update(road_morf=mean["road_morf"], road_lerf=mean["road_lerf"],
                              road_combined=(mean["road_lerf"] - mean["road_morf"]) / 2)
            if "pointing_hit" in mean:
                values.update(pointing_game=mean["pointing_hit"], pointing_energy=mean["pointing_energy"])
            out[source] = {**values, "num_images": len(self.image_ids)}
        return out

    def mean_curves(self) -> dict[str, dict[str, list[float]]]:
        """``{mode: {"fractions": [...], source: [...mean curve...]}}`` for deletion / insertion."""
        n = max(len(self.image_ids), 1)
        return {mode: {"fractions": fractions.tolist(),
                       **{s: (self.curve_sums[s][mode] / n).tolist() for s in self.sources}}
                for mode, fractions in self.fractions.items()}

    def result(self) -> dict[str, Any]:
        """What the report info and the results file keep: settings, summary, mean curves."""
        return {"settings": self.settings.to_json(), "summary": self.summary(), "curves": self.mean_curves(),
                "forwards_per_image": None if self.view_size is None
                else self.settings.forwards_per_image(self.view_size)}

    # resumable and mergeable state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_json(), "image_ids": list(self.image_ids), "values": self.values,
                "curve_sums": {s: {m: v.tolist() for m, v in c.items()} for s, c in self.curve_sums.items()},
                "fractions": {m: v.tolist() for m, v in self.fractions.items()}, "view_size": self.view_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("settings") != self.settings.to_json():
            raise ValueError(f"faithfulness state of other settings ({state.get('settings')}, now "
                             f"{self.settings.to_json()})")
        self.image_ids = list(state["image_ids"])
        self.values = {s: {k: list(v) for k, v in row.items()} for s, row in state["values"].items()}
        self.curve_sums = {s: {m: np.asarray(v, np.float64) for m, v in c.items()}
                           for s, c in state["curve_sums"].items()}
        self.fractions = {m: np.asarray(v, np.float64) for m, v in state["fractions"].items()}
        self.view_size = state.get("view_size")

    def merge(self, others: Sequence["FaithfulnessAccumulator"]) -> None:
        """Add the images of other accumulators (other ranks' shares) to this one."""
        for other in others:
            self.image_ids += other.image_ids
            for s in self.sources:
                for k in self.values[s]:
                    self.values[s][k] += other.values[s][k]
                for m, v in other.curve_sums[s].items():
                    self.curve_sums[s][m] = v if m not in self.curve_sums[s] else self.curve_sums[s][m] + v
            self.fractions.update(other.fractions)
            self.view_size = self.view_size or other.view_size


def regions_of_split(meta, mask_root=None, size: int = 224) -> Callable[[Sequence[str]], Tensor] | None:
    """Image ids -> ``(B, size, size)`` bool object regions of a split's metadata: the union of
    its boxes (resized into the frame) or its mask's foreground (ignored pixels are not object);
    None for a split without localization labels."""
    if meta.kind == "none":
        return None
    if meta.kind == "box":
        from mnpo.data.dataset import resize_boxes

        if meta.sizes is None:
            raise ValueError("the pointing game on boxes needs the split's image_sizes.txt")
        boxes = {i: resize_boxes(meta.boxes[i], meta.sizes[i], size) for i in meta.image_ids}
        return lambda ids: fm.boxes_to_regions([boxes[i] for i in ids], size, size)
    from pathlib import Path

    from mnpo.metrics.masks import load_gt_mask

    if mask_root is None:
        raise ValueError("a mask split needs a mask root (--mask-root) for the pointing game")
    root = Path(mask_root)

    def masks(ids: Sequence[str]) -> Tensor:
        return torch.stack([torch.from_numpy(load_gt_mask(root, meta.mask_paths[i], meta.ignore_paths.get(i, ""),
                                                          size) == 1) for i in ids])

    return masks
