"""A naive float64 DeiT written from the ViT definition, one image and one head at a time: the
reference the DeiT backbone and the transformer methods' maps are tested against."""

import math

import torch
import torch.nn.functional as F


def naive_deit(net, images: torch.Tensor):
    """Float64, one image, one head at a time: ``(tokens after each block, attention weights per
    block (heads, T, T), final normed tokens)``, from the ViT definition. The positional
    embeddings of a grid other than 14 x 14 are the backbone's resize of them (tested against timm's)."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    dim, heads = net.dim, net.heads
    d = dim // heads
    outs, atts, finals = [], [], []
    for image in images.double():
        patches = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)[0]
        h, w = patches.shape[1:]
        tokens = [sd["cls_token"][0, 0]] + [patches[:, i, j] for i in range(h) for j in range(w)]
        with torch.no_grad():
            positions = net.position_embedding((h, w))[0].double()
        x = torch.stack(tokens) + positions
        per_block, per_att = [], []
        for b in range(12):
            p = f"blocks.{b}."
            y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
            q, k, v = qkv[:, :dim], qkv[:, dim: 2 * dim], qkv[:, 2 * dim:]
            heads_out, weights = [], []
            for n in range(heads):
                qs, ks, vs = (t[:, n * d: (n + 1) * d] for t in (q, k, v))
                logits = qs @ ks.T / math.sqrt(d)
                a = torch.exp(logits - logits.max(1, keepdim=True).values)
                a = a / a.sum(1, keepdim=True)
                weights.append(a)
                heads_out.append(a @ vs)
            x = x + torch.cat(heads_out, 1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
            y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            hidden = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
            hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
            x = x + hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
            per_block.append(x)
            per_att.append(torch.stack(weights))
        outs.append(per_block)
        atts.append(per_att)
        finals.append(F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-6))
    return outs, atts, finals
