import os
import pickle

import pytest
import torch

from mnpo.models import build_model
from mnpo.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from mnpo.models.multibranch import released_vgg16_layout, three_branch_vgg16_layout
from tiny_models import spread_batchnorm


def small(layout=three_branch_vgg16_layout, classes=5):
    torch.manual_seed(0)
    return build_model(layout(0.125), classes).eval()


class RunsCode:
    """An object whose unpickling calls ``os.mkdir(marker)``: a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_round_trip_keeps_layout_classes_weights_and_outputs(tmp_path):
    model = small()
    spread_batchnorm(model, mean_range=1.0)  # non-trivial BN statistics, so buffers matter too
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, meta={"class_names": ["a", "b", "c", "d", "e"]})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == CHECKPOINT_FORMAT and raw["num_classes"] == 5
    loaded, payload = load_model(path)
    assert loaded.layout == model.layout and loaded.num_classes == 5
    assert payload["meta"]["class_names"][-1] == "e"
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x).logits, loaded(x).logits, strict=True):
            assert torch.equal(a, b)


def test_expected_layout_and_class_count_are_enforced(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small(released_vgg16_layout, 5))
    load_model(path, layout=released_vgg16_layout(0.125), num_classes=5)  # matches: fine
    with pytest.raises(CheckpointError, match=r"layout mismatch.*branches=\['main', 'parallel'\].*'third'"):
        load_model(path, layout=three_branch_vgg16_layout(0.125))
    with pytest.raises(CheckpointError, match="layout mismatch.*width=0.125.*width=0.25"):
        load_model(path, layout=released_vgg16_layout(0.25))
    with pytest.raises(CheckpointError, match="class-count mismatch: the checkpoint has 5 classes, expected 200"):
        load_model(path, num_classes=200)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "evil": RunsCode(marker)}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load.*could run code"):
        load_model(path)
    assert not marker.exists()
    # the same file with plain pickle would have run the payload: the test's premise holds
    with open(path, "rb") as fh:
        data = fh.read()
    assert b"mkdir" in data


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "old-style.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": RunsCode(marker)}, fh)
    with pytest.raises(CheckpointError, match="old-style.pkl"):
        read_checkpoint(path)
    assert not marker.exists()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, small())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable torch file"):
        read_checkpoint(truncated)
    release = tmp_path / "release.pth.tar"
    torch.save({"architecture": "vgg_2branch", "state_dict": {"conv1.0.weight": torch.zeros(1)}}, release)
    with pytest.raises(CheckpointError, match="not an mnpo checkpoint.*mnpo import-checkpoint"):
        read_checkpoint(release)
    payload = torch.load(good, weights_only=True)
    for key, value, message in [
        ("version", 2, "version 2; this mnpo reads version 1"),
        ("num_classes", 0, "num_classes must be a positive integer, got 0"),
        ("num_classes", True, "num_classes must be a positive integer"),
        ("state_dict", {"w": [1, 2]}, "state_dict must map names to tensors"),
        ("layout", {"backbone": "vgg19", "branches": []}, "its layout is invalid"),
    ]:
        bad = tmp_path / f"bad-{key}.pt"
        torch.save({**payload, key: value}, bad)
        with pytest.raises(CheckpointError, match=f"bad-{key}.pt.*{message}"):
            load_model(bad)
    without = {k: v for k, v in payload.items() if k != "state_dict"}
    torch.save(without, tmp_path / "no-weights.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['state_dict'\]"):
        read_checkpoint(tmp_path / "no-weights.pt")


def test_strict_loading_lists_missing_unexpected_and_shapes():
    model = small()
    state = dict(model.state_dict())
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    state["classifier.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, state, "src.pt")
    text = str(info.value)
    assert "src.pt" in text and "missing: classifier.bias" in text and "unexpected: extra.weight" in text
    assert "wrong shape: classifier.weight (3, 3) (model has (5, 128))" in text


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small(classes=5))
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small(classes=7))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    monkeypatch.undo()
    assert load_model(path)[0].num_classes == 5
