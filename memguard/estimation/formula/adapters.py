"""What LoRA adapters save for backward on top of their frozen block.

peft's ``lora.Linear.forward`` (``peft/tuners/lora/layer.py``) runs the frozen base layer, then
``lora_B(lora_A(dropout(x))) * scaling`` for each active adapter. Memguard adds adapters without
dropout (``nn.Identity``), so what the adapter path saves is:

* ``lora_A``'s input ``x``, for the gradient of ``lora_A.weight`` (``rows × in``). Under autocast
  each ``F.linear`` casts its fp32 input itself and keeps its own 16-bit copy (autocast caches
  casts of leaf weights only, ``aten/src/ATen/autocast_mode.cpp``, ``cached_cast``), so every
  adapter keeps one; without autocast adapters that read the same tensor (Q and V of one
  attention) keep it once;
* ``lora_B``'s input, the rank-``r`` output of ``lora_A`` (``rows × r``);
* nothing for ``* scaling`` (a Python float).

The base layer, frozen, keeps no input (autograd saves ``self`` of ``mm`` only for the weight's
gradient): the block is counted as a frozen block (``Ctx.frozen``) plus :func:`adapter_bytes`. A
bitsandbytes base layer keeps only its stored weight (:mod:`memguard.estimation.quantization`). The
attention's output, which an adapted output projection reads, is saved by the fused attention kernel
already.

Only blocks whose trainable parameters are all LoRA weights are counted so
(:func:`memguard.estimation.formula.activations.block_activity`); a block that trains anything else
is counted as a trainable block.

LLM.int8's ``MatMul8bitLt`` keeps its input for backward even under a frozen weight
(``ctx.tensors = (CAt, subA, A)``, ``bitsandbytes/autograd/_functions.py``): counted with the
block (:meth:`memguard.estimation.formula.context.Ctx.linear_inputs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["adapter_bytes", "lora_weights"]


def lora_weights(module: nn.Module, index: dict[int, int]) -> dict[int, tuple[int, int]]:
    """``lora_A`` and ``lora_B`` weights of peft's LoRA layers: parameter index -> ``(in, r)`` for
    ``lora_A`` (its weight is ``r × in``), ``(0, 0)`` for ``lora_B`` (it saves nothing of its own
    beyond ``lora_A``'s output, counted with ``lora_A``)."""
    found: dict[int, tuple[int, int]] = {}
    for name, p in module.named_parameters():
        if id(p) not in index or p.dim() != 2:
            continue
        if ".lora_A." in name:
            found[index[id(p)]] = (p.shape[1], p.shape[0])
        elif ".lora_B." in name:
            found[index[id(p)]] = (0, 0)
    return found


def adapter_bytes(rows: int, shapes: tuple[tuple[int, int], ...], *, elem: int,
                  autocast: bool, inputs_kept: bool = False) -> int:
    """Bytes the adapters of one block save over ``rows`` tokens: ``shapes`` holds ``(in, r)`` of
    each trainable ``lora_A``; ``elem`` is the matmul dtype's element size.

    Without autocast the inputs of adapters with the same width are taken to be one tensor (the
    norm's output read by Q and V, peft's default targets); adapters on every linear layer of a
    block (``target_modules="all-linear"``) are then counted a little low. ``inputs_kept``: the base
    layers keep their inputs themselves (LLM.int8, :attr:`~memguard.estimation.formula.context.Ctx.kept_inputs`),
    counted with the block; without autocast the adapters read those same tensors.
    """
    if inputs_kept and not autocast:
        widths: list[int] = []
    else:
        widths = [w for w, _ in shapes] if autocast else sorted({w for w, _ in shapes})
    return rows * (sum(widths) + sum(r for _, r in shapes)) * elem
