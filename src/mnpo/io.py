"""Atomic file writes (a reader sees the old file or the new one, never half of one) and
exact JSON encoding of arrays."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed onto ``path``.

    If the block raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (or left as a hidden ``.name.*.tmp`` after a hard kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permissions ``path`` keeps (if it exists) or a new file gets under the umask
    (``mkstemp`` alone would leave 0600)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A numeric array as JSON-able data, exactly: dtype, shape and the bytes in base64."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"encode_array takes numeric arrays, got dtype {array.dtype}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": little.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(little).tobytes()).decode("ascii")}


def decode_array(data: Mapping[str, Any]) -> np.ndarray:
    """The array :func:`encode_array` encoded (a writable copy); ValueError if the parts disagree."""
    dtype = np.dtype(data["dtype"])
    raw = base64.b64decode(data["data"])
    shape = tuple(int(s) for s in data["shape"])
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"encoded array: {len(raw)} bytes do not make a {data['dtype']} array of shape {shape}")
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="))
