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
from mnpo.engine.evaluate_maps import build_report, gt_boxes_in_frame
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
