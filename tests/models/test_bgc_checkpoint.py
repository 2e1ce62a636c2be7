"""`mnpo import-checkpoint --from bgc`: the BGC authors' names, written out by hand from their
``wsol/vgg.py`` and ``wsol/resnet.py``, map onto our networks; round trips; refusals by key."""

import pytest
import torch

from mnpo.cli import main
from mnpo.models import build_model, load_model
from mnpo.models.bgc_checkpoint import convert_state_dict, export_state_dict
from mnpo.models.checkpoint import CheckpointError

WIDTH = 1 / 16


def c(n):
    return int(n * WIDTH)


def authors_vgg16(classes, large=False):
    """VggDrop's names: features.0 holds conv1_1 .. conv4_3 at torchvision's indices, features.1
    the drop, features.2 pool4 (14 x 14 only) and conv5_*; conv6; fc."""
    g = torch.Generator().manual_seed(0)
    state, cin = {}, 3
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512]
    for index, width in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21), widths):
        state[f"features.0.{index}.weight"] = torch.randn(c(width), cin, 3, 3, generator=g)
        state[f"features.0.{index}.bias"] = torch.randn(c(width), generator=g)
        cin = c(width)
    for index in ((0, 2, 4) if large else (1, 3, 5)):
        state[f"features.2.{index}.weight"] = torch.randn(c(512), c(512), 3, 3, generator=g)
        state[f"features.2.{index}.bias"] = torch.randn(c(512), generator=g)
    state["conv6.weight"] = torch.randn(c(1024), c(512), 3, 3, generator=g)
    state["conv6.bias"] = torch.randn(c(1024), generator=g)
    state["fc.weight"] = torch.randn(classes, c(1024), generator=g)
    state["fc.bias"] = torch.randn(classes, generator=g)
    return state


@pytest.mark.parametrize("large", [False, True])
def test_authors_vgg16_names_map_with_either_feature_map(large):
    state = authors_vgg16(5, large)
    model = convert_state_dict({f"module.{k}": v for k, v in state.items()}, "vgg.pth.tar")
    assert model.layout.large_feature_map == large and model.num_classes == 5 and model.layout.width == WIDTH
    assert torch.equal(model.backbone.features[21].weight, state["features.0.21.weight"])
    assert torch.equal(model.backbone.features[24].weight, state[f"features.2.{0 if large else 1}.weight"])
    assert torch.equal(model.head.conv.weight, state["conv6.weight"])
    assert torch.equal(model.classifier_main.bias, state["fc.bias"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), return_features=True).features["main"].shape[-1] == (8 if large else 4)
    with pytest.raises(CheckpointError, match="names are the authors' (14x14|28x28) network, but the large feature"):
        convert_state_dict(state, "vgg.pth.tar", large_feature_map=not large)


@pytest.mark.parametrize("backbone, large", [("vgg16", False), ("resnet50", True), ("resnet50", False)])
def test_round_trip_from_our_networks(backbone, large, tmp_path):
    import dataclasses

    from mnpo.models import LAYOUTS

    torch.manual_seed(3)
    layout = dataclasses.replace(LAYOUTS[f"{backbone}-bgc"](WIDTH), large_feature_map=large)
    model = build_model(layout, 6).eval()
    theirs = export_state_dict(model)
    if backbone == "resnet50":
        assert {"layer4_1.0.conv1.weight", "layer4_2.1.bn3.running_var", "fc.weight"} <= set(theirs)
        assert not any(k.startswith("layer4.") for k in theirs)
    torch.save({"state_dict": theirs}, tmp_path / "last_checkpoint.pth.tar")
    flag = [] if backbone == "vgg16" or large else ["--no-large-feature-map"]  # ResNet50: on by default
    argv = ["import-checkpoint", "--from", "bgc", str(tmp_path / "last_checkpoint.pth.tar"), str(tmp_path / "o.pt")]
    assert main(argv + flag) == 0
    loaded, _ = load_model(tmp_path / "o.pt")
    assert loaded.layout == model.layout
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_what_does_not_fit_is_refused_by_key():
    state = authors_vgg16(4)
    with pytest.raises(CheckpointError, match="neither the BGC authors' VGG16"):
        convert_state_dict({"layer1.0.conv1.weight": torch.zeros(1)}, "x.pth")
    with pytest.raises(CheckpointError, match="x.pth: a BGC vgg16 state dict needs fc.weight"):
        convert_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, "x.pth")
    with pytest.raises(CheckpointError, match="classifier_A"):
        convert_state_dict({**state, "classifier_A.0.weight": torch.zeros(1)}, "x.pth")


def test_inception_v3_bgc_has_no_authors_layout_to_export():
    """InceptionV3 BGC is mnpo's extension: exporting it to the authors' names is refused, naming it."""
    model = build_model("inception_v3-bgc", 3, width=1 / 16)
    with pytest.raises(ValueError, match="inception_v3-bgc is mnpo's extension"):
        export_state_dict(model)
