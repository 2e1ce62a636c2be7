"""Classifiers that are not mnpo's, by a spec string: for ``mnpo evaluate``, ``localize`` and ``layers``.

``SPEC`` is one of

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME)``; without a weights file its
  weights API's default weights (downloaded by torchvision to its cache), with one (``weights``)
  a state dict loaded strictly;
* ``timm:NAME`` -- ``timm.create_model(NAME)`` when timm is installed (an optional extra);
  pretrained as timm loads them, or a state dict file;
* ``module:package.module.factory`` -- the factory called with no arguments (with
  ``num_classes=`` when given) must return the ``nn.Module``; a state dict file is optional.

``num_classes``: the model's class count when it is not ImageNet's 1000 (needs a weights file:
no published weights have it). Class names of ImageNet models come from the weights' meta
(torchvision ships them with its code; nothing is downloaded for them).

The model is wrapped in :class:`ExternalClassifier`, which answers the engine's calls (its forward
returns ``MultiBranchOutput`` with one branch; ``num_classes``; ``class_names``) while the map
methods see the classifier itself (:mod:`mnpo.models.hooked`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mnpo.models.hooked import scores_of
from mnpo.models.multibranch import MultiBranchOutput

__all__ = ["ExternalClassifier", "ModelSpecError", "build_external", "parse_spec"]

KINDS = ("torchvision", "timm", "module")
IMAGENET_CLASSES = 1000


class ModelSpecError(ValueError):
    """A model spec or weights file that cannot be used, with the reason."""


def parse_spec(spec: str) -> tuple[str, str]:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``; refuses anything else."""
    kind, sep, name = str(spec).partition(":")
    if not sep or kind not in KINDS or not name:
        raise ModelSpecError(f"model spec {spec!r}: expected torchvision:NAME, timm:NAME or module:path.to.factory")
    return kind, name


class ExternalClassifier(nn.Module):
    """``net`` with the engine's interface: ``forward(x) -> MultiBranchOutput((scores,))``."""

    def __init__(self, net: nn.Module, num_classes: int, class_names: list[str] | None = None,
                 spec: str = "", weights: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.class_names = class_names
        self.spec, self.weights = spec, weights

    @property
    def wrapped_classifier(self) -> nn.Module:
        """What the map methods hook into (the layer names are the classifier's own)."""
        return self.net

    def forward(self, x: Tensor) -> MultiBranchOutput:
        return MultiBranchOutput((scores_of(self.net(x)),))


def _state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSpecError(f"{path}: not a state dict torch.load can read safely ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelSpecError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return state


def _load_strictly(net: nn.Module, path: str | os.PathLike) -> None:
    state = _state_dict(path)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)} (e.g. {shapes[0]}; --num-classes?)")
        raise ModelSpecError(f"{path}: does not fit the model: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)


def _torchvision(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, list[str] | None]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelSpecError(f"torchvision has no model {name!r} (torchvision.models.list_models() lists them)")
    classes = num_classes or IMAGENET_CLASSES
    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        default = None
    names = list(default.meta["categories"]) if default is not None and classes == len(
        default.meta.get("categories") or ()) else None
    if weights is None:
        if classes != IMAGENET_CLASSES or default is None:
            raise ModelSpecError(f"torchvision:{name} with {classes} classes has no published weights; pass --weights FILE")
        return torchvision.models.get_model(name, weights=default), names
    net = torchvision.models.get_model(name, weights=None, num_classes=classes)
    _load_strictly(net, weights)
    return net, names


def _timm(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, list[str] | None]:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError("timm:NAME needs timm (pip install timm, or mnpo's 'timm' extra)") from exc
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    net = timm.create_model(name, pretrained=weights is None, **kwargs)
    if weights is not None:
        _load_strictly(net, weights)
    return net, None


def _module(path: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, list[str] | None]:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ModelSpecError(f"module:{path}: expected module:package.module.factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"module:{path}: cannot import it ({type(exc).__name__}: {exc})") from exc
    net = factory() if num_classes is None else factory(num_classes=num_classes)
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"module:{path} returned {type(net).__name__}, not an nn.Module")
    if weights is not None:
        _load_strictly(net, weights)
    return net, None


def build_external(spec: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                   input_size: int = 224) -> ExternalClassifier:
    """The classifier ``spec`` names (module docstring), on the CPU in eval mode."""
    kind, name = parse_spec(spec)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ModelSpecError(f"num_classes must be a positive int, got {num_classes!r}")
    weights = None if weights is None else str(weights)
    net, names = {"torchvision": _torchvision, "timm": _timm, "module": _module}[kind](name, weights, num_classes)
    net.eval()
    with torch.inference_mode():
        dtype = next((p.dtype for p in net.parameters()), torch.float32)
        classes = int(scores_of(net(torch.zeros(1, 3, input_size, input_size, dtype=dtype))).shape[1])
    if num_classes is not None and classes != num_classes:
        raise ModelSpecError(f"{spec} gives {classes} scores, not --num-classes {num_classes}")
    if names is not None and len(names) != classes:
        names = None
    return ExternalClassifier(net, classes, names, spec, weights).eval()
