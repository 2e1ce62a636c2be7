"""Split-level metrics: hand-derived values, the two protocols, streaming, bad input."""

import numpy as np
import pytest

from mnpo.metrics.boxes import box_ious_reference, cam_thresholds
from mnpo.metrics.localization import (
    BoxCurves,
    BoxEvaluator,
    MaskCurves,
    MaskEvaluator,
    Metric,
    calibrated_metrics,
    class_ranks,
    oracle_metrics,
    pxap_from_histograms,
    score_histogram,
)

T = np.array([0.0, 0.5])


def _four_images():
    """Four 10x10 maps whose correctness at t = 0 and t = 0.5 is worked out by hand."""
    a = np.zeros((10, 10)); a[2:5, 3:7] = 1.0      # box (3,2,7,5) == gt: IoU 1 at both t
    b = np.full((10, 10), 0.4); b[0:3, 0:3] = 1.0  # t=0: whole image (IoU .16); t=.5: (0,0,3,3): IoU 1
    c = np.zeros((10, 10))                          # no box: (0,0,0,0) vs (5,5,9,9): IoU 0
    d = np.zeros((10, 10)); d[0:5, 0:5] = 1.0      # (0,0,5,5) vs (0,0,3,3): 16/36 = .444
    maps = {"a": a, "b": b, "c": c, "d": d}
    gt = {"a": [[3, 2, 7, 5]], "b": [[0, 0, 3, 3]], "c": [[5, 5, 9, 9]], "d": [[0, 0, 3, 3]]}
    labels = {"a": 0, "b": 1, "c": 2, "d": 0}
    logits = {
        "a": [9, 1, 1, 1, 1, 1],  # rank 0
        "b": [5, 1, 1, 7, 8, 9],  # true logit 1: four strictly larger (the tie with class 2 is not) -> rank 4
        "c": [0, 0, 9, 0, 0, 0],
        "d": [0, 9, 0, 0, 0, 0],
    }
    return maps, gt, labels, logits


def _evaluate(workers=1, batches=((("a", "b"), ("c", "d")))):
    maps, gt, labels, logits = _four_images()
    ev = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=workers)
    for ids in batches:
        ev.update(np.stack([maps[i] for i in ids]), ids, np.array([logits[i] for i in ids], float))
    ev.close()
    return ev.compute()


def test_curves_by_hand():
    c = _evaluate()
    assert c.num_images == 4
    assert c.largest.tolist() == [1, 2]             # a | a, b
    assert c.multi.tolist() == [[2, 3], [1, 2], [1, 2]]  # IoU 30: a, d | a, b, d
    assert c.top1.tolist() == [1, 1]                # a
    assert c.top5.tolist() == [1, 2]                # a | a, b (rank 4 < 5)


def test_oracle_metrics_by_hand():
    m = oracle_metrics(_evaluate())
    assert list(m) == ["max_box_acc", "max_box_acc_v2", "gt_known_loc", "top1_loc", "top5_loc"]
    assert m["max_box_acc"].value == 50.0 and m["max_box_acc"].threshold == 0.5
    # GT-known Loc (spec 6): a correct largest-contour box, whatever the class: a at both
    # thresholds, b at 0.5 only -> 25% at 0, 50% at 0.5 (the IoU-30 count of max_box_acc_v2 would give 75%).
    assert m["gt_known_loc"] == Metric(50.0, 0.5)
    assert m["max_box_acc_v2"].value == pytest.approx((75 + 50 + 50) / 3)
    assert m["max_box_acc_v2"].threshold == (0.5, 0.5, 0.5)
    # top-1 is 25% at both thresholds: the first one wins.
    assert m["top1_loc"].value == 25.0 and m["top1_loc"].threshold == 0.0
    assert m["top5_loc"].value == 50.0 and m["top5_loc"].threshold == 0.5
    assert m["max_box_acc_v2"].to_json() == {"value": pytest.approx(58.3333333), "threshold": [0.5, 0.5, 0.5]}


def test_threads_and_batching_do_not_change_the_counts():
    one = _evaluate(workers=1)
    for workers, batches in [(3, [("a", "b", "c", "d")]), (2, [("d",), ("b", "c"), ("a",)])]:
        other = _evaluate(workers=workers, batches=batches)
        assert np.array_equal(one.largest, other.largest)
        assert np.array_equal(one.multi, other.multi)
        assert np.array_equal(one.top5, other.top5)


def test_gt_known_equals_max_box_acc_and_matches_a_naive_count():
    rng = np.random.default_rng(3)
    t = cam_thresholds(0.05)
    maps, gt = {}, {}
    for i in range(20):
        s = rng.random((16, 16)) ** 3
        maps[str(i)] = s
        x0, y0 = rng.integers(0, 8, 2)
        gt[str(i)] = [[x0, y0, x0 + rng.integers(1, 8), y0 + rng.integers(1, 8)]]
    ev = BoxEvaluator(gt, thresholds=t, image_size=16, workers=2)
    ev.update(np.stack(list(maps.values())), list(maps))
    curves = ev.compute()
    naive_largest = np.zeros(len(t), int)
    naive_multi = np.zeros((3, len(t)), int)
    for k in maps:
        r = box_ious_reference(maps[k], t, gt[k])
        naive_largest += r.largest_iou >= 0.5
        for j, iou in enumerate((0.3, 0.5, 0.7)):
            naive_multi[j] += r.multi_iou >= iou
    assert np.array_equal(curves.largest, naive_largest)
    assert np.array_equal(curves.multi, naive_multi)
    m = oracle_metrics(curves)
    best = int(np.argmax(naive_largest))
    for name in ("max_box_acc", "gt_known_loc"):  # both the naive count's best, at its first argmax
        assert m[name] == Metric(naive_largest[best] * 100 / 20, t[best]), name
    assert "top1_loc" not in m


def test_calibrated_uses_the_val_threshold():
    t = np.array([0.0, 0.5, 0.7])
    val = BoxCurves(t, 4, np.array([1, 3, 2]), np.array([[4, 1, 0], [1, 3, 2], [0, 0, 1]]))
    test = BoxCurves(t, 10, np.array([5, 2, 9]), np.array([[6, 8, 10], [3, 4, 5], [1, 2, 3]]))
    cal = calibrated_metrics(val, test)
    assert cal["max_box_acc"].value == 20.0 and cal["max_box_acc"].threshold == 0.5
    assert cal["gt_known_loc"] == Metric(20.0, 0.5)  # the largest-contour counts too: val 3 at 0.5, test 2
    # v2: val picks t = 0, 0.5, 0.7 per IoU -> test 60, 40, 30.
    assert cal["max_box_acc_v2"].threshold == (0.0, 0.5, 0.7)
    assert cal["max_box_acc_v2"].value == pytest.approx((60 + 40 + 30) / 3)
    orc = oracle_metrics(test)
    assert orc["max_box_acc"].value == 90.0 and orc["max_box_acc"].threshold == 0.7
    assert orc["gt_known_loc"] == Metric(90.0, 0.7)
    assert orc["max_box_acc_v2"].value == pytest.approx((100 + 50 + 30) / 3)


def test_calibrated_refuses_mismatched_grids():
    a = BoxCurves(np.array([0.0, 0.5]), 1, np.zeros(2, int), np.zeros((3, 2), int))
    b = BoxCurves(np.array([0.0, 0.6]), 1, np.zeros(2, int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="grid"):
        calibrated_metrics(a, b)
    m = MaskCurves(np.array([0.0, 0.5]), 1, np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="kind"):
        calibrated_metrics(a, m)


def test_class_ranks_break_ties_in_class_order():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    # row 0: class 1 ties class 2 at the top and comes first; row 1: a constant classifier
    assert class_ranks(logits, np.array([1, 0])).tolist() == [0, 0]
    assert class_ranks(logits, np.array([2, 3])).tolist() == [1, 3]
    assert class_ranks(logits, np.array([3, 2])).tolist() == [3, 2]
    # the rank is the place in a stable descending sort, i.e. where argmax / topk put the class
    rng = np.random.default_rng(0)
    many = rng.integers(0, 3, size=(50, 6)).astype(float)  # many ties
    labels = rng.integers(0, 6, size=50)
    order = np.argsort(-many, axis=1, kind="stable")
    expected = [int(np.nonzero(order[i] == labels[i])[0][0]) for i in range(50)]
    assert class_ranks(many, labels).tolist() == expected
    with pytest.raises(ValueError, match="labels"):
        class_ranks(logits, np.array([4, 0]))
    with pytest.raises(ValueError, match="NaN"):
        class_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_score_histogram_equals_numpy_at_the_edges():
    t = cam_thresholds(0.01)
    edges = np.append(t, [1.0, 2.0, 3.0])
    # float32 values at and around every edge, plus 0 and 1.
    values = np.concatenate([t, np.nextafter(t, 1), np.nextafter(t, 0).clip(0), [0.0, 1.0]])
    for dtype in (np.float32, np.float64):
        v = values.astype(dtype)
        assert np.array_equal(score_histogram(v, edges), np.histogram(v, bins=edges)[0])


def test_pxap_by_hand():
    # fg scores .9 .2, bg .6 .1 in bins [0,.5) [.5,1) [1,2) [2,3]:
    # tp (from the top) 0 0 1 2, fp 0 0 1 2 -> precision .5 .5, recall .5 1 -> 50.
    assert pxap_from_histograms([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(50.0)
    # fg .9 .7, bg .6 .1: tp 0 0 2 2, fp 0 0 1 2 -> precision 2/3 at recall 1.
    assert pxap_from_histograms([0, 2, 0, 0], [1, 1, 0, 0]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="foreground"):
        pxap_from_histograms([0, 0, 0, 0], [1, 1, 0, 0])


def test_naive_pxap_reference_by_hand_and_against_the_evaluator():
    """The engine tests' naive PxAP (tests/metrics/reference.py): the hand cases above, then
    random maps with ignored pixels against MaskEvaluator at the 0.01 grid."""
    from metrics.reference import naive_pxap

    assert naive_pxap([np.array([0.9, 0.2, 0.6, 0.1])], [np.array([1, 1, 0, 0])], T) == pytest.approx(50.0)
    assert naive_pxap([np.array([0.9, 0.7, 0.6, 0.1])], [np.array([1, 1, 0, 0])], T) == pytest.approx(200 / 3)
    rng = np.random.default_rng(3)
    masks = {f"m{k}": rng.choice(np.array([0, 1, 255], np.uint8), size=(6, 6), p=[0.5, 0.4, 0.1]) for k in range(4)}
    maps = {k: rng.random((6, 6)) for k in masks}
    maps["m0"][0, :3] = [0.0, 1.0, 0.5]  # the edges themselves
    ev = MaskEvaluator(masks.__getitem__, masks, thresholds=cam_thresholds(0.01), image_size=6, workers=1)
    ev.update(np.stack(list(maps.values())), list(maps))
    expected = naive_pxap(list(maps.values()), list(masks.values()), cam_thresholds(0.01))
    assert oracle_metrics(ev.compute())["pxap"].value == pytest.approx(expected, rel=1e-12)


def test_mask_evaluator_by_hand_with_ignored_pixels():
    masks = {"x": np.array([[1, 0], [0, 255]], np.uint8), "y": np.array([[1, 0], [255, 255]], np.uint8)}
    maps = {"x": np.array([[0.9, 0.6], [0.1, 0.95]]), "y": np.array([[0.7, 0.1], [1.0, 0.0]])}
    # x: fg .9, bg .6 .1; y: fg .7, bg .1; ignored pixels do not count.
    ev = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, workers=1)
    ev.update(np.stack([maps["x"], maps["y"]]), ["x", "y"])
    curves = ev.compute()
    assert curves.positive.tolist() == [0, 2, 0, 0]
    assert curves.negative.tolist() == [2, 1, 0, 0]
    # tp 0 0 2 2; fp 0 0 1 3 -> precision 2/3 at recall 1.
    assert oracle_metrics(curves)["pxap"].value == pytest.approx(200 / 3)
    assert calibrated_metrics(curves, curves)["pxap"].threshold is None


@pytest.mark.parametrize("make_bad, err, msg", [
    (lambda m: m * np.nan, ValueError, "NaN"),
    (lambda m: m + 2, ValueError, r"\[0, 1\]"),
    (lambda m: m[:, :5], ValueError, "shape"),
])
def test_bad_maps_name_the_image(make_bad, err, msg):
    maps, gt, labels, _ = _four_images()
    ev = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    with pytest.raises(err, match=msg) as info:
        ev.update(make_bad(maps["a"])[None], ["a"])
    assert "'a'" in str(info.value)


def test_bad_batches():
    maps, gt, labels, logits = _four_images()
    ev = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    with pytest.raises(KeyError, match="zzz"):
        ev.update(maps["a"][None], ["zzz"])
    with pytest.raises(ValueError, match="2 maps for 1"):
        ev.update(np.stack([maps["a"], maps["b"]]), ["a"])
    with pytest.raises(ValueError, match="logits"):
        ev.update(maps["a"][None], ["a"], np.zeros((2, 6)))
    ev.update(maps["a"][None], ["a"])
    with pytest.raises(ValueError, match="already"):
        ev.update(maps["a"][None], ["a"])
    with pytest.raises(ValueError, match="every batch or with none"):
        ev.update(maps["b"][None], ["b"], np.array([logits["b"]], float))
    assert ev.missing_ids == {"b", "c", "d"}
    with pytest.raises(ValueError, match="no class labels"):
        BoxEvaluator(gt, None, thresholds=T, image_size=10).update(maps["a"][None], ["a"], np.zeros((1, 6)))
    with pytest.raises(ValueError, match="thresholds"):
        BoxEvaluator(gt, thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="no image"):
        oracle_metrics(BoxEvaluator(gt, thresholds=T).compute())


def test_box_state_round_trip_continues_to_the_same_counts():
    """Half the images, state through JSON, a fresh evaluator, the other half: the same curves
    as one evaluator seeing all four."""
    import json

    maps, gt, labels, logits = _four_images()
    first = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    first.update(np.stack([maps["a"], maps["b"]]), ["a", "b"], np.array([logits["a"], logits["b"]], float))
    state = json.loads(json.dumps(first.state_dict()))
    second = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    second.load_state_dict(state)
    assert second.seen_ids == {"a", "b"} and second.missing_ids == {"c", "d"}
    with pytest.raises(ValueError, match="'a' was already evaluated"):
        second.update(maps["a"][None], ["a"], np.array([logits["a"]], float))
    second.update(np.stack([maps["c"], maps["d"]]), ["c", "d"], np.array([logits["c"], logits["d"]], float))
    whole, resumed = _evaluate(), second.compute()
    for field in ("largest", "multi", "top1", "top5"):
        assert np.array_equal(getattr(whole, field), getattr(resumed, field)), field
    assert resumed.num_images == 4


def test_box_state_from_another_setup_is_refused():
    maps, gt, labels, _ = _four_images()
    ev = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    ev.update(maps["a"][None], ["a"])
    state = ev.state_dict()
    with pytest.raises(ValueError, match="other thresholds"):
        BoxEvaluator(gt, labels, thresholds=np.array([0.0, 0.25]), image_size=10).load_state_dict(state)
    with pytest.raises(ValueError, match=r"IoU thresholds \[30, 50, 70\], expected \[50\]"):
        BoxEvaluator(gt, labels, thresholds=T, iou_thresholds=(50,), image_size=10).load_state_dict(state)
    with pytest.raises(ValueError, match=r"image ids the split does not have, e.g. \['a'\]"):
        BoxEvaluator({"b": gt["b"]}, labels, thresholds=T, image_size=10).load_state_dict(state)
    with pytest.raises(ValueError, match="counts 2 images but lists 1"):
        BoxEvaluator(gt, labels, thresholds=T, image_size=10).load_state_dict({**state, "n": 2})
    masks = MaskEvaluator(lambda i: None, gt, thresholds=T, image_size=10)
    with pytest.raises(ValueError, match="state of kind 'box', expected 'mask'"):
        masks.load_state_dict(state)


def test_mask_state_round_trip():
    masks = {"x": np.array([[1, 0], [0, 255]], np.uint8), "y": np.array([[1, 0], [255, 255]], np.uint8)}
    maps = {"x": np.array([[0.9, 0.6], [0.1, 0.95]]), "y": np.array([[0.7, 0.1], [1.0, 0.0]])}
    whole = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, workers=1)
    whole.update(np.stack([maps["x"], maps["y"]]), ["x", "y"])
    first = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, workers=1)
    first.update(maps["x"][None], ["x"])
    second = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, workers=1)
    second.load_state_dict(first.state_dict())
    second.update(maps["y"][None], ["y"])
    a, b = whole.compute(), second.compute()
    assert a.num_images == b.num_images == 2
    assert np.array_equal(a.positive, b.positive) and np.array_equal(a.negative, b.negative)


def test_per_image_records_are_what_the_curves_count():
    """Each image's largest-contour IoU row, by hand for the four images; counted at IoU >= 0.5
    they give the ``largest`` curve exactly; through a JSON state they resume unchanged."""
    import json

    maps, gt, labels, logits = _four_images()
    ev = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=2, per_image=True)
    ev.update(np.stack([maps["a"], maps["b"]]), ["a", "b"])
    state = json.loads(json.dumps(ev.state_dict()))
    resumed = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1, per_image=True)
    resumed.load_state_dict(state)
    for e in (ev, resumed):
        e.update(np.stack([maps["c"], maps["d"]]), ["c", "d"])
    for e in (ev, resumed):
        records = e.records()
        assert records.image_ids == ("a", "b", "c", "d")
        expected = np.stack([box_ious_reference(maps[i], T, gt[i]).largest_iou for i in "abcd"])
        assert np.array_equal(records.values, expected)
        assert np.array_equal((records.values >= 0.5).sum(axis=0), e.compute().largest)
    assert records.values[:, 1].round(3).tolist() == [1.0, 1.0, 0.0, 0.444]  # the module's hand values at t = 0.5


def test_per_image_records_need_asking_for_and_a_matching_state():
    maps, gt, labels, _ = _four_images()
    plain = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1)
    plain.update(maps["a"][None], ["a"])
    with pytest.raises(ValueError, match="per_image=False"):
        plain.records()
    with pytest.raises(ValueError, match="keeps no per-image values"):
        BoxEvaluator(gt, labels, thresholds=T, image_size=10, per_image=True).load_state_dict(plain.state_dict())
    recording = BoxEvaluator(gt, labels, thresholds=T, image_size=10, workers=1, per_image=True)
    recording.update(maps["a"][None], ["a"])
    state = recording.state_dict()
    state["per_image"]["ids"] = ["b"]
    with pytest.raises(ValueError, match="do not cover the images it counts"):
        BoxEvaluator(gt, labels, thresholds=T, image_size=10, per_image=True).load_state_dict(state)


def test_per_image_pxap_is_each_image_evaluated_alone():
    """Mask records: an image's own PxAP equals a one-image evaluator's PxAP; NaN without foreground."""
    masks = {"x": np.array([[1, 0], [0, 255]], np.uint8), "y": np.array([[1, 0], [255, 255]], np.uint8),
             "z": np.array([[0, 0], [0, 255]], np.uint8)}
    maps = {"x": np.array([[0.9, 0.6], [0.1, 0.95]]), "y": np.array([[0.7, 0.1], [1.0, 0.0]]),
            "z": np.array([[0.2, 0.1], [0.3, 0.0]])}
    ev = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, workers=1, per_image=True)
    ev.update(np.stack([maps[i] for i in "xyz"]), list("xyz"))
    records = ev.records()
    for k, i in enumerate("xy"):
        alone = MaskEvaluator(masks.__getitem__, [i], thresholds=T, image_size=2, workers=1)
        alone.update(maps[i][None], [i])
        assert records.values[k] == alone.compute().pxap
    assert records.values[0] == 50.0  # x: fg .9 shares the bin [.5, 1) with bg .6: precision 1/2
    assert records.values[1] == 100.0  # y: fg .7 above every bg pixel
    assert np.isnan(records.values[2])
    again = MaskEvaluator(masks.__getitem__, masks, thresholds=T, image_size=2, per_image=True)
    again.load_state_dict(ev.state_dict())
    assert np.array_equal(again.records().values, records.values, equal_nan=True)


def test_precision_recall_by_hand():
    from mnpo.metrics.localization import precision_recall

    # fg .9 .2, bg .6 .1 in bins [0,.5) [.5,1) [1,2) [2,3]: from the top, tp 0 0 1 2, fp 0 0 1 2.
    precision, recall = precision_recall([1, 1, 0, 0], [1, 1, 0, 0])
    assert np.isnan(precision[:2]).all() and precision[2:].tolist() == [0.5, 0.5]
    assert recall.tolist() == [0.0, 0.0, 0.5, 1.0]


def test_per_image_concat_refuses_an_image_twice():
    from mnpo.metrics.localization import PerImage

    a = PerImage(("a",), np.zeros((1, 2)))
    assert PerImage.concat([a, PerImage(("b",), np.ones((1, 2)))]).image_ids == ("a", "b")
    with pytest.raises(ValueError, match="more than one part"):
        PerImage.concat([a, a])
    with pytest.raises(ValueError, match="1 image ids but 2 rows"):
        PerImage(("a",), np.zeros((2, 2)))
