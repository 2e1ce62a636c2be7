"""SAT, spatial-aware token (Wu et al., ICCV 2023; ``modern-wsol.md`` section 4).

A DeiT with one learnable localization token appended after the patch tokens (``loc_token``,
with its own positional embedding ``loc_embed``; both truncated normal, std 0.02, as the
authors'). In the last three blocks (index >= 9, :data:`GATED_BLOCKS`) the localization
token's query gates the attention: ``g = sigmoid(mean over heads of q_loc k^T / sqrt(d))`` over
all tokens, and every query's softmax weight of key ``j`` is multiplied by ``g_j``
(:meth:`mnpo.models.deit.Attention.forward`). The earlier blocks are DeiT's, unchanged (the
authors compute a gate there too but never use it).

The map ``M`` ``(B, h, w)`` is the mean over the gated blocks of ``g`` at the patch tokens:
class-agnostic, so ``compute_maps(..., "cam")`` returns it for any target (feature
``sat_map``, ``(B, 1, h, w)``, which the loss reads in training). The head is TS-CAM's (a 3x3
convolution to K classes, GAP = the logits; feature ``main``). The loss is
:func:`mnpo.engine.training_methods.sat_loss`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from mnpo.models.deit import DeiTBackbone
from mnpo.models.method_nets import MethodLayout
from mnpo.models.stages import TapInfo
from mnpo.models.tscam import TsCamNet

#: the blocks whose attention the localization token gates (the authors' ``cur_depth >= 9``)
GATED_BLOCKS = (9, 10, 11)
GATE_TAPS = tuple(f"gate.{i}" for i in GATED_BLOCKS)


class SatBackbone(DeiTBackbone):
    """DeiT plus SAT's localization token (module docstring); inner taps ``gate.9`` .. ``gate.11``
    ``(B, T)`` (each gated block's ``g`` over all tokens: class, patches, localization)."""

    #: what ImageNet DeiT weights do not hold: these keep their initialization (as the authors' load)
    new_parameters = ("loc_token", "loc_embed")

    def __init__(self, name: str = "deit_small", width: float = 1.0, drop_path: float = 0.0) -> None:
        super().__init__(name, width, drop_path)
        self.loc_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.loc_embed = nn.Parameter(torch.zeros(1, 1, self.dim))
        nn.init.trunc_normal_(self.loc_token, std=0.02)
        nn.init.trunc_normal_(self.loc_embed, std=0.02)
        self.inner_taps.update({t: TapInfo(1, 16) for t in GATE_TAPS})
        self._depth_of.update({f"gate.{i}": i for i in GATED_BLOCKS})

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"loc_token", "loc_embed"}

    def embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 1 + h w + 1, C)``: class token, patch tokens, localization token."""
        patches = self.patch_embed(images)
        grid = tuple(patches.shape[-2:])
        b = len(images)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2),
                            self.loc_token.expand(b, -1, -1)], dim=1)
        return tokens + torch.cat([self.position_embedding(grid), self.loc_embed], dim=1)

    def run_block(self, i: int, tokens: Tensor, need_weights: bool) -> tuple[Tensor, dict[str, Tensor]]:
        gated = i in GATED_BLOCKS
        tokens, weights, gate = self.blocks[i](tokens, need_weights, gate_query=-1 if gated else None)
        extras = {f"attention.{i}": weights} if need_weights else {}
        if gated:
            extras[f"gate.{i}"] = gate
        return tokens, extras


class SatNet(TsCamNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(GAP(S),))``; features ``head`` / ``main`` (``S``),
    ``tokens`` and ``sat_map`` (``M`` ``(B, 1, h, w)``): TS-CAM's head on SAT's backbone."""

    _taps = ("norm", *GATE_TAPS)
    network, title = "sat", "SAT"

    def __init__(self, layout: MethodLayout, num_classes: int) -> None:
        super().__init__(layout, num_classes, backbone=SatBackbone(layout.backbone, layout.width, layout.drop_path))

    def _heads(self, values, labels, run, mark):
        logits, features = super()._heads(values, labels, run, mark)
        features["sat_map"] = sat_map([values[t] for t in GATE_TAPS], tuple(features["main"].shape[-2:]))
        return logits, features


def sat_map(gates: list[Tensor], grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """SAT's map ``(B, 1, h, w)``: the mean over the gated blocks of their gates ``(B, T)`` at the
    patch tokens (after ``prefix`` leading tokens, row-major)."""
    h, w = grid
    return torch.stack([g[:, prefix: prefix + h * w] for g in gates]).mean(0).reshape(-1, 1, h, w)


def sat_kernel(size: int = 3, nsig: float = 6.0) -> torch.Tensor:
    """SAT's fixed smoothing kernel ``(size, size)`` (the authors' ``get_kernel(3, nsig=6)``): the
    standard normal's mass in ``size`` equal bins of ``[-nsig - i / 2, nsig + i / 2]``, ``i = (2 nsig
    + 1) / size``, as ``k``; the kernel ``sqrt(k_a k_b)``, normalized to sum 1. Float64."""
    interval = (2 * nsig + 1) / size
    edges = np.linspace(-nsig - interval / 2, nsig + interval / 2, size + 1)
    cdf = np.array([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in edges])
    raw = np.sqrt(np.outer(np.diff(cdf), np.diff(cdf)))
    return torch.from_numpy(raw / raw.sum())
