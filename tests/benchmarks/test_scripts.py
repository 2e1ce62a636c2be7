"""The benchmark and study scripts run (at toy sizes), so they work when a GPU session comes."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mnpo.engine.overlay import caption_height

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script, *args):
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_maps_prints_every_method():
    out = run("bench_maps.py", "--device", "cpu", "--batch", "2", "--size", "64", "--width", "0.0625",
              "--classes", "10", "--repeats", "1")
    for job in ("forward", "cam", "mnpo", "mnpos", "gradcam", "dgl", "mnpos, released recipe"):
        assert f"| {job} |" in out


@pytest.mark.slow
def test_bench_pipeline_prints_the_table(tmp_path):
    out = run("bench_pipeline.py", "--device", "cpu", "--images", "8", "--classes", "5", "--batch", "2",
              "--workers", "0", "--methods", "mnpos", "--train-steps", "1", "--width", "0.0625",
              "--data", str(tmp_path / "data"))
    assert "`mnpo evaluate`, mnpos" in out and "training, plain torchvision VGG16 | " in out


def test_study_writes_its_table_and_figure_and_resumes(tmp_path):
    args = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
            "--val-per-class", "2", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
            "--workers", "0", "--device", "cpu", "--figure-images", "3", "--out", str(tmp_path), "-q"]
    out = run("study.py", *args)
    table = (tmp_path / "study.md").read_text()
    assert table.strip() == out.strip()
    assert table.count("| parts | vgg16-mnpo |") == 7 and table.count("| parts | vgg16-cam |") == 4
    with Image.open(tmp_path / "figure-parts.png") as figure:  # CAM, DGL, MNPO, MNPOs x 3 test images
        assert figure.width == 3 * 160 and figure.height == 4 * (160 + caption_height())
    csv = tmp_path / "parts-vgg16-mnpo-seed0" / "metrics.csv"
    rows = csv.read_text()
    # --resume: the finished runs are not trained again; the numbers are those of the same checkpoints
    again = run("study.py", *args, "--resume")
    assert csv.read_text() == rows
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]  # all but the header line (it holds the time)


def test_bench_input_prints_the_three_pipelines():
    out = run("bench_input.py", "--images", "6", "--workers", "0", "--batch", "3")
    assert "| naive (eleven conversions) |" in out and "| uint8 views, normalize + ten-crop batch-wise |" in out


def test_study_summary_over_seeds():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import study
    finally:
        sys.path.remove(str(SCRIPTS))
    runs = [[{"label": "CAM", **{k: v for k in study.METRICS}}] for v in (10.0, 14.0)]
    (row,) = study.summarize(runs)
    assert row["label"] == "CAM" and row["top1_cls"] == (12.0, pytest.approx(2 ** 0.5 * 2))
    assert study._cell(row["top1_cls"]) == "12.0 ± 2.8"
    assert study._cell((5.0, None)) == "5.0"
