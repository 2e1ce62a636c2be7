"""Faithfulness of score maps to a classifier: does the map show what the model used?

Each metric perturbs the image by its map and reads the model's probability of the target class
again, batched over images and perturbation steps: perturbed copies go through the model
``chunk_size`` at a time, under ``inference_mode`` (no autograd), on the images' device.

Conventions shared by every metric:

* ``images`` ``(B, 3, H, W)`` are what the model takes (normalized as it expects); ``maps``
  ``(B, H, W)`` are in [0, 1] at the images' size (``compute_maps``' output); ``targets``
  ``(B,)`` class indices.
* the score of a class is its softmax *probability* (the papers' "confidence"), in float64;
* the model is any classifier ``compute_maps`` accepts: mnpo's networks (the main branch's
  logits) or a module whose output is scores, ``.logits``, a dict or a tuple
  (:func:`mnpo.models.hooked.scores_of`).

Metrics (per image; a split's value is the mean, in percent where the paper says so):

* :func:`confidence_change` -- *Average Drop* and *Increase in Confidence* (Chattopadhyay et
  al., Grad-CAM++, WACV 2018): ``Y`` the probability on the image, ``O`` on the image times its
  map (``images * maps``, as pytorch-grad-cam's ``CamMultImageConfidenceChange`` and torchcam's
  ``ClassificationMetric`` multiply the model's input); drop ``max(0, Y - O) / Y``, increase
  ``O > Y``. One forward of the image and one of the masked copy: 2 per image.
* :func:`deletion_insertion` -- *Deletion* and *Insertion* (Petsiuk et al., RISE, BMVC 2018):
  pixels ranked by the map (highest first; ties by raster order), ``n = ceil(H W / steps)`` at a
  time, removed (set to ``baseline``, 0 by default) or revealed on a blurred copy of the image
  (Gaussian, 11 taps, sigma 5, zero padding, as RISE's code); the curve is the probability at
  each point and the score its trapezoid area over the fraction of pixels changed (RISE's grid
  where ``n`` divides ``H W``; torchcam 0.5's grid always). At most ``steps + 1`` forwards per
  image and mode.
* :func:`road` -- ROAD (Rong et al., ICML 2022): MoRF and LeRF at percentiles of the map, the
  removed pixels filled by noisy linear imputation (:func:`linear_impute`), and the combined
  score, as pytorch-grad-cam 1.5.7 defines them; ``1 + 2 P`` forwards per image.
* :func:`pointing_game` -- the pointing game and its energy-based variant, for data with boxes
  or masks; no forward.

Baselines that give each number a scale: :func:`random_maps` (seeded uniform noise) and
:func:`center_maps` (a cone centred on the image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ConfidenceChange", "PerturbationCurves", "PointingGame", "RoadScores", "blur", "boxes_to_regions",
           "center_maps", "class_probabilities", "confidence_change", "deletion_insertion", "linear_impute",
           "perturbation_counts", "pixel_order", "pointing_game", "random_maps", "road", "trapezoid_auc"]

#: RISE's insertion substrate: a Gaussian blur of 11 taps, sigma 5 (zero padding).
BLUR_TAPS = 11
BLUR_SIGMA = 5.0


def _check(images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps must be (B, H, W) = {(images.shape[0], *images.shape[-2:])} like the images, "
                         f"got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    targets = torch.as_tensor(targets, device=images.device).long()
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be ({images.shape[0]},) class indices, got {tuple(targets.shape)}")
    return targets


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def class_probabilities(model: torch.nn.Module, images: Tensor, targets: Tensor, chunk_size: int = 16) -> Tensor:
    """Softmax probability ``(N,)`` float64 of ``targets[i]`` on ``images[i]``, ``chunk_size``
    images per forward, without autograd.

    On the CPU the chunks go to the model channels-last (:func:`_cpu_layout`): oneDNN's
    convolutions run faster so (resnet50 1.45x, VGG16 1.3x at 224 on a 2-core EPYC; the
    logits move by float32 rounding, a few eps of their magnitude). A model that cannot take
    that layout (it ``view``-s its input) gets contiguous chunks instead."""
    from mnpo.models.hooked import scores_of
    from mnpo.models.multibranch import MultiBranchOutput

    _check_chunk(chunk_size)
    out = torch.empty(len(images), dtype=torch.float64, device=images.device)
    layout = _cpu_layout(images)
    with torch.inference_mode():
        for start in range(0, len(images), chunk_size):
            chunk = images[start:start + chunk_size]
            if layout is not None:
                try:
                    result = model(chunk.contiguous(memory_format=layout))
                except RuntimeError:  # e.g. "view size is not compatible with input tensor's size and stride"
                    layout = None
            if layout is None:
                result = model(chunk.contiguous())
            scores = result.logits[0] if isinstance(result, MultiBranchOutput) else scores_of(result)
            if targets.max() >= scores.shape[1] or targets.min() < 0:
                bad = targets[(targets < 0) | (targets >= scores.shape[1])]
                raise ValueError(f"targets {bad.tolist()} out of range for {scores.shape[1]} classes")
            probs = scores.double().softmax(1)
            out[start:start + len(probs)] = probs.gather(1, targets[start:start + len(probs), None])[:, 0]
    return out


def _cpu_layout(images: Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` for ``(N, C, H, W)`` images on the CPU, else None (as they are:
    on CUDA the layout is the caller's and cuDNN's choice)."""
    return torch.channels_last if images.device.type == "cpu" and images.ndim == 4 else None


@dataclass(frozen=True)
class ConfidenceChange:
    """Per image ``(B,)``: ``base`` (``Y``) and ``masked`` (``O``) probabilities, ``drop``
    ``max(0, Y - O) / Y`` and ``increase`` ``O > Y``."""

    base: Tensor
    masked: Tensor
    drop: Tensor
    increase: Tensor

    @property
    def average_drop(self) -> float:
        """Average Drop, percent: ``100 mean(drop)``."""
        return 100.0 * float(self.drop.mean())

    @property
    def increase_in_confidence(self) -> float:
        """Increase in Confidence, percent: ``100 mean(increase)``."""
        return 100.0 * float(self.increase.double().mean())


def confidence_change(model: torch.nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                      chunk_size: int = 16) -> ConfidenceChange:
    """Average Drop and Increase in Confidence of ``maps`` (module docstring): 2 forwards per image."""
    targets = _check(images, maps, targets)
    base = class_probabilities(model, images, targets, chunk_size)
    masked = class_probabilities(model, images * maps[:, None].to(images.dtype), targets, chunk_size)
    drop = (base - masked).clamp_min(0) / base
    return ConfidenceChange(base=base, masked=masked, drop=drop, increase=masked > base)


def blur(images: Tensor, taps: int = BLUR_TAPS, sigma: float = BLUR_SIGMA) -> Tensor:
    """Each channel convolved with a normalized ``taps x taps`` Gaussian of ``sigma`` pixels,
    zero padding (RISE's insertion substrate); ``(B, C, H, W)`` in, same out."""
    x = torch.arange(taps, dtype=torch.float64, device=images.device) - (taps - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    weight = kernel.expand(channels, 1, taps, taps).contiguous()
    return F.conv2d(images, weight, padding=taps // 2, groups=channels)


def trapezoid_auc(curves: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Area under ``(B, S + 1)`` curves sampled at ``fractions`` ``(S + 1,)`` (by default
    ``0, 1/S, ..., 1``), trapezoid rule: ``(B,)``."""
    if curves.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got {curves.shape[-1]}")
    if fractions is None:
        return (curves.sum(-1) - (curves[..., 0] + curves[..., -1]) / 2) / (curves.shape[-1] - 1)
    if fractions.shape != curves.shape[-1:]:
        raise ValueError(f"fractions must be ({curves.shape[-1]},), got {tuple(fractions.shape)}")
    return torch.trapezoid(curves, fractions.to(curves.dtype), dim=-1)


@dataclass(frozen=True)
class PerturbationCurves:
    """``curves`` ``(B, S + 1)``: the target's probability after 0 .. ``S`` steps, at
    ``fractions`` ``(S + 1,)`` of the pixels changed; ``auc`` ``(B,)``: their trapezoid areas."""

    mode: str
    fractions: Tensor
    curves: Tensor
    auc: Tensor


def pixel_order(maps: Tensor) -> Tensor:
    """``(B, H W)`` pixel indices, highest map value first, ties in raster order (stable)."""
    return torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices


def perturbation_counts(pixels: int, steps: int) -> list[int]:
    """Pixels changed after each step: ``min(s n, pixels)`` for ``s = 0 .. ceil(pixels / n)``,
    ``n = ceil(pixels / steps)`` (at most ``steps + 1`` points; fewer when ``n`` rounds up)."""
    per_step = math.ceil(pixels / steps)
    return [min(s * per_step, pixels) for s in range(math.ceil(pixels / per_step) + 1)]


def deletion_insertion(model: torch.nn.Module, images: Tensor, maps: Tensor, targets: Tensor, mode: str = "deletion",
                       steps: int = 112, baseline: float | Tensor | None = None,
                       chunk_size: int = 16) -> PerturbationCurves:
    """Deletion or Insertion curves (module docstring); one forward per point (``<= steps + 1``).

    Pixels are ranked by the map (:func:`pixel_order`) and changed ``n = ceil(H W / steps)`` at a
    time (:func:`perturbation_counts`), all channels together. deletion: the changed pixels take
    ``baseline`` (a number or ``(B, 3, H, W)`` images; default 0); insertion: the curve starts
    from ``baseline`` (default :func:`blur` of the images, RISE's substrate) and the changed
    pixels take the image's values. The area is taken over the fraction of pixels changed; with
    ``n`` dividing ``H W`` (224 x 224 in 112 steps) that is RISE's uniform grid, and it is
    torchcam 0.5's ``DeletionInsertionMetric`` grid for any size.
    """
    targets = _check(images, maps, targets)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    _check_chunk(chunk_size)
    B, _, H, W = images.shape
    counts = perturbation_counts(H * W, steps)
    rank = torch.empty(B, H * W, dtype=torch.long, device=images.device)
    rank.scatter_(1, pixel_order(maps), torch.arange(H * W, device=images.device).expand(B, -1))
    rank = rank.view(B, 1, H, W)  # pixel p is changed once more than rank[p] pixels are
    if baseline is None:
        substrate = torch.zeros_like(images) if mode == "deletion" else blur(images)
    else:
        substrate = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
        if substrate.ndim and substrate.shape != images.shape:
            raise ValueError(f"baseline must be a number or images {tuple(images.shape)}, got {tuple(substrate.shape)}")
        substrate = substrate.expand_as(images)
    start, end = (images, substrate) if mode == "deletion" else (substrate, images)
    points = torch.tensor(counts, device=images.device)
    curves = torch.empty(B, len(counts), dtype=torch.float64, device=images.device)
    pairs = torch.cartesian_prod(torch.arange(B, device=images.device), torch.arange(len(counts), device=images.device))
    with torch.inference_mode():
        for first in range(0, len(pairs), chunk_size):
            b, s = pairs[first:first + chunk_size].unbind(1)
            changed = rank[b] < points[s].view(-1, 1, 1, 1)
            batch = torch.where(changed, end[b], start[b])
            curves[b, s] = class_probabilities(model, batch, targets[b], chunk_size)
    fractions = points.double() / (H * W)
    return PerturbationCurves(mode=mode, fractions=fractions, curves=curves, auc=trapezoid_auc(curves, fractions))


def random_maps(shape: tuple[int, int, int], seed: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """The random baseline: ``(B, H, W)`` float32 maps of independent uniform [0, 1) values from a
    generator seeded with ``seed`` (the same maps on every run and device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=generator).to(device)


def center_maps(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """The center baseline: ``(B, H, W)`` float32 maps falling linearly from 1 at the image's
    center to 0 at its corners (Euclidean distance in pixels, measured between pixel centers)."""
    B, H, W = shape
    y = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    distance = torch.sqrt(y[:, None] ** 2 + x[None] ** 2)
    corner = distance.max()
    single = 1 - distance / corner if corner > 0 else torch.ones_like(distance)
    return single.float().expand(B, H, W).to(device)


@dataclass(frozen=True)
class PointingGame:
    """Per image ``(B,)``: ``hit`` (the map's maximum lies on the object) and ``energy`` (the
    share of the map's mass on the object)."""

    hit: Tensor
    energy: Tensor


def boxes_to_regions(boxes: list, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """``(B, H, W)`` bool: the union of each image's boxes, ``boxes[i]`` ``(k, 4)`` inclusive
    ``(x0, y0, x1, y1)`` pixels of the map's frame (the metrics' box convention), clipped to it."""
    regions = torch.zeros(len(boxes), height, width, dtype=torch.bool, device=device)
    for i, image_boxes in enumerate(boxes):
        for box in torch.as_tensor(image_boxes, dtype=torch.long).reshape(-1, 4).tolist():
            x0, y0, x1, y1 = box
            if x1 < x0 or y1 < y0:
                raise ValueError(f"image {i}: box {box} has x1 < x0 or y1 < y0")
            regions[i, max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return regions


def pointing_game(maps: Tensor, regions: Tensor) -> PointingGame:
    """The pointing game (Zhang et al., ECCV 2016, without its tolerance) and its energy-based
    variant (Wang et al., Score-CAM, 2020) of ``maps`` ``(B, H, W)`` on object ``regions``
    ``(B, H, W)`` bool (:func:`boxes_to_regions`, or a mask). The maximum is the first maximal
    pixel in raster order; a map of zeros points nowhere (no hit) and has energy 0."""
    if maps.ndim != 3 or regions.shape != maps.shape:
        raise ValueError(f"maps (B, H, W) and regions of the same shape needed, got {tuple(maps.shape)} "
                         f"and {tuple(regions.shape)}")
    if not torch.isfinite(maps).all() or (maps < 0).any():
        raise ValueError("maps must be finite and non-negative")
    flat, inside = maps.flatten(1).double(), regions.flatten(1).bool()
    peak = flat.argmax(1)  # the first maximum
    hit = inside.gather(1, peak[:, None])[:, 0] & (flat.amax(1) > 0)
    total = flat.sum(1)
    energy = torch.where(total > 0, (flat * inside).sum(1) / total.clamp_min(torch.finfo(torch.float64).tiny),
                         torch.zeros_like(total))
    return PointingGame(hit=hit, energy=energy)


#: ROAD's noisy linear imputation: each removed pixel is the weighted mean of its 8 neighbours,
#: ``(row offset, column offset), weight`` (Rong et al., ICML 2022; pytorch-grad-cam's values).
ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                   ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def linear_impute(image: Tensor, keep: Tensor) -> Tensor:
    """ROAD's linear imputation of ``image`` ``(C, H, W)`` where ``keep`` ``(H, W)`` is False.

    The removed pixels ``x`` solve, for each removed pixel ``i`` and channel,
    ``s_i x_i = sum_j w_j x_j`` over its in-image neighbours ``j`` (:data:`ROAD_NEIGHBOURS`,
    ``s_i`` their weights' sum), kept neighbours entering with their values: one sparse
    linear system per image, solved once for every channel (SuperLU, float64). The result has
    the image's dtype; kept pixels are unchanged. Where no pixel is kept (a constant map, or a
    map whose zeros reach the percentile, removes them all) the system has every constant as a
    solution and no value to pin it: the image becomes its least-norm solution, zeros (the
    normalization's mean), as pytorch-grad-cam's imputer returns.
    """
    import numpy as np
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    C, H, W = image.shape
    if keep.shape != (H, W):
        raise ValueError(f"keep must be (H, W) = {(H, W)}, got {tuple(keep.shape)}")
    kept = keep.detach().cpu().numpy().astype(bool).ravel()
    removed = np.flatnonzero(~kept)
    out = image.detach().clone()
    if removed.size == 0:
        return out
    if kept.sum() == 0:
        return torch.zeros_like(out)
    values = image.detach().cpu().double().numpy().reshape(C, -1)
    variable = np.full(H * W, -1)
    variable[removed] = np.arange(removed.size)
    rows_y, rows_x = np.divmod(removed, W)
    rhs = np.zeros((removed.size, C))
    diagonal = np.zeros(removed.size)
    entries_i, entries_j, entries_w = [], [], []
    for (dy, dx), weight in ROAD_NEIGHBOURS:
        y, x = rows_y + dy, rows_x + dx
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        diagonal[inside] += weight
        neighbour = np.where(inside, y * W + x, 0)
        known = inside & kept[neighbour]
        rhs[known] += weight * values[:, neighbour[known]].T
        unknown = inside & ~kept[neighbour]
        entries_i.append(np.flatnonzero(unknown))
        entries_j.append(variable[neighbour[unknown]])
        entries_w.append(np.full(int(unknown.sum()), -weight))
    n = removed.size
    matrix = csc_matrix((np.concatenate([diagonal, *entries_w]),
                         (np.concatenate([np.arange(n), *entries_i]), np.concatenate([np.arange(n), *entries_j]))),
                        shape=(n, n))
    solution = splu(matrix).solve(rhs)  # (n, C)
    flat = out.view(C, -1)
    flat[:, torch.as_tensor(removed, device=image.device)] = torch.as_tensor(solution.T, dtype=image.dtype,
                                                                              device=image.device)
    return out


@dataclass(frozen=True)
class RoadScores:
    """ROAD (Rong et al., ICML 2022) as pytorch-grad-cam defines it, per image and percentile
    ``(B, P)``: the target's probability after imputation minus before, for MoRF (the pixels at
    or above the map's ``p``-th percentile removed) and LeRF (those at or above the ``p``-th
    percentile of ``1 - map``: the least relevant ``100 - p`` percent). ``combined`` ``(B,)``:
    ``(mean_p lerf - mean_p morf) / 2`` (higher is better)."""

    percentiles: tuple[int, ...]
    morf: Tensor
    lerf: Tensor

    @property
    def combined(self) -> Tensor:
        return (self.lerf.mean(1) - self.morf.mean(1)) / 2


def road(model: torch.nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
         percentiles: tuple[int, ...] = ROAD_PERCENTILES, noise: float = 0.01, seed: int | Sequence[int] = 0,
         chunk_size: int = 16, workers: int | None = None) -> RoadScores:
    """ROAD MoRF, LeRF and combined (:class:`RoadScores`); ``1 + 2 P`` forwards and ``2 P``
    sparse solves per image. ``noise``: the imputation's Gaussian noise (absolute, on the model's
    input scale), drawn from a generator seeded with ``seed`` so that a run repeats; a sequence
    of ``B`` seeds gives each image its own generator (the noise then depends on the image alone,
    not on its batch). The solves (on the CPU, 0.02 to 0.4 s each at 224 x 224) run in
    ``workers`` threads (default ``torch.get_num_threads()``; SuperLU releases the GIL); the
    result does not depend on their number."""
    targets = _check(images, maps, targets)
    percentiles = tuple(percentiles)
    if not percentiles or any(isinstance(p, bool) or not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must be numbers in [0, 100], got {percentiles!r}")
    B, P = len(images), len(percentiles)
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if not isinstance(seed, int) and len(seeds) != B:
        raise ValueError(f"seed must be an int or {B} ints (one per image), got {len(seeds)}")
    workers = torch.get_num_threads() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    base = class_probabilities(model, images, targets, chunk_size)
    quantiles = torch.tensor(percentiles, dtype=torch.float64) / 100
    jobs = []  # (image, kept pixels) in the order the noise is drawn: order, image, percentile
    for order in ("morf", "lerf"):
        for i in range(B):
            relevance = (maps[i] if order == "morf" else 1 - maps[i]).double()
            for threshold in torch.quantile(relevance.flatten(), quantiles.to(relevance.device)):
                jobs.append((i, relevance < threshold))
    if workers == 1 or len(jobs) == 1:
        filled = [linear_impute(images[i], keep) for i, keep in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            filled = list(pool.map(lambda job: linear_impute(images[job[0]], job[1]), jobs))
    imputed = []
    for (i, keep), image in zip(jobs, filled):
        generator = generators[i if len(generators) > 1 else 0]
        draw = torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
        imputed.append(image + noise * draw * ~keep)
    scores = class_probabilities(model, torch.stack(imputed), targets.repeat_interleave(P).repeat(2), chunk_size)
    scores = scores.view(2, B, P) - base.view(1, B, 1)
    return RoadScores(percentiles=percentiles, morf=scores[0], lerf=scores[1])
