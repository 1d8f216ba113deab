"""Real multi-process CPU runs (gloo) against memguard's per-rank estimates.

The three real cases (DDP and FSDP2 over two ranks, LoRA on one) are measured once, by one
launcher process of ``benchmarks/distributed.py`` that forks a fresh process per rank, and every
rank is measured by the CPU truth method (RSS high-water mark, see ``benchmarks/truth.py``). The
models are tiny GPT-2s (2 blocks, 128 wide) on one thread per rank: the whole module takes about
10 s on two cores, most of it importing transformers once.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed

from benchmarks import _ranks, distributed

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {**distributed.GPT2_SMALL, "n_layer": 2, "n_embd": 128, "vocab_size": 4000,
                        "n_positions": 128}
TRACE_TOLERANCE = 0.05
"""Issue 6: the trace within 5% of the measured multi-process CPU runs."""

DDP = distributed.DistCase("test-ddp", TINY, "ddp", world_size=2, batch_size=2, seq_len=64)
FSDP2 = distributed.DistCase("test-fsdp2", TINY, "fsdp2", world_size=2, batch_size=2, seq_len=64)
LORA = distributed.DistCase("test-lora", TINY, "none", world_size=1, batch_size=2, seq_len=64, lora_rank=8)
HAVE_PEFT = importlib.util.find_spec("peft") is not None

needs_gloo = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs Linux /proc (the RSS truth) and torch.distributed with gloo")


@pytest.fixture(scope="module")
def measured() -> dict[str, list[dict[str, Any]] | RuntimeError]:
    """Every rank of the three cases, measured once for the module."""
    return distributed.run_cases([DDP, FSDP2, *([LORA] if HAVE_PEFT else [])], threads=1, timeout=120)


def _errors(measured: dict[str, list[dict[str, Any]] | RuntimeError], case: distributed.DistCase) -> list[float]:
    """(trace estimate - truth) / truth of every rank of ``case``; a failed measurement fails."""
    ranks = measured[case.name]
    if isinstance(ranks, RuntimeError):
        raise ranks
    assert [r["rank"] for r in ranks] == list(range(case.world_size))
    assert all(r["peak_bytes"] >= r["phases"]["1:step"] == r["peak_two_steps_bytes"] > 0 for r in ranks)
    estimate = distributed.estimate_case(case, "trace")
    assert "error" not in estimate, estimate
    errors = [distributed.error(estimate, r["peak_bytes"]) for r in ranks]
    assert None not in errors
    return [e for e in errors if e is not None]


@needs_gloo
def test_ddp_ranks_match_the_trace(measured) -> None:
    errors = _errors(measured, DDP)
    assert len(errors) == 2
    assert all(abs(e) <= TRACE_TOLERANCE for e in errors), errors


@needs_gloo
def test_fsdp2_ranks_match_the_trace(measured) -> None:
    errors = _errors(measured, FSDP2)
    assert len(errors) == 2
    assert all(abs(e) <= TRACE_TOLERANCE for e in errors), errors
    ddp = measured[DDP.name]
    assert not isinstance(ddp, RuntimeError)
    fsdp2 = measured[FSDP2.name]
    assert not isinstance(fsdp2, RuntimeError)
    # each rank holds half of the parameters under FSDP, all of them under DDP
    assert all(2 * f["local_param_bytes"] == pytest.approx(d["local_param_bytes"], rel=0.01)
               for f, d in zip(fsdp2, ddp, strict=True))


@needs_gloo
@pytest.mark.skipif(not HAVE_PEFT, reason="needs peft")
def test_lora_matches_the_trace(measured) -> None:
    errors = _errors(measured, LORA)
    assert len(errors) == 1
    assert abs(errors[0]) <= TRACE_TOLERANCE, errors


def _fail_on_rank_one(rank: int) -> dict[str, Any]:
    if rank == 1:
        raise ValueError("rank one breaks")
    time.sleep(60)  # as a rank waiting in a collective for the one that failed
    return {"rank": rank}


def test_a_failed_rank_stops_the_others_and_is_named() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 failed \(exit 1\):\n(.|\n)*ValueError: rank one breaks"):
        _ranks.fork_ranks(2, _fail_on_rank_one, timeout=30)
    assert time.monotonic() - start < 20  # rank 0 was killed, not waited for
    assert _ranks.fork_ranks(2, lambda rank: {"rank": rank, "pid": os.getpid()}, timeout=30)[1]["rank"] == 1


def test_ranks_past_the_timeout_are_killed() -> None:
    with pytest.raises(TimeoutError, match="longer than 1 s"):
        _ranks.fork_ranks(1, _fail_on_rank_one, timeout=1)


def test_cases_and_strategies() -> None:
    names = [c.name for c in distributed.CASES]
    assert len(names) == len(set(names))
    assert {c.wrap for c in distributed.CASES} == set(distributed.WRAPS)
    by_wrap = {c.wrap: c.strategy for c in distributed.CASES}
    assert by_wrap == {"ddp": "ddp", "ddp_bucket_view": "ddp", "fsdp2": "fsdp", "fsdp1": "fsdp",
                       "none": "single"}
    case = distributed.CASES[0]
    assert distributed.DistCase.from_dict(case.to_dict()) == case
    assert distributed.select("ddp,lora-small") == [case, distributed.select("lora-small")[0]]
    with pytest.raises(SystemExit):
        distributed.select("nope")


def test_error_and_table() -> None:
    assert distributed.error({"peak_bytes": 105}, 100) == pytest.approx(0.05)
    assert distributed.error({"error": "KeyError"}, 100) is None
    ok = {"case": "x", "ranks": [{"rank": 0, "peak_bytes": 2**20}],
          "estimates": {"trace": {"peak_bytes": 2**20}, "formula": {"error": "KeyError"},
                        "trace_single": {"peak_bytes": 2**20}},
          "errors": {"trace": [0.0], "formula": [None], "trace_single": [0.0]}}
    table = distributed.render([ok, {"case": "y", "failed": "rank 1 failed:\nRuntimeError: boom"}])
    assert "1.0 (+0.0%)" in table and "n/a (KeyError)" in table and "RuntimeError: boom" in table


def test_launcher_environment() -> None:
    env = distributed.launcher_env()
    assert (env["MALLOC_MMAP_THRESHOLD_"], env["MKL_DISABLE_FAST_MM"]) == ("65536", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < _ranks.free_port() < 65536


def test_a_launcher_that_dies_fails_every_case_it_did_not_report(tmp_path: Path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text("import json, sys\nprint(json.dumps({'name': 'a', 'ranks': [{'rank': 0}]}))\n"
                      "sys.exit('boom')\n")
    out = _ranks.launch(script, {}, ["a", "b"], env=dict(os.environ), timeout=60)
    assert out["a"] == [{"rank": 0}]
    assert isinstance(out["b"], RuntimeError) and "exited with 1" in str(out["b"]) and "boom" in str(out["b"])
