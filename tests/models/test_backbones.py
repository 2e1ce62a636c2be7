import pytest
import torch
import torchvision
from numerics import network_bound

from mnpo.models.backbones import (
    ResNet50Backbone,
    VGG16Backbone,
    VggPools,
    backbone_taps,
    build_backbone,
)
from mnpo.models.stages import TapInfo

VGG_TAPS = [f"conv{s}_{i}" for s, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for i in range(1, n + 1)]


def test_vgg16_tap_table_full_width():
    taps = VGG16Backbone().taps
    assert list(taps) == VGG_TAPS
    assert taps["conv1_1"] == TapInfo(64, 1)
    assert taps["conv3_3"] == TapInfo(256, 4)
    assert taps["conv4_2"] == TapInfo(512, 8)
    assert taps["conv5_3"] == TapInfo(512, 16)
    # 13 convs + 13 ReLUs + 4 pools: the fifth pool is gone
    assert len(VGG16Backbone().features) == 30


def test_vgg16_every_tap_shape_full_width_224():
    net = VGG16Backbone().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224), VGG_TAPS)
    assert list(out) == VGG_TAPS
    for name, t in out.items():
        info = net.taps[name]
        assert t.shape == (1, info.channels, 224 // info.stride, 224 // info.stride), name
    assert out["conv5_3"].shape == (1, 512, 14, 14)


@pytest.mark.parametrize("width", [1 / 8, 1 / 16])
def test_vgg16_reduced_width_shapes(width):
    net = VGG16Backbone(width)
    out = net(torch.randn(2, 3, 64, 64), ["conv5_3", "conv4_2"])
    assert list(out) == ["conv5_3", "conv4_2"]  # order as requested
    assert out["conv4_2"].shape == (2, round(512 * width), 8, 8)
    assert out["conv5_3"].shape == (2, round(512 * width), 4, 4)


def test_vgg16_stops_after_deepest_tap():
    net = VGG16Backbone(1 / 16)
    calls = []
    for i, layer in enumerate(net.features):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))  # test-only probe
    net(torch.randn(1, 3, 32, 32), ["conv2_1"])
    assert max(calls) == net._tap_index["conv2_1"]


def test_vgg16_matches_torchvision_features_prefix():
    tv = torchvision.models.vgg16(weights=None).eval()
    net = VGG16Backbone().eval()
    net.features.load_state_dict(tv.features.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # like with like: both in float64, rounding bounded by numerics.py
        ours = net.double()(x, ["conv5_3"])["conv5_3"]
        theirs = tv.features[:30].double()(x)
    bound = network_bound(tv.features[:30], torch.float64) * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=bound)


def test_resnet50_taps_full_width():
    net = ResNet50Backbone().eval()
    assert net.taps == {
        "layer1": TapInfo(256, 4),
        "layer2": TapInfo(512, 8),
        "layer3": TapInfo(1024, 16),
        "layer4": TapInfo(2048, 16),
    }
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64), ["layer4", "layer2", "layer3", "layer1"])
    for name, t in out.items():
        info = net.taps[name]
        assert t.shape == (1, info.channels, 64 // info.stride, 64 // info.stride), name
    # layer4 is stride 1, without dilation
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[0].conv2.dilation == (1, 1)


def test_resnet50_reduced_width_and_early_stop():
    net = ResNet50Backbone(1 / 16)
    out = net(torch.randn(2, 3, 64, 64), ["layer2"])
    assert list(out) == ["layer2"] and out["layer2"].shape == (2, 32, 8, 8)


def test_resnet50_state_dict_keys_match_torchvision():
    tv_keys = {k for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(ResNet50Backbone().state_dict()) == tv_keys


def test_unknown_tap_and_backbone_are_clear_errors():
    with pytest.raises(KeyError, match="conv6_1"):
        VGG16Backbone(1 / 16)(torch.randn(1, 3, 32, 32), ["conv6_1"])
    with pytest.raises(ValueError, match="inception"):
        build_backbone("inception")


def test_vgg_pools_choose_the_fourth_pool_by_feature_map_size():
    """The CAM network's pools: torchvision's 2x2, the fourth an identity with the large feature
    map (conv5 at stride 8); the module indices stay torchvision's either way."""
    small, large = (build_backbone("vgg16", 1 / 16, large_feature_map=flag) for flag in (False, True))
    assert small.taps["conv5_3"].stride == 16 and large.taps["conv5_3"].stride == 8
    assert isinstance(small.features[23], torch.nn.MaxPool2d) and isinstance(large.features[23], torch.nn.Identity)
    assert list(small.state_dict()) == list(large.state_dict())
    acol = VggPools(("max3",) * 4, ("max3",) * 3 + ("max3s1",))
    assert build_backbone("vgg16", 1 / 16, True, acol).taps["conv5_3"].stride == 8
    assert build_backbone("vgg16", 1 / 16, False, acol).taps["conv5_3"].stride == 16


@pytest.mark.parametrize("default, large, match", [
    (("max2",) * 3, ("max2",) * 3 + ("none",), "default: four kinds"),
    (("max2",) * 4, ("max2",) * 3 + ("avg2",), "large: four kinds"),
    (("max2",) * 4, ("max2",) * 4, "must keep the stride.*'max2'"),
])
def test_bad_vgg_pools_are_named(default, large, match):
    with pytest.raises(ValueError, match=match):
        VggPools(default, large)


def test_backbone_taps_without_weights():
    assert backbone_taps("vgg16", 0.5)["conv5_3"] == TapInfo(256, 16)
    assert backbone_taps("resnet50")["layer4"] == TapInfo(2048, 16)
