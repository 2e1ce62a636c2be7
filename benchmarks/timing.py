"""The one timing loop of the benchmark scripts."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def best_time(fn: Callable[[], Any], device: torch.device | None = None, *, repeats: int = 3,
              warmup: bool = False) -> tuple[float, Any]:
    """(the best wall-clock seconds of ``repeats`` calls of ``fn``, the last call's result).

    On a CUDA ``device`` each call is timed from a synchronized start to a synchronized end (the
    kernels it queued included). ``warmup``: one untimed call first (kernel selection, caches,
    the allocator)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    if warmup:
        fn()
    best, result = float("inf"), None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result
