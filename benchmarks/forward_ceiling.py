"""How much faster can the model's forward get at float32: the ceiling on the faithfulness ratios.

Every faithfulness metric is bound by the model's forwards (``bench_faithfulness.py``), and
confidence change and deletion / insertion already make no forward their definitions do not
need. Their speed-up over the references can then only come from a faster forward of the same
model at the same precision. This measures torchvision ``resnet50`` (random weights, eval,
no autograd) at batch ``--batch``, ``--size`` px, best of ``--repeats``, four ways:

* eager, contiguous inputs (what the references run);
* eager, channels-last (what ``mnpo.metrics.faithfulness`` sends on the CPU);
* TorchScript trace + ``freeze`` + ``optimize_for_inference`` (conv-BN folding, prepacked weights);
* ``torch.compile`` (inductor) with ``freezing`` on, its compile time printed apart.

Each row: seconds a batch, its speed-up over the contiguous eager forward, and the largest
difference of its logits from that forward's (float32 rounding of another kernel order).

    python benchmarks/forward_ceiling.py [--batch 32] [--size 224] [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

from machine_info import device_summary
from timing import best_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the inductor row (it needs a C++ compiler)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    last = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model(images)
        base = best_time(lambda: model(images), repeats=args.repeats, warmup=True)[0]
    print(f"# resnet50 (random weights) forward, batch {args.batch} at {args.size}, float32, best of "
          f"{args.repeats}, largest |logit| {reference.abs().max().item():.2e}; {device_summary(torch.device('cpu'))}")
    print("| forward | s / batch | x eager contiguous | largest logit difference |")
    print("|---|---:|---:|---:|")
    print(f"| eager, contiguous | {base:.3f} | 1.00 | |")
    model_last = model.to(memory_format=torch.channels_last)
    rows = [("eager, channels-last", lambda: model_last(last))]
    with torch.no_grad():
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model_last, last[:2])))
        rows.append(("TorchScript freeze + optimize_for_inference", lambda: scripted(last)))
        if not args.no_compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            start = time.perf_counter()
            compiled = torch.compile(model_last)
            compiled(last)
            compile_s = time.perf_counter() - start
            rows.append((f"inductor, freezing (compiled in {compile_s:.1f} s)", lambda: compiled(last)))
        for name, fn in rows:
            seconds = best_time(fn, repeats=args.repeats, warmup=True)[0]
            diff = (fn() - reference).abs().max().item()
            print(f"| {name} | {seconds:.3f} | {base / seconds:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
