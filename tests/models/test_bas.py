"""BAS (``mnpo.models.bas``, ``bas_loss``): the network's shapes and taps, the frozen background
branch against the authors' deep copy, the loss against a per-image float64 loop from the spec,
the test map and ``top_k``, the CAM family at ``head``, the optimizer's four groups."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnpo.engine.config import config_from_dict
from mnpo.engine.train import build_optimizer
from mnpo.engine.training_methods import BAS_WEIGHTS, bas_loss
from mnpo.maps import compute_maps, normalize_maps, resize_maps
from mnpo.models import LayoutError, MethodLayout, build_model

BACKBONES = ("vgg16", "resnet50", "inception_v3")


def make(backbone, classes=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_model(f"{backbone}-bas", classes, width=1 / 16).to(dtype)


def path_and_head_names(model):
    """The parameters of the classification path after the generator's input, and of ``cls``."""
    backbone = model.layout.backbone
    if backbone == "resnet50":
        path = {f"backbone.layer4.{n}" for n, _ in model.backbone.layer4.named_parameters()}
    elif backbone == "inception_v3":
        path = {n for n, _ in model.named_parameters() if n.startswith("mixed7.")}
    else:
        path = {n for n, _ in model.named_parameters() if n.startswith("backbone.features.")
                and int(n.split(".")[2]) > model.backbone._tap_index["conv4_3"]}
    return path | {n for n, _ in model.named_parameters() if n.startswith("cls_head.")}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_taps_and_scores_are_gap_of_the_head(backbone):
    """At 64 px: the generator's input at stride 8 (8 x 8), F at 16 (4 x 4) with K channels, the
    scores GAP(F) through the identity classifier, which is neither trained nor saved."""
    model = make(backbone).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = model(x, return_features=True)
    assert out.features["main"].shape == (2, 5, 4, 4) and out.features["generator"].shape == (2, 5, 8, 8)
    assert (out.features["main"] >= 0).all()  # cls ends in a ReLU
    assert ((out.features["generator"] > 0) & (out.features["generator"] < 1)).all()  # a sigmoid
    torch.testing.assert_close(out.logits[0], out.features["main"].mean((2, 3)), rtol=0, atol=0)
    assert len(out.logits) == 1 and not any(k.startswith("bas_") for k in out.features)  # eval: no branch
    assert not any("scores" in n for n, _ in model.named_parameters())
    assert not any("scores" in k for k in model.state_dict())
    assert torch.equal(model.classifier.weight, torch.eye(5, dtype=torch.float64))
    if backbone == "resnet50":  # layer4 after BAS's pool is BAS's feature, not the backbone's tap
        assert "layer4" in model.head_features and "layer4" not in model.backbone.taps
        assert out.features["layer4"].shape[-2:] == (4, 4)
    if backbone == "inception_v3":  # Mixed_6e at stride 8 (no pool before Mixed_6a), Mixed_7* to 16
        assert model.backbone.taps["Mixed_6e"].stride == 8 and "Mixed_7c" in model.head_features
        assert out.features["Mixed_7c"].shape[1:] == (128, 4, 4)


def test_layouts_refuse_the_large_feature_map():
    with pytest.raises(LayoutError, match="large_feature_map does not apply"):
        MethodLayout("bas", "vgg16", large_feature_map=True)
    assert MethodLayout.from_dict(MethodLayout("bas", "resnet50", 0.5).to_dict()) == MethodLayout("bas", "resnet50", 0.5)


def authors_background(model, x, saliency):
    """The authors' way: deep copies of the path and of cls (in the model's mode), run on the
    erased generator input; their scores ``(B, K)``."""
    path = copy.deepcopy(model.path_modules())
    cls = copy.deepcopy(model.cls_head)
    erased = x.detach() * (1 - saliency)
    if model.layout.backbone == "resnet50":
        erased = F.max_pool2d(erased, 2)
    return cls(path(erased)).mean((2, 3))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_background_branch_is_the_frozen_copy_and_only_the_generator_learns_from_it(backbone):
    """The background scores equal the authors' deep copies' on the erased input (BatchNorm in
    training mode on the batch, as their copy); their gradient reaches no weight of the path or of
    cls (the frozen copies), and reaches the generator (and, through its input, the backbone
    before it, as in the authors' code: only ``x`` in ``x * (1 - S)`` is detached); the live
    BatchNorm statistics move as without the branch."""
    model = make(backbone).train()
    labels = torch.tensor([1, 4, 0])
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    out = model(x, return_features=True, labels=labels)
    with torch.no_grad():
        generator_input = twin.backbone(x, (twin.generator_tap,))[twin.generator_tap]
    expected = authors_background(twin, generator_input, out.features["bas_saliency"].detach())
    torch.testing.assert_close(out.features["bas_background"], expected, rtol=1e-12, atol=1e-12)
    # the saliency is the label's generator map
    rows = torch.arange(3)
    torch.testing.assert_close(out.features["bas_saliency"][:, 0], out.features["generator"][rows, labels])
    grads = torch.autograd.grad(out.features["bas_background"][rows, labels].sum(),
                                [p for _, p in model.named_parameters()], allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    frozen = path_and_head_names(model)
    assert len(frozen) > 6 and all(named[n] is None or not named[n].any() for n in frozen)
    first = {"vgg16": "backbone.features.0.weight", "resnet50": "backbone.conv1.weight",
             "inception_v3": "backbone.Conv2d_1a_3x3.conv.weight"}[backbone]
    reached = ("generator.0.weight", "generator.0.bias", first)
    assert all(named[n] is not None and named[n].abs().sum() > 0 for n in reached)
    # BatchNorm's running statistics: as a forward without the background branch leaves them
    plain(x)  # no labels: no background branch
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


def naive_bas_loss(score1, score2, background, saliency, labels, beta, lambda_fg):
    """The spec's loss, image by image in float64 NumPy."""
    def ce(row, y):
        row = np.asarray(row, np.float64)
        return float(np.log(np.exp(row - row.max()).sum()) + row.max() - row[y])

    total_ce, total_ce2, ratios, areas = 0.0, 0.0, 0.0, 0.0
    n = len(labels)
    for b in range(n):
        y = int(labels[b])
        total_ce += ce(score1[b], y)
        total_ce2 += ce(score2[b], y)
        fg, bg = float(score1[b, y]), float(background[b, y])
        ratios += 0.0 if bg >= fg else bg / (fg + 1e-8)
        areas += float(np.mean(saliency[b]))
    return total_ce / n + lambda_fg * total_ce2 / n + ratios / n + beta * areas / n


@pytest.mark.parametrize("beta, lambda_fg", [(0.7, 0.0), (1.2, 0.5), (2.5, 1.0)])
def test_bas_loss_equals_the_naive_per_image_version(beta, lambda_fg):
    """Random scores with one image whose background score exceeds its foreground score (its
    ratio counts 0) and one equal (>=: 0 too), float64: equal within float64 rounding."""
    g = torch.Generator().manual_seed(3)
    score1 = torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    score2 = torch.rand(5, 4, generator=g, dtype=torch.float64)
    background = torch.rand(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 3])
    background[1, 3] = score1[1, 3] + 0.5
    background[2, 1] = score1[2, 1]
    saliency = torch.rand(5, 1, 6, 6, generator=g, dtype=torch.float64)
    features = {"bas_score2": score2, "bas_background": background, "bas_saliency": saliency}
    got = bas_loss(score1, features, labels, beta, lambda_fg)
    want = naive_bas_loss(score1.numpy(), score2.numpy(), background.numpy(), saliency.numpy(), labels, beta, lambda_fg)
    assert got.dtype == torch.float64 and abs(float(got) - want) < 1e-13


def test_bas_loss_detaches_the_foreground_score():
    """``S_fg`` is detached: the ratio's gradient reaches the background score only, so score1's
    gradient is CE's alone."""
    score1 = torch.tensor([[2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    background = torch.tensor([[0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    features = {"bas_score2": torch.zeros(1, 2, dtype=torch.float64), "bas_background": background,
                "bas_saliency": torch.zeros(1, 1, 2, 2, dtype=torch.float64)}
    bas_loss(score1, features, torch.tensor([0]), 1.0, 0.0).backward()
    p = torch.softmax(score1.detach(), 1)[0]
    torch.testing.assert_close(score1.grad[0], torch.stack([p[0] - 1, p[1]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(background.grad[0], torch.tensor([1 / (2.0 + 1e-8), 0.0], dtype=torch.float64))


def test_bas_weights_are_the_authors():
    assert BAS_WEIGHTS["cub"] == {"vgg16": (0.7, 0.0), "resnet50": (1.2, 0.5), "inception_v3": (1.0, 0.5)}
    assert BAS_WEIGHTS["ilsvrc"] == {"vgg16": (1.0, 0.05), "resnet50": (2.0, 1.0), "inception_v3": (2.5, 1.0)}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cam_is_the_generator_map_and_top_k_its_class_mean(backbone):
    """``cam``: the generator's map of the target, resized (bicubic) and min-max normalized; without
    targets the predicted class's; ``top_k``: the mean of the k best-scored classes' maps."""
    model = make(backbone).eval()
    with torch.no_grad():  # lift the scores off the final ReLU's zero, where classes tie (topk's tie order is unstated)
        model.cls_head[4].bias.add_(1.0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = torch.tensor([2, 0])
    with torch.no_grad():
        out = model(x, return_features=True)
    generator, logits = out.features["generator"], out.logits[0]

    def check(maps, raw):
        """Against ``raw`` resized and normalized: a class mean summed in another order differs by
        a few float64 roundings of the values (< 1), which the normalization divides by the map's
        range (small on a random network's sigmoid maps): 64 eps / range bounds it."""
        resized = resize_maps(raw, (64, 64), "bicubic")
        span = float((resized.flatten(1).amax(1) - resized.flatten(1).amin(1)).min())
        torch.testing.assert_close(maps, normalize_maps(resized), rtol=0, atol=64 * 2.0**-52 / span)

    maps, got_logits = compute_maps(model, x, targets, method="cam")
    check(maps, generator[torch.arange(2), targets])
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    maps, _ = compute_maps(model, x, None, method="cam")
    check(maps, generator[torch.arange(2), logits.argmax(1)])
    order = logits.argsort(1, descending=True)
    top3, _ = compute_maps(model, x, targets, method="cam", top_k=3)
    check(top3, torch.stack([generator[b, order[b, :3]].mean(0) for b in range(2)]))
    all5, _ = compute_maps(model, x, targets, method="cam", top_k=5)
    check(all5, generator.mean(1))
    assert (top3 - all5).abs().max() > 1e-3  # the classes averaged matter


def test_top_k_is_refused_off_bas_and_out_of_range():
    model = make("vgg16").eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"top_k=6: expected 1 \.\. 5"):
        compute_maps(model, x, torch.tensor([0]), method="cam", top_k=6)
    with pytest.raises(ValueError, match="top_k=0: expected a positive int"):
        compute_maps(model, x, torch.tensor([0]), method="cam", top_k=0)
    with pytest.raises(ValueError, match="top_k=2 is BAS's test map .* not method 'gradcam'"):
        compute_maps(model, x, torch.tensor([0]), method="gradcam", top_k=2)
    other = build_model("vgg16-cam", 5, width=1 / 16).eval()
    with pytest.raises(ValueError, match="top_k=2 is BAS's test map .* on MultiBranchNet"):
        compute_maps(other, torch.randn(1, 3, 32, 32), torch.tensor([0]), method="cam", top_k=2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_cam_family_at_head_reads_the_class_head(backbone):
    """At ``head`` GAP alone gives the scores (identity classifier): Grad-CAM's weights are one-hot
    (1 / hw on the target channel), so Grad-CAM, HiResCAM and XGrad-CAM are ``F[y]`` resized and
    normalized; MNPO with H off on the one branch is too."""
    model = make(backbone).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    with torch.no_grad():
        head = model(x, return_features=True).features["main"]
    expected = normalize_maps(resize_maps(head[torch.arange(2), targets], (64, 64), "bicubic"))
    for method, options in (("gradcam", {}), ("hirescam", {}), ("xgradcam", {}), ("mnpo", {"a": 1.0, "b": 1.0})):
        maps, _ = compute_maps(model, x, targets, method=method, **options)
        torch.testing.assert_close(maps, expected, rtol=0, atol=1e-9, msg=method)


def test_gradient_methods_reach_resnet_layer4_after_the_pool():
    """``target_layer="layer4"`` on the ResNet50 BAS network is BAS's layer4 (after its pool): its
    Grad-CAM at 4 x 4 differs from none of CAM-like maps' shapes and is finite."""
    model = make("resnet50").eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    maps, _ = compute_maps(model, x, torch.tensor([0, 1]), method="gradcam", target_layer="layer4")
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and (maps.amax((1, 2)) == 1).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bas_optimizer_groups_are_the_authors(backbone, tmp_path):
    """``new_layer_lr_ratio: 10``, ``bias_lr_ratio: 2``: backbone weights at lr, the new layers'
    (cls, generator) at 10 lr, the backbone biases at 2 lr, the new biases at 20 lr; ResNet50's
    layer4 is the backbone's (the authors group by ``classifier`` in the name)."""
    cfg = config_from_dict({
        "data": {"root": str(tmp_path), "metadata": str(tmp_path)},
        "model": {"layout": f"{backbone}-bas", "width": 0.0625, "pretrained": None},
        "method": {"name": "bas"},
        "optim": {"lr": 0.001, "new_layer_lr_ratio": 10, "bias_lr_ratio": 2},
    })
    model = make(backbone, dtype=torch.float32)
    groups = build_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.01, 0.002, 0.02])
    names = {id(p): n for n, p in model.named_parameters()}
    members = [{names[id(p)] for p in g["params"]} for g in groups]
    new = lambda n: n.startswith(("cls_head.", "generator."))  # noqa: E731 (Mixed_7*: the backbone's rate)
    assert all(not new(n) and not n.endswith(".bias") for n in members[0])
    assert all(new(n) and not n.endswith(".bias") for n in members[1])
    assert all(not new(n) and n.endswith(".bias") for n in members[2])
    assert all(new(n) and n.endswith(".bias") for n in members[3])
    assert set().union(*members) == set(names.values())
    if backbone == "resnet50":
        assert "backbone.layer4.0.conv1.weight" in members[0]
    single = config_from_dict({**cfg.to_dict(), "optim": {**cfg.to_dict()["optim"], "bias_lr_ratio": 1.0}})
    assert len(build_optimizer(model, single).param_groups) == 2


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_new_layers_are_initialized_as_the_authors(backbone):
    """VGG16: N(0, 0.02) weights and PyTorch's default biases (their weight_init leaves biases
    alone); ResNet50: Xavier-uniform weights and zero biases."""
    torch.manual_seed(0)
    net = build_model(f"{backbone}-bas", 7, width=0.25)
    convs = [m for h in (net.cls_head, net.generator) for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    if backbone == "vgg16":
        assert abs(weights.std().item() - 0.02) < 0.001  # >1e5 draws: the std's error is ~5e-5
        for m in convs:
            bound = 1 / (m.weight[0].numel() ** 0.5)
            assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0.5 * bound
    else:
        for m in convs:
            fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert not m.bias.any()
