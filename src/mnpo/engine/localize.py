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

:func:`write_localization` writes ``localization.json`` and one PNG overlay per image.
Heavy modules (torch, OpenCV, the networks) are imported inside the functions that use
them, so that registering the subcommand keeps ``mnpo --help`` instant.
"""

from __future__ import annotations

import argparse
import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_THRESHOLD", "ClassScore", "ImageLocalization", "LocalizeError", "LocalizeReport",
    "SkippedImage", "add_localize_parser", "box_to_image", "expand_image_paths", "localize_images",
    "run_localize", "unique_stems", "write_localization",
]

log = logging.getLogger(__name__)

#: Box threshold when neither the caller nor the checkpoint gives one.
DEFAULT_THRESHOLD = 0.2
#: Side of the localization view and of the maps' frame (spec section 6).
VIEW_SIZE = 224
#: ``mnpo.maps.METHODS``, repeated here so that building the parser does not import torch (tested equal).
METHOD_CHOICES = ("cam", "mnpo", "mnpos", "gradcam", "dgl", "gradcampp", "xgradcam", "layercam", "hirescam",
                  "scorecam", "ablationcam", "eigencam", "center")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
REPORT_NAME = "localization.json"


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

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": list(self.size),
            "exif_orientation": self.exif_orientation,
            "top_classes": [{"index": c.index, "name": c.name, "probability": c.probability}
                            for c in self.top_classes],
            "box": None if self.box is None else list(self.box),
        }


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be read: its path as given and why."""

    path: str
    reason: str


@dataclass
class LocalizeReport:
    """What :func:`localize_images` found; the results hold every decoded image and full-size map."""

    method: str
    threshold: float
    images: list[ImageLocalization]
    skipped: list[SkippedImage]


def box_to_image(box: Sequence[int], width: int, height: int, frame: int = VIEW_SIZE) -> tuple[int, int, int, int]:
    """An inclusive box of the ``frame x frame`` map, scaled into a W x H image.

    Pixel ``x`` of the frame covers ``[x, x + 1)``, i.e. ``[x W / frame, (x + 1) W / frame)`` of
    the image: ``x0 -> floor(x0 W / frame)``, ``x1 -> floor((x1 + 1) W / frame) - 1`` (never
    left of ``x0``), the same for ``y``, clipped to ``[0, W - 1]`` and ``[0, H - 1]``.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    left, top = x0 * width // frame, y0 * height // frame
    right = max(left, (x1 + 1) * width // frame - 1)
    bottom = max(top, (y1 + 1) * height // frame - 1)
    clipped = np.clip([left, top, right, bottom], 0, [width - 1, height - 1, width - 1, height - 1])
    return tuple(int(v) for v in clipped)


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


def localize_images(model: torch.nn.Module, paths: Sequence[str | os.PathLike], *, method: str = "mnpo",
                    threshold: float | None = None, topk: int = 5, class_names: Sequence[str] | None = None,
                    map_options: Mapping[str, Any] | None = None, batch_size: int = 16,
                    device: str | torch.device = "cpu", input_size: int = VIEW_SIZE,
                    exif_orientation: bool = True) -> LocalizeReport:
    """Classify and localize each image file (see the module doc).

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
    from mnpo.data.transforms import ImageReadError, load_image

    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no image paths given")
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

    results: list[ImageLocalization] = []
    skipped: list[SkippedImage] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            try:
                batch.append((path, load_image(path, exif_orientation=exif_orientation)))
            except ImageReadError as err:
                log.warning("skipping %s: %s", path, err.reason)
                skipped.append(SkippedImage(path, err.reason))
        if batch:
            results.extend(_localize_batch(model, batch, method, threshold, topk, class_names,
                                           map_options, batch_size, device, input_size))
    if not results:
        listed = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
        raise LocalizeError(f"none of the {len(paths)} images could be read: {listed}")
    return LocalizeReport(method, threshold, results, skipped)


def _ten_crop_probabilities(model, crops: torch.Tensor, chunk: int) -> torch.Tensor:
    """Softmax of the main branch's logits averaged over the ten crops.

    ``crops`` (B, 10, 3, 224, 224), forwarded ``chunk`` crops at a time -> float64 (B, K).
    """
    from mnpo.engine.evaluate import ten_crop_logits

    return ten_crop_logits(model, crops, chunk).double().mean(1).softmax(1)


def _localize_batch(model, batch, method, threshold, topk, class_names, map_options, chunk, device,
                    input_size=VIEW_SIZE):
    """Results for ``batch``, a list of ``(path, PIL RGB image)``: one classification, one map pass."""
    import cv2
    import torch

    from mnpo.data.transforms import normalize_batch, ten_crop_batch, uint8_views
    from mnpo.engine.evaluate import resize_for
    from mnpo.maps.methods import compute_maps
    from mnpo.metrics.boxes import predicted_boxes

    dtype = next(model.parameters()).dtype
    # both views from one decode, as uint8; normalized and ten-cropped batch-wise on the device
    pairs = [uint8_views(image, input_size, resize_for(input_size)) for _, image in batch]
    views = normalize_batch(torch.stack([v for v, _ in pairs]).to(device)).to(dtype)
    sources = normalize_batch(torch.stack([src for _, src in pairs]).to(device))
    crops = ten_crop_batch(sources, input_size).to(dtype)
    top_p, top_i = _ten_crop_probabilities(model, crops, chunk).topk(topk, dim=1)
    maps, _ = compute_maps(model, views, top_i[:, 0], method=method, size=(VIEW_SIZE, VIEW_SIZE), **map_options)
    maps = maps.cpu().numpy()
    results = []
    for (path, image), scoremap, probs, indices in zip(batch, maps, top_p.tolist(), top_i.tolist()):
        width, height = image.size
        found = predicted_boxes(scoremap, threshold)
        box = box_to_image(found[0], width, height) if len(found) else None
        full = cv2.resize(scoremap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        top = tuple(ClassScore(i, None if class_names is None else class_names[i], p)
                    for i, p in zip(indices, probs))
        results.append(ImageLocalization(path, image, top, box, full.clip(0.0, 1.0),
                                         image.info.get("exif_orientation", 1)))
    return results


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


def write_localization(report: LocalizeReport, out_dir: str | os.PathLike, overlays: bool = True,
                       save_maps: bool = False) -> Path:
    """Write ``out_dir/localization.json`` and per image ``<stem>.png`` / ``<stem>.npy``.

    The JSON::

        {"method", "threshold",
         "images": [{"path", "size": [w, h], "top_classes": [{"index", "name", "probability"}],
                     "box": [x0, y0, x1, y1] or null, "overlay": "<stem>.png" or null,
                     "map": "<stem>.npy" (with save_maps)}],
         "skipped": [{"path", "reason"}]}

    Overlays are the image with the map's jet heat map and the box (green); maps are
    float32 (H, W) ``.npy`` files at the image's size. Equal stems get ``-1``, ``-2``, ...
    Every file is written atomically. Returns the JSON's path.
    """
    from mnpo.engine.overlay import heatmap_overlay
    from mnpo.io import atomic_path, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for result, name in zip(report.images, unique_stems([r.path for r in report.images])):
        entry = result.to_json()
        entry["overlay"] = None
        if overlays:
            picture = heatmap_overlay(result.image, result.scoremap, boxes=() if result.box is None else [result.box])
            with atomic_path(out / f"{name}.png") as tmp:
                picture.save(tmp, format="PNG")
            entry["overlay"] = f"{name}.png"
        if save_maps:
            with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, result.scoremap.astype(np.float32))
            entry["map"] = f"{name}.npy"
        entries.append(entry)
    path = out / REPORT_NAME
    write_json_atomic(path, {
        "method": report.method,
        "threshold": report.threshold,
        "images": entries,
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
    })
    log.info("wrote %s (%d images, %d skipped)", path, len(entries), len(report.skipped))
    return path


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
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="an mnpo checkpoint (from training or `mnpo import-checkpoint`); class names and "
                        "the operating threshold are read from its meta when it has them")
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
    parser.set_defaults(func=run_localize)
    return parser


def _checkpoint_settings(meta: Mapping[str, Any], num_classes: int, source: str):
    """Class names and operating threshold from a checkpoint's meta (either may be ``None``)."""
    names = _check_class_names(meta.get("class_names"), num_classes, f"{source}: meta class_names")
    threshold = meta.get("operating_threshold")
    if threshold is not None:
        threshold = _check_threshold(threshold, f"{source}: meta operating_threshold")
    return names, threshold


def _summary(result: ImageLocalization) -> str:
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
    from mnpo.models import load_model

    model, payload = load_model(args.checkpoint)
    meta = payload.get("meta") or {}
    class_names, meta_threshold = _checkpoint_settings(meta, model.num_classes, str(args.checkpoint))
    threshold = args.threshold
    if threshold is not None:
        log.info("threshold %s from --threshold", threshold)
    elif meta_threshold is not None:
        threshold = meta_threshold
        log.info("threshold %s: the checkpoint's operating_threshold", threshold)
    report = localize_images(model, expand_image_paths(args.images), method=args.method, threshold=threshold,
                             topk=args.topk, class_names=class_names, batch_size=args.batch_size, device=args.device,
                             input_size=args.input_size, exif_orientation=not args.ignore_exif,
                             map_options={k: v for k, v in (("target_layer", args.target_layer),
                                                            ("chunk_size", args.chunk_size)) if v is not None})
    path = write_localization(report, args.out, overlays=not args.no_overlays, save_maps=args.save_maps)
    for result in report.images:
        print(_summary(result))
    for item in report.skipped:
        print(f"skipped {item.path}: {item.reason}")
    print(f"{report.method} at threshold {report.threshold:g}: {len(report.images)} images, "
          f"{len(report.skipped)} skipped; wrote {path}")
    return 0
