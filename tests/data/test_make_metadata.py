"""Metadata for one's own data: image trees, box files, splits, and every bad input named."""

import contextlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnpo.data.make_metadata import (
    CLASS_NAMES,
    AnnotationError,
    make_metadata,
    read_box_csv,
    read_class_names,
    read_coco_boxes,
    read_voc_boxes,
    scan_image_tree,
)
from mnpo.data.make_metadata import _assign_splits
from mnpo.data.metadata import read_split

CLASSES = ("cat", "bird", "dog")  # sorted: bird 0, cat 1, dog 2


def image(path, w, h, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(path, fmt)


def class_tree(root, per_class=10):
    """ROOT/<class>/<k>.png (sizes 40+k x 30+k) and boxes in CSV form for every image."""
    lines = []
    for name in CLASSES:
        for k in range(per_class):
            image(root / name / f"{k:02d}.png", 40 + k, 30 + k)
            lines.append(f"{name}/{k:02d}.png,{k},1,{20 + k},{29 + k}")
    return lines


def write_csv(path, lines, header=False):
    path.write_text(("path,x0,y0,x1,y1\n" if header else "") + "\n".join(lines) + "\n")
    return path


def test_class_layout_split_per_class_and_written_as_read(tmp_path):
    root, out = tmp_path / "images", tmp_path / "meta"
    boxes = read_box_csv(write_csv(tmp_path / "boxes.csv", class_tree(root), header=True))
    splits = make_metadata(root, out, boxes=boxes, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert read_class_names(out / CLASS_NAMES) == ["bird", "cat", "dog"]
    every = set()
    for split, meta in splits.items():
        assert read_split(out / split) == meta  # the files say what was returned
        assert every.isdisjoint(meta.image_ids)
        every |= set(meta.image_ids)
        per_class = np.bincount(list(meta.labels.values()), minlength=3)
        assert per_class.tolist() == ([6, 6, 6] if split == "train" else [2, 2, 2])
        for image_id in meta.image_ids:
            name, k = image_id.split("/")[0], int(image_id.split("/")[1][:2])
            assert meta.labels[image_id] == sorted(CLASSES).index(name)
            assert meta.sizes[image_id] == (40 + k, 30 + k)
            assert meta.boxes[image_id].tolist() == [[k, 1, 20 + k, 29 + k]]
    assert len(every) == 30
    again = make_metadata(root, tmp_path / "again", boxes=boxes, val_fraction=0.2, test_fraction=0.2, seed=3)
    other = make_metadata(root, tmp_path / "other", boxes=boxes, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert again["test"].image_ids == splits["test"].image_ids  # seeded
    assert other["test"].image_ids != splits["test"].image_ids


def test_split_layout_keeps_the_folders_and_train_needs_no_boxes(tmp_path, caplog):
    root = tmp_path / "images"
    lines = []
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for name in ("a", "b"):
            for k in range(n):
                image(root / split / name / "sub" / f"{k}.jpg", 50, 40, "JPEG")
                if split != "train" or k == 0:
                    lines.append(f"{split}/{name}/sub/{k}.jpg,0,0,49,39")
    splits = make_metadata(root, tmp_path / "meta", boxes=read_box_csv(write_csv(tmp_path / "b.csv", lines)),
                           class_names=["b", "a", "unused"])
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 4]
    assert splits["test"].labels["test/a/sub/0.jpg"] == 1 and splits["test"].labels["test/b/sub/1.jpg"] == 0
    assert splits["train"].boxes is None and splits["val"].boxes is not None
    assert not (tmp_path / "meta" / "train" / "localization.txt").exists()
    assert "4 of the 6 train images have no box" in caplog.text
    assert read_class_names(tmp_path / "meta" / CLASS_NAMES) == ["b", "a", "unused"]


def test_voc_boxes_are_one_based_inclusive(tmp_path):
    root = tmp_path / "images"
    image(root / "cat" / "x.png", 60, 50)
    image(root / "dog" / "y.png", 60, 50)
    voc = tmp_path / "voc"
    (voc / "cat").mkdir(parents=True)
    xml = ("<annotation><filename>{}</filename>" + "<object><name>o</name><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
           "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>" * 2 + "</annotation>")
    (voc / "cat" / "x.xml").write_text(xml.format("x.png", 1, 1, 60, 50, 10, 20, 30.4, 40))  # under its path
    (voc / "y.xml").write_text(xml.format("y.png", 5, 6, 7, 8, 1, 2, 3, 4))  # flat, by file name
    boxes = read_voc_boxes(voc, ["cat/x.png", "dog/y.png"])
    assert boxes == {"cat/x.png": [(0, 0, 59, 49), (9, 19, 29, 39)], "dog/y.png": [(4, 5, 6, 7), (0, 1, 2, 3)]}
    image(root / "bird" / "y.png", 60, 50)  # a second y.png: the flat y.xml is ambiguous
    with pytest.raises(AnnotationError, match=r"y.xml: claimed by \['bird/y.png', 'dog/y.png'\]"):
        read_voc_boxes(voc, ["bird/y.png", "cat/x.png", "dog/y.png"])
    (voc / "cat" / "x.xml").write_text("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    with pytest.raises(AnnotationError, match=r"x.xml: object 1: <bndbox> without <ymin>"):
        read_voc_boxes(voc, ["cat/x.png"])
    (voc / "cat" / "x.xml").write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match=r"x.xml: not valid XML"):
        read_voc_boxes(voc, ["cat/x.png"])


def test_coco_boxes_match_paths_then_unique_file_names(tmp_path):
    ids = ["cat/a.jpg", "dog/b.jpg", "dog/c.jpg"]
    coco = {"images": [{"id": 1, "file_name": "cat/a.jpg"}, {"id": 2, "file_name": "somewhere/b.jpg"},
                       {"id": 3, "file_name": "not-ours.jpg"}],
            "annotations": [{"image_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0]},
                            {"image_id": 1, "bbox": [0.4, 0.6, 0.2, 0.2]},
                            {"image_id": 2, "bbox": [1, 2, 3, 4]}, {"image_id": 3, "bbox": [1, 1, 1, 1]}]}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    assert read_coco_boxes(path, ids) == {"cat/a.jpg": [(10, 20, 39, 59), (0, 1, 0, 1)], "dog/b.jpg": [(1, 2, 3, 5)]}
    coco["annotations"][2]["bbox"] = [1, 2, 0, 4]
    path.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match=r"coco.json: annotations\[2\] bbox must be \[x, y, w, h\] with w, h > 0"):
        read_coco_boxes(path, ids)
    with pytest.raises(AnnotationError, match=r"file_name 'somewhere/b.jpg' matches several images"):
        read_coco_boxes(path, [*ids, "cat/b.jpg"])
    path.write_text("{\"images\": []}")
    with pytest.raises(AnnotationError, match="needs 'images' and 'annotations' lists"):
        read_coco_boxes(path, ids)
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="cannot read COCO JSON"):
        read_coco_boxes(path, ids)


@pytest.mark.parametrize("text, message", [
    ("cat/0.png,1,2,3\n", r"b.csv:1: expected path,x0,y0,x1,y1, got 4 fields"),
    ("cat/0.png,1,2,3,4\ncat/1.png,1,2,3.5,4\n", r"b.csv:2: box coordinates must be integers"),
])
def test_box_csv_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_box_csv(tmp_path / "b.csv")


def test_bad_trees_and_boxes_are_named_and_nothing_is_written(tmp_path):
    root, out = tmp_path / "images", tmp_path / "meta"
    lines = class_tree(root, per_class=5)
    boxes = read_box_csv(write_csv(tmp_path / "b.csv", lines))

    def fails(match, **kwargs):
        with pytest.raises((AnnotationError, ValueError), match=match):
            make_metadata(kwargs.pop("root", root), out, **{"boxes": boxes, **kwargs})
        assert not out.exists()

    fails(r"box \[0, 1, 45, 29\] of 'bird/00.png' does not lie in its 40x30 image",
          boxes={**boxes, "bird/00.png": [(0, 1, 45, 29)]})
    some = {k: v for k, v in boxes.items() if k != "cat/03.png"}
    with pytest.raises(AnnotationError, match=r"1 of the 3 (val|test) images have no box, e.g. \['cat/03.png'\]"):
        make_metadata(root, out, boxes=some, val_fraction=0.2, test_fraction=0.2, seed=_seed_putting(root, "cat/03.png"))
    fails(r"boxes given for 1 images not under .*: \['cat/99.png'\]", boxes={**boxes, "cat/99.png": [(0, 0, 1, 1)]})
    fails(r"class folders \['dog'\] are not in the class list", class_names=["bird", "cat"])
    fails(r"val_fraction \+ test_fraction must be below 1", val_fraction=0.5, test_fraction=0.5)
    fails(r"test_fraction must be in \[0, 1\)", test_fraction=-0.1)
    fails(r"split 'val' gets no images", val_fraction=0.0)
    (root / "dog" / "04.png").write_bytes(b"not an image")
    fails(r"1 images under .* cannot be read: dog/04.png \(UnidentifiedImageError")
    (root / "dog" / "04.png").unlink()
    image(root / "loose.png", 10, 10)
    fails(r"images must sit in class folders, found \['loose.png'\]")
    (root / "loose.png").unlink()
    image(root / "train" / "cat" / "0.png", 10, 10)
    fails(r"holds split folders \['train'\] and other folders \['bird', 'cat', 'dog'\]")
    (tmp_path / "empty-tree" / "cat").mkdir(parents=True)
    fails(r"no images found", root=tmp_path / "empty-tree")
    image(tmp_path / "comma" / "a,b" / "0.png", 10, 10)
    fails(r"a comma in the path", root=tmp_path / "comma")


def _seed_putting(root, image_id):
    """A seed whose 0.2/0.2 split puts ``image_id`` into val or test (the split is seeded)."""
    images = scan_image_tree(root)
    from mnpo.data.make_metadata import _assign_splits

    return next(s for s in range(100) if _assign_splits(images, 0.2, 0.2, s)[image_id] != "train")


def test_class_names_file_errors(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("a\n\nb\n")
    with pytest.raises(AnnotationError, match=r"names.txt:2: empty class name"):
        read_class_names(path)
    path.write_text("a\nb\na\n")
    with pytest.raises(AnnotationError, match=r"names.txt:3: class 'a' listed twice"):
        read_class_names(path)
    path.write_text("a\nb\n\n")
    assert read_class_names(path) == ["a", "b"]


def test_cli_writes_metadata_and_names_a_second_box_source(tmp_path):
    root = tmp_path / "images"
    csv_path = write_csv(tmp_path / "b.csv", class_tree(root, per_class=5))
    run = [sys.executable, "-m", "mnpo", "make-metadata", str(root), str(tmp_path / "meta")]
    done = subprocess.run([*run, "--boxes", str(csv_path), "--val-fraction", "0.2", "--test-fraction", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 classes; train 9 images (9 boxes), val 3 images (3 boxes), test 3 images (3 boxes)" in done.stdout
    assert len(read_split(tmp_path / "meta" / "test")) == 3
    done = subprocess.run([*run, "--boxes", str(csv_path), "--coco", "x.json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "give one source of boxes or masks, not --boxes, --coco" in done.stderr


def mask_file(path, w, h, box, value=255):
    """An 'L' PNG mask of w x h, ``value`` inside the inclusive ``box`` (x0, y0, x1, y1), 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1 + 1, x0:x1 + 1] = value
    Image.fromarray(pixels).save(path)


def mask_tree(masks, per_class=5):
    """MASKS/<class>/<k>.png for class_tree's images: the object is x in [k, 20+k], y in [1, 29+k];
    even k also get an ignore mask (a 3-pixel band right of the object)."""
    for name in CLASSES:
        for k in range(per_class):
            mask_file(masks / name / f"{k:02d}.png", 40 + k, 30 + k, (k, 1, 20 + k, 29 + k), value=1 + k)
            if k % 2 == 0:
                mask_file(masks / name / f"{k:02d}.ignore.png", 40 + k, 30 + k, (21 + k, 0, 23 + k, 29 + k))


def test_masks_are_written_as_mask_splits_that_pxap_reads(tmp_path):
    from mnpo.engine.evaluate_maps import evaluate_map_folders
    from mnpo.metrics.masks import BACKGROUND, FOREGROUND, IGNORE, load_gt_mask

    root, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "meta"
    class_tree(root, per_class=5)
    mask_tree(masks, per_class=5)
    for hidden in (masks / ".git" / "objects" / "x.png", masks / "cat" / ".DS_Store"):  # skipped, not stray
        hidden.parent.mkdir(parents=True, exist_ok=True)
        hidden.write_bytes(b"")
    splits = make_metadata(root, out, masks=masks, val_fraction=0.2, test_fraction=0.2, seed=1)
    for split, meta in splits.items():
        assert meta.kind == "mask" and read_split(out / split) == meta
        for image_id in meta.image_ids:
            stem, k = image_id[:-4], int(image_id.split("/")[1][:2])
            assert meta.mask_paths[image_id] == (f"{stem}.png",)
            assert meta.ignore_paths[image_id] == (f"{stem}.ignore.png" if k % 2 == 0 else "")
    # the evaluation reads what was written: the ground truth at its own size, and PxAP 100 for
    # maps that are the foreground itself
    test = splits["test"]
    for image_id in test.image_ids:
        k = int(image_id.split("/")[1][:2])
        gt = load_gt_mask(masks, test.mask_paths[image_id], test.ignore_paths[image_id])  # 224 x 224
        assert set(np.unique(gt)) == ({FOREGROUND, BACKGROUND, IGNORE} if k % 2 == 0 else {FOREGROUND, BACKGROUND})
        object_area = 21 * (29 + k) / ((40 + k) * (30 + k))  # the drawn rectangle, as a fraction of the image
        # read at 224 x 224: each edge of the rectangle moves by at most one row or column of
        # 224, so the fraction moves by at most 2 * 2 / 224 = 0.018
        assert (gt == FOREGROUND).mean() == pytest.approx(object_area, abs=0.03)
    maps = tmp_path / "maps"
    for image_id in test.image_ids:
        path = maps / f"{image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = load_gt_mask(masks, test.mask_paths[image_id], test.ignore_paths[image_id])
        np.save(path, (mask == FOREGROUND).astype(np.float32))
    report = evaluate_map_folders(maps, out / "test", mask_root=masks)
    assert report.oracle["pxap"].value == pytest.approx(100.0)


def test_bad_masks_are_named_and_nothing_is_written(tmp_path, caplog):
    root, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "meta"
    class_tree(root, per_class=5)
    mask_tree(masks, per_class=5)

    def fails(match, **kwargs):
        with pytest.raises((AnnotationError, ValueError), match=match):
            make_metadata(root, out, **{"masks": masks, **kwargs})
        assert not out.exists()

    @contextlib.contextmanager
    def moved(path, to):  # a file renamed for one check
        path.rename(to)
        try:
            yield
        finally:
            to.rename(path)

    fails(r"give boxes or masks, not both", boxes={"cat/00.png": [(0, 0, 1, 1)]})
    fails(r"nowhere: mask folder not found", masks=tmp_path / "nowhere")
    with moved(masks / "cat" / "03.png", masks / "cat" / "03_mask.png"):
        fails(r"1 files belong to no image, e.g. \['cat/03_mask.png'\]")
    with moved(masks / "cat" / "01.png", tmp_path / "spare.png"):
        # without its mask, cat/01 is unannotated: an error in val and test, a warning in train
        seed = _seed_putting(root, "cat/01.png")
        with pytest.raises(AnnotationError, match=r"1 of the 3 (val|test) images have no mask, e.g. \['cat/01.png'\]"):
            make_metadata(root, out, masks=masks, val_fraction=0.2, test_fraction=0.2, seed=seed)
        assert not out.exists()
        train_seed = next(s for s in range(100) if s != seed and
                          _assign_splits(scan_image_tree(root), 0.2, 0.2, s)["cat/01.png"] == "train")
        splits = make_metadata(root, out, masks=masks, val_fraction=0.2, test_fraction=0.2, seed=train_seed)
        assert splits["train"].kind == "none" and splits["test"].kind == "mask"
        assert "1 of the 9 train images have no mask" in caplog.text
        shutil.rmtree(out)
    with moved(masks / "cat" / "02.png", tmp_path / "spare.png"):
        fails(r"ignore masks without their mask: \['cat/02.ignore.png'\]")
    mask_file(masks / "dog" / "01.png", 30, 30, (0, 0, 5, 5))
    fails(r"1 masks do not fit their images: .*dog/01.png: 30x30, but its image is 41x31")
    mask_file(masks / "dog" / "01.png", 41, 31, (0, 0, 5, 5), value=0)
    fails(r"dog/01.png: no object pixel \(every pixel is 0\)")
    mask_file(masks / "dog" / "01.png", 41, 31, (0, 0, 5, 5))
    mask_file(masks / "dog" / "02.ignore.png", 41, 31, (0, 0, 5, 5))
    fails(r"dog/02.ignore.png: 41x31, but its image is 42x32")
    (masks / "dog" / "02.ignore.png").write_bytes(b"not a png")
    fails(r"dog/02.ignore.png: cannot be read \(not an image format PIL can read\)")
    mask_file(masks / "dog" / "02.ignore.png", 42, 32, (0, 0, 5, 5))
    make_metadata(root, out, masks=masks)  # mended: it goes through
    shutil.rmtree(out)
    image(root / "dog" / "00.jpg", 40, 30, "JPEG")
    fails(r"dog/00.png would be the mask of 'dog/00.jpg' and the mask of 'dog/00.png'; rename one")


def test_cli_writes_mask_metadata_and_says_how_to_train(tmp_path):
    root, masks = tmp_path / "images", tmp_path / "masks"
    class_tree(root, per_class=5)
    mask_tree(masks, per_class=5)
    done = subprocess.run([sys.executable, "-m", "mnpo", "make-metadata", str(root), str(tmp_path / "meta"),
                           "--masks", str(masks), "--val-fraction", "0.2", "--test-fraction", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 classes; train 9 images (9 masks), val 3 images (3 masks), test 3 images (3 masks)" in done.stdout
    assert f"data.mask_root={masks} eval.metric=pxap" in done.stdout


def test_exif_orientation_is_named_and_sizes_stay_in_the_stored_grid(tmp_path, caplog):
    root = tmp_path / "images"
    lines = class_tree(root, per_class=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers show this image turned 90 degrees: 31 x 41
    Image.new("RGB", (41, 31)).save(root / "cat" / "01.png", exif=exif)
    splits = make_metadata(root, tmp_path / "meta", boxes=read_box_csv(write_csv(tmp_path / "b.csv", lines)))
    split = next(m for m in splits.values() if "cat/01.png" in m.sizes)
    assert split.sizes["cat/01.png"] == (41, 31)
    assert "1 images carry an EXIF orientation tag, e.g. cat/01.png (6)" in caplog.text
