"""Ground-truth masks for PxAP: binarization, resizing, ignore regions, bad files."""

import cv2
import numpy as np
import pytest

from mnpo.metrics.masks import IGNORE, load_gt_mask, read_mask_file


def _png(path, array):
    assert cv2.imwrite(str(path), array)
    return path.name


def test_instances_are_merged_and_ignore_excludes_the_foreground(tmp_path):
    a = np.zeros((8, 8), np.uint8); a[0:2, 0:2] = 255
    b = np.zeros((8, 8), np.uint8); b[6:8, 6:8] = 1  # any non-zero grey counts
    ig = np.zeros((8, 8), np.uint8); ig[0:4, 0:4] = 255
    mask = load_gt_mask(tmp_path, [_png(tmp_path / "a.png", a), _png(tmp_path / "b.png", b)],
                        _png(tmp_path / "i.png", ig), size=8)
    expected = np.zeros((8, 8), np.uint8)
    expected[0:4, 0:4] = IGNORE
    expected[0:2, 0:2] = 1
    expected[6:8, 6:8] = 1
    assert np.array_equal(mask, expected)
    assert np.array_equal(load_gt_mask(tmp_path, ["a.png"], "", size=8) == 1, a > 0)


def test_resize_is_nearest_neighbour(tmp_path):
    m = np.zeros((4, 4), np.uint8); m[0, 0] = 200
    out = read_mask_file(tmp_path / _png(tmp_path / "m.png", m), size=8)
    assert out.sum() == 4 and out[:2, :2].all()


def test_bad_mask_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_gt_mask(tmp_path, ["nope.png"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        load_gt_mask(tmp_path, ["text.png"])
    with pytest.raises(ValueError, match="at least one"):
        load_gt_mask(tmp_path, [])
