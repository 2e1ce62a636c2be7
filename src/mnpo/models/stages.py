"""Running a backbone's stages by name: taps, truncated passes, width multipliers.

Shared by every backbone (``mnpo.models.backbones``, ``mnpo.models.inception``) and the networks
built on them. A *truncated pass* starts autograd at one stage's output (``grad_from``): the
stages before it run without autograd, so a backward stops there and fills no parameter gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TapInfo", "gradient_leaf", "run_stages", "run_tracked", "scale_channels", "wanted_taps"]


@dataclass(frozen=True)
class TapInfo:
    """A named feature map: its channel count and its stride relative to the input."""

    channels: int
    stride: int


def scale_channels(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def wanted_taps(known: dict[str, TapInfo], taps: Sequence[str], grad_from: str | None) -> list[str]:
    """``taps`` plus ``grad_from``, in request order, each checked against ``known``."""
    wanted = list(dict.fromkeys([*taps, *([grad_from] if grad_from is not None else [])]))
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise KeyError(f"unknown tap(s) {unknown}; this backbone has {list(known)}")
    return wanted


def run_tracked(module: nn.Module | Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` with autograd if an input requires grad, else under inference mode.

    In a truncated pass this keeps the graph to what depends on the target tensor: layers
    fed only by constants record nothing and keep no activations, whatever their parameters say.
    """
    if any(t.requires_grad for t in inputs):
        with torch.enable_grad():
            return module(*inputs)
    with torch.inference_mode():
        return module(*inputs)


def gradient_leaf(x: Tensor) -> Tensor:
    """A tensor equal to ``x`` that requires grad and has no history: where a truncated pass
    starts (a copy when ``x`` was made under inference mode, which autograd may not use)."""
    return (x.clone() if x.is_inference() else x.detach()).requires_grad_()


def run_stages(stages: Sequence[tuple[str, Callable[[Tensor], Tensor]]], x: Tensor, wanted: Sequence[str],
               grad_from: str | None = None, replace: tuple[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Run named stages in order, up to the last one ``wanted`` names, and return those outputs.

    ``grad_from``: that stage's output becomes a leaf requiring grad; the stages before it run
    without autograd and those after record it (a truncated backward). ``replace``:
    ``(name, value)``, the stages after ``name`` continue from ``value``.
    """
    names = [name for name, _ in stages]
    last = max((names.index(t) for t in wanted), default=-1)
    out: dict[str, Tensor] = {}
    x = x if grad_from is None else x.detach()
    for name, stage in stages[: last + 1]:
        x = stage(x) if grad_from is None else run_tracked(stage, x)
        if name == grad_from:
            x = gradient_leaf(x)
        if replace is not None and name == replace[0]:
            x = replace[1]
        if name in wanted:
            out[name] = x
    return {t: out[t] for t in wanted}
