"""Faithfulness metrics against pytorch-grad-cam's and torchcam's, side by side in one run.

torchvision ``resnet50`` (random weights, eval), ``--images`` random images at ``--size``, the
same maps (Grad-CAM of ``layer4`` from ``compute_maps``) and classes for every implementation:

* confidence change (Average Drop / Increase in Confidence): ours, pytorch-grad-cam's
  ``CamMultImageConfidenceChange``, torchcam's ``ClassificationMetric``;
* deletion and insertion in ``--steps`` steps from a zero baseline (torchcam's convention; ours
  with ``baseline=0``): ours, torchcam's ``DeletionInsertionMetric``;
* ROAD combined at 10 .. 90 percent: ours, pytorch-grad-cam's ``ROADCombined``.

Each row: wall-clock seconds of one run of each (the best of ``--repeats``), ours' speed-up,
and the largest difference between the numbers (same definition, so the table also says they
computed the same thing; ROAD's imputation noise is random in both, set to 0 here).

    python benchmarks/bench_faithfulness.py [--images 32] [--size 224] [--steps 20] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from importlib.metadata import version

import numpy as np
import torch
import torchvision

from machine_info import device_summary
from timing import best_time
from mnpo.maps import compute_maps
from mnpo.metrics import faithfulness as fm


class GivenMaps:
    """torchcam's CAM-extractor protocol answered with our maps (the same maps for all)."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="deletion / insertion steps (torchcam's default 20)")
    parser.add_argument("--chunk", type=int, default=32, help="perturbed copies per forward, ours and torchcam's")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--metrics", default="confidence,deletion_insertion,road")
    args = parser.parse_args()
    from pytorch_grad_cam.metrics import road as gc_road
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    with torch.no_grad():
        targets = model(images).argmax(1)
    maps, _ = compute_maps(model, images, targets, method="gradcam", target_layer="layer4",
                           size=(args.size, args.size))
    maps = maps.float()
    print(f"# faithfulness metrics, resnet50 (random weights), {args.images} images at {args.size}, Grad-CAM maps; "
          f"{device_summary(torch.device('cpu'))}; "
          f"grad-cam {version('grad-cam')}, torchcam {version('torchcam')}")
    print("| metric | implementation | seconds | ours' speed-up | largest difference |")
    print("|---|---|---:|---:|---:|")
    wanted = args.metrics.split(",")
    softmax = functools.partial(torch.softmax, dim=-1)
    gc_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]

    if "confidence" in wanted:
        t_ours, ours = best_time(lambda: fm.confidence_change(model, images, maps, targets, args.chunk),
                                 repeats=args.repeats)
        t_gc, gc = best_time(lambda: CamMultImageConfidenceChange()(images, maps.numpy(), gc_targets, model),
                             repeats=args.repeats)

        def torchcam_run():
            metric = ClassificationMetric(GivenMaps(model, maps), softmax)
            for start in range(0, args.images, args.chunk):
                metric.update(images[start:start + args.chunk], class_idx=targets[start:start + args.chunk].tolist())
            return metric.summary()

        t_tc, tc = best_time(torchcam_run, repeats=args.repeats)
        diff_gc = float(np.abs((ours.masked - ours.base).numpy() - np.asarray(gc).ravel()).max())
        diff_tc = abs(ours.average_drop / 100 - tc["avg_drop"])
        print(f"| confidence change | ours | {t_ours:.2f} | | |")
        print(f"| confidence change | pytorch-grad-cam | {t_gc:.2f} | {t_gc / t_ours:.2f}x | {diff_gc:.1e} (O - Y) |")
        print(f"| confidence change | torchcam | {t_tc:.2f} | {t_tc / t_ours:.2f}x | {diff_tc:.1e} (avg drop) |")

    if "deletion_insertion" in wanted:
        def ours_run():
            return (fm.deletion_insertion(model, images, maps, targets, "deletion", args.steps, chunk_size=args.chunk),
                    fm.deletion_insertion(model, images, maps, targets, "insertion", args.steps, baseline=0.0,
                                          chunk_size=args.chunk))

        def torchcam_run():
            metric = DeletionInsertionMetric(GivenMaps(model, maps), softmax, steps=args.steps, batch_size=args.chunk)
            metric.update(images, class_idx=targets.tolist())
            return metric.summary()

        t_ours, (deletion, insertion) = best_time(ours_run, repeats=args.repeats)
        t_tc, tc = best_time(torchcam_run, repeats=args.repeats)
        diff = max(abs(float(deletion.auc.mean()) - tc["deletion_auc"]),
                   abs(float(insertion.auc.mean()) - tc["insertion_auc"]))
        print(f"| deletion + insertion ({args.steps} steps) | ours | {t_ours:.2f} | | |")
        print(f"| deletion + insertion ({args.steps} steps) | torchcam | {t_tc:.2f} | {t_tc / t_ours:.2f}x | "
              f"{diff:.1e} (mean AUC) |")

    if "road" in wanted:
        t_ours, ours = best_time(lambda: fm.road(model, images, maps, targets, noise=0.0, chunk_size=args.chunk),
                                 repeats=args.repeats)
        defaults = gc_road.NoisyLinearImputer.__init__.__defaults__
        gc_road.NoisyLinearImputer.__init__.__defaults__ = (0.0, *defaults[1:])
        try:
            t_gc, gc = best_time(lambda: gc_road.ROADCombined()(images, maps.numpy(), gc_targets, model),
                                 repeats=args.repeats)
        finally:
            gc_road.NoisyLinearImputer.__init__.__defaults__ = defaults
        diff = float(np.abs(ours.combined.numpy() - np.asarray(gc).ravel()).max())
        print("| ROAD combined (9 percentiles) | ours | {:.2f} | | |".format(t_ours))
        print(f"| ROAD combined (9 percentiles) | pytorch-grad-cam | {t_gc:.2f} | {t_gc / t_ours:.2f}x | "
              f"{diff:.1e} (per image) |")


if __name__ == "__main__":
    main()
