"""The map arithmetic every method shares: weight post-processing H, channel weighting,
resizing, fusion and normalization (min-max, max, PaS, IVR). All batched; shapes in each docstring."""

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


#: map normalizations (Kim et al., ICCV 2021, "Normalization Matters in WSOL")
NORMALIZATIONS = ("minmax", "max", "pas", "ivr")
#: IVR's default percentile (the IVR repository's ``config.py: --percentile``)
IVR_PERCENTILE = 0.45
#: PaS's fixed percentile of the shifted map (Bae et al., ECCV 2020)
PAS_PERCENTILE = 0.9


def normalize_maps(maps: Tensor, mode: str = "minmax", percentile: float = IVR_PERCENTILE) -> Tensor:
    """Per-image normalization to [0, 1]: ``(B, H, W) -> (B, H, W)``, in the maps' dtype.

    For one map ``s`` of ``N`` pixels and ``q(p)`` the value at index ``int(N p)`` of its
    ascending sort (0-based, as IVR's ``normalize_scoremap``):

    * ``minmax`` (wsolevaluation's, the default): ``(s - min) / (max - min)``;
    * ``max``: ``max(0, s) / max(max(0, s))``;
    * ``pas`` (PaS): ``min(1, (s - min) / q'(0.9))``, ``q'`` of ``s - min``;
    * ``ivr``: ``max(0, s - q(percentile)) / max(max(0, s - q(percentile)))``.

    A map holding a NaN or an infinity, a constant map, and one whose divisor is 0 (``max`` on
    a map without a positive value, ``pas`` where nine tenths of the pixels hold the minimum,
    ``ivr`` where the percentile's value is the maximum) become all zeros; IVR's code divides
    by 0 there and gives NaN, which thresholds as no foreground, as zeros do.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; choose one of {NORMALIZATIONS}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile < 1:
        raise ValueError(f"normalization percentile must be a number in [0, 1), got {percentile!r}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got {tuple(maps.shape)}")
    flat = maps.flatten(1)
    finite = torch.isfinite(flat).all(1)
    flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
    low, high = flat.amin(1), flat.amax(1)
    n = flat.shape[1]
    if mode == "minmax":
        shifted, divisor = flat - low[:, None], high - low
    elif mode == "max":
        shifted = flat.clamp_min(0)
        divisor = shifted.amax(1)
    elif mode == "pas":
        shifted = flat - low[:, None]
        divisor = shifted.kthvalue(int(n * PAS_PERCENTILE) + 1, dim=1).values
    else:
        level = flat.kthvalue(int(n * percentile) + 1, dim=1).values
        shifted = (flat - level[:, None]).clamp_min(0)
        divisor = shifted.amax(1)
    valid = finite & (high > low) & (divisor > 0)
    out = shifted / torch.where(valid, divisor, torch.ones_like(divisor))[:, None]
    if mode == "pas":
        out = out.clamp_max(1)
    return torch.where(valid[:, None], out, torch.zeros_like(out)).view_as(maps)
