"""Checkpoints saved by the TS-CAM and SAT authors' code (``vasgaowei/TS-CAM``, ``wpy1999/SAT``),
to and from our ``deit_{tiny,small,base}-tscam`` and ``-sat``.

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

SCM's authors train with TS-CAM's ``train_cam.py`` (the same format) a TS-CAM network plus four
calibration layers (``layers.N.fuse._loss_rate``, ``layers.N.thred``), which exist in training
only: they are checked and left out, and the import is our ``deit_*-tscam``.

SAT's ``train.py`` saves ``{"model": model.state_dict(), "best_thr", "epoch"}`` (``best_gt.pth.tar``
...), also under ``nn.DataParallel``, of its ``SAT`` model (their ``Model/SAT.py``): TS-CAM's
names plus ``loc_token`` and ``loc_embed`` (ours: ``backbone.loc_token``, ``backbone.loc_embed``)
and ``weight``, its fixed 3x3 smoothing kernel (a parameter without gradient there, a constant
here: checked against :func:`mnpo.models.sat.sat_kernel` and left out).

The size is read from the width of ``cls_token`` (192, 384, 768), the class count from
``head.weight``; anything else (a distilled DeiT's ``dist_token``, a Linear head, a grid of
other than 14 x 14 positions) is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mnpo.models.checkpoint import CheckpointError, load_plain, load_state_dict_strict, rename_by_prefix, save_checkpoint
from mnpo.models.deit import DEIT_SIZES, GRID
from mnpo.models.method_nets import MethodLayout
from mnpo.models.networks import build_network
from mnpo.models.sat import sat_kernel

#: (their prefix, our prefix) for every tensor of TS-CAM's network; SAT's adds :data:`SAT_PAIRS`
NAME_PAIRS = [("patch_embed.", "backbone.patch_embed."), ("cls_token", "backbone.cls_token"),
              ("pos_embed", "backbone.pos_embed"), ("blocks.", "backbone.blocks."), ("norm.", "backbone.norm."),
              ("head.", "head.")]
SAT_PAIRS = [("loc_token", "backbone.loc_token"), ("loc_embed", "backbone.loc_embed")]
NETWORKS = {"tscam": "TS-CAM", "sat": "SAT", "scm": "SCM"}
#: SCM's training-only layers in its authors' files (``layers.N.fuse._loss_rate``, ``layers.N.thred``)
SCM_LAYER_KEYS = tuple(f"layers.{i}.{name}" for i in range(4) for name in ("fuse._loss_rate", "thred"))


def name_pairs(network: str) -> list[tuple[str, str]]:
    """(their prefix, our prefix) for ``network`` (``tscam``, ``sat``, or ``scm``, whose network is TS-CAM's)."""
    if network not in NETWORKS:
        raise ValueError(f"network {network!r}: choose one of {tuple(NETWORKS)}")
    return NAME_PAIRS + (SAT_PAIRS if network == "sat" else [])


def identify(state: Mapping[str, Tensor], source: str = "checkpoint", network: str = "tscam"
             ) -> tuple[MethodLayout, int]:
    """The layout and class count of a TS-CAM or SAT state dict (names without ``module.``)."""
    who = NETWORKS[network]
    for key in ("cls_token", "pos_embed", "head.weight") + (("loc_token", "loc_embed") if network == "sat" else ()):
        if key not in state:
            raise CheckpointError(f"{source}: not the {who} authors' DeiT: {key} is missing; its keys start "
                                  f"{sorted(state)[:5]}")
    width = state["cls_token"].shape[-1]
    sizes = {dim: name for name, (dim, _) in DEIT_SIZES.items()}
    if width not in sizes:
        raise CheckpointError(f"{source}: cls_token is {width} wide; TS-CAM's DeiTs are {sorted(sizes)} "
                              f"({', '.join(DEIT_SIZES)})")
    head = state["head.weight"]
    if head.ndim != 4 or tuple(head.shape[1:]) != (width, 3, 3):
        raise CheckpointError(f"{source}: head.weight is {tuple(head.shape)}; {who}'s head is a 3x3 convolution "
                              f"(K, {width}, 3, 3) (a Linear head is a plain DeiT classifier)")
    if state["pos_embed"].shape[1] != 1 + GRID * GRID:
        raise CheckpointError(f"{source}: pos_embed holds {state['pos_embed'].shape[1]} positions; expected "
                              f"{1 + GRID * GRID} (the class token and 14 x 14 patches at 224 px)")
    return MethodLayout("tscam" if network == "scm" else network, sizes[width]), int(head.shape[0])


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint", network: str = "tscam") -> nn.Module:
    """Our ``deit_*-tscam`` (or ``-sat``) network, filled strictly from the authors' state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if network == "sat" and "weight" in state:  # their smoothing kernel: a constant of the loss here
        kernel = sat_kernel().float()
        if tuple(state["weight"].shape) != (1, 1, 3, 3) or not torch.allclose(state["weight"].float()[0, 0], kernel,
                                                                                atol=1e-6):
            raise CheckpointError(f"{source}: 'weight' is not SAT's fixed 3x3 smoothing kernel (get_kernel(3, 6)); "
                                  f"got shape {tuple(state['weight'].shape)}")
        state = {k: v for k, v in state.items() if k != "weight"}
    if network == "scm":  # its calibration layers train only: TS-CAM's network is what is tested
        missing = [k for k in SCM_LAYER_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{source}: not the SCM authors' network: {missing[:4]} missing (its four "
                                  "calibration layers' rate and threshold)")
        state = {k: v for k, v in state.items() if k not in SCM_LAYER_KEYS}
    layout, classes = identify(state, source, network)
    model = build_network(layout, classes)
    ours = rename_by_prefix(state, name_pairs(network), source, f"the {NETWORKS[network]} authors' {layout.backbone}")
    load_state_dict_strict(model, ours, source)
    return model.eval()


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: our network's tensors under the authors' names
    (without ``module.``; SAT's with its kernel ``weight``)."""
    network = getattr(model.layout, "network", None)
    if network not in NETWORKS:
        raise ValueError("only a deit_*-tscam or deit_*-sat network has those authors' layout")
    pairs = name_pairs(network)
    out = {}
    for name, value in model.state_dict().items():
        theirs, ours = next((t, o) for t, o in pairs if name.startswith(o))
        out[theirs + name[len(ours):]] = value
    if network == "sat":
        out["weight"] = sat_kernel().float()[None, None]
    return out


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, network: str = "tscam", *,
                      trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the authors' ``.pth`` at ``src`` into our checkpoint at ``dst`` (atomic); ``network``:
    ``tscam``, ``sat`` or ``scm``."""
    if network not in NETWORKS:
        raise ValueError(f"network {network!r}: choose one of {tuple(NETWORKS)}")
    src = Path(src)
    raw = load_plain(src, trust_pickle=trust_pickle)
    key = "model" if network == "sat" else "state_dict"
    state = raw.get(key, raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a dict with a {key!r} of tensors (the {NETWORKS[network]} authors' "
                              "format)")
    model = convert_state_dict(state, str(src), network)
    save_checkpoint(dst, model, meta={"imported_from": src.name, network: {}})
    return {"layout": f"{model.layout.backbone}-{model.layout.network}", "num_classes": model.num_classes,
            "tensors": len(state), "dropped": len(SCM_LAYER_KEYS) if network == "scm" else 0,
            "parameters": sum(p.numel() for p in model.parameters())}
