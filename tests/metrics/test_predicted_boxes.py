"""predicted_boxes: one map, one threshold; hand-made boxes, agreement with the IoU sweep, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from box_strategies import scoremaps

from mnpo.metrics.boxes import box_ious_reference, predicted_boxes


def _iou(a, b):
    """Inclusive-pixel IoU of two boxes, written out plainly."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, iw) * max(0, ih)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def test_single_block():
    s = np.zeros((10, 10))
    s[2:5, 3:7] = 1.0  # rows 2-4, cols 3-6
    boxes = predicted_boxes(s, 0.5)
    # boundingRect x=3, w=4 -> x1 = 7; y=2, h=3 -> y1 = 5.
    assert boxes.dtype == np.int64 and boxes.shape == (1, 4)
    assert boxes.tolist() == [[3, 2, 7, 5]]


def test_box_is_clipped_at_the_right_and_bottom_edges():
    s = np.zeros((6, 8), np.float32)
    s[3:, 5:] = 0.7  # x 5..7 (w 3 -> 8, clipped to 7), y 3..5 (h 3 -> 6, clipped to 5)
    assert predicted_boxes(s, 0.0).tolist() == [[5, 3, 7, 5]]


def test_level_is_strictly_greater_than_int_t_times_max():
    s = np.zeros((10, 20))
    s[1:4, 1:4] = 0.5    # uint8 127
    s[5:9, 10:18] = 1.0  # uint8 255, the larger blob
    s[1:3, 10:12] = 0.49  # uint8 124
    # t = 0.5: level int(127.5) = 127; 127 is not above it -> only the 255 blob.
    assert predicted_boxes(s, 0.5, multi=True).tolist() == [[10, 5, 18, 9]]
    # t = 0.49: level int(124.95) = 124; the 127 blob is in, the 124 one is not.
    assert sorted(predicted_boxes(s, 0.49, multi=True).tolist()) == [[1, 1, 4, 4], [10, 5, 18, 9]]
    # t = 0.48: level int(122.4) = 122; all three.
    assert len(predicted_boxes(s, 0.48, multi=True)) == 3
    # Largest mode keeps the 4 x 8 blob (polygon area 3 * 7 = 21) at every level.
    assert predicted_boxes(s, 0.48).tolist() == [[10, 5, 18, 9]]


def test_largest_is_by_polygon_area_and_multi_keeps_all():
    s = np.zeros((12, 12))
    s[1, 0:11] = 1.0   # a line: big box, contour area 0
    s[5:8, 5:8] = 1.0  # a 3x3 square: contour area 4
    assert predicted_boxes(s, 0.5).tolist() == [[5, 5, 8, 8]]
    # The line: x 0, w 11 -> 11; y 1, h 1 -> 2.
    assert sorted(predicted_boxes(s, 0.5, multi=True).tolist()) == [[0, 1, 11, 2], [5, 5, 8, 8]]


def test_hole_contours_are_boxes_in_multi_mode():
    s = np.ones((11, 11))
    s[4:7, 4:7] = 0.0
    assert predicted_boxes(s, 0.5).tolist() == [[0, 0, 10, 10]]
    assert sorted(predicted_boxes(s, 0.5, multi=True).tolist()) == [[0, 0, 10, 10], [3, 3, 8, 8]]


def test_no_contour_gives_no_box():
    assert predicted_boxes(np.zeros((7, 9)), 0.2).shape == (0, 4)
    assert predicted_boxes(np.zeros((7, 9)), 0.0, multi=True).shape == (0, 4)
    # At t = 1 the level is the maximum itself: nothing is strictly above it.
    s = np.zeros((5, 5))
    s[1:3, 1:3] = 1.0
    assert predicted_boxes(s, 1.0).shape == (0, 4)


def test_constant_positive_map_boxes_the_whole_image():
    assert predicted_boxes(np.full((5, 6), 0.4), 0.3).tolist() == [[0, 0, 5, 4]]


@st.composite
def cases(draw):
    s, (gt,) = draw(scoremaps())
    # no subnormal thresholds: meaningless for maps in [0, 1], and a process that flushes them
    # (torch.compile's CPU kernels do on torch 2.4) makes hypothesis refuse to draw them
    return s, gt, draw(st.floats(0, 0.999, allow_subnormal=False))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_agrees_with_the_reference_sweep(case):
    s, gt, t = case
    ref = box_ious_reference(s, np.array([t]), [gt])
    largest = predicted_boxes(s, t)
    multi = predicted_boxes(s, t, multi=True)
    if len(largest) == 0:
        # The reference scores the box (0, 0, 0, 0) when there is no contour.
        assert len(multi) == 0
        assert ref.largest_boxes[0].tolist() == [0, 0, 0, 0]
        assert ref.largest_iou[0] == pytest.approx(_iou([0, 0, 0, 0], gt))
        return
    assert largest.tolist() == [ref.largest_boxes[0].tolist()]
    assert _iou(largest[0], gt) == pytest.approx(ref.largest_iou[0])
    assert max(_iou(b, gt) for b in multi) == pytest.approx(ref.multi_iou[0])
    assert largest[0].tolist() in multi.tolist()


def test_agrees_with_the_reference_on_smooth_maps():
    import cv2

    rng = np.random.default_rng(3)
    gt = [12, 8, 50, 40]
    for i in range(10):
        small = rng.random((6, 6)).astype(np.float32)
        s = cv2.resize(small, (64, 48), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        thresholds = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
        ref = box_ious_reference(s, thresholds, [gt])
        for j, t in enumerate(thresholds):
            box = predicted_boxes(s, float(t))
            assert box.tolist() == [ref.largest_boxes[j].tolist()], (i, t)
            assert _iou(box[0], gt) == pytest.approx(ref.largest_iou[j])


@pytest.mark.parametrize("bad, err, msg", [
    (np.full((4, 4), np.nan), ValueError, "NaN"),
    (np.full((4, 4), 1.5), ValueError, r"\[0, 1\]"),
    (np.full((4, 4), -0.1), ValueError, r"\[0, 1\]"),
    (np.ones((2, 4, 4)), ValueError, "2-D"),
    (np.ones(4), ValueError, "2-D"),
    (np.ones((4, 4), np.uint8), TypeError, "floating"),
    ([[0.5]], TypeError, "numpy array"),
])
def test_bad_maps_are_refused(bad, err, msg):
    with pytest.raises(err, match=msg):
        predicted_boxes(bad, 0.5)


@pytest.mark.parametrize("t", [-0.1, 1.01, float("nan"), True, "0.5", None])
def test_bad_thresholds_are_refused(t):
    with pytest.raises(ValueError, match="threshold must be a number in"):
        predicted_boxes(np.zeros((4, 4)), t)
