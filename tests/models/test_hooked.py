"""Maps of any classifier through hooks (``mnpo.models.hooked``): torchvision models with random
weights against pytorch-grad-cam 1.5.7, the CAM identity on a GAP + linear head, output types,
token layouts, the automatic layer, refusals, and what the hooks leave behind."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from numerics import sum_bound
from torch import nn

from mnpo.maps import compute_maps, normalize_maps, resize_maps
from mnpo.models.hooked import GridLayout, HookedSource, LayerError, grid_layout, scores_of

GRADIENT_FAMILY = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam")
LIBRARY_CLASS = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
                 "layercam": "LayerCAM", "hirescam": "HiResCAM", "scorecam": "ScoreCAM",
                 "ablationcam": "AblationCAM", "eigencam": "EigenCAM"}
# pytorch-grad-cam casts to float32 before its resize (cv2 INTER_LINEAR: 4 taps of values <= 1)
# and min-max normalizes twice with +1e-7 in the denominator, after float32 passes of sums of up to
# 16 terms; ours stays in float64 (as in tests/maps/test_cam_family.py)
LIBRARY_BOUND = 2 * 3 * sum_bound(torch.float32, 16) + 2 * 1e-7


def small_vit(num_classes=10, image_size=64):
    """torchvision's ``VisionTransformer`` (the class of ``vit_b_16``, same module names) at two
    layers of width 48, patch 16; its zero-initialized head given random weights."""
    model = torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=48, mlp_dim=96, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def build(name, seed=0):
    torch.manual_seed(seed)
    if name == "vit":
        model = small_vit()
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    return model.double().eval()


def vit_tokens_to_grid(t):
    """pytorch-grad-cam's documented ViT reshape: drop the class token, (B, h, w, C) -> (B, C, h, w)."""
    side = int(round((t.shape[1] - 1) ** 0.5))
    return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


def channels_last_to_grid(t):
    return t.permute(0, 3, 1, 2)


#: (model, layer, pytorch-grad-cam's reshape_transform)
ORACLE_LAYERS = [("resnet50", "layer4", None), ("resnet50", "layer3", None),
                 ("convnext_tiny", "features.7", None),
                 ("vit", "encoder.layers.encoder_layer_1.ln_1", vit_tokens_to_grid),
                 ("swin_t", "norm", channels_last_to_grid)]
_MODELS: dict[str, nn.Module] = {}


def model_of(name):
    if name not in _MODELS:
        _MODELS[name] = build(name)
    return _MODELS[name]


def inputs(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def library_maps(method, model, layer, images, targets, reshape):
    gradcam_lib = pytest.importorskip("pytorch_grad_cam", reason="grad-cam is in the test extras")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(gradcam_lib, LIBRARY_CLASS[method])
    kwargs = {"reshape_transform": reshape} if reshape is not None else {}
    with cam_class(model=model, target_layers=[model.get_submodule(layer)], **kwargs) as cam:
        chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        return cam(input_tensor=images, targets=chosen)


@pytest.mark.parametrize("name, layer, reshape", ORACLE_LAYERS, ids=[f"{m}-{l}" for m, l, _ in ORACLE_LAYERS])
@pytest.mark.parametrize("method", GRADIENT_FAMILY)
def test_gradient_family_equals_pytorch_grad_cam(name, layer, reshape, method):
    model = model_of(name)
    images = inputs()
    targets = torch.tensor([3, 7])
    ours, logits = compute_maps(model, images, targets, method=method, target_layer=layer, resize="bilinear")
    expected = library_maps(method, model, layer, images, targets, reshape)
    assert ours.shape == (2, 64, 64) and ours.dtype == torch.float64
    assert float(np.abs(ours.numpy() - expected).max()) <= LIBRARY_BOUND
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, layer, reshape", [ORACLE_LAYERS[0], ORACLE_LAYERS[3]], ids=["resnet50", "vit"])
def test_predicted_targets_equal_pytorch_grad_cam_without_targets(name, layer, reshape):
    model = model_of(name)
    images = inputs(seed=4)
    ours, _ = compute_maps(model, images, method="gradcam", target_layer=layer, resize="bilinear")
    expected = library_maps("gradcam", model, layer, images, None, reshape)
    assert float(np.abs(ours.numpy() - expected).max()) <= LIBRARY_BOUND


@pytest.mark.parametrize("method, layer", [("scorecam", "layer4"), ("ablationcam", "layer4"),
                                           ("ablationcam", "layer3")])
def test_score_and_ablation_cam_equal_pytorch_grad_cam(method, layer):
    """On resnet18 (512 channels at layer4): Ablation-CAM at layer4 takes the exact GAP + linear
    shortcut, at layer3 the network's suffix on ablated copies; the library ablates every time."""
    model = build("resnet18")
    images = inputs(size=64, seed=2)
    targets = torch.tensor([1, 5])
    ours, _ = compute_maps(model, images, targets, method=method, target_layer=layer, resize="bilinear",
                           chunk_size=64)
    expected = library_maps(method, model, layer, images, targets, None)
    # Score-CAM's softmax over 512 channel scores and Ablation-CAM's (y - y_c) / y pass through the
    # library's float32 resize and double normalization, as the gradient methods
    assert float(np.abs(ours.numpy() - expected).max()) <= LIBRARY_BOUND


def test_ablation_at_a_token_layer_runs_each_image_again_and_equals_the_definition():
    """At a ViT block's ln_1 the rest of the block also reads the block's input, so the fast path
    (replacing the layer's output alone) cannot run: each image is run once per ablated channel,
    and the weights equal the target score's relative drop computed channel by channel."""
    model = model_of("vit")
    layer = "encoder.layers.encoder_layer_1.ln_1"
    images = inputs(n=2, seed=3)
    targets = torch.tensor([2, 6])
    ours, _ = compute_maps(model, images, targets, method="ablationcam", target_layer=layer, chunk_size=8)
    module = model.get_submodule(layer)
    with torch.no_grad():
        captured = {}
        handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o.clone()))
        y = model(images).gather(1, targets[:, None])[:, 0]
        handle.remove()
        A = captured["A"]
        drops = torch.empty(2, A.shape[-1], dtype=torch.float64)
        for c in range(A.shape[-1]):
            def zero(m, i, o, c=c):
                o = o.clone()
                o[:, 1:, c] = 0  # channel c of every patch token; the class token stays
                return o
            handle = module.register_forward_hook(zero)
            drops[:, c] = y - model(images).gather(1, targets[:, None])[:, 0]
            handle.remove()
        grid = A[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        raw = torch.einsum("bc,bchw->bhw", drops / y[:, None], grid).clamp_min(0)
        expected = normalize_maps(resize_maps(raw, (64, 64)))
    assert float((ours - expected).abs().max()) <= 1e-9


def test_ablation_passes_hold_the_elements_of_chunk_size_images_where_only_the_suffix_runs(monkeypatch):
    """resnet18 at layer3 (256 x 4 x 4 at 64 px; the rest reads only its output): a pass takes
    chunk_size 3 64 64 / (256 4 4) = 3 chunk_size copies, k = 24 // 2 = 12 per image, 22 passes;
    at a ViT block's ln_1 (the block's residual reads its input too) k = chunk_size // 2 = 4 per
    image, each image run again. The probe decides the same for one image as for two."""
    seen = []
    original = HookedSource.ablated_logits
    monkeypatch.setattr(HookedSource, "ablated_logits",
                        lambda self, images, layer, copies: seen.append(copies.shape[0]) or original(
                            self, images, layer, copies))
    resnet, vit = model_of("resnet18"), model_of("vit")
    images = inputs(n=2, seed=4)
    compute_maps(resnet, images, torch.tensor([0, 1]), method="ablationcam", target_layer="layer3", chunk_size=8)
    assert seen == [24] * 21 + [2 * (256 - 21 * 12)]
    seen.clear()
    ln_1 = "encoder.layers.encoder_layer_1.ln_1"
    compute_maps(vit, images, torch.tensor([0, 1]), method="ablationcam", target_layer=ln_1, chunk_size=8)
    assert seen == [8] * 12  # 48 channels, 4 per image per pass
    for model, layer, suffix_only in ((resnet, "layer3", True), (resnet, "layer4", True), (vit, ln_1, False),
                                      (vit, "encoder.ln", True)):
        for n in (1, 2):
            source = HookedSource(model)
            source._known.pop("suffix_only", None)  # decided again, on n images
            assert source.ablation_runs_suffix(images[:n], layer) is suffix_only, (layer, n)


def test_eigencam_equals_pytorch_grad_cams_projection_on_tokens():
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model = model_of("vit")
    layer = "encoder.layers.encoder_layer_1.ln_1"
    images = inputs(seed=5)
    ours, _ = compute_maps(model, images, method="eigencam", target_layer=layer, resize="bilinear")
    source = HookedSource(model)
    A, _ = source.activations(images, layer)
    projection = torch.from_numpy(get_2d_projection(A.numpy())).double()
    flip = (projection * A.sum(1)).sum((1, 2)) < 0  # LAPACK's sign is arbitrary; ours follows sum_c A
    projection = torch.where(flip[:, None, None], -projection, projection)
    expected = normalize_maps(resize_maps(projection.clamp_min(0), (64, 64), "bilinear"))
    assert float((ours - expected).abs().max()) <= LIBRARY_BOUND


# --- cam and mnpo: GAP + one linear layer --------------------------------------------------


def test_cam_and_mnpo_on_resnet50_equal_einsum_over_the_fc_weights():
    model = model_of("resnet50")
    images = inputs(seed=6)
    targets = torch.tensor([0, 9])
    with torch.no_grad():
        captured = {}
        handle = model.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
        model(images)
        handle.remove()
    w = model.fc.weight[targets].detach()
    for method, weights in (("cam", w), ("mnpo", torch.where(w > 0, 10 * w, 5 * w))):
        raw = torch.einsum("bc,bchw->bhw", weights, captured["A"]) / w.shape[1]
        expected = normalize_maps(resize_maps(raw, (64, 64)))
        ours, _ = compute_maps(model, images, targets, method=method)
        assert float((ours - expected).abs().max()) <= 1e-12, method


@pytest.mark.parametrize("name, why", [("vit", "is not the spatial mean"), ("convnext_tiny", "is not the spatial mean")])
def test_cam_is_refused_where_the_head_is_not_gap_and_linear(name, why):
    for method in ("cam", "mnpo"):
        with pytest.raises(LayerError, match=why) as info:
            compute_maps(model_of(name), inputs(n=1), method=method)
        assert "global average pooling then one linear layer" in str(info.value)


def test_ablation_at_the_cam_head_uses_the_exact_shortcut_only_where_it_is_exact():
    source = HookedSource(model_of("resnet50"))
    images = inputs(n=1)
    source.prepare(images)
    assert source.head_weight(images, "layer4") is model_of("resnet50").fc.weight
    assert source.head_weight(images, "layer3") is None
    assert HookedSource(model_of("convnext_tiny")).head_weight(images, "features.7") is None


# --- outputs, layouts, layers -----------------------------------------------------------------


class Wrapped(nn.Module):
    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        scores = self.net(x)
        if self.kind == "logits":
            return SimpleNamespace(logits=scores, hidden_states=None)  # a Hugging Face ModelOutput's shape
        if self.kind == "dict":
            return {"logits": scores, "aux": scores * 0}
        return (scores, x.mean())


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).double().eval()


@pytest.mark.parametrize("kind", ["logits", "dict", "tuple"])
@pytest.mark.parametrize("method", ["gradcam", "cam", "scorecam", "ablationcam", "mnpos"])
def test_model_outputs_other_than_a_tensor_give_the_tensor_models_maps(kind, method):
    net = tiny_cnn()
    images = inputs(n=3, size=16)
    plain, plain_logits = compute_maps(net, images, method=method, target_layer="2")
    wrapped, logits = compute_maps(Wrapped(net, kind).eval(), images, method=method, target_layer="net.2")
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)


@pytest.mark.parametrize("output, message", [("text", "expected class scores"), (torch.zeros(2, 3, 4), "(B, K)")])
def test_outputs_that_are_not_scores_are_refused(output, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        scores_of(output)


@pytest.mark.parametrize("shape, size, layout", [
    ((2, 768, 14, 14), (224, 224), GridLayout("map", (14, 14))),
    ((2, 197, 768), (224, 224), GridLayout("tokens", (14, 14), 1)),   # ViT: class token
    ((2, 198, 384), (224, 224), GridLayout("tokens", (14, 14), 2)),   # DeiT: class + distillation
    ((2, 201, 768), (224, 224), GridLayout("tokens", (14, 14), 5)),   # class + 4 registers
    ((2, 7, 7, 768), (224, 224), GridLayout("channels_last", (7, 7))),  # Swin
    ((2, 1 + 12 * 16, 64), (192, 256), GridLayout("tokens", (12, 16), 1)),  # a 3:4 input
])
def test_grid_layouts(shape, size, layout):
    assert grid_layout(shape, size) == layout
    t = torch.arange(float(np.prod(shape))).reshape(shape)
    grid = layout.to_grid(t)
    assert grid.shape == (shape[0], *((shape[-1],) if layout.kind != "map" else (shape[1],)), *layout.grid)
    if layout.kind == "tokens":  # position (i, j) is token prefix + i w + j
        i, j = 1, 2
        torch.testing.assert_close(grid[:, :, i, j], t[:, layout.prefix + i * layout.grid[1] + j])
    assert torch.equal(layout.from_grid(grid, t), t)  # and back


def test_a_token_count_without_a_grid_names_what_it_tried():
    with pytest.raises(ValueError, match=r"180 tokens .* 0-8 leading tokens \(tried 0 \+ 13x13"):
        grid_layout((2, 180, 64), (224, 224))
    with pytest.raises(ValueError, match="neither"):
        grid_layout((2, 5, 3, 3), (224, 112))


@pytest.mark.parametrize("name, expected", [("resnet50", "layer4"), ("convnext_tiny", "features"),
                                            ("vit", "encoder.layers.encoder_layer_1.ln_1"), ("swin_t", "permute")])
def test_auto_layer_is_the_last_map_the_scores_reach_and_is_logged(name, expected, caplog):
    """ViT: the final norm's and the last block's patch tokens get no gradient from the class token,
    so the last block's ln_1 is the layer; ResNet: layer4, not layer4.2.relu (run 3 times)."""
    source = HookedSource(model_of(name))
    source._auto.clear()  # found again here (other tests may have cached it): logged once
    with caplog.at_level(logging.INFO, logger="mnpo.models.hooked"):
        assert source.auto_layer(inputs(n=1)) == expected
    assert f"target layer 'auto' is {expected!r}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mnpo.models.hooked"):
        assert source.auto_layer(inputs(n=1)) == expected
    assert "target layer 'auto'" not in caplog.text  # cached: neither searched nor logged again


def test_auto_layer_maps_equal_the_named_layers():
    model = model_of("resnet50")
    images = inputs(seed=7)
    auto, _ = compute_maps(model, images, method="gradcampp")
    named, _ = compute_maps(model, images, method="gradcampp", target_layer=model.layer4)
    torch.testing.assert_close(auto, named, rtol=0, atol=0)


def test_a_zero_head_is_named_when_no_layer_gets_a_gradient():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1,
                                               hidden_dim=8, mlp_dim=8, num_classes=3).eval()  # head zeros
    with pytest.raises(LayerError, match="initialized to zeros"):
        compute_maps(vit, torch.randn(1, 3, 32, 32), method="gradcam")


def test_unknown_layer_is_refused_with_the_nearest_names():
    with pytest.raises(LayerError, match=r"no module 'layer5'; nearest: \['layer3.5', 'layer4'"):
        compute_maps(model_of("resnet50"), inputs(n=1), method="gradcam", target_layer="layer5")


def test_a_shared_module_is_refused():
    with pytest.raises(LayerError, match="runs 3 times"):
        compute_maps(model_of("resnet50"), inputs(n=1), method="gradcam", target_layer="layer4.2.relu")


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.side, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        self.side(x)  # runs, but feeds nothing
        return self.fc(self.body(x).detach().mean((2, 3)))


@pytest.mark.parametrize("layer", ["body", "side"])
def test_a_layer_the_scores_do_not_reach_by_autograd_is_refused(layer):
    with pytest.raises(ValueError, match=f"do not depend on target layer '{layer}' through autograd"):
        compute_maps(Detached().double().eval(), inputs(n=1, size=8), method="gradcam", target_layer=layer)


def test_a_module_outside_the_model_and_a_tuple_output_are_refused():
    with pytest.raises(LayerError, match="not part of the model"):
        compute_maps(tiny_cnn(), inputs(n=1, size=8), method="gradcam", target_layer=nn.ReLU())
    vit = model_of("vit")
    with pytest.raises(LayerError, match="returns tuple"):
        compute_maps(vit, inputs(n=1), method="gradcam",
                     target_layer="encoder.layers.encoder_layer_1.self_attention")


def test_a_custom_reshape_is_used_for_tokens():
    vit = model_of("vit")
    images = inputs(seed=8)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    auto, _ = compute_maps(vit, images, method="layercam", target_layer=layer)
    custom, _ = compute_maps(vit, images, method="layercam", target_layer=layer, reshape=vit_tokens_to_grid)
    torch.testing.assert_close(custom, auto, rtol=0, atol=0)
    # a reshape that keeps the class token (here: drops the last token instead) changes the map
    other, _ = compute_maps(vit, images, method="layercam", target_layer=layer,
                            reshape=lambda t: t[:, :-1].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
    assert float((other - auto).abs().max()) > 1e-3


# --- nothing left behind, truncation ----------------------------------------------------------


def hooks_of(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_an_error_and_state_is_restored():
    net = tiny_cnn()
    net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]

    class Boom(Exception):
        pass

    def explode(module, inputs, output):
        raise Boom

    handle = net[6].register_forward_hook(explode)  # fails after the target layer's hook ran
    with pytest.raises(Boom):
        compute_maps(net, inputs(n=1, size=8), method="gradcam", target_layer="2")
    handle.remove()
    assert hooks_of(net) == 0
    assert [p.requires_grad for p in net.parameters()] == flags and not net.training
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient either


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_under_no_grad_and_inference_mode_the_maps_are_the_same(context):
    net = tiny_cnn()
    images = inputs(n=2, size=16)
    expected, _ = compute_maps(net, images, method="dgl", target_layer="0")
    with context():
        frozen_images = images.clone()  # under inference_mode: an inference tensor, as Lightning hands them
        got, _ = compute_maps(net, frozen_images, method="dgl", target_layer="0")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert hooks_of(net) == 0


def test_nothing_before_the_target_layer_records_autograd():
    """The pass is truncated at the layer: the modules before it see tensors without grad_fn,
    those after it record autograd; no parameter gradient is accumulated."""
    net = tiny_cnn()
    seen = {}
    handles = [net[i].register_forward_hook(lambda m, i_, o, i=i: seen.__setitem__(i, o.requires_grad))
               for i in (0, 1, 3, 6)]
    compute_maps(net, inputs(n=1, size=8), method="gradcam", target_layer="2")
    for h in handles:
        h.remove()
    assert seen == {0: False, 1: False, 3: True, 6: True}
    assert all(p.grad is None for p in net.parameters())


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        compute_maps(tiny_cnn().train(), inputs(n=1, size=8), method="gradcam")


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_an_in_place_relu_after_the_layer_does_not_change_what_is_read(method):
    """The layer's output is read before the next module's in-place ReLU changes it (the library
    reading the same tensor after the fact would see it rectified)."""
    def net(inplace):
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(6, 4)).double().eval()

    images = inputs(n=2, size=8, seed=9)
    safe, _ = compute_maps(net(False), images, method=method, target_layer="0", relu=False)
    got, _ = compute_maps(net(True), images, method=method, target_layer="0", relu=False)
    torch.testing.assert_close(got, safe, rtol=0, atol=0)
    assert float(safe.std()) > 0


def test_on_a_one_branch_model_mnpos_is_dgl_with_its_h_factors():
    """No second branch: MNPOs' gradients are DGL's, and H(1, 1) is the identity, so ``mnpos``
    with ``a = b = 1`` is ``dgl`` bit for bit; its own H(8, 4) changes the map."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).double().eval()
    images, targets = inputs(), torch.tensor([3, 7])
    dgl, _ = compute_maps(net, images, targets, method="dgl", target_layer="layer3")
    same, _ = compute_maps(net, images, targets, method="mnpos", a=1, b=1, target_layer="layer3")
    own, _ = compute_maps(net, images, targets, method="mnpos", target_layer="layer3")
    torch.testing.assert_close(same, dgl, rtol=0, atol=0)
    assert float((own - dgl).abs().max()) > 1e-2


def test_dgl_at_a_gap_linear_head_is_cam():
    """At ``layer4`` of a ResNet (then GAP and fc): ``G = w_y / hw`` on every pixel, so
    ``alpha = sum_hw G = w_y``, and ``D = W^T (p - t) / hw`` is constant over the map; the map
    ``mean_c(w_y A) / ||A|| - const`` min-max normalizes to CAM's. Float64: equal within a
    few hundred units of its roundoff (measured 7e-15)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).double().eval()
    images, targets = inputs(), torch.tensor([3, 7])
    dgl, _ = compute_maps(net, images, targets, method="dgl", target_layer="layer4")
    cam, _ = compute_maps(net, images, targets, method="cam")
    torch.testing.assert_close(dgl, cam, rtol=0, atol=1e-12)
    dgl_at_layer3, _ = compute_maps(net, images, targets, method="dgl", target_layer="layer3")
    assert float((dgl_at_layer3 - cam).abs().max()) > 1e-2  # the identity is the head's, not any layer's
