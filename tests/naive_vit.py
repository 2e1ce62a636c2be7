"""A naive float64 DeiT written from the ViT definition, one image and one head at a time: the
reference the DeiT backbone and the transformer methods' maps are tested against."""

import math

import torch
import torch.nn.functional as F


def naive_deit(net, images: torch.Tensor, sat: bool = False):
    """Float64, one image, one head at a time: ``(tokens after each block, attention weights per
    block (heads, T, T), final normed tokens)``, from the ViT definition. The positional
    embeddings of a grid other than 14 x 14 are the backbone's resize of them (tested against timm's).

    ``sat``: SAT's network (modern-wsol.md section 4): the localization token (plus its own
    position) appended after the patches; in blocks 9, 10, 11 every softmax weight of key ``j``
    times ``g_j = sigmoid(mean over heads of q_loc . k_j / sqrt(d))``; returns a fourth list,
    per image the gates ``(T,)`` of those three blocks."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    dim, heads = net.dim, net.heads
    d = dim // heads
    outs, atts, finals, all_gates = [], [], [], []
    for image in images.double():
        patches = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)[0]
        h, w = patches.shape[1:]
        tokens = [sd["cls_token"][0, 0]] + [patches[:, i, j] for i in range(h) for j in range(w)]
        with torch.no_grad():
            positions = net.position_embedding((h, w))[0].double()
        if sat:
            tokens.append(sd["loc_token"][0, 0])
            positions = torch.cat([positions, sd["loc_embed"][0]])
        x = torch.stack(tokens) + positions
        per_block, per_att, gates = [], [], []
        for b in range(12):
            p = f"blocks.{b}."
            y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
            q, k, v = qkv[:, :dim], qkv[:, dim: 2 * dim], qkv[:, 2 * dim:]
            heads_out, weights = [], []
            gated = sat and b >= 9
            if gated:  # the last token's query row, averaged over heads, through a sigmoid
                rows = [q[-1, n * d: (n + 1) * d] @ k[:, n * d: (n + 1) * d].T / math.sqrt(d) for n in range(heads)]
                gate = 1 / (1 + torch.exp(-sum(rows) / heads))
                gates.append(gate)
            for n in range(heads):
                qs, ks, vs = (t[:, n * d: (n + 1) * d] for t in (q, k, v))
                logits = qs @ ks.T / math.sqrt(d)
                a = torch.exp(logits - logits.max(1, keepdim=True).values)
                a = a / a.sum(1, keepdim=True)
                if gated:
                    a = a * gate[None, :]
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
        all_gates.append(gates)
    return (outs, atts, finals, all_gates) if sat else (outs, atts, finals)


def perturbed(model, scale: float = 0.1):
    """``model`` with N(0, scale) noise added to every parameter (in place; returned): weights of
    a trained network's spread, so errors in the maps show (a fresh DeiT's are near constant)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
