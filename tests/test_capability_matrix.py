"""Which kernel paths the capability matrix runs (tests/capability_matrix.py)."""

import capability_matrix
import pytest


@pytest.mark.parametrize("machine, native, expected", [
    ("x86_64", "avx512", ["default", "avx2"]),
    ("x86_64", "avx2", ["default"]),
    ("x86_64", "default", []),
    ("aarch64", "sve256", ["default"]),
    ("aarch64", "default", []),
])
def test_the_paths_below_the_native_one(monkeypatch, machine, native, expected):
    monkeypatch.setattr(capability_matrix.platform, "machine", lambda: machine)
    monkeypatch.setattr(capability_matrix, "capability", lambda env: native)
    got_native, others = capability_matrix.configurations({})
    assert got_native == native and [name for name, _ in others] == expected
    for name, variables in others:
        assert variables["ATEN_CPU_CAPABILITY"] == name
        if machine == "x86_64":  # oneDNN and MKL capped at the same instruction set
            assert set(variables) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}


def test_the_native_probe_ignores_kernel_variables_set_by_the_caller(monkeypatch):
    """The probe must see the CPU itself, not a cap the calling shell left set."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    seen = []
    monkeypatch.setattr(capability_matrix, "capability", lambda env: seen.append(env) or "default")
    monkeypatch.setattr(capability_matrix, "run", lambda label, env, args: True)
    assert capability_matrix.main([]) == 0
    assert "ATEN_CPU_CAPABILITY" not in seen[0]


def test_a_failed_path_is_named_and_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(capability_matrix.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(capability_matrix, "capability",
                        lambda env: env.get("ATEN_CPU_CAPABILITY", "avx2"))
    monkeypatch.setattr(capability_matrix, "run", lambda label, env, args: "default" not in label)
    assert capability_matrix.main([]) == 1
    assert "FAILED under: ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41" in capsys.readouterr().out
