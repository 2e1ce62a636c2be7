"""InceptionV3 in wsolevaluation's WSOL layout (docs: wsol-methods.md 1.2, 1.4) and its layouts."""

import copy
import urllib.error

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.models._api as tv_api
from numerics import map_bound, network_bound
from torchvision.models import Inception_V3_Weights

from mnpo.maps import compute_maps
from mnpo.models import build_model
from mnpo.models.backbones import BACKBONE_NAMES, backbone_taps, build_backbone
from mnpo.models.stages import TapInfo
from mnpo.models.inception import InceptionV3Backbone
from mnpo.models.multibranch import LAYOUTS, MultiBranchNet
from mnpo.models.weights import DROPPED_PREFIXES, WeightsError, load_backbone_weights, load_pretrained
from tiny_models import spread_batchnorm, spread_for_maps

TAPS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]
#: Outputs of the unpadded 3x3 convs are 2 pixels short of ``side / stride``.
TRIM = {"Conv2d_2a_3x3": 2, "Conv2d_2b_3x3": 2, "Conv2d_4a_3x3": 2}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tv_state():
    """A random torchvision inception_v3 state dict (AuxLogits, Mixed_7*, fc included), with
    BatchNorm statistics and affine parameters away from the identity."""
    torch.manual_seed(5)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    return spread_batchnorm(tv, affine=True).state_dict()


@pytest.fixture(scope="module")
def tv_file(tv_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception_v3.pth"
    torch.save(tv_state, path)
    return path


# --- (a) parameter counts, spec 1.4 ---------------------------------------------------------


def test_backbone_has_the_pretrained_part_of_spec_1_4():
    with torch.device("meta"):
        assert n_params(InceptionV3Backbone()) == 8_965_856


@pytest.mark.parametrize("layout, classes, expected", [
    ("inception_v3-cam", 200, 25_687_976), ("inception_v3-cam", 1000, 26_507_976),
    ("resnet50-cam", 200, 23_917_832), ("resnet50-cam", 1000, 25_557_032),
])
def test_cam_layouts_have_wsolevaluations_parameter_counts(layout, classes, expected):
    with torch.device("meta"):
        assert n_params(MultiBranchNet(LAYOUTS[layout](), classes)) == expected


def test_cam_head_is_wsolevaluations_inception_cam():
    with torch.device("meta"):
        model = MultiBranchNet(LAYOUTS["inception_v3-cam"](), 200)
    first, second = (model.branches["main"][n].conv for n in ("SPG_A3_1b", "SPG_A3_2b"))
    assert (first.in_channels, first.out_channels, first.kernel_size, first.padding) == (768, 1024, (3, 3), (1, 1))
    assert (second.in_channels, second.out_channels, second.kernel_size, second.padding) == (1024, 1024, (3, 3), (1, 1))
    assert first.bias is not None and second.bias is not None
    assert (model.classifier.in_features, model.classifier.out_features) == (1024, 200)
    assert model.layout.required_taps() == ("Mixed_6e",)


# --- (b) taps: channels, strides, shapes ----------------------------------------------------


def test_tap_table_full_width():
    net = InceptionV3Backbone()
    assert list(net.taps) == TAPS
    channels = [32, 32, 64, 80, 192, 256, 288, 288, 768, 768, 768, 768, 768]
    strides = [2, 2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16]
    assert net.taps == {t: TapInfo(c, s) for t, c, s in zip(TAPS, channels, strides, strict=True)}
    assert backbone_taps("inception_v3") == net.taps
    assert backbone_taps("inception_v3", 0.5)["Mixed_6e"] == TapInfo(384, 16)
    assert "inception_v3" in BACKBONE_NAMES and isinstance(build_backbone("inception_v3", 1 / 16), InceptionV3Backbone)


def test_every_module_as_spec_1_2_and_bn_eps():
    net = InceptionV3Backbone()
    assert net.Conv2d_1a_3x3.conv.padding == (1, 1) and net.Conv2d_1a_3x3.conv.stride == (2, 2)
    for pool, padding in ((net.maxpool1, 1), (net.maxpool2, 1), (net.maxpool3, 0)):
        assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, padding, True)
    for conv in (net.Mixed_6a.branch3x3.conv, net.Mixed_6a.branch3x3dbl_3.conv):
        assert conv.stride == (1, 1) and conv.padding == (1, 1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 70 and all(c.bias is None for c in convs)
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("width, size", [(1.0, (224, 224)), (0.25, (160, 288))])
def test_every_tap_shape(width, size):
    """At 224: 112, 110, 110, 56, 54, 28 (Mixed_5*), 14 (Mixed_6*), as spec 1.2 traces it."""
    net = InceptionV3Backbone(width).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size), TAPS)
    assert list(out) == TAPS
    for name, t in out.items():
        info = net.taps[name]
        expected = tuple(side // info.stride - TRIM.get(name, 0) for side in size)
        assert t.shape == (1, info.channels, *expected), name
    if size == (224, 224):
        assert out["Mixed_5d"].shape[-1] == 28 and out["Mixed_6e"].shape == (1, 768, 14, 14)


# --- (c) the same function as torchvision's modules with spec 1.2's changes ----------------


def basic_conv(module, x, stride=None, padding=None):
    """A torchvision ``BasicConv2d`` run with its own weights at another stride / padding."""
    conv = module.conv
    y = F.conv2d(x, conv.weight, None, stride or conv.stride, padding or conv.padding)
    return F.relu(module.bn(y))


def reference_taps(tv, x):
    """``Mixed_5d`` and ``Mixed_6e`` from torchvision's ``Inception3`` modules called one by one,
    wsolevaluation's changes (spec 1.2) applied with functional calls where they differ."""
    x = basic_conv(tv.Conv2d_1a_3x3, x, padding=1)  # torchvision: padding 0
    x = tv.Conv2d_2b_3x3(tv.Conv2d_2a_3x3(x))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)  # torchvision: no padding, floor
    x = tv.Conv2d_4a_3x3(tv.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    mixed_5d = tv.Mixed_5d(tv.Mixed_5c(tv.Mixed_5b(x)))
    x = F.max_pool2d(mixed_5d, 3, stride=2, ceil_mode=True)  # new in the WSOL layout
    b = tv.Mixed_6a  # InceptionB at stride 1: convs padded, pool 3x3 s1 p1
    x = torch.cat([
        basic_conv(b.branch3x3, x, stride=1, padding=1),
        basic_conv(b.branch3x3dbl_3, b.branch3x3dbl_2(b.branch3x3dbl_1(x)), stride=1, padding=1),
        F.max_pool2d(x, 3, stride=1, padding=1),
    ], dim=1)
    for block in (tv.Mixed_6b, tv.Mixed_6c, tv.Mixed_6d, tv.Mixed_6e):
        x = block(x)
    return mixed_5d, x


def test_mixed_6e_equals_torchvision_modules_with_the_wsol_changes(tv_file, tv_state):
    model = build_model("inception_v3-cam", 10, pretrained=tv_file).double().eval()
    tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    tv.load_state_dict(tv_state)
    tv.double().eval()
    # the reference changes something: torchvision's own strides and paddings differ
    assert tv.Conv2d_1a_3x3.conv.padding == (0, 0) and tv.Mixed_6a.branch3x3.conv.stride == (2, 2)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 112, dtype=torch.float64)  # even sides: the ceil-mode pools add a row
    with torch.no_grad():
        ours = model.backbone(x, ["Mixed_5d", "Mixed_6e"])
        ref_5d, ref_6e = reference_taps(tv, x)
    assert ref_6e.shape == ours["Mixed_6e"].shape == (2, 768, 6, 7)
    used = torch.nn.ModuleList([getattr(tv, n) for n in TAPS])
    # the same float64 operations on both sides: float64 rounding at most (numerics.py)
    for got, ref in ((ours["Mixed_5d"], ref_5d), (ours["Mixed_6e"], ref_6e)):
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=network_bound(used, torch.float64) * float(ref.abs().max()))


# --- (d) truncation, grad_from, replace ------------------------------------------------------


def test_stops_after_deepest_tap():
    net = InceptionV3Backbone(1 / 16).eval()
    calls = []
    for name in net.sequence:
        getattr(net, name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))  # test-only probe
    out = net(torch.randn(1, 3, 64, 64), ["Mixed_5d", "Conv2d_3b_1x1"])
    assert list(out) == ["Mixed_5d", "Conv2d_3b_1x1"]  # order as requested
    assert calls == list(net.sequence[: net.sequence.index("Mixed_5d") + 1])
    assert net(torch.randn(1, 3, 64, 64), []) == {}


def test_unknown_tap_names_the_known_ones():
    with pytest.raises(KeyError, match="Mixed_7a.*Mixed_6e"):
        InceptionV3Backbone(1 / 16)(torch.randn(1, 3, 64, 64), ["Mixed_7a"])


def _double_backbone(width=1 / 8):
    torch.manual_seed(3)
    return spread_batchnorm(InceptionV3Backbone(width), mean_range=0.3).double().eval()


def test_grad_from_truncates_the_graph_with_the_full_graphs_gradient():
    net = _double_backbone()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = net(x, ["Mixed_5c", "Mixed_6e"], grad_from="Mixed_5d")
    assert list(out) == ["Mixed_5c", "Mixed_6e", "Mixed_5d"]
    target = out["Mixed_5d"]
    assert target.is_leaf and target.requires_grad
    assert out["Mixed_5c"].is_inference()  # before the target: inference mode, no graph
    assert out["Mixed_6e"].grad_fn is not None
    v = torch.randn_like(out["Mixed_6e"])
    (g,) = torch.autograd.grad((out["Mixed_6e"] * v).sum(), target)
    full = net(x, ["Mixed_5d", "Mixed_6e"])
    full["Mixed_5d"].retain_grad()
    (full["Mixed_6e"] * v).sum().backward()
    expected = full["Mixed_5d"].grad
    assert float(expected.abs().max()) > 0
    # the same float64 passes, once with the prefix under inference mode: float64 rounding at most
    bound = network_bound(net, torch.float64, passes=2) * float(expected.abs().max())
    torch.testing.assert_close(g, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("tap", ["Conv2d_4a_3x3", "Mixed_5d", "Mixed_6b"])
def test_replace_continues_from_the_given_value(tap):
    net = _double_backbone()
    x, other = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        theirs = net(other, [tap, "Mixed_6e"])
        replaced = net(x, ["Mixed_6e", tap], replace=(tap, theirs[tap]))
    assert replaced[tap] is theirs[tap]
    # the same float64 layers on the same values: float64 rounding at most (numerics.py)
    bound = network_bound(net, torch.float64) * float(theirs["Mixed_6e"].abs().max())
    torch.testing.assert_close(replaced["Mixed_6e"], theirs["Mixed_6e"], rtol=0, atol=bound)


# --- (e) weights ---------------------------------------------------------------------------


def test_every_backbone_tensor_from_a_local_torchvision_file(tv_file, tv_state):
    model = build_model("inception_v3-mnpo", 10)
    head_before = model.branches["main"]["SPG_A3_1b"].conv.weight.clone()
    load_pretrained(model, tv_file)
    ours = model.backbone.state_dict()
    for name, value in ours.items():
        assert torch.equal(value, tv_state[name]), name
    # everything else of the file is what wsolevaluation drops too
    dropped = {k for k in tv_state if k.startswith(DROPPED_PREFIXES["inception_v3"])}
    assert {k for k in tv_state if k not in ours} == dropped
    assert any(k.startswith("AuxLogits.") for k in tv_state) and any(k.startswith("Mixed_7c.") for k in tv_state)
    assert torch.equal(model.branches["main"]["SPG_A3_1b"].conv.weight, head_before)  # new layers keep He init


def test_without_aux_logits_and_batch_counters_it_loads_too(tv_state):
    state = {k: v for k, v in tv_state.items()
             if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")}
    net = InceptionV3Backbone()
    load_backbone_weights(net, state, "test")
    assert torch.equal(net.Mixed_6e.branch_pool.bn.running_var, state["Mixed_6e.branch_pool.bn.running_var"])


def test_every_mismatch_is_listed(tmp_path, tv_state):
    state = dict(tv_state)
    del state["Mixed_6e.branch_pool.bn.running_var"], state["Conv2d_1a_3x3.conv.weight"]
    state["Mixed_6f.branch1x1.conv.weight"] = torch.zeros(3)
    state["Mixed_6a.branch3x3.conv.weight"] = torch.zeros(384, 288, 1, 1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_model("inception_v3-cam", 2, width=1 / 16), path)
    text = str(info.value)
    assert str(path) in text and "expected a torchvision inception_v3 state dict at width 1" in text
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(InceptionV3Backbone(), state, "test")
    text = str(info.value)
    assert "missing: Conv2d_1a_3x3.conv.weight, Mixed_6e.branch_pool.bn.running_var;" in text
    assert "unexpected: Mixed_6f.branch1x1.conv.weight;" in text
    assert "wrong shape: Mixed_6a.branch3x3.conv.weight (384, 288, 1, 1) (model has (384, 288, 3, 3))" in text


def test_reduced_width_cannot_take_imagenet_weights(tv_state):
    message = r"wrong shape: Conv2d_1a_3x3.conv.weight \(32, 3, 3, 3\) \(model has \(8, 3, 3, 3\)\)"
    with pytest.raises(WeightsError, match=message):
        load_backbone_weights(InceptionV3Backbone(0.25), tv_state, "test")


def test_other_backbones_weights_do_not_fit(tv_state):
    with torch.device("meta"):  # the names and shapes are what is checked, before any copy
        vgg = {f"features.{k}": v for k, v in torchvision.models.vgg16(weights=None).features.state_dict().items()}
        inception, vgg16, resnet50 = InceptionV3Backbone(), build_backbone("vgg16"), build_backbone("resnet50")
    with pytest.raises(WeightsError, match="missing: Conv2d_1a_3x3.conv.weight.*unexpected: features.0.weight"):
        load_backbone_weights(inception, vgg, "test")
    with pytest.raises(WeightsError, match="missing: features.0.weight.*unexpected: Conv2d_1a_3x3.conv.weight"):
        load_backbone_weights(vgg16, tv_state, "test")
    with pytest.raises(WeightsError, match="missing: conv1.weight.*unexpected: Conv2d_1a_3x3.conv.weight"):
        load_backbone_weights(resnet50, tv_state, "test")


def test_imagenet_goes_through_torchvision_weights_api(monkeypatch, tv_state):
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return tv_state

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    model = build_model("inception_v3-cam", 4, pretrained="imagenet")
    assert urls == [Inception_V3_Weights.IMAGENET1K_V1.url]
    key = "Mixed_6e.branch7x7dbl_5.conv.weight"
    assert torch.equal(model.backbone.state_dict()[key], tv_state[key])


def test_offline_imagenet_says_how_to_use_a_local_file(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    message = r"could not download Inception_V3_Weights.IMAGENET1K_V1 from https://.*pass its path"
    with pytest.raises(WeightsError, match=message):
        build_model("inception_v3-cam", 4, pretrained="imagenet", width=1 / 16)


# --- (f) the layouts run, and their maps ----------------------------------------------------


def test_one_branch_layouts_are_the_two_branch_main_branches():
    for cam, mnpo in (("inception_v3-cam", "inception_v3-mnpo"), ("resnet50-cam", "resnet50-mnpo")):
        one, two = (build_model(name, 5, width=1 / 16) for name in (cam, mnpo))
        assert [b.name for b in one.layout.branches] == ["main"]
        assert set(one.state_dict()) == {k for k in two.state_dict() if not k.startswith("branches.parallel.")}
        assert len(one(torch.randn(1, 3, 32, 32)).logits) == 1


def test_mnpo_layout_shapes_at_224():
    with torch.device("meta"):
        model = MultiBranchNet(LAYOUTS["inception_v3-mnpo"](), 1000)
    assert model.input_multiple == 16
    a = model.branches["parallel"]["a"]
    assert (a.conv1.in_channels, a.conv2.out_channels, a.conv3.out_channels, a.conv2.stride) == (288, 224, 896, (2, 2))
    assert model.layout.required_taps() == ("Mixed_5d", "Mixed_6b", "Mixed_6e")
    shapes = {k: model.layout.input_shape("parallel", k) for k in ("a", "b", "ab", "c", "d", "out")}
    assert shapes == {"a": TapInfo(896, 16), "b": TapInfo(64, 16), "ab": TapInfo(960, 16), "c": TapInfo(960, 16),
                      "d": TapInfo(64, 16), "out": TapInfo(1024, 16)}
    assert round(n_params(model) / 1e6, 2) == 28.57
    model = build_model("inception_v3-mnpo", 3, width=1 / 8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224), return_features=True)
    assert [t.shape for t in out.logits] == [(1, 3), (1, 3)]
    assert out.features["head"].shape == out.features["parallel"].shape == (1, 128, 14, 14)
    assert out.features["parallel.a"].shape == (1, 112, 14, 14)


def _maps_model(layout):
    torch.manual_seed(0)
    return spread_for_maps(build_model(layout, 6, width=0.125)).double()


def _naive(model, images, targets, method):
    """CAM / MNPO (max fusion, released H 10/5) one image at a time in NumPy float64, resized with
    OpenCV as wsolevaluation does, min-max normalized."""
    maps = []
    for x, y in zip(images, targets.tolist(), strict=True):
        with torch.no_grad():
            features = model(x[None], return_features=True).features
        w = model.classifier.weight[y].detach().numpy()
        names = ["head"] if method == "cam" else [b.name for b in model.layout.branches]
        if method == "mnpo":
            w = np.where(w > 0, 10.0 * w, 5.0 * w)
        per_branch = [cv2.resize(np.einsum("c,chw->hw", w, features[n][0].numpy()) / len(w),
                                 (x.shape[-1], x.shape[-2]), interpolation=cv2.INTER_CUBIC) for n in names]
        cam = np.maximum.reduce(per_branch)
        maps.append((cam - cam.min()) / (cam - cam.min()).max())
    return np.stack(maps)


@pytest.mark.parametrize("layout", ["inception_v3-cam", "inception_v3-mnpo", "resnet50-cam"])
@pytest.mark.parametrize("method", ["cam", "mnpo"])
def test_maps_equal_a_naive_float64_reference(layout, method):
    model = _maps_model(layout)
    torch.manual_seed(1)
    images, targets = torch.randn(2, 3, 64, 80, dtype=torch.float64), torch.tensor([1, 4])
    maps, logits = compute_maps(model, images, targets, method=method)
    assert maps.shape == (2, 64, 80) and logits.shape == (2, 6)
    naive = _naive(model, images, targets, method)
    # float64 on both sides: only float64 rounding separates them (tests/numerics.py)
    assert float(np.abs(maps.numpy() - naive).max()) <= map_bound(model, torch.float64)


def test_gradient_maps_run_at_an_inception_tap():
    """mnpos and dgl have no default target layer for inception_v3 yet: name one."""
    model = _maps_model("inception_v3-mnpo")
    torch.manual_seed(2)
    images, targets = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 5])
    for method, options in (("mnpos", {}), ("dgl", {}), ("gradcam", dict(relu=False))):
        maps, _ = compute_maps(model, images, targets, method=method, target_layer="Mixed_6d", **options)
        assert maps.shape == (2, 64, 64) and float(maps.min()) == 0 and float(maps.max()) == 1
    float32 = copy.deepcopy(model).float()
    maps32, _ = compute_maps(float32, images.float(), targets, method="mnpos", target_layer="Mixed_6d")
    maps64, _ = compute_maps(model, images, targets, method="mnpos", target_layer="Mixed_6d")
    # the float32 network's rounding against float64's (tests/numerics.py)
    assert float((maps32.double() - maps64).abs().max()) <= map_bound(float32, torch.float32, passes=2)


def test_inception_cam_dropouts_act_in_training_only():
    """InceptionCam's three p=0.5 dropouts: two training forwards differ; in eval the network is
    the no-dropout layout's with the same weights, exactly; the dropouts survive a layout round
    trip, and zero dropouts are left out of a layout's data."""
    from mnpo.models.multibranch import BlockSpec, LayoutError, NetworkLayout

    torch.manual_seed(0)
    with_dropout = build_model("inception_v3-cam", 3, width=0.0625)
    without = build_model("inception_v3-cam-no-dropout", 3, width=0.0625)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with_dropout.eval(), without.eval()
        assert torch.equal(with_dropout(x).logits[0], without(x).logits[0])
        with_dropout.train()
        a, b = with_dropout(x).logits[0], with_dropout(x).logits[0]
    assert not torch.equal(a, b)
    data = with_dropout.layout.to_dict()
    head = data["branches"][0]["blocks"]
    assert (head[0]["input_dropout"], head[0]["dropout"], head[1]["dropout"]) == (0.5, 0.5, 0.5)
    assert "input_dropout" not in head[1] and NetworkLayout.from_dict(data) == with_dropout.layout
    assert all("dropout" not in blk for blk in without.layout.to_dict()["branches"][0]["blocks"])
    with pytest.raises(LayoutError, match=r"block 'h': dropout must be in \[0, 1\), got 1.0"):
        BlockSpec("h", "conv3x3_relu", ("Mixed_6e",), out_channels=8, dropout=1.0)


def test_bas_inception_takes_mixed_7_from_the_same_file(tv_file, tv_state, tmp_path):
    """BAS's InceptionV3 fills its Mixed_7* blocks from the torchvision file as the backbone
    (every tensor, under torchvision's names); its own head and generator keep their init; a
    missing tensor is named; at 224 the generator reads 28 x 28 and the padded Mixed_7a leads to
    the head's 14 x 14."""
    model = build_model("inception_v3-bas", 10)
    generator = model.generator[0].weight.clone()
    load_pretrained(model, tv_file)
    for name, value in model.mixed7.state_dict().items():
        assert torch.equal(value, tv_state[name]), name
    assert torch.equal(model.backbone.Mixed_6e.branch_pool.conv.weight, tv_state["Mixed_6e.branch_pool.conv.weight"])
    assert torch.equal(model.generator[0].weight, generator)
    broken = {k: v for k, v in tv_state.items() if not k.startswith("Mixed_7b.branch_pool")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="Mixed_7b.branch_pool.conv.weight.*the network's Mixed_7\\* blocks"):
        load_pretrained(build_model("inception_v3-bas", 10), tmp_path / "broken.pth")
    with torch.device("meta"):
        out = build_model("inception_v3-bas", 10).eval()(torch.empty(1, 3, 224, 224), return_features=True)
    assert out.features["generator"].shape[-2:] == (28, 28) and out.features["main"].shape[-2:] == (14, 14)
