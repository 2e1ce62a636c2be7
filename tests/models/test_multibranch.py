import dataclasses

import pytest
import torch
import yaml
from numerics import network_bound, sum_bound

from mnpo.models import build_model
from mnpo.models.multibranch import (
    LAYOUTS,
    BlockSpec,
    BranchLayout,
    LayoutError,
    MultiBranchNet,
    NetworkLayout,
    released_vgg16_layout,
    resnet50_layout,
    three_branch_vgg16_layout,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_released_layout_has_22_74_million_parameters():
    model = MultiBranchNet(released_vgg16_layout(), num_classes=1000)
    assert round(n_params(model) / 1e6, 2) == 22.74
    assert model.classifier.in_features == 1024 and model.classifier.out_features == 1000
    a = model.branches["parallel"]["a"]
    assert (a.conv1.in_channels, a.conv2.out_channels, a.conv3.out_channels) == (512, 224, 896)
    assert a.conv2.stride == (2, 2) and a.downsample is not None
    assert model.branches["parallel"]["c"].downsample is None  # 960 -> 960: identity shortcut
    assert model.branches["parallel"]["c"].conv1.in_channels == 960


def test_released_layout_full_width_shapes_at_224_once():
    model = MultiBranchNet(released_vgg16_layout(), num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224), return_features=True)
    assert [t.shape for t in out.logits] == [(1, 10), (1, 10)]
    f = out.features
    assert f["head"].shape == (1, 1024, 14, 14)
    assert f["parallel"].shape == (1, 1024, 14, 14)
    assert f["parallel.a"].shape == (1, 896, 14, 14)
    assert f["parallel.b"].shape == (1, 64, 14, 14)
    assert f["parallel.c"].shape == (1, 960, 14, 14)
    assert f["parallel.d"].shape == (1, 64, 14, 14)


def test_shared_classifier_gives_logits_from_gap():
    model = MultiBranchNet(released_vgg16_layout(1 / 16), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), return_features=True)
        for name, logits in zip(["main", "parallel"], out.logits, strict=True):
            expected = model.classifier(out.features[name].mean(dim=(2, 3)))
            # the same float32 GAP and linear layer, perhaps fused otherwise: two sums' rounding,
            # relative to the sum of the terms' magnitudes (the logits themselves may cancel)
            pooled = out.features[name].mean(dim=(2, 3)).abs()
            magnitude = float((pooled @ model.classifier.weight.abs().T).max())
            bound = 2 * sum_bound(torch.float32, out.features[name][0].numel()) * magnitude
            torch.testing.assert_close(logits, expected, rtol=0, atol=bound)
    assert out.features["head"] is out.features["main"]
    assert model(torch.randn(1, 3, 32, 32)).features is None


def test_three_branch_layout():
    layout = three_branch_vgg16_layout(1 / 16)
    assert [b.name for b in layout.branches] == ["main", "parallel", "third"]
    assert layout.branches[2].blocks[0].inputs == ("parallel.ab",)
    model = MultiBranchNet(layout, num_classes=4)
    out = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert len(out.logits) == 3 and all(t.shape == (2, 4) for t in out.logits)
    assert out.features["third"].shape == (2, 64, 4, 4)


def test_three_branch_full_width_channels():
    layout = three_branch_vgg16_layout()
    assert layout.branch_output("third").channels == 1024
    assert layout.input_shape("third", "e").channels == 960


def test_resnet50_layout_shapes():
    layout = resnet50_layout()
    assert layout.feature_channels == 2048
    assert layout.branch_output("parallel").stride == 16
    model = MultiBranchNet(resnet50_layout(1 / 16), num_classes=5)
    out = model(torch.randn(1, 3, 64, 64), return_features=True)
    assert [t.shape for t in out.logits] == [(1, 5), (1, 5)]
    assert out.features["head"].shape == (1, 128, 4, 4)
    assert out.features["parallel"].shape == (1, 128, 4, 4)


def test_resnet50_layout_full_width_shapes_at_224_once():
    model = MultiBranchNet(resnet50_layout(), num_classes=10).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224), return_features=True)
    assert [t.shape for t in out.logits] == [(1, 10), (1, 10)]
    f = out.features
    assert f["head"].shape == (1, 2048, 14, 14)  # layer4 at stride 16
    assert f["parallel.a"].shape == (1, 896, 14, 14)  # layer2 (28x28) brought down by the stride-2 bottleneck
    assert f["parallel.b"].shape == (1, 128, 14, 14)
    assert f["parallel.c"].shape == (1, 1792, 14, 14)
    assert f["parallel.d"].shape == (1, 256, 14, 14)
    assert f["parallel"].shape == (1, 2048, 14, 14)


def test_he_initialization_of_new_layers():
    model = MultiBranchNet(released_vgg16_layout(1 / 8), num_classes=7)
    assert torch.all(model.branches["main"]["head"].conv.bias == 0)
    assert torch.all(model.branches["parallel"]["b"].bn.weight == 1)
    assert torch.all(model.classifier.bias == 0)
    assert model.classifier.weight.std() < 0.03


@pytest.mark.parametrize("make", list(LAYOUTS.values()))
def test_layout_dict_and_yaml_round_trip(make, tmp_path):
    layout = make(0.25)
    data = layout.to_dict()
    assert NetworkLayout.from_dict(data) == layout
    path = tmp_path / "layout.yaml"
    path.write_text(yaml.safe_dump(data))
    assert NetworkLayout.from_yaml(path) == layout


def _released_dict():
    return released_vgg16_layout().to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["branches"][1]["blocks"][0].update(inputs=["conv9_9"]), "unknown input 'conv9_9'"),
        (lambda d: d["branches"][1]["blocks"][0].update(kind="mlp"), "unknown kind 'mlp'"),
        (lambda d: d["branches"][1]["blocks"][0].update(stride=1), "different strides"),
        (lambda d: d["branches"][1]["blocks"][1].update(name="a"), "duplicate block names"),
        (lambda d: d["branches"][1]["blocks"][4].update(out_channels=32), "same channels"),
        (lambda d: d["branches"][1]["blocks"][2].update(inputs=["a"]), "at least 2 inputs"),
        (lambda d: d["branches"][1]["blocks"][1].update(out_channels=None), "needs out_channels"),
        (lambda d: d["branches"][1]["blocks"][0].update(width=None), "needs width"),
        (lambda d: d["branches"][1]["blocks"][1].update(stride=2), "only a bottleneck"),
        (lambda d: d["branches"][1]["blocks"][2].update(inputs=["a", "c"]), "unknown input 'c'"),
        (lambda d: d["branches"][1].update(name="main"), "duplicate branch names"),
        (lambda d: d.update(backbone="inception"), "unknown backbone"),
        (lambda d: d.update(width=0), "width must be > 0"),
        (lambda d: d.update(extra=1), r"unknown layout keys \['extra'\]; known: \['backbone', 'branches'"),
        (lambda d: d.update(large_feature_map=1), "large_feature_map must be true or false, got 1"),
        (lambda d: d["branches"][0]["blocks"][0].update(name="conv5_1"), "clashes with a backbone tap"),
        (lambda d: d["branches"][1]["blocks"][0].pop("inputs"), "malformed layout"),
    ],
)
def test_layout_validation_errors(mutate, message):
    data = _released_dict()
    mutate(data)
    with pytest.raises(LayoutError, match=message):
        NetworkLayout.from_dict(data)


def test_forward_reference_to_later_branch_is_rejected():
    main = BranchLayout("main", (BlockSpec("head", "reduce1x1", ("parallel.x",), out_channels=8),))
    parallel = BranchLayout("parallel", (BlockSpec("x", "reduce1x1", ("conv5_3",), out_channels=8),))
    with pytest.raises(LayoutError, match="unknown input 'parallel.x'"):
        NetworkLayout("vgg16", (main, parallel))


def test_branch_without_blocks_needs_output():
    with pytest.raises(LayoutError, match="no blocks and no output"):
        BranchLayout("main")


def test_one_branch_cam_layout_is_the_released_main_branch():
    from mnpo.models.multibranch import vgg16_cam_layout

    one = MultiBranchNet(vgg16_cam_layout(1 / 8), num_classes=5)
    two = MultiBranchNet(released_vgg16_layout(1 / 8), num_classes=5)
    assert [b.name for b in one.layout.branches] == ["main"]
    two_keys = set(two.state_dict())
    assert set(one.state_dict()) == {k for k in two_keys if not k.startswith("branches.parallel.")}
    assert len(one(torch.randn(1, 3, 32, 32)).logits) == 1


def test_input_sides_must_be_multiples_of_the_output_stride():
    model = MultiBranchNet(released_vgg16_layout(1 / 16), num_classes=2).eval()
    assert model.input_multiple == 16
    with pytest.raises(ValueError, match="input of 40x48 pixels: this layout needs sides divisible by 16"):
        model(torch.randn(1, 3, 40, 48))
    model(torch.randn(1, 3, 48, 32))


@pytest.mark.parametrize("layout, feature", [("vgg16-mnpo", "conv5_2"), ("vgg16-mnpo", "conv4_2"),
                                             ("vgg16-mnpo", "head"), ("vgg16-mnpo", "parallel.c"),
                                             ("resnet50-mnpo", "layer3"), ("resnet50-mnpo", "head"),
                                             ("inception_v3-mnpo", "Mixed_5d"), ("inception_v3-mnpo", "Mixed_6b"),
                                             ("inception_v3-mnpo", "main.SPG_A3_1b"), ("inception_v3-mnpo", "head"),
                                             ("inception_v3-cam", "Mixed_6e")])
def test_replace_continues_from_the_given_copies(layout, feature):
    """``replace`` with each image's own feature repeated k times gives every logit k times (the
    features it does not feed are repeated to match); an edited copy changes only its own rows."""
    torch.manual_seed(0)
    model = build_model(layout, 4, width=1 / 16).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, return_features=True, taps=[feature] if feature in model.backbone.taps else [])
        value = out.features[feature]
        copies = value.repeat_interleave(3, dim=0)
        copies[4] = 0  # image 1's second copy
        replaced = model(x, replace=(feature, copies)).logits
    for before, after in zip(out.logits, replaced, strict=True):
        if after.shape[0] == 2:  # a branch the feature does not feed
            assert torch.equal(after, before)
            continue
        expected = before.repeat_interleave(3, dim=0)
        keep = torch.arange(6) != 4
        # the same float64 layers over other batches: float64 rounding at most (numerics.py)
        bound = network_bound(model, torch.float64) * float(before.abs().max())
        torch.testing.assert_close(after[keep], expected[keep], rtol=0, atol=bound)
        assert not torch.allclose(after[4], expected[4])


def test_replace_refuses_a_row_count_that_is_not_a_multiple_of_the_batch():
    model = build_model("vgg16-mnpo", 4, width=1 / 16).eval()
    with pytest.raises(ValueError, match="3 rows are not a multiple of the batch 2"):
        model(torch.randn(2, 3, 32, 32), replace=("conv5_2", torch.zeros(3, 32, 2, 2)))


def test_init_mode_is_part_of_the_layout():
    """wsolevaluation initializes its ResNet50 and InceptionV3 CAM networks with Xavier (conv
    weights uniform within sqrt(6 / (fan_in + fan_out))), its VGG16 CAM with He (normal): the
    layouts say which, round-trip it, and a He layout's dict is what it was before the field."""
    import math

    from mnpo.models.multibranch import inception_v3_cam_layout, resnet50_cam_layout, vgg16_cam_layout

    assert resnet50_cam_layout().init == inception_v3_cam_layout().init == "xavier"
    assert vgg16_cam_layout().init == "he" and "init" not in vgg16_cam_layout().to_dict()
    layout = inception_v3_cam_layout(0.25)
    assert NetworkLayout.from_dict(layout.to_dict()) == layout and layout.to_dict()["init"] == "xavier"
    torch.manual_seed(0)
    conv = MultiBranchNet(layout, 3).branches["main"]["SPG_A3_1b"].conv.weight.detach()
    fan_in, fan_out = conv.shape[1] * 9, conv.shape[0] * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert float(conv.abs().max()) <= bound and float(conv.abs().max()) > 0.9 * bound
    he = MultiBranchNet(dataclasses.replace(layout, init="he"), 3).branches["main"]["SPG_A3_1b"].conv.weight.detach()
    assert float(he.abs().max()) > 2 * bound  # He's normal, std sqrt(2 / fan_out), is far wider here
    with pytest.raises(LayoutError, match="init 'orthogonal': choose one of"):
        dataclasses.replace(layout, init="orthogonal")
