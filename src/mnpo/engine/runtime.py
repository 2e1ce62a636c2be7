"""Devices, precision, seeding and the distributed (torchrun) context."""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mnpo.engine.config import PRECISIONS


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that has it, fp32 elsewhere (exact CPU runs).

    ``fp32``: float32 throughout; on CUDA, TF32 tensor cores are switched off for the pass.
    ``tf32``: float32 tensors, matmuls and convolutions on TF32 tensor cores (CUDA only; on
    other devices it resolves to ``fp32``). ``bf16``: bf16 autocast.
    """
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {PRECISIONS}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "tf32" and device.type != "cuda":
        return "fp32"
    return name


@contextlib.contextmanager
def tf32_enabled(enabled: bool):
    """Inside: CUDA matmuls and cuDNN convolutions use TF32 tensor cores iff ``enabled``;
    the previous settings come back on exit.

    PyTorch has two switches for this: the legacy ``allow_tf32`` flags and, since 2.9,
    per-backend ``fp32_precision``. The legacy flags are used (setting them keeps the new ones
    in step, and ``torch.compile`` reads them), unless the process set TF32 through the new API
    alone: reading the legacy flags then raises, and the new ones are switched instead.
    """
    try:
        targets = (torch.backends.cuda.matmul, torch.backends.cudnn)
        attr, value = "allow_tf32", enabled
        saved = [t.allow_tf32 for t in targets]
    except RuntimeError:  # "mix of the legacy and new APIs": stay on the new one
        targets = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        attr, value = "fp32_precision", "tf32" if enabled else "ieee"
        saved = [t.fp32_precision for t in targets]
    for t in targets:
        setattr(t, attr, value)
    try:
        yield
    finally:
        for t, previous in zip(targets, saved):
            setattr(t, attr, previous)


def autocast(device: torch.device, precision: str):
    """The context of a pass at a resolved ``precision`` (see :func:`resolve_precision`):
    bf16 autocast, TF32 on (``tf32``) or off (``fp32``) on CUDA, nothing on other devices."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"autocast: precision {precision!r} is not resolved; use fp32, tf32 or bf16")
    if device.type == "cuda":
        return tf32_enabled(precision == "tf32")
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain data (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class DistContext:
    """Rank and world size; ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    NCCL on CUDA devices, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def shutdown_distributed() -> None:
    """Leave the process group at the end of a run that went well, as PyTorch asks before exit
    (NCCL warns otherwise, and on torch 2.4 a gloo group left standing aborts the interpreter at
    exit): wait for every rank, so that none leaves while another still needs it, then destroy
    the group. Nothing on a single process. Not for error paths: a rank that failed would wait
    in the barrier for ranks stuck in another collective.

    Before torch 2.8 the gloo group's destructor joined its worker threads while holding the
    GIL, and a thread still releasing a finished collective's tensors waited for that GIL: a
    deadlock (about one two-process run in three here on torch 2.4; fixed by pytorch#154976).
    There the GIL is let go for a moment after the barrier, for the threads to finish.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if dist.get_backend() == "gloo" and not gloo_destroy_is_safe():
        time.sleep(0.1)  # releases the GIL; the threads need microseconds
    dist.destroy_process_group()


def gloo_destroy_is_safe() -> bool:
    """Whether this torch releases the GIL while it destroys a gloo process group (2.8 and later)."""
    return torch.__version__ >= (2, 8)


def all_reduce_sum(array: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Element-wise sum of ``array`` over the ranks (the array itself on one process)."""
    if not ctx.enabled:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().numpy().astype(array.dtype)
