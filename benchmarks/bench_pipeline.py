"""End-to-end throughput: `mnpo evaluate` per method, a training epoch of the released layout,
the same for a plain torchvision VGG16 (the ratio baseline), and peak GPU memory.

Data: synthetic JPEGs (default 500x375, like ILSVRC photos) in the wsolevaluation layout with
``--classes`` classes, written once to ``--data`` (reused when present). Everything runs in one
process on whatever device is present, at a size that fills it (``--batch``).

    python benchmarks/bench_pipeline.py [--device auto] [--images 512] [--batch 64] [--workers 8]
        [--classes 1000] [--precision auto] [--methods cam,mnpo,mnpos] [--map-precisions fp32,tf32]
        [--decodes host,device] [--data /tmp/mnpo-bench]

Prints a markdown table (device, versions, images/s, ratios, peak memory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from mnpo.data.dataset import WSOLDataset
from mnpo.data.transforms import normalize_batch
from mnpo.data.metadata import SplitMetadata, write_split
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.runtime import autocast, resolve_device, resolve_precision
from mnpo.engine.train import wsol_loss
from mnpo.engine.train_input import EpochSampler, TrainingItems, training_loader
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import build_model
from machine_info import device_summary


def write_data(root: Path, images: int, classes: int, size: tuple[int, int]) -> None:
    """Synthetic JPEG photos with one box each, for ``train`` and ``test`` (same images); a set
    that ``root`` already holds is reused when it was written with the same settings."""
    settings = json.dumps({"images": images, "classes": classes, "size": list(size)})
    stamp = root / "bench-data.json"
    if stamp.is_file() and stamp.read_text() == settings:
        return
    if root.is_dir() and any(root.iterdir()) and not stamp.is_file():
        raise SystemExit(f"--data {root}: exists and was not written by this script; choose another folder")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    ids, labels, sizes, boxes = [], {}, {}, {}
    w, h = size
    for i in range(images):
        image_id = f"img/{i:06d}.jpg"
        path = root / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((w, h), Image.BILINEAR).save(path, quality=90)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        ids.append(image_id)
        labels[image_id] = int(rng.integers(0, classes))
        sizes[image_id] = (w, h)
        boxes[image_id] = np.array([[x0, y0, x0 + w // 3, y0 + h // 3]])
    meta = SplitMetadata(image_ids=tuple(ids), labels=labels, sizes=sizes, boxes=boxes)
    for split in ("train", "val", "test"):
        write_split(root / "metadata" / split, meta)
    stamp.write_text(settings)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"


def train_throughput(model, loader, device, precision, steps, loss_fn) -> float:
    """Images/s over ``steps`` SGD (Nesterov) steps after 3 warm-up steps, cycling the loader."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def batches():
        epoch = 0
        while True:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            yield from (b for b in loader if "image" in b)
            epoch += 1

    seen, start = 0, 0.0
    for step, batch in enumerate(batches()):
        if step == 3:
            sync(device)
            start, seen = time.perf_counter(), 0
        if step == 3 + steps:
            break
        images = normalize_batch(batch["image"].to(device, non_blocking=True))  # uint8 from the workers
        images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(labels)
    sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="/tmp/mnpo-bench")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--methods", default="cam,mnpo,mnpos")
    parser.add_argument("--map-precisions", default="fp32",
                        help="comma-separated precisions of the map pass (fp32 strict, tf32, bf16): one row each")
    parser.add_argument("--float-views", action="store_true",
                        help="normalize and ten-crop in the loader (the old way) instead of on the device")
    parser.add_argument("--decodes", default="host",
                        help="comma-separated --decode modes of `mnpo evaluate` (host, device); each besides host "
                             "adds a row of the first method decoded so (JPEGs by nvJPEG on a GPU)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--width", type=float, default=1.0, help="MNPO width multiplier (smoke runs on a CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    root = Path(args.data)
    write_data(root, args.images, args.classes, (500, 375))
    print(f"device: {device_summary(device)}; classification {precision}, channels-last")
    print(f"data: {args.images} synthetic 500x375 JPEGs, {args.classes} classes, batch {args.batch}, "
          f"{args.workers} loader workers; MNPO width {args.width}\n")
    print("| job | images/s | ratio | peak GPU GiB |\n|---|---:|---:|---:|")

    model = build_model("vgg16-mnpo", args.classes, pretrained=None, width=args.width).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    test = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", uint8_views=not args.float_views)
    mnpos_rows = []  # (map precision, images/s, peak GiB) for the targets

    def evaluation_rate(data, method, map_precision) -> float:
        """images/s of `mnpo evaluate` on ``data``, the second of two passes."""
        common = dict(thresholds=cam_thresholds(0.01), method=method, device=device, precision=precision,
                      map_precision=map_precision, batch_size=args.batch, workers=args.workers, channels_last=True)
        peak_reset(device)
        evaluate_model(model, data, **common)  # warm-up pass
        sync(device)
        start = time.perf_counter()
        evaluate_model(model, data, **common)
        sync(device)
        return len(data) / (time.perf_counter() - start)

    map_precisions = list(dict.fromkeys(resolve_precision(p, device) for p in args.map_precisions.split(",")))
    for method in args.methods.split(","):
        for map_precision in map_precisions:
            rate = evaluation_rate(test, method, map_precision)
            if method == "mnpos":
                mnpos_rows.append((map_precision, rate, peak(device)))
            print(f"| `mnpo evaluate`, {method}, maps {map_precision} (ten-crop + maps + box metrics) | {rate:.1f} "
                  f"| - | {peak(device)} |", flush=True)  # each row as soon as it is measured
    for decode in [d for d in args.decodes.split(",") if d != "host"]:
        if decode != "device":
            parser.error(f"--decodes: unknown mode {decode!r} (host, device)")
        method = args.methods.split(",")[0]
        encoded = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", uint8_views=True,
                              device_decode=True)
        rate = evaluation_rate(encoded, method, map_precisions[0])
        print(f"| `mnpo evaluate --decode device`, {method}, maps {map_precisions[0]} | {rate:.1f} | - "
              f"| {peak(device)} |", flush=True)

    # the training run's own input pipeline (mnpo.engine.train_input): one loader, persistent
    # workers, uint8 batches pinned on CUDA, per-image generators; so the rows time loader + step
    train = WSOLDataset(root / "images", root / "metadata" / "train", "train")
    sampler = EpochSampler(len(train), 1, 0, seed=0)
    loader = training_loader(TrainingItems(train, seed=0), sampler, args.batch, args.workers, device, seed=0)
    peak_reset(device)
    plain = torchvision.models.vgg16(num_classes=args.classes).to(device).to(memory_format=torch.channels_last)
    plain_rate = train_throughput(plain, loader, device, precision, args.train_steps,
                                  lambda out, y: torch.nn.functional.cross_entropy(out.float(), y))
    plain_peak = peak(device)
    del plain
    peak_reset(device)
    model = build_model("vgg16-mnpo", args.classes, pretrained=None, width=args.width)
    model = model.to(device).to(memory_format=torch.channels_last)
    mnpo_rate = train_throughput(model, loader, device, precision, args.train_steps,
                                 lambda out, y: wsol_loss(out.logits, y))
    print(f"| training, released MNPO VGG16 layout | {mnpo_rate:.1f} | {mnpo_rate / plain_rate:.2f} | {peak(device)} |")
    print(f"| training, plain torchvision VGG16 | {plain_rate:.1f} | 1.00 | {plain_peak} |")
    print("\n" + "\n".join(targets(mnpos_rows, mnpo_rate / plain_rate, args.batch)))


#: issue 6's targets, set for an H100 at batch 256
TARGET_EVAL_RATE, TARGET_PEAK_GIB, TARGET_TRAIN_RATIO = 600.0, 20.0, 0.85


def _verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value < target
    return "met" if met else f"missed by {abs(value - target) / target * 100:.0f} %"


def targets(mnpos_rows, train_ratio: float, batch: int) -> list[str]:
    """One line per target of issue 6 (set for an H100, batch 256): the value and met / missed by."""
    lines = [f"targets (issue 6, an H100 at batch 256; this run: batch {batch}):"]
    for precision, rate, peak_gib in mnpos_rows:
        lines.append(f"- MNPOs evaluation, maps {precision}: {rate:.0f} images/s against >= {TARGET_EVAL_RATE:.0f}: "
                     f"{_verdict(rate, TARGET_EVAL_RATE)}")
        if peak_gib != "-":
            lines.append(f"- peak memory, maps {precision}: {peak_gib} GiB against < {TARGET_PEAK_GIB:.0f}: "
                         f"{_verdict(float(peak_gib), TARGET_PEAK_GIB, higher_is_better=False)}")
    lines.append(f"- MNPO training / plain VGG16: {train_ratio:.2f} against >= {TARGET_TRAIN_RATIO}: "
                 f"{_verdict(train_ratio, TARGET_TRAIN_RATIO)}")
    return lines


if __name__ == "__main__":
    main()
