"""The agreement across ranks: every rank's :class:`RankReport`, through the framework's ``all_gather``.

Lightning gathers with ``strategy.all_gather``, the transformers ``Trainer`` with
``torch.distributed.all_gather``, Fabric with ``Fabric.all_gather``; each adapter passes its own as
an :data:`~memguard.guard.view.AllGather`. Every rank calls :func:`agree`, whatever happened to its
estimate (a failed one reports ``estimated=False``), so that no rank waits on a collective another
never enters.
"""

from __future__ import annotations

from memguard.guard.decision import RankReport
from memguard.guard.view import AllGather

__all__ = ["agree"]


def agree(all_gather: AllGather, mine: RankReport) -> list[RankReport]:
    """Every rank's report, in rank order, from this rank's."""
    return [RankReport.from_row(row) for row in all_gather(mine.to_row())]
