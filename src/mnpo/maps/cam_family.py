"""The post-hoc CAM family at any target layer (default ``head``), batched.

``A``: the target layer's activations ``(B, C, h, w)``; ``y``: the main branch's logit of the
target class; ``G = dy/dA``. Each method follows pytorch-grad-cam 1.5.7's definition:

===========  ==============================================================  ====================
method       raw map (then ReLU, resize, min-max)                           network passes
===========  ==============================================================  ====================
gradcam      ``sum_c mean_hw(G)_c A_c``                                     1 fwd + 1 bwd
gradcampp    ``sum_c (sum_hw ReLU(G) alpha)_c A_c``, ``alpha = G^2 /         1 fwd + 1 bwd
             (2 G^2 + sum_hw(A) G^3 + 1e-6)``, 0 where ``G = 0``
xgradcam     ``sum_c (sum_hw(G A) / (sum_hw A + 1e-7))_c A_c``              1 fwd + 1 bwd
layercam     ``sum_c ReLU(G) A`` (element-wise)                             1 fwd + 1 bwd
hirescam     ``sum_c G A`` (element-wise)                                   1 fwd + 1 bwd
scorecam     ``sum_c softmax_c(s)_c A_c``, ``s_c = y(x * M_c)``, ``M_c``:   1 + B C fwd (chunked)
             ``A_c`` upsampled to the input (bilinear, corners aligned),
             min-max normalized (+1e-8)
ablationcam  ``sum_c ((y - y_c) / y) A_c``, ``y_c``: ``y`` with channel     1 fwd; at other
             ``c`` of ``A`` set to 0 (at ``head``: ``y - y_c = w_yc          layers + C/k suffix
             mean_hw(A_c)``, exact, as GAP and the classifier follow)       passes of k B rows
eigencam     ``A``'s projection on its first principal direction            1 fwd + 1 SVD
===========  ==============================================================  ====================

Ablation-CAM where ``y = 0``: the weights are ``y - y_c`` (dividing by a positive ``y``
changes no normalized map; by 0 it would give NaN). Eigen-CAM's sign: a singular vector's sign
is arbitrary (pytorch-grad-cam keeps what LAPACK returns); ours makes the projection correlate
positively with the channel sum of ``A``, so the map is high where the activations are.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mnpo.maps.passes import acc, activations_and_gradient, full_precision, independent_of, predicted
from mnpo.maps.postprocess import channel_weighted_sum, resize_maps

#: Grad-CAM++'s and XGrad-CAM's stabilizers, Score-CAM's mask normalization (pytorch-grad-cam 1.5.7).
GRADCAMPP_EPS, XGRADCAM_EPS, SCORECAM_EPS = 1e-6, 1e-7, 1e-8


def _gradcampp(A: Tensor, G: Tensor) -> Tensor:
    g2 = G * G
    alpha = g2 / (2 * g2 + A.sum((2, 3), keepdim=True) * g2 * G + GRADCAMPP_EPS)
    # alpha is 0 where G = 0; only G > 0 counts after the ReLU, which also keeps a 0 * inf out
    return channel_weighted_sum((torch.where(G > 0, G * alpha, torch.zeros_like(G))).sum((2, 3)), A)


def _xgradcam(A: Tensor, G: Tensor) -> Tensor:
    return channel_weighted_sum((G * A).sum((2, 3)) / (A.sum((2, 3)) + XGRADCAM_EPS), A)


#: Raw map from ``(A, G)``, both ``(B, C, h, w)`` -> ``(B, h, w)``.
GRADIENT_RULES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": lambda A, G: channel_weighted_sum(G.mean((2, 3)), A),
    "gradcampp": _gradcampp,
    "xgradcam": _xgradcam,
    "layercam": lambda A, G: (G.clamp_min(0) * A).sum(1),
    "hirescam": lambda A, G: (G * A).sum(1),
}


def _finish(raw: Tensor, opts) -> Tensor:
    return resize_maps(raw.clamp_min(0) if opts.relu else raw, opts.size, opts.resize)


def _layer(source, opts):
    return opts.target_layer if opts.target_layer is not None else source.default_layer


def gradient_cam(method: str, source, images: Tensor, targets: Tensor | None, opts) -> tuple[Tensor, Tensor]:
    """A gradient method of ``GRADIENT_RULES``: one truncated forward and one backward."""
    A, G, logits = activations_and_gradient(source, images, targets, _layer(source, opts))
    with torch.no_grad(), full_precision(images):
        return _finish(GRADIENT_RULES[method](acc(A), acc(G)), opts), logits


def scorecam(source, images: Tensor, targets: Tensor | None, opts) -> tuple[Tensor, Tensor]:
    """Score-CAM: the target logit of the input masked by each channel, ``opts.chunk_size``
    masked images per forward pass (across images and channels), under inference mode."""
    A, logits = source.activations(images, _layer(source, opts))
    targets = predicted(targets, logits)
    B, C = A.shape[:2]
    scores = torch.empty(B * C, dtype=acc(logits).dtype, device=images.device)
    flat = A.flatten(0, 1)  # row b C + c: image b's channel c
    with torch.inference_mode():
        for start in range(0, B * C, opts.chunk_size):
            rows = torch.arange(start, min(start + opts.chunk_size, B * C), device=images.device)
            image = rows // C
            with full_precision(images):
                up = F.interpolate(acc(flat[rows, None]), size=images.shape[-2:], mode="bilinear",
                                   align_corners=True)
                low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
                masked = images[image] * ((up - low) / (high - low + SCORECAM_EPS)).to(images.dtype)
            # channels-last: oneDNN's convolutions run 1.7x faster on it (2-core EPYC, BENCHMARKS.md)
            out = source.logits(masked.contiguous(memory_format=torch.channels_last))
            scores[rows] = acc(out.gather(1, targets[image, None])[:, 0])
    with torch.no_grad(), full_precision(images):
        return _finish(channel_weighted_sum(scores.view(B, C).softmax(1), acc(A)), opts), logits


def ablationcam(source, images: Tensor, targets: Tensor | None, opts) -> tuple[Tensor, Tensor]:
    """Ablation-CAM: the relative drop of the target logit with each channel of ``A`` set to 0."""
    layer = _layer(source, opts)
    A, logits = source.activations(images, layer)
    targets = predicted(targets, logits)
    head = source.head_weight(images, layer)
    with torch.no_grad(), full_precision(images):
        y = acc(logits).gather(1, targets[:, None])[:, 0]
        if head is not None:
            drop = acc(head[targets]) * acc(A).mean((2, 3))  # GAP + linear: exact
        else:
            drop = y[:, None] - _ablated_logits(source, images, A, targets, layer, opts.chunk_size)
        weights = drop / torch.where(y == 0, torch.ones_like(y), y)[:, None]
        return _finish(channel_weighted_sum(weights, acc(A)), opts), logits


def ablation_copies_per_pass(source, images: Tensor, A: Tensor, layer, chunk_size: int) -> int:
    """Ablated copies of ``A`` ``(B, C, h, w)`` per pass: ``chunk_size``, or, where a pass runs only
    the network after ``layer`` (``source.ablation_runs_suffix``), as many copies as hold the
    elements of ``chunk_size`` images (``chunk_size 3 H W / (C h w)``, at least ``chunk_size``):
    memory then follows the copies, not the images, and the pass before the layer, which every
    pass repeats on ``images`` for a hooked model, is shared by more channels."""
    if not source.ablation_runs_suffix(images, layer):
        return chunk_size
    return max(chunk_size, chunk_size * images[0].numel() // A[0].numel())


def _ablated_logits(source, images: Tensor, A: Tensor, targets: Tensor, layer, chunk_size: int) -> Tensor:
    """``y_c`` ``(B, C)``: the network after ``layer`` run on copies of ``A`` with channel ``c``
    set to 0, ``k = copies // B`` channels of every image per pass (``copies`` from
    :func:`ablation_copies_per_pass`; what comes before the layer runs once per pass, on ``images``)."""
    B, C = A.shape[:2]
    per_image = max(1, ablation_copies_per_pass(source, images, A, layer, chunk_size) // B)
    out = torch.empty(B, C, dtype=acc(A).dtype, device=A.device)
    with torch.inference_mode():
        for first in range(0, C, per_image):
            k = min(per_image, C - first)
            copies = A.repeat_interleave(k, dim=0)  # rows b k .. b k + k - 1: image b
            copies[torch.arange(B * k, device=A.device), torch.arange(first, first + k, device=A.device).repeat(B)] = 0
            logits = source.ablated_logits(images, layer, copies)
            if logits.shape[0] != B * k:
                raise independent_of(layer)
            picked = logits.gather(1, targets.repeat_interleave(k)[:, None])[:, 0]
            out[:, first:first + k] = acc(picked).view(B, k)
    return out


def eigencam(source, images: Tensor, targets: Tensor | None, opts) -> tuple[Tensor, Tensor]:
    """Eigen-CAM: the centered activations ``(hw, C)`` of each image projected on their first
    right singular vector, signed to correlate positively with ``sum_c A``."""
    A, logits = source.activations(images, _layer(source, opts))
    with torch.no_grad(), full_precision(images):
        A = acc(A)
        positions = A.flatten(2).transpose(1, 2)  # (B, hw, C)
        centered = positions - positions.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        projection = (centered @ vh[:, 0, :, None])[..., 0]  # (B, hw)
        agreement = (projection * A.sum(1).flatten(1)).sum(1, keepdim=True)
        projection = torch.where(agreement < 0, -projection, projection)
        return _finish(projection.view(A.shape[0], *A.shape[2:]), opts), logits
