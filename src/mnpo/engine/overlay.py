"""Pictures of score maps: a jet heat map blended over the image, boxes on top, and galleries.

:func:`heatmap_overlay` resizes a score map (bilinear) to the image, colours it with
OpenCV's jet colormap (0 dark blue ``(0, 0, 128)``, 1 dark red ``(128, 0, 0)`` in RGB) and
blends ``(1 - alpha) * image + alpha * heat``; boxes are drawn 2 px wide, inside their
inclusive pixel rectangles: predicted green, ground truth red.
:func:`save_gallery` lays tiles out on a grid with optional captions and writes one PNG
atomically.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from mnpo.io import atomic_path
from mnpo.metrics.boxes import check_scoremap, to_uint8

__all__ = ["BOX_WIDTH", "GT_COLOR", "PREDICTED_COLOR", "caption_height", "heatmap_overlay", "save_gallery"]

PREDICTED_COLOR = (0, 255, 0)
GT_COLOR = (255, 0, 0)
#: Box outline width in pixels, drawn inwards from the box's edge pixels.
BOX_WIDTH = 2
#: Gallery background and caption colours (RGB).
BACKGROUND = (24, 24, 24)
CAPTION_COLOR = (235, 235, 235)
#: Pixels around a caption's text.
CAPTION_PAD = 3


def _check_image(image, name: str = "image") -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"{name}: expected an RGB image, got mode {image.mode!r} (use image.convert('RGB'))")


def _as_boxes(boxes, width: int, height: int, name: str) -> np.ndarray:
    """Boxes (k, 4) as int64 ``(x0, y0, x1, y1)``, checked and clipped to the image."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numbers (k, 4), got {boxes!r}") from err
    if arr.size == 0:
        return np.zeros((0, 4), np.int64)
    if arr.ndim == 1 and arr.shape == (4,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (k, 4), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: boxes must be finite, got {arr.tolist()}")
    arr = np.rint(arr).astype(np.int64)
    for i, (x0, y0, x1, y1) in enumerate(arr):
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{name}[{i}] = {[x0, y0, x1, y1]}: needs x0 <= x1 and y0 <= y1")
        if x0 > width - 1 or y0 > height - 1 or x1 < 0 or y1 < 0:
            raise ValueError(f"{name}[{i}] = {[x0, y0, x1, y1]}: lies outside the {width}x{height} image")
    return np.clip(arr, 0, [width - 1, height - 1, width - 1, height - 1])


def heatmap_overlay(image: Image.Image, scoremap: np.ndarray, boxes=(), gt_boxes=(),
                    alpha: float = 0.5) -> Image.Image:
    """A jet heat map of ``scoremap`` blended over ``image``, with boxes drawn on top.

    Args:
        image: PIL RGB image, W x H.
        scoremap: float (h, w) in [0, 1], any size; resized bilinearly to (H, W).
        boxes: predicted boxes (k, 4) ``(x0, y0, x1, y1)`` in the image's inclusive pixel
            coordinates, drawn green; ``gt_boxes`` likewise, drawn red (under the green).
            Parts outside the image are clipped; a box wholly outside is an error.
        alpha: weight of the heat map, in [0, 1] (0: the image alone, 1: the heat map alone).

    Returns:
        A new PIL RGB image, W x H: ``rint((1 - alpha) * image + alpha * jet(uint8 map))``.
    """
    _check_image(image)
    check_scoremap(scoremap)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    width, height = image.size
    pred = _as_boxes(boxes, width, height, "boxes")
    gt = _as_boxes(gt_boxes, width, height, "gt_boxes")
    resized = cv2.resize(scoremap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(to_uint8(resized.clip(0.0, 1.0)), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    blend = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * heat
    out = Image.fromarray(np.rint(blend).clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for group, color in ((gt, GT_COLOR), (pred, PREDICTED_COLOR)):
        for x0, y0, x1, y1 in group.tolist():
            draw.rectangle((x0, y0, x1, y1), outline=color, width=BOX_WIDTH)
    return out


def _fit_caption(text: str, font, width: int) -> str:
    """``text`` shortened with ``...`` until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def caption_height(font=None) -> int:
    """Height in pixels of the caption band under each tile (PIL's default font)."""
    font = font or ImageFont.load_default()
    return font.getbbox("Ag")[3] + 2 * CAPTION_PAD


def save_gallery(tiles: Sequence[Image.Image], path: str | os.PathLike, columns: int = 4,
                 tile_size: int = 160, captions: Sequence[str] | None = None) -> Path:
    """Write ``tiles`` as one PNG grid, row by row, atomically; returns ``path``.

    Each tile is scaled (up or down, keeping its aspect ratio) to fit a ``tile_size`` square
    and centred in it. The grid has ``min(columns, n)`` columns and ``ceil(n / columns)``
    rows: ``(cols * tile_size) x (rows * (tile_size + caption_height()))`` pixels with
    captions (one string per tile, shortened to fit, drawn under the tile with PIL's default
    font), ``(cols * tile_size) x (rows * tile_size)`` without.
    """
    tiles = list(tiles)
    if not tiles:
        raise ValueError("save_gallery: no tiles given")
    for i, tile in enumerate(tiles):
        if not isinstance(tile, Image.Image):
            raise TypeError(f"save_gallery: tile {i} is a {type(tile).__name__}, not a PIL image")
    for name, value in (("columns", columns), ("tile_size", tile_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"save_gallery: {name} must be a positive int, got {value!r}")
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != len(tiles):
            raise ValueError(f"save_gallery: {len(captions)} captions for {len(tiles)} tiles")
    font = ImageFont.load_default()
    band = caption_height(font) if captions is not None else 0
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    cell_h = tile_size + band
    grid = Image.new("RGB", (cols * tile_size, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        left, top = (i % columns) * tile_size, (i // columns) * cell_h
        fitted = ImageOps.contain(tile.convert("RGB"), (tile_size, tile_size), Image.Resampling.BILINEAR)
        grid.paste(fitted, (left + (tile_size - fitted.width) // 2, top + (tile_size - fitted.height) // 2))
        if captions is not None:
            text = _fit_caption(captions[i], font, tile_size - 2 * CAPTION_PAD)
            draw.text((left + CAPTION_PAD, top + tile_size + CAPTION_PAD), text, fill=CAPTION_COLOR, font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
