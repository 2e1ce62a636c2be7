"""BGC, bridging the gap between classification and localization (Kim et al., CVPR 2022;
``modern-wsol.md`` section 3, the authors' ``wsol/vgg.py: VggDrop``, ``wsol/resnet.py:
ResNetDrop``, ``wsol/method/drop.py``).

The CAM network of the backbone with AttentiveDrop inside it, and a second, erased pass through
the layers after the drop (the same modules, weights shared and trained by both):

=============  ================================  =========================================
backbone       drop after                        shared layers after it -> ``F``
=============  ================================  =========================================
vgg16          ``conv4_3``                       ``pool4``, ``conv5_*``, ``head`` (3x3 conv to 1024, ReLU)
resnet50       ``layer4``'s first bottleneck     ``layer4``'s other two
inception_v3   ``Mixed_6a`` (ours)               ``Mixed_6b`` .. ``Mixed_6e``, ``head`` (ours)
=============  ================================  =========================================

InceptionV3 is our extension (the authors trained VGG16 and ResNet50 only): the drop follows the
last stage's first block, as on ResNet50 (``Mixed_6a`` opens the 768-channel stage as
``layer4.0`` opens ResNet50's last), and ``head`` is wsolevaluation's ``InceptionCam`` head
without its dropouts (``SPG_A3_1b``, ``SPG_A3_2b``: two 3x3 convs to 1024 + ReLU), so the
network is ``inception_v3-cam-no-dropout`` plus the erased pass; Xavier init as that network,
and ResNet50's drop and loss settings (:data:`BGC_DROP`, ``BGC_WEIGHTS``), also ours.

``score = classifier(GAP(F))`` of the un-erased pass; its map is the CAM of ``F`` (``cam``), as
any CAM network's. In training, with the labels, the features also hold ``bgc_erased``, ``F``
of the erased pass. AttentiveDrop (:func:`attentive_drop`) zeroes the pixels whose channel mean
exceeds ``drop_threshold`` times the image's maximum, each with probability ``drop_prob`` (per
pixel, as the authors' code draws; their text says per image). The loss is
:func:`mnpo.engine.training_methods.bgc_loss`. ``large_feature_map`` is the layout's (the
authors' ResNet50 recipe has it, their VGG16 recipe not). Init: He, as wsolevaluation's CAM
networks (He on VGG16, Xavier on ResNet50, as the authors' classes call its ``initialize_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnpo.models.blocks import Conv3x3ReLU, init_he
from mnpo.models.method_nets import MethodLayout, MethodNet, gap
from mnpo.models.stages import scale_channels

#: the tap AttentiveDrop follows (ResNet50: layer4's first block runs after the layer3 tap)
BGC_DROP_TAP = {"vgg16": "conv4_3", "resnet50": "layer3", "inception_v3": "Mixed_6a"}
#: the backbone tap the head reads (ResNet50: none, its head is layer4's last two blocks)
BGC_HEAD_TAP = {"vgg16": "conv5_3", "resnet50": None, "inception_v3": "Mixed_6e"}
BGC_INIT = {"vgg16": "he", "resnet50": "xavier", "inception_v3": "xavier"}
#: the authors' AttentiveDrop settings per backbone (configs/config_exp{,_vgg}.yaml); InceptionV3's
#: are ours (ResNet50's)
BGC_DROP = {"vgg16": (0.8, 0.5), "resnet50": (0.8, 0.25), "inception_v3": (0.8, 0.25)}


def attentive_drop(x: Tensor, threshold: float, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """``x`` ``(B, C, h, w)`` times a mask that is 0 where ``mean_c x > threshold * max_hw mean_c x``
    and a uniform draw (one per pixel, on the CPU from ``generator``) is ``<= prob``, else 1."""
    attention = x.mean(1, keepdim=True)
    peak = attention.amax(dim=(2, 3), keepdim=True)
    draws = torch.rand(attention.shape, generator=generator).to(x.device)
    dropped = (attention > threshold * peak) & (draws <= prob)
    return x * (~dropped).to(x.dtype)


class BgcNet(MethodNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(main,))``; features ``head`` / ``main`` (``F``),
    on ResNet50 ``layer4.0`` (the drop's input) and, in training with ``labels``, ``bgc_erased``.
    ``drop_threshold``, ``drop_prob`` and ``drop_generator`` are the trainer's to set."""

    head_features = ("main",)

    def __init__(self, layout: MethodLayout, num_classes: int) -> None:
        if layout.network != "bgc":
            raise ValueError(f"BgcNet needs a bgc layout, got network {layout.network!r}")
        super().__init__(layout, num_classes)
        backbone = layout.backbone
        head_tap = BGC_HEAD_TAP[backbone]
        self._taps = (BGC_DROP_TAP[backbone],) + ((head_tap,) if head_tap else ())
        if backbone == "resnet50":  # layer4 runs split around the drop: BGC's features, not a tap
            self.backbone.taps = {k: v for k, v in self.backbone.taps.items() if k != "layer4"}
            self.head_features = ("main", "layer4.0")
            self.head = nn.Identity()
            channels = scale_channels(2048, layout.width)
        elif backbone == "inception_v3":
            channels = scale_channels(1024, layout.width)
            self.head = nn.Sequential(Conv3x3ReLU(self.backbone.taps[head_tap].channels, channels),
                                      Conv3x3ReLU(channels, channels))
        else:
            channels = scale_channels(1024, layout.width)
            self.head = Conv3x3ReLU(self.backbone.taps[head_tap].channels, channels)
        self.classifier_main = nn.Linear(channels, num_classes)
        init_he(self.head, BGC_INIT[backbone])
        init_he(self.classifier_main, BGC_INIT[backbone])
        self.drop_threshold, self.drop_prob = BGC_DROP[backbone]
        self.drop_generator: torch.Generator | None = None

    def classifier_for(self, branch: str) -> nn.Linear:
        if branch != "main":
            raise KeyError(f"unknown branch {branch!r}; the BGC network has 'main'")
        return self.classifier_main

    def shared_layers(self, x: Tensor) -> Tensor:
        """The layers after the drop, ``F`` from the drop's output: VGG16's ``pool4`` .. ``conv5_3``
        (the backbone's own modules) and head, ResNet50's last two bottlenecks, InceptionV3's
        ``Mixed_6b`` .. ``Mixed_6e`` and head."""
        if self.layout.backbone == "resnet50":
            return self.backbone.layer4[1:](x)
        if self.layout.backbone == "inception_v3":
            for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
                x = getattr(self.backbone, name)(x)
            return self.head(x)
        index = self.backbone._tap_index
        return self.head(self.backbone.features[index["conv4_3"] + 1: index["conv5_3"] + 1](x))

    def _heads(self, values, labels, run, mark):
        x = values[BGC_DROP_TAP[self.layout.backbone]]
        features = {}
        if self.layout.backbone == "resnet50":
            x = features["layer4.0"] = mark("layer4.0", run(self.backbone.layer4[0], x))
            head = features["main"] = mark("main", run(self.shared_layers, x))
        else:  # VGG16's conv5_*, InceptionV3's Mixed_6b..6e are the backbone's pass (taps by name)
            head = features["main"] = mark("main", run(self.head, values[BGC_HEAD_TAP[self.layout.backbone]]))
        logits = run(self.classifier_main, run(gap, head))
        if self.training and labels is not None:
            erased = attentive_drop(x, self.drop_threshold, self.drop_prob, self.drop_generator)
            features["bgc_erased"] = self.shared_layers(erased)
        return (logits,), features
