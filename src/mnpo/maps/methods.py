"""Localization maps for every method through one call: ``compute_maps``.

=========  ===================================================  ==========================
method     map (spec section)                                   passes per batch
=========  ===================================================  ==========================
cam        ``mean_c(w_y * F_head)`` (plain CAM, main branch)      1 forward
mnpo       per branch ``mean_c(H(w_y) * F_i)``, resize, fuse (4)  1 forward
mnpos      gradient post-processing at a target layer (5)       1 forward + 2 backward (*)
dgl        section 5 with the main branch only, H off            1 forward + 2 backward
center     a centred Gaussian, the same for every image          1 forward (for the logits)
=========  ===================================================  ==========================

``center`` is wsolevaluation's center baseline: a map that ignores the image (see
:func:`center_map`); the network only gives the logits.

On the networks of ACoL and SPG (``mnpo.models.acol``, ``mnpo.models.spg``) every method
applies, with these meanings. ``cam`` is the method's own test map (spec 2.2, 2.3): for ACoL the
element-wise max of branches A's and B's normalized class maps, for SPG the class map. ``mnpo``
applies ``H`` to each branch's own classifier row and fuses the branches (ACoL: A and B; SPG:
its one class branch, as its side branches make no class maps). The gradient methods and the
CAM family use the main branch (ACoL's A; ``mnpos`` adds B's logits). ACoL's forward erases by
the class ``targets`` names (the predicted one without targets), as wsolevaluation's test map
does; passes on other inputs (Score-CAM's masked copies) erase by their own prediction. Ablation-CAM works at ``head`` only (the networks take no ``replace``).

(*) under bf16/fp16 autocast: 1 forward + 1 batched backward of 2 products per branch.

The post-hoc CAM family (``gradcam``, ``gradcampp``, ``xgradcam``, ``layercam``,
``hirescam``, ``scorecam``, ``ablationcam``, ``eigencam``) is in ``cam_family``.

Every backward is a vector-Jacobian product truncated at the target tensor
(``torch.autograd.grad``, no parameter gradients, no hooks); the part of the network before
the target runs without autograd (``MultiBranchNet.forward(grad_from=...)``). Methods without
gradients run under ``torch.inference_mode``. Maps are computed in float32 whatever the
autocast dtype of the network (float64 for a float64 network), resized to the input size and min-max normalized per image.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from mnpo.maps import cam_family
from mnpo.maps.passes import acc, full_precision, predicted, selector, vjp
from mnpo.maps.postprocess import (
    FUSIONS,
    H_MODES,
    IVR_PERCENTILE,
    NORMALIZATIONS,
    RESIZE_MODES,
    channel_weighted_mean,
    fuse_maps,
    normalize_maps,
    resize_maps,
    weight_postprocess,
)
from mnpo.maps.source import SharedPasses, feature_source
from mnpo.models.map_source import DEFAULT_GRADIENT_LAYER

METHODS = ("cam", "mnpo", "mnpos", "gradcam", "dgl", "gradcampp", "xgradcam", "layercam", "hirescam",
           "scorecam", "ablationcam", "eigencam", "center")
#: Standard deviation of the center baseline's Gaussian, as a fraction of each side.
CENTER_SIGMA = 0.25
LOSS_GRADIENTS = ("released", "exact")
__all__ = ["DEFAULT_GRADIENT_LAYER", "DEFAULT_H", "METHODS", "MapOptions", "center_map", "compute_maps"]
#: Released H factors (``a``, ``b``): MNPO 10/5, MNPOs 8/4; DGL and the rest leave weights as they are.
DEFAULT_H = {"mnpo": (10.0, 5.0), "mnpos": (8.0, 4.0), "dgl": (1.0, 1.0)}


@dataclass(frozen=True)
class MapOptions:
    """Options of ``compute_maps``; ``None`` means the method's released default.

    h_mode: ``scale`` or ``step`` (H, section 3); a, b: its factors.
    target_layer: feature the gradient methods work at: on mnpo's networks a backbone tap such
        as ``conv5_2``, a block ``parallel.c``, a branch name, or ``head``; on any other model
        a dotted module name (``layer4``, ``blocks.11.norm1``), the module itself, or ``head`` /
        ``auto`` (the last spatial or token output the scores depend on).
    fusion: ``max`` or ``mean`` over branches (mnpo). resize: ``bicubic`` or ``bilinear``.
    loss_gradient: ``released`` (``p - t``, what the release's custom loss backpropagates) or
        ``exact`` (``sum(t) p - t``, the true gradient of ``-sum t log p``); ``t = loss_scale * onehot``.
    relu: the CAM family's ReLU of the raw map (``gradcam`` ... ``eigencam``).
    size: output ``(H, W)``; default the input's.
    chunk_size: images per forward pass of ``scorecam``'s masked and ``ablationcam``'s
        ablated copies (bounds their memory); where ablation runs only the network after the
        layer, a pass takes as many copies of the layer's output as hold the elements of
        ``chunk_size`` images (at least ``chunk_size``).
    reshape: any model: how a layer's output becomes ``(B, C, h, w)``: ``auto`` (token sequences
        ``(B, N, C)`` and channels-last ``(B, h, w, C)`` recognized) or a callable.
    classifier: any model: the linear layer after global average pooling that ``cam`` and
        ``mnpo`` read (``auto``: the last ``nn.Linear`` giving the scores), by dotted name.
    normalize: how each map, at its output size, becomes [0, 1] (:func:`normalize_maps`):
        ``minmax`` (wsolevaluation's), ``max``, ``pas`` or ``ivr`` (IVR, ICCV 2021) at
        ``percentile`` (default 0.45, IVR's).
    top_k: ``cam`` on a BAS network (``<backbone>-bas``): the mean of the generator's maps of
        the ``top_k`` classes of highest score instead of the target's (BAS's CUB protocol).
    """

    h_mode: str = "scale"
    a: float | None = None
    b: float | None = None
    target_layer: Any = None
    fusion: str = "max"
    resize: str = "bicubic"
    loss_gradient: str = "released"
    loss_scale: float = 10.0
    relu: bool = True
    size: tuple[int, int] | None = None
    chunk_size: int = 16
    reshape: Any = "auto"
    classifier: str = "auto"
    normalize: str = "minmax"
    percentile: float = IVR_PERCENTILE
    top_k: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("h_mode", self.h_mode, H_MODES), ("fusion", self.fusion, FUSIONS),
                                     ("resize", self.resize, RESIZE_MODES),
                                     ("loss_gradient", self.loss_gradient, LOSS_GRADIENTS),
                                     ("normalize", self.normalize, NORMALIZATIONS)):
            if value not in allowed:
                raise ValueError(f"map option {name}={value!r}: choose one of {allowed}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"map option size={self.size!r}: expected (H, W) of positive ints")
        if not (self.reshape == "auto" or callable(self.reshape)):
            raise ValueError(f"map option reshape={self.reshape!r}: expected 'auto' or a callable")
        if not isinstance(self.classifier, str) or not self.classifier:
            raise ValueError(f"map option classifier={self.classifier!r}: expected 'auto' or a module name")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0 <= self.percentile < 1:
            raise ValueError(f"map option percentile={self.percentile!r}: expected a number in [0, 1)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"map option top_k={self.top_k!r}: expected a positive int (or None)")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"map option chunk_size={self.chunk_size!r}: expected a positive int")

    def h_factors(self, method: str) -> tuple[float, float]:
        a, b = DEFAULT_H.get(method, (1.0, 1.0))
        return (a if self.a is None else self.a, b if self.b is None else self.b)


def compute_maps(model: torch.nn.Module, images: Tensor, targets: Tensor | None = None,
                 method: str = "mnpo", **options: Any) -> tuple[Tensor, Tensor]:
    """Localization maps of ``targets`` for a batch.

    model: one of mnpo's networks, or any classifier (``mnpo.models.hooked``), in eval mode.
    images: ``(B, 3, H, W)``. targets: ``(B,)`` class indices (the ground truth in WSOL
    protocols), or ``(B, T)`` for T classes per image; ``None`` uses the predicted class.
    Returns ``maps`` ``(B, H, W)`` (``(B, T, H, W)`` for ``(B, T)`` targets) in [0, 1] and the
    main branch's ``logits`` ``(B, K)``, both detached, float32 (float64 for a float64 model).
    For several classes the passes on ``images`` run once (not on ACoL, whose forward erases by
    the class) and each gradient method takes one backward per class from the kept graph;
    Score-CAM's and Ablation-CAM's masked passes are run per class.
    """
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose one of {METHODS}")
    known = {f.name for f in fields(MapOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown map option(s) {unknown}; options are {sorted(known)}")
    opts = MapOptions(**options)
    if opts.top_k is not None and (method != "cam" or getattr(getattr(model, "layout", None), "network", None) != "bas"):
        raise ValueError(f"map option top_k={opts.top_k} is BAS's test map (method 'cam' on a <backbone>-bas network), "
                         f"not method {method!r} on {type(model).__name__}")
    if model.training:
        raise ValueError("compute_maps needs the model in eval mode (BatchNorm would mix the batch); call model.eval()")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if opts.size is None:
        opts = replace(opts, size=tuple(images.shape[-2:]))
    if targets is not None:
        targets = torch.as_tensor(targets, device=images.device).long()
        if targets.ndim not in (1, 2) or targets.shape[0] != images.shape[0] or targets.numel() == 0:
            raise ValueError(f"targets must be ({images.shape[0]},) or ({images.shape[0]}, T) class indices, "
                             f"got {tuple(targets.shape)}")
    columns = [None] if targets is None else [targets] if targets.ndim == 1 else list(targets.T)
    # ACoL's forward erases by the class asked for: one source (and forward) per class there
    sources = [feature_source(model, images, column, reshape=opts.reshape, classifier=opts.classifier)
               for column in (columns if _erases_by_class(model) else columns[:1])]
    if targets is not None:
        bad = (targets < 0) | (targets >= sources[0].num_classes)
        if bad.any():
            raise ValueError(f"targets {targets[bad].tolist()} out of range for {sources[0].num_classes} classes")
    if len(columns) > 1 and len(sources) == 1:
        sources = [SharedPasses(sources[0], images)] * len(columns)
    raws = []
    # Gradient methods need autograd even when called under inference_mode or no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        for source, column in zip(sources, columns):
            raw, logits = _METHOD_FUNCTIONS[method](source, images, column, opts)
            if len(raws) == 0:
                first_logits = logits
            raws.append(raw)
    with torch.no_grad(), full_precision(images):
        maps = torch.stack([normalize_maps(acc(raw), opts.normalize, opts.percentile) for raw in raws], dim=1)
    maps = maps[:, 0] if targets is None or targets.ndim == 1 else maps
    logits = first_logits
    return maps, acc(logits.detach())


def _erases_by_class(model) -> bool:
    return getattr(getattr(model, "layout", None), "network", None) == "acol"


def center_map(height: int, width: int, sigma: float = CENTER_SIGMA, dtype=torch.float64) -> Tensor:
    """The center baseline: ``exp(-d^2 / (2 sigma^2))``, ``d`` the distance of each pixel centre
    to the image centre in units of the side (x / W, y / H), ``(H, W)``, maximum at the centre.

    Any strictly decreasing function of ``d`` gives the same box and pixel metrics up to the
    threshold grid's resolution (thresholds sweep the levels of one ordering), so ``sigma``
    only sets which threshold finds which disc.
    """
    y = (torch.arange(height, dtype=dtype) + 0.5) / height - 0.5
    x = (torch.arange(width, dtype=dtype) + 0.5) / width - 0.5
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))


def _center(source, images, targets, opts) -> tuple[Tensor, Tensor]:
    logits = source.logits(images)
    with torch.no_grad(), full_precision(images):
        raw = center_map(*opts.size, dtype=acc(logits).dtype).to(images.device)
        return raw.expand(len(images), *opts.size), logits


def _cam(source, images, targets, opts) -> tuple[Tensor, Tensor]:
    own = source.own_cam(images, targets, top_k=opts.top_k)
    if own is not None:
        raw, logits = own
    else:
        logits, branches = source.branch_features(images)
        targets = predicted(targets, logits)
        _, features, weight = branches[0]
        with torch.no_grad(), full_precision(images):
            raw = channel_weighted_mean(acc(weight[targets]), acc(features))
    with torch.no_grad(), full_precision(images):
        return resize_maps(raw, opts.size, opts.resize), logits


def _mnpo(source, images, targets, opts) -> tuple[Tensor, Tensor]:
    """Spec section 4: ``H(w_y)`` on every branch's features, resize each, fuse, (normalize)."""
    logits, branches = source.branch_features(images)
    targets = predicted(targets, logits)
    a, b = opts.h_factors("mnpo")
    with torch.no_grad(), full_precision(images):
        maps = []
        for _, features, weight in branches:
            weights = weight_postprocess(acc(weight[targets]), opts.h_mode, a, b)
            maps.append(resize_maps(channel_weighted_mean(weights, acc(features)), opts.size, opts.resize))
        return fuse_maps(maps, opts.fusion), logits


def _dual_gradient(source, images, targets, opts, method: str, branches: int | None) -> tuple[Tensor, Tensor]:
    """Spec section 5 (mnpos: every branch; dgl: ``branches=1``, the main one).

    One truncated forward from the target layer ``A``; two vector-Jacobian products at ``A``:
    ``G = sum_i J_i^T e_y`` and ``D = sum_i J_i^T v_i`` with ``v_i = p_i - t`` (released) or
    ``sum(t) p_i - t`` (exact). Then ``alpha = H(sum_hw G)``, ``An = A/||A|| - D/||D||``,
    map ``= mean_c(alpha * An)``. When ``A`` is in reduced precision (autocast) and there are
    several branches, each branch's two products are taken apart instead, in one batched pass
    (``is_grads_batched``), and added in float32: summing inside a bf16 backward would round
    the sum before the convolutions' backward, a 1.5e-3 change of the normalized map.
    On a one-branch network (any classifier) ``mnpos`` is ``dgl`` with MNPOs' H factors.
    """
    layer = opts.target_layer or source.default_gradient_layer
    run = source.tracked(images, layer)
    A = run.leaf
    logits = run.logits[:branches]
    targets = predicted(targets, logits[0].detach())
    picks = selector(logits[0], targets)  # e_y per image
    onehot = acc(torch.zeros_like(logits[0])).scatter_(1, targets[:, None], opts.loss_scale)
    scale = 1.0 if opts.loss_gradient == "released" else opts.loss_scale
    vectors = [(scale * acc(l.detach()).softmax(1) - onehot).to(l.dtype) for l in logits]
    if A.dtype in (torch.bfloat16, torch.float16) and len(logits) > 1:
        G, D = _per_branch_vjps(list(logits), picks, vectors, A, layer, run.shared)
    else:
        G = vjp(list(logits), [picks] * len(logits), A, layer, retain=True)
        D = vjp(list(logits), vectors, A, layer, retain=run.shared)
    with torch.no_grad(), full_precision(images):
        A, G, D = (acc(run.grid(t.detach())) for t in (A, G, D))
        a, b = opts.h_factors(method)
        alpha = weight_postprocess(G.sum((2, 3)), opts.h_mode, a, b)
        norm_A = A.flatten(1).norm(dim=1)[:, None, None, None]
        norm_D = D.flatten(1).norm(dim=1)[:, None, None, None]
        enhanced = A / norm_A - D / norm_D
        raw = channel_weighted_mean(alpha, enhanced)
        return resize_maps(raw, opts.size, opts.resize), logits[0].detach()


def _per_branch_vjps(logits: list[Tensor], picks: Tensor, vectors: list[Tensor], target: Tensor,
                     layer: str, retain: bool = False) -> tuple[Tensor, Tensor]:
    """``(sum_i J_i^T e_y, sum_i J_i^T v_i)`` from the 2n products taken one by one in a single
    batched backward pass, summed in float32."""
    n = len(logits)
    zero = torch.zeros_like(picks)
    stacked = [torch.stack([picks if k == i else zero for k in range(n)]
                           + [vectors[i].to(picks.dtype) if k == i else zero for k in range(n)])
               for i in range(n)]
    parts = vjp(logits, stacked, target, layer, retain=retain, batched=True).float()
    return parts[:n].sum(0), parts[n:].sum(0)


def _mnpos(source, images, targets, opts):
    return _dual_gradient(source, images, targets, opts, "mnpos", branches=None)


def _dgl(source, images, targets, opts):
    return _dual_gradient(source, images, targets, opts, "dgl", branches=1)


_METHOD_FUNCTIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "cam": _cam, "mnpo": _mnpo, "mnpos": _mnpos, "dgl": _dgl,
    **{name: partial(cam_family.gradient_cam, name) for name in cam_family.GRADIENT_RULES},
    "scorecam": cam_family.scorecam, "ablationcam": cam_family.ablationcam, "eigencam": cam_family.eigencam,
    "center": _center,
}
