"""Time the transformer networks' forwards and maps against DeiT's plain forward (issue 24).

On ``deit_small`` (random weights; the cost does not depend on them), batch 8 at 224 by default:

* ``DeiT forward``: the backbone alone to its final norm, every block on the fused attention
  kernel (the floor, ``x forward`` = 1);
* ``TS-CAM forward`` / ``SAT forward``: the networks' logits;
* ``TS-CAM map`` (``cam``): needs every block's attention weights, so every block leaves the
  fused kernel;
* ``SAT map`` (``cam``): its gates come with the forward, the fused kernel kept;
* ``TS-CAM mnpo``: H of the head's weights on the final tokens, the fused kernel kept;
* ``TS-CAM gradcam`` / ``mnpos``: one truncated backward from ``blocks.10``.

The goal (issue 24): the maps that need no attention weights (SAT's, MNPO's) cost no more than
1.1x a forward.

    python benchmarks/bench_transformer_maps.py [--device auto|cpu|cuda] [--size deit_small]
        [--batch 8] [--image 224] [--classes 200] [--repeats 3] [--bf16]
"""

from __future__ import annotations

import argparse

import torch

from bench_maps import timed
from machine_info import device_summary
from mnpo.engine.runtime import resolve_device
from mnpo.maps import compute_maps
from mnpo.models import build_model
from mnpo.models.deit import DEIT_NAMES

#: the jobs whose map needs no attention weights, and the goal for them
FUSED_GOAL = 1.1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="deit_small", choices=DEIT_NAMES)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run the networks under bf16 autocast")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    tscam = build_model(f"{args.size}-tscam", args.classes, width=args.width).to(device).eval()
    sat = build_model(f"{args.size}-sat", args.classes, width=args.width).to(device).eval()
    images = torch.randn(args.batch, 3, args.image, args.image, device=device)
    targets = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def run(fn):
        def job():
            with autocast:
                fn()
        return job

    def inference(fn):
        def job():
            with torch.inference_mode(), autocast:
                fn()
        return job

    jobs = {
        "DeiT forward": inference(lambda: tscam.backbone(images, ["norm"])),
        "TS-CAM forward": inference(lambda: tscam(images)),
        "SAT forward": inference(lambda: sat(images)),
        "TS-CAM map (cam)": run(lambda: compute_maps(tscam, images, targets, method="cam")),
        "SAT map (cam)": run(lambda: compute_maps(sat, images, targets, method="cam")),
        "TS-CAM mnpo": run(lambda: compute_maps(tscam, images, targets, method="mnpo")),
        "TS-CAM gradcam (blocks.10)": run(lambda: compute_maps(tscam, images, targets, method="gradcam",
                                                               target_layer="blocks.10")),
        "TS-CAM mnpos (blocks.10)": run(lambda: compute_maps(tscam, images, targets, method="mnpos")),
    }
    fused = ("SAT map (cam)", "TS-CAM mnpo")
    precision = "bf16 autocast" if args.bf16 else ("fp32/tf32" if device.type == "cuda" else "fp32")
    print(f"device: {device_summary(device)}")
    print(f"{args.size} (width {args.width}, {args.classes} classes), batch {args.batch} of {args.image}x{args.image}, "
          f"{precision}, best of {args.repeats}\n")
    print("| job | ms/batch | ms/image | x DeiT forward |")
    print("|---|---:|---:|---:|")
    base, ratios = None, {}
    for name, fn in jobs.items():
        seconds, _ = timed(fn, device, args.repeats)
        base = base or seconds
        ratios[name] = seconds / base
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds * 1e3 / args.batch:.2f} | {seconds / base:.2f} |", flush=True)
    print(f"\ngoal: the maps that need no attention weights ({', '.join(fused)}) <= {FUSED_GOAL}x a forward")
    for name in fused:
        verdict = "met" if ratios[name] <= FUSED_GOAL else f"missed by {(ratios[name] / FUSED_GOAL - 1) * 100:.0f} %"
        print(f"- {name}: {ratios[name]:.2f}x: {verdict}")


if __name__ == "__main__":
    main()
