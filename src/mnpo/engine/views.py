"""The protocol's views of an image, shared by ``evaluate`` and ``localize`` (spec section 6).

An image is resized to ``resize_for(S)`` (256 for the 224 view) and center-cropped to ``S x S``
(the view that maps are computed on), or cut into ten ``S x S`` crops (four corners, the center
and their mirrors) whose logits are averaged for classification. Boxes found on the view's
``frame x frame`` map go back to the image by :func:`box_to_image`. Light: torch is imported
only when logits are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["VIEW_SIZE", "box_to_image", "resize_for", "ten_crop_logits"]

#: Side of the localization view and of the maps' frame (spec section 6).
VIEW_SIZE = 224


def resize_for(crop: int) -> int:
    """The protocol's resize side for a crop side: 256 for 224, in proportion otherwise."""
    return round(crop * 256 / 224)


def ten_crop_logits(model: torch.nn.Module, crops: torch.Tensor, chunk: int,
                    channels_last: bool = False) -> torch.Tensor:
    """The main branch's logits of every crop: ``(B, 10, 3, S, S)`` -> ``(B, 10, K)``, forwarded
    ``chunk`` crops at a time under ``inference_mode`` (no graph kept; memory of one chunk)."""
    import torch

    flat = crops.flatten(0, 1)
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = torch.cat([model(flat[i:i + chunk]).logits[0] for i in range(0, len(flat), chunk)])
    return logits.view(*crops.shape[:2], -1)


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
