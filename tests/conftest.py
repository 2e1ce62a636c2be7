"""Session set-up shared by all tests.

The real wsolevaluation metadata (CUB, ILSVRC val/test, OpenImages; MIT, see
the LICENSE inside) is looked for, in order, at ``$MNPO_WSOL_METADATA``, at
``<repo>/../shared/wsol-metadata``, and else unpacked once from the copy kept
in ``tests/fixtures/wsol-metadata.tar.xz`` into the temp folder; the found
folder is exported as ``MNPO_WSOL_METADATA`` for the test modules.
"""

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

# Parallel workers (pytest -n N) share the cores: give each its share of intra-op threads
# before torch is imported, or OpenMP threads oversubscribe and spin (50x slower on 2 cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# torch.compile's on-disk cache keys its generated C++ without the kernel path that
# ATEN_CPU_CAPABILITY chooses (torch 2.14.1): code cached by an avx2 run fails to compile in a
# later `default` run ("'at::vec' has not been declared"). One cache per capability.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _capability = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-mnpo-tests-{os.getuid()}-{_capability}")

_TESTS = Path(__file__).resolve().parent
#: Test folders whose results depend on the CPU's kernels throughout (marked ``numerics``);
#: engine tests of bit-identity and of fast-against-naive arithmetic carry the mark themselves.
_NUMERICS_FOLDERS = ("maps", "models", "metrics")
_ARCHIVE = _TESTS / "fixtures" / "wsol-metadata.tar.xz"


def _unpacked_copy() -> Path:
    digest = hashlib.sha256(_ARCHIVE.read_bytes()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"mnpo-wsol-metadata-{digest}"
    if not (target / "wsol-metadata" / "CUB").is_dir():
        # Unpack beside the target and rename: parallel workers never see half a copy.
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        with tarfile.open(_ARCHIVE) as tar:
            tar.extractall(staging, filter="data")
        try:
            os.rename(staging, target)
        except OSError:  # another worker won the race
            shutil.rmtree(staging, ignore_errors=True)
    return target / "wsol-metadata"


def pytest_configure(config):
    if os.environ.get("MNPO_WSOL_METADATA"):
        return
    shared = _TESTS.parent.parent / "shared" / "wsol-metadata"
    if (shared / "CUB").is_dir():
        os.environ["MNPO_WSOL_METADATA"] = str(shared)
    elif _ARCHIVE.is_file():
        os.environ["MNPO_WSOL_METADATA"] = str(_unpacked_copy())


def pytest_collection_modifyitems(config, items):
    """Mark the numerics-heavy tests: ``pytest -m numerics`` runs them under every CPU
    capability (``tests/capability_matrix.py``)."""
    import pytest

    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(_TESTS)
        if relative.parts[0] in _NUMERICS_FOLDERS:
            item.add_marker(pytest.mark.numerics)
