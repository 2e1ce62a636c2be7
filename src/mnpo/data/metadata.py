"""Read and write split metadata in the wsolevaluation layout.

A split folder holds up to four comma-separated text files, one record a line,
image paths relative to the data set's image root:

``image_ids.txt``
    ``path`` -- the split's images, in order.
``class_labels.txt``
    ``path,label`` -- the class index, ``0 <= label < num_classes``.
``image_sizes.txt``
    ``path,w,h`` -- the original image size in pixels (absent for OpenImages).
``localization.txt``
    Box sets: ``path,x0,y0,x1,y1``, one line per box, several lines per image.
    Mask sets: ``path,mask_path,ignore_path``, one line per mask; the ignore
    path is given on the image's first line only and is empty on the
    following ones.  Absent where a split has no localization labels
    (OpenImages train).  The kind is told by the number of fields.

Boxes are ``(x0, y0, x1, y1)`` int64 pixel coordinates in the original image.

Box bound.  In the released CUB (train/val/test) and ILSVRC (val/test) files
every box satisfies ``0 <= x0 <= x1 <= w - 1`` and ``0 <= y0 <= y1 <= h - 1``
(inclusive last-pixel coordinates; ``x1 == w`` never occurs there, the
largest ``x1 - w`` is ``-1``).  The reader accepts ``x1 <= w`` and ``y1 <= h``
so that boxes written with an exclusive right/bottom edge (a box covering the
whole image as ``0,0,w,h``) still load, and rejects ``x1 > w`` or ``y1 > h``,
which lie outside the image under either convention.  Degenerate boxes
(``x1 == x0``) are accepted; ``x1 < x0`` is not.

Every problem found while reading raises :class:`MetadataError`, formatted as
``"{path}:{line}: {what is wrong}: {line text!r}"``.  The files are parsed in
one pass each with ``str.split`` (the ILSVRC test localization file has 80 477
lines).  A UTF-8 byte order mark at the start of a file is skipped; Windows
line ends (CRLF) are accepted; the last line may lack its newline, and empty
lines at the end of a file are ignored, but an empty line before the last
record is an error.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASS_LABELS",
    "IMAGE_IDS",
    "IMAGE_SIZES",
    "LOCALIZATION",
    "MetadataError",
    "SplitMetadata",
    "read_split",
    "write_split",
]

log = logging.getLogger(__name__)

IMAGE_IDS = "image_ids.txt"
CLASS_LABELS = "class_labels.txt"
IMAGE_SIZES = "image_sizes.txt"
LOCALIZATION = "localization.txt"

_BOX_FIELDS = 5
_MASK_FIELDS = 3


class MetadataError(ValueError):
    """A malformed metadata file: ``"{path}:{line}: {what}: {text!r}"``.

    ``path`` is the file, ``line`` the 1-based line number, ``what`` a short
    description of the problem and ``text`` the offending line as read.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, what: str, text: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.what = what
        self.text = text
        super().__init__(f"{self.path}:{self.line}: {what}: {text!r}")

    def __reduce__(self):  # keep the four fields through pickling (worker processes)
        return (type(self), (self.path, self.line, self.what, self.text))


# ---------------------------------------------------------------------------
# The in-memory form


def _path_problem(path: object) -> str | None:
    """Why ``path`` cannot be a metadata path, or None if it can."""
    if not isinstance(path, str):
        return f"path must be a str, got {type(path).__name__}"
    if not path:
        return "empty path"
    if "," in path:
        return "path contains a comma"
    if "\n" in path or "\r" in path:
        return "path contains a line break"
    if path != path.strip():
        return "path has leading or trailing whitespace"
    return None


def _check_keys(name: str, mapping: Mapping[str, object], ids: frozenset[str]) -> None:
    if mapping.keys() != ids:
        missing = [i for i in ids if i not in mapping]
        extra = [k for k in mapping if k not in ids]
        raise ValueError(
            f"{name}: keys differ from image_ids "
            f"(missing {sorted(missing)[:3]!r}, not in image_ids {sorted(extra)[:3]!r})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class SplitMetadata:
    """One split's metadata (see the module docstring for the file layout).

    Attributes:
        image_ids: relative image paths, in ``image_ids.txt`` order.
        labels: image id -> class index (``>= 0``).
        sizes: image id -> ``(w, h)`` in pixels, or None (no ``image_sizes.txt``).
        boxes: image id -> int64 array (k, 4) of ``x0, y0, x1, y1`` boxes,
            ``k >= 1``, in file order (read-only), or None unless a box set.
        mask_paths: image id -> relative mask paths (``k >= 1``, file order),
            or None unless a mask set.
        ignore_paths: image id -> relative ignore-mask path, ``""`` for none;
            None unless a mask set.

    The constructor checks consistency (every mapping keyed by exactly the
    image ids, valid paths, non-negative labels, positive sizes, boxes inside
    the image as described in the module docstring) and raises ValueError.
    """

    image_ids: tuple[str, ...]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]] | None = None
    boxes: dict[str, np.ndarray] | None = None
    mask_paths: dict[str, tuple[str, ...]] | None = None
    ignore_paths: dict[str, str] | None = None

    def __post_init__(self) -> None:
        ids = tuple(self.image_ids)
        object.__setattr__(self, "image_ids", ids)
        id_set = frozenset(ids)
        if len(id_set) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"image_ids: duplicate image id {dup!r}")
        for i in ids:
            problem = _path_problem(i)
            if problem:
                raise ValueError(f"image_ids: {problem}: {i!r}")
        _check_keys("labels", self.labels, id_set)
        for i, lab in self.labels.items():
            if not _is_int(lab) or lab < 0:
                raise ValueError(f"labels: label of {i!r} must be an int >= 0, got {lab!r}")
        object.__setattr__(self, "labels", {i: int(self.labels[i]) for i in ids})
        if self.sizes is not None:
            _check_keys("sizes", self.sizes, id_set)
            sizes = {}
            for i in ids:
                wh = self.sizes[i]
                if len(wh) != 2 or not all(_is_int(v) and v > 0 for v in wh):
                    raise ValueError(f"sizes: size of {i!r} must be two positive ints (w, h), got {wh!r}")
                sizes[i] = (int(wh[0]), int(wh[1]))
            object.__setattr__(self, "sizes", sizes)
        if self.boxes is not None and (self.mask_paths is not None or self.ignore_paths is not None):
            raise ValueError("a split holds either boxes or masks, not both")
        if self.boxes is not None:
            self._check_boxes(id_set)
        if (self.mask_paths is None) != (self.ignore_paths is None):
            raise ValueError("mask_paths and ignore_paths must be given together")
        if self.mask_paths is not None:
            self._check_masks(id_set)

    def _check_boxes(self, id_set: frozenset[str]) -> None:
        assert self.boxes is not None
        _check_keys("boxes", self.boxes, id_set)
        boxes: dict[str, np.ndarray] = {}
        for i in self.image_ids:
            arr = np.asarray(self.boxes[i])
            if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < 1:
                raise ValueError(f"boxes: boxes of {i!r} must have shape (k >= 1, 4), got {arr.shape}")
            if arr.dtype.kind not in "iu":
                raise ValueError(f"boxes: boxes of {i!r} must be integers, got dtype {arr.dtype}")
            if arr.dtype != np.int64 or arr.flags.writeable:
                arr = arr.astype(np.int64)  # a private read-only copy
                arr.flags.writeable = False
            x0, y0, x1, y1 = arr.T
            bad = (x0 < 0) | (y0 < 0) | (x1 < x0) | (y1 < y0)
            if self.sizes is not None:
                w, h = self.sizes[i]
                bad |= (x1 > w) | (y1 > h)
            if bad.any():
                row = arr[int(np.argmax(bad))].tolist()
                where = f" in image {self.sizes[i]}" if self.sizes is not None else ""
                raise ValueError(f"boxes: invalid box {row} of {i!r}{where}")
            boxes[i] = arr
        object.__setattr__(self, "boxes", boxes)

    def _check_masks(self, id_set: frozenset[str]) -> None:
        assert self.mask_paths is not None and self.ignore_paths is not None
        _check_keys("mask_paths", self.mask_paths, id_set)
        _check_keys("ignore_paths", self.ignore_paths, id_set)
        masks = {}
        for i in self.image_ids:
            paths = self.mask_paths[i]
            if isinstance(paths, str):
                raise ValueError(f"mask_paths: masks of {i!r} must be a sequence of paths, got a str")
            paths = tuple(paths)
            if not paths:
                raise ValueError(f"mask_paths: image {i!r} has no mask")
            if len(set(paths)) != len(paths):
                raise ValueError(f"mask_paths: image {i!r} lists a mask twice: {paths!r}")
            for p in paths:
                problem = _path_problem(p)
                if problem:
                    raise ValueError(f"mask_paths: {problem} in masks of {i!r}: {p!r}")
            masks[i] = paths
        for i, p in self.ignore_paths.items():
            if p != "":
                problem = _path_problem(p)
                if problem:
                    raise ValueError(f"ignore_paths: {problem} for {i!r}: {p!r}")
        object.__setattr__(self, "mask_paths", masks)
        object.__setattr__(self, "ignore_paths", {i: self.ignore_paths[i] for i in self.image_ids})

    @classmethod
    def _unchecked(cls, **fields: Any) -> SplitMetadata:
        """Build without the constructor's checks, for data the reader checked line by line."""
        self = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(self, f.name, fields.get(f.name))
        return self

    @property
    def kind(self) -> str:
        """``'box'``, ``'mask'`` or ``'none'`` (no localization labels)."""
        if self.boxes is not None:
            return "box"
        if self.mask_paths is not None:
            return "mask"
        return "none"

    @property
    def num_classes(self) -> int:
        """``max(label) + 1`` (0 for an empty split)."""
        return max(self.labels.values(), default=-1) + 1

    @property
    def num_boxes(self) -> int:
        """Total number of boxes (0 unless a box set)."""
        return 0 if self.boxes is None else sum(len(b) for b in self.boxes.values())

    @property
    def num_masks(self) -> int:
        """Total number of masks (0 unless a mask set)."""
        return 0 if self.mask_paths is None else sum(len(m) for m in self.mask_paths.values())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SplitMetadata):
            return NotImplemented
        if (
            self.image_ids != other.image_ids
            or self.labels != other.labels
            or self.sizes != other.sizes
            or self.mask_paths != other.mask_paths
            or self.ignore_paths != other.ignore_paths
            or (self.boxes is None) != (other.boxes is None)
        ):
            return False
        if self.boxes is None or other.boxes is None:
            return True
        return all(np.array_equal(self.boxes[i], other.boxes[i]) for i in self.image_ids)

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    def select(self, image_ids: Iterable[str]) -> SplitMetadata:
        """The metadata of ``image_ids`` only (in the given order); KeyError if unknown."""
        ids = tuple(image_ids)
        unknown = [i for i in ids if i not in self.labels]
        if unknown:
            raise KeyError(f"not in this split: {unknown[:3]!r}")

        def pick(mapping):
            return None if mapping is None else {i: mapping[i] for i in ids}

        return SplitMetadata(
            image_ids=ids,
            labels=pick(self.labels),
            sizes=pick(self.sizes),
            boxes=pick(self.boxes),
            mask_paths=pick(self.mask_paths),
            ignore_paths=pick(self.ignore_paths),
        )


# ---------------------------------------------------------------------------
# Reading


def _read_lines(path: Path) -> list[str]:
    """The file's lines without line ends; trailing empty lines dropped."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        log.info("%s: skipping a UTF-8 byte order mark", path)
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        raw = data[start:] if end < 0 else data[start:end]
        raise MetadataError(
            path, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - start + 1})",
            raw.decode("utf-8", "replace"),
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _to_int(field: str) -> int | None:
    """``int(field)`` for a plain ASCII decimal (optional leading ``-``), else None.

    Stricter than ``int()``, which also takes spaces, ``+``, ``_`` and
    non-ASCII digits.
    """
    if field.isascii():
        if field.isdigit():
            return int(field)
        if field[:1] == "-" and field[1:].isdigit():
            return int(field)
    return None


class _Reader:
    """State shared by the per-file parsers of one split."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ids: list[str] = []
        self.id_line: dict[str, int] = {}

    def file(self, name: str) -> Path:
        return self.folder / name

    def lines(self, name: str) -> list[str]:
        path = self.file(name)
        if not path.is_file():
            raise FileNotFoundError(2, f"metadata file not found: {path}", str(path))
        return _read_lines(path)

    def missing_check(self, name: str, have: Mapping[str, object]) -> None:
        """Raise if an image id of ``image_ids.txt`` has no record in ``name``."""
        if len(have) == len(self.ids):
            return
        for n, i in enumerate(self.ids, 1):
            if i not in have:
                raise MetadataError(self.file(IMAGE_IDS), n, f"image id missing from {self.file(name)}", i)

    def image_ids(self) -> None:
        name = IMAGE_IDS
        path = self.file(name)
        lines = self.lines(name)
        if not lines:
            raise MetadataError(path, 1, "no image ids", "")
        id_line = self.id_line
        for n, line in enumerate(lines, 1):
            problem = _path_problem(line)
            if problem:
                raise MetadataError(path, n, "empty line" if not line else problem, line)
            first = id_line.get(line)
            if first is not None:
                raise MetadataError(path, n, f"duplicate image id (first at line {first})", line)
            id_line[line] = n
        self.ids = lines

    def _known(self, path: Path, n: int, image: str, line: str) -> None:
        if image not in self.id_line:
            problem = _path_problem(image)
            what = problem if problem else f"image id not in {self.file(IMAGE_IDS)}"
            raise MetadataError(path, n, what, line)

    def _split(self, path: Path, n: int, line: str, count: int, form: str) -> list[str]:
        parts = line.split(",")
        if len(parts) != count:
            what = "empty line" if not line else (
                f"expected {count} comma-separated fields ({form}), got {len(parts)}")
            raise MetadataError(path, n, what, line)
        return parts

    def _int_table(self, name: str, lines: list[str], form: str) -> tuple[list[str], np.ndarray]:
        """Parse ``path,int,int,...`` records of a known image each.

        Returns the image of every line and an int64 table (lines, fields - 1).
        Raises on a wrong field count, an unknown image or a non-integer; the
        values themselves (sign, range, duplicates) are the caller's to check.
        """
        path = self.file(name)
        names = form.split(",")
        count = len(names)
        id_line = self.id_line
        # Fast path: the whole file at once; any doubt falls through to the
        # line-by-line loop, which finds and names the problem.
        rows = [line.split(",") for line in lines]
        if set(map(len, rows)) == {count}:
            images = [r[0] for r in rows]
            fields = [f for r in rows for f in r[1:]]
            blob = "".join(fields)
            if (blob.isascii() and blob.isdigit() and all(fields)
                    and max(map(len, fields)) < 19 and id_line.keys() >= set(images)):
                table = np.fromiter(map(int, fields), dtype=np.int64, count=len(fields))
                return images, table.reshape(-1, count - 1)
        images = []
        flat: list[int] = []
        for n, line in enumerate(lines, 1):
            parts = self._split(path, n, line, count, form)
            self._known(path, n, parts[0], line)
            values = []
            for field_name, field in zip(names[1:], parts[1:]):
                value = _to_int(field)
                if value is None:
                    raise MetadataError(path, n, f"{field_name} {field!r} is not an integer", line)
                if not -(2**63) <= value < 2**63:
                    raise MetadataError(path, n, f"{field_name} {field!r} out of the int64 range", line)
                values.append(value)
            images.append(parts[0])
            flat.extend(values)
        return images, np.asarray(flat, dtype=np.int64).reshape(-1, count - 1)

    def _first_duplicate(self, name: str, lines: list[str], images: list[str]) -> None:
        """Raise on the first image listed twice in ``name``."""
        first: dict[str, int] = {}
        for n, image in enumerate(images, 1):
            if image in first:
                raise MetadataError(self.file(name), n,
                                    f"duplicate image id (first at line {first[image]})", lines[n - 1])
            first[image] = n

    def labels(self, num_classes: int | None) -> dict[str, int]:
        name = CLASS_LABELS
        path = self.file(name)
        lines = self.lines(name)
        images, table = self._int_table(name, lines, "path,label")
        values = table[:, 0]
        bad = values < 0
        if num_classes is not None:
            bad |= values >= num_classes
        if bad.any():
            k = int(np.argmax(bad))
            label = int(values[k])
            what = f"negative label {label}" if label < 0 else f"label {label} >= num_classes {num_classes}"
            raise MetadataError(path, k + 1, what, lines[k])
        labels = dict(zip(images, values.tolist()))
        if len(labels) != len(images):
            self._first_duplicate(name, lines, images)
        self.missing_check(name, labels)
        return labels if images == self.ids else {i: labels[i] for i in self.ids}

    def sizes(self) -> dict[str, tuple[int, int]]:
        name = IMAGE_SIZES
        path = self.file(name)
        lines = self.lines(name)
        images, table = self._int_table(name, lines, "path,w,h")
        bad = (table <= 0).any(axis=1)
        if bad.any():
            k = int(np.argmax(bad))
            w, h = table[k].tolist()
            raise MetadataError(path, k + 1, f"image size must be positive, got w={w}, h={h}", lines[k])
        sizes = dict(zip(images, map(tuple, table.tolist())))
        if len(sizes) != len(images):
            self._first_duplicate(name, lines, images)
        self.missing_check(name, sizes)
        return sizes if images == self.ids else {i: sizes[i] for i in self.ids}

    def localization(self, sizes: dict[str, tuple[int, int]] | None):
        """``('box', boxes)``, ``('mask', (mask_paths, ignore_paths))`` or ``('none', None)``."""
        name = LOCALIZATION
        path = self.file(name)
        if not path.exists():
            return "none", None
        lines = self.lines(name)
        if not lines:
            raise MetadataError(path, 1, "no localization records", "")
        count = len(lines[0].split(","))
        if count == _BOX_FIELDS:
            return "box", self._boxes(path, lines, sizes)
        if count == _MASK_FIELDS:
            return "mask", self._masks(path, lines)
        raise MetadataError(
            path, 1,
            f"expected {_BOX_FIELDS} fields (path,x0,y0,x1,y1) or {_MASK_FIELDS} fields "
            f"(path,mask_path,ignore_path), got {count}",
            lines[0],
        )

    def _boxes(self, path: Path, lines: list[str], sizes: dict[str, tuple[int, int]] | None):
        if sizes is None:
            log.warning("%s: no %s, box bounds are not checked against the image size",
                        path, IMAGE_SIZES)
        images, table = self._int_table(LOCALIZATION, lines, "path,x0,y0,x1,y1")
        id_line = self.id_line  # image id -> 1-based line in image_ids.txt
        owner = np.fromiter((id_line[i] for i in images), dtype=np.int64, count=len(images))
        x0, y0, x1, y1 = table.T
        bad = (x0 < 0) | (y0 < 0) | (x1 < x0) | (y1 < y0)
        if sizes is not None:
            wh = np.asarray([sizes[i] for i in self.ids], dtype=np.int64).reshape(-1, 2)
            bad |= (x1 > wh[owner - 1, 0]) | (y1 > wh[owner - 1, 1])
        if bad.any():
            k = int(np.argmax(bad))
            self._box_error(path, k + 1, lines[k], table[k].tolist(), sizes)
        counts = np.bincount(owner, minlength=len(self.ids) + 1)[1:]
        if not counts.all():
            self.missing_check(LOCALIZATION, dict.fromkeys(images))
        order = np.argsort(owner, kind="stable")
        table = table[order]
        table.flags.writeable = False
        stops = np.cumsum(counts)
        return {i: table[s - c:s] for i, s, c in zip(self.ids, stops.tolist(), counts.tolist())}

    @staticmethod
    def _box_error(path: Path, n: int, line: str, box: list[int],
                   sizes: dict[str, tuple[int, int]] | None) -> None:
        x0, y0, x1, y1 = box
        if min(box) < 0:
            raise MetadataError(path, n, "negative box coordinate", line)
        if x1 < x0:
            raise MetadataError(path, n, f"box x1 < x0 ({x1} < {x0})", line)
        if y1 < y0:
            raise MetadataError(path, n, f"box y1 < y0 ({y1} < {y0})", line)
        assert sizes is not None
        w, h = sizes[line.split(",", 1)[0]]
        raise MetadataError(
            path, n, f"box ({x0},{y0},{x1},{y1}) outside the {w}x{h} image (need x1 <= w, y1 <= h)", line)

    def _masks(self, path: Path, lines: list[str]):
        masks: dict[str, list[str]] = {}
        ignores: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for n, line in enumerate(lines, 1):
            image, mask, ignore = self._split(path, n, line, _MASK_FIELDS, "path,mask_path,ignore_path")
            self._known(path, n, image, line)
            problem = _path_problem(mask)
            if problem:
                raise MetadataError(path, n, f"mask path: {problem}", line)
            if ignore:
                problem = _path_problem(ignore)
                if problem:
                    raise MetadataError(path, n, f"ignore path: {problem}", line)
            have = masks.get(image)
            if have is None:
                masks[image] = [mask]
                ignores[image] = ignore
                first_line[image] = n
                continue
            if mask in have:
                raise MetadataError(path, n, "mask path listed twice for the image", line)
            have.append(mask)
            if ignore:
                first = first_line[image]
                if ignores[image]:
                    what = f"second ignore path for the image (first at line {first})"
                else:
                    what = f"ignore path after the image's first line (line {first})"
                raise MetadataError(path, n, what, line)
        self.missing_check(LOCALIZATION, masks)
        return {i: tuple(masks[i]) for i in self.ids}, {i: ignores[i] for i in self.ids}


def read_split(folder: str | os.PathLike[str], num_classes: int | None = None) -> SplitMetadata:
    """Read a split folder (see the module docstring).

    Args:
        folder: the folder holding ``image_ids.txt`` and friends.
        num_classes: if given, labels must be ``< num_classes``.

    Raises:
        FileNotFoundError: ``image_ids.txt`` or ``class_labels.txt`` is missing.
        MetadataError: a malformed or inconsistent file (path, line, problem, text).
    """
    folder = Path(folder)
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    start = time.perf_counter()
    reader = _Reader(folder)
    reader.image_ids()
    labels = reader.labels(num_classes)
    sizes = reader.sizes() if reader.file(IMAGE_SIZES).exists() else None
    kind, loc = reader.localization(sizes)
    meta = SplitMetadata._unchecked(
        image_ids=tuple(reader.ids),
        labels=labels,
        sizes=sizes,
        boxes=loc if kind == "box" else None,
        mask_paths=loc[0] if kind == "mask" else None,
        ignore_paths=loc[1] if kind == "mask" else None,
    )
    log.debug("%s: %d images, %s localization, %.3f s", folder, len(meta), kind,
              time.perf_counter() - start)
    return meta


# ---------------------------------------------------------------------------
# Writing


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _text(lines: Iterable[str]) -> str:
    return "".join(line + "\n" for line in lines)


def write_split(folder: str | os.PathLike[str], meta: SplitMetadata) -> None:
    """Write ``meta`` as a split folder that :func:`read_split` reads back equal.

    Each file is written atomically (temporary file + ``os.replace``); a stale
    ``image_sizes.txt`` or ``localization.txt`` that ``meta`` has no data for
    is removed.  Every line ends with a newline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = meta.image_ids
    files: dict[str, str | None] = {
        IMAGE_IDS: _text(ids),
        CLASS_LABELS: _text(f"{i},{meta.labels[i]}" for i in ids),
        IMAGE_SIZES: None,
        LOCALIZATION: None,
    }
    if meta.sizes is not None:
        files[IMAGE_SIZES] = _text(f"{i},{meta.sizes[i][0]},{meta.sizes[i][1]}" for i in ids)
    if meta.boxes is not None:
        boxes = meta.boxes
        files[LOCALIZATION] = _text(
            f"{i},{x0},{y0},{x1},{y1}" for i in ids for x0, y0, x1, y1 in boxes[i].tolist()
        )
    elif meta.mask_paths is not None and meta.ignore_paths is not None:
        masks, ignores = meta.mask_paths, meta.ignore_paths
        files[LOCALIZATION] = _text(
            f"{i},{m},{ignores[i] if k == 0 else ''}" for i in ids for k, m in enumerate(masks[i])
        )
    for name, text in files.items():
        path = folder / name
        if text is None:
            if path.exists():
                log.info("%s: removing stale %s (no such data in the metadata)", folder, name)
                path.unlink()
            continue
        _atomic_write_text(path, text)
    log.debug("%s: wrote %d images (%s localization)", folder, len(meta), meta.kind)
