"""Built-in synthetic WSOL data sets in the wsolevaluation layout.

Two presets:

``shapes`` (easy)
    The class is the object's own shape and texture (ellipse, rectangle,
    triangle, star, ring, cross, arrow, chevron x solid, stripes, checker,
    dots) with a class-specific hue; random position, scale (the object covers
    about 10-40% of the image), rotation, aspect and colour jitter, on a noisy,
    smoothly varying background.

``parts`` (the MNPO failure case)
    Every class shares the same object: a large wobbly, ellipse-like body whose
    colour and texture are drawn from one class-independent distribution
    (brownish orange, mottled), covering about 15-45% of the image.  The class
    is given *only* by a small mark (4-8% of the body area; class-specific
    colour and shape) placed at a random spot on the body.  Small distractor
    blobs of random colour clutter the background.  The ground truth (box and
    mask) is the whole body, so a classifier's map that collapses onto the
    mark localizes badly.

In both presets every tenth image of each class (index % 10 == 1) holds two
objects of the same class, with disjoint masks, so that multi-box and
multi-instance evaluation is exercised.

Everything derives from ``seed``: image ``index`` of class ``cls`` in split
``split`` is drawn from ``np.random.default_rng([seed, split_index, cls,
index])`` and does not depend on how many other images are written.  Same
arguments give byte-identical files.

Layout written under ``out`` (see :func:`write_synthetic_dataset`)::

    images/<split>/class_KK/<split>_KK_IIII.png            RGB
    masks/<split>/class_KK/<split>_KK_IIII_mask.png        255 on the object
    masks/<split>/class_KK/<split>_KK_IIII_mask_1.png      second instance, if any
    masks/<split>/class_KK/<split>_KK_IIII_ignore.png      255 = ignore (thin band)
    metadata/<split>/{image_ids,class_labels,image_sizes,localization}.txt
    metadata-masks/<split>/{image_ids,class_labels}.txt     (+ localization.txt for val/test)
    dataset.json, README.txt

Masks are written for val and test (the fully supervised splits) only.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "SPLITS",
    "MIN_IMAGE_SIZE",
    "Sample",
    "SyntheticPreset",
    "ignore_band_width",
    "is_multi_instance",
    "render_sample",
    "tight_box",
    "write_synthetic_dataset",
]

#: Splits in the order of their index in the per-image seed.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Splits that get masks and the mask-layout localization file.
MASK_SPLITS: tuple[str, ...] = ("val", "test")
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
GENERATOR_ID = "mnpo.data.synthetic"
FORMAT_VERSION = 1
#: Entries of ``out`` that a previous synthetic set may hold (and that are replaced).
_OWNED_ENTRIES = ("images", "masks", "metadata", "metadata-masks", "dataset.json", "README.txt")


# --------------------------------------------------------------------------- #
# Samples and presets
# --------------------------------------------------------------------------- #
@dataclass
class Sample:
    """One rendered image with its ground truth.

    ``instance_masks`` are disjoint boolean masks, one per object; ``boxes`` is
    ``(n, 4)`` int64 ``x0, y0, x1, y1`` (inclusive), the tight box of each
    instance mask; ``ignore`` is the thin band just outside the objects;
    ``marks`` holds, for the ``parts`` preset, the class mark of each instance
    (empty for ``shapes``).
    """

    image: np.ndarray
    instance_masks: list[np.ndarray]
    ignore: np.ndarray
    boxes: np.ndarray
    marks: list[np.ndarray] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """Union of the instance masks."""
        return np.logical_or.reduce(self.instance_masks)


@dataclass(frozen=True)
class SyntheticPreset:
    """A named generator: ``render(rng, cls, image_size, n_instances) -> Sample``."""

    name: str
    description: str
    max_classes: int
    class_description: Callable[[int], str]
    render: Callable[[np.random.Generator, int, int, int], Sample]


def ignore_band_width(image_size: int) -> int:
    """Width in pixels of the ignore band around the objects (3 at 224, >= 1)."""
    return max(1, int(image_size * 2.5 / 224 + 0.5))


def is_multi_instance(index: int) -> bool:
    """Whether image ``index`` of a class holds two objects (every tenth image)."""
    return index % 10 == 1


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Inclusive ``[x0, y0, x1, y1]`` of the nonzero pixels of ``mask``."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("tight_box: empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


# --------------------------------------------------------------------------- #
# Drawing helpers (all masks without anti-aliasing)
# --------------------------------------------------------------------------- #
Polys = list[tuple[np.ndarray, int]]  # (vertices (k, 2) in x, y; fill 1 = object, 0 = hole)


def _regular(k: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(k) / k
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _poly_area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polys_area(polys: Polys) -> float:
    return sum(_poly_area(v) * (1 if fill else -1) for v, fill in polys)


_UNIT_SHAPES: dict[str, Polys] = {
    "ellipse": [(_regular(64), 1)],
    "rectangle": [(np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]]), 1)],
    "triangle": [(_regular(3), 1)],
    "star": [(_star(5, 0.45), 1)],
    "ring": [(_regular(64), 1), (_regular(64, 0.55), 0)],
    "cross": [(np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                         [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]), 1)],
    "arrow": [(np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.7], [1, 0], [0.15, 0.7],
                         [0.15, 0.25], [-1, 0.25]]), 1)],
    "chevron": [(np.array([[-0.9, -0.9], [-0.35, -0.9], [0.6, 0], [-0.35, 0.9], [-0.9, 0.9],
                           [0.05, 0]]), 1)],
}
_SHAPE_NAMES = tuple(_UNIT_SHAPES)
_TEXTURES = ("solid", "stripes", "checker", "dots")


def _transform(polys: Polys, scale: float, aspect: float, angle: float) -> Polys:
    """Stretch by ``aspect`` (area preserving), rotate by ``angle``, scale."""
    sx, sy = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [((v * [sx, sy]) @ rot.T * scale, fill) for v, fill in polys]


def _rasterize(polys: Polys, size: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for v, fill in polys:
        pts = [(float(x + offset[0]), float(y + offset[1])) for x, y in v]
        draw.polygon(pts, fill=fill, outline=fill)
    return np.asarray(img, dtype=np.uint8) > 0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), _disk(radius)) > 0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
    """Low-frequency noise (about unit variance), ``(size, size, channels)``."""
    coarse = rng.standard_normal((grid, grid, channels)).astype(np.float32)
    up = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return up.reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.75))
    img = base + 0.10 * _smooth_noise(rng, size, int(rng.integers(3, 7)), 3)
    img += 0.05 * _smooth_noise(rng, size, int(rng.integers(10, 18)), 1)
    img += rng.normal(0.0, 0.035, (size, size, 3)).astype(np.float32)
    return img


def _paste(size: int, patch: np.ndarray, cy: int, cx: int) -> np.ndarray:
    """Full-size mask with ``patch`` centred (at its centre pixel) on ``(cy, cx)``."""
    out = np.zeros((size, size), dtype=bool)
    c = patch.shape[0] // 2
    y0, x0 = cy - c, cx - c
    ys0, xs0 = max(0, -y0), max(0, -x0)
    ys1 = min(patch.shape[0], size - y0)
    xs1 = min(patch.shape[1], size - x0)
    out[y0 + ys0:y0 + ys1, x0 + xs0:x0 + xs1] = patch[ys0:ys1, xs0:xs1]
    return out


def _feasible_centres(patch: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Boolean map of the pixels where ``patch`` (centred on its centre pixel)
    can be put without covering a ``blocked`` pixel or leaving the image."""
    size = blocked.shape[0]
    c = patch.shape[0] // 2
    if c <= 20:  # small patch: a binary dilation (same result) is several times faster
        padded = cv2.copyMakeBorder(blocked.astype(np.uint8), c, c, c, c, cv2.BORDER_CONSTANT, value=1)
        hit = cv2.dilate(padded, patch.astype(np.uint8), anchor=(c, c))
        return hit[c:c + size, c:c + size] == 0
    padded = cv2.copyMakeBorder(blocked.astype(np.float32), c, c, c, c, cv2.BORDER_CONSTANT, value=1.0)
    hits = cv2.filter2D(padded, -1, patch.astype(np.float32), anchor=(c, c),
                        borderType=cv2.BORDER_CONSTANT)
    return hits[c:c + size, c:c + size] < 0.5


def _frame_centres(patch: np.ndarray, size: int, margin: int) -> np.ndarray:
    """:func:`_feasible_centres` when only a ``margin`` px frame is blocked
    (same result, without the large correlation)."""
    c = patch.shape[0] // 2
    rows, cols = np.nonzero(patch.any(axis=1))[0], np.nonzero(patch.any(axis=0))[0]
    out = np.zeros((size, size), dtype=bool)
    y0, y1 = max(0, margin + c - rows[0]), min(size - 1, size - 1 - margin + c - rows[-1])
    x0, x1 = max(0, margin + c - cols[0]), min(size - 1, size - 1 - margin + c - cols[-1])
    if y0 <= y1 and x0 <= x1:
        out[y0:y1 + 1, x0:x1 + 1] = True
    return out


def _place(rng: np.random.Generator, polys: Polys, size: int, margin: int,
           avoid: np.ndarray | None, tries: int = 12) -> np.ndarray | None:
    """Rasterize ``polys`` (centred at 0) at a random position fully inside the
    image (``margin`` px from the border) and off ``avoid``, shrinking it
    until it fits; ``None`` when it does not fit after ``tries`` shrinks."""
    blocked = np.ones((size, size), dtype=bool)
    blocked[margin:size - margin, margin:size - margin] = False
    if avoid is not None:
        blocked |= avoid
    sub = rng.uniform(-0.5, 0.5, 2)  # sub-pixel jitter of the outline
    for attempt in range(tries):
        cur = [(v * 0.85 ** attempt, f) for v, f in polys]
        c = int(math.ceil(max(float(np.abs(v).max()) for v, _ in cur))) + 2
        patch = _rasterize(cur, 2 * c + 1, (c + sub[0], c + sub[1]))
        if not patch.any():
            patch[c, c] = True
        if avoid is None:  # only the border frame is blocked: the centres form a rectangle
            feasible = _frame_centres(patch, size, margin)
        else:
            feasible = _feasible_centres(patch, blocked)
        ys, xs = np.nonzero(feasible)
        if ys.size:
            j = int(rng.integers(ys.size))
            return _paste(size, patch, int(ys[j]), int(xs[j]))
    return None


def _place_instances(rng: np.random.Generator, make: Callable[[float], Polys], size: int,
                     n_instances: int, frac_range: tuple[float, float]) -> list[np.ndarray]:
    """Place ``n_instances`` disjoint objects; ``make(area_px)`` builds one
    object's polygons (centred at 0) with the given area."""
    band = ignore_band_width(size)
    margin = band + 1
    scale = 1.0 if n_instances == 1 else 0.5
    masks: list[np.ndarray] = []
    taken = np.zeros((size, size), dtype=bool)
    for _ in range(n_instances):
        area = rng.uniform(*frac_range) * scale * size * size
        polys = make(area)
        mask = _place(rng, polys, size, margin, _dilate(taken, 2 * band + 2) if masks else None)
        if mask is None:  # could not fit a second object: keep what we have
            log.debug("could not place instance %d; keeping %d", len(masks) + 1, len(masks))
            break
        masks.append(mask)
        taken |= mask
    if not masks:  # pragma: no cover - the first object always fits
        raise RuntimeError("synthetic: could not place any object")
    return masks


def _finish(image: np.ndarray, masks: list[np.ndarray], marks: list[np.ndarray] | None = None) -> Sample:
    size = image.shape[0]
    union = np.logical_or.reduce(masks)
    ignore = _dilate(union, ignore_band_width(size)) & ~union
    img = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    boxes = np.stack([tight_box(m) for m in masks]).astype(np.int64)
    return Sample(image=img, instance_masks=masks, ignore=ignore, boxes=boxes, marks=marks or [])


# --------------------------------------------------------------------------- #
# shapes preset
# --------------------------------------------------------------------------- #
_GOLDEN = 0.6180339887498949


def _shapes_class(cls: int) -> tuple[str, str, float]:
    n_s, n_t = len(_SHAPE_NAMES), len(_TEXTURES)
    shape = _SHAPE_NAMES[cls % n_s]
    texture = _TEXTURES[(cls + cls // n_s) % n_t]  # distinct pairs for cls < n_s * n_t
    hue = (cls * _GOLDEN) % 1.0
    return shape, texture, hue


def _shapes_description(cls: int) -> str:
    shape, texture, hue = _shapes_class(cls)
    return f"{shape}, {texture} texture, hue {hue:.2f}"


def _texture_weight(rng: np.random.Generator, kind: str, size: int, period: float) -> np.ndarray:
    """Pattern weight in [0, 1] over the whole image (0 = base colour)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    phase_u, phase_v = rng.uniform(0, period, 2)
    u = xx * math.cos(theta) + yy * math.sin(theta) + phase_u
    v = -xx * math.sin(theta) + yy * math.cos(theta) + phase_v
    if kind == "solid":
        g = rng.uniform(-1, 1, 2)
        return (0.15 * ((xx - size / 2) * g[0] + (yy - size / 2) * g[1]) / size + 0.15).astype(np.float32)
    if kind == "stripes":
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    if kind == "dots":
        du = u - period * np.round(u / period)
        dv = v - period * np.round(v / period)
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _render_shapes(rng: np.random.Generator, cls: int, size: int, n_instances: int) -> Sample:
    shape, texture, hue = _shapes_class(cls)
    unit = _UNIT_SHAPES[shape]
    unit_area = _polys_area(unit)

    def make(area: float) -> Polys:
        aspect = rng.uniform(0.7, 1.45)
        return _transform(unit, math.sqrt(area / unit_area), aspect, rng.uniform(0, 2 * math.pi))

    masks = _place_instances(rng, make, size, n_instances, (0.10, 0.40))
    image = _background(rng, size)
    for mask in masks:
        ys, xs = np.nonzero(mask)
        radius = 0.5 * math.sqrt(mask.sum())
        c1 = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.6, 0.95), rng.uniform(0.7, 0.95))
        c2 = c1 * rng.uniform(0.3, 0.5)
        w = _texture_weight(rng, texture, size, max(3.0, radius * rng.uniform(0.45, 0.65)))
        obj = c1[None, None, :] * (1 - w[..., None]) + c2[None, None, :] * w[..., None]
        obj += rng.normal(0.0, 0.025, (size, size, 3)).astype(np.float32)
        image[mask] = obj[mask]
    return _finish(image, masks)


# --------------------------------------------------------------------------- #
# parts preset
# --------------------------------------------------------------------------- #
# Mark colours (hue, saturation, value), kept away from the body's orange hues.
_MARK_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("blue", (0.62, 0.9, 0.95)),
    ("green", (0.33, 0.9, 0.8)),
    ("magenta", (0.85, 0.85, 0.95)),
    ("cyan", (0.50, 0.9, 0.95)),
    ("white", (0.0, 0.0, 1.0)),
    ("violet", (0.76, 0.8, 0.75)),
    ("lime", (0.22, 0.9, 0.95)),
    ("black", (0.0, 0.0, 0.08)),
)
_MARK_SHAPES = ("triangle", "rectangle", "star", "cross", "ellipse", "arrow", "chevron", "ring")


def _parts_class(cls: int) -> tuple[str, str, tuple[float, float, float]]:
    n_c, n_s = len(_MARK_COLOURS), len(_MARK_SHAPES)
    cname, colour = _MARK_COLOURS[cls % n_c]
    shape = _MARK_SHAPES[(cls + cls // n_c) % n_s]  # distinct pairs for cls < n_c * n_s
    return shape, cname, colour


def _parts_description(cls: int) -> str:
    shape, cname, _ = _parts_class(cls)
    return f"shared body with a small {cname} {shape} mark"


def _body_polys(rng: np.random.Generator, area: float) -> Polys:
    k = 96
    t = 2 * math.pi * np.arange(k) / k
    r = np.ones(k)
    for harmonic in (2, 3, 4, 5):
        r += rng.uniform(0.0, 0.09 / (harmonic - 1) ** 0.5) * np.cos(harmonic * t + rng.uniform(0, 2 * math.pi))
    unit = [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 1)]
    aspect = rng.uniform(1.0, 2.2)
    return _transform(unit, math.sqrt(area / _polys_area(unit)), aspect, rng.uniform(0, 2 * math.pi))


def _place_mark(rng: np.random.Generator, body: np.ndarray, shape: str) -> np.ndarray:
    """A mark (4-8% of the body area) fully inside ``body``."""
    size = body.shape[0]
    body_px = int(body.sum())
    unit = _UNIT_SHAPES[shape]
    unit_area = _polys_area(unit)
    target = rng.uniform(0.04, 0.08) * body_px
    angle = rng.uniform(0, 2 * math.pi)
    inner = cv2.erode(body.astype(np.uint8), np.ones((3, 3), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    for _ in range(12):
        scale = math.sqrt(max(target, 1.0) / unit_area)
        polys = _transform(unit, scale, 1.0, angle)
        # Vertices of some shapes (chevron, cross, ...) reach past radius 1: size the patch on them.
        c = int(math.ceil(max(float(np.abs(v).max()) for v, _ in polys))) + 1
        patch = _rasterize(polys, 2 * c + 1, (c, c))
        if not patch.any():
            patch[c, c] = True
        if patch.sum() > 0.09 * body_px and patch.sum() > 1:
            target *= 0.8
            continue
        for allowed in (inner, body):
            ys, xs = np.nonzero(_feasible_centres(patch, ~allowed))
            if ys.size:
                j = int(rng.integers(ys.size))
                return _paste(size, patch, int(ys[j]), int(xs[j])) & body
        target *= 0.7
    # Degenerate body: a single pixel mark at a body pixel.
    ys, xs = np.nonzero(body)
    j = int(rng.integers(ys.size))
    mark = np.zeros_like(body)
    mark[ys[j], xs[j]] = True
    return mark


def _render_parts(rng: np.random.Generator, cls: int, size: int, n_instances: int) -> Sample:
    shape, _, (mh, ms, mv) = _parts_class(cls)
    # Geometry of the bodies (class independent).
    bodies = _place_instances(rng, lambda area: _body_polys(rng, area), size, n_instances, (0.15, 0.45))
    union = np.logical_or.reduce(bodies)
    image = _background(rng, size)

    # Distractor blobs: random colours, never on (or touching) a body.
    keep_out = _dilate(union, 2 * ignore_band_width(size) + 1)
    for _ in range(int(rng.integers(3, 8))):
        area = rng.uniform(0.004, 0.025) * size * size
        if rng.uniform() < 0.5:
            unit = _UNIT_SHAPES["ellipse"]
        else:
            k = int(rng.integers(5, 8))
            unit = [(_regular(k) * rng.uniform(0.6, 1.0, (k, 1)), 1)]
        polys = _transform(unit, math.sqrt(area / _polys_area(unit)), rng.uniform(0.6, 1.7),
                           rng.uniform(0, 2 * math.pi))
        blob = _place(rng, polys, size, 0, keep_out, tries=3)
        if blob is None:
            continue
        colour = _hsv(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        image[blob] = colour + rng.normal(0.0, 0.03, (int(blob.sum()), 3)).astype(np.float32)
        keep_out |= blob

    # Bodies: one class-independent colour distribution, mottled texture.
    for body in bodies:
        base = _hsv(rng.uniform(0.05, 0.11), rng.uniform(0.35, 0.65), rng.uniform(0.45, 0.75))
        shade = 1.0 + 0.15 * _smooth_noise(rng, size, int(rng.integers(4, 9)), 1)
        obj = base[None, None, :] * shade + rng.normal(0.0, 0.03, (size, size, 3)).astype(np.float32)
        image[body] = obj[body]

    # Class marks (the only class-dependent pixels).
    marks = []
    for body in bodies:
        mark = _place_mark(rng, body, shape)
        colour = _hsv(mh + rng.uniform(-0.015, 0.015), ms - rng.uniform(0.0, 0.1),
                      mv - rng.uniform(0.0, 0.1) if mv > 0.5 else mv + rng.uniform(0.0, 0.1))
        image[mark] = colour + rng.normal(0.0, 0.02, (int(mark.sum()), 3)).astype(np.float32)
        marks.append(mark)
    return _finish(image, bodies, marks)


PRESETS: dict[str, SyntheticPreset] = {
    "shapes": SyntheticPreset(
        name="shapes",
        description="easy: the class is the object's shape and texture (class-specific hue); "
                    "objects cover ~10-40% of the image on a noisy background",
        max_classes=len(_SHAPE_NAMES) * len(_TEXTURES),
        class_description=_shapes_description,
        render=_render_shapes,
    ),
    "parts": SyntheticPreset(
        name="parts",
        description="MNPO failure case: every class shares the same body (~15-45% of the image); "
                    "the class is only a small mark (4-8% of the body) on it; background clutter",
        max_classes=len(_MARK_COLOURS) * len(_MARK_SHAPES),
        class_description=_parts_description,
        render=_render_parts,
    ),
}


# --------------------------------------------------------------------------- #
# Public rendering entry point
# --------------------------------------------------------------------------- #
def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    if isinstance(preset, SyntheticPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset]


def render_sample(preset: str | SyntheticPreset, seed: int, split: str, cls: int, index: int,
                  image_size: int) -> Sample:
    """Render image ``index`` of class ``cls`` in ``split`` exactly as
    :func:`write_synthetic_dataset` writes it."""
    p = _get_preset(preset)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    cls = _check_int("cls", cls, 0, p.max_classes - 1)
    index = _check_int("index", index, 0)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), cls, index])
    return p.render(rng, cls, image_size, 2 if is_multi_instance(index) else 1)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def _atomic_write_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_lines(path: Path, lines: list[str]) -> None:
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"), sync=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_tmp_leftover(name: str) -> bool:
    """Whether ``name`` is the temporary file of an interrupted atomic write of ours."""
    return any(name.startswith(f".{owned}.tmp") for owned in ("dataset.json", "README.txt"))


def _prepare_out(out: Path) -> None:
    """Create ``out``; clear it if it holds a previous synthetic set; refuse otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} exists and is not a folder")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            marker = out / "dataset.json"
            ours = False
            if marker.is_file():
                try:
                    ours = json.loads(marker.read_text("utf-8")).get("generator") == GENERATOR_ID
                except (OSError, ValueError, AttributeError):
                    ours = False
            foreign = [e for e in entries if e not in _OWNED_ENTRIES and not _is_tmp_leftover(e)]
            if not ours or foreign:
                why = (f"it holds entries a synthetic set does not write: {foreign[:5]}" if ours
                       else "it has no dataset.json written by mnpo synth")
                raise ValueError(f"out={str(out)!r} is not empty and does not look like a previous "
                                 f"synthetic data set ({why}); choose an empty or new folder")
            log.info("replacing the previous synthetic data set in %s", out)
            for name in [*_OWNED_ENTRIES, *(e for e in entries if _is_tmp_leftover(e))]:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _readme(info: dict) -> str:
    lines = [
        "Synthetic WSOL data set written by mnpo (mnpo.data.synthetic).",
        "",
        f"preset:     {info['preset']} - {info['description']}",
        f"seed:       {info['seed']}",
        f"image size: {info['image_size']} x {info['image_size']} (RGB PNG)",
        f"classes:    {info['num_classes']}",
    ]
    for c in info["classes"]:
        lines.append(f"  {c['id']:3d} {c['dir']}: {c['description']}")
    lines.append("images per split (two-object images in brackets):")
    for split in SPLITS:
        lines.append(f"  {split:5s} {info['counts'][split]:6d} ({info['multi_instance'][split]}), "
                     f"{info['per_class'][split]} per class")
    lines += [
        "",
        "Layout (wsolevaluation):",
        "  images/<split>/<class>/<split>_<class>_<index>.png",
        "  masks/<split>/<class>/<stem>_mask.png (+ _mask_1.png for a second object), <stem>_ignore.png",
        "      (val and test only; 255 = object / ignore, 0 elsewhere)",
        "  metadata/<split>/image_ids.txt, class_labels.txt, image_sizes.txt,",
        "      localization.txt (id,x0,y0,x1,y1; inclusive tight box of each object mask)",
        "  metadata-masks/<split>/image_ids.txt, class_labels.txt,",
        "      localization.txt for val and test (id,mask_path,ignore_path; ignore on the first line)",
        f"ignore band width: {info['ignore_band_px']} px just outside the objects",
        "",
    ]
    return "\n".join(lines)


def write_synthetic_dataset(
    out: Path | str,
    preset: str = "parts",
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 4,
    train_per_class: int = 40,
    val_per_class: int = 5,
    test_per_class: int = 20,
) -> dict[str, int]:
    """Write a synthetic WSOL data set to ``out`` and return ``{split: image count}``.

    ``out`` must be absent, empty, or a previous synthetic set (which is
    replaced).  Raises ``ValueError`` naming the bad argument otherwise.
    """
    p = _get_preset(preset)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    num_classes = _check_int("num_classes", num_classes, 1, p.max_classes)
    per_class = {
        "train": _check_int("train_per_class", train_per_class, 1),
        "val": _check_int("val_per_class", val_per_class, 1),
        "test": _check_int("test_per_class", test_per_class, 1),
    }
    out = Path(out)
    _prepare_out(out)

    classes = [{"id": k, "dir": f"class_{k:02d}", "description": p.class_description(k)}
               for k in range(num_classes)]
    info: dict = {
        "generator": GENERATOR_ID,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "preset": p.name,
        "description": p.description,
        "seed": seed,
        "image_size": image_size,
        "num_classes": num_classes,
        "ignore_band_px": ignore_band_width(image_size),
        "per_class": per_class,
        "counts": {s: per_class[s] * num_classes for s in SPLITS},
        # Planned two-object images; replaced by the number actually written (a second
        # object that does not fit is left out).
        "multi_instance": {s: sum(is_multi_instance(i) for i in range(per_class[s])) * num_classes
                           for s in SPLITS},
        "mask_splits": list(MASK_SPLITS),
        "classes": classes,
    }
    # Written first (incomplete) so that a crashed run can be overwritten.
    _atomic_write_bytes(out / "dataset.json", (json.dumps(info, indent=2) + "\n").encode(), sync=True)
    log.info("writing synthetic '%s' set to %s (seed %d, %d px, %d classes)",
             p.name, out, seed, image_size, num_classes)

    summary: dict[str, int] = {}
    for split in SPLITS:
        n = per_class[split]
        with_masks = split in MASK_SPLITS
        ids, labels, sizes, boxes, mask_lines = [], [], [], [], []
        n_multi = 0
        for cls in range(num_classes):
            cdir = classes[cls]["dir"]
            (out / "images" / split / cdir).mkdir(parents=True, exist_ok=True)
            if with_masks:
                (out / "masks" / split / cdir).mkdir(parents=True, exist_ok=True)
            for index in range(n):
                sample = render_sample(p, seed, split, cls, index, image_size)
                stem = f"{split}_{cls:02d}_{index:04d}"
                image_id = f"{split}/{cdir}/{stem}.png"
                _write_png(out / "images" / image_id, sample.image)
                ids.append(image_id)
                labels.append(f"{image_id},{cls}")
                sizes.append(f"{image_id},{image_size},{image_size}")
                n_multi += len(sample.boxes) > 1
                for box in sample.boxes:
                    boxes.append(f"{image_id},{box[0]},{box[1]},{box[2]},{box[3]}")
                if with_masks:
                    ignore_rel = f"{split}/{cdir}/{stem}_ignore.png"
                    _write_png(out / "masks" / ignore_rel, sample.ignore.astype(np.uint8) * 255)
                    for j, mask in enumerate(sample.instance_masks):
                        mask_rel = f"{split}/{cdir}/{stem}_mask{'' if j == 0 else f'_{j}'}.png"
                        _write_png(out / "masks" / mask_rel, mask.astype(np.uint8) * 255)
                        mask_lines.append(f"{image_id},{mask_rel},{ignore_rel if j == 0 else ''}")
        box_dir = out / "metadata" / split
        box_dir.mkdir(parents=True, exist_ok=True)
        _write_lines(box_dir / "image_ids.txt", ids)
        _write_lines(box_dir / "class_labels.txt", labels)
        _write_lines(box_dir / "image_sizes.txt", sizes)
        _write_lines(box_dir / "localization.txt", boxes)
        mask_dir = out / "metadata-masks" / split
        mask_dir.mkdir(parents=True, exist_ok=True)
        _write_lines(mask_dir / "image_ids.txt", ids)
        _write_lines(mask_dir / "class_labels.txt", labels)
        if with_masks:
            _write_lines(mask_dir / "localization.txt", mask_lines)
        summary[split] = len(ids)
        info["multi_instance"][split] = n_multi
        log.debug("%s: %d images, %d boxes", split, len(ids), len(boxes))

    info["complete"] = True
    info["counts"] = summary
    _atomic_write_bytes(out / "README.txt", _readme(info).encode("utf-8"), sync=True)
    _atomic_write_bytes(out / "dataset.json", (json.dumps(info, indent=2) + "\n").encode(), sync=True)
    log.info("wrote %s", ", ".join(f"{s} {c}" for s, c in summary.items()))
    return summary
