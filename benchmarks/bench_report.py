"""Size and build time of ``mnpo report`` at ILSVRC's scale, from saved results.

Fabricates results of a split of ``--images`` images and ``--classes`` classes (ILSVRC val:
50,000 and 1,000), one per method, each with its gallery sample of ``--gallery`` noise
thumbnails (noise is the worst case for compression), writes them as results files, then
times reading them back and building the page, and prints the sizes.

    python benchmarks/bench_report.py [--images 50000] [--classes 1000] [--results 3]

The curves and per-image values are random but consistent with each other in shape; only
size and time are measured here (the content is tested in tests/engine/test_report.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from machine_info import cpu_cores, cpu_name
from mnpo.engine.report import report_from_files
from mnpo.engine.results import THUMBNAIL, EvaluationResults, read_results, split_digest, write_results
from mnpo.metrics.boxes import cam_thresholds
from mnpo.metrics.localization import BoxCurves


def synthetic_results(label: str, images: int, classes: int, gallery: int, seed: int,
                      calibrated: bool = True) -> EvaluationResults:
    """A box-split result of the given size (random values of the right shapes and ranges)."""
    rng = np.random.default_rng(seed)
    thresholds = cam_thresholds(0.01)
    ids = tuple(f"val/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(images))
    labels = np.arange(images, dtype=np.int64) % classes
    bump = np.exp(-((thresholds - rng.uniform(0.2, 0.5)) / 0.15) ** 2)

    def curves(n):
        largest = np.round(n * 0.6 * bump).astype(np.int64)
        multi = np.stack([np.round(n * f * bump).astype(np.int64) for f in (0.8, 0.6, 0.3)])
        return BoxCurves(thresholds, n, largest, multi, (30, 50, 70), largest // 2, (largest * 3) // 4)

    iou = rng.uniform(0, 1, images)
    top5 = np.stack([(labels + k * rng.integers(0, 2, images)) % classes for k in range(5)], 1)
    chosen = ids[:gallery]
    g = len(chosen)
    boxes = np.sort(rng.integers(0, 224, (g, 4)).reshape(g, 2, 2), axis=1).transpose(0, 2, 1).reshape(g, 4)
    return EvaluationResults(
        label=label, kind="box", split={"metadata": "ILSVRC/val", "num_images": images,
                                        "digest": split_digest(ids, dict(zip(ids, labels.tolist())))},
        val_split={"metadata": "ILSVRC/val-calibration", "num_images": 10 * classes, "digest": "v"}
        if calibrated else None,
        num_classes=classes, info={"method": label, "classification": {"top1_cls": 70.0, "top5_cls": 90.0}},
        thresholds=thresholds, test=curves(images), val=curves(10 * classes) if calibrated else None,
        image_ids=ids, labels=labels, top5=top5,
        per_image={"iou_oracle": iou, "iou_calibrated": np.clip(iou + rng.normal(0, 0.05, images), 0, 1)},
        gallery_ids=chosen,
        gallery_image=rng.integers(0, 256, (g, THUMBNAIL, THUMBNAIL, 3), dtype=np.uint8),
        gallery_map=rng.integers(0, 256, (g, THUMBNAIL, THUMBNAIL), dtype=np.uint8),
        gallery_boxes={"oracle": boxes, "calibrated": boxes[::-1].copy()},
        gallery_gt=[boxes[k:k + 1] for k in range(g)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--results", type=int, default=3)
    parser.add_argument("--gallery", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        start = time.perf_counter()
        for k in range(args.results):
            r = synthetic_results(f"method{k}", args.images, args.classes, args.gallery, seed=k)
            paths.append(write_results(Path(tmp) / f"method{k}.npz", r))
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        for p in paths:
            read_results(p)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        out = report_from_files(paths, Path(tmp) / "report.html")
        build_s = time.perf_counter() - start
        results_mb = sum(p.stat().st_size for p in paths) / 1e6 / len(paths)
        report_mb = out.stat().st_size / 1e6
    print(f"{cpu_name()}, {cpu_cores()} cores; {args.results} results of {args.images} images, "
          f"{args.classes} classes, gallery sample {args.gallery}")
    print("| step | value |\n|---|---:|")
    print(f"| results file (each) | {results_mb:.1f} MB |")
    print(f"| write {args.results} results files | {write_s:.1f} s |")
    print(f"| read them back | {read_s:.1f} s |")
    print(f"| build the report (read included) | {build_s:.1f} s |")
    print(f"| report.html | {report_mb:.1f} MB |")


if __name__ == "__main__":
    main()
