"""`evaluate --paper-protocol tscam-* / sat-*` against the authors' steps written out image by
image (their transforms with PIL, their box rules, their IoU), on networks saved from random
weights; the box rules by hand; the refusals."""

import json

import numpy as np
import pytest
import torch

from mnpo.cli import main
from mnpo.data.metadata import read_split
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.transformer_protocols import largest_contour_box, paper_protocol, sat_boxes, tscam_boxes
from mnpo.models import build_model
from mnpo.models.checkpoint import save_checkpoint
from naive_vit import perturbed

from engine.test_bas_commands import naive_component_box


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    data = root / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=5, image_size=64, num_classes=3, train_per_class=1,
                            val_per_class=1, test_per_class=3)
    torch.manual_seed(0)
    for network in ("tscam", "sat"):
        model = perturbed(build_model(f"deit_tiny-{network}", 3, width=0.0625), 0.3)
        save_checkpoint(root / f"{network}.pt", model)
    return root, data


def inclusive(box, gt):
    inter = max(0, min(box[2], gt[2]) - max(box[0], gt[0]) + 1) * max(0, min(box[3], gt[3]) - max(box[1], gt[1]) + 1)
    union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - inter
    return inter / union


def their_view(image, resize, crop):
    from torchvision.transforms import v2

    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    resized = v2.functional.resize(image, [resize, resize], interpolation=v2.InterpolationMode.BILINEAR)
    return resized, to_tensor(v2.functional.center_crop(resized, [crop, crop]))[None], to_tensor


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_tscam_protocol_equals_their_steps(runs, tmp_path, threshold):
    import cv2
    from PIL import Image

    from mnpo.models import load_model

    root, data = runs
    out = tmp_path / "paper.json"
    assert main(["evaluate", "-q", "--checkpoint", str(root / "tscam.pt"), "--data", str(data / "images"),
                 "--metadata", str(data / "metadata" / "test"), "--input-size", "64", "--workers", "0",
                 "--method", "cam", "--paper-protocol", "tscam-cub", "--paper-threshold", str(threshold),
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["paper_protocol"]
    model, _ = load_model(root / "tscam.pt")
    model.eval()
    meta = read_split(data / "metadata" / "test")
    ious, known, top1 = [], [], []
    for image_id in meta.image_ids:
        _, view, _ = their_view(Image.open(data / "images" / image_id).convert("RGB"), 224, 224)
        label = meta.labels[image_id]
        with torch.no_grad():
            out_view = model(view, return_features=True, taps=[f"attention.{i}" for i in range(12)])
        attention = sum(out_view.features[f"attention.{i}"][0].mean(0)[0, 1:] for i in range(12)).reshape(14, 14)
        cam = (attention * out_view.features["main"][0, label]).numpy()
        cam = cv2.resize(cam, (224, 224))
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        gray = (cam * 255.0).astype(np.uint8)
        _, kept = cv2.threshold(gray, int(threshold * np.max(gray)), 255, cv2.THRESH_TOZERO)
        contours, _ = cv2.findContours(kept, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        if contours:
            x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
            box = [x, y, x + w, y + h]
        else:
            box = [0, 0, 1, 1]
        width, height = meta.sizes[image_id]
        best = 0.0
        for x0, y0, x1, y1 in meta.boxes[image_id]:
            gt = [int(max(x0 / width * 224, 0)), int(max(y0 / height * 224, 0)),
                  int(min(x1 / width * 224, 223)), int(min(y1 / height * 224, 223))]
            best = max(best, inclusive(box, gt))
        ious.append(best)
        known.append(best >= 0.5)
        top1.append(best > 0.5 and int(out_view.logits[0][0].argmax()) == label)
    assert got["ious"] == pytest.approx(ious, abs=1e-12) and got["num_images"] == 9
    assert got["gt_known_loc"] == pytest.approx(np.mean(known) * 100) and got["top1_loc"] == pytest.approx(np.mean(top1) * 100)
    assert len(set(np.round(ious, 6))) > 1  # the boxes differ between images: the test sees the maps


def test_sat_protocol_equals_their_steps(runs, tmp_path):
    import cv2
    from PIL import Image
    from torchvision.transforms import v2

    from mnpo.models import load_model

    root, data = runs
    out = tmp_path / "paper.json"
    assert main(["evaluate", "-q", "--checkpoint", str(root / "sat.pt"), "--data", str(data / "images"),
                 "--metadata", str(data / "metadata" / "test"), "--input-size", "64", "--workers", "0",
                 "--method", "cam", "--paper-protocol", "sat-cub", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["paper_protocol"]
    assert got["threshold"] == 0.4  # their evaluator.py's
    model, _ = load_model(root / "sat.pt")
    model.eval()
    meta = read_split(data / "metadata" / "test")
    ious, top1 = [], []
    for image_id in meta.image_ids:
        resized, view, to_tensor = their_view(Image.open(data / "images" / image_id).convert("RGB"), 256, 224)
        with torch.no_grad():
            m = model(view, return_features=True).features["sat_map"][0, 0].numpy()
            crops = torch.stack([to_tensor(c) for c in v2.functional.ten_crop(resized, [224, 224])])
            probabilities = model(crops).logits[0].softmax(-1).mean(0)
        m = cv2.resize((m - m.min()) / (m.max() - m.min() + 1e-5), (224, 224))
        box = naive_component_box(m > 0.4)
        width, height = meta.sizes[image_id]
        best = -1.0
        for x0, y0, x1, y1 in meta.boxes[image_id]:
            gt = [int(max(x0 / width * 256 - 16, 0)), int(max(y0 / height * 256 - 16, 0)),
                  int(min(x1 / width * 256 - 16, 223)), int(min(y1 / height * 256 - 16, 223))]
            best = max(best, inclusive(box, gt))
        ious.append(best)
        top1.append(best >= 0.5 and int(probabilities.argmax()) == meta.labels[image_id])
    assert got["ious"] == pytest.approx(ious, abs=1e-12)
    assert got["top1_loc"] == pytest.approx(np.mean(top1) * 100)
    assert len(set(np.round(ious, 6))) > 1


def test_box_rules_by_hand_and_refusals(runs):
    # TS-CAM: truncation, the far corner clipped at 223; SAT: shifted by 16, clipped at 0 and 223
    assert tscam_boxes(np.array([[10.0, 20.0, 100.0, 90.0]]), 100, 100).tolist() == [[22.0, 44.0, 223.0, 201.0]]
    assert sat_boxes(np.array([[5.0, 50.0, 99.0, 60.0]]), 100, 100).tolist() == [[0.0, 112.0, 223.0, 137.0]]
    # kept above int(0.5 * 255) = 127 (THRESH_TOZERO keeps > thresh): a 3 x 4 block at 0.6, a pixel at 0.5
    cam = np.zeros((20, 20))
    cam[2:5, 6:10] = 0.6
    cam[15, 15] = 0.5
    cam[0, 0] = 1.0
    assert largest_contour_box(cam, 0.5) == [6, 2, 10, 5]
    assert largest_contour_box(np.zeros((8, 8)), 0.5) == [0, 0, 1, 1]  # nothing kept: their fallback
    root, data = runs
    from mnpo.data.dataset import WSOLDataset
    from mnpo.models import load_model

    model, _ = load_model(root / "sat.pt")
    dataset = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=224, resize_size=224,
                          uint8_views=True, ten_crop=False)
    with pytest.raises(ValueError, match="the tscam protocol scores a deit_\\*-tscam network, not sat"):
        paper_protocol("tscam", model, dataset, threshold=0.1)
    with pytest.raises(ValueError, match="the sat protocol needs crop 224, resize 256, ten_crop True"):
        paper_protocol("sat", model, dataset, threshold=0.4)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        paper_protocol("sat", model, dataset, threshold=2)
