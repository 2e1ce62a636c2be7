"""SCM: the grid Laplacian by hand, Newton-Schulz against its closed form and torch.linalg.inv,
a calibration layer against a naive float64 loop written from the definition, gradients reaching
its rate and temperature, and the authors' checkpoints."""

import pytest
import torch

from mnpo.models import build_model
from mnpo.models.checkpoint import CheckpointError
from mnpo.models.scm import (CalibrationLayer, ScmTraining, SpatialCalibration, grid_laplacian, minmax_rows,
                             newton_schulz_inverse)
from mnpo.models.transformer_checkpoint import SCM_LAYER_KEYS, convert_state_dict, export_state_dict, import_checkpoint


def test_grid_laplacian_of_a_2_by_3_grid_by_hand():
    # 0 1 2
    # 3 4 5
    expected = torch.tensor([
        [2, -1, 0, -1, 0, 0],
        [-1, 3, -1, 0, -1, 0],
        [0, -1, 2, 0, 0, -1],
        [-1, 0, 0, 2, -1, 0],
        [0, -1, 0, -1, 3, -1],
        [0, 0, -1, 0, -1, 2]], dtype=torch.float32)
    assert torch.equal(grid_laplacian(2, 3), expected)
    big = grid_laplacian(14, 14)
    assert big.sum(1).abs().max() == 0 and torch.equal(big, big.T)
    assert sorted(set(torch.diag(big).tolist())) == [2.0, 3.0, 4.0]


def test_newton_schulz_is_its_closed_form_and_reaches_the_inverse():
    """For symmetric x = Q diag(l) Q^T: X_k = Q diag((1 - (1 - alpha l^2)^(2^k)) / l) Q^T, so the
    error against x^-1 is Q diag((1 - alpha l^2)^(2^k) / l) Q^T, exactly."""
    x = (grid_laplacian(4, 4, torch.float64) + 0.5 * torch.eye(16, dtype=torch.float64))
    values, vectors = torch.linalg.eigh(x)
    alpha = 1.0 / values.max().item() ** 2  # every |1 - alpha l^2| < 1
    inverse = torch.linalg.inv(x)
    for k in (1, 4, 16):
        got = newton_schulz_inverse(x, k, alpha)
        residual = (1 - alpha * values**2) ** (2**k)
        closed = vectors @ torch.diag((1 - residual) / values) @ vectors.T
        assert torch.allclose(got, closed, atol=1e-12)
        error = torch.linalg.matrix_norm(got - inverse, ord=2).item()
        assert error == pytest.approx((residual / values).abs().max().item(), rel=1e-6, abs=1e-13)
    assert torch.allclose(newton_schulz_inverse(x, 16, alpha), inverse, atol=1e-10)
    # batched, and the authors' alpha 0.002 on a 14 x 14 grid's Laplacian + I: 16 steps leave the
    # residual (1 - 0.002 l^2)^(2^16) at the smallest eigenvalue l = 1, far from converged
    big = grid_laplacian(14, 14, torch.float64) + torch.eye(196, dtype=torch.float64)
    smallest = torch.linalg.eigvalsh(big).min().item()
    got = newton_schulz_inverse(torch.stack([big, 2 * big]), 16)
    assert got.shape == (2, 196, 196)
    expected_residual = (1 - 0.002 * smallest**2) ** (2**16)
    assert expected_residual < 1e-50 and torch.allclose(got[0], torch.linalg.inv(big), atol=1e-8)


def naive_layer(layer: CalibrationLayer, semantic: torch.Tensor, cam: torch.Tensor):
    """Float64 loops over the patches, from the definition (models/scm.py's docstring)."""
    s = semantic.double()
    c = cam.double()
    b_count, k, h, w = s.shape
    n = h * w
    rate, temperature = layer.rate.double().item(), layer.temperature.double().item()
    out_s, out_c = [], []
    for b in range(b_count):
        vectors = [s[b, :, p // w, p % w] for p in range(n)]
        g = torch.zeros(n, n, dtype=torch.float64)
        for p in range(n):
            neighbours = [q for q in range(n) if abs(q // w - p // w) + abs(q % w - p % w) == 1]
            for q in neighbours:
                sim = vectors[p] @ vectors[q] / (vectors[p].norm() * vectors[q].norm())
                g[p, q] = -(rate * sim - 1)  # L_pq = -1
            g[p, p] = len(neighbours) * (rate * 1.0 - 1)  # the self-similarity is 1
        x = 0.002 * g.T
        for _ in range(layer.iterations):
            x = x @ (2 * torch.eye(n, dtype=torch.float64) - g @ x)
        update = x.T @ c[b]
        update = update / (temperature * c[b].max())
        update = update - torch.tanh(update)
        update = (update - update.min()) / (update - update.min()).max()
        out_s.append(s[b] + s[b] * update.reshape(h, w))
        out_c.append(c[b] + update)
    return torch.stack(out_s), torch.stack(out_c)


def test_a_calibration_layer_equals_the_naive_loop():
    torch.manual_seed(0)
    layer = CalibrationLayer(4, rate=0.8, temperature=0.6).double()
    semantic = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    cam = minmax_rows(torch.rand(2, 12, dtype=torch.float64))
    got_s, got_c = layer(semantic, cam)
    want_s, want_c = naive_layer(layer, semantic, cam)
    assert torch.allclose(got_s, want_s, atol=1e-10) and torch.allclose(got_c, want_c, atol=1e-10)


def test_scm_training_reaches_rate_temperature_and_the_network():
    torch.manual_seed(1)
    network = build_model("deit_tiny-tscam", 4, width=0.0625).train()
    training = ScmTraining(network, SpatialCalibration())
    assert [layer.iterations for layer in training.calibration.layers] == [16, 4, 4, 4]
    logits = training(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 4)
    logits[:, 1].sum().backward()
    for layer in training.calibration.layers:
        assert layer.rate.grad.abs().item() > 0 and layer.temperature.grad.abs().item() > 0
    assert network.head.weight.grad.abs().sum() > 0
    assert network.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the attention map too
    # the calibrated logits differ from the network's own (GAP of the uncalibrated semantic maps)
    with torch.no_grad():
        assert not torch.allclose(network(torch.randn(2, 3, 48, 48)).logits[0], logits.detach(), atol=1e-3)


def test_authors_scm_checkpoints_import_as_tscam(tmp_path):
    torch.manual_seed(2)
    network = build_model("deit_tiny-tscam", 5)
    theirs = {**export_state_dict(network), **{k: torch.rand(1) for k in SCM_LAYER_KEYS}}
    assert "layers.3.fuse._loss_rate" in theirs and "layers.0.thred" in theirs
    src = tmp_path / "model_best.pth"
    torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in theirs.items()}}, src)
    summary = import_checkpoint(src, tmp_path / "ours.pt", "scm")
    assert summary["layout"] == "deit_tiny-tscam" and summary["dropped"] == 8
    model = convert_state_dict(theirs, network="scm")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), network.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"not the SCM authors' network: \['layers.0.fuse._loss_rate'"):
        convert_state_dict(export_state_dict(network), network="scm")
    with pytest.raises(CheckpointError, match="layers.0"):  # read as TS-CAM's: the layers have no place there
        convert_state_dict(theirs, network="tscam")
    with pytest.raises(ValueError, match="network 'vit'"):
        import_checkpoint(src, tmp_path / "x.pt", "vit")
    # timm's deit_tiny (5,717,416) less its Linear(192, 1000) head, plus the conv head to 5 classes
    assert summary["parameters"] == 5_717_416 - 193_000 + 192 * 5 * 9 + 5


def test_tanhshrink_keeps_its_digits_where_float32_cancels():
    """x - tanh(x) = x^3/3 - 2x^5/15 + 17x^7/315 - ... (the next term, 62 x^9 / 2835, is below 1e-9 of
    the sum for x <= 0.05): ours within float32's rounding of the result (2^-24 relative, one rounding
    from float64); torch's float32 tanhshrink loses most digits there."""
    from mnpo.models.scm import tanhshrink

    x = torch.linspace(0.001, 0.05, 200)
    t = x.double()
    series = t**3 / 3 - 2 * t**5 / 15 + 17 * t**7 / 315
    ours = tanhshrink(x)
    assert ours.dtype == torch.float32
    assert ((ours.double() - series).abs() / series).max() <= 2.0**-24 * 1.01
    assert ((torch.nn.functional.tanhshrink(x).double() - series).abs() / series).max() > 1e-3  # the bug


def test_minmax_of_a_constant_row_is_zeros_not_nan():
    rows = torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 5.0]])
    assert torch.equal(minmax_rows(rows), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.25, 1.0]]))


def test_a_float32_layer_on_near_parallel_class_maps_follows_the_float64_loop():
    """Semantic maps whose class vectors are nearly parallel (as a trained network's are) make
    rate * sim - 1 small, so the 4-step layer's update is of order 0.01 before tanhshrink: the
    case that diverged in training. Float32 carries the rows to about 1e-6 relative and the
    min-max divides by a range about 1 % of the values here: within 1e-4 of the float64 loop
    (measured 1e-5; with float32's own tanhshrink 1.4e-2, and 1.0 at a third of this spread)."""
    torch.manual_seed(0)
    layer = CalibrationLayer(4, rate=1.0, temperature=0.5)
    semantic = 1 + 0.1 * torch.randn(2, 6, 14, 14)
    cam = minmax_rows(torch.rand(2, 196))
    got_s, got_c = layer(semantic, cam)
    want_s, want_c = naive_layer(layer, semantic, cam)
    assert (got_c.double() - want_c).abs().max() < 1e-4
    assert ((got_s.double() - want_s).abs() / want_s.abs().clamp(min=1)).max() < 1e-4
