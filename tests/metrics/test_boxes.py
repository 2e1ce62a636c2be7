"""Boxes and IoU at every threshold: hand-derived cases, fast == reference, bad input."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from box_strategies import scoremaps

from mnpo.metrics.boxes import (
    PAPER_THRESHOLDS,
    box_ious,
    box_ious_reference,
    cam_thresholds,
    check_scoremap,
    threshold_levels,
    to_uint8,
)

BOTH = pytest.mark.parametrize("fn", [box_ious, box_ious_reference], ids=["fast", "reference"])


def test_threshold_grids():
    assert np.allclose(PAPER_THRESHOLDS, [0.05 + 0.01 * i for i in range(30)])
    assert np.array_equal(PAPER_THRESHOLDS, np.arange(0.05, 0.35, 0.01))  # the release's floats, bit for bit
    # which matters: its 0.29000000000000004 puts the level of a map whose maximum is 100 at 29, not 28
    assert int(PAPER_THRESHOLDS[24] * 100) == 29 and int(0.29 * 100) == 28
    grid = cam_thresholds(0.01)
    assert grid.shape == (100,) and grid[0] == 0.0 and grid[-1] < 1.0
    # Same float values as np.arange, which decides int(t * max) at the edges.
    assert np.array_equal(grid, np.arange(0, 1, 0.01))
    assert cam_thresholds(0.25).tolist() == [0.0, 0.25, 0.5, 0.75]
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="interval"):
            cam_thresholds(bad)


def test_uint8_and_levels_follow_the_protocol():
    s = np.array([[0.0, 0.5, 1.0, 0.999]], np.float32)
    u = to_uint8(s)
    assert u.dtype == np.uint8 and u.tolist() == [[0, 127, 255, 254]]
    # level = int(t * max(u)); max 255: t = 0.5 -> 127, t = 0.99 -> 252.
    assert threshold_levels(u, np.array([0.0, 0.5, 0.99])).tolist() == [0, 127, 252]


@BOTH
def test_single_block_box_and_iou_by_hand(fn):
    s = np.zeros((10, 10))
    s[2:5, 3:7] = 1.0  # rows 2-4, cols 3-6
    res = fn(s, np.array([0.0, 0.5, 0.9]), [[3, 2, 6, 4]])
    # boundingRect: x=3, w=4 -> x1 = 3 + 4 = 7; y=2, h=3 -> y1 = 5.
    assert res.largest_boxes.tolist() == [[3, 2, 7, 5]] * 3
    # Intersection 4 x 3 = 12; areas 5 x 4 = 20 and 12 -> 12 / 20.
    assert np.allclose(res.largest_iou, 0.6) and np.allclose(res.multi_iou, 0.6)


@BOTH
def test_box_is_clipped_at_the_right_and_bottom_edges(fn):
    s = np.zeros((6, 8))
    s[3:, 5:] = 0.7  # touches both edges: w = 3 -> x1 = min(8, 7) = 7
    res = fn(s, np.array([0.0]), [[5, 3, 7, 5]])
    assert res.largest_boxes.tolist() == [[5, 3, 7, 5]]
    assert res.largest_iou.tolist() == [1.0]


@BOTH
def test_zero_map_gives_the_empty_box(fn):
    s = np.zeros((7, 9))
    res = fn(s, cam_thresholds(0.1), [[0, 0, 1, 1]])
    assert (res.largest_boxes == 0).all()
    # The box (0, 0, 0, 0) is one pixel: IoU with a 2x2 box at the origin is 1/4.
    assert np.allclose(res.largest_iou, 0.25) and np.allclose(res.multi_iou, 0.25)


@BOTH
def test_constant_positive_map_gives_the_whole_image(fn):
    s = np.full((5, 6), 0.4)
    res = fn(s, cam_thresholds(0.25), [[0, 0, 5, 4]])
    assert res.largest_boxes.tolist() == [[0, 0, 5, 4]] * 4
    assert np.allclose(res.largest_iou, 1.0)


@BOTH
def test_largest_contour_is_chosen_by_polygon_area_not_box(fn):
    # A long thin line (big box, zero polygon area) and a small solid square.
    s = np.zeros((12, 12))
    s[1, 0:11] = 1.0  # line: contour area 0
    s[5:8, 5:8] = 1.0  # 3x3 square: contour area 4
    res = fn(s, np.array([0.5]), [[5, 5, 7, 7]])
    assert res.largest_boxes.tolist() == [[5, 5, 8, 8]]
    # largest: (5,5,8,8) vs gt (5,5,7,7): 9 / 16; multi: the same, the line misses.
    assert res.largest_iou[0] == pytest.approx(9 / 16)
    assert res.multi_iou[0] == pytest.approx(9 / 16)


@BOTH
def test_multi_contour_takes_the_best_box(fn):
    s = np.zeros((20, 20))
    s[1:9, 1:9] = 1.0  # big blob, far from gt
    s[14:17, 14:17] = 0.8  # small blob, on the gt
    res = fn(s, np.array([0.5, 0.85]), [[14, 14, 17, 17]])
    # t=0.5 (level 127): both blobs; largest is the big one (IoU 0).
    assert res.largest_boxes[0].tolist() == [1, 1, 9, 9]
    assert res.largest_iou[0] == 0.0
    assert res.multi_iou[0] == 1.0
    # t=0.85 (level 216 >= 204): only the big blob remains.
    assert res.multi_iou[1] == 0.0


@BOTH
def test_hole_contours_count_in_multi_mode(fn):
    s = np.ones((11, 11))
    s[4:7, 4:7] = 0.0  # a 3x3 hole inside a full square
    res = fn(s, np.array([0.5]), [[3, 3, 8, 8]])
    # Outer contour: the image border -> (0, 0, 10, 10); 36 / 121.
    assert res.largest_boxes.tolist() == [[0, 0, 10, 10]]
    assert res.largest_iou[0] == pytest.approx(36 / 121)
    # The hole's contour runs over the pixels around it: x 3..7 -> (3, 3, 8, 8).
    assert res.multi_iou[0] == 1.0


@BOTH
def test_best_over_several_ground_truth_boxes(fn):
    s = np.zeros((10, 10))
    s[0:4, 0:4] = 1.0
    res = fn(s, np.array([0.0]), [[6, 6, 9, 9], [0, 0, 3, 3]])
    # box (0, 0, 4, 4) vs (0, 0, 3, 3): 16 / 25.
    assert res.largest_iou[0] == pytest.approx(16 / 25)


def _same(a, b):
    return (np.array_equal(a.largest_boxes, b.largest_boxes)
            and np.array_equal(a.largest_iou, b.largest_iou)
            and np.array_equal(a.multi_iou, b.multi_iou))


@settings(max_examples=300, deadline=None)
# no subnormal thresholds: meaningless for maps in [0, 1], and a process that flushes them
# (torch.compile's CPU kernels do on torch 2.4) makes hypothesis refuse to draw them
@given(scoremaps(), st.lists(st.floats(0, 0.999, allow_subnormal=False), min_size=1, max_size=12))
def test_fast_equals_reference_on_random_maps(case, thresholds):
    s, gt = case
    t = np.array(thresholds)
    assert _same(box_ious(s, t, gt), box_ious_reference(s, t, gt))


def test_fast_equals_reference_on_smooth_maps():
    rng = np.random.default_rng(1)
    t = cam_thresholds(0.01)
    for i in range(12):
        small = rng.random((7, 7)).astype(np.float32)
        s = cv2.resize(small, (64, 48), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        gt = [[5, 5, 40, 30], [20, 10, 60, 45]]
        assert _same(box_ious(s, t, gt), box_ious_reference(s, t, gt)), i


@pytest.mark.parametrize("bad, err, msg", [
    (np.full((4, 4), np.nan), ValueError, "NaN"),
    (np.full((4, 4), 1.5), ValueError, r"\[0, 1\]"),
    (np.full((4, 4), -0.1), ValueError, r"\[0, 1\]"),
    (np.ones((4, 4), np.uint8), TypeError, "floating"),
    (np.ones((2, 4, 4)), ValueError, "2-D"),
    (np.ones((0, 4)), ValueError, "empty"),
    ([[0.5]], TypeError, "numpy array"),
])
def test_bad_maps_are_refused(bad, err, msg):
    with pytest.raises(err, match=msg):
        check_scoremap(bad)
    with pytest.raises(err, match=msg):
        box_ious(bad, np.array([0.5]), [[0, 0, 1, 1]])


def test_missing_ground_truth_is_refused():
    with pytest.raises(ValueError, match="ground-truth"):
        box_ious(np.zeros((4, 4)), np.array([0.5]), np.zeros((0, 4)))


def test_without_numba_box_ious_is_the_plain_loop(monkeypatch):
    from mnpo.metrics import _components, boxes

    rng = np.random.default_rng(5)
    scoremap = rng.random((30, 40))
    thresholds = boxes.cam_thresholds(0.05)
    fast = boxes.box_ious(scoremap, thresholds, [[3, 4, 20, 25]])
    monkeypatch.setattr(_components, "HAVE_NUMBA", False)
    slow = boxes.box_ious(scoremap, thresholds, [[3, 4, 20, 25]])
    assert np.array_equal(fast.largest_boxes, slow.largest_boxes)
    assert np.array_equal(fast.largest_iou, slow.largest_iou)
    assert np.array_equal(fast.multi_iou, slow.multi_iou)
