"""TS-CAM, token semantic coupled attention maps (Gao et al., ICCV 2021; ``modern-wsol.md`` section 4).

A DeiT whose class token does not classify: a 3x3 convolution (``head``, C -> K, padding 1) on
the final norm's patch tokens ``(B, C, h, w)`` gives the semantic maps ``S`` ``(B, K, h, w)``
(feature ``main``, what the CAM family reads at ``head``), and GAP of ``S`` are the logits;
the classifier after GAP is therefore the identity (:class:`mnpo.models.bas.IdentityScores`).

The test map (``compute_maps(..., "cam")``, :func:`tscam_maps`): the class token's attention to
the patches, averaged over heads and summed over the 12 blocks (``A`` ``(B, h, w)``), times the
semantic map of the class, ``A * S[y]``, then resized and normalized as every map. Only that map
asks the backbone for attention weights; training and the other map methods run the fused
attention kernel. MNPO's map (``method="mnpo"``) weighs the final patch tokens by the post-processed
head weights, summed over the kernel (:func:`conv_head_evidence`). The head keeps PyTorch's default convolution init (the authors apply timm's
``_init_weights``, which touches Linear and LayerNorm layers only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnpo.models.bas import IdentityScores
from mnpo.models.deit import DEIT_NAMES, DEPTH, class_token_attention
from mnpo.models.method_nets import MethodLayout, MethodNet, gap

#: the attention taps TS-CAM's map reads
ATTENTION_TAPS = tuple(f"attention.{i}" for i in range(DEPTH))


class TsCamNet(MethodNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(GAP(S),))``; features ``head`` / ``main`` (``S``)
    and ``tokens`` (the final patch tokens MNPO's map reads). SAT's network
    (:class:`mnpo.models.sat.SatNet`) is this one on its own backbone, with its map added."""

    head_features = ("main",)
    _taps = ("norm",)
    #: the layout's network and the name errors give it
    network, title = "tscam", "TS-CAM"

    def __init__(self, layout: MethodLayout, num_classes: int, backbone: nn.Module | None = None) -> None:
        if layout.network != self.network:
            raise ValueError(f"{type(self).__name__} needs a {self.network} layout, got network {layout.network!r}")
        if layout.backbone not in DEIT_NAMES:
            raise ValueError(f"{self.title} is built on {DEIT_NAMES}, not {layout.backbone!r}")
        super().__init__(layout, num_classes, backbone=backbone)
        self.head = nn.Conv2d(self.backbone.taps["norm"].channels, num_classes, 3, padding=1)
        self.scores = IdentityScores(num_classes)

    def classifier_for(self, branch: str) -> nn.Module:
        if branch != "main":
            raise KeyError(f"unknown branch {branch!r}; the {self.title} network has 'main'")
        return self.scores

    def _heads(self, values, labels, run, mark):
        semantic = mark("main", run(self.head, values["norm"]))
        return (run(gap, semantic),), {"main": semantic, "tokens": values["norm"]}

    def weight_evidence(self, features: dict[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
        """What MNPO's weight post-processing reads here (:func:`conv_head_evidence`)."""
        return conv_head_evidence(self.head, features)


def conv_head_evidence(head: nn.Conv2d, features: dict[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """MNPO's map on a transformer with a conv head: ``[("main", F, W)]``, ``F`` the final patch
    tokens ``(B, C, h, w)`` and ``W`` ``(K, C)`` the head's 3x3 kernel summed over its taps, the
    linear classifier GAP and the convolution make away from the border
    (``GAP(conv(F))_y = W_y . GAP(F) + b_y`` where the zero padding is not reached). So
    ``H(W_y)`` weighs the tokens' channels as ``H(FC.weight[y])`` weighs a CNN's (spec 3-4)."""
    return [("main", features["tokens"], head.weight.sum((2, 3)))]


def tscam_maps(attentions: list[Tensor], semantic: Tensor, classes: Tensor, prefix: int = 1) -> Tensor:
    """TS-CAM's map ``(B, h, w)``: :func:`~mnpo.models.deit.class_token_attention` of the blocks'
    weights ``(B, heads, T, T)`` times ``semantic[b, classes[b]]`` (``semantic`` ``(B, K, h, w)``)."""
    grid = tuple(semantic.shape[-2:])
    picked = semantic[torch.arange(len(classes), device=classes.device), classes]
    return class_token_attention(attentions, grid, prefix) * picked
