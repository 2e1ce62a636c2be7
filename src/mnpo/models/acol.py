"""ACoL, adversarial complementary learning (wsolevaluation's ``Vgg/ResNet/InceptionAcol``, spec 2.2).

Two classifiers on the same input ``F``: branch ``A`` is two 3x3 conv + ReLU to 1024 channels,
GAP and ``Linear(1024, K)`` (wsolevaluation's 1x1 conv to K then GAP: the two commute); branch
``B`` is the same on ``F`` erased where A's class map for ``y`` (the label, or A's prediction),
min-max normalized per image, reaches ``acol_threshold``. The erasing mask carries no gradient
and acts in eval mode too. ``F`` is VGG16's ``conv5_3`` with wsolevaluation's ACoL pools (four
3x3 stride-2 max-pools, then a 3x3 stride-1 max-pool and a 3x3 stride-1 average pool),
ResNet50's ``layer4``, InceptionV3's ``Mixed_6e``. Loss: ``CE(A) + CE(B)`` (the engine's
sum over branches). Its map (``compute_maps(..., "cam")``, :func:`acol_class_maps`): the
element-wise max of A's and B's normalized class maps.

Init: Xavier (conv weights Xavier-uniform) on VGG16 and InceptionV3, He on ResNet50, as
wsolevaluation's classes; pretrained backbone weights replace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnpo.models.backbones import VggPools
from mnpo.models.stages import scale_channels
from mnpo.models.blocks import Conv3x3ReLU, init_he
from mnpo.models.method_nets import MethodLayout, MethodNet, class_map, gap, minmax

#: wsolevaluation's ACoL VGG16 pools (``M1``: 3x3, stride 2, padding 1) in place of the 2x2 ones
#: (with the large feature map the fourth is ``M2``, 3x3 stride 1).
ACOL_VGG_POOLS = VggPools(default=("max3", "max3", "max3", "max3"), large=("max3", "max3", "max3", "max3s1"))
#: The heads' input per backbone.
ACOL_INPUT = {"vgg16": "conv5_3", "resnet50": "layer4", "inception_v3": "Mixed_6e"}
ACOL_INIT = {"vgg16": "xavier", "resnet50": "he", "inception_v3": "xavier"}


class AcolNet(MethodNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(A, B))``; features ``head`` / ``A`` (branch A's
    1024-channel map), ``B``, ``acol_input`` (``F``) and ``erased`` (``F`` after erasing)."""

    head_features = ("A", "B", "acol_input", "erased")

    def __init__(self, layout: MethodLayout, num_classes: int) -> None:
        if layout.network != "acol":
            raise ValueError(f"AcolNet needs an acol layout, got network {layout.network!r}")
        super().__init__(layout, num_classes, ACOL_VGG_POOLS)
        self._taps = (ACOL_INPUT[layout.backbone],)
        in_ch = self.backbone.taps[self._taps[0]].channels
        hidden = scale_channels(1024, layout.width)
        self.branches = nn.ModuleDict({name: nn.Sequential(Conv3x3ReLU(in_ch, hidden), Conv3x3ReLU(hidden, hidden))
                                       for name in ("A", "B")})
        self.classifiers = nn.ModuleDict({name: nn.Linear(hidden, num_classes) for name in ("A", "B")})
        init_he(self, ACOL_INIT[layout.backbone])

    def classifier_for(self, branch: str) -> nn.Linear:
        return self.classifiers[branch]

    def head_input(self, tap: Tensor) -> Tensor:
        """``F`` from the backbone tap: on VGG16 a 3x3 stride-1 max-pool (``M2``) then a 3x3
        stride-1 average pool (padding counted), both size-preserving; the tap itself elsewhere."""
        if self.layout.backbone != "vgg16":
            return tap
        return F.avg_pool2d(F.max_pool2d(tap, 3, 1, padding=1), 3, 1, padding=1)

    def erasing_mask(self, maps_a: Tensor, classes: Tensor) -> Tensor:
        """``(B, 1, h, w)``: 0 where A's class map for ``classes``, min-max normalized, reaches the
        threshold, 1 elsewhere (all 1 for a constant map); no gradient."""
        with torch.no_grad():
            attention = minmax(class_map(self.classifiers["A"], maps_a.detach().float(), classes))
            return (~(attention >= self.layout.acol_threshold))[:, None].to(maps_a.dtype)

    def _heads(self, values, labels, run, mark):
        feature = mark("acol_input", run(self.head_input, values[self._taps[0]]))
        maps_a = mark("A", run(self.branches["A"], feature))
        logits_a = run(self.classifiers["A"], run(gap, maps_a))
        classes = logits_a.detach().argmax(1) if labels is None else labels
        erased = mark("erased", run(torch.mul, feature, self.erasing_mask(maps_a, classes)))
        maps_b = mark("B", run(self.branches["B"], erased))
        logits_b = run(self.classifiers["B"], run(gap, maps_b))
        return (logits_a, logits_b), {"A": maps_a, "B": maps_b, "acol_input": feature, "erased": erased}


def acol_class_maps(model: AcolNet, features: dict[str, Tensor], targets: Tensor) -> Tensor:
    """ACoL's test map at the features' resolution, ``(B, h, w)``: the element-wise max of A's and
    B's class maps for ``targets``, each min-max normalized per image (B from the erasing that
    ``targets`` drove). Computed in the features' dtype (use float32 / float64 features)."""
    maps = [minmax(class_map(model.classifier_for(b), features[b], targets)) for b in ("A", "B")]
    return torch.maximum(*maps)
