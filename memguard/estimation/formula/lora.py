"""What a block with LoRA adapters over frozen weights saves for backward.

Source: peft's ``LoraLayer`` forward (``peft/tuners/lora/layer.py``, ``Linear.forward``):
``result = self.base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``. The base layer's weight is
frozen, so it keeps no input (a frozen weight needs none; a bitsandbytes layer keeps only its
stored weight, see :mod:`memguard.estimation.quantization`); each adapter's ``lora_A`` keeps its input
and ``lora_B`` keeps ``lora_A``'s ``rank``-wide output. Adapters that read the same tensor (Q, K and
V read the attention norm's output; gate and up the MLP norm's) keep it once, or once each under
autocast (each casts its own copy, as :meth:`~memguard.estimation.formula.context.Ctx.linear_inputs`
says). The attention's output, which an adapted output projection reads, is saved by the fused
attention kernel already. A base in LLM.int8 keeps its layers' inputs too
(:mod:`memguard.estimation.quantization`).
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from memguard.estimation.formula.context import Ctx

__all__ = ["lora_block_bytes"]

_READS = {
    "hidden": ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "qkv_proj", "Wqkv", "in_proj",
               "gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h", "lin1", "wi", "wi_0", "wi_1"),
    "ffn": ("down_proj", "fc2", "w2", "dense_4h_to_h", "lin2", "wo"),
}
"""Which adapted layers read the hidden-width norm outputs and which the MLP's inner tensor
(transformers' names); anything else (an attention output projection) reads a tensor saved anyway."""


def lora_block_bytes(module: nn.Module, block: nn.Module, ctx: Ctx, rows: int) -> int | None:
    """Bytes one block's LoRA adapters add to the block's frozen layers for backward, or ``None`` when
    the block trains anything besides adapters (then it is counted as trainable)."""
    trainable = [n for n, p in block.named_parameters() if p.requires_grad]
    if not trainable or not all(".lora_" in f".{n}" or n.startswith("lora_") for n in trainable):
        return None
    readers: dict[str, int] = defaultdict(int)
    total = 0
    for name, m in block.named_modules():
        a = getattr(m, "lora_A", None)
        if not isinstance(a, nn.ModuleDict) or not hasattr(m, "base_layer"):
            continue
        for adapter in a.values():
            rank = getattr(adapter, "out_features", 0)
            total += rows * rank * ctx.c  # lora_A's output, saved by lora_B
        leaf = name.rsplit(".", 1)[-1]
        for source, names in _READS.items():
            if leaf in names:
                # Q/K/V and gate/up read the two norm outputs: one pair of groups per block
                group = "attn" if leaf in _READS["hidden"][:10] else "mlp"
                readers[f"{source}:{group}"] += len(a)
    for key, n in readers.items():
        width = ctx.arch.ffn if key.startswith("ffn") else ctx.arch.hidden
        total += ctx.linear_inputs(rows, width, n)
    return total + _int8_inputs(block, ctx, rows, set(readers))


def _int8_inputs(block: nn.Module, ctx: Ctx, rows: int, saved: set[str]) -> int:
    """Inputs that LLM.int8's ``MatMul8bitLt`` keeps for backward (``ctx.tensors = (CAt, subA, A)``), each
    tensor once, beyond those the adapters keep already (the same tensor without autocast)."""
    from memguard.estimation.quantization import QuantizedLinear

    kept: set[str] = set()
    for name, m in block.named_modules():
        if not isinstance(m, QuantizedLinear) or m.quantization.kind != "int8":
            continue
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        group = "attn" if leaf in _READS["hidden"][:10] or leaf in ("o_proj", "out_proj", "dense") else "mlp"
        source = "hidden" if leaf in _READS["hidden"] else "ffn" if leaf in _READS["ffn"] else "out"
        kept.add(f"{source}:{group}")
    total = 0
    for key in kept:
        if key in saved and not ctx.autocast:
            continue
        width = ctx.arch.ffn if key.startswith("ffn") else ctx.arch.hidden
        total += rows * width * (ctx.r if key.startswith("hidden") else ctx.c)
    return total
