"""What sits before the first block: the batch and what the embedding layer saves."""

from __future__ import annotations

from typing import Any

from memguard.estimation.arch import Architecture
from memguard.estimation.formula.context import F32, I64, Ctx
from memguard.estimation.formula.norms import layer_norm_bytes
from memguard.estimation.inputs import audio_positions
from memguard.estimation.spec import TrainingSpec

__all__ = ["audio_stem_bytes", "batch_bytes", "embedding_bytes"]


def batch_bytes(arch: Architecture, config: Any, spec: TrainingSpec, b: int, s: int,
                dec: int | None = None) -> int:
    """Bytes of the batch: ``input_ids`` and ``labels`` (int64) or pixels and class labels.

    What :func:`memguard.estimation.inputs.make_batch` builds: token models get ``input_ids`` and,
    with a language-model head, a ``labels`` copy (an encoder-decoder's of the decoder's ``dec``
    tokens); vision models get fp32 (or ``*-true`` dtype) pixels and one int64 label per image.
    ``config`` is the model's transformers config (Whisper's mel bins), or ``None``.
    """
    if audio_positions(config) is not None:  # log-mel features (B, mels, 2 x positions) and labels
        prec = spec.precision
        px = F32 if prec.autocast is not None else prec.param_bytes
        return b * config.num_mel_bins * 2 * s * px + b * (dec or s) * I64
    if arch.image_tokens is not None and arch.pixels is not None:
        prec = spec.precision
        px = F32 if prec.autocast is not None else prec.param_bytes
        return b * arch.pixels * px + b * I64
    label_len = dec if (dec is not None and arch.decoder_layers) else s
    labels = b * label_len * I64 if arch.head.labels_per_token else b * I64
    if arch.head.headless:
        labels = 0
    return b * s * I64 + labels


def embedding_bytes(ctx: Ctx, seq: int) -> int:
    """What the embedding layer saves beyond the first block's input: the embedding dropout mask,
    an embedding LayerNorm's input (BERT, BART), rotary tables, T5's relative position buckets, and
    under autocast a vision model's 16-bit copy of the pixels, which its patch projection saves for
    its weight's gradient (autocast casts a convolution's input: ``conv2d`` is in the
    ``lower_precision_fp`` lists of CUDA and CPU in ``aten/src/ATen/autocast_mode.cpp``).
    """
    a = ctx.arch
    rows = ctx.b * seq
    total = 0
    if a.embedding_dropout > 0:
        total += rows * a.hidden * ctx.mask(ctx.r)
    if ctx.fam.embedding_norm:
        total += layer_norm_bytes(ctx, rows, a.hidden)
    if a.positions == "rotary":
        total += 2 * seq * a.head_dim * F32
    if a.positions == "relative":
        total += seq * seq * I64
    if a.pixels and ctx.autocast:
        total += ctx.b * a.pixels * ctx.c
    return total


def audio_stem_bytes(ctx: Ctx, positions: int) -> int:
    """What Whisper's conv stem saves over ``2 x positions`` log-mel frames
    (``WhisperEncoder.forward``: ``gelu(conv1(x))``, ``gelu(conv2(.))`` with stride 2): the first
    conv's output (GELU's input), the first GELU's output (the second conv's input), the second
    conv's output (the second GELU's input); the features themselves are the batch. 0 for other
    families."""
    if not ctx.fam.conv_stem:
        return 0
    return ctx.b * ctx.arch.hidden * (2 * positions * 2 + positions) * ctx.r
