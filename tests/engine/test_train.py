import csv
from pathlib import Path

import pytest
import torch
from numerics import network_bound

from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.config import ConfigError, config_from_dict
from mnpo.engine.train import Trainer, build_optimizer
from mnpo.models import load_model


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out=root, preset="parts", seed=0, image_size=48, num_classes=3,
                            train_per_class=6, val_per_class=2, test_per_class=3)
    return root


def config(synth, out, **sections):
    base = {
        "data": {"root": str(synth / "images"), "metadata": str(synth / "metadata"), "workers": 0,
                 "resize_size": 56, "crop_size": 48},
        "model": {"width": 0.0625, "pretrained": None},
        "optim": {"epochs": 3, "batch_size": 6, "lr": 0.01, "lr_milestones": [2]},
        "eval": {"method": "mnpo", "batch_size": 8},
        "runtime": {"out": str(out), "device": "cpu", "channels_last": False},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return config_from_dict(base)


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.numerics
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(synth, tmp_path):
    Trainer(config(synth, tmp_path / "full"), progress=False).fit()

    def stop_after_two(epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        Trainer(config(synth, tmp_path / "cut"), progress=False, on_epoch_end=stop_after_two).fit()
    assert len(rows(tmp_path / "cut" / "metrics.csv")) == 2
    resumed = Trainer(config(synth, tmp_path / "cut"), resume=True, progress=False)
    assert resumed.start_epoch == 2
    resumed.fit()

    full, _ = load_model(tmp_path / "full" / "last.pt")
    cut, payload = load_model(tmp_path / "cut" / "last.pt")
    for (k, a), b in zip(full.state_dict().items(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert payload["training"]["epoch"] == 3
    a, b = rows(tmp_path / "full" / "metrics.csv"), rows(tmp_path / "cut" / "metrics.csv")
    keep = [k for k in a[0] if k != "images_per_s"]
    assert [[r[k] for k in keep] for r in a] == [[r[k] for k in keep] for r in b]
    # and a run is not trivially reproducible by ignoring the state: another seed differs
    other = Trainer(config(synth, tmp_path / "other", runtime={"seed": 1}), progress=False)
    other.fit()
    assert not torch.equal(load_model(tmp_path / "other" / "last.pt")[0].classifier.weight, full.classifier.weight)


def test_run_folder_contents_and_best_checkpoint(synth, tmp_path):
    out = tmp_path / "run"
    Trainer(config(synth, out, optim={"epochs": 2, "lr_milestones": [1]}), progress=False).fit()
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.csv", "last.pt", "best.pt", "tensorboard"}
    table = rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert float(table[0]["lr"]) == 0.01 and float(table[1]["lr"]) == pytest.approx(0.001)
    assert float(table[0]["lr_new_layers"]) == pytest.approx(0.15)
    best, payload = load_model(out / "best.pt")
    values = [float(r["val_max_box_acc_v2"]) for r in table]
    assert payload["meta"]["epoch"] == values.index(max(values)) + 1
    assert 0 <= payload["meta"]["operating_threshold"] < 1
    assert "training" not in payload  # best.pt is for use, last.pt for resuming


def test_optimizer_groups_backbone_and_new_layers(synth, tmp_path):
    trainer = Trainer(config(synth, tmp_path), progress=False)
    groups = build_optimizer(trainer.model, trainer.cfg).param_groups
    backbone_ids = {id(p) for p in trainer.model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone_ids
    assert len(groups[1]["params"]) == len(list(trainer.model.parameters())) - len(backbone_ids)
    assert groups[1]["lr"] == pytest.approx(15 * groups[0]["lr"])
    assert groups[0]["nesterov"] and groups[0]["momentum"] == 0.9


def test_unreadable_training_image_is_skipped_and_counted(synth, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    broken = next((data / "images" / "train").rglob("*.png"))
    broken.write_bytes(b"not a png")
    out = tmp_path / "run"
    Trainer(config(data, out, optim={"epochs": 1}), progress=False).fit()
    row = rows(out / "metrics.csv")[0]
    assert int(row["skipped_images"]) == 1 and int(row["train_images"]) == 17


def test_bad_runs_fail_clearly(synth, tmp_path):
    with pytest.raises(ConfigError, match="data.root: .*nowhere is not a folder"):
        Trainer(config(synth, tmp_path, data={"root": str(tmp_path / "nowhere")}), progress=False)
    with pytest.raises(ConfigError, match=r"data.metadata: .*train is missing"):
        Trainer(config(synth, tmp_path, data={"metadata": str(tmp_path)}), progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(config(synth, tmp_path / "new"), resume=True, progress=False)
    out = tmp_path / "run"
    Trainer(config(synth, out, optim={"epochs": 1}), progress=False).fit()
    with pytest.raises(ValueError, match="layout mismatch"):
        Trainer(config(synth, out, model={"width": 0.125}), resume=True, progress=False)


@pytest.mark.numerics
def test_compiled_training_matches_eager(synth, tmp_path):
    eager = Trainer(config(synth, tmp_path / "eager", optim={"epochs": 1}), progress=False).fit()
    compiled = Trainer(config(synth, tmp_path / "compiled", optim={"epochs": 1}, runtime={"compile": True}),
                       progress=False).fit()
    # inductor fuses and reorders the same float32 sums: the loss differs by float32 rounding of
    # the forward, and later batches by that of the updates (forward and backward) before them
    model, _ = load_model(tmp_path / "eager" / "last.pt")
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=network_bound(model, torch.float32, passes=2))


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_epoch(synth, tmp_path):
    out = tmp_path / "run"
    Trainer(config(synth, out, optim={"epochs": 1}), progress=False).fit()
    before = (out / "last.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"training diverged: the loss is (nan|inf) at epoch 2, step \d+ "
                                                 r"\(found when steps 1-3 were checked.*lower optim.lr \(now 1e\+30\)"):
        Trainer(config(synth, out, optim={"epochs": 2, "lr": 1e30}), resume=True, progress=False).fit()
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the counting wrapper
@pytest.mark.parametrize("log_every, steps_taken, checked", [(1, 1, "1-1"), (2, 2, "1-2"), (20, 3, "1-3")])
def test_the_loss_is_read_once_per_log_interval_and_a_bad_one_stops_at_the_next_read(
        synth, tmp_path, monkeypatch, log_every, steps_taken, checked):
    """18 images in batches of 6: 3 steps an epoch. The first step's loss is made NaN: the run
    goes on until the next read of the device's sums (after ``log_every`` steps or at the
    epoch's end), then stops naming step 1; the sums are read only there."""
    from mnpo.engine import train as train_module

    trainer = Trainer(config(synth, tmp_path, runtime={"log_every": log_every}), progress=False)
    real_loss, real_step, real_read = trainer._batch_loss, trainer.optimizer.step, train_module.StepSums.read
    taken, reads = [], []

    def poisoned(batch, epoch, step):
        loss, hits = real_loss(batch, epoch, step)
        return (loss * float("nan") if step == 0 else loss), hits

    def counting_read(self):
        reads.append(len(taken))
        return real_read(self)

    monkeypatch.setattr(trainer, "_batch_loss", poisoned)
    monkeypatch.setattr(train_module.StepSums, "read", counting_read)
    trainer.optimizer.step = lambda *a, **k: (taken.append(1), real_step(*a, **k))[1]
    with pytest.raises(FloatingPointError, match=rf"the loss is nan at epoch 1, step 1 \(found when steps {checked} "
                                                 rf"were checked, every runtime.log_every = {log_every} steps\)"):
        trainer.fit()
    assert len(taken) == steps_taken and reads == [steps_taken]  # one read, after the interval
    assert not (tmp_path / "last.pt").exists()


def test_a_finite_epoch_reads_the_sums_once_per_interval_and_at_its_end(synth, tmp_path, monkeypatch):
    from mnpo.engine import train as train_module

    real_read, reads = train_module.StepSums.read, []
    monkeypatch.setattr(train_module.StepSums, "read", lambda self: (reads.append(self.images), real_read(self))[1])
    trainer = Trainer(config(synth, tmp_path, optim={"epochs": 1}, runtime={"log_every": 2}), progress=False)
    stats = trainer.train_epoch(0)
    assert reads == [12, 18]  # after steps 2 and 3 (the end), with the images summed so far
    assert stats.images == 18 and 0 <= stats.accuracy * 18 / 100 == pytest.approx(round(stats.accuracy * 0.18))


def dropout_layout(tmp_path, p=0.5):
    """vgg16-mnpo at width 1/16 with dropout ``p`` on both heads' inputs and outputs."""
    import yaml

    from mnpo.models import LAYOUTS

    data = LAYOUTS["vgg16-mnpo"](0.0625).to_dict()
    for branch in data["branches"]:
        branch["blocks"][-1].update(input_dropout=p, dropout=p)
    path = tmp_path / f"dropout-{p}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.numerics
def test_the_same_weights_with_0_or_2_workers_on_a_layout_with_dropout(synth, tmp_path):
    """The model's dropout draws from torch's global generator in the main process; the images'
    draws (crop, flip, HaS's cells) from generators of their own, in whichever process loads
    them: so 0 and 2 workers give the same weights, bit for bit, over two epochs."""
    def weights(name, workers, method, p=0.5):
        out = tmp_path / name
        Trainer(config(synth, out, data={"workers": workers}, optim={"epochs": 2, "lr_milestones": [1]},
                       model={"layout": dropout_layout(tmp_path, p)}, method={"name": method}),
                progress=False).fit()
        return load_model(out / "last.pt")[0].state_dict()

    for method in ("plain", "has"):
        single, multi = weights(f"{method}-0", 0, method), weights(f"{method}-2", 2, method)
        for k in single:
            assert torch.equal(single[k], multi[k]), (method, k)
    # the dropout acts (so the test can fail): without it the weights differ
    without = weights("no-dropout", 0, "has", p=0.0)
    assert not all(torch.equal(single[k], without[k]) for k in single)


def test_one_training_loader_for_the_run(synth, tmp_path, monkeypatch):
    from mnpo.engine import train as train_module

    built = []
    real = train_module.training_loader
    monkeypatch.setattr(train_module, "training_loader", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    trainer = Trainer(config(synth, tmp_path, optim={"epochs": 3}), progress=False)
    trainer.fit()
    assert len(built) == 1 and trainer.loader.sampler.epoch == 2  # set to each epoch in turn


def val_pxap_of(synth, checkpoint, masks, maps_dir, method):
    """PxAP of ``checkpoint`` on the mask set's val split: `mnpo evaluate`'s, checked against
    the naive PxAP (tests/metrics/reference.py) of the maps it saved."""
    import json

    import numpy as np
    from metrics.reference import naive_pxap

    from mnpo.cli import main
    from mnpo.data.metadata import read_split
    from mnpo.metrics.boxes import cam_thresholds
    from mnpo.metrics.masks import load_gt_mask

    val = Path(masks["metadata"]) / "val"
    result = maps_dir.parent / f"{maps_dir.name}.json"
    assert main(["evaluate", "-q", "--checkpoint", str(checkpoint), "--data", str(synth / "images"),
                 "--metadata", str(val), "--val-metadata", str(val), "--mask-root", masks["mask_root"],
                 "--input-size", "48", "--workers", "0", "--method", method, "--save-maps", str(maps_dir),
                 "--json", str(result)]) == 0
    value = json.loads(result.read_text())["oracle"]["pxap"]["value"]
    meta = read_split(val)
    maps = [np.load(maps_dir / f"{i}.npy") for i in meta.image_ids]
    gt = [load_gt_mask(masks["mask_root"], meta.mask_paths[i], meta.ignore_paths[i], 224) for i in meta.image_ids]
    assert maps[0].shape == (224, 224) and len(maps) == len(meta) > 1  # scored in the protocol frame
    assert value == pytest.approx(naive_pxap(maps, gt, cam_thresholds(0.01)), rel=1e-9)
    return value


def test_mask_split_training_validates_by_pxap(synth, tmp_path):
    masks = {"metadata": str(synth / "metadata-masks"), "mask_root": str(synth / "masks")}
    out = tmp_path / "run"
    Trainer(config(synth, out, data=masks, optim={"epochs": 1}, eval={"metric": "pxap"}), progress=False).fit()
    row = rows(out / "metrics.csv")[0]
    assert "val_max_box_acc" not in row
    pxap = float(row["val_pxap"])
    # the recorded number is the PxAP of the saved weights on val: `mnpo evaluate` of last.pt on
    # val gives it, and so does the definition on the maps it saves
    assert pxap == pytest.approx(val_pxap_of(synth, out / "last.pt", masks, tmp_path / "maps", "mnpo"), rel=1e-9)
    with pytest.raises(ConfigError, match="eval.metric: 'max_box_acc_v2' is not computed on a mask split"):
        Trainer(config(synth, out, data=masks), progress=False)
    with pytest.raises(ConfigError, match="data.mask_root: required"):
        Trainer(config(synth, out, data={**masks, "mask_root": None}, eval={"metric": "pxap"}), progress=False)


def test_class_names_from_the_metadata_reach_the_checkpoint(synth, tmp_path):
    """`mnpo make-metadata` writes metadata/class_names.txt; training stores the names in its
    checkpoints (for `mnpo localize`) and takes the class count from them."""
    import shutil

    from mnpo.models.checkpoint import read_checkpoint

    meta = tmp_path / "metadata"
    shutil.copytree(synth / "metadata", meta)
    (meta / "class_names.txt").write_text("circle\nsquare\ntriangle\nunseen\n")
    cfg = config(synth, tmp_path / "run", data={"metadata": str(meta)}, optim={"epochs": 1})
    Trainer(cfg, progress=False).fit()
    for name in ("best.pt", "last.pt"):
        payload = read_checkpoint(tmp_path / "run" / name)
        assert payload["meta"]["class_names"] == ["circle", "square", "triangle", "unseen"]
    model, _ = load_model(tmp_path / "run" / "best.pt")
    assert model.num_classes == 4  # the list, not the largest label (2), sets the count
    with pytest.raises(ConfigError, match=r"data.num_classes: 3, but .*class_names.txt names 4 classes"):
        Trainer(config(synth, tmp_path / "r2", data={"metadata": str(meta), "num_classes": 3}), progress=False)
    (meta / "class_names.txt").write_text("a\na\n")
    with pytest.raises(ConfigError, match=r"data.metadata: .*class_names.txt:2: class 'a' listed twice"):
        Trainer(config(synth, tmp_path / "r3", data={"metadata": str(meta)}), progress=False)


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the recording wrapper
def test_clip_grad_norm_bounds_every_step_and_a_loose_bound_changes_nothing(synth, tmp_path):
    def run(out, clip):
        trainer = Trainer(config(synth, out, optim={"epochs": 1, "clip_grad_norm": clip}), progress=False)
        norms, step = [], trainer.optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.fit()
        return load_model(out / "last.pt")[0].state_dict(), norms

    free, free_norms = run(tmp_path / "free", None)
    loose, _ = run(tmp_path / "loose", 1e9)
    tight, tight_norms = run(tmp_path / "tight", 0.05)
    assert max(free_norms) > 0.05  # the bound below bites
    assert all(n <= 0.05 * (1 + 1e-5) for n in tight_norms)
    assert all(torch.equal(free[k], loose[k]) for k in free)  # a bound never reached: bit for bit the same
    assert not all(torch.equal(free[k], tight[k]) for k in free)
    with pytest.raises(ConfigError, match=r"optim.clip_grad_norm: must be > 0 \(or null: off\), got 0"):
        config(synth, tmp_path / "x", optim={"clip_grad_norm": 0})


def test_fit_autotunes_cudnn_for_training_epochs_only(synth, tmp_path, monkeypatch):
    """cudnn.benchmark (through runtime.cudnn_autotune) spans each training epoch, not validation."""
    import contextlib

    import mnpo.engine.train as train_module

    inside, seen = [], []

    @contextlib.contextmanager
    def recording(device):
        seen.append(device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(train_module, "cudnn_autotune", recording)
    trainer = Trainer(config(synth, tmp_path, optim={"epochs": 2, "lr_milestones": [1]}), progress=False)
    calls = []
    for name in ("train_epoch", "validate"):
        real = getattr(trainer, name)

        def wrapped(*args, _real=real, _name=name, **kw):
            calls.append((_name, bool(inside)))
            return _real(*args, **kw)

        monkeypatch.setattr(trainer, name, wrapped)
    trainer.fit()
    assert calls == [("train_epoch", True), ("validate", False)] * 2
    assert seen == [trainer.device] * 2


def test_data_jpeg_draft_reaches_the_training_views(synth, tmp_path):
    """data.jpeg_draft and data.random_resized configure the training transform (off by default:
    every pixel decoded); a value that is not a boolean is refused, naming the key."""
    on = Trainer(config(synth, tmp_path / "on", data={"jpeg_draft": True, "random_resized": True}), progress=False)
    off = Trainer(config(synth, tmp_path / "off"), progress=False)
    assert (on.train_set.transform.draft, on.train_set.transform.random_resized) == (True, True)
    assert (off.train_set.transform.draft, off.train_set.transform.random_resized) == (False, False)
    with pytest.raises(ConfigError, match="data.jpeg_draft"):
        config(synth, tmp_path / "bad", data={"jpeg_draft": "sometimes"})
