"""Smoke tests of the benchmark harness (benchmarks/): cases build, the truth runs end to end.

No timings are asserted; the one truth run uses a model of a few million parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed

from benchmarks import accuracy, cases, truth
from benchmarks._common import render_table


def test_case_names_are_unique_and_cover_the_kinds() -> None:
    names = [c.name for c in cases.CASES]
    assert len(names) == len(set(names))
    assert len(cases.CASES) >= 11
    assert any(c.gradient_checkpointing for c in cases.CASES)
    assert any(c.frozen_blocks for c in cases.CASES)
    assert {c.precision for c in cases.CASES} >= {"32-true", "bf16-mixed", "bf16-true"}
    assert {c.optimizer for c in cases.CASES} >= {"adamw", "sgd", "sgd-momentum", "adafactor"}


@pytest.mark.parametrize("name", ["gpt2-frozen", "llama-small-bf16-true", "plain-transformer"])
def test_prepared_module_on_meta(name: str) -> None:
    case = cases.get_case(name)
    module = cases.prepared_module(case, "meta")
    params = list(module.parameters())
    assert all(p.is_meta for p in params)
    assert module.training
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    if case.frozen_blocks:
        assert 0 < trainable < total
    else:
        assert trainable == total
    if case.precision == "bf16-true":
        assert {p.dtype for p in params} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["t5-small", "gpt2", "plain-transformer"])
def test_warmup_case_is_small_and_as_wide(name: str) -> None:
    case = cases.get_case(name)
    real = cases.prepared_module(case, "meta")
    small = cases.prepared_module(cases.warmup_case(case), "meta")
    assert 5 * sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in real.parameters())
    width = {p.shape[-1] for p in real.parameters() if p.dim() == 2}
    assert width & {p.shape[-1] for p in small.parameters() if p.dim() == 2}


def test_spec_round_trip() -> None:
    case = cases.get_case("llama-small-ckpt-frozen")
    spec = json.loads(json.dumps(case.to_dict()))
    assert cases.Case.from_dict(spec) == case
    with pytest.raises(ValueError, match="loss_fn"):
        cases.Case.from_dict({**spec, "loss_fn": "x.y"})


def test_errors_and_summary_without_estimates() -> None:
    rows = [{"case": "x", "errors": {"trace": None}, "estimates": {"trace": {"error": "TraceError"}}}]
    summary = accuracy.summarize(rows, ["trace"])
    assert summary["trace"] == {"cases": 0, "failed": ["x"]}
    assert summary["targets"]["trace_max_abs"] is None
    assert accuracy.error_of({"peak_bytes": 110}, 100) == pytest.approx(0.10)
    assert "n/a (TraceError)" in accuracy.render(
        [{**rows[0], "truth": {"peak_bytes": 2**20}}], ["trace"], "cpu")
    assert render_table(["a", "b"], [["x", "1"]]).splitlines()[2] == "x  1"


@pytest.mark.skipif(not truth.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_truth_of_a_small_model_in_a_fresh_process() -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 256,
              "n_layer": 2, "n_head": 4, "vocab_size": 8000, "n_positions": 128}
    case = cases.Case("smoke", config, batch_size=2, seq_len=64)
    record = truth.measure_in_subprocess(case, timeout=300)
    # weights + gradients + two AdamW moments are at least 4x the weights; activations are small
    assert 3.5 * record["param_bytes"] < record["peak_bytes"] < 12 * record["param_bytes"]
