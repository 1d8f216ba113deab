"""What the normalisation layers save for backward: LayerNorm, Llama's RMSNorm, T5's RMSNorm."""

from __future__ import annotations

from memguard.estimation.formula.context import F32, Ctx

__all__ = ["layer_norm_bytes", "norm_bytes", "rms_norm_bytes"]


def norm_bytes(ctx: Ctx, rows: int, width: int) -> int:
    """What one norm of the family's kind (``ctx.fam.norm``) saves over ``rows × width``."""
    norm = ctx.fam.norm
    if norm == "layernorm":
        return layer_norm_bytes(ctx, rows, width)
    return rms_norm_bytes(ctx, rows, width, keeps_input=norm == "t5-rmsnorm")


def layer_norm_bytes(ctx: Ctx, rows: int, width: int, elem: int | None = None) -> int:
    """``native_layer_norm`` saves its input and two fp32 statistics per row (mean, rstd).

    Korthikanti et al. 2022, section 4.1 ("layer norms: 4·sbh" for two norms in 16 bits).
    """
    return rows * width * (elem or ctx.r) + 2 * rows * F32


def rms_norm_bytes(ctx: Ctx, rows: int, width: int, *, keeps_input: bool = False) -> int:
    """What transformers' RMSNorm (Llama, T5) saves: its input in fp32, ``rsqrt`` per row, and
    the normalised tensor (in fp32, or its 16-bit copy for 16-bit weights).

    ``LlamaRMSNorm.forward``: ``x.to(float32)``, ``pow(2).mean``, ``x * rsqrt(var)``, then
    ``weight * x.to(input_dtype)``; ``T5LayerNorm`` multiplies the un-upcast input, which it
    therefore also keeps (``keeps_input``). A frozen weight (``ctx.frozen``, a LoRA block) needs
    no gradient, so ``weight * x`` saves only the weight (autograd saves ``other`` of ``mul`` for
    ``self``'s gradient alone): the normalised tensor is not kept.
    """
    n = rows * width
    normalised = 0 if ctx.frozen else n * min(ctx.r, F32)
    if ctx.r >= F32:
        return n * F32 + normalised + rows * F32
    extra = n * ctx.r if keeps_input else 0
    return n * F32 + normalised + rows * F32 + extra


def norm_backward_bytes(ctx: Ctx, rows: int, width: int) -> int:
    """The temporaries of one norm's backward at their largest, for Llama's RMSNorm (``ctx.fam.norm``
    ``"rmsnorm"``; 0 for the others, whose backward the block's temporaries cover).

    ``LlamaRMSNorm.forward`` computes ``x * rsqrt(x.pow(2).mean(-1))`` on the fp32 ``x`` in every
    precision. Its backward (``tools/autograd/derivatives.yaml``) runs ``MulBackward`` first, which
    gives ``x`` one fp32 gradient that waits for the other path to be summed; then ``mean``'s
    (``sum_backward(...).div(n)``: one fp32 tensor) and ``pow``'s, ``pow_backward`` in
    ``torch/csrc/autograd/FunctionsManual.cpp``: ``grad * (exponent * self.pow(exponent - 1))``,
    three fp32 tensors alive in one expression. Five fp32 tensors of the norm's input size at once;
    the trace holds exactly that (Llama, bf16-true and bf16-mixed, at the final norm's backward).
    """
    return 5 * rows * width * F32 if ctx.fam.norm == "rmsnorm" else 0
