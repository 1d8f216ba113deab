"""Analyse: what a recorded step's ledger says at its peak, and what the CUDA allocator reserves.

The recording (:mod:`.record`) holds every storage allocated and freed, in order, with the phase
of the step, the module whose forward made it, its shape and dtype; :mod:`.classify` gave each its
:class:`~memguard.Category`. From those this module finds the peak of live bytes (each allocation
weighted by the share a rank holds, plus a sharded strategy's gathered units, see
:meth:`memguard.estimation.parallel.Parallelism.weight`), and reports what PyTorch's memory snapshot
viewer shows, without a GPU:

* :func:`analyse` -> :class:`PeakReport`: bytes per :class:`~memguard.Category` at the peak, the
  tensors alive then grouped by module and category (largest first: the attribution), and the live
  bytes after each event (the timeline, whose maximum is the peak);
* :func:`allocator_slack`: on CUDA, what the caching allocator reserves beyond that peak, from
  replaying the step's allocations and frees (:func:`memguard.estimation.allocator.replay`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from memguard.estimation.allocator import ledger_events, replay
from memguard.estimation.allocator_config import AllocatorConfig
from memguard.estimation.result import Category, PeakTensors
from memguard.estimation.trace.ledger import Phase, Record

__all__ = ["TIMELINE_POINTS", "PeakReport", "allocator_slack", "analyse", "weighted"]


TIMELINE_POINTS = 2000
"""Points kept in a timeline: the live bytes after each event, thinned evenly, the peak always kept."""


@dataclasses.dataclass(frozen=True)
class PeakReport:
    """The peak of a traced step.

    Attributes:
        breakdown: bytes per category at the peak.
        at_peak: the tensors alive at the peak, grouped by the module that made them, largest first.
        timeline: ``(event, phase, live_bytes)`` after each event (thinned to at most
            :data:`TIMELINE_POINTS`), whose largest ``live_bytes`` is the peak.
    """

    breakdown: dict[Category, int]
    at_peak: tuple[PeakTensors, ...]
    timeline: tuple[tuple[int, str, int], ...]


def weighted(nbytes: int, kind: Category, phase: Phase, weight: Callable[[Category, Phase], float] | None) -> int:
    """The bytes of an allocation of ``kind`` made in ``phase`` that a rank holds (``weight``: its share,
    ``None``: whole)."""
    return nbytes if weight is None else int(nbytes * weight(kind, phase))


def analyse(records: Sequence[Any], marks: Sequence[tuple[int, Phase]], kinds: dict[int, Category],
            weight: Callable[[Category, Phase], float] | None = None,
            extras: Callable[[Phase], dict[Category, int]] | None = None) -> PeakReport:
    """Find the peak of the (weighted) timeline of allocations and frees, plus the ``extras`` of the
    phase it falls in, and what is alive then.

    Args:
        records: the ledger's records (``nbytes``, ``alloc``, ``free``, ``phase``, ``where``,
            ``shape``, ``dtype``), in allocation order.
        marks: ``(clock, phase)`` where each phase starts.
        kinds: the category of each record, by index.
        weight: share of an allocation a rank holds, by category and phase (``None``: whole).
        extras: bytes held beyond the traced tensors, by phase.
    """

    def held(i: int) -> int:
        return weighted(records[i].nbytes, kinds[i], records[i].phase, weight)

    extra_of = {phase: sum((extras(phase) if extras else {}).values()) for _, phase in marks}
    events = [(r.alloc, held(i)) for i, r in enumerate(records)]
    events += [(r.free, -held(i)) for i, r in enumerate(records) if r.free is not None]
    events.sort()
    mark = 0
    live = peak = peak_clock = 0
    peak_phase = marks[0][1]
    timeline: list[tuple[int, str, int]] = []
    for clock, delta in events:
        while mark + 1 < len(marks) and marks[mark + 1][0] < clock:
            mark += 1
        live += delta
        phase = marks[mark][1]
        timeline.append((clock, str(phase), live + extra_of[phase]))
        if live + extra_of[phase] > peak:
            peak, peak_clock, peak_phase = live + extra_of[phase], clock, phase
    alive = [i for i, r in enumerate(records) if r.alloc <= peak_clock and (r.free is None or r.free > peak_clock)]
    breakdown = {c: 0 for c in Category}
    for i in alive:
        breakdown[kinds[i]] += held(i)
    peak_extras = extras(peak_phase) if extras else {}
    for cat, n in peak_extras.items():
        breakdown[cat] += n
    return PeakReport(breakdown, _group(records, alive, kinds, held, peak_extras), _thin(timeline))


def _group(records: Sequence[Any], alive: list[int], kinds: dict[int, Category], held: Callable[[int], int],
           extras: dict[Category, int]) -> tuple[PeakTensors, ...]:
    """The live tensors by (module, category): their bytes, count, and the largest one's shape and dtype."""
    groups: dict[tuple[str, Category], list[int]] = {}
    for i in alive:
        groups.setdefault((records[i].where or str(records[i].phase), kinds[i]), []).append(i)
    out = []
    for (where, cat), members in groups.items():
        largest = max(members, key=held)
        out.append(PeakTensors(where, cat, sum(held(i) for i in members), len(members),
                               tuple(records[largest].shape), records[largest].dtype))
    out += [PeakTensors("(sharded strategy's gathered units)", cat, n, 0, (), "") for cat, n in extras.items() if n]
    return tuple(sorted(out, key=lambda g: -g.nbytes))


def _thin(timeline: list[tuple[int, str, int]]) -> tuple[tuple[int, str, int], ...]:
    """At most :data:`TIMELINE_POINTS` points, evenly spaced, keeping the first, the last and the peak."""
    if len(timeline) <= TIMELINE_POINTS:
        return tuple(timeline)
    top = max(range(len(timeline)), key=lambda k: timeline[k][2])
    step = len(timeline) / (TIMELINE_POINTS - 2)
    keep = {int(k * step) for k in range(TIMELINE_POINTS - 2)} | {0, len(timeline) - 1, top}
    return tuple(timeline[k] for k in sorted(keep))


def allocator_slack(records: Sequence[Record], kinds: dict[int, Category],
                    weight: Callable[[Category, Phase], float] | None = None) -> int:
    """``max_memory_reserved() - max_memory_allocated()`` of the step under the CUDA caching allocator.

    The step's allocations and frees are replayed in order, at their requested sizes (the share a
    rank holds, under sharding), with the allocator settings of ``PYTORCH_CUDA_ALLOC_CONF``.
    """
    shares = [weighted(r.requested, kinds[i], r.phase, weight) for i, r in enumerate(records)]
    stats = replay(ledger_events(records, shares), AllocatorConfig.from_env())
    return max(0, stats.peak_reserved - stats.peak_allocated)
