"""Checkpoints of clovaai/wsolevaluation: their names (facts from wsol-methods.md 1.1-1.3, 2.2,
2.3, written out here by hand), round trips, the 1x1-conv classifier against its arithmetic,
the command, and every file that does not fit named."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mnpo.cli import main
from mnpo.maps import compute_maps
from mnpo.models import build_model, load_model
from mnpo.models.checkpoint import CheckpointError
from mnpo.models.wsolevaluation import convert_state_dict, export_state_dict, identify, import_checkpoint

W = 0.0625
NETWORKS = [(n, v) for n in ("vgg16-cam", "resnet50-cam") for v in ("cam", "adl")] + [
    (n, "cam") for n in ("inception_v3-cam", "vgg16-acol", "resnet50-acol", "inception_v3-acol", "vgg16-spg",
                         "resnet50-spg", "inception_v3-spg")]


def tiny(name, classes=5, seed=0, **layout_changes):
    torch.manual_seed(seed)
    model = build_model(name, classes, width=W)
    if layout_changes:
        model = build_model(dataclasses.replace(model.layout, **layout_changes), classes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def modules(state):
    """Top-level module names (``Mixed_6e``, ``SPG_A_1``, ``features`` ...)."""
    return {k.split(".")[0] for k in state}


def conv_indices(state, prefix="features."):
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix) and k.endswith(".weight")})


INCEPTION = {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
             "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"}
RESNET = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
SPG_SIDES = {"SPG_B_1a", "SPG_B_2a", "SPG_B_shared", "SPG_C"}


def test_their_names_are_the_specs():
    """Module names, conv indices and the ADL / SPG renumbering as spec 1.1-1.3 lists them."""
    vgg = export_state_dict(tiny("vgg16-cam"))
    assert modules(vgg) == {"features", "conv6", "fc"}
    assert conv_indices(vgg) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert conv_indices(export_state_dict(tiny("vgg16-cam"), "adl")) == [0, 2, 5, 7, 10, 12, 14, 18, 20, 22, 26, 28, 30]
    large = tiny("vgg16-cam", large_feature_map=True)
    assert conv_indices(export_state_dict(large))[-3:] == [23, 25, 27]
    assert conv_indices(export_state_dict(large, "adl"))[-6:] == [18, 20, 22, 25, 27, 29]
    acol = export_state_dict(tiny("vgg16-acol"))
    assert modules(acol) == {"features", "classifier_A", "classifier_B"}
    assert conv_indices(acol) == conv_indices(vgg)
    assert conv_indices(acol, "classifier_A.") == [0, 2, 4] and acol["classifier_A.4.weight"].shape == (5, 64, 1, 1)
    spg = export_state_dict(tiny("vgg16-spg"))
    assert modules(spg) == {"features", "SPG_A_1", "SPG_A_2", "SPG_A_3", "SPG_A_4"} | SPG_SIDES
    assert conv_indices(spg) == [0, 2, 5, 7, 10, 12, 14]
    assert [conv_indices(spg, f"{m}.") for m in ("SPG_A_1", "SPG_A_2", "SPG_A_3", "SPG_B_shared", "SPG_C")] == \
        [[0, 2, 4], [0, 2, 4], [0, 2], [0, 2], [0, 2]]
    assert spg["SPG_A_4.weight"].shape == (5, 32, 1, 1) and spg["SPG_B_shared.2.weight"].shape == (1, 32, 1, 1)
    resnet = export_state_dict(tiny("resnet50-cam"))
    assert modules(resnet) == RESNET | {"fc"} and resnet["fc.weight"].shape == (5, 128)
    adl = export_state_dict(tiny("resnet50-cam"), "adl")
    assert conv_indices(adl, "layer3.") == [0, 2, 3, 4, 5, 6] and conv_indices(adl, "layer4.") == [0, 2, 3]
    assert {k.replace("layer3.", "").split(".")[0] for k in adl if k.startswith("layer3.") and "downsample" in k} == {"0"}
    rspg = export_state_dict(tiny("resnet50-spg"))
    assert modules(rspg) == RESNET - {"layer3"} | {"SPG_A1", "SPG_A2", "SPG_A4"} | SPG_SIDES
    assert conv_indices(rspg, "SPG_A1.") == [0] and conv_indices(rspg, "SPG_A2.") == [0, 1, 2, 3, 4]
    assert rspg["SPG_B_1a.0.weight"].shape[1] == 64 and rspg["SPG_C.0.weight"].shape[1] == 128  # 1024, 2048 / 16
    assert modules(export_state_dict(tiny("resnet50-acol"))) == RESNET | {"classifier_A", "classifier_B"}
    inception = export_state_dict(tiny("inception_v3-cam"))
    assert modules(inception) == INCEPTION | {"SPG_A3_1b", "SPG_A3_2b", "SPG_A4"}
    assert inception["SPG_A3_1b.0.weight"].shape == (64, 48, 3, 3) and inception["SPG_A4.weight"].shape == (5, 64, 1, 1)
    assert modules(export_state_dict(tiny("inception_v3-spg"))) == INCEPTION | {"SPG_A3_1b", "SPG_A3_2b", "SPG_A4"} | SPG_SIDES
    assert modules(export_state_dict(tiny("inception_v3-acol"))) == INCEPTION | {"classifier_A", "classifier_B"}


@pytest.mark.parametrize("name, variant", NETWORKS)
def test_round_trip_gives_the_same_network(name, variant):
    model = tiny(name)
    state = export_state_dict(model, variant)
    back, net = convert_state_dict({f"module.{k}": v for k, v in state.items()}, "f.pth")  # DataParallel's names
    assert back.layout == model.layout and back.num_classes == 5
    assert (net.backbone, net.network, net.width, net.num_classes) == (*name.split("-"), W, 5)
    assert net.variant == (variant if not name.startswith("inception") else "cam")  # ADL leaves no trace there
    ours = model.state_dict()
    assert list(back.state_dict()) == list(ours)
    assert all(torch.equal(v, ours[k]) for k, v in back.state_dict().items())


def test_the_large_feature_map_is_read_where_the_names_show_it_and_asked_for_elsewhere():
    large = tiny("vgg16-cam", large_feature_map=True)
    state = export_state_dict(large, "adl")
    assert identify(state).large_feature_map is True and identify(state).variant == "adl"
    assert convert_state_dict(state)[0].layout.large_feature_map
    with pytest.raises(CheckpointError, match="f.pth: its VGG16 conv indices are wsolevaluation's 28x28 layout, "
                                              "but the large feature map was given as False"):
        convert_state_dict(state, "f.pth", large_feature_map=False)
    resnet = export_state_dict(tiny("resnet50-spg", large_feature_map=True))
    assert identify(resnet).large_feature_map is None
    assert not convert_state_dict(resnet)[0].layout.large_feature_map  # not said: the 14x14 network
    assert convert_state_dict(resnet, large_feature_map=True)[0].layout == tiny("resnet50-spg", large_feature_map=True).layout
    acol = convert_state_dict(export_state_dict(tiny("vgg16-acol")), acol_threshold=0.5)[0]
    assert acol.layout.acol_threshold == 0.5
    assert convert_state_dict(export_state_dict(tiny("vgg16-acol")))[0].layout.acol_threshold == 0.7
    with pytest.raises(CheckpointError, match="f.pth: an ACoL threshold was given, but this is wsolevaluation's "
                                              "resnet50 spg network"):
        convert_state_dict(resnet, "f.pth", acol_threshold=0.5)
    with pytest.raises(ValueError, match=r"acol_threshold must be in \[0, 1\]"):
        convert_state_dict(export_state_dict(tiny("vgg16-acol")), acol_threshold=2.0)


def test_an_imported_1x1_conv_classifier_gives_their_class_map():
    """wsolevaluation's InceptionCam map is channel y of the 1x1 conv ``SPG_A4`` (bias included)
    on the head's output; ours, from the imported weights, is the same map (float64; both
    upsampled bicubically and min-max normalized)."""
    state = export_state_dict(tiny("inception_v3-cam"))
    model = convert_state_dict(state)[0].double()
    images, targets = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([3, 1])
    maps, _ = compute_maps(model, images, targets, method="cam")
    with torch.no_grad():
        head = model(images, return_features=True).features["head"]
    theirs = F.conv2d(head, state["SPG_A4.weight"].double(), state["SPG_A4.bias"].double())[torch.arange(2), targets]
    theirs = F.interpolate(theirs[:, None], size=maps.shape[-2:], mode="bicubic", align_corners=False)[:, 0]
    low, high = theirs.amin((1, 2), keepdim=True), theirs.amax((1, 2), keepdim=True)
    torch.testing.assert_close(maps.double(), (theirs - low) / (high - low), rtol=0, atol=1e-9)


def test_import_command_writes_a_checkpoint_that_evaluates(tmp_path, capsys):
    model = tiny("resnet50-cam")
    src = tmp_path / "last_checkpoint.pth.tar"
    torch.save({"architecture": "resnet50", "epoch": 10, "state_dict": export_state_dict(model, "adl"),
                "optimizer": {"state": {}, "param_groups": []}}, src)
    assert main(["import-checkpoint", "--from", "wsolevaluation", str(src), str(tmp_path / "m.pt")]) == 0
    assert "wsolevaluation's resnet50-cam (ADL), 5 classes" in capsys.readouterr().out
    loaded, payload = load_model(tmp_path / "m.pt")
    assert payload["meta"]["wsolevaluation"] == {"architecture": "resnet50", "epoch": 10, "variant": "adl"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x).logits[0], model(x).logits[0], rtol=0, atol=0)
    assert main(["import-checkpoint", str(src), str(tmp_path / "x.pt"), "--large-feature-map"]) == 2
    assert "are for --from wsolevaluation" in capsys.readouterr().err


def _saved(tmp_path, state, **extra):
    path = tmp_path / "their.pth.tar"
    torch.save({"state_dict": state, **extra}, path)
    return path


def test_files_that_do_not_fit_are_named(tmp_path):
    state = export_state_dict(tiny("vgg16-spg"))
    dst = tmp_path / "out.pt"
    cases = [
        ({**state, "SPG_D.0.weight": torch.zeros(1)}, {}, r"their.pth.tar: tensors wsolevaluation's vgg16 spg network "
                                                          r"does not have: \['SPG_D.0.weight'\]"),
        ({k: v for k, v in state.items() if k != "SPG_C.2.bias"}, {}, r"missing: side_c.1.bias"),
        ({**state, "SPG_A_3.0.weight": torch.zeros(32, 32, 1, 1)}, {}, r"wrong shape: head.0.conv.weight \(32, 32, 1, 1\)"),
        (state, {"architecture": "resnet50"}, "says architecture 'resnet50' but its weights are vgg16's"),
        ({"conv1.0.weight": torch.zeros(64, 3, 3, 3)}, {}, "not a wsolevaluation VGG16, ResNet50 or InceptionV3"),
        ({k: v for k, v in export_state_dict(tiny("vgg16-cam")).items() if not k.startswith("features.28")}, {},
         r"VGG16 conv indices \[0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26\] are none of wsolevaluation's"),
        ({k: v for k, v in state.items() if not k.startswith("SPG_A_4")}, {}, r"needs one of \['SPG_A4.weight', "),
    ]
    for bad, extra, message in cases:
        with pytest.raises(CheckpointError, match=message):
            import_checkpoint(_saved(tmp_path, bad, **extra), dst)
        assert not dst.exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: expected a dict with a 'state_dict' of tensors"):
        import_checkpoint(tmp_path / "list.pt", dst)
    with pytest.raises(ValueError, match="only the one-branch CAM network"):
        export_state_dict(build_model("vgg16-mnpo", 3, width=W))
