"""Time the box metrics: plain per-threshold OpenCV loop vs. the union-find sweeps.

Both paths get the same maps (CAM-like: a random 14x14 grid upsampled bicubically
to 224x224 and min-max normalized, as a VGG16 CAM is) and the same ground-truth
boxes, on wsolevaluation's grid of 100 thresholds, largest and multi-contour.

    python benchmarks/bench_box_metrics.py [--images 200] [--workers 2]

Prints per-image times and speed-ups, and the machine they were taken on.
"""

from __future__ import annotations

import argparse
import platform
import time

import cv2
import numpy as np

from mnpo.metrics.boxes import box_ious, box_ious_reference, cam_thresholds
from mnpo.metrics.localization import BoxEvaluator
from machine_info import cpu_cores, cpu_name


def make_maps(n: int, seed: int = 0, size: int = 224) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    gt = {}
    for i in range(n):
        small = rng.random((14, 14)).astype(np.float32) ** 2
        m = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        maps[i] = (m - m.min()) / (m.max() - m.min())
        x0, y0 = rng.integers(0, size // 2, 2)
        gt[str(i)] = [[x0, y0, x0 + rng.integers(20, size // 2), y0 + rng.integers(20, size // 2)]]
    return maps, gt


def machine() -> str:
    return (f"{cpu_name()}, {cpu_cores()} cores available, Python {platform.python_version()}, "
            f"OpenCV {cv2.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    maps, gt = make_maps(args.images)
    ids = list(gt)
    t = cam_thresholds(0.01)
    box_ious(maps[0], t, gt["0"])  # compile / load the kernels outside the timing

    start = time.perf_counter()
    ref = [box_ious_reference(m, t, gt[i]) for m, i in zip(maps, ids)]
    plain = (time.perf_counter() - start) / len(ids)

    start = time.perf_counter()
    fast = [box_ious(m, t, gt[i]) for m, i in zip(maps, ids)]
    one = (time.perf_counter() - start) / len(ids)
    same = all(np.array_equal(a.largest_iou, b.largest_iou) and np.array_equal(a.multi_iou, b.multi_iou)
               for a, b in zip(ref, fast))

    timings = {}
    for workers in sorted({1, args.workers}):
        ev = BoxEvaluator(gt, thresholds=t, workers=workers)
        start = time.perf_counter()
        for b in range(0, len(ids), 64):
            ev.update(maps[b:b + 64], ids[b:b + 64])
        timings[workers] = (time.perf_counter() - start) / len(ids)
        ev.close()

    print(f"machine: {machine()}")
    print(f"{len(ids)} maps of 224x224, {len(t)} thresholds, largest + multi-contour; identical results: {same}")
    print(f"plain per-threshold loop (1 thread):  {plain * 1e3:7.2f} ms/image")
    print(f"sweeps, box_ious (1 thread):          {one * 1e3:7.2f} ms/image  ({plain / one:5.1f}x)")
    for workers, sec in timings.items():
        print(f"sweeps, BoxEvaluator ({workers} thread{'s' if workers > 1 else ''}):   "
              f"{sec * 1e3:7.2f} ms/image  ({plain / sec:5.1f}x)")


if __name__ == "__main__":
    main()
