"""The train / evaluate / demo commands end to end on a tiny synthetic set."""

import json
import sys
import re

import numpy as np
import pytest
import yaml

from mnpo.cli import main
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.demo import DEMO_METHODS, DemoSettings, run_demo
from mnpo.engine.results import read_results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    data = root / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=1, image_size=48, num_classes=3,
                            train_per_class=6, val_per_class=2, test_per_class=3)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"width": 0.0625, "pretrained": None},
        "optim": {"epochs": 1, "batch_size": 6, "lr": 0.01},
        "eval": {"method": "mnpo"},
        "runtime": {"out": str(root / "ignored"), "device": "cpu", "channels_last": False},
    }))
    assert main(["train", "--config", str(config), "-q", f"runtime.out={root / 'run'}", "optim.epochs=2"]) == 0
    return root, data


def test_train_command_applies_overrides(trained):
    root, _ = trained
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 2 and saved["runtime"]["out"] == str(root / "run")
    assert not (root / "ignored").exists()
    assert (root / "run" / "best.pt").is_file()


def test_evaluate_saves_maps_that_evaluate_maps_scores_identically(trained, tmp_path, capsys):
    root, data = trained
    args = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--metadata", str(data / "metadata" / "test"), "--val-metadata", str(data / "metadata" / "val"),
            "--input-size", "48", "--workers", "0", "--method", "mnpo", "--a", "2", "--b", "1"]
    assert main(args + ["--save-maps", str(tmp_path / "maps"), "--save-overlays", str(tmp_path / "overlays"),
                        "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "classification (ten-crop)" in out and "calibrated max_box_acc_v2" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"oracle", "calibrated", "info"}
    assert report["info"]["num_images"] == 9 and report["info"]["map_options"] == {"a": 2.0, "b": 1.0}
    maps = sorted((tmp_path / "maps").rglob("*.npy"))
    assert len(maps) == 9 and np.load(maps[0]).shape == (224, 224)
    assert len(list((tmp_path / "overlays").rglob("*.png"))) == 9
    assert main(["evaluate-maps", "-q", "--maps", str(tmp_path / "maps"), "--metadata", str(data / "metadata" / "test"),
                 "--json", str(tmp_path / "maps.json")]) == 0
    from_maps = json.loads((tmp_path / "maps.json").read_text())["oracle"]
    for key in ("max_box_acc", "max_box_acc_v2", "gt_known_loc"):
        assert from_maps[key] == report["oracle"][key], key


def test_evaluate_decode_device_reaches_the_data_set(trained, tmp_path, monkeypatch):
    """--decode device: the data set sends encoded items (seen by the data set's constructor),
    the report says so; host is the default; other values are refused."""
    import mnpo.engine.evaluate as ev

    root, data = trained
    built = []
    real = ev.WSOLDataset

    def recording(*args, **kwargs):
        built.append(kwargs.get("device_decode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "WSOLDataset", recording)
    args = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0", "--method", "cam"]
    assert main([*args, "--decode", "device", "--json", str(tmp_path / "device.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "host.json")]) == 0
    assert built == [True, False]
    device, host = (json.loads((tmp_path / f"{n}.json").read_text())["info"] for n in ("device", "host"))
    assert (device["decode"], host["decode"]) == ("device", "host") and device["num_images"] == 9
    with pytest.raises(SystemExit):
        main([*args, "--decode", "gpu"])


def test_evaluate_refuses_a_split_with_more_classes(trained, tmp_path, capsys):
    root, _ = trained
    other = tmp_path / "five"
    write_synthetic_dataset(out=other, preset="shapes", seed=0, image_size=32, num_classes=5,
                            train_per_class=1, val_per_class=1, test_per_class=1)
    code = main(["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(other / "images"),
                 "--metadata", str(other / "metadata" / "test"), "--workers", "0"])
    assert code == 2
    assert "mnpo evaluate: error:" in capsys.readouterr().err


@pytest.mark.parametrize("method, extra", [("scorecam", ["--chunk-size", "5"]), ("ablationcam", ["--target-layer", "conv5_2"]),
                                           ("gradcampp", []), ("eigencam", [])])
def test_evaluate_scores_the_cam_family_under_both_protocols(trained, tmp_path, method, extra):
    root, data = trained
    assert main(["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
                 "--metadata", str(data / "metadata" / "test"), "--val-metadata", str(data / "metadata" / "val"),
                 "--input-size", "48", "--workers", "0", "--method", method, *extra,
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["info"]["method"] == method and report["info"]["num_images"] == 9
    oracle, calibrated = (report[p]["max_box_acc_v2"]["value"] for p in ("oracle", "calibrated"))
    for value in (oracle, calibrated):  # a mean of three counts out of the 9 images, in percent
        assert value * 27 / 100 == pytest.approx(round(value * 27 / 100), abs=1e-6)
    assert oracle >= calibrated  # the oracle's thresholds are the test split's best


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(image_size=32, classes=2, train_per_class=4, val_per_class=2, test_per_class=3,
                            width=0.0625, epochs=1, batch_size=4, gallery_images=2)
    return out, run_demo(out, settings, progress=False)


def test_demo_writes_report_table_and_gallery(demo):
    tmp_path, summary = demo
    assert list(summary["methods"]) == list(DEMO_METHODS)
    for r in summary["methods"].values():
        oracle, calibrated = r["oracle"]["max_box_acc"]["value"], r["calibrated"]["max_box_acc"]["value"]
        for value in (oracle, calibrated):  # a count out of the 2 x 3 test images, in percent
            assert value * 6 / 100 == pytest.approx(round(value * 6 / 100), abs=1e-6)
        assert oracle >= calibrated
    text = (tmp_path / "report.md").read_text()
    assert all(f"| {m} |" in text for m in DEMO_METHODS)
    from PIL import Image

    from mnpo.engine.overlay import caption_height

    with Image.open(tmp_path / "gallery.png") as gallery:  # 2 images x 3 methods, captions below
        assert gallery.size == (2 * 160, 3 * (160 + caption_height()))
    assert json.loads((tmp_path / "report.json").read_text())["methods"].keys() == summary["methods"].keys()


def test_demo_pxap_is_the_definition_on_its_maps(demo):
    """The demo's PxAP of each method equals a naive PxAP (from the definition) on the maps the
    demo's checkpoint gives on the mask split, scored against the masks at the maps' size."""
    from metrics.reference import naive_pxap

    from mnpo.data.dataset import WSOLDataset
    from mnpo.engine.evaluate import evaluate_model
    from mnpo.engine.views import resize_for
    from mnpo.metrics.boxes import cam_thresholds
    from mnpo.metrics.masks import load_gt_mask
    from mnpo.models.checkpoint import load_model

    out, summary = demo
    model, _ = load_model(out / "run" / "best.pt")
    data = out / "parts"
    size = summary["settings"]["image_size"]
    split = WSOLDataset(data / "images", data / "metadata-masks" / "test", "evaluate", mask_root=data / "masks",
                        crop_size=size, resize_size=resize_for(size), uint8_views=True)
    meta = split.meta
    for method in DEMO_METHODS:
        maps: dict[str, np.ndarray] = {}

        def keep(batch, batch_maps, maps=maps):
            maps.update({i: np.asarray(m) for i, m in zip(batch["image_id"], batch_maps)})

        evaluate_model(model, split, thresholds=cam_thresholds(0.01), method=method, batch_size=32,
                       on_batch=keep, details=False)
        assert sorted(maps) == sorted(meta.image_ids)
        side = maps[meta.image_ids[0]].shape[-1]
        gt = [load_gt_mask(data / "masks", meta.mask_paths[i], meta.ignore_paths[i], side) for i in meta.image_ids]
        expected = naive_pxap([maps[i] for i in meta.image_ids], gt, cam_thresholds(0.01))
        assert summary["methods"][method]["pxap"] == pytest.approx(expected, rel=1e-9), method


def test_demo_report_renders_in_a_browser(demo, tmp_path):
    """The demo's report.html in headless Chromium: the screenshot is not blank, and the DOM
    (after the page's script ran) holds every method's row, every plot and the galleries."""
    from browser import is_blank, render, require_chromium

    require_chromium()
    out, summary = demo
    for page, plots in (("report.html", ("plot-curves", "plot-per-class", "plot-distribution")),
                        ("report-masks.html", ("plot-curves", "plot-per-class", "plot-distribution"))):
        dom = render(out / page, tmp_path / f"{page}.png", width=1280, height=1600)
        assert not is_blank(tmp_path / f"{page}.png"), page
        for method in DEMO_METHODS:
            assert f'data-label="{method}"' in dom, (page, method)
        for plot in (*plots, "gallery-best", "gallery-worst", "gallery-disagreement"):
            assert re.search(f'<figure class="plot[^"]*" id="{plot}">\\s*<(svg|img)', dom), (page, plot)
        assert dom.count('<table id="per-class" class="sortable">') == 1
    summary_values = {m: f"{r['calibrated']['max_box_acc']['value']:.2f}" for m, r in summary["methods"].items()}
    dom = render(out / "report.html", tmp_path / "again.png", width=1280, height=800)
    for method, value in summary_values.items():  # the page's numbers are the demo's
        row = re.search(f'<tr class="result" data-label="{method}">(.*?)</tr>', dom).group(1)
        assert f">{value}</span>" in row, method


def test_evaluate_stops_on_an_unreadable_image_or_counts_it_as_a_miss(trained, tmp_path, capsys):
    import shutil

    root, data = trained
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    broken = sorted((copy / "images" / "test").rglob("*.png"))[0]
    broken.write_bytes(b"\x89PNG truncated")
    image_id = str(broken.relative_to(copy / "images"))
    args = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(copy / "images"),
            "--metadata", str(copy / "metadata" / "test"), "--input-size", "48", "--workers", "0",
            "--method", "cam", "--json", str(tmp_path / "r.json"), "--results", str(tmp_path / "r.npz"),
            "--report", str(tmp_path / "r.html")]
    # By default: an error naming the file, and no results file.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and image_id in err and "--skip-unreadable" in err
    assert not any((tmp_path / f"r.{ext}").exists() for ext in ("json", "npz", "html"))
    # With --skip-unreadable: the split's 9 images in the denominator, the broken one listed.
    assert main([*args, "--skip-unreadable"]) == 0
    assert "9 images (1 unreadable, counted as misses)" in capsys.readouterr().out
    info = json.loads((tmp_path / "r.json").read_text())["info"]
    assert info["num_images"] == 9 and info["unreadable_policy"] == "counted as misses"
    assert [u["image_id"] for u in info["unreadable_images"]] == [image_id]
    assert image_id in info["unreadable_images"][0]["reason"]
    results = read_results(tmp_path / "r.npz")  # the results file keeps it: a row of -1 classes
    row = results.image_ids.index(image_id)
    assert len(results.image_ids) == 9 and (results.top5[row] == -1).all()
    assert results.per_image["iou_oracle"][row] == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Unreadable images</h2>" in page and f"<code>{image_id}</code>" in page


def test_python_dash_m_mnpo_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mnpo", "--help"], capture_output=True, text=True, check=True)
    assert "localize" in done.stdout and "train" in done.stdout


def test_train_pretrained_flag_loads_a_local_file(trained, tmp_path):
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    root, data = trained
    torch.manual_seed(0)
    features = make_layers([max(1, round(v * 0.0625)) if v != "M" else v for v in cfgs["D"]])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / "vgg16-small.pth")
    config = root / "run.yaml"
    assert main(["train", "--config", str(config), "-q", f"runtime.out={tmp_path / 'run'}", "optim.epochs=1",
                 "optim.lr=1e-9", "--pretrained", str(tmp_path / "vgg16-small.pth")]) == 0
    from mnpo.models import load_model

    model, _ = load_model(tmp_path / "run" / "last.pt")
    # loaded, then moved by one epoch at lr 1e-9: |grad| would have to exceed 100 to move a
    # weight by 1e-6, while a weight left at its He initialization differs by ~0.1
    torch.testing.assert_close(model.backbone.features[0].weight, state["features.0.weight"], atol=1e-6, rtol=0)


def test_evaluate_normalize_reaches_the_maps_and_evaluate_maps_renormalizes_alike(trained, tmp_path):
    """`evaluate --normalize ivr --percentile 0.6` saves IVR's maps of the raw CAM; the same
    command's min-max maps, re-normalized by IVR (as `evaluate-maps --normalize ivr` does), are
    those maps within float32 rounding (IVR ignores the min-max's affine change); the option is
    recorded; a percentile without IVR is refused."""
    from mnpo.engine.evaluate_maps import renormalize

    root, data = trained
    base = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0", "--method", "cam"]
    assert main(base + ["--normalize", "ivr", "--percentile", "0.6", "--save-maps", str(tmp_path / "ivr"),
                        "--json", str(tmp_path / "ivr.json")]) == 0
    assert main(base + ["--save-maps", str(tmp_path / "minmax")]) == 0
    assert json.loads((tmp_path / "ivr.json").read_text())["info"]["map_options"] == {"normalize": "ivr",
                                                                                        "percentile": 0.6}
    names = sorted(p.relative_to(tmp_path / "ivr") for p in (tmp_path / "ivr").rglob("*.npy"))
    assert len(names) == 9
    ivr = np.stack([np.load(tmp_path / "ivr" / n) for n in names])
    minmax = np.stack([np.load(tmp_path / "minmax" / n) for n in names])
    assert (ivr == 0).mean() > 0.55 and (minmax == 0).mean() < 0.1  # IVR at 0.6 zeroes 60 % of each map
    # float32 maps in [0, 1], each side's rounding a few 2^-24, divided by IVR's 1 - q (q: the
    # min-max map's value at the 60 % point): below 1e-5 while q < 0.9
    level = np.sort(minmax.reshape(9, -1), axis=1)[:, int(224 * 224 * 0.6)]
    assert level.max() < 0.9
    np.testing.assert_allclose(renormalize(minmax, "ivr", 0.6), ivr, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="--percentile 0.6 is IVR's"):
        main(base + ["--percentile", "0.6"])


def test_paper_threshold_grid_oracle_is_bounded_by_the_full_grid(trained, tmp_path):
    root, data = trained
    base = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0", "--method", "cam"]
    assert main(base + ["--json", str(tmp_path / "full.json")]) == 0
    assert main(base + ["--threshold-grid", "paper", "--json", str(tmp_path / "paper.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    paper = json.loads((tmp_path / "paper.json").read_text())
    assert paper["info"]["threshold_grid"] == "paper"
    t = paper["oracle"]["max_box_acc"]["threshold"]
    assert 0.05 <= t <= 0.34
    assert paper["oracle"]["max_box_acc"]["value"] <= full["oracle"]["max_box_acc"]["value"]


def test_evaluate_a_mask_split_gives_pxap(trained, tmp_path):
    root, data = trained
    assert main(["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
                 "--metadata", str(data / "metadata-masks" / "test"),
                 "--val-metadata", str(data / "metadata-masks" / "val"), "--mask-root", str(data / "masks"),
                 "--input-size", "48", "--workers", "0", "--method", "mnpo", "--json", str(tmp_path / "m.json"),
                 "--save-maps", str(tmp_path / "maps")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert list(report["oracle"]) == ["pxap"]
    # the definition on the saved maps and the masks, in the protocol's 224 frame
    from metrics.reference import naive_pxap

    from mnpo.data.metadata import read_split
    from mnpo.metrics.boxes import cam_thresholds
    from mnpo.metrics.masks import load_gt_mask

    meta = read_split(data / "metadata-masks" / "test")
    maps = [np.load(tmp_path / "maps" / f"{i}.npy") for i in meta.image_ids]
    gt = [load_gt_mask(data / "masks", meta.mask_paths[i], meta.ignore_paths[i], 224) for i in meta.image_ids]
    assert report["oracle"]["pxap"]["value"] == pytest.approx(naive_pxap(maps, gt, cam_thresholds(0.01)), rel=1e-9)
    assert report["calibrated"]["pxap"] == report["oracle"]["pxap"]  # PxAP needs no threshold


def test_evaluate_state_dir_from_the_command_line(trained, tmp_path, capsys):
    """`--state-dir`: progress files per split; the rerun reads them (same report); other
    settings on the same files are refused with exit status 2 and the differing setting named."""
    root, data = trained
    args = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--metadata", str(data / "metadata" / "test"), "--val-metadata", str(data / "metadata" / "val"),
            "--input-size", "48", "--workers", "0", "--method", "mnpo", "--state-dir", str(tmp_path / "state")]
    assert main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["test.json", "val.json"]
    assert main(args + ["--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    capsys.readouterr()
    assert main(args[:-4] + ["--method", "cam", "--state-dir", str(tmp_path / "state")]) == 2
    assert "method: 'mnpo' there, 'cam' now" in capsys.readouterr().err


def test_evaluate_writes_results_and_report_that_mnpo_report_compares(trained, tmp_path, capsys):
    """`evaluate --results/--report/--label`, then `mnpo report` over two methods; a mask result
    beside box results is refused with both files named."""
    from mnpo.engine.results import read_results

    root, data = trained
    common = ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
              "--input-size", "48", "--workers", "0", "--gallery-size", "4"]
    boxes = ["--metadata", str(data / "metadata" / "test"), "--val-metadata", str(data / "metadata" / "val")]
    assert main(common + boxes + ["--method", "cam", "--results", str(tmp_path / "cam.npz"),
                                  "--report", str(tmp_path / "cam.html"), "--json", str(tmp_path / "cam.json")]) == 0
    assert main(common + boxes + ["--method", "mnpos", "--label", "MNPOs a=1", "--results",
                                  str(tmp_path / "mnpos.npz")]) == 0
    cam = read_results(tmp_path / "cam.npz")
    saved = json.loads((tmp_path / "cam.json").read_text())
    assert cam.label == "cam" and len(cam.image_ids) == 9 and len(cam.gallery_ids) == 4
    assert {k: m.to_json() for k, m in cam.metrics()["calibrated"].items()} == saved["calibrated"]
    assert cam.info["classification"] == saved["info"]["classification"]
    assert 'data-label="cam"' in (tmp_path / "cam.html").read_text()
    assert main(["report", str(tmp_path / "cam.npz"), str(tmp_path / "mnpos.npz"), "--out",
                 str(tmp_path / "both.html")]) == 0
    page = (tmp_path / "both.html").read_text()
    assert 'data-label="cam"' in page and 'data-label="MNPOs a=1"' in page
    masks = ["--metadata", str(data / "metadata-masks" / "test"), "--mask-root", str(data / "masks")]
    assert main(common + masks + ["--method", "cam", "--results", str(tmp_path / "masks.npz")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "cam.npz"), str(tmp_path / "masks.npz"), "--out",
                 str(tmp_path / "mixed.html")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'masks.npz'} is a mask result but {tmp_path / 'cam.npz'} is a box result" in err


MAIN_BRANCH = '''
import torch
from torch import nn

from mnpo.models import load_model


class MainBranch(nn.Module):
    """An mnpo network seen as any classifier: its main branch's logits, nothing else."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).logits[0]


def main_branch(num_classes=1000):
    net, _ = load_model({checkpoint!r})
    assert net.num_classes == num_classes
    for p in net.parameters():  # what --weights must bring back
        torch.nn.init.normal_(p)
    return MainBranch(net)
'''


@pytest.fixture
def as_any_model(trained, tmp_path, monkeypatch):
    """``module:`` spec and weights file of the trained checkpoint's network behind a plain
    ``forward(x) -> logits``: the `--model` path must give the `--checkpoint` path's numbers."""
    import torch

    from mnpo.models import load_model

    root, _ = trained
    (tmp_path / "any_model.py").write_text(MAIN_BRANCH.format(checkpoint=str(root / "run" / "best.pt")))
    monkeypatch.syspath_prepend(str(tmp_path))
    import any_model

    net, _ = load_model(root / "run" / "best.pt")
    torch.save(any_model.MainBranch(net).state_dict(), tmp_path / "weights.pt")
    yield ["--model", "module:any_model.main_branch", "--weights", str(tmp_path / "weights.pt"), "--num-classes", "3"]
    monkeypatch.delitem(sys.modules, "any_model")


@pytest.mark.parametrize("method, extra", [("gradcam", []), ("cam", []), ("layercam", ["--target-layer", "conv5_2"])])
def test_evaluate_any_model_gives_the_checkpoints_numbers(trained, as_any_model, tmp_path, method, extra):
    """The same network by `--checkpoint` (mnpo's own feature names) and by `--model` (hooked by
    module name: ``auto`` finds the head; ``conv5_2`` is ``net.backbone.features.27``)."""
    root, data = trained
    common = ["evaluate", "-q", "--data", str(data / "images"), "--metadata", str(data / "metadata" / "test"),
              "--val-metadata", str(data / "metadata" / "val"), "--input-size", "48", "--workers", "0",
              "--method", method]
    assert main(common + ["--checkpoint", str(root / "run" / "best.pt"), *extra, "--json", str(tmp_path / "own.json"),
                          "--save-maps", str(tmp_path / "own")]) == 0
    hooked = ["--target-layer", "net.backbone.features.27"] if extra else []
    assert main(common + as_any_model + hooked + ["--json", str(tmp_path / "any.json"),
                                                  "--save-maps", str(tmp_path / "any")]) == 0
    own, other = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("own", "any"))
    assert other["info"]["checkpoint"] == "module:any_model.main_branch"
    assert other["info"]["weights"] == as_any_model[3] and "weights" not in own["info"]
    assert other["info"]["classification"] == own["info"]["classification"]
    maps = sorted(p.relative_to(tmp_path / "own") for p in (tmp_path / "own").rglob("*.npy"))
    assert len(maps) == 9
    for name in maps:  # the same arithmetic on the same CPU: float32 rounding at most
        np.testing.assert_allclose(np.load(tmp_path / "any" / name), np.load(tmp_path / "own" / name), atol=1e-6)
    assert other["oracle"] == own["oracle"] and other["calibrated"] == own["calibrated"]


def test_evaluate_a_torchvision_state_dict_end_to_end(trained, tmp_path):
    """`--model torchvision:resnet18 --weights FILE --num-classes 3` on the synthetic set: the saved
    Grad-CAM maps are the network's (`evaluate-maps` scores them to the same numbers), and the
    weights file is what was evaluated (a second random network gives other maps)."""
    import torch
    import torchvision

    _, data = trained
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / f"r18-{seed}.pt")
    common = ["evaluate", "-q", "--model", "torchvision:resnet18", "--num-classes", "3", "--data", str(data / "images"),
              "--metadata", str(data / "metadata" / "test"), "--val-metadata", str(data / "metadata" / "val"),
              "--input-size", "48", "--workers", "0", "--method", "gradcam", "--target-layer", "layer3"]
    for seed in (0, 1):
        assert main(common + ["--weights", str(tmp_path / f"r18-{seed}.pt"), "--json", str(tmp_path / f"{seed}.json"),
                              "--save-maps", str(tmp_path / f"maps-{seed}")]) == 0
    report = json.loads((tmp_path / "0.json").read_text())
    assert report["info"]["checkpoint"] == "torchvision:resnet18" and report["info"]["num_images"] == 9
    assert report["info"]["weights"] == str(tmp_path / "r18-0.pt")
    names = sorted(p.relative_to(tmp_path / "maps-0") for p in (tmp_path / "maps-0").rglob("*.npy"))
    assert len(names) == 9
    first, second = (np.stack([np.load(tmp_path / f"maps-{s}" / n) for n in names]) for s in (0, 1))
    assert first.shape == (9, 224, 224) and first.min() == 0 and first.max() == 1
    assert np.abs(first - second).max() > 0.1
    assert main(["evaluate-maps", "-q", "--maps", str(tmp_path / "maps-0"), "--metadata",
                 str(data / "metadata" / "test"), "--json", str(tmp_path / "maps.json")]) == 0
    from_maps = json.loads((tmp_path / "maps.json").read_text())["oracle"]
    for key in ("max_box_acc", "max_box_acc_v2", "gt_known_loc"):
        assert from_maps[key] == report["oracle"][key], key


def test_any_models_results_go_beside_a_checkpoints_in_mnpo_report(trained, as_any_model, tmp_path):
    """`evaluate --model ... --results` writes the results file `mnpo report` reads, with the same
    per-image numbers as the checkpoint's own (the same network) and the spec as its source."""
    from mnpo.engine.results import read_results

    root, data = trained
    common = ["evaluate", "-q", "--data", str(data / "images"), "--metadata", str(data / "metadata" / "test"),
              "--val-metadata", str(data / "metadata" / "val"), "--input-size", "48", "--workers", "0",
              "--method", "gradcam", "--gallery-size", "4"]
    assert main(common + ["--checkpoint", str(root / "run" / "best.pt"), "--results", str(tmp_path / "own.npz")]) == 0
    assert main(common + as_any_model + ["--label", "any gradcam", "--results", str(tmp_path / "any.npz")]) == 0
    own, other = read_results(tmp_path / "own.npz"), read_results(tmp_path / "any.npz")
    assert other.label == "any gradcam" and other.info["checkpoint"] == "module:any_model.main_branch"
    assert list(other.image_ids) == list(own.image_ids) and len(own.image_ids) == 9
    assert {k: m.to_json() for k, m in other.metrics()["oracle"].items()} == \
        {k: m.to_json() for k, m in own.metrics()["oracle"].items()}
    assert main(["report", str(tmp_path / "own.npz"), str(tmp_path / "any.npz"), "--out", str(tmp_path / "both.html")]) == 0
    page = (tmp_path / "both.html").read_text()
    assert 'data-label="gradcam"' in page and 'data-label="any gradcam"' in page


def test_localize_any_model_gives_the_checkpoints_boxes(trained, as_any_model, tmp_path):
    root, data = trained
    images = [str(p) for p in sorted((data / "images" / "test").rglob("*.png"))[:3]]
    common = ["localize", *images, "--method", "gradcam", "--device", "cpu", "--no-overlays", "--input-size", "48",
              "--threshold", "0.5"]  # the checkpoint has an operating threshold; --model has none
    assert main(common + ["--checkpoint", str(root / "run" / "best.pt"), "--out", str(tmp_path / "own")]) == 0
    assert main(common + as_any_model + ["--out", str(tmp_path / "any")]) == 0
    own, other = (json.loads((tmp_path / n / "localization.json").read_text())["images"] for n in ("own", "any"))
    assert len(own) == 3
    for a, b in zip(own, other):
        assert a["box"] == b["box"] and [c["index"] for c in a["top_classes"]] == [c["index"] for c in b["top_classes"]]
        for ca, cb in zip(a["top_classes"], b["top_classes"]):
            assert ca["probability"] == pytest.approx(cb["probability"], abs=1e-6)


def test_layers_lists_the_targets_of_any_model_and_of_a_checkpoint(trained, tmp_path, capsys):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    assert main(["layers", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "r18.pt"),
                 "--num-classes", "3", "--input-size", "64"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    # name, output shape (4 fields), kind, grid, stride, channels, note
    assert rows["layer4"][5:] == ["map", "2x2", "32", "512", "auto"]
    assert rows["layer3"][5:] == ["map", "4x4", "16", "256"]
    assert rows["conv1"][1:5] == ["(1,", "64,", "32,", "32)"]
    assert [r for r in rows.values() if r[-1] == "auto"] == [rows["layer4"]]
    root, _ = trained
    assert main(["layers", "--checkpoint", str(root / "run" / "best.pt"), "--input-size", "48"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["conv5_2"][1:] == ["(1,", "32,", "3,", "3)", "16"]
    assert "head" in rows


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet18"], "expected torchvision:NAME, timm:NAME or module:path.to.factory"),
    (["--model", "torchvision:resnet18", "--num-classes", "3"], "has no published weights; pass --weights FILE"),
    (["--checkpoint", "x.pt", "--weights", "w.pt"], "--weights and --num-classes go with --model, not --checkpoint"),
])
def test_any_model_arguments_are_checked(trained, tmp_path, capsys, argv, message):
    _, data = trained
    code = main(["evaluate", "-q", *argv, "--data", str(data / "images"),
                 "--metadata", str(data / "metadata" / "test"), "--workers", "0"])
    assert code == 2 and message in capsys.readouterr().err


def test_checkpoint_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["layers", "--checkpoint", "a.pt", "--model", "torchvision:resnet18"])
    assert "not allowed with argument" in capsys.readouterr().err
