"""Classify and localize arbitrary image files with a trained network: ``mnpo localize``.

Per image (any size, any format Pillow reads; decoded once, as RGB, W x H; turned upright as its
EXIF orientation tag says, as image viewers show it, unless ``exif_orientation=False``):

- classification (spec section 6): the main branch's logits averaged over the ten crops
  (resize 256, ten 224 crops), softmax, the top-k classes;
- the score map: ``compute_maps`` on the 224 x 224 localization view, for the top-1 class of
  that classification (so the box explains the class reported first);
- the box: :func:`~mnpo.metrics.boxes.predicted_boxes` (largest contour) on the 224 map at the
  threshold, scaled into the image by :func:`box_to_image`; no box when nothing lies above
  the threshold;
- the map resized bilinearly to (H, W), for the overlay and ``--save-maps``.

:func:`localize_to_folder` (``mnpo localize``) streams: each image's overlay (and map) and
its record are written as soon as the image is done, and the image and its full-size map are
dropped, so memory stays bounded (about ``batch_size`` decoded images, one full-size map and
one overlay) whatever the number of images. The records go to ``localization.jsonl``, one
line each; ``localization.json`` is assembled from them at the end. A rerun with the same
settings and model reuses the records of unchanged images (an interrupted run resumes).
:func:`localize_images` returns everything in memory, for a few images;
:func:`write_localization` writes such a report.
Heavy modules (torch, OpenCV, the networks) are imported inside the functions that use
them, so that registering the subcommand keeps ``mnpo --help`` instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnpo.engine.views import VIEW_SIZE, box_to_image, resize_for, ten_crop_logits

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_THRESHOLD", "ClassScore", "ImageLocalization", "ImageRecord", "LocalizeError", "LocalizeReport",
    "LocalizeSummary", "SkippedImage", "add_localize_parser", "box_to_image", "expand_image_paths",
    "localize_images", "localize_to_folder", "run_localize", "unique_stems", "write_localization",
]

log = logging.getLogger(__name__)

#: Box threshold when neither the caller nor the checkpoint gives one.
DEFAULT_THRESHOLD = 0.2
#: ``mnpo.maps.METHODS``, repeated here so that building the parser does not import torch (tested equal).
METHOD_CHOICES = ("cam", "mnpo", "mnpos", "gradcam", "dgl", "gradcampp", "xgradcam", "layercam", "hirescam",
                  "scorecam", "ablationcam", "eigencam", "center")
#: ``mnpo.maps.NORMALIZATIONS``, likewise (tested equal).
NORMALIZATION_CHOICES = ("minmax", "max", "pas", "ivr")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
REPORT_NAME = "localization.json"
#: The streamed records, one JSON object per line, beside :data:`REPORT_NAME`.
RECORDS_NAME = "localization.jsonl"
#: Version of the :data:`RECORDS_NAME` layout; records of another version are not reused.
RECORDS_FORMAT = 1


class LocalizeError(ValueError):
    """Localization cannot run at all (e.g. none of the images could be read)."""


@dataclass(frozen=True)
class ClassScore:
    """One of the top-k classes: its index, its name (``None`` without class names) and probability."""

    index: int
    name: str | None
    probability: float


@dataclass(frozen=True)
class ImageLocalization:
    """The result for one image.

    Attributes:
        path: the path as given.
        image: the decoded PIL RGB image, W x H.
        top_classes: the top-k classes, most probable first.
        box: ``(x0, y0, x1, y1)`` inclusive pixel coordinates in the image, or ``None``.
        scoremap: float32 (H, W) in [0, 1], the 224 map resized bilinearly to the image.
        exif_orientation: the EXIF orientation tag applied to the file's pixels to give ``image``
            (1: none; 6 and 8 swap W and H); box and map are in ``image``'s frame.
    """

    path: str
    image: Image.Image = field(repr=False)
    top_classes: tuple[ClassScore, ...]
    box: tuple[int, int, int, int] | None
    scoremap: np.ndarray = field(repr=False)
    exif_orientation: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """``(W, H)`` of the image."""
        return self.image.size

    def record(self, overlay: str | None = None, map: str | None = None) -> ImageRecord:
        """What is kept of this result once its files (named ``overlay`` and ``map``) are written."""
        return ImageRecord(self.path, self.size, self.exif_orientation, self.top_classes, self.box, overlay, map)

    def to_json(self) -> dict[str, Any]:
        """The image's entry of ``localization.json`` without the file names."""
        entry = self.record().to_json()
        del entry["overlay"]
        return entry


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be read: its path as given and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageRecord:
    """What :func:`localize_to_folder` keeps of one image once its files are written (about 1 KB).

    Attributes:
        path: the path as given.
        size: ``(W, H)`` of the (EXIF-turned) image, pixels.
        exif_orientation: the EXIF orientation tag applied (1: none).
        top_classes: the top-k classes, most probable first.
        box: ``(x0, y0, x1, y1)`` inclusive pixel coordinates in the image, or ``None``.
        overlay: the overlay's file name in the output folder, or ``None`` (no overlays).
        map: the ``.npy`` map's file name in the output folder, or ``None`` (no ``save_maps``).
    """

    path: str
    size: tuple[int, int]
    exif_orientation: int
    top_classes: tuple[ClassScore, ...]
    box: tuple[int, int, int, int] | None
    overlay: str | None = None
    map: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The image's entry of ``localization.json`` (see :func:`write_localization`)."""
        entry = {
            "path": self.path,
            "size": list(self.size),
            "exif_orientation": self.exif_orientation,
            "top_classes": [{"index": c.index, "name": c.name, "probability": c.probability}
                            for c in self.top_classes],
            "box": None if self.box is None else list(self.box),
            "overlay": self.overlay,
        }
        if self.map is not None:
            entry["map"] = self.map
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ImageRecord:
        """The record :meth:`to_json` gave; KeyError, TypeError or ValueError if it is not one."""
        box = entry["box"]
        return cls(
            path=str(entry["path"]),
            size=tuple(int(v) for v in entry["size"]),
            exif_orientation=int(entry["exif_orientation"]),
            top_classes=tuple(ClassScore(int(c["index"]), c["name"], float(c["probability"]))
                              for c in entry["top_classes"]),
            box=None if box is None else tuple(int(v) for v in box),
            overlay=entry["overlay"],
            map=entry.get("map"),
        )


@dataclass
class LocalizeReport:
    """What :func:`localize_images` found; the results hold every decoded image and full-size map
    (about 12 MB per megapixel): for many images use :func:`localize_to_folder`."""

    method: str
    threshold: float
    images: list[ImageLocalization]
    skipped: list[SkippedImage]


@dataclass
class LocalizeSummary:
    """What :func:`localize_to_folder` wrote: small records only, no pixels.

    Attributes:
        method, threshold: as used.
        images: one record per readable image, in the order given.
        skipped: the unreadable files, in the order given, and why.
        path: the ``localization.json`` written.
        reused: how many of ``images`` came from an earlier run's records.
    """

    method: str
    threshold: float
    images: list[ImageRecord]
    skipped: list[SkippedImage]
    path: Path
    reused: int = 0


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_threshold(value: Any, source: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{source} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_class_names(class_names: Sequence[str] | None, num_classes: int, source: str = "class_names"):
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not all(
            isinstance(n, str) for n in class_names):
        raise ValueError(f"{source} must be a list of strings, got {class_names!r}")
    if len(class_names) != num_classes:
        raise ValueError(f"{source} has {len(class_names)} names, but the model has {num_classes} classes")
    return list(class_names)


@dataclass(frozen=True)
class _Options:
    """The checked settings of one localization run."""

    method: str
    threshold: float
    topk: int
    class_names: list[str] | None
    map_options: dict[str, Any]
    batch_size: int
    device: Any
    input_size: int
    exif_orientation: bool


def _check_options(model, *, method, threshold, topk, class_names, map_options, batch_size, device, input_size,
                   exif_orientation) -> _Options:
    """Check the arguments of :func:`localize_images`; moves ``model`` to the device."""
    if method not in METHOD_CHOICES:
        raise ValueError(f"unknown map method {method!r}; choose one of {METHOD_CHOICES}")
    if threshold is None:
        log.info("no threshold given: using the default %s", DEFAULT_THRESHOLD)
        threshold = DEFAULT_THRESHOLD
    threshold = _check_threshold(threshold)
    topk = min(_check_positive_int("topk", topk), model.num_classes)
    class_names = _check_class_names(class_names, model.num_classes)
    batch_size = _check_positive_int("batch_size", batch_size)
    map_options = dict(map_options or {})
    if "size" in map_options:
        raise ValueError("map option 'size' is fixed by localize: maps are made at 224 x 224, then resized")
    if model.training:
        raise ValueError("localize_images needs the model in eval mode; call model.eval()")
    from mnpo.engine.runtime import resolve_device

    device = resolve_device(str(device))
    model.to(device)
    return _Options(method, threshold, topk, class_names, map_options, batch_size, device, input_size,
                    bool(exif_orientation))


def _paths_of(paths: Sequence[str | os.PathLike]) -> list[str]:
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no image paths given")
    return paths


def _none_readable(paths: Sequence[str], skipped: Sequence[SkippedImage]) -> LocalizeError:
    listed = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
    return LocalizeError(f"none of the {len(paths)} images could be read: {listed}")


def localize_images(model: torch.nn.Module, paths: Sequence[str | os.PathLike], *, method: str = "mnpo",
                    threshold: float | None = None, topk: int = 5, class_names: Sequence[str] | None = None,
                    map_options: Mapping[str, Any] | None = None, batch_size: int = 16,
                    device: str | torch.device = "cpu", input_size: int = VIEW_SIZE,
                    exif_orientation: bool = True) -> LocalizeReport:
    """Classify and localize each image file (see the module doc), keeping every result in memory.

    The report holds each decoded image and its full-size float32 map (7 bytes per pixel:
    about 80 MB for a 12-megapixel photo); for more than a few images use
    :func:`localize_to_folder`, which writes each result as it is done and keeps none.

    Args:
        model: a ``MultiBranchNet`` in eval mode; it is moved to ``device``.
        paths: image files; unreadable ones are skipped (logged, listed in ``skipped``).
        method: map method, one of ``mnpo.maps.METHODS``.
        threshold: box threshold in [0, 1]; ``None`` uses :data:`DEFAULT_THRESHOLD` (logged).
        topk: classes to report, at most the model's class count.
        class_names: one name per class, or ``None``.
        map_options: options of ``compute_maps`` (``MapOptions``), except ``size``.
        batch_size: images per localization batch and crops per classification forward.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        input_size: side of the network's views (224, the protocol; the ten crops come from a
            ``input_size * 256 / 224`` resize); the map is made in the 224 x 224 frame either way.
        exif_orientation: turn each image as its EXIF orientation tag says before anything else
            (box, map and size are then in the frame viewers show); False: the stored pixel grid.

    Raises:
        LocalizeError: none of the images could be read (each is named).
        ValueError: a bad argument.
    """
    paths = _paths_of(paths)
    opts = _check_options(model, method=method, threshold=threshold, topk=topk, class_names=class_names,
                          map_options=map_options, batch_size=batch_size, device=device, input_size=input_size,
                          exif_orientation=exif_orientation)
    results: list[ImageLocalization] = []
    skipped: list[SkippedImage] = []
    for _, item in _localize_stream(model, list(enumerate(paths)), opts):
        if isinstance(item, SkippedImage):
            skipped.append(item)
        else:
            results.append(item.localization())
    if not results:
        raise _none_readable(paths, skipped)
    return LocalizeReport(opts.method, opts.threshold, results, skipped)


@dataclass
class _Done:
    """One localized image before its full-size map is made.

    ``image`` is the decoded PIL RGB image (W x H), or ``None`` when the caller needs no
    pixels (no overlays); ``view_map`` is the float32 (224, 224) map in [0, 1].
    """

    path: str
    image: Image.Image | None
    size: tuple[int, int]
    exif_orientation: int
    top_classes: tuple[ClassScore, ...]
    box: tuple[int, int, int, int] | None
    view_map: np.ndarray

    def full_map(self) -> np.ndarray:
        """float32 (H, W) in [0, 1]: ``view_map`` resized bilinearly to the image."""
        import cv2

        width, height = self.size
        full = cv2.resize(self.view_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return full.clip(0.0, 1.0)

    def localization(self) -> ImageLocalization:
        return ImageLocalization(self.path, self.image, self.top_classes, self.box, self.full_map(),
                                 self.exif_orientation)


def _localize_stream(model, items: Sequence[tuple[int, str]], opts: _Options,
                     keep_images: bool = True) -> Iterator[tuple[int, _Done | SkippedImage]]:
    """``(index, result)`` for each ``(index, path)`` of ``items``, in order within each batch of
    ``opts.batch_size`` (a batch's unreadable files first). At most one batch of decoded images
    is alive at a time, and none with ``keep_images=False``: each is dropped once its
    views are made."""
    from mnpo.data.transforms import ImageReadError, load_image

    for start in range(0, len(items), opts.batch_size):
        batch = []
        for index, path in items[start:start + opts.batch_size]:
            try:
                batch.append((index, path, load_image(path, exif_orientation=opts.exif_orientation)))
            except ImageReadError as err:
                log.warning("skipping %s: %s", path, err.reason)
                yield index, SkippedImage(path, err.reason)
        if batch:
            yield from _localize_batch(model, batch, opts, keep_images)


def _localize_batch(model, batch: list, opts: _Options, keep_images: bool) -> Iterator[tuple[int, _Done]]:
    """The results for ``batch``, a list of ``(index, path, PIL RGB image)`` it empties:
    one classification, one map pass, then one :class:`_Done` at a time."""
    from mnpo.metrics.boxes import predicted_boxes

    entries = [(index, path, image.size, image.info.get("exif_orientation", 1)) for index, path, image in batch]
    images = [image for _, _, image in batch]
    batch.clear()
    top_p, top_i, maps = _classify_and_map(model, images, opts)
    if not keep_images:
        images = [None] * len(entries)
    for k, ((index, path, (width, height), orientation), probs, indices) in enumerate(zip(entries, top_p, top_i)):
        found = predicted_boxes(maps[k], opts.threshold)
        box = box_to_image(found[0], width, height) if len(found) else None
        top = tuple(ClassScore(i, None if opts.class_names is None else opts.class_names[i], p)
                    for i, p in zip(indices, probs))
        done = _Done(path, images[k], (width, height), orientation, top, box, maps[k])
        images[k] = None  # the consumer holds the only reference
        yield index, done
        del done


def _classify_and_map(model, images: Sequence[Image.Image], opts: _Options):
    """Top-k probabilities and classes (two lists of B lists) and float32 (B, 224, 224) maps of
    the top-1 class, for B PIL RGB images; the network's tensors are freed on return."""
    import torch

    from mnpo.data.transforms import normalize_batch, ten_crop_batch, uint8_views
    from mnpo.maps.methods import compute_maps

    dtype = next(model.parameters()).dtype
    # both views from one decode, as uint8; normalized and ten-cropped batch-wise on the device
    pairs = [uint8_views(image, opts.input_size, resize_for(opts.input_size)) for image in images]
    views = normalize_batch(torch.stack([v for v, _ in pairs]).to(opts.device)).to(dtype)
    sources = normalize_batch(torch.stack([src for _, src in pairs]).to(opts.device))
    crops = ten_crop_batch(sources, opts.input_size).to(dtype)
    top_p, top_i = _ten_crop_probabilities(model, crops, opts.batch_size).topk(opts.topk, dim=1)
    maps, _ = compute_maps(model, views, top_i[:, 0], method=opts.method, size=(VIEW_SIZE, VIEW_SIZE),
                           **opts.map_options)
    return top_p.tolist(), top_i.tolist(), maps.cpu().numpy()


def _ten_crop_probabilities(model, crops: torch.Tensor, chunk: int) -> torch.Tensor:
    """Softmax of the main branch's logits averaged over the ten crops.

    ``crops`` (B, 10, 3, 224, 224), forwarded ``chunk`` crops at a time -> float64 (B, K).
    """

    return ten_crop_logits(model, crops, chunk).double().mean(1).softmax(1)


def unique_stems(paths: Sequence[str]) -> list[str]:
    """One output name per path: its stem, with ``-1``, ``-2``, ... added to later repeats.

    Names are compared case-insensitively (``A.png`` and ``a.jpg`` would share a file on
    some file systems).
    """
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = stem, 0
        while name.casefold() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name.casefold())
        names.append(name)
    return names


def _write_files(image, scoremap, box, name: str, out: Path, overlays: bool,
                 save_maps: bool) -> tuple[str | None, str | None]:
    """Write ``out/<name>.png`` (overlay of the PIL RGB ``image``, W x H, with the float32
    (H, W) ``scoremap`` and the box) and/or ``out/<name>.npy`` (the map), each atomically;
    returns their names (``None`` for a file not asked for)."""
    from mnpo.io import atomic_path

    overlay = map_name = None
    if overlays:
        from mnpo.engine.overlay import heatmap_overlay

        picture = heatmap_overlay(image, scoremap, boxes=() if box is None else [box])
        with atomic_path(out / f"{name}.png") as tmp:
            picture.save(tmp, format="PNG")
        overlay = f"{name}.png"
    if save_maps:
        with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, scoremap.astype(np.float32))
        map_name = f"{name}.npy"
    return overlay, map_name


def _report_json(method: str, threshold: float, entries: list[dict[str, Any]],
                 skipped: Sequence[SkippedImage]) -> dict[str, Any]:
    return {
        "method": method,
        "threshold": threshold,
        "images": entries,
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
    }


def write_localization(report: LocalizeReport, out_dir: str | os.PathLike, overlays: bool = True,
                       save_maps: bool = False) -> Path:
    """Write ``out_dir/localization.json`` and per image ``<stem>.png`` / ``<stem>.npy``.

    The JSON::

        {"method", "threshold",
         "images": [{"path", "size": [w, h], "exif_orientation",
                     "top_classes": [{"index", "name", "probability"}],
                     "box": [x0, y0, x1, y1] or null, "overlay": "<stem>.png" or null,
                     "map": "<stem>.npy" (with save_maps)}],
         "skipped": [{"path", "reason"}]}

    Overlays are the image with the map's jet heat map and the box (green); maps are
    float32 (H, W) ``.npy`` files at the image's size. Equal stems get ``-1``, ``-2``, ...
    Every file is written atomically. Returns the JSON's path. :func:`localize_to_folder`
    writes the same files as it goes.
    """
    from mnpo.io import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for result, name in zip(report.images, unique_stems([r.path for r in report.images])):
        overlay, map_name = _write_files(result.image, result.scoremap, result.box, name, out, overlays, save_maps)
        entries.append(result.record(overlay, map_name).to_json())
    path = out / REPORT_NAME
    write_json_atomic(path, _report_json(report.method, report.threshold, entries, report.skipped))
    log.info("wrote %s (%d images, %d skipped)", path, len(entries), len(report.skipped))
    return path


def localize_to_folder(model: torch.nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                       overlays: bool = True, save_maps: bool = False, resume: bool = True,
                       on_result: Callable[[ImageRecord | SkippedImage], None] | None = None,
                       method: str = "mnpo", threshold: float | None = None, topk: int = 5,
                       class_names: Sequence[str] | None = None, map_options: Mapping[str, Any] | None = None,
                       batch_size: int = 16, device: str | torch.device = "cpu", input_size: int = VIEW_SIZE,
                       exif_orientation: bool = True) -> LocalizeSummary:
    """Localize each image and write its results as soon as it is done (``mnpo localize``).

    Per readable image, in this order: ``out_dir/<stem>.png`` (overlay, with ``overlays``) and
    ``out_dir/<stem>.npy`` (float32 (H, W) map, with ``save_maps``), each atomically; then its
    record, one line appended to ``out_dir/localization.jsonl`` and flushed to disk. Unreadable
    files get a ``{"skipped": {"path", "reason"}}`` line. At the end ``localization.json`` is
    written (atomically) from the records, in the order of ``paths``: the same file, in the same
    layout, as :func:`write_localization` writes for :func:`localize_images`' report.

    Memory does not grow with the number of images: at most one batch of decoded images
    (``batch_size`` x 3 bytes per pixel; none without overlays), one full-size map (4 bytes
    per pixel) and one overlay are alive at a time, and what is kept per image is an
    :class:`ImageRecord` of about 1 KB.

    The first line of ``localization.jsonl`` is ``{"settings": {...}}``: the method, threshold,
    top-k, class names, map options, input size, EXIF handling, outputs asked for, the mnpo
    version and a hash of the model's weights. With ``resume``, a record made under the same
    settings is reused (not recomputed) when its image file has the same size and modification
    time as then, it has the same output name, and its overlay / map files are still there; so
    a run stopped part way (Ctrl-C, a crash, a full disk) continues where it stopped. Unreadable
    files are tried again. Records made under other settings are discarded (logged, naming
    what changed), as are all with ``resume=False``. A line cut short by an interruption is
    dropped.

    Args:
        model, paths, method, threshold, topk, class_names, map_options, batch_size, device,
            input_size, exif_orientation: as for :func:`localize_images`.
        out_dir: the output folder, created if needed.
        overlays: write one PNG overlay per image (the jet heat map and the box).
        save_maps: write each full-size map as ``.npy``.
        resume: reuse the finished records of an earlier run (above).
        on_result: called with each image's :class:`ImageRecord` (reused ones too) or
            :class:`SkippedImage`, once it is written, in the order of ``paths`` within a batch.

    Returns:
        the records (no pixels), the skipped files and the JSON's path.

    Raises:
        LocalizeError: none of the images could be read (each is named); no JSON is written.
        ValueError: a bad argument.
        OSError: an output file cannot be written (named by the OS error).
    """
    from mnpo.io import write_json_atomic

    paths = _paths_of(paths)
    opts = _check_options(model, method=method, threshold=threshold, topk=topk, class_names=class_names,
                          map_options=map_options, batch_size=batch_size, device=device, input_size=input_size,
                          exif_orientation=exif_orientation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_stems(paths)
    settings = _run_settings(model, opts, overlays, save_maps)
    records_path = out / RECORDS_NAME
    finished = _reusable_records(records_path, settings, paths, names, out) if resume else {}
    _start_records(records_path, settings, [line for _, line in sorted(finished.items())])
    if finished:
        log.info("%s: reusing %d finished records of an earlier run", records_path, len(finished))

    records: list[ImageRecord | None] = [None] * len(paths)
    skipped: dict[int, SkippedImage] = {}
    for index, line in finished.items():
        records[index] = ImageRecord.from_json(line["image"])
    reused = sorted(finished)
    pending = [(i, p) for i, p in enumerate(paths) if i not in finished]
    sources = {i: _source_of(p) for i, p in pending}  # before decoding: a later change is noticed

    def report(item):
        if on_result is not None:
            on_result(item)

    with open(records_path, "a", encoding="utf-8") as lines:
        for index, item in _localize_stream(model, pending, opts, keep_images=overlays):
            while reused and reused[0] < index:
                report(records[reused.pop(0)])
            if isinstance(item, SkippedImage):
                skipped[index] = item
                _append_line(lines, {"skipped": {"path": item.path, "reason": item.reason}})
            else:
                records[index] = _finish(item, names[index], out, overlays, save_maps)
                _append_line(lines, {"image": records[index].to_json(), "name": names[index],
                                     "source": sources[index]})
                item = records[index]
            report(item)
    for index in reused:
        report(records[index])

    images = [r for r in records if r is not None]
    skipped_list = [skipped[i] for i in sorted(skipped)]
    if not images:
        raise _none_readable(paths, skipped_list)
    path = out / REPORT_NAME
    write_json_atomic(path, _report_json(opts.method, opts.threshold, [r.to_json() for r in images], skipped_list))
    log.info("wrote %s (%d images, %d of them from an earlier run; %d skipped)", path, len(images),
             len(finished), len(skipped_list))
    return LocalizeSummary(opts.method, opts.threshold, images, skipped_list, path, len(finished))


def _finish(done: _Done, name: str, out: Path, overlays: bool, save_maps: bool) -> ImageRecord:
    """Write one image's files; its full-size map and overlay are freed on return."""
    scoremap = done.full_map() if overlays or save_maps else None
    overlay, map_name = _write_files(done.image, scoremap, done.box, name, out, overlays, save_maps)
    return ImageRecord(done.path, done.size, done.exif_orientation, done.top_classes, done.box, overlay, map_name)


def _source_of(path: str) -> dict[str, int] | None:
    """What identifies the file's content cheaply: its size (bytes) and modification time (ns)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _model_hash(model) -> str:
    """BLAKE2b of the model's class and of every state-dict entry's name, dtype, shape and bytes."""
    import hashlib

    import torch

    digest = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _run_settings(model, opts: _Options, overlays: bool, save_maps: bool) -> dict[str, Any]:
    """Everything a record depends on, as it reads back from JSON."""
    from mnpo import __version__

    settings = {
        "format": RECORDS_FORMAT, "mnpo": __version__, "model": _model_hash(model), "method": opts.method,
        "threshold": opts.threshold, "topk": opts.topk, "class_names": opts.class_names,
        "map_options": dict(sorted(opts.map_options.items())), "input_size": opts.input_size,
        "exif_orientation": opts.exif_orientation, "overlays": bool(overlays), "save_maps": bool(save_maps),
    }
    return json.loads(json.dumps(settings, default=repr))


def _changed(old: Any, new: Mapping[str, Any]) -> str:
    """The settings that differ, in words; empty when none does."""
    if not isinstance(old, Mapping):
        return "no settings line"
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append("the model's weights" if key == "model" else f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return ", ".join(changes)


def _reusable_records(path: Path, settings: Mapping[str, Any], paths: Sequence[str], names: Sequence[str],
                      out: Path) -> dict[int, dict[str, Any]]:
    """The lines of an earlier run's ``path`` that this run can keep, by index into ``paths``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        log.warning("%s: cannot be read (%s): localizing every image again", path, err)
        return {}
    lines = text.split("\n")
    if lines.pop():  # the part after the last newline: a line cut short by an interruption
        log.info("%s: dropping its last line, cut short", path)
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])["settings"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: line 1 is not a settings line: localizing every image again", path)
        return {}
    changed = _changed(header, settings)
    if changed:
        log.info("%s: made with other settings (%s): localizing every image again", path, changed)
        return {}
    wanted = {(p, n): i for i, (p, n) in enumerate(zip(paths, names))}
    kept: dict[int, dict[str, Any]] = {}
    for number, text_line in enumerate(lines[1:], start=2):
        try:
            line = json.loads(text_line)
            if "skipped" in line:
                continue  # tried again
            record = ImageRecord.from_json(line["image"])
            index = wanted.get((record.path, line["name"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s: line %d is not a record: ignored", path, number)
            continue
        if index is None or line.get("source") is None or line["source"] != _source_of(record.path):
            continue  # not asked for this time, or the file changed
        if any(name is not None and not (out / name).is_file() for name in (record.overlay, record.map)):
            continue  # its overlay or map is gone
        kept[index] = line
    return kept


def _start_records(path: Path, settings: Mapping[str, Any], lines: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``path``, atomically, by the settings line and ``lines`` (the records kept)."""
    from mnpo.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for line in [{"settings": settings}, *lines]:
            fh.write(json.dumps(line) + "\n")


def _append_line(fh, line: Mapping[str, Any]) -> None:
    """One JSON line, written in one piece and flushed to disk (a kill leaves at most this line cut short)."""
    fh.write(json.dumps(line) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_normalize_args(parser: argparse.ArgumentParser, default: str = "minmax, wsolevaluation's") -> None:
    """``--normalize`` and ``--percentile``: how each map becomes [0, 1] (``MapOptions.normalize``)."""
    parser.add_argument("--normalize", choices=NORMALIZATION_CHOICES, default=None,
                        help=f"map normalization: minmax, max, pas (PaS) or ivr (IVR, ICCV 2021); default: {default}")
    parser.add_argument("--percentile", type=float, default=None, metavar="P",
                        help="IVR's percentile in [0, 1) (default 0.45; only with --normalize ivr)")


def normalize_options(args: argparse.Namespace) -> dict[str, Any]:
    """The map options ``--normalize`` and ``--percentile`` give; a percentile without IVR is refused."""
    options: dict[str, Any] = {}
    if getattr(args, "normalize", None) is not None:
        options["normalize"] = args.normalize
    if getattr(args, "percentile", None) is not None:
        if options.get("normalize") != "ivr":
            raise SystemExit(f"--percentile {args.percentile} is IVR's: give it with --normalize ivr")
        if not 0 <= args.percentile < 1:
            raise SystemExit(f"--percentile must lie in [0, 1), got {args.percentile}")
        options["percentile"] = args.percentile
    return options


def add_model_args(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    """``--checkpoint CKPT`` or ``--model SPEC`` (one of them), ``--weights``, ``--num-classes``."""
    which = parser.add_mutually_exclusive_group(required=True)
    if checkpoint:
        which.add_argument("--checkpoint", metavar="CKPT",
                           help="an mnpo checkpoint (from training or `mnpo import-checkpoint`); class names and "
                           "the operating threshold are read from its meta when it has them")
    which.add_argument("--model", metavar="SPEC",
                       help="any classifier instead: torchvision:NAME (its weights API's default weights, or "
                       "--weights), timm:NAME (when timm is installed) or module:package.module.factory")
    parser.add_argument("--weights", metavar="FILE",
                        help="with --model: a state dict file, loaded strictly")
    parser.add_argument("--num-classes", type=_positive_int, metavar="K",
                        help="with --model: its class count when it is not ImageNet's 1000")


def model_from_args(args: argparse.Namespace):
    """``(model in eval mode, meta dict, name)`` of ``--checkpoint`` or ``--model``."""
    if getattr(args, "checkpoint", None) is None and (args.weights is not None or args.num_classes is not None) \
            and args.model is None:
        raise ValueError("--weights and --num-classes go with --model")
    if getattr(args, "checkpoint", None) is not None:
        if args.weights is not None or args.num_classes is not None:
            raise ValueError("--weights and --num-classes go with --model, not --checkpoint")
        from mnpo.models import load_model

        model, payload = load_model(args.checkpoint)
        return model, payload.get("meta") or {}, str(args.checkpoint)
    from mnpo.models.external import build_external

    model = build_external(args.model, args.weights, args.num_classes, getattr(args, "input_size", VIEW_SIZE))
    return model, {"class_names": model.class_names}, args.model


def add_localize_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``localize`` on an ``add_subparsers()`` object; returns its parser."""
    parser = subparsers.add_parser(
        "localize",
        help="classify and localize image files with a trained checkpoint (JSON + overlays)",
        description="Classify each image (main-branch logits averaged over ten crops, top-k) and "
        "localize the top class: its score map on the 224x224 view, the box of the largest region "
        "above the threshold, scaled to the image. Writes OUT/localization.json and one heat-map "
        "overlay OUT/<stem>.png per image, and prints one line per image. Unreadable images are "
        "skipped with a warning and listed in the JSON.",
    )
    add_model_args(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files of any size, in any format Pillow reads, or folders (every image "
                        "below them)")
    parser.add_argument("--out", default="localize-output", metavar="DIR",
                        help="output folder, created if needed (default: localize-output)")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="mnpo",
                        help="map method: mnpo (post-processed multi-branch CAM, no gradients), mnpos "
                        "(gradient post-processing), cam, dgl, or the CAM family: gradcam, gradcampp, "
                        "xgradcam, layercam, hirescam, scorecam, ablationcam, eigencam (default: mnpo)")
    parser.add_argument("--target-layer", metavar="NAME",
                        help="feature the gradient methods and the CAM family work at (e.g. conv5_2, head; "
                        "default: the method's)")
    parser.add_argument("--chunk-size", type=_positive_int, metavar="N",
                        help="masked or ablated copies per forward pass of scorecam / ablationcam (default 16)")
    parser.add_argument("--top-k", dest="top_k", type=_positive_int, metavar="K",
                        help="cam on a <backbone>-bas network: the mean of the generator's maps of the K "
                             "best-scored classes instead of the predicted class's")
    add_normalize_args(parser)
    parser.add_argument("--threshold", type=_unit_float, default=None, metavar="T",
                        help="score-map threshold in [0, 1] for the box (default: the checkpoint's "
                        f"operating_threshold, else {DEFAULT_THRESHOLD})")
    parser.add_argument("--topk", type=_positive_int, default=5, metavar="K",
                        help="classes to report per image, at most the class count (default: 5)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                        help="images per map batch and crops per classification forward (default: 16)")
    parser.add_argument("--input-size", type=_positive_int, default=VIEW_SIZE, metavar="PX",
                        help="network input side (default: 224, the protocol; the demo's models use 64)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where the network runs; auto takes CUDA when available (default: auto)")
    parser.add_argument("--ignore-exif", action="store_true",
                        help="use the stored pixel grid; by default each image is first turned as its EXIF "
                        "orientation tag says (phone photos), so boxes are in the frame viewers show")
    parser.add_argument("--no-overlays", action="store_true",
                        help="write only the JSON, no overlay PNGs")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write each score map, resized to its image, as OUT/<stem>.npy (float32 H x W)")
    parser.add_argument("--no-resume", action="store_true",
                        help="localize every image again, even those an earlier run into OUT finished "
                             "with the same settings and model")
    parser.set_defaults(func=run_localize)
    return parser


def _checkpoint_settings(meta: Mapping[str, Any], num_classes: int, source: str):
    """Class names and operating threshold from a checkpoint's meta (either may be ``None``)."""
    names = _check_class_names(meta.get("class_names"), num_classes, f"{source}: meta class_names")
    threshold = meta.get("operating_threshold")
    if threshold is not None:
        threshold = _check_threshold(threshold, f"{source}: meta operating_threshold")
    return names, threshold


def _summary(result: ImageLocalization | ImageRecord) -> str:
    best = result.top_classes[0]
    label = best.name if best.name is not None else f"class {best.index}"
    box = "no box" if result.box is None else "box " + ",".join(map(str, result.box))
    width, height = result.size
    return f"{result.path} ({width}x{height}): {label} {best.probability:.1%}, {box}"


def expand_image_paths(paths: Sequence[str]) -> list[str]:
    """The arguments, with each folder replaced by the image files below it (recursively, sorted;
    see :data:`mnpo.data.image_files.IMAGE_EXTENSIONS`). Files are kept as given, even
    unreadable ones (they are skipped and listed later). Raises ValueError for a folder without images."""
    from mnpo.data.image_files import IMAGE_EXTENSIONS, is_image_file

    expanded = []
    for arg in paths:
        folder = Path(arg)
        if not folder.is_dir():
            expanded.append(arg)
            continue
        found = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        if not found:
            raise ValueError(f"{folder}: a folder without images (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
        expanded.extend(found)
    return expanded


def run_localize(args: argparse.Namespace) -> int:
    """The ``localize`` subcommand: load the checkpoint, localize, write, print a summary."""
    model, meta, name = model_from_args(args)
    class_names, meta_threshold = _checkpoint_settings(meta, model.num_classes, name)
    threshold = args.threshold
    if threshold is not None:
        log.info("threshold %s from --threshold", threshold)
    elif meta_threshold is not None:
        threshold = meta_threshold
        log.info("threshold %s: the checkpoint's operating_threshold", threshold)

    def show(item):  # as each image is written, so a long run shows its progress
        if isinstance(item, SkippedImage):
            print(f"skipped {item.path}: {item.reason}", flush=True)
        else:
            print(_summary(item), flush=True)

    report = localize_to_folder(model, expand_image_paths(args.images), args.out, overlays=not args.no_overlays,
                                save_maps=args.save_maps, resume=not args.no_resume, on_result=show,
                                method=args.method, threshold=threshold, topk=args.topk, class_names=class_names,
                                batch_size=args.batch_size, device=args.device, input_size=args.input_size,
                                exif_orientation=not args.ignore_exif,
                                map_options={**{k: v for k, v in (("target_layer", args.target_layer),
                                                                  ("chunk_size", args.chunk_size),
                                                                  ("top_k", args.top_k)) if v is not None},
                                             **normalize_options(args)})
    path = report.path
    reused = f" ({report.reused} from an earlier run)" if report.reused else ""
    print(f"{report.method} at threshold {report.threshold:g}: {len(report.images)} images{reused}, "
          f"{len(report.skipped)} skipped; wrote {path}")
    return 0
