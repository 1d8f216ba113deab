"""Depth: the recorded step of a stack of ``L`` identical blocks, from the steps of 1, 2 and 3 of them.

A decoder is an embedding, ``L`` blocks of the same class built from the same config, and a head.
Each block runs the same ops on tensors of the same shapes and dtypes (the hidden states keep
their shape from block to block), so the step's allocations and frees are those of one block
repeated: the forward runs ``block 0 ... block L-1``, the backward (and a checkpointed block's
recomputation) runs them in reverse, and each ``foreach`` op of the optimizer walks the
parameters in order, ``embedding, block 0 ... block L-1, norm, head``. Written as a string of
events, the step of ``k`` blocks is ``c0 Y1^(k-1) c1 Y2^(k-1) ... cm``: constant parts and
segments that repeat once per block beyond the first.

:func:`learn` finds that form and checks it, record by record, instead of assuming it:

1. the events of the 1-block step are aligned with those of the 2-block step
   (``difflib.SequenceMatcher``, from the start or from the end; where neither alignment holds,
   the 1-, 2- and 3-block steps parsed together, :func:`_parsed`); what the second adds must be
   insertions only (no event of the first changed or dropped), each a segment ``Y`` at one place;
2. each event says what it is: its bytes (as allocated and as asked), phase, category, shape,
   dtype and the module (or parameter) it belongs to with the block's index left out; the
   3-block step must be the 2-block step with each segment once more;
3. which event frees which allocation, and which block an allocation names, is a rule per
   allocation of a segment (the same copy, the mirrored copy — the forward of block ``j`` and its
   backward, which runs in reverse —, the next one, the first or the last, a fixed event or block):
   the simplest of the rules that fit both the 2- and the 3-block steps (:func:`_simplicity`);
   where the simplest ones part at ``L`` blocks, nothing is extended;
4. the steps of 2 and 3 blocks are rebuilt from the rules and must equal the recorded ones in
   every record (sizes, phase, category, names, allocation and free clocks) and phase mark.

Only then is the step of ``L`` blocks built (:meth:`Pump.at`) and analysed as a recorded one
(:func:`.pipeline.analysed`): the same peak, breakdown, allocator replay, band and timeline as a
trace of all ``L`` blocks (``tests/estimation/trace/test_depth.py`` compares them to the byte). Data-dependent
ops run on stand-in ones (Adafactor's ``.item()``) are counted as the events are: one block's
count repeated, checked at 1, 2 and 3 blocks. Where a check fails — blocks that differ (a
sliding-window layer among global ones), an op whose size grows with the depth (a norm over all
gradients at once, a fused optimizer's flat buffer), events that no insertion of repeated
segments aligns (see the limitations), a routing model's stand-ins, convolutions (whose band depends on
their order) — :func:`trace_by_depth` returns ``None`` and the caller traces all ``L`` blocks.

Why three blocks and not two: the 1- and 2-block steps find the segments; the 3-block step shows
that they repeat as found and fixes the rules; two rules that fit both may still part at four
blocks or more (:func:`_simplicity` chooses, and the tests check the choice against whole traces).

Known limitations:
    * What holds from 4 blocks to ``L`` rests on the blocks being identical (the same code on
      the same shapes) and on the rule chosen; the rules learnt at 1-3 blocks are checked on every
      call against a recorded step of :data:`HELD_OUT` (4) blocks, which they never saw, and against
      whole traces in the tests (4-6-block stacks; the README's Llama-2-7B plan gives the same rows
      to the byte).
    * ``difflib``'s alignment is greedy: where a block's optimizer entries look like those around
      them (LoRA's A and B matrices) it reads two of a block's segments as one and the 3-block
      step refutes it; the parse of the three steps together (:func:`_parsed`) then finds the
      segments. Where unnamed events (the ``foreach`` temporaries, the gradients) of a block look
      like those of the part after the stack (GPT-2's final norm: the same shapes as a block's
      first norm and last bias), a segment may be read with its cut inside a block at one end and
      the next block's first events at the other, whose frees no rule of :func:`_target` (one
      fallback event per rule) gives: the whole model is traced. So too where an allocation is
      freed two blocks later (ZeRO-3 with LoRA adapters): :func:`_target` counts copies one block
      apart at most.
    * Under a fully sharded strategy (FSDP, ZeRO-3) the 1-block step's block frees what the
      head's backward allocated, where a deeper stack's top block does: there frees are aligned
      without the phase and module of what they free (:func:`_freeing`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from memguard.estimation.cuda_rules import Workspaces
from memguard.estimation.result import Category
from memguard.estimation.spec import OPTIMIZERS, TrainingSpec
from memguard.estimation.stand_ins import ONES
from memguard.estimation.trace.ledger import Phase, Record
from memguard.estimation.trace.pipeline import RecordedStep, TraceResult, analysed, invented_note, record_step
from memguard.estimation.trace.record import Loop

__all__ = ["DEPTHS", "EXTENDED", "HELD_OUT", "Depth", "Pump", "extended_note", "learn", "trace_by_depth"]

DEPTHS = (1, 2, 3)
"""The depths traced: two to find the repeated segments, a third to check their order and frees."""

HELD_OUT = 4
"""A depth traced only to check the rules learnt from :data:`DEPTHS` (for stacks deeper than it): the
step they build must equal the recorded one in every record, or the whole model is traced."""

log = logging.getLogger(__name__)

_Token = tuple[Any, ...]
_Id = tuple[Any, ...]  # ("b", position in the 1-block step) or ("i", insertion, copy, offset)


@dataclasses.dataclass(frozen=True)
class Depth:
    """How to build a model with fewer of its repeated blocks.

    Attributes:
        build: the same model (adapters, quantization and all) with ``k`` blocks.
        layers: its number of blocks, ``L``.
        memo: where given, the recorded steps of :func:`trace_by_depth`, kept by what a recording
            reads (:func:`_memo_key`: ``build`` and ``k``, the spec, the loop's knobs, whether blocks
            are marked) and reused by later traces: configurations that differ only in what the
            recording does not read (the strategy's share of each allocation, ``weight`` and
            ``extras``, applied afterwards by :func:`.pipeline.analysed`) record their 1-4-block
            steps once. Only for a caller whose traces of this depth all build their inputs from the
            spec alone (one model, one set of other arguments: a plan's search,
            :class:`memguard.planning.search.Search`); ``None``: every trace records its own.
    """

    build: Callable[[int], nn.Module]
    layers: int
    memo: dict[Any, RecordedStep] | None = dataclasses.field(default=None, compare=False, repr=False)


def trace_by_depth(depth: Depth, spec: TrainingSpec, loop: Loop, stack: Callable[[nn.Module], list[nn.Module]], *,
                   mark_blocks: bool = False, weight: Callable[[Category, Phase], float] | None = None,
                   extras: Callable[[Phase], dict[Category, int]] | None = None,
                   timeout: float | None = None) -> TraceResult | None:
    """The trace of ``depth.layers`` blocks from traces of :data:`DEPTHS` blocks, or ``None`` where
    :func:`learn`'s checks fail (then trace the whole model).

    ``stack`` gives a module's repeated blocks; with ``mark_blocks`` their backward marks
    ``BLOCK_BACKWARD`` (sharded strategies), as :func:`.pipeline.trace_breakdown`'s ``blocks``.
    """
    if depth.layers <= max(DEPTHS):
        return None

    def record(k: int) -> tuple[RecordedStep, str] | None:
        module = depth.build(k)
        blocks = stack(module)
        if len(blocks) != k:
            return None
        key = None if depth.memo is None else _memo_key(depth, k, spec, loop, mark_blocks)
        step = None if key is None else depth.memo.get(key)  # type: ignore[union-attr]
        if step is None:
            step = record_step(module, spec, loop, blocks if mark_blocks else (), timeout)
            if key is not None:
                depth.memo[key] = step  # type: ignore[index]
        return step, _prefix(module, blocks[0])

    steps, prefixes = [], set()
    for k in DEPTHS:
        got = record(k)
        if got is None:
            return None
        steps.append(got[0])
        prefixes.add(got[1])
    prefix = prefixes.pop()
    pump = learn(steps, prefix) if prefix and not prefixes else None
    if pump is None:
        return None
    if depth.layers > HELD_OUT:  # the rules, learnt at 1-3 blocks, must rebuild a depth they never saw
        held_out = record(HELD_OUT)
        if held_out is None or not _same(pump.at(HELD_OUT), held_out[0]):
            log.debug("no trace by depth: the rules do not rebuild the %d-block step", HELD_OUT)
            return None
    built = pump.at(depth.layers)
    if built is None:
        log.debug("no trace by depth: the rules part at %d blocks", depth.layers)
        return None
    found = analysed(built, weight, extras)
    return dataclasses.replace(found, notes=[*found.notes, extended_note(depth.layers)])


EXTENDED = "the trace ran 1, 2 and 3 of the model's blocks"
"""How the note of a trace by depth begins (:func:`extended_note`)."""


def extended_note(layers: int) -> str:
    """The note of a trace by depth: what ran, and why it stands for the whole model."""
    return (f"{EXTENDED} and repeated one block's events to all {layers} (memguard.estimation.trace.depth): "
            f"checked record by record against the traces of 2, 3 and {HELD_OUT} blocks")


def _memo_key(depth: Depth, k: int, spec: TrainingSpec, loop: Loop, mark_blocks: bool) -> tuple[Any, ...] | None:
    """What the recording of ``k`` blocks reads (:func:`.pipeline.record_step`): the module
    (``depth.build``, kept alive by the key so that its identity stays its own, and ``k``), the spec,
    the loop's knobs and the blocks marked; the inputs come from the spec (see :attr:`Depth.memo`).
    The timeout is left out: it stops a recording, it does not change one that ends. ``None`` for an
    optimizer of the user's (a class or a callable, not one of :data:`memguard.estimation.spec.OPTIMIZERS`):
    its code may build another optimizer on another call, so it is recorded anew."""
    if OPTIMIZERS.get(spec.optimizer.name) is not spec.optimizer:
        return None
    return (depth.build, k, spec, loop.loss_fn, loop.training_loop, loop.step_fn, loop.steps, loop.accumulate,
            loop.set_to_none, mark_blocks)


def _prefix(module: nn.Module, block: nn.Module) -> str:
    """The qualified name of the blocks' ``ModuleList`` (``model.layers``), as the trace names
    modules and parameters; ``""`` when the block is not found."""
    name = next((n for n, m in module.named_modules() if m is block), "")
    return name.rpartition(".")[0]


# ------------------------------------------------------------------------------------ events as tokens


def _events(step: RecordedStep) -> list[tuple[str, int]] | None:
    """The step's events in clock order: ``("a", record)``, ``("f", record)``, ``("m", mark)``.

    Every tick of the ledger's clock is one allocation or one free; a mark at clock ``c`` comes
    after the event of tick ``c`` (:func:`.analyse.analyse` puts it before the events after ``c``).
    ``None`` when the clock has a tick without an event (nothing to rebuild it from).
    """
    ticks: dict[int, tuple[str, int]] = {}
    for i, r in enumerate(step.records):
        ticks[r.alloc] = ("a", i)
        if r.free is not None:
            ticks[r.free] = ("f", i)
    if sorted(ticks) != list(range(1, len(ticks) + 1)):
        return None
    marks: dict[int, list[int]] = {}
    for m, (clock, _) in enumerate(step.marks):
        marks.setdefault(clock, []).append(m)
    out: list[tuple[str, int]] = []
    for clock in range(len(ticks) + 1):
        if clock:
            out.append(ticks[clock])
        out += [("m", m) for m in marks.get(clock, ())]
    return out


def _token(step: RecordedStep, event: tuple[str, int], prefix: str, *, loose: bool = False
           ) -> tuple[_Token, int | None]:
    """What an event is, all that the analysis reads of it, with the index of the block its
    module or parameter is in left out (``prefix.#``); and that index (``None``: none).

    A free is ``("f", its allocation's token)``; ``loose``, the allocation's phase and module left
    out (:func:`_freeing`)."""
    kind, i = event
    if kind == "m":
        return ("m", str(step.marks[i][1])), None
    r = step.records[i]
    where, index, lead = r.where, None, prefix + "."
    if where.startswith(lead):
        number, dot, tail = where[len(lead):].partition(".")
        if number.isdigit():
            where, index = lead + "#" + dot + tail, int(number)
    alloc = ("a", r.nbytes, r.requested, str(r.phase), where, r.shape, r.dtype, step.kinds[i], r.output)
    return (alloc if kind == "a" else _freeing(alloc, loose)), index


def _freeing(alloc: _Token, loose: bool) -> _Token:
    """The token of the free of the allocation ``alloc``; ``loose``, without the phase it was
    allocated in and the module that allocated it.

    The 1-block step's one block is the first and the last at once, and what it frees may come from
    a different place than what a block frees in a deeper stack. Under a fully sharded strategy the
    blocks' backward is its own phase (``BLOCK_BACKWARD``): with one block, that block frees the
    gradient of the hidden states that the head's backward allocated (``backward``); with more, only
    the top block does, and each other frees the one the block above it passed down
    (``block-backward``). Checkpointed, the top block frees its saved input, the output of the block
    below it, where the 1-block step's frees the embedding's. The frees differ only in those fields,
    so the 1-block step is the 2-block one with insertions only if they are left out (tried where the
    full tokens give no rules that rebuild the steps). The allocations keep theirs, and the rebuilt steps must equal the
    recorded ones in every record, which frees which included, all the same (:func:`_same`).
    """
    return ("f", (*alloc[:3], None, None, *alloc[5:]) if loose else alloc)


# ------------------------------------------------------------------------------------ the pump

_Seen = list[tuple[int, _Id, Any]]
"""Observations of one allocation class: ``(n, its identity, what was seen)`` in the step of ``n + 1`` blocks."""


@dataclasses.dataclass
class Pump:
    """The step of any number of blocks: the 1-block step's events with segments inserted.

    Attributes:
        base: the 1-block step's tokens.
        inserts: ``(position in base, segment)``: each segment repeats once per block beyond the first.
        prefix: the blocks' ``ModuleList``, whose index the tokens leave out.
        frees: per allocation class (:func:`_class`), the rules of its free that fit the 2- and
            3-block steps (:func:`_target`); at any depth they must agree (:func:`_agreed`).
        names: per allocation class, the rules of the block it names (:func:`_index`), likewise.
        sample: the 3-block step, for what is not an event (notes, band kernels).
        attention: the fused-attention kernels of 1 block and those each further block adds.
        invented: the data-dependent ops run on stand-in ones by 1 block, and by each further one.
        loose: whether the tokens of frees leave out the phase and module of what they free (:func:`_freeing`).
    """

    base: list[_Token]
    inserts: list[tuple[int, list[_Token]]]
    prefix: str
    sample: RecordedStep
    attention: tuple[list[Any], list[Any]]
    invented: tuple[dict[str, int], dict[str, int]]
    loose: bool = False
    frees: dict[_Id, Any] = dataclasses.field(default_factory=dict)
    names: dict[_Id, Any] = dataclasses.field(default_factory=dict)

    def layout(self, n: int) -> list[_Id]:
        """The identity of each event of the step with ``n + 1`` blocks."""
        at = {p: x for x, (p, _) in enumerate(self.inserts)}
        out: list[_Id] = []
        for p in range(len(self.base) + 1):
            if p in at:
                x = at[p]
                out += [("i", x, j, o) for j in range(n) for o in range(len(self.inserts[x][1]))]
            if p < len(self.base):
                out.append(("b", p))
        return out

    def token(self, ident: _Id) -> _Token:
        return self.base[ident[1]] if ident[0] == "b" else self.inserts[ident[1]][1][ident[3]]

    def at(self, layers: int) -> RecordedStep | None:
        """The recorded step of ``layers`` blocks; ``None`` where the rules that fit 2 and 3 blocks
        part at ``layers`` (or leave a free without its allocation)."""
        return self.build(layers - 1)

    def build(self, n: int) -> RecordedStep | None:
        """The step with ``n + 1`` blocks, from the rules; ``None`` where they do not close."""
        ids = self.layout(n)
        where = {ident: q for q, ident in enumerate(ids)}
        tokens = [self.token(ident) for ident in ids]
        free_at: dict[int, int] = {}
        freed: set[int] = set()
        for q, ident in enumerate(ids):
            if tokens[q][0] != "a":
                continue
            target = _agreed(self.frees[_class(ident)], _target, ident, n)
            if target is not None:
                f = where.get(target)
                if f is None or tokens[f] != _freeing(tokens[q], self.loose) or f in freed:
                    return None
                free_at[q] = f
                freed.add(f)
        if len(freed) != sum(t[0] == "f" for t in tokens):
            return None
        names = [_agreed(self.names[_class(i)], _index, i, n) if t[0] == "a" else None
                 for i, t in zip(ids, tokens, strict=True)]
        if _NOWHERE in names:
            return None
        return self._step(tokens, names, free_at, n)

    def _step(self, tokens: list[_Token], names: list[Any], free_at: dict[int, int], n: int) -> RecordedStep:
        """A :class:`RecordedStep` of the events ``tokens`` (blocks named by ``names``, frees by ``free_at``)."""
        clock, clocks, marks = 0, {}, []
        for q, t in enumerate(tokens):
            if t[0] == "m":
                marks.append((clock, Phase(t[1])))
            else:
                clock += 1
                clocks[q] = clock
        records, kinds = [], {}
        for q, t in enumerate(tokens):
            if t[0] == "a":
                _, nbytes, requested, phase, where, shape, dtype, kind, output = t
                index = names[q]
                if index is not None:
                    where = where.replace(f"{self.prefix}.#", f"{self.prefix}.{index}", 1)
                kinds[len(records)] = kind
                free = clocks[free_at[q]] if q in free_at else None
                records.append(Record(nbytes, clocks[q], free, Phase(phase), requested, where, shape, dtype, output))
        first, more = self.attention
        workspaces = self.sample.workspaces
        if workspaces is not None:
            workspaces = dataclasses.replace(workspaces, attention=[*first, *(more * n)])
        first_ops, more_ops = self.invented
        invented = {op: count + n * more_ops[op] for op, count in first_ops.items()}
        notes = [invented_note(invented) if note == invented_note(self.sample.invented) else note
                 for note in self.sample.notes]
        return dataclasses.replace(self.sample, records=records, kinds=kinds, marks=marks, workspaces=workspaces,
                                   notes=notes, invented=invented)


def _class(ident: _Id) -> _Id:
    """An allocation's identity without its copy: all copies follow one rule."""
    return ident if ident[0] == "b" else ("i", ident[1], ident[3])


def _copy(ident: _Id) -> int:
    return ident[2] if ident[0] == "i" else 0


_NOWHERE: _Id = ("nowhere",)


def _target(rule: Any, ident: _Id, n: int) -> _Id | None:
    """Where the allocation ``ident`` is freed under ``rule`` (``None``: alive at the end), in the
    step of ``n + 1`` blocks.

    A rule is ``None``; a fixed event ``("b", p)`` of the 1-block step; or ``("c", x, o, up, d,
    lo, hi, p)``: event ``o`` of copy ``c`` of insertion ``x``, ``c = j + d`` for copy ``j`` (an
    allocation of the 1-block step counts as copy 0), or ``c = n - 1 - j + d`` where not ``up``
    (the forward of a block and its backward, which runs in reverse), while ``lo <= c < n - hi``,
    else event ``p`` of the 1-block step: where a segment's cut falls inside a block, the copy
    that has no neighbour frees (or is freed by) the block the 1-block step has.
    """
    if rule is None or rule[0] == "b":
        return rule
    _, x, o, up, d, lo, hi, p = rule
    j = _copy(ident)
    c = (j if up else n - 1 - j) + d
    if lo <= c < n - hi:
        return ("i", x, c, o)
    return _NOWHERE if p is None else ("b", p)


def _free_rules(seen: _Seen) -> list[Any]:
    """The rules that put every free of ``seen`` where it is."""
    bases = {f[1] for _, _, f in seen if f is not None and f[0] == "b"}
    ins = {(f[1], f[3]) for _, _, f in seen if f is not None and f[0] == "i"}
    rules: list[Any] = [None, *(("b", p) for p in bases)]
    rules += [("c", x, o, up, d, lo, hi, p) for x, o in ins for up in (True, False) for d in (-1, 0, 1)
              for lo in (0, 1) for hi in (0, 1) for p in (*bases, None)]
    return [r for r in rules if all(_target(r, ident, n) == f for n, ident, f in seen)]


def _index(rule: Any, ident: _Id, n: int) -> int | None:
    """The block an allocation names under ``rule`` (``None``: none): ``("start", c)``, block ``c``;
    ``("end", c)``, block ``n - c`` (the last is ``n``); ``("copy", d)``, ``j + d`` for copy ``j``;
    ``("mirror", d)``, ``n - j + d``."""
    if rule is None:
        return None
    how, c = rule
    j = _copy(ident)
    return {"start": c, "end": n - c, "copy": j + c, "mirror": n - j + c}[how]


def _name_rules(seen: _Seen) -> list[Any]:
    """The rules that give every allocation of ``seen`` the block it names."""
    if all(index is None for _, _, index in seen):
        return [None]
    if any(index is None for _, _, index in seen):
        return []
    rules = {r for n, ident, index in seen
             for r in (("start", index), ("end", n - index), ("copy", index - _copy(ident)),
                       ("mirror", index - n + _copy(ident)))}
    return [r for r in rules if all(_index(r, ident, n) == index for n, ident, index in seen)]


def _agreed(rules: list[Any], apply: Callable[[Any, _Id, int], Any], ident: _Id, n: int) -> Any:
    """What the simplest rules that fit 2 and 3 blocks (:func:`_simplicity`) say of ``ident`` at
    ``n + 1`` blocks; ``_NOWHERE`` where they part (none is then trusted)."""
    simplest = min(map(_simplicity, rules))
    said = {apply(r, ident, n) for r in rules if _simplicity(r) == simplest}
    return said.pop() if len(said) == 1 else _NOWHERE


def _simplicity(rule: Any) -> tuple[int, ...]:
    """Of the rules that fit, the one the repetition of a block makes true: a fixed event or block
    first, then a copy counted forward before one counted back, without a window (``lo``, ``hi``)
    before with one, nearest first.

    Two blocks against three cannot tell ``j + 1`` (the next copy; the last frees in the 1-block
    step's part) from ``n - 1 - j`` seen from ``lo = 1``: they part from four blocks on, where only
    the first is what a stack does (``tests/estimation/test_depth.py`` checks the extension
    against whole traces of 4 to 6 blocks).
    """
    if rule is None or rule[0] in ("b", "start", "end"):
        return (0,)
    if rule[0] in ("copy", "mirror"):
        return (1, rule[0] == "mirror", abs(rule[1]))
    _, _, _, up, d, lo, hi, p = rule
    return (1, lo + hi, not up, abs(d), p is None)


# ------------------------------------------------------------------------------------ learning


def learn(steps: Sequence[RecordedStep], prefix: str) -> Pump | None:
    """The :class:`Pump` of the steps of 1, 2 and 3 blocks, or ``None`` where they are not one
    block's events repeated (see the module's docstring for the checks; the reason is logged)."""
    pump, why = _learn(steps, prefix)
    if pump is None:
        log.debug("no trace by depth: %s", why)
    return pump


def _learn(steps: Sequence[RecordedStep], prefix: str) -> tuple[Pump | None, str]:
    if any(set(s.stand_ins.values()) - {ONES} for s in steps) or len({s.uncounted for s in steps}) > 1:
        return None, "a routing model's stand-ins, or kernels left unsized at some depths only"
    if _invented(steps) is None:
        return None, "data-dependent ops whose count is not one block's"
    attention = _attention(steps)
    events = [_events(s) for s in steps]
    if attention is None or any(e is None for e in events):
        return None, "convolutions, attention kernels that are not one block's, or a clock tick without an event"
    why = ""
    for loose in (False, True):
        marked = [[_token(s, e, prefix, loose=loose) for e in ev or []] for s, ev in zip(steps, events, strict=True)]
        tokens = [[t for t, _ in m] for m in marked]
        for inserts in _alignments(*tokens):
            if inserts is None:
                why = why or "the 2-block step is not the 1-block step with events inserted"
                continue
            pump = Pump(tokens[0], inserts, prefix, steps[2], attention, _invented(steps) or ({}, {}), loose)
            if not inserts or [pump.token(i) for i in pump.layout(2)] != tokens[2]:
                why = "the 3-block step is not the 2-block step with its insertions once more"
                continue
            why = _rules(pump, steps, events, [[i for _, i in m] for m in marked])
            if not why:
                return pump, ""
    return None, why


def _rules(pump: Pump, steps: Sequence[RecordedStep], events: list[list[tuple[str, int]] | None],
           indices: list[list[int | None]]) -> str:
    """Find the rules of each allocation's free and name (:attr:`Pump.frees`, :attr:`Pump.names`)
    and check that they rebuild the 2- and 3-block steps; what fails, or ``""``."""
    frees: dict[_Id, _Seen] = {}
    names: dict[_Id, _Seen] = {}
    for n in (1, 2):
        _observe(pump.layout(n), events[n] or [], indices[n], n, frees, names)
    for seen, rules_of, rules in ((frees, _free_rules, pump.frees), (names, _name_rules, pump.names)):
        for key, observed in seen.items():
            rules[key] = rules_of(observed)
            if not rules[key]:
                return f"no rule for allocation {key}: {observed}"
    for n, step in enumerate(steps[1:], start=1):
        if not _same(pump.build(n), step):
            return f"the rules do not rebuild the {n + 1}-block step"
    return ""


def _alignments(base: list[_Token], two: list[_Token], three: list[_Token]
                ) -> Iterator[list[tuple[int, list[_Token]]] | None]:
    """Ways to read ``two`` as ``base`` with segments inserted, tried in turn: ``difflib``'s
    alignment from the start, then from the end; where neither holds, the parse of the three steps
    together (:func:`_parsed`), from the start, then from the end."""
    yield _matched(base, two)
    yield _matched(base, two, backwards=True)
    yield _parsed(base, two, three)
    found = _parsed(base[::-1], two[::-1], three[::-1])
    yield None if found is None else [(len(base) - p, y[::-1]) for p, y in reversed(found)]


PARSE_STATES = 200_000
"""The most steps :func:`_parsed` takes before it gives up (then the whole model is traced)."""

_State = tuple[int, int, bool]


def _parsed(base: list[_Token], two: list[_Token], three: list[_Token]) -> list[tuple[int, list[_Token]]] | None:
    """``two`` as ``base`` with segments inserted such that ``three`` is ``two`` with each once more:
    the form ``c0 Y1^(k-1) c1 ... cm`` read from the steps of 1, 2 and 3 blocks at once; ``None``
    where there is none.

    ``difflib`` aligns two sequences, greedily: where segments of a block sit side by side and look
    alike (LoRA's A and B matrices, whose ``foreach`` temporaries the optimizer frees in reverse order
    and then their gradients in order: ``ABAV VABA ABAV`` at 1 block), it reads two of them as one
    insertion, ``(Y1 Y2)^(k-1)`` where the step is ``Y1^(k-1) Y2^(k-1)``, and the 3-block step refutes it.

    The parse walks the three steps together. At base position ``i`` with ``e`` events inserted so
    far, ``two`` is at ``i + e`` and ``three`` at ``i + 2e``; either the event of ``base`` is the next
    one of all three, or a segment ``Y`` of ``n`` events is inserted there: ``two`` reads ``Y``,
    ``three`` reads ``Y Y``, and both go on with the next event of ``base`` (or all three end). It takes
    an event of ``base`` before a segment and a short segment before a long one, and backs up where it
    is stuck; a state that led nowhere is not tried again, and after :data:`PARSE_STATES` steps it
    gives up. A parse is a candidate only: its rules must still rebuild the 2- and 3-block steps
    record by record (:func:`_rules`).
    """
    size, extra = len(base), len(two) - len(base)
    if extra <= 0 or len(three) - len(two) != extra:
        return None
    codes: dict[_Token, int] = {}
    b, s2, s3 = ([codes.setdefault(t, len(codes)) for t in seq] for seq in (base, two, three))

    def moves(i: int, e: int, inserted: bool) -> Iterator[tuple[_State, int]]:
        """The states that follow ``(i, e, inserted)`` (``inserted``: a segment ends here, so no other
        begins) and the length of the segment each inserts (0: none)."""
        i2, i3 = i + e, i + 2 * e
        if i < size and b[i] == s2[i2] == s3[i3]:
            yield (i + 1, e, False), 0
        if inserted:
            return
        for n in range(1, extra - e + 1):
            if s2[i2 + n - 1] != s3[i3 + n - 1]:
                break
            repeats = s3[i3:i3 + n] == s3[i3 + n:i3 + 2 * n]
            ends = i == size and e + n == extra
            if repeats and (ends or (i < size and b[i] == s2[i2 + n] == s3[i3 + 2 * n])):
                yield (i, e + n, True), n

    start: _State = (0, 0, False)
    path: list[tuple[_State, Iterator[tuple[_State, int]], int]] = [(start, moves(*start), 0)]
    dead: set[_State] = set()
    for _ in range(PARSE_STATES):
        if not path:
            return None
        state, following, _ = path[-1]
        if state[:2] == (size, extra):
            return [(i, two[i + e - n:i + e]) for (i, e, _), _, n in path if n]
        taken = next(following, None)
        if taken is None:
            dead.add(state)
            path.pop()
        elif taken[0] not in dead:
            path.append((taken[0], moves(*taken[0]), taken[1]))
    return None


def _matched(base: list[_Token], longer: list[_Token], *, backwards: bool = False
             ) -> list[tuple[int, list[_Token]]] | None:
    """``longer`` as ``base`` with segments inserted, as ``difflib.SequenceMatcher`` aligns them
    (``backwards``: both read from the end, which puts ambiguous insertions earlier); ``None``
    where it changes or drops an event of ``base``."""
    if backwards:
        found = _matched(base[::-1], longer[::-1])
        return None if found is None else [(len(base) - p, y[::-1]) for p, y in reversed(found)]
    inserts = []
    for tag, i1, _, j1, j2 in difflib.SequenceMatcher(None, base, longer, autojunk=False).get_opcodes():
        if tag == "insert":
            inserts.append((i1, longer[j1:j2]))
        elif tag != "equal":
            return None
    return inserts


def _observe(ids: list[_Id], events: list[tuple[str, int]], indices: list[int | None], n: int,
             frees: dict[_Id, _Seen], names: dict[_Id, _Seen]) -> None:
    """Add where each allocation of the step of ``n + 1`` blocks is freed and which block it names."""
    position = {e: q for q, e in enumerate(events)}
    for q, (kind, i) in enumerate(events):
        if kind == "a":
            f = position.get(("f", i))
            frees.setdefault(_class(ids[q]), []).append((n, ids[q], None if f is None else ids[f]))
            names.setdefault(_class(ids[q]), []).append((n, ids[q], indices[q]))


def _same(built: RecordedStep | None, step: RecordedStep) -> bool:
    """Whether the rebuilt step is the recorded one: every record, category and mark."""
    if built is None:
        return False
    return built.records == step.records and built.kinds == step.kinds and built.marks == step.marks


def _invented(steps: Sequence[RecordedStep]) -> tuple[dict[str, int], dict[str, int]] | None:
    """The data-dependent ops run on stand-in ones by 1 block, and by each further block (the same
    at 2 and 3 blocks: Adafactor's ``.item()`` per parameter); ``None`` where they are not so."""
    counts = [s.invented for s in steps]
    if len({frozenset(c) for c in counts}) > 1:
        return None
    more = {op: counts[1][op] - counts[0][op] for op in counts[0]}
    if any(counts[2][op] - counts[1][op] != more[op] for op in counts[0]):
        return None
    return dict(counts[0]), more


def _attention(steps: Sequence[RecordedStep]) -> tuple[list[Any], list[Any]] | None:
    """The fused attention kernels of the band: those of 1 block, and those each further block adds
    (the same at 2 and 3 blocks); ``None`` for convolutions, whose band depends on their order."""
    lists = []
    for s in steps:
        w = s.workspaces or Workspaces()
        if w.convs:
            return None
        lists.append(list(w.attention))
    first, second, third = lists
    more = second[len(first):]
    if second[:len(first)] != first or third != [*first, *more, *more]:
        return None
    return first, more
