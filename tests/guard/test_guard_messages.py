"""Every message of the guard core (memguard/guard/messages.py), for each framework, byte for byte.

The fake runs are those of ``test_guard_core.py`` (a closed-form estimator, byte budgets, chosen
ranks), so the whole file runs in milliseconds. Each scenario writes what the guard said, warned
and raised into one text per framework, compared with ``tests/golden/guard_<framework>.txt``;
``tests/_golden.py`` says how to regenerate them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _golden import check_golden
from test_guard_core import BUDGET, SMALL, Run

from memguard import MemguardError
from memguard.guard import Framework, GuardConfig, RankReport, StepProbe, StepView, assess


def _broken_step() -> StepView:
    raise MemguardError("manual optimization is not traced")


def _broken_measure() -> None:
    raise RuntimeError("no device")


def _scenarios(framework: Framework) -> list[tuple[str, Run, Callable[[Run], object]]]:
    """(title, run, what to do with it): each verdict, the rank agreement, the probe's failure."""

    def probe_fails(run: Run) -> None:
        probe = StepProbe(GuardConfig(), run.view(), lambda got: None, (1, 1))
        probe.arm(0)
        probe.after_step(1, _broken_measure)

    lightning = framework is Framework.LIGHTNING
    return [
        ("fits", Run(framework, accumulate=2), lambda r: r.check("reduce")),
        ("warn: may not fit", Run(framework), lambda r: r.check("warn", SMALL)),
        ("raise: does not fit", Run(framework), lambda r: r.check("raise", SMALL)),
        ("reduce: a smaller batch, more accumulation", Run(framework), lambda r: r.check("reduce", SMALL)),
        ("reduce: the effective batch changes", Run(framework),
         lambda r: r.check("reduce", 1500, step=lambda: r.step(7))),
        # Lightning changes the batch once the loop has it, except on a stream; the others never do
        ("reduce: a stream", Run(framework), lambda r: r.check("reduce", SMALL, early=False)) if lightning else
        ("reduce: the batch cannot change here", Run(framework, accumulate=2, can_set=False),
         lambda r: r.check("reduce", SMALL, early=False)),
        ("reduce: not even one fits", Run(framework), lambda r: r.check("reduce", 1000)),
        ("an uncertain estimate", Run(framework), lambda r: r.check("warn", step=lambda: r.step(uncertain=True))),
        ("the estimate failed", Run(framework),
         lambda r: assess(GuardConfig("raise", budget=BUDGET), r.view(), _broken_step, can_change_batch=True)),
        ("ranks disagree", Run(framework, others=[RankReport(True, False, 0, 5000, 4000)]),
         lambda r: r.check("raise")),
        ("ranks reduce together", Run(framework, others=[RankReport(True, False, 1, 5000, 4000)]),
         lambda r: r.check("reduce")),
        ("a rank could not estimate", Run(framework, others=[RankReport(False)]), lambda r: r.check("raise", SMALL)),
        ("a rank could not estimate, strict", Run(framework, others=[RankReport(False)]),
         lambda r: r.check("raise", SMALL, strict=True)),
        ("the probe failed", Run(framework), probe_fails),
    ]


def transcript(framework: Framework) -> str:
    """What a user of ``framework`` reads in each scenario: said (info), warned, raised."""
    parts = []
    for title, run, act in _scenarios(framework):
        lines = [f"== {title}"]
        try:
            act(run)
        except MemguardError as exc:
            raised = f"raised {type(exc).__name__}: {exc}"
        else:
            raised = None
        lines += [f"said: {text}" for text in run.said]
        lines += [f"warned{' (every rank)' if every else ''}: {text}" for text, every in run.warned]
        if raised is not None:
            lines.append(raised)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


@pytest.mark.parametrize("framework", list(Framework), ids=lambda f: f.name.lower())
def test_guard_messages_golden(framework: Framework) -> None:
    check_golden(f"guard_{framework.name.lower()}.txt", transcript(framework))
