"""What the benchmark scripts print about the machine they ran on."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_summary(device) -> str:
    """``NAME; torch X, torchvision Y, Python Z`` for a ``torch.device``: the GPU's name, or the
    CPU's model with its cores and torch threads."""
    import torch
    import torchvision

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {cpu_cores()} cores, {torch.get_num_threads()} torch threads"
    return (f"{name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}")
