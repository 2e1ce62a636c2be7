"""ACoL's and SPG's networks (spec wsol-methods.md 1.1-1.4, 2.2, 2.3): parameter counts, the
backbone variants, ACoL's erasing and test map against their definitions, SPG's side outputs,
checkpoints, and the optimizer's groups."""

import pytest
import torch
import torch.nn.functional as F
from numerics import map_bound

from mnpo.engine.config import config_from_dict
from mnpo.engine.train import build_optimizer, in_new_layer_group
from mnpo.maps import compute_maps
from mnpo.models import LAYOUTS, LayoutError, MethodLayout, build_model, layout_from_dict, load_model, save_checkpoint
from mnpo.models.acol import AcolNet
from mnpo.models.checkpoint import CheckpointError, read_checkpoint, model_from_payload

BACKBONES = ("vgg16", "resnet50", "inception_v3")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("vgg16-acol", 43_440_336), ("inception_v3-acol", 42_410_096), ("resnet50-acol", 80_545_232),
    ("vgg16-spg", 28_977_162), ("inception_v3-spg", 37_634_986), ("resnet50-spg", 61_671_690),
    # BAS, by hand from the authors' model files: the backbone (VGG16's 13 convs 14,714,688;
    # ResNet50 without fc 23,508,032), cls (3x3 C->1024, 3x3 1024->1024, 1x1 1024->200, with
    # biases) and the generator (3x3 C'->200 with bias), C = 512 / 2048, C' = 512 / 1024
    ("vgg16-bas", 14_714_688 + (512 * 1024 * 9 + 1024) + (1024 * 1024 * 9 + 1024) + (1024 * 200 + 200)
     + (512 * 200 * 9 + 200)),
    ("resnet50-bas", 23_508_032 + (2048 * 1024 * 9 + 1024) + (1024 * 1024 * 9 + 1024) + (1024 * 200 + 200)
     + (1024 * 200 * 9 + 200)),
    # InceptionV3: torchvision's Conv2d_* .. Mixed_7c (without AuxLogits and fc: counted below)
    ("inception_v3-bas", "torchvision"),
    # BGC: the CAM network's (AttentiveDrop holds no parameters): VGG16's convs, conv6 and fc;
    # ResNet50 and fc
    ("vgg16-bgc", 14_714_688 + (512 * 1024 * 9 + 1024) + (1024 * 200 + 200)),
    ("resnet50-bgc", 23_508_032 + (2048 * 200 + 200)),
    # InceptionV3 (ours): InceptionCam's parameters (its dropouts hold none)
    ("inception_v3-bgc", 25_687_976),
])
def test_parameter_counts_are_wsolevaluations(name, expected):
    """Spec 1.4, K = 200 (counted by instantiating wsolevaluation's classes; BAS's by hand)."""
    if expected == "torchvision":
        import torchvision

        with torch.device("meta"):
            tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        body = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith(("AuxLogits.", "fc.")))
        expected = body + (2048 * 1024 * 9 + 1024) + (1024 * 1024 * 9 + 1024) + (1024 * 200 + 200) + (768 * 200 * 9 + 200)
    with torch.device("meta"):
        assert n_params(build_model(name, 200)) == expected


def test_vgg_pools_of_acol_and_spg():
    """ACoL: the four pools 3x3 stride 2 padding 1 (M1); SPG: only the fourth. Same indices as
    torchvision, so the same conv weights load."""
    acol, spg, cam = (build_model(n, 3, width=0.0625).backbone.features for n in ("vgg16-acol", "vgg16-spg", "vgg16-cam"))
    for i in (4, 9, 16, 23):
        assert (acol[i].kernel_size, acol[i].stride, acol[i].padding) == (3, 2, 1)
        assert (spg[i].kernel_size, spg[i].padding) == ((3, 1) if i == 23 else (2, 0))
        assert (cam[i].kernel_size, cam[i].padding) == (2, 0)
    assert [k for k in acol.state_dict()] == [k for k in cam.state_dict()] == [k for k in spg.state_dict()]


def tiny_acol(backbone="vgg16", threshold=0.7, classes=4):
    torch.manual_seed(0)
    return AcolNet(MethodLayout("acol", backbone, 0.0625, threshold), classes).eval()


def test_acol_erasing_mask_by_hand():
    """The class map of y is channel 0 of A's map here (w_y = e_0, bias 5: an offset, which the
    min-max removes): [[0, 1], [2, 10]] normalizes to [[0, .1], [.2, 1]], so 0.7 erases the 10
    only, and 0.1 erases all but the 0; a constant map erases nothing (0 / 0 is NaN)."""
    net = tiny_acol()
    with torch.no_grad():
        net.classifiers["A"].weight.zero_()
        net.classifiers["A"].weight[2, 0] = 1.0
        net.classifiers["A"].bias.fill_(5.0)
    maps = torch.zeros(2, 64, 2, 2)
    maps[0, 0] = torch.tensor([[0.0, 1.0], [2.0, 10.0]])
    maps[1, 0] = 3.0
    y = torch.tensor([2, 2])
    assert net.erasing_mask(maps, y)[:, 0].tolist() == [[[1, 1], [1, 0]], [[1, 1], [1, 1]]]
    net.layout = MethodLayout("acol", "vgg16", 0.0625, 0.1)
    assert net.erasing_mask(maps, y)[0, 0].tolist() == [[1, 0], [0, 0]]  # .1 >= .1: erased


def test_acol_branch_b_sees_the_input_erased_by_the_labels_or_the_prediction():
    net = tiny_acol()
    x = torch.randn(2, 3, 64, 64)
    for labels in (torch.tensor([1, 3]), None):
        with torch.no_grad():
            out = net(x, return_features=True, labels=labels)
        classes = out.logits[0].argmax(1) if labels is None else labels
        mask = net.erasing_mask(out.features["A"], classes)
        assert 0 < float(mask.mean()) < 1  # something erased, something kept
        assert torch.equal(out.features["erased"], out.features["acol_input"] * mask)
        expected_b = net.classifiers["B"](net.branches["B"](out.features["erased"]).mean((2, 3)))
        assert torch.allclose(out.logits[1], expected_b, rtol=0, atol=1e-6)
    conv5_3 = net.backbone(x, ["conv5_3"])["conv5_3"]
    pooled = F.avg_pool2d(F.max_pool2d(conv5_3, 3, 1, 1), 3, 1, 1, count_include_pad=True)
    assert torch.allclose(out.features["acol_input"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_acol_cam_is_the_max_of_both_normalized_class_maps(backbone):
    """Spec 2.2: 1x1 convs (bias included) give the class maps of A and B; each min-max
    normalized, their max, bicubic to the input, min-max: float64 reference from the
    wsolevaluation-style arithmetic (``Conv2d(C, K, 1)`` on the whole map, pick channel y)."""
    net = tiny_acol(backbone).double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    maps, logits = compute_maps(net, x, y, method="cam")
    with torch.no_grad():
        out = net(x, return_features=True, labels=y)

        def normalized(branch):
            clf = net.classifiers[branch]
            full = F.conv2d(out.features[branch], clf.weight[:, :, None, None], clf.bias)[range(3), y]
            low = full.flatten(1).min(1).values[:, None, None]
            high = full.flatten(1).max(1).values[:, None, None]
            return (full - low) / (high - low)

        raw = torch.max(normalized("A"), normalized("B"))
        up = F.interpolate(raw[:, None], size=(64, 64), mode="bicubic", align_corners=False)[:, 0]
        low = up.flatten(1).min(1).values[:, None, None]
        expected = (up - low) / (up.flatten(1).max(1).values[:, None, None] - low)
    assert torch.allclose(maps, expected, rtol=0, atol=1e-12)
    assert torch.equal(logits, out.logits[0])


def test_acol_cam_depends_on_the_targets_through_the_erasing():
    """Branch B's map is from the erasing the target drove: the map of a class other than the
    prediction equals the formula on features erased by that class, not by the prediction."""
    from mnpo.maps.postprocess import normalize_maps, resize_maps
    from mnpo.models.acol import acol_class_maps

    net = tiny_acol().double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        predicted = net(x).logits[0].argmax(1)
    other = (predicted + 1) % 4
    maps, _ = compute_maps(net, x, other, method="cam")

    def formula(labels):
        with torch.no_grad():
            features = net(x, return_features=True, labels=labels).features
            return normalize_maps(resize_maps(acol_class_maps(net, features, other), (64, 64), "bicubic"))

    assert torch.equal(maps, formula(other))
    assert float((maps - formula(None)).abs().max()) > 1e-3


@pytest.mark.parametrize("backbone", BACKBONES)
def test_spg_side_outputs_only_in_training_and_its_cam_is_the_class_map(backbone):
    torch.manual_seed(0)
    net = build_model(f"{backbone}-spg", 3, width=0.0625).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    net.train()
    out = net(x, return_features=True)
    assert {k: tuple(v.shape) for k, v in out.features.items() if k.startswith("spg_")} == {
        "spg_b1": (2, 1, 4, 4), "spg_b2": (2, 1, 4, 4), "spg_c": (2, 1, 4, 4)}
    net.eval()
    y = torch.tensor([2, 0])
    with torch.no_grad():
        out = net(x, return_features=True)
    assert not any(k.startswith("spg_") for k in out.features)
    maps, _ = compute_maps(net, x, y, method="cam")
    clf = net.classifier
    full = F.conv2d(out.features["main"], clf.weight[:, :, None, None], clf.bias)[range(2), y]
    up = F.interpolate(full[:, None], size=(64, 64), mode="bicubic", align_corners=False)[:, 0]
    low = up.flatten(1).min(1).values[:, None, None]
    expected = (up - low) / (up.flatten(1).max(1).values[:, None, None] - low)
    assert torch.allclose(maps, expected, rtol=0, atol=map_bound(net, torch.float64))


def test_spg_taps_are_the_specs():
    """B1 on the pooled conv4_3 (VGG16), layer3's first block (ResNet50), the pooled Mixed_5d
    (InceptionV3); B2 on conv5_3, layer3, Mixed_6d: the side convs' input channels say which."""
    widths = {name: build_model(f"{name}-spg", 3).side_b1.conv.in_channels for name in BACKBONES}
    assert widths == {"vgg16": 512, "resnet50": 1024, "inception_v3": 288}
    widths = {name: build_model(f"{name}-spg", 3).side_b2.conv.in_channels for name in BACKBONES}
    assert widths == {"vgg16": 512, "resnet50": 1024, "inception_v3": 768}
    net = build_model("resnet50-spg", 3, width=0.0625).eval()
    x = torch.randn(1, 3, 64, 64)
    taps = net.backbone(x, ["layer2", "layer3.0", "layer3"])
    assert torch.equal(taps["layer3.0"], net.backbone.layer3[0](taps["layer2"]))
    assert torch.equal(taps["layer3"], net.backbone.layer3[1:](taps["layer3.0"]))


@pytest.mark.parametrize("name", ["vgg16-acol", "resnet50-spg", "inception_v3-acol", "vgg16-bas", "resnet50-bas",
                                  "inception_v3-bas", "vgg16-bgc", "resnet50-bgc", "inception_v3-bgc"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    layout = LAYOUTS[name](0.0625)
    if layout.network == "acol":
        layout = MethodLayout("acol", layout.backbone, 0.0625, 0.55)
    model = build_model(layout, 5).eval()
    save_checkpoint(tmp_path / "m.pt", model, meta={"epoch": 1})
    loaded, payload = load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model) and loaded.layout == layout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded(x).logits, strict=True):
            assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="layout mismatch"):
        model_from_payload(read_checkpoint(tmp_path / "m.pt"), "m.pt", layout=LAYOUTS["vgg16-cam"](0.0625))


@pytest.mark.parametrize("data, message", [
    ({"network": "bcam", "backbone": "vgg16"}, "network 'bcam': choose one of"),
    ({"network": "acol", "backbone": "vgg19"}, "unknown backbone 'vgg19'"),
    ({"network": "acol", "backbone": "vgg16", "acol_threshold": 2}, r"acol_threshold must be in \[0, 1\]"),
    ({"network": "spg", "backbone": "vgg16", "depth": 3}, r"unknown layout keys \['depth'\]"),
    ({"network": "spg"}, "malformed layout"),
    ({"network": "spg", "backbone": "vgg16", "large_feature_map": "false"},
     "large_feature_map must be true or false, got 'false'"),
])
def test_bad_method_layouts_are_named(data, message):
    with pytest.raises(LayoutError, match=message):
        layout_from_dict(data)


def group_names(model):
    return {n for n, _ in model.named_parameters() if in_new_layer_group(n, model.layout)}


def test_new_layer_groups_are_wsolevaluations():
    """Spec 3: VGG16: all but the backbone (SPG: also conv4 and conv5); ResNet50 CAM: layer4 and
    the new layers; ResNet50 ACoL and SPG: layer4 only (their heads at the base rate)."""
    with torch.device("meta"):
        vgg_spg, vgg_acol, res_cam, res_acol, res_spg, inc_spg = (
            build_model(n, 3) for n in ("vgg16-spg", "vgg16-acol", "resnet50-cam", "resnet50-acol",
                                        "resnet50-spg", "inception_v3-spg"))
    assert {n for n in group_names(vgg_spg) if n.startswith("backbone.")} == {
        f"backbone.features.{i}.{p}" for i in (17, 19, 21, 24, 26, 28) for p in ("weight", "bias")}
    assert all(not n.startswith("backbone.") for n in group_names(vgg_acol))
    assert {n.split(".")[0] for n in group_names(vgg_acol)} == {"branches", "classifiers"}
    layer4 = {n for n, _ in res_cam.named_parameters() if n.startswith("backbone.layer4.")}
    assert group_names(res_cam) == layer4 | {"classifier.weight", "classifier.bias"}
    assert group_names(res_acol) == group_names(res_spg) == layer4
    assert all(not n.startswith("backbone.") for n in group_names(inc_spg))
    cfg = config_from_dict({"data": {"root": "r", "metadata": "m"}, "model": {"layout": "resnet50-acol"},
                            "method": {"name": "acol"}})
    with torch.device("meta"):
        groups = build_optimizer(res_acol, cfg).param_groups
    assert [g["lr"] for g in groups] == [cfg.optim.lr, cfg.optim.lr * cfg.optim.new_layer_lr_ratio]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for n, p in res_acol.named_parameters()
                                                               if n in layer4)


@pytest.mark.parametrize("name", ["vgg16-acol", "resnet50-acol", "inception_v3-acol",
                                  "vgg16-spg", "resnet50-spg", "inception_v3-spg", "vgg16-bas", "resnet50-bas",
                                  "inception_v3-bas", "vgg16-bgc", "resnet50-bgc", "inception_v3-bgc"])
def test_every_map_method_applies(name):
    """Every ``compute_maps`` method runs on ACoL's and SPG's networks and gives maps in [0, 1]
    (with a maximum of 1 for every image where no ReLU may zero a map of a random network); on SPG (a GAP + linear head) Grad-CAM at ``head`` without its ReLU is
    its CAM (float64 rounding apart), as on a CAM network."""
    from mnpo.maps import METHODS

    torch.manual_seed(0)
    net = build_model(name, 4, width=0.0625).double().eval()
    with torch.no_grad():
        for clf in (net.classifier_for(b.name) for b in net.layout.branches if not name.endswith("-bas")):
            clf.weight.normal_(0, 0.5)  # (BAS's classifier is the identity: GAP makes its scores)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([1, 3])
    for method in METHODS:
        maps, logits = compute_maps(net, x, y, method=method)
        assert maps.shape == (2, 64, 64) and logits.shape == (2, 4), method
        assert maps.min() >= 0 and maps.max() <= 1, method
        # BAS's head F ends in a ReLU: on a random network a class channel can be 0 everywhere
        # (so are its score and every gradient of it); only its generator map (cam) is sure
        sure = ("cam", "center") if name.endswith("-bas") else ("cam", "mnpo", "mnpos", "dgl", "center")
        if method in sure:
            assert (maps.flatten(1).amax(1) == 1).all(), method
    if name.endswith("-spg"):
        cam, _ = compute_maps(net, x, y, method="cam")
        grad, _ = compute_maps(net, x, y, method="gradcam", target_layer="head", relu=False)
        assert float((cam - grad).abs().max()) <= map_bound(net, torch.float64, passes=2)


LARGE = ["vgg16-cam", "resnet50-cam", "inception_v3-cam", "vgg16-acol", "resnet50-acol", "inception_v3-acol",
         "vgg16-spg", "resnet50-spg", "inception_v3-spg"]


@pytest.mark.parametrize("name", LARGE)
def test_large_feature_map_gives_28x28_maps_with_the_same_parameters(name):
    """wsolevaluation's ``large_feature_map``: 28x28 at 224 instead of 14x14, the parameter count
    unchanged (spec 1.4), the layout saying so in its dict (and back)."""
    import dataclasses

    layout = LAYOUTS[name]()
    large = dataclasses.replace(layout, large_feature_map=True)
    assert layout_from_dict(large.to_dict()) == large and large.to_dict()["large_feature_map"] is True
    assert "large_feature_map" not in layout.to_dict()
    with torch.device("meta"):
        small_net, large_net = build_model(layout, 200).eval(), build_model(large, 200).eval()
        x = torch.empty(1, 3, 224, 224)
        small_out, large_out = small_net(x, return_features=True), large_net(x, return_features=True)
    assert n_params(small_net) == n_params(large_net)
    assert small_out.features["head"].shape[-2:] == (14, 14) and large_out.features["head"].shape[-2:] == (28, 28)
    if layout.backbone == "vgg16":  # the fourth pool keeps its index: torchvision's weights still map
        pool = large_net.backbone.features[23]
        expected = (3, 1, 1) if name.endswith("acol") else None
        assert (None if isinstance(pool, torch.nn.Identity) else (pool.kernel_size, pool.stride, pool.padding)) == expected


def test_mnpo_layouts_refuse_the_large_feature_map():
    import dataclasses

    with pytest.raises(LayoutError, match="inputs at different strides"):
        dataclasses.replace(LAYOUTS["vgg16-mnpo"](), large_feature_map=True)
