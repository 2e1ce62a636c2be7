"""Tests of image decoding and the protocol transforms (mnpo.data.transforms)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from numerics import unit_roundoff
from PIL import Image, ImageFile

from mnpo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    load_image,
    localization_transform,
    normalize_batch,
    normalize_image,
    ten_crop,
    train_transform,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


#: Both sides compute ``(v / 255 - mean) / std`` of the same uint8 pixels in float32, each in
#: at most 4 roundings (division, subtraction, division, float32 constants) of values up to
#: (1 - 0.406) / 0.225 = 2.64: they differ by at most 8 u |value| (tests/numerics.py).
PIXEL_ATOL = 8 * unit_roundoff(torch.float32) * 2.64


def _expected_normalized(image: Image.Image) -> torch.Tensor:
    """Independent reference: uint8 HWC -> (v / 255 - mean) / std, CHW float32."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - MEAN) / STD


# --------------------------------------------------------------------------- #
# load_image
# --------------------------------------------------------------------------- #
def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_load_image_returns_decoded_rgb(tmp_path, mode):
    image = _noise_image(40, 30).convert(mode)
    path = tmp_path / f"x_{mode}.png"
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


# EXIF orientation -> what makes the stored pixels (H, W, 3) upright (the EXIF / TIFF 6.0 definitions)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                        # mirrored left-right
    3: lambda a: a[::-1, ::-1],                     # turned 180 degrees
    4: lambda a: a[::-1, :],                        # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),              # mirrored about the main diagonal
    6: lambda a: np.rot90(a, k=-1),                 # stored turned 90 ccw: turn it 90 cw
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored about the anti-diagonal
    8: lambda a: np.rot90(a, k=1),                  # stored turned 90 cw: turn it 90 ccw
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_load_image_applies_the_exif_orientation_only_when_asked(tmp_path, orientation):
    image = _noise_image(40, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "tagged.png"
    image.save(path, exif=exif)
    stored = np.asarray(image)
    assert np.array_equal(np.asarray(load_image(path)), stored)  # default: the stored grid
    upright = load_image(path, exif_orientation=True)
    assert np.array_equal(np.asarray(upright), UPRIGHT[orientation](stored))
    assert upright.info["exif_orientation"] == orientation
    assert load_image(path).info.get("exif_orientation") is None


def _bad_files() -> dict[str, bytes | None]:
    big = _noise_image(256, 256, seed=3)
    png = _encoded(big, "PNG")
    jpeg = _encoded(big, "JPEG", quality=90)
    return {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"this is not an image, only text renamed to .jpg\n",
        "empty.png": b"",
        "missing.jpg": None,
    }


@pytest.mark.parametrize("name", sorted(_bad_files()))
def test_load_image_rejects_bad_files_naming_them(tmp_path, name):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated files cannot be detected with this PIL setting"
    data = _bad_files()[name]
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: cannot read image: ")
    assert isinstance(err.value, OSError)
    assert err.value.__cause__ is not None
    back = pickle.loads(pickle.dumps(err.value))
    assert str(back) == str(err.value)


def test_truncated_files_open_lazily_but_fail_in_load_image(tmp_path):
    """Image.open alone accepts a truncated JPEG; only the full decode catches it."""
    path = tmp_path / "t.jpg"
    path.write_bytes(_bad_files()["truncated.jpg"])
    with Image.open(path) as lazy:
        assert lazy.size == (256, 256)
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(path)


# --------------------------------------------------------------------------- #
# Normalization and the localization view
# --------------------------------------------------------------------------- #
def test_constant_colour_maps_to_normalized_constants():
    image = Image.new("RGB", (123, 77), (255, 0, 128))
    out = localization_transform()(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert type(out) is torch.Tensor
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((224, 224), expected[c]), rtol=0, atol=PIXEL_ATOL)


def _naive_bilinear(pixels: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """float64 (out_h, out_w, C) from uint8 (H, W, C): the triangle filter ("bilinear" in
    Pillow's sense), its support widened by the scale when shrinking (anti-aliased), applied to
    rows then columns, each output pixel the normalized weighted sum over the input pixels
    whose centres fall within the support of its centre. Written from the definition."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        width = max(scale, 1.0)  # the filter's stretch: 1 when enlarging
        centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres, in input coordinates
        x = np.arange(n_in) + 0.5  # input pixel centres
        w = np.clip(1 - np.abs(x[None, :] - centres[:, None]) / width, 0, None)
        return w / w.sum(1, keepdims=True)  # (n_out, n_in)

    image = pixels.astype(np.float64)
    rows = np.einsum("ow,hwc->hoc", weights(image.shape[1], out_w), image)
    return np.einsum("oh,hwc->owc", weights(image.shape[0], out_h), rows)


@pytest.mark.parametrize("size", [(500, 300), (97, 413), (150, 150)])
def test_localization_transform_is_a_bilinear_resize_by_definition(size):
    """Against the triangle filter written out, not Pillow's own call: within one grey level,
    the two 8-bit roundings of a separable 8-bit resize (half a level each)."""
    image = _noise_image(*size, seed=2)
    out = localization_transform(224)(image)
    expected = torch.from_numpy(_naive_bilinear(np.asarray(image), 224, 224) / 255.0).permute(2, 0, 1)
    expected = ((expected - MEAN.double()) / STD.double()).float()
    level = 1 / 255 / STD.min().item()  # one grey level, normalized
    assert (out - expected).abs().max().item() <= level + PIXEL_ATOL


@pytest.mark.parametrize("size", [(500, 300), (224, 224), (97, 413)])
def test_localization_transform_is_bilinear_resize_then_normalize(size):
    image = _noise_image(*size, seed=1)
    out = localization_transform(224)(image)
    reference = _expected_normalized(image.resize((224, 224), Image.BILINEAR))
    assert out.shape == (3, 224, 224)
    assert torch.allclose(out, reference, rtol=0, atol=PIXEL_ATOL)


def test_localization_transform_other_size():
    assert localization_transform(64)(_noise_image(100, 50)).shape == (3, 64, 64)


def test_normalize_image_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        normalize_image(Image.new("L", (4, 4)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_sizes_are_validated(bad):
    with pytest.raises(ValueError):
        localization_transform(bad)
    with pytest.raises(ValueError):
        train_transform(crop=bad)
    with pytest.raises(ValueError):
        ten_crop(_noise_image(8, 8), resize=bad)


def test_crop_larger_than_resize_is_rejected():
    with pytest.raises(ValueError, match="larger"):
        train_transform(crop=300, resize=256)
    with pytest.raises(ValueError, match="larger"):
        ten_crop(_noise_image(8, 8), resize=200, crop=224)


# --------------------------------------------------------------------------- #
# Ten crop
# --------------------------------------------------------------------------- #
def test_ten_crop_windows_and_mirrors():
    image = _noise_image(300, 200, seed=2)
    crops = ten_crop(image)
    assert crops.shape == (10, 3, 224, 224) and crops.dtype == torch.float32
    full = _expected_normalized(image.resize((256, 256), Image.BILINEAR))
    windows = {
        0: full[:, :224, :224],      # top-left
        1: full[:, :224, 32:],       # top-right
        2: full[:, 32:, :224],       # bottom-left
        3: full[:, 32:, 32:],        # bottom-right
        4: full[:, 16:240, 16:240],  # centre
    }
    for k, window in windows.items():
        assert torch.allclose(crops[k], window, rtol=0, atol=PIXEL_ATOL), k
    # crops 5-9 are the five windows of the flipped image: mirrors of 1, 0, 3, 2, 4
    for k, mirror_of in zip(range(5, 10), (1, 0, 3, 2, 4)):
        assert torch.equal(crops[k], crops[mirror_of].flip(-1)), k
    assert not torch.equal(crops[5], crops[0].flip(-1))  # the order matters on a noisy image


def test_ten_crop_custom_sizes():
    assert ten_crop(_noise_image(50, 60), resize=40, crop=32).shape == (10, 3, 32, 32)


# --------------------------------------------------------------------------- #
# Training transform
# --------------------------------------------------------------------------- #
def _find_window(out: torch.Tensor, full: torch.Tensor, crop: int) -> tuple[int, int, bool] | None:
    size = full.shape[-1]
    for flipped, candidate in ((False, out), (True, out.flip(-1))):
        for i in range(size - crop + 1):
            for j in range(size - crop + 1):
                if torch.equal(candidate, full[:, i:i + crop, j:j + crop]):
                    return i, j, flipped
    return None


def test_train_transform_is_a_random_uint8_window_of_the_resized_image_maybe_mirrored():
    image = _noise_image(120, 90, seed=4)
    transform = train_transform(crop=24, resize=32)
    full = torch.from_numpy(np.array(image.resize((32, 32), Image.BILINEAR))).permute(2, 0, 1)
    seen = set()
    for k in range(30):
        out = transform(image, torch.Generator().manual_seed(k))
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8 and type(out) is torch.Tensor
        found = _find_window(out, full, 24)
        assert found is not None, "output is not a (mirrored) window of the resized image"
        seen.add(found)
    assert len(seen) > 5  # the offset is random
    assert {f[2] for f in seen} == {False, True}  # and so is the flip
    # normalized on the device, it is the float pipeline's view of the same window
    i, j, flipped = found
    reference = _expected_normalized(image.resize((32, 32), Image.BILINEAR))[:, i:i + 24, j:j + 24]
    assert torch.allclose(normalize_batch(out), reference.flip(-1) if flipped else reference, rtol=0, atol=PIXEL_ATOL)


def _torchvision_pipeline(crop: int, resize: int, random_resized: bool):
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(crop)] if random_resized else [v2.Resize((resize, resize)), v2.RandomCrop(crop)]
    return v2.Compose(steps + [v2.RandomHorizontalFlip(), v2.PILToTensor()])


@pytest.mark.parametrize("random_resized", [False, True])
def test_train_transform_draws_what_torchvision_draws_but_from_its_own_generator(random_resized):
    """torchvision's v2 pipeline is the oracle: seeded alike (its global generator, our per-image
    generator), the pixels are equal, on shapes that take every branch of RandomResizedCrop
    (a 5:1 panorama falls back to the central crop more often than not) and RandomCrop's
    no-room case (crop == resize)."""
    rng = np.random.default_rng(7)
    crop, resize = (24, 32) if not random_resized else (40, 1)
    shapes = [(int(rng.integers(20, 300)), int(rng.integers(20, 300))) for _ in range(40)]
    shapes += [(500, 100), (100, 500), (40, 40)]
    ours = train_transform(crop, resize, random_resized=random_resized)
    reference = _torchvision_pipeline(crop, resize, random_resized)
    for k, (w, h) in enumerate(shapes):
        image = _noise_image(w, h, seed=k)
        torch.manual_seed(k)
        expected = reference(image)
        torch.manual_seed(12345)  # ours must not read the global generator
        out = ours(image, torch.Generator().manual_seed(k))
        assert torch.equal(out, expected), (w, h)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(12345).get_state())  # nor advance it
    same = train_transform(24, 24)  # no room to move: only the flip is drawn
    image = _noise_image(30, 30)
    torch.manual_seed(3)
    assert torch.equal(same(image, torch.Generator().manual_seed(3)), _torchvision_pipeline(24, 24, False)(image))


def test_train_transform_without_generator_uses_the_global_one():
    image = _noise_image(333, 222, seed=5)
    transform = train_transform()
    torch.manual_seed(1)
    a = transform(image)
    torch.manual_seed(1)
    b = transform(image)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    assert torch.equal(a, transform(image, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        transform(image.convert("L"))


def test_load_truncated_images_setting_is_reported(tmp_path, monkeypatch, caplog):
    """With PIL told to accept truncated files nothing can be detected: say so in the log."""
    from mnpo.data import transforms

    path = tmp_path / "ok.png"
    _noise_image(8, 8).save(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(transforms, "_warned_truncated", False)
    with caplog.at_level("WARNING", logger="mnpo.data.transforms"):
        load_image(path)
        load_image(path)
    assert [r.message for r in caplog.records].count(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images will load "
        "with missing pixels instead of raising ImageReadError") == 1


# --- uint8 views, normalized and cropped batch-wise on the device --------------------------

@pytest.mark.parametrize("size, crop, resize", [((500, 375), 224, 256), ((97, 211), 224, 256), ((64, 64), 48, 55)])
def test_uint8_views_then_batch_ops_equal_the_float_transforms_exactly(size, crop, resize):
    import numpy as np
    from PIL import Image

    from mnpo.data.transforms import (
        localization_transform, normalize_batch, ten_crop, ten_crop_batch, uint8_views)

    rng = np.random.default_rng(size[0])
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    views, sources = zip(*(uint8_views(im, crop, resize) for im in images))
    assert views[0].dtype == torch.uint8 and views[0].shape == (3, crop, crop)
    assert sources[0].shape == (3, resize, resize)
    batch_views = normalize_batch(torch.stack(views))
    batch_crops = ten_crop_batch(normalize_batch(torch.stack(sources)), crop)
    assert batch_crops.shape == (3, 10, 3, crop, crop)
    for i, image in enumerate(images):
        assert torch.equal(batch_views[i], localization_transform(crop)(image))
        assert torch.equal(batch_crops[i], ten_crop(image, resize, crop))


def test_uint8_view_helpers_reject_bad_input():
    from PIL import Image

    from mnpo.data.transforms import normalize_batch, ten_crop_batch, uint8_views

    with pytest.raises(ValueError, match="crop 300 is larger than the resized image 256"):
        uint8_views(Image.new("RGB", (10, 10)), 300, 256)
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        uint8_views(Image.new("L", (10, 10)))
    with pytest.raises(ValueError, match="expected uint8 images"):
        normalize_batch(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"R >= 224"):
        ten_crop_batch(torch.zeros(1, 3, 200, 200))


# JPEG draft: decode a training image at the resolution its view needs (data.jpeg_draft) --------
def test_draft_scale_is_the_largest_that_only_shrinks():
    from mnpo.data.transforms import draft_scale

    assert draft_scale(1000, 800, 224) == 2  # 800 >= 2 * 224, < 4 * 224
    assert draft_scale(448, 448, 224) == 2 and draft_scale(447, 900, 224) == 1
    assert draft_scale(2000, 1800, 224) == 8 and draft_scale(9000, 9000, 224) == 8  # libjpeg's last
    assert draft_scale(1800, 1100, 256) == 4  # 1100 >= 4 * 256, < 8 * 256


def _gradient_jpeg(path, width=1601, height=1203):
    """Smooth and different along x and y (a view from the wrong place, or transposed, is far off)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width * 200 + 20, y / height * 200 + 30,
                       128 + 40 * np.sin(x / 150.0) * np.cos(y / 170.0)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_load_image_draft_decodes_a_jpeg_at_that_scale_and_nothing_else(tmp_path):
    jpeg = _gradient_jpeg(tmp_path / "g.jpg")
    for scale, size in ((2, (801, 602)), (4, (401, 301)), (8, (201, 151))):  # ceil(W / s) x ceil(H / s)
        assert load_image(jpeg, draft_scale=scale).size == size
    Image.open(jpeg).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", draft_scale=4).size == (1601, 1203)  # not a JPEG: every pixel
    with pytest.raises(ValueError, match="draft_scale must be one of"):
        load_image(jpeg, draft_scale=3)


@pytest.mark.parametrize("random_resized", [True, False])
def test_draft_gives_the_default_pixels_where_no_scale_applies(tmp_path, random_resized):
    """Small JPEGs (every window under twice the output), a large PNG (no DCT to scale): the same
    pixels and the same draws as decoding everything, so the next draw agrees too."""
    rng = np.random.default_rng(3)
    files = []
    for k, (w, h) in enumerate([(300, 200), (447, 500), (500, 375)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.jpg", quality=90)
        files.append(tmp_path / f"{k}.jpg")
    _noise_image(1300, 1100).save(tmp_path / "large.png")
    files.append(tmp_path / "large.png")
    plain = train_transform(224, 256, random_resized=random_resized)
    draft = train_transform(224, 256, random_resized=random_resized, draft=True)
    for path in files:
        for seed in range(12):
            g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert torch.equal(draft.from_file(path, g), plain(load_image(path), h)), (path.name, seed)
            assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=h))


@pytest.mark.parametrize("random_resized", [True, False])
def test_a_drafted_view_shows_the_same_place_as_the_full_decode(tmp_path, monkeypatch, random_resized):
    """A 1601 x 1203 JPEG whose windows get decoded at 1/2 to 1/8: each view against the view of the
    full decode. Measured on this smooth image: at most 3 levels apart, 0.2-0.3 on average (the
    DCT-domain scaling and full decode + antialiased resize are two low-pass filters; each side
    rounds its decode and its resize). A window taken from the wrong place, or x for y, is tens
    of levels off on this gradient."""
    from mnpo.data import transforms

    jpeg = _gradient_jpeg(tmp_path / "g.jpg")
    scales = []
    real = transforms.load_image

    def spying(path, **kwargs):
        scales.append(kwargs.get("draft_scale", 1))
        return real(path, **kwargs)

    monkeypatch.setattr(transforms, "load_image", spying)
    plain = train_transform(224, 256, random_resized=random_resized)
    draft = train_transform(224, 256, random_resized=random_resized, draft=True)
    full = real(jpeg)
    means = []
    for seed in range(20):
        a = plain(full, torch.Generator().manual_seed(seed))
        b = draft.from_file(jpeg, torch.Generator().manual_seed(seed))
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 3, seed
        means.append(diff.float().mean().item())
    assert np.mean(means) < 0.5
    assert min(scales) >= 2 if not random_resized else max(scales) >= 4  # the drafts did happen


def test_draft_reads_unreadable_files_as_load_image_does(tmp_path):
    draft = train_transform(224, 256, random_resized=True, draft=True)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match="text.jpg: cannot read image: not an image format"):
        draft.from_file(tmp_path / "text.jpg", torch.Generator())
    with pytest.raises(ImageReadError, match="file not found"):
        draft.from_file(tmp_path / "absent.jpg", torch.Generator())


def test_load_image_decodes_bytes_already_read_and_names_the_path(tmp_path):
    jpeg = _gradient_jpeg(tmp_path / "g.jpg")
    data = jpeg.read_bytes()
    elsewhere = tmp_path / "not-written.jpg"  # never read: the bytes are given
    for scale in (1, 4):
        a, b = load_image(elsewhere, data=data, draft_scale=scale), load_image(jpeg, draft_scale=scale)
        assert a.size == b.size and a.tobytes() == b.tobytes()
    with pytest.raises(ImageReadError, match="not-written.jpg: cannot read image: empty file"):
        load_image(elsewhere, data=b"")
    with pytest.raises(ImageReadError, match="not-written.jpg: cannot read image: not an image format"):
        load_image(elsewhere, data=b"text, not pixels")


def test_a_drafted_view_reads_its_file_once(tmp_path, monkeypatch):
    """One read of the file (its header is parsed from the same bytes): no open by PIL."""
    import builtins

    jpeg = _gradient_jpeg(tmp_path / "g.jpg")
    reads = []
    real_read, real_open = type(jpeg).read_bytes, builtins.open

    def counting_read(self):
        reads.append(self.name)
        return real_read(self)

    def counting_open(file, *args, **kwargs):
        if str(file) == str(jpeg):
            reads.append(f"open {jpeg.name}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(type(jpeg), "read_bytes", counting_read)
    monkeypatch.setattr(builtins, "open", counting_open)
    train_transform(224, 256, random_resized=True, draft=True).from_file(jpeg, torch.Generator().manual_seed(0))
    assert reads == ["g.jpg"]
