"""One rank's estimate: its step at the asked batch size and, for ``"reduce"``, the largest that fits.

Decides nothing: the ranks agree (:mod:`memguard.guard.agreement`) and :func:`memguard.guard.decide`
acts on every rank's :class:`~memguard.guard.decision.RankReport`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memguard._cache import cached
from memguard.device.available import available_to
from memguard.estimation.from_run import batch_size_of
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.search import max_batch_size
from memguard.fit import Fit
from memguard.guard.config import GuardConfig
from memguard.guard.decision import RankReport
from memguard.guard.view import RunView, StepView

if TYPE_CHECKING:
    from memguard.estimation.step import Step

__all__ = ["RankPlan", "estimator", "plan_rank", "traced"]


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """One rank's estimates.

    Attributes:
        step: the step estimated (its batch, estimator and remedies).
        requested: the batch size of its batch.
        at_requested: the estimate (and its fit) at the requested batch size.
        fitting_batch: the largest batch size that fits (``"reduce"`` only; the requested one when it
            fits, 0 when not even 1 does).
        at_fitting: the estimate at ``fitting_batch`` (at 1 when nothing fits).
        estimate_at: the estimate at any batch size, cached (:func:`estimator`).
    """

    step: StepView
    requested: int
    at_requested: Fit
    fitting_batch: int
    at_fitting: MemoryEstimate
    estimate_at: Callable[[int], MemoryEstimate]

    def report(self) -> RankReport:
        fit = self.at_requested
        return RankReport(True, fit.fits, self.fitting_batch, fit.estimate.total_bytes, fit.free_bytes)

    def remedies(self) -> list[Any] | None:
        """What would make the step fit at the requested batch size, or ``None``."""
        return self.step.remedies(self.at_requested)


def traced(module: Any, step: Step, **kwargs: Any) -> Callable[[int, int], MemoryEstimate]:
    """``estimate_at(batch_size, accumulate)`` of a guard's :class:`StepView`: ``module``'s step as
    ``step`` (the run's precision, optimizer, layout and loop, read by the adapter), traced at another
    batch size and accumulation; ``kwargs`` are the rest of :func:`memguard.estimate`'s arguments
    (``example_input``, ``step_fn``/``loss_fn``, ``trace_timeout``)."""
    from memguard.estimation.estimator import estimate  # torch: only once a step is estimated

    def estimate_at(batch_size: int, accumulate: int) -> MemoryEstimate:
        at = step.replace(batch_size=batch_size, accumulate_grad_batches=accumulate)
        return estimate(module, method="trace", step=at, **kwargs)

    return estimate_at


def estimator(estimate: Callable[[int, int], MemoryEstimate], requested: int,
              accumulate: int) -> Callable[[int], MemoryEstimate]:
    """The estimate at a batch size, cached.

    A batch smaller than the one asked for is trained with accumulation (``"reduce"``), whose later
    micro-batches run their forward beside the gradients: it is estimated with an accumulation of 2,
    which is all the trace tells apart from more (``memguard.estimation.trace.trace_breakdown`` replays
    ``min(accumulate, 2)`` micro-batches).
    """
    return cached(lambda batch_size: estimate(batch_size, accumulate if batch_size >= requested else 2))


def plan_rank(config: GuardConfig, view: RunView, step: StepView) -> RankPlan:
    """Estimate this rank's step at the batch size of ``step.batch`` and, for ``"reduce"``, the largest that fits."""
    requested = batch_size_of(step.batch)
    available, where = available_to(view.device, step.resident, config.budget, processes=view.processes)
    estimate_at = estimator(step.estimate, requested, view.accumulate)
    fit = Fit(estimate_at(requested), available, config.margin, where)
    if fit.fits or config.action != "reduce":
        return RankPlan(step, requested, fit, requested if fit.fits else 0, fit.estimate, estimate_at)
    search = max_batch_size(estimate_at, available, margin=config.margin, limit=requested)
    return RankPlan(step, requested, fit, search.batch_size, search.estimate, estimate_at)
