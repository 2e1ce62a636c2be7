"""`mnpo localize`: real image files of several sizes and formats through a tiny checkpoint."""

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from numerics import map_bound, network_bound
from PIL import Image

from mnpo.data.transforms import load_image, localization_transform, ten_crop
from mnpo.engine.localize import (
    METHOD_CHOICES,
    NORMALIZATION_CHOICES,
    LocalizeError,
    add_localize_parser,
    box_to_image,
    localize_images,
    unique_stems,
    write_localization,
)
from mnpo.maps import METHODS, NORMALIZATIONS, compute_maps
from mnpo.metrics.boxes import predicted_boxes
from mnpo.models import build_model, save_checkpoint

CLASS_NAMES = ["heron", "gull", "wren"]
# (relative path, (W, H), PIL mode, format)
IMAGES = [
    ("a.png", (300, 200), "RGB", "PNG"),
    ("b.jpg", (150, 260), "RGB", "JPEG"),
    ("gray.png", (64, 48), "L", "PNG"),
    ("rgba.png", (100, 100), "RGBA", "PNG"),
    ("sub/a.png", (90, 120), "RGB", "PNG"),  # same stem as a.png
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model("vgg16-mnpo", 3, width=1 / 16).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(50)  # spread the random network's class probabilities
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h), mode, fmt in IMAGES:
        pixels = rng.integers(0, 60, (h, w, 4), dtype=np.uint8)
        pixels[h // 4: h // 2, w // 3: 2 * w // 3] = 230  # a bright block
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, format=fmt)
        paths.append(str(root / name))
    bad = root / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return paths, str(bad)


@pytest.fixture(scope="module")
def report(model, files):
    paths, bad = files
    return localize_images(model, paths[:2] + [bad] + paths[2:], threshold=0.3, topk=2,
                           class_names=CLASS_NAMES, batch_size=4)


def test_report_covers_every_readable_image(report, files):
    paths, bad = files
    assert report.method == "mnpo" and report.threshold == 0.3
    assert [r.path for r in report.images] == paths
    assert [s.path for s in report.skipped] == [bad]
    assert report.skipped[0].reason  # why, from the decoder
    for result, (_, size, _, _) in zip(report.images, IMAGES):
        assert result.size == size and result.image.mode == "RGB"
        w, h = size
        assert result.scoremap.shape == (h, w) and result.scoremap.dtype == np.float32
        assert 0.0 <= result.scoremap.min() and result.scoremap.max() <= 1.0
        assert result.box is not None
        x0, y0, x1, y1 = result.box
        assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1


def test_top_classes_are_sorted_named_and_sum_to_at_most_one(report):
    for result in report.images:
        probs = [c.probability for c in result.top_classes]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True)
        assert 0.0 < sum(probs) <= 1.0
        assert [c.name for c in result.top_classes] == [CLASS_NAMES[c.index] for c in result.top_classes]


@pytest.mark.numerics
def test_classification_is_the_ten_crop_average(model, report, files):
    paths, _ = files
    for result, path in zip(report.images, paths):
        image = load_image(path)
        with torch.no_grad():
            crops = model(ten_crop(image)).logits[0].double()              # (10, 3)
            single = model(localization_transform()(image)[None]).logits[0].double()[0]
        expected = crops.mean(0).softmax(0)
        order = expected.argsort(descending=True)[:2]
        assert [c.index for c in result.top_classes] == order.tolist()
        got = [c.probability for c in result.top_classes]
        # the same float32 network on the same crops, perhaps batched otherwise: logits within
        # network_bound of their magnitude; a softmax moves by at most twice a logit's change
        bound = 2 * network_bound(model, torch.float32) * float(crops.abs().max())
        assert np.allclose(got, expected[order].numpy(), rtol=0, atol=bound)
        # A single view gives other numbers: the test can tell the two apart.
        assert not np.allclose(got, single.softmax(0)[order].numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.numerics
def test_map_and_box_come_from_the_224_view_of_the_top_class(model, report, files):
    paths, _ = files
    for result, path in zip(report.images, paths):
        image = load_image(path)
        top = torch.tensor([result.top_classes[0].index])
        maps, _ = compute_maps(model, localization_transform()(image)[None], top, method="mnpo")
        scoremap = maps[0].numpy()
        w, h = image.size
        (bx0, by0, bx1, by1), = predicted_boxes(scoremap, 0.3)
        assert result.box == box_to_image((bx0, by0, bx1, by1), w, h)
        full = cv2.resize(scoremap, (w, h), interpolation=cv2.INTER_LINEAR)
        # the same resize of a map from the same float32 network, batched otherwise (numerics.py)
        assert np.allclose(result.scoremap, full, rtol=0, atol=map_bound(model, torch.float32))


def test_unique_stems():
    assert unique_stems(["x/a.png", "y/a.jpg", "a-1.png", "A.PNG", "b.png"]) == ["a", "a-1", "a-1-1", "A-2", "b"]


def test_write_localization(report, files, tmp_path):
    _, bad = files
    out = tmp_path / "out"
    path = write_localization(report, out, save_maps=True)
    assert path == out / "localization.json"
    data = json.loads(path.read_text())
    assert data["method"] == "mnpo" and data["threshold"] == 0.3
    assert data["skipped"] == [{"path": bad, "reason": report.skipped[0].reason}]
    assert [e["overlay"] for e in data["images"]] == ["a.png", "b.png", "gray.png", "rgba.png", "a-1.png"]
    for entry, result, (_, (w, h), _, _) in zip(data["images"], report.images, IMAGES):
        assert entry["path"] == result.path and entry["size"] == [w, h]
        assert entry["box"] == list(result.box)
        assert entry["top_classes"] == [{"index": c.index, "name": c.name, "probability": c.probability}
                                        for c in result.top_classes]
        with Image.open(out / entry["overlay"]) as overlay:
            assert overlay.format == "PNG" and overlay.size == (w, h)
        saved = np.load(out / entry["map"])
        assert saved.shape == (h, w) and np.array_equal(saved, result.scoremap)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["localization.json"] + [f"{s}.{x}" for s in ("a", "b", "gray", "rgba", "a-1")
                                                     for x in ("png", "npy")])


def test_write_without_overlays(report, tmp_path):
    path = write_localization(report, tmp_path, overlays=False)
    data = json.loads(path.read_text())
    assert all(e["overlay"] is None and "map" not in e for e in data["images"])
    assert [p.name for p in tmp_path.iterdir()] == ["localization.json"]


def test_a_box_drawn_in_the_overlay(report, tmp_path):
    write_localization(report, tmp_path)
    result = report.images[0]
    x0, y0, x1, y1 = result.box
    with Image.open(tmp_path / "a.png") as overlay:
        px = np.asarray(overlay)
    assert (px[y0, x0:x1 + 1] == (0, 255, 0)).all() and (px[y0:y1 + 1, x1] == (0, 255, 0)).all()


def test_no_box_when_nothing_is_above_the_threshold(model, files):
    paths, _ = files
    # At t = 1 nothing is strictly above the maximum.
    result = localize_images(model, paths[:1], threshold=1.0).images[0]
    assert result.box is None
    assert result.to_json()["box"] is None


def test_gradient_method_and_default_threshold(model, files, caplog):
    paths, _ = files
    with caplog.at_level(logging.INFO, logger="mnpo.engine.localize"):
        report = localize_images(model, paths[2:3], method="mnpos", topk=10)
    assert report.threshold == 0.2 and "default 0.2" in caplog.text
    assert len(report.images[0].top_classes) == 3  # topk is capped at the class count
    assert report.images[0].top_classes[0].name is None
    assert sum(c.probability for c in report.images[0].top_classes) == pytest.approx(1.0)


def test_unreadable_images_are_skipped_with_a_warning(model, files, caplog):
    paths, bad = files
    with caplog.at_level(logging.WARNING, logger="mnpo.engine.localize"):
        report = localize_images(model, [bad, paths[2]])
    assert bad in caplog.text and len(report.images) == 1


def test_all_unreadable_is_an_error(model, files, tmp_path):
    _, bad = files
    missing = str(tmp_path / "missing.png")
    with pytest.raises(LocalizeError, match="none of the 2 images") as info:
        localize_images(model, [bad, missing])
    assert bad in str(info.value) and missing in str(info.value)


@pytest.mark.parametrize("kwargs, msg", [
    ({"method": "magic"}, "unknown map method 'magic'"),
    ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\]"),
    ({"threshold": float("nan")}, "threshold must be"),
    ({"topk": 0}, "topk must be a positive int"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"class_names": ["a", "b"]}, "class_names has 2 names, but the model has 3 classes"),
    ({"class_names": "abc"}, "list of strings"),
    ({"map_options": {"size": (10, 10)}}, "'size' is fixed"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_bad_arguments(model, files, kwargs, msg):
    paths, _ = files
    with pytest.raises(ValueError, match=msg):
        localize_images(model, paths[:1], **kwargs)


def test_empty_paths_and_training_mode(model, files):
    paths, _ = files
    with pytest.raises(ValueError, match="no image paths"):
        localize_images(model, [])
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            localize_images(model, paths[:1])
    finally:
        model.eval()


def test_unknown_map_option_is_refused(model, files):
    paths, _ = files
    with pytest.raises(TypeError, match="unknown map option"):
        localize_images(model, paths[:1], map_options={"colour": 1})


def test_method_choices_are_the_map_methods():
    assert METHOD_CHOICES == METHODS
    assert NORMALIZATION_CHOICES == NORMALIZATIONS


def _parser():
    parser = argparse.ArgumentParser(prog="mnpo")
    add_localize_parser(parser.add_subparsers(dest="command"))
    return parser


def test_parser_defaults_and_help():
    args = _parser().parse_args(["localize", "--checkpoint", "m.pt", "x.png", "y.jpg"])
    assert args.images == ["x.png", "y.jpg"] and args.checkpoint == "m.pt"
    assert (args.out, args.method, args.threshold, args.topk, args.batch_size, args.device) == \
        ("localize-output", "mnpo", None, 5, 16, "auto")
    assert not args.no_overlays and not args.save_maps and not args.ignore_exif
    assert args.target_layer is None and args.chunk_size is None and args.top_k is None  # the methods' own defaults
    sub = add_localize_parser(argparse.ArgumentParser().add_subparsers())
    helps = {a.dest: a.help for a in sub._actions}
    assert set(helps) == {"help", "checkpoint", "model", "weights", "num_classes", "images", "out", "method", "threshold", "topk", "batch_size",
                          "device", "no_overlays", "save_maps", "input_size", "ignore_exif", "target_layer",
                          "chunk_size", "no_resume", "normalize", "percentile", "top_k"}
    assert all(text and len(text) > 20 for text in helps.values())
    assert "operating_threshold" in helps["threshold"] and "localize-output" in helps["out"]
    assert sub.description and "localization.json" in sub.description


@pytest.mark.parametrize("argv", [
    ["--threshold", "2"], ["--threshold", "nan"], ["--topk", "0"], ["--batch-size", "x"],
    ["--method", "magic"], ["--device", "tpu"],
])
def test_parser_refuses_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["localize", "--checkpoint", "m.pt", "x.png", *argv])
    assert "localize: error" in capsys.readouterr().err


def test_run_localize_end_to_end(model, files, tmp_path, capsys, caplog):
    paths, bad = files
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model, meta={"class_names": CLASS_NAMES, "operating_threshold": 0.3})
    out = tmp_path / "result"
    args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), *paths, bad, "--out", str(out),
                                 "--topk", "2", "--device", "cpu"])
    with caplog.at_level(logging.INFO, logger="mnpo.engine.localize"):
        assert args.func(args) == 0
    assert "operating_threshold" in caplog.text
    data = json.loads((out / "localization.json").read_text())
    assert data["threshold"] == 0.3 and len(data["images"]) == 5
    assert data["skipped"][0]["path"] == bad
    assert data["images"][0]["top_classes"][0]["name"] in CLASS_NAMES
    printed = capsys.readouterr().out
    for path in paths:
        assert path in printed
    assert f"skipped {bad}" in printed and "localization.json" in printed
    # --threshold wins over the checkpoint's value; without either, 0.2.
    args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), paths[2], "--out", str(out),
                                 "--threshold", "0.5", "--no-overlays", "--device", "cpu"])
    args.func(args)
    assert json.loads((out / "localization.json").read_text())["threshold"] == 0.5
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, model)
    args = _parser().parse_args(["localize", "--checkpoint", str(bare), paths[2], "--out", str(out),
                                 "--device", "cpu"])
    args.func(args)
    data = json.loads((out / "localization.json").read_text())
    assert data["threshold"] == 0.2 and data["images"][0]["top_classes"][0]["name"] is None


def test_run_localize_passes_the_cam_family_options(model, files, tmp_path):
    paths, _ = files
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model)
    saved = {}
    for name, extra in (("head", []), ("conv5_2", ["--target-layer", "conv5_2", "--chunk-size", "3"])):
        out = tmp_path / name
        args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), paths[0], "--out", str(out),
                                     "--method", "ablationcam", "--no-overlays", "--save-maps", "--device", "cpu",
                                     *extra])
        assert args.func(args) == 0
        (saved[name],) = [np.load(p) for p in out.glob("*.npy")]
    direct = localize_images(model, paths[:1], method="ablationcam",
                             map_options={"target_layer": "conv5_2", "chunk_size": 3}).images[0].scoremap
    assert np.array_equal(saved["conv5_2"], direct)  # the same call: the options reached compute_maps
    assert not np.allclose(saved["conv5_2"], saved["head"], atol=1e-3)  # and they matter


def test_run_localize_passes_the_normalization(model, files, tmp_path):
    """--normalize / --percentile reach compute_maps (the saved map is the direct call's and not
    min-max's); a percentile without IVR, or outside [0, 1), is refused naming the value."""
    paths, _ = files
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model)
    saved = {}
    for name, extra in (("minmax", []), ("ivr", ["--normalize", "ivr", "--percentile", "0.6"])):
        out = tmp_path / name
        args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), paths[0], "--out", str(out),
                                     "--method", "cam", "--no-overlays", "--save-maps", "--device", "cpu", *extra])
        assert args.func(args) == 0
        (saved[name],) = [np.load(p) for p in out.glob("*.npy")]
    direct = localize_images(model, paths[:1], method="cam",
                             map_options={"normalize": "ivr", "percentile": 0.6}).images[0].scoremap
    assert np.array_equal(saved["ivr"], direct)
    assert (saved["ivr"] == 0).mean() > (saved["minmax"] == 0).mean() + 0.3  # IVR zeroes 60 % of the 224 map
    for extra, message in ((["--percentile", "0.6"], "--percentile 0.6 is IVR's"),
                           (["--normalize", "pas", "--percentile", "0.6"], "--percentile 0.6 is IVR's"),
                           (["--normalize", "ivr", "--percentile", "1.5"], r"--percentile must lie in \[0, 1\), got 1.5")):
        args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), paths[0], "--out", str(tmp_path / "x"),
                                     *extra])
        with pytest.raises(SystemExit, match=message):
            args.func(args)


@pytest.mark.parametrize("meta, msg", [
    ({"class_names": ["a"]}, "meta class_names has 1 names"),
    ({"operating_threshold": 7.0}, "meta operating_threshold must be a number in"),
])
def test_run_localize_refuses_bad_checkpoint_meta(model, files, tmp_path, meta, msg):
    paths, _ = files
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, meta=meta)
    args = _parser().parse_args(["localize", "--checkpoint", str(ckpt), paths[0], "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=msg) as info:
        args.func(args)
    assert str(ckpt) in str(info.value)


def test_registering_the_subcommand_does_not_import_torch():
    code = ("import argparse, sys\n"
            "from mnpo.engine.localize import add_localize_parser\n"
            "add_localize_parser(argparse.ArgumentParser().add_subparsers())\n"
            "assert 'torch' not in sys.modules and 'cv2' not in sys.modules, 'heavy import'\n")
    subprocess.run([sys.executable, "-c", code], check=True)



def test_folders_expand_to_the_images_below_them(files, tmp_path):
    from mnpo.engine.localize import expand_image_paths

    paths, bad = files
    root = str(Path(paths[0]).parent)
    (Path(root) / "notes.txt").write_text("not an image")
    expanded = expand_image_paths([root, "missing.png"])
    assert expanded == sorted([*paths, bad]) + ["missing.png"]  # recursive, sorted; files kept as given
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    (tmp_path / "empty" / "deep" / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty: a folder without images \(extensions: .*\.jpg"):
        expand_image_paths([str(tmp_path / "empty")])


def test_exif_orientation_is_applied_first_unless_ignored(model, tmp_path):
    """A phone photo stored sideways with orientation tag 6 is localized as the upright image it
    shows: the same classes, map and box as the upright pixels saved without a tag."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 60, (120, 200, 3), dtype=np.uint8)
    stored[20:60, 30:90] = 230
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / "upright.png")
    Image.fromarray(stored).save(tmp_path / "untagged.png")
    paths = [tmp_path / n for n in ("sideways.png", "upright.png", "untagged.png")]
    tagged, upright, untagged = localize_images(model, paths, threshold=0.3).images
    assert tagged.size == upright.size == (120, 200) and tagged.exif_orientation == 6
    assert upright.exif_orientation == untagged.exif_orientation == 1
    assert tagged.box == upright.box and tagged.top_classes == upright.top_classes
    assert np.array_equal(tagged.scoremap, upright.scoremap)
    assert tagged.to_json()["exif_orientation"] == 6 and tagged.to_json()["size"] == [120, 200]
    ignored = localize_images(model, paths[::2], threshold=0.3, exif_orientation=False).images
    assert ignored[0].size == (200, 120) and ignored[0].exif_orientation == 1
    assert ignored[0].box == ignored[1].box and np.array_equal(ignored[0].scoremap, ignored[1].scoremap)


# ----- streaming (localize_to_folder, `mnpo localize`) -----


def test_streamed_folder_equals_the_in_memory_report(model, report, files, tmp_path):
    """localize_to_folder writes the same JSON, overlays and maps as localize_images + write_localization."""
    from mnpo.engine.localize import RECORDS_NAME, localize_to_folder

    paths, bad = files
    kept = write_localization(report, tmp_path / "memory", save_maps=True)
    seen = []
    summary = localize_to_folder(model, paths[:2] + [bad] + paths[2:], tmp_path / "stream", save_maps=True,
                                 on_result=lambda item: seen.append(item.path), threshold=0.3, topk=2,
                                 class_names=CLASS_NAMES, batch_size=4)
    assert json.loads(summary.path.read_text()) == json.loads(kept.read_text())
    assert summary.reused == 0 and sorted(seen) == sorted(paths + [bad])
    for entry in json.loads(kept.read_text())["images"]:
        a = np.load(tmp_path / "memory" / entry["map"])
        b = np.load(tmp_path / "stream" / entry["map"])
        assert np.array_equal(a, b), entry["path"]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "memory" / entry["overlay"])),
                              np.asarray(Image.open(tmp_path / "stream" / entry["overlay"])))
    lines = [json.loads(line) for line in (tmp_path / "stream" / RECORDS_NAME).read_text().splitlines()]
    assert "settings" in lines[0]
    assert sorted(line["image"]["path"] for line in lines[1:] if "image" in line) == sorted(paths)
    assert [line["skipped"]["path"] for line in lines[1:] if "skipped" in line] == [bad]


def test_a_rerun_reuses_finished_records_and_redoes_changed_ones(model, files, tmp_path, monkeypatch):
    from mnpo.engine import localize as loc

    paths, _ = files
    first = loc.localize_to_folder(model, paths, tmp_path, threshold=0.3, batch_size=2)
    done = []
    real = loc._localize_batch

    def counting(model_, batch, opts, keep):
        done.extend(path for _, path, _ in batch)
        return real(model_, batch, opts, keep)

    monkeypatch.setattr(loc, "_localize_batch", counting)
    (tmp_path / (Path(paths[1]).stem + ".png")).unlink()  # its overlay is gone: redone
    again = loc.localize_to_folder(model, paths, tmp_path, threshold=0.3, batch_size=2)
    assert done == [paths[1]] and again.reused == len(paths) - 1
    assert json.loads(again.path.read_text()) == json.loads(first.path.read_text())
    done.clear()
    loc.localize_to_folder(model, paths, tmp_path, threshold=0.4, batch_size=2)  # other settings: all redone
    assert done == paths
    done.clear()
    loc.localize_to_folder(model, paths, tmp_path, threshold=0.4, batch_size=2, resume=False)
    assert done == paths
    # a line cut short by a kill is dropped, the others kept
    records = tmp_path / loc.RECORDS_NAME
    records.write_text(records.read_text() + '{"image": {"path"')
    done.clear()
    assert loc.localize_to_folder(model, paths, tmp_path, threshold=0.4, batch_size=2).reused == len(paths)
    assert done == []


def test_streaming_keeps_at_most_one_batch_of_images_alive(model, tmp_path):
    """Memory does not grow with the count: on 200 large images, the PIL images and full-size
    maps alive when each result is reported never exceed one batch's."""
    import gc
    import weakref

    from mnpo.engine import localize as loc

    rng = np.random.default_rng(1)
    paths = []
    for k in range(200):
        pixels = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
        path = tmp_path / "in" / f"{k:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path, quality=80)
        paths.append(str(path))
    refs = []
    real_load = loc.__dict__.get("load_image")
    from mnpo.data import transforms

    original = transforms.load_image

    def tracked(path, **kw):
        image = original(path, **kw)
        refs.append(weakref.ref(image))
        return image

    most = []

    def on_result(item):
        gc.collect()
        most.append(sum(ref() is not None for ref in refs))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transforms, "load_image", tracked)
        summary = loc.localize_to_folder(model, paths, tmp_path / "out", on_result=on_result, batch_size=8,
                                         threshold=0.3)
    assert real_load is None  # imported inside the function, so the patch reaches it
    assert len(summary.images) == 200 and len(most) == 200
    assert max(most) <= 8, max(most)
