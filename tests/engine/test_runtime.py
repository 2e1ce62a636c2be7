"""Devices and numeric precision of a pass."""

import pytest
import torch

from mnpo.engine.config import ConfigError, config_from_dict
from mnpo.engine.runtime import autocast, resolve_device, resolve_precision, tf32_enabled

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object; no GPU needed to build it


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == CPU
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.fixture
def two_gpus(monkeypatch):
    """torch believing it has two CUDA devices (no GPU needed: only the device object is built)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_cuda_means_the_local_ranks_gpu(two_gpus):
    """Under torchrun every process must get its own GPU: ``cuda`` and ``auto`` read LOCAL_RANK,
    an explicit index is kept; a rank beyond the GPUs is refused, not piled onto GPU 0."""
    assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device("auto")
    two_gpus.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device("auto")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    two_gpus.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 asks for GPU 2, but torch sees 2"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:5' asks for GPU 5"):
        resolve_device("cuda:5")
    two_gpus.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK='one' is not an integer"):
        resolve_device("cuda")


def test_resolve_precision():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("tf32", CPU) == "fp32"  # TF32 is a CUDA tensor-core mode
    assert resolve_precision("tf32", CUDA) == "tf32"
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)


def _tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def restore_tf32():
    saved = _tf32_flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_context_sets_both_flags_and_restores_them(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    with tf32_enabled(True):
        assert _tf32_flags() == (True, True)
    assert _tf32_flags() == (False, True)
    with pytest.raises(RuntimeError, match="inside"):
        with tf32_enabled(False):
            assert _tf32_flags() == (False, False)
            raise RuntimeError("inside")
    assert _tf32_flags() == (False, True)


def test_tf32_context_switches_the_new_api_when_the_process_set_only_that(restore_tf32):
    """Since torch 2.9 ``fp32_precision`` is the recommended switch; once a process sets it alone,
    reading the legacy ``allow_tf32`` raises, and the context must not."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has no fp32_precision API")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    with pytest.raises(RuntimeError, match="legacy and new"):
        _tf32_flags()  # the state the context has to cope with
    with tf32_enabled(False):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    with tf32_enabled(True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")


def test_cuda_fp32_pass_is_strict_and_tf32_pass_uses_tensor_cores(restore_tf32):
    """On CUDA, ``fp32`` switches TF32 off for the pass (PyTorch's cuDNN default is on);
    ``tf32`` switches it on; on the CPU neither touches the flags."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    with autocast(CUDA, "fp32"):
        assert _tf32_flags() == (False, False)
    with autocast(CUDA, "tf32"):
        assert _tf32_flags() == (True, True)
    with autocast(CPU, "fp32"):
        assert _tf32_flags() == (False, True)
    assert _tf32_flags() == (False, True)


def test_bf16_pass_autocasts():
    with autocast(CPU, "bf16"):
        out = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert out.dtype == torch.bfloat16


def test_autocast_refuses_an_unresolved_precision():
    with pytest.raises(ValueError, match="'auto' is not resolved"):
        autocast(CPU, "auto")


def test_config_accepts_tf32_and_names_a_bad_precision():
    data = {"root": "images", "metadata": "metadata"}
    cfg = config_from_dict({"data": data, "runtime": {"precision": "tf32"}}, source="t")
    assert cfg.runtime.precision == "tf32"
    with pytest.raises(ConfigError, match="runtime.precision: 'half'"):
        config_from_dict({"data": data, "runtime": {"precision": "half"}}, source="t")


def test_cudnn_autotune_is_on_within_the_block_on_cuda_only():
    from mnpo.engine.runtime import cudnn_autotune

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with cudnn_autotune(torch.device("cuda", 0)):  # a device object needs no GPU
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError, match="boom"), cudnn_autotune(torch.device("cuda", 0)):
            raise RuntimeError("boom")
        assert torch.backends.cudnn.benchmark is False  # restored on an error too
        with cudnn_autotune(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
