"""Float32 maps of full-width networks against float64 ones (issue 26), within derived bounds.

A float32 gradient map can be far from the float64 one on an image where the two runs decide
a ReLU (or a max-pool) after the target layer differently: a pre-activation within rounding of
0 (``mnpo.maps.precision``). Each test therefore runs float64 with float32's decisions and checks

* every decision float64 would have taken otherwise lies within float32's rounding of the
  pre-activation: ``margin / scale <= chain_bound`` (one forward pass);
* with the same decisions, the normalized maps agree within ``kappa * chain_map_bound``
  (forward and backward for the gradient methods, forward for ``mnpo``), where ``kappa`` is
  the channel sum's conditioning, ``max_pixel sum_c |w_c F_c| / range(sum_c w_c F_c)``,
  measured on the float64 run: the terms carry the network's relative error, the map's range
  is what normalization divides by. CAM-like sums of non-negative features with mixed-sign
  weights cancel (``kappa`` 3 to 12 on the issue's case); MNPOs's ``A/||A|| - D/||D||`` terms
  hardly do (about 1.3).

Networks: the issue's own case (released VGG16, seed 0, fourth batch: on this repository's CPU
two of its images are decided apart) and seeded full-width networks of the three MNPO layouts.
"""

import copy

import pytest
import torch
from numerics import chain_bound, chain_map_bound

from mnpo.maps import compute_maps
from mnpo.maps.methods import DEFAULT_GRADIENT_LAYER, DEFAULT_H
from mnpo.maps.postprocess import weight_postprocess
from mnpo.maps.precision import Decisions
from mnpo.models import build_model, released_vgg16_layout, resnet50_layout, three_branch_vgg16_layout

pytestmark = pytest.mark.slow
CLASSES = 200
GRADIENT_METHODS = ("mnpos", "dgl", "gradcam")


def spread_statistics(model):
    """The issue's BatchNorm statistics: mean U(-0.1, 0.1), variance U(0.5, 1.5)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def issue_case():
    """Seed 0, the released VGG16 at width 1.0, four batches of four 224 px images: the fourth."""
    torch.manual_seed(0)
    model = spread_statistics(build_model(released_vgg16_layout(1.0), CLASSES))
    batches = [(torch.randn(4, 3, 224, 224), torch.randint(0, CLASSES, (4,))) for _ in range(4)]
    return model, *batches[3]


def seeded_case(layout, seed, size=112):
    torch.manual_seed(seed)
    model = spread_statistics(build_model(layout(1.0), CLASSES))
    return model, torch.randn(4, 3, size, size), torch.randint(0, CLASSES, (4,))


CASES = {
    "issue": issue_case,
    **{f"vgg16-mnpo-seed{s}": (lambda s=s: seeded_case(released_vgg16_layout, s)) for s in (1, 2, 3)},
    "vgg16-mnpo3-seed0": lambda: seeded_case(three_branch_vgg16_layout, 0),
    "resnet50-mnpo-seed0": lambda: seeded_case(resnet50_layout, 0),
}


def conditioning(terms: list[torch.Tensor], relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, ``max_pixel sum_c |terms| / range(map)`` for the map ``max_i sum_c terms[i]``
    (the branches' channel sums fused by their maximum; one sum, one branch), each ``terms[i]``
    ``(B, C, h, w)``: ``(B,)``. Infinite where the map (after the CAM family's ReLU) is constant,
    which normalization turns into zeros. Second, ``(B,)``: the raw map's largest value over
    that magnitude; where it is within rounding of 0, rounding alone can make the map non-constant."""
    raw = torch.stack([t.sum(1) for t in terms]).amax(0)
    flat = (raw.clamp_min(0) if relu else raw).flatten(1)
    magnitude = torch.stack([t.abs().sum(1).flatten(1).amax(1) for t in terms]).amax(0)
    return magnitude / (flat.amax(1) - flat.amin(1)), raw.flatten(1).amax(1) / magnitude


def channel_terms(model64, images, targets, method):
    """The terms ``w_c F_c`` of the channel sums the method's map is made of (float64, one per
    branch for ``mnpo``), and whether the CAM family's ReLU follows."""
    if method == "mnpo":
        with torch.no_grad():
            out = model64(images, return_features=True)
        weights = weight_postprocess(model64.classifier.weight.detach()[targets], "scale", *DEFAULT_H["mnpo"])
        return [weights[:, :, None, None] * out.features[b.name] for b in model64.layout.branches], False
    if method == "gradcam":  # at head: d logit_y / d head = w_y / (h w) everywhere
        with torch.no_grad():
            head = model64(images, return_features=True).features["head"]
        return [model64.classifier.weight.detach()[targets][:, :, None, None] * head], True
    layer = DEFAULT_GRADIENT_LAYER[model64.layout.backbone]
    out = model64(images, return_features=True, grad_from=layer)
    A = out.features[layer]
    logits = out.logits if method == "mnpos" else out.logits[:1]
    pick = torch.zeros_like(logits[0]).scatter_(1, targets[:, None], 1.0)
    G = torch.autograd.grad(list(logits), A, [pick] * len(logits), retain_graph=True)[0]
    D = torch.autograd.grad(list(logits), A, [(l.detach().softmax(1) - 10 * pick) for l in logits])[0]
    alpha = weight_postprocess(G.sum((2, 3)), "scale", *DEFAULT_H[method])
    enhanced = A / A.flatten(1).norm(dim=1)[:, None, None, None] - D / D.flatten(1).norm(dim=1)[:, None, None, None]
    return [alpha[:, :, None, None] * enhanced.detach()], False


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, images, targets = CASES[request.param]()
    return model, copy.deepcopy(model).double(), images, targets


@pytest.mark.parametrize("method", ["mnpos", "dgl", "gradcam", "mnpo"])
def test_float32_equals_float64_given_the_same_decisions(case, method):
    model, model64, images, targets = case
    with Decisions() as recorded:
        maps32, _ = compute_maps(model, images, targets, method=method)
    with Decisions(replay=recorded.decisions) as replayed:
        maps64, _ = compute_maps(model64, images.double(), targets, method=method)
    rounding = chain_bound(model, torch.float32)
    far = [d for d in replayed.disagreements if d.margin > rounding * d.scale]
    assert not far, f"decided apart by more than float32's rounding ({rounding:.1e} of the scale): {far}"
    passes = 2 if method in GRADIENT_METHODS else 1
    kappa, peak = conditioning(*channel_terms(model64, images.double(), targets, method))
    unit = chain_map_bound(model, torch.float32, passes)
    worst = (maps32.double() - maps64).abs().flatten(1).amax(1)
    posed = torch.isfinite(kappa)
    # a Grad-CAM map negative everywhere is zero after its ReLU: float32 must give the same zeros
    # unless its largest raw value is within rounding of 0 (issue case: image 0; ResNet50 seed 0:
    # images 1 and 3, peaks -0.4% of the magnitude, equal zeros in both)
    assert ((worst[~posed] == 0) | (peak[~posed].abs() <= unit)).all(), \
        f"{method}: constant float64 maps differ in float32: {worst.tolist()} (peaks {peak.tolist()})"
    bound = kappa * unit
    assert (worst[posed] <= bound[posed]).all(), \
        f"{method}: per-image differences {worst.tolist()} > bounds {bound.tolist()} (kappa {kappa.tolist()})"

def test_float32_parts_from_float64_only_where_a_decision_differs():
    """Why the test above replays decisions: without them, float32 and float64 maps of the
    issue's case part beyond the bound on the images where a decision differs, and only there
    (on this repository's 2-core EPYC, AVX2: images 0, 1 and 3, by 2.8e-3, 9.0e-4 and 2.7e-3;
    which images, if any, depends on the kernel path)."""
    model, images, targets = issue_case()
    model64 = copy.deepcopy(model).double()
    with Decisions() as recorded:
        maps32, _ = compute_maps(model, images, targets, method="mnpos")
    with Decisions(replay=recorded.decisions) as replayed:
        compute_maps(model64, images.double(), targets, method="mnpos")
    maps64, _ = compute_maps(model64, images.double(), targets, method="mnpos")
    worst = (maps32.double() - maps64).abs().flatten(1).amax(1)
    bound = chain_map_bound(model, torch.float32, passes=2)
    decided_apart = {d.row for d in replayed.disagreements}
    assert {int(i) for i in (worst > bound).nonzero().flatten()} <= decided_apart
