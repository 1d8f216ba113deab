"""Activation bytes of a training step: which blocks save what, summed over the model.

Per transformer block, every tensor autograd saves for the backward pass
(:mod:`memguard.estimation.formula.blocks`), for the blocks that save anything given which
parameters are trainable (:func:`block_activity`), under gradient checkpointing only each block's
input (Korthikanti et al. 2022, section 5); plus the embeddings, what sits between the last block
and the logits, an encoder-decoder's encoder output and the logits themselves.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from memguard.estimation.arch import Architecture, inspect_architecture
from memguard.estimation.formula.adapters import adapter_bytes
from memguard.estimation.formula.blocks import (
    block_bytes,
    checkpoint_bias_bytes,
    checkpoint_input_bytes,
    fused_bias_bytes,
)
from memguard.estimation.formula.context import F32, AttentionKernel, Ctx, decoder_tokens, make_ctx, tokens
from memguard.estimation.formula.embeddings import audio_stem_bytes, embedding_bytes
from memguard.estimation.formula.families import model_type_of, refuse_unmodelled
from memguard.estimation.formula.head import encoder_output_bytes, final_bytes
from memguard.estimation.formula.inventory import Inventory, inventory
from memguard.estimation.formula.norms import norm_bytes
from memguard.estimation.spec import TrainingSpec

if TYPE_CHECKING:
    from memguard.estimation.models import ResolvedModel

__all__ = ["Activations", "Activity", "activation_bytes", "activations", "block_activity", "final_saved_bytes"]


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes of one step, by where they sit.

    Attributes:
        saved: bytes saved for backward and alive at the end of the forward pass.
        top_block: bytes of one (the last) block's full activations.
        bottom_block: bytes the first block holds while its backward runs (its activations, or
            under checkpointing its input and its recomputed activations).
        recompute: bytes of one block's activations re-made during its backward under gradient
            checkpointing (0 without it).
        logits: elements of the logits (batch × tokens × vocab), 0 without an LM head.
        tokens: tokens per sequence of the blocks (the decoder's for an encoder-decoder model).
        enc_tokens: an encoder-decoder's encoder tokens per sequence (else ``tokens``).
        encoder_saved: an encoder-decoder's bytes saved on the encoder side (its embeddings and
            blocks), still alive while backward runs through the encoder (0 for other models).
        embedding: bytes still alive at the end of backward (the embeddings' saved tensors).
        idle: parameter indices of blocks that save nothing (frozen, nothing trainable below).
        output_cache: bytes of the key/value cache held by the model's output alone (not saved
            for backward), alive until the output is dropped.
        final: what the final norm and the output head save (part of ``saved``), freed once
            their backward has run (:func:`final_saved_bytes`).
        final_norm: the final norm's part of ``final``.
    """

    saved: int
    top_block: int
    bottom_block: int
    recompute: int
    logits: int
    tokens: int
    embedding: int
    idle: frozenset[int] = frozenset()
    output_cache: int = 0
    enc_tokens: int = 0
    encoder_saved: int = 0
    final: int = 0
    final_norm: int = 0


@dataclasses.dataclass(frozen=True)
class Activity:
    """Which blocks save activations, from which parameters are trainable.

    A block saves activations when a gradient flows into it from below or it has a trainable
    parameter itself; a frozen block that only passes gradients down keeps less (no linear
    inputs: a frozen weight needs none).

    Attributes:
        embeddings: something before the first block is trainable.
        enc: encoder (or only) blocks with a trainable parameter that save activations.
        enc_frozen: frozen encoder blocks that save activations (a trainable block below).
        dec: decoder blocks with a trainable parameter.
        dec_frozen: frozen decoder blocks that save activations.
        idle: parameter indices of blocks that save nothing (frozen, nothing trainable below).
        adapted: for each block whose only trainable parameters are LoRA adapters (counted as
            frozen, :mod:`memguard.estimation.formula.adapters`), ``(in, r)`` of its ``lora_A``.
    """

    embeddings: bool
    enc: int
    enc_frozen: int
    dec: int
    dec_frozen: int
    idle: frozenset[int]
    adapted: tuple[tuple[tuple[int, int], ...], ...] = ()


def block_activity(inv: Inventory, arch: Architecture, grad: list[bool]) -> Activity:
    """Count the blocks of each kind (see :class:`Activity`); ``grad[i]`` is parameter ``i``'s
    ``requires_grad``. Modules registered before the first block (embeddings and their norm,
    positions, patch projection, class token) are taken to run before it, as in transformers
    models and most plain ones."""
    if not inv.enc_blocks and not inv.dec_blocks:  # blocks not found: all trainable
        return Activity(True, arch.encoder_layers if arch.decoder_layers else arch.layers, 0,
                        arch.decoder_layers, 0, frozenset())
    emb = any(grad[i] for i in inv.pre)
    idle: list[int] = []
    adapted: list[tuple[tuple[int, int], ...]] = []

    def walk(blocks: tuple[tuple[int, ...], ...], upstream: bool) -> tuple[int, int, bool]:
        trained = frozen = 0
        for blk in blocks:
            own = any(grad[i] for i in blk)
            if own and all(i in inv.adapters for i in blk if grad[i]):  # LoRA: a frozen block
                frozen += 1
                adapted.append(tuple(inv.adapters[i] for i in blk if grad[i] and inv.adapters[i][0]))
            elif own:
                trained += 1
            elif upstream:
                frozen += 1
            else:
                idle.extend(blk)
            upstream = upstream or own
        return trained, frozen, upstream

    n_enc, f_enc, enc_grad = walk(inv.enc_blocks, emb)
    n_dec, f_dec, _ = walk(inv.dec_blocks, emb or enc_grad)
    return Activity(emb, n_enc, f_enc, n_dec, f_dec, frozenset(idle), tuple(adapted))


def final_saved_bytes(inv: Inventory, ctx: Ctx, grad: list[bool], seq: int) -> tuple[int, int]:
    """What the final norm and the output head save
    (:func:`~memguard.estimation.formula.head.final_bytes`), and the final norm's part of it.

    Counted as a frozen block's (:attr:`Ctx.frozen`) when neither the head nor a parameter after
    the blocks trains: a LoRA model's frozen norm weight and head keep neither the normalised
    tensor nor the head's input, which only their weights' gradients would read (autograd saves
    ``self`` of ``mul`` and ``mm`` for ``other``'s gradient alone, ``tools/autograd/derivatives.yaml``),
    unless the head is LLM.int8's, which keeps its input (:attr:`Ctx.kept_inputs`; a head left in
    16 bits does not). On a QLoRA Llama (512 x 4 layers, batch 4 x 512, bf16-mixed, checkpointing)
    the trace holds neither: counting them put the formula 6.2 MB (+6.9% of the peak) above it.
    """
    inside = set(inv.pre).union(*inv.enc_blocks, *inv.dec_blocks)
    head = inv.head
    head_trains = head is not None and grad[head]  # a tied head is the embedding's weight
    after = ctx
    if not (head_trains or any(g for i, g in enumerate(grad) if i not in inside)):
        quantized_head = head is not None and inv.float_numel[head] == 0
        after = dataclasses.replace(ctx, frozen=True, kept_inputs=ctx.kept_inputs and quantized_head)
    norm = norm_bytes(after, ctx.b * seq, ctx.arch.hidden) if ctx.fam.final_norm else 0
    return final_bytes(after, seq), norm


def activation_bytes(model: ResolvedModel, spec: TrainingSpec) -> Activations:
    """Activation bytes of a training step of ``model`` (see :class:`Activations`).

    Raises:
        UnsupportedModelError: when the model is not a transformer the formula can read.
        ConfigError: when a token model has no ``seq_len``.
    """
    refuse_unmodelled(model_type_of(model))
    arch = inspect_architecture(model.module, model.config, name=model.name,
                                needs="the formula")
    inv = inventory(model.module, arch)
    return activations(inv, spec, make_ctx(arch, spec), inv.requires_grad())


@dataclasses.dataclass(frozen=True)
class _Layers:
    """Bytes one block of each kind saves: trainable and frozen, encoder (or only) and decoder."""

    enc: int
    enc_frozen: int
    dec: int
    dec_frozen: int


def _layers(ctx: Ctx, seq: int, dec: int, cache: bool) -> _Layers:
    """One block of each kind: the encoder's over ``seq`` tokens, the decoder's over ``dec`` tokens
    attending to the encoder's ``seq``."""
    arch = ctx.arch
    frozen_ctx = dataclasses.replace(ctx, frozen=True)
    enc_cache = cache and arch.decoder_layers == 0  # decoder-only models cache every block
    enc = block_bytes(ctx, seq, cache=enc_cache)
    enc_frozen = block_bytes(frozen_ctx, seq, cache=enc_cache)
    if not arch.decoder_layers:
        return _Layers(enc, enc_frozen, 0, 0)
    return _Layers(enc, enc_frozen, block_bytes(ctx, dec, cache=cache, cross_seq=seq),
                   block_bytes(frozen_ctx, dec, cache=cache, cross_seq=seq))


def _blocks_saved(ctx: Ctx, seq: int, dec: int, act: Activity, one: _Layers,
                  ckpt: bool) -> tuple[int, int]:
    """Bytes every block saves through the forward, and under checkpointing the largest block
    recomputed in backward (0 without); encoder blocks see ``seq`` tokens, decoder blocks ``dec``. A LoRA
    block is a frozen one plus its adapters' :func:`~memguard.estimation.formula.adapters.adapter_bytes`;
    under checkpointing, it keeps its input like any other (the adapters run inside the checkpointed
    forward)."""
    adapters = [adapter_bytes(ctx.b * seq, a, elem=ctx.c, autocast=ctx.autocast, inputs_kept=ctx.kept_inputs)
                for a in act.adapted]
    if ckpt:
        blocks = ((act.enc + act.enc_frozen) * checkpoint_input_bytes(ctx, seq)
                  + (act.dec + act.dec_frozen) * checkpoint_input_bytes(ctx, dec)
                  + checkpoint_bias_bytes(ctx, seq, dec))
        recompute = max(one.enc if act.enc else 0,
                        one.enc_frozen + max(adapters, default=0) if act.enc_frozen else 0,
                        one.dec if act.dec else 0,
                        one.dec_frozen + max(adapters, default=0) if act.dec_frozen else 0)
        return blocks, recompute
    blocks = (act.enc * one.enc + act.enc_frozen * one.enc_frozen + act.dec * one.dec
              + act.dec_frozen * one.dec_frozen + sum(adapters))
    if ctx.kernel is AttentionKernel.FUSED:
        blocks += fused_bias_bytes(ctx, seq, act.dec + act.dec_frozen, dec)
    return blocks, 0


def activations(inv: Inventory, spec: TrainingSpec, ctx: Ctx, grad: list[bool]) -> Activations:
    """Activation bytes of one step (see :class:`Activations`); ``grad[i]`` is parameter ``i``'s
    ``requires_grad``. A block that trains LoRA adapters only is a frozen block plus what its adapters
    save (:func:`~memguard.estimation.formula.adapters.adapter_bytes`).

    Raises:
        ConfigError: when a token model has no ``seq_len``.
    """
    arch = ctx.arch
    seq = tokens(arch, spec)  # the encoder's (or only) tokens
    dec = decoder_tokens(arch, spec)  # the decoder's: the labels' length
    ckpt = bool(spec.gradient_checkpointing)
    cache = arch.use_cache and not ckpt
    act = block_activity(inv, arch, grad)
    one = _layers(ctx, seq, dec, cache)
    emb = enc_emb = 0
    if act.embeddings:
        enc_emb = embedding_bytes(ctx, seq) + audio_stem_bytes(ctx, seq)
        emb = enc_emb + (embedding_bytes(ctx, dec) if arch.decoder_layers else 0)
    blocks, recompute = _blocks_saved(ctx, seq, dec, act, one, ckpt)
    final, final_norm = final_saved_bytes(inv, ctx, grad, dec)
    saved = emb + blocks + final
    if arch.decoder_layers:
        saved += encoder_output_bytes(ctx, seq)
    top = one.dec if act.dec else (one.enc if act.enc else 0)
    bottom = one.enc if act.enc else one.dec if act.dec else 0
    if act.adapted and not (act.enc or act.dec):  # LoRA: frozen blocks with adapters
        lora = adapter_bytes(ctx.b * seq, act.adapted[0], elem=ctx.c, autocast=ctx.autocast,
                             inputs_kept=ctx.kept_inputs)
        top = (one.dec_frozen if act.dec_frozen else one.enc_frozen) + lora
        bottom = (one.enc_frozen if act.enc_frozen else one.dec_frozen) + lora
    if ckpt:
        bottom = recompute + checkpoint_input_bytes(ctx, seq if act.enc else dec)
    lm = arch.head.labels_per_token and arch.vocab
    logits = ctx.b * dec * arch.vocab if lm and arch.vocab else 0
    output_cache = 0
    if cache and ctx.fam.rotary and ctx.autocast and ctx.kernel is not AttentionKernel.MATH:
        # every layer's cached rotary K, fp32 under autocast: the kernel saves its 16-bit cast
        output_cache = arch.layers * ctx.b * dec * arch.kv_heads * arch.head_dim * F32
    return Activations(saved=saved, top_block=top, bottom_block=bottom, recompute=recompute,
                       logits=logits, tokens=dec, embedding=emb, idle=act.idle,
                       output_cache=output_cache, enc_tokens=seq, final=final,
                       final_norm=final_norm,
                       encoder_saved=(enc_emb + act.enc * one.enc + act.enc_frozen * one.enc_frozen
                                      if arch.decoder_layers and not ckpt else 0))

