"""The input pipelines on the CPU: mnpo's training and evaluation loaders against torchvision's.

It writes a realistic photo set (JPEG at quality 75-95; shorter side 300-500 px, one image in
``--large-every`` with a shorter side of 2,000-2,400 px; 5 % grayscale; two CMYK; ten class
folders, so that torchvision's ``ImageFolder`` reads the same files) and times, per number of
loader workers, one epoch after a warm-up epoch (workers started, files in the page cache):

* training: mnpo's run loader (:func:`mnpo.engine.train_input.training_loader`: uint8 views,
  normalized later on the device) with ``RandomResizedCrop`` (``data.random_resized: true``;
  also with ``data.jpeg_draft: true``, JPEGs decoded at the scale the view needs)
  and with wsolevaluation's default recipe (``Resize((256, 256))`` + ``RandomCrop``), against
  torchvision's standard ``ImageFolder`` + ``RandomResizedCrop(224)``, flip, ``ToTensor``,
  ``Normalize``;
* evaluation: ``mnpo evaluate``'s items (the 224 view and the 256 ten-crop source, uint8;
  the ten crops are cut on the device; the 224 view alone, as training's validation and
  ``--no-ten-crop`` make them; and ``--decode device``'s items, the JPEGs' bytes, whose decoding
  and resizing happen on the device: that row times the workers' part alone) against ``ImageFolder`` + ``Resize(256)``,
  ``CenterCrop(224)``, ``ToTensor``, ``Normalize`` (one view, no ten-crop).

Only the loaders are timed: what a GPU would wait on. mnpo's normalization and ten-crop run on
the device (microseconds a batch on a GPU) and are left out. It prints images/s, the bytes per
image a step copies to the device, images/s per worker, and the workers a GPU consuming
3,000 images/s would need at that rate.

    python benchmarks/bench_input.py [--images 300] [--workers 1,2] [--batch 32]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from machine_info import cpu_cores, cpu_name
from mnpo.data.dataset import WSOLDataset, collate_evaluation
from mnpo.data.metadata import SplitMetadata, write_split
from mnpo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from mnpo.engine.runtime import resolve_device
from mnpo.engine.train_input import EpochSampler, TrainingItems, training_loader

GPU_RATE = 3000  # images/s a GPU trains or evaluates at (the yardstick)
CLASSES = 10


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random scene with fine grain: JPEG compresses it about as it does a photo."""
    coarse = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def write_photo_set(root: Path, n: int, large_every: int, seed: int = 0) -> SplitMetadata:
    """``n`` JPEGs under ``root/images/class_k/`` and their split under ``root/metadata``."""
    rng = np.random.default_rng(seed)
    ids, labels, sizes, boxes = [], {}, {}, {}
    gray = set(rng.choice(n, size=max(1, n // 20), replace=False).tolist())
    cmyk = set(rng.choice(sorted(set(range(n)) - gray), size=min(2, n - len(gray)), replace=False).tolist())
    for i in range(n):
        short = int(rng.integers(2000, 2401) if large_every and i % large_every == large_every - 1
                    else rng.integers(300, 501))
        long = int(short * rng.choice([4 / 3, 3 / 2, 1.0, 16 / 9]))
        w, h = (long, short) if rng.random() < 0.7 else (short, long)
        image = Image.fromarray(photo(rng, w, h))
        if i in gray:
            image = image.convert("L")
        elif i in cmyk:
            image = image.convert("CMYK")
        image_id = f"class_{i % CLASSES}/{i:05d}.JPEG"
        (root / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / image_id, quality=int(rng.integers(75, 96)))
        ids.append(image_id)
        labels[image_id] = i % CLASSES
        sizes[image_id] = (w, h)
        boxes[image_id] = np.array([[w // 8, h // 8, w - w // 8, h - h // 8]])
    meta = SplitMetadata(tuple(ids), labels, sizes, boxes)
    write_split(root / "metadata", meta)
    return meta


def timed_epoch(loader: DataLoader, set_epoch=None) -> tuple[float, float]:
    """(images/s over the second epoch, bytes per image of its image tensors)."""
    for epoch in range(2):
        if set_epoch is not None:
            set_epoch(epoch)
        start, seen, nbytes = time.perf_counter(), 0, 0
        for batch in loader:
            if isinstance(batch, dict):
                labels = batch["label"]
                nbytes += sum(batch[k].nbytes for k in ("image", "ten_crop_source") if k in batch)
                nbytes += sum(e.data.nbytes for e in batch.get("encoded", ()))
            else:  # torchvision: (images, labels)
                labels = batch[1]
                nbytes += batch[0].nbytes
            seen += len(labels)
    return seen / (time.perf_counter() - start), nbytes / max(seen, 1)


def mnpo_train(root: Path, meta: SplitMetadata, workers: int, batch: int, random_resized: bool, draft: bool = False):
    data = WSOLDataset(root / "images", meta, "train", train_transform(random_resized=random_resized, draft=draft))
    sampler = EpochSampler(len(data), 1, 0, seed=0)
    loader = training_loader(TrainingItems(data, seed=0), sampler, batch, workers, torch.device("cpu"), seed=0)
    return timed_epoch(loader, sampler.set_epoch)


def torchvision_train(root: Path, workers: int, batch: int):
    transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = torchvision.datasets.ImageFolder(str(root / "images"), transform)
    return timed_epoch(DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                  persistent_workers=workers > 0))


def mnpo_evaluate(root: Path, meta: SplitMetadata, workers: int, batch: int, ten_crop: bool = True,
                  device_decode: bool = False):
    data = WSOLDataset(root / "images", meta, "evaluate", uint8_views=True, ten_crop=ten_crop,
                       device_decode=device_decode)
    return timed_epoch(DataLoader(data, batch_size=batch, num_workers=workers, collate_fn=collate_evaluation,
                                  persistent_workers=workers > 0))


def torchvision_evaluate(root: Path, workers: int, batch: int):
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = torchvision.datasets.ImageFolder(str(root / "images"), transform)
    return timed_epoch(DataLoader(data, batch_size=batch, num_workers=workers, persistent_workers=workers > 0))


def device_ms(root: Path, meta: SplitMetadata, device: torch.device, batch: int) -> float:
    """Mean milliseconds per image of ``--decode device``'s device part (decode_jpeg of a batch,
    both resizes), over the set in batches, the second of two passes."""
    from timing import best_time
    from mnpo.data.device_decode import device_views, encoded_image

    encoded = [encoded_image(root / "images" / i) for i in meta.image_ids]
    seconds, _ = best_time(lambda: [device_views(encoded[first:first + batch], device)
                                    for first in range(0, len(encoded), batch)], device, repeats=1, warmup=True)
    return seconds / len(encoded) * 1e3


def per_item_ms(root: Path, meta: SplitMetadata) -> list[tuple[str, float]]:
    """Mean milliseconds per image of each stage, in this process, over the whole set."""
    from mnpo.data.device_decode import encoded_image
    from mnpo.data.transforms import load_image, uint8_views

    paths = [root / "images" / i for i in meta.image_ids]

    def pil_loader(path):  # ImageFolder's loader
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    def mean_ms(fn, items):
        start = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - start) / len(items) * 1e3

    decoded = [load_image(p) for p in paths]
    g = torch.Generator().manual_seed(0)
    tv_train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    tv_eval = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    rrc, recipe = train_transform(random_resized=True), train_transform()
    draft = train_transform(random_resized=True, draft=True)
    return [
        ("decode, mnpo `load_image`", mean_ms(load_image, paths)),
        ("decode, ImageFolder's loader (open + convert RGB)", mean_ms(pil_loader, paths)),
        ("training view, mnpo RandomResizedCrop -> uint8", mean_ms(lambda im: rrc(im, g), decoded)),
        ("decode + training view, mnpo RandomResizedCrop, data.jpeg_draft -> uint8",
         mean_ms(lambda p: draft.from_file(p, g), paths)),
        ("training view, mnpo Resize 256 + RandomCrop -> uint8", mean_ms(lambda im: recipe(im, g), decoded)),
        ("training view, torchvision RandomResizedCrop + ToTensor + Normalize", mean_ms(tv_train, decoded)),
        ("evaluation views, mnpo 224 + 256 -> uint8", mean_ms(uint8_views, decoded)),
        ("evaluation view, mnpo 224 -> uint8", mean_ms(lambda im: uint8_views(im, 224, None), decoded)),
        ("evaluation item, --decode device: the worker's part (read; CMYK decoded)", mean_ms(encoded_image, paths)),
        ("evaluation view, torchvision Resize 256 + CenterCrop + ToTensor + Normalize", mean_ms(tv_eval, decoded)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--large-every", type=int, default=33, help="one image in N is 2,000-2,400 px (0: none)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (>= 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data", help="keep the photo set in this folder (written when missing)")
    parser.add_argument("--device", default="cpu", help="where --decode device's part is timed (cpu, cuda)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    if min(counts) < 1:
        parser.error("--workers: at least 1 (the rates are per worker process)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if (root / "metadata" / "image_ids.txt").is_file():
            from mnpo.data.metadata import read_split

            meta = read_split(root / "metadata")
        else:
            meta = write_photo_set(root, args.images, args.large_every)
        megapixels = sum(w * h for w, h in meta.sizes.values()) / len(meta) / 1e6
        print(f"machine: {cpu_name()}, {cpu_cores()} cores; torch {torch.__version__}, torchvision "
              f"{torchvision.__version__}, Pillow {Image.__version__}; {len(meta)} JPEGs, mean {megapixels:.2f} MP "
              f"(one in {args.large_every} with a 2,000+ px side, 5 % grayscale, 2 CMYK); batch {args.batch}; "
              "the second of two epochs timed\n")
        pipelines = [
            ("training", "mnpo, RandomResizedCrop (uint8)",
             lambda w: mnpo_train(root, meta, w, args.batch, True)),
            ("training", "mnpo, RandomResizedCrop, data.jpeg_draft (uint8)",
             lambda w: mnpo_train(root, meta, w, args.batch, True, draft=True)),
            ("training", "mnpo, wsolevaluation's Resize 256 + RandomCrop (uint8)",
             lambda w: mnpo_train(root, meta, w, args.batch, False)),
            ("training", "torchvision ImageFolder, RandomResizedCrop + ToTensor + Normalize",
             lambda w: torchvision_train(root, w, args.batch)),
            ("evaluation", "mnpo evaluate: 224 view + ten-crop source (uint8)",
             lambda w: mnpo_evaluate(root, meta, w, args.batch)),
            ("evaluation", "mnpo, 224 view only (training's validation, --no-ten-crop) (uint8)",
             lambda w: mnpo_evaluate(root, meta, w, args.batch, ten_crop=False)),
            ("evaluation", "mnpo evaluate --decode device: the workers' part (JPEG bytes; decoded on the device)",
             lambda w: mnpo_evaluate(root, meta, w, args.batch, device_decode=True)),
            ("evaluation", "torchvision ImageFolder, Resize 256 + CenterCrop + ToTensor + Normalize (one view)",
             lambda w: torchvision_evaluate(root, w, args.batch)),
        ]
        header = " | ".join(f"img/s, {w} worker{'s' if w > 1 else ''}" for w in counts)
        print(f"| task | pipeline | KB/image to the device | {header} | img/s per worker ({counts[0]}) "
              f"| workers for {GPU_RATE:,} img/s | vs torchvision |")
        print("|---|---|---:|" + "---:|" * len(counts) + "---:|---:|---:|")
        reference: dict[str, float] = {}
        rows = []
        for task, name, run in pipelines:
            results = [run(w) for w in counts]
            per_worker = results[0][0] / counts[0]
            rows.append((task, name, results, per_worker))
            if name.startswith("torchvision"):
                reference[task] = per_worker
        for task, name, results, per_worker in rows:
            rates = " | ".join(f"{rate:.0f}" for rate, _ in results)
            ratio = per_worker / reference[task]
            print(f"| {task} | {name} | {results[0][1] / 1024:.0f} | {rates} | {per_worker:.0f} "
                  f"| {math.ceil(GPU_RATE / per_worker)} | {ratio:.2f}x |", flush=True)
        print("\n| stage (one process, mean over the set) | ms per image |\n|---|---:|")
        for stage, ms in per_item_ms(root, meta):
            print(f"| {stage} | {ms:.2f} |")
        device = resolve_device(args.device)
        print(f"| evaluation views, --decode device's device part (decode_jpeg + 224 + 256), {device}, batch "
              f"{args.batch} | {device_ms(root, meta, device, args.batch):.2f} |")


if __name__ == "__main__":
    main()
