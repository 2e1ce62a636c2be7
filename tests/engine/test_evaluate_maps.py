"""`mnpo evaluate-maps`: hand-made splits with known answers, the synthetic sets, bad input."""

import json

import numpy as np
import pytest

from mnpo.cli import main
from mnpo.data.metadata import read_split
from mnpo.engine.evaluate_maps import MapFileError, evaluate_map_folders, load_map
from mnpo.metrics.boxes import cam_thresholds
from mnpo.metrics.localization import BoxEvaluator, oracle_metrics


def _write(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def box_split(tmp_path):
    """Two 448x448 images; boxes halve into the 224 frame."""
    meta = tmp_path / "meta"
    _write(meta, "image_ids.txt", ["x/a.jpg", "x/b.jpg"])
    _write(meta, "class_labels.txt", ["x/a.jpg,0", "x/b.jpg,1"])
    _write(meta, "image_sizes.txt", ["x/a.jpg,448,448", "x/b.jpg,448,448"])
    _write(meta, "localization.txt", ["x/a.jpg,100,60,301,201", "x/b.jpg,10,10,50,50"])
    maps = tmp_path / "maps"
    (maps / "x").mkdir(parents=True)
    a = np.zeros((224, 224), np.float32)
    a[30:101, 50:151] = 1.0  # box (50, 30, 151, 101)
    np.save(maps / "x" / "a.jpg.npy", a)
    np.save(maps / "x" / "b.jpg.npy", np.zeros((224, 224), np.float32))
    return meta, maps


def test_hand_made_box_split(box_split, tmp_path):
    meta, maps = box_split
    logits = tmp_path / "logits.npy"
    np.save(logits, np.array([[1.0, 0.0], [0.0, 1.0]]))
    out = tmp_path / "report.json"
    assert main(["evaluate-maps", "-q", "--maps", str(maps), "--metadata", str(meta),
                 "--logits", str(logits), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "calibrated" not in report
    o = report["oracle"]
    # a: gt (100,60,301,201) -> int(x * 224 / 448) = (50, 30, 150, 100); predicted (50, 30, 151, 101):
    # IoU = 101 * 71 / (102 * 72) = 0.976 -> correct at every threshold; b: no box, wrong.
    assert o["max_box_acc"] == {"value": 50.0, "threshold": 0.0}
    assert o["gt_known_loc"] == o["max_box_acc"]
    assert o["max_box_acc_v2"] == {"value": 50.0, "threshold": [0.0, 0.0, 0.0]}
    assert o["top1_loc"]["value"] == 50.0 and o["top5_loc"]["value"] == 50.0
    assert report["info"]["num_images"] == 2 and report["info"]["num_thresholds"] == 100
    assert not list(tmp_path.glob(".report.json.*"))  # no temporary file left


def test_calibrated_report_with_val(box_split, tmp_path):
    meta, maps = box_split
    report = evaluate_map_folders(maps, meta, val_maps=maps, val_metadata=meta, cam_curve_interval=0.1)
    assert report.calibrated["max_box_acc"].value == 50.0
    assert report.calibrated["max_box_acc"].threshold == 0.0
    assert "calibrated" in report.to_json()
    table = report.table()
    assert "oracle" in table and "calibrated" in table and "max_box_acc_v2" in table


def test_synthetic_set_end_to_end(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--preset", "shapes", "--image-size", "64", "--classes", "2",
                 "--train-per-class", "1", "--val-per-class", "2", "--test-per-class", "3"]) == 0
    import cv2
    from mnpo.metrics.masks import load_gt_mask

    for split in ("val", "test"):
        mmeta = read_split(data / "metadata-masks" / split)
        for image_id in mmeta.image_ids:
            mask = load_gt_mask(data / "masks", mmeta.mask_paths[image_id], mmeta.ignore_paths[image_id])
            m = cv2.GaussianBlur((mask == 1).astype(np.float32), (0, 0), 4)
            path = tmp_path / "maps" / split / f"{image_id}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, m / m.max())
    out = tmp_path / "r.json"
    assert main(["evaluate-maps", "-q", "--maps", str(tmp_path / "maps" / "test"),
                 "--metadata", str(data / "metadata" / "test"),
                 "--val-maps", str(tmp_path / "maps" / "val"), "--val-metadata", str(data / "metadata" / "val"),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["oracle"]) == {"max_box_acc", "max_box_acc_v2", "gt_known_loc"}
    assert set(report["calibrated"]) == set(report["oracle"])
    # Blurred ground-truth masks localize almost perfectly.
    assert report["oracle"]["max_box_acc"]["value"] >= 80
    assert report["calibrated"]["max_box_acc"]["value"] <= report["oracle"]["max_box_acc"]["value"]
    # The same numbers straight from the evaluator.
    meta = read_split(data / "metadata" / "test")
    w, h = 64, 64
    gt = {i: [[int(x0 * 224 / w), int(y0 * 224 / h), int(x1 * 224 / w), int(y1 * 224 / h)]
              for x0, y0, x1, y1 in meta.boxes[i]] for i in meta.image_ids}
    ev = BoxEvaluator(gt, workers=1)
    ev.update([np.load(tmp_path / "maps" / "test" / f"{i}.npy") for i in meta.image_ids], meta.image_ids)
    assert oracle_metrics(ev.compute())["max_box_acc_v2"].value == pytest.approx(
        report["oracle"]["max_box_acc_v2"]["value"])
    # Masks: PxAP of blurred ground truth is high.
    out = tmp_path / "m.json"
    assert main(["evaluate-maps", "-q", "--maps", str(tmp_path / "maps" / "test"),
                 "--metadata", str(data / "metadata-masks" / "test"), "--mask-root", str(data / "masks"),
                 "--json", str(out)]) == 0
    pxap = json.loads(out.read_text())["oracle"]["pxap"]
    assert pxap["threshold"] is None and 80 <= pxap["value"] <= 100
    from metrics.reference import naive_pxap

    from mnpo.metrics.masks import load_gt_mask

    masks_meta = read_split(data / "metadata-masks" / "test")
    maps = [np.load(tmp_path / "maps" / "test" / f"{i}.npy") for i in masks_meta.image_ids]
    gt = [load_gt_mask(data / "masks", masks_meta.mask_paths[i], masks_meta.ignore_paths[i], 224)
          for i in masks_meta.image_ids]
    assert pxap["value"] == pytest.approx(naive_pxap(maps, gt, cam_thresholds(0.01)), rel=1e-9)


@pytest.mark.parametrize("make, msg", [
    (lambda p: p.unlink(), "not found"),
    (lambda p: np.save(p, np.full((224, 224), np.nan)), "NaN"),
    (lambda p: np.save(p, np.full((224, 224), 1.2)), r"\[0, 1\]"),
    (lambda p: np.save(p, np.zeros((112, 112))), "shape"),
    (lambda p: np.save(p, np.zeros((224, 224), np.uint8)), "floating"),
    (lambda p: p.write_bytes(b"garbage"), "readable"),
])
def test_bad_map_files_are_named(box_split, capsys, make, msg):
    meta, maps = box_split
    bad = maps / "x" / "b.jpg.npy"
    make(bad)
    with pytest.raises(MapFileError, match=msg) as info:
        evaluate_map_folders(maps, meta)
    assert "b.jpg.npy" in str(info.value)
    assert main(["evaluate-maps", "-q", "--maps", str(maps), "--metadata", str(meta)]) == 2
    assert "b.jpg.npy" in capsys.readouterr().err


def test_bad_arguments(box_split, tmp_path, capsys):
    meta, maps = box_split
    with pytest.raises(ValueError, match="neither"):
        evaluate_map_folders(maps, meta, val_maps=maps)
    np.save(tmp_path / "l.npy", np.zeros((3, 2)))
    with pytest.raises(MapFileError, match=r"\(2, C\)"):
        evaluate_map_folders(maps, meta, logits=tmp_path / "l.npy")
    with pytest.raises(MapFileError, match="maps folder"):
        evaluate_map_folders(tmp_path / "nowhere", meta)
    with pytest.raises(ValueError, match="interval"):
        evaluate_map_folders(maps, meta, cam_curve_interval=0)
    assert main(["evaluate-maps", "--maps", str(maps), "--metadata", str(tmp_path / "nometa")]) == 2
    assert "nometa" in capsys.readouterr().err


def test_mask_split_needs_mask_root(tmp_path):
    meta = tmp_path / "meta"
    _write(meta, "image_ids.txt", ["a.jpg"])
    _write(meta, "class_labels.txt", ["a.jpg,0"])
    _write(meta, "localization.txt", ["a.jpg,a_m.png,a_i.png"])
    (tmp_path / "maps").mkdir()
    np.save(tmp_path / "maps" / "a.jpg.npy", np.zeros((224, 224)))
    with pytest.raises(ValueError, match="mask-root"):
        evaluate_map_folders(tmp_path / "maps", meta)
    with pytest.raises(FileNotFoundError, match="a_m.png"):
        evaluate_map_folders(tmp_path / "maps", meta, mask_root=tmp_path)


def test_load_map_accepts_float32_and_float64(tmp_path):
    for dtype in (np.float32, np.float64):
        np.save(tmp_path / "m.npy", np.full((224, 224), 0.5, dtype))
        assert load_map(tmp_path / "m.npy").dtype == dtype


def test_center_baseline_by_hand_and_equal_to_saved_center_maps(box_split, tmp_path, capsys):
    """Image a's box (x 25..200, y 15..205 in the 224 frame) holds the centre: some centred disc
    covers it at IoU >= 0.5; b's (5..25) is in a corner: a box around a disc containing the
    centre never reaches IoU 0.5 with it. So MaxBoxAcc is 50. The same numbers come from the
    maps ``compute_maps(method="center")`` saves."""
    import torch

    from mnpo.maps import compute_maps
    from tiny_models import tiny_vgg_mnpo

    meta, _ = box_split
    _write(meta, "localization.txt", ["x/a.jpg,50,30,400,410", "x/b.jpg,10,10,50,50"])
    report = evaluate_map_folders(None, meta, center=True, workers=1)
    assert report.oracle["max_box_acc"].value == 50.0 and report.info["maps"] == "center baseline"
    maps, _ = compute_maps(tiny_vgg_mnpo(), torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]), method="center",
                           size=(224, 224))
    assert torch.equal(maps[0], maps[1])  # the image is ignored
    folder = tmp_path / "center-maps"
    (folder / "x").mkdir(parents=True)
    for name, m in zip(("a", "b"), maps):
        np.save(folder / "x" / f"{name}.jpg.npy", m.numpy())
    saved = evaluate_map_folders(folder, meta, workers=1)
    assert {k: m.to_json() for k, m in saved.oracle.items()} == {k: m.to_json() for k, m in report.oracle.items()}
    assert main(["evaluate-maps", "-q", "--center", "--metadata", str(meta), "--val-metadata", str(meta)]) == 0
    assert "calibrated max_box_acc" in capsys.readouterr().out
    assert main(["evaluate-maps", "-q", "--center", "--maps", str(folder), "--metadata", str(meta)]) == 2
    assert "give --center or --maps, not both" in capsys.readouterr().err
    assert main(["evaluate-maps", "-q", "--metadata", str(meta)]) == 2
    assert "give --maps (a folder of score maps) or --center" in capsys.readouterr().err


def test_normalize_renormalizes_saved_maps_by_hand(box_split, tmp_path, capsys):
    """Image a's map: 0 on rows 180.. (19.6 % of the pixels), 1 in its box (14.1 %), 0.25 elsewhere.
    Saved as it is (min-max already), the box is found only above 0.25: the oracle's first right
    threshold is 0.25 (0.26 where 0.25 rounds below it). IVR at 0.45 takes the 0.25 plateau as its
    level and leaves the box alone at 1: right from threshold 0. Both 50 % (b is empty)."""
    meta, maps = box_split
    a = np.full((224, 224), 0.25, np.float32)
    a[180:] = 0.0
    a[30:101, 50:151] = 1.0
    np.save(maps / "x" / "a.jpg.npy", a)
    saved = evaluate_map_folders(maps, meta, workers=1)
    ivr = evaluate_map_folders(maps, meta, workers=1, normalize="ivr")
    assert saved.oracle["max_box_acc"].value == ivr.oracle["max_box_acc"].value == 50.0
    assert saved.oracle["max_box_acc"].threshold == pytest.approx(0.255, abs=0.006)
    assert ivr.oracle["max_box_acc"].threshold == 0.0
    assert ivr.info["normalize"] == "ivr" and ivr.info["percentile"] == 0.45 and saved.info["normalize"] == "as saved"
    # IVR at 0.1 takes 0 (the bottom rows) as its level: the map is min-max's again
    low = evaluate_map_folders(maps, meta, workers=1, normalize="ivr", percentile=0.1)
    assert low.oracle["max_box_acc"].threshold == saved.oracle["max_box_acc"].threshold
    assert main(["evaluate-maps", "-q", "--maps", str(maps), "--metadata", str(meta), "--normalize", "ivr",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["oracle"]["max_box_acc"]["threshold"] == 0.0
    with pytest.raises(ValueError, match="percentile 0.3 is IVR's"):
        evaluate_map_folders(maps, meta, normalize="pas", percentile=0.3)
    with pytest.raises(ValueError, match="unknown normalization 'l1'"):
        evaluate_map_folders(maps, meta, normalize="l1")
    with pytest.raises(SystemExit, match="--percentile 0.3 is IVR's"):
        main(["evaluate-maps", "-q", "--maps", str(maps), "--metadata", str(meta), "--percentile", "0.3"])


@pytest.mark.parametrize("mode", ["minmax", "pas", "ivr"])
def test_renormalizing_min_max_maps_equals_normalizing_the_raw_maps(box_split, tmp_path, mode):
    """min-max, PaS and IVR do not change under s -> a s + b (a > 0), so re-normalizing saved
    min-max maps gives the maps the raw ones would: the same metrics as saving those."""
    import torch

    from mnpo.maps import normalize_maps

    meta, _ = box_split
    g = np.random.default_rng(5)
    yy, xx = np.mgrid[:224, :224]
    raw = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2)) + 0.3 * g.random((224, 224)) - 0.4
                    for cx, cy, s in ((100, 65, 40), (30, 30, 15))])
    folders = {}
    for name, maps in (("minmax", normalize_maps(torch.from_numpy(raw))),
                       ("direct", normalize_maps(torch.from_numpy(raw), mode))):
        folders[name] = tmp_path / name
        (folders[name] / "x").mkdir(parents=True)
        for image, m in zip(("a", "b"), maps.numpy()):
            np.save(folders[name] / "x" / f"{image}.jpg.npy", m)
    again = evaluate_map_folders(folders["minmax"], meta, workers=1, normalize=mode)
    direct = evaluate_map_folders(folders["direct"], meta, workers=1)
    assert {k: m.to_json() for k, m in again.oracle.items()} == {k: m.to_json() for k, m in direct.oracle.items()}
    if mode != "minmax":  # and the normalization matters to these maps
        plain = evaluate_map_folders(folders["minmax"], meta, workers=1)
        assert {k: m.to_json() for k, m in plain.oracle.items()} != {k: m.to_json() for k, m in direct.oracle.items()}
