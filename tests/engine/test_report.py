"""``mnpo report``: what the page holds, the per-class and gallery numbers against naive
counts, results that cannot be compared, and the size at ILSVRC's scale.

The demo's report rendered in a real browser is in tests/engine/test_commands.py."""

import dataclasses
import re

import numpy as np
import pytest

from mnpo.cli import main
from mnpo.engine.report import ReportError, _gallery_choice, _per_class, build_html, check_comparable
from mnpo.engine.results import write_results

from benchmarks.test_scripts import script_module

synthetic_results = script_module("bench_report").synthetic_results


def _pair(images=40, classes=4):
    return (synthetic_results("cam", images, classes, 10, seed=0),
            synthetic_results("mnpo", images, classes, 10, seed=1))


def test_page_holds_every_result_every_plot_and_the_sortable_table():
    a, b = _pair()
    page = build_html([a, b], ["a.npz", "b.npz"])
    rows = re.findall(r'<tr class="result" data-label="([^"]+)">', page)
    assert rows == ["cam", "mnpo"]
    for figure in ("plot-curves", "plot-per-class", "plot-distribution", "gallery-best", "gallery-worst",
                   "gallery-disagreement"):
        assert f'id="{figure}"' in page, figure
    assert page.count("<svg") == 3 and page.count("data:image/jpeg;base64,") == 3
    assert '<table id="per-class" class="sortable">' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch: opens offline
    # the summary shows each metric as the results compute it
    value = a.metrics()["calibrated"]["max_box_acc_v2"].value
    assert f">{value:.2f}</span>" in page


def test_one_result_has_no_disagreement_gallery():
    page = build_html([_pair()[0]])
    assert 'id="gallery-best"' in page and 'id="gallery-disagreement"' not in page


def test_per_class_numbers_equal_a_naive_count():
    r = _pair(images=60, classes=5)[0]
    count, score, cls = _per_class(r)
    iou = r.per_image["iou_calibrated"]
    for c in range(5):
        members = [k for k in range(len(r.image_ids)) if r.labels[k] == c]
        assert count[c] == len(members)
        assert score[c] == pytest.approx(100 * sum(iou[k] >= 0.5 for k in members) / len(members), abs=1e-12)
        assert cls[c] == pytest.approx(100 * sum(r.top5[k, 0] == c for k in members) / len(members), abs=1e-12)


def test_gallery_picks_best_worst_and_disagreement_from_the_per_image_scores():
    a, b = _pair()
    ids = a.gallery_ids
    index = [a.image_ids.index(i) for i in ids]
    iou_a, iou_b = np.full(len(a.image_ids), 0.5), np.full(len(a.image_ids), 0.5)
    iou_a[index[3]], iou_b[index[3]] = 0.9, 0.95   # best on both
    iou_a[index[7]], iou_b[index[7]] = 0.05, 0.0   # worst on both
    iou_a[index[1]], iou_b[index[1]] = 1.0, 0.0    # the most disputed
    a = dataclasses.replace(a, per_image={**a.per_image, "iou_calibrated": iou_a})
    b = dataclasses.replace(b, per_image={**b.per_image, "iou_calibrated": iou_b})
    chosen = _gallery_choice([a, b], rows=1)
    assert chosen == {"best": [ids[3]], "worst": [ids[7]], "disagreement": [ids[1]]}


def _mismatch(a, b, **change):
    return dataclasses.replace(b, **change)


@pytest.mark.parametrize("change, message", [
    (lambda b: {"split": {**b.split, "digest": "x", "metadata": "OpenImages/test"}},
     r"b.npz is of another split than a.npz \(OpenImages/test, 40 images vs ILSVRC/val, 40 images\)"),
    (lambda b: {"kind": "mask"}, "b.npz is a mask result but a.npz is a box result"),
    (lambda b: {"val": None, "val_split": None},
     r"a.npz has the calibrated protocol but b.npz does not \(no val split\)"),
    (lambda b: {"val_split": {**b.val_split, "digest": "y", "metadata": "other-val"}},
     r"b.npz was calibrated on another val split than a.npz \(other-val vs ILSVRC/val-calibration\)"),
    (lambda b: {"thresholds": b.thresholds + 0.001}, "b.npz and a.npz were evaluated on different threshold grids"),
])
def test_results_that_cannot_share_a_report_are_refused_by_name(change, message):
    a, b = _pair()
    with pytest.raises(ReportError, match=message):
        check_comparable([a, dataclasses.replace(b, **change(b))], ["a.npz", "b.npz"])


def test_equal_labels_are_told_apart_by_their_files():
    a, b = _pair()
    page = build_html([a, dataclasses.replace(b, label="cam")], ["runs/a.npz", "runs/b.npz"])
    assert re.findall(r'data-label="([^"]+)"', page) == ["cam (a.npz)", "cam (b.npz)"]


def test_report_command_and_its_errors(tmp_path, capsys):
    a, b = _pair()
    paths = [str(write_results(tmp_path / f"{r.label}.npz", r)) for r in (a, b)]
    assert main(["report", *paths, "--out", str(tmp_path / "r.html")]) == 0
    assert "from 2 result(s)" in capsys.readouterr().out and (tmp_path / "r.html").is_file()
    other = write_results(tmp_path / "other.npz", dataclasses.replace(b, split={**b.split, "digest": "z"}))
    assert main(["report", paths[0], str(other), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "mnpo report: error:" in err and "other.npz is of another split than" in err
    assert main(["report", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "x.html")]) == 2
    assert "nope.npz: results file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_ilsvrc_scale_report_stays_small(tmp_path):
    """50,000 images, 1,000 classes, two results: the page is far under 20 MB (it grows with the
    classes' table, not with the images: galleries sample, curves are per threshold)."""
    results = [synthetic_results(f"m{k}", 50_000, 1000, 128, seed=k) for k in range(2)]
    page = build_html(results, ["a.npz", "b.npz"])
    assert len(page.encode()) < 20e6
    per_class = page[page.index('<table id="per-class"'):]
    body = per_class[per_class.index("<tbody>"):per_class.index("</tbody>")]
    assert body.count("<tr>") == 1000  # a row per class
