"""``mnpo report``: one self-contained HTML page from one or more evaluation results.

Every result must be of the same split, evaluated on the same threshold grid under the same
protocols (see :func:`check_comparable`). The page holds, with no external resource (plots are
inline SVG, galleries inline JPEG; it opens offline):

* a summary table, one row per result: classification and every metric under both protocols;
* box splits: accuracy against the score-map threshold (MaxBoxAcc's largest contour at IoU 50,
  and MaxBoxAccV2's all-contour curves at IoU 30 / 50 / 70), one line per result, each line's
  oracle threshold marked with a dot and its calibrated one (chosen on val) with a cross;
  mask splits: the pixel precision-recall curve of each result, PxAP in the legend;
* per-class accuracy (GT-known Loc at the calibrated MaxBoxAcc threshold, or the oracle one
  without val; mean per-image PxAP for masks), as a sorted plot and a sortable table;
* the distribution of per-image IoU (masks: per-image PxAP);
* with ``--faithfulness``: a table of every faithfulness metric of each result's maps and of its
  random and center baselines, and the mean deletion / insertion curves (one colour per result,
  its baselines dashed and dotted); a split without localization labels has only these;
* galleries from the sample each result keeps: the best and worst images (mean over results)
  and, with several results, those where the results disagree most; each image beside each
  result's map, its box at the chosen threshold (green) and the ground truth (red).

Plots are drawn with matplotlib's object API (no pyplot state). Nothing here depends on the
number of images beyond linear passes, so a 50,000-image ILSVRC result makes the same page.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from mnpo.engine.results import THUMBNAIL, EvaluationResults, read_results
from mnpo.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["ReportError", "build_html", "check_comparable", "write_report", "report_from_files"]

METRIC_NAMES = {"max_box_acc": "MaxBoxAcc", "max_box_acc_v2": "MaxBoxAccV2", "gt_known_loc": "GT-known Loc",
                "top1_loc": "Top-1 Loc", "top5_loc": "Top-5 Loc", "pxap": "PxAP"}
EVAL_SIZE = 224


class ReportError(ValueError):
    """Results that cannot share one report; the message names the files."""


def check_comparable(results: Sequence[EvaluationResults], sources: Sequence[str]) -> None:
    """Raise :class:`ReportError` unless every result is of the first one's split, protocols and
    threshold grid. ``sources``: a name per result (its file) for the message."""
    if not results:
        raise ReportError("a report needs at least one result")
    first, where = results[0], sources[0]
    for r, src in zip(results[1:], sources[1:]):
        if r.kind != first.kind:
            raise ReportError(f"{src} is a {r.kind} result but {where} is a {first.kind} result; "
                              "a report compares results of one split")
        if r.split["digest"] != first.split["digest"]:
            raise ReportError(f"{src} is of another split than {where} ({r.split['metadata']}, "
                              f"{r.split['num_images']} images vs {first.split['metadata']}, "
                              f"{first.split['num_images']} images); a report compares results of one split")
        if r.calibrated != first.calibrated:
            has, lacks = (src, where) if r.calibrated else (where, src)
            raise ReportError(f"{has} has the calibrated protocol but {lacks} does not (no val split); "
                              "evaluate both with --val-metadata, or neither")
        if r.calibrated and r.val_split["digest"] != first.val_split["digest"]:
            raise ReportError(f"{src} was calibrated on another val split than {where} "
                              f"({r.val_split['metadata']} vs {first.val_split['metadata']})")
        if not np.array_equal(r.thresholds, first.thresholds):
            raise ReportError(f"{src} and {where} were evaluated on different threshold grids "
                              f"({len(r.thresholds)} vs {len(first.thresholds)} thresholds)")


def _labels(results: Sequence[EvaluationResults], sources: Sequence[str]) -> list[str]:
    """Each result's label, made unique by its source where two are equal."""
    labels = [r.label for r in results]
    return [f"{lab} ({Path(src).name})" if labels.count(lab) > 1 else lab for lab, src in zip(labels, sources)]


def _protocol(r: EvaluationResults) -> str:
    return "calibrated" if r.calibrated else "oracle"


def _per_image_score(r: EvaluationResults) -> np.ndarray:
    """float64 (N,): IoU at the chosen MaxBoxAcc threshold (box) or own PxAP (mask, percent)."""
    return r.per_image[f"iou_{_protocol(r)}"] if r.kind == "box" else r.per_image["pxap"]


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _jpeg(fig, dpi: int = 100) -> str:
    """The figure as base64 JPEG (photos and heat maps: about 6x smaller than PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", dpi=dpi, bbox_inches="tight", pil_kwargs={"quality": 85})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _curves_plot(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    if results[0].kind == "mask":
        return _pr_plot(results, labels)
    first = results[0]
    panels = [("MaxBoxAcc (largest contour, IoU 50)", lambda c: c.accuracy(c.largest))]
    panels += [(f"MaxBoxAccV2 part: all contours, IoU {iou}", lambda c, i=i: c.accuracy(c.multi[i]))
               for i, iou in enumerate(first.test.iou_thresholds)]
    fig = _figure(4.2 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    t = first.thresholds
    for ax, (title, curve_of) in zip(axes, panels):
        for k, (r, label) in enumerate(zip(results, labels)):
            color = f"C{k % 10}"
            acc = curve_of(r.test)
            ax.plot(t, acc, color=color, label=label, linewidth=1.4)
            best = int(np.argmax(acc))
            ax.plot(t[best], acc[best], "o", color=color, markersize=6)
            if r.val is not None:
                chosen = int(np.argmax(curve_of(r.val)))
                ax.plot(t[chosen], acc[chosen], "x", color=color, markersize=9, markeredgewidth=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("score-map threshold")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("box accuracy (%)")
    axes[0].legend(fontsize=8, title="o oracle, x calibrated", title_fontsize=8)
    return _svg(fig)


def _pr_plot(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    from mnpo.metrics.localization import precision_recall

    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    for k, (r, label) in enumerate(zip(results, labels)):
        precision, recall = precision_recall(r.test.positive, r.test.negative)
        ax.plot(recall, precision, color=f"C{k % 10}", label=f"{label} (PxAP {r.test.pxap:.1f})")
    ax.set_xlabel("pixel recall")
    ax.set_ylabel("pixel precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _per_class(r: EvaluationResults) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: images, localization score (percent; NaN for a class with no image), top-1 cls."""
    k = max(r.num_classes, int(r.labels.max()) + 1 if len(r.labels) else 0)
    count = np.bincount(r.labels, minlength=k).astype(np.float64)
    score = _per_image_score(r)
    if r.kind == "box":
        hits = np.bincount(r.labels, weights=(score >= 0.5).astype(np.float64), minlength=k)
        denominator = count
    else:
        valid = ~np.isnan(score)
        hits = np.bincount(r.labels[valid], weights=score[valid], minlength=k) / 100
        denominator = np.bincount(r.labels[valid], minlength=k).astype(np.float64)
    cls = np.bincount(r.labels, weights=(r.top5[:, 0] == r.labels).astype(np.float64), minlength=k)
    if len(r.top5) and (r.top5[:, 0] < 0).all():  # saved maps without class scores: no classification
        cls = np.full(k, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, 100 * hits / denominator, 100 * cls / count


def _per_class_plot(per_class: Sequence[tuple], labels: Sequence[str], kind: str) -> str:
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    for k, ((_, score, _), label) in enumerate(zip(per_class, labels)):
        ordered = np.sort(score[~np.isnan(score)])[::-1]
        ax.plot(np.arange(1, len(ordered) + 1), ordered, color=f"C{k % 10}", label=label)
    ax.set_xlabel("classes, best first")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("GT-known Loc (%)" if kind == "box" else "mean per-image PxAP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _distribution_plot(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    box = results[0].kind == "box"
    edges = np.linspace(0, 1, 21) if box else np.linspace(0, 100, 21)
    for k, (r, label) in enumerate(zip(results, labels)):
        score = _per_image_score(r)
        score = score[~np.isnan(score)]
        counts, _ = np.histogram(score, bins=edges)
        ax.stairs(100 * counts / max(len(score), 1), edges, color=f"C{k % 10}", label=label, linewidth=1.5)
    if box:
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("IoU of the largest-contour box at the chosen threshold" if box else "per-image PxAP (%)")
    ax.set_ylabel("images (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _gallery_choice(results: Sequence[EvaluationResults], rows: int) -> dict[str, list[str]]:
    """Gallery ids common to every result: best and worst (mean score) and most disagreeing
    (largest range over the results; only with several results)."""
    common = [i for i in results[0].gallery_ids if all(i in r.gallery_ids for r in results[1:])]
    if not common:
        return {}
    scores = []
    for r in results:
        index = {i: k for k, i in enumerate(r.image_ids)}
        s = _per_image_score(r)
        scores.append([s[index[i]] if i in index else np.nan for i in common])
    scores = np.nan_to_num(np.array(scores, np.float64), nan=-1.0)  # (R, G)
    mean = scores.mean(axis=0)
    order = np.argsort(-mean, kind="stable")
    chosen = {"best": [common[k] for k in order[:rows]],
              "worst": [common[k] for k in order[::-1][:rows]]}
    if len(results) > 1:
        spread = scores.max(axis=0) - scores.min(axis=0)
        chosen["disagreement"] = [common[k] for k in np.argsort(-spread, kind="stable")[:rows]]
    return chosen


def _gallery_plot(results: Sequence[EvaluationResults], labels: Sequence[str], ids: Sequence[str]) -> str:
    from matplotlib.patches import Rectangle

    columns = 1 + len(results)
    fig = _figure(1.9 * columns, 2.05 * len(ids))
    axes = np.array(fig.subplots(len(ids), columns, squeeze=False))
    scale = THUMBNAIL / EVAL_SIZE
    first = results[0]

    def draw_box(ax, box, color):
        if box is not None and box[0] >= 0:
            x0, y0, x1, y1 = np.asarray(box, np.float64) * scale
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.6))

    for row, image_id in enumerate(ids):
        label_of = int(first.labels[first.image_ids.index(image_id)])
        for col in range(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            r = first if col == 0 else results[col - 1]
            g = r.gallery_ids.index(image_id)
            ax.imshow(r.gallery_image[g])
            if col > 0:
                ax.imshow(r.gallery_map[g], cmap="jet", alpha=0.45, vmin=0, vmax=255)
            if r.kind == "box":
                for gt in r.gallery_gt[g]:
                    draw_box(ax, gt, "red")
            else:
                ax.contour(r.gallery_gt[g] == 1, levels=[0.5], colors="red", linewidths=1.2)
            if col == 0:
                name = image_id if len(image_id) <= 22 else "..." + image_id[-19:]
                ax.set_title(f"{name}\nclass {label_of}", fontsize=7)
                continue
            n = r.image_ids.index(image_id)
            score = _per_image_score(r)[n]
            if r.kind == "box":
                draw_box(ax, r.gallery_boxes[_protocol(r)][g], "lime")
                text = f"IoU {score:.2f}"
            else:
                text = "PxAP -" if np.isnan(score) else f"PxAP {score:.0f}"
            predicted = "-" if r.top5[n, 0] < 0 else int(r.top5[n, 0])
            ax.set_title(f"{labels[col - 1]}\n{text}, pred {predicted}", fontsize=7)
    return _jpeg(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, sortable: bool = False) -> str:
    cls = ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    """One row per result; the metrics under a header row per protocol."""
    protocols = ["oracle"] + (["calibrated"] if results[0].calibrated else [])
    names = [n for n in METRIC_NAMES if n in results[0].metrics()["oracle"]]
    fixed = ["result", "method", "checkpoint", "top-1 cls", "top-5 cls"]
    top = "".join(f'<th rowspan="2">{h}</th>' for h in fixed)
    top += "".join(f'<th colspan="{len(names)}">{p}</th>' for p in protocols)
    second = "".join(f"<th>{METRIC_NAMES[n]}</th>" for _ in protocols for n in names)
    rows = []
    for r, label in zip(results, labels):
        metrics = r.metrics()
        cls = r.info.get("classification") or {}
        cells = [html.escape(label), html.escape(str(r.info.get("method", "-"))),
                 html.escape(Path(str(r.info.get("checkpoint", "-"))).name),
                 f"{cls['top1_cls']:.2f}" if "top1_cls" in cls else "-",
                 f"{cls['top5_cls']:.2f}" if "top5_cls" in cls else "-"]
        for p in protocols:
            for n in names:
                m = metrics[p].get(n)
                if m is None:
                    cells.append("-")
                    continue
                t = m.threshold
                shown = "none" if t is None else (", ".join(f"{x:.2f}" for x in t) if isinstance(t, tuple)
                                                  else f"{t:.2f}")
                cells.append(f'<span title="threshold {shown}">{m.value:.2f}</span>')
        rows.append(f'<tr class="result" data-label="{html.escape(label, quote=True)}">'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<div class="wide"><table id="summary"><thead><tr>{top}</tr><tr>{second}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _per_class_table(per_class: Sequence[tuple], labels: Sequence[str], kind: str) -> str:
    name = "GT-known Loc" if kind == "box" else "PxAP"
    header = ["class", "images"] + [f"{name}: {lab}" for lab in labels] + [f"top-1 cls: {lab}" for lab in labels]
    count = per_class[0][0]
    rows = []
    for c in np.flatnonzero(count > 0):
        cells = [str(c), str(int(count[c]))]
        cells += ["-" if np.isnan(p[1][c]) else f"{p[1][c]:.1f}" for p in per_class]
        cells += ["-" if np.isnan(p[2][c]) else f"{p[2][c]:.1f}" for p in per_class]
        rows.append(cells)
    return _table(header, rows, "per-class", sortable=True)


def _faithfulness_table(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    """One row per result and map source (its maps, then its baselines): every faithfulness
    value the results hold; "-" where a result did not compute it."""
    from mnpo.engine.faithfulness import SUMMARY_NAMES

    summaries = [(r.info.get("faithfulness") or {}).get("summary") or {} for r in results]
    keys = [k for k in SUMMARY_NAMES if any(k in row for summary in summaries for row in summary.values())]
    header = ["result", "maps", "images"] + [SUMMARY_NAMES[k][1] + (" \u2191" if SUMMARY_NAMES[k][2] else " \u2193")
                                             for k in keys]
    rows = []
    for summary, label in zip(summaries, labels):
        for source, row in summary.items():
            cells = [html.escape(label), html.escape(source), str(row.get("num_images", "-"))]
            cells += ["-" if k not in row else f"{row[k]:.4f}" for k in keys]
            rows.append(cells)
    return _table(header, rows, "faithfulness", sortable=True)


def _faithfulness_plot(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    """Mean deletion and insertion curves: probability of the target against the fraction of
    pixels changed; each result's maps solid, its random baseline dashed, center dotted."""
    fig = _figure(10, 3.6)
    styles = {"maps": "-", "random": "--", "center": ":"}
    for k, mode in enumerate(("deletion", "insertion")):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, (r, label) in enumerate(zip(results, labels)):
            curves = ((r.info.get("faithfulness") or {}).get("curves") or {}).get(mode)
            if not curves:
                continue
            summary = r.info["faithfulness"]["summary"]
            for source, style in styles.items():
                if source in curves:
                    area = summary[source].get(f"{mode}_auc", float("nan"))
                    ax.plot(curves["fractions"], curves[source], style, color=f"C{i % 10}", linewidth=1.2,
                            label=f"{label}: {source} (AUC {area:.3f})")
        ax.set_title(f"{mode} ({'lower' if mode == 'deletion' else 'higher'} is better)", fontsize=9)
        ax.set_xlabel("fraction of pixels " + ("removed" if mode == "deletion" else "revealed"))
        ax.set_ylabel("probability of the class")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _svg(fig)


def _faithfulness(results: Sequence[EvaluationResults], labels: Sequence[str]) -> list[str]:
    """The faithfulness section (empty when no result computed it)."""
    if not any(r.info.get("faithfulness") for r in results):
        return []
    notes = []
    for r, label in zip(results, labels):
        f = r.info.get("faithfulness")
        if f:
            st = f["settings"]
            notes.append(f"{html.escape(label)}: {', '.join(st['metrics'])}; {st['steps']} deletion/insertion steps, "
                         f"ROAD at {st['road_percentiles']} percent, noise {st['road_noise']}; forwards per image "
                         + html.escape(str(f.get("forwards_per_image"))))
    out = ["<h2>Faithfulness</h2>",
           '<p class="note">Does the map show what the classifier used? Probabilities of the ground-truth class '
           "after perturbing the image by the map (Average Drop, Deletion, Insertion, ROAD) and, with boxes or "
           "masks, the pointing game. Each result's random-map and center-map baselines give the scale: a "
           "map is informative only where it beats both. Arrows: the better direction.</p>",
           f'<div class="wide">{_faithfulness_table(results, labels)}</div>',
           f'<p class="note">{"<br>".join(notes)}</p>']
    if any(((r.info.get("faithfulness") or {}).get("curves")) for r in results):
        out.append(f'<figure class="plot" id="plot-faithfulness">{_faithfulness_plot(results, labels)}</figure>')
    return out


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; } .wide { overflow-x: auto; } th[colspan] { text-align: center; }
.scroll { max-height: 480px; overflow-y: auto; display: inline-block; }
figure { margin: 8px 0; } figure svg { max-width: 100%; height: auto; } .note { color: #666; font-size: 0.85em; }
"""

# Clicking a header of a sortable table sorts its rows by that column (numbers as numbers,
# "-" last); clicking again reverses.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var dir = th.dataset.dir === "desc" ? 1 : -1; th.dataset.dir = dir === 1 ? "asc" : "desc";
      var key = function (r) { var v = parseFloat(r.cells[col].textContent); return isNaN(v) ? -Infinity : v; };
      rows.sort(function (a, b) { return dir * (key(a) - key(b)); });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _unreadable(results: Sequence[EvaluationResults], labels: Sequence[str]) -> str:
    """A note per result that counted unreadable images as misses (``--skip-unreadable``),
    listing each image and why; empty when every image was read."""
    notes = []
    for r, label in zip(results, labels):
        items = list(r.info.get("unreadable_images") or [])
        if not items:
            continue
        rows = "".join(f"<li><code>{html.escape(str(u['image_id']))}</code>: {html.escape(str(u['reason']))}</li>"
                       for u in items)
        notes.append(f'<p class="note unreadable">{html.escape(label)}: {len(items)} image(s) could not be read '
                     f"and count as misses in every metric (IoU 0, wrong class; PxAP: a map of zeros):</p>"
                     f'<ul class="unreadable">{rows}</ul>')
    return "\n".join(notes)


def build_html(results: Sequence[EvaluationResults], sources: Sequence[str] | None = None,
               gallery_rows: int = 6) -> str:
    """The report page as one HTML string (see the module docstring)."""
    sources = list(sources) if sources is not None else [r.label for r in results]
    check_comparable(results, sources)
    labels = _labels(results, sources)
    first = results[0]
    split = first.split
    protocol = _protocol(first)
    sections = [
        f"<h1>mnpo report: {html.escape(', '.join(labels))}</h1>",
        f'<p class="note">Split <code>{html.escape(str(split["metadata"]))}</code>: {split["num_images"]} images '
        f"({first.kind} annotations), {len(first.thresholds)} score-map thresholds. Oracle: thresholds chosen on "
        "the evaluated split itself (the MNPO paper's protocol). Calibrated: chosen on val, applied here "
        "(wsolevaluation's protocol)" + ("" if first.calibrated else ": not computed, no val split") + ".</p>",
        "<h2>Summary</h2>", _summary(results, labels),
        '<p class="note">Percent. Hover a value for the threshold(s) it was read at.</p>',
    ]
    unreadable = _unreadable(results, labels)
    if unreadable:
        sections += ["<h2>Unreadable images</h2>", unreadable]
    sections += _faithfulness(results, labels)
    if first.kind == "none":
        sections.append('<p class="note">The split has classification labels only (no localization.txt): '
                        "no box or mask metric, no per-class localization, no gallery.</p>")
        body = "\n".join(sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mnpo report</title>'
                f"<style>{_STYLE}</style></head><body>\n{body}\n<script>{_SCRIPT}</script></body></html>\n")
    per_class = [_per_class(r) for r in results]
    if first.kind == "box":
        sections += ["<h2>Box accuracy against the threshold</h2>",
                     f'<figure class="plot" id="plot-curves">{_curves_plot(results, labels)}</figure>']
    else:
        sections += ["<h2>Pixel precision-recall</h2>",
                     f'<figure class="plot" id="plot-curves">{_curves_plot(results, labels)}</figure>']
    per_class_title = f"Per class ({protocol} MaxBoxAcc threshold)" if first.kind == "box" else "Per class"
    sections += [f"<h2>{per_class_title}</h2>",
                 f'<figure class="plot" id="plot-per-class">{_per_class_plot(per_class, labels, first.kind)}</figure>',
                 '<p class="note">Click a column header to sort.</p>',
                 f'<div class="scroll">{_per_class_table(per_class, labels, first.kind)}</div>',
                 "<h2>Per-image " + ("IoU" if first.kind == "box" else "PxAP") + " distribution</h2>",
                 f'<figure class="plot" id="plot-distribution">{_distribution_plot(results, labels)}</figure>']
    chosen = _gallery_choice(results, gallery_rows)
    sampled = len(first.gallery_ids)
    sections.append("<h2>Gallery</h2>")
    if not chosen:
        sections.append('<p class="note">No gallery: the results share no sampled image.</p>')
    else:
        shown = (f"green: the largest-contour box at the {protocol} MaxBoxAcc threshold" if first.kind == "box"
                 else "the outline is the ground-truth mask; each image is ranked by its own PxAP")
        sections.append(f'<p class="note">From a fixed sample of {sampled} of the {split["num_images"]} images, '
                        f"the same for every result. Red: ground truth; {shown}; pred: the top-1 class.</p>")
    for name, ids in chosen.items():
        title = {"best": "Best", "worst": "Worst", "disagreement": "Where the results disagree most"}[name]
        image = _gallery_plot(results, labels, ids)
        sections.append(f'<h3>{title}</h3><figure class="plot gallery" id="gallery-{name}">'
                        f'<img alt="{name} images" src="data:image/jpeg;base64,{image}"></figure>')
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mnpo report</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n<script>{_SCRIPT}</script></body></html>\n")


def write_report(results: Sequence[EvaluationResults], out: str | Path, sources: Sequence[str] | None = None,
                 gallery_rows: int = 6) -> Path:
    """Write :func:`build_html`'s page to ``out`` (atomically)."""
    page = build_html(results, sources, gallery_rows)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def report_from_files(paths: Sequence[str | Path], out: str | Path, gallery_rows: int = 6) -> Path:
    """The ``mnpo report`` job: read each results file, check they compare, write the page."""
    results = [read_results(p) for p in paths]
    return write_report(results, out, [str(p) for p in paths], gallery_rows)
