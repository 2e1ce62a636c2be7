"""What the networks of the WSOL methods that change the architecture (ACoL, SPG) share.

A ``MethodLayout`` names the method's network (``acol``, ``spg``, ``bas`` or ``bgc``), the backbone and the width
(and ACoL's erasing threshold, which acts at test time too). It plays the part of a
``NetworkLayout``: it is saved in checkpoints (``to_dict`` adds ``"network"``) and read back
by :func:`layout_from_dict`. The networks (:class:`mnpo.models.acol.AcolNet`,
:class:`mnpo.models.spg.SpgNet`) answer the calls the engine and the map methods make of a
``MultiBranchNet``: ``forward(x, return_features, taps, grad_from)`` returning
``MultiBranchOutput``, ``classifier`` (the main branch's), ``classifier_for(branch)``,
``feature_names``, ``resolve_feature``; their forward also takes ``labels`` (the class whose
map steers ACoL's erasing and SPG's masks; ``None``: the predicted one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mnpo.models.backbones import BACKBONE_NAMES, VggPools, build_backbone
from mnpo.models.deit import DEIT_NAMES
from mnpo.models.stages import gradient_leaf, run_tracked
from mnpo.models.multibranch import LayoutError, check_layout_keys, MultiBranchOutput, NetworkLayout

#: Networks of the training methods that change the architecture (spec 2.2, 2.3), and the
#: transformer methods' (``modern-wsol.md`` section 4).
METHOD_NETWORKS = ("acol", "spg", "bas", "bgc", "tscam", "sat")
#: the transformer networks, built on a DeiT
TRANSFORMER_NETWORKS = ("tscam", "sat")
#: the backbones a method network is built on, where not the three CNNs
NETWORK_BACKBONES: dict[str, tuple[str, ...]] = {name: DEIT_NAMES for name in TRANSFORMER_NETWORKS}
#: ACoL's ``acol_threshold`` default (wsolevaluation's ``config.py``).
ACOL_THRESHOLD = 0.7


@dataclass(frozen=True)
class BranchName:
    """A branch as code iterating ``layout.branches`` sees it (only its name)."""

    name: str


@dataclass(frozen=True)
class MethodLayout:
    """The network of ``network`` (``acol``, ``spg``) on ``backbone`` at ``width``.

    acol_threshold: ACoL erases the head's input where the normalized class map of branch A
    reaches it (training and test); ignored by SPG.
    large_feature_map: the backbone's last stage at stride 8 (28x28 maps at 224), as
    wsolevaluation's option.
    """

    network: str
    backbone: str
    width: float = 1.0
    acol_threshold: float = ACOL_THRESHOLD
    large_feature_map: bool = False
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.network not in METHOD_NETWORKS:
            raise LayoutError(f"network {self.network!r}: choose one of {METHOD_NETWORKS}")
        if self.backbone not in BACKBONE_NAMES + DEIT_NAMES:
            raise LayoutError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONE_NAMES + DEIT_NAMES}")
        if self.backbone not in NETWORK_BACKBONES.get(self.network, BACKBONE_NAMES):
            raise LayoutError(f"the {self.network} network is built on {NETWORK_BACKBONES.get(self.network, BACKBONE_NAMES)}, "
                              f"not {self.backbone!r}")
        if self.network == "bas" and self.large_feature_map:
            raise LayoutError("the bas network fixes its own strides (the generator at 8, the head at 16): "
                              "large_feature_map does not apply")
        if self.backbone in DEIT_NAMES and self.large_feature_map:
            raise LayoutError(f"large_feature_map is a CNN option; {self.backbone} keeps its 16x16 patches")
        if self.drop_path and self.backbone not in DEIT_NAMES:
            raise LayoutError(f"drop_path={self.drop_path} is a transformer option; {self.backbone} has no residual "
                              "blocks to drop")
        if not 0 <= self.drop_path < 1:
            raise LayoutError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not self.width > 0:
            raise LayoutError(f"width must be > 0, got {self.width}")
        if not 0 <= self.acol_threshold <= 1:
            raise LayoutError(f"acol_threshold must be in [0, 1], got {self.acol_threshold}")

    @property
    def branches(self) -> tuple[BranchName, ...]:
        """ACoL: its two classifiers ``A`` (main) and ``B``; SPG: ``main`` (its side branches
        are not class maps)."""
        return (BranchName("A"), BranchName("B")) if self.network == "acol" else (BranchName("main"),)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"network": self.network, "backbone": self.backbone, "width": float(self.width)}
        if self.network == "acol":
            data["acol_threshold"] = float(self.acol_threshold)
        if self.large_feature_map:
            data["large_feature_map"] = True
        if self.drop_path:
            data["drop_path"] = float(self.drop_path)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodLayout":
        check_layout_keys(data, {"network", "backbone", "width", "acol_threshold", "large_feature_map", "drop_path"})
        try:
            return cls(network=data["network"], backbone=data["backbone"], width=float(data.get("width", 1.0)),
                       acol_threshold=float(data.get("acol_threshold", ACOL_THRESHOLD)),
                       large_feature_map=data.get("large_feature_map", False),
                       drop_path=float(data.get("drop_path", 0.0)))
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutError(f"malformed layout: {err!r}") from None


def layout_from_dict(data: Mapping[str, Any]) -> NetworkLayout | MethodLayout:
    """A checkpoint's layout: a ``MethodLayout`` when it names a method network, else a
    ``NetworkLayout``."""
    if not isinstance(data, Mapping):
        raise LayoutError(f"a layout must be a mapping, got {type(data).__name__}")
    if "network" in data:
        return MethodLayout.from_dict(data)
    return NetworkLayout.from_dict(data)


def network_kind(layout: NetworkLayout | MethodLayout) -> str:
    """``"multibranch"`` or the method network's name (``"acol"``, ``"spg"``, ``"bas"``, ``"bgc"``, ``"tscam"``, ``"sat"``)."""
    return layout.network if isinstance(layout, MethodLayout) else "multibranch"


class MethodNet(nn.Module):
    """Backbone + the method's heads. Subclasses build ``heads`` and define ``_heads``.

    ``forward`` runs the backbone for the taps ``_taps`` (and ``taps``), then ``_heads``, which
    returns the logits and the named features; see ``MultiBranchNet.forward`` for
    ``return_features``, ``taps`` and ``grad_from`` (a backbone tap or one of the network's
    features). ``replace`` (ablation) is not supported.
    """

    _taps: tuple[str, ...] = ()
    #: feature names the heads return, besides the backbone taps
    head_features: tuple[str, ...] = ()

    def __init__(self, layout: MethodLayout, num_classes: int, vgg_pools: VggPools = VggPools(),
                 large_feature_map: bool | None = None, backbone: nn.Module | None = None) -> None:
        """``vgg_pools``: the network's VGG16 pools, with and without the large feature map;
        ``large_feature_map``: the network's own choice (None: the layout's); ``backbone``: the
        network's own (SAT's DeiT with its token; None: ``build_backbone``'s)."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.layout = layout
        self.num_classes = num_classes
        large = layout.large_feature_map if large_feature_map is None else large_feature_map
        self.backbone = backbone if backbone is not None else build_backbone(
            layout.backbone, layout.width, large, vgg_pools, drop_path=layout.drop_path)

    @property
    def classifier(self) -> nn.Linear:
        """The main branch's classifier (GAP features -> logits)."""
        return self.classifier_for(self.layout.branches[0].name)

    def classifier_for(self, branch: str) -> nn.Linear:
        raise NotImplementedError

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("head", *self.head_features, *self.backbone.taps)

    def resolve_feature(self, name: str) -> str:
        if name == "head":
            return self.layout.branches[0].name
        if name in self.head_features or name in self.backbone.taps:
            return name
        raise KeyError(f"unknown feature {name!r}; this network has {list(self.feature_names)}")

    def forward(self, x: Tensor, return_features: bool = False, taps: Sequence[str] = (),
                grad_from: str | None = None, replace: tuple[str, Tensor] | None = None,
                labels: Tensor | None = None) -> MultiBranchOutput:
        if replace is not None:
            raise ValueError(f"replace (ablation inside the network) is not supported on the {self.layout.network} "
                             "network; ablate at 'head' or use another map method")
        target = None if grad_from is None else self.resolve_feature(grad_from)
        wanted = (*self._taps, *taps)
        if target is not None and target not in self.backbone.taps:
            with torch.inference_mode():
                values = dict(self.backbone(x, wanted))
        else:
            values = dict(self.backbone(x, wanted, grad_from=target))
        run: Callable[..., Tensor] = (lambda f, *t: f(*t)) if target is None else run_tracked

        def mark(name: str, t: Tensor) -> Tensor:
            return gradient_leaf(t) if name == target else t

        logits, features = self._heads(values, labels, run, mark)
        if not return_features:
            return MultiBranchOutput(logits)
        out = {"head": features[self.layout.branches[0].name], **features}
        out.update({t: values[t] for t in taps})
        if grad_from is not None:
            out[grad_from] = values[target] if target in values else features[target]
        return MultiBranchOutput(logits, out)

    def _heads(self, values: dict[str, Tensor], labels: Tensor | None, run, mark
               ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        raise NotImplementedError


def gap(x: Tensor) -> Tensor:
    """Global average pool: ``(B, C, h, w) -> (B, C)``."""
    return x.mean(dim=(2, 3))


def class_map(classifier: nn.Linear, features: Tensor, classes: Tensor) -> Tensor:
    """Channel ``classes[b]`` of the 1x1 convolution with the classifier's weights and bias:
    ``w_y . F + b_y``, ``(B, C, h, w) -> (B, h, w)`` (what ``Conv2d(C, K, 1)`` + pick computes)."""
    weight = classifier.weight[classes].to(features.dtype)
    bias = classifier.bias[classes].to(features.dtype)
    return torch.einsum("bc,bchw->bhw", weight, features) + bias[:, None, None]


def minmax(maps: Tensor) -> Tensor:
    """Per-image min-max over space, ``(B, h, w)``, as wsolevaluation's ``normalize_tensor``: a
    constant map becomes NaN (0 / 0), which no threshold comparison passes."""
    flat = maps.flatten(1)
    low = flat.amin(1)[:, None, None]
    high = flat.amax(1)[:, None, None]
    return (maps - low) / (high - low)
