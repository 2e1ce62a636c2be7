"""Faithfulness metrics (``mnpo.metrics.faithfulness``): naive per-image loops written from the
definitions, hand-built cases, pytorch-grad-cam's confidence change and OpenCV's blur as oracles."""

import contextlib
import functools
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from mnpo.metrics.faithfulness import (
    blur,
    boxes_to_regions,
    center_maps,
    confidence_change,
    deletion_insertion,
    pixel_order,
    pointing_game,
    random_maps,
    trapezoid_auc,
)


class LeftHalf(nn.Module):
    """Two classes; class 0's logit is 4 x the mean of channel 0 over the left half of the image:
    only that half matters."""

    def forward(self, x):
        w = x.shape[-1] // 2
        left = 4 * x[:, 0, :, :w].mean((1, 2))
        return torch.stack([left, torch.zeros_like(left)], 1)


class SmallNet(nn.Module):
    """A small ReLU network with a position-dependent head (so every pixel matters differently)."""

    def __init__(self, size=8, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def setup(n=3, size=8):
    g = torch.Generator().manual_seed(1)
    model = SmallNet(size).double().eval()
    images = torch.randn(n, 3, size, size, dtype=torch.float64, generator=g)
    maps = torch.rand(n, size, size, dtype=torch.float64, generator=g)
    return model, images, maps, torch.tensor([0, 3, 4][:n])


def probability(model, image, target):
    with torch.no_grad():
        return float(model(image[None]).double().softmax(1)[0, target])


class Recording(nn.Module):
    """SmallNet that records each input's layout; with ``flat``, it reads its input through
    ``view`` (which a channels-last tensor cannot take) instead of a convolution."""

    def __init__(self, flat=False):
        super().__init__()
        self.net, self.flat, self.layouts = SmallNet(8).double(), flat, []
        self.linear = nn.Linear(3 * 64, 5).double()

    def forward(self, x):
        self.layouts.append("channels_last" if x.is_contiguous(memory_format=torch.channels_last)
                            and not x.is_contiguous() else "contiguous")
        return self.linear(x.view(len(x), -1)) if self.flat else self.net(x)


@pytest.mark.parametrize("flat", [False, True])
def test_class_probabilities_go_channels_last_on_the_cpu_and_equal_a_plain_forward(flat):
    """CPU chunks reach a convolutional model channels-last (oneDNN's faster layout), and the
    probabilities are a plain contiguous forward's (float64: equal to rounding); a model that
    views its input falls back to contiguous chunks, from the failed chunk on."""
    from mnpo.metrics.faithfulness import class_probabilities

    model = Recording(flat)
    _, images, _, targets = setup(n=3)
    with torch.no_grad():
        wanted = (model.linear(images.reshape(3, -1)) if flat else model.net(images)).softmax(1)
    got = class_probabilities(model, images, targets, chunk_size=2)
    torch.testing.assert_close(got, wanted[torch.arange(3), targets], rtol=1e-13, atol=0)
    if flat:
        assert model.layouts == ["channels_last", "contiguous", "contiguous"]  # tried once, then plain
    else:
        assert model.layouts == ["channels_last", "channels_last"]


def test_confidence_change_equals_the_definition_image_by_image():
    model, images, maps, targets = setup()
    got = confidence_change(model, images, maps, targets, chunk_size=2)
    for i in range(3):
        y = probability(model, images[i], targets[i])
        o = probability(model, images[i] * maps[i], targets[i])
        # the same float64 network on the same input, batched otherwise: rounding only
        assert got.base[i] == pytest.approx(y, rel=1e-12) and got.masked[i] == pytest.approx(o, rel=1e-12)
        assert got.drop[i] == pytest.approx(max(0.0, y - o) / y, rel=1e-9, abs=1e-15)
        assert bool(got.increase[i]) == (o > y)
    assert got.average_drop == pytest.approx(100 * float(got.drop.mean()))


def test_average_drop_and_increase_by_hand():
    """LeftHalf on images of ones: Y = softmax([4, 0])_0. A map of ones on the left half keeps Y
    (drop 0, no increase); a map of 0.5 everywhere halves the logit: O = softmax([2, 0])_0."""
    images = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    maps = torch.zeros(2, 4, 4, dtype=torch.float64)
    maps[0, :, :2] = 1
    maps[1] = 0.5
    got = confidence_change(LeftHalf(), images, maps, torch.tensor([0, 0]))
    y, o = 1 / (1 + math.exp(-4)), 1 / (1 + math.exp(-2))
    assert got.base.tolist() == pytest.approx([y, y], rel=1e-15)
    assert got.masked.tolist() == pytest.approx([y, o], rel=1e-15)
    assert got.drop.tolist() == pytest.approx([0, (y - o) / y], abs=1e-15)
    assert got.increase.tolist() == [False, False]
    assert got.average_drop == pytest.approx(50 * (y - o) / y, rel=1e-12) and got.increase_in_confidence == 0


def test_confidence_change_equals_pytorch_grad_cams():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, images, maps, targets = setup(size=8)
    model32 = SmallNet(8).float().eval()
    model32.load_state_dict(model.state_dict())
    images32, maps32 = images.float(), maps.float()
    theirs = CamMultImageConfidenceChange()(images32, maps32.numpy(),
                                            [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], model32)
    ours = confidence_change(model32, images32, maps32, targets)
    # the same float32 network on the same float32 products gives the same logits; theirs takes
    # the softmax of 5 logits in float32 (exp, a 5-term sum, a division: relative error at most
    # (5 + 2) eps of a probability <= 1), ours in float64, for Y and for O: 2 (5 + 2) eps apart
    # at most; the differences themselves are about 2e-2 here
    eps = torch.finfo(torch.float32).eps
    assert np.abs((ours.masked - ours.base).numpy() - np.asarray(theirs).ravel()).max() <= 2 * 7 * eps


def naive_curve(model, image, map_, target, mode, steps, substrate=None):
    """(fractions, probabilities): pixels changed one by one in map order, ``ceil(hw / steps)``
    per point, until every pixel has been."""
    h, w = map_.shape
    order = sorted(range(h * w), key=lambda p: (-float(map_.flatten()[p]), p))
    per_step = math.ceil(h * w / steps)
    if substrate is None:
        substrate = blur(image[None])[0] if mode == "insertion" else torch.zeros_like(image)
    fractions, values, changed = [], [], 0
    while True:
        x = (substrate if mode == "insertion" else image).clone().flatten(1)
        for p in order[:changed]:
            x[:, p] = (image if mode == "insertion" else substrate).flatten(1)[:, p]
        values.append(probability(model, x.view_as(image), target))
        fractions.append(changed / (h * w))
        if changed == h * w:
            return fractions, values
        changed = min(changed + per_step, h * w)


def trapezoid(xs, ys):
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize(("steps", "points"), [(5, 6), (64, 65), (100, 65), (3, 4), (40, 33)])
def test_deletion_and_insertion_equal_a_pixel_by_pixel_loop(mode, steps, points):
    """8 x 8 = 64 pixels: 5 steps of 13 (the last one of 12), 64 of 1, 100 steps of 1 (65 points:
    no point repeats the full image), 3 of 22 (the last of 20), 40 asked for, 32 of 2 (33
    points: 2 pixels a step reach every pixel in 32)."""
    model, images, maps, targets = setup()
    maps[0, :4] = 0.5  # ties: raster order
    got = deletion_insertion(model, images, maps, targets, mode=mode, steps=steps, chunk_size=7)
    assert got.curves.shape == (3, points)
    for i in range(3):
        fractions, expected = naive_curve(model, images[i], maps[i], int(targets[i]), mode, steps)
        assert got.fractions.tolist() == pytest.approx(fractions, rel=1e-15)
        assert got.curves[i].tolist() == pytest.approx(expected, rel=1e-12)
        assert float(got.auc[i]) == pytest.approx(trapezoid(fractions, expected), rel=1e-12)


def test_deletion_ranks_a_map_on_the_used_half_above_one_on_the_other():
    """LeftHalf on images of ones, 4 steps over an 8 x 8 image: deleting the left half first drops
    class 0's probability to softmax([0, 0]) = 0.5 by step 2; deleting the right half first keeps it
    at softmax([4, 0]) until then. Insertion, the other way round."""
    images = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.zeros(2, 8, 8, dtype=torch.float64)
    maps[0, :, :4] = torch.linspace(1, 0.5, 8)[:, None]  # the left half, row by row
    maps[1, :, 4:] = torch.linspace(1, 0.5, 8)[:, None]
    got = deletion_insertion(LeftHalf(), images, maps, torch.tensor([0, 0]), steps=4)
    full, half = 1 / (1 + math.exp(-4)), 1 / (1 + math.exp(-2))
    # 16 pixels a step, row by row within the half (4 columns): step 1 removes 4 of its 8 rows
    assert got.curves[0].tolist() == pytest.approx([full, half, 0.5, 0.5, 0.5], rel=1e-12)
    assert got.curves[1].tolist() == pytest.approx([full, full, full, half, 0.5], rel=1e-12)
    assert float(got.auc[0]) < float(got.auc[1])
    inserted = deletion_insertion(LeftHalf(), images, maps, torch.tensor([0, 0]), mode="insertion", steps=4)
    assert float(inserted.auc[0]) > float(inserted.auc[1])
    assert inserted.curves[0, -1] == pytest.approx(full, rel=1e-12)


def test_deletion_to_a_given_baseline_image():
    model, images, maps, targets = setup(n=2)
    baseline = torch.full_like(images, 0.25)
    got = deletion_insertion(model, images, maps, targets, steps=1, baseline=baseline)
    assert got.curves[:, 1].tolist() == pytest.approx(
        [probability(model, baseline[i], int(targets[i])) for i in range(2)], rel=1e-12)
    # insertion from a given start instead of the blur (torchcam's convention: its baseline)
    inserted = deletion_insertion(model, images, maps, targets, mode="insertion", steps=5, baseline=0.25)
    for i in range(2):
        _, expected = naive_curve(model, images[i], maps[i], int(targets[i]), "insertion", 5, baseline[i])
        assert inserted.curves[i].tolist() == pytest.approx(expected, rel=1e-12)


def test_blur_equals_opencv_with_zero_padding():
    image = torch.rand(1, 3, 20, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kernel = cv2.getGaussianKernel(11, 5)
    for c in range(3):
        expected = cv2.filter2D(image[0, c].numpy(), -1, kernel @ kernel.T, borderType=cv2.BORDER_CONSTANT)
        # 121 float64 products of values below 1 summed in another order: ~1e-14
        np.testing.assert_allclose(blur(image)[0, c].numpy(), expected, rtol=0, atol=1e-12)


def test_trapezoid_auc_and_pixel_order_by_hand():
    curves = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert trapezoid_auc(curves).tolist() == [0.5, 1.0, 0.5]
    # at fractions 0, 3/4, 1: 3/4 (1 + 1/2) / 2 + 1/4 (1/2 + 0) / 2 = 0.5625 + 0.0625
    fractions = torch.tensor([0, 0.75, 1], dtype=torch.float64)
    assert trapezoid_auc(curves[:1], fractions).tolist() == [0.625]
    with pytest.raises(ValueError, match="fractions must be"):
        trapezoid_auc(curves, fractions[:2])
    with pytest.raises(ValueError, match="at least 2 points"):
        trapezoid_auc(torch.ones(1, 1))
    maps = torch.tensor([[[0.2, 0.9], [0.9, 0.1]]])
    assert pixel_order(maps).tolist() == [[1, 2, 0, 3]]  # the tie at 0.9 in raster order


def test_pointing_game_and_energy_by_hand():
    maps = torch.zeros(4, 4, 4, dtype=torch.float64)
    maps[0, 1, 1], maps[0, 3, 3] = 1.0, 1.0  # tie: the first maximum (1, 1) is in the box
    maps[1, 3, 3], maps[1, 1, 1] = 1.0, 0.5  # maximum outside, a third of the mass inside
    maps[3] = 0.25  # constant: points at (0, 0), outside; energy = box area / 16
    regions = boxes_to_regions([[[1, 1, 2, 2]], [[1, 1, 2, 2]], [[0, 0, 3, 3]], [[1, 1, 2, 2], [5, 5, 9, 9]]], 4, 4)
    assert regions[0].sum() == 4 and regions[2].all() and regions[3].sum() == 4
    got = pointing_game(maps, regions)
    assert got.hit.tolist() == [True, False, False, False]  # image 2: a map of zeros points nowhere
    assert got.energy.tolist() == pytest.approx([0.5, 1 / 3, 0.0, 0.25], rel=1e-15)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, s, t: confidence_change(m, x, s[:, :4], t), r"maps must be \(B, H, W\)"),
    (lambda m, x, s, t: confidence_change(m, x, s, t[:2]), r"targets must be \(3,\)"),
    (lambda m, x, s, t: confidence_change(m, x, s.fill_(float("nan")), t), "NaN"),
    (lambda m, x, s, t: confidence_change(m, x, s, t + 10), r"targets \[10, 13, 14\] out of range for 5 classes"),
    (lambda m, x, s, t: deletion_insertion(m, x, s, t, mode="both"), "mode must be 'deletion' or 'insertion'"),
    (lambda m, x, s, t: deletion_insertion(m, x, s, t, steps=0), "steps must be a positive int, got 0"),
    (lambda m, x, s, t: deletion_insertion(m, x, s, t, chunk_size=0), "chunk_size must be a positive int"),
    (lambda m, x, s, t: pointing_game(s, s[:2] > 0), "regions of the same shape"),
    (lambda m, x, s, t: pointing_game(-s, s > 0), "non-negative"),
    (lambda m, x, s, t: boxes_to_regions([[[3, 0, 1, 2]]], 4, 4), r"image 0: box \[3, 0, 1, 2\] has x1 < x0"),
])
def test_bad_input_is_refused_with_the_reason(call, message):
    model, images, maps, targets = setup()
    with pytest.raises(ValueError, match=message):
        call(model, images, maps, targets)


def test_linear_impute_solves_the_neighbour_equations_and_keeps_linear_ramps():
    """Every removed pixel equals the weighted mean of its in-image neighbours (checked on the
    result, pixel by pixel); an interior hole in a linear ramp is filled by the ramp itself (the
    stencil is symmetric, so linear functions solve it); kept pixels stay."""
    from mnpo.metrics.faithfulness import ROAD_NEIGHBOURS, linear_impute

    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 9, 7, dtype=torch.float64, generator=g)
    keep = torch.rand(9, 7, generator=g) > 0.6
    keep[0, 0] = True
    filled = linear_impute(image, keep)
    assert torch.equal(filled[:, keep], image[:, keep])
    for y, x in zip(*torch.nonzero(~keep, as_tuple=True)):
        total, weights = torch.zeros(2, dtype=torch.float64), 0.0
        for (dy, dx), w in ROAD_NEIGHBOURS:
            if 0 <= y + dy < 9 and 0 <= x + dx < 7:
                total += w * filled[:, y + dy, x + dx]
                weights += w
        # a sparse LU solve of at most 63 unknowns, values <= 1: residuals of ~1e-15
        torch.testing.assert_close(filled[:, y, x] * weights, total, rtol=0, atol=1e-12)
    # built in float64: a float32 ramp is linear only to 1e-7
        rows, cols = torch.arange(9, dtype=torch.float64), torch.arange(7, dtype=torch.float64)
        ramp = (0.3 * rows[:, None] - 0.2 * cols[None] + 1).expand(3, 9, 7)
    hole = torch.ones(9, 7, dtype=torch.bool)
    hole[2:6, 1:5] = False
    torch.testing.assert_close(linear_impute(ramp, hole), ramp, rtol=0, atol=1e-12)
    # nothing kept: every constant solves the system; the least-norm one, zeros
    assert torch.equal(linear_impute(image, torch.zeros(9, 7, dtype=torch.bool)), torch.zeros_like(image))


def _one_hot_and_constant(maps):
    """Image 0's map one-hot (MoRF below 100 % removes every pixel: its zeros reach the
    percentile), image 1's constant (both orders remove every pixel), image 2's as given."""
    maps = maps.clone()
    maps[0] = 0
    maps[0, 2, 5] = 1
    maps[1] = 0.5
    return maps


@pytest.mark.parametrize("percentile, kind", [(20, "random"), (80, "random"), (50, "one-hot, constant")])
def test_road_equals_pytorch_grad_cams_without_noise(percentile, kind, monkeypatch):
    from pytorch_grad_cam.metrics import road as their_road
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from mnpo.metrics.faithfulness import road

    monkeypatch.setattr(their_road.NoisyLinearImputer.__init__, "__defaults__",
                        (0.0, their_road.neighbors_weights))  # their noise is unseeded: compare without it
    model, images, maps, targets = setup(size=8)
    if kind != "random":
        maps = _one_hot_and_constant(maps)
    if kind != "random":
        maps = _one_hot_and_constant(maps)
    model32 = SmallNet(8).float().eval()
    model32.load_state_dict(model.state_dict())
    images32, maps32 = images.float(), maps.float()
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    morf = their_road.ROADMostRelevantFirst(percentile)(images32, maps32.numpy(), wanted, model32)
    lerf = their_road.ROADLeastRelevantFirst(percentile)(images32, maps32.numpy(), wanted, model32)
    combined = their_road.ROADCombined([10, percentile])(images32, maps32.numpy(), wanted, model32)
    ours = road(model32, images32, maps32.double(), targets, percentiles=(percentile,), noise=0.0)
    both = road(model32, images32, maps32.double(), targets, percentiles=(10, percentile), noise=0.0)
    # the same imputed float32 inputs (a float64 solve rounded to float32 on both sides) through
    # the same float32 network; the softmax in float32 (theirs) and float64 (ours), for the image
    # and the imputed copy: 2 (5 + 2) eps apart; the combined score averages such differences
    eps = torch.finfo(torch.float32).eps
    assert np.abs(ours.morf[:, 0].numpy() - np.ravel(morf)).max() <= 2 * 7 * eps
    assert np.abs(ours.lerf[:, 0].numpy() - np.ravel(lerf)).max() <= 2 * 7 * eps
    assert np.abs(both.combined.numpy() - np.ravel(combined)).max() <= 2 * 7 * eps
    assert float(np.abs(np.ravel(morf)).max()) > 1e-3  # the imputation changes the probability at all


def test_road_noise_is_seeded_and_only_on_removed_pixels():
    from mnpo.metrics.faithfulness import road

    model, images, maps, targets = setup(n=2)
    a = road(model, images, maps, targets, percentiles=(50,), seed=1)
    b = road(model, images, maps, targets, percentiles=(50,), seed=1)
    c = road(model, images, maps, targets, percentiles=(50,), seed=2)
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    assert not torch.equal(a.morf, c.morf)
    # the solves in one thread or three: the same imputations, the same noise
    one = road(model, images, maps, targets, percentiles=(30, 50), seed=[4, 5], workers=1)
    three = road(model, images, maps, targets, percentiles=(30, 50), seed=[4, 5], workers=3)
    assert torch.equal(one.morf, three.morf) and torch.equal(one.lerf, three.lerf)
    with pytest.raises(ValueError, match="workers must be a positive int, got 0"):
        road(model, images, maps, targets, workers=0)
    with pytest.raises(ValueError, match=r"percentiles must be numbers in \[0, 100\]"):
        road(model, images, maps, targets, percentiles=(120,))


def test_road_prefers_a_map_on_the_used_half():
    """LeftHalf on images of ones plus a left-right ramp: removing the left half (where the map
    points) and imputing it from the right changes class 0's probability; a map on the right half
    leaves it (MoRF 0, the used half kept). Combined: the left map scores higher."""
    from mnpo.metrics.faithfulness import road

    images = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    images[:, 0] += torch.linspace(1, 0, 8)  # the left half brighter: imputing it from the right lowers it
    maps = torch.zeros(2, 8, 8, dtype=torch.float64)
    maps[0, :, :4] = torch.linspace(1, 0.6, 4)
    maps[1, :, 4:] = torch.linspace(0.6, 1, 4)
    got = road(LeftHalf(), images, maps, torch.tensor([0, 0]), percentiles=(50,), noise=0.0)
    assert float(got.morf[0, 0]) < -1e-3 and float(got.morf[1, 0]) == pytest.approx(0, abs=1e-15)
    assert float(got.combined[0]) > float(got.combined[1])


class OnePixel(nn.Module):
    """Two classes; class 0's logit is 3 x channel 0 at pixel (2, 5): a one-pixel object."""

    def forward(self, x):
        logit = 3 * x[:, 0, 2, 5]
        return torch.stack([logit, torch.zeros_like(logit)], 1)


def test_a_one_pixel_object_by_hand():
    """On images of ones, class 0's probability is sigmoid(3) with the pixel and 1/2 without it
    (its value 0). A one-hot map on the pixel loses it in deletion's first step of 8 pixels;
    one on (0, 0) ranks the rest in raster order and reaches it (raster index 21) in the third.
    Insertion from the blurred image regains it in the first step. ROAD at 50 %: MoRF removes
    every pixel (the zeros reach the median; the image becomes zeros), LeRF keeps the pixel alone
    and imputes the constant 1 everywhere else. Pointing game on its one-pixel box."""
    from mnpo.metrics.faithfulness import road

    images = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.zeros(2, 8, 8, dtype=torch.float64)
    maps[0, 2, 5], maps[1, 0, 0] = 1.0, 1.0
    targets = torch.tensor([0, 0])
    full, gone = 1 / (1 + math.exp(-3)), 0.5
    f = 1 / 8  # each step changes 8 of the 64 pixels
    deletion = deletion_insertion(OnePixel(), images, maps, targets, "deletion", steps=8)
    assert deletion.curves[0].tolist() == pytest.approx([full] + [gone] * 8, rel=1e-15)
    assert deletion.curves[1].tolist() == pytest.approx([full] * 3 + [gone] * 6, rel=1e-15)
    assert deletion.auc.tolist() == pytest.approx([(full + gone) / 2 * f + gone * 7 * f,
                                                   full * 2 * f + (full + gone) / 2 * f + gone * 5 * f], rel=1e-14)
    insertion = deletion_insertion(OnePixel(), images[:1], maps[:1], targets[:1], "insertion", steps=8)
    blurred = 1 / (1 + math.exp(-3 * float(blur(images[:1])[0, 0, 2, 5])))
    assert blurred < full - 0.01  # the zero padding darkens the blur near the border
    assert insertion.curves[0].tolist() == pytest.approx([blurred] + [full] * 8, rel=1e-15)
    scores = road(OnePixel(), images[:1], maps[:1], targets[:1], percentiles=(50,), noise=0.0)
    assert float(scores.morf[0, 0]) == pytest.approx(gone - full, rel=1e-14)
    assert float(scores.lerf[0, 0]) == pytest.approx(0, abs=1e-14)
    assert float(scores.combined[0]) == pytest.approx((full - gone) / 2, rel=1e-14)
    box = boxes_to_regions([[[5, 2, 5, 2]]] * 2, 8, 8)
    assert box[0].sum() == 1 and box[0, 2, 5]
    soft = maps.clone()
    soft[0, 2, 4] = 0.5  # the peak on the object, a third of the mass beside it
    game = pointing_game(soft, box)
    assert game.hit.tolist() == [True, False]
    assert game.energy.tolist() == pytest.approx([2 / 3, 0.0], rel=1e-15)


def test_a_constant_map_by_hand():
    """A constant map orders no pixel: deletion follows raster order (a descending raster ramp
    gives the same curve), Average Drop reads the image times the constant, and ROAD removes
    every pixel in both orders (combined 0)."""
    from mnpo.metrics.faithfulness import road

    images = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    constant = torch.full((1, 8, 8), 0.5, dtype=torch.float64)
    ramp = torch.linspace(1, 0, 64, dtype=torch.float64).view(1, 8, 8)
    target = torch.tensor([0])
    flat = deletion_insertion(LeftHalf(), images, constant, target, "deletion", steps=8)
    ordered = deletion_insertion(LeftHalf(), images, ramp, target, "deletion", steps=8)
    assert torch.equal(flat.curves, ordered.curves)
    # raster order removes one row (8 pixels) a step: the left half's mean falls by 1/8 a step
    expected = [1 / (1 + math.exp(-4 * (1 - s / 8))) for s in range(9)]
    assert flat.curves[0].tolist() == pytest.approx(expected, rel=1e-14)
    full, halved = 1 / (1 + math.exp(-4)), 1 / (1 + math.exp(-2))
    change = confidence_change(LeftHalf(), images, constant, target)
    assert float(change.drop[0]) == pytest.approx((full - halved) / full, rel=1e-14)
    assert not bool(change.increase[0])
    scores = road(LeftHalf(), images, constant, target, percentiles=(30, 70), noise=0.0)
    torch.testing.assert_close(scores.morf, torch.full((1, 2), 0.5 - full, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(scores.lerf, scores.morf, rtol=0, atol=0)
    assert float(scores.combined[0]) == 0


def test_center_and_random_baselines():
    center = center_maps((2, 3, 3))
    side = 1 - 1 / math.sqrt(2)  # distance 1 of the corners' sqrt(2)
    expected = torch.tensor([[0, side, 0], [side, 1, side], [0, side, 0]], dtype=torch.float32)
    torch.testing.assert_close(center, expected.expand(2, 3, 3), rtol=0, atol=1e-7)
    assert center_maps((1, 1, 1)).tolist() == [[[1.0]]]
    first, again, other = random_maps((2, 5, 4), seed=3), random_maps((2, 5, 4), seed=3), random_maps((2, 5, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and 0 <= first.min() and first.max() < 1
    # the center map on LeftHalf: symmetric, so it deletes the used half no faster than the other
    images = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    left = torch.zeros(1, 8, 8, dtype=torch.float64)
    left[:, :, :4] = 1
    centered = deletion_insertion(LeftHalf(), images, center_maps((1, 8, 8)).double(), torch.tensor([0]), steps=8)
    on_left = deletion_insertion(LeftHalf(), images, left, torch.tensor([0]), steps=8)
    assert float(on_left.auc[0]) < float(centered.auc[0])


class GivenMaps:
    """torchcam's CAM-extractor protocol answered with maps we hand it, so that its metrics and
    ours score the same maps (its resize to the input's size is then the identity)."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def float32_setup():
    model, images, maps, targets = setup(n=3, size=8)
    return model.float(), images.float(), maps.float(), targets


def test_confidence_change_equals_torchcams_classification_metric():
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    model, images, maps, targets = float32_setup()
    metric = torchcam_metrics.ClassificationMetric(GivenMaps(model, maps), functools.partial(torch.softmax, dim=-1))
    metric.update(images, class_idx=targets.tolist())
    theirs = metric.summary()
    ours = confidence_change(model, images, maps, targets)
    # theirs: float32 softmax (7 eps of a probability, as above) and a drop divided by Y + 1e-7;
    # the drop (Y - O) / Y then differs by at most (2 * 7 eps + 1e-7) / Y relative, Y >= min base
    bound = (2 * 7 * torch.finfo(torch.float32).eps + 1e-7) / float(ours.base.min())
    assert ours.average_drop / 100 == pytest.approx(theirs["avg_drop"], abs=bound)
    assert ours.increase_in_confidence / 100 == theirs["conf_increase"]


@pytest.mark.parametrize("steps", [5, 64, 40])
def test_deletion_and_insertion_equal_torchcams_from_the_same_baseline(steps):
    """torchcam inserts from its baseline (zeros), not from RISE's blur: ours given baseline 0.
    Its grid is ours (``min(s n, HW)`` pixels at their fraction of HW)."""
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    model, images, maps, targets = float32_setup()
    maps[0, :4] = 0.5  # ties: both in raster order (stable sorts)
    metric = torchcam_metrics.DeletionInsertionMetric(GivenMaps(model, maps), functools.partial(torch.softmax, dim=-1),
                                                      steps=steps, batch_size=5)
    metric.update(images, class_idx=targets.tolist())
    theirs = metric.summary()
    deletion = deletion_insertion(model, images, maps, targets, "deletion", steps=steps)
    insertion = deletion_insertion(model, images, maps, targets, "insertion", steps=steps, baseline=0.0)
    # the same perturbed inputs; their probabilities in float32 (7 eps each), areas of weights
    # summing to 1: the mean area within 7 eps plus their float32 trapezoid's rounding
    bound = 2 * 7 * torch.finfo(torch.float32).eps
    assert float(deletion.auc.mean()) == pytest.approx(theirs["deletion_auc"], abs=bound)
    assert float(insertion.auc.mean()) == pytest.approx(theirs["insertion_auc"], abs=bound)
