"""The cost model that ranks what fits: :data:`COSTS`, stated in words as :data:`COST_MODEL`.

Each configuration is charged against the user's settings (:class:`CostContext`), term by term
(:func:`cost_terms`); :func:`lower_bound` is the least a search state can cost, which lets the
search stop early.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from memguard.planning.rows import Knobs

__all__ = ["COSTS", "COST_MODEL", "CostContext", "cost_of", "cost_terms", "divisors", "fewest_micro_batches",
           "lower_bound"]

COSTS: dict[str, Any] = {
    "recompute": 0.33, "micro_batch_tokens": 256, "gpu": 1.0, "sharded_communication": 0.05,
    "precision_numerics": {"bf16-mixed": 0.02, "16-mixed": 0.03, "bf16-true": 0.15, "16-true": 0.2},
    "precision_speed": {"32-true": 1.0, "64-true": 4.0},
    "optimizer_quality": {"adamw-8bit": 0.05, "adafactor": 0.1, "sgd-momentum": 0.3, "sgd": 0.5},
    "pcie_bytes_per_s": 25e9, "host_bytes_per_s": 50e9, "host_step_bytes_per_param": 32, "gpu_flops": 125e12,
    "lora_rank": 0.02, "quantized_base": 0.5, "new_strategy": 0.1, "lora": 0.1,
}
"""The cost model's constants, in units where 1.0 is about one more step time (absent names: 0).

* ``recompute``: checkpointing runs each block's forward again, a third of forward + backward
  (Chen et al. 2016; Korthikanti et al. 2022 measure 30-40%).
* ``micro_batch_tokens``: a micro-batch costs as much as this many more tokens (it reads every
  weight again; A100 roofline 312 TFLOPS / 2 TB/s = 156 FLOPs per byte), so ``a`` micro-batches of
  ``T`` tokens per device cost ``(a - 1) * 256 / (T + 256)``; 256 tokens per sample without a length.
* ``precision_numerics``: bf16-true loses weight updates below bf16's resolution (Zamirai et al.
  2020); ``precision_speed``: fp32 matmuls run at about half the bf16 rate (TF32).
* ``optimizer_quality``: a judgement of the distance from AdamW in fine-tuning (8-bit AdamW
  matches it closely, Dettmers et al. 2022; SGD lags on transformers).
* ``gpu``: GPUs beyond the run's own, among those you own (``gpus``), per multiple of the run's
  (1 -> 2 GPUs 1.0, 2 -> 4 1.0), linear in the count: GPUs another job cannot use meanwhile. The
  batch they split is not charged again (each GPU runs fewer micro-batches: a saving the
  micro-batch term shows); ``sharded_communication``: fsdp / deepspeed_stage_3 move 1.5x DDP's
  bytes (ZeRO paper).
* ``new_strategy``: adopting DeepSpeed or FSDP where the run uses neither: a dependency, its
  configuration, a sharded checkpoint format (Lightning's ``DeepSpeedStrategy``/``FSDPStrategy``
  save one file per rank) and the debugging of a new engine; a judgement, charged once.
* ``lora``: training LoRA adapters instead of every weight: LoRA learns less than full
  fine-tuning on code and maths (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"), and
  QLoRA matches 16-bit LoRA (Dettmers et al. 2023); a judgement, charged once from full training.
* offload: ``(PCIe bytes / pcie_bytes_per_s + host step) / compute``: the host step touches
  ``host_step_bytes_per_param`` per trainable parameter (fp32 weight, gradient, two moments, read
  and written) at ``host_bytes_per_s``; compute is ``6 N`` FLOPs per token (4 N for LoRA: frozen
  weights need no weight gradients; Kaplan et al. 2020) at ``gpu_flops`` (an A100 at 40% of peak),
  without recomputation, which is charged apart.
* ``lora_rank``: per halving of the rank below 64 (Hu et al. 2021: small ranks do nearly as well).
* ``quantized_base``: a bitsandbytes 4-bit or 8-bit base over a 16-bit one: every matmul dequantizes
  its weight. LitGPT's resource tables (``tutorials/resource-tables.md``, A100, bitsandbytes 0.41.1)
  time 1,000 LoRA iterations of Llama 2 7B at 2.36 min in bf16 and 3.68 / 3.83 min with NF4 / NF4 with
  double quantization (+56% / +62%; Llama 2 13B +100%, phi-1.5 +9%): about half a step. QLoRA matches
  16-bit LoRA's quality (Dettmers et al. 2023), so nothing more is charged.
"""

COST_MODEL = (
    "cost = sum of terms, each relative to your settings (a change that keeps speed and quality costs 0; 1.0 is "
    "about one more step time): gradient checkpointing +0.33 (recomputes the forward); a micro-batches of T "
    "tokens per GPU +(a-1)*256/(T+256); precision numerics bf16-mixed 0.02, 16-mixed 0.03, bf16-true 0.15, "
    "speed 32-true +1.0; optimizer quality 8-bit AdamW 0.05, Adafactor 0.10, SGD 0.50; GPUs beyond yours +1.0 "
    "per multiple of yours (1 -> 2 GPUs +1.0, 1 -> 4 +3.0), +0.05 for fsdp/deepspeed_stage_3 traffic; adopting "
    "DeepSpeed or FSDP +0.10 (a new engine, config and checkpoint format); offload "
    "(PCIe bytes at 25 GB/s + host optimizer step, 32 B/param at 50 GB/s) / compute (6 N FLOPs/token at 125 "
    "TFLOPS); LoRA instead of full fine-tuning +0.10 (it learns less), +0.02 per halving of the rank below 64; a "
    "4-bit or 8-bit base (QLoRA) +0.5 (dequantizing every weight). Not charged: host memory. Ranked by cost, then "
    "headroom; full fine-tuning, LoRA and QLoRA apart (they train different things, or over a different base)."
)


@dataclasses.dataclass(frozen=True)
class CostContext:
    """What the cost model needs to know about the run: the user's knobs, the model's size."""

    base: Knobs
    effective: int
    tokens_per_sample: int
    params: int
    trainable: Mapping[int | None, int]


def cost_terms(k: Knobs, ctx: CostContext) -> dict[str, float]:
    """What the cost model (:data:`COSTS`) charges for ``k`` against ``ctx.base``, zero terms left out."""
    base, c = ctx.base, COSTS

    def micro(knobs: Knobs) -> float:
        tokens = ctx.effective // knobs.world_size * ctx.tokens_per_sample
        return (knobs.accumulate - 1) * c["micro_batch_tokens"] / (tokens + c["micro_batch_tokens"])

    rank = c["lora_rank"] * math.log2(64 / k.lora_rank) if k.lora_rank and k.lora_rank != base.lora_rank else 0
    terms = {
        "recompute": c["recompute"] * (k.checkpointing and not base.checkpointing),
        "micro-batches": max(0.0, micro(k) - micro(base)),
        "precision": _more("precision_numerics", k.precision, base.precision)
        + _more("precision_speed", k.precision, base.precision),
        "optimizer": _more("optimizer_quality", k.optimizer, base.optimizer),
        "gpus": max(0.0, c["gpu"] * (k.world_size - base.world_size) / base.world_size),
        "communication": c["sharded_communication"] * (k.world_size > 1 and k.strategy.fully_sharded
                                                        and not base.strategy.fully_sharded),
        "offload": _offload_cost(k, ctx),
        "lora rank": max(0.0, rank),
        "lora": c["lora"] * (k.lora_rank is not None and base.lora_rank is None),
        "new strategy": c["new_strategy"] * (k.strategy.engine is not None
                                             and k.strategy.engine != base.strategy.engine),
        "quantized base": c["quantized_base"] * (k.quantization is not None and base.quantization is None),
    }
    return {name: round(v, 4) for name, v in terms.items() if v > 0}


def _more(table: str, mine: str, base: str) -> float:
    """How much more ``mine`` costs than ``base`` in ``COSTS[table]``; never below 0."""
    return max(0.0, COSTS[table].get(mine, 0.0) - COSTS[table].get(base, 0.0))


def _offload_cost(k: Knobs, ctx: CostContext) -> float:
    """Offload's PCIe traffic and host optimizer step over the step's compute (see :data:`COSTS`).

    ZeRO-Offload (Ren et al. 2021) sends each rank's gradient shard to the host and gets its updated
    parameters back once per optimizer step; parameter offload (ZeRO-Infinity, FSDP's ``CPUOffload``)
    brings the parameter shard over for every forward, recomputed forward and backward of every
    micro-batch. Elements are 16-bit under a 16-bit module (:attr:`Knobs.half_module`), else fp32.
    """
    base, c, n = ctx.base, COSTS, k.world_size
    same = (k.offload_optimizer, k.offload_params, n) == (base.offload_optimizer, base.offload_params, base.world_size)
    if not (k.offload_optimizer or k.offload_params) or same:
        return 0.0
    trainable, element = ctx.trainable[k.lora_rank], 2 if k.half_module else 4
    tokens = ctx.effective // n * ctx.tokens_per_sample
    compute = (4 if k.lora_rank else 6) * ctx.params * tokens / c["gpu_flops"]
    seconds = k.offload_optimizer * trainable / n * (2 * element / c["pcie_bytes_per_s"]
                                                     + c["host_step_bytes_per_param"] / c["host_bytes_per_s"])
    passes = (2 + k.checkpointing) * k.accumulate  # forward, recomputed forward, backward; every micro-batch
    seconds += k.offload_params * passes * element * ctx.params / n / c["pcie_bytes_per_s"]
    return seconds / compute


def cost_of(k: Knobs, ctx: CostContext) -> float:
    """The cost of ``k``: the sum of :func:`cost_terms`, rounded as rows show it."""
    return round(sum(cost_terms(k, ctx).values()), 4)


def lower_bound(state: Knobs, ctx: CostContext) -> float:
    """The least ``state`` can cost: with the fewest micro-batches (no term falls as they grow)."""
    return cost_of(dataclasses.replace(state, accumulate=fewest_micro_batches(state, ctx)), ctx)


def fewest_micro_batches(state: Knobs, ctx: CostContext) -> int:
    """The fewest micro-batches ``state`` can run: with the user's micro-batch, or all on each GPU."""
    per_device = ctx.effective // state.world_size
    return per_device // max(d for d in divisors(per_device) if d <= ctx.base.batch_size)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: the micro-batches that keep a per-device batch of ``n``."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
