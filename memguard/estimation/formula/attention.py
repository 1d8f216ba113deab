"""What attention saves for backward: Q, K and V as the kernel keeps them, and the kernel's own
tensors, for self-attention (transformers' or torch's packed ``nn.MultiheadAttention``) and
cross-attention.

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.1 (attention: ``11·sbh + 5·as²b`` in 16 bits), read for the kernel that will run
(:func:`memguard.estimation.formula.context.attention_kernel`) and CUDA's autocast rules
(:mod:`memguard.estimation.cuda_rules`).
"""

from __future__ import annotations

from memguard.estimation.formula.context import F32, AttentionKernel, Ctx

__all__ = ["attention_core_bytes", "cross_attention_bytes", "self_attention_bytes"]


def attention_core_bytes(ctx: Ctx, q_rows: int, kv_len: int, q_len: int, *, masked: bool,
                         dropout: float) -> int:
    """Bytes the attention kernel itself saves, beyond the Q/K/V tensors handed to it.

    * fused (flash / memory-efficient): the output and a log-sum-exp (fp32) per query row and
      head (Korthikanti et al. 2022: no 5·a·s²·b term);
    * math: the scaled Q and K copies, the softmax, with dropout the noise and the dropped
      probabilities (the S×S terms of Korthikanti et al.'s 11·sbh + 5·as²b), the output; the CPU
      kernel computes in fp32;
    * eager (transformers ``eager_attention_forward``): :func:`_eager_bytes`.

    Args:
        ctx: the estimate's context.
        q_rows: ``batch * q_len``.
        kv_len: keys per query.
        q_len: queries per sequence.
        masked: an explicit mask is passed (sliding window): the kernel keeps a float copy.
        dropout: attention dropout probability.
    """
    a = ctx.arch
    nq = a.heads * a.head_dim
    scores = ctx.b * a.heads * q_len * kv_len
    out = q_rows * nq * ctx.c  # fused kernels save their output; else the out-projection does
    lse = q_rows * a.heads * F32
    mask = ctx.b * q_len * kv_len * (F32 if not ctx.cuda else ctx.c) if masked else 0
    if ctx.kernel is AttentionKernel.FUSED:
        return out + lse + mask
    if ctx.frozen:
        out = 0
    if ctx.kernel is AttentionKernel.EAGER:
        return _eager_bytes(ctx, scores, dropout) + out
    e = ctx.math_elem
    kv_rows = q_rows // q_len * kv_len
    total = q_rows * nq * e + kv_rows * nq * e + scores * e + out
    if ctx.c < e:  # the upcast V copy
        total += kv_rows * nq * e
    if dropout > 0:
        total += scores * e + scores * ctx.mask(e)
    return total


def _eager_bytes(ctx: Ctx, scores: int, dropout: float) -> int:
    """What transformers' ``eager_attention_forward`` saves over ``scores`` elements: the softmax,
    the dropout mask and the 16-bit probabilities the second matmul saves.

    The softmax is fp32 for families that ask for it (Llama, ViT: ``dtype=torch.float32``) and
    under CUDA's autocast (``softmax`` is on its fp32 list); then one 16-bit copy is saved whether
    dropout runs on it (Llama, ViT) or before it (BERT: the dropped fp32 copy is cast and freed):
    on CUDA in bf16, 4 + 1 + 2 = 7 bytes per score with dropout.
    """
    fp32_softmax = ctx.fam.eager_fp32_softmax or (ctx.autocast and ctx.cuda)
    e = F32 if fp32_softmax else ctx.c
    total = scores * e
    if e != ctx.c or dropout > 0:
        # the 16-bit probabilities the second matmul saves: the dropout's output, or a cast of
        # the fp32 softmax (or of its dropped copy, which nothing else keeps)
        total += scores * ctx.c
    if dropout > 0:
        total += scores * ctx.mask(ctx.c)
    return total


def _qkv_bytes(ctx: Ctx, q_rows: int, kv_rows: int, *, cache: bool, masked: bool) -> int:
    """Bytes of Q, K, V as the attention keeps them (projection outputs, rotary outputs, the
    key/value cache of a decoder run with ``use_cache``, 16-bit casts under autocast).

    transformers models return a ``DynamicCache`` from a training forward when the config says
    ``use_cache=True``; ``DynamicLayer.update`` concatenates K and V into new tensors that live
    as long as the output. Grouped-query models with an explicit mask repeat K/V to all heads
    (``repeat_kv``); without one, SDPA takes ``enable_gqa``, and on CUDA in fp32 the
    memory-efficient kernel gets them repeated (:mod:`memguard.estimation.cuda_rules`).
    """
    a, fam = ctx.arch, ctx.fam
    nq, nkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    q, k = q_rows * nq, kv_rows * nkv
    if ctx.kernel is AttentionKernel.MATH:
        # the math kernel keeps its own scaled copies (counted in the core); V and any cache here
        if cache:
            return 2 * k * ctx.c
        if ctx.math_elem != ctx.c:
            return 0
        # V is a view of a fused QKV output, which stays alive; else the V projection output
        return 3 * q * ctx.c if fam.fused_qkv else k * ctx.c
    # fused kernels and eager attention's matmuls keep Q, K and V as they are handed over
    if fam.rotary:
        # under autocast: casts of Q and K, and V (the projection output or the cache's copy of
        # it); the cache's own fp32 rotary K is held by the output only (output_cache)
        total = (q + 2 * k) * ctx.c if ctx.autocast else q * ctx.r + 2 * k * ctx.r
    elif fam.fused_qkv:
        total = 3 * q * ctx.c + (2 * k * ctx.c if cache else 0)
    else:
        total = q * ctx.c + 2 * k * ctx.c + (2 * k * ctx.c if cache else 0)
    # fp32 on CUDA takes memory-efficient attention, which gets K/V repeated to every query head
    # (memguard.estimation.cuda_rules; the op's meta kernels take equal head counts)
    efficient = ctx.cuda and ctx.c == F32 and ctx.kernel is AttentionKernel.FUSED
    if a.kv_heads != a.heads and (masked or ctx.kernel is AttentionKernel.EAGER or efficient):
        total += 2 * q_rows * nq * ctx.c
    return total


def self_attention_bytes(ctx: Ctx, seq: int, *, cache: bool, masked: bool) -> int:
    """Q/K/V plus the kernel's own saved tensors for self-attention over ``seq`` tokens, laid out
    as the family projects them (:func:`_packed_bytes` for torch's ``nn.MultiheadAttention``).
    The linear layers' inputs are the block's (``Family.qkv_readers``)."""
    rows = ctx.b * seq
    dropout = ctx.arch.attention_dropout
    core = attention_core_bytes(ctx, rows, seq, seq, masked=masked, dropout=dropout)
    if ctx.fam.packed_attention:
        return _packed_bytes(ctx, rows) + core
    return _qkv_bytes(ctx, rows, rows, cache=cache, masked=masked) + core


def _packed_bytes(ctx: Ctx, rows: int) -> int:
    """Q, K and V of ``torch.nn.MultiheadAttention``: it copies its (batch-first, transposed)
    input for the packed in-projection and makes Q, K, V one contiguous ``(3, S, B, h)`` tensor,
    which stays alive through the views the kernel keeps (unless the CPU's math kernel upcasts
    them to fp32 copies, counted in the core). On CUDA in fp32, memory-efficient attention
    returns a ``(B, S, H, D)``-ordered output, which MHA copies for its out-projection to save
    (``torch/nn/functional.py``, ``multi_head_attention_forward``)."""
    resid = rows * ctx.arch.hidden
    upcast = ctx.kernel is AttentionKernel.MATH and ctx.c < ctx.math_elem
    copy = resid * ctx.c if ctx.cuda and ctx.c == F32 and ctx.kernel is AttentionKernel.FUSED else 0
    return (0 if upcast else 3 * resid * ctx.c) + copy


def cross_attention_bytes(ctx: Ctx, seq: int, enc_seq: int, *, cache: bool) -> int:
    """Cross-attention of ``seq`` decoder tokens over ``enc_seq`` encoder tokens: Q, the
    projections of the encoder output to K and V (and their cached copies), the kernel's own
    tensors. Under autocast each decoder block also casts the encoder output for its K and V
    projections."""
    a = ctx.arch
    q_rows, kv_rows = ctx.b * seq, ctx.b * enc_seq
    nq = a.heads * a.head_dim
    qkv = q_rows * nq * ctx.c + 2 * kv_rows * nq * ctx.c + (2 * kv_rows * nq * ctx.c
                                                            if cache else 0)
    if ctx.kernel is not AttentionKernel.FUSED:
        qkv = (2 * kv_rows * nq * ctx.c) if cache else kv_rows * nq * ctx.c
    casts = 2 * kv_rows * a.hidden * ctx.c if ctx.autocast else 0
    core = attention_core_bytes(ctx, q_rows, enc_seq, seq, masked=False,
                                dropout=a.attention_dropout)
    return qkv + casts + core
