"""Heat-map overlays and galleries: pixel colours by hand, box outlines, sizes, atomic writes."""

import numpy as np
import pytest
from PIL import Image

from mnpo.engine.overlay import caption_height, heatmap_overlay, save_gallery

GREEN = (0, 255, 0)
RED = (255, 0, 0)
# OpenCV's jet in RGB: 0 -> dark blue, 255 -> dark red.
JET_0 = (0, 0, 128)
JET_1 = (128, 0, 0)


def _half_map():
    """(10, 20) map: columns 0-9 are 0, columns 10-19 are 1."""
    s = np.zeros((10, 20), np.float32)
    s[:, 10:] = 1.0
    return s


def _pixels(image):
    return np.asarray(image)


def test_output_is_rgb_of_the_image_size_and_input_untouched():
    image = Image.new("RGB", (40, 20), (100, 100, 100))
    out = heatmap_overlay(image, _half_map())
    assert out.mode == "RGB" and out.size == (40, 20)
    assert (_pixels(image) == 100).all()


@pytest.mark.parametrize("alpha, where0, where1", [
    (1.0, JET_0, JET_1),
    # 0.5 * 100 + 0.5 * (0, 0, 128) = (50, 50, 114); 0.5 * 100 + 0.5 * (128, 0, 0) = (114, 50, 50)
    (0.5, (50, 50, 114), (114, 50, 50)),
    (0.0, (100, 100, 100), (100, 100, 100)),
])
def test_colours_where_the_map_is_0_and_1(alpha, where0, where1):
    image = Image.new("RGB", (40, 20), (100, 100, 100))
    px = _pixels(heatmap_overlay(image, _half_map(), alpha=alpha))
    # The (10, 20) map is stretched 2x to (20, 40): far from the step it stays 0 or 1.
    assert (px[:, :15] == where0).all()
    assert (px[:, 25:] == where1).all()


def test_map_is_resized_bilinearly():
    import cv2

    image = Image.new("RGB", (4, 1), (0, 0, 0))
    px = _pixels(heatmap_overlay(image, np.array([[0.0, 1.0]]), alpha=1.0))
    # Half-pixel centres: output x samples input (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped at the ends: values 0, 0.25, 0.75, 1 -> uint8 0, 63, 191, 255.
    jet = cv2.applyColorMap(np.array([[0, 63, 191, 255]], np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    assert np.array_equal(px, jet)


def _outline(shape, box):
    """The expected 2 px outline inside the inclusive box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    mask[y0 + 2:y1 - 1, x0 + 2:x1 - 1] = False
    return mask


def test_boxes_are_2px_outlines_green_over_red():
    image = Image.new("RGB", (20, 20), (0, 0, 0))
    out = heatmap_overlay(image, np.zeros((20, 20)), boxes=[[2, 3, 10, 12]], gt_boxes=[[8, 1, 15, 6]], alpha=0.0)
    px = _pixels(out)
    green = (px == GREEN).all(-1)
    red = (px == RED).all(-1)
    assert np.array_equal(green, _outline((20, 20), (2, 3, 10, 12)))
    # The red outline shows wherever the green one is not drawn over it.
    assert np.array_equal(red, _outline((20, 20), (8, 1, 15, 6)) & ~green)
    assert (px[~(green | red)] == 0).all()


def test_boxes_accept_one_flat_box_and_are_clipped_to_the_image():
    image = Image.new("RGB", (10, 8), (0, 0, 0))
    out = heatmap_overlay(image, np.zeros((4, 4)), boxes=(-5, -5, 4, 3), alpha=0.0)
    green = (_pixels(out) == GREEN).all(-1)
    assert np.array_equal(green, _outline((8, 10), (0, 0, 4, 3)))


@pytest.mark.parametrize("boxes, msg", [
    ([[5, 5, 2, 8]], r"\[0\].*x0 <= x1"),
    ([[0, 0, 1, 1], [30, 0, 40, 5]], r"\[1\].*outside the 20x10 image"),
    ([[0, 0, 1]], r"shape \(k, 4\)"),
    ([[0, 0, float("nan"), 1]], "finite"),
    ([["a", 0, 1, 1]], "numbers"),
])
def test_bad_boxes_are_refused(boxes, msg):
    image = Image.new("RGB", (20, 10))
    with pytest.raises(ValueError, match=r"^boxes\b.*" + msg):
        heatmap_overlay(image, np.zeros((10, 20)), boxes=boxes)
    with pytest.raises(ValueError, match=r"^gt_boxes\b.*" + msg):
        heatmap_overlay(image, np.zeros((10, 20)), gt_boxes=boxes)


def test_bad_inputs_are_refused():
    rgb = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="mode 'L'"):
        heatmap_overlay(Image.new("L", (8, 8)), np.zeros((8, 8)))
    with pytest.raises(TypeError, match="PIL image"):
        heatmap_overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        heatmap_overlay(rgb, np.full((8, 8), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        heatmap_overlay(rgb, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(rgb, np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(rgb, np.zeros((8, 8)), alpha=1.5)


def _tile(color, size=(32, 32)):
    return Image.new("RGB", size, color)


def test_gallery_grid_size_and_tile_placement(tmp_path):
    tiles = [_tile((200, 0, 0)), _tile((0, 0, 200), (4, 4)), _tile((0, 200, 0), (64, 32)),
             _tile((9, 9, 9)), Image.new("L", (16, 16), 77)]
    path = save_gallery(tiles, tmp_path / "g.png", columns=2, tile_size=32)
    assert path == tmp_path / "g.png"
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.size == (2 * 32, 3 * 32)
        px = np.asarray(grid.convert("RGB"))
    assert (px[0:32, 0:32] == (200, 0, 0)).all()
    assert (px[0:32, 32:64] == (0, 0, 200)).all()   # a 4x4 tile scaled up to fill its cell
    # A 64x32 tile fits as 32x16, centred: rows 8-23 of its cell, background above and below.
    assert (px[32 + 8:32 + 24, 0:32] == (0, 200, 0)).all()
    assert not (px[32:32 + 8, 0:32] == (0, 200, 0)).all(-1).any()
    assert (px[64:96, 0:32] == 77).all()            # a grayscale tile, as RGB
    assert (px[64:96, 32:64] == px[32, 0]).all()     # the empty cell is background


def test_gallery_with_captions(tmp_path):
    band = caption_height()
    assert band > 0
    path = save_gallery([_tile((1, 2, 3))] * 3, tmp_path / "c.png", columns=4, tile_size=40,
                        captions=["cat 0.91", "", "a long caption that cannot fit in forty pixels"])
    with Image.open(path) as grid:
        assert grid.size == (3 * 40, 40 + band)
        px = np.asarray(grid)
    background = px[40 + band - 1, 40]
    caption1, caption2 = px[40:, 0:40], px[40:, 40:80]
    assert (caption1 != background).any(-1).any()   # text drawn
    assert (caption2 == background).all()           # empty caption: nothing drawn


def test_gallery_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no tiles"):
        save_gallery([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 captions for 1 tiles"):
        save_gallery([_tile(0)], tmp_path / "x.png", captions=["a", "b"])
    with pytest.raises(TypeError, match="tile 1"):
        save_gallery([_tile(0), "not an image"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="columns"):
        save_gallery([_tile(0)], tmp_path / "x.png", columns=0)
    with pytest.raises(ValueError, match="tile_size"):
        save_gallery([_tile(0)], tmp_path / "x.png", tile_size=2.5)
    assert list(tmp_path.iterdir()) == []


def test_gallery_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out" / "g.png"
    save_gallery([_tile((5, 5, 5))], path)
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]
    before = path.read_bytes()

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_gallery([_tile((250, 5, 5))], path)
    # The old file is intact and no temporary file is left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]
    assert path.read_bytes() == before
