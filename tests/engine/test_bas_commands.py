"""BAS end to end on a tiny synthetic set: `mnpo train` with `method.name: bas`, then `evaluate`
(its generator map, `--top-k`, and a CAM-family method at `head`), `localize` and `report`."""

import json

import numpy as np
import pytest
import torch
import yaml

from mnpo.cli import main
from mnpo.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def bas_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bas")
    data = root / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=2, image_size=48, num_classes=3,
                            train_per_class=6, val_per_class=2, test_per_class=3)
    config = root / "bas.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"layout": "resnet50-bas", "width": 0.0625, "pretrained": None},
        "method": {"name": "bas", "bas_weights": "ilsvrc"},
        "optim": {"epochs": 2, "batch_size": 6, "lr": 0.01, "new_layer_lr_ratio": 10, "bias_lr_ratio": 2,
                  "lr_milestones": [1]},
        "eval": {"method": "cam"},
        "runtime": {"out": str(root / "run"), "device": "cpu", "channels_last": False},
    }))
    assert main(["train", "--config", str(config), "-q"]) == 0
    return root, data


def test_bas_trains_with_finite_losses_and_its_recipe_is_kept(bas_run):
    root, _ = bas_run
    rows = (root / "run" / "metrics.csv").read_text().splitlines()
    values = [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert len(values) == 2 and all(np.isfinite(float(v["train_loss"])) for v in values)
    assert float(values[1]["lr"]) == pytest.approx(0.001) and float(values[1]["lr_new_layers"]) == pytest.approx(0.01)
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["method"]["bas_weights"] == "ilsvrc" and saved["optim"]["bias_lr_ratio"] == 2
    payload = torch.load(root / "run" / "last.pt", weights_only=False)
    assert len(payload["training"]["optimizer"]["param_groups"]) == 4


def test_bas_evaluate_localize_and_report(bas_run, tmp_path, capsys):
    """evaluate's cam is the generator's map (saved maps equal compute_maps' on the same view),
    --top-k changes it and is recorded, Grad-CAM at head runs; localize and report read the run."""
    from mnpo.data.dataset import WSOLDataset
    from mnpo.engine.views import resize_for
    from mnpo.maps import compute_maps
    from mnpo.models import load_model

    root, data = bas_run
    ckpt = str(root / "run" / "best.pt")
    common = ["evaluate", "-q", "--checkpoint", ckpt, "--data", str(data / "images"), "--input-size", "48",
              "--workers", "0", "--metadata", str(data / "metadata" / "test"),
              "--val-metadata", str(data / "metadata" / "val")]
    assert main(common + ["--method", "cam", "--save-maps", str(tmp_path / "cam"), "--results",
                          str(tmp_path / "cam.npz"), "--json", str(tmp_path / "cam.json")]) == 0
    assert main(common + ["--method", "cam", "--top-k", "3", "--save-maps", str(tmp_path / "top3"),
                          "--json", str(tmp_path / "top3.json")]) == 0
    assert main(common + ["--method", "gradcam", "--results", str(tmp_path / "gradcam.npz")]) == 0
    assert json.loads((tmp_path / "top3.json").read_text())["info"]["map_options"] == {"top_k": 3}
    model, _ = load_model(root / "run" / "best.pt")
    model.eval()
    test = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48,
                       resize_size=resize_for(48))
    item = test[0]
    expected, _ = compute_maps(model, item["image"][None], torch.tensor([item["label"]]), method="cam",
                               size=(224, 224))
    saved = np.load(tmp_path / "cam" / f"{item['image_id']}.npy")
    np.testing.assert_allclose(saved, expected[0].numpy(), rtol=0, atol=1e-6)
    top3 = np.load(tmp_path / "top3" / f"{item['image_id']}.npy")
    assert np.abs(top3 - saved).max() > 1e-3
    assert main(["report", str(tmp_path / "cam.npz"), str(tmp_path / "gradcam.npz"), "--out",
                 str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 1000
    image = str(data / "images" / item["image_id"])
    assert main(["localize", "--checkpoint", ckpt, image, "--out", str(tmp_path / "loc"), "--method", "cam",
                 "--top-k", "2", "--device", "cpu", "--no-overlays"]) == 0
    result = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert len(result["images"]) == 1 and len(result["images"][0]["box"]) == 4


def naive_component_box(mask):
    """The largest 8-connected component's half-open box by breadth-first search (ties: the one
    reached first in raster order); the whole map when nothing is set."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best = None
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            queue, pixels = [(y, x)], []
            seen[y, x] = True
            while queue:
                cy, cx = queue.pop()
                pixels.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            if best is None or len(pixels) > len(best):
                best = pixels
    if best is None:
        return [0, 0, w, h]
    ys, xs = zip(*best)
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


def test_bas_paper_protocol_equals_their_steps_image_by_image(bas_run, tmp_path):
    """`evaluate --paper-protocol bas-cub` against their script's steps written out per image:
    PIL resize (256, 256) and center crop, the mean map of the top-k classes, min-max then
    bilinear resize, pixels above the threshold, the largest component's box, IoU with + 1
    areas against the resized and cropped boxes, ten-crop softmax; per-class means."""
    import cv2
    from PIL import Image
    from torchvision.transforms import v2

    from mnpo.data.metadata import read_split
    from mnpo.models import load_model

    root, data = bas_run
    out = tmp_path / "paper.json"
    assert main(["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
                 "--metadata", str(data / "metadata" / "test"), "--input-size", "48", "--workers", "0",
                 "--method", "cam", "--paper-protocol", "bas-cub", "--paper-threshold", "0.2",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["paper_protocol"]
    assert got["threshold"] == 0.2 and got["top_k"] == 3 and got["num_images"] == 9  # every class: 3
    model, _ = load_model(root / "run" / "best.pt")
    model.eval()
    meta = read_split(data / "metadata" / "test")
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    hits, top1 = {}, {}
    for image_id in meta.image_ids:
        image = Image.open(data / "images" / image_id).convert("RGB")
        resized = v2.functional.resize(image, [256, 256], interpolation=v2.InterpolationMode.BILINEAR)
        view = to_tensor(v2.functional.center_crop(resized, [224, 224]))[None]
        with torch.no_grad():
            out_view = model(view, return_features=True)
            scores = out_view.logits[0][0]
            classes = scores.topk(3).indices
            cam = out_view.features["generator"][0, classes].mean(0).numpy()
            crops = torch.stack([to_tensor(c) for c in v2.functional.ten_crop(resized, [224, 224])])
            probabilities = model(crops).logits[0].softmax(-1).mean(0)
        cam = cv2.resize((cam - cam.min()) / (cam.max() - cam.min()), (224, 224), interpolation=cv2.INTER_LINEAR)
        box = naive_component_box(cam > 0.2)
        width, height = meta.sizes[image_id]
        best = 0.0
        for x0, y0, x1, y1 in meta.boxes[image_id]:
            gt = [min(max(v * 256 / s, 16), 240) - 16 for v, s in ((x0, width), (y0, height), (x1, width), (y1, height))]
            inter = max(0, min(box[2], gt[2]) - max(box[0], gt[0]) + 1) * max(0, min(box[3], gt[3]) - max(box[1], gt[1]) + 1)
            union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - inter
            best = max(best, inter / union)
        label = meta.labels[image_id]
        hits.setdefault(label, []).append(best > 0.5)
        top1.setdefault(label, []).append(best > 0.5 and int(probabilities.argmax()) == label)
    assert got["gt_known_loc"] == pytest.approx(np.mean([np.mean(v) for v in hits.values()]) * 100, abs=1e-9)
    assert got["top1_loc"] == pytest.approx(np.mean([np.mean(v) for v in top1.values()]) * 100, abs=1e-9)
    assert 0 < got["gt_known_loc"]  # a protocol that finds no box at all would pass the equalities too
