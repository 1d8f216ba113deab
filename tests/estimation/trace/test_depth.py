"""The trace by depth: a stack of L blocks from traces of 1, 2 and 3, against whole traces, to the byte."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

import memguard
from memguard.estimation.inputs import make_batch
from memguard.estimation.models import ResolvedModel, add_lora, load_model
from memguard.estimation.parallel import resolve_parallelism, wrapped_blocks
from memguard.estimation.quantization import Quantization, quantize_model
from memguard.estimation.result import Category
from memguard.estimation.shallow import shallow
from memguard.estimation.step import Step
from memguard.estimation.trace.depth import DEPTHS, EXTENDED, HELD_OUT, extended_note, learn, trace_by_depth
from memguard.estimation.trace.pipeline import record_step, trace_breakdown
from memguard.estimation.trace.record import Loop


def _llama(layers: int = 5) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _gpt2(layers: int = 5) -> GPT2Config:
    return GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=128)


def _case(config: Any, lora: int | None = None, quantization: str | None = None,
          **knobs: Any) -> tuple[Any, Any, Any, Loop, Any]:
    """The whole module, its :class:`Depth`, the spec, the loop and the layout of a step of ``config``
    (with LoRA adapters of rank ``lora`` over a base quantized as ``quantization``, as plans build them)."""
    resolved = load_model(config)

    def finish(r: ResolvedModel) -> Any:
        module = add_lora(r, lora).module if lora else r.module
        return quantize_model(module, Quantization(quantization))[0] if quantization else module

    module = finish(resolved)
    step = Step(batch_size=2, seq_len=32, device="cuda", **knobs)

    def make_inputs() -> Any:
        return (), make_batch(module, 2, 32)

    return module, shallow(resolved, finish), step.spec, Loop(make_inputs), step.layout


_slow = pytest.mark.slow
CASES = [
    ({}, True),
    pytest.param({"precision": "bf16-true", "optimizer": "sgd"}, True, marks=_slow),
    pytest.param({"precision": "32-true", "gradient_checkpointing": True}, True, marks=_slow),
    pytest.param({"precision": "16-mixed", "optimizer": "adamw-8bit"}, True, marks=_slow),
    pytest.param({"precision": "bf16-true", "optimizer": "adamw-8bit", "gradient_checkpointing": True}, True,
                 marks=_slow),
]


@pytest.mark.parametrize(("knobs", "used"), CASES)
def test_a_stack_traced_by_depth_is_its_whole_trace_to_the_byte(knobs: dict[str, Any], used: bool) -> None:
    """Peak, breakdown, allocator slack, band, tensors at the peak and timeline: all equal a trace of
    all five blocks, for precisions, checkpointing and optimizers (a Llama stack)."""
    module, depth, spec, loop, _ = _case(_llama(), precision=knobs.pop("precision", "bf16-mixed"), **knobs)
    whole = trace_breakdown(module, spec, loop.make_inputs)
    by_depth = trace_by_depth(depth, spec, loop, wrapped_blocks)
    assert (by_depth is not None) is used
    assert by_depth == dataclasses.replace(whole, notes=[*whole.notes, extended_note(5)])
    assert sum(whole.breakdown.values()) > 0 and whole.slack > 0


@pytest.mark.parametrize(("quantization", "precision"), [(None, "bf16-mixed"), ("nf4", "bf16-true")])
def test_lora_and_qlora_stacks_traced_by_depth_are_their_whole_traces_to_the_byte(quantization: str | None,
                                                                                  precision: str) -> None:
    """LoRA's A and B matrices look alike where the optimizer walks them (their foreach temporaries,
    freed in reverse, then their gradients, freed in order), so difflib reads two of a block's segments
    as one; the parse of the 1-, 2- and 3-block steps together does not: the extension is used, and is
    the whole trace to the byte, over a full-precision base and an NF4 one (QLoRA)."""
    module, depth, spec, loop, _ = _case(_llama(), 8, quantization, precision=precision)
    whole = trace_breakdown(module, spec, loop.make_inputs)
    by_depth = trace_by_depth(depth, spec, loop, wrapped_blocks)
    assert by_depth == dataclasses.replace(whole, notes=[*whole.notes, extended_note(5)])
    assert whole.breakdown[Category.OPTIMIZER_STATE] > 0 and whole.timeline


@pytest.mark.slow
@pytest.mark.parametrize("layers", [4, 6])
def test_the_extension_holds_at_other_depths(layers: int) -> None:
    module, depth, spec, loop, _ = _case(_llama(layers), precision="bf16-mixed", accumulate_grad_batches=2)
    loop = dataclasses.replace(loop, accumulate=2)
    whole = trace_breakdown(module, spec, loop.make_inputs, accumulate=2)
    assert trace_by_depth(depth, spec, loop, wrapped_blocks) == dataclasses.replace(
        whole, notes=[*whole.notes, extended_note(layers)])


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "checkpointing", "used"), [
    ("deepspeed_stage_2", False, True), ("deepspeed_stage_3", False, True), ("fsdp", False, True),
    ("fsdp", True, True)])
def test_sharded_strategies_weigh_the_extended_step_as_the_whole_one(strategy: str, checkpointing: bool,
                                                                     used: bool) -> None:
    """ZeRO and FSDP divide by the world size and add gathered units by phase: the estimate of a model
    that carries its :class:`Depth` equals that of the bare module (which is traced whole). A fully
    sharded strategy marks where the blocks' backward starts: the gradient the head passes down is
    then freed in another phase than those the blocks pass down (and, checkpointed, the first block's
    saved input is the embedding's, the others' their previous block's): the trace by depth aligns the
    frees without the phase and module of what they free (the records keep theirs, checked all the same)."""
    module, depth, _, _, _ = _case(_llama())
    knobs = {"batch_size": 2, "seq_len": 32, "device": "cuda", "precision": "bf16-mixed", "strategy": strategy,
             "world_size": 4, "method": "trace", "gradient_checkpointing": checkpointing}
    whole = memguard.estimate(module, **knobs)
    resolved = dataclasses.replace(load_model(module), depth=depth)
    assert resolved.depth is not None and resolve_parallelism(strategy, 4).sharded
    by_depth = memguard.estimate(resolved, **knobs)
    assert by_depth.total_bytes == whole.total_bytes > 0
    assert (by_depth.breakdown, by_depth.band, by_depth.host_bytes) == (whole.breakdown, whole.band, whole.host_bytes)
    assert by_depth.timeline == whole.timeline
    assert [n for n in by_depth.notes if n != extended_note(5)] == list(whole.notes)
    assert (extended_note(5) in by_depth.notes) is used


@pytest.mark.slow
def test_where_the_checks_fail_the_whole_model_is_traced() -> None:
    """GPT-2's optimizer lists cannot be aligned block by block (its final norm's parameters look like a
    block's first ones): no extension, and the estimate is the whole trace's."""
    for config, lora in ((_gpt2(), None),):
        module, depth, spec, loop, _ = _case(config, lora)
        assert depth is not None
        assert trace_by_depth(depth, spec, loop, wrapped_blocks) is None
        resolved = dataclasses.replace(load_model(module), depth=depth)
        knobs = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": "trace"}
        found = memguard.estimate(resolved, **knobs)
        assert found.total_bytes == memguard.estimate(module, **knobs).total_bytes
        assert not any(note.startswith(EXTENDED) for note in found.notes)


def test_a_step_that_is_not_one_block_repeated_is_refused() -> None:
    """One record of the 3-block step changed (a size, or a free one event later) and nothing is learned."""
    _, depth, spec, loop, _ = _case(_llama())
    steps = [record_step(depth.build(k), spec, loop) for k in DEPTHS]
    assert learn(steps, "model.layers") is not None
    for change in ({"nbytes": steps[2].records[-1].nbytes + 512}, {"where": "model.layers.0.mlp"}):
        records = [*steps[2].records[:-1], dataclasses.replace(steps[2].records[-1], **change)]
        assert learn([*steps[:2], dataclasses.replace(steps[2], records=records)], "model.layers") is None
    freed = next(i for i, r in enumerate(steps[2].records) if r.free is not None and r.phase == "backward")
    late = dataclasses.replace(steps[2].records[freed], free=steps[2].records[freed].free + 1)
    records = [*steps[2].records[:freed], late, *steps[2].records[freed + 1:]]
    assert learn([*steps[:2], dataclasses.replace(steps[2], records=records)], "model.layers") is None


def test_only_single_stacks_deeper_than_the_depths_traced_qualify() -> None:
    assert shallow(load_model(_llama(3)), lambda r: r.module) is None
    assert shallow(ResolvedModel(load_model(_llama(5)).module, "mine"), lambda r: r.module) is None  # not built here
    assert shallow(load_model("t5-small"), lambda r: r.module) is None  # two stacks of their own depths
    depth = shallow(load_model(_llama(5)), lambda r: r.module)
    assert depth is not None and depth.layers == 5
    assert [len(wrapped_blocks(depth.build(k))) for k in DEPTHS] == [1, 2, 3]


@pytest.mark.slow
def test_stand_in_counts_grow_by_one_block_each() -> None:
    """Adafactor's ``.item()`` runs on stand-in ones once per parameter: the note counts them as a trace
    of all five blocks does."""
    module, depth, spec, loop, _ = _case(_llama(), precision="bf16-mixed", optimizer="adafactor")
    whole = trace_breakdown(module, spec, loop.make_inputs)
    assert whole.stand_ins and any("x" in note for note in whole.notes)
    assert trace_by_depth(depth, spec, loop, wrapped_blocks) == dataclasses.replace(
        whole, notes=[*whole.notes, extended_note(5)])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, 8])
def test_rules_that_do_not_rebuild_the_held_out_depth_are_not_used(lora: int | None) -> None:
    """A fourth block unlike the first three (as a stack whose pattern repeats every fourth layer
    would have) passes the checks at 1-3 blocks; the held-out trace of 4 blocks refuses the rules,
    learnt by difflib's alignment or (LoRA) by the parse of the three steps together."""
    _, depth, spec, loop, _ = _case(_llama(), lora)
    assert trace_by_depth(depth, spec, loop, wrapped_blocks) is not None  # the same stack, blocks alike

    def build(k: int) -> Any:
        if k < HELD_OUT:
            return depth.build(k)
        config = _llama(k)
        config.intermediate_size = 192  # the fourth depth's blocks are wider
        resolved = load_model(config)
        return add_lora(resolved, lora).module if lora else resolved.module

    assert trace_by_depth(dataclasses.replace(depth, build=build), spec, loop, wrapped_blocks) is None


def _same_estimate(a: Any, b: Any) -> bool:
    """Two estimates alike in every number and word they report."""
    fields = ("total_bytes", "breakdown", "band", "host_bytes", "timeline", "at_peak", "notes", "stand_ins")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.slow
def test_recordings_kept_in_a_memo_are_reused_only_where_a_recording_reads_the_same() -> None:
    """A plan's depth keeps its recordings (``Depth.memo``): DeepSpeed ZeRO-2's bf16-mixed runs a bf16
    module, so its step records as a single GPU's bf16-true does, and only the strategy's share of each
    allocation (applied after the recording) differs. Its estimate from the single GPU's recordings is
    the one from its own recordings, to the byte, and the whole trace's. A step that records anything
    else (another optimizer, FSDP's marked blocks, another batch) records its own 1-4-block steps."""
    module, depth, _, _, _ = _case(_llama())
    memo: dict[Any, Any] = {}
    kept = dataclasses.replace(load_model(module), depth=dataclasses.replace(depth, memo=memo), private=True)
    fresh = dataclasses.replace(load_model(module), depth=depth)
    knobs = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": "trace"}
    single = memguard.estimate(kept, precision="bf16-true", **knobs)
    assert len(memo) == len((*DEPTHS, HELD_OUT)) and extended_note(5) in single.notes
    zero2 = {"precision": "bf16-mixed", "strategy": "deepspeed_stage_2", **knobs}
    reused = memguard.estimate(kept, **zero2)
    assert len(memo) == 4  # nothing recorded again
    assert _same_estimate(reused, memguard.estimate(fresh, **zero2)) and extended_note(5) in reused.notes
    whole = memguard.estimate(module, **zero2)
    assert reused.total_bytes == whole.total_bytes != single.total_bytes
    for n, other in enumerate(({"precision": "bf16-true", "optimizer": "sgd"},
                               {"precision": "bf16-mixed", "strategy": "fsdp", "world_size": 2},
                               {"precision": "bf16-true", "batch_size": 1}), start=2):
        got = memguard.estimate(kept, **{**knobs, **other})
        assert len(memo) == 4 * n  # recorded anew
        assert _same_estimate(got, memguard.estimate(fresh, **{**knobs, **other}))


def test_an_optimizer_of_the_users_is_recorded_anew() -> None:
    """A callable optimizer may build another optimizer on another call: never taken from the memo."""
    module, depth, _, _, _ = _case(_llama())
    memo: dict[Any, Any] = {}
    kept = dataclasses.replace(load_model(module), depth=dataclasses.replace(depth, memo=memo), private=True)

    def momentum_sgd(params: Any) -> Any:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    knobs = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": "trace", "optimizer": momentum_sgd}
    first, second = memguard.estimate(kept, **knobs), memguard.estimate(kept, **knobs)
    assert memo == {} and extended_note(5) in first.notes and _same_estimate(first, second)



@pytest.mark.slow
def test_estimate_traces_a_deep_model_it_builds_by_depth() -> None:
    """``memguard.estimate`` of a config (a preset, a config.json) of at least ``DEPTH_PAYS_FROM`` blocks traces
    its 1-4-block steps (adapters and quantized base rebuilt on each), the estimate of its whole trace to the byte;
    a shallower one is traced whole."""
    from memguard.estimation.shallow import DEPTH_PAYS_FROM, finished, where_it_pays

    kwargs = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": "trace", "precision": "bf16-mixed"}
    deep = memguard.estimate(_llama(DEPTH_PAYS_FROM), lora_rank=4, quantization="nf4", **kwargs)
    assert extended_note(DEPTH_PAYS_FROM) in deep.notes
    module = finished(load_model(_llama(DEPTH_PAYS_FROM)), rank=4, quant=Quantization("nf4"))
    whole = memguard.estimate(module, **kwargs)  # a module of the user's: traced whole
    assert not any(n.startswith(EXTENDED) for n in whole.notes)
    fields = ("total_bytes", "breakdown", "band", "timeline", "at_peak")
    assert all(getattr(deep, f) == getattr(whole, f) for f in fields)
    assert where_it_pays(load_model(_llama(DEPTH_PAYS_FROM - 1)), finished) is None
    assert where_it_pays(load_model(_llama(DEPTH_PAYS_FROM)), finished) is not None
