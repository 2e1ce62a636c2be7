"""TS-CAM's and SAT's own test protocols, for putting a paper's number beside the calibrated
MaxBoxAccV2, never in its place (as :mod:`mnpo.engine.bas_protocol` does for BAS).

**TS-CAM** (their ``lib/cams_deit.py: evaluate_cls_loc``, ``lib/datasets/cub.py``), on a
``deit_*-tscam`` network:

* the view: the image resized straight to 224 x 224; the ground-truth boxes scaled to it and
  truncated to integers, the far corner clipped at 223 (``int(min(x1 / W * 224, 223))``);
* the map of class ``c``: TS-CAM's ``A * S[c]`` at 14 x 14, resized bilinearly to 224
  (``cv2.resize``), min-max normalized;
* the box: the map as ``uint8(255 m)``, the pixels above ``int(threshold * max)`` kept
  (``THRESH_TOZERO``), the bounding rectangle of the largest external-or-inner contour by area
  (``RETR_TREE``); no contour: ``[0, 0, 1, 1]``;
* IoU with the ``+ 1`` convention; GT-known: the true class's map, IoU >= 0.5; Top-1 Loc: the
  top-1 class right and the IoU of its map > 0.5 (strictly, their ``cls_loc_err``); Top-5 alike;
* classification: the one 224 view; means over images. Thresholds: CUB 0.1, ILSVRC 0.12 (their
  ``train_val_*.sh``).

**SAT** (their ``evaluator.py``, ``utils/func.py``, ``DataLoader/CUB_200_2011.py``), on a
``deit_*-sat`` network:

* the view: resize 256 x 256, center crop 224 (BAS's); the boxes scaled to 256, shifted by 16
  and truncated to integers, clipped at 0 and 223;
* the map: SAT's gate map at 14 x 14, ``(m - min) / (max - min + 1e-5)``, resized bilinearly to 224;
* the box: the pixels ``> threshold``, their largest 8-connected component's box (BAS's
  :func:`~mnpo.engine.bas_protocol.largest_component_box`: their ``count_max`` and
  ``regionprops``); no pixel: the whole crop;
* IoU with the ``+ 1`` convention, correct at >= 0.5 (GT-known; Top-1 / Top-5 Loc with the
  class right among the top 1 / 5);
* classification: the softmax of the ten crops of the 256 x 256 image, averaged; means over
  images. Threshold: 0.4 (their ``evaluator.py`` default; training picks the best of 0.3 ... 0.45
  on the test set, which ``--paper-threshold`` can repeat by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mnpo.engine.bas_protocol import CROP, OFFSET, RESIZE, inclusive_iou, largest_component_box

#: their scripts' thresholds per protocol and data set
PAPER_THRESHOLDS = {"tscam": {"cub": 0.1, "ilsvrc": 0.12}, "sat": {"cub": 0.4, "ilsvrc": 0.4}}
PROTOCOL_NETWORKS = {"tscam": "tscam", "sat": "sat"}


@dataclass(frozen=True)
class PaperProtocolResult:
    """Image means, in percent; ``ious``: each image's IoU (the true class's map for TS-CAM), in
    the split's order."""

    protocol: str
    threshold: float
    gt_known_loc: float
    top1_loc: float
    top5_loc: float
    top1_cls: float
    num_images: int
    ious: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def tscam_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """TS-CAM's ground-truth boxes ``(k, 4)`` in the 224 x 224 resize: scaled, truncated, the far
    corner clipped at 223."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = np.array([CROP / width, CROP / height, CROP / width, CROP / height])
    scaled = boxes * scale
    out = np.empty_like(scaled)
    out[:, :2] = np.maximum(scaled[:, :2], 0)
    out[:, 2:] = np.minimum(scaled[:, 2:], CROP - 1)
    return np.trunc(out)


def sat_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """SAT's ground-truth boxes ``(k, 4)`` in the 224 crop of the 256 x 256 resize: scaled,
    shifted by 16, clipped at 0 and 223, truncated."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scaled = boxes * np.array([RESIZE / width, RESIZE / height, RESIZE / width, RESIZE / height]) - OFFSET
    out = np.empty_like(scaled)
    out[:, :2] = np.maximum(scaled[:, :2], 0)
    out[:, 2:] = np.minimum(scaled[:, 2:], CROP - 1)
    return np.trunc(out)


def largest_contour_box(scoremap: np.ndarray, threshold: float) -> list[int]:
    """TS-CAM's box of a map ``(H, W)`` in [0, 1] (module docstring)."""
    import cv2

    cam = (scoremap * 255.0).astype(np.uint8)
    _, kept = cv2.threshold(cam, int(threshold * np.max(cam)), 255, cv2.THRESH_TOZERO)
    contours, _ = cv2.findContours(kept, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [0, 0, 1, 1]
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return [x, y, x + w, y + h]


def resize_bilinear(maps: np.ndarray, size: int = CROP) -> np.ndarray:
    """``(B, h, w) -> (B, size, size)`` by ``cv2.resize`` (bilinear), float32."""
    import cv2

    return np.stack([cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])


def tscam_class_maps(model: torch.nn.Module, views: torch.Tensor, classes: torch.Tensor
                     ) -> tuple[np.ndarray, torch.Tensor]:
    """TS-CAM's maps of ``classes`` ``(B, T)`` for normalized 224 views: ``(B, T, 224, 224)``
    resized and min-max normalized each (no guard: a constant map is NaN, as theirs), and the logits."""
    from mnpo.models.deit import class_token_attention
    from mnpo.models.tscam import ATTENTION_TAPS

    with torch.inference_mode():
        out = model(views, return_features=True, taps=ATTENTION_TAPS)
        semantic = out.features["main"].float()
        attention = class_token_attention([out.features[t].float() for t in ATTENTION_TAPS], tuple(semantic.shape[-2:]))
        raw = attention[:, None] * semantic.gather(1, classes[:, :, None, None].expand(-1, -1, *semantic.shape[-2:]))
    raw = raw.cpu().numpy()
    b, t = raw.shape[:2]
    resized = resize_bilinear(raw.reshape(b * t, *raw.shape[2:])).reshape(b, t, CROP, CROP)
    low = resized.min(axis=(2, 3), keepdims=True)
    high = resized.max(axis=(2, 3), keepdims=True)
    return (resized - low) / (high - low), out.logits[0].float()


def sat_maps(model: torch.nn.Module, views: torch.Tensor) -> np.ndarray:
    """SAT's maps of normalized 224 views, ``(B, 224, 224)`` (module docstring)."""
    with torch.inference_mode():
        raw = model(views, return_features=True).features["sat_map"][:, 0].float().cpu().numpy()
    low = raw.min(axis=(1, 2), keepdims=True)
    high = raw.max(axis=(1, 2), keepdims=True)
    return resize_bilinear((raw - low) / (high - low + 1e-5))


def paper_protocol(protocol: str, model: torch.nn.Module, dataset, *, threshold: float, batch_size: int = 32,
                   device: torch.device | str = "cpu") -> PaperProtocolResult:
    """``protocol`` (``tscam`` or ``sat``) on an ``evaluate``-mode ``WSOLDataset`` with
    ``uint8_views=True``: TS-CAM's with ``crop_size=224, resize_size=224, ten_crop=False``; SAT's
    with ``crop_size=224, resize_size=256, ten_crop=True`` (see :func:`run_paper_protocol`)."""
    from torchvision.transforms.v2 import functional as F

    from mnpo.data.dataset import collate_evaluation
    from mnpo.data.transforms import normalize_batch, ten_crop_batch
    from mnpo.engine.views import ten_crop_logits

    if protocol not in PROTOCOL_NETWORKS:
        raise ValueError(f"paper protocol {protocol!r}: choose one of {tuple(PROTOCOL_NETWORKS)}")
    network = getattr(getattr(model, "layout", None), "network", None)
    if network != PROTOCOL_NETWORKS[protocol]:
        raise ValueError(f"the {protocol} protocol scores a deit_*-{PROTOCOL_NETWORKS[protocol]} network, not "
                         f"{network or type(model).__name__}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"{protocol} protocol threshold must be in [0, 1], got {threshold}")
    meta = dataset.meta
    if meta.boxes is None or meta.sizes is None:
        raise ValueError(f"the {protocol} protocol needs a box split with image sizes")
    expected = (CROP, CROP, False) if protocol == "tscam" else (CROP, RESIZE, True)
    if (dataset.crop_size, dataset.resize_size, dataset.ten_crop) != expected:
        raise ValueError(f"the {protocol} protocol needs crop {expected[0]}, resize {expected[1]}, ten_crop "
                         f"{expected[2]} (got {dataset.crop_size}, {dataset.resize_size}, {dataset.ten_crop})")
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_evaluation)
    known, top1, top5, cls1, ious = [], [], [], [], []
    for batch in loader:
        labels = batch["label"].to(device)
        if protocol == "tscam":
            views = normalize_batch(batch["image"].to(device))
            maps, logits = tscam_class_maps(model, views, labels[:, None])
            maps = maps[:, 0]
            best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu().numpy()
        else:
            sources = normalize_batch(batch["ten_crop_source"].to(device))
            maps = sat_maps(model, F.center_crop(sources, [CROP, CROP]))
            probabilities = ten_crop_logits(model, ten_crop_batch(sources, CROP), batch_size).float().softmax(-1).mean(1)
            best5 = probabilities.topk(min(5, probabilities.shape[1]), dim=1).indices.cpu().numpy()
        for k, image_id in enumerate(batch["image_id"]):
            width, height = meta.sizes[image_id]
            label = int(batch["label"][k])
            if protocol == "tscam":
                iou = inclusive_iou(largest_contour_box(maps[k], threshold), tscam_boxes(meta.boxes[image_id],
                                                                                         width, height))
                known.append(iou >= 0.5)
                hit = iou > 0.5  # Top-1 / Top-5 Loc: strictly, as their cls_loc_err
            else:
                iou = inclusive_iou(largest_component_box(maps[k], threshold), sat_boxes(meta.boxes[image_id],
                                                                                        width, height))
                known.append(iou >= 0.5)
                hit = iou >= 0.5
            ious.append(float(iou))
            cls1.append(best5[k, 0] == label)
            top1.append(hit and best5[k, 0] == label)
            top5.append(hit and label in best5[k])

    def percent(values) -> float:
        return float(np.mean(values) * 100) if values else float("nan")

    return PaperProtocolResult(protocol, threshold, percent(known), percent(top1), percent(top5), percent(cls1),
                               len(known), tuple(ious))


def run_paper_protocol(protocol: str, checkpoint, data, metadata, data_set: str, *, threshold: float | None = None,
                       batch_size: int = 32, device: str = "auto", mask_root=None) -> PaperProtocolResult:
    """:func:`paper_protocol` of an mnpo checkpoint on a split, with their threshold for
    ``data_set`` (``cub`` or ``ilsvrc``, :data:`PAPER_THRESHOLDS`) unless given."""
    from mnpo.data.dataset import WSOLDataset
    from mnpo.engine.runtime import resolve_device
    from mnpo.models import load_model

    if protocol not in PAPER_THRESHOLDS:
        raise ValueError(f"paper protocol {protocol!r}: choose one of {tuple(PAPER_THRESHOLDS)}")
    if data_set not in PAPER_THRESHOLDS[protocol]:
        raise ValueError(f"{protocol} protocol of {data_set!r}: choose one of {tuple(PAPER_THRESHOLDS[protocol])}")
    model, _ = load_model(checkpoint)
    threshold = PAPER_THRESHOLDS[protocol][data_set] if threshold is None else threshold
    sat = protocol == "sat"
    dataset = WSOLDataset(data, metadata, "evaluate", mask_root=mask_root, crop_size=CROP,
                          resize_size=RESIZE if sat else CROP, uint8_views=True, ten_crop=sat)
    return paper_protocol(protocol, model, dataset, threshold=threshold, batch_size=batch_size,
                          device=resolve_device(device))
