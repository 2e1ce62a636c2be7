"""The evaluation input pipeline on the CPU: decode + both views, per process and through a loader.

Three ways to make an evaluation item from a 500x375 JPEG (the ILSVRC / CUB photo size):

* ``naive``: decode, then eleven separate PIL -> tensor conversions (the 224 view and each of
  the ten crops cut from the resized PIL image and converted on its own);
* ``float views``: decode once, one conversion per view, the ten crops as slices (and mirror
  slices) of one normalized 256x256 tensor (``WSOLDataset(..., "evaluate")``);
* ``uint8 views``: decode once, two uint8 resizes; normalization and the ten crops happen
  batch-wise on the device (``uint8_views=True``, what ``mnpo evaluate`` uses). The time to
  normalize and crop the batch (on the CPU here) is included.

    python benchmarks/bench_input.py [--images 200] [--workers 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnpo.data.dataset import WSOLDataset, collate_evaluation
from mnpo.data.metadata import SplitMetadata, write_split
from mnpo.data.transforms import load_image, localization_transform, normalize_batch, normalize_image, ten_crop_batch
from machine_info import cpu_cores, cpu_name


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        image_id = f"img/{i:05d}.jpg"
        (root / "images" / "img").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(root / "images" / image_id, quality=90)
        ids.append(image_id)
    meta = SplitMetadata(tuple(ids), {i: 0 for i in ids}, {i: (500, 375) for i in ids},
                         {i: np.array([[10, 10, 200, 200]]) for i in ids})
    write_split(root / "metadata", meta)


def naive_item(path: Path) -> dict:
    image = load_image(path)
    view = localization_transform(224)(image)
    resized = image.resize((256, 256), Image.BILINEAR)
    boxes = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
    crops = [normalize_image(resized.crop((x, y, x + 224, y + 224))) for x, y in boxes]
    mirrored = resized.transpose(Image.FLIP_LEFT_RIGHT)
    crops += [normalize_image(mirrored.crop((x, y, x + 224, y + 224))) for x, y in boxes]
    return {"image": view, "ten_crop": torch.stack(crops)}


def per_item(fn, n: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def through_loader(dataset, workers: int, batch: int, uint8: bool) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         collate_fn=collate_evaluation, persistent_workers=workers > 0)
    for _ in loader:  # warm-up: start the workers, fill caches
        break
    start = time.perf_counter()
    seen = 0
    for b in loader:
        if uint8:
            normalize_batch(b["image"])
            ten_crop_batch(normalize_batch(b["ten_crop_source"]), 224)
        seen += len(b["label"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        floats = WSOLDataset(root / "images", root / "metadata", "evaluate")
        uint8 = WSOLDataset(root / "images", root / "metadata", "evaluate", uint8_views=True)
        paths = [root / "images" / i for i in floats.image_ids]

        def uint8_item(i):
            item = uint8[i]
            normalize_batch(item["image"][None])
            ten_crop_batch(normalize_batch(item["ten_crop_source"][None]), 224)

        cores = cpu_cores()
        print(f"machine: {cpu_name()}, {cores} cores; torch {torch.__version__}, "
              f"Pillow {Image.__version__}; {args.images} JPEGs of 500x375; 1 torch thread per process\n")
        print(f"| pipeline | items/s, one process | items/s, loader ({args.workers} workers, batch {args.batch}) "
              "| the same, batch ops left to the device |\n|---|---:|---:|---:|")
        rows = [
            ("naive (eleven conversions)", per_item(lambda i: naive_item(paths[i % len(paths)]), args.images), None,
             None),
            ("float views (one conversion per view, crops as slices)",
             per_item(lambda i: floats[i % len(floats)], args.images),
             through_loader(floats, args.workers, args.batch, False), None),
            ("uint8 views, normalize + ten-crop batch-wise", per_item(lambda i: uint8_item(i % len(uint8)), args.images),
             through_loader(uint8, args.workers, args.batch, True), through_loader(uint8, args.workers, args.batch, False)),
        ]
        for name, single, loader, bare in rows:
            cells = ["-" if v is None else f"{v:.0f}" for v in (loader, bare)]
            print(f"| {name} | {single:.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
