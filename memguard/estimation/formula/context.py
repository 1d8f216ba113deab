"""The dimensions and element sizes of one estimate, shared by every activation term.

:class:`Ctx` carries what each term needs besides its own shapes: the batch size, the bytes per
element of the residual stream and of matmul outputs, whether autocast and CUDA kernels run,
which attention kernel runs (:func:`attention_kernel`), the architecture and its family's block
layout (:mod:`memguard.estimation.families`).
"""

from __future__ import annotations

import dataclasses

from memguard.enums import StrEnum
from memguard.errors import ConfigError
from memguard.estimation.arch import Architecture
from memguard.estimation.families import Family
from memguard.estimation.formula.families import family_of
from memguard.estimation.spec import TrainingSpec

__all__ = ["F32", "I64", "AttentionKernel", "Ctx", "attention_kernel", "decoder_tokens", "make_ctx", "tokens"]

F32 = 4
"""Bytes of an fp32 element (statistics, upcast copies, optimizer steps)."""
I64 = 8
"""Bytes of an int64 element (token ids, labels, position buckets)."""


class AttentionKernel(StrEnum):
    """What the formula takes a training step's attention to run (:func:`attention_kernel`):
    ``str(AttentionKernel.FUSED) == "fused"``.

    ``FUSED``: a flash or memory-efficient kernel (CUDA's, :mod:`memguard.estimation.sdpa`, or the CPU's
    flash), which keeps its output and a log-sum-exp per row; ``MATH``: SDPA's math kernel, which keeps
    the S×S softmax and dropout mask; ``EAGER``: transformers' ``eager`` attention, in Python.
    """

    FUSED = "fused"
    MATH = "math"
    EAGER = "eager"


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Dimensions and element sizes of one estimate.

    Attributes:
        b: batch size.
        r: bytes per element of the residual stream and of norms (the parameter dtype; fp32 under
            mixed precision, where ``fp32 + bf16`` additions promote to fp32).
        c: bytes per element of matmul outputs (the autocast dtype under mixed precision).
        autocast: mixed precision (``torch.autocast``) is on.
        cuda: the step runs on a GPU (fused attention and dropout kernels, 1-byte masks).
        kernel: the :class:`AttentionKernel`, ``fused``, ``math`` or ``eager`` (see :func:`attention_kernel`).
        arch: the architecture.
        fam: its family's block layout.
        frozen: counting a frozen block that passes gradients down: its linear layers keep no
            inputs (a frozen weight needs no gradient), only what input gradients need.
        routing: the capacity factor of the MoE routing model (``TrainingSpec.moe_routing``).
        kept_inputs: the base's linear layers are LLM.int8 ones (``MatMul8bitLt``), which keep
            their input for backward even under a frozen weight, uncast (see :meth:`linear_inputs`).
        uncast: the base's quantized linear layers return their input's dtype, which autocast does
            not change (see :attr:`mlp_elem`).
    """

    b: int
    r: int
    c: int
    autocast: bool
    cuda: bool
    kernel: AttentionKernel
    arch: Architecture
    fam: Family
    frozen: bool = False
    routing: float = 1.0
    kept_inputs: bool = False
    uncast: bool = False

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
        keeps none, unless it is LLM.int8's (:attr:`kept_inputs`): bitsandbytes' ``MatMul8bitLt``
        saves its input ``A`` whenever the input needs a gradient (``if any(ctx.needs_input_grad[:2]):
        ctx.tensors = (CAt, subA, A)``, ``bitsandbytes/autograd/_functions.py``), in the dtype it
        came in (a custom ``autograd.Function``: autocast does not cast it), one tensor for all readers.
        """
        if self.frozen:
            return rows * width * self.r if self.kept_inputs else 0
        if self.autocast:
            return consumers * rows * width * self.c
        return rows * width * self.r

    @property
    def mlp_elem(self) -> int:
        """Bytes per element of the MLP's linear outputs: :attr:`c`, but in a frozen block of
        quantized layers that return their input's dtype (:attr:`uncast`) the input's (:attr:`r`):
        LLM.int8's ``MatMul8bitLt`` returns ``output.to(A.dtype)``, a custom ``autograd.Function``
        autocast does not enter (``bitsandbytes/autograd/_functions.py``), and so does the 4-bit
        stand-in's fused kernel (:class:`memguard.estimation.quantization.QuantizedLinear`, up to
        ``FUSED_MAX_ROWS`` rows); under mixed precision the MLP between them runs in fp32."""
        return self.r if self.frozen and self.uncast else self.c

    @property
    def math_elem(self) -> int:
        """Element size inside the math attention kernel: the CPU kernel upcasts 16-bit inputs
        to fp32 (``_scaled_dot_product_attention_math``)."""
        return F32 if (not self.cuda and self.c < F32) else self.c


def attention_kernel(arch: Architecture, spec: TrainingSpec) -> AttentionKernel:
    """Which :class:`AttentionKernel` a training step runs: ``fused``, ``math`` or ``eager``.

    transformers' ``eager`` implementation materialises the scores in Python. Under ``sdpa``
    (the default), CUDA runs flash or memory-efficient attention, which keep the output and a
    log-sum-exp per row only (Korthikanti et al. 2022: the 5·a·s²·b term disappears); the CPU has
    a flash kernel too, but it refuses ``dropout_p > 0``, so training with attention dropout
    falls back to the math kernel that keeps the S×S softmax and dropout mask
    (``aten/src/ATen/native/transformers/sdp_utils_cpp.cpp``, ``check_for_dropout``).
    """
    impl = arch.attn_implementation
    if impl == "eager":
        return AttentionKernel.EAGER
    if impl not in ("sdpa", "") or spec.device == "cuda":
        return AttentionKernel.FUSED
    return AttentionKernel.MATH if arch.attention_dropout > 0 else AttentionKernel.FUSED


def make_ctx(arch: Architecture, spec: TrainingSpec) -> Ctx:
    """The :class:`Ctx` of one estimate: element sizes from the precision (EleutherAI,
    "Transformer Math 101": fp32 master weights under mixed precision, 16-bit matmul outputs)."""
    prec = spec.precision
    r = prec.param_bytes
    c = prec.autocast_bytes if prec.autocast is not None else r
    return Ctx(b=spec.batch_size or 1, r=r, c=c, autocast=prec.autocast is not None,
               cuda=spec.device == "cuda", kernel=attention_kernel(arch, spec), arch=arch,
               fam=family_of(arch), routing=spec.moe_routing)


def tokens(arch: Architecture, spec: TrainingSpec) -> int:
    """Tokens per sample the blocks see: the image's patches (and class token) of a vision model,
    else ``spec.seq_len``.

    Raises:
        ConfigError: when a token model has no ``seq_len``.
    """
    if arch.image_tokens is not None:
        return arch.image_tokens
    if spec.seq_len is None:
        raise ConfigError(
            f"the formula needs seq_len for {arch.model_type} (tokens per sample); pass seq_len="
        )
    return spec.seq_len


def decoder_tokens(arch: Architecture, spec: TrainingSpec) -> int:
    """Tokens per sample an encoder-decoder's decoder sees: ``spec.decoder_seq_len`` (the labels'
    length), else the encoder's (:func:`tokens`); for other models, :func:`tokens`."""
    if arch.decoder_layers and spec.decoder_seq_len is not None:
        return spec.decoder_seq_len
    return tokens(arch, spec)
