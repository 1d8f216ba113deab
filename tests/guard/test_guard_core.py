"""memguard.guard: every verdict of every framework's guard, driven by fake run views (no Trainer, no trace).

The estimator is a closed form (1000 bytes of weights plus 100 per sample), the budget is bytes
and ``all_gather`` returns the rows of the other ranks we choose, so each test runs in
milliseconds and asserts the exact numbers and words a user would see.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
import torch

from memguard import BatchTooLargeError, ConfigError, InsufficientMemoryError, MemguardError
from memguard.estimation.result import Category, MemoryEstimate
from memguard.guard import (
    Decision,
    Framework,
    GuardConfig,
    RankReport,
    RunView,
    StepProbe,
    StepView,
    Training,
    Verdict,
    act,
    assess,
    estimator,
)

WEIGHTS, PER_SAMPLE, ASKED = 1000, 100, 8
BUDGET = 2000  # usable with a 10% margin: 1800 bytes, which holds 8 samples (1800 B) and no more
SMALL = 1400  # usable: 1260 bytes, which holds 2 samples (1200 B)


def est(batch_size: int, accumulate: int = 1, *, uncertain: bool = False) -> MemoryEstimate:
    return MemoryEstimate("trace", {Category.PARAMETERS: WEIGHTS, Category.ACTIVATIONS: PER_SAMPLE * batch_size},
                          inputs={"batch_size": batch_size, "accumulate_grad_batches": accumulate},
                          stand_ins={"nonzero": "ones"} if uncertain else {})


@dataclasses.dataclass
class Run:
    """A fake run: what the guard said, what it gathered, what it set."""

    framework: Framework = Framework.LIGHTNING
    accumulate: int = 1
    rank: int = 0
    others: list[RankReport] = dataclasses.field(default_factory=list)  # the other ranks' reports, after ours
    can_set: bool = True
    warned: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    said: list[str] = dataclasses.field(default_factory=list)
    gathered: list[list[int]] = dataclasses.field(default_factory=list)
    set_to: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    estimated: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def all_gather(self, row: list[int]) -> list[list[int]]:
        self.gathered.append(row)
        rows = [r.to_row() for r in self.others]
        rows.insert(self.rank, row)
        return rows

    def view(self) -> RunView:
        return RunView(self.framework, self.accumulate, self.rank, 1 + len(self.others), torch.device("cpu"), 1,
                       self.all_gather, lambda message, every: self.warned.append((message, every)), self.said.append,
                       (lambda b, a: self.set_to.append((b, a))) if self.can_set else None)

    def step(self, batch_size: int = ASKED, *, uncertain: bool = False) -> StepView:
        def estimate_at(b: int, acc: int) -> MemoryEstimate:
            self.estimated.append((b, acc))
            return est(b, acc, uncertain=uncertain)

        return StepView(torch.zeros(batch_size, 4), estimate_at, (), lambda fit: [])

    def check(self, action: str, budget: int = BUDGET, *, early: bool = True, strict: bool = False,
              step: Any = None) -> Training | None:
        config = GuardConfig(action, 0.1, budget, strict=strict)
        found = assess(config, self.view(), step or self.step, can_change_batch=early)
        assert found is not None and found.plan is not None and found.decision is not None
        return act(config, self.view(), found.plan, found.decision, found.reports)


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"action": "shrink"}, "'shrink'"), ({"margin": 1.0}, "1.0"), ({"budget": "lots"}, "'lots'"),
    ({"measure_steps": 0}, "0"), ({"trace_timeout": -1}, "-1"), ({"reset_peak": "yes"}, "'yes'"),
])
def test_the_configuration_names_a_bad_argument(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GuardConfig(**kwargs)


# -- one rank -------------------------------------------------------------------------------------


def test_fits_trains_as_asked_and_says_so_in_each_frameworks_words() -> None:
    for framework, asked in ((Framework.LIGHTNING, "MemGuard: a training step at batch size 8"),
                             (Framework.TRAINER, "MemGuardCallback: a training step at per_device_train_batch_size=8"),
                             (Framework.FABRIC, "memguard.fabric.preflight: a training step at batch size 8")):
        run = Run(framework, accumulate=2)
        assert run.check("reduce") == Training(ASKED, 2, est(ASKED, 2))
        assert run.said == [f"{asked} fits: 1.76 KiB predicted, 1.95 KiB available (budget of 1.95 KiB), margin 10%"]
        assert run.warned == [] and run.set_to == []
        assert run.gathered == [[1, 1, ASKED, 1800, 2000]]  # the rank report: five integers


def test_warn_warns_with_what_would_help_and_the_table_and_trains_as_asked() -> None:
    run = Run(Framework.TRAINER)
    assert run.check("warn", SMALL) == Training(ASKED, 1, est(ASKED))
    [(text, every_rank)] = run.warned
    assert not every_rank
    assert text.startswith("MemGuardCallback: a training step at per_device_train_batch_size=8 may not fit: "
                           "1.76 KiB predicted, 1.37 KiB available (budget of 1.37 KiB), margin 10%.\n"
                           "Nothing memguard can change")
    assert "memguard estimate (trace)" in text and "activations" in text


def test_raise_raises_with_the_estimate_and_the_memory() -> None:
    run = Run()
    with pytest.raises(InsufficientMemoryError) as info:
        run.check("raise", SMALL)
    assert not isinstance(info.value, BatchTooLargeError)
    assert str(info.value).startswith("MemGuard: a training step at batch size 8 does not fit: 1.76 KiB predicted")
    assert info.value.free_bytes == SMALL and info.value.estimate == est(ASKED)


def test_reduce_trains_with_a_smaller_batch_and_more_accumulation_keeping_the_effective_batch() -> None:
    run = Run(accumulate=1)
    got = run.check("reduce", SMALL)
    assert got == Training(2, 4, est(2, 2), reduced=True)  # 8 = 2 x 4, a divisor in [1, 2]
    assert run.set_to == [(2, 4)]
    assert (ASKED, 1) in run.estimated and all(acc == 2 for b, acc in run.estimated if b < ASKED)
    assert run.warned == []
    assert run.said == ["MemGuard: a training step at batch size 8 does not fit (1.76 KiB predicted, 1.37 KiB "
                        "available (budget of 1.37 KiB), margin 10%); the largest that fits is 2; training with batch "
                        "size 2 (1.17 KiB predicted) and accumulate_grad_batches=4 (was 1), an effective batch of 8 "
                        "(asked: 8)"]


def test_reduce_warns_when_the_effective_batch_cannot_be_kept() -> None:
    run = Run()
    got = run.check("reduce", 1500, step=lambda: run.step(7))  # 3 fit; 7 has no divisor in [1.5, 3]
    assert got is not None and (got.batch_size, got.accumulate) == (3, 3)
    [(text, _)] = run.warned
    assert text.endswith("an effective batch of 9 (asked: 7): no divisor of 7 lies between 1.5 and 3, so the "
                         "effective batch changed")


@pytest.mark.parametrize("framework", [Framework.TRAINER, Framework.FABRIC])
def test_reduce_where_the_batch_cannot_change_names_what_to_set(framework: Framework) -> None:
    run = Run(framework, accumulate=2, can_set=False)
    with pytest.raises(BatchTooLargeError) as info:
        run.check("reduce", SMALL, early=False)
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, InsufficientMemoryError)
    assert (err.batch_size, err.gradient_accumulation_steps, err.fitting_batch_size) == (2, 8, 2)
    assert err.free_bytes == SMALL and err.estimate == est(ASKED, 2)
    todo = ("Set per_device_train_batch_size=2 and gradient_accumulation_steps=8 (was 2; the same effective batch of "
            "16 per device) in TrainingArguments and train again." if framework is Framework.TRAINER else
            "Train with batch size 2 and 8 micro-batches per optimizer step (was 2; the same effective batch of 16 "
            "per device).")
    assert str(err).endswith(todo)
    assert pickle.loads(pickle.dumps(err)).batch_size == 2
    assert run.set_to == []


def test_reduce_on_a_stream_says_what_would_fit() -> None:
    run = Run()
    with pytest.raises(InsufficientMemoryError, match="IterableDataset") as info:
        run.check("reduce", SMALL, early=False)
    assert not isinstance(info.value, BatchTooLargeError)
    assert "What would fit: batch size 2 with accumulate_grad_batches=4." in str(info.value)


def test_reduce_when_not_even_one_fits_raises_with_the_estimate_at_one() -> None:
    run = Run(Framework.TRAINER)
    with pytest.raises(InsufficientMemoryError) as info:
        run.check("reduce", 1000)
    assert str(info.value).startswith("MemGuardCallback: not even a batch of 1 fits: 1.07 KiB predicted at "
                                      "per_device_train_batch_size=1, 1000 B available (budget of 1000 B), margin 10%.")
    assert info.value.estimate is not None and info.value.estimate.inputs["batch_size"] == 1


def test_an_uncertain_estimate_warns_and_the_verdict_still_holds() -> None:
    run = Run()
    assert run.check("warn", step=lambda: run.step(uncertain=True)) is not None
    [(text, every_rank)] = run.warned
    assert not every_rank
    assert text.startswith("MemGuard: the estimate rests on invented values, uncertain: data-dependent nonzero")
    assert run.said[0].startswith("MemGuard: a training step at batch size 8 fits")


def test_a_failed_estimate_warns_on_every_rank_after_the_collective() -> None:
    def broken() -> StepView:
        raise MemguardError("manual optimization is not traced")

    run = Run()
    config = GuardConfig("raise", budget=BUDGET)
    found = assess(config, run.view(), broken, can_change_batch=True)
    assert found is not None and found.plan is None and found.decision is None
    assert run.gathered == [[0, 0, 0, 0, 0]]  # it still took part
    assert run.warned == [("MemGuard could not estimate the memory of a training step, so training goes on "
                           "unchecked: MemguardError: manual optimization is not traced", True)]
    with pytest.raises(MemguardError, match="manual optimization"):
        assess(GuardConfig("raise", budget=BUDGET, strict=True), run.view(), broken, can_change_batch=True)
    assert len(run.gathered) == 2


def test_no_batch_yet_means_no_collective() -> None:
    run = Run()
    assert assess(GuardConfig(), run.view(), lambda: None, can_change_batch=True) is None
    assert run.gathered == [] and run.warned == []


# -- several ranks ----------------------------------------------------------------------------------


def test_ranks_disagreeing_raise_on_every_rank_naming_the_one_that_does_not_fit() -> None:
    other = RankReport(True, False, 0, 5000, 4000)
    run = Run(Framework.TRAINER, others=[other])
    with pytest.raises(InsufficientMemoryError) as info:
        run.check("raise")
    lines = str(info.value).splitlines()
    assert lines[0] == ("MemGuardCallback: a training step at per_device_train_batch_size=8 does not fit on rank(s) "
                        "[1]: predicted of available per rank: rank 0 1.76 KiB of 1.95 KiB, rank 1 4.88 KiB of "
                        "3.91 KiB; margin 10%; rank 0's memory: budget of 1.95 KiB.")
    assert lines[1] == "(It fits on this rank; the estimate below is this rank's.)"


def test_ranks_reduce_to_the_largest_batch_that_fits_every_rank() -> None:
    run = Run(others=[RankReport(True, False, 1, 5000, 4000)], rank=0)
    got = run.check("reduce")  # this rank fits 8; the other only 1
    assert got is not None and (got.batch_size, got.accumulate) == (1, 8) and run.set_to == [(1, 8)]
    assert "the largest that fits is 1 on every rank" in run.said[0]


def test_a_rank_that_could_not_estimate_leaves_every_rank_unchecked() -> None:
    run = Run(others=[RankReport(False)])
    assert run.check("raise", SMALL) is None
    assert run.warned == [("MemGuard could not estimate the memory of a training step on rank(s) [1], so training "
                           "goes on unchecked", False)]
    with pytest.raises(MemguardError, match=r"on rank\(s\) \[1\]$"):
        Run(others=[RankReport(False)]).check("raise", SMALL, strict=True)


# -- pieces ----------------------------------------------------------------------------------------------


def test_the_estimator_is_cached_and_a_smaller_batch_accumulates() -> None:
    calls: list[tuple[int, int]] = []
    at = estimator(lambda b, a: calls.append((b, a)) or est(b, a), 8, 3)
    assert at(8) == est(8, 3) and at(4) == est(4, 2) and at(8) == est(8, 3) and at(16) == est(16, 3)
    assert calls == [(8, 3), (4, 2), (16, 3)]


def test_a_report_crosses_ranks_as_five_integers() -> None:
    report = RankReport(True, False, 3, 300, 200)
    assert report.to_row() == [1, 0, 3, 300, 200] and RankReport.from_row(report.to_row()) == report
    assert Decision(Verdict.FITS, 8, 1) == Decision(Verdict.FITS, 8, 1)


def test_the_probe_measures_after_the_first_step_and_records_before_it_says() -> None:
    run = Run()
    recorded: list[Any] = []
    probe = StepProbe(GuardConfig(measure_steps=2), run.view(), recorded.append, (10 << 20, 10 << 20))
    tensors = [torch.zeros(4)]
    probe.arm(0)
    probe.after_step(0, lambda: (torch.device("cpu"), tensors))
    assert recorded == [] and run.said == []
    probe.after_step(1, lambda: (torch.device("cpu"), tensors))  # starts after the first optimizer step
    probe.after_step(2, lambda: (torch.device("cpu"), tensors))
    assert recorded == []
    probe.after_step(3, lambda: (torch.device("cpu"), tensors))  # measure_steps later
    [comparison] = recorded
    assert comparison.metrics["memguard/predicted_peak_bytes"] == float(10 << 20)
    assert run.said == [f"MemGuard: {comparison.summary}"]
    probe.finish()
    assert len(recorded) == 1


def test_a_probe_that_fails_warns_on_every_rank_and_stops() -> None:
    run = Run()
    probe = StepProbe(GuardConfig(), run.view(), lambda got: None, (1, 1))
    probe.arm(0)

    def broken() -> Any:
        raise RuntimeError("no device")

    probe.after_step(1, broken)
    assert run.warned == [("MemGuard could not measure the memory of the first steps: RuntimeError: no device", True)]
    probe.after_step(5, broken)
    assert len(run.warned) == 1
    strict = StepProbe(GuardConfig(strict=True), run.view(), lambda got: None, (1, 1))
    strict.arm(0)
    with pytest.raises(RuntimeError):
        strict.after_step(1, broken)


# -- pins: the adapters only translate ------------------------------------------------------------------

ADAPTERS = ["memguard/lightning", "memguard/integrations", "memguard/fabric.py"]
CORE_ONLY = {"reduced_batch", "max_batch_size", "remedy_lines", "format_bytes", "read_and_compare", "MemoryProbe",
             "cached", "available_to", "decide", "check_arguments"}


def imported(paths: list[str]) -> dict[str, set[str]]:
    """Every name each module under ``paths`` imports from memguard, by module."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = [f for p in paths for f in ((root / p).rglob("*.py") if (root / p).is_dir() else [root / p])]
    found: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memguard"):
                found.setdefault(str(f.relative_to(root)), set()).update(a.name for a in node.names)
    return found


def test_the_decision_the_probe_and_the_messages_live_only_in_the_core() -> None:
    shims = {"memguard/lightning/decision.py"}  # the old import path, re-exporting the core's names
    leaks = {f: names & CORE_ONLY for f, names in imported(ADAPTERS).items() if names & CORE_ONLY and f not in shims}
    assert leaks == {}


def test_no_private_name_crosses_a_module_boundary_in_the_guards() -> None:
    found = imported([*ADAPTERS, "memguard/guard"])
    private = {f: {n for n in names if n.startswith("_")} for f, names in found.items()}
    assert {f: n for f, n in private.items() if n} == {}
