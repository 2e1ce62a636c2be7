"""SPG, self-produced guidance (wsolevaluation's ``Vgg/ResNet/InceptionSpg``, spec 2.3).

The classification path ends in ``SPG_A4`` (a 1x1 conv to K, then GAP), here ``Linear(C, K)``
after GAP (the two commute) on the main head's map:

=============  ========================================  ==============  ===============  ============
backbone       main head (on)                            B1 tap          B2 tap           D (B1, B2)
=============  ========================================  ==============  ===============  ============
vgg16          2 x (3x3 conv 512 + ReLU) (``conv5_3``)   ``pool4``       ``conv5_3``      512
resnet50       none (``layer4``)                         ``layer3.0``    ``layer3``       1024
inception_v3   InceptionCam's head with its 3 dropouts   ``maxpool3``    ``Mixed_6d``     512
=============  ========================================  ==============  ===============  ============

(VGG16's fourth pool is a 3x3 stride-2 max-pool, padding 1, as wsolevaluation's ``VggSpg``;
none with the large feature map.)
Side outputs, in training only, each a one-channel logit map at stride 16: B1 =
``shared(b1(tap1))``, B2 = ``shared(b2(tap2))`` (``b1``, ``b2``: 3x3 conv to D + ReLU;
``shared``: 3x3 conv D -> D + ReLU, 1x1 conv to 1), C = ``c(main head map)`` (3x3 conv to 512
+ ReLU, 1x1 conv to 1). The loss (``mnpo.engine.training_methods.spg_loss``) trains B2 on masks
of the class map, B1 on masks of ``sigmoid(B2)``, C on masks of their mean. At test time the
side branches are unused: the map is the class map (``cam``).

Init: Xavier (conv weights Xavier-uniform), as wsolevaluation's SPG classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mnpo.models.backbones import VggPools
from mnpo.models.stages import scale_channels
from mnpo.models.blocks import Conv3x3ReLU, init_he
from mnpo.models.method_nets import MethodLayout, MethodNet, gap

#: wsolevaluation's SPG VGG16 pools: a 3x3 fourth pool (``M1``), an identity with the large feature map
SPG_VGG_POOLS = VggPools(default=("max2", "max2", "max2", "max3"), large=("max2", "max2", "max2", "none"))
#: (B1 tap, B2 tap, main head input) per backbone
SPG_TAPS = {"vgg16": ("pool4", "conv5_3", "conv5_3"), "resnet50": ("layer3.0", "layer3", "layer4"),
            "inception_v3": ("maxpool3", "Mixed_6d", "Mixed_6e")}
SPG_SIDE_CHANNELS = {"vgg16": 512, "resnet50": 1024, "inception_v3": 512}
#: InceptionSpg's dropout probability (training only), as InceptionCam's
SPG_INCEPTION_DROPOUT = 0.5
#: names of the side outputs among the features (training mode)
SIDE_OUTPUTS = ("spg_b1", "spg_b2", "spg_c")


class SpgNet(MethodNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(main,))``; features ``head`` / ``main`` (the map
    before GAP) and, in training mode, the side logit maps ``spg_b1``, ``spg_b2``, ``spg_c``
    ``(B, 1, h, w)``."""

    head_features = ("main",)

    def __init__(self, layout: MethodLayout, num_classes: int) -> None:
        if layout.network != "spg":
            raise ValueError(f"SpgNet needs an spg layout, got network {layout.network!r}")
        super().__init__(layout, num_classes, SPG_VGG_POOLS)
        backbone = layout.backbone
        taps = {**self.backbone.taps, **self.backbone.inner_taps}
        self._taps = tuple(dict.fromkeys(SPG_TAPS[backbone]))
        b1_tap, b2_tap, head_tap = SPG_TAPS[backbone]
        c = lambda n: scale_channels(n, layout.width)  # noqa: E731
        in_ch = taps[head_tap].channels
        self.dropout = SPG_INCEPTION_DROPOUT if backbone == "inception_v3" else 0.0
        if backbone == "vgg16":
            self.head = nn.Sequential(Conv3x3ReLU(in_ch, c(512)), Conv3x3ReLU(c(512), c(512)))
        elif backbone == "inception_v3":
            self.head = nn.ModuleList([Conv3x3ReLU(in_ch, c(1024)), Conv3x3ReLU(c(1024), c(1024))])
        else:
            self.head = nn.Identity()
        head_ch = {"vgg16": c(512), "inception_v3": c(1024), "resnet50": in_ch}[backbone]
        side = c(SPG_SIDE_CHANNELS[backbone])
        self.classifier_main = nn.Linear(head_ch, num_classes)
        self.side_b1 = Conv3x3ReLU(taps[b1_tap].channels, side)
        self.side_b2 = Conv3x3ReLU(taps[b2_tap].channels, side)
        self.side_shared = nn.Sequential(Conv3x3ReLU(side, side), nn.Conv2d(side, 1, 1))
        self.side_c = nn.Sequential(Conv3x3ReLU(head_ch, c(512)), nn.Conv2d(c(512), 1, 1))
        init_he(self, "xavier")

    def classifier_for(self, branch: str) -> nn.Linear:
        if branch != "main":
            raise KeyError(f"unknown branch {branch!r}; the SPG network has 'main'")
        return self.classifier_main

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def main_head(self, x: Tensor) -> Tensor:
        """The map before GAP from the head's input (with InceptionSpg's dropouts in training)."""
        if isinstance(self.head, nn.ModuleList):
            for conv in self.head:
                x = conv(self._drop(x))
            return self._drop(x)
        return self.head(x)

    def _heads(self, values, labels, run, mark):
        b1_tap, b2_tap, head_tap = SPG_TAPS[self.layout.backbone]
        head = mark("main", run(self.main_head, values[head_tap]))
        logits = run(self.classifier_main, run(gap, head))
        features = {"main": head}
        if self.training:
            features["spg_b1"] = self.side_shared(self.side_b1(values[b1_tap]))
            features["spg_b2"] = self.side_shared(self.side_b2(values[b2_tap]))
            features["spg_c"] = self.side_c(head)
        return (logits,), features
