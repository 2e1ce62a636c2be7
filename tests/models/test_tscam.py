"""TS-CAM: its network, its test map against a naive float64 version from the definition, every
map method on it, its layout's round trip and refusals, ImageNet DeiT weights from a file or
timm, and the authors' checkpoints."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mnpo.maps import compute_maps
from mnpo.maps.methods import METHODS
from mnpo.models import LayoutError, MethodLayout, build_model, layout_from_dict
from mnpo.models.checkpoint import CheckpointError
from mnpo.models.transformer_checkpoint import convert_state_dict, export_state_dict, identify, import_checkpoint
from mnpo.models.weights import WeightsError
from naive_vit import naive_deit, perturbed


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    return perturbed(build_model("deit_small-tscam", 4, width=0.0625).eval())


def naive_tscam(model, images, classes):
    """Float64: logits GAP(conv3x3(final patch tokens)) and TS-CAM's map, summed class-token
    attention (head mean) times the class's semantic map, from the definition."""
    _, attentions, finals = naive_deit(model.backbone, images)
    h, w = images.shape[-2] // 16, images.shape[-1] // 16
    weight, bias = model.head.weight.double(), model.head.bias.double()
    logits, maps = [], []
    for i in range(len(images)):
        grid = finals[i][1:].T.reshape(1, -1, h, w)
        semantic = F.conv2d(grid, weight, bias, padding=1)[0]
        logits.append(semantic.mean((1, 2)))
        attention = sum(a.mean(0)[0, 1:] for a in attentions[i]).reshape(h, w)
        maps.append(attention * semantic[classes[i]])
    return torch.stack(logits), torch.stack(maps)


def test_logits_and_the_test_map_equal_the_naive_definition(net):
    images = torch.randn(3, 3, 64, 64)
    classes = torch.tensor([0, 3, 1])
    logits, raw = naive_tscam(net, images, classes)
    with torch.no_grad():
        assert torch.allclose(net(images).logits[0].double(), logits, atol=1e-5)
    maps, got_logits = compute_maps(net, images, classes, method="cam", resize="bilinear")  # TS-CAM's resize
    resized = F.interpolate(raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    low, high = resized.amin((1, 2), keepdim=True), resized.amax((1, 2), keepdim=True)
    expected = (resized - low) / (high - low)
    assert torch.allclose(maps.double(), expected, atol=1e-4)
    # without targets: the predicted class's map
    predicted, _ = compute_maps(net, images, None, method="cam")
    again, _ = compute_maps(net, images, got_logits.argmax(1), method="cam")
    assert torch.equal(predicted, again)


def test_cam_at_the_head_is_the_semantic_map_alone_and_every_method_runs(net):
    images = torch.randn(2, 3, 48, 48)
    targets = torch.tensor([2, 0])
    ts, _ = compute_maps(net, images, targets, method="cam")
    grad, _ = compute_maps(net, images, targets, method="gradcam", target_layer="head", resize="bilinear")
    with torch.no_grad():
        semantic = net(images, return_features=True).features["main"][torch.arange(2), targets]
    # Grad-CAM at the head: GAP's gradient is 1/hw everywhere, so the ReLU of the semantic map
    relu = F.interpolate(semantic.clamp(min=0)[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    relu = (relu - relu.amin((1, 2), keepdim=True)) / (relu.amax((1, 2), keepdim=True) - relu.amin((1, 2), keepdim=True))
    assert torch.allclose(grad, relu, atol=1e-4)
    assert not torch.allclose(ts, grad, atol=1e-2)  # TS-CAM's map is not the semantic map's
    for method in METHODS:
        maps, logits = compute_maps(net, images, targets, method=method)
        assert maps.shape == (2, 48, 48) and logits.shape == (2, 4) and torch.isfinite(maps).all(), method


def test_layout_round_trip_parameters_and_refusals():
    layout = MethodLayout("tscam", "deit_small", drop_path=0.1)
    assert layout_from_dict(layout.to_dict()) == layout
    model = build_model(layout, 200)
    # timm's deit_small (22,050,664) less its Linear(384, 1000) head, plus the 3x3 conv head to 200
    assert sum(p.numel() for p in model.parameters()) == 22_050_664 - 385_000 + 384 * 200 * 9 + 200
    assert model.backbone.blocks[11].drop_path1.p == pytest.approx(0.1)
    with pytest.raises(LayoutError, match=r"the tscam network is built on \('deit_tiny', 'deit_small', 'deit_base'\)"):
        MethodLayout("tscam", "vgg16")
    with pytest.raises(LayoutError, match="drop_path=0.1 is a transformer option"):
        MethodLayout("bas", "vgg16", drop_path=0.1)
    with pytest.raises(LayoutError, match="large_feature_map is a CNN option"):
        MethodLayout("tscam", "deit_tiny", large_feature_map=True)
    with pytest.raises(LayoutError, match="the bgc network is built on"):
        MethodLayout("bgc", "deit_small")


def _timm_state(dim=192, heads=3, classes=1000):
    torch.manual_seed(5)
    reference = build_model("deit_tiny-tscam", 7).backbone
    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    state.update({"head.weight": torch.randn(classes, dim), "head.bias": torch.randn(classes)})
    return state


def test_imagenet_deit_weights_load_by_name_from_a_file_and_refuse_a_distilled_one(tmp_path):
    state = _timm_state()
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": state}, path)  # the official files' layout
    model = build_model("deit_tiny-tscam", 7, pretrained=str(path))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[name]), name
    distilled = {**state, "dist_token": torch.zeros(1, 1, 192)}
    torch.save(distilled, tmp_path / "distilled.pth")
    with pytest.raises(WeightsError, match=r"dist_token.*a distilled DeiT"):
        build_model("deit_tiny-tscam", 7, pretrained=str(tmp_path / "distilled.pth"))


def test_imagenet_goes_through_timm_by_its_deit_name(monkeypatch):
    asked = []
    state = _timm_state()

    def create_model(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        return types.SimpleNamespace(state_dict=lambda: state)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    model = build_model("deit_tiny-tscam", 7, pretrained="imagenet")
    assert asked == [("deit_tiny_patch16_224", True)]
    assert torch.equal(model.backbone.pos_embed, state["pos_embed"])
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(WeightsError, match="needs timm .*deit_tiny_patch16_224-a1311bcf.pth"):
        build_model("deit_tiny-tscam", 7, pretrained="imagenet")


def test_authors_checkpoints_import_by_name_and_round_trip(tmp_path):
    """Names written out from their TSCAM (timm's VisionTransformer, head a 3x3 conv), saved under
    DataParallel as train_cam.py saves them."""
    torch.manual_seed(6)
    theirs = {"cls_token": torch.randn(1, 1, 192), "pos_embed": torch.randn(1, 197, 192),
              "patch_embed.proj.weight": torch.randn(192, 3, 16, 16), "patch_embed.proj.bias": torch.randn(192),
              "norm.weight": torch.randn(192), "norm.bias": torch.randn(192),
              "head.weight": torch.randn(5, 192, 3, 3), "head.bias": torch.randn(5)}
    for b in range(12):
        for name, shape in (("norm1.weight", (192,)), ("norm1.bias", (192,)), ("attn.qkv.weight", (576, 192)),
                            ("attn.qkv.bias", (576,)), ("attn.proj.weight", (192, 192)), ("attn.proj.bias", (192,)),
                            ("norm2.weight", (192,)), ("norm2.bias", (192,)), ("mlp.fc1.weight", (768, 192)),
                            ("mlp.fc1.bias", (768,)), ("mlp.fc2.weight", (192, 768)), ("mlp.fc2.bias", (192,))):
            theirs[f"blocks.{b}.{name}"] = torch.randn(shape)
    src = tmp_path / "model_best.pth"
    torch.save({"epoch": 60, "state_dict": {f"module.{k}": v for k, v in theirs.items()}, "best_map": 0.9}, src)
    summary = import_checkpoint(src, tmp_path / "ours.pt")
    assert summary["layout"] == "deit_tiny-tscam" and summary["num_classes"] == 5 and summary["tensors"] == len(theirs)
    model = convert_state_dict(theirs)
    assert torch.equal(model.head.weight, theirs["head.weight"])
    assert torch.equal(model.backbone.blocks[7].attn.qkv.bias, theirs["blocks.7.attn.qkv.bias"])
    back = export_state_dict(model)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    with pytest.raises(CheckpointError, match="dist_token"):
        convert_state_dict({**theirs, "dist_token": torch.zeros(1, 1, 192)})
    with pytest.raises(CheckpointError, match=r"head.weight is \(5, 192\); TS-CAM's head is a 3x3 convolution"):
        identify({**theirs, "head.weight": torch.zeros(5, 192)})
    with pytest.raises(CheckpointError, match="cls_token is 100 wide"):
        identify({**theirs, "cls_token": torch.zeros(1, 1, 100)})
    with pytest.raises(CheckpointError, match="pos_embed holds 50 positions"):
        identify({**theirs, "pos_embed": torch.zeros(1, 50, 192)})
    with pytest.raises(CheckpointError, match="cls_token is missing"):
        identify({k: v for k, v in theirs.items() if k != "cls_token"})
    with pytest.raises(CheckpointError, match="blocks.11.mlp.fc2.bias"):
        convert_state_dict({k: v for k, v in theirs.items() if k != "blocks.11.mlp.fc2.bias"})
