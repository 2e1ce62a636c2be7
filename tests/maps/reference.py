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


def naive_normalization(cam, mode, percentile=0.45):
    """One map, from the spec (section 1 of modern-wsol.md) and IVR's ``normalize_scoremap``,
    in numpy float64: NaN, infinity, a constant map or a zero divisor -> zeros."""
    cam = np.array(cam, dtype=np.float64)
    zeros = np.zeros_like(cam)
    if not np.isfinite(cam).all() or cam.min() == cam.max():
        return zeros
    ordered = np.sort(cam.ravel())
    if mode == "minmax":
        shifted, divisor = cam - cam.min(), cam.max() - cam.min()
    elif mode == "max":
        shifted = np.maximum(0, cam)
        divisor = shifted.max()
    elif mode == "pas":
        shifted = cam - cam.min()
        divisor = np.sort(shifted.ravel())[int(shifted.size * 0.9)]
    else:
        shifted = np.maximum(0, cam - ordered[int(cam.size * percentile)])
        divisor = shifted.max()
    if divisor == 0:
        return zeros
    out = shifted / divisor
    return np.minimum(1, out) if mode == "pas" else out


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


CAM_FAMILY = ("gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam", "eigencam")


def bilinear_corners_aligned(channel, size):
    """Bilinear upsampling with corners aligned, one value at a time: (h, w) -> size."""
    h, w = channel.shape
    out = np.empty(size)
    for i in range(size[0]):
        for j in range(size[1]):
            y = i * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
            x = j * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
            y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * channel[y0, x0] + (1 - dy) * dx * channel[y0, x1]
                         + dy * (1 - dx) * channel[y1, x0] + dy * dx * channel[y1, x1])
    return out


def layer_module(model, layer):
    """The module whose output is feature ``layer`` (a backbone tap or the main branch's head)."""
    if layer == "head":  # the main branch's last block, or the backbone tap it outputs
        main = model.layout.branches[0]
        if main.blocks:
            return model.branches[main.name][main.output]
        layer = main.output
    if model.layout.backbone == "vgg16":
        return model.backbone.features[model.backbone._tap_index[layer]]
    return getattr(model.backbone, layer)


def target_logit(model, x, y, edit=None, layer=None):
    """The main branch's logit ``y`` for one image; ``edit`` changes ``layer``'s output (a hook:
    the reference's own way, independent of the fast path's ``replace``)."""
    handle = None
    if edit is not None:
        handle = layer_module(model, layer).register_forward_hook(lambda m, i, out: edit(out.clone()))
    try:
        with torch.no_grad():
            return float(model(x).logits[0][0, y])
    finally:
        if handle is not None:
            handle.remove()


def naive_cam_family(model, x, y, method, layer, relu):
    """The raw map (h, w) of one image, from the definitions in float64, channel by channel."""
    if method in ("scorecam", "ablationcam", "eigencam"):
        with torch.no_grad():
            out = model(x, return_features=True, taps=[layer] if layer in model.backbone.taps else [])
        A = as_numpy(out.features[layer][0])
        C = A.shape[0]
        if method == "scorecam":
            scores = np.empty(C)
            for c in range(C):
                up = bilinear_corners_aligned(A[c], x.shape[-2:])
                mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                scores[c] = target_logit(model, x * torch.from_numpy(mask).to(x.dtype), y)
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        elif method == "ablationcam":
            full = target_logit(model, x, y)
            weights = np.empty(C)
            for c in range(C):
                def zero_channel(out, c=c):
                    out[:, c] = 0
                    return out
                ablated = target_logit(model, x, y, zero_channel, layer)
                weights[c] = (full - ablated) / (full if full != 0 else 1.0)
        else:
            positions = A.reshape(C, -1).T
            centered = positions - positions.mean(axis=0)
            _, _, vt = np.linalg.svd(centered)
            projection = centered @ vt[0]
            if (projection * A.sum(axis=0).ravel()).sum() < 0:
                projection = -projection
            cam = projection.reshape(A.shape[1:])
            return np.maximum(cam, 0) if relu else cam
    else:
        A, G, _ = grad_at(model, x, layer, lambda logits: logits[0][0, y])
        C = A.shape[0]
        if method == "gradcampp":
            weights = np.zeros(C)
            for c in range(C):
                total = A[c].sum()
                for g in G[c].ravel():
                    if g > 0:
                        weights[c] += g * g * g / (2 * g * g + total * g ** 3 + 1e-6)
        elif method == "xgradcam":
            weights = np.array([(G[c] * A[c]).sum() / (A[c].sum() + 1e-7) for c in range(C)])
        elif method == "layercam":
            weights = None
            cam = sum(np.maximum(G[c], 0) * A[c] for c in range(C))
        else:  # hirescam
            weights = None
            cam = sum(G[c] * A[c] for c in range(C))
    if weights is not None:
        cam = sum(weights[c] * A[c] for c in range(C))
    return np.maximum(cam, 0) if relu else cam


def naive_maps(model, images, targets, method, h_mode="scale", a=None, b=None, target_layer=None,
               fusion="max", resize_mode="bicubic", loss_gradient="released", loss_scale=10.0, relu=True,
               dtype=torch.float64, normalize="minmax", percentile=0.45):
    """Maps ``(B, H, W)`` float64. The network runs in ``dtype`` (float32 to run it under an
    autocast context); everything after the network is float64 NumPy; each map is normalized
    last (``normalize``: :func:`naive_normalization`'s modes)."""
    model = copy.deepcopy(model).to(dtype).eval()
    size = tuple(images.shape[-2:])
    default_h = {"mnpo": (10.0, 5.0), "mnpos": (8.0, 4.0)}.get(method, (1.0, 1.0))
    a = default_h[0] if a is None else a
    b = default_h[1] if b is None else b
    default_layer = {"vgg16": "conv5_2", "resnet50": "layer3", "inception_v3": "Mixed_6d"}[model.layout.backbone]
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
        elif method == "center":  # pixel by pixel: distance of the pixel centre to the image centre
            h, w = size
            cam = np.array([[np.exp(-(((r + 0.5) / h - 0.5) ** 2 + ((c + 0.5) / w - 0.5) ** 2) / (2 * 0.25 ** 2))
                             for c in range(w)] for r in range(h)])
        elif method in CAM_FAMILY:
            cam = resize(naive_cam_family(model, x, y, method, target_layer or "head", relu), size, resize_mode)
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
        maps.append(normalize_numpy(cam) if normalize == "minmax" else naive_normalization(cam, normalize, percentile))
    return np.stack(maps)
