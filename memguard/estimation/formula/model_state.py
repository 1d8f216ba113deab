"""Model-state bytes: parameters, gradients, optimizer state and the optimizer step's temporaries.

Source: EleutherAI, "Transformer Math 101" (bytes per parameter by dtype and optimizer; frozen
parameters have no gradient and no state), read against ``torch.optim``'s implementations. This is
the one place these sizes are computed: the formula's phases read :func:`model_state`, and
``memguard.estimation.estimator._distribute`` (sharding, DeepSpeed's master weights) reads
:func:`optimizer_state_bytes`, which is computed by it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from memguard.estimation.formula.context import F32
from memguard.estimation.formula.inventory import Inventory, inventory
from memguard.estimation.result import Category
from memguard.estimation.spec import ADAMW8BIT_BLOCK, ADAMW8BIT_MIN_SIZE, PAGED_MIN_NUMEL, TrainingSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelState", "model_state", "optimizer_state_bytes", "paged_state_bytes"]

_ADAM_LIKE = ("adam", "adamw", "adamw-fused", "adamw-foreach", "nadam", "radam", "adamax", "adadelta")
"""Optimizers whose state holds a step counter per parameter besides their full-size tensors."""


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Bytes of the model state of one training step.

    Attributes:
        parameters: parameters and buffers (:func:`_parameters`).
        gradients: ``.grad`` of every trainable parameter (:func:`_gradients`).
        optimizer_state: state kept between steps (:func:`_optimizer_state`).
        optimizer_step: temporaries of ``optimizer.step()`` (:func:`_optimizer_step`).
        notes: what was assumed (an unknown optimizer's state).
    """

    parameters: int
    gradients: int
    optimizer_state: int
    optimizer_step: int
    notes: tuple[str, ...] = ()

    def held(self) -> dict[Category, int]:
        """What is alive through every moment of the step: parameters and optimizer state."""
        return {Category.PARAMETERS: self.parameters, Category.OPTIMIZER_STATE: self.optimizer_state}


def model_state(inv: Inventory, spec: TrainingSpec, grad: list[bool] | None = None) -> ModelState:
    """The :class:`ModelState` of the module behind ``inv``.

    Args:
        inv: the module's :class:`~memguard.estimation.formula.inventory.Inventory`.
        spec: the optimizer and precision.
        grad: ``requires_grad`` of each parameter when already read; read now otherwise.
    """
    grad = inv.requires_grad() if grad is None else grad
    trainable = [i for i, g in enumerate(grad) if g]
    elem = spec.precision.param_bytes
    sizes = [inv.size(i, elem) for i in trainable]
    state, notes = _optimizer_state(inv, trainable, sizes, spec)
    return ModelState(parameters=_parameters(inv, elem), gradients=_gradients(sizes),
                      optimizer_state=state, optimizer_step=_optimizer_step(sizes, spec),
                      notes=tuple(notes))


def optimizer_state_bytes(module: nn.Module, spec: TrainingSpec) -> tuple[int, list[str]]:
    """Bytes of optimizer state kept between steps (:attr:`ModelState.optimizer_state`), and
    notes on what was assumed."""
    state = model_state(inventory(module), spec)
    return state.optimizer_state, list(state.notes)


def _parameters(inv: Inventory, elem: int) -> int:
    """Bytes of the parameters and buffers, floating point in ``elem``-byte elements.

    Floating-point tensors are counted in ``spec.precision.param_dtype`` (the 16-bit dtype for
    ``16-true``/``bf16-true``, fp32 for ``*-mixed`` and ``32-true``: EleutherAI, "Transformer Math
    101", mixed precision keeps fp32 master weights); integer buffers in their own dtype. Tied
    weights are one ``Parameter`` and are counted once (``module.parameters()`` deduplicates).
    Works on modules built on the meta device.
    """
    return ((sum(inv.float_numel) + inv.buffer_float) * elem + sum(inv.other_bytes)
            + inv.buffer_other)


def _gradients(sizes: list[int]) -> int:
    """Bytes of ``.grad`` of the trainable parameters, whose bytes are ``sizes``: one per
    parameter, in its dtype.

    Source: EleutherAI, "Transformer Math 101" (gradients are stored in the parameter's dtype;
    frozen parameters, ``requires_grad=False``, get none).
    """
    return sum(sizes)


def _optimizer_state(inv: Inventory, trainable: list[int], sizes: list[int],
                     spec: TrainingSpec) -> tuple[int, list[str]]:
    """Bytes of optimizer state of the ``trainable`` parameters (of ``sizes`` bytes), and notes.

    ``torch.optim`` allocates its state with ``zeros_like(param)``, so each full-size state tensor
    costs as much as the trainable parameter it belongs to (EleutherAI, "Transformer Math 101":
    AdamW 2 tensors, momentum SGD 1, plain SGD none; Adafactor rows + columns of each matrix,
    :attr:`Inventory.factored`). Adam-like optimizers and Adafactor add a 4-byte ``step`` tensor
    per parameter. 8-bit AdamW: :func:`_quantized_state`.
    """
    notes: list[str] = []
    opt = spec.optimizer
    if opt.factory is None:
        return 0, notes
    elem = spec.precision.param_bytes
    if opt.factored:
        total = sum(inv.factored[i] * elem for i in trainable)
        return total + F32 * len(trainable), notes
    if opt.quantized:
        return sum(_quantized_state(inv.numel[i]) for i in trainable), notes
    if opt.paged:  # bitsandbytes' 32-bit PagedAdamW: two fp32 moments whatever the dtype, no step tensor
        return sum(2 * F32 * inv.numel[i] for i in trainable), notes
    k = opt.state_tensors
    if k is None:
        k = 2
        notes.append(f"unknown optimizer {opt.name!r}: assumed Adam's 2 full-size state tensors "
                     "per trainable parameter")
    total = k * sum(sizes)
    if opt.name in _ADAM_LIKE or opt.state_tensors is None:
        total += F32 * len(trainable)
    return total, notes


def _quantized_state(numel: int) -> int:
    """8-bit AdamW (bitsandbytes; Dettmers et al. 2022): two ``uint8`` moments and one fp32 absmax
    per 2048-element block each; parameters under 4096 elements keep two fp32 moments."""
    if numel < ADAMW8BIT_MIN_SIZE:
        return 2 * F32 * numel
    return 2 * numel + 2 * F32 * -(-numel // ADAMW8BIT_BLOCK)


def paged_state_bytes(inv: Inventory, spec: TrainingSpec) -> int:
    """Bytes of a paged optimizer's state that bitsandbytes puts in CUDA managed memory, for the module
    behind ``inv`` (its :class:`~memguard.estimation.formula.inventory.Inventory`).

    ``Optimizer8bit.get_state_buffer`` pages the moments of parameters of at least
    :data:`~memguard.estimation.spec.PAGED_MIN_NUMEL` elements (``F.get_paged``, ``cudaMallocManaged``);
    the block absmax of the 8-bit one and the state of smaller parameters are ordinary CUDA tensors.
    """
    if not spec.optimizer.paged:
        return 0
    per_element = 2 if spec.optimizer.quantized else 2 * F32
    return sum(per_element * n for n, g in zip(inv.numel, inv.grad, strict=True)
               if g and n >= PAGED_MIN_NUMEL and (not spec.optimizer.quantized or n >= ADAMW8BIT_MIN_SIZE))


def _optimizer_step(sizes: list[int], spec: TrainingSpec) -> int:
    """Temporary bytes of ``optimizer.step()`` on top of parameters, gradients and state.

    On CUDA ``torch.optim`` defaults to its ``foreach`` implementation, whose intermediates are
    full lists: Adam/AdamW's ``torch._foreach_sqrt(exp_avg_sqs)`` is one more copy of every
    trainable parameter (``torch/optim/adam.py``, ``_multi_tensor_adam``; RMSprop and Adagrad
    likewise take the square root of their one state). On the CPU the single-tensor loop runs:
    Adam's ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)`` holds two temporaries of the largest
    parameter. ``torch.optim.Adafactor`` takes its single-tensor loop on every device unless
    ``foreach=True`` is passed (``torch/optim/_adafactor.py``, ``adafactor``: ``if foreach:``),
    where ``row_var @ col_var`` is one temporary of the largest matrix. SGD, with or without
    momentum, updates in place. ``fused=True`` (``adamw-fused``: ``_fused_adam`` calls
    ``torch._fused_adamw_``, one kernel that reads and writes parameters, gradients and both
    moments in place) makes no temporary; ``foreach=True`` (``adamw-foreach``) is the CUDA list
    on every device.
    """
    opt = spec.optimizer
    if opt.factory is None or not sizes or opt.name in ("sgd", "sgd-momentum") or opt.quantized or opt.paged:
        return 0  # SGD in place; bitsandbytes' fused kernels update block by block in place
    if opt.implementation == "fused":
        return 0
    if opt.factored:
        return max(sizes)
    if spec.device == "cuda" or opt.implementation == "foreach":
        return sum(sizes)
    adam = opt.state_tensors is None or opt.state_tensors >= 2 or opt.name in _ADAM_LIKE
    return (2 if adam else 1) * max(sizes)
