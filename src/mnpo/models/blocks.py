"""Fusion blocks of the MNPO branches: ResNet bottleneck, 1x1 reduction, 3x3 head, concat."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 -> 3x3 (with ``stride``) -> 1x1, BN after each conv, residual.

    ``(B, in_channels, H, W) -> (B, out_channels, H/stride, W/stride)``. The shortcut is
    identity when shapes agree, otherwise 1x1 conv with ``stride`` + BN (``downsample``).
    Submodule names (``conv1..3``, ``bn1..3``, ``downsample.0/.1``) are torchvision's, so
    torchvision ResNet weights and the authors' branch weights map one to one.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class Reduce1x1(nn.Module):
    """``ReLU(BN(conv1x1(x)))`` without conv bias: ``(B, in, H, W) -> (B, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Conv3x3ReLU(nn.Module):
    """The VGG16 main head: ``ReLU(conv3x3(x, bias))``, ``(B, in, H, W) -> (B, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x))


def concat(features: Sequence[Tensor]) -> Tensor:
    """Channel concatenation of maps of equal size: ``[(B, C_i, H, W)] -> (B, sum C_i, H, W)``."""
    return torch.cat(list(features), dim=1)


def init_he(module: nn.Module, mode: str = "he") -> None:
    """He initialization as wsolevaluation's ``initialize_weights(..., 'he')`` (the reference's),
    or with ``mode="xavier"`` its ``'xavier'`` variant (conv weights Xavier-uniform instead).

    Conv: kaiming normal, fan_out, relu; bias 0. BatchNorm: weight 1, bias 0.
    Linear: normal(0, 0.01), bias 0.
    """
    if mode not in ("he", "xavier"):
        raise ValueError(f"init mode {mode!r}: choose 'he' or 'xavier'")
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if mode == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
