"""mnpo's own networks seen through the map methods' seam (:class:`mnpo.maps.source.FeatureSource`).

``NetworkSource(model, images, targets)`` answers the map methods for a ``MultiBranchNet``, an
``AcolNet`` or an ``SpgNet`` with the networks' own forward modes: features by name
(``return_features``, ``taps``), a graph truncated at a feature (``grad_from``) and ablation
inside the network (``replace``). ACoL's test-time erasing lives here: the forward passes on
``images`` themselves erase by the class ``targets`` name (the predicted class without
targets), as wsolevaluation's test map does; passes on other inputs (Score-CAM's masked copies)
erase by their own prediction. ACoL's ``cam`` is its own test map (:func:`acol_class_maps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mnpo.models.acol import acol_class_maps
from mnpo.models.bas import bas_generator_maps
from mnpo.models.method_nets import MethodNet, network_kind
from mnpo.models.multibranch import MultiBranchNet
from mnpo.models.tscam import ATTENTION_TAPS, tscam_maps

#: Default target layer of the gradient methods per backbone: the released ``conv5_2`` on
#: VGG16; on ResNet50 ``layer3``, the last stage before the head at the same stride; on
#: InceptionV3 ``Mixed_6d``, the block before the last at the head's stride (as ``conv5_2``); on a
#: DeiT ``blocks.10``, the last block's input (pytorch-grad-cam's ViT example reads
#: ``blocks[-1].norm1``, the same tokens after the block's LayerNorm).
DEFAULT_GRADIENT_LAYER = {"vgg16": "conv5_2", "resnet50": "layer3", "inception_v3": "Mixed_6d",
                          "deit_tiny": "blocks.10", "deit_small": "blocks.10", "deit_base": "blocks.10"}


def is_mnpo_network(model: Any) -> bool:
    """Whether ``model`` is one of mnpo's networks (answered by :class:`NetworkSource`)."""
    return isinstance(model, (MultiBranchNet, MethodNet))


def _full(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


class Tracked:
    """A forward pass truncated at a layer: ``leaf`` (the layer's output, a leaf requiring grad),
    ``logits`` (one ``(B, K)`` per branch, main first, recording autograd from ``leaf``) and
    ``grid`` (``leaf``-shaped tensor -> ``(B, C, h, w)``; the identity for convolution maps).
    ``shared``: the graph serves several backward passes (one per class), so each keeps it."""

    def __init__(self, leaf: Tensor, logits: tuple[Tensor, ...], grid=None) -> None:
        self.leaf, self.logits, self.shared = leaf, logits, False
        self.grid = grid if grid is not None else (lambda t: t)


class NetworkSource:
    """The seam for mnpo's networks; see the module docstring."""

    def __init__(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> None:
        if not is_mnpo_network(model):
            raise TypeError(f"NetworkSource needs one of mnpo's networks, got {type(model).__name__}")
        self.model, self._images, self._targets = model, images, targets
        self.num_classes = model.num_classes
        self.branches = tuple(b.name for b in model.layout.branches)
        self.default_layer = "head"
        self.default_gradient_layer = DEFAULT_GRADIENT_LAYER[model.layout.backbone]

    def __call__(self, x: Tensor, **kwargs: Any):
        if (network_kind(self.model.layout) == "acol" and self._targets is not None and x is self._images
                and "labels" not in kwargs):
            kwargs["labels"] = self._targets
        return self.model(x, **kwargs)

    def logits(self, x: Tensor) -> Tensor:
        """The main branch's logits ``(B, K)`` of ``x``, without autograd."""
        with torch.inference_mode():
            return self(x).logits[0]

    def activations(self, images: Tensor, layer: str) -> tuple[Tensor, Tensor]:
        """``A`` at ``layer`` ``(B, C, h, w)`` and the main logits ``(B, K)``, without autograd."""
        self.model.resolve_feature(layer)  # an unknown name is refused here, with the names there are
        taps = [layer] if layer in self.model.backbone.taps else []
        with torch.inference_mode():
            out = self(images, return_features=True, taps=taps)
        return out.features[layer], out.logits[0]

    def tracked(self, images: Tensor, layer: str) -> Tracked:
        """One forward truncated at ``layer``: what comes before it runs without autograd."""
        out = self(images, return_features=True, grad_from=layer)
        return Tracked(out.features[layer], tuple(out.logits))

    def head_weight(self, images: Tensor, layer: str) -> Tensor | None:
        """The classifier's weight ``(K, C)`` when ``layer`` is what GAP and the main classifier read."""
        if self.model.resolve_feature(layer) == self.model.resolve_feature("head"):
            return self.model.classifier.weight
        return None

    def ablated_logits(self, images: Tensor, layer: str, copies: Tensor) -> Tensor:
        """Main logits ``(k B, K)`` with ``layer``'s output replaced by ``copies`` ``(k B, C, h, w)``
        (each image's ``k`` copies adjacent); what comes before the layer runs once on ``images``."""
        with torch.inference_mode():
            return self(images, replace=(layer, copies)).logits[0]

    def ablation_runs_suffix(self, images: Tensor, layer: str) -> bool:
        """Always: the network continues from the replaced feature (``replace=``)."""
        return True

    def branch_features(self, images: Tensor) -> tuple[Tensor, list[tuple[str, Tensor, Tensor]]]:
        """Main logits and, per branch, ``(name, pre-GAP features (B, C, h, w), classifier weight
        (K, C))``, without autograd."""
        with torch.inference_mode():
            out = self(images, return_features=True)
        evidence = getattr(self.model, "weight_evidence", None)  # a transformer's conv head (TS-CAM, SAT)
        if evidence is not None:
            return out.logits[0], evidence(out.features)
        return out.logits[0], [(name, out.features[name], self.model.classifier_for(name).weight)
                               for name in self.branches]

    def own_cam(self, images: Tensor, targets: Tensor | None, top_k: int | None = None
                ) -> tuple[Tensor, Tensor] | None:
        """ACoL's own test map ``(B, h, w)`` (the max of A's and B's normalized class maps, in
        full precision) or BAS's (its generator's map of the target, or with ``top_k`` the mean
        of the top-k predicted classes' maps) or TS-CAM's (class-token attention times the semantic
        map of the class, :func:`~mnpo.models.tscam.tscam_maps`) or SAT's (its gates' map, the same
        for every class) and the main logits; ``None`` for the networks
        whose map is plain CAM."""
        kind = network_kind(self.model.layout)
        if kind == "sat":  # class-agnostic: the same map for every target
            with torch.inference_mode():
                out = self(images, return_features=True)
            return _full(out.features["sat_map"][:, 0]), out.logits[0]
        if kind == "tscam":
            with torch.inference_mode():
                out = self(images, return_features=True, taps=ATTENTION_TAPS)
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                logits = out.logits[0]
                classes = logits.argmax(1) if targets is None else targets
                attentions = [_full(out.features[t]) for t in ATTENTION_TAPS]
                return tscam_maps(attentions, _full(out.features["main"]), classes), logits
        if kind == "bas":
            with torch.inference_mode():
                out = self(images, return_features=True)
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                logits = out.logits[0]
                return bas_generator_maps(_full(out.features["generator"]), logits, targets, top_k), logits
        if kind != "acol":
            return None
        logits, branches = self.branch_features(images)
        targets = logits.argmax(1) if targets is None else targets
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return acol_class_maps(self.model, {name: _full(f) for name, f, _ in branches}, targets), logits
