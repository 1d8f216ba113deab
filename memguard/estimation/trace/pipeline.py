"""The trace as one call: record -> classify -> analyse, and what the trace says in words.

:func:`trace_breakdown` records a steady-state step (:func:`.record.recorded`), gives each storage
its category (:func:`.classify.classify`), finds the peak, what is alive then and the timeline
(:func:`.analyse.analyse`) and, on CUDA, the caching allocator's slack
(:func:`.analyse.allocator_slack`); the notes say what the trace invented or could not size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memguard.errors import ConfigError, TraceError
from memguard.estimation.cuda_rules import Workspaces
from memguard.estimation.result import Category, PeakTensors
from memguard.estimation.spec import TrainingSpec
from memguard.estimation.stand_ins import ONES, ROUTINGS, routing_name
from memguard.estimation.trace.analyse import allocator_slack, analyse, weighted
from memguard.estimation.trace.classify import classify
from memguard.estimation.trace.ledger import CountingMode, Ledger, Phase, Record
from memguard.estimation.trace.record import DEFAULT_TIMEOUT, Inputs, Loop, Recording, recorded

__all__ = ["RecordedStep", "TraceResult", "analysed", "invented_note", "record_step", "trace_breakdown"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """What a trace found.

    Attributes:
        breakdown: bytes per category at the peak.
        notes: anything approximated, in words.
        slack: on CUDA, what the caching allocator reserves beyond its allocated peak, from
            replaying the step's allocations and frees in order (:func:`memguard.estimation.allocator.replay`).
        at_peak: tensors alive at the peak, by module and category (:func:`.analyse.analyse`).
        timeline: live bytes through the step.
        stand_ins: data-dependent ops whose values the trace invented, and how: the routing model
            (``"topk"``), or ``"ones"`` (:data:`memguard.estimation.stand_ins.ONES`) where nothing
            models them.
        band: workspaces the trace saw but cannot size
            (:meth:`memguard.estimation.cuda_rules.Workspaces.band`).
        output_bytes: what the model's output holds (the last micro-batch's, as the loop receives
            it: logits, a returned key/value cache), what a loop that keeps it adds
            (:func:`memguard.estimation.trace.record.output_tensors`).
    """

    breakdown: dict[Category, int]
    notes: list[str]
    slack: int
    at_peak: tuple[PeakTensors, ...]
    timeline: tuple[tuple[int, str, int], ...]
    stand_ins: dict[str, str] = dataclasses.field(default_factory=dict)
    band: dict[str, int] = dataclasses.field(default_factory=dict)
    output_bytes: int = 0


def trace_breakdown(
    module: nn.Module,
    spec: TrainingSpec,
    make_inputs: Callable[[], Inputs],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    training_loop: str = "pytorch",
    step_fn: Callable[[Any], Any] | None = None,
    weight: Callable[[Category, Phase], float] | None = None,
    extras: Callable[[Phase], dict[Category, int]] | None = None,
    blocks: Iterable[nn.Module] = (),
    steps: int = 1,
    timeout: float | None = DEFAULT_TIMEOUT,
    accumulate: int = 1,
    set_to_none: bool = True,
) -> TraceResult:
    """Trace a steady-state training step of ``module`` on fake tensors and break down the peak.

    Args:
        module: the user's module; its weights are neither copied nor touched.
        spec: batch, precision, optimizer, device and checkpointing.
        make_inputs, loss_fn, training_loop, step_fn, steps, accumulate, set_to_none: how the
            user's loop runs the step, as :class:`~.record.Loop` documents them.
        weight: share of each allocation, by category and :class:`~.ledger.Phase`, that the device
            holds — how sharding enters (see :meth:`memguard.estimation.parallel.Parallelism.weight`);
            the peak is then the peak of the weighted timeline. ``None`` counts everything whole.
        extras: bytes the device holds beyond the traced tensors, by phase (``BACKWARD`` is before
            the first block, ``BLOCK_BACKWARD`` from it on): how a sharded strategy's gathered
            units enter (see :meth:`memguard.estimation.parallel.Parallelism.phase_extras`).
        blocks: the repeated blocks; their backward marks the ``BLOCK_BACKWARD`` phase.
        timeout: seconds the trace may run (``None``: no limit), checked between ops; past them it
            stops with a :class:`TraceError`. A data-dependent loop (``while h.abs().max() > eps``)
            sees stand-in values that never converge (a loop that runs no tensor op is not stopped).

    Returns:
        A :class:`TraceResult`.

    Raises:
        TraceError: when the model's code cannot run on fake tensors.
        ConfigError: for a loss that is not a scalar.
    """
    loop = Loop(make_inputs, loss_fn, training_loop, step_fn, steps, accumulate, set_to_none)
    with _recording(module, spec, loop, blocks, timeout) as step:
        return analysed(step, weight, extras)


@dataclasses.dataclass(frozen=True)
class RecordedStep:
    """A recorded step, ready for :func:`analysed`: its records (in allocation order) with their
    categories, the phase marks, the kernels of the band, and what the trace says in words.

    A record without a free is alive at the end of the step.
    """

    device: str
    records: list[Record]
    kinds: dict[int, Category]
    marks: list[tuple[int, Phase]]
    workspaces: Workspaces | None
    notes: list[str]
    stand_ins: dict[str, str]
    uncounted: frozenset[str] = frozenset()
    invented: dict[str, int] = dataclasses.field(default_factory=dict)
    """How many times each data-dependent op ran on stand-in ones (the first note says so)."""


def record_step(module: nn.Module, spec: TrainingSpec, loop: Loop, blocks: Iterable[nn.Module] = (),
                timeout: float | None = DEFAULT_TIMEOUT) -> RecordedStep:
    """Record a steady-state step of ``module`` and classify its storages, to analyse later
    (:mod:`.depth` joins several). The records are copied while the step's objects are alive: once
    the recording ends, the ledger records the frees of what the step kept."""
    with _recording(module, spec, loop, blocks, timeout) as step:
        return dataclasses.replace(step, records=[dataclasses.replace(r) for r in step.records])


@contextlib.contextmanager
def _recording(module: nn.Module, spec: TrainingSpec, loop: Loop, blocks: Iterable[nn.Module],
               timeout: float | None) -> Iterator[RecordedStep]:
    """The recorded step, while its objects are alive; any failure but a bad argument is a TraceError."""
    counting = CountingMode(Ledger(spec.device), FakeTensorMode(allow_non_fake_inputs=True), timeout,
                            spec.moe_routing)
    try:
        with recorded(module, spec, loop, counting, blocks) as recording:
            yield RecordedStep(spec.device, recording.ledger.records, classify(recording),
                               list(recording.ledger.marks), recording.workspaces, _notes(counting, spec, recording),
                               _stand_ins(counting, spec), frozenset(counting.uncounted),
                               dict(counting.stand_ins.invented))
    except (ConfigError, TraceError):
        raise
    except Exception as exc:
        raise TraceError(
            f"could not trace a training step of {type(module).__name__}: {type(exc).__name__}: {exc}"
            + _stand_in_cause(counting)
        ) from exc


def analysed(step: RecordedStep, weight: Callable[[Category, Phase], float] | None = None,
             extras: Callable[[Phase], dict[Category, int]] | None = None) -> TraceResult:
    """The peak of a recorded step, its breakdown, the allocator's slack and the band
    (:func:`trace_breakdown`'s second half)."""
    cuda = step.device == "cuda"
    weight = None if weight is None else functools.cache(weight)  # a few (category, phase) pairs, read per record
    report = analyse(step.records, step.marks, step.kinds, weight, extras)
    slack = allocator_slack(step.records, step.kinds, weight) if cuda else 0
    band = step.workspaces.band(report.timeline) if cuda and step.workspaces is not None else {}
    log.debug("trace: peak %d bytes", sum(report.breakdown.values()))
    output = sum(weighted(r.nbytes, step.kinds[i], r.phase, weight) for i, r in enumerate(step.records) if r.output)
    return TraceResult(report.breakdown, step.notes, slack, report.at_peak, report.timeline, step.stand_ins, band,
                       output)


def _notes(counting: CountingMode, spec: TrainingSpec, recording: Recording) -> list[str]:
    """What the trace invented, modelled or could not size, and what it does not trace, in words."""
    notes: list[str] = []
    invented = counting.stand_ins
    if invented.invented:
        notes.append(invented_note(invented.invented))
    if invented.modelled:
        notes.append(f"{_routing_words(spec.moe_routing)}: the indices of topk x{invented.modelled.get('topk', 0)} "
                     "(the routers' choice of experts) made by the routing model")
    notes.extend(f"not sized by the trace: {what}" for what in sorted(counting.uncounted))
    packed = recording.positions.note()
    if packed is not None:
        notes.append(packed)
    if spec.precision.grad_scaler:
        notes.append("GradScaler's scalars are not traced (a few bytes)")
    return notes


def invented_note(counts: dict[str, int]) -> str:
    """The note on data-dependent ops run on stand-in ones, ``op -> count``."""
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return f"data-dependent ops ran on stand-in values of ones: {ops}"


def _stand_ins(counting: CountingMode, spec: TrainingSpec) -> dict[str, str]:
    """Each data-dependent op whose values the trace invented, and how (:attr:`TraceResult.stand_ins`)."""
    stand_ins = {op: _routing_words(spec.moe_routing) for op in counting.stand_ins.modelled}
    stand_ins.update({op: ONES for op in counting.stand_ins.invented})
    return stand_ins


def _routing_words(capacity: float) -> str:
    """The routing model in words: ``"MoE routing: balanced"`` ..."""
    name = routing_name(capacity)
    return f"MoE routing: {name if name in ROUTINGS else f'capacity factor {name}'}"


def _stand_in_cause(counting: CountingMode) -> str:
    """What a failed trace adds when values it invented may have caused the failure."""
    if not counting.fallbacks:
        return ""
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(counting.fallbacks.items()))
    return (f"; before it, data-dependent ops ran on stand-in values of ones ({ops}), which may be the cause: "
            "a value or size the model computes from its data was invented by the trace")
