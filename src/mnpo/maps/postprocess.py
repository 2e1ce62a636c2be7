"""The map arithmetic every method shares: weight post-processing H, channel weighting,
resizing, fusion and min-max normalization. All batched; shapes in each docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

H_MODES = ("scale", "step")
RESIZE_MODES = ("bicubic", "bilinear")
FUSIONS = ("max", "mean")


def weight_postprocess(weights: Tensor, mode: str = "scale", a: float = 10.0, b: float = 5.0) -> Tensor:
    """H (spec section 3): treat positive and non-positive weights differently.

    ``scale``: ``a * w`` where ``w > 0``, ``b * w`` elsewhere (the released code).
    ``step``: ``a`` where ``w > 0``, ``b`` elsewhere (the paper's figure).
    ``weights``: any shape; returns the same shape and dtype.
    """
    if mode == "scale":
        return torch.where(weights > 0, weights * a, weights * b)
    if mode == "step":
        return torch.where(weights > 0, torch.full_like(weights, a), torch.full_like(weights, b))
    raise ValueError(f"unknown H mode {mode!r}; choose one of {H_MODES}")


def channel_weighted_sum(weights: Tensor, features: Tensor) -> Tensor:
    """``sum_c weights[b, c] * features[b, c]``: ``(B, C)``, ``(B, C, h, w)`` -> ``(B, h, w)``.

    The products first, then ATen's sum over the channels, which adds in a cascade (rounding
    error growing like ``log C``). ``einsum`` would run a batched matrix product that adds each
    pixel's ``C`` products in one dot-product kernel (error growing like ``sqrt C``): on the
    released VGG16 in float32 that step alone moved the MNPOs map by 1.1e-6 of its range (512
    channels), against 1.7e-7 for this sum (BENCHMARKS.md, "Float32 maps"). It costs one
    temporary of the features' size.
    """
    return (weights[:, :, None, None] * features).sum(1)


def channel_weighted_mean(weights: Tensor, features: Tensor) -> Tensor:
    """``mean_c(weights[b, c] * features[b, c])``: ``(B, C)``, ``(B, C, h, w)`` -> ``(B, h, w)``."""
    return channel_weighted_sum(weights, features) / features.shape[1]


def resize_maps(maps: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """``(B, h, w) -> (B, H, W)`` with half-pixel centres and clamped borders.

    ``bicubic`` (a = -0.75) equals ``cv2.resize(..., INTER_CUBIC)``, the released code's
    per-image resize (tested to 1e-15 in float64); ``bilinear`` equals ``INTER_LINEAR``.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]


def fuse_maps(maps: list[Tensor], fusion: str = "max") -> Tensor:
    """Element-wise fusion of per-branch maps, each ``(B, H, W)`` -> ``(B, H, W)``."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    stacked = torch.stack(maps)
    return stacked.amax(0) if fusion == "max" else stacked.mean(0)


def normalize_maps(maps: Tensor) -> Tensor:
    """Per-image min-max to [0, 1]: ``(B, H, W) -> (B, H, W)``.

    A constant map, or one holding a NaN or an infinity, becomes all zeros (as the released
    ``normalize_scoremap``, which checks NaN; an infinity would give NaN there).
    """
    flat = maps.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    span = high - low
    valid = torch.isfinite(flat).all(1) & (span > 0)
    safe_span = torch.where(valid, span, torch.ones_like(span))
    out = (maps - low[:, None, None]) / safe_span[:, None, None]
    return torch.where(valid[:, None, None], out, torch.zeros_like(out))
