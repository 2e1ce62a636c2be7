"""The post-hoc CAM family (mnpo.maps.cam_family): identities at ``head``, other target layers
against the naive float64 references, chunking, bad input, and pytorch-grad-cam as an oracle."""

import copy

import pytest
import torch
from numerics import map_bound, network_bound, sum_bound
from reference import naive_maps
from test_methods import SETUPS, make_model, max_diff

from mnpo.maps import compute_maps, normalize_maps, resize_maps
from mnpo.maps.cam_family import XGRADCAM_EPS, _ablated_logits
from mnpo.models.map_source import NetworkSource

FAMILY = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam", "eigencam")
OTHER_LAYER = {"vgg16": "conv5_2", "resnet50": "layer3", "inception_v3": "Mixed_6d"}


def float64_setup(backbone="vgg16", seed=0, n=2, size=64):
    model = make_model(backbone, seed=seed).double()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, dtype=torch.float64, generator=generator)
    return model, images, torch.tensor([1, 4, 2][:n])


def head_features(model, images):
    with torch.no_grad():
        return model(images, return_features=True).features["head"]


# --- identities at head, where GAP and the linear classifier follow: dy/dA_c = w_yc / (h w) ----


@pytest.mark.parametrize("backbone", list(SETUPS))
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam"])
def test_gradcam_hirescam_and_xgradcam_are_cam_at_head(backbone, method):
    model, images, targets = float64_setup(backbone)
    cam, _ = compute_maps(model, images, targets, method="cam")
    got, _ = compute_maps(model, images, targets, method=method, relu=False)
    bound = map_bound(model, torch.float64, passes=2)  # float64 rounding
    if method == "xgradcam":  # w S / (S + 1e-7) instead of w: relative 1e-7 / S for the smallest S > 0
        sums = head_features(model, images).sum((2, 3))
        bound += 2 * XGRADCAM_EPS / float(sums[sums > 0].min())
    assert float((got - cam).abs().max()) <= bound
    relu_cam, _ = compute_maps(model, images, targets, method="gradcam")
    with_relu, _ = compute_maps(model, images, targets, method=method)
    assert float((with_relu - relu_cam).abs().max()) <= bound
    assert float((with_relu - cam).abs().max()) > 1e-2  # the ReLU is not a no-op here


@pytest.mark.parametrize("backbone", list(SETUPS))
def test_layercam_is_cam_without_the_negative_class_weights_at_head(backbone):
    model, images, targets = float64_setup(backbone)
    positive = copy.deepcopy(model)
    with torch.no_grad():
        positive.classifier.weight.clamp_(min=0)
    expected, _ = compute_maps(positive, images, targets, method="cam")
    got, _ = compute_maps(model, images, targets, method="layercam", relu=False)
    assert float((got - expected).abs().max()) <= map_bound(model, torch.float64, passes=2)
    plain, _ = compute_maps(model, images, targets, method="cam")
    assert float((got - plain).abs().max()) > 1e-2


@pytest.mark.parametrize("backbone", list(SETUPS))
def test_ablation_weights_at_head_are_the_class_weight_times_the_channel_mean_over_y(backbone):
    """The closed form ``y - y_c = w_yc mean(A_c)`` equals running the classifier on the ablated
    copies (``_ablated_logits``, the path of every other layer), and the map follows from it."""
    model, images, targets = float64_setup(backbone)
    A = head_features(model, images)
    with torch.no_grad():
        y = model(images).logits[0].gather(1, targets[:, None])[:, 0]
    closed = (model.classifier.weight[targets] * A.mean((2, 3))).detach()
    ran = y[:, None] - _ablated_logits(NetworkSource(model, images, targets), images, A, targets, "head", chunk_size=7)
    bound = network_bound(model, torch.float64) * float(y.abs().max())
    torch.testing.assert_close(ran, closed, rtol=0, atol=bound)
    weights = closed / y[:, None]
    expected = normalize_maps(resize_maps(torch.einsum("bc,bchw->bhw", weights, A).clamp_min(0), (64, 64)))
    got, _ = compute_maps(model, images, targets, method="ablationcam")
    assert float((got - expected).abs().max()) <= map_bound(model, torch.float64)


# --- other target layers, chunking --------------------------------------------------------


@pytest.mark.parametrize("backbone", list(SETUPS))
@pytest.mark.parametrize("method", FAMILY)
def test_other_target_layer_equals_naive_float64(backbone, method):
    model, images, targets = float64_setup(backbone, seed=3, n=1, size=32)
    layer = OTHER_LAYER[backbone]
    fast, _ = compute_maps(model, images, targets, method=method, target_layer=layer)
    naive = naive_maps(model.float(), images, targets, method, target_layer=layer)
    assert naive.max() == 1, "a degenerate reference map would make this test mean nothing"
    with torch.no_grad():
        logit = float(model.double()(images).logits[0].abs().max())
    # float64 rounding; Score-CAM's softmax and Ablation-CAM's y - y_c scale it by the logits
    assert max_diff(fast, naive) <= map_bound(model, torch.float64, passes=2) * (1 + logit)


@pytest.mark.parametrize("method, layer", [("scorecam", "head"), ("scorecam", "conv5_2"),
                                           ("ablationcam", "conv5_2"), ("ablationcam", "conv4_3")])
def test_chunk_size_changes_nothing(method, layer):
    model, images, targets = float64_setup("vgg16", n=3, size=32)
    maps = [compute_maps(model, images, targets, method=method, target_layer=layer, chunk_size=k)[0]
            for k in (1, 5, 3 * 128)]
    for m in maps[1:]:  # the same float64 passes over other batches: float64 rounding at most
        assert float((m - maps[0]).abs().max()) <= map_bound(model, torch.float64)


def test_eigencam_sign_follows_the_activations():
    """The projection is signed to correlate positively with sum_c A: flipping every
    activation's deviation from its channel mean would flip an unsigned SVD, not our map."""
    model, images, targets = float64_setup("vgg16")
    maps, _ = compute_maps(model, images, targets, method="eigencam", relu=False)
    energy = resize_maps(head_features(model, images).sum(1), (64, 64))
    for m, e in zip(maps, energy):
        assert float(((m - m.mean()) * (e - e.mean())).sum()) > 0


# --- bad input ------------------------------------------------------------------------------


def test_zero_target_logit_gives_the_documented_fallback_not_nan():
    model, images, targets = float64_setup("vgg16", n=1)
    with torch.no_grad():
        y = model(images).logits[0][0, targets[0]]
        model.classifier.bias[targets[0]] -= y  # the target logit is now exactly 0
        assert model(images).logits[0][0, targets[0]] == 0
    got, _ = compute_maps(model, images, targets, method="ablationcam")
    assert not torch.isnan(got).any()
    A = head_features(model, images)
    drop = (model.classifier.weight[targets] * A.mean((2, 3))).detach()  # weights y - y_c where y = 0
    expected = normalize_maps(resize_maps(torch.einsum("bc,bchw->bhw", drop, A).clamp_min(0), (64, 64)))
    assert float((got - expected).abs().max()) <= map_bound(model, torch.float64)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(method="scorecam", chunk_size=0), ValueError, "chunk_size=0"),
    (dict(method="ablationcam", chunk_size=2.5), ValueError, "chunk_size=2.5"),
    (dict(method="scorecam", target_layer="conv9_9"), KeyError, "unknown feature 'conv9_9'"),
    (dict(method="eigencam", target_layer="conv9_9"), KeyError, "unknown feature 'conv9_9'"),
    (dict(method="ablationcam", target_layer="parallel.c"), ValueError, "do not depend on target layer 'parallel.c'"),
    (dict(method="hirescam", target_layer="parallel"), ValueError, "do not depend on target layer 'parallel'"),
])
def test_bad_options(kwargs, error, message):
    model = make_model("vgg16")
    with pytest.raises(error, match=message):
        compute_maps(model, torch.randn(1, 3, 32, 32), torch.tensor([0]), **kwargs)


@pytest.mark.parametrize("method", FAMILY)
def test_constant_activations_give_zero_maps_not_nan(method):
    model = make_model("vgg16")
    maps, _ = compute_maps(model, torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]), method=method)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


# --- pytorch-grad-cam 1.5.7 as an oracle ------------------------------------------------------


class MainLogits(torch.nn.Module):
    """What pytorch-grad-cam expects: a module returning ``(B, K)`` logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).logits[0]


@pytest.mark.parametrize("method", FAMILY)
def test_equals_pytorch_grad_cam(method):
    gradcam_lib = pytest.importorskip("pytorch_grad_cam", reason="grad-cam is in the test extras")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model, images, targets = float64_setup("vgg16", seed=2, n=2, size=32)
    ours, _ = compute_maps(model, images, targets, method=method, resize="bilinear")
    if method == "eigencam":
        # LAPACK's sign is arbitrary there; compare the projection itself, signed our way
        A = head_features(model, images)
        projection = torch.from_numpy(get_2d_projection(A.numpy())).double()
        flip = (projection * A.sum(1)).sum((1, 2)) < 0
        projection = torch.where(flip[:, None, None], -projection, projection)
        expected = normalize_maps(resize_maps(projection.clamp_min(0), (32, 32), "bilinear")).numpy()
    else:
        classes = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
                   "layercam": "LayerCAM", "hirescam": "HiResCAM", "scorecam": "ScoreCAM",
                   "ablationcam": "AblationCAM"}
        cam_class = getattr(gradcam_lib, classes[method])
        with cam_class(model=MainLogits(model), target_layers=[model.branches["main"]["head"]]) as cam:
            expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    # pytorch-grad-cam casts to float32 before its resize (cv2 INTER_LINEAR: 4 taps of values
    # <= 1) and min-max normalizes twice with +1e-7 in the denominator; its map also passes
    # float32 through (3 steps of sums of up to 16 terms) before ours in float64
    bound = 2 * 3 * sum_bound(torch.float32, 16) + 2 * 1e-7
    assert max_diff(ours, expected) <= bound


@pytest.mark.parametrize("method, layer, chunk", [("scorecam", "head", 5), ("scorecam", "conv5_2", 64),
                                                  ("ablationcam", "conv5_2", 6), ("ablationcam", "conv4_3", 1)])
def test_rows_per_pass_are_bounded_by_the_chunk_size(method, layer, chunk):
    """Peak memory follows the rows of one pass: at most ``chunk_size`` masked images (Score-CAM);
    Ablation-CAM, which runs only the network after the layer here, takes ``k = copies // B``
    copies per image, ``copies`` holding the elements of ``chunk_size`` images (at least
    ``chunk_size``); never C x B."""
    model, images, targets = float64_setup("vgg16", n=3, size=32)
    rows = []

    def record(module, args, kwargs):
        replaced = kwargs.get("replace")
        rows.append(replaced[1].shape[0] if replaced is not None else args[0].shape[0])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        compute_maps(model, images, targets, method=method, target_layer=layer, chunk_size=chunk)
    finally:
        handle.remove()
    taps = model.backbone.taps
    channels = taps[layer].channels if layer in taps else head_features(model, images).shape[1]
    assert rows[0] == 3  # the forward that gives A
    assert sum(rows[1:]) == 3 * channels  # every channel of every image, once
    if method == "scorecam":
        assert max(rows[1:]) <= chunk and len(rows) > 2
        return
    side = 32 // taps[layer].stride  # conv5_2: 2x2 (stride 16); conv4_3: 4x4 (stride 8)
    copies = max(chunk, chunk * 3 * 32 * 32 // (channels * side * side))
    k = max(1, copies // 3)
    assert rows[1:] == [3 * k] * (channels // k) + ([3 * (channels % k)] if channels % k else [])
