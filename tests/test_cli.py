"""The `mnpo` command line: synth, bad arguments, --version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mnpo.cli import main

ARGS = ["--preset", "shapes", "--image-size", "48", "--classes", "3",
        "--train-per-class", "2", "--val-per-class", "1", "--test-per-class", "2"]


def test_synth_writes_a_data_set(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), *ARGS]) == 0
    assert "train 6, val 3, test 6" in capsys.readouterr().out
    info = json.loads((out / "dataset.json").read_text("utf-8"))
    assert info["complete"] is True
    assert (info["preset"], info["image_size"], info["num_classes"]) == ("shapes", 48, 3)
    assert info["counts"] == {"train": 6, "val": 3, "test": 6}
    for split, n in info["counts"].items():
        ids = (out / "metadata" / split / "image_ids.txt").read_text().split()
        assert len(ids) == n and all((out / "images" / i).is_file() for i in ids)
        assert (out / "metadata-masks" / split / "class_labels.txt").is_file()
    assert len(list((out / "masks" / "val").rglob("*_mask.png"))) == 3
    # running it again over its own output works and gives the same files
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["synth", "--out", str(out), *ARGS]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_unknown_preset_exits_non_zero_with_message(tmp_path, capsys):
    out = tmp_path / "synth"
    with pytest.raises(SystemExit) as err:
        main(["synth", "--out", str(out), "--preset", "nope"])
    code = err.value.code
    assert code not in (0, None)
    message = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert "nope" in message
    assert not out.exists()


def test_non_integer_argument_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["synth", "--out", str(tmp_path / "o"), "--classes", "three"])
    assert err.value.code == 2
    assert "three" in capsys.readouterr().err


def test_too_small_image_fails_with_a_message_naming_it(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run(
        [sys.executable, "-m", "mnpo.cli", "synth", "--out", str(out), "--preset", "shapes",
         "--image-size", "7"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "image_size" in proc.stderr and "got 7" in proc.stderr
    assert not out.exists()


def test_version(capsys):
    import mnpo

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mnpo {mnpo.__version__}"
