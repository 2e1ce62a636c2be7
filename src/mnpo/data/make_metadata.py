"""Metadata for your own data: an image tree plus boxes -> wsolevaluation split folders.

The classes come from the folder tree, ImageFolder style, in one of two layouts:

* ``ROOT/<class>/.../<image>``: the images are split into train, val and test at random,
  per class (``val_fraction``, ``test_fraction``, ``seed``);
* ``ROOT/{train,val,test}/<class>/.../<image>``: the split is the top folder.

Classes are numbered in sorted order of their folder names, or in the order of a ``classes``
list. Boxes or masks are needed for every val and test image (the protocol scores them there;
train needs labels only). Boxes come from one of

* a CSV file in ``localization.txt``'s form: ``path,x0,y0,x1,y1``, one line per box, paths
  relative to ROOT, inclusive 0-based pixel coordinates (an optional first line
  ``path,x0,y0,x1,y1`` is a header);
* a folder of Pascal VOC XML files (``<object><bndbox>`` with 1-based inclusive
  ``xmin ymin xmax ymax``; one file per image, found as ``<path without extension>.xml`` or,
  when that does not exist, ``<file name without extension>.xml`` at the folder's top);
* a COCO JSON file (``images[].file_name`` matched to the image's path relative to ROOT, or
  to its file name when that is unique; ``annotations[].bbox`` ``[x, y, w, h]`` in continuous
  coordinates, made inclusive pixel boxes ``round(x), round(y), round(x+w)-1, round(y+h)-1``).

Masks (for PxAP, as OpenImages30k) come from a folder that mirrors the image tree: the mask of
``<path>.<ext>`` is ``MASKS/<path>.png`` (any non-zero pixel is the object, as the evaluation
reads it; merge instances into one mask) and an optional ignore mask, pixels no score is asked
for, ``MASKS/<path>.ignore.png``. ``localization.txt`` then holds ``path,mask_path,ignore_path``
with mask paths relative to MASKS, the ``data.mask_root`` / ``--mask-root`` of training and
evaluation.

Every box is checked against its image's size (read from the file header); every mask must have
its image's size and, unless it is an ignore mask, an object pixel. Written per split:
``image_ids.txt``, ``class_labels.txt``, ``image_sizes.txt`` and, where every image of the
split has boxes or masks, ``localization.txt``; plus ``class_names.txt`` (one name per class
index) at the top, which training copies into its checkpoints (``mnpo localize`` prints the names).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mnpo.data.decode import MaskReadError, read_mask
from mnpo.data.image_files import IMAGE_EXTENSIONS, exif_orientation_of, is_image_file
from mnpo.data.metadata import SplitMetadata, write_split
from mnpo.io import atomic_path

__all__ = ["CLASS_NAMES", "IGNORE_SUFFIX", "IMAGE_EXTENSIONS", "SPLITS", "AnnotationError", "TreeImage",
           "is_image_file", "make_metadata", "read_box_csv", "read_class_names", "read_coco_boxes",
           "read_mask_folder", "read_voc_boxes", "scan_image_tree"]

log = logging.getLogger(__name__)

CLASS_NAMES = "class_names.txt"
SPLITS = ("train", "val", "test")
IGNORE_SUFFIX = ".ignore.png"  # MASKS/<path>.ignore.png: the ignore mask of ROOT/<path>.<ext>

Boxes = dict[str, list[tuple[int, int, int, int]]]  # image id -> inclusive pixel boxes
Masks = dict[str, tuple[str, str]]  # image id -> (mask path, ignore path or ""), relative to the mask folder


class AnnotationError(ValueError):
    """A problem in the image tree or an annotation file; the message names the file (and line)."""


@dataclass(frozen=True)
class TreeImage:
    """One image of the tree: its id (path relative to the root, ``/``-separated), class folder
    name and, for the split layout, its split."""

    image_id: str
    class_name: str
    split: str | None


def scan_image_tree(root: str | os.PathLike) -> list[TreeImage]:
    """Every image under ``root`` in one of the two layouts (module docstring), sorted by id.

    Raises AnnotationError for a missing root, an image outside a class folder, a mix of split
    and class folders at the top, or a tree without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root}: not a folder")
    top = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in top if p.is_file() and is_image_file(p)]
    if loose:
        raise AnnotationError(f"{root}: images must sit in class folders, found {loose[:3]} at the top")
    folders = [p for p in top if p.is_dir()]
    split_layout = any(p.name in SPLITS for p in folders)
    if split_layout and any(p.name not in SPLITS for p in folders):
        others = [p.name for p in folders if p.name not in SPLITS]
        raise AnnotationError(f"{root}: holds split folders {[p.name for p in folders if p.name in SPLITS]} "
                              f"and other folders {others[:3]}; use one layout (module docstring)")
    images = []
    for split_dir in folders if split_layout else [root]:
        split = split_dir.name if split_layout else None
        for class_dir in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
            if class_dir.is_file():
                if is_image_file(class_dir):
                    raise AnnotationError(f"{split_dir}: images must sit in class folders, found {class_dir.name!r}")
                continue
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    if is_image_file(path):
                        rel = path.relative_to(root).as_posix()
                        if "," in rel:
                            raise AnnotationError(f"{path}: a comma in the path cannot be written to the "
                                                  "comma-separated metadata; rename it")
                        images.append(TreeImage(rel, class_dir.name, split))
    if not images:
        raise AnnotationError(f"{root}: no images found (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return sorted(images, key=lambda im: im.image_id)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (index = line order); empty lines at the end are ignored."""
    path = Path(path)
    names = path.read_text(encoding="utf-8-sig").splitlines()
    while names and not names[-1].strip():
        names.pop()
    for n, name in enumerate(names, 1):
        if not name.strip():
            raise AnnotationError(f"{path}:{n}: empty class name")
    seen: set[str] = set()
    for n, name in enumerate(names, 1):
        if name in seen:
            raise AnnotationError(f"{path}:{n}: class {name!r} listed twice")
        seen.add(name)
    if not names:
        raise AnnotationError(f"{path}: no class names")
    return names


def read_box_csv(path: str | os.PathLike) -> Boxes:
    """``path,x0,y0,x1,y1`` lines (localization.txt's form); an optional header line."""
    path = Path(path)
    boxes: Boxes = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if n == 1 and [c.strip() for c in row] == ["path", "x0", "y0", "x1", "y1"]:
                continue
            if len(row) != 5:
                raise AnnotationError(f"{path}:{n}: expected path,x0,y0,x1,y1, got {len(row)} fields: {row!r}")
            try:
                box = tuple(int(v) for v in row[1:])
            except ValueError:
                raise AnnotationError(f"{path}:{n}: box coordinates must be integers: {row!r}") from None
            boxes[row[0].strip()].append(box)  # type: ignore[arg-type]
    return dict(boxes)


def _voc_number(node: ET.Element, tag: str, source: str) -> float:
    child = node.find(tag)
    if child is None or child.text is None:
        raise AnnotationError(f"{source}: <bndbox> without <{tag}>")
    try:
        return float(child.text)
    except ValueError:
        raise AnnotationError(f"{source}: <{tag}> is not a number: {child.text!r}") from None


def read_voc_boxes(folder: str | os.PathLike, image_ids: Sequence[str]) -> Boxes:
    """Pascal VOC XML boxes of ``image_ids`` (module docstring); images without a file get none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: not a folder")
    by_stem: dict[str, list[str]] = defaultdict(list)
    for image_id in image_ids:
        by_stem[Path(image_id).stem].append(image_id)
    boxes: Boxes = {}
    for image_id in image_ids:
        path = folder / Path(image_id).with_suffix(".xml")
        if not path.is_file():
            path = folder / f"{Path(image_id).stem}.xml"
            if not path.is_file():
                continue
            if len(by_stem[Path(image_id).stem]) > 1:
                raise AnnotationError(f"{path}: claimed by {by_stem[Path(image_id).stem][:3]}; images with the "
                                      "same name need their XML under the same relative path")
        try:
            tree = ET.parse(path)
        except ET.ParseError as err:
            raise AnnotationError(f"{path}: not valid XML ({err})") from None
        found = []
        for k, bndbox in enumerate(tree.getroot().iter("bndbox"), 1):
            source = f"{path}: object {k}"
            x0, y0, x1, y1 = (_voc_number(bndbox, t, source) for t in ("xmin", "ymin", "xmax", "ymax"))
            found.append((round(x0) - 1, round(y0) - 1, round(x1) - 1, round(y1) - 1))
        if found:
            boxes[image_id] = found
    return boxes


def read_coco_boxes(path: str | os.PathLike, image_ids: Sequence[str]) -> Boxes:
    """COCO ``bbox`` annotations of ``image_ids`` (module docstring); other images are ignored."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise AnnotationError(f"{path}: cannot read COCO JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"{path}: a COCO file needs 'images' and 'annotations' lists")
    known = set(image_ids)
    by_name: dict[str, list[str]] = defaultdict(list)
    for image_id in image_ids:
        by_name[Path(image_id).name].append(image_id)
    coco_to_id: dict[object, str] = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise AnnotationError(f"{path}: images[{k}] needs an 'id' and a 'file_name'")
        name = image["file_name"].replace("\\", "/")
        if name in known:
            coco_to_id[image["id"]] = name
        elif len(by_name.get(Path(name).name, ())) == 1:
            coco_to_id[image["id"]] = by_name[Path(name).name][0]
        elif len(by_name.get(Path(name).name, ())) > 1:
            raise AnnotationError(f"{path}: images[{k}] file_name {name!r} matches several images "
                                  f"({by_name[Path(name).name][:3]}); give it relative to the image root")
    boxes: Boxes = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise AnnotationError(f"{path}: annotations[{k}] has no 'image_id'")
        image_id = coco_to_id.get(ann["image_id"])
        if image_id is None:
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)) \
                or not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            raise AnnotationError(f"{path}: annotations[{k}] bbox must be [x, y, w, h] with w, h > 0, got {bbox!r}")
        x, y, w, h = bbox
        boxes[image_id].append((round(x), round(y), max(round(x), round(x + w) - 1), max(round(y), round(y + h) - 1)))
    return dict(boxes)


def read_mask_folder(folder: str | os.PathLike, image_ids: Sequence[str]) -> Masks:
    """The masks of ``image_ids`` (paths relative to ROOT) in ``folder``, which mirrors the image
    tree: ``<path without extension>.png``, and optionally ``<path without extension>.ignore.png``.

    Returns image id -> (mask path, ignore path or ""), relative to ``folder``, for the images
    that have a mask. Raises AnnotationError for a file in the folder that belongs to no image (a
    mask named by another convention would otherwise be silently missing) and for an ignore
    mask without its mask.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: mask folder not found")
    expected: dict[str, tuple[str, str]] = {}  # mask file -> (image id, role)
    for image_id in image_ids:
        stem = PurePosixPath(image_id).with_suffix("").as_posix()
        for name, role in ((stem + ".png", "mask"), (stem + IGNORE_SUFFIX, "ignore")):
            if name in expected:  # 'a.png' and 'a.jpg', or 'a.jpg' and 'a.ignore.jpg'
                raise AnnotationError(f"{folder / name} would be the {expected[name][1]} of {expected[name][0]!r} "
                                      f"and the {role} of {image_id!r}; rename one of the images")
            expected[name] = (image_id, role)
    found: dict[str, dict[str, str]] = defaultdict(dict)
    stray = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):  # hidden: .DS_Store, .git/
            continue
        if rel not in expected:
            stray.append(rel)
            continue
        image_id, role = expected[rel]
        found[image_id][role] = rel
    if stray:
        raise AnnotationError(f"{folder}: {len(stray)} files belong to no image, e.g. {stray[:3]} (the mask of "
                              f"ROOT/<path>.<ext> is <path>.png, its ignore mask <path>{IGNORE_SUFFIX})")
    orphans = [f["ignore"] for f in found.values() if "mask" not in f]
    if orphans:
        raise AnnotationError(f"{folder}: ignore masks without their mask: {orphans[:3]}")
    return {i: (f["mask"], f.get("ignore", "")) for i, f in found.items()}


def _mask_problem(folder: Path, files: tuple[str, str], size: tuple[int, int]) -> str | None:
    """Why ``files`` (mask path, ignore path or "") in ``folder`` cannot serve an image of ``size``
    (w, h), or None."""
    mask = folder / files[0]
    for path in (mask, folder / files[1]) if files[1] else (mask,):
        try:
            pixels = read_mask(path)  # the reader PxAP scores with
        except MaskReadError as err:
            return f"{path}: cannot be read ({err.reason})"
        if pixels.shape != (size[1], size[0]):
            return f"{path}: {pixels.shape[1]}x{pixels.shape[0]}, but its image is {size[0]}x{size[1]}"
        if path == mask and not pixels.any():
            return f"{path}: no object pixel (every pixel is 0)"
    return None


def _image_header(path: Path) -> tuple[tuple[int, int], int] | str:
    """``((w, h), EXIF orientation)`` from the file's header (1: no tag), or why it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size, exif_orientation_of(image)
    except Exception as err:  # PIL raises several types on bad data
        return f"{type(err).__name__}: {err}"


def _assign_splits(images: Sequence[TreeImage], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, str]:
    """image id -> split. Per class: shuffle (seeded), then test, val, train; a fraction above 0
    gives a class of 3 or more images at least one image in that split."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for im in images:
        by_class[im.class_name].append(im.image_id)
    rng = np.random.default_rng(seed)
    split_of = {}
    for name in sorted(by_class):
        ids = list(by_class[name])
        order = rng.permutation(len(ids))
        counts = []
        for fraction in (test_fraction, val_fraction):
            count = round(fraction * len(ids))
            if fraction > 0 and count == 0 and len(ids) >= 3:
                count = 1
            counts.append(count)
        n_test, n_val = counts
        for rank, k in enumerate(order):
            split_of[ids[k]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return split_of


def make_metadata(root: str | os.PathLike, out: str | os.PathLike, *, boxes: Mapping[str, Sequence] | None = None,
                  masks: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
                  val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, workers: int = 8,
                  images: Sequence[TreeImage] | None = None) -> dict[str, SplitMetadata]:
    """Write ``out/{train,val,test}/`` and ``out/class_names.txt`` for the images under ``root``.

    boxes: image id -> inclusive ``(x0, y0, x1, y1)`` pixel boxes (from :func:`read_box_csv`,
    :func:`read_voc_boxes` or :func:`read_coco_boxes`); every val and test image needs one.
    masks: instead of boxes, the mask folder (see :func:`read_mask_folder`); every val and test
    image needs a mask, and the written mask paths are relative to this folder.
    class_names: the class order (every class folder must be listed); default sorted names.
    images: the result of :func:`scan_image_tree` on ``root``, when the caller has it already.
    Returns the written metadata per split. Raises AnnotationError, naming what is wrong,
    before anything is written.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    if boxes and masks is not None:
        raise ValueError("give boxes or masks, not both (a split holds one kind of localization label)")
    root, out = Path(root), Path(out)
    images = scan_image_tree(root) if images is None else list(images)
    found = sorted({im.class_name for im in images})
    if class_names is None:
        class_names = found
    else:
        class_names = list(class_names)
        unlisted = [c for c in found if c not in set(class_names)]
        if unlisted:
            raise AnnotationError(f"class folders {unlisted[:5]} are not in the class list "
                                  f"({len(class_names)} names)")
    index = {name: k for k, name in enumerate(class_names)}
    if images[0].split is None:
        split_of = _assign_splits(images, val_fraction, test_fraction, seed)
    else:
        split_of = {im.image_id: im.split for im in images}
    boxes = dict(boxes or {})
    ids = {im.image_id for im in images}
    unknown = [i for i in boxes if i not in ids]
    if unknown:
        raise AnnotationError(f"boxes given for {len(unknown)} images not under {root}: {unknown[:3]}")
    mask_files = read_mask_folder(masks, sorted(ids)) if masks is not None else {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        headers = dict(zip([im.image_id for im in images],
                           pool.map(_image_header, [root / im.image_id for im in images])))
        unreadable = [f"{i} ({h})" for i, h in headers.items() if isinstance(h, str)]
        if unreadable:
            raise AnnotationError(f"{len(unreadable)} images under {root} cannot be read: "
                                  + "; ".join(unreadable[:3]))
        sizes = {i: size for i, (size, _) in headers.items()}
        turned = [f"{i} ({o})" for i, (_, o) in sorted(headers.items()) if o != 1]
        if turned:
            log.warning("%d images carry an EXIF orientation tag, e.g. %s: sizes and boxes are taken in the "
                        "stored pixel grid, as the evaluation reads them, not as image viewers turn them; check "
                        "that the annotation tool did the same", len(turned), ", ".join(turned[:3]))
        mask_problems = [p for p in pool.map(lambda i: _mask_problem(Path(masks), mask_files[i], sizes[i]),
                                             sorted(mask_files)) if p]  # none without masks
    if mask_problems:
        raise AnnotationError(f"{len(mask_problems)} masks do not fit their images: " + "; ".join(mask_problems[:3]))
    for image_id, image_boxes in boxes.items():
        w, h = sizes[image_id]
        for box in image_boxes:
            x0, y0, x1, y1 = box
            if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
                raise AnnotationError(f"box {list(box)} of {image_id!r} does not lie in its {w}x{h} image "
                                      "(0 <= x0 <= x1 <= w, 0 <= y0 <= y1 <= h)")
    annotated, kind = (boxes, "box") if masks is None else (mask_files, "mask")
    result = {}
    for split in SPLITS:
        split_ids = sorted(i for i in ids if split_of[i] == split)
        if not split_ids:
            raise AnnotationError(f"split {split!r} gets no images (fractions val {val_fraction}, "
                                  f"test {test_fraction}, {len(ids)} images)")
        missing = [i for i in split_ids if i not in annotated]
        if missing and split != "train":
            raise AnnotationError(f"{len(missing)} of the {len(split_ids)} {split} images have no {kind}, e.g. "
                                  f"{missing[:3]}; every val and test image needs one")
        labels = {im.image_id: index[im.class_name] for im in images if split_of[im.image_id] == split}
        if missing and len(missing) < len(split_ids):
            log.warning("%d of the %d train images have no %s: train is written without localization.txt "
                        "(training needs labels only)", len(missing), len(split_ids), kind)
        localization = {}
        if not missing and masks is None:
            localization["boxes"] = {i: np.asarray(boxes[i], np.int64) for i in split_ids}
        elif not missing:
            localization["mask_paths"] = {i: (mask_files[i][0],) for i in split_ids}
            localization["ignore_paths"] = {i: mask_files[i][1] for i in split_ids}
        result[split] = SplitMetadata(image_ids=tuple(split_ids), labels=labels,
                                      sizes={i: sizes[i] for i in split_ids}, **localization)
    for split, meta in result.items():
        write_split(out / split, meta)
    with atomic_path(out / CLASS_NAMES) as tmp:
        Path(tmp).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return result
