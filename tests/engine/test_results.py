"""Per-image details of an evaluation and the results file: identities with the curves, round
trips, resumption, and every bad file named."""

import json
import zipfile

import numpy as np
import pytest
from tiny_models import tiny_vgg_mnpo

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.evaluate_maps import build_report, evaluate_map_folders, gt_boxes_in_frame
from mnpo.engine.report import _per_class
from mnpo.engine.results import (
    THUMBNAIL,
    EvaluationResults,
    ResultsFileError,
    gallery_sample,
    read_results,
    split_digest,
    write_results,
)
from mnpo.metrics.boxes import box_ious, cam_thresholds

T = cam_thresholds(0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    write_synthetic_dataset(out=root, preset="parts", seed=5, image_size=48, num_classes=3,
                            train_per_class=1, val_per_class=2, test_per_class=4)
    return root


def _dataset(data, split="test", masks=False):
    folder = "metadata-masks" if masks else "metadata"
    return WSOLDataset(data / "images", data / folder / split, "evaluate", crop_size=48, resize_size=55,
                       uint8_views=True, mask_root=data / "masks" if masks else None)


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """The test split with details and its maps saved, the val split's curves."""
    maps = tmp_path_factory.mktemp("maps")
    test = evaluate_model(tiny_vgg_mnpo(), _dataset(data), thresholds=T, method="mnpo", batch_size=5,
                          details=True, gallery_size=5, save_maps=maps)
    val = evaluate_model(tiny_vgg_mnpo(), _dataset(data, "val"), thresholds=T, method="mnpo", batch_size=5)
    return test, val, maps


@pytest.fixture(scope="module")
def val_maps(data, tmp_path_factory):
    """The val split's maps, as ``evaluated`` saved the test split's."""
    maps = tmp_path_factory.mktemp("val-maps")
    evaluate_model(tiny_vgg_mnpo(), _dataset(data, "val"), thresholds=T, method="mnpo", batch_size=5, save_maps=maps)
    return maps


def _build(data, test, val, label="mnpo"):
    return EvaluationResults.build(label, test.curves, None if val is None else val.curves, test.details,
                                   _dataset(data).meta, None if val is None else _dataset(data, "val").meta, 3,
                                   {"method": "mnpo", "metadata": "test", "val_metadata": "val",
                                    "classification": test.classification})


def test_details_agree_with_the_curves_and_the_classification(data, evaluated):
    test, _, maps = evaluated
    d = test.details
    ds = _dataset(data)
    assert sorted(d.records.image_ids) == sorted(ds.image_ids) and d.records.values.shape == (12, len(T))
    assert np.array_equal((d.records.values >= 0.5).sum(axis=0), test.curves.largest)
    labels = ds.meta.labels
    assert sum(int(d.top5[i][0] == labels[i]) for i in ds.image_ids) == test.top1_correct
    assert all(len(d.top5[i]) == 3 and sorted(d.top5[i]) == [0, 1, 2] for i in ds.image_ids)  # 3 classes
    assert set(d.gallery) == gallery_sample(ds.image_ids, 5) and len(d.gallery) == 5
    gt = gt_boxes_in_frame(ds.meta)
    for image_id, item in d.gallery.items():
        scoremap = np.load(maps / f"{image_id}.npy")
        assert np.array_equal(item.boxes, box_ious(scoremap, T, gt[image_id]).largest_boxes)
        assert np.array_equal(item.gt, gt[image_id])
        assert item.image.shape == (THUMBNAIL, THUMBNAIL, 3) and item.image.dtype == np.uint8
        assert item.scoremap.shape == (THUMBNAIL, THUMBNAIL)
        # a 224 -> 112 area resize averages 2x2 blocks: each thumbnail pixel is one block's mean
        blocks = scoremap.reshape(THUMBNAIL, 2, THUMBNAIL, 2).mean(axis=(1, 3))
        assert np.abs(item.scoremap.astype(float) - blocks * 255).max() <= 0.5 + 1e-3


def test_gallery_sample_is_fixed_by_the_ids_alone():
    ids = [f"img{i}" for i in range(50)]
    assert gallery_sample(ids, 7) == gallery_sample(reversed(ids), 7) and len(gallery_sample(ids, 7)) == 7
    assert gallery_sample(ids[:30], 7) <= set(ids) and gallery_sample(ids, 0) == set()
    assert gallery_sample(ids, 100) == set(ids)


def test_results_round_trip_and_per_image_values_give_the_metrics(data, evaluated, tmp_path):
    test, val, _ = evaluated
    built = _build(data, test, val)
    back = read_results(write_results(tmp_path / "r.npz", built))
    report = build_report(test.curves, val.curves, {})
    for protocol, expected in (("oracle", report.oracle), ("calibrated", report.calibrated)):
        assert {k: m.to_json() for k, m in back.metrics()[protocol].items()} == \
            {k: m.to_json() for k, m in expected.items()}
        # the per-image IoU at that protocol's threshold counts to its MaxBoxAcc exactly
        hits = (back.per_image[f"iou_{protocol}"] >= 0.5).sum()
        assert hits * 100.0 / len(back.image_ids) == expected["max_box_acc"].value
    assert back.image_ids == _dataset(data).image_ids  # metadata order
    assert back.split["digest"] == split_digest(_dataset(data).image_ids, _dataset(data).meta.labels)
    for name in ("labels", "top5", "gallery_image", "gallery_map", "thresholds"):
        assert np.array_equal(getattr(back, name), getattr(built, name)), name
    index = back.chosen_index("calibrated")
    for k, image_id in enumerate(back.gallery_ids):
        assert np.array_equal(back.gallery_boxes["calibrated"][k], test.details.gallery[image_id].boxes[index])
        assert np.array_equal(back.gallery_gt[k], built.gallery_gt[k])
    assert back.label == "mnpo" and back.info["classification"] == test.classification


def test_results_without_val_have_no_calibrated_values(data, evaluated, tmp_path):
    test, _, _ = evaluated
    back = read_results(write_results(tmp_path / "r.npz", _build(data, test, None)))
    assert not back.calibrated and list(back.metrics()) == ["oracle"] and back.chosen_index("calibrated") is None
    assert np.isnan(back.per_image["iou_calibrated"]).all()
    assert (back.gallery_boxes["calibrated"] == -1).all()


def test_mask_results_round_trip(data, tmp_path):
    ds = _dataset(data, masks=True)
    run = evaluate_model(tiny_vgg_mnpo(), ds, thresholds=T, method="cam", batch_size=6, details=True, gallery_size=3)
    built = EvaluationResults.build("cam", run.curves, None, run.details, ds.meta, None, 3, {"method": "cam"})
    back = read_results(write_results(tmp_path / "m.npz", built))
    assert back.kind == "mask" and back.metrics()["oracle"]["pxap"].value == run.curves.pxap
    order = [run.details.records.image_ids.index(i) for i in back.image_ids]
    assert np.array_equal(back.per_image["pxap"], run.details.records.values[order], equal_nan=True)
    assert len(back.gallery_gt) == 3 and set(np.unique(back.gallery_gt[0])) <= {0, 1, 255}
    assert back.gallery_gt[0].shape == (THUMBNAIL, THUMBNAIL)


def test_an_interrupted_evaluation_with_details_resumes_to_the_same_details(data, evaluated, tmp_path):
    whole = evaluated[0].details

    class Stop(Exception):
        pass

    seen = []

    def stop_at_second(batch, maps):
        seen.append(batch)
        if len(seen) == 2:
            raise Stop

    state = tmp_path / "state.json"
    common = dict(thresholds=T, method="mnpo", batch_size=5, details=True, gallery_size=5, state_file=state,
                  save_every=0)
    with pytest.raises(Stop):
        evaluate_model(tiny_vgg_mnpo(), _dataset(data), **common, on_batch=stop_at_second)
    assert len(json.loads(state.read_text())["details"]["top5"]) == 5  # one batch saved
    resumed = evaluate_model(tiny_vgg_mnpo(), _dataset(data), **common).details
    assert resumed.records.image_ids == whole.records.image_ids
    assert np.array_equal(resumed.records.values, whole.records.values)
    assert {k: v.tolist() for k, v in resumed.top5.items()} == {k: v.tolist() for k, v in whole.top5.items()}
    assert resumed.gallery.keys() == whole.gallery.keys()
    for k, item in whole.gallery.items():
        for name in ("image", "scoremap", "boxes", "gt"):
            assert np.array_equal(getattr(resumed.gallery[k], name), getattr(item, name)), (k, name)
    with pytest.raises(ValueError, match="details: True there, False now"):
        evaluate_model(tiny_vgg_mnpo(), _dataset(data), **{**common, "details": False})


def test_bad_results_files_are_named(data, evaluated, tmp_path):
    good = write_results(tmp_path / "good.npz", _build(data, evaluated[0], evaluated[1]))
    with pytest.raises(ResultsFileError, match="missing.npz: results file not found"):
        read_results(tmp_path / "missing.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ResultsFileError, match="truncated.npz: not a readable results file, truncated"):
        read_results(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ResultsFileError, match="other.npz: not an mnpo-results file"):
        read_results(other)
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    newer = tmp_path / "newer.npz"
    np.savez(newer, **{**arrays, "version": np.int64(2)})
    with pytest.raises(ResultsFileError, match="newer.npz: written in mnpo-results version 2, newer than this mnpo "
                                               r"reads \(up to 1\); upgrade mnpo"):
        read_results(newer)
    lacking = tmp_path / "lacking.npz"
    np.savez(lacking, **{k: v for k, v in arrays.items() if k != "top5"})
    with pytest.raises(ResultsFileError, match="lacking.npz: mnpo-results file lacks 'top5'"):
        read_results(lacking)
    short = tmp_path / "short.npz"
    np.savez(short, **{**arrays, "labels": arrays["labels"][:3]})
    with pytest.raises(ResultsFileError, match="short.npz: arrays of different lengths"):
        read_results(short)
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello")
    with pytest.raises(ResultsFileError, match="text.npz: not a readable results file"):
        read_results(not_zip)
    assert zipfile.is_zipfile(good)  # the format is a plain zip of .npy arrays


def test_saved_maps_give_the_results_file_of_the_evaluation_that_saved_them(data, evaluated, val_maps, tmp_path):
    """``evaluate-maps --results`` on the maps ``evaluate_model`` saved: the same curves under
    both protocols, per-image IoUs, labels, gallery sample, maps and boxes; no classification
    without logits (top-5 rows of -1, the report shows "-")."""
    test, val, maps = evaluated
    expected = _build(data, test, val)
    out, page = tmp_path / "maps.npz", tmp_path / "maps.html"
    evaluate_map_folders(maps, data / "metadata" / "test", val_maps=val_maps, val_metadata=data / "metadata" / "val",
                         cam_curve_interval=0.05, data=data / "images", results=out, report_html=page,
                         gallery_size=5, label="saved")
    back = read_results(out)
    assert back.label == "saved" and back.info["method"] == "saved maps" and back.calibrated
    for protocol, metrics in back.metrics().items():  # no logits: no Top-1/5 Loc, the rest equal
        assert set(metrics) == set(expected.metrics()[protocol]) - {"top1_loc", "top5_loc"}
        assert {k: m.to_json() for k, m in metrics.items()} == \
            {k: expected.metrics()[protocol][k].to_json() for k in metrics}
    assert back.image_ids == expected.image_ids and np.array_equal(back.labels, expected.labels)
    for name in ("iou_oracle", "iou_calibrated"):
        assert np.array_equal(back.per_image[name], expected.per_image[name])
    assert back.gallery_ids == expected.gallery_ids and np.array_equal(back.gallery_map, expected.gallery_map)
    for protocol in ("oracle", "calibrated"):
        assert np.array_equal(back.gallery_boxes[protocol], expected.gallery_boxes[protocol])
    assert all(np.array_equal(a, b) for a, b in zip(back.gallery_gt, expected.gallery_gt))
    assert back.gallery_image.shape == (5, THUMBNAIL, THUMBNAIL, 3) and back.gallery_image.std() > 0
    assert (back.top5 == -1).all() and np.isnan(_per_class(back)[2]).all()  # per-class top-1 cls: "-"
    assert "<td>saved</td>" in page.read_text()


def test_saved_maps_with_logits_give_top5_and_the_center_baseline_has_results(data, evaluated, tmp_path):
    _, _, maps = evaluated
    logits = np.random.default_rng(0).normal(size=(12, 3))
    np.save(tmp_path / "logits.npy", logits)
    out = evaluate_map_folders(maps, data / "metadata" / "test", cam_curve_interval=0.05,
                               logits=tmp_path / "logits.npy", data=data / "images", results=tmp_path / "m.npz",
                               gallery_size=3)
    back = read_results(tmp_path / "m.npz")
    order = np.argsort(-logits, axis=1, kind="stable")  # rows in image_ids.txt order, as the file's
    assert np.array_equal(back.top5[:, :3], order) and (back.top5[:, 3:] == -1).all()
    assert back.metrics()["oracle"]["top1_loc"].value == out.oracle["top1_loc"].value
    assert back.label == maps.name and back.num_classes == 3
    center = evaluate_map_folders(None, data / "metadata" / "test", center=True, cam_curve_interval=0.05,
                                  data=data / "images", results=tmp_path / "c.npz", gallery_size=3)
    back = read_results(tmp_path / "c.npz")
    assert back.label == "center" and back.info["method"] == "center"
    assert back.metrics()["oracle"]["max_box_acc"].value == center.oracle["max_box_acc"].value
    assert (back.gallery_map == back.gallery_map[0]).all()  # one map for every image


def test_results_of_saved_maps_need_the_images(data, evaluated, tmp_path):
    with pytest.raises(ValueError, match="--results and --report need --data, the image root"):
        evaluate_map_folders(evaluated[2], data / "metadata" / "test", results=tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_center_baseline_beside_a_checkpoint_in_one_report_from_the_cli(data, evaluated, tmp_path, capsys):
    from mnpo.cli import main

    model = write_results(tmp_path / "model.npz", _build(data, evaluated[0], evaluated[1]))
    center = tmp_path / "center.npz"
    assert main(["evaluate-maps", "-q", "--center", "--metadata", str(data / "metadata" / "test"),
                 "--val-metadata", str(data / "metadata" / "val"), "--data", str(data / "images"),
                 "--results", str(center), "--gallery-size", "5", "--cam-curve-interval", "0.05"]) == 0
    page = tmp_path / "both.html"
    assert main(["report", str(model), str(center), "--out", str(page)]) == 0
    text = page.read_text()
    assert "<td>center</td>" in text and "<td>mnpo</td>" in text and 'id="gallery-' in text
    capsys.readouterr()
    assert main(["evaluate-maps", "-q", "--center", "--metadata", str(data / "metadata" / "test"),
                 "--report", str(tmp_path / "x.html")]) == 2
    assert "need --data" in capsys.readouterr().err


def test_saved_maps_of_a_mask_split_give_the_same_results_file(data, tmp_path):
    ds = _dataset(data, masks=True)
    run = evaluate_model(tiny_vgg_mnpo(), ds, thresholds=T, method="cam", batch_size=6, details=True, gallery_size=3,
                         save_maps=tmp_path / "maps")
    expected = EvaluationResults.build("cam", run.curves, None, run.details, ds.meta, None, 3, {"method": "cam"})
    evaluate_map_folders(tmp_path / "maps", data / "metadata-masks" / "test", mask_root=data / "masks",
                         cam_curve_interval=0.05, data=data / "images", results=tmp_path / "m.npz", gallery_size=3)
    back = read_results(tmp_path / "m.npz")
    assert back.kind == "mask" and back.metrics()["oracle"]["pxap"].value == run.curves.pxap
    assert np.array_equal(back.per_image["pxap"], expected.per_image["pxap"], equal_nan=True)
    assert back.gallery_ids == expected.gallery_ids and np.array_equal(back.gallery_map, expected.gallery_map)
    assert all(np.array_equal(a, b) for a, b in zip(back.gallery_gt, expected.gallery_gt))
