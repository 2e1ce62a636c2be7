"""Count the floating-point operations of a forward pass and of a training step (forward,
loss, backward): the released MNPO VGG16 layout against a plain torchvision VGG16.

In the compute-bound regime of a large GPU batch, the ratio of the two counts is the training
throughput ratio to expect (issue 6 asks MNPO for >= 85 % of plain VGG16's images/s);
`bench_pipeline.py` measures the real one.

    python benchmarks/flops.py [--size 224] [--classes 1000] [--width 1.0]

Counts with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is two operations)
for one image; the optimizer step is not counted (its cost is per parameter, not per image).
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from mnpo.engine.train import wsol_loss
from mnpo.models import build_model


def gflops(model: torch.nn.Module, loss_fn, size: int, train: bool) -> float:
    """GFLOP of one image through ``model`` (and back, when ``train``)."""
    x = torch.randn(1, 3, size, size)
    y = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if train:
            loss_fn(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--width", type=float, default=1.0, help="MNPO width multiplier (smoke runs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = torchvision.models.vgg16(num_classes=args.classes)
    mnpo = build_model("vgg16-mnpo", args.classes, pretrained=None, width=args.width)
    print(f"{args.size}x{args.size} input, {args.classes} classes, MNPO width {args.width}; torch {torch.__version__}\n")
    print("| pass | plain VGG16 GFLOP | MNPO layout GFLOP | plain / MNPO |\n|---|---:|---:|---:|")
    for name, train in (("forward", False), ("training step (no optimizer)", True)):
        a = gflops(plain, lambda out, y: torch.nn.functional.cross_entropy(out, y), args.size, train)
        b = gflops(mnpo, lambda out, y: wsol_loss(out.logits, y), args.size, train)
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} |")
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (plain, mnpo)]
    print(f"\nparameters: plain VGG16 {params[0]:.1f} M, MNPO layout {params[1]:.1f} M")


if __name__ == "__main__":
    main()
