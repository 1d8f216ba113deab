"""The guard's check before the first step: estimate this rank, agree with the others, decide, act.

Every adapter calls :func:`assess` once it has (or can fetch) the first batch, then :func:`act` on
what every rank agreed. Both only see a :class:`~memguard.guard.view.RunView`, so each verdict can
be driven by a fake one in a test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from memguard.errors import MemguardError
from memguard.estimation.result import MemoryEstimate
from memguard.guard import messages
from memguard.guard.agreement import agree
from memguard.guard.config import GuardConfig
from memguard.guard.decision import Decision, RankReport, Verdict, decide
from memguard.guard.rank import RankPlan, plan_rank
from memguard.guard.view import RunView, StepView

__all__ = ["Assessment", "Training", "act", "assess"]


@dataclasses.dataclass(frozen=True)
class Assessment:
    """What the ranks found, and the decision every rank reached.

    Attributes:
        plan: this rank's estimates, ``None`` when its estimate failed.
        reports: every rank's report, in rank order.
        decision: the decision (``None`` when this rank's estimate failed: it trains unchecked).
        failure: why this rank's estimate failed, or ``None``.
    """

    plan: RankPlan | None
    reports: tuple[RankReport, ...]
    decision: Decision | None
    failure: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class Training:
    """What a run trains with after :func:`act`.

    Attributes:
        batch_size: the batch size (the requested one unless ``"reduce"`` changed it).
        accumulate: the gradient accumulation.
        estimate: the estimate at that batch size.
        reduced: whether ``"reduce"`` changed them.
    """

    batch_size: int
    accumulate: int
    estimate: MemoryEstimate
    reduced: bool = False


def assess(config: GuardConfig, view: RunView, step: Callable[[], StepView | None], *,
           can_change_batch: bool) -> Assessment | None:
    """Estimate this rank's step, agree with the other ranks, and decide.

    Args:
        step: this rank's step at its first batch; ``None`` when the batch is not there yet (a
            stream, decided at its first batch): no collective runs, on any rank alike. Whatever it
            raises is this rank's failed estimate.
        can_change_batch: whether ``"reduce"`` can still change the batch size.

    Returns:
        ``None`` when ``step`` gave none; else the assessment. A failed estimate is warned about on
        every rank (``strict``: raised, after the collective every rank takes part in).
    """
    plan: RankPlan | None = None
    failure: BaseException | None = None
    try:
        found = step()
        if found is None:
            return None
        plan = plan_rank(config, view, found)
    except Exception as exc:
        failure = exc
    # Every rank takes part in the same collective, whatever happened to it.
    reports = tuple(agree(view.all_gather, plan.report() if plan is not None else RankReport(estimated=False)))
    if failure is not None:
        if config.strict:
            raise failure
        view.warn(messages.not_estimated(view.framework, failure), True)
    if plan is None:
        return Assessment(None, reports, None, failure)
    if plan.at_requested.estimate.uncertain:
        view.warn(messages.uncertain(view.framework, plan.at_requested.estimate), False)
    decision = decide(config.action, plan.requested, view.accumulate, reports, can_change_batch=can_change_batch)
    return Assessment(plan, reports, decision)


def act(config: GuardConfig, view: RunView, plan: RankPlan, decision: Decision,
        reports: tuple[RankReport, ...]) -> Training | None:
    """Act on the decision every rank reached: say it, raise it, or train with a batch that fits.

    Returns:
        What the run trains with; ``None`` when it trains unchecked (a rank could not estimate).

    Raises:
        InsufficientMemoryError: the step does not fit and the action is ``"raise"``, or nothing fits.
        BatchTooLargeError: ``"reduce"`` where the batch size cannot change (a Trainer, Fabric).
        MemguardError: a rank could not estimate, and the guard is strict.
    """
    verdict, words, rank = decision.verdict, view.framework, view.rank
    if verdict is Verdict.UNCHECKED:
        if config.strict:
            raise MemguardError(messages.unchecked(words, decision.unchecked, strict=True))
        # the ranks must act alike, or DDP would wait for ranks that accumulate differently
        view.warn(messages.unchecked(words, decision.unchecked, strict=False), False)
        return None
    if verdict is Verdict.STREAM and view.set_batch is None:  # a framework whose batch size never changes
        raise messages.batch_too_large(words, plan, decision, reports, rank, view.accumulate)
    if verdict in (Verdict.RAISE, Verdict.NONE_FIT, Verdict.STREAM):
        rows = [] if verdict is Verdict.STREAM else plan.remedies()
        raise messages.insufficient(words, plan, decision, reports, rank, rows)
    if verdict is Verdict.FITS:
        view.info(messages.fits(words, plan, reports, rank))
        return Training(plan.requested, view.accumulate, plan.at_requested.estimate)
    if verdict is Verdict.WARN:
        view.warn(messages.warning(words, plan, decision, reports, rank, plan.remedies()), False)
        return Training(plan.requested, view.accumulate, plan.at_requested.estimate)
    return _reduce(view, plan, decision, reports)


def _reduce(view: RunView, plan: RankPlan, decision: Decision, reports: tuple[RankReport, ...]) -> Training:
    """Train with the batch size and accumulation of a ``REDUCE`` decision, and say what changed."""
    batch, acc = decision.batch_size, decision.accumulate
    if view.set_batch is None:  # an adapter asked for can_change_batch=True without a way to change it
        raise MemguardError(f"{view.framework.guard} cannot change the batch size of this run")
    view.set_batch(batch, acc)
    est = plan.estimate_at(batch)
    message = messages.reduced(view.framework, plan, decision, reports, view.rank, view.accumulate, est)
    if batch * acc != plan.requested * view.accumulate:
        view.warn(message, False)
    else:
        view.info(message)
    return Training(batch, acc, est, reduced=True)

