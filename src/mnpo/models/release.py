"""Import the authors' released MNPO/MNPOs checkpoints (spec section 8) into our format.

The release stores ``{"architecture", "epoch", "state_dict", "optimizer"}`` with its VGG16
convs as hand-made slices. Module names, theirs -> ours:

=============================================  ==========================================
``conv1`` .. ``conv13`` (``.0.weight/.bias``)  ``backbone.features.{i}`` (conv1_1 .. conv5_3)
``conv6`` (``.weight/.bias``, 512 -> 1024)      ``branches.main.head.conv``
``fc``                                         ``classifier`` (shared by every branch)
``branch1_layer.layer1.0`` (bottleneck a)      ``branches.parallel.a``
``branch1_layer.conv1.0`` / ``.1``             ``branches.parallel.b.conv`` / ``.bn``
``branch1_layer.layer2.0`` (bottleneck c)      ``branches.parallel.c``
``branch1_layer.conv2.0`` / ``.1``             ``branches.parallel.d.conv`` / ``.bn``
=============================================  ==========================================

Detail settled by reading the release's ``wsol/VGG_MNPOs.py``: the sixth backbone conv
(conv3_2) is the attribute ``conv6_`` (trailing underscore), because ``conv6`` is the head.
A file that spells it ``conv6.0.*`` (as the spec's list reads) is accepted too.
The class count and the width come from the file (``fc.weight`` rows, ``conv1.0`` filters).
"""

from __future__ import annotations

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
from mnpo.models.multibranch import MultiBranchNet, released_vgg16_layout

RELEASED_CONV_NAMES = (
    "conv1", "conv2", "conv3", "conv4", "conv5", "conv6_", "conv7",
    "conv8", "conv9", "conv10", "conv11", "conv12", "conv13",
)
_NEW_LAYER_PREFIXES = (
    ("branches.main.head.conv.", "conv6."),
    ("classifier.", "fc."),
    ("branches.parallel.a.", "branch1_layer.layer1.0."),
    ("branches.parallel.b.conv.", "branch1_layer.conv1.0."),
    ("branches.parallel.b.bn.", "branch1_layer.conv1.1."),
    ("branches.parallel.c.", "branch1_layer.layer2.0."),
    ("branches.parallel.d.conv.", "branch1_layer.conv2.0."),
    ("branches.parallel.d.bn.", "branch1_layer.conv2.1."),
)


def released_prefixes(model: MultiBranchNet) -> list[tuple[str, str]]:
    """``(our prefix, release prefix)`` pairs covering every tensor of the released layout."""
    convs = [i for i, m in enumerate(model.backbone.features) if isinstance(m, nn.Conv2d)]
    pairs = [(f"backbone.features.{i}.", f"{name}.0.") for i, name in zip(convs, RELEASED_CONV_NAMES, strict=True)]
    return pairs + list(_NEW_LAYER_PREFIXES)


def _released_width(state: Mapping[str, Tensor], source: str) -> float:
    for key in ("conv1.0.weight", "fc.weight", "conv6.weight"):
        if key not in state:
            raise CheckpointError(
                f"{source}: not a released MNPO VGG16 checkpoint: no {key!r} "
                f"(its keys start {sorted(state)[:5]})"
            )
    return state["conv1.0.weight"].shape[0] / 64


def convert_released_state_dict(state: Mapping[str, Tensor], source: str = "release") -> MultiBranchNet:
    """Build the released two-branch network and fill it from the release's state dict (strictly)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith("conv6_.0.") for k in state):
        state = {("conv6_.0." + k[len("conv6.0."):] if k.startswith("conv6.0.") else k): v for k, v in state.items()}
    width = _released_width(state, source)
    model = MultiBranchNet(released_vgg16_layout(width), num_classes=state["fc.weight"].shape[0])
    ours = rename_by_prefix(state, [(theirs, o) for o, theirs in released_prefixes(model)], source,
                            "the released layout")
    for name, value in model.state_dict().items():  # counters missing from old files stay 0
        if name.endswith("num_batches_tracked") and name not in ours:
            ours[name] = value
    load_state_dict_strict(model, ours, source)
    return model.eval()


def import_released_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                               trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the release's ``.pth.tar`` at ``src`` into our checkpoint at ``dst`` (atomic).

    Returns a summary: classes, width, tensors and parameters imported.
    """
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a 'state_dict' of tensors (the release's format)")
    model = convert_released_state_dict(state, str(src))
    release_info = {k: raw[k] for k in ("architecture", "epoch") if isinstance(raw.get(k), (str, int))}
    save_checkpoint(dst, model, meta={"imported_from": src.name, "release": release_info})
    return {
        "num_classes": model.num_classes,
        "width": model.layout.width,
        "tensors": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
