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
