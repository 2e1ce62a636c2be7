"""Backbones in the WSOL layout with named taps (feature maps returned by name from one pass).

* ``VGG16Backbone``: torchvision VGG16's 13 conv+ReLU, the first four max-pools kept, the
  fifth removed, so ``conv5_*`` is at stride 16. Taps ``conv{stage}_{index}`` are the outputs
  after the ReLU. Module indices inside ``features`` equal torchvision's, so ImageNet weights
  map key for key.
* ``ResNet50Backbone``: torchvision ResNet50 with ``layer4`` at stride 1 and *no dilation*,
  as clovaai/wsolevaluation's ``ResNetCam`` builds it (``_make_layer(block, 512, 3, stride=1)``):
  ``layer4`` is at stride 16 (14x14 for 224 input). torchvision's
  ``replace_stride_with_dilation`` would instead dilate layer4's 3x3 convs, which changes
  the receptive field, so it is not used. Taps ``layer1``..``layer4``.
* ``InceptionV3Backbone`` (in ``mnpo.models.inception``): torchvision InceptionV3 up to
  ``Mixed_6e`` as clovaai/wsolevaluation changes it (padded stem, ceil-mode pools, an extra pool
  before ``Mixed_6a``, which no longer downsamples): ``Mixed_6e`` at stride 16. Taps named after
  torchvision's modules (``Conv2d_1a_3x3`` ... ``Mixed_6e``).

All three take a ``width`` multiplier for every channel count (``width=1`` is the real network).
Besides ``taps``, each has ``inner_taps``: outputs that ``forward`` also returns by name but that
layouts do not fuse (VGG16's pools ``pool1``..``pool4``, ResNet50's ``layer3.0``, InceptionV3's
``maxpool1``..``maxpool3``): where SPG's side branches read (spec 2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from mnpo.models.blocks import Bottleneck
from mnpo.models.deit import DEIT_NAMES, DeiTBackbone
from mnpo.models.inception import InceptionV3Backbone
from mnpo.models.stages import TapInfo, gradient_leaf, run_stages, run_tracked, scale_channels, wanted_taps

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
RESNET50_STAGES: tuple[tuple[int, int, int], ...] = (
    # (bottleneck width, blocks, stride); out channels = 4 * width
    (64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 1),
)
BACKBONE_NAMES = ("vgg16", "resnet50", "inception_v3")
#: VGG16 pool kinds (spec 1.1): ``max2`` 2x2 stride 2 (torchvision's, ``M``), ``max3`` 3x3 stride 2
#: padding 1 (``M1``; ACoL's four pools, SPG's fourth), ``max3s1`` 3x3 stride 1 padding 1 (``M2``;
#: ACoL's fourth with the large feature map), ``none`` (an identity where the pool was: the
#: large feature map of the CAM and SPG networks; module indices stay torchvision's).
VGG_POOLS = ("max2", "max3", "max3s1", "none")


@dataclass(frozen=True)
class VggPools:
    """A network's four VGG16 pool kinds (``VGG_POOLS``): ``default`` at the usual stride 16,
    ``large`` under ``large_feature_map`` (stride 8: the fourth pool does not downsample).
    The defaults are the CAM network's: torchvision's 2x2 pools, the fourth an identity when large.
    """

    default: tuple[str, ...] = ("max2", "max2", "max2", "max2")
    large: tuple[str, ...] = ("max2", "max2", "max2", "none")

    def __post_init__(self) -> None:
        for field, kinds in (("default", self.default), ("large", self.large)):
            if len(kinds) != 4 or any(kind not in VGG_POOLS for kind in kinds):
                raise ValueError(f"VggPools.{field}: four kinds from {VGG_POOLS} needed, got {kinds!r}")
        if self.large[3] not in ("max3s1", "none"):
            raise ValueError(f"VggPools.large: the fourth pool must keep the stride (max3s1 or none), "
                             f"got {self.large[3]!r}")

    def kinds(self, large_feature_map: bool = False) -> tuple[str, ...]:
        return self.large if large_feature_map else self.default


def make_vgg_features(config: Sequence[int | str], width: float = 1.0, pools: Sequence[str] = ()
                      ) -> tuple[nn.Sequential, dict[str, int], dict[str, TapInfo], dict[str, TapInfo]]:
    """Conv3x3+ReLU per number, a max-pool per ``"M"``: the k-th of kind ``pools[k]`` (``VGG_POOLS``;
    ``max2`` where ``pools`` has no entry).

    Returns the layers, the index in them of each tap's ReLU and each pool (``pool{k}``), the
    conv taps' info and the pools' info.
    """
    layers: list[nn.Module] = []
    tap_index: dict[str, int] = {}
    taps: dict[str, TapInfo] = {}
    pool_taps: dict[str, TapInfo] = {}
    in_channels, stage, index, stride = 3, 1, 0, 1
    for item in config:
        if item == "M":
            kind = pools[stage - 1] if stage - 1 < len(pools) else "max2"
            if kind not in VGG_POOLS:
                raise ValueError(f"pool {stage}: unknown kind {kind!r}; choose one of {VGG_POOLS}")
            layers.append({"max2": lambda: nn.MaxPool2d(2, 2), "max3": lambda: nn.MaxPool2d(3, 2, padding=1),
                           "max3s1": lambda: nn.MaxPool2d(3, 1, padding=1), "none": nn.Identity}[kind]())
            stride *= 2 if kind in ("max2", "max3") else 1
            tap_index[f"pool{stage}"] = len(layers) - 1
            pool_taps[f"pool{stage}"] = TapInfo(in_channels, stride)
            stage, index = stage + 1, 0
            continue
        out_channels = scale_channels(int(item), width)
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
        index += 1
        name = f"conv{stage}_{index}"
        tap_index[name] = len(layers) - 1
        taps[name] = TapInfo(out_channels, stride)
        in_channels = out_channels
    return nn.Sequential(*layers), tap_index, taps, pool_taps


class VGG16Backbone(nn.Module):
    """VGG16, WSOL layout. ``(B, 3, H, W) -> {tap: (B, C, H/s, W/s)}``; ``conv5_3`` is 512 x H/16.

    ``pools``: the kinds of the four pools (``VGG_POOLS``), torchvision's 2x2 by default;
    wsolevaluation's ACoL network has four ``max3``, its SPG network a ``max3`` fourth pool, and
    its ``large_feature_map`` a fourth pool that does not downsample (``VggPools.large``), so
    ``conv5_*`` is at stride 8 (28x28 at 224). The module indices are torchvision's whatever
    the kinds.
    """

    name = "vgg16"

    def __init__(self, width: float = 1.0, pools: Sequence[str] = ()) -> None:
        super().__init__()
        self.width = width
        self.features, self._tap_index, self.taps, self.inner_taps = make_vgg_features(VGG16_CONFIG, width, pools)

    def forward(self, x: Tensor, taps: Sequence[str], grad_from: str | None = None,
                replace: tuple[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The requested taps (and ``grad_from``), computing no layer past the deepest of them.

        ``grad_from``: a tap returned as a leaf that requires grad; the layers before it run
        without autograd and the layers after it record it, so ``autograd.grad(..., tap)`` is
        a backward pass truncated at that tap. ``replace``: ``(tap, value)``: the layers after
        the tap continue from ``value`` (any batch size) instead of what they computed.
        """
        wanted = wanted_taps({**self.taps, **self.inner_taps}, taps, grad_from or (replace[0] if replace else None))
        index = {self._tap_index[t]: t for t in wanted}
        out: dict[str, Tensor] = {}
        x = x if grad_from is None else x.detach()
        for i, layer in enumerate(self.features[: max(index, default=-1) + 1]):
            x = layer(x) if grad_from is None else run_tracked(layer, x)
            if grad_from is not None and index.get(i) == grad_from:
                x = gradient_leaf(x)
            if replace is not None and index.get(i) == replace[0]:
                x = replace[1]
            if i in index:
                out[index[i]] = x
        return {t: out[t] for t in wanted}


class ResNet50Backbone(nn.Module):
    """ResNet50, WSOL layout (layer4 stride 1). ``layer4`` is ``2048 x H/16`` at width 1.

    Module names equal torchvision's (``conv1``, ``bn1``, ``layer{i}.{j}.conv1`` ...).
    """

    name = "resnet50"

    def __init__(self, width: float = 1.0, large_feature_map: bool = False) -> None:
        super().__init__()
        self.width = width
        stem = scale_channels(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.taps: dict[str, TapInfo] = {}
        in_channels, total_stride = stem, 4
        for i, (block_width, blocks, stride) in enumerate(RESNET50_STAGES, start=1):
            if i == 3 and large_feature_map:  # wsolevaluation's large feature map: layer3 at stride 1
                stride = 1
            inner = scale_channels(block_width, width)
            out_channels = scale_channels(4 * block_width, width)
            layer = [Bottleneck(in_channels, inner, out_channels, stride)]
            layer += [Bottleneck(out_channels, inner, out_channels) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layer))
            total_stride *= stride
            self.taps[f"layer{i}"] = TapInfo(out_channels, total_stride)
            in_channels = out_channels
        #: layer3's first block alone (SPG's B1 tap, wsolevaluation's ``SPG_A1``)
        self.inner_taps = {"layer3.0": self.taps["layer3"]}

    def forward(self, x: Tensor, taps: Sequence[str], grad_from: str | None = None,
                replace: tuple[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The requested taps (and ``grad_from``); see ``VGG16Backbone.forward``."""
        wanted = wanted_taps({**self.taps, **self.inner_taps}, taps, grad_from or (replace[0] if replace else None))
        if not wanted:
            return {}
        stages = [("stem", self.stem), ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3),
                  ("layer4", self.layer4)]
        if "layer3.0" in wanted:  # split only then: hooks on ``layer3`` see it run whole otherwise
            stages[3:4] = [("layer3.0", self.layer3[0]), ("layer3", self.layer3[1:])]
        return run_stages(stages, x, wanted, grad_from, replace)

    def stem(self, x: Tensor) -> Tensor:
        """conv1, BN, ReLU, max-pool: ``(B, 3, H, W) -> (B, 64, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def build_backbone(name: str, width: float = 1.0, large_feature_map: bool = False,
                   vgg_pools: VggPools = VggPools(), drop_path: float = 0.0) -> nn.Module:
    """``"vgg16"``, ``"resnet50"`` or ``"inception_v3"`` in the WSOL layout, or a DeiT
    (``"deit_tiny"``, ``"deit_small"``, ``"deit_base"``, with stochastic depth ``drop_path``).
    ``large_feature_map``: the last stage at stride 8 instead of 16 (28x28 maps at 224), as
    wsolevaluation's option of that name. ``vgg_pools``: the network's VGG16 pools, both ways
    (the CAM network's by default)."""
    if name in DEIT_NAMES:
        if large_feature_map:
            raise ValueError(f"large_feature_map is a CNN option; {name} keeps its 16x16 patches")
        return DeiTBackbone(name, width, drop_path)
    if name == "vgg16":
        return VGG16Backbone(width, vgg_pools.kinds(large_feature_map))
    if name == "resnet50":
        return ResNet50Backbone(width, large_feature_map)
    if name == "inception_v3":
        return InceptionV3Backbone(width, large_feature_map)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONE_NAMES + DEIT_NAMES}")


def backbone_taps(name: str, width: float = 1.0, large_feature_map: bool = False) -> dict[str, TapInfo]:
    """The taps of a backbone without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return dict(build_backbone(name, width, large_feature_map=large_feature_map).taps)

