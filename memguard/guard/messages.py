"""What a guard says: pure functions from a rank's plan and the decision to text (or to the error to raise).

Every framework's guard says the same things in its own words (:class:`~memguard.guard.view.Framework`:
``MemGuard: a training step at batch size 16 ...``, ``MemGuardCallback: a training step at
per_device_train_batch_size=16 ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memguard.errors import BatchTooLargeError, InsufficientMemoryError
from memguard.estimation.result import MemoryEstimate
from memguard.guard.decision import Decision, RankReport, Verdict
from memguard.guard.rank import RankPlan
from memguard.guard.view import Framework
from memguard.planning import remedy_lines
from memguard.units import format_bytes

__all__ = ["batch_too_large", "fits", "insufficient", "measure_failed", "not_estimated", "reduced", "summary",
           "uncertain", "unchecked", "warning"]

_FIXED = {
    Framework.TRAINER: ("action='reduce' cannot change the batch size of a transformers Trainer: it builds its train "
                        "data loader from per_device_train_batch_size when train() starts, before any callback event "
                        "(on_init_end comes after __init__ copies the batch size, on_train_begin after the loader, "
                        "the step count and the scheduler are made)."),
    Framework.FABRIC: ("action='reduce' cannot change the batch size of a Fabric loop: the loop builds its own data "
                       "loader, and memguard checks before its first step."),
}
"""Why the batch size of a run cannot change, for the frameworks whose guards never change it."""


def summary(plan: RankPlan, reports: Sequence[RankReport], rank: int) -> str:
    """Predicted and available memory, of every rank under a distributed strategy."""
    fit = plan.at_requested
    margin = f"margin {fit.margin:.0%}"
    if len(reports) <= 1:
        return (f"{format_bytes(fit.estimate.total_bytes)} predicted, {format_bytes(fit.free_bytes)} "
                f"available ({fit.where}), {margin}")
    ranks = ", ".join(f"rank {r} {format_bytes(rep.total_bytes)} of {format_bytes(rep.available_bytes)}"
                      for r, rep in enumerate(reports))
    return f"predicted of available per rank: {ranks}; {margin}; rank {rank}'s memory: {fit.where}"


def _on(ranks: Sequence[int], world_size: int) -> str:
    return f" on rank(s) {list(ranks)}" if world_size > 1 else ""


def _step(framework: Framework, batch_size: int) -> str:
    return f"{framework.guard}: a training step at {framework.batch(batch_size)}"


def fits(framework: Framework, plan: RankPlan, reports: Sequence[RankReport], rank: int) -> str:
    return f"{_step(framework, plan.requested)} fits: {summary(plan, reports, rank)}"


def warning(framework: Framework, plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int,
            rows: Sequence[Any] | None) -> str:
    return "\n".join([f"{_step(framework, plan.requested)} may not fit{_on(decision.too_big, len(reports))}: "
                      f"{summary(plan, reports, rank)}.", *remedy_lines(rows), plan.at_requested.estimate.table()])


def insufficient(framework: Framework, plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int,
                 rows: Sequence[Any] | None) -> InsufficientMemoryError:
    """The error that stops the run: the step does not fit (``"raise"``), not even a batch of 1 does
    (``"reduce"``), or the batch of a stream cannot change any more (Lightning)."""
    fit = plan.at_requested
    if decision.verdict is Verdict.NONE_FIT:
        est = plan.at_fitting
        head = (f"{framework.guard}: not even a batch of 1 fits{_on(decision.too_big, len(reports))}: "
                f"{format_bytes(est.total_bytes)} predicted at {framework.batch(1)}, {format_bytes(fit.free_bytes)} "
                f"available ({fit.where}), margin {fit.margin:.0%}.")
    else:
        est = fit.estimate
        head = (f"{_step(framework, plan.requested)} does not fit{_on(decision.too_big, len(reports))}: "
                f"{summary(plan, reports, rank)}.")
    lines = [head]
    if decision.verdict is Verdict.STREAM:
        lines.append("The train data is an IterableDataset, whose first batch memguard does not take away from "
                     "training to look at it before the fit starts, so it cannot change the batch size now. What "
                     f"would fit: {framework.batch(decision.batch_size)} with "
                     f"{framework.accumulation}={decision.accumulate}.")
    else:
        if rank not in decision.too_big:
            lines.append("(It fits on this rank; the estimate below is this rank's.)")
        lines.extend(remedy_lines(rows))
    lines.append(est.table())
    return InsufficientMemoryError("\n".join(lines), estimate=est, free_bytes=fit.free_bytes)


def batch_too_large(framework: Framework, plan: RankPlan, decision: Decision, reports: Sequence[RankReport],
                    rank: int, accumulate: int) -> BatchTooLargeError:
    """``"reduce"`` where the framework lets no guard change the batch size: what to set instead."""
    fit = plan.at_requested
    batch, acc, largest = decision.batch_size, decision.accumulate, decision.largest
    effective, wanted = batch * acc, plan.requested * accumulate
    kept = (f"the same effective batch of {effective}" if effective == wanted else
            f"an effective batch of {effective}, not {wanted}: no divisor of {wanted} lies between "
            f"{largest / 2:g} and {largest}")
    if framework is Framework.TRAINER:
        todo = (f"Set per_device_train_batch_size={batch} and gradient_accumulation_steps={acc} (was {accumulate}; "
                f"{kept} per device) in TrainingArguments and train again.")
    else:
        todo = (f"Train with batch size {batch} and {acc} micro-batches per optimizer step (was {accumulate}; "
                f"{kept} per device).")
    return BatchTooLargeError(
        f"{_step(framework, plan.requested)} does not fit{_on(decision.too_big, len(reports))} "
        f"({summary(plan, reports, rank)}); the largest batch that fits is {largest}. {_FIXED[framework]} {todo}",
        batch_size=batch, gradient_accumulation_steps=acc, fitting_batch_size=largest,
        estimate=fit.estimate, free_bytes=fit.free_bytes)


def reduced(framework: Framework, plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int,
            accumulate: int, est: MemoryEstimate) -> str:
    """What ``"reduce"`` changed; says so when the effective batch could not be kept."""
    world = len(reports)
    asked = plan.requested * accumulate * world
    got = decision.batch_size * decision.accumulate * world
    here = f" on rank {rank}" if world > 1 else ""
    message = (f"{_step(framework, plan.requested)} does not fit{_on(decision.too_big, world)} "
               f"({summary(plan, reports, rank)}); the largest that fits is {decision.largest}"
               f"{' on every rank' if world > 1 else ''}; training with {framework.batch(decision.batch_size)} "
               f"({format_bytes(est.total_bytes)} predicted{here}) and {framework.accumulation}={decision.accumulate} "
               f"(was {accumulate}), an effective batch of {got} (asked: {asked})")
    if got != asked:
        message += (f": no divisor of {plan.requested * accumulate} lies between {decision.largest / 2:g} and "
                    f"{decision.largest}, so the effective batch changed")
    return message


def not_estimated(framework: Framework, failure: BaseException) -> str:
    """This rank's estimate failed."""
    return (f"{framework.guard} could not estimate the memory of a training step, so training goes on unchecked: "
            f"{type(failure).__name__}: {failure}")


def unchecked(framework: Framework, ranks: Sequence[int], *, strict: bool) -> str:
    """Some rank's estimate failed: every rank trains unchecked (or, ``strict``, stops)."""
    head = f"{framework.guard} could not estimate the memory of a training step on rank(s) {list(ranks)}"
    return head if strict else f"{head}, so training goes on unchecked"


def uncertain(framework: Framework, est: MemoryEstimate) -> str:
    """The estimate rests on stand-ins for values the trace could not read."""
    return f"{framework.guard}: the estimate rests on invented values, {est.stand_in_line()}"


def measure_failed(framework: Framework, failure: BaseException) -> str:
    return (f"{framework.guard} could not measure the memory of the first steps: "
            f"{type(failure).__name__}: {failure}")
