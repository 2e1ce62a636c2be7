"""Checkpoints saved by the TS-CAM authors' code (``vasgaowei/TS-CAM``), to and from our
``deit_{tiny,small,base}-tscam``.

Their ``tools_cam/train_cam.py`` saves ``{"epoch", "state_dict": model.state_dict(), "best_map"}``
(``model_best.pth``, ``model_epoch{N}.pth``) of the ``TSCAM`` model (their ``lib/models/deit.py``,
timm's ``VisionTransformer`` with the head replaced), under ``nn.DataParallel``: every name
``module.``-prefixed. Names:

==============================================================  =================================
theirs                                                          ours
==============================================================  =================================
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm``   ``backbone.*`` (the same)
``head`` (``Conv2d(C, K, 3, padding=1)``)                       ``head``
==============================================================  =================================

The size is read from the width of ``cls_token`` (192, 384, 768), the class count from
``head.weight``; anything else (a distilled DeiT's ``dist_token``, a Linear head, a grid of
other than 14 x 14 positions) is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from mnpo.models.checkpoint import CheckpointError, load_plain, load_state_dict_strict, rename_by_prefix, save_checkpoint
from mnpo.models.deit import DEIT_SIZES, GRID
from mnpo.models.method_nets import MethodLayout
from mnpo.models.networks import build_network

#: (their prefix, our prefix) for every tensor
NAME_PAIRS = [("patch_embed.", "backbone.patch_embed."), ("cls_token", "backbone.cls_token"),
              ("pos_embed", "backbone.pos_embed"), ("blocks.", "backbone.blocks."), ("norm.", "backbone.norm."),
              ("head.", "head.")]


def identify(state: Mapping[str, Tensor], source: str = "checkpoint") -> tuple[MethodLayout, int]:
    """The layout and class count of a TS-CAM state dict (names without ``module.``)."""
    for key in ("cls_token", "pos_embed", "head.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: not the TS-CAM authors' DeiT: {key} is missing; its keys start "
                                  f"{sorted(state)[:5]}")
    width = state["cls_token"].shape[-1]
    sizes = {dim: name for name, (dim, _) in DEIT_SIZES.items()}
    if width not in sizes:
        raise CheckpointError(f"{source}: cls_token is {width} wide; TS-CAM's DeiTs are {sorted(sizes)} "
                              f"({', '.join(DEIT_SIZES)})")
    head = state["head.weight"]
    if head.ndim != 4 or tuple(head.shape[1:]) != (width, 3, 3):
        raise CheckpointError(f"{source}: head.weight is {tuple(head.shape)}; TS-CAM's head is a 3x3 convolution "
                              f"(K, {width}, 3, 3) (a Linear head is a plain DeiT classifier)")
    if state["pos_embed"].shape[1] != 1 + GRID * GRID:
        raise CheckpointError(f"{source}: pos_embed holds {state['pos_embed'].shape[1]} positions; expected "
                              f"{1 + GRID * GRID} (the class token and 14 x 14 patches at 224 px)")
    return MethodLayout("tscam", sizes[width]), int(head.shape[0])


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """Our ``deit_*-tscam`` network, filled strictly from the authors' state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    layout, classes = identify(state, source)
    model = build_network(layout, classes)
    ours = rename_by_prefix(state, NAME_PAIRS, source, f"the TS-CAM authors' {layout.backbone}")
    load_state_dict_strict(model, ours, source)
    return model.eval()


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: our TS-CAM network's tensors under the authors'
    names (without ``module.``)."""
    if getattr(model.layout, "network", None) != "tscam":
        raise ValueError("only a deit_*-tscam network has the TS-CAM authors' layout")
    out = {}
    for name, value in model.state_dict().items():
        theirs, ours = next((t, o) for t, o in NAME_PAIRS if name.startswith(o))
        out[theirs + name[len(ours):]] = value
    return out


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the authors' ``.pth`` at ``src`` into our checkpoint at ``dst`` (atomic)."""
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a 'state_dict' of tensors (the TS-CAM authors' format)")
    model = convert_state_dict(state, str(src))
    save_checkpoint(dst, model, meta={"imported_from": src.name, "tscam": {}})
    return {"layout": f"{model.layout.backbone}-tscam", "num_classes": model.num_classes, "tensors": len(state),
            "parameters": sum(p.numel() for p in model.parameters())}
