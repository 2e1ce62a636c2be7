"""DeiT (Touvron et al., 2021): a ViT with 16x16 patches, the transformer methods' backbone.

``DeiTBackbone("deit_small")`` is DeiT-S: 12 blocks, width 384, 6 heads, MLP ratio 4, LayerNorm
eps 1e-6, a class token, learned positional embeddings for 14x14 patches (224 px). Parameter
names are timm's and the official DeiT files' (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``), so
ImageNet weights load key for key (:func:`mnpo.models.weights.load_pretrained`).

Taps (``forward(x, taps)``), all from one pass that stops after the deepest asked for:

* ``blocks.N``: block N's output, the patch tokens as a map ``(B, C, H/16, W/16)`` (row-major,
  the class token dropped; a truncated pass from it still feeds the class token on);
* ``norm``: the final LayerNorm's patch tokens, the same shape;
* ``attention.N`` (inner): block N's attention weights ``softmax(q k^T / sqrt(d))``
  ``(B, heads, T, T)`` over all ``T`` tokens (class token first). Only a block whose weights
  are asked for computes them; every other block runs the fused kernel
  (``scaled_dot_product_attention``), which returns none.

Inputs whose side is not 224 get the positional embeddings of the 14x14 grid resized by
bicubic interpolation (antialiased, in float32, as timm's ``resample_abs_pos_embed``);
a side that is not a multiple of 16 loses its last pixels to the patch convolution.
``width`` scales the embedding width (the head count stays; the width must split over the heads).
``drop_path``: stochastic depth, from 0 at the first block to ``drop_path`` at the last (timm's).
Init as timm's: ``pos_embed`` truncated normal (std 0.02), ``cls_token`` N(0, 1e-6), Linear
layers truncated normal (std 0.02) with zero biases, the patch convolution PyTorch's default.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnpo.models.stages import TapInfo, gradient_leaf, run_tracked, scale_channels, wanted_taps

#: (width, heads) of each size; all have 12 blocks, patch 16, 224 px
DEIT_SIZES = {"deit_tiny": (192, 3), "deit_small": (384, 6), "deit_base": (768, 12)}
DEIT_NAMES = tuple(DEIT_SIZES)
DEPTH = 12
PATCH = 16
GRID = 14  # patches per side at 224 px: the grid the positional embeddings are learned on
MLP_RATIO = 4
#: timm's DeiT model names, for ``pretrained: imagenet`` through timm
TIMM_NAMES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
              "deit_base": "deit_base_patch16_224"}


class PatchEmbed(nn.Module):
    """``proj``: a 16x16 stride-16 convolution, ``(B, 3, H, W) -> (B, C, H/16, W/16)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, T, C)``: ``qkv`` then ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split over {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q``, ``k``, ``v``, each ``(B, heads, T, C / heads)``."""
        b, t, c = x.shape
        return self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, need_weights: bool = False, gate_query: int | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The attended tokens ``(B, T, C)``, with ``need_weights`` the weights ``(B, heads, T, T)``
        (rows: queries; without, the fused kernel and ``None``), and the gate (``None`` without
        ``gate_query``).

        ``gate_query``: SAT's gating by the token at that index (its localization token): ``g =
        sigmoid(mean over heads of q_t k^T / sqrt(d))`` ``(B, T)`` multiplies every query's
        softmax weight of key ``j`` by ``g_j`` (unrenormalized), which equals scaling the values:
        ``(softmax(A) * g) v = softmax(A) (g v)``, so the fused kernel serves it too.
        """
        q, k, v = self.qkv_heads(x)
        gate = None
        if gate_query is not None:
            gate = torch.sigmoid(((q[:, :, gate_query] * self.scale)[:, :, None] @ k.transpose(-2, -1))[:, :, 0].mean(1))
        if need_weights:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
            if gate is not None:
                weights = weights * gate[:, None, None, :]
            out = weights @ v
        else:
            gated = v if gate is None else v * gate[:, None, :, None]
            weights, out = None, F.scaled_dot_product_attention(q, k, gated)
        return self.proj(out.transpose(1, 2).flatten(2)), weights, gate


class Mlp(nn.Module):
    """``fc1``, GELU, ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual is zeroed with probability ``p``
    and the kept ones scaled by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x: Tensor, need_weights: bool = False, gate_query: int | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The block's output, its attention weights and its gate (see ``Attention.forward``)."""
        attended, weights, gate = self.attn(self.norm1(x), need_weights, gate_query)
        x = x + self.drop_path1(attended)
        return x + self.drop_path2(self.mlp(self.norm2(x))), weights, gate


class DeiTBackbone(nn.Module):
    """DeiT ``(B, 3, H, W) -> {tap: ...}`` (module docstring)."""

    #: tokens before the patch tokens (the class token)
    prefix_tokens = 1

    def __init__(self, name: str = "deit_small", width: float = 1.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if name not in DEIT_SIZES:
            raise ValueError(f"unknown DeiT size {name!r}; choose one of {DEIT_NAMES}")
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        full, heads = DEIT_SIZES[name]
        dim = scale_channels(full, width)
        if dim % heads:
            raise ValueError(f"{name} at width {width}: {dim} channels do not split over its {heads} heads")
        self.name, self.width, self.dim, self.heads = name, width, dim, heads
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, dim))
        rates = torch.linspace(0, drop_path, DEPTH).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.taps = {**{f"blocks.{i}": TapInfo(dim, PATCH) for i in range(DEPTH)}, "norm": TapInfo(dim, PATCH)}
        self.inner_taps = {f"attention.{i}": TapInfo(heads, PATCH) for i in range(DEPTH)}
        #: the block after which each tap is known (``norm``: after the last)
        self._depth_of = {**{f"blocks.{i}": i for i in range(DEPTH)}, **{f"attention.{i}": i for i in range(DEPTH)},
                          "norm": DEPTH}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed besides biases and norms (timm's)."""
        return {"pos_embed", "cls_token"}

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """``(1, 1 + h w, C)``: the class token's and the patches' embeddings for an ``h x w`` grid."""
        if grid == (GRID, GRID):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, GRID, GRID, self.dim).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], self.dim).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 1 + h w, C)``: the class token, then the patch tokens, plus positions."""
        patches = self.patch_embed(images)
        grid = tuple(patches.shape[-2:])
        tokens = torch.cat([self.cls_token.expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        return tokens + self.position_embedding(grid)

    def run_block(self, i: int, tokens: Tensor, need_weights: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Block ``i`` on ``tokens``: its output and its inner taps (``attention.i`` when asked)."""
        tokens, weights, _ = self.blocks[i](tokens, need_weights)
        return tokens, ({f"attention.{i}": weights} if need_weights else {})

    def forward(self, x: Tensor, taps: Sequence[str], grad_from: str | None = None,
                replace: tuple[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The requested taps (and ``grad_from``, a map tap, returned as a leaf requiring grad:
        what comes before it runs without autograd); see ``VGG16Backbone.forward``."""
        if replace is not None:
            raise ValueError(f"replace (ablation inside the network) is not supported on {self.name}")
        wanted = wanted_taps({**self.taps, **self.inner_taps}, taps, grad_from)
        if grad_from is not None and grad_from not in self.taps:
            raise KeyError(f"grad_from={grad_from!r}: a truncated pass starts at a map tap, one of {list(self.taps)}")
        if not wanted:
            return {}
        deepest = max(self._depth_of[t] for t in wanted)
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        tracked = grad_from is not None
        run = run_tracked if tracked else (lambda f, *t: f(*t))
        out: dict[str, Tensor] = {}
        tokens = run(self.embed, x.detach() if tracked else x)
        for i in range(min(deepest + 1, DEPTH)):
            need = f"attention.{i}" in wanted
            tokens, extras = run(lambda t, i=i, n=need: self.run_block(i, t, n), tokens)
            out.update({name: value for name, value in extras.items() if name in wanted})
            tokens = self._tap(f"blocks.{i}", tokens, grid, wanted, grad_from, out)
        if deepest == DEPTH:
            self._tap("norm", run(self.norm, tokens), grid, wanted, grad_from, out)
        return {t: out[t] for t in wanted}

    def _tap(self, name: str, tokens: Tensor, grid: tuple[int, int], wanted: Sequence[str],
             grad_from: str | None, out: dict[str, Tensor]) -> Tensor:
        """Store ``name``'s patch-token map if wanted; at ``grad_from``, continue from a leaf."""
        if name not in wanted:
            return tokens
        if name == grad_from:
            leaf = gradient_leaf(patch_map(tokens, grid, self.prefix_tokens))
            rest = [t.clone() if t.is_inference() else t for t in (tokens[:, : self.prefix_tokens],
                                                                     tokens[:, self.prefix_tokens + leaf[0, 0].numel():])]
            tokens = torch.cat([rest[0], leaf.flatten(2).transpose(1, 2), rest[1]], dim=1)
            out[name] = leaf
        else:
            out[name] = patch_map(tokens, grid, self.prefix_tokens)
        return tokens


def patch_map(tokens: Tensor, grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """The patch tokens of ``(B, T, C)`` (after ``prefix`` leading tokens, row-major) as a map
    ``(B, C, h, w)``."""
    h, w = grid
    return tokens[:, prefix: prefix + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def class_token_attention(attentions: Sequence[Tensor], grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """TS-CAM's attention map ``(B, h, w)``: per block the weights ``(B, heads, T, T)`` averaged
    over heads, the class token's row (query 0) at the patch tokens, summed over the blocks."""
    total = torch.stack([a.mean(1)[:, 0, prefix: prefix + grid[0] * grid[1]] for a in attentions]).sum(0)
    return total.reshape(-1, *grid)
