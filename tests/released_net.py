"""A network laid out as the authors' release (spec section 8), written from the spec for tests.

Module names are the release's; the forward is the released one (conv4_2 -> bottleneck a,
conv5_1 -> 1x1 b, concat -> bottleneck c, conv5_3 -> 1x1 d, concat; head on conv5_3; one
shared fc). ``forward`` returns both logits and the taps the map references need.
"""

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from mnpo.models.stages import scale_channels
from mnpo.models.release import RELEASED_CONV_NAMES
from tiny_models import spread_batchnorm

VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = {1, 3, 6, 9}  # max-pool after conv1_2, conv2_2, conv3_3, conv4_3 (0-based conv index)


def _bottleneck(in_channels: int, width: int, out_channels: int, stride: int = 1) -> nn.Module:
    """torchvision's ResNet bottleneck (the release's branch blocks are built from it), not
    mnpo's own: 1x1 -> 3x3 (stride) -> 1x1, out = 4 x width, a 1x1 + BN shortcut when shapes differ."""
    if out_channels != TorchvisionBottleneck.expansion * width:
        raise ValueError(f"a torchvision bottleneck gives {TorchvisionBottleneck.expansion} x {width} channels, "
                         f"not {out_channels}")
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    return TorchvisionBottleneck(in_channels, width, stride=stride, downsample=downsample)


class ReleasedLayoutNet(nn.Module):
    def __init__(self, num_classes, width=1.0):
        super().__init__()
        c = lambda n: scale_channels(n, width)  # noqa: E731
        in_ch = 3
        for name, out in zip(RELEASED_CONV_NAMES, VGG16_CHANNELS):
            setattr(self, name, nn.Sequential(nn.Conv2d(in_ch, c(out), 3, padding=1), nn.ReLU()))
            in_ch = c(out)
        self.conv6 = nn.Conv2d(c(512), c(1024), 3, padding=1)
        self.fc = nn.Linear(c(1024), num_classes)
        branch = nn.Module()
        branch.conv1 = nn.Sequential(nn.Conv2d(c(512), c(64), 1, bias=False), nn.BatchNorm2d(c(64)), nn.ReLU())
        branch.conv2 = nn.Sequential(nn.Conv2d(c(512), c(64), 1, bias=False), nn.BatchNorm2d(c(64)), nn.ReLU())
        branch.layer1 = nn.Sequential(_bottleneck(c(512), c(224), c(896), stride=2))
        branch.layer2 = nn.Sequential(_bottleneck(c(960), c(240), c(960)))
        self.branch1_layer = branch

    def forward(self, x, return_features=False):
        taps = []
        for i, name in enumerate(RELEASED_CONV_NAMES):
            x = getattr(self, name)(x)
            taps.append(x)
            if i in POOL_AFTER:
                x = nn.functional.max_pool2d(x, 2)
        conv4_2, conv5_1, conv5_3 = taps[8], taps[10], taps[12]
        head = torch.relu(self.conv6(conv5_3))
        b = self.branch1_layer
        fused = b.layer2(torch.cat([b.layer1(conv4_2), b.conv1(conv5_1)], 1))
        branch = torch.cat([fused, b.conv2(conv5_3)], 1)
        logits = self.fc(head.mean((2, 3))), self.fc(branch.mean((2, 3)))
        if not return_features:
            return logits
        return logits, {"conv5_2": taps[11], "head": head, "branch": branch}


def randomized(net, seed=0):
    torch.manual_seed(seed)
    return spread_batchnorm(net, affine=True).eval()
