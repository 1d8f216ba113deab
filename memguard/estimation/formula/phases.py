"""The moments of a training step that can be the peak, and the formula's answer: their maximum.

Parameters and optimizer state (:mod:`memguard.estimation.formula.model_state`) are alive in all
of them, the batch too; the activations (:mod:`memguard.estimation.formula.activations`), the
loss's copies of the logits (:mod:`memguard.estimation.formula.loss`), the gradients and the
temporaries differ from moment to moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

from memguard.estimation.arch import Architecture, inspect_architecture
from memguard.estimation.formula.activations import Activations, activations
from memguard.estimation.formula.blocks import block_backward_bytes, block_forward_bytes
from memguard.estimation.formula.context import F32, AttentionKernel, Ctx, make_ctx, tokens
from memguard.estimation.formula.embeddings import batch_bytes
from memguard.estimation.formula.families import model_type_of, refuse_unmodelled
from memguard.estimation.formula.inventory import Inventory, inventory
from memguard.estimation.formula.loss import (
    loss_backward_bytes,
    loss_forward_bytes,
    loss_saved_bytes,
)
from memguard.estimation.formula.model_state import ModelState, model_state
from memguard.estimation.formula.norms import norm_backward_bytes
from memguard.estimation.parallel import Parallelism, Units
from memguard.estimation.phase import Phase
from memguard.estimation.quantization_kinds import FUSED_MAX_ROWS, QuantizationKind
from memguard.estimation.result import Category
from memguard.estimation.spec import TrainingSpec
from memguard.estimation.step import TrainingLoop, training_loop_of

if TYPE_CHECKING:
    from torch import nn

    from memguard.estimation.description import ModelDescription
    from memguard.estimation.models import ResolvedModel

__all__ = ["PHASE_OF", "formula_breakdown", "output_bytes", "shard_phases", "step_phases"]

Phases = dict[str, dict[Category, int]]
"""Bytes per category at each named moment of the step."""


def formula_breakdown(model: ResolvedModel | ModelDescription, spec: TrainingSpec, *, training_loop: str = "pytorch",
                      parallel: Parallelism | None = None) -> tuple[dict[Category, int], list[str]]:
    """The refined formula: peak live tensor bytes of one steady-state training step.

    The peak is the largest of these moments of the step (parameters and optimizer state are
    alive in all of them; the batch too):

    1. end of forward: saved activations, autocast's 16-bit weight copies, and the loss's copies
       of the logits (or the last block's largest temporary, before the final norm and the head
       have saved anything);
    2. start of backward: the logits dropped, ``log_softmax``'s output and the loss gradients;
       then the final norm's backward, whose temporaries Llama's RMSNorm makes in fp32
       (:func:`~memguard.estimation.formula.norms.norm_backward_bytes`), the head's saved tensors freed;
    3. top block's backward: the head's weight gradient and the block's backward temporaries
       (under checkpointing, the block recomputed with its forward's temporaries); what the final
       norm and the head saved is freed by then;
    4. bottom block's backward: nearly every gradient, the first block's activations;
    5. end of backward: every gradient, a tied embedding's gradient made twice over;
    6. optimizer step: gradients and the step's temporaries.

    Args:
        model: the resolved model (its module may live on the meta device), or a preset's
            :class:`~memguard.estimation.description.ModelDescription`.
        spec: batch size, sequence length, optimizer, precision, checkpointing and device.
        training_loop: ``"pytorch"`` (``zero_grad(set_to_none=True)`` after the step: no
            gradients during forward) or ``"lightning"`` (``zero_grad`` after the next forward:
            last step's gradients live through the forward).
        parallel: a data-parallel strategy: each moment is weighted as the trace weights the
            allocations of its phase (:func:`shard_phases`) before the largest is taken.

    Returns:
        Bytes per category at the peak (no device overhead; under ``parallel``, per device, without
        the buckets :meth:`~memguard.estimation.parallel.Parallelism.extras` adds for strategies
        that do not shard parameters) and notes on what was assumed.

    Raises:
        UnsupportedModelError: when the model is not a transformer this module can read.
        ConfigError: when a token model has no ``seq_len``, or for an unknown ``training_loop``.
    """
    from memguard.estimation.description import ModelDescription

    phases, notes = step_phases(model, spec, training_loop=training_loop)
    if parallel is not None and parallel.sharded:
        units = Units.of_inventory(model.inventory) if isinstance(model, ModelDescription) else model.module
        phases = shard_phases(phases, parallel, units, spec)
    name, peak = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = dict(peak)
    notes.append(f"formula: peak at the {name}")
    return breakdown, notes


def step_phases(model: ResolvedModel | ModelDescription, spec: TrainingSpec, *, training_loop: str = "pytorch",
                ) -> tuple[Phases, list[str]]:
    """Bytes per category at each moment of the step that can be the peak (see
    :func:`formula_breakdown`), and notes; without trainable parameters, only the forward."""
    loop = training_loop_of(training_loop)  # the Step's check, for a caller without a Step
    arch, inv, config, layers = _read(model)
    ctx = _with_quantized_base(make_ctx(arch, spec), layers, spec)
    grad = inv.requires_grad()
    state = model_state(inv, spec, grad)
    notes = list(state.notes)
    acts = activations(inv, spec, ctx, grad)
    batch = batch_bytes(arch, config, spec, ctx.b, acts.enc_tokens or acts.tokens, acts.tokens)
    states = state.held()
    # Lightning zeroes gradients after the forward: last step's are alive through it
    old_grads = state.gradients if loop is TrainingLoop.LIGHTNING else 0
    saved = acts.saved + batch + _autocast_weight_bytes(inv, ctx, acts.idle, grad,
                                                        ckpt=bool(spec.gradient_checkpointing))
    loss_fwd = loss_forward_bytes(ctx, acts.logits)
    dequant_fwd, dequant_bwd = _dequantize_bytes(layers, ctx, acts.tokens)
    block_fwd = max(block_forward_bytes(ctx, n) for n in (acts.tokens, acts.enc_tokens or acts.tokens)) + dequant_fwd
    kept = loss_saved_bytes(ctx, acts.logits) if loss_fwd - block_fwd >= 0 else 0
    # what the final norm and the head save: made after the blocks' forward, freed by their backward
    head_side = acts.final + _head_autocast_bytes(inv, ctx, acts.idle)
    end: dict[Category, int] = {**states, Category.ACTIVATIONS: saved + kept + acts.output_cache,
                                Category.GRADIENTS: old_grads, Category.TEMPORARY: max(loss_fwd - kept, block_fwd)}
    if not kept:  # a block's temporary is the largest: it comes before the final norm and the head run
        in_block = {**end, Category.ACTIVATIONS: saved - head_side + acts.output_cache}
        loss = {**end, Category.TEMPORARY: loss_fwd}
        end = max(in_block, loss, key=lambda m: sum(m.values()))
    phases: Phases = {"end of forward": end}
    if state.gradients > 0:
        elem = spec.precision.param_bytes
        recompute_fwd = (_recompute_bytes(ctx, acts.tokens, block_fwd, four_bit=bool(layers)
                                          and not ctx.kept_inputs)
                         if spec.gradient_checkpointing else 0)
        phases.update(_backward_phases(inv, ctx, acts, grad, state, saved=saved, batch=batch,
                                       elem=elem, dequant=dequant_bwd, head_side=head_side,
                                       recompute_fwd=recompute_fwd))
    notes.extend(_notes(arch, spec, ctx))
    return phases, notes


def _read(model: ResolvedModel | ModelDescription) -> tuple[Architecture, Inventory, Any, list[Any]]:
    """What the formula reads of ``model``: its architecture, its inventory, its transformers config
    (Whisper's mel bins) and its quantized layers; from the module, or from a
    :class:`~memguard.estimation.description.ModelDescription` (a preset's, shipped as data: no torch)."""
    from memguard.estimation.description import ModelDescription

    if isinstance(model, ModelDescription):
        refuse_unmodelled(model.arch.model_type)
        return model.arch, model.inventory, model.config, list(model.quantized)
    module = model.module
    refuse_unmodelled(model_type_of(model))
    arch = inspect_architecture(module, model.config, name=model.name, needs="the formula")
    return arch, inventory(module, arch), getattr(module, "config", None), _quantized_layers(module)


def output_bytes(model: ResolvedModel | ModelDescription, spec: TrainingSpec) -> int:
    """What the model's output holds, which a loop that keeps it (``outputs = model(**batch)``) holds
    through backward and the optimizer step into the next forward: the logits (in the head's dtype;
    fp32 past BART's ``final_logits_bias``), the key/value cache a training forward returns with
    ``use_cache`` and an encoder-decoder's ``encoder_last_hidden_state`` (in the residual dtype: the
    encoder's final norm runs in fp32 under autocast). The cache holds ``torch.cat`` copies of every
    decoder block's K and V (``DynamicLayer.update``, ``transformers/cache_utils.py``), and of the
    encoder's projected K and V for cross-attention (``EncoderDecoderCache``): K is fp32 under autocast
    for rotary families (``apply_rotary_pos_emb`` multiplies the 16-bit K by the fp32 cos and sin),
    else in the projection's dtype. The trace counts the same from the output itself
    (:func:`memguard.estimation.trace.record.output_tensors`).

    Raises:
        UnsupportedModelError: when the model is not a transformer the formula can read.
        ConfigError: when a token model has no ``seq_len``.
    """
    arch, inv, _, _ = _read(model)
    ctx = make_ctx(arch, spec)
    acts = activations(inv, spec, ctx, inv.requires_grad())
    total = acts.logits * (F32 if ctx.fam.fp32_logits_bias else ctx.c)
    if arch.decoder_layers:
        total += ctx.b * acts.enc_tokens * arch.hidden * ctx.r
    if arch.use_cache and not spec.gradient_checkpointing:
        k_elem = F32 if ctx.fam.rotary and ctx.autocast else ctx.c
        rows = acts.tokens + (acts.enc_tokens if arch.decoder_layers else 0)  # cross-attention's K/V too
        total += (arch.decoder_layers or arch.layers) * ctx.b * rows * arch.kv_heads * arch.head_dim * (k_elem + ctx.c)
    return total


PHASE_OF = {"end of forward": Phase.FORWARD, "start of backward": Phase.BACKWARD,
            "final norm's backward": Phase.BACKWARD,
            "top block's backward": Phase.BLOCK_BACKWARD,
            "bottom block's backward": Phase.BLOCK_BACKWARD, "encoder's backward": Phase.BLOCK_BACKWARD,
            "end of backward": Phase.BLOCK_BACKWARD, "optimizer step": Phase.OPTIMIZER}
"""The trace's :class:`~memguard.estimation.trace.Phase` each moment of the formula falls in."""


def shard_phases(phases: Phases, parallel: Parallelism, module: nn.Module | Units, spec: TrainingSpec,
                 ) -> Phases:
    """Each moment as one rank of a sharded strategy holds it, weighted as the trace weights it.

    Every category is scaled by :meth:`Parallelism.weight` of its moment's phase, as
    :func:`memguard.estimation.trace.analyse.analyse` scales each traced allocation: model state by the
    share a rank keeps, and the optimizer step's temporaries by the optimizer state's share,
    because ZeRO steps the rank's own 1/N partition (DeepSpeed ``stage_1_and_2.py``, ``step``:
    ``self.optimizer.step()`` over ``single_partition_of_fp32_groups``; ``stage3.py``,
    ``_optimizer_step`` over ``fp32_partitioned_groups_flat``; torch FSDP's optimizer sees only
    the local ``FlatParameter`` shards). Full sharding then adds what
    :meth:`Parallelism.phase_extras` holds gathered in that phase (the root unit, one or two
    blocks, one block's unsharded gradients), so the peak moment is chosen after sharding, as in
    the trace: under ZeRO-1 the step over a 1/N partition is no longer the peak. ``module`` is the
    model, or its :class:`~memguard.estimation.parallel.Units` (a preset's description).
    """
    elem = spec.precision.param_bytes
    extras = (parallel.phase_extras(module, bytes_per_element=elem, device=spec.device)
              if parallel.fully_sharded else None)
    out: Phases = {}
    for name, cats in phases.items():
        phase = PHASE_OF[name]
        moment = {cat: int(v * parallel.weight(cat, phase)) for cat, v in cats.items()}
        for cat, extra in (extras(phase) if extras is not None else {}).items():
            moment[cat] = moment.get(cat, 0) + extra
        out[name] = moment
    return out


def _backward_phases(inv: Inventory, ctx: Ctx, acts: Activations, grad: list[bool],
                     state: ModelState, *, saved: int, batch: int, elem: int, dequant: int = 0,
                     head_side: int = 0, recompute_fwd: int = 0) -> Phases:
    """The moments of backward and of the optimizer step (``elem``: bytes per parameter element;
    ``saved``: the forward's activations with the batch and autocast's weight copies; ``dequant``:
    a quantized layer's dequantized weight, made again in its backward; ``head_side``: what the
    final norm and the output head saved, their autocast weight copy included; ``recompute_fwd``:
    under checkpointing, the temporaries as the top block's forward runs again, see
    :func:`_recompute_bytes`).

    By the top block's backward the head's and the final norm's nodes have run, and autograd frees
    a node's saved tensors once it has run (``torch/csrc/autograd/engine.cpp``, ``call_function``:
    ``fn.release_variables()`` unless the graph is retained): their ``head_side`` bytes are gone."""
    states = state.held()
    grads = state.gradients
    lsm = loss_saved_bytes(ctx, acts.logits)  # log_softmax output, saved by the forward
    head_grad = _head_grad_bytes(inv, grad, elem)
    block_bwd = max(block_backward_bytes(ctx, n) for n in (acts.tokens, acts.enc_tokens or acts.tokens)) + dequant
    pre_grads = sum(inv.size(i, elem) for i in inv.pre if grad[i])
    phases: Phases = {}
    if acts.encoder_saved:
        phases["encoder's backward"] = _encoder_backward(inv, ctx, acts, grad, states, batch=batch,
                                                         elem=elem, head_grad=head_grad, block_bwd=block_bwd)
    norm_bwd = norm_backward_bytes(ctx, ctx.b * acts.tokens, ctx.arch.hidden) if acts.final_norm else 0
    if norm_bwd:
        phases["final norm's backward"] = {**states, Category.ACTIVATIONS: saved - head_side + acts.final_norm,
                                           Category.GRADIENTS: head_grad, Category.TEMPORARY: norm_bwd}
    return phases | {
        "start of backward": {**states, Category.ACTIVATIONS: saved + lsm,
                              Category.TEMPORARY: loss_backward_bytes(ctx, acts.logits) - lsm},
        "top block's backward": {**states, Category.ACTIVATIONS: saved - head_side + acts.recompute,
                                 Category.GRADIENTS: head_grad, Category.TEMPORARY: max(block_bwd, recompute_fwd)},
        "bottom block's backward": {
            **states, Category.ACTIVATIONS: batch + acts.embedding + acts.bottom_block,
            Category.GRADIENTS: grads - pre_grads, Category.TEMPORARY: block_bwd},
        "end of backward": {
            **states, Category.ACTIVATIONS: batch + acts.embedding, Category.GRADIENTS: grads,
            Category.TEMPORARY: _embedding_backward_bytes(ctx.arch, head_grad)},
        "optimizer step": {**states, Category.ACTIVATIONS: batch, Category.GRADIENTS: grads,
                           Category.TEMPORARY: state.optimizer_step},
    }


_QUANTIZED: weakref.WeakKeyDictionary[Any, tuple[int, list[Any]]] = weakref.WeakKeyDictionary()
"""module -> (structure generation, its quantized layers)."""


def _quantized_layers(module: Any) -> list[Any]:
    """The module's quantized layers, read once per structure."""
    from memguard.estimation.arch import structure_generation
    from memguard.estimation.quantization import quantized_layers

    generation = structure_generation()
    try:
        cached = _QUANTIZED.get(module)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == generation:
        return cached[1]
    found = (generation, quantized_layers(module))
    with contextlib.suppress(TypeError):
        _QUANTIZED[module] = found
    return found[1]


def _with_quantized_base(ctx: Ctx, layers: list[Any], spec: TrainingSpec) -> Ctx:
    """``ctx`` with :attr:`~memguard.estimation.formula.context.Ctx.kept_inputs` set when the base's
    linear layers are LLM.int8's, whose ``MatMul8bitLt`` keeps its input under a frozen weight, and
    :attr:`~memguard.estimation.formula.context.Ctx.uncast` when they return their input's dtype
    (int8; 4-bit on the fused kernel's rows, :data:`~memguard.estimation.quantization.FUSED_MAX_ROWS`)."""
    if not layers:
        return ctx
    int8 = any(m.quantization.kind is QuantizationKind.INT8 for m in layers)
    fused = ctx.b * tokens(ctx.arch, spec) <= FUSED_MAX_ROWS
    return dataclasses.replace(ctx, kept_inputs=int8, uncast=int8 or fused)


def _dequantize_bytes(layers: list[Any], ctx: Ctx, tokens: int) -> tuple[int, int]:
    """A quantized base's largest dequantized weight (of its quantized ``layers``), in forward and in backward.

    bitsandbytes' ``gemm_4bit`` dequantizes the weight into the input's dtype (the parameters' dtype:
    transformers' norms return it) only above :data:`~memguard.estimation.quantization.FUSED_MAX_ROWS`
    rows of input; ``MatMul4Bit.backward`` always does, into the gradient's dtype (the matmul's
    output dtype). See :mod:`memguard.estimation.quantization`.
    """
    if not layers:
        return 0, 0
    from memguard.estimation.quantization_kinds import dequantize_temporary

    if any(m.quantization.kind is QuantizationKind.INT8 for m in layers):
        # MatMul8bitLt's forward dequantizes no weight: it casts its input to fp16 and quantizes it
        # row-wise (int8, one fp32 scale a row); its backward makes a copy of the weight
        # in the input's dtype (CB.to(dtype_A)), fp32 under mixed precision (Ctx.uncast)
        rows = ctx.b * tokens
        forward = max(rows * m.in_features * (2 + 1) + rows * 4 for m in layers)
        return forward, dequantize_temporary(layers, ctx.r)
    fused = ctx.b * tokens <= FUSED_MAX_ROWS
    # past the fused kernel's rows, F.linear over the weight dequantized into the parameters' dtype;
    # under autocast that linear casts the fp32 weight to 16 bits as well (both alive at once)
    elem = ctx.r + (ctx.c if ctx.autocast and ctx.c < ctx.r else 0)
    forward = 0 if fused else dequantize_temporary(layers, elem)
    # MatMul4Bit.backward: F.dequantize_4bit(B, ctx.state).to(grad_output.dtype), the output's
    # dtype: the input's where the fused kernel returned it (Ctx.uncast), else autocast's
    return forward, dequantize_temporary(layers, ctx.r if ctx.uncast else ctx.c)


def _encoder_backward(inv: Inventory, ctx: Ctx, acts: Activations, grad: list[bool],
                      states: dict[Category, int], *, batch: int, elem: int, head_grad: int,
                      block_bwd: int) -> dict[Category, int]:
    """An encoder-decoder as backward enters the encoder's top block: the decoder is done (its
    blocks' gradients made, its activations freed), the encoder's activations are all alive. A
    tied embedding (T5, BART share one table among encoder, decoder and head) has no ``.grad`` yet:
    the head's contribution, the decoder embedding's dense gradient and their sum wait for the
    encoder embedding's (autograd accumulates into a fresh tensor, ``accumulate_grad.h``). Whisper
    ties its head to the decoder's table only: the three are alive as the decoder embedding's
    backward runs, beside the encoder's activations."""
    dec_grads = sum(inv.size(i, elem) for blk in inv.dec_blocks for i in blk if grad[i])
    tied = ctx.arch.tied_embeddings
    return {**states, Category.ACTIVATIONS: batch + acts.encoder_saved,
            Category.GRADIENTS: dec_grads + (0 if tied else head_grad),
            Category.TEMPORARY: (3 * head_grad if tied else 0) + block_bwd}


def _autocast_weight_bytes(inv: Inventory, ctx: Ctx, idle: frozenset[int], grad: list[bool], *,
                           ckpt: bool = False) -> int:
    """16-bit copies of the matmul weights that autocast makes in the forward pass.

    ``torch.autocast`` casts each ``F.linear``/``matmul`` weight to 16 bits once per forward
    (the cast of a leaf that requires grad is cached) and the matmul saves the copy for backward,
    so mixed precision holds a 16-bit copy of every weight matrix until backward reaches it.
    Embedding tables are not cast (``embedding`` is not an autocast op), except a tied output
    head, which is a linear layer. Frozen weights of ``idle`` blocks are cast but not kept.

    Autocast caches only the casts of leaves that require grad (``cached_cast`` in
    ``aten/src/ATen/autocast_mode.cpp``: ``arg.requires_grad() && arg.is_leaf()``); a frozen
    weight's copy (LoRA's base model) lives only while a matmul saves it for the input's gradient.
    Under gradient checkpointing nothing in a block's forward is saved, so of the blocks' weights
    only the cached copies of trainable ones are held (a frozen head outside the blocks still saves
    its copy).
    """
    if not ctx.autocast:
        return 0
    unused = sum(inv.numel[i] for i in idle if inv.matmul[i])
    if ckpt:
        blocks = {i for blk in (*inv.enc_blocks, *inv.dec_blocks) for i in blk} - idle
        unused += sum(inv.numel[i] for i in blocks if inv.matmul[i] and not grad[i])
    return (inv.matmul_numel - unused) * ctx.c


def _recompute_bytes(ctx: Ctx, seq: int, block_fwd: int, *, four_bit: bool) -> int:
    """Temporaries while a checkpointed block's forward runs again in backward: the forward's own
    (``block_fwd``: an MLP-width intermediate and a quantized weight's dequantization) beside the
    gradients made before the recomputation started.

    Non-reentrant checkpointing recomputes when backward first unpacks a tensor the block saved
    (``torch/utils/checkpoint.py``, ``_checkpoint_hook``'s ``unpack_hook``). That is the MLP's
    output projection, which saves its input or weight, so only the gradient of the block's output
    is alive; but bitsandbytes' ``MatMul4Bit`` keeps its weight on ``ctx.tensors`` rather than
    through ``save_for_backward`` (``bitsandbytes/autograd/_functions.py``), so its backward runs
    before the recomputation and its MLP-width input gradient (in the MLP's dtype,
    :attr:`Ctx.mlp_elem` of a frozen block) is alive too.
    """
    rows = ctx.b * seq
    grads = rows * ctx.arch.hidden * ctx.r
    if four_bit:
        grads += rows * ctx.arch.ffn * (ctx.r if ctx.uncast else ctx.c)
    return grads + block_fwd


def _head_autocast_bytes(inv: Inventory, ctx: Ctx, idle: frozenset[int]) -> int:
    """The output head's 16-bit weight copy under autocast (a part of
    :func:`_autocast_weight_bytes`), which the head's matmul saves for its input's gradient."""
    head = inv.head
    if not ctx.autocast or head is None or not inv.matmul[head] or head in idle:
        return 0
    return inv.numel[head] * ctx.c


def _head_grad_bytes(inv: Inventory, grad: list[bool], elem: int) -> int:
    """Gradient of the output head's weight, made first in backward (``V × h``)."""
    if inv.head is None or not grad[inv.head]:
        return 0
    return inv.size(inv.head, elem)


def _embedding_backward_bytes(arch: Architecture, head_grad: int) -> int:
    """Extra bytes at the end of backward for a tied, trainable embedding: ``embedding_backward``
    makes a dense ``V × h`` gradient that is added to the head's out of place, so three tables
    are alive for a moment."""
    return 2 * head_grad if arch.tied_embeddings else 0


def _notes(arch: Architecture, spec: TrainingSpec, ctx: Ctx) -> list[str]:
    """What the estimate assumed: the family's note, the CPU's math attention kernel, a
    key/value cache returned by the forward."""
    notes: list[str] = []
    if ctx.fam.note:
        notes.append(ctx.fam.note)
    if ctx.kernel is AttentionKernel.MATH:
        notes.append("attention dropout on the CPU: SDPA falls back to the math kernel, which "
                     "keeps the S×S attention matrices")
    if arch.use_cache and not spec.gradient_checkpointing:
        notes.append("the config has use_cache=True: the key/value cache returned by the forward "
                     "is counted until the output is dropped")
    return notes
