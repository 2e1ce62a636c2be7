"""MNPO and MNPOs maps of an imported released checkpoint equal the release's inference.

The expected maps are computed here on ``ReleasedLayoutNet`` (the release's module names and
forward, tests/released_net.py) the way the authors' inference does it, written from the spec.
Details settled by reading their code (``wsol/VGG_MNPOs.py``, ``inference.py``):

* MNPO: both branch maps use the same H-processed ``fc.weight[y]``; each map is moved to
  float64 (``t2n``), resized per image with ``cv2.resize(..., INTER_CUBIC)`` to the input size,
  fused with an element-wise max, then min-max normalized (NaN or constant -> zeros).
* MNPOs: the evaluated map is the main-branch gradient map alone (the branch CAM the model
  also returns is not used by ``inference.py``); four full backward passes, batch-wide
  (``logits[range(B), y].sum()``), read the gradients at ``conv5_2``; the loss gradient is
  ``softmax(logits) - t`` with ``t = 10 * onehot`` (their custom backward), 1000 columns wide.
"""

import cv2
import numpy as np
import pytest
import torch
from numerics import map_bound, network_bound
from released_net import ReleasedLayoutNet, randomized

from mnpo.maps import compute_maps
from mnpo.models.release import convert_released_state_dict


def h_scale(w, a, b):
    return torch.where(w > 0, w * a, w * b)


def release_postprocess(per_branch_maps, size):
    """t2n, cubic resize per image, max over branches, normalize_scoremap."""
    out = []
    for maps in zip(*per_branch_maps, strict=True):
        resized = [cv2.resize(m.detach().numpy().astype(np.float64), (size[1], size[0]),
                              interpolation=cv2.INTER_CUBIC) for m in maps]
        cam = np.maximum.reduce(resized)
        if np.isnan(cam).any() or cam.min() == cam.max():
            cam = np.zeros_like(cam)
        else:
            cam = (cam - cam.min()) / (cam - cam.min()).max()
        out.append(cam)
    return np.stack(out)


def release_mnpo(net, images, labels):
    with torch.no_grad():
        _, f = net(images, return_features=True)
        w = h_scale(net.fc.weight[labels], 10, 5)[:, :, None, None]
        cams1, cams2 = (w * f["head"]).mean(1), (w * f["branch"]).mean(1)
    return release_postprocess([cams1, cams2], images.shape[-2:])


def release_mnpos(net, images, labels):
    b = images.shape[0]
    rows = torch.arange(b)

    def grad_at_conv5_2(objective):
        net.zero_grad()
        (logits1, logits2), f = net(images, return_features=True)
        a = f["conv5_2"]
        a.retain_grad()
        objective(logits1, logits2).backward()
        return a.detach(), a.grad.detach()

    target = torch.zeros(b, 1000, dtype=images.dtype)
    target[rows, labels] = 10

    def loss_vector(logits):
        return (logits.softmax(1) - target).detach()  # the release's custom backward

    _, g_branch = grad_at_conv5_2(lambda l1, l2: l2[rows, labels].sum())
    _, d_branch = grad_at_conv5_2(lambda l1, l2: (l2 * loss_vector(l2)).sum())
    a, g_main = grad_at_conv5_2(lambda l1, l2: l1[rows, labels].sum())
    _, d_main = grad_at_conv5_2(lambda l1, l2: (l1 * loss_vector(l1)).sum())
    alpha = h_scale((g_main + g_branch).sum((2, 3)), 8, 4)
    d = d_main + d_branch
    enhanced = a / a.reshape(b, -1).norm(dim=1).view(b, 1, 1, 1) - d / d.reshape(b, -1).norm(dim=1).view(b, 1, 1, 1)
    cams1 = (alpha[:, :, None, None] * enhanced).mean(1)
    return release_postprocess([cams1], images.shape[-2:])


@pytest.fixture(scope="module")
def pair():
    net = randomized(ReleasedLayoutNet(num_classes=1000, width=1 / 8), seed=3).double()
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.3)
        for value in net.state_dict().values():  # float32-representable weights: the conversion
            value.copy_(value.float())            # below goes through float32 and loses nothing
    ours = convert_released_state_dict({k: v.float() for k, v in net.state_dict().items()}).double()
    torch.manual_seed(0)
    return net, ours, torch.randn(3, 3, 96, 96, dtype=torch.float64), torch.tensor([7, 500, 999])


def test_mnpo_equals_the_release(pair):
    net, ours, images, labels = pair
    expected = release_mnpo(net, images, labels)
    got, logits = compute_maps(ours, images, labels, method="mnpo")
    assert np.abs(got.numpy() - expected).max() <= map_bound(ours, torch.float64)  # float64 both sides
    with torch.no_grad():
        expected_logits = net(images)[0]
    bound = network_bound(ours, torch.float64) * float(expected_logits.abs().max())
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=bound)


def test_mnpos_equals_the_release(pair):
    net, ours, images, labels = pair
    expected = release_mnpos(net, images, labels)
    got, _ = compute_maps(ours, images, labels, method="mnpos")
    assert np.abs(got.numpy() - expected).max() <= map_bound(ours, torch.float64, passes=2)  # float64 both sides
    # the exact loss gradient is a different map: the option is not a no-op
    exact, _ = compute_maps(ours, images, labels, method="mnpos", loss_gradient="exact")
    assert np.abs(exact.numpy() - expected).max() > 1e-3
    # and the parallel branch's gradients matter: the main branch alone (DGL) differs
    dgl, _ = compute_maps(ours, images, labels, method="dgl", a=8.0, b=4.0)
    assert np.abs(dgl.numpy() - expected).max() > 1e-3
