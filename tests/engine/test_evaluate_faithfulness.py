"""Faithfulness in the engine (``mnpo.engine.faithfulness``, ``evaluate --faithfulness``): the
numbers equal the metric functions on the same model, views and maps; batching, resuming and
ranks do not change them; a split without boxes is scored by them alone; results and report."""

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F

from mnpo.cli import main
from mnpo.data.dataset import WSOLDataset, collate_evaluation
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.data.transforms import normalize_batch
from mnpo.engine.faithfulness import (
    FaithfulnessAccumulator,
    FaithfulnessSettings,
    image_seed,
    parse_metrics,
    regions_of_split,
)
from mnpo.engine.results import read_results
from mnpo.metrics import faithfulness as fm
from mnpo.models import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faith")
    data = root / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=2, image_size=48, num_classes=3,
                            train_per_class=4, val_per_class=1, test_per_class=3)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"width": 0.0625, "pretrained": None},
        "optim": {"epochs": 1, "batch_size": 6, "lr": 0.01},
        "eval": {"method": "cam"},
        "runtime": {"out": str(root / "run"), "device": "cpu", "channels_last": False},
    }))
    assert main(["train", "--config", str(config), "-q"]) == 0
    # the same split without localization.txt: classification labels only
    plain = root / "plain"
    shutil.copytree(data / "metadata" / "test", plain)
    (plain / "localization.txt").unlink()
    return root, data, plain


FAST = ["--faithfulness-steps", "8", "--road-percentiles", "30,70"]


def common(root, data):
    return ["evaluate", "-q", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data / "images"),
            "--input-size", "48", "--workers", "0", "--method", "cam", "--no-ten-crop"]


def views(data, metadata):
    dataset = WSOLDataset(data / "images", metadata, "evaluate", crop_size=48, resize_size=55, uint8_views=True,
                          ten_crop=False)
    batch = collate_evaluation([dataset[i] for i in range(len(dataset))])
    return normalize_batch(batch["image"]), batch["label"], list(batch["image_id"]), dataset.meta


def test_evaluate_faithfulness_equals_the_metrics_on_the_same_views_and_maps(trained, tmp_path, capsys):
    root, data, _ = trained
    test = data / "metadata" / "test"
    assert main(common(root, data) + ["--metadata", str(test), "--faithfulness", "all", *FAST, "--batch-size", "4",
                                      "--save-maps", str(tmp_path / "maps"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "oracle     max_box_acc" in out and "Deletion AUC" in out and "ROAD combined" in out
    info = json.loads((tmp_path / "r.json").read_text())["info"]
    faithful = info["faithfulness"]
    assert set(faithful["summary"]) == {"maps", "random", "center"}
    # 48 x 48 in 8 steps: 288 pixels a step, 9 points; ROAD at 2 percentiles: 5; x 3 map sources
    assert faithful["forwards_per_image"] == {"avgdrop": 6, "deletion": 27, "insertion": 27, "road": 15,
                                              "pointing": 0}

    model, _ = load_model(root / "run" / "best.pt")
    model.eval()
    images, labels, ids, meta = views(data, test)
    frame = torch.stack([torch.from_numpy(np.load(tmp_path / "maps" / f"{i}.npy")) for i in ids])
    maps = F.interpolate(frame[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    summary = faithful["summary"]["maps"]
    change = fm.confidence_change(model, images, maps, labels)
    deletion = fm.deletion_insertion(model, images, maps, labels, "deletion", 8)
    insertion = fm.deletion_insertion(model, images, maps, labels, "insertion", 8)
    road = fm.road(model, images, maps, labels, (30, 70), 0.01, [image_seed(0, i) for i in ids])
    regions = regions_of_split(meta)(ids)
    game = fm.pointing_game(frame, regions)
    # the same float32 forwards on the same inputs in batches of other sizes: the probabilities
    # agree to float32 rounding of a few-layer network, 1e-6 of values <= 1
    tol = 1e-5
    assert summary["average_drop"] == pytest.approx(change.average_drop, abs=100 * tol)
    assert summary["increase_in_confidence"] == pytest.approx(change.increase_in_confidence, abs=1e-9)
    assert summary["deletion_auc"] == pytest.approx(float(deletion.auc.mean()), abs=tol)
    assert summary["insertion_auc"] == pytest.approx(float(insertion.auc.mean()), abs=tol)
    assert summary["road_morf"] == pytest.approx(float(road.morf.mean()), abs=tol)
    assert summary["road_lerf"] == pytest.approx(float(road.lerf.mean()), abs=tol)
    assert summary["road_combined"] == pytest.approx(float(road.combined.mean()), abs=tol)
    assert summary["pointing_game"] == pytest.approx(100 * float(game.hit.double().mean()), abs=1e-9)
    assert summary["pointing_energy"] == pytest.approx(100 * float(game.energy.mean()), abs=1e-9)
    curves = faithful["curves"]["deletion"]
    assert curves["fractions"] == pytest.approx(deletion.fractions.tolist(), abs=1e-15)
    assert curves["maps"] == pytest.approx(deletion.curves.mean(0).tolist(), abs=tol)
    # the center baseline is the same cone for every image, in the maps' 224 frame and resized
    # to the view as the maps are (its ties broken in raster order: the same resized values needed)
    center = F.interpolate(fm.center_maps((len(ids), 224, 224))[:, None], size=(48, 48), mode="bilinear",
                           align_corners=False)[:, 0].clamp(0, 1)
    assert faithful["summary"]["center"]["deletion_auc"] == pytest.approx(
        float(fm.deletion_insertion(model, images, center, labels, "deletion", 8).auc.mean()), abs=tol)


def test_batching_and_resuming_do_not_change_the_numbers(trained, tmp_path):
    """Per-image seeds: the random baseline and ROAD's noise follow the image, not its batch."""
    root, data, _ = trained
    test = ["--metadata", str(data / "metadata" / "test"), "--faithfulness", "avgdrop,road,deletion", *FAST]
    results = []
    for size in (9, 2):
        assert main(common(root, data) + test + ["--batch-size", str(size), "--json", str(tmp_path / f"{size}.json"),
                                                 "--state-dir", str(tmp_path / f"state{size}")]) == 0
        results.append(json.loads((tmp_path / f"{size}.json").read_text())["info"]["faithfulness"])
    for source in ("maps", "random", "center"):
        for key, value in results[0]["summary"][source].items():
            assert results[1]["summary"][source][key] == pytest.approx(value, abs=1e-6), (source, key)
    # a finished run's state is continued, not redone: the same numbers from the progress file
    state = json.loads((tmp_path / "state2" / "test.json").read_text())
    assert len(state["faithfulness"]["image_ids"]) == 9
    assert main(common(root, data) + test + ["--batch-size", "2", "--json", str(tmp_path / "again.json"),
                                             "--state-dir", str(tmp_path / "state2")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["info"]["faithfulness"]
    assert again["summary"] == results[1]["summary"]


def test_a_split_without_boxes_is_scored_by_faithfulness_alone(trained, tmp_path, capsys):
    root, data, plain = trained
    base = common(root, data) + ["--metadata", str(plain)]
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "no localization.txt" in err and "give --faithfulness" in err
    assert main(base + ["--faithfulness", "pointing"]) == 2
    assert "pointing game needs boxes or masks" in capsys.readouterr().err
    assert main(base + ["--faithfulness", "avgdrop,insertion", *FAST, "--results", str(tmp_path / "plain.npz"),
                        "--report", str(tmp_path / "plain.html"), "--json", str(tmp_path / "plain.json")]) == 0
    out = capsys.readouterr().out
    assert "max_box_acc" not in out and "Insertion AUC" in out and "Deletion AUC" not in out
    report = json.loads((tmp_path / "plain.json").read_text())
    assert report["oracle"] == {} and report["info"]["num_images"] == 9 and report["info"]["kind"] == "none"
    saved = read_results(tmp_path / "plain.npz")
    assert saved.kind == "none" and saved.test is None and saved.metrics() == {"oracle": {}}
    assert saved.info["faithfulness"] == report["info"]["faithfulness"]
    page = (tmp_path / "plain.html").read_text()
    assert 'id="faithfulness"' in page and 'id="plot-faithfulness"' in page and "plot-curves" not in page
    # the same numbers as on the split with boxes: the boxes play no part in these metrics
    assert main(common(root, data) + ["--metadata", str(data / "metadata" / "test"), "--faithfulness",
                                      "avgdrop,insertion", *FAST, "--json", str(tmp_path / "boxes.json")]) == 0
    boxes = json.loads((tmp_path / "boxes.json").read_text())["info"]["faithfulness"]["summary"]
    assert boxes == report["info"]["faithfulness"]["summary"]
    assert main(base + ["--faithfulness", "avgdrop", "--val-metadata", str(data / "metadata" / "val")]) == 2
    assert "no threshold to calibrate" in capsys.readouterr().err


def test_mnpo_report_puts_faithfulness_beside_the_box_metrics(trained, tmp_path):
    root, data, _ = trained
    test = ["--metadata", str(data / "metadata" / "test"), "--gallery-size", "3", *FAST]
    for method in ("cam", "gradcam"):
        args = common(root, data) + test + ["--method", method, "--results", str(tmp_path / f"{method}.npz")]
        assert main(args + ["--faithfulness", "deletion,insertion,pointing"]) == 0
    assert main(["report", str(tmp_path / "cam.npz"), str(tmp_path / "gradcam.npz"), "--out",
                 str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert 'id="plot-faithfulness"' in page and 'id="plot-curves"' in page
    table = page[page.index('<table id="faithfulness"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 2 * 3  # header, then 2 results x (maps, random, center)
    saved = read_results(tmp_path / "gradcam.npz").info["faithfulness"]
    for mode in ("deletion", "insertion"):
        assert len(saved["curves"][mode]["maps"]) == len(saved["curves"][mode]["fractions"]) == 9
        area = np.trapezoid(saved["curves"][mode]["maps"], saved["curves"][mode]["fractions"])
        # the mean curve's area is the mean of the areas (the trapezoid rule is linear)
        assert area == pytest.approx(saved["summary"]["maps"][f"{mode}_auc"], abs=1e-12)


def test_parse_metrics_and_settings_refuse_bad_values():
    assert parse_metrics("road, avgdrop") == ("avgdrop", "road")  # report order
    assert parse_metrics("all") == ("avgdrop", "deletion", "insertion", "road", "pointing")
    for bad, message in [("roads", "unknown faithfulness metric"), ("", "unknown faithfulness metric")]:
        with pytest.raises(ValueError, match=message):
            parse_metrics(bad)
    for fields, message in [({"steps": 0}, "steps must be a positive int"),
                            ({"chunk_size": True}, "chunk_size must be a positive int"),
                            ({"road_percentiles": (0, 50)}, "percentiles must lie in"),
                            ({"road_noise": -1.0}, "noise must be >= 0"),
                            ({"baselines": ("random", "random")}, "baselines must be distinct"),
                            ({"baselines": ("zeros",)}, "baselines must be distinct")]:
        with pytest.raises(ValueError, match=message):
            FaithfulnessSettings(**fields)
    # 224 x 224 in 112 steps: 448 pixels a step, 113 points; 9 ROAD percentiles: 19 forwards
    assert FaithfulnessSettings(baselines=()).forwards_per_image(224) == {
        "avgdrop": 2, "deletion": 113, "insertion": 113, "road": 19, "pointing": 0}


def test_accumulators_of_two_shares_merge_to_the_whole():
    """What the ranks do: each scores its share, the shares' states merge to one run's values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 16 * 16, 3)).eval()
    images, maps = torch.randn(4, 3, 16, 16), torch.rand(4, 224, 224)
    targets, ids = torch.tensor([0, 1, 2, 1]), ["a", "b", "c", "d"]
    settings = FaithfulnessSettings(metrics=("avgdrop", "deletion", "road"), steps=4, road_percentiles=(50,))
    whole = FaithfulnessAccumulator(settings)
    whole.update(model, images, maps, targets, ids)
    first, second = FaithfulnessAccumulator(settings), FaithfulnessAccumulator(settings)
    first.update(model, images[:2], maps[:2], targets[:2], ids[:2])
    second.update(model, images[2:], maps[2:], targets[2:], ids[2:])
    restored = FaithfulnessAccumulator(settings)
    restored.load_state_dict(json.loads(json.dumps(second.state_dict())))
    first.merge([restored])
    for source, row in whole.summary().items():
        for key, value in row.items():
            assert first.summary()[source][key] == pytest.approx(value, abs=1e-6), (source, key)
    with pytest.raises(ValueError, match="other settings"):
        FaithfulnessAccumulator(replace(settings, steps=5)).load_state_dict(whole.state_dict())


def test_evaluate_maps_scores_saved_maps_as_evaluate_does(trained, tmp_path, capsys):
    """Maps saved by `evaluate`, scored by `evaluate-maps --faithfulness --checkpoint`: the
    numbers of the evaluate run that saved them; on the split without boxes too."""
    root, data, plain = trained
    test = data / "metadata" / "test"
    metrics = ["--faithfulness", "avgdrop,deletion,road,pointing", *FAST]
    assert main(common(root, data) + ["--metadata", str(test), *metrics, "--save-maps", str(tmp_path / "maps"),
                                      "--json", str(tmp_path / "evaluate.json")]) == 0
    ours = json.loads((tmp_path / "evaluate.json").read_text())
    saved = ["evaluate-maps", "-q", "--maps", str(tmp_path / "maps"), "--data", str(data / "images"),
             "--input-size", "48", "--checkpoint", str(root / "run" / "best.pt"), *metrics]
    assert main(saved + ["--metadata", str(test), "--json", str(tmp_path / "maps.json")]) == 0
    scored = json.loads((tmp_path / "maps.json").read_text())
    assert scored["oracle"] == {k: v for k, v in ours["oracle"].items() if k not in ("top1_loc", "top5_loc")}
    for source, row in ours["info"]["faithfulness"]["summary"].items():
        for key, value in row.items():
            # maps read back from float32 .npy files: the very values evaluate held
            assert scored["info"]["faithfulness"]["summary"][source][key] == pytest.approx(value, abs=1e-6), key
    no_pointing = ["--faithfulness", "avgdrop,deletion,road", *FAST]
    assert main(saved[:-len(metrics)] + no_pointing + ["--metadata", str(plain), "--results",
                                                       str(tmp_path / "plain.npz")]) == 0
    plain_result = read_results(tmp_path / "plain.npz")
    assert plain_result.kind == "none"
    assert plain_result.info["faithfulness"]["summary"]["maps"]["deletion_auc"] == pytest.approx(
        ours["info"]["faithfulness"]["summary"]["maps"]["deletion_auc"], abs=1e-6)
    capsys.readouterr()
    for extra, message in [([], "needs the model the maps explain"),
                           (["--checkpoint", str(root / "run" / "best.pt"), "--center"], "not --center")]:
        args = ["evaluate-maps", "-q", "--maps", str(tmp_path / "maps"), "--data", str(data / "images"),
                "--metadata", str(test), *metrics, *extra]
        if "--center" in extra:
            args.remove("--maps"), args.remove(str(tmp_path / "maps"))
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate-maps", "-q", "--maps", str(tmp_path / "maps"), "--metadata", str(test), "--checkpoint",
                 str(root / "run" / "best.pt")]) == 2
    assert "go with --faithfulness" in capsys.readouterr().err


def test_faithfulness_report_renders_in_a_browser(trained, tmp_path):
    """A report with faithfulness, in headless Chromium: not blank; the table's rows and the
    curves' figure are in the DOM after the page's script ran, on a box split and on one without."""
    from browser import is_blank, render, require_chromium

    require_chromium()
    root, data, plain = trained
    for metadata, name in ((data / "metadata" / "test", "boxes"), (plain, "plain")):
        assert main(common(root, data) + ["--metadata", str(metadata), "--faithfulness", "avgdrop,deletion,insertion",
                                          *FAST, "--gallery-size", "3", "--report", str(tmp_path / f"{name}.html")]) == 0
        dom = render(tmp_path / f"{name}.html", tmp_path / f"{name}.png", width=1280, height=1400)
        assert not is_blank(tmp_path / f"{name}.png"), name
        assert re.search('<figure class="plot" id="plot-faithfulness">\\s*<svg', dom), name
        table = re.search('<table id="faithfulness" class="sortable">(.*?)</table>', dom, re.S).group(1)
        assert [m for m in re.findall("<td>(maps|random|center)</td>", table)] == ["maps", "random", "center"]
