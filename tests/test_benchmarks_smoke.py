"""Smoke tests of the benchmark harness (benchmarks/): cases build, the truth runs end to end.

No timings are asserted; the one truth run uses a model of a few million parameters.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed

from benchmarks import accuracy, cases, truth
from benchmarks._common import render_table

pytestmark = pytest.mark.slow


def test_case_names_are_unique_and_cover_the_kinds() -> None:
    names = [c.name for c in cases.CASES]
    assert len(names) == len(set(names))
    assert len(cases.CASES) >= 11
    assert any(c.gradient_checkpointing for c in cases.CASES)
    assert any(c.frozen_blocks for c in cases.CASES)
    assert {c.precision for c in cases.CASES} >= {"32-true", "bf16-mixed", "bf16-true"}
    assert {c.optimizer for c in cases.CASES} >= {"adamw", "sgd", "sgd-momentum", "adafactor"}


GPT2_BLOCK = 7_087_872
"""Parameters of one GPT-2 small block: 2 LayerNorms, attention (c_attn, c_proj) and MLP, 768 wide."""


@pytest.mark.parametrize(("name", "trainable"), [
    ("gpt2-frozen", 6 * GPT2_BLOCK + 2 * 768),  # embeddings and blocks 0-5 frozen: blocks 6-11 and ln_f train
    ("llama-small-bf16-true", None),
    ("plain-transformer", None),
])
def test_prepared_module_on_meta(name: str, trainable: int | None) -> None:
    case = cases.get_case(name)
    module = cases.prepared_module(case, "meta")
    params = list(module.parameters())
    assert all(p.is_meta for p in params)
    assert module.training
    total = sum(p.numel() for p in params)
    assert sum(p.numel() for p in params if p.requires_grad) == (trainable or total)
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
    """The truth harness end to end (fresh process, memguard's probe) agrees with the trace."""
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 256, "n_layer": 2,
              "n_head": 4, "vocab_size": 8000, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}
    case = cases.Case("smoke", config, batch_size=2, seq_len=64)
    record = truth.measure_in_subprocess(case, timeout=300, threads=1)
    assert record["param_bytes"] == 4 * sum(p.numel() for p in cases.prepared_module(case, "meta").parameters())
    # weights + gradients + two AdamW moments are at least 4x the weights; activations are small
    assert 3.5 * record["param_bytes"] < record["peak_bytes"] < 12 * record["param_bytes"]
    assert record["param_bytes"] <= record["model_and_batch_bytes"] < 1.1 * record["param_bytes"]
    assert len(record["losses"]) == truth.STEPS and record["library_caches"] is False
    trace = accuracy.estimate_case(case, "trace", "cpu")
    assert abs(accuracy.error_of(trace, record["peak_bytes"])) < 0.05, (trace, record)


def _private_memguard_names(source: str) -> list[str]:
    """memguard names a script reaches that start with ``_`` (modules or attributes)."""
    tree = ast.parse(source)
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "memguard":
            found += [p for p in node.module.split(".") if p.startswith("_")]
            found += [a.name for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "memguard":
                    found += [p for p in a.name.split(".") if p.startswith("_")]
                    aliases.add(a.asname or "memguard")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(node.attr)
    return found


def test_benchmarks_use_memguards_public_names() -> None:
    """What memguard has (the probe, NVML, the blocks) is imported, not rewritten or reached into."""
    scripts = sorted(Path(cases.__file__).parent.glob("*.py"))
    assert len(scripts) >= 10
    reached = {s.name: names for s in scripts if (names := _private_memguard_names(s.read_text()))}
    assert reached == {}  # allocator.py captures the trace's public Ledger
    text = "\n".join(s.read_text() for s in scripts)
    assert "pynvml" not in text and "VmHWM\")" not in text and 'open("/proc/self/clear_refs"' not in text
    assert _private_memguard_names("import memguard.estimation.trace as t\nt._Ledger\n") == ["_Ledger"]
    assert _private_memguard_names("from memguard.device._nvml import devices\n") == ["_nvml"]


def test_running_a_benchmark_leaves_the_tracked_results_alone(tmp_path) -> None:
    """Results go to out/benchmarks/ (ignored by git) unless --out or --update-results say otherwise."""
    import argparse
    import subprocess

    from benchmarks._common import RESULTS, SCRATCH, add_output_arguments, result_path

    parser = argparse.ArgumentParser()
    add_output_arguments(parser, "speed_cpu.json")
    root = Path(__file__).resolve().parents[1]
    assert result_path(parser.parse_args([]), "speed_cpu.json") == SCRATCH / "speed_cpu.json" \
        == root / "out" / "benchmarks" / "speed_cpu.json"
    assert result_path(parser.parse_args(["--update-results"]), "speed_cpu.json") == RESULTS / "speed_cpu.json"
    assert result_path(parser.parse_args(["--out", str(tmp_path / "s.json")]), "x") == tmp_path / "s.json"
    assert result_path(parser.parse_args(["--output", str(tmp_path / "s.json")]), "x") == tmp_path / "s.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(SCRATCH / "speed_cpu.json")], cwd=root)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0  # git ignores it
    assert truth.cache_path("cpu") == SCRATCH / "truth_cpu.json"
    assert truth.cache_path("cpu", update_results=True) == RESULTS / "truth_cpu.json"


def test_formula_snapshot_covers_every_preset_and_finds_a_changed_output(tmp_path, capsys) -> None:
    """``formula_speed.py --snapshot/--compare``: estimate and check of every preset (and a mixture of
    experts), and a compare that fails on one changed byte."""
    import memguard
    from benchmarks import formula_speed

    names = {name for name, _ in formula_speed.snapshot_cases()}
    for preset in [*memguard.list_presets(), "mixtral"]:
        assert {f"estimate-{preset}", f"check-{preset}"} <= names
    assert formula_speed.snapshot(tmp_path, compare=False, only="estimate-gpt2-bf16") == 0
    written = (tmp_path / "estimate-gpt2-bf16.json").read_text()
    assert written.startswith("exit 0\n{") and '"method": "formula"' in written
    assert formula_speed.snapshot(tmp_path, compare=True, only="estimate-gpt2-bf16") == 0
    (tmp_path / "estimate-gpt2-bf16.json").write_text(written.replace('"method"', '"method" '))
    assert formula_speed.snapshot(tmp_path, compare=True, only="estimate-gpt2-bf16") == 1
    assert "DIFFERS: estimate-gpt2-bf16" in capsys.readouterr().out
