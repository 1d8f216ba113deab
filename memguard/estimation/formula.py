"""The refined formula: peak live tensor bytes of a training step, in closed form.

Where the seed formula (:mod:`memguard.estimation.seed`) counts one weight matrix and two activations per
block, this formula counts what a training step really keeps, term by term:

* parameters, gradients and optimizer state from the module's own parameters (EleutherAI,
  "Transformer Math 101": bytes per parameter by dtype and optimizer; frozen parameters have no
  gradient and no state);
* per transformer block, every tensor autograd saves for the backward pass (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", section 4: linear
  inputs, norm inputs and statistics, attention scores/softmax/dropout mask, MLP activations,
  dropout masks), read for the block layout of each family of :mod:`memguard.estimation.arch` and for the
  attention kernel that will run (fused attention keeps only its output and a log-sum-exp);
* the logits and the loss's copies of them, which are often the largest single activation;
* on ``device="cuda"`` with mixed precision, CUDA's autocast op lists as the trace applies them
  (:mod:`memguard.estimation.cuda_rules`): an fp32 softmax in eager attention, fp32 Python GELUs (``pow``),
  a 16-bit ``log_softmax`` with ``nll_loss``'s fp32 copy for 16-bit logits;
* gradient checkpointing (only each block's input is kept, one block is recomputed at a time);
* the phases of a step (end of forward, start and end of backward, optimizer step), whose
  maximum is the peak.

Everything is integer bytes of live tensors: what ``torch.cuda.max_memory_allocated()`` reports
on a GPU, or how far resident memory grows on a CPU. Device overhead (CUDA context, allocator
rounding) is added by :mod:`memguard.estimation.overhead`.

Known limitations:
    * Block layouts are written out for the families of :mod:`memguard.estimation.arch`; other transformers
      models are estimated with the nearest family, and the notes say so.
    * Activations of a frozen block that sits above a trainable one are counted as if it were
      trainable (it keeps slightly less: no linear inputs).
    * The model's output (logits included) is taken to be dropped before ``backward``, as in
      Lightning's ``training_step`` and transformers' ``Trainer``: only the loss outlives the
      forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref

import torch
from torch import nn

from memguard.errors import ConfigError
from memguard.estimation.arch import (
    Architecture,
    find_architecture,
    inspect_architecture,
    structure_generation,
)
from memguard.estimation.models import ResolvedModel
from memguard.estimation.result import Category
from memguard.estimation.spec import AdamW8bitStandIn, TrainingSpec

__all__ = [
    "activation_bytes",
    "formula_breakdown",
    "gradient_bytes",
    "optimizer_state_bytes",
    "optimizer_step_bytes",
    "parameter_bytes",
]

_F32 = 4
_I64 = 8

_ADAM_LIKE = ("adam", "adamw", "nadam", "radam", "adamax", "adadelta")
"""Optimizers whose state holds a step counter per parameter besides their full-size tensors."""


# =========================================================================== model states


@dataclasses.dataclass(frozen=True)
class _Inventory:
    """What the formula needs to know about a module's parameters, gathered once per module.

    Only ``requires_grad`` is read again on every call (freezing a layer changes no structure);
    the inventory is rebuilt when any module registers a parameter, buffer or submodule
    (:func:`memguard.estimation.arch.structure_generation`).

    Attributes:
        params: the parameters, tied ones once (``module.parameters()`` deduplicates).
        numel: elements of each parameter.
        factored: elements of Adafactor's statistics for each parameter.
        matmul: whether each is the weight of a matmul-like layer (cast by autocast).
        pre: indices of parameters that run before the first block (embeddings).
        enc_blocks: parameter indices of each encoder (or only) block.
        dec_blocks: parameter indices of each decoder block.
        head: index of the output head's weight, or ``None``.
        buffer_float: elements of floating-point buffers.
        buffer_other: bytes of other buffers.
        generation: the structure generation this was built at.
        float_numel: elements of each parameter if it is floating point, else 0.
        other_bytes: bytes of each parameter if it is not floating point, else 0.
        matmul_numel: elements of all matmul weights.
    """

    params: tuple[nn.Parameter, ...]
    numel: tuple[int, ...]
    factored: tuple[int, ...]
    matmul: tuple[bool, ...]
    pre: tuple[int, ...]
    enc_blocks: tuple[tuple[int, ...], ...]
    dec_blocks: tuple[tuple[int, ...], ...]
    head: int | None
    buffer_float: int
    buffer_other: int
    generation: int
    float_numel: tuple[int, ...]
    other_bytes: tuple[int, ...]
    matmul_numel: int

    def trainable(self) -> list[int]:
        """Indices of the parameters that require grad, read now."""
        return [i for i, p in enumerate(self.params) if p.requires_grad]


_INVENTORIES: weakref.WeakKeyDictionary[nn.Module, _Inventory] = weakref.WeakKeyDictionary()


def _inventory(module: nn.Module, arch: Architecture | None = None) -> _Inventory:
    """The cached :class:`_Inventory` of ``module`` (built on first use)."""
    generation = structure_generation()
    try:
        inv = _INVENTORIES.get(module)
    except TypeError:
        inv = None
    if inv is not None and inv.generation == generation:
        return inv
    inv = _build_inventory(module, arch if arch is not None else find_architecture(module),
                           generation)
    with contextlib.suppress(TypeError):
        _INVENTORIES[module] = inv
    return inv


def _build_inventory(module: nn.Module, arch: Architecture | None, generation: int) -> _Inventory:
    params = tuple(module.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    matmul = [False] * len(params)
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.LayerNorm)):
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and name in ("weight", "in_proj_weight") and id(p) in index:
                matmul[index[id(p)]] = True
    enc: list[nn.Module] = []
    dec: list[nn.Module] = []
    if arch is not None:
        enc, dec = _block_lists(module, arch)
    pre: list[int] = []
    first = (enc or dec or [None])[0]
    if first is not None:
        # registered before the first block, or named as part of the embeddings (BART registers
        # its ``layernorm_embedding`` after its layers)
        for m in module.modules():
            if m is first:
                break
            pre.extend(index[id(p)] for p in m.parameters(recurse=False) if id(p) in index)
        in_blocks = {id(p) for blk in (*enc, *dec) for p in blk.parameters()}
        pre.extend(index[id(p)] for name, p in module.named_parameters()
                   if "emb" in name.lower() and id(p) not in in_blocks and index[id(p)] not in pre)
    head_weight = getattr(_output_head(module), "weight", None)
    floating_buffers = [b for b in module.buffers() if b.is_floating_point()]
    float_numel = tuple(p.numel() if p.is_floating_point() else 0 for p in params)
    other_bytes = tuple(0 if p.is_floating_point() else p.numel() * p.element_size()
                        for p in params)
    return _Inventory(
        params=params,
        numel=tuple(p.numel() for p in params),
        factored=tuple(_factored_elements(p) for p in params),
        matmul=tuple(matmul),
        pre=tuple(pre),
        enc_blocks=tuple(tuple(index[id(p)] for p in blk.parameters()) for blk in enc),
        dec_blocks=tuple(tuple(index[id(p)] for p in blk.parameters()) for blk in dec),
        head=index.get(id(head_weight)) if head_weight is not None else None,
        buffer_float=sum(b.numel() for b in floating_buffers),
        buffer_other=sum(b.numel() * b.element_size() for b in module.buffers()
                         if not b.is_floating_point()),
        generation=generation,
        float_numel=float_numel,
        other_bytes=other_bytes,
        matmul_numel=sum(p.numel() for p, mm in zip(params, matmul, strict=True) if mm),
    )


def _output_head(module: nn.Module) -> nn.Module | None:
    """transformers' ``get_output_embeddings()`` (the LM head), or ``None``."""
    get_out = getattr(module, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except (AttributeError, NotImplementedError):
        return None


def _param_size(inv: _Inventory, i: int, elem: int) -> int:
    """Bytes of parameter ``i`` with floating point kept in ``elem``-byte elements."""
    return inv.float_numel[i] * elem + inv.other_bytes[i]


def _sizes(inv: _Inventory, trainable: list[int], spec: TrainingSpec) -> list[int]:
    """Bytes of each trainable parameter in the precision's dtype."""
    elem = spec.precision.param_dtype.itemsize
    fl, ot = inv.float_numel, inv.other_bytes
    return [fl[i] * elem + ot[i] for i in trainable]


def _gradient_bytes_of(inv: _Inventory, indices: list[int], spec: TrainingSpec) -> int:
    """Bytes of the gradients of the parameters at ``indices``."""
    return sum(_sizes(inv, indices, spec))


def parameter_bytes(module: nn.Module, spec: TrainingSpec) -> int:
    """Bytes of the module's parameters and buffers, in the dtype the precision keeps them in.

    Floating-point tensors are counted in ``spec.precision.param_dtype`` (the 16-bit dtype for
    ``16-true``/``bf16-true``, fp32 for ``*-mixed`` and ``32-true``: EleutherAI, "Transformer Math
    101", mixed precision keeps fp32 master weights); integer buffers in their own dtype. Tied
    weights are one ``Parameter`` and are counted once (``module.parameters()`` deduplicates). Works
    on modules built on the meta device.
    """
    return _parameter_bytes(_inventory(module), spec)


def _parameter_bytes(inv: _Inventory, spec: TrainingSpec) -> int:
    elem = spec.precision.param_dtype.itemsize
    return ((sum(inv.float_numel) + inv.buffer_float) * elem + sum(inv.other_bytes)
            + inv.buffer_other)


def gradient_bytes(module: nn.Module, spec: TrainingSpec) -> int:
    """Bytes of ``.grad`` of the trainable parameters: one per parameter, in its dtype.

    Source: EleutherAI, "Transformer Math 101" (gradients are stored in the parameter's dtype;
    frozen parameters, ``requires_grad=False``, get none).
    """
    inv = _inventory(module)
    return sum(_sizes(inv, inv.trainable(), spec))


def _factored_elements(p: torch.Tensor) -> int:
    """Elements of Adafactor's second-moment statistics of one parameter.

    ``torch.optim.Adafactor`` keeps, for a tensor of two or more dimensions, a row factor (the
    last dimension reduced to 1) and a column factor (the second-to-last reduced to 1); for a
    vector, a full-size ``variance`` (``torch/optim/_adafactor.py``, ``_init_group``).
    """
    if p.dim() < 2:
        return p.numel()
    lead = math.prod(p.shape[:-2])
    return lead * (p.shape[-2] + p.shape[-1])


def optimizer_state_bytes(module: nn.Module, spec: TrainingSpec) -> tuple[int, list[str]]:
    """Bytes of optimizer state kept between steps, and notes on what was assumed.

    ``torch.optim`` allocates its state with ``zeros_like(param)``, so each full-size state tensor
    costs as much as the trainable parameter it belongs to (EleutherAI, "Transformer Math 101":
    AdamW 2 tensors, momentum SGD 1, plain SGD none; Adafactor rows + columns of each matrix).
    Adam-like optimizers and Adafactor add a 4-byte ``step`` tensor per parameter.
    """
    inv = _inventory(module)
    trainable = inv.trainable()
    return _optimizer_state_bytes(inv, trainable, _sizes(inv, trainable, spec), spec)


def _optimizer_state_bytes(inv: _Inventory, trainable: list[int], sizes: list[int],
                           spec: TrainingSpec) -> tuple[int, list[str]]:
    notes: list[str] = []
    opt = spec.optimizer
    if opt.factory is None:
        return 0, notes
    elem = spec.precision.param_dtype.itemsize
    if opt.factored:
        total = sum(inv.factored[i] * elem for i in trainable)
        return total + _F32 * len(trainable), notes
    if opt.quantized:
        return sum(_quantized_state_bytes(inv.numel[i]) for i in trainable), notes
    k = opt.state_tensors
    if k is None:
        k = 2
        notes.append(f"unknown optimizer {opt.name!r}: assumed Adam's 2 full-size state tensors "
                     "per trainable parameter")
    total = k * sum(sizes)
    if opt.name in _ADAM_LIKE or opt.state_tensors is None:
        total += _F32 * len(trainable)
    return total, notes


def _quantized_state_bytes(numel: int) -> int:
    """8-bit AdamW (bitsandbytes; Dettmers et al. 2022): two ``uint8`` moments and one fp32 absmax
    per 2048-element block each; parameters under 4096 elements keep two fp32 moments."""
    if numel < AdamW8bitStandIn.MIN_8BIT_SIZE:
        return 2 * _F32 * numel
    return 2 * numel + 2 * _F32 * -(-numel // AdamW8bitStandIn.BLOCK)


def optimizer_step_bytes(module: nn.Module, spec: TrainingSpec) -> int:
    """Temporary bytes of ``optimizer.step()`` on top of parameters, gradients and state.

    On CUDA ``torch.optim`` defaults to its ``foreach`` implementation, whose intermediates are
    full lists: Adam/AdamW's ``torch._foreach_sqrt(exp_avg_sqs)`` is one more copy of every
    trainable parameter (``torch/optim/adam.py``, ``_multi_tensor_adam``; RMSprop and Adagrad
    likewise take the square root of their one state). On the CPU the single-tensor loop runs:
    Adam's ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)`` holds two temporaries of the largest
    parameter. ``torch.optim.Adafactor`` takes its single-tensor loop on every device unless
    ``foreach=True`` is passed (``torch/optim/_adafactor.py``, ``adafactor``: ``if foreach:``),
    where ``row_var @ col_var`` is one temporary of the largest matrix. SGD, with or without
    momentum, updates in place.
    """
    inv = _inventory(module)
    return _optimizer_step_bytes(_sizes(inv, inv.trainable(), spec), spec)


def _optimizer_step_bytes(sizes: list[int], spec: TrainingSpec) -> int:
    opt = spec.optimizer
    if opt.factory is None or not sizes or opt.name in ("sgd", "sgd-momentum") or opt.quantized:
        return 0
    if opt.factored:
        return max(sizes)
    if spec.device == "cuda":
        return sum(sizes)
    adam = opt.state_tensors is None or opt.state_tensors >= 2 or opt.name in _ADAM_LIKE
    return (2 if adam else 1) * max(sizes)


def _batch_bytes(arch: Architecture, module: nn.Module, spec: TrainingSpec, b: int,
                 s: int) -> int:
    """Bytes of the batch: ``input_ids`` and ``labels`` (int64) or pixels and class labels.

    What :func:`memguard.estimation.models.make_batch` builds: token models get ``input_ids`` and, with a
    language-model head, a ``labels`` copy; vision models get fp32 (or ``*-true`` dtype) pixels
    and one int64 label per image.
    """
    if arch.image_tokens is not None:
        config = getattr(module, "config", None)
        size = getattr(config, "image_size", 224)
        hh, ww = (size, size) if isinstance(size, int) else tuple(size)
        chans = getattr(config, "num_channels", 3)
        prec = spec.precision
        px = _F32 if prec.autocast_dtype is not None else _dtype_size(prec.param_dtype)
        return b * chans * hh * ww * px + b * _I64
    labels = b * s * _I64 if arch.head in ("causal-lm", "masked-lm", "seq2seq") else b * _I64
    if arch.head in ("unknown", "base"):
        labels = 0
    return b * s * _I64 + labels


def _dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


# =========================================================================== activations


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Dimensions and element sizes of one estimate.

    Attributes:
        b: batch size.
        r: bytes per element of the residual stream and of norms (the parameter dtype; fp32 under
            mixed precision, where ``fp32 + bf16`` additions promote to fp32).
        c: bytes per element of matmul outputs (the autocast dtype under mixed precision).
        autocast: mixed precision (``torch.autocast``) is on.
        cuda: the step runs on a GPU (fused attention and dropout kernels, 1-byte masks).
        kernel: ``fused``, ``math`` or ``eager`` attention (see :func:`_attention_kernel`).
        arch: the architecture.
        frozen: counting a frozen block that passes gradients down: its linear layers keep no
            inputs (a frozen weight needs no gradient), only what input gradients need.
    """

    b: int
    r: int
    c: int
    autocast: bool
    cuda: bool
    kernel: str
    arch: Architecture
    frozen: bool = False

    def mask(self, elem: int) -> int:
        """Bytes per element of a dropout mask over a tensor of ``elem``-byte elements.

        On CUDA ``at::dropout`` takes the fused ``native_dropout`` kernel and keeps a ``bool``
        mask; elsewhere ``is_fused_kernel_acceptable`` fails and ``_dropout_impl`` keeps the
        scaled Bernoulli noise in the input's dtype (``aten/src/ATen/native/Dropout.cpp``).
        """
        return 1 if self.cuda else elem

    def linear_inputs(self, rows: int, width: int, consumers: int) -> int:
        """Bytes a norm's output costs once ``consumers`` linear layers have saved it.

        Without autocast the one tensor is saved by all of them. Under autocast every ``F.linear``
        casts its fp32 input to 16 bits itself and saves its own cast copy (autocast caches casts
        of leaf weights only), so Q, K and V projections keep three copies. A frozen linear layer
        keeps none.
        """
        if self.frozen:
            return 0
        if self.autocast:
            return consumers * rows * width * self.c
        return rows * width * self.r

    @property
    def math_elem(self) -> int:
        """Element size inside the math attention kernel: the CPU kernel upcasts 16-bit inputs
        to fp32 (``_scaled_dot_product_attention_math``)."""
        return _F32 if (not self.cuda and self.c < _F32) else self.c


def _attention_kernel(arch: Architecture, spec: TrainingSpec) -> str:
    """Which attention kernel a training step runs: ``fused``, ``math`` or ``eager``.

    transformers' ``eager`` implementation materialises the scores in Python. Under ``sdpa``
    (the default), CUDA runs flash or memory-efficient attention, which keep the output and a
    log-sum-exp per row only (Korthikanti et al. 2022: the 5·a·s²·b term disappears); the CPU has
    a flash kernel too, but it refuses ``dropout_p > 0``, so training with attention dropout
    falls back to the math kernel that keeps the S×S softmax and dropout mask
    (``aten/src/ATen/native/transformers/sdp_utils_cpp.cpp``, ``check_for_dropout``).
    """
    impl = arch.attn_implementation
    if impl == "eager":
        return "eager"
    if impl not in ("sdpa", "") or spec.device == "cuda":
        return "fused"
    return "math" if arch.attention_dropout > 0 else "fused"


def _act_tensors(activation: str) -> tuple[int, bool]:
    """MLP-width tensors an activation saves, and whether its output is one of them.

    The C kernels (``F.gelu``, ``F.silu``, tanh-GELU) save their input; ``relu`` saves its
    output; transformers' Python ``gelu_new`` (``0.5*x*(1+tanh(...))``) saves x, 0.5·x, the tanh
    and 1+tanh (``transformers/activations.py``, ``NewGELUActivation``).
    """
    act = activation.lower()
    if act in ("relu", "relu6"):
        return 1, True
    if act in ("gelu_new", "gelu_python_tanh"):
        return 4, False
    if act in ("gelu_fast",):
        return 6, False
    if act in ("quick_gelu",):
        return 2, False
    return 1, False


_POW_GELUS = ("gelu_new", "gelu_python_tanh")
"""transformers' Python tanh-GELUs that call ``torch.pow`` (``transformers/activations.py``)."""


def _fp32_gelu(ctx: _Ctx, activation: str) -> bool:
    """Whether the activation runs in fp32: CUDA's autocast runs ``pow`` in fp32
    (``AT_FORALL_FP32`` in ``ATen/autocast_mode.h``), which promotes the rest of a Python GELU."""
    return ctx.autocast and ctx.cuda and activation.lower() in _POW_GELUS


def _mlp_bytes(ctx: _Ctx, rows: int, ffn: int, gated: bool, activation: str,
               act_dropout: float) -> int:
    """Bytes the MLP saves between its two linear layers.

    Korthikanti et al. 2022, section 4.1 (MLP: the first linear's output, the activation's
    output, the dropout mask), with the activation's own saved tensors (:func:`_act_tensors`).
    A gated MLP (``act(x W_g) * x W_u``) adds the up projection and the product. A Python GELU
    under CUDA's autocast (:func:`_fp32_gelu`) saves the fp32 cast of its input (for ``pow``),
    the fp32 tanh and 1 + tanh and the 16-bit 0.5·x; its fp32 output is cast again by the second
    linear.
    """
    unit = rows * ffn * ctx.c
    own, output_saved = _act_tensors(activation)
    own_bytes = rows * ffn * (3 * _F32 + ctx.c) if _fp32_gelu(ctx, activation) else own * unit
    extra = rows * ffn * ctx.mask(ctx.c) if act_dropout > 0 else 0
    second = 0 if ctx.frozen else 1  # the second linear's input, unless its weight is frozen
    if gated:
        # act's output (saved by the product unless act saves it), the up projection, and the
        # product (or, with dropout after it, the dropped product) saved by the down projection
        return own_bytes + ((0 if output_saved else 1) + 1 + second) * unit + extra
    if act_dropout > 0:
        return own_bytes + second * unit + extra  # the dropped tensor, saved by the second linear
    return own_bytes + (0 if output_saved else second) * unit


def _layer_norm_bytes(ctx: _Ctx, rows: int, width: int, elem: int | None = None) -> int:
    """``native_layer_norm`` saves its input and two fp32 statistics per row (mean, rstd).

    Korthikanti et al. 2022, section 4.1 ("layer norms: 4·sbh" for two norms in 16 bits).
    """
    return rows * width * (elem or ctx.r) + 2 * rows * _F32


def _rms_norm_bytes(ctx: _Ctx, rows: int, width: int, *, keeps_input: bool = False) -> int:
    """What transformers' RMSNorm (Llama, T5) saves: its input in fp32, ``rsqrt`` per row, and
    the normalised tensor (in fp32, or its 16-bit copy for 16-bit weights).

    ``LlamaRMSNorm.forward``: ``x.to(float32)``, ``pow(2).mean``, ``x * rsqrt(var)``, then
    ``weight * x.to(input_dtype)``; ``T5LayerNorm`` multiplies the un-upcast input, which it
    therefore also keeps (``keeps_input``).
    """
    n = rows * width
    if ctx.r >= _F32:
        return 2 * n * _F32 + rows * _F32
    extra = n * ctx.r if keeps_input else 0
    return n * _F32 + n * ctx.r + rows * _F32 + extra


def _attention_core_bytes(ctx: _Ctx, q_rows: int, kv_len: int, q_len: int, *, masked: bool,
                          dropout: float) -> int:
    """Bytes the attention kernel itself saves, beyond the Q/K/V tensors handed to it.

    * fused (flash / memory-efficient): the output and a log-sum-exp (fp32) per query row and
      head (Korthikanti et al. 2022: no 5·a·s²·b term);
    * math: the scaled Q and K copies, the softmax, with dropout the noise and the dropped
      probabilities (the S×S terms of Korthikanti et al.'s 11·sbh + 5·as²b), the output; the CPU
      kernel computes in fp32;
    * eager (transformers ``eager_attention_forward``): the softmax, the dropout mask and the
      16-bit probabilities the second matmul saves, the output. The softmax is fp32 for
      Llama/ViT (``dtype=torch.float32``) and under CUDA's autocast (``softmax`` is on its
      fp32 list); then one 16-bit copy is saved whether dropout runs on it (Llama, ViT) or before
      it (BERT: the dropped fp32 copy is cast and freed): on CUDA in bf16, 4 + 1 + 2 = 7 bytes
      per score with dropout.

    Args:
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
    lse = q_rows * a.heads * _F32
    mask = ctx.b * q_len * kv_len * (_F32 if not ctx.cuda else ctx.c) if masked else 0
    if ctx.kernel == "fused":
        return out + lse + mask
    if ctx.frozen:
        out = 0
    kv_rows = q_rows // q_len * kv_len
    if ctx.kernel == "math":
        e = ctx.math_elem
        k_width = nq
        total = q_rows * nq * e + kv_rows * k_width * e + scores * e + out
        if ctx.c < e:  # the upcast V copy
            total += kv_rows * k_width * e
        if dropout > 0:
            total += scores * e + scores * ctx.mask(e)
        return total
    # eager: Llama and ViT take the softmax in fp32 and cast it back; the others softmax in the
    # scores' dtype, which CUDA's autocast lifts to fp32 (softmax is on its fp32 list)
    fp32_softmax = a.family in ("llama", "vit") or (ctx.autocast and ctx.cuda)
    e = _F32 if fp32_softmax else ctx.c
    total = scores * e + out
    if e != ctx.c or dropout > 0:
        # the 16-bit probabilities the second matmul saves: the dropout's output, or a cast of
        # the fp32 softmax (or of its dropped copy, which nothing else keeps)
        total += scores * ctx.c
    if dropout > 0:
        total += scores * ctx.mask(ctx.c)
    return total


def _qkv_bytes(ctx: _Ctx, q_rows: int, kv_rows: int, *, rope: bool, cache: bool,
               masked: bool, fused_proj: bool) -> int:
    """Bytes of Q, K, V as the attention keeps them (projection outputs, rotary outputs, the
    key/value cache of a decoder run with ``use_cache``, 16-bit casts under autocast).

    transformers models return a ``DynamicCache`` from a training forward when the config says
    ``use_cache=True``; ``DynamicLayer.update`` concatenates K and V into new tensors that live
    as long as the output. Grouped-query models with an explicit mask repeat K/V to all heads
    (``repeat_kv``); without one, SDPA takes ``enable_gqa``, and on CUDA in fp32 the
    memory-efficient kernel gets them repeated (:mod:`memguard.estimation.cuda_rules`).
    """
    a = ctx.arch
    nq, nkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    q, k = q_rows * nq, kv_rows * nkv
    grouped = a.kv_heads != a.heads
    # fp32 on CUDA takes memory-efficient attention, which gets K/V repeated to every query head
    # (memguard.estimation.cuda_rules; the op's meta kernels take equal head counts)
    efficient = ctx.cuda and ctx.c == _F32 and ctx.kernel == "fused"
    gqa_expand = grouped and (masked or ctx.kernel == "eager" or efficient)
    if ctx.kernel == "math":
        # the math kernel keeps its own scaled copies (counted in the core); V and any cache here
        held = 2 * k * ctx.c if cache else 0
        if fused_proj and not cache and ctx.math_elem == ctx.c:
            held = 3 * q * ctx.c  # V is a view of the fused QKV output, which stays alive
        elif not cache and ctx.math_elem == ctx.c:
            held = k * ctx.c  # the V projection output
        return held
    # fused kernels and eager attention's matmuls keep Q, K and V as they are handed over
    if rope:
        # under autocast: casts of Q and K, and V (the projection output or the cache's copy of
        # it); the cache's own fp32 rotary K is held by the output only (output_cache)
        total = (q + 2 * k) * ctx.c if ctx.autocast else q * ctx.r + 2 * k * ctx.r
    elif fused_proj:
        total = 3 * q * ctx.c + (2 * k * ctx.c if cache else 0)
    else:
        total = q * ctx.c + 2 * k * ctx.c + (2 * k * ctx.c if cache else 0)
    if gqa_expand:
        total += 2 * q_rows * nq * ctx.c
    return total


def _self_attention_bytes(ctx: _Ctx, seq: int, *, cache: bool, masked: bool,
                          rope: bool = False, fused_proj: bool = False) -> int:
    """Q/K/V plus the kernel's own saved tensors for self-attention over ``seq`` tokens."""
    a = ctx.arch
    rows = ctx.b * seq
    return (_qkv_bytes(ctx, rows, rows, rope=rope, cache=cache, masked=masked,
                       fused_proj=fused_proj)
            + _attention_core_bytes(ctx, rows, seq, seq, masked=masked, dropout=a.attention_dropout))


def _block_bytes(ctx: _Ctx, seq: int, *, cache: bool, cross_seq: int | None = None) -> int:
    """Bytes one transformer block saves for backward (Korthikanti et al. 2022, section 4.1,
    ``sbh(34 + 5as/h)`` for GPT-style blocks in 16 bits), laid out per family.

    The block's input is counted here (its first norm or projections save it); its output is the
    next block's input. ``cross_seq`` adds a decoder block's cross-attention over that many
    encoder tokens.
    """
    a = ctx.arch
    rows = ctx.b * seq
    h = a.hidden
    resid = rows * h
    pd = a.hidden_dropout
    drop_mask = resid * ctx.mask(ctx.c) if pd > 0 else 0
    window = a.sliding_window
    masked = window is not None and window < seq
    mlp = _mlp_bytes(ctx, rows, a.ffn, a.gated_mlp, a.activation, a.activation_dropout)
    fam = a.family
    if fam == "gpt2":
        return (_layer_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 1)
                + _self_attention_bytes(ctx, seq, cache=cache, masked=masked, fused_proj=True)
                + drop_mask + _layer_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 1)
                + mlp + drop_mask)
    if fam == "llama":
        return (_rms_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 3)
                + _self_attention_bytes(ctx, seq, cache=cache, masked=masked, rope=True)
                + _rms_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 2 if a.gated_mlp
                                                                     else 1)
                + mlp)
    if fam == "vit":
        return (_layer_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 3)
                + _self_attention_bytes(ctx, seq, cache=False, masked=False)
                + drop_mask + _layer_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 1)
                + mlp + drop_mask)
    if fam == "t5":
        total = (_rms_norm_bytes(ctx, rows, h, keeps_input=True) + ctx.linear_inputs(rows, h, 3)
                 + _self_attention_bytes(ctx, seq, cache=cache, masked=False) + drop_mask
                 + _rms_norm_bytes(ctx, rows, h, keeps_input=True)
                 + ctx.linear_inputs(rows, h, 2 if a.gated_mlp else 1) + mlp + drop_mask)
        if cross_seq is not None:
            total += (_rms_norm_bytes(ctx, rows, h, keeps_input=True)
                      + ctx.linear_inputs(rows, h, 1)
                      + _cross_attention_bytes(ctx, seq, cross_seq, cache=cache) + drop_mask)
        return total
    if fam in ("bert", "bart"):
        attn_drop_mask = 0 if a.model_type == "distilbert" else drop_mask
        total = (ctx.linear_inputs(rows, h, 3)
                 + _self_attention_bytes(ctx, seq, cache=cache, masked=False)
                 + attn_drop_mask + _layer_norm_bytes(ctx, rows, h)
                 + ctx.linear_inputs(rows, h, 1) + mlp + drop_mask
                 + _layer_norm_bytes(ctx, rows, h))
        if cross_seq is not None:
            total += (ctx.linear_inputs(rows, h, 1)
                      + _cross_attention_bytes(ctx, seq, cross_seq, cache=cache)
                      + drop_mask + _layer_norm_bytes(ctx, rows, h))
        return total
    # torch.nn.TransformerEncoderLayer: MultiheadAttention copies its (batch-first, transposed)
    # input for the packed in-projection and makes Q, K, V one contiguous (3, S, B, h) tensor,
    # which stays alive through the views the kernel keeps (unless the CPU's math kernel upcasts
    # them to fp32 copies, counted in the core). On CUDA in fp32, memory-efficient attention
    # returns a (B, S, H, D)-ordered output, which MHA copies for its out-projection to save.
    upcast = ctx.kernel == "math" and ctx.c < ctx.math_elem
    copy = resid * ctx.c if ctx.cuda and ctx.c == _F32 and ctx.kernel == "fused" else 0
    attn = (ctx.linear_inputs(rows, h, 1) + (0 if upcast else 3 * resid * ctx.c) + copy
            + _attention_core_bytes(ctx, rows, seq, seq, masked=False,
                                    dropout=a.attention_dropout))
    total = (attn + drop_mask + _layer_norm_bytes(ctx, rows, h) + ctx.linear_inputs(rows, h, 1)
             + mlp + drop_mask + _layer_norm_bytes(ctx, rows, h))
    if cross_seq is not None:
        total += (ctx.linear_inputs(rows, h, 1) + _cross_attention_bytes(ctx, seq, cross_seq,
                                                                          cache=False)
                  + drop_mask + _layer_norm_bytes(ctx, rows, h))
    return total


def _cross_attention_bytes(ctx: _Ctx, seq: int, enc_seq: int, *, cache: bool) -> int:
    """Cross-attention of ``seq`` decoder tokens over ``enc_seq`` encoder tokens: Q, the
    projections of the encoder output to K and V (and their cached copies), the kernel's own
    tensors. Under autocast each decoder block also casts the encoder output for its K and V
    projections."""
    a = ctx.arch
    q_rows, kv_rows = ctx.b * seq, ctx.b * enc_seq
    nq = a.heads * a.head_dim
    qkv = q_rows * nq * ctx.c + 2 * kv_rows * nq * ctx.c + (2 * kv_rows * nq * ctx.c
                                                            if cache else 0)
    if ctx.kernel != "fused":
        qkv = (2 * kv_rows * nq * ctx.c) if cache else kv_rows * nq * ctx.c
    casts = 2 * kv_rows * a.hidden * ctx.c if ctx.autocast else 0
    core = _attention_core_bytes(ctx, q_rows, enc_seq, seq, masked=False,
                                 dropout=a.attention_dropout)
    return qkv + casts + core


def _checkpoint_input_bytes(ctx: _Ctx, seq: int) -> int:
    """With gradient checkpointing a block keeps only its input (Korthikanti et al. 2022,
    section 5: full recomputation stores ``2·sbh`` per layer in 16 bits, i.e. one ``sbh``
    tensor)."""
    return ctx.b * seq * ctx.arch.hidden * ctx.r


def _checkpoint_bias_bytes(ctx: _Ctx, seq: int) -> int:
    """T5 under checkpointing: the relative position bias (``S × S × heads``, fp32) that block 0
    computes is an input of every later checkpointed block, so it stays alive, once per stack,
    with the decoder's zero cross-attention bias."""
    a = ctx.arch
    if a.family != "t5":
        return 0
    bias = a.heads * seq * seq * _F32
    return bias * (3 if a.decoder_layers else 1)


def _fused_bias_bytes(ctx: _Ctx, seq: int, dec_blocks: int) -> int:
    """T5 with a fused attention kernel: the additive masks made from the relative position bias
    (``1 × heads × S × S``), which the kernel saves for backward: the encoder's bias (one for
    all blocks), the decoder's causal ``torch.where`` of it in every block, and the zero
    cross-attention bias (transformers ``create_position_bias_mask``). Not checked on a GPU."""
    a = ctx.arch
    if a.family != "t5":
        return 0
    bias = a.heads * seq * seq * ctx.r
    return bias * (1 + dec_blocks + (1 if a.decoder_layers else 0))


def _embedding_bytes(ctx: _Ctx, seq: int) -> int:
    """What the embedding layer saves beyond the first block's input: BERT/BART's embedding
    LayerNorm input, the embedding dropout mask, rotary tables, T5's relative position buckets.
    """
    a = ctx.arch
    rows = ctx.b * seq
    resid = rows * a.hidden
    total = 0
    if a.embedding_dropout > 0:
        total += resid * ctx.mask(ctx.r)
    if a.family in ("bert", "bart"):
        total += _layer_norm_bytes(ctx, rows, a.hidden)
    if a.positions == "rotary":
        total += 2 * seq * a.head_dim * _F32
    if a.positions == "relative":
        total += seq * seq * _I64
    return total


def _final_bytes(ctx: _Ctx, seq: int) -> int:
    """What sits between the last block and the logits: the final norm (its input is the last
    block's output), the head's transform (BERT's dense + GELU + LayerNorm) and the head's input.
    """
    a = ctx.arch
    rows = ctx.b * seq
    h = a.hidden
    resid = rows * h
    head_in = ctx.linear_inputs(rows, h, 1)
    if a.family == "llama":
        return _rms_norm_bytes(ctx, rows, h) + head_in
    if a.family == "t5":
        drop = resid * ctx.mask(ctx.r) + resid * ctx.r if a.hidden_dropout > 0 else 0
        scaled = resid * ctx.r if a.tied_embeddings and not ctx.autocast else 0
        return _rms_norm_bytes(ctx, rows, h, keeps_input=True) + drop + scaled + head_in
    if a.family == "gpt2":
        return _layer_norm_bytes(ctx, rows, h) + head_in
    if a.family == "vit":
        # the classifier reads the class token of the final LayerNorm's output
        pooled = ctx.b * h * ctx.c if ctx.autocast else resid * ctx.r
        return _layer_norm_bytes(ctx, rows, h) + pooled
    if a.family in ("bert", "bart"):
        if a.head == "masked-lm":
            # transform: dense -> GELU -> LayerNorm -> decoder; CUDA's autocast runs the
            # LayerNorm in fp32 and it saves an fp32 cast of the GELU's output instead
            ln_in = _F32 if (ctx.autocast and ctx.cuda) else ctx.c
            return head_in + resid * (ctx.c + ln_in) + 2 * rows * _F32 + head_in
        return head_in
    # plain torch: the model's own final norm and head are unknown; count one LayerNorm
    return _layer_norm_bytes(ctx, rows, h)


def _encoder_output_bytes(ctx: _Ctx, enc_seq: int) -> int:
    """The encoder's final hidden states of an encoder-decoder model, saved by every decoder
    block's cross-attention K/V projections (T5 also keeps the final norm and dropout)."""
    a = ctx.arch
    rows = ctx.b * enc_seq
    resid = rows * a.hidden
    total = resid * ctx.r
    if a.family == "t5":
        total += _rms_norm_bytes(ctx, rows, a.hidden, keeps_input=True)
        if a.hidden_dropout > 0:
            total += resid * ctx.mask(ctx.r)
    return total


@dataclasses.dataclass(frozen=True)
class _Activations:
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
        embedding: bytes still alive at the end of backward (the embeddings' saved tensors).
        idle: parameter indices of blocks that save nothing (frozen, nothing trainable below).
        output_cache: bytes of the key/value cache held by the model's output alone (not saved
            for backward), alive until the output is dropped.
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


@dataclasses.dataclass(frozen=True)
class _Activity:
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
    """

    embeddings: bool
    enc: int
    enc_frozen: int
    dec: int
    dec_frozen: int
    idle: frozenset[int]


def _block_activity(inv: _Inventory, arch: Architecture, grad: list[bool]) -> _Activity:
    """Count the blocks of each kind (see :class:`_Activity`); ``grad[i]`` is parameter ``i``'s
    ``requires_grad``. Modules registered before the first block (embeddings and their norm,
    positions, patch projection, class token) are taken to run before it, as in transformers
    models and most plain ones."""
    if not inv.enc_blocks and not inv.dec_blocks:  # blocks not found: all trainable
        return _Activity(True, arch.encoder_layers if arch.decoder_layers else arch.layers, 0,
                         arch.decoder_layers, 0, frozenset())
    emb = any(grad[i] for i in inv.pre)
    idle: list[int] = []

    def walk(blocks: tuple[tuple[int, ...], ...], upstream: bool) -> tuple[int, int, bool]:
        trained = frozen = 0
        for blk in blocks:
            own = any(grad[i] for i in blk)
            if own:
                trained += 1
            elif upstream:
                frozen += 1
            else:
                idle.extend(blk)
            upstream = upstream or own
        return trained, frozen, upstream

    n_enc, f_enc, enc_grad = walk(inv.enc_blocks, emb)
    n_dec, f_dec, _ = walk(inv.dec_blocks, emb or enc_grad)
    return _Activity(emb, n_enc, f_enc, n_dec, f_dec, frozenset(idle))


def _block_lists(module: nn.Module, arch: Architecture) -> tuple[list[nn.Module],
                                                                  list[nn.Module]]:
    """The encoder and decoder blocks of ``module``.

    Plain torch models: their ``TransformerEncoderLayer``/``TransformerDecoderLayer`` modules.
    transformers models: the outermost ``nn.ModuleList``s of the architecture's lengths, in
    registration order (the encoder's before the decoder's); lists nested inside a block (T5's
    ``block[i].layer``) are skipped.
    """
    if arch.family == "torch":
        enc = [m for m in module.modules() if isinstance(m, nn.TransformerEncoderLayer)]
        dec = [m for m in module.modules() if isinstance(m, nn.TransformerDecoderLayer)]
        return enc, dec
    wanted = [arch.encoder_layers, arch.decoder_layers] if arch.decoder_layers else [arch.layers]
    found: list[tuple[str, nn.ModuleList]] = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or len(found) == len(wanted):
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue  # inside a block already found
        if len(m) == wanted[len(found)]:
            found.append((name, m))
    enc = list(found[0][1]) if found else []
    dec = list(found[1][1]) if len(found) > 1 else []
    return enc, dec


def _tokens(arch: Architecture, spec: TrainingSpec) -> int:
    if arch.image_tokens is not None:
        return arch.image_tokens
    if spec.seq_len is None:
        raise ConfigError(
            f"the formula needs seq_len for {arch.model_type} (tokens per sample); pass seq_len="
        )
    return spec.seq_len


def activation_bytes(model: ResolvedModel, spec: TrainingSpec) -> _Activations:
    """Activation bytes of a training step of ``model`` (see :class:`_Activations`)."""
    arch = inspect_architecture(model.module, model.config, name=model.name,
                                needs="the formula")
    inv = _inventory(model.module, arch)
    grad = [p.requires_grad for p in inv.params]
    return _activations(inv, arch, spec, _ctx(arch, spec), grad)


def _ctx(arch: Architecture, spec: TrainingSpec) -> _Ctx:
    prec = spec.precision
    r = _dtype_size(prec.param_dtype)
    c = _dtype_size(prec.autocast_dtype) if prec.autocast_dtype is not None else r
    return _Ctx(b=spec.batch_size or 1, r=r, c=c, autocast=prec.autocast_dtype is not None,
                cuda=spec.device == "cuda", kernel=_attention_kernel(arch, spec), arch=arch)


def _activations(inv: _Inventory, arch: Architecture, spec: TrainingSpec, ctx: _Ctx,
                 grad: list[bool]) -> _Activations:
    seq = _tokens(arch, spec)
    ckpt = bool(spec.gradient_checkpointing)
    cache = arch.use_cache and not ckpt
    act = _block_activity(inv, arch, grad)
    frozen_ctx = dataclasses.replace(ctx, frozen=True)
    enc_cache = cache and arch.decoder_layers == 0  # decoder-only models cache every block
    enc_block = _block_bytes(ctx, seq, cache=enc_cache)
    enc_frozen = _block_bytes(frozen_ctx, seq, cache=enc_cache)
    dec_block = dec_frozen = 0
    if arch.decoder_layers:
        dec_block = _block_bytes(ctx, seq, cache=cache, cross_seq=seq)
        dec_frozen = _block_bytes(frozen_ctx, seq, cache=cache, cross_seq=seq)
    stacks = 2 if arch.decoder_layers else 1
    emb = _embedding_bytes(ctx, seq) * stacks if act.embeddings else 0
    if ckpt:
        n = act.enc + act.enc_frozen + act.dec + act.dec_frozen
        blocks = n * _checkpoint_input_bytes(ctx, seq) + _checkpoint_bias_bytes(ctx, seq)
        recompute = max(enc_block if act.enc else 0, enc_frozen if act.enc_frozen else 0,
                        dec_block if act.dec else 0, dec_frozen if act.dec_frozen else 0)
    else:
        blocks = (act.enc * enc_block + act.enc_frozen * enc_frozen + act.dec * dec_block
                  + act.dec_frozen * dec_frozen)
        if ctx.kernel == "fused":
            blocks += _fused_bias_bytes(ctx, seq, act.dec + act.dec_frozen)
        recompute = 0
    saved = emb + blocks + _final_bytes(ctx, seq)
    if arch.decoder_layers:
        saved += _encoder_output_bytes(ctx, seq)
    top = dec_block if act.dec else (enc_block if act.enc else 0)
    bottom = enc_block if act.enc else dec_block if act.dec else 0
    if ckpt:
        bottom = recompute + _checkpoint_input_bytes(ctx, seq)
    lm = arch.head in ("causal-lm", "masked-lm", "seq2seq") and arch.vocab
    logits = ctx.b * seq * arch.vocab if lm and arch.vocab else 0
    output_cache = 0
    if cache and arch.family == "llama" and ctx.autocast and ctx.kernel != "math":
        # every layer's cached rotary K, fp32 under autocast: the kernel saves its 16-bit cast
        output_cache = arch.layers * ctx.b * seq * arch.kv_heads * arch.head_dim * _F32
    return _Activations(saved=saved, top_block=top, bottom_block=bottom, recompute=recompute,
                        logits=logits, tokens=seq, embedding=emb, idle=act.idle,
                        output_cache=output_cache)


def _autocast_weight_bytes(inv: _Inventory, ctx: _Ctx, idle: frozenset[int]) -> int:
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


def _head_grad_bytes(inv: _Inventory, grad: list[bool], spec: TrainingSpec) -> int:
    """Gradient of the output head's weight, made first in backward (``V × h``)."""
    if inv.head is None or not grad[inv.head]:
        return 0
    return _param_size(inv, inv.head, spec.precision.param_dtype.itemsize)


# =========================================================================== phases


def _loss_elem(ctx: _Ctx) -> int:
    """Bytes per element of the ``log_softmax`` that cross-entropy saves: fp32 when the logits
    are upcast (transformers' ``ForCausalLMLoss`` calls ``logits.float()``; CPU autocast runs
    ``cross_entropy_loss`` in fp32), else the logits' own dtype (``CrossEntropyLoss`` of BERT's,
    T5's, BART's heads and of plain models; on CUDA see :func:`_cuda_low_precision_loss`)."""
    a = ctx.arch
    upcast = a.head == "causal-lm" and a.family != "torch"
    if _cuda_low_precision_loss(ctx):
        return ctx.c
    return _F32 if (upcast or ctx.autocast) else ctx.c


def _cuda_low_precision_loss(ctx: _Ctx) -> bool:
    """Cross-entropy of 16-bit logits under CUDA's autocast, which does not list
    ``cross_entropy_loss`` (the CPU's runs it in fp32): its composite calls ``log_softmax`` with
    the logits' own dtype (``aten/src/ATen/native/LossNLL.cpp``), which keeps it 16-bit, and
    ``nll_loss``, on the fp32 list, saves an fp32 copy of it. Not for logits that are fp32 already:
    ``ForCausalLMLoss`` upcasts them, BART-like heads add their fp32 ``final_logits_bias``."""
    a = ctx.arch
    upcast = (a.head == "causal-lm" and a.family != "torch") or a.family == "bart"
    return ctx.cuda and ctx.autocast and ctx.c < _F32 and not upcast


def _loss_saved_bytes(ctx: _Ctx, logits: int) -> int:
    """What cross-entropy saves for backward: the ``log_softmax`` output, and on CUDA with 16-bit
    logits also ``nll_loss``'s fp32 copy of it."""
    return logits * (_loss_elem(ctx) + (_F32 if _cuda_low_precision_loss(ctx) else 0))


def _loss_forward_bytes(ctx: _Ctx, logits: int) -> int:
    """Peak of the loss in the forward pass: the logits, their fp32 upcast copy and the
    ``log_softmax`` output that cross-entropy saves (REFERENCES.md: "logits add 4·s·b·v for fp32
    (and the loss often copies them)"); on CUDA with 16-bit logits, the logits and what
    :func:`_loss_saved_bytes` keeps."""
    if _cuda_low_precision_loss(ctx):
        return logits * ctx.c + _loss_saved_bytes(ctx, logits)
    e = _loss_elem(ctx)
    upcast = logits * e if e > ctx.c else 0
    return logits * ctx.c + upcast + logits * e


def _loss_backward_bytes(ctx: _Ctx, logits: int) -> int:
    """Peak of the loss in backward: the saved ``log_softmax`` output, the gradient of
    ``nll_loss`` and the gradient of ``log_softmax``, each the size of the logits; on CUDA with
    16-bit logits, the saved tensors and ``nll_loss``'s fp32 gradient."""
    if _cuda_low_precision_loss(ctx):
        return _loss_saved_bytes(ctx, logits) + logits * _F32
    return 3 * logits * _loss_elem(ctx)


def _block_forward_bytes(ctx: _Ctx, acts: _Activations) -> int:
    """The largest temporary of a block's forward that nothing saves: the raw attention scores
    next to their softmax under the math kernel, else one MLP-width intermediate."""
    a = ctx.arch
    rows = ctx.b * acts.tokens
    scores = 0
    if ctx.kernel != "fused":
        scores = ctx.b * a.heads * acts.tokens * acts.tokens * ctx.math_elem
    return max(rows * a.ffn * ctx.c, scores)


def _block_backward_bytes(ctx: _Ctx, acts: _Activations) -> int:
    """Temporaries while backward runs through a block: the gradient flowing down the residual
    stream and one MLP-width gradient (the block's saved tensors are freed node by node as its
    backward runs, which offsets the rest); for T5 on a fused kernel, the gradient of the
    position bias. An fp32 Python GELU (:func:`_fp32_gelu`) holds three fp32 MLP-width gradients
    at once in the backward of its last product (of the output, of 0.5·x before its cast, of
    1 + tanh), by when the second linear has freed its 16-bit input."""
    a = ctx.arch
    rows = ctx.b * acts.tokens
    grad_bias = 0
    if a.family == "t5" and ctx.kernel == "fused":
        # the fused kernel's gradient of T5's learned bias, batch-wide before it is summed
        grad_bias = ctx.b * a.heads * acts.tokens * acts.tokens * ctx.r
    mlp = 3 * _F32 - ctx.c if _fp32_gelu(ctx, a.activation) else ctx.c
    return rows * a.hidden * ctx.r + rows * a.ffn * mlp + grad_bias


def _embedding_backward_bytes(arch: Architecture, head_grad: int) -> int:
    """Extra bytes at the end of backward for a tied, trainable embedding: ``embedding_backward``
    makes a dense ``V × h`` gradient that is added to the head's out of place, so three tables
    are alive for a moment."""
    return 2 * head_grad if arch.tied_embeddings else 0


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
        ConfigError: when a token model has no ``seq_len``.
    """
    phases, notes = _phases(model, spec, training_loop=training_loop)
    name, peak = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = dict(peak)
    notes.append(f"formula: peak at the {name}")
    return breakdown, notes


def _phases(model: ResolvedModel, spec: TrainingSpec, *, training_loop: str = "pytorch",
            ) -> tuple[dict[str, dict[Category, int]], list[str]]:
    """Bytes per category at each moment of the step that can be the peak, and notes."""
    if training_loop not in ("pytorch", "lightning"):
        raise ConfigError(f"unknown training_loop {training_loop!r}; expected 'pytorch' or "
                          "'lightning'")
    module = model.module
    arch = inspect_architecture(module, model.config, name=model.name, needs="the formula")
    ctx = _ctx(arch, spec)
    inv = _inventory(module, arch)
    grad = [p.requires_grad for p in inv.params]
    trainable = [i for i, g in enumerate(grad) if g]
    notes: list[str] = []
    sizes = _sizes(inv, trainable, spec)
    params = _parameter_bytes(inv, spec)
    grads = sum(sizes)
    state, more = _optimizer_state_bytes(inv, trainable, sizes, spec)
    notes.extend(more)
    step_tmp = _optimizer_step_bytes(sizes, spec)
    acts = _activations(inv, arch, spec, ctx, grad)
    batch = _batch_bytes(arch, module, spec, ctx.b, acts.tokens)
    casts = _autocast_weight_bytes(inv, ctx, acts.idle)
    head_grad = _head_grad_bytes(inv, grad, spec)

    states = {Category.PARAMETERS: params, Category.OPTIMIZER_STATE: state}
    # Lightning zeroes gradients after the forward: last step's are alive through it
    old_grads = grads if training_loop == "lightning" else 0
    loss_fwd = _loss_forward_bytes(ctx, acts.logits)
    block_fwd = _block_forward_bytes(ctx, acts)
    kept = _loss_saved_bytes(ctx, acts.logits) if loss_fwd - block_fwd >= 0 else 0
    saved = acts.saved + batch + casts
    phases: dict[str, dict[Category, int]] = {
        "end of forward": {**states, Category.ACTIVATIONS: saved + kept + acts.output_cache,
                           Category.GRADIENTS: old_grads,
                           Category.TEMPORARY: max(loss_fwd - kept, block_fwd)},
    }
    if grads > 0:
        lsm = _loss_saved_bytes(ctx, acts.logits)  # log_softmax output, saved by the forward
        phases["start of backward"] = {**states, Category.ACTIVATIONS: saved + lsm,
                                       Category.TEMPORARY: _loss_backward_bytes(ctx, acts.logits)
                                       - lsm}
        phases["top block's backward"] = {
            **states, Category.ACTIVATIONS: saved + acts.recompute,
            Category.GRADIENTS: head_grad,
            Category.TEMPORARY: _block_backward_bytes(ctx, acts)}
        pre_grads = _gradient_bytes_of(inv, [i for i in inv.pre if grad[i]], spec)
        phases["bottom block's backward"] = {
            **states, Category.ACTIVATIONS: batch + acts.embedding + acts.bottom_block,
            Category.GRADIENTS: grads - pre_grads,
            Category.TEMPORARY: _block_backward_bytes(ctx, acts)}
        phases["end of backward"] = {
            **states, Category.ACTIVATIONS: batch + acts.embedding, Category.GRADIENTS: grads,
            Category.TEMPORARY: _embedding_backward_bytes(arch, head_grad)}
        phases["optimizer step"] = {**states, Category.ACTIVATIONS: batch,
                                    Category.GRADIENTS: grads, Category.TEMPORARY: step_tmp}
    notes.extend(_notes(arch, spec, ctx))
    return phases, notes


def _notes(arch: Architecture, spec: TrainingSpec, ctx: _Ctx) -> list[str]:
    notes: list[str] = []
    if arch.family == "torch":
        notes.append("plain torch model: its embedding and head are not known to the formula; "
                     "one LayerNorm after the blocks assumed")
    if ctx.kernel == "math":
        notes.append("attention dropout on the CPU: SDPA falls back to the math kernel, which "
                     "keeps the S×S attention matrices")
    if arch.use_cache and not spec.gradient_checkpointing:
        notes.append("the config has use_cache=True: the key/value cache returned by the forward "
                     "is counted until the output is dropped")
    return notes
