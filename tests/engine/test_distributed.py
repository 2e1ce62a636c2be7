"""Data-parallel runs with two CPU processes on the gloo backend (what torchrun starts)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from numerics import network_bound, unit_roundoff
from tiny_models import tiny_vgg_mnpo

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.config import config_from_dict
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.runtime import DistContext, init_distributed, shutdown_distributed
from mnpo.engine.train import Trainer
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import load_model, save_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_split(data, ctx, split="test"):
    dataset = WSOLDataset(data / "images", data / "metadata" / split, "evaluate", crop_size=48, resize_size=55)
    return evaluate_model(tiny_vgg_mnpo(), dataset, thresholds=cam_thresholds(0.05), method="mnpos", batch_size=2,
                          ctx=ctx, ten_crop=True, details=True, gallery_size=4)


def details_of(result):
    """The per-image details as plain data, keyed by image id (order-free)."""
    d = result.details
    return {"values": {i: v.tolist() for i, v in zip(d.records.image_ids, d.records.values)},
            "top5": {i: v.tolist() for i, v in d.top5.items()},
            "gallery": {i: (g.image.tolist(), g.scoremap.tolist(), g.boxes.tolist()) for i, g in d.gallery.items()}}


def worker(rank, world, port, data, out, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if job == "evaluate":
            ctx = init_distributed(torch.device("cpu"))
            result = evaluate_split(data, ctx)
            if ctx.is_main:
                torch.save({"largest": torch.from_numpy(result.curves.largest),
                            "multi": torch.from_numpy(result.curves.multi),
                            "top1": torch.from_numpy(result.curves.top1),
                            "n": result.num_images, "cls": (result.top1_correct, result.top5_correct),
                            "details": details_of(result)}, out)
        elif job == "cli-evaluate":  # `torchrun -m mnpo evaluate`: the command leaves the group itself
            from mnpo.cli import main

            code = main(["evaluate", "-q", "--checkpoint", str(out / "model.pt"), "--data", str(data / "images"),
                         "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0",
                         "--method", "cam", "--json", str(out / "report.json"), "--results", str(out / "r.npz")])
            (out / f"rank{rank}.txt").write_text(f"exit {code}, group left: {not torch.distributed.is_initialized()}")
            return
        elif job == "cli-evaluate-slow-rank-0":
            # a collective timeout of 3 s, and rank 0 writing its results for 6 s: nothing may
            # wait on rank 0's writing in a collective (NCCL's default is 10 minutes; ILSVRC's
            # overlays and report take longer)
            import time
            from datetime import timedelta

            import mnpo.engine.evaluate as evaluate_module
            import mnpo.engine.evaluate_maps as maps_module
            from mnpo.cli import main

            torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=3))
            write_evaluation, overlay = maps_module.write_evaluation, evaluate_module.protocol_overlay
            drawn = []

            def slow_write(*args, **kwargs):
                time.sleep(6)
                return write_evaluation(*args, **kwargs)

            def counted_overlay(image, scoremap, threshold, meta, image_id):
                drawn.append(image_id)
                return overlay(image, scoremap, threshold, meta, image_id)

            maps_module.write_evaluation = slow_write  # evaluate_checkpoint imports it when called
            evaluate_module.protocol_overlay = counted_overlay
            code = main(["evaluate", "-q", "--checkpoint", str(out / "model.pt"), "--data", str(data / "images"),
                         "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0",
                         "--method", "cam", "--results", str(out / "r.npz"), "--save-overlays", str(out / "overlays")])
            (out / f"rank{rank}.txt").write_text(f"exit {code}\n" + "\n".join(drawn))
            return
        elif job == "train-weights-once":  # building the model (reading the weights) timed per rank
            import time

            import mnpo.engine.train as train_module

            build = train_module.build_model

            def timed_build(*args, **kwargs):
                start = time.monotonic()
                time.sleep(1.0)
                model = build(*args, **kwargs)
                (out / f"build{rank}.txt").write_text(f"{start} {time.monotonic()}")
                return model

            train_module.build_model = timed_build
            Trainer(config_from_dict(train_config(data, out)), progress=False)
        elif job == "train-fsl-two-branches":
            cfg = train_config(data, out, no_bn_layout(out.parent))
            cfg.update(method={"name": "fsl", "fsl_holdout_per_class": 1})
            cfg["optim"].update(epochs=2, batch_size=2)
            trainer = Trainer(config_from_dict(cfg), progress=False)
            trainer.fit()
            torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
        elif job == "train-no-bn":
            trainer = Trainer(config_from_dict(train_config(data, out, no_bn_layout(out.parent))), progress=False)
            trainer.fit()
        else:
            trainer = Trainer(config_from_dict(train_config(data, out)), progress=False)
            trainer.fit()
            torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
        shutdown_distributed()  # together: a rank that leaves early can hang the other's teardown
    except BaseException:
        if torch.distributed.is_initialized():  # a rank that failed
            torch.distributed.destroy_process_group()
        raise


def no_bn_layout(folder):
    """Two branches without BatchNorm: batch statistics cannot differ between 1 and 2 processes."""
    path = folder / "no-bn.yaml"
    path.write_text(
        "backbone: vgg16\nwidth: 0.0625\nbranches:\n"
        "  - {name: main, blocks: [{name: head, kind: conv3x3_relu, inputs: [conv5_3], out_channels: 1024}]}\n"
        "  - {name: side, blocks: [{name: a, kind: conv3x3_relu, inputs: [conv5_1], out_channels: 1024}]}\n")
    return str(path)


def train_config(data, out, layout="vgg16-mnpo"):
    return {
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"layout": layout, "width": 0.0625, "pretrained": None},
        "optim": {"epochs": 1, "batch_size": 6, "lr": 0.01},
        "eval": {"method": "mnpo", "batch_size": 4},
        "runtime": {"out": str(out), "device": "cpu", "channels_last": False},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_synthetic_dataset(out=root, preset="parts", seed=2, image_size=48, num_classes=3,
                            train_per_class=4, val_per_class=2, test_per_class=3)
    return root


@pytest.mark.numerics
def test_distributed_evaluation_equals_a_single_process(data, tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, free_port(), data, out, "evaluate"), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)  # a file this test wrote
    single = evaluate_split(data, DistContext())
    assert ddp["n"] == single.num_images == 9  # 9 images over 2 ranks: 5 + 4, none twice
    assert np.array_equal(ddp["largest"].numpy(), single.curves.largest)
    assert np.array_equal(ddp["multi"].numpy(), single.curves.multi)
    assert np.array_equal(ddp["top1"].numpy(), single.curves.top1)
    assert ddp["cls"] == (single.top1_correct, single.top5_correct)
    mine = details_of(single)  # each rank's share of the images, gathered: the same details
    for key in ("values", "top5"):
        assert ddp["details"][key] == mine[key], key
    assert ddp["details"]["gallery"].keys() == mine["gallery"].keys()
    for image_id, (image, scoremap, boxes) in mine["gallery"].items():
        other = ddp["details"]["gallery"][image_id]
        assert other[0] == image and other[2] == boxes, image_id
        # other batch neighbours round the float32 map differently (by ulps, the curves are equal);
        # a value on a quantization boundary can then land one level of 255 away
        assert np.abs(np.array(other[1], int) - np.array(scoremap, int)).max() <= 1, image_id
    assert len(ddp["details"]["values"]) == 9 and len(ddp["details"]["gallery"]) == 4


def test_evaluate_command_on_two_processes_leaves_the_process_group(data, tmp_path):
    save_checkpoint(tmp_path / "model.pt", tiny_vgg_mnpo())
    mp.spawn(worker, args=(2, free_port(), data, tmp_path, "cli-evaluate"), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "exit 0, group left: True"
    import json

    assert json.loads((tmp_path / "report.json").read_text())["info"]["num_images"] == 9  # both shards
    from mnpo.engine.results import read_results

    assert len(read_results(tmp_path / "r.npz").image_ids) == 9


def test_ranks_share_the_overlays_and_never_wait_on_rank_0_in_a_collective(data, tmp_path):
    """Under torchrun each rank draws the overlays of the images it evaluated, and the ranks
    leave together through the store, not a barrier: with rank 0 writing its results file for
    twice the collective timeout, both ranks still exit 0."""
    from mnpo.data.metadata import read_split

    save_checkpoint(tmp_path / "model.pt", tiny_vgg_mnpo())
    mp.spawn(worker, args=(2, free_port(), data, tmp_path, "cli-evaluate-slow-rank-0"), nprocs=2, join=True)
    ids = read_split(data / "metadata" / "test").image_ids
    for rank in range(2):
        code, *drawn = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert code == "exit 0" and drawn == list(ids[rank::2]), rank
    overlays = (tmp_path / "overlays").rglob("*.png.png")  # <image_id>.png
    assert sorted(p.relative_to(tmp_path / "overlays").as_posix()[: -len(".png")] for p in overlays) == sorted(ids)
    from mnpo.engine.results import read_results

    assert len(read_results(tmp_path / "r.npz").image_ids) == 9


def test_weights_are_read_by_local_rank_0_before_the_others(data, tmp_path):
    """ImageNet weights go through a node-wide download cache: local rank 0 builds the model
    (downloads, reads) first and rank 1 only after it has finished, not both at once."""
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(worker, args=(2, free_port(), data, out, "train-weights-once"), nprocs=2, join=True)
    (start0, end0), (start1, end1) = ([float(t) for t in (out / f"build{r}.txt").read_text().split()] for r in (0, 1))
    assert end0 <= start1  # time.monotonic is system-wide on Linux: one clock for both processes


def test_distributed_training_runs_and_writes_one_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    mp.spawn(worker, args=(2, free_port(), data, out, "train"), nprocs=2, join=True)
    model, payload = load_model(out / "last.pt")
    assert payload["training"]["epoch"] == 1
    import csv

    with open(out / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert int(row["train_images"]) == 12  # both ranks' images, counted once each
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0].items():  # DDP keeps the replicas identical ...
        if "running" not in key and "num_batches" not in key:  # (BatchNorm statistics stay per process on CPU)
            assert torch.equal(value, ranks[1][key]), key
        assert torch.equal(value, model.state_dict()[key]) or "running" in key, key  # ... and rank 0 saved its own


def test_fsl_on_a_two_branch_layout_trains_on_two_processes(data, tmp_path):
    """fsl's loss reaches only the main branch: DDP, unless it looks for unused parameters that
    the forward's outputs do not reach, fails at its second step (two epochs here). The replicas
    stay equal, the side branch keeps its initial weights, the main branch and classifier move."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = train_config(data, tmp_path / "init", no_bn_layout(tmp_path))
    cfg.update(method={"name": "fsl", "fsl_holdout_per_class": 1})
    initial = Trainer(config_from_dict(cfg), progress=False).model.state_dict()  # the same seed
    mp.spawn(worker, args=(2, free_port(), data, out, "train-fsl-two-branches"), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    _, payload = load_model(out / "last.pt")
    assert payload["training"]["epoch"] == 2 and payload["meta"]["task"] == "foreground"
    side = [k for k in initial if k.startswith("branches.side.")]
    moved = [k for k in initial if k.startswith(("branches.main.", "classifier."))]
    assert side and moved
    for key in side:
        assert torch.equal(ranks[0][key], initial[key]), key
    for key in moved:
        assert not torch.equal(ranks[0][key], initial[key]), key


@pytest.mark.numerics
def test_distributed_training_equals_a_single_process_without_batchnorm(data, tmp_path):
    """With BatchNorm out of the way (its batch statistics are per process on the CPU; GPUs use
    SyncBatchNorm), two processes of batch 3 train exactly what one process of batch 6 does."""
    single_out, ddp_out = tmp_path / "single" / "run", tmp_path / "ddp" / "run"
    single_out.parent.mkdir()
    ddp_out.parent.mkdir()
    trainer = Trainer(config_from_dict(train_config(data, single_out, no_bn_layout(single_out.parent))), progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    mp.spawn(worker, args=(2, free_port(), data, ddp_out, "train-no-bn"), nprocs=2, join=True)
    single, _ = load_model(single_out / "last.pt")
    ddp, _ = load_model(ddp_out / "last.pt")
    import csv

    rows = [next(csv.DictReader(open(p / "metrics.csv", newline=""))) for p in (single_out, ddp_out)]
    for key in ("train_images", "val_max_box_acc", "val_top1_cls"):
        assert rows[0][key] == rows[1][key], key
    steps = -(-int(rows[0]["train_images"]) // 6)  # batch 6
    # The two runs differ only in how each step's gradient is summed (one batch of 6, or two of 3
    # averaged), a float32 rounding of relative size network_bound (forward and backward) in
    # every update; updates are linear in the gradient (SGD with momentum), so a weight's two
    # values differ by that fraction of how far training moved it (first order), plus, in each
    # step, one rounding of the weight itself on each side (two half ulps: 2 u |w|).
    relative = network_bound(single, torch.float32, passes=2)
    u = unit_roundoff(torch.float32)
    for (key, a), b in zip(single.state_dict().items(), ddp.state_dict().values(), strict=True):
        moved = float((a - initial[key]).abs().max())
        bound = relative * moved + steps * 2 * u * float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=0, atol=bound, msg=lambda m, key=key: f"{key}: {m}")
    assert float(rows[0]["train_loss"]) == pytest.approx(float(rows[1]["train_loss"]), rel=relative)
