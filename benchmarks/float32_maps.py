"""How far float32 maps are from float64 ones on full-width networks, and why (issue 26).

Networks: the released two-branch VGG16 at width 1.0, ``--classes`` classes, random weights
(seed ``s`` for ``s`` in ``--seeds``), BatchNorm statistics ``running_mean ~ U(-0.1, 0.1)``,
``running_var ~ U(0.5, 1.5)``; ``--batches`` batches of ``--batch`` ``torch.randn`` images at
``--size``, random targets (one generator per network, seeded ``s``). For each of
``--methods``, the largest absolute difference per image of the normalized maps against the
same network and images in float64:

* ``einsum``: float32 with the channel sums of the maps taken by ``einsum`` (the code before
  issue 26);
* ``float32``: float32 as ``compute_maps`` runs it now;
* ``same decisions``: float32 against float64 run with float32's ReLU and max-pool decisions
  (``mnpo.maps.precision.Decisions``): what is left is rounding;
* ``decided apart``: images whose float64 run decided a ReLU after the target layer otherwise
  (the float32 map moves by more than 10x its same-decision difference).

Then, for the image that moved most under ``mnpos``, the relative error (norm-wise) of each
step: ``A`` at the target layer, each branch's ``G_i = J_i^T e_y`` and ``D_i = J_i^T v_i``, with
float32's own decisions and with float64's. Last (``--split N``), the box metrics of float32 and
float64 maps on ``N`` test images of the synthetic ``shapes`` set (224 px, classes cycling):
GT-known Loc and MaxBoxAccV2 at the best threshold, and how many images' largest-contour IoU
moved at any threshold.

    python benchmarks/float32_maps.py [--seeds 0,1,2] [--batches 4] [--batch 4] [--size 224]
        [--classes 200] [--methods mnpos,dgl,gradcam,mnpo] [--split 64] [--out float32.md]
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import mnpo.maps.cam_family as cam_family
import mnpo.maps.postprocess as postprocess
from mnpo.data.synthetic import render_sample
from mnpo.maps import compute_maps
from mnpo.maps.precision import Decisions
from mnpo.metrics.localization import BoxEvaluator, oracle_metrics
from mnpo.models import build_model, released_vgg16_layout

from machine_info import device_summary

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def issue_network(seed: int, classes: int) -> torch.nn.Module:
    """The issue's network: released VGG16, width 1.0, seeded weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(released_vgg16_layout(1.0), classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@contextmanager
def einsum_channel_sums():
    """The channel sums as they were before issue 26: one ``einsum`` (a batched matrix product)."""
    def einsum(weights, features):
        return torch.einsum("bc,bchw->bhw", weights, features)

    saved = postprocess.channel_weighted_sum, cam_family.channel_weighted_sum
    postprocess.channel_weighted_sum = cam_family.channel_weighted_sum = einsum
    try:
        yield
    finally:
        postprocess.channel_weighted_sum, cam_family.channel_weighted_sum = saved


def per_image_max(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.double() - b.double()).abs().flatten(1).amax(1).numpy()


def compare(model, model64, images, targets, method):
    """Per image: (einsum diff, float32 diff, same-decision diff) against float64."""
    with einsum_channel_sums():
        before, _ = compute_maps(model, images, targets, method=method)
    with Decisions() as recorded:
        maps32, _ = compute_maps(model, images, targets, method=method)
    maps64, _ = compute_maps(model64, images.double(), targets, method=method)
    with Decisions(replay=recorded.decisions):
        same64, _ = compute_maps(model64, images.double(), targets, method=method)
    return per_image_max(before, maps64), per_image_max(maps32, maps64), per_image_max(maps32, same64)


def step_errors(model, model64, images, targets, row, layer="conv5_2"):
    """Norm-wise relative error of A, G_i, D_i (mnpos, released loss gradient) of image ``row``
    of the batch in float32, with float32's own decisions and with float64's."""
    def parts(net, x):
        out = net(x, return_features=True, grad_from=layer)
        A = out.features[layer]
        result = {"A": A.detach()}
        for i, logits in enumerate(out.logits):
            pick = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
            v = logits.detach().softmax(1) - 10 * pick
            (result[f"G{i}"],) = torch.autograd.grad(logits, A, pick, retain_graph=True)
            (result[f"D{i}"],) = torch.autograd.grad(logits, A, v, retain_graph=True)
        return result

    with Decisions() as recorded64:
        ref = parts(model64, images.double())
    own = parts(model, images)
    with Decisions(replay=recorded64.decisions):
        forced = parts(model, images)

    def rel(a, b):
        return float((a[row].double() - b[row]).norm() / b[row].norm())

    return {k: (rel(own[k], ref[k]), rel(forced[k], ref[k])) for k in ref}


def split_metrics(model, model64, count: int, classes: int, method: str, batch: int):
    """GT-known Loc and MaxBoxAccV2 of float32 and float64 maps on ``count`` synthetic test images."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    samples = [render_sample("shapes", 0, "test", i % 4, i // 4, 224) for i in range(count)]
    boxes = {str(i): s.boxes for i, s in enumerate(samples)}
    evaluators = {dt: BoxEvaluator(boxes, per_image=True, workers=1) for dt in ("float32", "float64")}
    for start in range(0, count, batch):
        chunk = samples[start:start + batch]
        images = torch.stack([(torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 - mean) / std for s in chunk])
        targets = torch.arange(start, start + len(chunk)) % classes
        ids = [str(i) for i in range(start, start + len(chunk))]
        m32, _ = compute_maps(model, images, targets, method=method)
        m64, _ = compute_maps(model64, images.double(), targets, method=method)
        evaluators["float32"].update(m32.numpy(), ids)
        evaluators["float64"].update(m64.double().numpy(), ids)
    metrics = {dt: oracle_metrics(e.compute()) for dt, e in evaluators.items()}
    ious = {dt: e.records().values for dt, e in evaluators.items()}
    moved = int((np.abs(ious["float32"] - ious["float64"]).max(1) > 0).sum())
    return metrics, moved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--methods", default="mnpos,dgl,gradcam,mnpo")
    parser.add_argument("--split", type=int, default=64, help="synthetic test images for the box metrics (0: none)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    start = time.monotonic()
    lines = [f"device: {device_summary(torch.device('cpu'))}; "
             f"kernels {torch.backends.cpu.get_cpu_capability()}", "",
             "| network seed | method | images | worst, einsum | worst, float32 | worst, same decisions "
             "| decided apart |", "|---|---|---:|---:|---:|---:|---:|"]
    worst = (0.0, None)
    totals = {m: [[], [], []] for m in methods}
    for seed in (int(s) for s in args.seeds.split(",")):
        model = issue_network(seed, args.classes)
        model64 = copy.deepcopy(model).double()
        g = torch.Generator().manual_seed(seed)
        batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g),
                    torch.randint(0, args.classes, (args.batch,), generator=g)) for _ in range(args.batches)]
        for method in methods:
            diffs = [np.concatenate(d) for d in zip(*(compare(model, model64, x, y, method) for x, y in batches))]
            for total, d in zip(totals[method], diffs):
                total.append(d)
            before, now, same = diffs
            apart = int((now > 10 * same).sum())
            lines.append(f"| {seed} | {method} | {len(now)} | {before.max():.1e} | {now.max():.1e} | "
                         f"{same.max():.1e} | {apart} |")
            if method == "mnpos" and now.max() > worst[0]:
                k = int(now.argmax())
                x, y = batches[k // args.batch]
                worst = (float(now.max()), (seed, k, model, model64, x, y))
            print(lines[-1], flush=True)
    lines += ["", "| all networks | method | images | worst, einsum | worst, float32 | worst, same decisions "
              "| median, float32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for method, (before, now, same) in totals.items():
        before, now, same = (np.concatenate(t) for t in (before, now, same))
        lines.append(f"| | {method} | {len(now)} | {before.max():.1e} | {now.max():.1e} | {same.max():.1e} | "
                     f"{np.median(now):.1e} |")
    if worst[1] is not None:
        seed, k, model, model64, x, y = worst[1]
        lines += ["", f"Steps of mnpos on the image that moved most (network {seed}, image {k}, "
                  f"{worst[0]:.1e}): relative error of float32",
                  "", "| step | own decisions | float64's decisions |", "|---|---:|---:|"]
        for name, (own, forced) in step_errors(model, model64, x, y, k % args.batch).items():
            lines.append(f"| {name} | {own:.1e} | {forced:.1e} |")
    if args.split:
        model = issue_network(0, args.classes)
        model64 = copy.deepcopy(model).double()
        lines += ["", f"Box metrics on {args.split} synthetic `shapes` test images (network 0; oracle threshold)",
                  "", "| method | maps | GT-known Loc | MaxBoxAccV2 | images whose IoU moved |", "|---|---|---:|---:|---:|"]
        for method in ("mnpos", "dgl"):
            metrics, moved = split_metrics(model, model64, args.split, args.classes, method, args.batch)
            for dt, m in metrics.items():
                lines.append(f"| {method} | {dt} | {m['gt_known_loc'].value:.2f} | {m['max_box_acc_v2'].value:.2f} | "
                             f"{moved if dt == 'float32' else ''} |")
    lines += ["", f"({time.monotonic() - start:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
