"""The benchmark and study scripts run (at toy sizes), so they work when a GPU session comes."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mnpo.engine.overlay import caption_height

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def script_module(name):
    """Import ``benchmarks/<name>.py`` as a module (its functions, without running it)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def run(script, *args):
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_maps_prints_every_method():
    out = run("bench_maps.py", "--device", "cpu", "--batch", "2", "--size", "64", "--width", "0.0625",
              "--classes", "10", "--repeats", "1")
    from mnpo.maps import METHODS

    for job in ("forward", *METHODS, "mnpos, released recipe"):
        assert f"| {job} |" in out
    machine = script_module("machine_info")
    assert f"device: {machine.device_summary(torch.device('cpu'))}\n" in out  # the machine, named once
    assert f"{machine.cpu_cores()} cores" in out and f"torch {torch.__version__}, torchvision" in out


def test_bench_transformer_maps_times_every_job_and_judges_the_goal():
    out = run("bench_transformer_maps.py", "--device", "cpu", "--size", "deit_tiny", "--width", "0.0625",
              "--batch", "2", "--image", "32", "--classes", "3", "--repeats", "1")
    for job in ("DeiT forward", "TS-CAM forward", "SAT forward", "TS-CAM map (cam)", "SAT map (cam)", "TS-CAM mnpo",
                "TS-CAM gradcam (blocks.10)", "TS-CAM mnpos (blocks.10)"):
        assert f"| {job} |" in out
    rows = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| job")}
    assert rows["DeiT forward"][-1] == "1.00"  # the base of the ratios
    for job in ("SAT map (cam)", "TS-CAM mnpo"):  # the verdict follows the ratio printed, to its rounding
        ratio = float(rows[job][-1])
        verdict = next(line for line in out.splitlines() if line.startswith(f"- {job}: "))
        assert verdict.startswith(f"- {job}: {ratio:.2f}x: ")
        assert verdict.endswith("met") == (ratio <= 1.1) or abs(ratio - 1.1) < 0.006


def test_bench_cam_family_times_both_and_checks_they_agree():
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is in the test extras")
    out = run("bench_cam_family.py", "--size", "32", "--width", "0.0625", "--batch", "2", "--classes", "5",
              "--repeats", "1")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    from numerics import map_bound

    from mnpo.maps.cam_family import GRADIENT_RULES
    from mnpo.models import build_model

    # the same float32 network on both sides, batched otherwise, and their +1e-7 stabilizers
    bound = map_bound(build_model("vgg16-mnpo", 5, width=0.0625), torch.float32, passes=2) + 2e-7
    for method in (*GRADIENT_RULES, "scorecam", "ablationcam", "eigencam"):
        ours, theirs, speedup, diff = (cell.strip() for cell in rows[method])
        assert float(ours) > 0 and float(theirs) > 0 and speedup.endswith("x")
        if method != "eigencam":  # (its sign may differ: said in the row)
            assert float(diff) <= bound, method
    assert "device: " in out and "pytorch-grad-cam" in out


def test_bench_input_writes_a_realistic_set_and_prints_both_tables(tmp_path):
    out = run("bench_input.py", "--images", "12", "--large-every", "6", "--workers", "1", "--batch", "4",
              "--data", str(tmp_path / "set"))
    loaders = out.split("| stage")[0]
    rows = {line.split("|")[2].strip(): line.split("|")[3:-1] for line in loaders.splitlines()
            if line.startswith("| training |") or line.startswith("| evaluation |")}
    assert len(rows) == 8
    kb = {name: float(cells[0]) for name, cells in rows.items()}
    assert kb["mnpo, RandomResizedCrop, data.jpeg_draft (uint8)"] == 147
    # uint8 224x224 (147 KB) against float32 (588 KB): the 4x of the issue, and the 256 source
    assert kb["mnpo, RandomResizedCrop (uint8)"] == 147 and kb["torchvision ImageFolder, RandomResizedCrop + "
                                                                "ToTensor + Normalize"] == 588
    assert kb["mnpo evaluate: 224 view + ten-crop source (uint8)"] == round((224 ** 2 + 256 ** 2) * 3 / 1024)
    assert all(cells[-1].strip() == "1.00x" for name, cells in rows.items() if name.startswith("torchvision"))
    assert "| decode, mnpo `load_image` |" in out
    assert "| evaluation views, --decode device's device part (decode_jpeg + 224 + 256), cpu, batch 4 |" in out
    # the set: 12 JPEGs, two of them large (2,000+ px shorter side), grayscale and CMYK among them
    from PIL import Image

    files = sorted((tmp_path / "set" / "images").rglob("*.JPEG"))
    modes = [Image.open(f).mode for f in files]
    # --decode device: a worker sends each JPEG's bytes, and a CMYK one's decoded RGB pixels
    sent = [3 * Image.open(f).size[0] * Image.open(f).size[1] if m == "CMYK" else f.stat().st_size
            for f, m in zip(files, modes)]
    name = "mnpo evaluate --decode device: the workers' part (JPEG bytes; decoded on the device)"
    assert kb[name] == round(sum(sent) / len(sent) / 1024)
    sizes = [min(Image.open(f).size) for f in files]
    assert len(files) == 12 and "L" in modes and modes.count("CMYK") == 2
    assert sum(s >= 2000 for s in sizes) == 2 and all(300 <= s <= 500 for s in sizes if s < 2000)


@pytest.mark.slow
def test_bench_pipeline_prints_the_table(tmp_path):
    out = run("bench_pipeline.py", "--device", "cpu", "--images", "8", "--classes", "5", "--batch", "2",
              "--workers", "0", "--methods", "mnpos", "--train-steps", "1", "--width", "0.0625",
              "--decodes", "host,device", "--data", str(tmp_path / "data"))
    assert "`mnpo evaluate`, mnpos" in out and "training, plain torchvision VGG16 | " in out
    assert "| `mnpo evaluate --decode device`, mnpos, maps fp32 |" in out


def test_study_writes_its_table_and_figure_and_resumes(tmp_path):
    args = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
            "--val-per-class", "2", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
            "--workers", "0", "--device", "cpu", "--figure-images", "3", "--out", str(tmp_path), "-q"]
    out = run("study.py", *args)
    table = (tmp_path / "study.md").read_text()
    assert table.strip() == out.strip()
    # 7 and 4 rows of maps, CAM with IVR after each CAM row (--normalize ivr, the default), and
    # each network's random and center maps scored for faithfulness
    assert table.count("| parts | vgg16-mnpo |") == 10 and table.count("| parts | vgg16-cam |") == 7
    for name in ("vgg16-mnpo", "vgg16-cam"):
        labels = [line.split("|")[3].strip() for line in table.splitlines() if f"| parts | {name} |" in line]
        assert labels[:2] == ["CAM", "CAM, IVR"]
    with Image.open(tmp_path / "figure-parts.png") as figure:  # CAM, DGL, MNPO, MNPOs x 3 test images
        assert figure.width == 3 * 160 and figure.height == 4 * (160 + caption_height())
    csv = tmp_path / "parts-vgg16-mnpo-seed0" / "metrics.csv"
    rows = csv.read_text()
    # --resume: the finished runs are not trained again; the numbers are those of the same checkpoints
    again = run("study.py", *args, "--resume")
    assert csv.read_text() == rows
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]  # all but the header line (it holds the time)
    # --cam-family: the same checkpoints, seven more rows for the two-branch network
    family = run("study.py", *args, "--resume", "--cam-family")
    assert family.count("| parts | vgg16-mnpo |") == 17 and family.count("| parts | vgg16-cam |") == 7
    for label in ("Grad-CAM++", "XGrad-CAM", "LayerCAM", "HiResCAM", "Score-CAM", "Ablation-CAM", "Eigen-CAM"):
        assert f"| parts | vgg16-mnpo | {label} |" in family


def test_study_faithfulness_columns_are_evaluates_numbers_on_the_same_checkpoint(tmp_path):
    """The study's faithfulness cells of a method's row and of the random and center map rows
    are ``evaluate_model``'s faithfulness summary on the trained checkpoint with the same
    settings (the right source in the right row); ``--faithfulness none`` drops the columns and
    the baseline rows, and the localization numbers stay."""
    import math

    from mnpo.data.dataset import WSOLDataset
    from mnpo.engine.evaluate import evaluate_model
    from mnpo.engine.faithfulness import FaithfulnessSettings
    from mnpo.engine.runtime import resolve_precision
    from mnpo.engine.views import resize_for
    from mnpo.metrics.boxes import cam_thresholds
    from mnpo.models import load_model

    study = script_module("study")
    common = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
              "--val-per-class", "2", "--test-per-class", "3", "--epochs", "1", "--batch", "4", "--width", "0.0625",
              "--workers", "0", "--device", "cpu", "-q", "--models", "vgg16-cam", "--seed", "3"]
    study.main([*common, "--faithfulness", "deletion,road,pointing", "--faithfulness-steps", "5",
                "--out", str(tmp_path / "on")])
    rows = {r["label"]: r for r in json.loads((tmp_path / "on" / "study.json").read_text())
            ["results"]["parts/vgg16-cam"]["per_seed"][0]}
    assert list(rows)[-2:] == ["random map", "center map"]
    model, _ = load_model(tmp_path / "on" / "parts-vgg16-cam-seed0" / "best.pt")
    data = tmp_path / "on" / "parts"
    test = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=32,
                       resize_size=resize_for(32), uint8_views=True)
    settings = FaithfulnessSettings(metrics=("deletion", "road", "pointing"), steps=5, seed=3, chunk_size=4)
    got = evaluate_model(model, test, thresholds=cam_thresholds(0.01), method="dgl", batch_size=4,
                         precision=resolve_precision("auto", torch.device("cpu")), faithfulness=settings).faithfulness["summary"]
    for label, source in (("DGL", "maps"), ("random map", "random"), ("center map", "center")):
        for key in ("deletion_auc", "road_morf", "road_lerf", "road_combined", "pointing_game", "pointing_energy"):
            assert rows[label][key] == pytest.approx(got[source][key], rel=1e-12, abs=1e-15), (label, key)
        assert math.isnan(rows[label]["insertion_auc"]) and math.isnan(rows[label]["average_drop"])
    assert got["random"]["pointing_energy"] != got["center"]["pointing_energy"]
    assert math.isnan(rows["random map"]["calibrated_max_box_acc_v2"])
    text = (tmp_path / "on" / "study.md").read_text()
    assert "| Deletion ↓ / Insertion AUC | ROAD combined | Pointing / Energy % |" in text
    assert "Avg Drop" not in text and "5 deletion / insertion steps" in text
    study.main([*common, "--faithfulness", "none", "--normalize", "none", "--out", str(tmp_path / "off")])
    off = (tmp_path / "off" / "study.md").read_text()
    assert "ROAD" not in off and "random map" not in off and off.count("| parts | vgg16-cam |") == 4
    on_rows = [line for line in text.splitlines() if "| DGL |" in line]
    off_rows = [line for line in off.splitlines() if "| DGL |" in line]
    assert off_rows[0] + " " == on_rows[0][:len(off_rows[0]) + 1]  # the same localization cells


def test_study_scores_the_wsol_methods_and_both_baselines(tmp_path):
    args = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
            "--val-per-class", "2", "--test-per-class", "2", "--epochs", "1", "--fsl-epochs", "2", "--batch", "4",
            "--width", "0.0625", "--workers", "0", "--device", "cpu", "--out", str(tmp_path), "-q",
            "--models", "vgg16-cam+has,vgg16-cam+cutmix,vgg16-cam+adl,vgg16-cam+fsl,vgg16-bas,vgg16-bgc,center"]
    out = run("study.py", *args)
    for model, label in (("vgg16-cam+has", "CAM"), ("vgg16-cam+cutmix", "CAM"), ("vgg16-cam+adl", "CAM"),
                         ("vgg16-cam+fsl", "FSL"), ("vgg16-bas", "BAS"), ("vgg16-bas", "BAS, top-k mean"),
                         ("vgg16-bas", "BAS, IVR"), ("vgg16-bas", "CAM of BAS's head"), ("vgg16-bgc", "BGC"),
                         ("center", "center baseline")):
        assert f"| parts | {model} | {label} |" in out, model
    fsl = next(line for line in out.splitlines() if "| vgg16-cam+fsl |" in line)
    center = next(line for line in out.splitlines() if "| center |" in line)
    assert fsl.split("|")[4].strip() == "-" and center.split("|")[4].strip() == "-"  # no classification
    assert (tmp_path / "parts-vgg16-cam+fsl-seed0" / "fsl-holdout" / "image_ids.txt").is_file()
    metrics = (tmp_path / "parts-vgg16-cam+fsl-seed0" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2  # --fsl-epochs
    bas = json.loads((tmp_path / "study.json").read_text())["results"]["parts/vgg16-bas"]["per_seed"][0]
    assert {r["label"]: r["options"] for r in bas}["BAS, top-k mean"] == {"top_k": 2}  # every class: --classes 2
    assert "unknown model 'nope'" in subprocess.run(
        [sys.executable, str(SCRIPTS / "study.py"), *args[:-1], "nope"], capture_output=True, text=True).stderr


def test_study_trains_the_transformer_line_with_adamw(tmp_path):
    out = run("study.py", "--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
              "--val-per-class", "2", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
              "--transformer-width", "0.0625", "--transformer-lr", "0.0003", "--workers", "0", "--device", "cpu",
              "--faithfulness", "none", "--normalize", "none", "--out", str(tmp_path), "-q",
              "--models", "deit_tiny-tscam,deit_tiny-sat,deit_tiny-tscam+scm")
    for model, label in (("deit_tiny-tscam", "TS-CAM"), ("deit_tiny-tscam", "MNPO on TS-CAM"),
                         ("deit_tiny-tscam", "MNPOs on TS-CAM"), ("deit_tiny-tscam", "Grad-CAM of TS-CAM's head"),
                         ("deit_tiny-sat", "SAT"), ("deit_tiny-sat", "MNPO on SAT"),
                         ("deit_tiny-tscam+scm", "SCM (TS-CAM's map)")):
        assert f"| parts | {model} | {label} |" in out, (model, label)
    assert "DeiT models: AdamW lr 0.0003, weight decay 0.05, drop-path 0.1, width 0.0625; " in out
    for run_dir, method in (("deit_tiny-tscam", "tscam"), ("deit_tiny-sat", "sat"), ("deit_tiny-tscam+scm", "scm")):
        saved = yaml.safe_load((tmp_path / f"parts-{run_dir}-seed0" / "config.yaml").read_text())
        assert saved["optim"]["optimizer"] == "adamw" and saved["optim"]["lr"] == 0.0003, run_dir
        assert saved["model"]["drop_path"] == 0.1 and saved["model"]["width"] == 0.0625 and \
            saved["method"]["name"] == method


def test_study_normalization_rows_follow_each_cam_row():
    """Each CAM-method row gets one row per listed normalization, its options kept; other
    methods get none; a bad name is refused by name."""
    study = script_module("study")
    rows = [("ACoL", "cam", {"x": 1}), ("MNPO", "mnpo", {}), ("SPG", "cam", {})]
    assert study.normalization_rows(rows, "none") == rows
    assert study.normalization_rows(rows, "ivr,pas") == [
        ("ACoL", "cam", {"x": 1}), ("ACoL, IVR", "cam", {"x": 1, "normalize": "ivr"}),
        ("ACoL, PaS", "cam", {"x": 1, "normalize": "pas"}), ("MNPO", "mnpo", {}),
        ("SPG", "cam", {}), ("SPG, IVR", "cam", {"normalize": "ivr"}), ("SPG, PaS", "cam", {"normalize": "pas"})]
    assert rows[0][2] == {"x": 1}  # not changed in place
    with pytest.raises(SystemExit, match="--normalize 'minmax': choose from max, pas, ivr or none"):
        study.normalization_rows(rows, "minmax")


def test_study_summary_over_seeds():
    study = script_module("study")
    runs = [[{"label": "CAM", **{k: v for k in study.METRICS}}] for v in (10.0, 14.0)]
    (row,) = study.summarize(runs)
    assert row["label"] == "CAM" and row["top1_cls"] == (12.0, pytest.approx(2 ** 0.5 * 2))
    assert study._cell(row["top1_cls"]) == "12.0 ± 2.8"
    assert study._cell((5.0, None)) == "5.0"


def test_check_precision_reports_every_configuration(tmp_path):
    """On the CPU: tf32 is fp32 (no rows of its own), channels-last moves maps by float
    rounding only, bf16 by more; the default configuration passes a tight tolerance and fails a
    negative one (exit status 1, the failure named)."""
    from mnpo.data.synthetic import write_synthetic_dataset
    from mnpo.models.checkpoint import save_checkpoint
    from tiny_models import tiny_vgg_mnpo

    data = tmp_path / "data"
    write_synthetic_dataset(out=data, preset="parts", seed=0, image_size=32, num_classes=3, train_per_class=1,
                            val_per_class=2, test_per_class=2)
    save_checkpoint(tmp_path / "model.pt", tiny_vgg_mnpo(3))
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--data", str(data), "--device", "cpu", "--batch", "4",
            "--workers", "0", "--input-size", "64", "--methods", "mnpos,cam"]
    out = run("check_precision.py", *args, "--tolerance", "0", "--out", str(tmp_path / "check.md"))
    assert (tmp_path / "check.md").read_text() == out
    assert "(tf32 is a CUDA mode: on cpu it is fp32, so it has no rows of its own)" in out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [float(c) for c in line.split("|")[3:7]]
            for line in out.splitlines() if line.startswith("| mnpos") or line.startswith("| cam")}
    for method in ("mnpos", "cam"):
        assert rows[(method, "fp32")][:2] == [0.0, 0.0]
        assert rows[(method, "fp32, channels-last")][0] < 1e-4
        assert 0 < rows[(method, "bf16")][0] < 0.5
    assert "| mnpos | fp32, channels-last |" in out and out.count(" | yes |") >= 4
    failed = subprocess.run([sys.executable, str(SCRIPTS / "check_precision.py"), *args, "--tolerance", "-1"],
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and "FAIL mnpos: default maps (fp32) moved by 0.00e+00 > -1" in failed.stderr


def test_bench_pipeline_data_is_rewritten_when_its_settings_change(tmp_path):
    bench_pipeline = script_module("bench_pipeline")
    from mnpo.data.metadata import read_split

    root = tmp_path / "bench"
    bench_pipeline.write_data(root, 6, 50, (40, 30))
    first = (root / "images" / "img" / "000000.jpg").stat().st_mtime_ns
    bench_pipeline.write_data(root, 6, 50, (40, 30))  # same settings: reused
    assert (root / "images" / "img" / "000000.jpg").stat().st_mtime_ns == first
    bench_pipeline.write_data(root, 4, 2, (40, 30))  # fewer classes: rewritten, labels in range
    meta = read_split(root / "metadata" / "test")
    assert len(meta.image_ids) == 4 and set(meta.labels.values()) <= {0, 1}
    (tmp_path / "empty").mkdir()
    bench_pipeline.write_data(tmp_path / "empty", 2, 2, (40, 30))  # an empty folder is fine
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="was not written by this script"):
        bench_pipeline.write_data(tmp_path / "mine", 4, 2, (40, 30))


def test_flops_counts_multiply_adds_twice_as_torchvision_documents():
    """torchvision lists VGG16 at 15.47 G operations (multiply-adds); the script counts two per."""
    import torchvision

    flops = script_module("flops")
    plain = torchvision.models.vgg16()
    documented = torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["_ops"]
    counted = flops.gflops(plain, None, 224, train=False)
    assert counted / 2 == pytest.approx(documented, abs=0.005)  # documented to 3 decimals: half a unit
    out = run("flops.py", "--size", "32", "--classes", "4", "--width", "0.0625")
    assert "| forward |" in out and "| training step (no optimizer) |" in out


def test_bench_pipeline_targets_say_met_or_missed_by_how_much():
    bench_pipeline = script_module("bench_pipeline")
    lines = bench_pipeline.targets([("fp32", 450.0, "18.5"), ("tf32", 660.0, "21.0")], 0.80, 256)
    assert lines[1:] == [
        "- MNPOs evaluation, maps fp32: 450 images/s against >= 600: missed by 25 %",
        "- peak memory, maps fp32: 18.5 GiB against < 20: met",
        "- MNPOs evaluation, maps tf32: 660 images/s against >= 600: met",
        "- peak memory, maps tf32: 21.0 GiB against < 20: missed by 5 %",
        "- MNPO training / plain VGG16: 0.80 against >= 0.85: missed by 6 %",
    ]
    assert bench_pipeline.targets([("fp32", 9.0, "-")], 0.9, 4)[1:] == [
        "- MNPOs evaluation, maps fp32: 9 images/s against >= 600: missed by 98 %",
        "- MNPO training / plain VGG16: 0.90 against >= 0.85: met"]


def test_study_reports_a_diverged_run_and_leaves_it_out_of_the_means(tmp_path, monkeypatch):
    study = script_module("study")
    real_train = study.train

    def train(data, out, layout, args, seed, *rest, **kwargs):
        if seed == 1 and layout == "vgg16-mnpo":
            raise FloatingPointError("training diverged: the loss is nan at epoch 3, step 2; lower optim.lr")
        return real_train(data, out, layout, args, seed, *rest, **kwargs)

    monkeypatch.setattr(study, "train", train)
    study.main(["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "2",
                "--val-per-class", "1", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
                "--workers", "0", "--device", "cpu", "--train-seeds", "0,1", "--figure-images", "2",
                "--out", str(tmp_path), "-q"])
    text = (tmp_path / "study.md").read_text()
    assert text.endswith("Diverged, left out of the means above:\n"
                         "- parts / vgg16-mnpo, training seed 1: training diverged: the loss is nan at epoch 3, step 2\n")
    mnpo_rows = [line for line in text.splitlines() if line.startswith("| parts | vgg16-mnpo |")]
    cam_rows = [line for line in text.splitlines() if line.startswith("| parts | vgg16-cam |")]
    assert len(mnpo_rows) == 10 and all("±" not in row for row in mnpo_rows)  # one seed left: no spread
    assert len(cam_rows) == 7 and all("±" in row for row in cam_rows)  # two seeds
    assert (tmp_path / "figure-parts.png").is_file()  # drawn from the seed that trained
    assert json.loads((tmp_path / "study.json").read_text())["diverged"] == [text.splitlines()[-1][2:]]


def test_study_merge_pools_seeds_of_separate_runs_as_one_run_with_them_all(tmp_path):
    """Seed 0 with the center baseline in one run, seed 1 in another, merged: the same table as
    one run of seeds 0 and 1 (CPU training is deterministic); a seed given twice, other settings,
    a file that is no study are refused by name."""
    study = script_module("study")
    common = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "2",
              "--val-per-class", "1", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
              "--workers", "0", "--device", "cpu", "--figure-images", "2", "-q"]
    study.main([*common, "--models", "vgg16-cam,center", "--train-seeds", "0", "--out", str(tmp_path / "a")])
    study.main([*common, "--models", "vgg16-cam", "--train-seeds", "1", "--out", str(tmp_path / "b")])
    study.main([*common, "--models", "vgg16-cam,center", "--train-seeds", "0,1", "--out", str(tmp_path / "both")])
    files = [str(tmp_path / d / "study.json") for d in ("a", "b")]
    study.main(["--merge", *files, "--out", str(tmp_path / "merged")])
    merged, both = ((tmp_path / d / "study.md").read_text() for d in ("merged", "both"))
    assert merged.split("\n", 1)[1] == both.split("\n", 1)[1]  # all but the header line
    assert "training seeds [0, 1]; faithfulness on test (" in merged.splitlines()[0]
    assert merged.splitlines()[0].endswith("; merged from 2 study.json files")
    # vgg16-cam's five rows (CAM with IVR too) x seven localization values, its seven rows (with
    # the random and center maps) x six faithfulness values (ROAD is not in the default); the
    # center baseline has none
    assert merged.count("±") == 5 * 7 + 7 * 6 and "ROAD" not in merged
    pooled = json.loads((tmp_path / "merged" / "study.json").read_text())["results"]
    assert pooled["parts/vgg16-cam"]["seeds"] == [0, 1] and pooled["parts/center"]["seeds"] is None
    old = json.loads(Path(files[1]).read_text())  # written before study.json kept the seeds
    del old["results"]["parts/vgg16-cam"]["seeds"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    study.main(["--merge", files[0], str(tmp_path / "old.json"), "--out", str(tmp_path / "merged-old")])
    assert (tmp_path / "merged-old" / "study.md").read_text() == merged

    def refused(*paths):
        with pytest.raises(SystemExit) as err:
            study.main(["--merge", *map(str, paths), "--out", str(tmp_path / "x")])
        return str(err.value)

    assert "vgg16-cam, training seed(s) [0] are already in an earlier file" in refused(files[0], tmp_path / "both" / "study.json")
    other = json.loads(Path(files[1]).read_text())
    other["settings"]["epochs"] = 3
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "other.json: epochs is 3 but" in refused(files[0], tmp_path / "other.json")
    other["settings"]["epochs"] = 1
    other["settings"]["faithfulness"] = "road"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "other.json: faithfulness is 'road' but" in refused(files[0], tmp_path / "other.json")
    other["settings"]["faithfulness"] = old["settings"]["faithfulness"]
    other["settings"]["normalize"] = "pas"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "other.json: normalize is 'pas' but" in refused(files[0], tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("{}")
    assert "junk.json: not a study.json written by study.py" in refused(tmp_path / "junk.json")


def test_study_merge_refuses_fsl_runs_of_other_epochs(tmp_path):
    study = script_module("study")
    row = {"label": "FSL", **{k: 50.0 for k in study.METRICS}}
    settings = {"image_size": 32, "classes": 2, "train_per_class": 2, "val_per_class": 1, "test_per_class": 2,
                "epochs": 1, "batch": 4, "lr": 0.01, "clip_grad_norm": None, "width": 0.0625, "seed": 0,
                "fp32_maps": False, "train_seeds": "0"}
    for seed, fsl_epochs in ((0, None), (1, 1), (2, 3)):  # None: --epochs (1)
        (tmp_path / f"{seed}.json").write_text(json.dumps({
            "settings": {**settings, "fsl_epochs": fsl_epochs}, "header": "device: test; x", "diverged": [],
            "results": {"parts/vgg16-cam+fsl": {"per_seed": [[row]], "seeds": [seed]}}}))
    study.main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(tmp_path / "ok")])
    assert "| parts | vgg16-cam+fsl | FSL | 50.0 ± 0.0 |" in (tmp_path / "ok" / "study.md").read_text()
    with pytest.raises(SystemExit, match=r"2.json: FSL trained 3 epochs but 1 in .*0.json"):
        study.main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "2.json"), "--out", str(tmp_path / "x")])


def test_study_merge_compares_each_kinds_settings_only_between_files_with_that_kind(tmp_path):
    """--width does not reach the DeiT models, --transformer-lr/-width not the CNNs: DeiT runs of
    another --width merge, CNN runs of another (or, written before the option, no) --transformer-lr
    merge; a CNN run of another --width beside another CNN run, a DeiT run of another
    --transformer-lr beside another DeiT run, are refused, naming the setting."""
    study = script_module("study")
    row = {"label": "x", **{k: 40.0 for k in study.METRICS}}
    settings = {"image_size": 32, "classes": 2, "train_per_class": 2, "val_per_class": 1, "test_per_class": 2,
                "epochs": 1, "batch": 4, "lr": 0.01, "clip_grad_norm": None, "seed": 0, "fp32_maps": False,
                "transformer_lr": 5e-4, "transformer_width": 1.0}

    def write(name, model, seed, width, **changed):
        (tmp_path / name).write_text(json.dumps({
            "settings": {**settings, "width": width, "train_seeds": str(seed), **changed}, "header": "device: test; x",
            "diverged": [], "results": {f"parts/{model}": {"per_seed": [[row]], "seeds": [seed]}}}))
        return str(tmp_path / name)

    deit = [write("d0.json", "deit_tiny-sat", 0, 0.125), write("d1.json", "deit_tiny-sat", 1, 1.0)]
    cnn = [write("c0.json", "vgg16-cam", 0, 0.125), write("c1.json", "vgg16-cam", 1, 1.0)]
    study.main(["--merge", deit[0], cnn[0], deit[1], "--out", str(tmp_path / "ok")])
    assert "| parts | deit_tiny-sat | x | 40.0 ± 0.0 |" in (tmp_path / "ok" / "study.md").read_text()
    with pytest.raises(SystemExit, match=r"c1.json: width is 1.0 but .*c0.json has 0.125"):
        study.main(["--merge", deit[1], cnn[0], cnn[1], "--out", str(tmp_path / "x")])
    older_cnn = write("c2.json", "vgg16-cam", 2, 0.125, transformer_lr=None, transformer_width=None)
    other_deit = write("d2.json", "deit_tiny-sat", 2, 0.125, transformer_lr=1e-3)
    study.main(["--merge", deit[0], older_cnn, cnn[0], "--out", str(tmp_path / "ok2")])
    assert "| parts | vgg16-cam | x | 40.0 ± 0.0 |" in (tmp_path / "ok2" / "study.md").read_text()
    with pytest.raises(SystemExit, match=r"d2.json: transformer_lr is 0.001 but .*d0.json has 0.0005"):
        study.main(["--merge", older_cnn, deit[0], other_deit, "--out", str(tmp_path / "x")])


def test_float32_maps_measures_the_difference_and_its_parts(tmp_path):
    """Toy size (full-width VGG16 at 32 px, two images): every table is written and the
    differences are float32 rounding (a broken replay or a float64 run left in float32 would
    print 0 or something far above 1e-4)."""
    out = tmp_path / "float32.md"
    run("float32_maps.py", "--seeds", "0", "--batches", "1", "--batch", "2", "--size", "32", "--classes", "10",
        "--split", "2", "--out", str(out))
    text = out.read_text()
    assert text.startswith("device: ") and "kernels " in text.splitlines()[0]
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 0 |")]
    assert [r[1].strip() for r in rows] == ["mnpos", "dgl", "gradcam", "mnpo"]
    for row in rows:
        einsum, float32, same = (float(v) for v in row[3:6])
        assert 0 < same <= float32 < 1e-4 and 0 < einsum < 1e-4, row
    steps = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| A |", "| G0 |", "| D1 |"))]
    assert len(steps) == 3 and all(0 < float(v) < 1e-4 for row in steps for v in row[1:])
    boxes = [line for line in text.splitlines() if line.startswith(("| mnpos | float", "| dgl | float"))]
    assert len(boxes) == 4 and "(network 0; oracle threshold)" in text


def test_bench_faithfulness_times_all_three_and_they_agree():
    """Every row, and the numbers of the three implementations equal to float32 rounding."""
    out = run("bench_faithfulness.py", "--images", "2", "--size", "48", "--steps", "3", "--chunk", "4")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[1] for r in rows] == ["ours", "pytorch-grad-cam", "torchcam", "ours", "torchcam", "ours",
                                                "pytorch-grad-cam"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        if cells[1] != "ours":
            # float32 probabilities of a 50-layer network: differences of a few 1e-7
            assert float(cells[4].split()[0]) < 1e-5, row


def test_forward_ceiling_times_the_same_forward_every_way():
    """Each faster forward computes resnet50's logits: equal to the eager ones within float32
    rounding over 50 layers (measured 3e-5 to 5e-5 of logits up to 30); a forward of other inputs or
    weights is off by the logits' own size."""
    out = run("forward_ceiling.py", "--batch", "2", "--size", "48", "--repeats", "1", "--no-compile")
    largest = float(out.splitlines()[0].split("largest |logit| ")[1].split(";")[0])
    assert largest > 0.01
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["eager, contiguous", "eager, channels-last",
                                    "TorchScript freeze + optimize_for_inference"]
    for cells in rows[1:]:
        assert float(cells[3]) < 1e-3 * largest, cells


def test_study_backbone_from_starts_each_model_from_the_sources_trained_backbone(tmp_path):
    """--backbone-from vgg16-cam: the source is trained (once) and its best backbone saved as a
    torchvision-named file; BAS starts from exactly those weights (its backbone before any step
    equals the file) and its rows read 'vgg16-bas from vgg16-cam'; another backbone is refused."""
    import torch

    from mnpo.models import build_model
    from mnpo.models.weights import load_pretrained

    study = script_module("study")
    args = ["--presets", "parts", "--image-size", "32", "--classes", "2", "--train-per-class", "4",
            "--val-per-class", "2", "--test-per-class", "2", "--epochs", "1", "--batch", "4", "--width", "0.0625",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path), "-q", "--faithfulness", "none",
            "--normalize", "none", "--backbone-from", "vgg16-cam", "--models", "vgg16-cam,vgg16-bas"]
    study.main(args)
    text = (tmp_path / "study.md").read_text()
    assert "| parts | vgg16-cam | CAM |" in text and "| parts | vgg16-bas from vgg16-cam | BAS |" in text
    source = torch.load(tmp_path / "parts-vgg16-cam-seed0" / "backbone.pth", weights_only=True)
    trained, _ = study.load_model(tmp_path / "parts-vgg16-cam-seed0" / "best.pt")
    assert source.keys() == trained.backbone.state_dict().keys()
    assert all(torch.equal(v, trained.backbone.state_dict()[k]) for k, v in source.items())
    assert (tmp_path / "parts-vgg16-bas@vgg16-cam-seed0" / "best.pt").is_file()
    fresh = build_model("vgg16-bas", 2, width=0.0625)
    load_pretrained(fresh, tmp_path / "parts-vgg16-cam-seed0" / "backbone.pth")  # what the run's config asks
    assert all(torch.equal(v, source[k]) for k, v in fresh.backbone.state_dict().items())
    cfg = __import__("yaml").safe_load((tmp_path / "parts-vgg16-bas@vgg16-cam-seed0" / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] == str(tmp_path / "parts-vgg16-cam-seed0" / "backbone.pth")
    with pytest.raises(SystemExit, match="vgg16-cam is a vgg16 network; resnet50-x is built on resnet50"):
        study.backbone_source("resnet50-x", "resnet50-cam", "vgg16-cam")
