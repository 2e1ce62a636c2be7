"""Import of the authors' released checkpoints (spec section 8), checked against
``ReleasedLayoutNet`` (tests/released_net.py), a network with the release's names and forward."""

import pytest
import torch
from numerics import network_bound
from released_net import ReleasedLayoutNet, randomized

from mnpo.cli import main
from mnpo.models.checkpoint import CheckpointError, load_model
from mnpo.models.multibranch import released_vgg16_layout
from mnpo.models.release import convert_released_state_dict, import_released_checkpoint


def release_file(path, net, **extra):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torch.save({"architecture": "vgg_2branch", "epoch": 9, "state_dict": net.state_dict(),
                "optimizer": optimizer.state_dict(), **extra}, path)


def test_import_gives_identical_logits_for_both_branches(tmp_path):
    ref = randomized(ReleasedLayoutNet(num_classes=7, width=0.125))
    src, dst = tmp_path / "release.pth.tar", tmp_path / "ours.pt"
    release_file(src, ref)
    summary = import_released_checkpoint(src, dst)
    assert summary["num_classes"] == 7 and summary["width"] == 0.125
    assert summary["tensors"] == len(ref.state_dict())
    model, payload = load_model(dst, layout=released_vgg16_layout(0.125), num_classes=7)
    assert payload["meta"] == {"imported_from": "release.pth.tar",
                               "release": {"architecture": "vgg_2branch", "epoch": 9}}
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # like with like: both networks in float64, rounding bounded by numerics.py
        expected = ref.double()(x)
        got = model.double()(x).logits
    assert len(got) == 2
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=network_bound(model, torch.float64) * float(e.abs().max()))


def test_full_size_release_maps_every_tensor_and_agrees():
    ref = randomized(ReleasedLayoutNet(num_classes=1000))
    model = convert_released_state_dict(ref.state_dict(), "full")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 22.74
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # float64 on both sides (numerics.py)
        for e, g in zip(ref.double()(x), model.double()(x).logits, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=network_bound(model, torch.float64) * float(e.abs().max()))


def test_spec_spelling_conv6_0_and_dataparallel_prefix_are_accepted():
    ref = randomized(ReleasedLayoutNet(num_classes=3, width=0.125))
    state = {f"module.{k.replace('conv6_.', 'conv6.')}": v for k, v in ref.state_dict().items()}
    assert "module.conv6.0.weight" in state and "module.conv6.weight" in state
    model = convert_released_state_dict(state)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # float64 on both sides (numerics.py)
        expected = ref.double()(x)[1]
        torch.testing.assert_close(model.double()(x).logits[1], expected, rtol=0,
                                   atol=network_bound(model, torch.float64) * float(expected.abs().max()))


def test_old_files_without_batch_counters():
    ref = randomized(ReleasedLayoutNet(num_classes=3, width=0.125))
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = convert_released_state_dict(state)
    full = convert_released_state_dict(ref.state_dict())
    kept = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert kept.keys() == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    for name, value in kept.items():  # every other tensor as with the counters
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # and the same network
        expected = ref.double()(x)[1]
        torch.testing.assert_close(model.double()(x).logits[1], expected, rtol=0,
                                   atol=network_bound(model, torch.float64) * float(expected.abs().max()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("branch1_layer.layer2.0.bn3.running_var"), "missing: branches.parallel.c.bn3.running_var"),
        (lambda s: s.update({"branch2_layer.conv1.0.weight": torch.zeros(1)}),
         r"does not have: \['branch2_layer.conv1.0.weight'\]"),
        (lambda s: s.update({"conv6.weight": torch.zeros(128, 64, 1, 1)}),
         r"wrong shape: branches.main.head.conv.weight \(128, 64, 1, 1\)"),
        (lambda s: s.pop("fc.weight"), "not a released MNPO VGG16 checkpoint: no 'fc.weight'"),
    ],
)
def test_bad_release_files_fail_and_write_nothing(tmp_path, edit, message):
    ref = randomized(ReleasedLayoutNet(num_classes=3, width=0.125))
    state = dict(ref.state_dict())
    edit(state)
    src, dst = tmp_path / "release.pth.tar", tmp_path / "ours.pt"
    torch.save({"state_dict": state}, src)
    with pytest.raises(CheckpointError, match=message):
        import_released_checkpoint(src, dst)
    assert not dst.exists()


def test_cli_import_checkpoint(tmp_path, capsys):
    ref = randomized(ReleasedLayoutNet(num_classes=5, width=0.125))
    src, dst = tmp_path / "release.pth.tar", tmp_path / "ours.pt"
    release_file(src, ref)
    assert main(["import-checkpoint", str(src), str(dst)]) == 0
    assert "5 classes" in capsys.readouterr().out
    assert load_model(dst)[0].num_classes == 5

    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}}, src)
    assert main(["import-checkpoint", str(src), str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err
    assert "mnpo import-checkpoint: error:" in err and "release.pth.tar" in err and "conv1.0.weight" in err
    assert not (tmp_path / "other.pt").exists()
