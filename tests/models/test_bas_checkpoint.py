"""`mnpo import-checkpoint --from bas`: the BAS authors' state dict names, written out by hand
from their model files, map onto our networks; round trips; what does not fit is refused by key."""

import pytest
import torch

from mnpo.cli import main
from mnpo.models import build_model, load_model
from mnpo.models.bas_checkpoint import convert_state_dict, export_state_dict, import_checkpoint
from mnpo.models.checkpoint import CheckpointError

WIDTH = 1 / 16


def c(n):
    return int(n * WIDTH)


def authors_vgg16(classes, copies=False):
    """Their ``Model/vgg.py`` names and shapes (width 1/16 here), random values."""
    g = torch.Generator().manual_seed(0)
    state, cin = {}, 3
    for stage, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for i in range(1, convs + 1):
            state[f"conv{stage}_{i}.weight"] = torch.randn(c(width), cin, 3, 3, generator=g)
            state[f"conv{stage}_{i}.bias"] = torch.randn(c(width), generator=g)
            cin = c(width)
    shapes = {"classifier_cls.0": (c(1024), c(512), 3, 3), "classifier_cls.2": (c(1024), c(1024), 3, 3),
              "classifier_cls.4": (classes, c(1024), 1, 1), "classifier_loc.0": (classes, c(512), 3, 3)}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(*shape, generator=g)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    if copies:  # ILSVRC's registered frozen copies
        for i in (1, 2, 3):
            state[f"conv_copy_5_{i}.weight"] = state[f"conv5_{i}.weight"].clone()
            state[f"conv_copy_5_{i}.bias"] = state[f"conv5_{i}.bias"].clone()
        for k in ("classifier_cls.0", "classifier_cls.2", "classifier_cls.4"):
            for p in ("weight", "bias"):
                state[f"{k.replace('cls', 'cls_copy')}.{p}"] = state[f"{k}.{p}"].clone()
    return state


def test_authors_vgg16_names_map_and_the_network_computes_theirs():
    state = authors_vgg16(7)
    model = convert_state_dict({f"module.{k}": v for k, v in state.items()}, "vgg.pth.tar")
    assert model.layout.backbone == "vgg16" and model.num_classes == 7 and model.layout.width == WIDTH
    assert torch.equal(model.backbone.features[28].weight, state["conv5_3.weight"])
    assert torch.equal(model.backbone.features[0].bias, state["conv1_1.bias"])
    assert torch.equal(model.cls_head[4].weight, state["classifier_cls.4.weight"])
    assert torch.equal(model.generator[0].weight, state["classifier_loc.0.weight"])
    # their forward from the file's tensors: conv+ReLU stages with 2x2 pools, x4 after conv4_3
    x = torch.randn(2, 3, 32, 32)
    h = x
    for stage, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, convs + 1):
            h = torch.relu(torch.nn.functional.conv2d(h, state[f"conv{stage}_{i}.weight"], state[f"conv{stage}_{i}.bias"],
                                                      padding=1))
        if stage == 4:
            x4 = h
        if stage < 5:
            h = torch.nn.functional.max_pool2d(h, 2)
    for i, pad in ((0, 1), (2, 1), (4, 0)):
        h = torch.relu(torch.nn.functional.conv2d(h, state[f"classifier_cls.{i}.weight"],
                                                  state[f"classifier_cls.{i}.bias"], padding=pad))
    saliency = torch.sigmoid(torch.nn.functional.conv2d(x4, state["classifier_loc.0.weight"],
                                                        state["classifier_loc.0.bias"], padding=1))
    with torch.no_grad():
        out = model(x, return_features=True)
    torch.testing.assert_close(out.logits[0], h.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features["generator"], saliency, rtol=1e-5, atol=1e-6)


def test_ilsvrc_copies_are_left_out_and_the_round_trip_holds(tmp_path):
    state = authors_vgg16(4, copies=True)
    torch.save(state, tmp_path / "vgg.pth.tar")
    summary = import_checkpoint(tmp_path / "vgg.pth.tar", tmp_path / "ours.pt")
    assert summary["dropped_copies"] == 12 and summary["tensors"] == len(state) - 12 and summary["num_classes"] == 4
    loaded, payload = load_model(tmp_path / "ours.pt")
    assert payload["meta"]["bas"]["dropped_copies"] == 12
    back = export_state_dict(loaded)
    assert set(back) == {k for k in state if "_copy" not in k}
    assert all(torch.equal(back[k], state[k]) for k in back)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "inception_v3"])
def test_round_trip_from_our_networks(backbone, tmp_path):
    torch.manual_seed(1)
    model = build_model(f"{backbone}-bas", 6, width=WIDTH).eval()
    theirs = export_state_dict(model)
    assert {"vgg16": "conv5_3.weight", "resnet50": "layer4.2.bn3.running_var",
            "inception_v3": "Mixed_7c.branch_pool.bn.running_var"}[backbone] in theirs
    assert "classifier_loc.0.weight" in theirs and not any(k.startswith(("backbone.", "cls_head.")) for k in theirs)
    torch.save({"state_dict": theirs}, tmp_path / "m.pth")
    assert main(["import-checkpoint", "--from", "bas", str(tmp_path / "m.pth"), str(tmp_path / "ours.pt")]) == 0
    loaded, _ = load_model(tmp_path / "ours.pt")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_cub_inception_head_named_classifier_is_read_too():
    """Their CUB InceptionV3 calls its head ``classifier`` (ILSVRC's and the others'
    ``classifier_cls``); ``Mixed_7*_copy`` (ILSVRC) are left out."""
    torch.manual_seed(2)
    model = build_model("inception_v3-bas", 3, width=WIDTH).eval()
    theirs = {k.replace("classifier_cls.", "classifier."): v for k, v in export_state_dict(model).items()}
    theirs.update({k.replace("Mixed_7a.", "Mixed_7a_copy."): v.clone() for k, v in theirs.items()
                   if k.startswith("Mixed_7a.")})
    loaded = convert_state_dict(theirs, "inception.pth")
    assert loaded.layout.backbone == "inception_v3" and loaded.layout.width == WIDTH and loaded.num_classes == 3
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_what_does_not_fit_is_refused_by_key(tmp_path):
    state = authors_vgg16(5)
    with pytest.raises(CheckpointError, match="none of the BAS authors' VGG16"):
        convert_state_dict({"fc.weight": torch.zeros(2, 2)}, "x.pth")
    missing = {k: v for k, v in state.items() if not k.startswith("classifier_loc")}
    with pytest.raises(CheckpointError, match="x.pth: a BAS vgg16 state dict needs classifier_loc.0.weight"):
        convert_state_dict(missing, "x.pth")
    other = dict(state, **{"classifier_loc.0.weight": torch.zeros(3, c(512), 3, 3), "classifier_loc.0.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="classifier_loc.0.weight has 3 classes but classifier_cls.4.weight 5"):
        convert_state_dict(other, "x.pth")
    extra = dict(state, **{"fc.weight": torch.zeros(5, 5)})
    with pytest.raises(CheckpointError, match="fc.weight"):
        convert_state_dict(extra, "x.pth")
    bad = dict(state, **{"conv5_1.weight": torch.zeros(c(512), c(512), 1, 1)})
    with pytest.raises(CheckpointError, match="conv5_1|features.24.weight"):
        convert_state_dict(bad, "x.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        import_checkpoint(tmp_path / "list.pth", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()
