"""``Decisions``: recording and replaying ReLU signs and max-pool indices, by hand."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import spread_for_maps

from mnpo.maps import compute_maps
from mnpo.maps.precision import Decisions, Disagreement
from mnpo.models import build_model, released_vgg16_layout


def relu_grad(x, inplace=False):
    x = x.clone().requires_grad_()
    y = F.relu(x * 1.0, inplace=inplace)  # x * 1.0: an in-place ReLU may not take a leaf
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 1 + y.numel(), dtype=y.dtype).view_as(y)).sum(), x)
    return y.detach(), g


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_replay_imposes_the_recorded_signs(inplace):
    recorded_on = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, -0.5]], dtype=torch.float64)
    with Decisions() as recorded:
        relu_grad(recorded_on, inplace)
    assert len(recorded.decisions) == 1
    assert recorded.decisions[0].tolist() == [[True, False, True, False], [True, True, False, False]]
    # the same magnitudes, signs flipped in row 0 units 0 and 1, row 1 unit 2
    x = torch.tensor([[-1e-3, 2e-3, 3.0, -4.0], [0.5, 0.5, 1e-4, -0.5]], dtype=torch.float64)
    with Decisions(replay=recorded.decisions) as replayed:
        y, g = relu_grad(x, inplace)
    # passes where recorded (|x|), blocks where recorded; the gradient follows (weights 1..8)
    assert y.tolist() == [[1e-3, 0.0, 3.0, 0.0], [0.5, 0.5, 0.0, 0.0]]
    assert g.tolist() == [[1.0, 0.0, 3.0, 0.0], [5.0, 6.0, 0.0, 0.0]]
    assert replayed.disagreements == [
        Disagreement("relu", 0, 0, units=2, margin=2e-3, scale=4.0),
        Disagreement("relu", 0, 1, units=1, margin=1e-4, scale=0.5),
    ]
    # without the replay the same input decides by its own signs
    y_own, g_own = relu_grad(x, inplace)
    assert g_own.tolist() == [[0.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 0.0]]


def test_max_pool_replay_takes_the_recorded_index():
    def pooled(x):
        x = x.clone().requires_grad_()
        y = F.max_pool2d(x, 2)
        (g,) = torch.autograd.grad(y.sum(), x)
        return y.detach(), g

    # one 2x2 window: the maximum is at (0, 1) when recording, at (1, 0) in the replayed input
    recorded_on = torch.tensor([[[[1.0, 2.0], [1.5, 0.0]]]])
    with Decisions() as recorded:
        pooled(recorded_on)
    assert recorded.decisions[0].flatten().tolist() == [1]
    x = torch.tensor([[[[1.0, 2.0], [2.25, 0.0]]]])
    with Decisions(replay=recorded.decisions) as replayed:
        y, g = pooled(x)
    assert y.flatten().tolist() == [2.0]
    assert g.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    assert replayed.disagreements == [Disagreement("max_pool2d", 0, 0, units=1, margin=0.25, scale=2.25)]


def test_pools_without_autograd_are_not_decisions():
    x = torch.randn(1, 1, 4, 4)
    with torch.inference_mode(), Decisions() as recorded:
        F.max_pool2d(x, 2)
    assert recorded.decisions == []


def test_replaying_its_own_decisions_changes_nothing():
    torch.manual_seed(0)
    model = spread_for_maps(build_model(released_vgg16_layout(1 / 8), 5))
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    with Decisions() as recorded:
        maps, _ = compute_maps(model, images, targets, method="mnpos")
    with Decisions(replay=recorded.decisions) as replayed:
        again, _ = compute_maps(model, images, targets, method="mnpos")
    assert torch.equal(maps, again)
    assert replayed.disagreements == []
    # 13 backbone ReLUs, head's, the parallel branch's bottleneck and 1x1 ReLUs: all recorded
    assert len(recorded.decisions) == 13 + 1 + 2 * 3 + 2


def test_a_different_computation_is_refused():
    with Decisions() as recorded:
        F.relu(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"relu call 0 has shape \(3, 2\), the recorded decision \(2, 3\)"):
        with Decisions(replay=recorded.decisions):
            F.relu(torch.randn(3, 2))
    with pytest.raises(ValueError, match="relu call 1 has no recorded decision"):
        with Decisions(replay=recorded.decisions):
            F.relu(torch.randn(2, 3))
            F.relu(torch.randn(2, 3))
    with pytest.raises(ValueError, match="the run took 0 decisions, the recording has 1"):
        with Decisions(replay=recorded.decisions):
            pass
