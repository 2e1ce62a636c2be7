"""The DeiT backbone: against a naive float64 ViT written from the definition, against timm's
DeiT with the same weights, its taps, truncated passes, attention weights only when asked,
positional embeddings for other sizes, stochastic depth and bad sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from mnpo.models import deit as deit_module
from mnpo.models.backbones import build_backbone
from mnpo.models.deit import DEIT_SIZES, DeiTBackbone, class_token_attention, patch_map
from naive_vit import naive_deit, perturbed


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return perturbed(DeiTBackbone("deit_small", width=0.0625).eval())  # 24 channels, 6 heads of 4


def test_taps_and_attention_equal_the_naive_definition(small_net):
    images = torch.randn(2, 3, 64, 48)  # 4 x 3 patches: positions resized too
    small_net.pos_embed.data.copy_(torch.randn_like(small_net.pos_embed) * 0.1)
    with torch.no_grad():
        out = small_net(images, ["blocks.0", "blocks.7", "norm", "attention.3", "attention.11"])
    blocks, attentions, finals = naive_deit(small_net, images)
    for i in range(2):
        grid = lambda tokens: tokens[1:].T.reshape(-1, 4, 3)
        for tap, b in (("blocks.0", 0), ("blocks.7", 7)):
            assert torch.allclose(out[tap][i].double(), grid(blocks[i][b]), atol=1e-5)
        assert torch.allclose(out["norm"][i].double(), grid(finals[i]), atol=1e-5)
        for b in (3, 11):
            assert torch.allclose(out[f"attention.{b}"][i].double(), attentions[i][b], atol=1e-6)
    assert out["blocks.0"].shape == (2, 24, 4, 3) and out["attention.3"].shape == (2, 6, 13, 13)


def test_class_token_attention_sums_the_head_means_of_the_class_row():
    weights = [torch.rand(2, 3, 7, 7) for _ in range(4)]  # T = 1 + 2 x 3
    expected = torch.zeros(2, 2, 3)
    for b in range(2):
        for a in weights:
            expected[b] += torch.stack([a[b, h, 0, 1:] for h in range(3)]).mean(0).reshape(2, 3)
    assert torch.allclose(class_token_attention(weights, (2, 3)), expected, atol=1e-6)


def test_only_a_block_asked_for_its_weights_leaves_the_fused_kernel(small_net, monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(deit_module.F, "scaled_dot_product_attention", counting)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = small_net(images, ["norm"])["norm"]
        assert len(calls) == 12
        calls.clear()
        asked = small_net(images, ["norm", "attention.5"])
    assert len(calls) == 11
    assert torch.allclose(plain, asked["norm"], atol=1e-5)  # the two kernels agree


def test_a_pass_stops_after_the_deepest_tap(small_net, monkeypatch):
    seen = []
    for i, block in enumerate(small_net.blocks):
        monkeypatch.setattr(block, "forward", lambda x, need=False, b=block, i=i: (seen.append(i), type(b).forward(b, x, need))[1])
    with torch.no_grad():
        small_net(torch.randn(1, 3, 32, 32), ["blocks.4"])
    assert seen == [0, 1, 2, 3, 4]


def test_a_truncated_pass_gives_the_full_graphs_gradient(small_net):
    images = torch.randn(2, 3, 48, 48)
    weight = torch.randn(24)
    # full graph: the gradient of a score of the final tokens at block 6's patch tokens
    kept = {}

    def keep(module, inputs, output):
        output[0].retain_grad()
        kept["t"] = output[0]

    hook = small_net.blocks[6].register_forward_hook(keep)
    try:
        final = small_net(images, ["norm"])["norm"]
    finally:
        hook.remove()
    (final.mean((2, 3)) @ weight).sum().backward()
    expected = patch_map(kept["t"].grad, (3, 3))
    small_net.zero_grad()
    out = small_net(images, ["norm"], grad_from="blocks.6")
    leaf = out["blocks.6"]
    assert leaf.is_leaf and leaf.requires_grad
    (grad,) = torch.autograd.grad((out["norm"].mean((2, 3)) @ weight).sum(), leaf)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in small_net.parameters())  # no parameter gradient


def test_equal_to_timms_deit_with_the_same_weights():
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ours = DeiTBackbone("deit_tiny").eval()
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    state = ref.state_dict()
    assert set(state) == set(ours.state_dict())  # the same names, key for key
    ours.load_state_dict(state)
    for size in ((224, 224), (256, 192)):
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = patch_map(ref.forward_features(images), (size[0] // 16, size[1] // 16))
            assert torch.allclose(ours(images, ["norm"])["norm"], expected, atol=1e-4)


def test_sizes_and_their_refusals():
    for name, (dim, heads) in DEIT_SIZES.items():
        net = build_backbone(name, width=0.125)
        assert (net.dim, net.heads) == (dim // 8, heads) and len(net.blocks) == 12
        assert net.taps["blocks.11"].channels == dim // 8 and net.taps["norm"].stride == 16
    full = DeiTBackbone("deit_small")
    assert sum(p.numel() for p in full.parameters()) == 22_050_664 - (384 * 1000 + 1000)  # timm's, less the head
    with pytest.raises(ValueError, match="deit_tiny at width 0.1: 19 channels do not split over its 3 heads"):
        DeiTBackbone("deit_tiny", width=0.1)
    with pytest.raises(ValueError, match="unknown DeiT size 'deit_huge'"):
        DeiTBackbone("deit_huge")
    with pytest.raises(ValueError, match="large_feature_map is a CNN option"):
        build_backbone("deit_small", large_feature_map=True)
    with pytest.raises(KeyError, match="unknown tap"):
        full(torch.zeros(1, 3, 32, 32), ["blocks.12"])
    with pytest.raises(KeyError, match="a truncated pass starts at a map tap"):
        full(torch.zeros(1, 3, 32, 32), [], grad_from="attention.2")
    with pytest.raises(ValueError, match="replace"):
        full(torch.zeros(1, 3, 32, 32), ["norm"], replace=("blocks.3", torch.zeros(1, 384, 2, 2)))


def test_stochastic_depth_rises_linearly_and_acts_in_training_only():
    net = DeiTBackbone("deit_tiny", width=0.0625, drop_path=0.22)
    rates = [b.drop_path1.p for b in net.blocks]
    assert rates == pytest.approx([0.02 * i for i in range(12)])
    drop = net.blocks[11].drop_path1
    x = torch.ones(4000, 3, 5)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y[:, 0, 0] != 0
    assert torch.all(y[kept] == 1 / 0.78) and torch.all(y[~kept] == 0)  # whole samples, rescaled
    assert abs(kept.float().mean().item() - 0.78) < 4 * math.sqrt(0.78 * 0.22 / 4000)
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        DeiTBackbone("deit_tiny", drop_path=1.0)
