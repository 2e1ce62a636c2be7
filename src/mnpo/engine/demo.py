"""``mnpo demo``: the whole job on a CPU in a few minutes.

1. write the synthetic ``parts`` set (every class shares the body; only a small mark tells
   the class, so a classifier's map collapses onto the mark while the box is the body);
2. train a reduced-width released two-branch VGG16 on it from scratch;
3. evaluate CAM, MNPO and MNPOs on its test split, both protocols, plus PxAP on the masks;
4. write ``report.md``, ``report.json`` and ``gallery.png`` (overlays, one row per method),
   each method's results files (``results/<method>.npz``, ``results/<method>-masks.npz``) and
   the HTML reports comparing the methods (``report.html`` on boxes, ``report-masks.html``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.data.transforms import load_image
from mnpo.engine.config import config_from_dict
from mnpo.engine.evaluate import evaluate_model, protocol_overlay
from mnpo.engine.views import resize_for
from mnpo.engine.evaluate_maps import build_report
from mnpo.engine.overlay import save_gallery
from mnpo.engine.report import write_report
from mnpo.engine.results import EvaluationResults, read_results, write_results
from mnpo.engine.train import Trainer
from mnpo.io import atomic_path, write_json_atomic
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import load_model

log = logging.getLogger(__name__)

DEMO_METHODS = ("cam", "mnpo", "mnpos")


@dataclass(frozen=True)
class DemoSettings:
    image_size: int = 64
    classes: int = 4
    train_per_class: int = 100
    val_per_class: int = 5
    test_per_class: int = 15
    width: float = 0.125
    epochs: int = 30
    batch_size: int = 16
    lr: float = 0.02
    seed: int = 0
    gallery_images: int = 6


def _train_config(data: Path, out: Path, s: DemoSettings) -> dict[str, Any]:
    return {
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": resize_for(s.image_size), "crop_size": s.image_size},
        "model": {"layout": "vgg16-mnpo", "width": s.width, "pretrained": None},
        "optim": {"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr, "new_layer_lr_ratio": 1.0,
                  "lr_milestones": [max(1, s.epochs * 3 // 4)]},
        "eval": {"method": "mnpo", "metric": "top1_cls", "batch_size": 32},
        "runtime": {"out": str(out), "device": "cpu", "channels_last": False, "seed": s.seed},
    }


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out``; returns the report dict (also written as JSON)."""
    out = Path(out)
    start = time.perf_counter()
    data = out / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=settings.seed, image_size=settings.image_size,
                            num_classes=settings.classes, train_per_class=settings.train_per_class,
                            val_per_class=settings.val_per_class, test_per_class=settings.test_per_class)
    cfg = config_from_dict(_train_config(data, out / "run", settings), source="demo")
    Trainer(cfg, progress=progress).fit()
    model, _ = load_model(out / "run" / "best.pt")
    thresholds = cam_thresholds(0.01)
    kwargs = dict(crop_size=settings.image_size, resize_size=resize_for(settings.image_size), uint8_views=True)
    splits = {
        "val": WSOLDataset(data / "images", data / "metadata" / "val", "evaluate", **kwargs),
        "test": WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", **kwargs),
        "test_masks": WSOLDataset(data / "images", data / "metadata-masks" / "test", "evaluate",
                                  mask_root=data / "masks", **kwargs),
    }
    shown = list(splits["test"].image_ids[:: max(1, len(splits["test"]) // settings.gallery_images)])
    shown = shown[: settings.gallery_images]
    results: dict[str, Any] = {}
    html_results: dict[str, list[Path]] = {}
    gallery_maps: dict[str, dict[str, np.ndarray]] = {}
    for method in DEMO_METHODS:
        kept: dict[str, np.ndarray] = {}

        def keep(batch, maps, kept=kept):
            for image_id, m in zip(batch["image_id"], maps):
                if image_id in shown:
                    kept[image_id] = m

        runs = {name: evaluate_model(model, ds, thresholds=thresholds, method=method, batch_size=32,
                                     on_batch=keep if name == "test" else None, details=name != "val")
                for name, ds in splits.items()}
        for kind, path in _write_results(out, method, runs, splits, model.num_classes).items():
            html_results.setdefault(kind, []).append(path)
        report = build_report(runs["test"].curves, runs["val"].curves, {})
        pxap = build_report(runs["test_masks"].curves, None, {}).oracle["pxap"].value
        results[method] = {
            "top1_cls": runs["test"].classification["top1_cls"],
            "oracle": {k: m.to_json() for k, m in report.oracle.items()},
            "calibrated": {k: m.to_json() for k, m in report.calibrated.items()},
            "pxap": pxap,
        }
        gallery_maps[method] = kept
    method_gallery(out / "gallery.png", data / "images", splits["test"], shown, gallery_maps,
                   {m: results[m]["calibrated"]["max_box_acc"]["threshold"] for m in gallery_maps})
    for kind, name in (("box", "report.html"), ("mask", "report-masks.html")):
        write_report([read_results(p) for p in html_results[kind]], out / name,
                     [str(p) for p in html_results[kind]])
    seconds = time.perf_counter() - start
    summary = {"settings": settings.__dict__, "epochs_trained": settings.epochs,
               "checkpoint": str(out / "run" / "best.pt"), "methods": results, "seconds": round(seconds, 1)}
    write_json_atomic(out / "report.json", summary)
    table = demo_table(results)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(f"# mnpo demo\n\nSynthetic 'parts' set, {settings.image_size} px, {settings.classes} "
                       f"classes; released two-branch VGG16 at width {settings.width}, {settings.epochs} epochs "
                       f"from scratch on the CPU ({seconds:.0f} s in all).\n\n{table}\n\n![gallery](gallery.png)\n")
    return summary


def _write_results(out: Path, method: str, runs: dict, splits: dict[str, WSOLDataset],
                   num_classes: int) -> dict[str, Path]:
    """One method's results files: ``results/<method>.npz`` (boxes, calibrated on val) and
    ``results/<method>-masks.npz`` (masks, oracle only: the demo has no val masks)."""
    info = {"method": method, "checkpoint": str(out / "run" / "best.pt"),
            "classification": runs["test"].classification}
    box = EvaluationResults.build(method, runs["test"].curves, runs["val"].curves, runs["test"].details,
                                  splits["test"].meta, splits["val"].meta, num_classes,
                                  {**info, "metadata": "parts/metadata/test", "val_metadata": "parts/metadata/val"})
    mask = EvaluationResults.build(method, runs["test_masks"].curves, None, runs["test_masks"].details,
                                   splits["test_masks"].meta, None, num_classes,
                                   {**info, "metadata": "parts/metadata-masks/test"})
    return {"box": write_results(out / "results" / f"{method}.npz", box),
            "mask": write_results(out / "results" / f"{method}-masks.npz", mask)}


def demo_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per method."""
    lines = ["| method | top-1 cls | MaxBoxAcc (oracle) | MaxBoxAcc (calibrated) | MaxBoxAccV2 (calibrated) "
             "| GT-known Loc (calibrated) | PxAP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        o, c = r["oracle"], r["calibrated"]
        lines.append(f"| {method} | {r['top1_cls']:.1f} | {o['max_box_acc']['value']:.1f} | "
                     f"{c['max_box_acc']['value']:.1f} | {c['max_box_acc_v2']['value']:.1f} | "
                     f"{c['gt_known_loc']['value']:.1f} | {r['pxap']:.1f} |")
    return "\n".join(lines)


def method_gallery(path: Path, image_root: Path, dataset: WSOLDataset, shown: list[str],
                   maps: dict[str, dict[str, np.ndarray]], thresholds: dict[str, float]) -> Path:
    """One PNG of overlays: a row per entry of ``maps`` (label -> image id -> 224x224 map), a
    column per image id in ``shown``; each tile has its row's box at ``thresholds[label]``
    (see :func:`~mnpo.engine.evaluate.protocol_overlay`) and the caption ``label t=...``."""
    tiles, captions = [], []
    for label, kept in maps.items():
        missing = [i for i in shown if i not in kept]
        if missing:
            raise KeyError(f"method_gallery: no {label!r} map for {missing}")
        for image_id in shown:
            image = load_image(image_root / image_id)
            tiles.append(protocol_overlay(image, kept[image_id], thresholds[label], dataset.meta, image_id))
            captions.append(f"{label} t={thresholds[label]:.2f}")
    return save_gallery(tiles, path, columns=len(shown), captions=captions)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print(demo_table(summary["methods"]))
    print(f"\nreport: {out / 'report.md'}, gallery: {out / 'gallery.png'} ({summary['seconds']:.0f} s)")
