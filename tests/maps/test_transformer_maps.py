"""MNPO's ideas on the transformer networks (issue 24, part 5), against naive float64 versions:

* weight post-processing H carries over: ``mnpo`` weighs the final patch tokens by ``H(W_y)``,
  ``W`` the conv head's kernel summed over its 3x3 taps (the linear classifier GAP and the
  convolution make); with ``b = a`` and a head whose kernel is its centre tap alone, that is the
  semantic map ``S[y]`` (up to its bias, which the normalization removes);
* gradient post-processing carries over at a shallower block: ``mnpos`` at ``blocks.10`` (the
  default) from one network's gradients, computed here by full backward passes through a hook;
* the multi-branch fusion does not: these networks have one branch.
"""

import numpy as np
import pytest
import torch

from mnpo.maps import compute_maps
from mnpo.models import build_model
from naive_vit import perturbed

from maps.reference import h_numpy, normalize_numpy, resize, weighted_mean


@pytest.fixture(scope="module", params=["tscam", "sat"])
def net(request):
    torch.manual_seed(11)
    return perturbed(build_model(f"deit_small-{request.param}", 4, width=0.0625).double().eval())


def test_mnpo_weighs_the_final_tokens_by_the_post_processed_head_weights(net):
    images = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    targets = torch.tensor([3, 0])
    maps, _ = compute_maps(net, images, targets, method="mnpo")
    with torch.no_grad():
        tokens = net.backbone(images, ["norm"])["norm"].numpy()
    for i in range(2):
        w = net.head.weight[targets[i]].detach().numpy().sum(axis=(1, 2))  # (C,) over the 3x3 taps
        cam = resize(weighted_mean(h_numpy(w, "scale", 10.0, 5.0), tokens[i]), (64, 48), "bicubic")
        assert np.allclose(maps[i].numpy(), normalize_numpy(cam), atol=1e-10)


def test_mnpo_with_equal_factors_and_a_centre_tap_head_is_the_semantic_map(net):
    model = build_model(f"deit_small-{net.layout.network}", 4, width=0.0625).double().eval()
    model.load_state_dict(net.state_dict())
    with torch.no_grad():
        centre = model.head.weight[:, :, 1, 1].clone()
        model.head.weight.zero_()
        model.head.weight[:, :, 1, 1] = centre
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    flat, _ = compute_maps(model, images, targets, method="mnpo", a=1.0, b=1.0)
    semantic, _ = compute_maps(model, images, targets, method="gradcam", target_layer="head", relu=False)
    assert torch.allclose(flat, semantic, atol=1e-10)  # Grad-CAM at the head without ReLU: S[y] itself
    weighted, _ = compute_maps(model, images, targets, method="mnpo")
    assert not torch.allclose(weighted, flat, atol=1e-3)  # H's b / a = 0.5 changes the map


def test_mnpos_at_a_shallower_block_equals_full_backward_passes(net):
    images = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    targets = torch.tensor([2, 1])
    maps, _ = compute_maps(net, images, targets, method="mnpos")  # default layer blocks.10
    for i in range(2):
        x, y = images[i: i + 1], int(targets[i])

        def at_block(objective):
            kept = {}

            def keep(module, inputs, output):
                output[0].retain_grad()
                kept["tokens"] = output[0]

            hook = net.backbone.blocks[10].register_forward_hook(keep)
            try:
                logits = net(x).logits[0]
                net.zero_grad(set_to_none=True)
                objective(logits).backward()
            finally:
                hook.remove()
            tokens, grad = kept["tokens"][0, 1:1 + 12], kept["tokens"].grad[0, 1:1 + 12]  # the 3 x 4 patches
            return (tokens.T.reshape(-1, 3, 4).detach().numpy(), grad.T.reshape(-1, 3, 4).numpy(),
                    logits[0].detach().numpy())

        a, g, logits = at_block(lambda out: out[0, y])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        v = torch.from_numpy(p - 10.0 * np.eye(4)[y])  # the released loss gradient, t = 10 onehot(y)
        _, d, _ = at_block(lambda out: (out[0] * v).sum())
        alpha = h_numpy(g.sum(axis=(1, 2)), "scale", 8.0, 4.0)
        enhanced = a / np.sqrt((a**2).sum()) - d / np.sqrt((d**2).sum())
        cam = resize(weighted_mean(alpha, enhanced), (48, 64), "bicubic")
        assert np.allclose(maps[i].numpy(), normalize_numpy(cam), atol=1e-9)
