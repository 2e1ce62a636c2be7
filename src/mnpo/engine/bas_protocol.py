"""BAS's own test protocol (the authors' ``CUB/BAS_inference.py``), for putting a paper's number
beside the calibrated MaxBoxAccV2, never in its place.

Per image of a box split, on a ``<backbone>-bas`` network:

* the view: the image resized to 256 x 256 and center-cropped to 224 (offset 16); the
  ground-truth boxes scaled alike (``x 256 / W``, ``y 256 / H``), clipped to the crop and
  shifted by 16 (floats, as theirs);
* the map: the generator's map ``S`` (the mean over the ``top_k`` best-scored classes, or with
  ``top_k`` None the true class's) at its 28 x 28, min-max normalized, *then* resized bilinearly
  to 224 (``cv2.resize``), the order theirs runs in;
* the box: the pixels ``> threshold``, their largest 8-connected component (ties: the one whose
  first pixel comes first in raster order, as their ``count_max`` over ``skimage`` labels), and
  its bounding box as ``[min_x, min_y, max_x + 1, max_y + 1]`` (``regionprops``' half-open box,
  which their IoU then reads as inclusive); no pixel: ``[0, 0, 224, 224]``;
* IoU with the ``+ 1`` convention (``utils/IoU.py``), the largest over the image's boxes;
  correct when ``> 0.5``;
* classification: the softmax of the ten crops of the 256 x 256 image, averaged.

GT-known Loc, Top-1 Loc and Top-5 Loc are each the mean over classes of the per-class accuracy
(their script averages per class), in percent; the plain mean over images is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: their crop offset from 256 to 224 (torchvision's CenterCrop: round((256 - 224) / 2))
RESIZE, CROP = 256, 224
OFFSET = (RESIZE - CROP) // 2
#: (threshold, top_k) of their scripts: CUB (top_k: every class; VGG16 80), ILSVRC (the true class)
PAPER_SETTINGS = {
    "cub": {"vgg16": (0.15, 80), "resnet50": (0.15, "all"), "inception_v3": (0.1, "all")},
    "ilsvrc": {"vgg16": (0.5, None), "resnet50": (0.45, None), "inception_v3": (0.3, None)},
}


def crop_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes ``(k, 4)`` x0, y0, x1, y1 of a W x H image in the 224 crop of its 256 x 256 resize:
    scaled, clipped to the crop window, shifted by the offset; float64."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scaled = boxes * np.array([RESIZE / width, RESIZE / height, RESIZE / width, RESIZE / height])
    return np.clip(scaled, OFFSET, OFFSET + CROP) - OFFSET


def largest_component_box(scoremap: np.ndarray, threshold: float) -> list[int]:
    """Their box of one map ``(H, W)`` in [0, 1]: see the module docstring."""
    import cv2

    mask = (scoremap > threshold).astype(np.uint8)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 1:
        return [0, 0, scoremap.shape[1], scoremap.shape[0]]
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count)[1:]
    first = np.full(count, flat.size)
    np.minimum.at(first, flat, np.arange(flat.size))
    largest = np.flatnonzero(sizes == sizes.max()) + 1
    chosen = int(largest[np.argmin(first[largest])])
    ys, xs = np.nonzero(labels == chosen)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def inclusive_iou(box: list[float], gt: np.ndarray) -> float:
    """IoU with their ``+ 1`` areas (``utils/IoU.py``), the largest over the rows of ``gt`` ``(k, 4)``."""
    best = -1.0
    for other in np.asarray(gt, np.float64).reshape(-1, 4):
        inter = max(0.0, min(box[2], other[2]) - max(box[0], other[0]) + 1) * \
            max(0.0, min(box[3], other[3]) - max(box[1], other[1]) + 1)
        union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (other[2] - other[0] + 1) * (other[3] - other[1] + 1)
        best = max(best, inter / (union - inter))
    return best


def paper_maps(model: torch.nn.Module, views: torch.Tensor, targets: torch.Tensor, top_k: int | None) -> np.ndarray:
    """Their maps of a batch of normalized 224 views: ``(B, 224, 224)`` float32 in [0, 1]."""
    import cv2

    from mnpo.models.bas import bas_generator_maps

    with torch.inference_mode():
        out = model(views, return_features=True)
        raw = bas_generator_maps(out.features["generator"].float(), out.logits[0].float(),
                                 None if top_k is not None else targets, top_k)
    flat = raw.flatten(1)
    low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    normalized = ((raw - low) / (high - low)).cpu().numpy()  # theirs: no guard (a constant map is NaN)
    return np.stack([cv2.resize(m, (CROP, CROP), interpolation=cv2.INTER_LINEAR) for m in normalized])


@dataclass(frozen=True)
class BasProtocolResult:
    """Per-class means (their script's numbers) and image means, in percent."""

    threshold: float
    top_k: int | None
    gt_known_loc: float
    top1_loc: float
    top5_loc: float
    gt_known_loc_images: float
    top1_loc_images: float
    num_images: int

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def bas_protocol(model: torch.nn.Module, dataset, *, threshold: float, top_k: int | None,
                 batch_size: int = 32, device: torch.device | str = "cpu") -> BasProtocolResult:
    """Their numbers on an ``evaluate``-mode ``WSOLDataset`` built with ``uint8_views=True``,
    ``ten_crop=True``, ``crop_size=224``, ``resize_size=256`` (its ten-crop sources are the
    256 x 256 resizes both views come from)."""
    from torchvision.transforms.v2 import functional as F

    from mnpo.data.dataset import collate_evaluation
    from mnpo.data.transforms import normalize_batch, ten_crop_batch
    from mnpo.engine.views import ten_crop_logits

    if getattr(model.layout, "network", None) != "bas":
        raise ValueError("the BAS protocol scores a <backbone>-bas network's generator map")
    if not 0 <= threshold <= 1:
        raise ValueError(f"BAS protocol threshold must be in [0, 1], got {threshold}")
    meta = dataset.meta
    if meta.boxes is None or meta.sizes is None:
        raise ValueError("the BAS protocol needs a box split with image sizes")
    if (dataset.crop_size, dataset.resize_size) != (CROP, RESIZE) or not dataset.ten_crop:
        raise ValueError(f"the BAS protocol needs the 256 x 256 resize and its 224 crops (got resize "
                         f"{dataset.resize_size}, crop {dataset.crop_size}, ten_crop {dataset.ten_crop})")
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_evaluation)
    labels, known, top1, top5 = [], [], [], []
    for batch in loader:
        sources = normalize_batch(batch["ten_crop_source"].to(device))
        views = F.center_crop(sources, [CROP, CROP])
        targets = batch["label"].to(device)
        maps = paper_maps(model, views, targets, top_k)
        probabilities = ten_crop_logits(model, ten_crop_batch(sources, CROP), batch_size).float().softmax(-1).mean(1)
        best5 = probabilities.topk(min(5, probabilities.shape[1]), dim=1).indices.cpu().numpy()
        for k, image_id in enumerate(batch["image_id"]):
            width, height = meta.sizes[image_id]
            gt = crop_boxes(meta.boxes[image_id], width, height)
            hit = inclusive_iou(largest_component_box(maps[k], threshold), gt) > 0.5
            label = int(batch["label"][k])
            labels.append(label)
            known.append(hit)
            top1.append(hit and best5[k, 0] == label)
            top5.append(hit and label in best5[k])
    labels_array = np.array(labels)

    def per_class(values: list[bool]) -> float:
        values_array = np.array(values, dtype=np.float64)
        return float(np.mean([values_array[labels_array == c].mean() for c in np.unique(labels_array)]) * 100)

    return BasProtocolResult(threshold, top_k, per_class(known), per_class(top1), per_class(top5),
                             float(np.mean(known) * 100), float(np.mean(top1) * 100), len(labels))


def run_paper_protocol(checkpoint, data, metadata, data_set: str, *, threshold: float | None = None,
                       top_k: int | None = None, batch_size: int = 32, device: str = "auto",
                       mask_root=None) -> BasProtocolResult:
    """:func:`bas_protocol` of an mnpo checkpoint on a split, with their script's threshold and
    ``top_k`` for ``data_set`` (``cub`` or ``ilsvrc``, :data:`PAPER_SETTINGS`) unless given."""
    from mnpo.data.dataset import WSOLDataset
    from mnpo.engine.runtime import resolve_device
    from mnpo.models import load_model

    if data_set not in PAPER_SETTINGS:
        raise ValueError(f"BAS protocol of {data_set!r}: choose one of {tuple(PAPER_SETTINGS)}")
    model, _ = load_model(checkpoint)
    if getattr(model.layout, "network", None) != "bas":
        raise ValueError(f"{checkpoint}: the BAS protocol scores a <backbone>-bas network, this is "
                         f"{getattr(model.layout, 'network', 'a multi-branch')} network")
    default_threshold, default_k = PAPER_SETTINGS[data_set][model.layout.backbone]
    threshold = default_threshold if threshold is None else threshold
    if top_k is None:
        top_k = model.num_classes if default_k == "all" else default_k
        top_k = None if top_k is None else min(top_k, model.num_classes)
    dataset = WSOLDataset(data, metadata, "evaluate", mask_root=mask_root, crop_size=CROP, resize_size=RESIZE,
                          uint8_views=True, ten_crop=True)
    return bas_protocol(model, dataset, threshold=threshold, top_k=top_k, batch_size=batch_size,
                        device=resolve_device(device))
