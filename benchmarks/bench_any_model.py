"""``compute_maps`` on torchvision classifiers against pytorch-grad-cam, side by side in one run.

For each model (random weights: the cost does not depend on them; nothing is downloaded) and
each method: the same target layer, images, batch and classes for both; the best of
``--repeats`` wall-clock times of ours and of pytorch-grad-cam's, the ratio and the largest
difference between the two maps (ours resized bilinearly, as theirs are), so the table also
says the two computed the same thing. Ours is given the layer by name, as a user would; the
time of ``target_layer="auto"`` (found once per model, then cached) is the same call.

    python benchmarks/bench_any_model.py [--device cpu] [--batch 8] [--size 224] [--repeats 2]
        [--models resnet50,convnext_tiny,vit_b_16,swin_t] [--methods gradcam,...,ablationcam]
        [--slow-batch 1] [--slow-repeats 1] [--slow-models resnet50,convnext_tiny]

Score-CAM and Ablation-CAM run the network once per channel of the layer and image (Ablation-CAM
in pytorch-grad-cam; ours runs only what follows the layer where the rest of the network reads
nothing else): they run on ``--slow-batch`` images of ``--slow-models`` only.

Needs ``pip install grad-cam`` (in the test extras).
"""

from __future__ import annotations

import argparse
from importlib.metadata import version

import numpy as np
import torch
import torchvision

from machine_info import device_summary
from timing import best_time
from mnpo.maps import compute_maps


def vit_tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape: drop the class token, (B, h, w, C) -> (B, C, h, w)."""
    side = int(round((t.shape[1] - 1) ** 0.5))
    return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


def channels_last_to_grid(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


#: model -> (target layer, pytorch-grad-cam's reshape_transform): the layers their docs use
MODELS = {
    "resnet50": ("layer4", None),
    "convnext_tiny": ("features.7", None),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", vit_tokens_to_grid),
    "swin_t": ("norm", channels_last_to_grid),
}
THEIRS = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
          "hirescam": "HiResCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}
#: run the network once per channel of the layer (in pytorch-grad-cam; ours ablates only what
#: follows the layer where the network allows): on ``--slow-models``, ``--slow-batch`` images
SLOW = ("scorecam", "ablationcam")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(THEIRS))
    parser.add_argument("--slow-batch", type=int, default=1, help="images for scorecam and ablationcam")
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--slow-models", default="resnet50,convnext_tiny")
    args = parser.parse_args(argv)
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for given, known, flag in ((models, MODELS, "--models"), (methods, THEIRS, "--methods")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)

    print(f"device: {device_summary(device)}")
    print(f"pytorch-grad-cam {version('grad-cam')}; random weights, 1000 classes, batch {args.batch} of "
          f"{args.size}x{args.size} ({args.slow_batch} for {', '.join(SLOW)}), fp32; best of {args.repeats} "
          f"({args.slow_repeats} for {', '.join(SLOW)})\n")
    print("| model | layer | method | ours ms | pytorch-grad-cam ms | speed-up | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in models:
        layer, reshape = MODELS[name]
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).to(device).eval()
        if name == "vit_b_16":  # torchvision zero-initializes the head: every gradient would be 0
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        kwargs = {"reshape_transform": reshape} if reshape is not None else {}
        with torch.inference_mode():  # untimed: the allocator and oneDNN's kernels warm up
            model(images)
        for method in methods:
            slow = method in SLOW
            if slow and name not in args.slow_models.split(","):
                continue
            x, y = (images[:args.slow_batch], targets[:args.slow_batch]) if slow else (images, targets)
            repeats = args.slow_repeats if slow else args.repeats
            ours_s, (ours, _) = best_time(
                lambda m=method: compute_maps(model, x, y, method=m, target_layer=layer, resize="bilinear"),
                device, repeats=repeats)
            cam_class = getattr(pytorch_grad_cam, THEIRS[method])
            with cam_class(model=model, target_layers=[model.get_submodule(layer)], **kwargs) as cam:
                if hasattr(cam, "batch_size"):
                    cam.batch_size = 32 if method == "ablationcam" else 16  # their defaults, set explicitly
                theirs_s, theirs = best_time(
                    lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in y]),
                    device, repeats=repeats)
            diff = float(np.abs(ours.cpu().numpy() - theirs).max())
            note = " (sign of the SVD)" if method == "eigencam" and diff > 1e-3 else ""
            label = f"{method} (batch {len(x)})" if slow else method
            print(f"| {name} | `{layer}` | {label} | {ours_s * 1e3:.0f} | {theirs_s * 1e3:.0f} | "
                  f"{theirs_s / ours_s:.2f}x | {diff:.1e}{note} |", flush=True)
        del model


if __name__ == "__main__":
    main()
