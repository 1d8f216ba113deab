"""What a guard does with the estimates of every rank: a pure function.

Each rank estimates its own step and reports it as a :class:`RankReport` (exchanged between ranks
as a row of integers, :mod:`memguard.guard.agreement`). :func:`decide` turns the reports, the action
and the asked batch into one :class:`Decision` that every rank reaches alike, so that no rank waits
on another that trains with another accumulation. Nothing here touches a framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from memguard.enums import StrEnum
from memguard.estimation.search import reduced_batch

__all__ = ["Decision", "RankReport", "Verdict", "decide"]


@dataclasses.dataclass(frozen=True)
class RankReport:
    """What one rank found.

    Attributes:
        estimated: whether its estimate succeeded (the rest is zero when not).
        fits: whether the step at the asked batch size fits its memory, keeping the margin.
        fitting_batch: the largest batch size that fits it (``"reduce"``), 0 when not even 1 does.
        total_bytes: the predicted total at the asked batch size.
        available_bytes: the memory it may use, before the margin.
    """

    estimated: bool
    fits: bool = False
    fitting_batch: int = 0
    total_bytes: int = 0
    available_bytes: int = 0

    def to_row(self) -> list[int]:
        """The report as integers, for a collective."""
        return [int(self.estimated), int(self.fits), self.fitting_batch, self.total_bytes, self.available_bytes]

    @classmethod
    def from_row(cls, row: Sequence[int]) -> RankReport:
        estimated, fits, fitting, total, available = (int(v) for v in row)
        return cls(bool(estimated), bool(fits), fitting, total, available)


class Verdict(StrEnum):
    """What the guard does."""

    FITS = "fits"  # train as asked
    WARN = "warn"  # train as asked, with a warning
    RAISE = "raise"  # stop before the first step
    REDUCE = "reduce"  # train with a smaller batch and more accumulation
    NONE_FIT = "none-fit"  # "reduce", but not even a batch of 1 fits: stop
    STREAM = "stream"  # "reduce", but the batch size cannot change any more (a stream, a Trainer, Fabric): stop
    UNCHECKED = "unchecked"  # a rank could not estimate: train as asked, unchecked


@dataclasses.dataclass(frozen=True)
class Decision:
    """One decision, the same on every rank.

    Attributes:
        verdict: what to do.
        batch_size: the batch size to train with (or, for ``STREAM``, the one that would fit).
        accumulate: the gradient accumulation to train with (or that would go with it).
        too_big: ranks whose step does not fit at the asked batch size.
        largest: the largest batch size that fits every rank (``"reduce"`` only).
        unchecked: ranks whose estimate failed.
    """

    verdict: Verdict
    batch_size: int
    accumulate: int
    too_big: tuple[int, ...] = ()
    largest: int = 0
    unchecked: tuple[int, ...] = ()


def decide(action: str, requested: int, accumulate: int, reports: Sequence[RankReport], *,
           can_change_batch: bool) -> Decision:
    """The decision for a run, from every rank's report.

    Args:
        action: ``"warn"``, ``"raise"`` or ``"reduce"``.
        requested: the batch size asked for (per rank).
        accumulate: the gradient accumulation asked for.
        reports: one per rank, in rank order.
        can_change_batch: whether the batch size can still change (the train loader is not built
            yet, and the framework lets the guard rebuild it); ``"reduce"`` stops with ``STREAM`` when
            it cannot, with the batch size and accumulation that would fit.

    ``"reduce"`` trains with :func:`memguard.estimation.search.reduced_batch` of the largest batch that fits
    every rank: the asked effective batch exactly whenever it has a divisor between half that
    batch and the batch.
    """
    unchecked = tuple(r for r, rep in enumerate(reports) if not rep.estimated)
    if unchecked:
        return Decision(Verdict.UNCHECKED, requested, accumulate, unchecked=unchecked)
    too_big = tuple(r for r, rep in enumerate(reports) if not rep.fits)
    if not too_big:
        return Decision(Verdict.FITS, requested, accumulate)
    if action == "warn":
        return Decision(Verdict.WARN, requested, accumulate, too_big)
    if action == "raise":
        return Decision(Verdict.RAISE, requested, accumulate, too_big)
    largest = min(rep.fitting_batch for rep in reports)
    if largest == 0:
        none_fit = tuple(r for r, rep in enumerate(reports) if rep.fitting_batch == 0)
        return Decision(Verdict.NONE_FIT, requested, accumulate, none_fit)
    batch, acc = reduced_batch(requested, accumulate, largest)
    verdict = Verdict.REDUCE if can_change_batch else Verdict.STREAM
    return Decision(verdict, batch, acc, too_big, largest)
