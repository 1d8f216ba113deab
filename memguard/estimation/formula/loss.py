"""What the loss keeps of the logits: cross-entropy's ``log_softmax`` output, its upcast copies and
its gradients, often the largest single activations of a language model. The element sizes follow
transformers' loss functions and the autocast op lists of :mod:`memguard.estimation.cuda_rules`.
"""

from __future__ import annotations

from memguard.estimation.formula.context import F32, Ctx
from memguard.estimation.inputs import Head

__all__ = ["loss_backward_bytes", "loss_forward_bytes", "loss_saved_bytes"]


def _upcast_by_head(ctx: Ctx) -> bool:
    """The head upcasts its logits to fp32 itself: a causal-LM head of a family whose loss calls
    ``logits.float()`` (transformers' ``ForCausalLMLoss``)."""
    return ctx.arch.head is Head.CAUSAL_LM and ctx.fam.logits_upcast


def _loss_elem(ctx: Ctx) -> int:
    """Bytes per element of the ``log_softmax`` that cross-entropy saves: fp32 when the logits
    are upcast (transformers' ``ForCausalLMLoss`` calls ``logits.float()``; CPU autocast runs
    ``cross_entropy_loss`` in fp32), else the logits' own dtype (``CrossEntropyLoss`` of BERT's,
    T5's, BART's heads and of plain models; on CUDA see :func:`_cuda_low_precision_loss`)."""
    if _cuda_low_precision_loss(ctx):
        return ctx.c
    return F32 if (_upcast_by_head(ctx) or ctx.autocast) else ctx.c


def _cuda_low_precision_loss(ctx: Ctx) -> bool:
    """Cross-entropy of 16-bit logits under CUDA's autocast, which does not list
    ``cross_entropy_loss`` (the CPU's runs it in fp32): its composite calls ``log_softmax`` with
    the logits' own dtype (``aten/src/ATen/native/LossNLL.cpp``), which keeps it 16-bit, and
    ``nll_loss``, on the fp32 list, saves an fp32 copy of it. Not for logits that are fp32 already:
    ``ForCausalLMLoss`` upcasts them, BART-like heads add their fp32 ``final_logits_bias``."""
    upcast = _upcast_by_head(ctx) or ctx.fam.fp32_logits_bias
    return ctx.cuda and ctx.autocast and ctx.c < F32 and not upcast


def loss_saved_bytes(ctx: Ctx, logits: int) -> int:
    """What cross-entropy saves for backward over ``logits`` elements: the ``log_softmax``
    output, and on CUDA with 16-bit logits also ``nll_loss``'s fp32 copy of it."""
    return logits * (_loss_elem(ctx) + (F32 if _cuda_low_precision_loss(ctx) else 0))


def loss_forward_bytes(ctx: Ctx, logits: int) -> int:
    """Peak of the loss in the forward pass: the logits, their fp32 upcast copy and the
    ``log_softmax`` output that cross-entropy saves (REFERENCES.md: "logits add 4·s·b·v for fp32
    (and the loss often copies them)"); on CUDA with 16-bit logits, the logits and
    what :func:`loss_saved_bytes` keeps."""
    if _cuda_low_precision_loss(ctx):
        return logits * ctx.c + loss_saved_bytes(ctx, logits)
    e = _loss_elem(ctx)
    upcast = logits * e if e > ctx.c else 0
    return logits * ctx.c + upcast + logits * e


def loss_backward_bytes(ctx: Ctx, logits: int) -> int:
    """Peak of the loss in backward: the saved ``log_softmax`` output, the gradient of
    ``nll_loss`` and the gradient of ``log_softmax``, each the size of the logits; on CUDA with
    16-bit logits, the saved tensors and ``nll_loss``'s fp32 gradient."""
    if _cuda_low_precision_loss(ctx):
        return loss_saved_bytes(ctx, logits) + logits * F32
    return 3 * logits * _loss_elem(ctx)
