"""WSOL training methods (wsolevaluation's HaS, CutMix, ADL, ACoL and SPG; spec
``wsol-methods.md`` section 2) and the few-shot fully supervised baseline. HaS, CutMix and ADL
train a plain network (any layout) and change training only; ACoL and SPG train their own
networks (``mnpo.models.acol``, ``mnpo.models.spg``). At test time every network's maps are
computed as for any other (``compute_maps``).

``plain``
    the sum over the branches of ``CE(logits, y)`` (CAM, MNPO).
``has`` (Hide-and-Seek)
    each training image is cut into square cells of ``has_grid_size`` pixels (the last row and
    column truncated) and each cell is zeroed on all channels, in normalized space (the ImageNet
    mean colour), with probability ``has_drop_rate``: :class:`HideAndSeek`, applied after the
    training transform, so its draws come from the image's own seeded generator (resume and
    data-parallel runs see the same hidden cells).
``cutmix``
    per batch, with probability ``cutmix_prob``: ``lam ~ Beta(beta, beta)``, one box of sides
    ``int(S sqrt(1 - lam))`` around a uniform centre (clipped), pasted into every image from its
    partner in a permutation of the batch; ``lam`` becomes the unpasted fraction and the loss
    ``lam CE(y) + (1 - lam) CE(y_partner)`` per branch (:func:`cutmix_batch`). The draws come
    from a generator seeded by ``(seed, epoch, step)``; under data parallelism every rank uses the
    same ``lam`` and box and permutes within its own share of the batch (wsolevaluation permutes
    the whole batch, on one GPU).
``adl`` (Attention-based Dropout Layers, spec 2.4)
    parameter-free layers after three modules of the network (:data:`ADL_POSITIONS`), active in
    training only: each multiplies its input by the sigmoid of its channel mean (importance
    map) or, with probability ``adl_drop_rate``, by a mask that drops the pixels whose channel
    mean reaches ``adl_threshold`` times the image's maximum; one draw per layer per batch, from
    a generator seeded by ``(seed, epoch, step)``. They are attached to the modules' outputs by
    :func:`attach_adl` for the training loop only: the network, its checkpoint and its maps are
    those of the plain layout (in eval mode ADL is the identity).
``acol`` (adversarial complementary learning, spec 2.2)
    the ``<backbone>-acol`` network, called with the labels (they steer the erasing):
    ``CE(A) + CE(B)``, the sum over its two branches. ``acol_threshold`` is stored in the
    network's layout, as it erases at test time too.
``spg`` (self-produced guidance, spec 2.3)
    the ``<backbone>-spg`` network: ``CE(logits, y)`` plus three BCE terms of its side outputs
    against ternary masks (:func:`spg_loss`, :func:`spg_mask`), thresholds ``spg_thresholds``.
``bas`` (background activation suppression, Wu et al., CVPR 2022)
    the ``<backbone>-bas`` network (:mod:`mnpo.models.bas`), called with the labels (the
    label's generator map drives the background branch): :func:`bas_loss`, with ``bas_beta``
    and ``bas_lambda_fg`` (default: the authors' values for ``bas_weights``, ``cub`` or
    ``ilsvrc``, and the backbone: :data:`BAS_WEIGHTS`).
``bgc`` (bridging the gap between classification and localization, Kim et al., CVPR 2022)
    the ``<backbone>-bgc`` network (:mod:`mnpo.models.bgc`), called with the labels (its
    erased pass runs then): :func:`bgc_loss`; its similarity and norm terms join after
    ``bgc_warmup_epochs``; AttentiveDrop's draws come from a generator seeded by
    ``(seed, epoch, step)``.
``tscam`` (TS-CAM, Gao et al., ICCV 2021)
    the ``deit_*-tscam`` network (:mod:`mnpo.models.tscam`): ``CE`` of its logits, GAP of the
    conv head's semantic maps (as ``plain``).
``scm`` (spatial calibration module, Bai et al., ECCV 2022)
    a ``deit_*-tscam`` network trained through :class:`mnpo.models.scm.SpatialCalibration`, four
    layers of graph diffusion of its attention map over the patch grid that refine its semantic
    maps: ``CE`` of their GAP. The layers (eight scalars) live in ``last.pt``'s training state
    only; the network saved, evaluated and exported is TS-CAM's.
``sat`` (spatial-aware token, Wu et al., ICCV 2023)
    the ``deit_*-sat`` network (:mod:`mnpo.models.sat`): :func:`sat_loss`, ``CE`` plus the
    area term (``sat_area``: 0.25 on CUB, 0.35 on ImageNet) and the smoothness term of its map.
``fsl`` (few-shot fully supervised learning, the baseline of wsolevaluation's paper)
    trained on the *val* split's boxes or masks instead of the train split's labels: the
    network is built with one output, and its classifier row ``w`` acts as a per-pixel
    foreground head on the main branch's features (a 1x1 convolution; GAP and a 1x1
    convolution commute). Loss: per-pixel BCE between ``w . F + b``, upsampled bilinearly to
    the input, and the foreground target (boxes filled, or the mask; ignored pixels left out):
    :func:`foreground_loss`. ``fsl_holdout_per_class`` images per class of val are held out to
    choose the epoch (``eval.metric``) and the threshold; the trainer writes them as the split
    folder ``fsl-holdout/`` in the run folder, the ``--val-metadata`` of the calibrated test
    evaluation. Its map is the ``cam`` method's with target 0: ``w . F``, the foreground logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mnpo.models.sat import sat_kernel

__all__ = ["ADL_POSITIONS", "TRAINING_METHODS", "CutMix", "HideAndSeek", "adl", "attach_adl", "cutmix_batch", "draw_cutmix", "foreground_loss",
           "foreground_logits", "mixed_loss", "spg_loss", "spg_mask", "bas_loss", "BAS_WEIGHTS", "bgc_loss", "BGC_WEIGHTS",
           "BgcWeights", "class_similarity", "SAT_AREAS", "sat_kernel", "sat_loss"]

TRAINING_METHODS = ("plain", "has", "cutmix", "adl", "acol", "spg", "bas", "bgc", "tscam", "sat", "scm", "fsl")
#: SAT's area targets (the authors' ``--area_thr``): CUB's default, their ImageNet value
SAT_AREAS = {"cub": 0.25, "ilsvrc": 0.35}
#: SPG's fallback: an image with fewer foreground pixels than this (at the mask's resolution,
#: 224 x 224 in wsolevaluation) takes ``SPG_FALLBACK_FRACTION`` of its map's maximum instead.
SPG_MIN_FOREGROUND = 30
SPG_FALLBACK_FRACTION = 0.7
IGNORE = 255
#: Where ADL acts, as module names of a ``MultiBranchNet`` (wsolevaluation's positions, spec 1.1-1.3):
#: VGG16 after the third pool, after conv4_3 and after conv5_3; ResNet50 after layer3's first
#: block, layer4's first block and layer4's last; InceptionV3 after Mixed_5d, after Mixed_6e and
#: after the head's second conv (``SPG_A3_2b``).
ADL_POSITIONS = {
    "vgg16": ("backbone.features.16", "backbone.features.22", "backbone.features.29"),
    "resnet50": ("backbone.layer3.0", "backbone.layer4.0", "backbone.layer4.2"),
    "inception_v3": ("backbone.Mixed_5d", "backbone.Mixed_6e", "branches.main.SPG_A3_2b"),
}


class HideAndSeek:
    """Zero random square cells of a normalized image: ``(C, H, W) -> (C, H, W)``.

    Cells are ``grid`` pixels wide (the last row / column of cells truncated at the border);
    each is hidden with probability ``drop_rate`` (a uniform draw ``<= drop_rate``, one per cell,
    row-major, from torch's global generator or ``generator``). ``grid=0`` hides nothing.
    """

    def __init__(self, grid: int, drop_rate: float) -> None:
        if grid < 0:
            raise ValueError(f"has_grid_size must be >= 0 (0: off), got {grid}")
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"has_drop_rate must be in [0, 1], got {drop_rate}")
        self.grid, self.drop_rate = int(grid), float(drop_rate)

    def hidden_cells(self, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """bool (ceil(H / grid), ceil(W / grid)): which cells are hidden."""
        rows, cols = math.ceil(height / self.grid), math.ceil(width / self.grid)
        return torch.rand(rows, cols, generator=generator) <= self.drop_rate

    def hide(self, images: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Zero the ``cells`` (bool ``(..., rows, cols)``, from :meth:`hidden_cells`) of normalized
        ``images`` ``(..., C, H, W)``: one image or a batch (the trainer draws the cells with each
        image in the loader and hides them on the device, after normalization)."""
        if self.grid == 0:
            return images
        height, width = images.shape[-2:]
        pixels = cells.repeat_interleave(self.grid, -2).repeat_interleave(self.grid, -1)[..., :height, :width]
        return images.masked_fill(pixels.to(images.device).unsqueeze(-3), 0.0)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.grid == 0:
            return image
        return self.hide(image, self.hidden_cells(*image.shape[-2:], generator))

    def __repr__(self) -> str:
        return f"HideAndSeek(grid={self.grid}, drop_rate={self.drop_rate})"


@dataclass(frozen=True)
class CutMix:
    """One batch's CutMix draw: the box ``(x0, y0, x1, y1)`` (pixels, end exclusive), the
    partner of each image (a permutation) and ``lam``, the weight of the image's own label
    (1 - box area / image area). ``box`` is None when the batch is left unmixed (``lam`` 1)."""

    box: tuple[int, int, int, int] | None
    partner: torch.Tensor
    lam: float


def draw_cutmix(batch: int, height: int, width: int, beta: float, prob: float,
                rng: np.random.Generator) -> CutMix:
    """Draw a batch's CutMix (spec 2.5): apply when ``prob > u`` (u uniform) and ``beta > 0``."""
    if rng.random() >= prob or beta <= 0:
        return CutMix(None, torch.arange(batch), 1.0)
    lam = rng.beta(beta, beta)
    partner = torch.from_numpy(rng.permutation(batch))
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(width * cut), int(height * cut)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    area = (x1 - x0) * (y1 - y0)
    return CutMix((int(x0), int(y0), int(x1), int(y1)), partner, 1.0 - area / (width * height))


def cutmix_batch(images: torch.Tensor, labels: torch.Tensor, beta: float, prob: float,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``images`` (B, C, H, W) with the box pasted from each partner (a new tensor), the
    partners' labels (B,) and ``lam``."""
    mix = draw_cutmix(len(images), images.shape[-2], images.shape[-1], beta, prob, rng)
    partner = mix.partner.to(labels.device)
    if mix.box is None:
        return images, labels[partner], 1.0
    x0, y0, x1, y1 = mix.box
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[partner.to(images.device), :, y0:y1, x0:x1]
    return mixed, labels[partner], mix.lam


def mixed_loss(logits: tuple[torch.Tensor, ...], labels: torch.Tensor, partner_labels: torch.Tensor,
               lam: float) -> torch.Tensor:
    """``sum_i lam CE(logits_i, y) + (1 - lam) CE(logits_i, y_partner)`` over the branches."""
    return sum(lam * F.cross_entropy(l.float(), labels) + (1 - lam) * F.cross_entropy(l.float(), partner_labels)
               for l in logits)


def foreground_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel foreground logits ``(B, H, W)``: ``w . F + b`` at the features' resolution
    ``(B, C, h, w)``, upsampled bilinearly (corners not aligned) to ``size``. ``weight`` (1, C)."""
    logits = F.conv2d(features, weight[:, :, None, None].to(features.dtype), bias.to(features.dtype))
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]


def check_foreground_targets(target: torch.Tensor, image_ids) -> None:
    """Refuse a batch whose every pixel is ignored (255): there is nothing to learn from it.
    Called on the loader's (host) targets, so that the check costs the device no sync."""
    if not (target != 255).any():
        raise ValueError(f"every pixel of the batch is ignored: no foreground target to learn "
                         f"(images {', '.join(map(str, image_ids))})")


def foreground_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE over the pixels that are not ignored (target 255), and the fraction of them
    classified right (logit > 0 on the foreground, <= 0 on the background), both 0-dim tensors
    on the logits' device: masked sums, no host sync. A batch with every pixel ignored gives
    NaN (:func:`check_foreground_targets` refuses it beforehand).

    logits: float (B, H, W); target: uint8 (B, H, W) of 1 / 0 / 255.
    """
    valid = (target != 255).float()
    foreground = (target == 1).float()
    x = logits.float()
    count = valid.sum()
    loss = (F.binary_cross_entropy_with_logits(x, foreground, reduction="none") * valid).sum() / count
    right = ((x > 0).float() == foreground).float() * valid
    return loss, right.sum() / count


def adl(x: torch.Tensor, drop_rate: float, threshold: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One ADL layer in training mode: ``x`` (B, C, H, W) times the importance map
    ``sigmoid(mean_c x)`` or, when a uniform draw is below ``drop_rate``, times the drop mask
    ``mean_c x < threshold * max_hw(mean_c x)`` (per image). One draw for the whole batch."""
    attention = x.mean(1, keepdim=True)
    if float(torch.rand((), generator=generator)) < drop_rate:
        peak = attention.amax(dim=(2, 3), keepdim=True)
        return x * (attention < threshold * peak).to(x.dtype)
    return x * torch.sigmoid(attention)


def attach_adl(model: torch.nn.Module, drop_rate: float, threshold: float,
               generator: torch.Generator | None = None) -> list:
    """ADL after each of ``ADL_POSITIONS[model.layout.backbone]`` (forward hooks that act only
    while the module is in training mode). Returns the hook handles (``.remove()`` detaches)."""
    if not 0 <= drop_rate <= 1 or not 0 <= threshold <= 1:
        raise ValueError(f"adl_drop_rate and adl_threshold must be in [0, 1], got {drop_rate}, {threshold}")
    names = ADL_POSITIONS.get(model.layout.backbone)
    if names is None:
        raise ValueError(f"no ADL positions for backbone {model.layout.backbone!r}")
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layout has no module {name!r} for ADL (the {model.layout.backbone} positions "
                             f"are {names})") from None

        def hook(module, inputs, output):
            return adl(output, drop_rate, threshold, generator) if module.training else output

        handles.append(module.register_forward_hook(hook))
    return handles


def spg_mask(attention: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """SPG's ternary mask of ``attention`` ``(B, H, W)``: uint8 ``(B, H, W)``, 1 where the map is
    above ``high`` (or, for an image with fewer than ``SPG_MIN_FOREGROUND`` such pixels, above
    ``SPG_FALLBACK_FRACTION`` of its maximum), then 0 where it is below ``low`` (over a 1), and
    ``IGNORE`` elsewhere. NaN passes no comparison (a NaN map is all ignored)."""
    foreground = attention > high
    few = foreground.flatten(1).sum(1) < SPG_MIN_FOREGROUND
    if few.any():
        peak = attention.flatten(1).amax(1)[:, None, None]
        foreground = torch.where(few[:, None, None], attention > SPG_FALLBACK_FRACTION * peak, foreground)
    mask = torch.full(attention.shape, IGNORE, dtype=torch.uint8, device=attention.device)
    mask[foreground] = 1
    mask[attention < low] = 0
    return mask


def _side_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the pixels of the batch that the mask does not ignore; 0 when it
    ignores all (wsolevaluation's mean over none is NaN, which would stop training)."""
    valid = mask != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], mask[valid].to(logits.dtype))


def spg_loss(logits: torch.Tensor, features: dict[str, torch.Tensor], labels: torch.Tensor,
             classifier: torch.nn.Linear, thresholds: tuple[float, ...] | list[float],
             size: tuple[int, int]) -> torch.Tensor:
    """SPG's training loss (spec 2.3), in float32 (float64 for float64 inputs) at the input size ``size``:

    ``CE(logits, y) + L(B2, mask(attention, 1h, 1l)) + L(B1, mask(sigmoid(B2), 2h, 2l))
    + L(C, mask((sigmoid(B1) + sigmoid(B2)) / 2, 3h, 3l))``, where every side logit map
    (``features["spg_b1"]`` ...) is upsampled bilinearly (corners not aligned) to ``size``,
    ``attention`` is the class map of ``y`` (``classifier`` on ``features["main"]``, bias
    included) upsampled the same way and min-max normalized per image, and ``L`` is
    :func:`_side_loss`. The masks carry no gradient.
    """
    h1, l1, h2, l2, h3, l3 = thresholds

    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t.to(dtype), size=size, mode="bilinear", align_corners=False)[:, 0]

    b1, b2, c = (up(features[k]) for k in ("spg_b1", "spg_b2", "spg_c"))
    with torch.no_grad():
        head = features["main"].detach().to(dtype)
        weight, bias = classifier.weight[labels].to(dtype), classifier.bias[labels].to(dtype)
        class_map = torch.einsum("bc,bchw->bhw", weight, head) + bias[:, None, None]
        attention = up(class_map[:, None])
        flat = attention.flatten(1)
        low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        attention = (attention - low) / (high - low)
        b1_prob, b2_prob = torch.sigmoid(b1), torch.sigmoid(b2)
        masks = (spg_mask(attention, h1, l1), spg_mask(b2_prob, h2, l2), spg_mask((b1_prob + b2_prob) / 2, h3, l3))
    return (F.cross_entropy(logits.to(dtype), labels) + _side_loss(b2, masks[0]) + _side_loss(b1, masks[1])
            + _side_loss(c, masks[2]))


#: BAS's (beta, lambda_fg) per data set and backbone (the authors' ``train.py`` / ``bas_loss``;
#: OpenImages has no BAS recipe: ILSVRC's, ours)
BAS_WEIGHTS = {
    "cub": {"vgg16": (0.7, 0.0), "resnet50": (1.2, 0.5), "inception_v3": (1.0, 0.5)},
    "ilsvrc": {"vgg16": (1.0, 0.05), "resnet50": (2.0, 1.0), "inception_v3": (2.5, 1.0)},
}
BAS_DATASETS = tuple(BAS_WEIGHTS)
#: BAS's guard of the background / foreground score ratio (``x_sum + 1e-8``)
BAS_EPS = 1e-8


def bas_loss(logits: torch.Tensor, features: dict[str, torch.Tensor], labels: torch.Tensor,
             beta: float, lambda_fg: float) -> torch.Tensor:
    """BAS's training loss, in float32 (float64 for float64 inputs):

    ``CE(score1, y) + lambda_fg CE(score2, y) + mean_b r_b + beta mean_b mean(S_b)``, where
    ``score1 = logits`` ``(B, K)``, ``score2 = features["bas_score2"]``, ``S_b`` the label's
    generator map ``features["bas_saliency"]`` ``(B, 1, h, w)``, and ``r_b = S_bg / (S_fg + 1e-8)``
    with ``S_bg`` the background branch's score of ``y`` (``features["bas_background"]``) and
    ``S_fg = score1[b, y]`` *detached*; ``r_b = 0`` where ``S_bg >= S_fg``.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = torch.arange(len(labels), device=labels.device)
    foreground = logits[rows, labels].detach().to(dtype)
    background = features["bas_background"][rows, labels].to(dtype)
    ratio = torch.where(background >= foreground, torch.zeros_like(background),
                        background / (foreground + BAS_EPS))
    area = features["bas_saliency"].to(dtype).flatten(1).mean(1)
    classification = F.cross_entropy(logits.to(dtype), labels)
    if lambda_fg:
        classification = classification + lambda_fg * F.cross_entropy(features["bas_score2"].to(dtype), labels)
    return classification + ratio.mean() + beta * area.mean()


#: BGC's loss settings per backbone (the authors' configs/config_exp{,_vgg}.yaml, CUB): lambda_sim,
#: fg_threshold, bg_threshold, lambda_norm, lambda_drop
BGC_WEIGHTS = {"vgg16": (0.5, 0.6, 0.1, 0.15, 3.0), "resnet50": (0.5, 0.4, 0.2, 0.05, 2.0),
               "inception_v3": (0.5, 0.4, 0.2, 0.05, 2.0)}  # InceptionV3: ours (ResNet50's)
#: which similarity picks the norm loss's fore- and background: ``cub`` the maximum over the
#: classes, ``ilsvrc`` the label's (the authors' ``_get_loss_alignment`` branches so)
BGC_DATASETS = ("cub", "ilsvrc")
#: the authors' guard of the masked means and of the norm's min-max
BGC_EPS = 1e-15


@dataclass(frozen=True)
class BgcWeights:
    """BGC's loss settings (:data:`BGC_WEIGHTS`)."""

    lambda_sim: float
    fg_threshold: float
    bg_threshold: float
    lambda_norm: float
    lambda_drop: float


def class_similarity(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pixel's feature with each class's classifier row, both
    L2-normalized: ``(B, C, h, w)``, ``(K, C)`` -> ``(B, K, h, w)``."""
    return torch.einsum("bchw,kc->bkhw", F.normalize(features, dim=1), F.normalize(weight, dim=1))


def bgc_loss(logits: torch.Tensor, features: dict[str, torch.Tensor], labels: torch.Tensor, weight: torch.Tensor,
             weights: BgcWeights, dataset: str = "cub", warm: bool = False) -> torch.Tensor:
    """BGC's training loss, in float32 (float64 for float64 inputs):

    ``CE + lambda_drop L1(F, F_erased)`` and, after the warm-up (``warm`` False),
    ``+ lambda_sim L_sim + lambda_norm L_norm``: with ``sim = class_similarity(F, weight)``,
    ``n`` the per-pixel L2 norm of ``F`` min-max normalized per image (``(n - min) / (max - min +
    1e-15)``) and ``mean(v | m) = sum(m v) / (sum(m) + 1e-15)`` per image,
    ``L_sim = mean_b[mean(sim_y | n < bg) - mean(sim_y | n > fg)]`` and
    ``L_norm = mean_b[mean(n | s < 0) - mean(n | s > 0)]``, ``s = max_k sim_k`` (``cub``) or
    ``sim_y`` (``ilsvrc``). ``F = features["main"]``, ``F_erased = features["bgc_erased"]``.
    """
    if dataset not in BGC_DATASETS:
        raise ValueError(f"BGC data set {dataset!r}: choose one of {BGC_DATASETS}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    head, erased = features["main"].to(dtype), features["bgc_erased"].to(dtype)
    loss = F.cross_entropy(logits.to(dtype), labels) + weights.lambda_drop * F.l1_loss(head, erased)
    if warm:
        return loss
    batch = len(labels)
    sim = class_similarity(head, weight.to(dtype))
    sim_y = sim[torch.arange(batch, device=labels.device), labels].flatten(1)
    norm = head.norm(dim=1).flatten(1)
    low = norm.amin(1, keepdim=True)
    norm = (norm - low) / ((norm - low).amax(1, keepdim=True) + BGC_EPS)

    def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(values.dtype)
        return (mask * values).sum(1) / (mask.sum(1) + BGC_EPS)

    loss_sim = (masked_mean(sim_y, norm < weights.bg_threshold) - masked_mean(sim_y, norm > weights.fg_threshold)).mean()
    picker = sim.amax(1).flatten(1) if dataset == "cub" else sim_y
    loss_norm = (masked_mean(norm, picker < 0) - masked_mean(norm, picker > 0)).mean()
    return loss + weights.lambda_sim * loss_sim + weights.lambda_norm * loss_norm


def sat_loss(logits: torch.Tensor, sat_map: torch.Tensor, labels: torch.Tensor, area: float) -> torch.Tensor:
    """SAT's loss: ``CE(logits, y) + |mean(M) - area| + mean((1 - M') M')``, ``M`` the map
    ``(B, 1, h, w)`` in (0, 1), its mean over the batch and the pixels; ``M'`` = ``M`` convolved
    with :func:`sat_kernel` (zero padding, as the authors' ``F.conv2d(..., padding=1)``).
    In float32 (the map's terms too, under autocast)."""
    m = sat_map.float()
    kernel = sat_kernel().to(m)[None, None]
    smooth = F.conv2d(m, kernel, padding=1)
    return F.cross_entropy(logits.float(), labels) + (m.mean() - area).abs() + ((1 - smooth) * smooth).mean()
