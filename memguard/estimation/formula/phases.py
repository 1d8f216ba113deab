"""The moments of a training step that can be the peak, and the formula's answer: their maximum.

Parameters and optimizer state (:mod:`memguard.estimation.formula.model_state`) are alive in all
of them, the batch too; the activations (:mod:`memguard.estimation.formula.activations`), the
loss's copies of the logits (:mod:`memguard.estimation.formula.loss`), the gradients and the
temporaries differ from moment to moment.
"""

from __future__ import annotations

from memguard.errors import ConfigError
from memguard.estimation.arch import Architecture, inspect_architecture
from memguard.estimation.formula.activations import Activations, activations
from memguard.estimation.formula.blocks import block_backward_bytes, block_forward_bytes
from memguard.estimation.formula.context import Ctx, make_ctx
from memguard.estimation.formula.embeddings import batch_bytes
from memguard.estimation.formula.inventory import Inventory, inventory
from memguard.estimation.formula.loss import (
    loss_backward_bytes,
    loss_forward_bytes,
    loss_saved_bytes,
)
from memguard.estimation.formula.model_state import ModelState, model_state
from memguard.estimation.models import ResolvedModel
from memguard.estimation.result import Category
from memguard.estimation.spec import TrainingSpec

__all__ = ["TRAINING_LOOPS", "formula_breakdown", "step_phases"]

TRAINING_LOOPS = ("pytorch", "lightning")
"""When gradients are zeroed: after the step (``pytorch``) or after the next forward."""

Phases = dict[str, dict[Category, int]]
"""Bytes per category at each named moment of the step."""


def formula_breakdown(model: ResolvedModel, spec: TrainingSpec, *,
                      training_loop: str = "pytorch") -> tuple[dict[Category, int], list[str]]:
    """The refined formula: peak live tensor bytes of one steady-state training step.

    The peak is the largest of these moments of the step (parameters and optimizer state are
    alive in all of them; the batch too):

    1. end of forward: saved activations, autocast's 16-bit weight copies, and the loss's copies
       of the logits (or the last block's largest temporary);
    2. start of backward: the logits dropped, ``log_softmax``'s output and the loss gradients;
    3. top block's backward: the head's weight gradient and the block's backward temporaries
       (under checkpointing, the block recomputed);
    4. bottom block's backward: nearly every gradient, the first block's activations;
    5. end of backward: every gradient, a tied embedding's gradient made twice over;
    6. optimizer step: gradients and the step's temporaries.

    Args:
        model: the resolved model (its module may live on the meta device).
        spec: batch size, sequence length, optimizer, precision, checkpointing and device.
        training_loop: ``"pytorch"`` (``zero_grad(set_to_none=True)`` after the step: no
            gradients during forward) or ``"lightning"`` (``zero_grad`` after the next forward:
            last step's gradients live through the forward).

    Returns:
        Bytes per category at the peak (no device overhead) and notes on what was assumed.

    Raises:
        UnsupportedModelError: when the model is not a transformer this module can read.
        ConfigError: when a token model has no ``seq_len``, or for an unknown ``training_loop``.
    """
    phases, notes = step_phases(model, spec, training_loop=training_loop)
    name, peak = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = dict(peak)
    notes.append(f"formula: peak at the {name}")
    return breakdown, notes


def step_phases(model: ResolvedModel, spec: TrainingSpec, *, training_loop: str = "pytorch",
                ) -> tuple[Phases, list[str]]:
    """Bytes per category at each moment of the step that can be the peak (see
    :func:`formula_breakdown`), and notes; without trainable parameters, only the forward."""
    if training_loop not in TRAINING_LOOPS:
        raise ConfigError(f"unknown training_loop {training_loop!r}; expected 'pytorch' or "
                          "'lightning'")
    module = model.module
    arch = inspect_architecture(module, model.config, name=model.name, needs="the formula")
    ctx = make_ctx(arch, spec)
    inv = inventory(module, arch)
    grad = inv.requires_grad()
    state = model_state(inv, spec, grad)
    notes = list(state.notes)
    acts = activations(inv, spec, ctx, grad)
    batch = batch_bytes(arch, module, spec, ctx.b, acts.enc_tokens or acts.tokens, acts.tokens)
    states = state.held()
    # Lightning zeroes gradients after the forward: last step's are alive through it
    old_grads = state.gradients if training_loop == "lightning" else 0
    saved = acts.saved + batch + _autocast_weight_bytes(inv, ctx, acts.idle)
    loss_fwd = loss_forward_bytes(ctx, acts.logits)
    block_fwd = max(block_forward_bytes(ctx, n) for n in (acts.tokens, acts.enc_tokens or acts.tokens))
    kept = loss_saved_bytes(ctx, acts.logits) if loss_fwd - block_fwd >= 0 else 0
    phases: Phases = {
        "end of forward": {**states, Category.ACTIVATIONS: saved + kept + acts.output_cache,
                           Category.GRADIENTS: old_grads,
                           Category.TEMPORARY: max(loss_fwd - kept, block_fwd)},
    }
    if state.gradients > 0:
        elem = spec.precision.param_dtype.itemsize
        phases.update(_backward_phases(inv, ctx, acts, grad, state, saved=saved, batch=batch,
                                       elem=elem))
    notes.extend(_notes(arch, spec, ctx))
    return phases, notes


def _backward_phases(inv: Inventory, ctx: Ctx, acts: Activations, grad: list[bool],
                     state: ModelState, *, saved: int, batch: int, elem: int) -> Phases:
    """The moments of backward and of the optimizer step (``elem``: bytes per parameter element;
    ``saved``: the forward's activations with the batch and autocast's weight copies)."""
    states = state.held()
    grads = state.gradients
    lsm = loss_saved_bytes(ctx, acts.logits)  # log_softmax output, saved by the forward
    head_grad = _head_grad_bytes(inv, grad, elem)
    block_bwd = max(block_backward_bytes(ctx, n) for n in (acts.tokens, acts.enc_tokens or acts.tokens))
    pre_grads = sum(inv.size(i, elem) for i in inv.pre if grad[i])
    phases: Phases = {}
    if acts.encoder_saved:
        phases["encoder's backward"] = _encoder_backward(inv, ctx, acts, grad, states, batch=batch,
                                                         elem=elem, head_grad=head_grad, block_bwd=block_bwd)
    return phases | {
        "start of backward": {**states, Category.ACTIVATIONS: saved + lsm,
                              Category.TEMPORARY: loss_backward_bytes(ctx, acts.logits) - lsm},
        "top block's backward": {**states, Category.ACTIVATIONS: saved + acts.recompute,
                                 Category.GRADIENTS: head_grad, Category.TEMPORARY: block_bwd},
        "bottom block's backward": {
            **states, Category.ACTIVATIONS: batch + acts.embedding + acts.bottom_block,
            Category.GRADIENTS: grads - pre_grads, Category.TEMPORARY: block_bwd},
        "end of backward": {
            **states, Category.ACTIVATIONS: batch + acts.embedding, Category.GRADIENTS: grads,
            Category.TEMPORARY: _embedding_backward_bytes(ctx.arch, head_grad)},
        "optimizer step": {**states, Category.ACTIVATIONS: batch, Category.GRADIENTS: grads,
                           Category.TEMPORARY: state.optimizer_step},
    }


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


def _autocast_weight_bytes(inv: Inventory, ctx: Ctx, idle: frozenset[int]) -> int:
    """16-bit copies of the matmul weights that autocast makes in the forward pass.

    ``torch.autocast`` casts each ``F.linear``/``matmul`` weight to 16 bits once per forward
    (the cast of a leaf that requires grad is cached) and the matmul saves the copy for backward,
    so mixed precision holds a 16-bit copy of every weight matrix until backward reaches it.
    Embedding tables are not cast (``embedding`` is not an autocast op), except a tied output
    head, which is a linear layer. Frozen weights of ``idle`` blocks are cast but not kept.
    """
    if not ctx.autocast:
        return 0
    unused = sum(inv.numel[i] for i in idle if inv.matmul[i])
    return (inv.matmul_numel - unused) * ctx.c


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
    if ctx.kernel == "math":
        notes.append("attention dropout on the CPU: SDPA falls back to the math kernel, which "
                     "keeps the S×S attention matrices")
    if arch.use_cache and not spec.gradient_checkpointing:
        notes.append("the config has use_cache=True: the key/value cache returned by the forward "
                     "is counted until the output is dropped")
    return notes
