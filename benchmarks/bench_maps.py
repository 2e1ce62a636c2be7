"""Time each map method per image on the CPU or a GPU, and MNPOs against the released recipe.

For every method of ``mnpo.maps.compute_maps`` (cam, mnpo, mnpos, dgl and the CAM family:
gradcam, gradcampp, xgradcam, layercam, hirescam, scorecam, ablationcam, eigencam; or those of
``--methods``) on the released two-branch VGG16 (random weights; the cost does not depend on
them), plus:

* ``forward``: the network's forward alone (the floor for every method);
* ``mnpos, released recipe``: the same map the way the release computes it: a full forward
  that records autograd from the input, then four full ``.backward()`` passes (two per
  branch) that also fill every parameter's ``.grad``, read off at ``conv5_2``.

    python benchmarks/bench_maps.py [--device auto|cpu|cuda] [--batch 8] [--size 224]
        [--width 1.0] [--classes 1000] [--repeats 3] [--bf16] [--channels-last]
        [--methods cam,mnpo,...]

Score-CAM runs the network once per channel of ``head`` and image (1024 x batch at full
width): give ``--methods`` without it for a quick run.

Prints a markdown table: ms per batch, ms per image, images/s, and the ratio to the forward;
with a GPU also the peak memory. The header names the device and the versions.
"""

from __future__ import annotations

import argparse

import torch

from mnpo.engine.runtime import resolve_device
from mnpo.maps import METHODS, compute_maps
from mnpo.models import build_model
from machine_info import device_summary
from timing import best_time


def released_recipe_mnpos(model, images, targets):
    """MNPOs as the release runs it: full graph, four full backward passes, parameter grads."""
    rows = torch.arange(images.shape[0], device=images.device)
    with torch.enable_grad():
        out = model(images, return_features=True, taps=["conv5_2"])
        a = out.features["conv5_2"]
        a.retain_grad()
        grads = []
        t = torch.zeros_like(out.logits[0])
        t[rows, targets] = 10.0
        for logits in out.logits:
            for objective in (logits[rows, targets].sum(), (logits * (logits.softmax(1) - t).detach()).sum()):
                model.zero_grad()
                a.grad = None
                objective.backward(retain_graph=True)
                grads.append(a.grad.clone())
    return grads


def timed(fn, device, repeats):
    """(best seconds of ``repeats`` calls after a warm-up, peak GiB allocated on a CUDA device or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = best_time(fn, device, repeats=repeats, warmup=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated map methods to time (default: all of {', '.join(METHODS)})")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = build_model("vgg16-mnpo", args.classes, width=args.width).to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    targets = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def forward():
        with torch.inference_mode(), autocast:
            model(images)

    jobs = {"forward": forward}
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    for method in methods:
        def run(method=method):
            with autocast:
                compute_maps(model, images, targets, method=method)
        jobs[method] = run

    def release():
        with autocast:
            released_recipe_mnpos(model, images, targets)
        model.zero_grad(set_to_none=True)
    jobs["mnpos, released recipe"] = release

    precision = "bf16 autocast" if args.bf16 else ("fp32/tf32" if device.type == "cuda" else "fp32")
    print(f"device: {device_summary(device)}")
    print(f"released two-branch VGG16 (width {args.width}, {args.classes} classes), batch {args.batch} "
          f"of {args.size}x{args.size}, {precision}{', channels-last' if args.channels_last else ''}, "
          f"best of {args.repeats}\n")
    print("| job | ms/batch | ms/image | images/s | x forward |" + (" peak GiB |" if device.type == "cuda" else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    base = None
    for name, fn in jobs.items():
        seconds, peak = timed(fn, device, args.repeats)
        base = base or seconds
        row = (f"| {name} | {seconds * 1e3:.1f} | {seconds * 1e3 / args.batch:.2f} | "
               f"{args.batch / seconds:.1f} | {seconds / base:.2f} |")
        print(row + (f" {peak:.2f} |" if peak is not None else ""), flush=True)


if __name__ == "__main__":
    main()
