"""Write baseline score maps for a split, in the layout `mnpo evaluate-maps` reads.

Two baselines that need no model, to exercise the evaluation end to end and to
bracket what a method should reach:

``center``
    the same centred Gaussian for every image (sigma = a quarter of the side):
    the "no information" baseline of the WSOL literature;
``blurred-mask``
    the ground-truth mask, Gaussian-blurred (sigma 8 px) and max-normalized:
    close to the best a map can do.

    python examples/baseline_maps.py --metadata DATA/metadata-masks/test \\
        --mask-root DATA/masks --method blurred-mask --out maps/test

Maps are float32 (224, 224) in [0, 1], saved as OUT/<image_id>.npy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from mnpo.data.metadata import read_split
from mnpo.metrics.masks import load_gt_mask

SIZE = 224


def center_map(size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, sigma = (size - 1) / 2, size / 4
    return np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def blurred_mask_map(mask: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    fg = (mask == 1).astype(np.float32)
    blurred = cv2.GaussianBlur(fg, (0, 0), sigma)
    return (blurred / max(float(blurred.max()), 1e-12)).clip(0, 1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", required=True, help="split folder (mask metadata for blurred-mask)")
    parser.add_argument("--mask-root", help="folder the mask paths are relative to")
    parser.add_argument("--method", choices=["center", "blurred-mask"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    meta = read_split(args.metadata)
    if args.method == "blurred-mask" and (meta.kind != "mask" or not args.mask_root):
        parser.error("blurred-mask needs a mask split (metadata-masks/...) and --mask-root")
    out = Path(args.out)
    center = center_map()
    for image_id in meta.image_ids:
        if args.method == "center":
            scoremap = center
        else:
            mask = load_gt_mask(args.mask_root, meta.mask_paths[image_id], meta.ignore_paths.get(image_id, ""), SIZE)
            scoremap = blurred_mask_map(mask)
        path = out / f"{image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, scoremap)
    print(f"wrote {len(meta.image_ids)} {args.method} maps to {out}")


if __name__ == "__main__":
    main()
