"""Atomic writes keep permissions; arrays encode to JSON exactly."""

import json
import os

import numpy as np
import pytest

from mnpo.io import atomic_path, decode_array, encode_array, write_json_atomic


@pytest.mark.parametrize("array", [
    np.arange(6.0).reshape(2, 3) / 7,                 # float64 bits, not decimal text
    np.array([1e-310, np.nan, -np.inf], np.float64),  # subnormal, NaN, infinity
    np.zeros((0, 4), np.int16),
    np.array([1, -2], ">i4"),                         # big-endian in, native out
    np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
    np.array([True, False]),
])
def test_arrays_round_trip_through_json_exactly(array):
    back = decode_array(json.loads(json.dumps(encode_array(array))))
    assert back.shape == array.shape and back.dtype == array.dtype.newbyteorder("=")
    assert np.array_equal(back, array, equal_nan=array.dtype.kind == "f")
    back[...] = 0 if back.size else back  # a writable copy


def test_bad_encodings_are_refused():
    with pytest.raises(TypeError, match="numeric arrays, got dtype <U1"):
        encode_array(np.array(["a"]))
    data = encode_array(np.zeros(3))
    with pytest.raises(ValueError, match=r"24 bytes do not make a <f8 array of shape \(4,\)"):
        decode_array({**data, "shape": [4]})


def test_new_files_follow_the_umask_and_old_files_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.txt"
        kept.write_text("x")
        kept.chmod(0o600)
        with atomic_path(kept) as tmp:
            tmp.write_text("y")
        assert kept.read_text() == "y" and kept.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
