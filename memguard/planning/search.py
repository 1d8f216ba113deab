"""The search: the largest micro-batch that fits in each state, cheapest states first, dominated ones skipped.

Every combination of precision, optimizer, checkpointing and layout (strategy, world size,
offload) is a *state* (:func:`_states`); :meth:`Search.fit` finds its largest micro-batch among
the divisors of the per-device effective batch, so the effective batch is kept exactly;
:meth:`Search.search` visits states by the least they can cost and stops once they cost more than
the fits kept; :func:`_best` drops a fit that another with a subset of its changes beats.

Two passes, so that only what can be shown is traced. The first prunes with the formula
(milliseconds an estimate) and keeps, per state, the largest micro-batch the formula puts within
:data:`NEAR` of the limit (the formula may err high by a little: such a near miss is a candidate,
not a reject). The second (:meth:`Search.confirm`) walks each group's candidates cheapest first
and traces them one by one until the group's rows are found: a candidate the trace finds too large
gives way to the next smaller micro-batch of its state, at its own cost. A row shown is traced
(unless ``confirm`` says fewer), and no near miss cheaper than the last row shown is left
untraced.

What one estimate says about another is reused where the estimator's code makes it exact:
every micro-batch after the second of an optimizer step runs as the second does (the trace runs
``min(accumulate, 2)`` micro-batches; the formula only asks ``accumulate > 1``), so estimates are
remembered by their knobs with the accumulation counted as 1 or "more" (:func:`memo_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from memguard.device import DeviceMemory
from memguard.errors import MemguardError
from memguard.estimation.description import (
    CHECKPOINTING_SWITCHES,
    ModelDescription,
    quantizable,
    with_lora,
    with_quantized_base,
)
from memguard.estimation.estimator import estimate as _estimate
from memguard.estimation.models import ResolvedModel, add_lora, load_model
from memguard.estimation.parallel import Strategy
from memguard.estimation.quantization_kinds import Quantization
from memguard.estimation.result import MemoryEstimate, Method
from memguard.fit import Fit, usable_bytes
from memguard.planning.costs import COSTS, CostContext, cost_of, cost_terms, divisors, fewest_micro_batches, lower_bound
from memguard.planning.rows import FULL, LORA, QLORA, Knobs, PlanRow, quantization_args
from memguard.units import format_bytes

if TYPE_CHECKING:
    from memguard.estimation.trace.depth import Depth

_S = Strategy
_SINGLE = ((_S.SINGLE, False, False), (_S.DEEPSPEED_STAGE_2, False, False), (_S.DEEPSPEED_STAGE_2, True, False),
           (_S.DEEPSPEED_STAGE_3, True, False), (_S.DEEPSPEED_STAGE_3, True, True), (_S.FSDP, True, True))
_MULTI = ((_S.DDP, False, False), (_S.FSDP, False, False), (_S.FSDP, True, True), (_S.DEEPSPEED_STAGE_2, False, False),
          (_S.DEEPSPEED_STAGE_2, True, False), (_S.DEEPSPEED_STAGE_3, False, False),
          (_S.DEEPSPEED_STAGE_3, True, False), (_S.DEEPSPEED_STAGE_3, True, True))
"""(strategy, offload optimizer, offload parameters) searched on one GPU and on several. On one, a
sharded strategy serves offload (ZeRO-Offload, ZeRO-Infinity, FSDP's ``CPUOffload``, which offloads
parameters and gradients) or DeepSpeed's mixed precision (a 16-bit module, fp32 master weights)."""
NEAR = 0.1
"""A configuration the formula rejects by less than this share of the usable memory is traced."""
NEAR_TRACES = 2
"""Near misses traced per group beyond its ``confirm`` rows: a model the formula puts low everywhere near the limit
would otherwise have every near miss traced, only to be rejected. A near miss is not traced either
when the configurations traced so far (of its structure, :func:`structure_of`, where there are) are
all at least as far above the formula as it needs to fail (the smallest ratio of trace to formula
seen): a heuristic, but a skip costs a row, never a wrong one."""
@dataclasses.dataclass
class Setup:
    """Everything one search needs, checked."""

    model: Any
    modules: dict[int | None, Any]
    name: str
    base: Knobs
    gpu: DeviceMemory
    margin: float
    gpus: int
    precisions: tuple[str, ...]
    optimizers: tuple[str, ...]
    lora_ranks: tuple[int, ...]
    method: Method
    confirm: int
    limit: int
    device: str
    seq_len: int | None
    extra: dict[str, Any]
    max_estimates: int
    notes: list[str]
    progress: Callable[[str], None] | None = None
    built_here: bool = False
    """memguard built the model from a preset or config: its traces may run a few of its blocks
    for all of them (:mod:`memguard.estimation.trace.depth`)."""
    description: ModelDescription | None = None
    """The preset's shipped description (:mod:`memguard.estimation.description`), where it stands for the model:
    the formula's estimates read it (LoRA and QLoRA derived from it) and no module is built for them; a trace
    builds the module on first use (``modules`` starts empty then)."""


def structure_of(k: Knobs) -> tuple[Any, ...]:
    """What shapes a step's activations and the formula's error on them: all but the optimizer and batch."""
    return (k.precision, k.checkpointing, k.strategy, k.world_size, k.offload_optimizer, k.offload_params,
            k.lora_rank, k.quantization, k.accumulate > 1)


def memo_key(k: Knobs) -> Knobs:
    """``k`` with its accumulation counted as 1 or "more": what the estimators see of it.

    The trace runs ``min(accumulate, 2)`` micro-batches (``trace_breakdown``: the second stands
    for all the others, each running beside the gradients so far), and the formula's loop differs
    only by ``accumulate > 1`` (``estimator._by_method``), so ``batch 2 x accumulate 4`` and
    ``batch 2 x accumulate 2`` have the same estimate, to the byte (``tests/planning/test_plan.py``).
    """
    return dataclasses.replace(k, accumulate=min(k.accumulate, 2))


def _quantization(label: str) -> Quantization:
    """A :attr:`Knobs.quantization` label (``"nf4-dq"``) as the estimator's :class:`Quantization`."""
    kind, dq = quantization_args(label)
    return Quantization(str(kind), dq)


def _no_more_intrusive(a: Knobs, c: Knobs, base: Knobs) -> bool:
    """Whether ``a`` changes nothing ``c`` leaves as ``base`` has it, nor more in degree (so it costs no more)."""
    same = ("precision", "optimizer", "checkpointing", "offload_optimizer", "offload_params", "quantization")
    if any(getattr(a, f) not in (getattr(base, f), getattr(c, f)) for f in same):
        return False
    if a.strategy not in (base.strategy, c.strategy) and a.strategy.sharding_level >= c.strategy.sharding_level:
        return False
    rank_ok = a.lora_rank == c.lora_rank or (a.lora_rank or 0) >= (c.lora_rank or 0) > 0
    # The GPUs you own (``gpus``) are each their own answer: a run split over two of them is
    # faster, not more intrusive, and offload costs less over more GPUs; rows compare on one count.
    world_ok = a.world_size == c.world_size
    return rank_ok and world_ok and a.accumulate <= c.accumulate


_Found = tuple[str, Knobs, MemoryEstimate]
"""A configuration that fits: its group, knobs and estimate."""


class Search:
    """Estimates the configurations of one run, remembered, and finds what fits."""

    def __init__(self, setup: Setup, ctx: CostContext) -> None:
        self.setup, self.ctx, self.seq_len = setup, ctx, setup.seq_len
        self.usable = usable_bytes(setup.gpu.free_bytes, setup.margin)  # fit.py's arithmetic, not a copy
        self.cache: dict[tuple[Knobs, str], MemoryEstimate | None] = {}
        self.count, self.notes, self.method = 0, [], setup.method
        self.traced = self.asked = 0  # traces run; configurations asked for (memo hits included)
        # the trace's bytes over the formula's, for each configuration both made, by its structure
        self.ratios: dict[tuple[Any, ...], list[float]] = {}
        self.failed: dict[str, list[Any]] = {}  # message -> [count, first configuration]
        self.progress = setup.progress
        self.depths: dict[tuple[int | None, str | None], Depth | None] = {}
        self.descriptions: dict[tuple[int | None, str | None], ModelDescription | None] = {}

    def module(self, rank: int | None, quantization: str | None = None) -> Any:
        """The module with LoRA adapters of ``rank`` (``None``: as given) over a base quantized as
        ``quantization`` (a :attr:`Knobs.quantization`), built on first use."""
        from memguard.estimation.quantization import quantize_model

        key: Any = rank if quantization is None else (rank, quantization)
        if key not in self.setup.modules:
            if key is None:  # a description stood for it until now
                module = load_model(self.setup.model).module
            elif quantization is None:
                module = add_lora(load_model(self.setup.model), rank).module
            else:
                adapted = self.module(rank) if rank is not None else self.module(None)
                module, _ = quantize_model(adapted, _quantization(quantization))
            self.setup.modules[key] = module
            self.ctx.trainable.setdefault(rank, sum(p.numel() for p in module.parameters() if p.requires_grad))
        return self.setup.modules[key]

    def described(self, rank: int | None, quantization: str | None = None) -> ModelDescription | None:
        """The description of the model :meth:`module` builds, derived from the preset's
        (:func:`~memguard.estimation.description.with_lora`, ``with_quantized_base``), or ``None`` where the
        module is built instead (no description, none derivable).

        Raises:
            ConfigError: as :meth:`module` (``add_lora``) raises it, for a rank above the hidden size.
        """
        desc, key = self.setup.description, (rank, quantization)
        if desc is None or (rank is not None and desc.lora is None) or (quantization and rank is None):
            return None
        if key not in self.descriptions:
            derived: ModelDescription | None = desc
            if quantization is not None:
                quant = _quantization(quantization)
                derived = with_quantized_base(desc, rank, quant)[0] if quantizable(desc, quant) else None
            elif rank is not None:
                derived = with_lora(desc, rank)
            self.descriptions[key] = derived
        return self.descriptions[key]

    def prepare(self, rank: int | None, quantization: str | None = None) -> None:
        """Check that the model of ``rank`` and ``quantization`` can be made, and count its trainable
        parameters (which the costs read), from its description where there is one, else by :meth:`module`.

        Raises:
            MemguardError: as :meth:`module` does (no LoRA for the architecture, a rank too large).
        """
        if not self.prepared(rank, quantization):
            self.module(rank, quantization)

    def model(self, k: Knobs, method: Method) -> Any:
        """What ``k`` estimates: its module, and for a trace of a deep model memguard built, how to build
        it with fewer blocks (:func:`memguard.estimation.shallow.where_it_pays`: a trace of 1, 2 and 3
        blocks stands for all of them where it provably does, else the whole model is traced)."""
        module = self.module(k.lora_rank, k.quantization)
        if method is not Method.TRACE or not self.setup.built_here:
            return module
        key = (k.lora_rank, k.quantization)
        if key not in self.depths:
            from memguard.estimation.shallow import finished, where_it_pays

            whole = self.module(None)
            base = ResolvedModel(whole, self.setup.name, getattr(whole, "config", None), True)
            quant = None if k.quantization is None else _quantization(k.quantization)
            depth = where_it_pays(base, functools.partial(finished, rank=k.lora_rank, quant=quant))
            # one search, one model, the same other arguments: its traces share their recordings
            self.depths[key] = None if depth is None else dataclasses.replace(depth, memo={})
        # nobody else's module: traced in this process (no fork), where the recordings are kept
        return dataclasses.replace(load_model(module), depth=self.depths[key], private=True)

    def _note_depth(self, k: Knobs, est: MemoryEstimate | None) -> None:
        """Stop tracing ``k``'s module by depth once a trace of it could not be extended (its notes say
        how it went): its later traces run the whole model at once, not three small ones first."""
        key = (k.lora_rank, k.quantization)
        if est is None or est.method is not Method.TRACE or self.depths.get(key) is None:
            return
        from memguard.estimation.trace.depth import EXTENDED

        if not any(note.startswith(EXTENDED) for note in est.notes):
            self.depths[key] = None

    def estimate(self, k: Knobs, method: Method, *, strict: bool = False) -> MemoryEstimate | None:
        """The estimate of ``k``; ``None`` when the estimator cannot make it (the reason noted once)."""
        key = (memo_key(k), method)
        self.asked += 1
        if key not in self.cache:
            self.count += 1
            if method is Method.TRACE:
                self.traced += 1
                self.say(f"tracing {', '.join(k.changes(self.ctx.base)) or 'as asked'} ...")
            elif self.progress is not None and self.count % 25 == 0:
                self.say("pruning with the formula ...")
            model, kwargs = self._model_and_knobs(k, method)
            try:
                self.cache[key] = _estimate(model, seq_len=self.seq_len, device=self.setup.device, method=method,
                                            **kwargs, **self.setup.extra)
            except MemguardError as exc:
                if strict:
                    raise
                seen = self.failed.setdefault(f"{exc} ({method})", [0, ", ".join(k.changes(self.ctx.base))])
                seen[0] += 1
                self.cache[key] = None
            self._note_depth(k, self.cache[key])
            other = self.cache.get((key[0], Method.FORMULA if method is Method.TRACE else Method.TRACE))
            if self.cache[key] is not None and other is not None:
                traced, formula = (self.cache[key], other) if method is Method.TRACE else (other, self.cache[key])
                self.ratios.setdefault(structure_of(k), []).append(self.needed(traced) / max(self.needed(formula), 1))
        return self.cache[key]

    def _model_and_knobs(self, k: Knobs, method: Method) -> tuple[Any, dict[str, Any]]:
        """What :func:`memguard.estimate` of ``k`` takes: the preset's name and every knob, where its description
        stands for the model (the estimator derives the same model from it: the same bytes); else the module,
        which has its adapters and its quantized base already."""
        if method is Method.FORMULA and self.prepared(k.lora_rank, k.quantization):
            return self.setup.model, k.kwargs()
        return self.model(k, method), {**k.kwargs(), "lora_rank": None, "quantization": None, "double_quant": False}

    def prepared(self, rank: int | None, quantization: str | None = None) -> bool:
        """Whether the model of ``rank`` and ``quantization`` is described (:meth:`described`); its trainable
        parameters then counted from the description, as :meth:`module` counts them from the module."""
        desc = self.described(rank, quantization)
        if desc is not None:
            self.ctx.trainable.setdefault(rank, desc.inventory.trainable_numel)
        return desc is not None

    def below(self, k: Knobs, est: MemoryEstimate) -> bool:
        """Whether the traces so far say the trace of ``k`` cannot fit where the formula's ``est``
        does not: ``est`` times the smallest ratio of trace to formula seen, on ``k``'s structure
        where one was traced, else on any (two at least), is still above the usable memory. The ratios
        and ``est`` are taken on :meth:`needed`, the quantity the fit is decided on."""
        seen = self.ratios.get(structure_of(k)) or [r for rs in self.ratios.values() for r in rs]
        return len(seen) >= (1 if structure_of(k) in self.ratios else 2) and self.needed(est) * min(seen) > self.usable

    def needed(self, est: MemoryEstimate) -> int:
        """What the fit decision compares for ``est``: :attr:`memguard.fit.Fit.needed_bytes` (the upper end
        of its band), so that the search's heuristics and :meth:`fits` weigh the same bytes."""
        return Fit(est, self.setup.gpu.free_bytes, self.setup.margin).needed_bytes

    def say(self, what: str) -> None:
        """A progress line (``setup.progress``), with the work so far."""
        if self.progress is not None:
            self.progress(f"  {self.count} estimates ({self.traced} traced): {what}")

    def all_notes(self) -> list[str]:
        """The setup's notes, the search's, and one per reason estimates failed."""
        failed = [f"{n} configuration{'s' * (n > 1)} (e.g. {what or 'as asked'}) cannot be estimated: {why}"
                  for why, (n, what) in self.failed.items()]
        return self.setup.notes + self.notes + failed

    def fits(self, est: MemoryEstimate | None) -> bool:
        return est is not None and est.fits(self.setup.gpu.free_bytes, self.setup.margin)

    def candidate(self, est: MemoryEstimate | None) -> bool:
        """Whether ``est`` fits, or is the formula's and misses by less than :data:`NEAR` of the
        usable memory while the trace may still be asked (the formula may err high; such a near
        miss is not dropped on its word, :meth:`confirm` traces it)."""
        if est is None:
            return False
        near = est.method is Method.FORMULA and self.needed(est) <= self.usable * (1 + NEAR)
        return self.fits(est) or near

    def sizes(self, state: Knobs) -> list[int]:
        """The micro-batches of ``state``: divisors of the per-device batch, at most the user's."""
        per_device = self.ctx.effective // state.world_size
        return [d for d in divisors(per_device) if d <= self.ctx.base.batch_size]

    def at(self, state: Knobs, batch: int) -> Knobs:
        return dataclasses.replace(state, batch_size=batch, accumulate=self.ctx.effective // state.world_size // batch)

    def fit(self, state: Knobs) -> tuple[Knobs, MemoryEstimate] | None:
        """The largest micro-batch that is a :meth:`candidate`."""
        sizes = self.sizes(state)
        tried: dict[int, tuple[Knobs, MemoryEstimate] | None] = {}

        def at(i: int) -> bool:
            k = self.at(state, sizes[i])
            est = self.estimate(k, self.method)
            tried[i] = (k, est) if est is not None and self.candidate(est) else None
            return tried[i] is not None

        if not at(0):
            return None
        if len(sizes) > 1 and at(len(sizes) - 1):
            return tried[len(sizes) - 1]
        lo, hi = 0, len(sizes) - 1  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid) else (lo, mid)
        return tried[lo]

    def search(self, group: str, states: Sequence[Knobs], ranks: Sequence[int | None], keep: int) -> list[_Found]:
        """The best fit of each state (trying ``ranks`` in turn) that may be among the ``keep`` cheapest.

        ``states`` come cheapest first by the least they can cost; the search stops at the first that
        costs more than the ``keep``-th cheapest fit kept, and skips one that could only be dominated.
        """
        base, found, bound = self.ctx.base, [], math.inf
        for state in states:
            if self.count >= self.setup.max_estimates:
                self.notes.append(f"the search stopped at max_estimates={self.setup.max_estimates}")
                break
            if lower_bound(state, self.ctx) > bound:
                break
            for rank in ranks:
                probe = dataclasses.replace(state, lora_rank=rank, accumulate=fewest_micro_batches(state, self.ctx))
                # a near miss (not yet traced) makes nothing needless: the trace may drop it
                if any(self.fits(e) and _no_more_intrusive(k, probe, base) for _, k, e in found):
                    break
                hit = self.fit(dataclasses.replace(state, lora_rank=rank))
                if hit:
                    found.append((group, *hit))
                    kept = _best(found, self.ctx, keep)
                    bound = cost_of(kept[-1][1], self.ctx) if len(kept) >= keep else math.inf
                    break
        return found

    def confirm(self, found: Sequence[_Found], n: int, limit: int, *, ranked: bool = True) -> list[_Found]:
        """Up to ``limit`` of ``found`` that fit, the first ``n`` of them by the trace.

        ``found`` is walked cheapest first (``ranked``; else in its own order, as the remedies
        interleave their groups) and traced one by one: a candidate the trace finds too large gives
        way to the next smaller micro-batch of its state that the formula puts near enough, at its
        own cost (``ranked`` only), and is named in a note; one that a row already kept makes
        needless (fewer changes, no more cost) is skipped untraced. Past ``n`` traced rows, a
        formula's estimate that fits is kept as it is, and a near miss is still traced (issue 17:
        the trace, not the formula, rejects it).
        """
        ctx, out, done, order, near, skipped = self.ctx, [], 0, 0, 0, 0
        queue: list[tuple[float, int, int, _Found]] = []
        for f in found:
            heapq.heappush(queue, (cost_of(f[1], ctx) if ranked else 0.0, f[2].total_bytes if ranked else 0, order, f))
            order += 1
        while queue and len(out) < limit:
            *_, (group, k, est) = heapq.heappop(queue)
            cost = cost_of(k, ctx)
            if any(a != k and _no_more_intrusive(a, k, ctx.base) and cost_of(a, ctx) <= cost for _, a, _ in out):
                continue
            if est.method is Method.TRACE or (done >= n and self.fits(est)):
                if self.fits(est):
                    out.append((group, k, est))
                continue
            if not self.fits(est):  # a near miss: traced unless the traces so far say it cannot fit
                if near >= n + NEAR_TRACES or self.below(k, est):
                    skipped += 1
                    continue
                near += 1
            traced = self.estimate(k, Method.TRACE)
            if traced is None:  # the trace cannot: the formula's word, when it fits
                if self.fits(est):
                    out.append((group, k, est))
                continue
            if self.fits(traced):
                out.append((group, k, traced))
                done += 1
                continue
            self.notes.append(f"{', '.join(k.changes(ctx.base)) or 'as asked'}: the formula's "
                              f"{format_bytes(est.total_bytes)}, the trace's {format_bytes(traced.total_bytes)} "
                              "does not fit; dropped")
            smaller = [b for b in self.sizes(k) if b < k.batch_size] if ranked else []
            if smaller:
                nxt = self.at(k, smaller[-1])
                again = self.estimate(nxt, Method.FORMULA)
                if again is not None and self.candidate(again):
                    heapq.heappush(queue, (cost_of(nxt, ctx), again.total_bytes, order, (group, nxt, again)))
                    order += 1
        if skipped:
            self.notes.append(f"{skipped} configuration{'s' * (skipped > 1)} the formula puts within {NEAR:.0%} above "
                              "the limit not traced: the traces so far put every one of them above it, or "
                              f"{n + NEAR_TRACES} such near misses were traced already")
        return sorted(out, key=lambda f: (cost_of(f[1], ctx), f[2].total_bytes)) if ranked else out

    def row(self, group: str, k: Knobs, est: MemoryEstimate) -> PlanRow:
        terms, seq, device = cost_terms(k, self.ctx), self.seq_len, self.setup.device
        keep = self.setup.extra.get("keep_output")
        said = {} if keep is None else {"keep_output": keep}
        return PlanRow(group, k.changes(self.ctx.base), {**k.kwargs(), "seq_len": seq, "device": device, **said},
                       est.total_bytes, self.needed(est), self.usable - self.needed(est), cost_of(k, self.ctx), terms,
                       est.method, k.flags(self.ctx.base, seq, device, self.setup.margin, keep), est.host_bytes)


def _best(found: Sequence[_Found], ctx: CostContext, limit: int) -> list[_Found]:
    """The ``limit`` cheapest (then smallest) that no fit with a subset of their changes beats."""
    cost = {k: cost_of(k, ctx) for _, k, _ in found}
    kept = [f for f in found if not any(a != f[1] and _no_more_intrusive(a, f[1], ctx.base) and cost[a] <= cost[f[1]]
                                        for _, a, _ in found)]
    return sorted(kept, key=lambda f: (cost[f[1]], f[2].total_bytes))[:limit]


def plan_rows(search: Search, groups: Sequence[Sequence[_Found]]) -> list[PlanRow]:
    """Each group's rows: its undominated candidates walked cheapest first, traced until ``limit`` fit."""
    rows = []
    for found in groups:
        found = search.confirm(found, search.setup.confirm, search.setup.limit)
        rows += [search.row(*f) for f in _best(found, search.ctx, search.setup.limit)]
    return rows


def run_search(setup: Setup, asked: MemoryEstimate | None) -> tuple[Search, list[list[_Found]]]:
    """Estimate the asked run (the trace when the formula cannot), then search each group."""
    base = setup.base
    effective = base.batch_size * base.accumulate * base.world_size
    if setup.description is not None:
        inv = setup.description.inventory
        total, trainable = sum(inv.numel), inv.trainable_numel
    else:
        module = setup.modules[None]
        total, trainable = (sum(p.numel() for p in module.parameters()),
                            sum(p.numel() for p in module.parameters() if p.requires_grad))
    search = Search(setup, CostContext(base, effective, 1, total, {None: trainable}))
    search.prepare(base.lora_rank)  # its trainable count, which the costs read before any estimate
    if asked is not None:
        search.cache[(memo_key(base), asked.method)] = asked
    if search.estimate(base, search.method, strict=search.method is Method.TRACE) is None:
        search.failed.clear()
        search.estimate(base, Method.TRACE, strict=True)
        setup.notes.append(f"the formula cannot estimate {setup.name}: the trace searched instead")
        search.method = Method.TRACE
    search.seq_len = search.cache[(memo_key(base), search.method)].inputs.get("seq_len")
    search.ctx = dataclasses.replace(search.ctx, tokens_per_sample=search.seq_len or COSTS["micro_batch_tokens"])
    keep = 2 * setup.limit + 2  # candidates beyond the rows shown: the trace may drop some
    return search, [search.search(group, states, ranks, keep) for group, states, ranks in _groups(search)]


def _groups(search: Search) -> list[tuple[str, list[Knobs], tuple[int | None, ...]]]:
    """Each group's name, states (fewest changes first) and LoRA ranks to try in turn."""
    setup, ctx, base = search.setup, search.ctx, search.ctx.base
    layouts = [(s, 1, oo, op) for s, oo, op in _SINGLE]
    skipped = [w for w in range(2, setup.gpus + 1) if ctx.effective % w]
    layouts += [(s, w, oo, op) for w in range(2, setup.gpus + 1) if not ctx.effective % w for s, oo, op in _MULTI]
    if skipped:
        shown = ", ".join(map(str, skipped[:8])) + (f" and {len(skipped) - 8:,} more" if len(skipped) > 8 else "")
        sizes = f"world size{'s' * (len(skipped) > 1)} {shown}"
        setup.notes.append(f"{setup.gpus} GPUs allowed, but {sizes} cannot keep the effective batch of "
                           f"{ctx.effective}: not searched")
    mine = (base.strategy, base.world_size, base.offload_optimizer, base.offload_params)
    layouts = [mine, *(x for x in layouts if x != mine)]
    if setup.description is not None:
        switch = setup.description.checkpointing_switch
    else:
        switch = any(hasattr(setup.modules[None], f) for f in CHECKPOINTING_SWITCHES)
    if not (switch or base.checkpointing):
        setup.notes.append(f"{setup.name} has no checkpointing switch (transformers' gradient_checkpointing_enable): "
                           "gradient checkpointing not searched")
    checkpointing = (base.checkpointing, not base.checkpointing) if switch else (base.checkpointing,)
    mine_group = QLORA if base.quantization else LORA if base.lora_rank else FULL
    out = [(mine_group, setup.optimizers, (base.lora_rank,), setup.precisions, base.quantization)]
    if setup.lora_ranks:
        try:
            search.prepare(setup.lora_ranks[0])
            out.append((LORA, (base.optimizer,), setup.lora_ranks, setup.precisions, None))
        except MemguardError as exc:
            setup.notes.append(f"LoRA not planned: {exc}")
    qlora_ranks = setup.lora_ranks or ((base.lora_rank,) if base.lora_rank else ())
    if qlora_ranks and base.quantization is None:
        try:
            search.prepare(qlora_ranks[0], _QLORA)
            out.append((QLORA, (base.optimizer,), qlora_ranks, _qlora_precisions(setup.precisions), _QLORA))
        except MemguardError as exc:
            setup.notes.append(f"QLoRA not planned: {exc}")
    return [(group, _states(base, layouts, precisions, optimizers, checkpointing, ranks[0], ctx, quant), ranks)
            for group, optimizers, ranks, precisions, quant in out]


_QLORA = "nf4-dq"
"""The QLoRA paper's base (Dettmers et al. 2023): NF4 with double quantization, bf16 compute."""


def _qlora_precisions(precisions: Sequence[str]) -> tuple[str, ...]:
    """QLoRA's: the 16-bit true precisions searched (bf16 first, as the paper computes in bf16), else the others."""
    true16 = tuple(p for p in ("bf16-true", "16-true") if p in precisions)
    return true16[:1] or tuple(precisions)


def _states(base: Knobs, layouts: Sequence[tuple[str, int, bool, bool]], precisions: Sequence[str],
            optimizers: Sequence[str], checkpointing: Sequence[bool], rank: int | None, ctx: CostContext,
            quantization: str | None = None) -> list[Knobs]:
    """Every combination, cheapest first by the least it can cost, then fewest changes; offloaded state
    only with DeepSpeed's or FSDP's CPU Adam (no other optimizer is offloaded); a quantized base on one
    GPU or under DDP only (sharding bitsandbytes' packed weights needs FSDP's ``quant_storage`` setup,
    not modelled)."""
    states = [Knobs(p, o, ck, s, w, oo, op, rank, quantization=quantization)
              for s, w, oo, op in layouts for p in precisions for o in optimizers for ck in checkpointing
              if (not oo or o in ("adamw", "adam") or (base.offload_optimizer and o == base.optimizer))
              and not (quantization and (s not in ("single", "ddp") or oo or op))]

    return sorted(states, key=lambda s: (lower_bound(s, ctx), len(s.changes(base))))
