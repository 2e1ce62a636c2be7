"""Our checkpoint format: layout, class count and weights in one file that loads without pickle code.

A checkpoint is a ``torch.save`` dict of plain data only::

    {"format": "mnpo.checkpoint", "version": 1,
     "layout": NetworkLayout.to_dict(), "num_classes": K,
     "state_dict": {name: tensor}, "meta": {...}, "training": {...} (optional)}

It is always read with ``torch.load(..., weights_only=True)``: a downloaded file can hold
tensors, numbers, strings, lists and dicts, never objects whose unpickling runs code.
``meta`` is free plain data (where the weights came from, class names, metrics);
``training`` is the resumable state that the training engine adds.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mnpo.io import atomic_path
from mnpo.models.method_nets import MethodLayout, layout_from_dict
from mnpo.models.multibranch import LayoutError, NetworkLayout
from mnpo.models.networks import build_network

CHECKPOINT_FORMAT = "mnpo.checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "layout", "num_classes", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def load_plain(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` a file on the CPU with ``weights_only=True`` (unless ``trust_pickle``).

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a truncated or
    foreign file, or one whose pickle holds Python objects (a possible code-execution payload).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain data, and "
            f"unpickling them could run code ({detail.strip()})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch file (truncated or another format): {err}") from None


def checkpoint_payload(model: torch.nn.Module, *, meta: Mapping[str, Any] | None = None,
                       training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict :func:`save_checkpoint` writes (weights copied to the CPU)."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "layout": model.layout.to_dict(),
        "num_classes": int(model.num_classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    if training is not None:
        payload["training"] = dict(training)
    return payload


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, meta: Mapping[str, Any] | None = None,
                    training: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (temporary file + rename): a kill leaves the old file intact."""
    payload = checkpoint_payload(model, meta=meta, training=training)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's payload (no model built). Raises ``CheckpointError``."""
    payload = load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(payload, dict) and ("state_dict" in payload or any(str(k).startswith("conv1") for k in payload)):
            hint = " (a checkpoint of the authors' release? convert it with `mnpo import-checkpoint SRC DST`)"
        raise CheckpointError(f"{path}: not an mnpo checkpoint: no format={CHECKPOINT_FORMAT!r}{hint}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload['version']!r}; this mnpo reads version {CHECKPOINT_VERSION}"
        )
    k = payload["num_classes"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise CheckpointError(f"{path}: num_classes must be a positive integer, got {k!r}")
    if not isinstance(payload["state_dict"], dict) or not all(
        isinstance(n, str) and isinstance(t, Tensor) for n, t in payload["state_dict"].items()
    ):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    return payload


def _describe(layout: Mapping[str, Any]) -> str:
    if "network" in layout:
        return ", ".join(f"{k}={v!r}" for k, v in layout.items())
    branches = layout.get("branches", [])
    names = [b.get("name") for b in branches] if isinstance(branches, list) else branches
    return f"backbone={layout.get('backbone')!r} width={layout.get('width')} branches={names}"


def model_from_payload(payload: Mapping[str, Any], source: str = "checkpoint", *,
                       layout: NetworkLayout | MethodLayout | None = None,
                       num_classes: int | None = None) -> torch.nn.Module:
    """Build the network a payload describes and load its weights strictly.

    ``layout`` / ``num_classes``, when given, are what the caller expects; a checkpoint of
    another layout or class count is refused with both sides named.
    """
    try:
        saved_layout = layout_from_dict(payload["layout"])
    except LayoutError as err:
        raise CheckpointError(f"{source}: its layout is invalid: {err}") from None
    if layout is not None and layout.to_dict() != saved_layout.to_dict():
        raise CheckpointError(
            f"{source}: layout mismatch: the checkpoint holds {_describe(saved_layout.to_dict())}, "
            f"expected {_describe(layout.to_dict())}"
        )
    k = payload["num_classes"]
    if num_classes is not None and num_classes != k:
        raise CheckpointError(f"{source}: class-count mismatch: the checkpoint has {k} classes, expected {num_classes}")
    model = build_network(saved_layout, k)
    load_state_dict_strict(model, payload["state_dict"], source)
    return model


def rename_by_prefix(state: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]], source: str,
                     what: str) -> dict[str, Tensor]:
    """``state`` with each name's first matching ``(old prefix, new prefix)`` replaced; a name no
    pair matches is an error naming ``source`` and ``what`` the names were to fit."""
    renamed: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        match = next(((old, new) for old, new in pairs if key.startswith(old)), None)
        if match is None:
            unmapped.append(key)
        else:
            renamed[match[1] + key[len(match[0]):]] = value
    if unmapped:
        raise CheckpointError(f"{source}: tensors {what} does not have: {unmapped[:8]}"
                              + (f" ({len(unmapped)} in all)" if len(unmapped) > 8 else ""))
    return renamed


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict`` that fails with the missing, unexpected and mis-shaped names listed."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} (model has {tuple(expected[k].shape)})"
        for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | os.PathLike, *, layout: NetworkLayout | MethodLayout | None = None,
               num_classes: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Read a checkpoint and return ``(model on the CPU in eval mode, payload)``."""
    payload = read_checkpoint(path)
    model = model_from_payload(payload, str(path), layout=layout, num_classes=num_classes)
    return model.eval(), payload
