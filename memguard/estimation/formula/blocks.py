"""What one transformer block saves for backward, laid out by its family, and the temporaries of
its forward and backward passes.

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.1 (``sbh(34 + 5as/h)`` per GPT-style block in 16 bits) and section 5 (full
recomputation keeps each block's input), composed per family from
:mod:`memguard.estimation.families`.
"""

from __future__ import annotations

from memguard.estimation.arch import Architecture
from memguard.estimation.formula.attention import cross_attention_bytes, self_attention_bytes
from memguard.estimation.formula.context import F32, AttentionKernel, Ctx
from memguard.estimation.formula.mlp import fp32_gelu, mlp_bytes, moe_bytes, moe_temporary_bytes
from memguard.estimation.formula.norms import norm_bytes

__all__ = ["block_backward_bytes", "block_bytes", "block_forward_bytes", "checkpoint_bias_bytes",
           "checkpoint_input_bytes", "fused_bias_bytes"]


def block_bytes(ctx: Ctx, seq: int, *, cache: bool, cross_seq: int | None = None) -> int:
    """Bytes one transformer block saves for backward, laid out as its family's (``ctx.fam``).

    A block is two sublayers, each a norm (before it in pre-norm families, after it in post-norm
    ones: the same bytes) and the inputs of the linear layers that read it: self-attention
    (``qkv_readers`` linear inputs, Q/K/V and the kernel's tensors, the output's dropout mask) and
    the MLP (one linear input, or two for a gated MLP of a family whose gate and up projections
    both read it; the MLP's own tensors; the dropout mask). A decoder block (``cross_seq``
    encoder tokens) adds cross-attention with its norm.

    The block's input is counted here (its first norm or projections save it); its output is the
    next block's input.
    """
    a, fam = ctx.arch, ctx.fam
    rows = ctx.b * seq
    h = a.hidden
    drop_mask = rows * h * ctx.mask(ctx.c) if a.hidden_dropout > 0 and fam.residual_dropout else 0
    attn_drop = 0 if a.model_type in fam.no_attention_dropout else drop_mask
    masked = fam.sliding_window and a.sliding_window is not None and a.sliding_window < seq
    attention = (norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, fam.qkv_readers)
                 + self_attention_bytes(ctx, seq, cache=cache and fam.kv_cache, masked=masked)
                 + attn_drop)
    if a.qk_norm:  # the norms keep the projections' outputs and their normalised copies
        attention += norm_bytes(ctx, rows, a.heads * a.head_dim) + norm_bytes(ctx, rows, a.kv_heads * a.head_dim)
    mlp_readers = 2 if fam.gated_readers and a.gated_mlp else 1
    mlp = (norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, mlp_readers)
           + mlp_bytes(ctx, rows, a.ffn, a.gated_mlp, a.activation, a.activation_dropout)
           + drop_mask)
    if a.moe is not None and a.moe.layers:
        mlp = _mean_over_layers(a, mlp, _moe_sublayer(ctx, rows) + drop_mask)
    cross = 0
    if cross_seq is not None:
        cross = (norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 1)
                 + cross_attention_bytes(ctx, seq, cross_seq, cache=cache and fam.cross_kv_cache)
                 + drop_mask)
    return attention + mlp + cross


def _moe_sublayer(ctx: Ctx, rows: int) -> int:
    """A mixture-of-experts sublayer: its norm, the linear layers that read the norm's output (the
    router, and a shared expert's gate and up projections and its sigmoid gate), and
    :func:`memguard.estimation.formula.mlp.moe_bytes`."""
    a, moe = ctx.arch, ctx.arch.moe
    assert moe is not None
    readers = 1 + (2 if moe.shared_ffn else 0) + (1 if moe.shared_gate else 0)
    return (norm_bytes(ctx, rows, a.hidden) + ctx.linear_inputs(rows, a.hidden, readers)
            + moe_bytes(ctx, rows, moe, a.activation, ctx.routing))


def _mean_over_layers(a: Architecture, dense: int, sparse: int) -> int:
    """Bytes of one block's MLP sublayer averaged over the blocks, ``moe.layers`` of which hold the
    mixture (DeepSeek keeps its first blocks dense): the formula counts blocks as alike."""
    assert a.moe is not None
    return (a.moe.layers * sparse + (a.layers - a.moe.layers) * dense) // a.layers


def checkpoint_input_bytes(ctx: Ctx, seq: int) -> int:
    """With gradient checkpointing a block keeps only its input (Korthikanti et al. 2022,
    section 5: full recomputation stores ``2·sbh`` per layer in 16 bits, i.e. one ``sbh``
    tensor)."""
    return ctx.b * seq * ctx.arch.hidden * ctx.r


def checkpoint_bias_bytes(ctx: Ctx, seq: int, dec: int | None = None) -> int:
    """A position bias under checkpointing (T5): the relative position bias (``S × S × heads``,
    fp32) that block 0 computes is an input of every later checkpointed block, so it stays alive,
    once per stack (the decoder's ``dec × dec``), with the decoder's zero cross-attention bias
    (``dec × S``)."""
    a = ctx.arch
    if not ctx.fam.position_bias:
        return 0
    dec = seq if dec is None else dec
    pairs = seq * seq + (dec * dec + dec * seq if a.decoder_layers else 0)
    return a.heads * pairs * F32


def fused_bias_bytes(ctx: Ctx, seq: int, dec_blocks: int, dec: int | None = None) -> int:
    """A position bias with a fused attention kernel (T5): the additive masks made from the
    relative position bias (``1 × heads × S × S``), which the kernel saves for backward: the
    encoder's bias (one for all blocks), the decoder's causal ``torch.where`` of it in every
    block, and the zero cross-attention bias (transformers ``create_position_bias_mask``); the
    encoder's are ``seq × seq``, the decoder's ``dec × dec``, the cross-attention's ``dec × seq``.
    Not checked on a GPU."""
    a = ctx.arch
    if not ctx.fam.position_bias:
        return 0
    dec = seq if dec is None else dec
    pairs = seq * seq + dec_blocks * dec * dec + (dec * seq if a.decoder_layers else 0)
    return a.heads * pairs * ctx.r


def block_forward_bytes(ctx: Ctx, seq: int) -> int:
    """The largest temporary of a block's forward that nothing saves: the raw attention scores
    next to their softmax under the math kernel, else one MLP-width intermediate."""
    a = ctx.arch
    scores = 0
    if ctx.kernel is not AttentionKernel.FUSED:
        scores = ctx.b * a.heads * seq * seq * ctx.math_elem
    mlp = ctx.b * seq * a.ffn * ctx.c
    if a.moe is not None and a.moe.layers:
        mlp = max(mlp if a.moe.layers < a.layers else 0, moe_temporary_bytes(ctx, ctx.b * seq, a.moe, ctx.routing))
    return max(mlp, scores)


def block_backward_bytes(ctx: Ctx, seq: int) -> int:
    """Temporaries while backward runs through a block: the gradient flowing down the residual
    stream and one MLP-width gradient (the block's saved tensors are freed node by node as its
    backward runs, which offsets the rest); with a position bias on a fused kernel (T5), the
    gradient of the bias. An fp32 Python GELU (:func:`memguard.estimation.formula.mlp.fp32_gelu`)
    holds three fp32 MLP-width gradients at once in the backward of its last product (of the
    output, of 0.5·x before its cast, of 1 + tanh), by when the second linear has freed its
    16-bit input. So does CLIP's ``quick_gelu``, ``x * torch.sigmoid(1.702 * x)``
    (``QuickGELUActivation`` in ``transformers/activations.py``), in the matmul dtype: the product's
    backward makes the gradients of ``x`` and of the sigmoid's output, ``sigmoid_backward`` that of
    its input, beside the incoming one. Under autocast the residual's gradient also gets a 16-bit
    copy for the linear output it was added to (the MLP's second linear runs in the autocast dtype,
    the residual stream in fp32): ViT's top block, bf16-mixed on CUDA, holds it in the trace."""
    a = ctx.arch
    rows = ctx.b * seq
    grad_bias = 0
    if ctx.fam.position_bias and ctx.kernel is AttentionKernel.FUSED:
        # the fused kernel's gradient of T5's learned bias, batch-wide before it is summed
        grad_bias = ctx.b * a.heads * seq * seq * ctx.r
    # quantized linear layers that return their input's dtype (Ctx.uncast) run the MLP, and
    # so its gradients, in the residual stream's dtype
    mlp = 3 * F32 - ctx.c if fp32_gelu(ctx, a.activation) else (ctx.r if ctx.uncast else ctx.c)
    if a.activation.lower() == "quick_gelu":
        mlp = 2 * ctx.c  # three gradients at once, by when the second linear has freed its input
    ffn = rows * a.ffn * mlp
    if a.moe is not None and a.moe.layers:
        ffn = max(ffn if a.moe.layers < a.layers else 0, moe_temporary_bytes(ctx, rows, a.moe, ctx.routing))
    # the residual's gradient cast to the 16-bit dtype of the linear output it is added to
    # (``AddBackward`` returns each input's gradient in that input's dtype)
    out = ctx.r if ctx.uncast else ctx.c
    cast = rows * a.hidden * out if ctx.autocast and out < ctx.r else 0
    return rows * a.hidden * ctx.r + cast + ffn + grad_bias
