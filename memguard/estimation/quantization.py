"""Quantized base weights (bitsandbytes NF4/FP4 and LLM.int8): what each byte is, and stand-ins the trace runs.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") trains LoRA adapters
over a frozen base whose ``nn.Linear`` weights bitsandbytes keeps in 4 bits. Where each byte comes
from (bitsandbytes 0.50, ``bitsandbytes/functional.py`` ``quantize_4bit``, ``nn/modules.py``
``Params4bit``/``Int8Params``; checked against the library on the CPU):

* **NF4/FP4 storage**: two weights per byte, ``ceil(n / 2)`` ``uint8`` (``Params4bit``);
* **quantization constants**: one absmax per block of 64 weights (``Params4bit`` blocksize 64) in
  fp32, and the 16-entry code of the data type in fp32 (``get_4bit_type``, made per layer); with
  **double quantization** (``compress_statistics=True``) the absmax are themselves quantized to
  ``uint8`` in blocks of 256 (``quantize_blockwise(absmax - offset, blocksize=256)``), adding one
  fp32 absmax per 256 blocks, an fp32 offset, and the 256-entry fp32 "dynamic" code, which
  bitsandbytes caches once (``name2qmap``). That is the QLoRA paper's section 3: 32/64 = 0.5 bit per
  weight of constants falls to 8/64 + 32/(64*256) = 0.127 bit.
* **int8** (Dettmers et al. 2022, "LLM.int8()"; ``Int8Params``): one ``int8`` per weight (``CB``)
  and one fp32 scale per output row (``SCB``).

What the matmul does in training (``bitsandbytes/autograd/_functions.py``, ``MatMul4Bit`` and
``backends/cuda/ops.py``, ``gemm_4bit``): above 1,536 rows of input the forward dequantizes the
weight into a temporary of the compute dtype (with fp32 absmax temporaries under double
quantization) and calls ``F.linear``; below, a fused kernel reads the 4-bit weight directly.
``MatMul4Bit`` keeps only the (already stored) quantized weight for backward, and backward
dequantizes it again (``F.dequantize_4bit``) to compute the input's gradient; the weight gets none.
``MatMul8bitLt`` casts its input to fp16, quantizes it row-wise (``int8_vectorwise_quant``), keeps
the input for backward, and in backward makes an fp16 copy of the int8 weight scaled by ``SCB``.

:func:`quantize_model` replaces each such ``nn.Linear`` with a :class:`QuantizedLinear` stand-in
that holds exactly that storage (``uint8``/``int8`` weight without gradient, constants as buffers;
fp32 constants are held as ``int32`` of the same size so that a 16-bit precision does not cast them)
and whose forward and backward allocate the same tensors, so the trace's ledger counts them and the
formula reads them off the module. :func:`detect_quantization` reads a model that holds
bitsandbytes layers, or a config with a ``quantization_config``.

Known limitations:
    * The formula counts what ``MatMul8bitLt`` keeps (its input) and that its output is in the
      input's dtype (an int8 block's MLP runs in fp32 under bf16-mixed), see
      :meth:`memguard.estimation.formula.context.Ctx.linear_inputs`. On LoRA-r8 Llamas with the
      CUDA rules (batch 4 x 512 with and without checkpointing, and 1 x 256; NF4 with double
      quantization and int8; bf16-true and bf16-mixed; ``benchmarks/qlora_vs_trace.py``) it is
      within -4.1% to +4.3% of the trace on 512 x 4, 1024 x 4 and 2048 x 2 layers with GQA (it was
      -3.5% to +6.9% while it counted what a frozen final norm and head do not save and missed the
      final RMSNorm's backward, -5.1% to +7.9% while the formula's top block's backward held what
      the final norm and the head had saved, and -5.5% to +4.5% while the checkpointed trace built
      an explicit causal mask and repeated GQA's K/V, which a real run does not: transformers'
      ``find_packed_sequence_indices`` read fake position ids as packed sequences, see
      :mod:`memguard.estimation.trace.packing`).
    * bitsandbytes before 0.43.2 ("fix QLoRA mem bug", PR #1270) kept ``MatMul4Bit``'s input as a
      plain ``ctx`` attribute (``ctx.tensors = (A, B)``), which autograd does not free after the
      node's backward (only saved variables are, ``PyNode::release_variables``) but with the graph:
      one more activation per quantized layer without an adapter reading the same tensor, and, in a
      loop whose variables keep the output (and so the graph) into the next step, the previous
      step's inputs through the next forward. memguard models 0.50, which keeps ``(None, B)``.
    * LLM.int8's outlier columns (``threshold=6.0`` in transformers) depend on the data and are not
      counted: a few columns of the input per layer.
    * peft's ``prepare_model_for_kbit_training`` casts the non-quantized weights to fp32; that is
      the precision's business here (they are kept in the precision's dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memguard.estimation.quantization_kinds import (  # torch-free: the argument checks read them
    BLOCKSIZE,
    CODE_4BIT,
    CODE_DYNAMIC,
    F32,
    FUSED_MAX_ROWS,
    NESTED_BLOCKSIZE,
    QLORA,
    QUANTIZATIONS,
    Quantization,
    QuantizationKind,
    dequantize_temporary,
    linear_storage,
    matches_module,
    resolve_quantization,
)

__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "QLORA",
    "QUANTIZATIONS",
    "Quantization",
    "QuantizationKind",
    "QuantizedLinear",
    "default_skips",
    "dequantize_temporary",
    "detect_quantization",
    "is_adapter",
    "linear_storage",
    "quantize_model",
    "quantized_layers",
    "resolve_quantization",
]

_BNB_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4")
_BNB_8BIT = ("Linear8bitLt",)



def _f32(numel: int) -> torch.Tensor:
    """Room for ``numel`` fp32 constants, as ``int32`` so that no precision casts them."""
    return torch.empty(numel, dtype=torch.int32, device="meta")


class QuantizedLinear(nn.Module):
    """A bitsandbytes ``Linear4bit``/``Linear8bitLt`` as memory: its storage, and its matmul's allocations.

    The values it computes are not the layer's; only its memory is. See the module docstring for
    the source of each tensor.
    """

    def __init__(self, in_features: int, out_features: int, q: Quantization, bias: nn.Parameter | None = None,
                 shared_code: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.quantization = in_features, out_features, q
        parts = linear_storage(out_features, in_features, q)
        dtype = torch.int8 if q.kind is QuantizationKind.INT8 else torch.uint8
        # flat, so that nothing takes it for a matrix that autocast casts
        self.weight = nn.Parameter(torch.empty(parts["weight"], dtype=dtype, device="meta"), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if q.kind is QuantizationKind.INT8:
            self.register_buffer("scale", _f32(out_features))
            return
        blocks = -(-in_features * out_features // BLOCKSIZE)
        self.register_buffer("code", _f32(CODE_4BIT))
        if q.double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device="meta"))
            self.register_buffer("absmax2", _f32(parts["absmax2"] // F32))
            self.register_buffer("offset", _f32(1))
            self.register_buffer("dynamic_code", shared_code if shared_code is not None else _f32(CODE_DYNAMIC))
        else:
            self.register_buffer("absmax", _f32(blocks))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quantization.label}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization.kind is QuantizationKind.INT8:
            return _MatMul8bitLt.apply(x, self.weight, self.bias, self)
        # Linear4bit.forward: compute in the input's dtype (set_compute_type), bias cast to it
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _MatMul4Bit.apply(x, self.weight, bias, self)


def _dequantized(layer: QuantizedLinear, dtype: torch.dtype, *, forward: bool) -> torch.Tensor:
    """The 16-bit (or fp32) weight a dequantization makes, with its absmax temporaries.

    Forward (``_dequant_linear_fallback``): nested absmax are dequantized into one fp32 buffer and
    the offset added into another; backward (``F.dequantize_4bit``): one fp32 buffer.
    """
    blocks = layer.absmax.numel()
    if layer.quantization.double_quant:
        absmax = torch.empty(blocks, dtype=torch.float32)
        if forward:
            absmax = absmax + 1.0
        del absmax
    return torch.empty((layer.out_features, layer.in_features), dtype=dtype)


class _MatMul4Bit(torch.autograd.Function):
    """``bitsandbytes.autograd._functions.MatMul4Bit`` with ``gemm_4bit``'s CUDA dispatch, as allocations."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > FUSED_MAX_ROWS:
            w = _dequantized(layer, x.dtype, forward=True)
            return torch.nn.functional.linear(x, w, bias)
        return torch.empty((*x.shape[:-1], layer.out_features), dtype=x.dtype)  # the fused kernel's output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(tuple(range(grad.dim() - 1)))
        if ctx.needs_input_grad[0]:
            w = _dequantized(ctx.layer, grad.dtype, forward=False)
            grad_x = torch.matmul(grad, w)
        return grad_x, None, grad_bias, None


class _MatMul8bitLt(torch.autograd.Function):
    """``bitsandbytes.autograd._functions.MatMul8bitLt`` (frozen int8 weight, CUDA), as allocations."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        a = x.reshape(-1, x.shape[-1])
        rows = a.shape[0]
        half = a.to(torch.float16)  # "inputs will be cast from ... to float16 during quantization"
        quantized = torch.empty_like(half, dtype=torch.int8)  # int8_vectorwise_quant: CA, SCA
        row_scale = torch.empty(rows, dtype=torch.float32)
        del half
        out = torch.empty((rows, layer.out_features), dtype=x.dtype)  # int8_scaled_mm
        del quantized, row_scale
        if bias is not None:
            out = out + bias.to(x.dtype)
        ctx.save_for_backward(a)  # ctx.tensors = (CAt, subA, A)
        return out.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (a,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_bias = None
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[0]:
            # CB = state.CB.to(dtype_A, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
            w = torch.empty((layer.out_features, layer.in_features), dtype=ctx.x_dtype)
            scale = torch.empty((layer.out_features, 1), dtype=torch.float32)
            w = w.mul_(scale)
            del scale
            grad_x = torch.matmul(g.to(ctx.x_dtype), w).reshape(*grad.shape[:-1], layer.in_features)
        del a
        return grad_x, None, grad_bias, None


def default_skips(module: nn.Module) -> set[int]:
    """transformers' ``get_keys_to_not_convert``: the output embeddings and the module of the last
    parameter (the LM head), left in 16 bits. peft's wrappers are looked through."""
    skips: set[int] = set()
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:
            skips.add(id(head))
    named = list(module.named_parameters())
    if named:
        owner = named[-1][0].rpartition(".")[0]
        try:
            if owner:
                skips.add(id(module.get_submodule(owner)))
        except AttributeError:
            pass
    return skips


def _bnb_quantization(m: nn.Module) -> Quantization | None:
    """The settings of one bitsandbytes layer, read by class name (bitsandbytes need not be installed)."""
    name = type(m).__name__
    if name in _BNB_8BIT:
        return Quantization(QuantizationKind.INT8)
    if name in _BNB_4BIT:
        weight = getattr(m, "weight", None)
        kind = getattr(weight, "quant_type", None) or {"LinearNF4": "nf4"}.get(name, "fp4")
        state = getattr(weight, "quant_state", None)
        nested = getattr(weight, "compress_statistics", None)
        if nested is None:
            nested = bool(getattr(state, "nested", False))
        return Quantization(str(kind), bool(nested))
    return None


def detect_quantization(module: nn.Module, config: Any = None) -> Quantization | None:
    """The quantization a model already has: from its bitsandbytes layers (by class name), its
    :class:`QuantizedLinear` stand-ins, or a transformers ``quantization_config`` (bitsandbytes'
    ``load_in_4bit``/``load_in_8bit``, ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``,
    ``llm_int8_skip_modules``)."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            return m.quantization
        found = _bnb_quantization(m)
        if found is not None:
            return found
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, Mapping) else lambda key, default=None: getattr(qc, key, default)
    method = get("quant_method", "bitsandbytes")
    method = getattr(method, "value", method)
    if str(method).lower() != "bitsandbytes":
        return None
    skip = get("llm_int8_skip_modules", None)
    skip = tuple(skip) if skip else None
    if get("load_in_4bit", False):
        return Quantization(str(get("bnb_4bit_quant_type", "fp4")), bool(get("bnb_4bit_use_double_quant", False)),
                            skip)
    if get("load_in_8bit", False):
        return Quantization(QuantizationKind.INT8, skip_modules=skip)
    return None


def _tree_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every tensor: each module object is new (with its own
    ``_modules``/``_parameters``/``_buffers`` dictionaries), so replacing layers in it leaves the
    user's model as it was."""
    import copy

    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        c = copy.copy(m)
        memo[id(m)] = c
        c._parameters = dict(m._parameters)
        c._buffers = dict(m._buffers)
        c._modules = {k: None if v is None else clone(v) for k, v in m._modules.items()}
        return c

    return clone(module)


def is_adapter(name: str) -> bool:
    """peft's adapter layers (``lora_A``, ``lora_B``, ...) and saved copies stay as they are."""
    return any(part.startswith(("lora_", "modules_to_save", "original_module")) for part in name.split("."))


def quantize_model(module: nn.Module, q: Quantization, *, in_place: bool = False) -> tuple[nn.Module, int]:
    """``module`` with each ``nn.Linear`` (and GPT-2's ``Conv1D``, as transformers' ``replace_with_bnb_linear``)
    replaced by a :class:`QuantizedLinear`, as Lightning's ``BitsandbytesPrecision.convert_module``
    does; bitsandbytes layers already there become stand-ins of their own settings.

    Skipped: ``q.skip_modules`` (transformers' matching), or by default the output head; peft's
    adapters. A copy of the module tree is changed unless ``in_place``.

    Returns:
        The module and how many layers were replaced.
    """
    root = module if in_place else _tree_copy(module)
    skip_ids = default_skips(root) if q.skip_modules is None else set()
    patterns = q.skip_modules or ()
    shared = _f32(CODE_DYNAMIC)
    replaced = 0
    for name, parent in list(root.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None or isinstance(child, QuantizedLinear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            own = _bnb_quantization(child)
            conv1d = type(child).__name__ == "Conv1D"
            if own is None and not (isinstance(child, nn.Linear) or conv1d):
                continue
            if own is None and (id(child) in skip_ids or matches_module(full, patterns) or is_adapter(full)):
                continue
            if conv1d:
                in_f, out_f = child.weight.shape
            else:
                in_f, out_f = child.in_features, child.out_features
            stand_in = QuantizedLinear(in_f, out_f, own or q, _bias(child), shared)
            stand_in.train(child.training)
            parent.register_module(child_name, stand_in)  # moves the structure generation: caches see it
            replaced += 1
    return root, replaced


def _bias(layer: nn.Module) -> nn.Parameter | None:
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def quantized_layers(module: nn.Module) -> list[QuantizedLinear]:
    """The :class:`QuantizedLinear` stand-ins in ``module``."""
    return [m for m in module.modules() if isinstance(m, QuantizedLinear)]

