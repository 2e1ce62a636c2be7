"""Tests of the wsolevaluation metadata reader and writer (mnpo.data.metadata).

The real wsolevaluation metadata is looked for at ``<repo>/../shared/wsol-metadata``
(override: ``MNPO_WSOL_METADATA``); the tests on it are skipped when it is absent.
The expected counts below were computed with an independent script (plain
``str.split`` over the files, counting records, not ``wc -l``, whose count is one
short because the last line of every file lacks its newline).
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnpo.data import metadata as md
from mnpo.data.metadata import MetadataError, SplitMetadata, read_split, write_split


def _real_root() -> Path:
    env = os.environ.get("MNPO_WSOL_METADATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "wsol-metadata"


REAL = _real_root()

# split: (images, num_classes, kind, boxes or masks, has image_sizes.txt)
REAL_COUNTS = {
    "CUB/train": (5994, 200, "box", 5994, True),
    "CUB/val": (1000, 200, "box", 1000, True),
    "CUB/test": (5794, 200, "box", 5794, True),
    "ILSVRC/val": (10000, 1000, "box", 18532, True),
    "ILSVRC/test": (50000, 1000, "box", 80477, True),
    "OpenImages/train": (29819, 100, "none", 0, False),
    "OpenImages/val": (2500, 100, "mask", 3854, False),
    "OpenImages/test": (5000, 100, "mask", 7632, False),
}


def _real_split(split: str) -> Path:
    folder = REAL / split
    if not (folder / "image_ids.txt").is_file():
        pytest.skip(f"real wsolevaluation metadata not found at {folder} (set MNPO_WSOL_METADATA)")
    return folder


# --------------------------------------------------------------------------- #
# The real files
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("split", sorted(REAL_COUNTS))
def test_real_split_counts(split):
    folder = _real_split(split)
    n_images, n_classes, kind, n_loc, has_sizes = REAL_COUNTS[split]
    start = time.perf_counter()
    meta = read_split(folder, num_classes=n_classes)
    elapsed = time.perf_counter() - start
    assert elapsed < 8.0, f"{split} took {elapsed:.2f} s to read"
    assert len(meta) == n_images
    assert meta.num_classes == n_classes
    assert set(meta.labels.values()) == set(range(n_classes))
    assert meta.kind == kind
    assert (meta.sizes is not None) == has_sizes
    if kind == "box":
        assert meta.num_boxes == n_loc
        assert all(b.dtype == np.int64 and b.ndim == 2 and b.shape[1] == 4 for b in meta.boxes.values())
    elif kind == "mask":
        assert meta.num_masks == n_loc
        # every image has an ignore mask, named on its first line
        assert all(meta.ignore_paths.values())
    else:
        assert meta.boxes is None and meta.mask_paths is None
    # file order is kept: compare with the raw first and last lines
    raw = (folder / "image_ids.txt").read_text().split("\n")
    assert meta.image_ids[0] == raw[0] and meta.image_ids[-1] == raw[-1] != ""


def test_real_first_records():
    meta = read_split(_real_split("CUB/test"))
    first = "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert meta.image_ids[0] == first
    assert meta.labels[first] == 0
    assert meta.sizes[first] == (500, 335)
    assert meta.boxes[first].tolist() == [[60, 27, 385, 331]]


@pytest.mark.parametrize("split", ["CUB/train", "CUB/val", "CUB/test", "ILSVRC/val", "ILSVRC/test"])
def test_real_boxes_are_inside_inclusive_bound(split):
    """The fact behind the documented bound: real boxes end at most on the last pixel."""
    meta = read_split(_real_split(split))
    ids = meta.image_ids
    boxes = np.concatenate([meta.boxes[i] for i in ids])
    wh = np.repeat(np.array([meta.sizes[i] for i in ids]), [len(meta.boxes[i]) for i in ids], axis=0)
    assert (boxes >= 0).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert max((boxes[:, 2] - wh[:, 0]).max(), (boxes[:, 3] - wh[:, 1]).max()) == -1


def test_real_ilsvrc_multi_box_images():
    meta = read_split(_real_split("ILSVRC/val"))
    counts = np.array([len(meta.boxes[i]) for i in meta.image_ids])
    assert counts.min() == 1 and counts.sum() == 18532
    # boxes of an image keep the file order
    lines = (REAL / "ILSVRC/val/localization.txt").read_text().split("\n")
    multi = next(i for i in meta.image_ids if len(meta.boxes[i]) > 1)
    expected = [[int(v) for v in line.split(",")[1:]] for line in lines if line.split(",")[0] == multi]
    assert meta.boxes[multi].tolist() == expected


def test_real_openimages_mask_lines():
    meta = read_split(_real_split("OpenImages/val"))
    first = meta.image_ids[0]
    assert meta.mask_paths[first] == ("val/01226z/32fdab44f6e415f1_m01226z_7dab3053.png",)
    assert meta.ignore_paths[first] == "val/01226z/32fdab44f6e415f1_ignore.png"
    assert max(len(m) for m in meta.mask_paths.values()) > 1


def test_real_num_classes_too_small_is_rejected():
    folder = _real_split("CUB/val")
    with pytest.raises(MetadataError, match=r"label 199 >= num_classes 199") as err:
        read_split(folder, num_classes=199)
    assert err.value.path.endswith("class_labels.txt")


def test_real_round_trip(tmp_path):
    for split in ("CUB/val", "OpenImages/val"):
        meta = read_split(_real_split(split))
        write_split(tmp_path / split, meta)
        assert read_split(tmp_path / split) == meta


# --------------------------------------------------------------------------- #
# A small valid split and its corruptions
# --------------------------------------------------------------------------- #
BOX_FILES = {
    "image_ids.txt": ["a/1.jpg", "a/2.jpg", "b/3.jpg"],
    "class_labels.txt": ["a/1.jpg,0", "a/2.jpg,0", "b/3.jpg,1"],
    "image_sizes.txt": ["a/1.jpg,100,80", "a/2.jpg,50,40", "b/3.jpg,30,30"],
    "localization.txt": ["a/1.jpg,10,10,50,60", "a/1.jpg,0,0,99,79", "a/2.jpg,1,2,3,4", "b/3.jpg,0,0,30,30"],
}
MASK_FILES = {
    "image_ids.txt": BOX_FILES["image_ids.txt"],
    "class_labels.txt": BOX_FILES["class_labels.txt"],
    "localization.txt": [
        "a/1.jpg,m/1_0.png,m/1_ignore.png",
        "a/1.jpg,m/1_1.png,",
        "a/2.jpg,m/2_0.png,m/2_ignore.png",
        "b/3.jpg,m/3_0.png,",
    ],
}


def _write(folder: Path, files: dict[str, list[str]], final_newline: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_bytes(("\n".join(lines) + ("\n" if final_newline else "")).encode("utf-8"))
    return folder


def _box_meta() -> SplitMetadata:
    return SplitMetadata(
        image_ids=("a/1.jpg", "a/2.jpg", "b/3.jpg"),
        labels={"a/1.jpg": 0, "a/2.jpg": 0, "b/3.jpg": 1},
        sizes={"a/1.jpg": (100, 80), "a/2.jpg": (50, 40), "b/3.jpg": (30, 30)},
        boxes={
            "a/1.jpg": np.array([[10, 10, 50, 60], [0, 0, 99, 79]]),
            "a/2.jpg": np.array([[1, 2, 3, 4]]),
            "b/3.jpg": np.array([[0, 0, 30, 30]]),
        },
    )


def _mask_meta() -> SplitMetadata:
    return SplitMetadata(
        image_ids=("a/1.jpg", "a/2.jpg", "b/3.jpg"),
        labels={"a/1.jpg": 0, "a/2.jpg": 0, "b/3.jpg": 1},
        mask_paths={"a/1.jpg": ("m/1_0.png", "m/1_1.png"), "a/2.jpg": ("m/2_0.png",), "b/3.jpg": ("m/3_0.png",)},
        ignore_paths={"a/1.jpg": "m/1_ignore.png", "a/2.jpg": "m/2_ignore.png", "b/3.jpg": ""},
    )


def test_valid_small_splits_parse(tmp_path):
    assert read_split(_write(tmp_path / "box", BOX_FILES)) == _box_meta()
    assert read_split(_write(tmp_path / "mask", MASK_FILES)) == _mask_meta()
    box = read_split(tmp_path / "box")
    assert box.kind == "box" and box.num_classes == 2 and len(box) == 3 and box.num_boxes == 4
    assert _mask_meta().kind == "mask" and _mask_meta().num_masks == 4


def _replace(lines: list[str], line: int, text: str | None) -> list[str]:
    out = list(lines)
    if text is None:
        del out[line - 1]
    else:
        out[line - 1] = text
    return out


def _insert(lines: list[str], line: int, text: str) -> list[str]:
    return lines[: line - 1] + [text] + lines[line - 1:]


# (base, file to change, its new lines, file named in the error, line, what)
BAD_CASES = {
    # wrong number of fields / non-integers / empty paths
    "labels-too-few-fields": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg"),
                              "class_labels.txt", 2, "expected 2 comma-separated fields (path,label), got 1"),
    "labels-too-many-fields": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg,0,1"),
                               "class_labels.txt", 2, "expected 2 comma-separated fields (path,label), got 3"),
    "label-not-int": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg,x"),
                      "class_labels.txt", 2, "label 'x' is not an integer"),
    "label-with-space": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg, 1"),
                         "class_labels.txt", 2, "label ' 1' is not an integer"),
    "label-with-plus": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 3, "b/3.jpg,+1"),
                        "class_labels.txt", 3, "label '+1' is not an integer"),
    "label-empty": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 3, "b/3.jpg,"),
                    "class_labels.txt", 3, "label '' is not an integer"),
    "label-negative": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg,-1"),
                       "class_labels.txt", 2, "negative label -1"),
    "label-huge": ("box", "class_labels.txt",
                   _replace(BOX_FILES["class_labels.txt"], 2, "a/2.jpg,99999999999999999999"),
                   "class_labels.txt", 2, "out of the int64 range"),
    "labels-empty-path": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, ",0"),
                          "class_labels.txt", 2, "empty path"),
    "labels-duplicate": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "a/1.jpg,0"),
                         "class_labels.txt", 2, "duplicate image id (first at line 1)"),
    "labels-unknown-id": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, "z/9.jpg,0"),
                          "class_labels.txt", 2, "image id not in"),
    "labels-empty-line-in-middle": ("box", "class_labels.txt", _insert(BOX_FILES["class_labels.txt"], 2, ""),
                                    "class_labels.txt", 2, "empty line"),
    "labels-bom-in-middle": ("box", "class_labels.txt",
                             _replace(BOX_FILES["class_labels.txt"], 2, "\ufeffa/2.jpg,0"),
                             "class_labels.txt", 2, "image id not in"),
    # image_ids.txt
    "ids-duplicate": ("box", "image_ids.txt", _replace(BOX_FILES["image_ids.txt"], 3, "a/1.jpg"),
                      "image_ids.txt", 3, "duplicate image id (first at line 1)"),
    "ids-empty-line-in-middle": ("box", "image_ids.txt", _insert(BOX_FILES["image_ids.txt"], 2, ""),
                                 "image_ids.txt", 2, "empty line"),
    "ids-whitespace": ("box", "image_ids.txt", _replace(BOX_FILES["image_ids.txt"], 2, " a/2.jpg"),
                       "image_ids.txt", 2, "path has leading or trailing whitespace"),
    "ids-comma": ("box", "image_ids.txt", _replace(BOX_FILES["image_ids.txt"], 2, "a/2.jpg,0"),
                  "image_ids.txt", 2, "path contains a comma"),
    "ids-lone-cr": ("box", "image_ids.txt", _replace(BOX_FILES["image_ids.txt"], 2, "a/2\r.jpg"),
                    "image_ids.txt", 2, "path contains a line break"),
    # image_sizes.txt
    "size-zero": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 1, "a/1.jpg,0,80"),
                  "image_sizes.txt", 1, "image size must be positive, got w=0, h=80"),
    "size-negative": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 2, "a/2.jpg,50,-5"),
                      "image_sizes.txt", 2, "image size must be positive, got w=50, h=-5"),
    "size-too-few-fields": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 1, "a/1.jpg,100"),
                            "image_sizes.txt", 1, "expected 3 comma-separated fields (path,w,h), got 2"),
    "size-float": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 1, "a/1.jpg,1e2,80"),
                   "image_sizes.txt", 1, "w '1e2' is not an integer"),
    "size-duplicate": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 3, "a/1.jpg,100,80"),
                       "image_sizes.txt", 3, "duplicate image id (first at line 1)"),
    # localization.txt, boxes
    "box-x1-lt-x0": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 1, "a/1.jpg,50,10,10,60"),
                     "localization.txt", 1, "box x1 < x0 (10 < 50)"),
    "box-y1-lt-y0": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 2, "a/1.jpg,10,60,50,10"),
                     "localization.txt", 2, "box y1 < y0 (10 < 60)"),
    "box-negative": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, "a/2.jpg,-1,2,3,4"),
                     "localization.txt", 3, "negative box coordinate"),
    "box-x1-past-width": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 2, "a/1.jpg,0,0,101,79"),
                          "localization.txt", 2, "box (0,0,101,79) outside the 100x80 image"),
    "box-y1-past-height": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 4, "b/3.jpg,0,0,30,31"),
                           "localization.txt", 4, "box (0,0,30,31) outside the 30x30 image"),
    "box-far-outside": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, "a/2.jpg,60,50,70,60"),
                        "localization.txt", 3, "outside the 50x40 image"),
    "box-too-few-fields": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 2, "a/1.jpg,0,0,99"),
                           "localization.txt", 2, "expected 5 comma-separated fields (path,x0,y0,x1,y1), got 4"),
    "box-mask-line-in-box-set": ("box", "localization.txt",
                                 _replace(BOX_FILES["localization.txt"], 3, "a/2.jpg,m.png,"),
                                 "localization.txt", 3, "expected 5 comma-separated fields"),
    "box-float": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, "a/2.jpg,1.5,2,3,4"),
                  "localization.txt", 3, "x0 '1.5' is not an integer"),
    "box-unknown-id": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, "a/9.jpg,1,2,3,4"),
                       "localization.txt", 3, "image id not in"),
    "box-empty-path": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, ",1,2,3,4"),
                       "localization.txt", 3, "empty path"),
    "loc-unknown-layout": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 1, "a/1.jpg,1,2,3"),
                           "localization.txt", 1, "expected 5 fields (path,x0,y0,x1,y1) or 3 fields"),
    "loc-empty-line-in-middle": ("box", "localization.txt", _insert(BOX_FILES["localization.txt"], 4, ""),
                                 "localization.txt", 4, "empty line"),
    # an id missing from one file: the error names the file that lacks it
    "missing-from-labels": ("box", "class_labels.txt", _replace(BOX_FILES["class_labels.txt"], 2, None),
                            "image_ids.txt", 2, "image id missing from {folder}/class_labels.txt"),
    "missing-from-sizes": ("box", "image_sizes.txt", _replace(BOX_FILES["image_sizes.txt"], 3, None),
                           "image_ids.txt", 3, "image id missing from {folder}/image_sizes.txt"),
    "missing-from-boxes": ("box", "localization.txt", _replace(BOX_FILES["localization.txt"], 3, None),
                           "image_ids.txt", 2, "image id missing from {folder}/localization.txt"),
    "missing-from-masks": ("mask", "localization.txt", _replace(MASK_FILES["localization.txt"], 4, None),
                           "image_ids.txt", 3, "image id missing from {folder}/localization.txt"),
    "empty-labels-file": ("box", "class_labels.txt", [],
                          "image_ids.txt", 1, "image id missing from {folder}/class_labels.txt"),
    "empty-ids-file": ("box", "image_ids.txt", [], "image_ids.txt", 1, "no image ids"),
    # localization.txt, masks
    "mask-second-ignore": ("mask", "localization.txt",
                           _replace(MASK_FILES["localization.txt"], 2, "a/1.jpg,m/1_1.png,m/other.png"),
                           "localization.txt", 2, "second ignore path for the image (first at line 1)"),
    "mask-ignore-not-on-first-line": ("mask", "localization.txt",
                                      MASK_FILES["localization.txt"] + ["b/3.jpg,m/3_1.png,m/3_ignore.png"],
                                      "localization.txt", 5, "ignore path after the image's first line (line 4)"),
    "mask-empty-mask-path": ("mask", "localization.txt", _replace(MASK_FILES["localization.txt"], 2, "a/1.jpg,,"),
                             "localization.txt", 2, "mask path: empty path"),
    "mask-duplicate-mask": ("mask", "localization.txt",
                            _replace(MASK_FILES["localization.txt"], 2, "a/1.jpg,m/1_0.png,"),
                            "localization.txt", 2, "mask path listed twice for the image"),
    "mask-too-few-fields": ("mask", "localization.txt",
                            _replace(MASK_FILES["localization.txt"], 2, "a/1.jpg,m/1_1.png"),
                            "localization.txt", 2,
                            "expected 3 comma-separated fields (path,mask_path,ignore_path), got 2"),
    "mask-box-line-in-mask-set": ("mask", "localization.txt",
                                  _replace(MASK_FILES["localization.txt"], 3, "a/2.jpg,1,2,3,4"),
                                  "localization.txt", 3, "expected 3 comma-separated fields"),
    "mask-unknown-id": ("mask", "localization.txt", _replace(MASK_FILES["localization.txt"], 3, "q.jpg,m/2_0.png,"),
                        "localization.txt", 3, "image id not in"),
    "mask-ignore-whitespace": ("mask", "localization.txt",
                               _replace(MASK_FILES["localization.txt"], 3, "a/2.jpg,m/2_0.png,m/2_ignore.png "),
                               "localization.txt", 3, "ignore path: path has leading or trailing whitespace"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_rejected_with_file_line_and_reason(tmp_path, case):
    base, name, lines, err_file, err_line, what = BAD_CASES[case]
    files = dict(BOX_FILES if base == "box" else MASK_FILES)
    files[name] = lines
    folder = _write(tmp_path / "split", files)
    with pytest.raises(MetadataError) as err:
        read_split(folder)
    exc = err.value
    message = str(exc)
    assert exc.path == str(folder / err_file)
    assert exc.line == err_line
    assert message.startswith(f"{folder / err_file}:{err_line}: ")
    assert what.format(folder=folder) in exc.what, message
    # the offending line's text, as read (repr), closes the message
    if err_file == name and lines:
        assert exc.text == lines[err_line - 1]
        assert message.endswith(f": {lines[err_line - 1]!r}")


def test_label_beyond_num_classes(tmp_path):
    folder = _write(tmp_path / "s", BOX_FILES)
    assert read_split(folder, num_classes=2).num_classes == 2
    with pytest.raises(MetadataError) as err:
        read_split(folder, num_classes=1)
    assert str(err.value) == f"{folder / 'class_labels.txt'}:3: label 1 >= num_classes 1: 'b/3.jpg,1'"
    with pytest.raises(ValueError, match="num_classes"):
        read_split(folder, num_classes=0)


def test_invalid_utf8_names_line_and_byte(tmp_path):
    folder = _write(tmp_path / "s", BOX_FILES)
    path = folder / "class_labels.txt"
    path.write_bytes(b"a/1.jpg,0\na/2\xff.jpg,0\nb/3.jpg,1")
    with pytest.raises(MetadataError) as err:
        read_split(folder)
    assert err.value.line == 2 and err.value.path == str(path)
    assert "not valid UTF-8 (byte 0xff at column 4)" in str(err.value)


def test_error_pickles():
    exc = MetadataError("/x/class_labels.txt", 7, "negative label -1", "a,-1")
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == str(exc) == "/x/class_labels.txt:7: negative label -1: 'a,-1'"
    assert (back.path, back.line, back.what, back.text) == (exc.path, 7, exc.what, exc.text)
    assert isinstance(back, ValueError)


def test_missing_required_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_ids.txt"):
        read_split(tmp_path / "nowhere")
    folder = _write(tmp_path / "s", {"image_ids.txt": BOX_FILES["image_ids.txt"]})
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        read_split(folder)


# --------------------------------------------------------------------------- #
# Tolerated variations: they parse to the very same content
# --------------------------------------------------------------------------- #
def _bytes_variants() -> dict[str, object]:
    return {
        "no-final-newline": lambda b: b,
        "final-newline": lambda b: b + b"\n",
        "trailing-empty-lines": lambda b: b + b"\n\n\n",
        "bom": lambda b: codecs.BOM_UTF8 + b,
        "crlf": lambda b: b.replace(b"\n", b"\r\n") + b"\r\n",
    }


@pytest.mark.parametrize("variant", sorted(_bytes_variants()))
@pytest.mark.parametrize("base", ["box", "mask"])
def test_tolerated_variants_parse_the_same(tmp_path, variant, base):
    files = BOX_FILES if base == "box" else MASK_FILES
    expected = _box_meta() if base == "box" else _mask_meta()
    folder = _write(tmp_path / "s", files)
    change = _bytes_variants()[variant]
    for name in files:
        path = folder / name
        path.write_bytes(change(path.read_bytes()))
    assert read_split(folder) == expected


def test_kind_detection(tmp_path):
    none_files = {k: v for k, v in BOX_FILES.items() if k != "localization.txt"}
    meta = read_split(_write(tmp_path / "none", none_files))
    assert meta.kind == "none" and meta.boxes is None and meta.mask_paths is None and meta.sizes is not None
    no_sizes = {k: v for k, v in BOX_FILES.items() if k != "image_sizes.txt"}
    meta = read_split(_write(tmp_path / "nosizes", no_sizes))
    assert meta.kind == "box" and meta.sizes is None and meta.num_boxes == 4
    assert read_split(_write(tmp_path / "mask", MASK_FILES)).kind == "mask"


def test_box_on_the_image_edge_is_accepted(tmp_path):
    """``x1 == w`` (exclusive right edge) is accepted; the real files never need it."""
    files = dict(BOX_FILES)
    files["localization.txt"] = _replace(BOX_FILES["localization.txt"], 2, "a/1.jpg,0,0,100,80")
    meta = read_split(_write(tmp_path / "s", files))
    assert meta.boxes["a/1.jpg"].tolist() == [[10, 10, 50, 60], [0, 0, 100, 80]]


def test_boxes_grouped_by_image_in_file_order(tmp_path):
    files = dict(BOX_FILES)
    files["localization.txt"] = ["b/3.jpg,0,0,1,1", "a/1.jpg,5,5,6,6", "a/2.jpg,1,1,2,2",
                                 "a/1.jpg,1,1,2,2", "b/3.jpg,2,2,3,3"]
    meta = read_split(_write(tmp_path / "s", files))
    assert meta.boxes["a/1.jpg"].tolist() == [[5, 5, 6, 6], [1, 1, 2, 2]]
    assert meta.boxes["b/3.jpg"].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert not meta.boxes["a/1.jpg"].flags.writeable


# --------------------------------------------------------------------------- #
# SplitMetadata itself
# --------------------------------------------------------------------------- #
def _fields(meta: SplitMetadata) -> dict[str, object]:
    return {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}


INVALID_META = {
    "labels-missing-key": dict(labels={"a/1.jpg": 0, "a/2.jpg": 0}),
    "label-negative": dict(labels={"a/1.jpg": 0, "a/2.jpg": -2, "b/3.jpg": 1}),
    "label-bool": dict(labels={"a/1.jpg": 0, "a/2.jpg": True, "b/3.jpg": 1}),
    "size-zero": dict(sizes={"a/1.jpg": (100, 80), "a/2.jpg": (0, 40), "b/3.jpg": (30, 30)}),
    "box-outside": dict(boxes={"a/1.jpg": np.array([[0, 0, 101, 5]]), "a/2.jpg": np.array([[1, 2, 3, 4]]),
                               "b/3.jpg": np.array([[0, 0, 1, 1]])}),
    "box-shape": dict(boxes={"a/1.jpg": np.array([0, 0, 1, 1]), "a/2.jpg": np.array([[1, 2, 3, 4]]),
                             "b/3.jpg": np.array([[0, 0, 1, 1]])}),
    "box-float": dict(boxes={"a/1.jpg": np.array([[0.0, 0, 1, 1]]), "a/2.jpg": np.array([[1, 2, 3, 4]]),
                             "b/3.jpg": np.array([[0, 0, 1, 1]])}),
    "no-boxes-for-image": dict(boxes={"a/1.jpg": np.zeros((0, 4), int), "a/2.jpg": np.array([[1, 2, 3, 4]]),
                                      "b/3.jpg": np.array([[0, 0, 1, 1]])}),
    "duplicate-id": dict(image_ids=("a/1.jpg", "a/2.jpg", "a/1.jpg")),
    "comma-in-id": dict(image_ids=("a/1.jpg", "a/2.jpg", "b,3.jpg")),
    "boxes-and-masks": dict(mask_paths=_mask_meta().mask_paths, ignore_paths=_mask_meta().ignore_paths),
}


@pytest.mark.parametrize("case", sorted(INVALID_META))
def test_constructor_rejects_inconsistent_metadata(case):
    fields = _fields(_box_meta())
    fields.update(INVALID_META[case])
    with pytest.raises(ValueError):
        SplitMetadata(**fields)


def test_constructor_copies_and_freezes():
    boxes = {"a/1.jpg": np.array([[1, 1, 2, 2]]), "a/2.jpg": np.array([[1, 2, 3, 4]]),
             "b/3.jpg": np.array([[0, 0, 1, 1]], dtype=np.int32)}
    labels = {"a/1.jpg": 0, "a/2.jpg": np.int64(3), "b/3.jpg": 1}
    meta = SplitMetadata(image_ids=["a/1.jpg", "a/2.jpg", "b/3.jpg"], labels=labels, boxes=boxes)
    boxes["a/1.jpg"][0, 0] = 0
    labels["a/1.jpg"] = 5
    assert meta.boxes["a/1.jpg"].tolist() == [[1, 1, 2, 2]]
    assert meta.labels == {"a/1.jpg": 0, "a/2.jpg": 3, "b/3.jpg": 1}
    assert type(meta.labels["a/2.jpg"]) is int
    assert meta.boxes["b/3.jpg"].dtype == np.int64
    assert isinstance(meta.image_ids, tuple) and meta.num_classes == 4
    with pytest.raises(ValueError):
        meta.boxes["a/2.jpg"][0, 0] = 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.labels = {}


def test_equality_and_select():
    meta = _box_meta()
    assert meta == _box_meta() and meta != _mask_meta()
    other = _fields(_box_meta())
    other["boxes"] = dict(other["boxes"], **{"a/2.jpg": np.array([[1, 2, 3, 5]])})
    assert meta != SplitMetadata(**other)
    sub = meta.select(["b/3.jpg", "a/1.jpg"])
    assert sub.image_ids == ("b/3.jpg", "a/1.jpg")
    assert sub.labels == {"b/3.jpg": 1, "a/1.jpg": 0}
    assert sub.boxes["a/1.jpg"].tolist() == [[10, 10, 50, 60], [0, 0, 99, 79]]
    with pytest.raises(KeyError):
        meta.select(["nope.jpg"])
    assert len(_mask_meta().select(["a/1.jpg"])) == 1


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("make", [_box_meta, _mask_meta], ids=["box", "mask"])
def test_write_read_round_trip(tmp_path, make):
    meta = make()
    write_split(tmp_path / "s", meta)
    assert read_split(tmp_path / "s") == meta
    ids_text = (tmp_path / "s" / "image_ids.txt").read_text()
    assert ids_text == "a/1.jpg\na/2.jpg\nb/3.jpg\n"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        BOX_FILES if make is _box_meta else MASK_FILES)


def test_written_mask_file_gives_ignore_on_first_line_only(tmp_path):
    write_split(tmp_path, _mask_meta())
    assert (tmp_path / "localization.txt").read_text().split("\n") == MASK_FILES["localization.txt"] + [""]


def test_write_removes_stale_files(tmp_path):
    write_split(tmp_path, _box_meta())
    plain = _box_meta()
    plain = SplitMetadata(image_ids=plain.image_ids, labels=plain.labels)
    write_split(tmp_path, plain)
    assert not (tmp_path / "localization.txt").exists() and not (tmp_path / "image_sizes.txt").exists()
    assert read_split(tmp_path) == plain and read_split(tmp_path).kind == "none"


def test_write_is_atomic(tmp_path, monkeypatch):
    write_split(tmp_path, _box_meta())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(md.os, "replace", failing_replace)
    changed = SplitMetadata(image_ids=("x.jpg",), labels={"x.jpg": 3})
    with pytest.raises(OSError, match="disk full"):
        write_split(tmp_path, changed)
    # old files untouched, no temporary file left behind
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------- #
# Properties
# --------------------------------------------------------------------------- #
_PATH_CHARS = st.sampled_from(list("abcxyzAB019_-./ ") + ["é", "日"])
_paths = st.text(_PATH_CHARS, min_size=1, max_size=12).filter(lambda p: p == p.strip())


@st.composite
def split_metadata(draw) -> SplitMetadata:
    ids = draw(st.lists(_paths, min_size=1, max_size=6, unique=True))
    labels = {i: draw(st.integers(0, 12)) for i in ids}
    kind = draw(st.sampled_from(["none", "box", "mask"]))
    sizes = None
    if draw(st.booleans()) or kind == "box":
        sizes = {i: (draw(st.integers(1, 5000)), draw(st.integers(1, 5000))) for i in ids}
    fields: dict[str, object] = dict(image_ids=tuple(ids), labels=labels, sizes=sizes)
    if kind == "box":
        boxes = {}
        for i in ids:
            w, h = sizes[i]
            rows = []
            for _ in range(draw(st.integers(1, 3))):
                x0 = draw(st.integers(0, w))
                y0 = draw(st.integers(0, h))
                rows.append([x0, y0, draw(st.integers(x0, w)), draw(st.integers(y0, h))])
            boxes[i] = np.array(rows, dtype=np.int64)
        fields["boxes"] = boxes
    elif kind == "mask":
        fields["mask_paths"] = {i: tuple(draw(st.lists(_paths, min_size=1, max_size=3, unique=True))) for i in ids}
        fields["ignore_paths"] = {i: draw(st.one_of(st.just(""), _paths)) for i in ids}
    return SplitMetadata(**fields)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=split_metadata())
def test_property_write_then_read_is_identity(meta):
    with tempfile.TemporaryDirectory() as tmp:
        write_split(tmp, meta)
        back = read_split(tmp)
    assert back == meta
    assert back.kind == meta.kind and back.num_classes == meta.num_classes


def _corrupt(data: bytes, op: str, draw) -> bytes:
    if op == "flip-byte" and data:
        k = draw(st.integers(0, len(data) - 1))
        return data[:k] + bytes([data[k] ^ draw(st.integers(1, 255))]) + data[k + 1:]
    if op == "insert-byte":
        k = draw(st.integers(0, len(data)))
        return data[:k] + bytes([draw(st.sampled_from(b",\n\r -0915a\xff\xef\x00"))]) + data[k:]
    if op == "delete-byte" and data:
        k = draw(st.integers(0, len(data) - 1))
        return data[:k] + data[k + 1:]
    if op == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    lines = data.split(b"\n")
    k = draw(st.integers(0, len(lines) - 1))
    if op == "delete-line":
        del lines[k]
    elif op == "duplicate-line":
        lines.insert(k, lines[k])
    elif op == "empty-line":
        lines.insert(k, b"")
    elif op == "swap-lines":
        j = draw(st.integers(0, len(lines) - 1))
        lines[k], lines[j] = lines[j], lines[k]
    return b"\n".join(lines)


_OPS = ["flip-byte", "insert-byte", "delete-byte", "truncate", "delete-line", "duplicate-line",
        "empty-line", "swap-lines"]
_FIELDS_OF = {
    "image_ids.txt": set(),
    "class_labels.txt": {"labels"},
    "image_sizes.txt": {"sizes"},  # a size change may make boxes invalid, never different
    "localization.txt": {"boxes", "mask_paths", "ignore_paths"},
}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=split_metadata(), data=st.data())
def test_fuzz_corruption_parses_or_raises_metadata_error(meta, data):
    with tempfile.TemporaryDirectory() as tmp:
        write_split(tmp, meta)
        names = sorted(p.name for p in Path(tmp).iterdir())
        name = data.draw(st.sampled_from(names))
        op = data.draw(st.sampled_from(_OPS))
        path = Path(tmp) / name
        original = path.read_bytes()
        path.write_bytes(_corrupt(original, op, data.draw))
        try:
            back = read_split(tmp)
        except MetadataError as exc:
            assert exc.path.endswith(".txt") and exc.line >= 1
            return
        # parsed: the result is valid metadata, and what the corrupted file
        # does not hold is unchanged
        assert SplitMetadata(**_fields(back)) == back
        assert set(back.image_ids) == set(meta.image_ids)
        if name != "image_ids.txt":
            assert back.image_ids == meta.image_ids
        for field in ("labels", "sizes", "mask_paths", "ignore_paths"):
            if field not in _FIELDS_OF[name]:
                assert getattr(back, field) == getattr(meta, field), field
        if "boxes" not in _FIELDS_OF[name] and meta.boxes is not None:
            assert all(np.array_equal(back.boxes[i], meta.boxes[i]) for i in meta.image_ids)


def test_line_loss_or_repeat_is_always_caught(tmp_path):
    """Deleting or repeating any record of a one-record-per-image file raises."""
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt"):
        for k in range(3):
            for op in ("delete", "repeat"):
                files = dict(BOX_FILES)
                lines = list(files[name])
                if op == "delete":
                    del lines[k]
                else:
                    lines.insert(k, lines[k])
                files[name] = lines
                folder = _write(tmp_path / f"{name}-{k}-{op}", files)
                with pytest.raises(MetadataError) as err:
                    read_split(folder)
                if op == "repeat":
                    expected = "duplicate image id"
                elif name == "image_ids.txt":
                    expected = "image id not in"  # reported where the id is still listed
                else:
                    expected = f"image id missing from {folder / name}"
                assert expected in err.value.what


def test_metadata_import_does_not_load_torch():
    """Reading metadata (the CLI, evaluation of saved maps) must not pay for importing torch."""
    import subprocess
    import sys

    code = "import sys, mnpo.data, mnpo.data.metadata; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
