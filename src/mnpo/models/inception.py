"""InceptionV3 in clovaai/wsolevaluation's WSOL layout (docs: wsol-methods.md, section 1.2).

torchvision's ``inception_v3`` up to ``Mixed_6e`` (module names, channel counts, BatchNorm eps
1e-3, convs without bias: its state dict maps key for key), changed as wsolevaluation builds it:

* ``Conv2d_1a_3x3`` has padding 1 (torchvision: 0);
* the pools after ``Conv2d_2b_3x3`` (``maxpool1``) and ``Conv2d_4a_3x3`` (``maxpool2``) are
  max 3x3, stride 2, padding 1, ``ceil_mode``;
* a new pool ``maxpool3`` (max 3x3, stride 2, padding 0, ``ceil_mode``) between ``Mixed_5d``
  and ``Mixed_6a`` does the downsampling to stride 16 that ``Mixed_6a`` no longer does;
* ``Mixed_6a``'s two stride-2 3x3 convs become stride 1, padding 1, and its pool max 3x3,
  stride 1, padding 1;
* no ``Mixed_7*``, ``AuxLogits``, pooling or ``fc``; the input is not transformed
  (``transform_input`` off: ImageNet mean/std input, as wsolevaluation).

Shapes at 224: ``Conv2d_1a_3x3`` 112, ``Conv2d_2a_3x3``/``2b`` 110, ``Conv2d_3b_1x1`` 56,
``Conv2d_4a_3x3`` 54, ``Mixed_5*`` 28 (288 channels), ``Mixed_6*`` 14 (768 channels).
For any side ``H`` divisible by 16 a tap of stride ``s`` is ``H/s`` pixels, except the outputs
of the unpadded 3x3 convs ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3`` and ``Conv2d_4a_3x3``, which
are ``H/s - 2``: do not fuse those with other taps of their stride.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mnpo.models.stages import TapInfo, run_stages, scale_channels, wanted_taps

#: BatchNorm epsilon of every Inception conv (torchvision's and wsolevaluation's).
BN_EPS = 1e-3


class ConvBN(nn.Module):
    """``ReLU(BN(conv(x)))``, conv without bias, BN eps 1e-3 (torchvision's ``BasicConv2d``
    names: ``conv``, ``bn``). ``(B, in, H, W) -> (B, out, H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu_(self.bn(self.conv(x)))  # in place on BN's fresh output, never on x


class MixedA(nn.Module):
    """``Mixed_5b/5c/5d`` (torchvision's ``InceptionA``): four branches concatenated,
    1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool 3x3 -> 1x1.
    ``(B, in, H, W) -> (B, out_channels, H, W)``; ``out_channels`` 64+64+96+pool_features at width 1.
    """

    def __init__(self, in_channels: int, pool_features: int, width: float = 1.0) -> None:
        super().__init__()
        c = partial(scale_channels, width=width)
        self.branch1x1 = ConvBN(in_channels, c(64), 1)
        self.branch5x5_1 = ConvBN(in_channels, c(48), 1)
        self.branch5x5_2 = ConvBN(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, c(64), 1)
        self.branch3x3dbl_2 = ConvBN(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c(96), c(96), 3, padding=1)
        self.branch_pool = ConvBN(in_channels, c(pool_features), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def forward(self, x: Tensor) -> Tensor:
        one = self.branch1x1(x)
        five = self.branch5x5_2(self.branch5x5_1(x))
        three = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([one, five, three, pool], dim=1)


class MixedB(nn.Module):
    """``Mixed_6a`` (torchvision's ``InceptionB``) in the WSOL layout, without downsampling:
    3x3 | 1x1 -> 3x3 -> 3x3 | max-pool 3x3, every conv and the pool at stride 1, padding 1.
    ``(B, in, H, W) -> (B, out_channels, H, W)``; ``out_channels`` 384+96+in (768 at width 1).
    """

    def __init__(self, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c = partial(scale_channels, width=width)
        self.branch3x3 = ConvBN(in_channels, c(384), 3, padding=1)
        self.branch3x3dbl_1 = ConvBN(in_channels, c(64), 1)
        self.branch3x3dbl_2 = ConvBN(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c(96), c(96), 3, padding=1)
        self.out_channels = c(384) + c(96) + in_channels

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3(x)
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([three, double, pool], dim=1)


class MixedC(nn.Module):
    """``Mixed_6b..6e`` (torchvision's ``InceptionC``): factorized 7x7 convs with ``c7`` inner
    channels: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg-pool 3x3 -> 1x1.
    ``(B, in, H, W) -> (B, out_channels, H, W)``; ``out_channels`` 4 x 192 at width 1.
    """

    def __init__(self, in_channels: int, c7: int, width: float = 1.0) -> None:
        super().__init__()
        c = partial(scale_channels, width=width)
        c7, out = c(c7), c(192)
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(in_channels, out, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, out, **col)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, out, **row)
        self.branch_pool = ConvBN(in_channels, out, 1)
        self.out_channels = 4 * out

    def forward(self, x: Tensor) -> Tensor:
        one = self.branch1x1(x)
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([one, seven, double, pool], dim=1)


class MixedD(nn.Module):
    """``Mixed_7a`` (torchvision's ``InceptionD``): 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3
    stride 2 | max-pool 3x3 stride 2, the stride-2 convs and the pool with ``padding`` (torchvision 0;
    BAS's InceptionV3 1, so 28 -> 14). ``(B, in, H, W) -> (B, out_channels, H', W')``;
    ``out_channels`` 320+192+in (1280 at width 1)."""

    def __init__(self, in_channels: int, width: float = 1.0, padding: int = 0) -> None:
        super().__init__()
        c = partial(scale_channels, width=width)
        self.padding = padding
        self.branch3x3_1 = ConvBN(in_channels, c(192), 1)
        self.branch3x3_2 = ConvBN(c(192), c(320), 3, stride=2, padding=padding)
        self.branch7x7x3_1 = ConvBN(in_channels, c(192), 1)
        self.branch7x7x3_2 = ConvBN(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(c(192), c(192), 3, stride=2, padding=padding)
        self.out_channels = c(320) + c(192) + in_channels

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        pool = F.max_pool2d(x, kernel_size=3, stride=2, padding=self.padding)
        return torch.cat([three, seven, pool], dim=1)


class MixedE(nn.Module):
    """``Mixed_7b`` / ``Mixed_7c`` (torchvision's ``InceptionE``): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 ->
    3x3 -> (1x3, 3x1) | avg-pool 3x3 -> 1x1, the pairs concatenated. ``(B, in, H, W) ->
    (B, out_channels, H, W)``; ``out_channels`` 320+2x384+2x384+192 (2048 at width 1)."""

    def __init__(self, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c = partial(scale_channels, width=width)
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(in_channels, c(320), 1)
        self.branch3x3_1 = ConvBN(in_channels, c(384), 1)
        self.branch3x3_2a = ConvBN(c(384), c(384), **row)
        self.branch3x3_2b = ConvBN(c(384), c(384), **col)
        self.branch3x3dbl_1 = ConvBN(in_channels, c(448), 1)
        self.branch3x3dbl_2 = ConvBN(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(c(384), c(384), **row)
        self.branch3x3dbl_3b = ConvBN(c(384), c(384), **col)
        self.branch_pool = ConvBN(in_channels, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: Tensor) -> Tensor:
        one = self.branch1x1(x)
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], dim=1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], dim=1)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([one, three, double, pool], dim=1)


def mixed_7(in_channels: int, width: float = 1.0, padding: int = 0) -> nn.Sequential:
    """torchvision's ``Mixed_7a``, ``Mixed_7b``, ``Mixed_7c`` under those names (``padding``: of
    ``Mixed_7a``'s stride-2 layers, :class:`MixedD`). ``(B, in, H, W) -> (B, 2048 w, H', W')``."""
    first = MixedD(in_channels, width, padding)
    second = MixedE(first.out_channels, width)
    third = MixedE(second.out_channels, width)
    blocks = nn.Sequential()
    for name, block in (("Mixed_7a", first), ("Mixed_7b", second), ("Mixed_7c", third)):
        blocks.add_module(name, block)
    blocks.out_channels = third.out_channels
    return blocks


class InceptionV3Backbone(nn.Module):
    """InceptionV3, WSOL layout (module docstring). ``(B, 3, H, W) -> {tap: (B, C, h, w)}``;
    ``Mixed_6e`` is ``768 x H/16`` at width 1 (14x14 at 224).

    Taps, in network order, are the outputs of the torchvision modules of the same name:
    ``Conv2d_1a_3x3`` (stride 2), ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3`` (2), ``Conv2d_3b_1x1``,
    ``Conv2d_4a_3x3`` (4), ``Mixed_5b..5d`` (8), ``Mixed_6a..6e`` (16). ``width`` scales every
    channel count (``width=1`` is the real network, 8,965,856 parameters).
    """

    name = "inception_v3"

    def __init__(self, width: float = 1.0, large_feature_map: bool = False) -> None:
        super().__init__()
        self.width = width
        c = partial(scale_channels, width=width)
        self.Conv2d_1a_3x3 = ConvBN(3, c(32), 3, stride=2, padding=1)
        self.Conv2d_2a_3x3 = ConvBN(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = ConvBN(c(32), c(64), 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.Conv2d_3b_1x1 = ConvBN(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = ConvBN(c(80), c(192), 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.Mixed_5b = MixedA(c(192), 32, width)
        self.Mixed_5c = MixedA(self.Mixed_5b.out_channels, 64, width)
        self.Mixed_5d = MixedA(self.Mixed_5c.out_channels, 64, width)
        # skipped (an identity) with wsolevaluation's large feature map: Mixed_6* at stride 8
        self.maxpool3 = (nn.Identity() if large_feature_map
                         else nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True))
        self.Mixed_6a = MixedB(self.Mixed_5d.out_channels, width)
        self.Mixed_6b = MixedC(self.Mixed_6a.out_channels, 128, width)
        self.Mixed_6c = MixedC(self.Mixed_6b.out_channels, 160, width)
        self.Mixed_6d = MixedC(self.Mixed_6c.out_channels, 160, width)
        self.Mixed_6e = MixedC(self.Mixed_6d.out_channels, 192, width)
        #: every step of the forward pass, in order: the taps and the pools between them
        self.sequence: tuple[str, ...] = (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "maxpool3", "Mixed_6a", "Mixed_6b", "Mixed_6c",
            "Mixed_6d", "Mixed_6e",
        )
        self.taps: dict[str, TapInfo] = {}
        stride = 1
        for name in self.sequence:
            module = getattr(self, name)
            if isinstance(module, (nn.MaxPool2d, nn.Identity)):
                stride *= getattr(module, "stride", 1)
                continue
            if isinstance(module, ConvBN):
                stride *= module.conv.stride[0]
            self.taps[name] = TapInfo(module.out_channels, stride)
        #: the pools' outputs (``maxpool3``: SPG's B1 tap, ``Mixed_5d`` pooled to stride 16)
        self.inner_taps: dict[str, TapInfo] = {}
        previous = None
        for name in self.sequence:
            if name.startswith("maxpool"):
                info = self.taps[previous]
                self.inner_taps[name] = TapInfo(info.channels, info.stride * getattr(getattr(self, name), "stride", 1))
            previous = name

    def forward(self, x: Tensor, taps: Sequence[str], grad_from: str | None = None,
                replace: tuple[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The requested taps (and ``grad_from``); see ``VGG16Backbone.forward``."""
        wanted = wanted_taps({**self.taps, **self.inner_taps}, taps, grad_from or (replace[0] if replace else None))
        return run_stages([(name, getattr(self, name)) for name in self.sequence], x, wanted, grad_from, replace)
