"""Checkpoints trained by clovaai/wsolevaluation, to and from our format.

wsolevaluation's ``main.py`` saves ``{"architecture", "epoch", "state_dict", "optimizer"}``
(``last_checkpoint.pth.tar``, ``best_checkpoint.pth.tar``). The state dict's names depend on the
backbone and the method (``wsol-methods.md`` 1.1-1.3, 2.2, 2.3); they map onto our networks of
the same shapes (``<backbone>-cam`` for cam, has, cutmix and adl, ``-acol``, ``-spg``):

==========================================  ==============================================
theirs                                      ours
==========================================  ==============================================
VGG16 ``features.N`` (13 convs; 7 for SPG)  ``backbone.features.M``, M torchvision's index:
                                            N shifts with the ADL layers and with the pools
                                            the large feature map removes
VGG16 ``conv6`` / ``fc``                    ``branches.main.head.conv`` / ``classifier``
VGG16 SPG ``SPG_A_1.{0,2,4}``,              ``backbone.features.{17,19,21}``,
``SPG_A_2.{0,2,4}``, ``SPG_A_3.{0,2}``      ``backbone.features.{24,26,28}``, ``head.{0,1}.conv``
ResNet50 ``conv1`` .. ``layer4``, ``fc``    ``backbone.*`` (ADL: ``layer3.k`` -> ``k - 1`` for
                                            k >= 2, ``layer4.{2,3}`` -> ``{1,2}``), ``classifier``
ResNet50 SPG ``SPG_A1.0``, ``SPG_A2.k``     ``backbone.layer3.0``, ``backbone.layer3.{k+1}``
InceptionV3 ``Conv2d_*``, ``Mixed_*``       ``backbone.*`` (torchvision's names)
InceptionV3 ``SPG_A3_{1b,2b}.0``            ``branches.main.SPG_A3_{1b,2b}.conv`` (SPG: ``head.{0,1}.conv``)
``SPG_A4`` / ``SPG_A_4`` (1x1 conv)         ``classifier`` (SPG: ``classifier_main``), a linear
                                            layer: GAP then linear equals 1x1 conv then GAP
``classifier_{A,B}.{0,2,4}``                ``branches.{A,B}.{0,1}.conv``, ``classifiers.{A,B}``
``SPG_B_1a.0``, ``SPG_B_2a.0``              ``side_b1.conv``, ``side_b2.conv``
``SPG_B_shared.{0,2}``, ``SPG_C.{0,2}``     ``side_shared.{0.conv,1}``, ``side_c.{0.conv,1}``
==========================================  ==============================================

What the file does not say is asked for: the large feature map (seen in the VGG16 CAM and ADL
conv indices; a parameter-free change elsewhere) and ACoL's erasing threshold. ADL's layers hold
no parameters and are the identity at test time, so an ADL checkpoint becomes a CAM network
that scores the same maps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from mnpo.models.checkpoint import (
    CheckpointError,
    load_plain,
    load_state_dict_strict,
    rename_by_prefix,
    save_checkpoint,
)
from mnpo.models.method_nets import ACOL_THRESHOLD
from mnpo.models.networks import LAYOUTS, build_network

#: torchvision's (and our) VGG16 conv indices in ``features``
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: wsolevaluation's VGG16 conv indices per (variant, large feature map) (spec 1.1)
THEIR_VGG_CONVS = {
    ("cam", False): VGG_CONVS,
    ("cam", True): VGG_CONVS[:10] + (23, 25, 27),
    ("adl", False): VGG_CONVS[:7] + (18, 20, 22, 26, 28, 30),
    ("adl", True): VGG_CONVS[:7] + (18, 20, 22, 25, 27, 29),
}
#: first-conv filters at width 1 (the width of a file is read from them)
FIRST_CONV = {"vgg16": ("features.0.weight", 64), "resnet50": ("conv1.weight", 64),
              "inception_v3": ("Conv2d_1a_3x3.conv.weight", 32)}
_CLASSIFIER_KEYS = {"cam": ("fc.weight", "SPG_A4.weight"), "acol": ("classifier_A.4.weight",),
                    "spg": ("SPG_A4.weight", "SPG_A_4.weight")}
_SPG_SIDES = [("SPG_B_1a.0.", "side_b1.conv."), ("SPG_B_2a.0.", "side_b2.conv."),
              ("SPG_B_shared.0.", "side_shared.0.conv."), ("SPG_B_shared.2.", "side_shared.1."),
              ("SPG_C.0.", "side_c.0.conv."), ("SPG_C.2.", "side_c.1.")]
_ACOL_HEADS = [(f"classifier_{b}.{i}.", f"branches.{b}.{j}.conv.") for b in "AB" for i, j in ((0, 0), (2, 1))]
_ACOL_CLASSIFIERS = [(f"classifier_{b}.4.", f"classifiers.{b}.") for b in "AB"]


@dataclasses.dataclass(frozen=True)
class TheirNetwork:
    """What a wsolevaluation state dict is: ``backbone``, ``network`` (``cam`` / ``acol`` /
    ``spg``), ``variant`` (``adl`` where its layers shift the names, else ``cam``),
    ``large_feature_map`` (None where the names cannot tell), ``width`` and ``num_classes``."""

    backbone: str
    network: str
    variant: str
    large_feature_map: bool | None
    width: float
    num_classes: int


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Names without ``nn.DataParallel``'s ``module.`` prefix."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def identify(state: Mapping[str, Tensor], source: str = "checkpoint") -> TheirNetwork:
    """Tell backbone, network, variant, feature-map size (where the names show it), width and
    classes from a wsolevaluation state dict; ``CheckpointError`` naming ``source`` otherwise."""
    keys = set(state)
    if "features.0.weight" in keys:
        backbone = "vgg16"
    elif "conv1.weight" in keys:
        backbone = "resnet50"
    elif "Conv2d_1a_3x3.conv.weight" in keys:
        backbone = "inception_v3"
    else:
        raise CheckpointError(f"{source}: not a wsolevaluation VGG16, ResNet50 or InceptionV3 state dict "
                              f"(its keys start {sorted(keys)[:5]})")
    network = "acol" if "classifier_A.4.weight" in keys else "spg" if "SPG_B_shared.2.weight" in keys else "cam"
    variant, large = "cam", None
    if backbone == "vgg16" and network == "cam":
        convs = tuple(sorted(int(k.split(".")[1]) for k in keys if k.startswith("features.") and k.endswith(".weight")))
        found = [key for key, indices in THEIR_VGG_CONVS.items() if indices == convs]
        if not found:
            raise CheckpointError(f"{source}: VGG16 conv indices {list(convs)} are none of wsolevaluation's "
                                  f"CAM or ADL layouts")
        variant, large = found[0]
    elif backbone == "resnet50" and network == "cam" and "layer3.6.conv1.weight" in keys:
        variant = "adl"
    classifier = next((k for k in _CLASSIFIER_KEYS[network] if k in keys), None)
    if classifier is None:
        raise CheckpointError(f"{source}: a {backbone} {network} state dict needs one of "
                              f"{list(_CLASSIFIER_KEYS[network])}")
    first, filters = FIRST_CONV[backbone]
    return TheirNetwork(backbone, network, variant, large, state[first].shape[0] / filters,
                        int(state[classifier].shape[0]))


def name_pairs(net: TheirNetwork, large_feature_map: bool = False) -> list[tuple[str, str]]:
    """``(their prefix, our prefix)`` pairs covering every tensor of ``net``'s state dict."""
    b, n = net.backbone, net.network
    pairs: list[tuple[str, str]] = []
    if b == "vgg16":
        if n == "spg":
            pairs += [(f"features.{i}.", f"backbone.features.{i}.") for i in VGG_CONVS[:7]]
            pairs += [(f"SPG_A_1.{2 * k}.", f"backbone.features.{i}.") for k, i in enumerate(VGG_CONVS[7:10])]
            pairs += [(f"SPG_A_2.{2 * k}.", f"backbone.features.{i}.") for k, i in enumerate(VGG_CONVS[10:])]
            pairs += [("SPG_A_3.0.", "head.0.conv."), ("SPG_A_3.2.", "head.1.conv."), ("SPG_A_4.", "classifier_main.")]
        else:
            theirs = VGG_CONVS if n == "acol" else THEIR_VGG_CONVS[(net.variant, large_feature_map)]
            pairs += [(f"features.{t}.", f"backbone.features.{o}.") for t, o in zip(theirs, VGG_CONVS)]
            if n == "cam":
                pairs += [("conv6.", "branches.main.head.conv."), ("fc.", "classifier.")]
    elif b == "resnet50":
        pairs += [("conv1.", "backbone.conv1."), ("bn1.", "backbone.bn1."), ("layer1.", "backbone.layer1."),
                  ("layer2.", "backbone.layer2.")]
        if n == "spg":
            pairs += [("SPG_A1.0.", "backbone.layer3.0.")]
            pairs += [(f"SPG_A2.{k}.", f"backbone.layer3.{k + 1}.") for k in range(5)]
            pairs += [("layer4.", "backbone.layer4."), ("SPG_A4.", "classifier_main.")]
        elif net.variant == "adl":
            pairs += [("layer3.0.", "backbone.layer3.0.")]
            pairs += [(f"layer3.{k}.", f"backbone.layer3.{k - 1}.") for k in range(2, 7)]
            pairs += [("layer4.0.", "backbone.layer4.0."), ("layer4.2.", "backbone.layer4.1."),
                      ("layer4.3.", "backbone.layer4.2.")]
        else:
            pairs += [("layer3.", "backbone.layer3."), ("layer4.", "backbone.layer4.")]
        if n == "cam":
            pairs += [("fc.", "classifier.")]
    else:
        pairs += [(p, f"backbone.{p}") for p in ("Conv2d_", "Mixed_5", "Mixed_6")]
        head = "head.{}.conv." if n == "spg" else "branches.main.SPG_A3_{}.conv."
        if n != "acol":
            pairs += [("SPG_A3_1b.0.", head.format(0 if n == "spg" else "1b")),
                      ("SPG_A3_2b.0.", head.format(1 if n == "spg" else "2b")),
                      ("SPG_A4.", "classifier_main." if n == "spg" else "classifier.")]
    if n == "acol":
        pairs += _ACOL_HEADS + _ACOL_CLASSIFIERS
    if n == "spg":
        pairs += _SPG_SIDES
    return pairs


def _linear_targets(model: nn.Module) -> set[str]:
    """Our names whose tensors are a linear layer's where wsolevaluation has a 1x1 conv."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint", *,
                       large_feature_map: bool | None = None,
                       acol_threshold: float | None = None) -> tuple[nn.Module, TheirNetwork]:
    """Our network, filled strictly from a wsolevaluation state dict. ``large_feature_map``:
    None takes what the names show (False where they cannot tell); a value the names contradict
    is refused. ``acol_threshold``: an ACoL network's (None: 0.7, wsolevaluation's default);
    refused for the other networks."""
    state = _strip_module(state)
    net = identify(state, source)
    if large_feature_map is None:
        large_feature_map = bool(net.large_feature_map)
    elif net.large_feature_map is not None and net.large_feature_map != large_feature_map:
        raise CheckpointError(f"{source}: its VGG16 conv indices are wsolevaluation's "
                              f"{'28x28' if net.large_feature_map else '14x14'} layout, but the large feature map "
                              f"was given as {large_feature_map}")
    layout = LAYOUTS[f"{net.backbone}-{net.network}"](net.width)
    changes: dict[str, Any] = {"large_feature_map": large_feature_map} if large_feature_map else {}
    if net.network == "acol":
        changes["acol_threshold"] = ACOL_THRESHOLD if acol_threshold is None else acol_threshold
    elif acol_threshold is not None:
        raise CheckpointError(f"{source}: an ACoL threshold was given, but this is wsolevaluation's "
                              f"{net.backbone} {net.network} network, not an ACoL one")
    model = build_network(dataclasses.replace(layout, **changes), net.num_classes)
    ours = rename_by_prefix(state, name_pairs(net, large_feature_map), source,
                            f"wsolevaluation's {net.backbone} {net.network} network")
    linear = _linear_targets(model)  # their 1x1 convs: (K, C, 1, 1) -> (K, C)
    ours = {k: v.flatten(1) if k in linear and v.ndim == 4 else v for k, v in ours.items()}
    load_state_dict_strict(model, ours, source)
    return model.eval(), net


def export_state_dict(model: nn.Module, variant: str = "cam") -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: our CAM, ACoL or SPG network's weights under
    wsolevaluation's names (``variant="adl"``: its ADL network's, where the names shift)."""
    layout = model.layout
    network = getattr(layout, "network", "cam")
    if network == "cam" and (len(layout.branches) != 1 or f"{layout.backbone}-cam" not in LAYOUTS):
        raise ValueError("only the one-branch CAM network and the ACoL and SPG networks have a wsolevaluation layout")
    if variant not in ("cam", "adl"):
        raise ValueError(f"variant must be 'cam' or 'adl', got {variant!r}")
    net = TheirNetwork(layout.backbone, network, variant if network == "cam" else "cam", None, layout.width,
                       model.num_classes)
    pairs = [(o, t) for t, o in name_pairs(net, layout.large_feature_map)]
    linear = _linear_targets(model)
    out = {}
    for name, value in model.state_dict().items():
        match = next(((o, t) for o, t in pairs if name.startswith(o)), None)
        if match is None:
            raise ValueError(f"{name}: no place in wsolevaluation's {layout.backbone} {network} network")
        ours, theirs = match
        conv = name in linear and theirs != "fc."  # their 1x1 conv where we have a linear layer
        out[theirs + name[len(ours):]] = value[..., None, None] if conv else value
    return out


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, large_feature_map: bool | None = None,
                      acol_threshold: float | None = None, trust_pickle: bool = False) -> dict[str, Any]:
    """Convert wsolevaluation's ``.pth.tar`` at ``src`` into our checkpoint at ``dst`` (atomic).
    Returns a summary: layout, classes, width, tensors and parameters imported."""
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a 'state_dict' of tensors (wsolevaluation's format)")
    model, net = convert_state_dict(state, str(src), large_feature_map=large_feature_map,
                                    acol_threshold=acol_threshold)
    architecture = raw.get("architecture")
    if isinstance(architecture, str) and architecture != net.backbone:
        raise CheckpointError(f"{src}: says architecture {architecture!r} but its weights are {net.backbone}'s")
    info = {k: raw[k] for k in ("architecture", "epoch") if isinstance(raw.get(k), (str, int))}
    save_checkpoint(dst, model, meta={"imported_from": src.name, "wsolevaluation": {**info, "variant": net.variant}})
    return {"layout": f"{net.backbone}-{net.network}", "variant": net.variant, "num_classes": net.num_classes,
            "width": net.width, "large_feature_map": model.layout.large_feature_map, "tensors": len(state),
            "parameters": sum(p.numel() for p in model.parameters())}
