"""What sits after the last block: the final norm, the output head's input and transform, and an
encoder-decoder's encoder output."""

from __future__ import annotations

from memguard.estimation.formula.context import F32, Ctx
from memguard.estimation.formula.norms import norm_bytes
from memguard.estimation.inputs import Head

__all__ = ["encoder_output_bytes", "final_bytes"]


def final_bytes(ctx: Ctx, seq: int) -> int:
    """What sits between the last block and the logits, as the family lays it out: the final norm
    (its input is the last block's output), T5's dropout and rescaling, the head's input (the
    hidden states, ViT's class token, nothing for a plain torch model whose head is unknown) and
    a masked-LM head's transform (:func:`_mlm_transform_bytes`).
    """
    a, fam = ctx.arch, ctx.fam
    rows = ctx.b * seq
    resid = rows * a.hidden
    total = norm_bytes(ctx, rows, a.hidden) if fam.final_norm else 0
    if fam.final_dropout and a.hidden_dropout > 0:
        total += resid * ctx.mask(ctx.r) + resid * ctx.r
    if fam.tied_head_rescale and a.tied_embeddings and not ctx.autocast:
        total += resid * ctx.r  # the scaled copy of the hidden states
    if fam.head_input == "linear":
        total += ctx.linear_inputs(rows, a.hidden, 1)
    elif fam.head_input == "class-token":
        # the classifier reads the class token of the final LayerNorm's output
        total += ctx.b * a.hidden * ctx.c if ctx.autocast else resid * ctx.r
    if fam.mlm_transform and a.head is Head.MASKED_LM:
        total += _mlm_transform_bytes(ctx, rows)
    return total


def _mlm_transform_bytes(ctx: Ctx, rows: int) -> int:
    """BERT's masked-LM head transform: dense -> GELU -> LayerNorm -> decoder; the dense layer's
    input is the head's input, counted apart. CUDA's autocast runs the LayerNorm in fp32 and it
    saves an fp32 cast of the GELU's output instead (``BertPredictionHeadTransform``)."""
    h = ctx.arch.hidden
    ln_in = F32 if (ctx.autocast and ctx.cuda) else ctx.c
    return rows * h * (ctx.c + ln_in) + 2 * rows * F32 + ctx.linear_inputs(rows, h, 1)


def encoder_output_bytes(ctx: Ctx, enc_seq: int) -> int:
    """The encoder's final hidden states of an encoder-decoder model, saved by every decoder
    block's cross-attention K/V projections (T5 also keeps the final norm and dropout)."""
    a = ctx.arch
    rows = ctx.b * enc_seq
    resid = rows * a.hidden
    total = resid * ctx.r
    if ctx.fam.encoder_final_norm:
        total += norm_bytes(ctx, rows, a.hidden)
        if a.hidden_dropout > 0:
            total += resid * ctx.mask(ctx.r)
    return total
