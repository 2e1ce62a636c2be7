"""How far do faster numerics move the maps? Strict fp32 against TF32, bf16 and channels-last.

For a trained checkpoint and a data set in the wsolevaluation layout (the study's synthetic
sets, say), compute every test map of ``--methods`` under each configuration

* ``fp32`` (strict: no TF32), the reference, and ``fp32`` with channels-last;
* ``tf32`` and ``tf32`` with channels-last (CUDA only; elsewhere they are ``fp32``);
* ``bf16`` autocast and ``bf16`` with channels-last,

and report, against the reference: the largest and the mean absolute difference of the
normalized 224x224 maps, the calibrated GT-known Loc and MaxBoxAccV2 (thresholds on val), and
whether the largest difference stays below the protocol's threshold step of 0.01 (then no
pixel moves across more than one threshold of the sweep).
Maps come from the 224 view (no ten-crop: classification does not enter the maps).

    python benchmarks/check_precision.py --checkpoint RUN/best.pt --data SET [--methods mnpos]
        [--device auto] [--batch 64] [--workers 4] [--input-size 224] [--tolerance 1e-3] [--out check.md]

``--tolerance`` applies to the largest difference of the configuration ``mnpo evaluate`` uses
for maps by default (strict fp32, with channels-last on CUDA): the script exits with status 1
when that row exceeds it. The other rows are measured and reported, not asserted: they say
whether ``--map-precision tf32`` or ``bf16`` would be safe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mnpo.data.dataset import WSOLDataset
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.views import resize_for
from mnpo.engine.evaluate_maps import build_report
from mnpo.engine.runtime import resolve_device, resolve_precision
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import load_model

from machine_info import device_summary

#: the protocol's threshold step: a map moved by less crosses at most one threshold per pixel
THRESHOLD_STEP = 0.01
#: (precision, channels-last) per configuration; the first is the reference
CONFIGURATIONS = (("fp32", False), ("fp32", True), ("tf32", False), ("tf32", True), ("bf16", False), ("bf16", True))


def maps_and_metrics(model, val, test, method, device, precision, channels_last, args):
    """``(maps of the test split by image id, calibrated report)`` under one configuration."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    maps: dict[str, np.ndarray] = {}

    def keep(batch, batch_maps):
        maps.update(zip(batch["image_id"], batch_maps))

    common = dict(thresholds=cam_thresholds(0.01), method=method, device=device, precision=precision,
                  map_precision=precision, batch_size=args.batch, workers=args.workers, ten_crop=False,
                  channels_last=channels_last)
    v = evaluate_model(model, val, **common)
    t = evaluate_model(model, test, on_batch=keep, **common)
    return maps, build_report(t.curves, v.curves, {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="folder with images/ and metadata/{val,test}")
    parser.add_argument("--methods", default="mnpos")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224, help="side of the network's input view")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, _ = load_model(args.checkpoint)
    model.to(device)
    data = Path(args.data)
    kwargs = dict(uint8_views=True, num_classes=model.num_classes, crop_size=args.input_size,
                  resize_size=resize_for(args.input_size))
    val = WSOLDataset(data / "images", data / "metadata" / "val", "evaluate", **kwargs)
    test = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", **kwargs)
    default = ("fp32", device.type == "cuda")  # what `mnpo evaluate` uses for maps
    lines = [f"device: {device_summary(device)}; "
             f"checkpoint {args.checkpoint}; {len(test)} test / {len(val)} val images; "
             f"tolerance {args.tolerance:g} on the default maps (fp32{', channels-last' if default[1] else ''})", "",
             "| method | maps | max abs diff | mean abs diff | GT-known Loc cal. | MaxBoxAccV2 cal. | within a step |",
             "|---|---|---:|---:|---:|---:|---|"]
    failed = []
    for method in args.methods.split(","):
        reference, done = None, set()
        for precision, channels_last in CONFIGURATIONS:
            resolved = resolve_precision(precision, device)
            if (resolved, channels_last) in done:
                continue  # tf32 off CUDA is fp32: measured already
            done.add((resolved, channels_last))
            maps, report = maps_and_metrics(model, val, test, method, device, resolved, channels_last, args)
            if reference is None:
                reference = maps
            diffs = np.concatenate([np.abs(maps[i] - reference[i]).ravel() for i in reference])
            label = resolved + (", channels-last" if channels_last else "")
            lines.append(f"| {method} | {label} | {diffs.max():.2e} | {diffs.mean():.2e} | "
                         f"{report.calibrated['gt_known_loc'].value:.2f} | "
                         f"{report.calibrated['max_box_acc_v2'].value:.2f} | "
                         f"{'yes' if diffs.max() < THRESHOLD_STEP else 'no'} |")
            if (resolved, channels_last) == default and diffs.max() > args.tolerance:
                failed.append(f"{method}: default maps ({label}) moved by {diffs.max():.2e} > {args.tolerance:g}")
    if resolve_precision("tf32", device) != "tf32":
        lines += ["", f"(tf32 is a CUDA mode: on {device.type} it is fp32, so it has no rows of its own)"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    for message in failed:
        print(f"FAIL {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
