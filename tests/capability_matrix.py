"""Run the numerics-heavy tests (``pytest -m numerics``) under every CPU kernel path this
machine has, besides the plain ``make test`` run.

A result that depends on rounding differs between CPUs through three libraries: ATen's own
vectorized kernels (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``, ``avx512``), oneDNN's
convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's matrix products (``MKL_ENABLE_INSTRUCTIONS``).
Each configuration below caps all three at one instruction set, as a CPU with only that set
would run them; ``default`` is the baseline x86-64 path (SSE4). The plain ``make test`` run
covers the native path with one torch thread per pytest worker; this script adds the native
path with all cores in one process. A capability above what the CPU has is never tried (ATen
would take it and crash on an illegal instruction).

    python tests/capability_matrix.py [--workers N] [extra pytest arguments]

Exit status 0 when every configuration passes; otherwise the failed ones are named.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: x86 capabilities from the baseline up, with the oneDNN and MKL caps that match each.
X86_PATHS = {
    "default": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
#: Environment variables that choose kernels: cleared so the native probe sees the CPU itself.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def capability(env: dict[str, str]) -> str:
    """The kernel path torch reports under ``env``, lower case (``avx2``, ``default``, ...)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().lower()


def configurations(base: dict[str, str]) -> tuple[str, list[tuple[str, dict[str, str]]]]:
    """The native capability and the other configurations to run, from the baseline up.

    On x86 these are the capabilities below the native one; elsewhere only ``default``."""
    native = capability(base)
    names = list(X86_PATHS)
    if platform.machine().lower() in ("x86_64", "amd64") and native in names:
        below = names[:names.index(native)]
        return native, [(name, {"ATEN_CPU_CAPABILITY": name, **X86_PATHS[name]}) for name in below]
    return native, [] if native == "default" else [("default", {"ATEN_CPU_CAPABILITY": "default"})]


def run(label: str, env: dict[str, str], pytest_args: list[str]) -> bool:
    print(f"\n=== capability matrix: {label} ===", flush=True)
    start = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "numerics", *pytest_args, str(TESTS)]
    ok = subprocess.run(command, env=env, cwd=TESTS.parent).returncode == 0
    print(f"=== {label}: {'passed' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s ===", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="pytest-xdist workers for the capability runs (default: 2 or the cores)")
    args, pytest_args = parser.parse_known_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    native, others = configurations(base)
    cores = os.cpu_count() or 1
    print(f"native kernel path: {native}; also running: {[name for name, _ in others] or 'none'}; "
          f"{cores} cores", flush=True)
    failed = []
    for name, variables in others:
        env = {**base, **variables}
        reported = capability(env)
        if reported != name:
            print(f"ATEN_CPU_CAPABILITY={name}: torch reports {reported!r}; skipped", flush=True)
            continue
        label = " ".join(f"{k}={v}" for k, v in variables.items())
        if not run(label, env, ["-n", str(args.workers), *pytest_args]):
            failed.append(label)
    # All cores in one process: torch splits reductions over its threads.
    threads = {**base, "OMP_NUM_THREADS": str(cores)}
    label = f"native ({native}), one process, {cores} torch threads"
    if not run(label, threads, ["-p", "no:xdist", *pytest_args]):
        failed.append(label)
    if failed:
        print("\ncapability matrix FAILED under: " + "; ".join(failed), flush=True)
        return 1
    print("\ncapability matrix: every configuration passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
