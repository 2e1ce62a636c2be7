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


def local_rank() -> int:
    """This process's rank on its node as torchrun sets it (``LOCAL_RANK``); 0 outside torchrun."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={value!r} is not an integer") from None
    if rank < 0:
        raise ValueError(f"LOCAL_RANK={value!r} is negative")
    return rank


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU; ``cuda`` (no index) ->
    the local rank's GPU, ``cuda:LOCAL_RANK`` (``cuda:0`` outside torchrun), so that under
    torchrun every process gets a GPU of its own; ``cuda:N`` is taken as written."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    index = local_rank() if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        why = f"LOCAL_RANK={index}" if device.index is None else f"{name!r}"
        raise ValueError(f"device {name!r}: {why} asks for GPU {index}, but torch sees {count} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                         f"{count} processes per node")
    return torch.device("cuda", index)


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


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """``torch.backends.cudnn.benchmark`` on within the block on a CUDA ``device`` (cuDNN times
    its convolution algorithms for each new input shape and keeps the fastest: training's
    shapes are fixed, so this pays after the first step), restored on exit; nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


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


@contextlib.contextmanager
def local_main_first(ctx: DistContext, name: str, poll_s: float = 0.05):
    """Inside: on each node, local rank 0 runs the body first and the node's other ranks after it
    has finished, so that work with a node-wide cache (ImageNet weights downloaded to the torch
    hub cache) is done once per node, not by every rank at once. Through the rendezvous store,
    not a collective, so a long download cannot time out. Nothing on a single process."""
    if not ctx.enabled:
        yield
        return
    import socket

    store = dist.distributed_c10d._get_default_store()
    key = f"mnpo/{name}/{socket.gethostname()}"
    if local_rank() == 0:
        try:
            yield
        finally:  # also when it failed: the others then try, and say why themselves
            store.set(key, "done")
        return
    while not store.check([key]):
        time.sleep(poll_s)
    yield


#: The store key the ranks count themselves out on (:func:`shutdown_distributed`).
_LEFT_KEY = "mnpo/ranks-leaving"


def shutdown_distributed(poll_s: float = 0.05) -> None:
    """Leave the process group at the end of a run that went well, as PyTorch asks before exit
    (NCCL warns otherwise, and on torch 2.4 a gloo group left standing aborts the interpreter at
    exit): wait for every rank, so that none leaves while another still needs it, then destroy
    the group. Nothing on a single process. Not for error paths: a rank that failed would wait
    for ranks stuck in a collective.

    The wait is on the rendezvous store (each rank adds itself to a counter and polls it), not a
    collective: rank 0 may still be writing the report, the results file or a checkpoint after
    the last collective, and a barrier would then time out under NCCL's watchdog (10 minutes by
    default) on a large split, where the store waits as long as rank 0 needs.

    Before torch 2.8 the gloo group's destructor joined its worker threads while holding the
    GIL, and a thread still releasing a finished collective's tensors waited for that GIL: a
    deadlock (about one two-process run in three here on torch 2.4; fixed by pytorch#154976).
    There the GIL is let go for a moment after the wait, for the threads to finish.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    store = dist.distributed_c10d._get_default_store()

    def wait_for(key: str) -> None:
        store.add(key, 1)
        while store.add(key, 0) < world:  # add(key, 0) reads the counter
            time.sleep(poll_s)  # releases the GIL, as the gloo teardown below needs

    wait_for(_LEFT_KEY)
    # Rank 0 may host the store (env:// without torchrun's agent): it waits once more, until every
    # rank has read the counter, so that none polls a store that has gone.
    store.add(_LEFT_KEY + "/read", 1)
    if rank == 0:
        while store.add(_LEFT_KEY + "/read", 0) < world:
            time.sleep(poll_s)
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
