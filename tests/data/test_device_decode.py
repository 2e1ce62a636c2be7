"""Decoding on the evaluation's device (``--decode device``): what a worker sends, the views the
device makes from it against PIL's (``uint8_views``), the batched decode call, its fallbacks,
and an evaluation run through it.

The bound: PIL resizes in two passes rounded to 8 bits in between (and fixed-point weights);
ours in float, rounded once. The intermediate rounding moves PIL's value by at most 1/2 before
its final rounding, so the two results differ by at most 1 level."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_vgg_mnpo
from torchvision.transforms.v2.functional import pil_to_tensor

import mnpo.data.device_decode as dd
from mnpo.data.dataset import WSOLDataset, collate_evaluation
from mnpo.data.device_decode import EncodedImage, device_views, encoded_image
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.data.transforms import ImageReadError, load_image, uint8_views
from mnpo.engine.evaluate import evaluate_model
from mnpo.metrics.boxes import cam_thresholds


def _photo(height, width, seed=0):
    """Smooth structure plus noise, as a photograph has, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 9 + seed) * 60 + 120, np.cos(y / 13) * 50 + 110, (x + 2 * y) % 200 + 30], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    out = {}
    Image.fromarray(_photo(150, 200)).save(out.setdefault("rgb", root / "rgb.jpg"), quality=85)
    Image.fromarray(_photo(90, 60, 1)[..., 0]).save(out.setdefault("gray", root / "gray.jpg"), quality=90)
    Image.fromarray(_photo(70, 80, 2)).convert("CMYK").save(out.setdefault("cmyk", root / "cmyk.jpg"), quality=90)
    Image.fromarray(_photo(40, 30, 3)).save(out.setdefault("png", root / "small.png"))
    Image.fromarray(_photo(50, 50, 4)).save(out.setdefault("png_named_jpeg", root / "png.JPEG"), format="PNG")
    Image.fromarray(_photo(700, 500, 5)).save(out.setdefault("large", root / "large.jpg"), quality=80)
    return out


def test_jpegs_travel_as_their_bytes_and_everything_else_decoded(files):
    for name in ("rgb", "gray", "large"):
        encoded = encoded_image(files[name])
        assert encoded.jpeg and encoded.data.dtype == torch.uint8 and encoded.data.ndim == 1
        assert encoded.data.numpy().tobytes() == files[name].read_bytes()
        with Image.open(files[name]) as image:
            assert encoded.size == image.size
    for name in ("cmyk", "png", "png_named_jpeg"):  # CMYK: PIL's conversion (wsolevaluation's pixels)
        encoded = encoded_image(files[name])
        assert not encoded.jpeg
        expected = pil_to_tensor(load_image(files[name]))
        assert torch.equal(encoded.data, expected) and encoded.size == tuple(expected.shape[:0:-1])


def test_a_bad_file_fails_in_the_worker_naming_it(files, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files["rgb"].read_bytes()[:-400])  # header intact, no end-of-image marker
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path, why in ((truncated, "truncated|broken|image file"), (empty, "empty file"),
                      (text, "not an image format"), (tmp_path / "absent.jpg", "file not found")):
        with pytest.raises(ImageReadError, match=why) as err:
            encoded_image(path)
        assert err.value.path == str(path)


@pytest.mark.parametrize("crop, resize", [(224, 256), (48, 55), (32, None)])
def test_device_views_are_within_one_level_of_pils(files, crop, resize):
    """Every kind in one batch, in order: each row against PIL's views of that image (the images
    differ from one another by far more than a level, so a row out of place fails)."""
    names = ["rgb", "gray", "cmyk", "png", "png_named_jpeg", "large"]
    views, sources = device_views([encoded_image(files[n]) for n in names], "cpu", crop, resize, names)
    assert views.dtype == torch.uint8 and views.shape == (len(names), 3, crop, crop)
    assert (sources is None) == (resize is None)
    for k, name in enumerate(names):
        expected = uint8_views(load_image(files[name]), crop, resize)
        view, source = expected if resize is not None else (expected, None)
        assert (views[k].int() - view.int()).abs().max() <= 1, name
        if resize is not None:
            assert sources.shape[1:] == (3, resize, resize)
            assert (sources[k].int() - source.int()).abs().max() <= 1, name
    # far from a level on average, or the bound above would say little
    mean = (views[0].float() - uint8_views(load_image(files["rgb"]), crop, None).float()).abs().mean()
    assert mean < 0.5


def test_the_batch_is_decoded_in_one_call_on_the_device(files, monkeypatch):
    """The CUDA path without a GPU: the call nvJPEG would get, mocked to decode on the CPU."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    calls = []

    def recording(data, mode, device):
        calls.append((len(data), torch.device(device)))
        return real(data, mode=mode)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", recording)
    names = ["rgb", "gray", "large"]
    encoded = [encoded_image(files[n]) for n in names]
    views, _ = device_views(encoded, torch.device("cuda", 1), 32, None, names)
    assert calls == [(3, torch.device("cuda", 1))]
    on_cpu, _ = device_views(encoded, "cpu", 32, None, names)
    assert torch.equal(views, on_cpu)


def test_a_failed_batch_decode_falls_back_image_by_image(files, monkeypatch):
    bad = encoded_image(files["gray"])
    real = dd._decode_jpegs

    def failing(data, device):
        if any(d.data_ptr() == bad.data.data_ptr() for d in data):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, device)

    monkeypatch.setattr(dd, "_decode_jpegs", failing)
    good = [encoded_image(files["rgb"]), encoded_image(files["large"])]
    views, _ = device_views(good, "cpu", 32, None)  # no failure: one call
    with pytest.raises(ImageReadError, match="gray.jpg: cannot read image: the JPEG does not decode"):
        device_views([good[0], bad, good[1]], "cpu", 32, None, ["rgb.jpg", "gray.jpg", "large.jpg"])
    monkeypatch.setattr(dd, "_decode_jpegs", lambda data, device: real(data, device) if len(data) == 1 else
                        (_ for _ in ()).throw(RuntimeError("batch refused")))
    again, _ = device_views(good, "cpu", 32, None)  # the batch call fails, each alone succeeds
    assert torch.equal(again, views)


def test_refused_inputs(files):
    encoded = encoded_image(files["rgb"])
    with pytest.raises(ValueError, match="no images"):
        device_views([], "cpu")
    with pytest.raises(ValueError, match="1 image ids for 2 images"):
        device_views([encoded, encoded], "cpu", image_ids=["a"])
    liar = EncodedImage(encoded.data, True, (10, 10))
    with pytest.raises(ImageReadError, match=r"x: cannot read image: decoded to \(150, 200\) \(H, W\), its header"):
        device_views([liar], "cpu", image_ids=["x"])
    with pytest.raises(ValueError, match="device_decode goes with uint8_views"):
        WSOLDataset(files["rgb"].parent, _meta_of_nothing(), "evaluate", device_decode=True)


def _meta_of_nothing():
    from mnpo.data.metadata import SplitMetadata

    return SplitMetadata(image_ids=(), labels={})


# an evaluation through it ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """The synthetic test split with two of its PNGs replaced by JPEGs under the same names."""
    root = tmp_path_factory.mktemp("evjpeg")
    write_synthetic_dataset(out=root, preset="parts", seed=4, image_size=48, num_classes=3,
                            train_per_class=1, val_per_class=1, test_per_class=4)
    ds = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate")
    for k in (0, 5):
        path = root / "images" / ds.image_ids[k]
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
    return root


def _dataset(root, device_decode, ten_crop=True):
    return WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                       uint8_views=True, ten_crop=ten_crop, device_decode=device_decode)


def test_items_carry_the_encoded_file_and_the_same_boxes(jpeg_data):
    host, device = _dataset(jpeg_data, False), _dataset(jpeg_data, True)
    for k in (0, 1):
        a, b = host[k], device[k]
        assert set(b) == set(a) - {"image", "ten_crop_source"} | {"encoded"}
        assert b["encoded"].jpeg == (k == 0)
        assert np.array_equal(a["boxes"], b["boxes"]) and a["label"] == b["label"]
    batch = collate_evaluation([device[0], device[1]])
    assert [e.jpeg for e in batch["encoded"]] == [True, False]


@pytest.mark.parametrize("ten_crop", [True, False])
def test_an_evaluation_sees_the_device_views_of_its_own_images(jpeg_data, ten_crop):
    seen = {}

    def keep(batch, maps):
        for k, image_id in enumerate(batch["image_id"]):
            seen[image_id] = (batch["image"][k], batch["ten_crop_source"][k] if ten_crop else None)
            assert "encoded" not in batch

    host = _dataset(jpeg_data, False, ten_crop)
    result = evaluate_model(tiny_vgg_mnpo(), _dataset(jpeg_data, True, ten_crop), thresholds=cam_thresholds(0.1),
                            method="cam", batch_size=5, workers=2, ten_crop=ten_crop, on_batch=keep, details=True,
                            gallery_size=3)
    assert result.num_images == len(host) == len(seen)
    import cv2

    from mnpo.engine.results import THUMBNAIL

    assert len(result.details.gallery) == 3
    for image_id, item in result.details.gallery.items():  # the report's thumbnails are of the device views
        view = np.ascontiguousarray(seen[image_id][0].permute(1, 2, 0).numpy())
        assert np.array_equal(item.image, cv2.resize(view, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA))
    for k in range(len(host)):
        item = host[k]
        view, source = seen[item["image_id"]]
        assert (view.int() - item["image"].int()).abs().max() <= 1
        assert (source is None) == (not ten_crop)
        if ten_crop:
            assert (source.int() - item["ten_crop_source"].int()).abs().max() <= 1


def test_an_image_the_device_cannot_decode_is_a_miss_with_skip_unreadable(jpeg_data, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(jpeg_data, root)
    ds = _dataset(root, True)
    bad_id = ds.image_ids[5]
    bad_bytes = (root / "images" / bad_id).read_bytes()
    real = dd._decode_jpegs

    def failing(data, device):
        if any(d.numpy().tobytes() == bad_bytes for d in data):
            raise RuntimeError("corrupt data")
        return real(data, device)

    monkeypatch.setattr(dd, "_decode_jpegs", failing)
    common = dict(thresholds=cam_thresholds(0.1), method="cam", batch_size=4)
    with pytest.raises(ImageReadError, match=f"{bad_id}: cannot read image"):
        evaluate_model(tiny_vgg_mnpo(), ds, **common)
    counted = evaluate_model(tiny_vgg_mnpo(), ds, skip_unreadable=True, **common)
    assert counted.num_images == len(ds) and list(counted.unreadable) == [bad_id]
    readable = [i for i in ds.image_ids if i != bad_id]
    alone = evaluate_model(tiny_vgg_mnpo(), WSOLDataset(ds.image_root, ds.meta.select(readable), "evaluate",
                                                        crop_size=48, resize_size=55, uint8_views=True,
                                                        device_decode=True), **common)
    assert np.array_equal(counted.curves.top1, alone.curves.top1)
    assert (counted.top1_correct, counted.top5_correct) == (alone.top1_correct, alone.top5_correct)


def test_each_file_is_read_once(files, monkeypatch):
    """The worker reads a file's bytes once, also where it decodes the file itself (CMYK, PNG)."""
    reads = []
    real = type(files["rgb"]).read_bytes

    def counting(self):
        reads.append(self.name)
        return real(self)

    monkeypatch.setattr(type(files["rgb"]), "read_bytes", counting)
    for name in ("rgb", "cmyk", "png", "png_named_jpeg"):
        encoded_image(files[name])
    assert reads == [files[name].name for name in ("rgb", "cmyk", "png", "png_named_jpeg")]
