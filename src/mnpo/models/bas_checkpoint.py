"""State dicts saved by the BAS authors' code (``wpy1999/BAS``), to and from our ``<backbone>-bas``.

Their ``train.py`` saves ``model.state_dict()`` (``torch.save``), ``module.``-prefixed where the
model ran under ``nn.DataParallel``. The names (their ``Model/vgg.py`` and ``Model/resnet.py``,
CUB and ILSVRC alike):

=====================================================  ===========================================
theirs                                                 ours
=====================================================  ===========================================
VGG16 ``conv{1_1 .. 5_3}.{weight,bias}``               ``backbone.features.{0, 2, 5, ..., 28}``
ResNet50 ``conv1``, ``bn1``, ``layer1`` .. ``layer4``  ``backbone.*`` (torchvision's names)
InceptionV3 ``Conv2d_*``, ``Mixed_5*``, ``Mixed_6*``   ``backbone.*`` (torchvision's names)
InceptionV3 ``Mixed_7a`` .. ``Mixed_7c``               ``mixed7.Mixed_7*``
``classifier_cls.{0,2,4}`` (CUB InceptionV3:           ``cls_head.{0,2,4}``
``classifier.{0,2,4}``)
``classifier_loc.0``                                   ``generator.0``
ILSVRC's ``*_copy*`` modules (the frozen copies)       not kept: our background branch reads
                                                       the live weights
=====================================================  ===========================================

The backbone, the width and the class count are read from the names and shapes; anything else
is refused with the key named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from mnpo.models.checkpoint import CheckpointError, load_plain, load_state_dict_strict, rename_by_prefix, save_checkpoint
from mnpo.models.method_nets import MethodLayout
from mnpo.models.networks import build_network

#: torchvision's (and our) VGG16 conv indices in ``features``, in conv1_1 .. conv5_3 order
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_NAMES = ("1_1", "1_2", "2_1", "2_2", "3_1", "3_2", "3_3", "4_1", "4_2", "4_3", "5_1", "5_2", "5_3")


INCEPTION_BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
#: first-conv filters at width 1 (the width of a file is read from them)
FIRST_CONV = {"vgg16": ("conv1_1.weight", 64), "resnet50": ("conv1.weight", 64),
              "inception_v3": ("Conv2d_1a_3x3.conv.weight", 32)}


def name_pairs(backbone: str, head: str = "classifier_cls") -> list[tuple[str, str]]:
    """(their prefix, our prefix) for every tensor of the network; ``head``: the name of their
    classification head (``classifier`` in their CUB InceptionV3)."""
    if backbone == "vgg16":
        body = [(f"conv{n}.", f"backbone.features.{i}.") for n, i in zip(VGG_NAMES, VGG_CONVS)]
    elif backbone == "resnet50":
        body = [(f"{m}.", f"backbone.{m}.") for m in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    else:
        body = [(f"{m}.", f"backbone.{m}.") for m in INCEPTION_BLOCKS]
        body += [(f"Mixed_7{k}.", f"mixed7.Mixed_7{k}.") for k in "abc"]
    heads = [(f"{head}.{i}.", f"cls_head.{i}.") for i in (0, 2, 4)] + [("classifier_loc.0.", "generator.0.")]
    return body + heads


def head_name(state: Mapping[str, Tensor]) -> str:
    """Their classification head's name: ``classifier_cls``, or ``classifier`` (CUB InceptionV3)."""
    return "classifier" if "classifier.4.weight" in state and "classifier_cls.4.weight" not in state \
        else "classifier_cls"


def _is_copy(key: str) -> bool:
    return "_copy" in key.split(".")[0]


def identify(state: Mapping[str, Tensor], source: str = "checkpoint") -> MethodLayout:
    """The layout of a BAS state dict (names without ``module.``) and its class count as
    ``(layout, num_classes)``; ``CheckpointError`` naming ``source`` and the key otherwise."""
    if "conv1_1.weight" in state:
        backbone = "vgg16"
    elif "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        backbone = "resnet50"
    elif "Conv2d_1a_3x3.conv.weight" in state:
        backbone = "inception_v3"
    else:
        raise CheckpointError(f"{source}: none of the BAS authors' VGG16 (conv1_1.weight), ResNet50 (conv1.weight, "
                              f"layer1.0.conv1.weight) or InceptionV3 (Conv2d_1a_3x3.conv.weight); its keys start "
                              f"{sorted(state)[:5]}")
    first, filters = FIRST_CONV[backbone]
    head = head_name(state)
    for key in ("classifier_loc.0.weight", f"{head}.4.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: a BAS {backbone} state dict needs {key} (the "
                                  f"{'generator' if 'loc' in key else 'classification head'}); it is missing")
    classes, head_classes = state["classifier_loc.0.weight"].shape[0], state[f"{head}.4.weight"].shape[0]
    if classes != head_classes:
        raise CheckpointError(f"{source}: classifier_loc.0.weight has {classes} classes but {head}.4.weight "
                              f"{head_classes}")
    return MethodLayout("bas", backbone, state[first].shape[0] / filters), int(classes)


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """Our ``<backbone>-bas`` network, filled strictly from the authors' state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _is_copy(k)}
    layout, classes = identify(state, source)
    model = build_network(layout, classes)
    ours = rename_by_prefix(state, name_pairs(layout.backbone, head_name(state)), source,
                            f"the BAS authors' {layout.backbone} network")
    load_state_dict_strict(model, ours, source)
    return model.eval()


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: our BAS network's tensors under the authors' names."""
    if getattr(model.layout, "network", None) != "bas":
        raise ValueError("only a <backbone>-bas network has the BAS authors' layout")
    pairs = [(o, t) for t, o in name_pairs(model.layout.backbone)]
    out = {}
    for name, value in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in pairs if name.startswith(o))
        out[theirs + name[len(ours):]] = value
    return out


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the authors' saved state dict at ``src`` (or a dict holding it as ``state_dict``)
    into our checkpoint at ``dst`` (atomic). Returns a summary: layout, classes, width, tensors."""
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a state dict of tensors (the BAS authors' torch.save(model.state_dict()))")
    model = convert_state_dict(state, str(src))
    dropped = sum(_is_copy(k.removeprefix("module.")) for k in state)
    save_checkpoint(dst, model, meta={"imported_from": src.name, "bas": {"dropped_copies": dropped}})
    return {"layout": f"{model.layout.backbone}-bas", "num_classes": model.num_classes, "width": model.layout.width,
            "tensors": len(state) - dropped, "dropped_copies": dropped,
            "parameters": sum(p.numel() for p in model.parameters())}
