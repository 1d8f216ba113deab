"""What a block's MLP saves for backward, by activation function, and what a mixture of experts saves."""

from __future__ import annotations

from memguard.estimation.arch import MoE
from memguard.estimation.formula.context import F32, I64, Ctx
from memguard.estimation.routing import expert_load

__all__ = ["experts_elem", "fp32_gelu", "mlp_bytes", "moe_bytes", "moe_temporary_bytes"]

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
    unit = rows * ffn * ctx.mlp_elem
    own, output_saved = _act_tensors(activation)
    own_bytes = rows * ffn * (3 * F32 + ctx.c) if fp32_gelu(ctx, activation) else own * unit
    extra = rows * ffn * ctx.mask(ctx.c) if act_dropout > 0 else 0
    # the second linear's input, unless its weight is frozen (LLM.int8 keeps it: Ctx.linear_inputs)
    second = 0 if ctx.frozen and not ctx.kept_inputs else 1
    if gated:
        # act's output (saved by the product unless act saves it), the up projection, and the
        # product (or, with dropout after it, the dropped product) saved by the down projection
        return own_bytes + ((0 if output_saved else 1) + 1 + second) * unit + extra
    if act_dropout > 0:
        return own_bytes + second * unit + extra  # the dropped tensor, saved by the second linear
    return own_bytes + (0 if output_saved else second) * unit


def experts_elem(ctx: Ctx, implementation: str) -> int:
    """Bytes per element inside the routed experts. transformers' ``grouped_mm`` experts call
    ``torch._grouped_mm``, which no autocast list holds, on ``input.to(weight.dtype)``
    (``transformers/integrations/moe.py``, ``_grouped_mm``): under mixed precision they run in the
    weights' fp32. The ``eager`` loop's ``F.linear`` is autocast: 16-bit."""
    return ctx.r if implementation in ("grouped_mm", "batched_mm") else ctx.c


def moe_bytes(ctx: Ctx, rows: int, moe: MoE, activation: str, capacity: float) -> int:
    """Bytes a mixture-of-experts layer saves between its input norm and its output, for ``rows`` tokens.

    Routing spreads ``S = top_k * rows`` token-expert pairs over the experts; whatever the
    spread, the experts together save what one gated MLP saves for ``S`` rows (each pair is one
    row of one expert's matmuls), so ``capacity`` only moves the temporaries (see
    :func:`moe_temporary_bytes`). Per pair, read from ``grouped_mm_experts_forward`` and
    ``MixtralExperts.forward`` (``transformers/integrations/moe.py``, ``modeling_mixtral.py``):
    the gathered input that the up projection saves (``h``), the fused gate/up output that SiLU
    keeps through its ``chunk`` view (``2·ffn``), the activation and the product (``ffn`` each),
    the down projection's output that the routing weight's product saves (``h``), that weight
    (fp32) and the int64 indices of the gather and the reordering; the eager loop's ``index_add_``
    also keeps the weighted output. The router saves the fp32
    softmax (or sigmoid) over the experts and its top-k indices and weights. Shared experts are a
    dense gated MLP over every token (:func:`mlp_bytes`); Qwen2-MoE's sigmoid gate keeps the
    shared output and the gate. The eager loop under autocast also keeps each expert's 16-bit
    weight copy (a slice of the 3-D parameter is no leaf, so autocast's cast cache skips it).
    """
    e = experts_elem(ctx, moe.implementation)
    pairs = rows * moe.top_k
    experts = pairs * ((2 * ctx.arch.hidden + 4 * moe.ffn) * e + F32 + 2 * I64)
    if moe.implementation == "eager":
        # index_add_ saves its source, the weighted output in the residual's dtype
        # (derivatives.yaml, index_add: ``grad.index_select(dim, index).expand_as(source)``)
        experts += pairs * ctx.arch.hidden * ctx.r
    router = rows * moe.experts * F32 + rows * moe.top_k * (I64 + 2 * F32)
    shared = 0
    if moe.shared_ffn:
        shared = mlp_bytes(ctx, rows, moe.shared_ffn, True, activation, 0.0)
        if moe.shared_gate:
            shared += rows * ctx.arch.hidden * ctx.c + rows * ctx.c
    copies = 0
    if ctx.autocast and e == ctx.c and not ctx.frozen:
        copies = moe.experts * 3 * moe.ffn * ctx.arch.hidden * ctx.c
    del capacity  # the saved bytes do not depend on the spread
    return experts + router + shared + copies


def moe_temporary_bytes(ctx: Ctx, rows: int, moe: MoE, capacity: float) -> int:
    """The largest temporary of a mixture-of-experts layer: the fused gate/up output of the
    busiest expert in the eager loop (``expert_load`` tokens of :mod:`memguard.estimation.stand_ins`,
    which the capacity factor sets), or of all ``top_k * rows`` pairs at once in ``grouped_mm``."""
    e = experts_elem(ctx, moe.implementation)
    if moe.implementation == "eager":
        return expert_load(rows, moe.top_k, moe.experts, capacity) * 2 * moe.ffn * e
    return rows * moe.top_k * 2 * moe.ffn * e
