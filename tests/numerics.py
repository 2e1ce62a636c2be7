"""Tolerances derived from the arithmetic they check, never tuned to one machine.

Rounding model (Higham and Mary, "A new approach to probabilistic rounding error analysis",
SIAM J. Sci. Comput. 41(5), 2019): a sum or dot product of ``n`` terms computed in a format
with unit roundoff ``u`` has relative error at most ``lam * sqrt(n) * u``, except with
probability below ``2 exp(-lam**2 / 2)``; ``lam = 6`` makes that 3e-8, whatever the summation
order (which is what differs between CPU kernels: vector width, blocking, threads). Through a
network, each layer adds its own such error to first order, so a network of ``depth`` conv,
linear or normalization layers whose widest dot product has ``fan_in`` terms is bounded by
``depth * lam * sqrt(fan_in) * u`` relative to the output's magnitude; a backward pass is a
second network of the same depth and fan-in. Min-max normalization divides by the map's range:
that amplifies the raw map's error by ``max|raw| / range`` (<= 1 when the raw map changes sign
or starts at 0), and by 2 more as both the minimum and the value move.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAMBDA = 6.0
#: Min-max normalization: the value and the minimum each carry the raw map's error.
NORMALIZATION = 2.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: 1.1e-16 (float64), 6.0e-8 (float32), 3.9e-3 (bfloat16)."""
    return torch.finfo(dtype).eps / 2


def sum_bound(dtype: torch.dtype, n: int) -> float:
    """Relative error bound of one sum or dot product of ``n`` terms."""
    return LAMBDA * math.sqrt(n) * unit_roundoff(dtype)


def depth_and_fan_in(model: nn.Module) -> tuple[int, int]:
    """The number of conv, linear and normalization layers and the widest dot product's terms."""
    depth, fan_in = 0, 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            depth += 1
            fan_in = max(fan_in, m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            depth += 1
            fan_in = max(fan_in, m.in_features)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            depth += 1
    return depth, fan_in


def network_bound(model: nn.Module, dtype: torch.dtype, passes: int = 1, amplification: float = 1.0) -> float:
    """Relative rounding-error bound of an output of ``model`` run in ``dtype`` (``passes``: 1
    forward, 2 with one backward), times ``amplification`` for what is done with it after."""
    depth, fan_in = depth_and_fan_in(model)
    return amplification * passes * depth * sum_bound(dtype, fan_in)


def map_bound(model: nn.Module, dtype: torch.dtype, passes: int = 1) -> float:
    """Absolute bound on a min-max normalized map (values in [0, 1]) computed from ``model`` in
    ``dtype``: the network's bound, amplified by normalization (raw maps here change sign or
    start at 0, so ``max|raw| / range <= 1``)."""
    return network_bound(model, dtype, passes, NORMALIZATION)


def fan_ins(model: nn.Module) -> list[int]:
    """The terms of each conv, linear or normalization layer's dot products (1 for a normalization)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            out.append(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            out.append(m.in_features)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            out.append(1)
    return out


def chain_bound(model: nn.Module, dtype: torch.dtype, passes: int = 1) -> float:
    """Relative rounding-error bound of an output of ``model`` in ``dtype`` with the errors of all
    its layers taken together: ``lam * u * sqrt(passes * sum_l n_l)``, ``n_l`` each layer's fan-in.

    The same probabilistic model as ``sum_bound``, applied to the whole computation at once:
    every rounding error is mean-independent of the ones before it and moves the output by at
    most ``u`` times the output's magnitude (each term's share is no larger than the output, and
    every layer passes relative errors on with gain 1, as ``network_bound`` takes too). Their sum
    is then a martingale, and Azuma's inequality bounds it by ``lam * u * sqrt(number of
    roundings)`` with the same failure probability ``2 exp(-lam**2 / 2)``. Where the per-layer
    bounds of ``network_bound`` add up like ``depth * sqrt(fan_in)``, this grows like
    ``sqrt(depth * fan_in)``: 7.7e-5 for the released VGG16 at width 1.0, one pass, against
    8.0e-4.
    """
    return LAMBDA * unit_roundoff(dtype) * math.sqrt(passes * sum(fan_ins(model)))


def chain_map_bound(model: nn.Module, dtype: torch.dtype, passes: int = 1) -> float:
    """``chain_bound`` amplified by min-max normalization, as ``map_bound``."""
    return NORMALIZATION * chain_bound(model, dtype, passes)
