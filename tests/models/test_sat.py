"""SAT: its network and class-agnostic map against a naive float64 version from the definition,
the gated attention's two kernels, its smoothing kernel and loss by hand, gradients reaching the
localization token, ImageNet weights and the authors' checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from mnpo.engine.training_methods import sat_loss
from mnpo.maps import compute_maps
from mnpo.maps.methods import METHODS
from mnpo.models import build_model
from mnpo.models.checkpoint import CheckpointError
from mnpo.models.deit import Attention
from mnpo.models.sat import sat_kernel
from mnpo.models.transformer_checkpoint import convert_state_dict, export_state_dict, import_checkpoint
from naive_vit import naive_deit, perturbed


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(4)
    return perturbed(build_model("deit_small-sat", 4, width=0.0625).eval())


def test_logits_gates_and_map_equal_the_naive_definition(net):
    images = torch.randn(2, 3, 48, 64)  # 3 x 4 patches
    _, _, finals, gates = naive_deit(net.backbone, images, sat=True)
    with torch.no_grad():
        out = net(images, return_features=True, taps=["gate.9", "gate.11"])
    weight, bias = net.head.weight.double(), net.head.bias.double()
    for i in range(2):
        grid = finals[i][1:13].T.reshape(1, -1, 3, 4)  # the patch tokens, the localization token left out
        logits = F.conv2d(grid, weight, bias, padding=1)[0].mean((1, 2))
        assert torch.allclose(out.logits[0][i].double(), logits, atol=1e-5)
        assert torch.allclose(out.features["gate.9"][i].double(), gates[i][0], atol=1e-6)
        assert torch.allclose(out.features["gate.11"][i].double(), gates[i][2], atol=1e-6)
        expected = sum(g[1:13] for g in gates[i]).reshape(3, 4) / 3
        assert torch.allclose(out.features["sat_map"][i, 0].double(), expected, atol=1e-6)
    # compute_maps' cam is that map for any target: class-agnostic
    first, _ = compute_maps(net, images, torch.tensor([0, 0]), method="cam", resize="bilinear")
    other, _ = compute_maps(net, images, torch.tensor([3, 1]), method="cam", resize="bilinear")
    assert torch.equal(first, other)
    raw = out.features["sat_map"][:, 0].double()
    resized = F.interpolate(raw[:, None], size=(48, 64), mode="bilinear", align_corners=False)[:, 0]
    low, high = resized.amin((1, 2), keepdim=True), resized.amax((1, 2), keepdim=True)
    assert torch.allclose(first.double(), (resized - low) / (high - low), atol=1e-4)
    for method in METHODS:
        maps, _ = compute_maps(net, images, torch.tensor([1, 2]), method=method)
        assert maps.shape == (2, 48, 64) and torch.isfinite(maps).all(), method


def test_gating_the_values_in_the_fused_kernel_equals_gating_the_weights():
    torch.manual_seed(0)
    attention = Attention(24, 6).double()
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    fused, none, gate = attention(x, need_weights=False, gate_query=-1)
    explicit, weights, same_gate = attention(x, need_weights=True, gate_query=-1)
    assert none is None and torch.equal(gate, same_gate) and gate.shape == (3, 9)
    assert torch.allclose(fused, explicit, atol=1e-12)
    # the gated weights: each row's softmax times g over the keys, no longer summing to 1
    plain = attention(x, need_weights=True)[1]
    assert torch.allclose(weights, plain * gate[:, None, None, :], atol=1e-15)


def test_the_smoothing_kernel_by_hand():
    # three equal bins of [-49/6, 49/6] (nsig 6 plus half of 13/3): the edge bins hold Phi(-49/18) - Phi(-49/6)
    def phi(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    edge = phi(-49 / 18) - phi(-49 / 6)
    middle = 1 - 2 * edge
    root = [math.sqrt(edge), math.sqrt(middle), math.sqrt(edge)]
    expected = torch.tensor([[a * b for b in root] for a in root], dtype=torch.float64) / sum(root) ** 2
    kernel = sat_kernel()
    assert torch.allclose(kernel, expected, atol=1e-15) and abs(kernel.sum().item() - 1) < 1e-15
    assert kernel[1, 1].item() == pytest.approx(0.8054, abs=1e-4) and kernel[0, 1].item() == pytest.approx(0.0460, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np
    x = np.linspace(-6 - 13 / 6, 6 + 13 / 6, 4)
    k = np.diff(scipy_stats.norm.cdf(x))
    raw = np.sqrt(np.outer(k, k))
    assert np.allclose(kernel.numpy(), raw / raw.sum(), atol=1e-15)


def test_sat_loss_against_a_loop():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 5), torch.tensor([4, 0, 2])
    m = torch.rand(3, 1, 4, 5)
    k = sat_kernel()
    total_ce = sum(-torch.log_softmax(logits[i].double(), 0)[labels[i]] for i in range(3)) / 3
    smooth_terms, area = [], 0.0
    for b in range(3):
        for y in range(4):
            for x in range(5):
                v = sum(k[dy + 1, dx + 1] * m[b, 0, y + dy, x + dx].double()
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if 0 <= y + dy < 4 and 0 <= x + dx < 5)
                smooth_terms.append((1 - v) * v)
                area += m[b, 0, y, x].double()
    for target in (0.25, 0.75):  # the map's mean (about 0.5) above the target, and below it
        expected = total_ce + abs(area / 60 - target) + sum(smooth_terms) / 60
        assert sat_loss(logits, m, labels, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_loss_reaches_the_localization_token_through_the_gates():
    torch.manual_seed(2)
    model = build_model("deit_tiny-sat", 3, width=0.0625).train()
    out = model(torch.randn(2, 3, 32, 32), return_features=True)
    area_only = (out.features["sat_map"].mean() - 0.25).abs()
    area_only.backward()
    assert model.backbone.loc_token.grad.abs().sum() > 0 and model.backbone.loc_embed.grad.abs().sum() > 0
    assert model.backbone.blocks[9].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[8].attn.qkv.weight.grad.abs().sum() > 0  # through the tokens blocks 9-11 read
    assert model.head.weight.grad is None  # the map does not read the head


def test_imagenet_weights_leave_the_localization_token_as_initialized(tmp_path):
    torch.manual_seed(5)
    plain = build_model("deit_tiny-tscam", 3).backbone.state_dict()
    state = {k: torch.randn_like(v) for k, v in plain.items()}
    torch.save({"model": {**state, "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}},
               tmp_path / "deit_tiny.pth")
    torch.manual_seed(7)
    model = build_model("deit_tiny-sat", 3, pretrained=str(tmp_path / "deit_tiny.pth"))
    torch.manual_seed(7)
    fresh = build_model("deit_tiny-sat", 3)
    assert torch.equal(model.backbone.loc_token, fresh.backbone.loc_token)
    assert torch.equal(model.backbone.loc_embed, fresh.backbone.loc_embed)
    assert torch.equal(model.backbone.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


def test_authors_checkpoints_import_by_name_and_round_trip(tmp_path):
    """Their SAT's names (TS-CAM's, plus loc_token, loc_embed and the kernel 'weight'), saved as
    train.py saves them: {'model': DataParallel's state dict, 'best_thr', 'epoch'}."""
    torch.manual_seed(8)
    ours = build_model("deit_tiny-sat", 6)
    theirs = export_state_dict(ours)
    assert {"loc_token", "loc_embed", "weight", "cls_token", "head.weight", "blocks.11.attn.qkv.weight"} <= set(theirs)
    assert not any(k.startswith("backbone.") for k in theirs)
    # their names, written out: the tokens and embeddings where their Model/SAT.py keeps them
    for name in ("loc_token", "loc_embed", "cls_token", "pos_embed"):
        assert torch.equal(theirs[name], getattr(ours.backbone, name)), name
    assert torch.equal(theirs["head.weight"], ours.head.weight)
    src = tmp_path / "best_gt.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in theirs.items()}, "best_thr": 0.35, "epoch": 30}, src)
    summary = import_checkpoint(src, tmp_path / "ours.pt", "sat")
    assert summary["layout"] == "deit_tiny-sat" and summary["num_classes"] == 6
    back = convert_state_dict(theirs, network="sat")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    bad = {**theirs, "weight": torch.ones(1, 1, 3, 3) / 9}
    with pytest.raises(CheckpointError, match="'weight' is not SAT's fixed 3x3 smoothing kernel"):
        convert_state_dict(bad, network="sat")
    with pytest.raises(CheckpointError, match="loc_token is missing"):
        convert_state_dict({k: v for k, v in theirs.items() if k != "loc_token"}, network="sat")
    with pytest.raises(CheckpointError, match="loc_token"):  # a SAT file read as TS-CAM's: its token has no place
        convert_state_dict({k: v for k, v in theirs.items() if k != "weight"}, network="tscam")
