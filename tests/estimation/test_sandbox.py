"""``memguard.estimation.sandbox``: user code in a forked child, only its result back, killed on time."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import warnings
from typing import Any

import pytest
import torch

from memguard.errors import ConfigError, MemguardError, TraceError
from memguard.estimation import sandbox

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sandbox.forks(), reason="the sandbox forks on Linux only")]

STATE: dict[str, Any] = {"calls": 0}


def _change_the_world() -> tuple[bool, int]:
    STATE["calls"] += 1
    torch.manual_seed(123)
    torch.randn(3)
    return sandbox.in_child(), STATE["calls"]


def test_the_result_comes_back_and_nothing_else_does() -> None:
    rng = torch.get_rng_state()
    assert sandbox.run(_change_the_world, timeout=30) == (True, 1)
    assert STATE["calls"] == 0 and torch.equal(torch.get_rng_state(), rng)
    assert not sandbox.in_child()


def test_an_exception_comes_back_as_itself() -> None:
    def bad() -> None:
        raise ConfigError("batch_size must be positive, got -1")

    with pytest.raises(ConfigError, match="got -1"):
        sandbox.run(bad, timeout=30)


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.hook = lambda: None  # a lambda does not pickle


def test_an_exception_that_does_not_pickle_keeps_its_name_and_message() -> None:
    def bad() -> None:
        raise _Unpicklable("the user's own error")

    with pytest.raises(MemguardError, match="_Unpicklable: the user's own error"):
        sandbox.run(bad, timeout=30)


def test_a_pure_python_loop_is_killed_at_the_timeout() -> None:
    def spin() -> None:
        while True:
            pass

    start = time.monotonic()
    with pytest.raises(TraceError, match=r"stopped after 1 s \(trace_timeout\)"):
        sandbox.run(spin, timeout=1)
    assert time.monotonic() - start < 3


def test_a_child_that_dies_is_named() -> None:
    with pytest.raises(TraceError, match="died of signal SIGKILL"):
        sandbox.run(lambda: os.kill(os.getpid(), signal.SIGKILL), timeout=30)


def test_a_process_the_child_started_does_not_hold_the_answer_back() -> None:
    def start_one() -> int:
        if os.fork() == 0:  # holds the pipe's write end for 5 s
            time.sleep(5)
            os._exit(0)
        return 7

    start = time.monotonic()
    assert sandbox.run(start_one, timeout=30) == 7
    assert time.monotonic() - start < 3


def test_collectives_and_compilation_are_off_in_the_child() -> None:
    def inside() -> tuple[str, bool]:
        try:
            torch.distributed.all_reduce(torch.ones(1))
        except TraceError as exc:
            message = str(exc)
        dynamo = importlib.import_module("torch._dynamo")
        return message, bool(dynamo.config.disable)

    message, disabled = sandbox.run(inside, timeout=60)
    assert "torch.distributed.all_reduce" in message and disabled
    assert torch.distributed.all_reduce.__module__ == "torch.distributed.distributed_c10d"  # the parent's is untouched


def test_without_fork_it_runs_here_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.IN_PROCESS_VARIABLE, "1")
    monkeypatch.setattr(sandbox, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sandbox.run(_change_the_world, timeout=30) == (False, 1)
        sandbox.run(lambda: None, timeout=30)
    STATE["calls"] = 0
    assert [str(w.message).count("runs user code in this process") for w in caught] == [1]


def test_forks_only_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not sandbox.forks()
