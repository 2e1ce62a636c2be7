"""SCM, the spatial calibration module (Bai et al., ECCV 2022; ``modern-wsol.md`` section 4).

SCM trains a TS-CAM network (``deit_*-tscam``) through a module that exists in training only
(the authors' ``SCM`` model in ``lib/models/deit.py`` and ``Fuse`` in ``graphFusion.py``); at
test time the network is TS-CAM's and so is its map. Four :class:`CalibrationLayer` s refine the
semantic maps ``S`` ``(B, K, h, w)`` and the map ``c`` ``(B, N)`` (``N = h w``), which starts as
the class token's attention (TS-CAM's ``A``), min-max normalized. Each layer:

* ``sim``: the cosine similarity of the patches' class vectors ``S[:, :, p]`` ``(B, N, N)``;
* ``G = (rate * sim - 1) * L``, elementwise, ``L = D - W`` the Laplacian of the 4-neighbour patch
  grid (:func:`grid_laplacian`); ``rate`` learnable, 1 at the start;
* ``P``: the transpose of ``G``'s inverse, approximated by Newton-Schulz iterations
  (:func:`newton_schulz_inverse`; 16 in the first layer, 4 in the others, as the authors');
* ``c' = minmax(tanhshrink(P c / (t max(c))))``, ``t`` learnable (the temperature, 0.5 at the
  start), ``tanhshrink(x) = x - tanh(x)``;
* ``S <- S + S * c'`` (every class's map scaled by ``c'``), ``c <- c + c'``.

The logits in training are GAP of the last ``S``; the loss is cross-entropy
(:class:`mnpo.engine.train.Trainer`, ``method.name: scm``). The cosine similarity divides by
the product of the two norms clamped at 1e-12 (the authors' divide unclamped: an all-zero class
vector would make the loss NaN).

Precision: ``tanhshrink`` is computed in float64 (:func:`tanhshrink`). In float32, ``x - tanh(x)``
cancels: the later layers' inputs are of order 0.01 (their 4 Newton-Schulz steps leave ``P``
small), where ``x^3 / 3 ~ 3e-7`` is below float32's resolution of ``x``, so a row came out
noise or one constant value, and the authors' min-max of a constant row is 0 / 0: a DeiT-Tiny
run on the synthetic ``shapes`` preset diverged so (NaN at epoch 12). A constant row is mapped
to zeros (no update) rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnpo.models.deit import class_token_attention
from mnpo.models.tscam import ATTENTION_TAPS

#: Newton-Schulz iterations per layer (the first layer's ``Encoder`` default 16, the others 4)
SCM_ITERATIONS = (16, 4, 4, 4)
#: Newton-Schulz's starting scale: ``X_0 = alpha G^T`` (the authors' ``inverse_schulz`` default)
SCHULZ_ALPHA = 0.002


def grid_laplacian(h: int, w: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``D - W`` ``(h w, h w)`` of the 4-neighbour graph on an ``h x w`` grid (row-major): ``W`` 1
    between horizontal and vertical neighbours, ``D`` the degrees (2 at corners, 3 at edges, 4 inside)."""
    n = h * w
    index = torch.arange(n, device=device).reshape(h, w)
    adjacency = torch.zeros(n, n, dtype=dtype, device=device)
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        adjacency[a.flatten(), b.flatten()] = 1
        adjacency[b.flatten(), a.flatten()] = 1
    return torch.diag(adjacency.sum(0)) - adjacency


def newton_schulz_inverse(x: Tensor, iterations: int, alpha: float = SCHULZ_ALPHA) -> Tensor:
    """Newton-Schulz approximation of ``x^-1`` for ``(..., n, n)``: ``X_0 = alpha x^T`` (no
    gradient, as the authors' starting guess), ``X_{k+1} = X_k (2 I - x X_k)``.

    The residual squares each step: ``I - x X_k = (I - alpha x x^T)^(2^k)``, so ``X_k`` converges to
    ``x^-1`` when every singular value of ``x`` lies in ``(0, sqrt(2 / alpha))``; with few
    iterations it is that polynomial in ``x``, whatever ``x``'s conditioning.
    """
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    inverse = (alpha * x.transpose(-2, -1)).detach()
    for _ in range(iterations):
        inverse = inverse @ (2 * eye - x @ inverse)
    return inverse


def cosine_similarity_matrix(tokens: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B, N, D) -> (B, N, N)``: ``<t_i, t_j> / max(|t_i| |t_j|, eps)``."""
    norms = tokens.norm(dim=-1)
    return (tokens @ tokens.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :]).clamp(min=eps)


def minmax_rows(x: Tensor) -> Tensor:
    """``(B, N)``: each row shifted to minimum 0, then divided by its new maximum (the authors'
    ``norm_cam``); a constant row becomes zeros (theirs: NaN, 0 / 0)."""
    x = x - x.amin(1, keepdim=True)
    top = x.amax(1, keepdim=True)
    return torch.where(top > 0, x / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(x))


def tanhshrink(x: Tensor) -> Tensor:
    """``x - tanh(x)``, computed in float64 and returned in ``x``'s dtype: in float32 the
    difference cancels for small ``|x|`` (``x^3 / 3`` is lost below ``|x| ~ 0.01``)."""
    return F.tanhshrink(x.double()).to(x.dtype)


class CalibrationLayer(nn.Module):
    """One SCM layer (module docstring): ``(S (B, K, h, w), c (B, h w)) -> (S', c')``."""

    def __init__(self, iterations: int, rate: float = 1.0, temperature: float = 0.5) -> None:
        super().__init__()
        self.iterations = iterations
        self.rate = nn.Parameter(torch.full((1,), rate))
        self.temperature = nn.Parameter(torch.full((1,), temperature))

    def forward(self, semantic: Tensor, cam: Tensor) -> tuple[Tensor, Tensor]:
        b, k, h, w = semantic.shape
        sim = cosine_similarity_matrix(semantic.flatten(2).transpose(1, 2))
        laplacian = grid_laplacian(h, w, sim.dtype, sim.device)
        propagate = newton_schulz_inverse(laplacian * (self.rate * sim - 1), self.iterations).transpose(1, 2)
        update = (propagate @ cam[:, :, None])[:, :, 0]
        update = minmax_rows(tanhshrink(update / (self.temperature * cam.amax(1, keepdim=True))))
        return semantic + semantic * update.reshape(b, 1, h, w), cam + update


class SpatialCalibration(nn.Module):
    """SCM's four layers: ``(S (B, K, h, w), A (B, h, w)) -> logits (B, K)``, GAP of the calibrated
    semantic maps; ``A`` (the class token's attention) is min-max normalized first."""

    def __init__(self, iterations: tuple[int, ...] = SCM_ITERATIONS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CalibrationLayer(n) for n in iterations)

    def forward(self, semantic: Tensor, attention: Tensor) -> Tensor:
        """In float32 under autocast too (Newton-Schulz in half precision loses the inverse)."""
        with torch.autocast(semantic.device.type, enabled=False):
            semantic = semantic.float() if semantic.dtype != torch.float64 else semantic
            cam = minmax_rows(attention.flatten(1).to(semantic.dtype))
            for layer in self.layers:
                semantic, cam = layer(semantic, cam)
            return semantic.mean((2, 3))


class ScmTraining(nn.Module):
    """What a training step calls for ``method.name: scm``: the TS-CAM network's semantic maps and
    class-token attention through :class:`SpatialCalibration`: ``images -> logits (B, K)``. One
    module, so data parallelism reduces the calibration's gradients with the network's."""

    def __init__(self, network: nn.Module, calibration: SpatialCalibration) -> None:
        super().__init__()
        self.network, self.calibration = network, calibration

    def forward(self, images: Tensor) -> Tensor:
        out = self.network(images, return_features=True, taps=ATTENTION_TAPS)
        semantic = out.features["main"]
        attention = class_token_attention([out.features[t] for t in ATTENTION_TAPS], tuple(semantic.shape[-2:]))
        return self.calibration(semantic, attention)
