"""Deliberately naive map implementations: float64, one image at a time, full backward passes
(``.backward()`` through the whole network, gradients read off ``retain_grad``), NumPy for
the arithmetic and ``cv2.resize`` as the released code resizes. Slow and obvious on purpose:
the fast ``compute_maps`` must agree with them."""

import copy

import cv2
import numpy as np
import torch

CV2_RESIZE = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}


def h_numpy(w, mode, a, b):
    out = np.empty_like(w)
    for i, value in enumerate(w):  # one weight at a time
        if mode == "scale":
            out[i] = a * value if value > 0 else b * value
        else:
            out[i] = a if value > 0 else b
    return out


def normalize_numpy(cam):
    """The released ``normalize_scoremap``: NaN or constant -> zeros, else min-max."""
    if np.isnan(cam).any() or not np.isfinite(cam).all() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam = cam - cam.min()
    return cam / cam.max()


def weighted_mean(weights, features):
    return sum(weights[c] * features[c] for c in range(len(weights))) / len(weights)


def resize(cam, size, mode):
    return cv2.resize(cam, (size[1], size[0]), interpolation=CV2_RESIZE[mode])


def grad_at(model, x, layer, objective):
    """d objective(logits) / d features[layer] by a full backward pass, for one image."""
    model.zero_grad(set_to_none=True)
    out = model(x, return_features=True, taps=[layer] if layer in model.backbone.taps else [])
    feature = out.features[layer]
    feature.retain_grad()
    objective(out.logits).backward()
    return as_numpy(feature[0]), as_numpy(feature.grad[0]), [as_numpy(l[0]) for l in out.logits]


def as_numpy(t):
    return t.detach().double().numpy()


def naive_maps(model, images, targets, method, h_mode="scale", a=None, b=None, target_layer=None,
               fusion="max", resize_mode="bicubic", loss_gradient="released", loss_scale=10.0, relu=True,
               dtype=torch.float64):
    """Maps ``(B, H, W)`` float64. The network runs in ``dtype`` (float32 to run it under an
    autocast context); everything after the network is float64 NumPy."""
    model = copy.deepcopy(model).to(dtype).eval()
    size = tuple(images.shape[-2:])
    default_h = {"mnpo": (10.0, 5.0), "mnpos": (8.0, 4.0)}.get(method, (1.0, 1.0))
    a = default_h[0] if a is None else a
    b = default_h[1] if b is None else b
    default_layer = {"vgg16": "conv5_2", "resnet50": "layer3"}[model.layout.backbone]
    maps = []
    for i in range(images.shape[0]):
        x = images[i : i + 1].to(dtype)
        y = int(targets[i])
        if method in ("cam", "mnpo"):
            with torch.no_grad():
                out = model(x, return_features=True)
            w = as_numpy(model.classifier.weight[y])
            if method == "cam":
                cam = resize(weighted_mean(w, as_numpy(out.features["head"][0])), size, resize_mode)
            else:
                hw = h_numpy(w, h_mode, a, b)
                per_branch = [resize(weighted_mean(hw, as_numpy(out.features[br.name][0])), size, resize_mode)
                              for br in model.layout.branches]
                cam = np.maximum.reduce(per_branch) if fusion == "max" else np.mean(per_branch, axis=0)
        elif method == "gradcam":
            layer = target_layer or "head"
            A, G, _ = grad_at(model, x, layer, lambda logits: logits[0][0, y])
            weights = G.mean(axis=(1, 2))
            cam = sum(weights[c] * A[c] for c in range(len(weights)))
            if relu:
                cam = np.maximum(cam, 0)
            cam = resize(cam, size, resize_mode)
        else:  # mnpos, dgl: one full backward per branch and per vector, as the release does
            layer = target_layer or default_layer
            branches = range(len(model.layout.branches)) if method == "mnpos" else range(1)
            G = D = 0
            for k in branches:
                A, g, logits = grad_at(model, x, layer, lambda out, k=k: out[k][0, y])
                G = G + g
                p = np.exp(logits[k] - logits[k].max())
                p /= p.sum()
                t = np.zeros_like(p)
                t[y] = loss_scale
                v = (p - t) if loss_gradient == "released" else (loss_scale * p - t)
                vt = torch.from_numpy(v).to(dtype)
                _, d, _ = grad_at(model, x, layer, lambda out, k=k: (out[k][0] * vt).sum())
                D = D + d
            alpha = h_numpy(G.sum(axis=(1, 2)), h_mode, a, b)
            enhanced = A / np.sqrt((A ** 2).sum()) - D / np.sqrt((D ** 2).sum())
            cam = resize(weighted_mean(alpha, enhanced), size, resize_mode)
        maps.append(normalize_numpy(cam))
    return np.stack(maps)
