import torch
from torch import nn

from mnpo.models.blocks import Bottleneck, Conv3x3ReLU, Reduce1x1, concat, init_he


def test_bottleneck_projection_shortcut_with_stride():
    block = Bottleneck(32, 14, 56, stride=2)
    assert isinstance(block.downsample, nn.Sequential)
    assert block.downsample[0].stride == (2, 2)
    assert block(torch.randn(2, 32, 8, 8)).shape == (2, 56, 4, 4)


def test_bottleneck_identity_shortcut():
    block = Bottleneck(60, 15, 60, stride=1).eval()
    assert block.downsample is None
    x = torch.randn(1, 60, 4, 4)
    with torch.no_grad():
        # zero the last BN: the residual path vanishes and the output is ReLU(x)
        block.bn3.weight.zero_()
        block.bn3.bias.zero_()
        assert torch.equal(block(x), torch.relu(x))  # exact: the residual is 0 * finite = 0


def test_reduce_and_head_and_concat():
    r = Reduce1x1(32, 4)
    assert r.conv.bias is None
    y = r(torch.randn(2, 32, 4, 4))
    assert y.shape == (2, 4, 4, 4) and (y >= 0).all()
    h = Conv3x3ReLU(32, 64)
    assert h.conv.bias is not None and h(torch.randn(1, 32, 4, 4)).shape == (1, 64, 4, 4)
    assert concat([torch.zeros(1, 3, 2, 2), torch.ones(1, 5, 2, 2)]).shape == (1, 8, 2, 2)


def test_init_he():
    m = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.Linear(16, 10))
    nn.init.constant_(m[1].weight, 3.0)
    init_he(m)
    assert torch.all(m[0].bias == 0) and torch.all(m[1].weight == 1) and torch.all(m[1].bias == 0)
    assert torch.all(m[2].bias == 0) and m[2].weight.std() < 0.05
