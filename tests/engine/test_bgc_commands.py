"""BGC end to end on a tiny synthetic set: `mnpo train` with `method.name: bgc` past its warm-up,
then `evaluate` (CAM, and Grad-CAM of conv5_3 or Mixed_6e), `localize` and `report` of the checkpoint."""

import json

import numpy as np
import pytest
import torch
import yaml

from mnpo.cli import main
from mnpo.data.synthetic import write_synthetic_dataset


@pytest.mark.parametrize("backbone, tap", [("vgg16", "conv5_3"), ("inception_v3", "Mixed_6e")])
def test_bgc_trains_past_its_warm_up_and_every_command_reads_it(tmp_path, backbone, tap):
    data = tmp_path / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=4, image_size=48, num_classes=3,
                            train_per_class=6, val_per_class=2, test_per_class=3)
    config = tmp_path / "bgc.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"layout": f"{backbone}-bgc", "width": 0.0625, "pretrained": None},
        "method": {"name": "bgc", "bgc_warmup_epochs": 1},
        "optim": {"epochs": 2, "batch_size": 6, "lr": 0.01, "new_layer_lr_ratio": 5, "lr_milestones": [1],
                  "lr_gamma": 0.2},
        "eval": {"method": "cam"},
        "runtime": {"out": str(tmp_path / "run"), "device": "cpu", "channels_last": False},
    }))
    assert main(["train", "--config", str(config), "-q"]) == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    values = [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert len(values) == 2 and all(np.isfinite(float(v["train_loss"])) for v in values)
    assert abs(float(values[1]["lr"]) - 0.01 * 0.2) < 1e-12  # lr_gamma 0.2 after epoch 1
    every_command_reads(tmp_path, data, tap)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["training"]["config"]["method"]["name"] == "bgc"


def every_command_reads(tmp_path, data, tap):
    """`evaluate` (CAM, and Grad-CAM at ``tap``), `report` and `localize` of ``tmp_path/run/best.pt``
    on a 3-class synthetic set of 9 test images: each runs, and their files hold what they say."""
    ckpt = str(tmp_path / "run" / "best.pt")
    common = ["evaluate", "-q", "--checkpoint", ckpt, "--data", str(data / "images"), "--input-size", "48",
              "--workers", "0", "--metadata", str(data / "metadata" / "test"),
              "--val-metadata", str(data / "metadata" / "val")]
    assert main(common + ["--method", "cam", "--results", str(tmp_path / "cam.npz"),
                          "--json", str(tmp_path / "cam.json")]) == 0
    assert main(common + ["--method", "gradcam", "--target-layer", tap, "--results",
                          str(tmp_path / "gradcam.npz")]) == 0
    report = json.loads((tmp_path / "cam.json").read_text())
    assert report["info"]["num_images"] == 9 and "max_box_acc_v2" in report["calibrated"]
    assert main(["report", str(tmp_path / "cam.npz"), str(tmp_path / "gradcam.npz"), "--out",
                 str(tmp_path / "report.html")]) == 0
    image = next((data / "images").rglob("*.png"))
    assert main(["localize", "--checkpoint", ckpt, str(image), "--out", str(tmp_path / "loc"), "--method", "cam",
                 "--device", "cpu", "--no-overlays"]) == 0
    result = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert len(result["images"]) == 1 and len(result["images"][0]["box"]) == 4
