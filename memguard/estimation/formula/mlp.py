"""What a block's MLP saves for backward, by activation function."""

from __future__ import annotations

from memguard.estimation.formula.context import F32, Ctx

__all__ = ["fp32_gelu", "mlp_bytes"]

_POW_GELUS = ("gelu_new", "gelu_python_tanh")
"""transformers' Python tanh-GELUs that call ``torch.pow`` (``transformers/activations.py``)."""


def _act_tensors(activation: str) -> tuple[int, bool]:
    """MLP-width tensors an activation saves, and whether its output is one of them.

    The C kernels (``F.gelu``, ``F.silu``, tanh-GELU) save their input; ``relu`` saves its
    output; transformers' Python ``gelu_new`` (``0.5*x*(1+tanh(...))``) saves x, 0.5·x, the tanh
    and 1+tanh (``transformers/activations.py``, ``NewGELUActivation``).
    """
    act = activation.lower()
    if act in ("relu", "relu6"):
        return 1, True
    if act in _POW_GELUS:
        return 4, False
    if act == "gelu_fast":
        return 6, False
    if act == "quick_gelu":
        return 2, False
    return 1, False


def fp32_gelu(ctx: Ctx, activation: str) -> bool:
    """Whether the activation runs in fp32: CUDA's autocast runs ``pow`` in fp32
    (``AT_FORALL_FP32`` in ``ATen/autocast_mode.h``), which promotes the rest of a Python GELU."""
    return ctx.autocast and ctx.cuda and activation.lower() in _POW_GELUS


def mlp_bytes(ctx: Ctx, rows: int, ffn: int, gated: bool, activation: str,
              act_dropout: float) -> int:
    """Bytes the MLP saves between its two linear layers.

    Korthikanti et al. 2022, section 4.1 (MLP: the first linear's output, the activation's
    output, the dropout mask), with the activation's own saved tensors (:func:`_act_tensors`).
    A gated MLP (``act(x W_g) * x W_u``) adds the up projection and the product. A Python GELU
    under CUDA's autocast (:func:`fp32_gelu`) saves the fp32 cast of its input (for ``pow``),
    the fp32 tanh and 1 + tanh and the 16-bit 0.5·x; its fp32 output is cast again by the second
    linear.
    """
    unit = rows * ffn * ctx.c
    own, output_saved = _act_tensors(activation)
    own_bytes = rows * ffn * (3 * F32 + ctx.c) if fp32_gelu(ctx, activation) else own * unit
    extra = rows * ffn * ctx.mask(ctx.c) if act_dropout > 0 else 0
    second = 0 if ctx.frozen else 1  # the second linear's input, unless its weight is frozen
    if gated:
        # act's output (saved by the product unless act saves it), the up projection, and the
        # product (or, with dropout after it, the dropped product) saved by the down projection
        return own_bytes + ((0 if output_saved else 1) + 1 + second) * unit + extra
    if act_dropout > 0:
        return own_bytes + second * unit + extra  # the dropped tensor, saved by the second linear
    return own_bytes + (0 if output_saved else second) * unit
