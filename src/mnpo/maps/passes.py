"""What every map method does with the network: run it truncated at a feature, take
vector-Jacobian products there, and keep the map arithmetic in full precision."""

from __future__ import annotations

import torch
from torch import Tensor


def full_precision(t: Tensor):
    """A context without autocast for the map arithmetic (the network itself may run in bf16)."""
    return torch.autocast(t.device.type, enabled=False)


def acc(t: Tensor) -> Tensor:
    """The map arithmetic's dtype: float32, or float64 for a float64 network."""
    return t if t.dtype == torch.float64 else t.float()


def predicted(targets: Tensor | None, logits: Tensor) -> Tensor:
    """``targets``, or the predicted class of each image when there are none: ``(B,)``."""
    return logits.argmax(1) if targets is None else targets


def vjp(outputs: list[Tensor], vectors: list[Tensor], target: Tensor, layer: str, retain: bool = False,
        batched: bool = False) -> Tensor:
    """``sum_i J_i^T vectors[i]`` at ``target`` over the outputs that depend on it (one truncated pass).

    ``batched``: every ``vectors[i]`` has a leading axis of products taken apart
    (``is_grads_batched``); the result has that axis too.
    """
    pairs = [(o, v) for o, v in zip(outputs, vectors, strict=True) if o.requires_grad]
    if not pairs:
        raise independent_of(layer)
    (grad,) = torch.autograd.grad([o for o, _ in pairs], target, grad_outputs=[v for _, v in pairs],
                                  retain_graph=retain, is_grads_batched=batched, allow_unused=True)
    if grad is None:
        raise independent_of(layer)
    return grad


def independent_of(layer: str) -> ValueError:
    """The error for a target layer that the logits used do not depend on."""
    return ValueError(f"the logits used do not depend on target layer {layer!r} through autograd (it does not "
                      "feed them, or a detach() / no_grad block cuts the gradient); choose a layer before the "
                      "head that the scores are computed from (on mnpo's networks: a backbone layer or one of "
                      "the main branch)")


def selector(logits: Tensor, targets: Tensor) -> Tensor:
    """One-hot rows ``e_y`` ``(B, K)`` in the logits' dtype: the vector that picks ``y``'s logit."""
    return torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)


def activations_and_gradient(source, images: Tensor, targets: Tensor | None,
                             layer) -> tuple[Tensor, Tensor, Tensor]:
    """``A`` at ``layer`` ``(B, C, h, w)``, ``G = d logit_y / d A`` (main branch) and the logits
    ``(B, K)``: one forward truncated at ``layer`` and one backward, all detached."""
    run = source.tracked(images, layer)
    logits = run.logits[0]
    targets = predicted(targets, logits.detach())
    G = vjp([logits], [selector(logits, targets)], run.leaf, layer, retain=run.shared)
    return run.grid(run.leaf.detach()), run.grid(G), logits.detach()
