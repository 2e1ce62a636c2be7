"""Decoding at any bit depth: 8-bit RGB images (``load_image``) and masks (``read_mask``).

Expected values are derived by hand from the documented scalings (16-bit: ``round(v / 257)``);
8-bit modes against PIL's ``convert("RGB")``, which is what wsolevaluation reads, and against
hand-computed pixels where PIL's conversion has a closed form."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from mnpo.data.decode import MaskReadError, read_mask
from mnpo.data.make_metadata import _mask_problem
from mnpo.data.transforms import ImageReadError, load_image
from mnpo.metrics.masks import read_mask_file

# 16-bit samples and their 8-bit values: v >> 8 (PIL's high byte) would give 255, 0, 0, 255, 117
SIXTEEN = np.array([65535, 128, 129, 65280, 30000], np.uint16)
EIGHT = np.array([255, 0, 1, 254, 117], np.uint8)


def _write_cv2(path, array):
    assert cv2.imwrite(str(path), array)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, suffix):
    path = _write_cv2(tmp_path / f"grey16{suffix}", np.tile(SIXTEEN, (3, 1)))
    with Image.open(path) as raw:
        assert raw.mode == "I;16" and raw.convert("RGB").getpixel((4, 0)) == (255, 255, 255)  # the bug
    out = np.asarray(load_image(path))
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.broadcast_to(EIGHT[None, :, None], (3, 5, 3)))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True])
def test_16_bit_colour_keeps_its_low_bytes_and_channel_order(tmp_path, suffix, alpha):
    rgb = np.stack([SIXTEEN, SIXTEEN[::-1], np.full(5, 257, np.uint16)], axis=1)[None]  # (1, 5, 3)
    stored = np.concatenate([rgb, np.full((1, 5, 1), 1000, np.uint16)], axis=2) if alpha else rgb
    path = _write_cv2(tmp_path / f"rgb16{suffix}", np.ascontiguousarray(stored[:, :, [2, 1, 0, 3][: stored.shape[2]]]))
    out = np.asarray(load_image(path))
    expected = np.stack([EIGHT, EIGHT[::-1], np.full(5, 1, np.uint8)], axis=1)[None]
    assert np.array_equal(out, expected)


def test_32_bit_integer_and_float_images(tmp_path):
    signed = np.array([[2147483647, -5, 1073741824, 0]], np.int32)  # 2**30 * 255 / (2**31 - 1) = 127.50000006
    Image.fromarray(signed).save(tmp_path / "i32.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 0], [255, 0, 128, 0])
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)  # in [0, 1]: round(255 v), half to even
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "unit.tif"))[0, :, 0], [0, 64, 128, 255])
    wide = np.array([[-1.0, 1.0, 3.0, 0.0]], np.float32)  # outside [0, 1]: stretched from -1..3
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "wide.tif"))[0, :, 0], [0, 128, 255, 64])
    Image.fromarray(np.full((2, 2), 7.5, np.float32)).save(tmp_path / "flat.tif")
    assert not np.asarray(load_image(tmp_path / "flat.tif")).any()
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="nan.tif.*NaN"):
        load_image(tmp_path / "nan.tif")


def test_8_bit_modes_are_pil_convert_rgb_exactly(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    cmyk = Image.fromarray(rng.integers(0, 256, (6, 7, 4), dtype=np.uint8), "CMYK")
    cases = {
        "grey.png": rgb.convert("L"), "grey.jpg": rgb.convert("L"), "cmyk.jpg": cmyk, "cmyk.tif": cmyk,
        "la.png": rgb.convert("LA"), "rgba.png": rgb.convert("RGBA"), "bilevel.png": rgb.convert("1"),
        "palette.png": rgb.convert("P"), "palette.gif": rgb.convert("P"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as stored:
            expected = np.asarray(stored.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(tmp_path / name)), expected), name
    # closed forms: PIL's CMYK -> RGB is 255 - C (M, Y) times (255 - K) / 255; LA drops alpha
    Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK").save(tmp_path / "c.tif")
    assert np.asarray(load_image(tmp_path / "c.tif")).tolist() == [[[0, 255, 255], [255, 255, 255], [0, 0, 0]]]
    Image.fromarray(np.array([[[77, 0]]], np.uint8), "LA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png")).tolist() == [[[77, 77, 77]]]


def test_palette_with_transparency_gives_its_colours(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * 759)
    image.putdata([0, 1, 2])
    image.save(tmp_path / "p.png", transparency=1)
    with Image.open(tmp_path / "p.png") as stored:
        assert "transparency" in stored.info
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 0, 0], [10, 20, 30], [200, 100, 50]]]


def test_a_png_named_jpeg_is_read_by_its_content(tmp_path):
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    Image.fromarray(pixels).save(tmp_path / "n01440764_1.JPEG", format="PNG")
    assert np.array_equal(np.asarray(load_image(tmp_path / "n01440764_1.JPEG")), pixels)


def test_16_bit_bmp_is_8_bits_a_sample(tmp_path):
    """A 5-6-5 BMP's raw mode says ";16" per pixel, not per sample: PIL decodes it."""
    header = bytearray(b"BM" + (70 + 8).to_bytes(4, "little") + bytes(4) + (70).to_bytes(4, "little"))
    info = (56).to_bytes(4, "little") + (2).to_bytes(4, "little") + (1).to_bytes(4, "little", signed=True)
    info += (1).to_bytes(2, "little") + (16).to_bytes(2, "little") + (3).to_bytes(4, "little") + (4).to_bytes(4, "little")
    info += bytes(16) + (0xF800).to_bytes(4, "little") + (0x07E0).to_bytes(4, "little") + (0x001F).to_bytes(4, "little") + bytes(4)
    data = bytes(header) + info + (0xF800).to_bytes(2, "little") + (0x001F).to_bytes(2, "little")
    (tmp_path / "565.bmp").write_bytes(data)
    with Image.open(io.BytesIO(data)) as stored:
        expected = np.asarray(stored.convert("RGB"))
    assert expected.tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert np.array_equal(np.asarray(load_image(tmp_path / "565.bmp")), expected)


# masks
def test_masks_are_their_non_zero_pixels_at_any_depth(tmp_path):
    grey16 = np.zeros((2, 3), np.uint16); grey16[0, 1] = 1  # OpenCV's grey reading makes this empty
    assert read_mask(_write_cv2(tmp_path / "m16.png", grey16)).tolist() == [[False, True, False], [False] * 3]
    assert not cv2.imread(str(tmp_path / "m16.png"), cv2.IMREAD_GRAYSCALE).any()
    rgb16 = np.zeros((1, 2, 3), np.uint16); rgb16[0, 1, 0] = 3
    assert read_mask(_write_cv2(tmp_path / "c16.png", rgb16)).tolist() == [[False, True]]
    dark = np.zeros((1, 3, 3), np.uint8); dark[0, 1] = (0, 0, 1); dark[0, 2] = (9, 9, 9)
    assert read_mask(_write_cv2(tmp_path / "dark.png", dark)).tolist() == [[False, True, True]]
    alpha = np.zeros((1, 2, 4), np.uint8); alpha[0, :, 3] = 255; alpha[0, 1, 1] = 5
    assert read_mask(_write_cv2(tmp_path / "alpha.png", alpha)).tolist() == [[False, True]]  # alpha ignored
    palette = Image.new("P", (2, 1)); palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putdata([1, 0]); palette.save(tmp_path / "p.png")  # index 1 is white: object; index 0 black
    assert read_mask(tmp_path / "p.png").tolist() == [[True, False]]


def test_8_bit_grey_masks_equal_wsolevaluations_reading(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 3, (9, 13), dtype=np.uint8) * rng.integers(0, 256, (9, 13), dtype=np.uint8)
    path = _write_cv2(tmp_path / "g.png", grey)
    for size in (224, 5):
        theirs = cv2.resize(np.float32(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)), (size, size),
                            interpolation=cv2.INTER_NEAREST) > 0.5
        assert np.array_equal(read_mask_file(path, size), theirs)


def test_metadata_checks_masks_with_the_scoring_reader(tmp_path):
    one = np.zeros((4, 6), np.uint16); one[1, 1] = 1
    _write_cv2(tmp_path / "one.png", one)
    _write_cv2(tmp_path / "zero.png", np.zeros((4, 6), np.uint16))
    assert _mask_problem(tmp_path, ("one.png", ""), (6, 4)) is None
    assert _mask_problem(tmp_path, ("zero.png", ""), (6, 4)) == f"{tmp_path / 'zero.png'}: no object pixel (every pixel is 0)"
    assert _mask_problem(tmp_path, ("one.png", ""), (4, 6)) == f"{tmp_path / 'one.png'}: 6x4, but its image is 4x6"
    assert read_mask_file(tmp_path / "one.png", 4).any()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    problem = _mask_problem(tmp_path, ("one.png", "bad.png"), (6, 4))
    assert problem.startswith(f"{tmp_path / 'bad.png'}: cannot be read (")
    with pytest.raises(MaskReadError, match="bad.png: cannot read mask"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(MaskReadError, match="nope.png: cannot read mask: file not found"):
        read_mask(tmp_path / "nope.png")


def test_an_empty_file_and_a_missing_file_are_named(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty.jpg: cannot read image: empty file \(0 bytes\)$"):
        load_image(empty)
    with pytest.raises(ImageReadError, match=r"missing.png: cannot read image: file not found$"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MaskReadError, match=r"empty.jpg.*empty file \(0 bytes\)"):
        read_mask(empty)
    text = tmp_path / "notes.png"
    text.write_text("not pixels")
    with pytest.raises(ImageReadError, match="notes.png: cannot read image: not an image format PIL can read$"):
        load_image(text)
