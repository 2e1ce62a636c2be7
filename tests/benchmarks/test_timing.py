"""benchmarks/timing.py: the benchmarks' one timing loop."""

import pytest
import torch
from test_scripts import script_module

timing = script_module("timing")


def test_best_time_is_the_fastest_call_and_returns_the_last_result(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 27.0])  # calls of 5, 2 and 7 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    seconds, result = timing.best_time(lambda: calls.append(1) or len(calls), repeats=3)
    assert (seconds, result, len(calls)) == (2.0, 3, 3)


def test_warmup_is_one_untimed_call(monkeypatch):
    clock = iter([0.0, 4.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.best_time(lambda: calls.append(1), repeats=1, warmup=True)[0] == 4.0
    assert len(calls) == 2


def test_cuda_calls_are_timed_between_synchronizations(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or 0.0)
    timing.best_time(lambda: events.append("call"), torch.device("cuda:0"), repeats=2)
    assert events == [("sync", "cuda:0"), "clock", "call", ("sync", "cuda:0"), "clock"] * 2
    events.clear()
    timing.best_time(lambda: events.append("call"), torch.device("cpu"), repeats=1)
    assert events == ["clock", "call", "clock"]


def test_repeats_below_one_are_refused():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        timing.best_time(lambda: None, repeats=0)
