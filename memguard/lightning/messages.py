"""What :class:`~memguard.MemGuard` says: pure functions from a rank's plan and the decision to text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memguard.errors import InsufficientMemoryError
from memguard.estimation.result import MemoryEstimate
from memguard.lightning.decision import Decision, RankReport
from memguard.lightning.rank import RankPlan
from memguard.planning import remedy_lines
from memguard.units import format_bytes

__all__ = ["fits", "insufficient", "reduced", "summary", "warning"]


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


def fits(plan: RankPlan, reports: Sequence[RankReport], rank: int) -> str:
    return f"MemGuard: a training step at batch size {plan.requested} fits: {summary(plan, reports, rank)}"


def warning(plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int,
            rows: Sequence[Any] | None) -> str:
    return "\n".join([f"MemGuard: a training step at batch size {plan.requested} may not fit"
                      f"{_on(decision.too_big, len(reports))}: {summary(plan, reports, rank)}.",
                      *remedy_lines(rows), plan.at_requested.estimate.table()])


def insufficient(plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int,
                 rows: Sequence[Any] | None) -> InsufficientMemoryError:
    """The error that stops the fit: the step does not fit (``"raise"``), not even a batch of 1 does
    (``"reduce"``), or the batch of a stream cannot change any more."""
    fit = plan.at_requested
    if decision.verdict.value == "none-fit":
        est = plan.at_fitting
        head = (f"MemGuard: not even a batch of 1 fits{_on(decision.too_big, len(reports))}: "
                f"{format_bytes(est.total_bytes)} predicted at batch size 1, {format_bytes(fit.free_bytes)} "
                f"available ({fit.where}), margin {fit.margin:.0%}.")
    else:
        est = fit.estimate
        head = (f"MemGuard: a training step at batch size {plan.requested} does not fit"
                f"{_on(decision.too_big, len(reports))}: {summary(plan, reports, rank)}.")
    lines = [head]
    if decision.verdict.value == "stream":
        lines.append("The train data is an IterableDataset, whose first batch memguard does not take away from "
                     "training to look at it before the fit starts, so it cannot change the batch size now. What "
                     f"would fit: batch size {decision.batch_size} with accumulate_grad_batches={decision.accumulate}.")
    else:
        if rank not in decision.too_big:
            lines.append("(It fits on this rank; the estimate below is this rank's.)")
        lines.extend(remedy_lines(rows))
    lines.append(est.table())
    return InsufficientMemoryError("\n".join(lines), estimate=est, free_bytes=fit.free_bytes)


def reduced(plan: RankPlan, decision: Decision, reports: Sequence[RankReport], rank: int, accumulate: int,
            est: MemoryEstimate) -> str:
    """What ``"reduce"`` changed; says so when the effective batch could not be kept."""
    world = len(reports)
    asked = plan.requested * accumulate * world
    got = decision.batch_size * decision.accumulate * world
    here = f" on rank {rank}" if world > 1 else ""
    message = (f"MemGuard: a training step at batch size {plan.requested} does not fit{_on(decision.too_big, world)} "
               f"({summary(plan, reports, rank)}); the largest that fits is {decision.largest}"
               f"{' on every rank' if world > 1 else ''}; training with batch size {decision.batch_size} "
               f"({format_bytes(est.total_bytes)} predicted{here}) and accumulate_grad_batches={decision.accumulate} "
               f"(was {accumulate}), an effective batch of {got} (asked: {asked})")
    if got != asked:
        message += (f": no divisor of {plan.requested * accumulate} lies between {decision.largest / 2:g} and "
                    f"{decision.largest}, so the effective batch changed")
    return message
