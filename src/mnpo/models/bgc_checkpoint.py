"""Checkpoints saved by the BGC authors' code (``ejkim47/bridging-gap-wsol``, a wsolevaluation
fork), to and from our ``<backbone>-bgc``.

Their ``trainer.py`` saves ``{"state_dict": model.state_dict()}`` (``{last,best}_checkpoint.pth.tar``),
``module.``-prefixed where the model ran under ``nn.DataParallel``. The names (their
``wsol/vgg.py: VggDrop`` and ``wsol/resnet.py: ResNetDrop``):

===================================================  =========================================
theirs                                               ours
===================================================  =========================================
VGG16 ``features.0.{0,2,...,21}`` (conv1_1..conv4_3)  ``backbone.features.{0,2,...,21}``
VGG16 ``features.2.{1,3,5}`` (conv5_*; after pool4)  ``backbone.features.{24,26,28}``
VGG16, 28 x 28: ``features.2.{0,2,4}`` (no pool4)    the same
VGG16 ``conv6``                                      ``head.conv``
ResNet50 ``conv1``, ``bn1``, ``layer1`` .. ``layer3``  ``backbone.*``
ResNet50 ``layer4_1.0``, ``layer4_2.{0,1}``           ``backbone.layer4.{0}``, ``backbone.layer4.{1,2}``
``fc``                                               ``classifier_main``
===================================================  =========================================

The large feature map shows in VGG16's names; ResNet50's is parameter-free, so it is asked for
(default: on, as the authors' ResNet50 recipe trains).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from mnpo.models.checkpoint import CheckpointError, load_plain, load_state_dict_strict, rename_by_prefix, save_checkpoint
from mnpo.models.method_nets import MethodLayout
from mnpo.models.networks import build_network

#: torchvision's (and our) conv indices of conv1_1 .. conv4_3, and of conv5_1 .. conv5_3
VGG_CONV4 = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
VGG_CONV5 = (24, 26, 28)


def name_pairs(backbone: str, large_feature_map: bool) -> list[tuple[str, str]]:
    """(their prefix, our prefix) for every tensor of the network."""
    if backbone == "vgg16":
        theirs5 = (0, 2, 4) if large_feature_map else (1, 3, 5)
        pairs = [(f"features.0.{i}.", f"backbone.features.{i}.") for i in VGG_CONV4]
        pairs += [(f"features.2.{t}.", f"backbone.features.{o}.") for t, o in zip(theirs5, VGG_CONV5)]
        pairs.append(("conv6.", "head.conv."))
    elif backbone != "resnet50":
        raise ValueError(f"the BGC authors built VGG16 and ResNet50 only; {backbone}-bgc is mnpo's extension "
                         "and has no state dict of theirs to map to")
    else:
        pairs = [(f"{m}.", f"backbone.{m}.") for m in ("conv1", "bn1", "layer1", "layer2", "layer3")]
        pairs += [("layer4_1.0.", "backbone.layer4.0."), ("layer4_2.0.", "backbone.layer4.1."),
                  ("layer4_2.1.", "backbone.layer4.2.")]
    return pairs + [("fc.", "classifier_main.")]


def identify(state: Mapping[str, Tensor], source: str = "checkpoint",
             large_feature_map: bool | None = None) -> tuple[MethodLayout, int]:
    """The layout and class count of a BGC state dict (names without ``module.``)."""
    if "features.0.0.weight" in state and "conv6.weight" in state:
        backbone, width = "vgg16", state["features.0.0.weight"].shape[0] / 64
        seen = "features.2.0.weight" in state  # conv5_1 right after the drop: no pool4
        if large_feature_map is not None and large_feature_map != seen:
            raise CheckpointError(f"{source}: its VGG16 names are the authors' {'28x28' if seen else '14x14'} "
                                  f"network, but the large feature map was given as {large_feature_map}")
        large = seen
    elif "layer4_1.0.conv1.weight" in state and "conv1.weight" in state:
        backbone, width = "resnet50", state["conv1.weight"].shape[0] / 64
        large = True if large_feature_map is None else large_feature_map
    else:
        raise CheckpointError(f"{source}: neither the BGC authors' VGG16 (features.0.0.weight, conv6.weight) nor "
                              f"their ResNet50 (layer4_1.0.conv1.weight); its keys start {sorted(state)[:5]}")
    if "fc.weight" not in state:
        raise CheckpointError(f"{source}: a BGC {backbone} state dict needs fc.weight (the classifier); it is missing")
    return MethodLayout("bgc", backbone, width, large_feature_map=large), int(state["fc.weight"].shape[0])


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint", *,
                       large_feature_map: bool | None = None) -> nn.Module:
    """Our ``<backbone>-bgc`` network, filled strictly from the authors' state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    layout, classes = identify(state, source, large_feature_map)
    model = build_network(layout, classes)
    ours = rename_by_prefix(state, name_pairs(layout.backbone, layout.large_feature_map), source,
                            f"the BGC authors' {layout.backbone} network")
    load_state_dict_strict(model, ours, source)
    return model.eval()


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: our BGC network's tensors under the authors' names."""
    if getattr(model.layout, "network", None) != "bgc":
        raise ValueError("only a <backbone>-bgc network has the BGC authors' layout")
    pairs = [(o, t) for t, o in name_pairs(model.layout.backbone, model.layout.large_feature_map)]
    out = {}
    for name, value in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in pairs if name.startswith(o))
        out[theirs + name[len(ours):]] = value
    return out


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, large_feature_map: bool | None = None,
                      trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the authors' ``.pth.tar`` at ``src`` into our checkpoint at ``dst`` (atomic)."""
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a 'state_dict' of tensors (the BGC authors' format)")
    model = convert_state_dict(state, str(src), large_feature_map=large_feature_map)
    save_checkpoint(dst, model, meta={"imported_from": src.name, "bgc": {}})
    return {"layout": f"{model.layout.backbone}-bgc", "num_classes": model.num_classes, "width": model.layout.width,
            "large_feature_map": model.layout.large_feature_map, "tensors": len(state),
            "parameters": sum(p.numel() for p in model.parameters())}
