"""Tests of the synthetic WSOL data sets (mnpo.data.synthetic).

The metadata is parsed with the small helpers below (independent of the
package's own reader); when ``mnpo.data.metadata.read_split`` is importable it
is also checked against them.  Everything is kept small (tiny images, a few
images per class) so that the module runs in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnpo.data import synthetic as syn

SPLITS = ("train", "val", "test")
MASK_SPLITS = ("val", "test")


# --------------------------------------------------------------------------- #
# Own parsers of the written layout
# --------------------------------------------------------------------------- #
def _lines(path: Path) -> list[str]:
    text = path.read_text("utf-8")
    assert text.endswith("\n"), f"{path} does not end with a newline"
    lines = text[:-1].split("\n")
    assert all(lines), f"{path} has an empty line"
    return lines


def _split_lines(path: Path, n_fields: int) -> list[list[str]]:
    rows = [line.split(",") for line in _lines(path)]
    bad = [r for r in rows if len(r) != n_fields]
    assert not bad, f"{path}: lines without {n_fields} fields: {bad[:3]}"
    return rows


def parse_box_split(root: Path, split: str) -> dict:
    """image ids, labels, sizes and boxes of ``metadata/<split>``."""
    d = root / "metadata" / split
    ids = _lines(d / "image_ids.txt")
    labels = {i: int(c) for i, c in _split_lines(d / "class_labels.txt", 2)}
    sizes = {i: (int(w), int(h)) for i, w, h in _split_lines(d / "image_sizes.txt", 3)}
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for i, *xyxy in _split_lines(d / "localization.txt", 5):
        boxes.setdefault(i, []).append(tuple(int(v) for v in xyxy))
    return {"ids": ids, "labels": labels, "sizes": sizes, "boxes": boxes}


def parse_mask_split(root: Path, split: str) -> dict:
    """image ids, labels and (for val/test) mask / ignore paths of ``metadata-masks/<split>``."""
    d = root / "metadata-masks" / split
    ids = _lines(d / "image_ids.txt")
    labels = {i: int(c) for i, c in _split_lines(d / "class_labels.txt", 2)}
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str] = {}
    loc = d / "localization.txt"
    if loc.exists():
        for i, mask, ignore in _split_lines(loc, 3):
            if i in masks:
                assert ignore == "", f"{i}: ignore path on a later line"
                masks[i].append(mask)
            else:
                assert ignore, f"{i}: no ignore path on the first line"
                masks[i] = [mask]
                ignores[i] = ignore
    return {"ids": ids, "labels": labels, "masks": masks, "ignores": ignores, "has_loc": loc.exists()}


def read_binary_png(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    assert a.ndim == 2, f"{path}: not a single-channel mask"
    assert set(np.unique(a).tolist()) <= {0, 255}, f"{path}: values other than 0/255"
    return a == 255


def tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_dataset(root: Path, summary: dict, image_size: int, num_classes: int, per_class: dict) -> None:
    """Everything that must hold for a written set: metadata consistent with
    itself, with the returned summary and with the image / mask files."""
    assert summary == {s: per_class[s] * num_classes for s in SPLITS}
    info = json.loads((root / "dataset.json").read_text("utf-8"))
    assert info["complete"] is True and info["counts"] == summary
    for split in SPLITS:
        box = parse_box_split(root, split)
        msk = parse_mask_split(root, split)
        ids = box["ids"]
        assert len(ids) == len(set(ids)) == summary[split]
        # the same ids in all files of both layouts
        for name, keys in [("class_labels", box["labels"]), ("image_sizes", box["sizes"]),
                           ("localization", box["boxes"]), ("masks/class_labels", msk["labels"])]:
            assert set(keys) == set(ids), f"{split}: {name} ids differ from image_ids"
        assert msk["ids"] == ids and msk["labels"] == box["labels"]
        assert msk["has_loc"] == (split in MASK_SPLITS)
        # the image files on disk are exactly the listed ones
        on_disk = {p.relative_to(root / "images").as_posix() for p in (root / "images" / split).rglob("*.png")}
        assert on_disk == set(ids)
        counts = np.bincount([box["labels"][i] for i in ids], minlength=num_classes)
        assert counts.tolist() == [per_class[split]] * num_classes
        n_multi = 0
        for image_id in ids:
            label = box["labels"][image_id]
            assert 0 <= label < num_classes
            assert image_id.startswith(f"{split}/class_{label:02d}/")
            with Image.open(root / "images" / image_id) as im:
                assert im.mode == "RGB" and im.size == (image_size, image_size)
            assert box["sizes"][image_id] == (image_size, image_size)
            boxes = box["boxes"][image_id]
            assert 1 <= len(boxes) <= 2
            n_multi += len(boxes) > 1
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 <= x1 < image_size and 0 <= y0 <= y1 < image_size, (image_id, boxes)
            if split not in MASK_SPLITS:
                continue
            masks = [read_binary_png(root / "masks" / m) for m in msk["masks"][image_id]]
            ignore = read_binary_png(root / "masks" / msk["ignores"][image_id])
            assert all(m.shape == (image_size, image_size) and m.any() for m in masks)
            # one box per instance mask, each the tight box of its mask
            assert sorted(tight(m) for m in masks) == sorted(boxes), image_id
            union = np.zeros_like(masks[0])
            for m in masks:
                assert not (union & m).any(), f"{image_id}: instance masks overlap"
                union |= m
            assert ignore.any() and not (ignore & union).any(), f"{image_id}: ignore overlaps an object"
        assert info["multi_instance"][split] == n_multi
        if per_class[split] >= 2:  # index 1 of every class holds two objects
            assert n_multi >= 1, f"{split}: no two-object image"


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #
SMALL = {
    "shapes": dict(image_size=57, num_classes=3, train_per_class=2, val_per_class=2, test_per_class=3),
    "parts": dict(image_size=48, num_classes=3, train_per_class=2, val_per_class=2, test_per_class=3),
}


def _per_class(kw: dict) -> dict:
    return {s: kw[f"{s}_per_class"] for s in SPLITS}


@pytest.fixture(scope="module", params=sorted(SMALL))
def small_set(request, tmp_path_factory):
    preset = request.param
    root = tmp_path_factory.mktemp(f"synth_{preset}") / "out"
    summary = syn.write_synthetic_dataset(root, preset=preset, seed=5, **SMALL[preset])
    return preset, root, summary


# --------------------------------------------------------------------------- #
# Layout and metadata
# --------------------------------------------------------------------------- #
def test_metadata_consistent_and_boxes_are_tight_mask_boxes(small_set):
    preset, root, summary = small_set
    kw = SMALL[preset]
    check_dataset(root, summary, kw["image_size"], kw["num_classes"], _per_class(kw))


def test_files_match_render_sample(small_set):
    preset, root, _ = small_set
    size = SMALL[preset]["image_size"]
    for split, cls, index in [("train", 0, 1), ("val", 2, 1), ("test", 1, 2)]:
        s = syn.render_sample(preset, 5, split, cls, index, size)
        stem = f"{split}/class_{cls:02d}/{split}_{cls:02d}_{index:04d}"
        assert np.array_equal(np.asarray(Image.open(root / "images" / f"{stem}.png")), s.image)
        box = parse_box_split(root, split)
        assert box["boxes"][f"{stem}.png"] == [tuple(int(v) for v in b) for b in s.boxes]
        if split in MASK_SPLITS:
            assert len(s.instance_masks) == (2 if index == 1 else 1)
            for j, m in enumerate(s.instance_masks):
                suffix = "_mask" if j == 0 else f"_mask_{j}"
                assert np.array_equal(read_binary_png(root / "masks" / f"{stem}{suffix}.png"), m)
            assert np.array_equal(read_binary_png(root / "masks" / f"{stem}_ignore.png"), s.ignore)


def test_read_split_agrees_with_a_naive_parse(small_set):
    """The package's metadata reader and this file's naive parser read the same ids, labels,
    sizes and boxes from every split the generator wrote."""
    from mnpo.data.metadata import read_split

    _, root, _ = small_set
    for split in SPLITS:
        meta = read_split(root / "metadata" / split)
        ours = parse_box_split(root, split)
        assert list(meta.image_ids) == ours["ids"], split
        assert meta.labels == ours["labels"], split
        assert {k: tuple(v) for k, v in meta.sizes.items()} == ours["sizes"], split
        assert {k: [tuple(int(c) for c in b) for b in np.asarray(v).reshape(-1, 4)]
                for k, v in meta.boxes.items()} == ours["boxes"], split


@pytest.mark.parametrize("preset", sorted(syn.PRESETS))
@pytest.mark.parametrize("size", [32, 57, 96, 224])
def test_any_resolution(tmp_path, preset, size):
    kw = dict(image_size=size, num_classes=2, train_per_class=1, val_per_class=2, test_per_class=1)
    summary = syn.write_synthetic_dataset(tmp_path / "out", preset=preset, seed=1, **kw)
    check_dataset(tmp_path / "out", summary, size, 2, _per_class(kw))


# --------------------------------------------------------------------------- #
# Determinism
# --------------------------------------------------------------------------- #
TINY = dict(preset="parts", image_size=40, num_classes=2, train_per_class=2, val_per_class=2, test_per_class=1)


def test_same_arguments_give_identical_bytes_and_seed_matters(tmp_path):
    syn.write_synthetic_dataset(tmp_path / "a", seed=3, **TINY)
    syn.write_synthetic_dataset(tmp_path / "b", seed=3, **TINY)
    syn.write_synthetic_dataset(tmp_path / "c", seed=4, **TINY)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.startswith("images/")]
    assert images and all(a[k] != c[k] for k in images), "another seed must give other images"


def test_image_does_not_depend_on_images_per_class(tmp_path):
    few = dict(TINY, train_per_class=1, val_per_class=2, test_per_class=1)
    many = dict(TINY, num_classes=3, train_per_class=3, val_per_class=3, test_per_class=2)
    syn.write_synthetic_dataset(tmp_path / "few", seed=9, **few)
    syn.write_synthetic_dataset(tmp_path / "many", seed=9, **many)
    f, m = tree_bytes(tmp_path / "few"), tree_bytes(tmp_path / "many")
    shared = [k for k in f if k.startswith(("images/", "masks/"))]
    assert len(shared) > 10 and all(k in m and f[k] == m[k] for k in shared)
    for split in SPLITS:  # the box of a shared image is the same too
        bf, bm = parse_box_split(tmp_path / "few", split), parse_box_split(tmp_path / "many", split)
        assert all(bf["boxes"][i] == bm["boxes"][i] for i in bf["ids"])


# --------------------------------------------------------------------------- #
# What the presets are for
# --------------------------------------------------------------------------- #
def _features(preset: str, split: str, n: int, size: int = 48, classes: int = 4):
    """Mean colour of the object pixels outside the mark, and of the mark."""
    body_feat, mark_feat, labels, fractions = [], [], [], []
    for cls in range(classes):
        for index in range(n):
            s = syn.render_sample(preset, 3, split, cls, index, size)
            img = s.image.astype(np.float64)
            mark = np.logical_or.reduce(s.marks) if s.marks else np.zeros_like(s.mask)
            body_feat.append(img[s.mask & ~mark].mean(axis=0))
            mark_feat.append(img[mark].mean(axis=0) if mark.any() else np.zeros(3))
            labels.append(cls)
            fractions += [mk.sum() / b.sum() for b, mk in zip(s.instance_masks, s.marks)]
    return np.array(body_feat), np.array(mark_feat), np.array(labels), np.array(fractions)


def _nearest_mean_accuracy(x_train, y_train, x_test, y_test) -> float:
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in np.unique(y_train)])
    pred = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    return float((pred == y_test).mean())


def test_shapes_classes_separable_by_object_colour():
    xa, _, ya, _ = _features("shapes", "train", 8)
    xb, _, yb, _ = _features("shapes", "test", 8)
    assert _nearest_mean_accuracy(xa, ya, xb, yb) >= 0.9


def test_parts_only_the_small_mark_carries_the_class():
    xa, ma, ya, fa = _features("parts", "train", 10)
    xb, mb, yb, fb = _features("parts", "test", 10)
    fractions = np.concatenate([fa, fb])
    assert len(fractions) >= 80 and (fractions > 0).all()
    assert fractions.max() <= 0.10 and np.median(fractions) < 0.09, "the mark must be small relative to the body"
    # the mark's colour gives the class away ...
    assert _nearest_mean_accuracy(ma, ya, mb, yb) >= 0.9
    # ... the rest of the object does not (chance is 0.25)
    assert _nearest_mean_accuracy(xa, ya, xb, yb) < 0.55
    class_means = np.stack([np.concatenate([xa, xb])[np.concatenate([ya, yb]) == c].mean(0) for c in range(4)])
    assert np.ptp(class_means, axis=0).max() < 25.0, class_means


@pytest.mark.parametrize("n_instances", [1, 2])
def test_parts_class_changes_only_the_mark_pixels(n_instances):
    """Same random stream, other class: same bodies, same pixels outside the marks."""
    render = syn.PRESETS["parts"].render
    for k in range(3):
        samples = [render(np.random.default_rng(k), cls, 48, n_instances) for cls in range(5)]
        ref = samples[0]
        assert len(ref.marks) == len(ref.instance_masks) == n_instances
        for s in samples[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(ref.instance_masks, s.instance_masks))
            outside = ~(np.logical_or.reduce(ref.marks) | np.logical_or.reduce(s.marks))
            assert np.array_equal(ref.image[outside], s.image[outside])
            for body, mark in zip(s.instance_masks, s.marks):
                assert mark.any() and not (mark & ~body).any(), "the mark lies on its body"


# --------------------------------------------------------------------------- #
# Arguments and the output folder
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(preset="nope"), "nope"),
        (dict(image_size=syn.MIN_IMAGE_SIZE - 1), f"image_size must be in [{syn.MIN_IMAGE_SIZE}"),
        (dict(image_size=8), "got 8"),
        (dict(image_size=64.0), "image_size must be an integer, got 64.0"),
        (dict(num_classes=0), "num_classes must be in [1,"),
        (dict(num_classes=10_000), "got 10000"),
        (dict(train_per_class=-1), "train_per_class must be >= 1, got -1"),
        (dict(val_per_class=-2), "val_per_class must be >= 1, got -2"),
        (dict(test_per_class=-3), "test_per_class must be >= 1, got -3"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
    ],
)
def test_bad_arguments_name_the_value_and_write_nothing(tmp_path, kwargs, needle):
    args = dict(TINY, seed=0)
    args.update(kwargs)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        syn.write_synthetic_dataset(out, **args)
    assert needle in str(err.value)
    assert not out.exists()


def test_out_is_a_file(tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="not a folder") as err:
        syn.write_synthetic_dataset(out, **TINY)
    assert str(out) in str(err.value)
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    "content",
    [
        {"notes.txt": "mine"},  # someone's folder
        {"dataset.json": '{"generator": "someone-else"}', "images": None},  # another data set
        {"dataset.json": "not json", "README.txt": "x"},
    ],
)
def test_refuses_a_foreign_non_empty_folder(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in content.items():
        if text is None:
            (out / name).mkdir()
            (out / name / "photo.png").write_bytes(b"png")
        else:
            (out / name).write_text(text)
    before = tree_bytes(out)
    with pytest.raises(ValueError, match="not empty") as err:
        syn.write_synthetic_dataset(out, **TINY)
    assert str(out) in str(err.value)
    assert tree_bytes(out) == before, "a refused folder must be left untouched"


def test_refuses_previous_set_with_foreign_entries(tmp_path):
    out = tmp_path / "out"
    syn.write_synthetic_dataset(out, **TINY)
    (out / "my_results.csv").write_text("precious")
    with pytest.raises(ValueError, match="my_results.csv"):
        syn.write_synthetic_dataset(out, **TINY)
    assert (out / "my_results.csv").read_text() == "precious"
    assert (out / "images").is_dir()


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    summary = syn.write_synthetic_dataset(out, **TINY)
    assert summary["train"] == 4 and (out / "dataset.json").is_file()


def test_rewriting_a_previous_set(tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    syn.write_synthetic_dataset(out, **dict(TINY, num_classes=3, train_per_class=3, seed=1))
    # rewriting with other arguments replaces everything (no stale class_02 files)
    (out / ".README.txt.tmp4242").write_text("left over by an interrupted run")
    second = dict(TINY, preset="shapes", seed=2)
    summary = syn.write_synthetic_dataset(out, **second)
    syn.write_synthetic_dataset(fresh, **second)
    assert tree_bytes(out) == tree_bytes(fresh)
    # and rewriting with the same arguments is idempotent
    assert syn.write_synthetic_dataset(out, **second) == summary
    assert tree_bytes(out) == tree_bytes(fresh)


def test_interrupted_set_can_be_rewritten(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = syn.render_sample

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.write_synthetic_dataset(out, **TINY)
    monkeypatch.setattr(syn, "render_sample", real)
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    summary = syn.write_synthetic_dataset(out, **TINY)
    check_dataset(out, summary, TINY["image_size"], TINY["num_classes"], _per_class(TINY))
