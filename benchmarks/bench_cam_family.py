"""The CAM family of ``compute_maps`` against pytorch-grad-cam, side by side in one run.

Same network (the released two-branch VGG16 at ``--width``, random weights: the cost does not
depend on them), same target layer (``head``, the main branch's last feature map), same images,
same batch and classes; pytorch-grad-cam gets the main branch's logits through a thin wrapper
module. For each method: the best of ``--repeats`` wall-clock times of ours and of theirs, the
ratio, and the largest difference between the two maps (ours resized bilinearly, as theirs
are), so the table also says the two computed the same thing.

    python benchmarks/bench_cam_family.py [--device cpu] [--batch 4] [--size 224] [--width 0.25]
        [--classes 200] [--repeats 3] [--slow-repeats 1] [--methods gradcam,...]

``--slow-repeats`` applies to Score-CAM and Ablation-CAM, which run the network once per
channel and image in pytorch-grad-cam. Needs ``pip install grad-cam`` (in the test extras).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mnpo.maps import compute_maps
from mnpo.models import build_model
from machine_info import device_summary
from timing import best_time

#: our method -> pytorch-grad-cam's class
THEIRS = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
          "hirescam": "HiResCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "eigencam": "EigenCAM"}
SLOW = ("scorecam", "ablationcam")


class MainLogits(torch.nn.Module):
    """The main branch's ``(B, K)`` logits: the model interface pytorch-grad-cam expects."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).logits[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--methods", default=",".join(THEIRS))
    args = parser.parse_args(argv)
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(THEIRS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(THEIRS)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("vgg16-mnpo", args.classes, width=args.width).to(device).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = torch.randint(0, args.classes, (args.batch,), device=device)
    wrapped = MainLogits(model)
    layer = model.branches["main"]["head"]
    channels = model.layout.feature_channels

    print(f"device: {device_summary(device)}")
    print(f"pytorch-grad-cam {getattr(pytorch_grad_cam, '__version__', '1.5.7')}; released two-branch VGG16 "
          f"(width {args.width}, {channels} channels at head, {args.classes} classes), batch {args.batch} of "
          f"{args.size}x{args.size}, fp32, target layer head; best of {args.repeats} "
          f"({args.slow_repeats} for {', '.join(SLOW)})\n")
    print("| method | ours ms | pytorch-grad-cam ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for method in methods:
        repeats = args.slow_repeats if method in SLOW else args.repeats
        ours_s, (ours, _) = best_time(
            lambda m=method: compute_maps(model, images, targets, method=m, resize="bilinear"), device, repeats=repeats)
        cam_class = getattr(pytorch_grad_cam, THEIRS[method])
        with cam_class(model=wrapped, target_layers=[layer]) as cam:
            if hasattr(cam, "batch_size"):
                cam.batch_size = 32 if method == "ablationcam" else 16  # their defaults, set explicitly
            theirs_s, theirs = best_time(
                lambda: cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets]),
                device, repeats=repeats)
        diff = float(np.abs(ours.cpu().numpy() - theirs).max())
        note = " (sign of the SVD)" if method == "eigencam" and diff > 1e-3 else ""
        print(f"| {method} | {ours_s * 1e3:.1f} | {theirs_s * 1e3:.1f} | {theirs_s / ours_s:.1f}x | "
              f"{diff:.1e}{note} |", flush=True)


if __name__ == "__main__":
    main()
