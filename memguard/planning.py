"""``memguard.plan``: the cheapest way to make a training step fit a GPU, with numbers.

A run that does not fit has a few knobs: micro-batch and gradient accumulation (keeping the
effective batch), precision, gradient checkpointing, optimizer, LoRA, data-parallel strategy and
world size, offload. :func:`plan` searches them, keeps what fits and ranks it by a stated cost
model (:data:`COSTS`, :data:`COST_MODEL`); :func:`remedies` is the same engine asked what would make
one estimate fit, for ``memguard check`` and the callback.

Every combination of precision, optimizer, checkpointing and layout (strategy, world size,
offload) is a *state*; for each, the largest micro-batch that fits is found among the divisors of
the per-device effective batch, so the effective batch is kept exactly. States are visited fewest
changes first; one is skipped unestimated when a fit already found needs a subset of its changes
and no more accumulation (it could only be dominated), and such dominated rows are never shown.
The formula prunes (~2 ms an estimate once the model is inspected); the trace confirms the first
rows, and a row the trace finds too large is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from memguard.device import DeviceMemory, device_memory, resolve_budget
from memguard.errors import ConfigError, MemguardError
from memguard.estimation.estimator import estimate as _estimate
from memguard.estimation.models import ResolvedModel, add_lora, load_model
from memguard.estimation.parallel import resolve_parallelism
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.spec import positive_int, resolve_optimizer, resolve_precision
from memguard.units import format_bytes

__all__ = ["COSTS", "COST_MODEL", "FULL", "LORA", "Plan", "PlanRow", "plan", "remedies"]

FULL, LORA = "full fine-tuning", "LoRA"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "adamw-8bit", "adafactor", "sgd")
LORA_RANKS = (8, 16, 64)
_DS2, _DS3 = "deepspeed_stage_2", "deepspeed_stage_3"
_SINGLE = (("single", False, False), (_DS2, False, False), (_DS2, True, False), (_DS3, True, False),
           (_DS3, True, True), ("fsdp", True, True))
_MULTI = (("ddp", False, False), ("fsdp", False, False), ("fsdp", True, True), (_DS2, False, False),
          (_DS2, True, False), (_DS3, False, False), (_DS3, True, False), (_DS3, True, True))
"""(strategy, offload optimizer, offload parameters) searched on one GPU and on several. On one, a
sharded strategy serves offload (ZeRO-Offload, ZeRO-Infinity, FSDP's ``CPUOffload``, which offloads
parameters and gradients) or DeepSpeed's mixed precision (a 16-bit module, fp32 master weights)."""
_LEVEL = {"single": 0, "ddp": 1, "deepspeed_stage_1": 2, _DS2: 2, "fsdp_shard_grad_op": 2, "fsdp": 3,
          "fsdp_hybrid": 3, _DS3: 3}
"""How much of the model state a strategy shards: a lower level is a smaller change."""
_NO_BF16 = re.compile(r"\b(t4|v100|p100|p40|k80)\b", re.I)
"""GPUs without bfloat16 arithmetic (before Ampere): bf16 precisions are not proposed there."""
_OPT_NAMES = {"adamw": "AdamW", "adam": "Adam", "adamw-8bit": "8-bit AdamW", "adafactor": "Adafactor",
              "sgd": "SGD", "sgd-momentum": "SGD with momentum"}
_EXTRA_KEYS = ("example_input", "loss_fn", "step_fn", "training_loop", "set_to_none", "trace_timeout")
_BASE_KEYS = ("batch_size", "precision", "optimizer", "gradient_checkpointing", "strategy", "world_size",
              "offload_optimizer", "offload_params", "lora_rank", "accumulate_grad_batches")

COSTS: dict[str, Any] = {
    "recompute": 0.33, "micro_batch_tokens": 256, "gpu": 1.0, "sharded_communication": 0.05,
    "precision_numerics": {"bf16-mixed": 0.02, "16-mixed": 0.03, "bf16-true": 0.15, "16-true": 0.2},
    "precision_speed": {"32-true": 1.0, "64-true": 4.0},
    "optimizer_quality": {"adamw-8bit": 0.05, "adafactor": 0.1, "sgd-momentum": 0.3, "sgd": 0.5},
    "pcie_bytes_per_s": 25e9, "host_bytes_per_s": 50e9, "host_step_bytes_per_param": 32, "gpu_flops": 125e12,
    "lora_rank": 0.02,
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
* ``gpu``: GPUs beyond yours, per multiple of yours (1 -> 2 GPUs 1.0, 2 -> 4 1.0), linear in the count;
  ``sharded_communication``: fsdp / deepspeed_stage_3 move 1.5x DDP's bytes (ZeRO paper).
* offload: ``(PCIe bytes / pcie_bytes_per_s + host step) / compute``: the host step touches
  ``host_step_bytes_per_param`` per trainable parameter (fp32 weight, gradient, two moments, read
  and written) at ``host_bytes_per_s``; compute is ``6 N`` FLOPs per token (4 N for LoRA: frozen
  weights need no weight gradients; Kaplan et al. 2020) at ``gpu_flops`` (an A100 at 40% of peak),
  without recomputation, which is charged apart.
* ``lora_rank``: per halving of the rank below 64 (Hu et al. 2021: small ranks do nearly as well).
"""

COST_MODEL = (
    "cost = sum of terms, each relative to your settings (a change that keeps speed and quality costs 0; 1.0 is "
    "about one more step time): gradient checkpointing +0.33 (recomputes the forward); a micro-batches of T "
    "tokens per GPU +(a-1)*256/(T+256); precision numerics bf16-mixed 0.02, 16-mixed 0.03, bf16-true 0.15, "
    "speed 32-true +1.0; optimizer quality 8-bit AdamW 0.05, Adafactor 0.10, SGD 0.50; GPUs beyond yours +1.0 "
    "per multiple of yours (1 -> 2 GPUs +1.0, 1 -> 4 +3.0), +0.05 for fsdp/deepspeed_stage_3 traffic; offload "
    "(PCIe bytes at 25 GB/s + host optimizer step, 32 B/param at 50 GB/s) / compute (6 N FLOPs/token at 125 "
    "TFLOPS); LoRA +0.02 per halving of the rank below 64. Not charged: the work of adopting DeepSpeed or FSDP, "
    "host memory. Ranked by cost, then headroom; full fine-tuning and LoRA apart (they train different things)."
)


@dataclasses.dataclass(frozen=True)
class _Knobs:
    """One configuration of what the user controls."""

    precision: str
    optimizer: str
    checkpointing: bool
    strategy: str
    world_size: int
    offload_optimizer: bool
    offload_params: bool
    lora_rank: int | None
    batch_size: int = 1
    accumulate: int = 1

    def kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "precision": self.precision, "optimizer": self.optimizer,
                "gradient_checkpointing": self.checkpointing, "strategy": self.strategy,
                "world_size": self.world_size, "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params, "lora_rank": self.lora_rank,
                "accumulate_grad_batches": self.accumulate}

    def changes(self, base: _Knobs) -> list[str]:
        """What differs from ``base``, in words."""
        out = [f"LoRA rank {self.lora_rank}"] if self.lora_rank != base.lora_rank else []
        if (self.strategy, self.world_size) != (base.strategy, base.world_size):
            many = self.world_size > 1
            how = " (16-bit module, fp32 master weights)" if "mixed" in self.precision and _half(self) else ""
            out.append(f"{self.strategy} {'over' if many else 'on'} {self.world_size} GPU{'s' * many}{how}")
        out += ["optimizer offload"] * (self.offload_optimizer > base.offload_optimizer)
        out += ["parameter offload"] * (self.offload_params > base.offload_params)
        out += [self.precision] * (self.precision != base.precision)
        out += [_opt_name(self.optimizer)] * (self.optimizer != base.optimizer)
        if self.checkpointing != base.checkpointing:
            out.append("gradient checkpointing" if self.checkpointing else "no gradient checkpointing")
        if (self.batch_size, self.accumulate) != (base.batch_size, base.accumulate):
            out.append(f"batch {self.batch_size} x accumulate {self.accumulate}{' per GPU' * (self.world_size > 1)}")
        return out

    def flags(self, base: _Knobs, seq_len: int | None, device: str, margin: float) -> list[str]:
        """The arguments after ``memguard check MODEL --gpu G`` that reproduce this configuration."""
        out = ["--batch-size", str(self.batch_size)]
        out += ["--accumulate-grad-batches", str(self.accumulate)] * (self.accumulate != 1)
        out += ["--seq-len", str(seq_len)] * (seq_len is not None)
        optimizer = self.optimizer if isinstance(self.optimizer, str) else self.optimizer.__name__.lower()
        out += ["--precision", self.precision, "--optimizer", optimizer]
        if self.checkpointing or base.checkpointing:
            out.append("--gradient-checkpointing" if self.checkpointing else "--no-gradient-checkpointing")
        out += ["--strategy", self.strategy] * (self.strategy != "single")
        out += ["--world-size", str(self.world_size)] * (self.world_size != 1)
        out += ["--offload-optimizer"] * self.offload_optimizer + ["--offload-params"] * self.offload_params
        out += ["--lora-rank", str(self.lora_rank)] * bool(self.lora_rank)
        out += ["--device", device] * (device != "cuda")
        return out + ["--margin", f"{margin:g}"] * (margin != 0.1)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One configuration that fits.

    Attributes:
        group: :data:`FULL` or :data:`LORA`.
        changes: what differs from the user's settings, in words (empty: as asked).
        settings: keyword arguments of :func:`memguard.estimate` that, with the model and
            ``method=``:attr:`method`, give :attr:`total_bytes` again.
        total_bytes: what must be free on each GPU; headroom_bytes: usable memory left over.
        cost: the sum of :attr:`cost_terms`, what the cost model (:data:`COST_MODEL`) charged.
        method: ``"formula"`` or ``"trace"``: which estimator gave :attr:`total_bytes`.
        flags: arguments of ``memguard check MODEL --gpu G`` that reproduce the configuration.
        host_bytes: host memory per rank for what is offloaded.
    """

    group: str
    changes: list[str]
    settings: dict[str, Any]
    total_bytes: int
    headroom_bytes: int
    cost: float
    cost_terms: dict[str, float]
    method: str
    flags: list[str]
    host_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an optimizer class in :attr:`settings` by its name."""
        data = dataclasses.asdict(self)
        data["settings"]["optimizer"] = _opt_name(self.settings["optimizer"], display=False)
        return data

    def describe(self) -> str:
        """One line for a message: what changes, what it needs and leaves, its cost."""
        host = f", {format_bytes(self.host_bytes)} of host memory" if self.host_bytes else ""
        return (f"{', '.join(self.changes) or 'as asked'}: needs {format_bytes(self.total_bytes)} ({self.method}), "
                f"{format_bytes(self.headroom_bytes)} to spare{host}, cost {self.cost:.2f}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan` found: the configurations that fit, best first within each group.

    Attributes:
        rows: the user's group (full fine-tuning, or LoRA when the run is LoRA), by cost then
            headroom, then the other group's.
        cost_model: :data:`COST_MODEL`; asked: the user's settings and their estimate.
        fits_as_is: whether the asked configuration fits.
        effective_batch: samples per optimizer step over all GPUs, kept by every row.
        notes: what was skipped or could not be estimated; estimates, seconds: the search's work.
    """

    rows: list[PlanRow]
    cost_model: str
    asked: dict[str, Any]
    fits_as_is: bool
    model: str
    gpu: DeviceMemory
    margin: float
    usable_bytes: int
    effective_batch: int
    notes: list[str]
    estimates: int
    seconds: float

    def group(self, name: str) -> list[PlanRow]:
        return [r for r in self.rows if r.group == name]

    def best(self, n: int = 3) -> list[PlanRow]:
        """``n`` rows taken in turn from each group, the user's group first."""
        groups = [self.group(g) for g in dict.fromkeys(r.group for r in self.rows)]
        return [r for tier in itertools.zip_longest(*groups) for r in tier if r is not None][:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the rows as :meth:`PlanRow.to_dict`, the GPU as :meth:`DeviceMemory.to_dict`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("rows", "gpu")}
        settings = {**self.asked["settings"], "optimizer": _opt_name(self.asked["settings"]["optimizer"], False)}
        return {**data, "asked": {**self.asked, "settings": settings}, "gpu": self.gpu.to_dict(),
                "rows": [r.to_dict() for r in self.rows]}

    def table(self, top: int = 10) -> str:
        """The plan as text: the ask, up to ``top`` rows per group with their flags, the cost model."""
        ask = self.asked
        verdict = (f"fits, {format_bytes(ask['headroom_bytes'])} to spare" if self.fits_as_is
                   else f"DOES NOT FIT, {format_bytes(-ask['headroom_bytes'])} short")
        lines = [f"memguard plan: {self.model}, seq {ask['settings']['seq_len']}, effective batch "
                 f"{self.effective_batch}",
                 f"GPU: {self.gpu.name}, {format_bytes(self.usable_bytes)} usable "
                 f"({format_bytes(self.gpu.free_bytes)} free less a {self.margin:.0%} margin)",
                 f"asked: {_summary(ask['settings'])}: needs {format_bytes(ask['total_bytes'])} "
                 f"({ask['method']}): {verdict}"]
        for name in dict.fromkeys(r.group for r in self.rows):
            rows = self.group(name)
            lines += ["", f"{name}: the {min(top, len(rows))} cheapest configurations that fit",
                      f"{'#':>3}  {'cost':>5}  {'needs':>10}  {'headroom':>10}  {'by':<7}  changes"]
            for i, r in enumerate(rows[:top], 1):
                host = f" (host {format_bytes(r.host_bytes)})" if r.host_bytes else ""
                lines += [f"{i:>3}  {r.cost:>5.2f}  {format_bytes(r.total_bytes):>10}  "
                          f"{format_bytes(r.headroom_bytes):>10}  {r.method:<7}  "
                          f"{', '.join(r.changes) or 'as asked'}{host}", f"{'':>5}flags: {' '.join(r.flags)}"]
        lines += ["", "nothing searched fits this GPU"] * (not self.rows)
        lines += ["", self.cost_model, *(f"note: {n}" for n in self.notes)]
        return "\n".join([*lines, f"searched with {self.estimates} estimates in {self.seconds:.1f} s"])

    def __str__(self) -> str:
        return self.table()


def _opt_name(optimizer: Any, display: bool = True) -> str:
    """An optimizer's name: ours in words (``display``) or as given, a class's ``__name__``."""
    if isinstance(optimizer, str):
        return _OPT_NAMES.get(optimizer, optimizer) if display else optimizer
    return optimizer.__name__


def _summary(s: Mapping[str, Any]) -> str:
    accumulate = f" x accumulate {s['accumulate_grad_batches']}" if s["accumulate_grad_batches"] != 1 else ""
    parts = [f"batch {s['batch_size']}{accumulate}", s["precision"], _opt_name(s["optimizer"])]
    parts += ["gradient checkpointing"] * bool(s["gradient_checkpointing"])
    parts += [f"{s['strategy']} x {s['world_size']}"] * (s["strategy"] != "single")
    return ", ".join(parts + [f"LoRA rank {s['lora_rank']}"] * bool(s["lora_rank"]))


# -- the cost model --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Context:
    """What the cost model needs to know about the run: the user's knobs, the model's size."""

    base: _Knobs
    effective: int
    tokens_per_sample: int
    params: int
    trainable: Mapping[int | None, int]


def _cost_terms(k: _Knobs, ctx: _Context) -> dict[str, float]:
    """What the cost model (:data:`COSTS`) charges for ``k`` against ``ctx.base``, zero terms left out."""
    base, c = ctx.base, COSTS

    def micro(knobs: _Knobs) -> float:
        tokens = ctx.effective // knobs.world_size * ctx.tokens_per_sample
        return (knobs.accumulate - 1) * c["micro_batch_tokens"] / (tokens + c["micro_batch_tokens"])

    full_shard = (_DS3, "fsdp", "fsdp_hybrid")
    rank = c["lora_rank"] * math.log2(64 / k.lora_rank) if k.lora_rank and k.lora_rank != base.lora_rank else 0
    terms = {
        "recompute": c["recompute"] * (k.checkpointing and not base.checkpointing),
        "micro-batches": max(0.0, micro(k) - micro(base)),
        "precision": _more("precision_numerics", k.precision, base.precision)
        + _more("precision_speed", k.precision, base.precision),
        "optimizer": _more("optimizer_quality", k.optimizer, base.optimizer),
        "gpus": max(0.0, c["gpu"] * (k.world_size - base.world_size) / base.world_size),
        "communication": c["sharded_communication"] * (k.world_size > 1 and k.strategy in full_shard
                                                        and base.strategy not in full_shard),
        "offload": _offload_cost(k, ctx),
        "lora rank": max(0.0, rank),
    }
    return {name: round(v, 4) for name, v in terms.items() if v > 0}


def _more(table: str, mine: str, base: str) -> float:
    """How much more ``mine`` costs than ``base`` in ``COSTS[table]``; never below 0."""
    return max(0.0, COSTS[table].get(mine, 0.0) - COSTS[table].get(base, 0.0))


def _half(k: _Knobs) -> bool:
    """Whether the module's weights are 16-bit: a 16-bit precision, or DeepSpeed's mixed precision."""
    return k.precision in ("bf16-true", "16-true") or (k.strategy.startswith("deepspeed") and "mixed" in k.precision)


def _offload_cost(k: _Knobs, ctx: _Context) -> float:
    """Offload's PCIe traffic and host optimizer step over the step's compute (see :data:`COSTS`).

    ZeRO-Offload (Ren et al. 2021) sends each rank's gradient shard to the host and gets its updated
    parameters back once per optimizer step; parameter offload (ZeRO-Infinity, FSDP's ``CPUOffload``)
    brings the parameter shard over for every forward, recomputed forward and backward of every
    micro-batch. Elements are 16-bit under a 16-bit module (:func:`_half`), else fp32.
    """
    base, c, n = ctx.base, COSTS, k.world_size
    same = (k.offload_optimizer, k.offload_params, n) == (base.offload_optimizer, base.offload_params, base.world_size)
    if not (k.offload_optimizer or k.offload_params) or same:
        return 0.0
    trainable, element = ctx.trainable[k.lora_rank], 2 if _half(k) else 4
    tokens = ctx.effective // n * ctx.tokens_per_sample
    compute = (4 if k.lora_rank else 6) * ctx.params * tokens / c["gpu_flops"]
    seconds = k.offload_optimizer * trainable / n * (2 * element / c["pcie_bytes_per_s"]
                                                     + c["host_step_bytes_per_param"] / c["host_bytes_per_s"])
    passes = (2 + k.checkpointing) * k.accumulate  # forward, recomputed forward, backward; every micro-batch
    seconds += k.offload_params * passes * element * ctx.params / n / c["pcie_bytes_per_s"]
    return seconds / compute


# -- the search ------------------------------------------------------------------------------


def _no_more_intrusive(a: _Knobs, c: _Knobs, base: _Knobs) -> bool:
    """Whether ``a`` changes nothing ``c`` leaves as ``base`` has it, nor more in degree (so it costs no more)."""
    same = ("precision", "optimizer", "checkpointing", "offload_optimizer", "offload_params")
    if any(getattr(a, f) not in (getattr(base, f), getattr(c, f)) for f in same):
        return False
    if a.strategy not in (base.strategy, c.strategy) and _LEVEL[a.strategy] >= _LEVEL.get(c.strategy, 0):
        return False
    rank_ok = a.lora_rank == c.lora_rank or (a.lora_rank or 0) >= (c.lora_rank or 0) > 0
    # Offload costs less over more GPUs: offloading rows compare on the same count only.
    world_ok = a.world_size == c.world_size or (a.world_size < c.world_size
                                                and not (a.offload_optimizer or a.offload_params))
    return rank_ok and world_ok and a.accumulate <= c.accumulate


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


_Found = tuple[str, _Knobs, MemoryEstimate]
"""A configuration that fits: its group, knobs and estimate."""


class _Search:
    """Estimates the configurations of one run, remembered, and finds what fits."""

    def __init__(self, setup: _Setup, ctx: _Context) -> None:
        self.setup, self.ctx, self.seq_len = setup, ctx, setup.seq_len
        self.usable = int(setup.gpu.free_bytes * (1 - setup.margin))
        self.cache: dict[tuple[_Knobs, str], MemoryEstimate | None] = {}
        self.count, self.notes, self.method = 0, [], setup.method
        self.failed: dict[str, list[Any]] = {}  # message -> [count, first configuration]

    def module(self, rank: int | None) -> Any:
        """The module with LoRA adapters of ``rank`` (``None``: as given), built on first use."""
        if rank not in self.setup.modules:
            self.setup.modules[rank] = add_lora(load_model(self.setup.model), rank).module
            self.ctx.trainable[rank] = sum(p.numel() for p in self.setup.modules[rank].parameters() if p.requires_grad)
        return self.setup.modules[rank]

    def estimate(self, k: _Knobs, method: str, *, strict: bool = False) -> MemoryEstimate | None:
        """The estimate of ``k``; ``None`` when the estimator cannot make it (the reason noted once)."""
        if (k, method) not in self.cache:
            self.count += 1
            kwargs = {**k.kwargs(), "lora_rank": None}  # the module already has its adapters
            try:
                self.cache[(k, method)] = _estimate(self.module(k.lora_rank), seq_len=self.seq_len,
                                                    device=self.setup.device, method=method, **kwargs,
                                                    **self.setup.extra)
            except MemguardError as exc:
                if strict:
                    raise
                seen = self.failed.setdefault(f"{exc} ({method})", [0, ", ".join(k.changes(self.ctx.base))])
                seen[0] += 1
                self.cache[(k, method)] = None
        return self.cache[(k, method)]

    def all_notes(self) -> list[str]:
        """The setup's notes, the search's, and one per reason estimates failed."""
        failed = [f"{n} configuration{'s' * (n > 1)} (e.g. {what or 'as asked'}) cannot be estimated: {why}"
                  for why, (n, what) in self.failed.items()]
        return self.setup.notes + self.notes + failed

    def fits(self, est: MemoryEstimate | None) -> bool:
        return est is not None and est.fits(self.setup.gpu.free_bytes, self.setup.margin)

    def fit(self, state: _Knobs) -> tuple[_Knobs, MemoryEstimate] | None:
        """The largest micro-batch that fits: a divisor of the per-device batch, at most the user's."""
        per_device = self.ctx.effective // state.world_size
        sizes = [d for d in _divisors(per_device) if d <= self.ctx.base.batch_size]
        tried: dict[int, tuple[_Knobs, MemoryEstimate] | None] = {}

        def at(i: int) -> bool:
            k = dataclasses.replace(state, batch_size=sizes[i], accumulate=per_device // sizes[i])
            est = self.estimate(k, self.method)
            tried[i] = (k, est) if est is not None and self.fits(est) else None
            return tried[i] is not None

        if not at(0):
            return None
        if len(sizes) > 1 and at(len(sizes) - 1):
            return tried[len(sizes) - 1]
        lo, hi = 0, len(sizes) - 1  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid) else (lo, mid)
        return tried[lo]

    def search(self, group: str, states: Sequence[_Knobs], ranks: Sequence[int | None], keep: int) -> list[_Found]:
        """The best fit of each state (trying ``ranks`` in turn) that may be among the ``keep`` cheapest.

        ``states`` come cheapest first by the least they can cost; the search stops at the first that
        costs more than the ``keep``-th cheapest fit kept, and skips one that could only be dominated.
        """
        base, found, bound = self.ctx.base, [], math.inf
        for state in states:
            if self.count >= self.setup.max_estimates:
                self.notes.append(f"the search stopped at max_estimates={self.setup.max_estimates}")
                break
            if _lower_bound(state, self.ctx) > bound:
                break
            for rank in ranks:
                probe = dataclasses.replace(state, lora_rank=rank, accumulate=_least(state, self.ctx))
                if any(_no_more_intrusive(k, probe, base) for _, k, _ in found):
                    break
                hit = self.fit(dataclasses.replace(state, lora_rank=rank))
                if hit:
                    found.append((group, *hit))
                    kept = _best(found, self.ctx, keep)
                    bound = _cost(kept[-1][1], self.ctx) if len(kept) >= keep else math.inf
                    break
        return found

    def confirm(self, found: Sequence[_Found], n: int) -> list[_Found]:
        """Trace the first ``n`` (at most ``n + 2`` tries); a row the trace finds too large is dropped."""
        out: list[_Found] = []
        done = tries = 0
        for group, k, est in found:
            if done < n and tries < n + 2 and est.method != "trace":
                tries += 1
                traced = self.estimate(k, "trace")
                if traced is not None and not self.fits(traced):
                    self.notes.append(f"{', '.join(k.changes(self.ctx.base))}: the formula's "
                                      f"{format_bytes(est.total_bytes)} fits, the trace's "
                                      f"{format_bytes(traced.total_bytes)} does not; dropped")
                    continue
                est, done = (traced, done + 1) if traced is not None else (est, done)
            out.append((group, k, est))
        return out

    def row(self, group: str, k: _Knobs, est: MemoryEstimate) -> PlanRow:
        terms, seq, device = _cost_terms(k, self.ctx), self.seq_len, self.setup.device
        return PlanRow(group, k.changes(self.ctx.base), {**k.kwargs(), "seq_len": seq, "device": device},
                       est.total_bytes, self.usable - est.total_bytes, _cost(k, self.ctx), terms,
                       est.method, k.flags(self.ctx.base, seq, device, self.setup.margin), est.host_bytes)


def _cost(k: _Knobs, ctx: _Context) -> float:
    return round(sum(_cost_terms(k, ctx).values()), 4)


def _lower_bound(state: _Knobs, ctx: _Context) -> float:
    """The least ``state`` can cost: with the fewest micro-batches (no term falls as they grow)."""
    return _cost(dataclasses.replace(state, accumulate=_least(state, ctx)), ctx)


def _least(state: _Knobs, ctx: _Context) -> int:
    """The fewest micro-batches ``state`` can run: with the user's micro-batch, or all on each GPU."""
    per_device = ctx.effective // state.world_size
    return per_device // max(d for d in _divisors(per_device) if d <= ctx.base.batch_size)


def _best(found: Sequence[_Found], ctx: _Context, limit: int) -> list[_Found]:
    """The ``limit`` cheapest (then smallest) that no fit with a subset of their changes beats."""
    cost = {k: _cost(k, ctx) for _, k, _ in found}
    kept = [f for f in found if not any(a != f[1] and _no_more_intrusive(a, f[1], ctx.base) and cost[a] <= cost[f[1]]
                                        for _, a, _ in found)]
    return sorted(kept, key=lambda f: (cost[f[1]], f[2].total_bytes))[:limit]


# -- the entry points ------------------------------------------------------------------------


def plan(model: Any, *, gpu: DeviceMemory | str | int, seq_len: int | None = None, gpus: int | None = None,
         batch_size: int | None = None, margin: float = 0.1, precision: str | Sequence[str] | None = None,
         optimizers: Sequence[str] | None = None, base: Mapping[str, Any] | None = None,
         lora_ranks: Sequence[int] = LORA_RANKS, method_prune: str = "formula", confirm: int = 2,
         limit: int = 10, device: str = "cuda", max_estimates: int = 3000,
         estimate_kwargs: Mapping[str, Any] | None = None) -> Plan:
    """The configurations of a training run that fit a GPU, cheapest first by :data:`COST_MODEL`.

    Args:
        model: what :func:`memguard.estimate` takes; LoRA is planned for models memguard builds.
        gpu: a :class:`DeviceMemory`, what :func:`memguard.device_memory` takes (``"A100-80GB"``,
            ``"24GiB"``, ``"cuda:0"``) or ``"auto"``, or the free bytes as an ``int``.
        seq_len: tokens per sample (default: the model's maximum).
        gpus: the most data-parallel GPUs (default: ``base``'s world size). World sizes that do not
            divide the effective batch are skipped: they would change it.
        batch_size: the per-device micro-batch the user runs (``memguard check --batch-size``).
            The effective batch, ``batch_size x accumulate_grad_batches x world_size``, is what
            every row keeps: with more GPUs each one takes fewer samples. No row uses a larger
            micro-batch than this.
        margin: share of the free memory to keep spare, as in :meth:`MemoryEstimate.fits`.
        precision: the precisions searched (one or several); ``None``: 32-true, bf16-mixed,
            16-mixed, bf16-true and the user's (no bf16 on GPUs before Ampere).
        optimizers: the optimizers searched; ``None``: AdamW, 8-bit AdamW, Adafactor, SGD and the
            user's (the LoRA group keeps the user's: adapters' state is small).
        base: the user's settings by :func:`memguard.estimate`'s names (``precision``,
            ``optimizer``, ``gradient_checkpointing``, ``strategy``, ``world_size``,
            ``offload_optimizer``, ``offload_params``, ``lora_rank``, ``accumulate_grad_batches``,
            ``batch_size``); rows say what they change from it and are charged for that.
        lora_ranks: the ranks of the LoRA group, when ``base`` is not LoRA already.
        method_prune: ``"formula"`` (the trace when the formula cannot estimate the model) or ``"trace"``.
        confirm: rows of each group confirmed with the trace; one it finds too large is dropped.
        limit: rows kept per group; max_estimates: a bound on the search's estimates.
        device: ``"cuda"`` or ``"cpu"``, as in :func:`memguard.estimate`.
        estimate_kwargs: passed to every estimate: ``example_input``, ``loss_fn``, ``step_fn``,
            ``training_loop``, ``set_to_none``, ``trace_timeout``.

    Raises:
        ConfigError: for a bad argument, naming it.
    """
    start = time.perf_counter()
    setup = _setup(model, None, gpu=gpu, seq_len=seq_len, gpus=gpus, batch_size=batch_size, margin=margin,
                   precision=precision, optimizers=optimizers, base=base, lora_ranks=lora_ranks,
                   method_prune=method_prune, confirm=confirm, limit=limit, device=device,
                   max_estimates=max_estimates, estimate_kwargs=estimate_kwargs)
    search, groups = _searched(setup, None)
    base_knobs = search.ctx.base
    if search.method == "formula" and setup.confirm:
        search.estimate(base_knobs, "trace")  # the number `memguard check` gives
    mine = search.cache.get((base_knobs, "trace")) or search.cache[(base_knobs, search.method)]
    if search.fits(mine) and groups:  # the trace may fit what the formula did not: it leads then
        groups[0] = [(LORA if base_knobs.lora_rank else FULL, base_knobs, mine),
                     *(f for f in groups[0] if f[1] != base_knobs)]
    rows = []
    for found in groups:
        found = _best(found, search.ctx, len(found))
        if search.method == "formula":
            found = search.confirm(found, setup.confirm)
        rows += [search.row(*f) for f in _best(found, search.ctx, setup.limit)]
    asked = {"settings": {**base_knobs.kwargs(), "seq_len": search.seq_len, "device": setup.device},
             "total_bytes": mine.total_bytes, "headroom_bytes": search.usable - mine.total_bytes,
             "method": mine.method, "fits": search.fits(mine),
             "flags": base_knobs.flags(base_knobs, search.seq_len, setup.device, setup.margin)}
    return Plan(rows, COST_MODEL, asked, search.fits(mine), setup.name, setup.gpu, setup.margin, search.usable,
                search.ctx.effective, search.all_notes(), search.count,
                round(time.perf_counter() - start, 3))


def remedies(estimate: MemoryEstimate, free_bytes: int | str | DeviceMemory, margin: float = 0.1, *,
             top: int = 3, model: Any = None, gpus: int | None = None, confirm: int | None = None,
             base: Mapping[str, Any] | None = None, estimate_kwargs: Mapping[str, Any] | None = None,
             max_estimates: int = 3000) -> list[PlanRow]:
    """The best few changes that make ``estimate``'s run fit: only rows that fit, ``[]`` when none does.

    The one remedy engine of ``memguard check`` and the callback. Rows come in turn from each group
    (:meth:`Plan.best`), without the asked configuration; ``[]`` too when ``estimate`` fits.

    Args:
        estimate: what did not fit; its ``inputs`` are the user's settings.
        free_bytes: free memory: bytes, a size such as ``"24GiB"``, or a :class:`DeviceMemory`.
        margin: as in :meth:`MemoryEstimate.fits`; top: rows returned.
        model: the module estimated, when ``estimate.inputs["model"]`` is not a name memguard can
            build again (a user's module leaves only its class name there).
        gpus: GPUs the run may use (default: its world size, so no GPU it does not have).
        confirm: rows confirmed with the trace (default: ``top`` when ``estimate`` was traced).
        base: settings that replace those read from ``estimate.inputs``, e.g. ``{"optimizer":
            torch.optim.RMSprop}``: the inputs hold an optimizer class by its name only.
        estimate_kwargs: as in :func:`plan`: ``example_input``, ``step_fn`` ... of the run.
        max_estimates: a bound on the search's estimates (the callback keeps it small: a model the
            formula cannot estimate is searched with traces, seconds each).

    Raises:
        ConfigError: when the model cannot be built again and ``model`` is not given, or the
            optimizer is not a name memguard knows and ``base`` does not give it; for a bad argument.
    """
    gpu = free_bytes if isinstance(free_bytes, DeviceMemory) else resolve_budget(free_bytes)
    top = positive_int("top", top)
    if estimate.fits(gpu.free_bytes, margin):
        return []
    inputs, resolved = estimate.inputs, None
    if model is None:
        name = re.sub(r"\+lora\d+$", "", str(inputs.get("model")))
        try:
            model, resolved = name, load_model(name)
        except ConfigError as exc:
            raise ConfigError(f"remedies() cannot build model {name!r} again ({exc}); pass model=, the module "
                              "that was estimated") from None
    traced = estimate.method == "trace"
    setup = _setup(model, resolved, gpu=gpu, seq_len=inputs.get("seq_len"), gpus=gpus, batch_size=None,
                   margin=margin, precision=None, optimizers=None,
                   base={**{k: inputs[k] for k in _BASE_KEYS if inputs.get(k) is not None}, **(base or {})},
                   lora_ranks=LORA_RANKS,
                   method_prune="formula", confirm=(top if traced else 0) if confirm is None else confirm,
                   limit=top + 2, device=inputs.get("device", "cuda"), max_estimates=max_estimates,
                   estimate_kwargs={**{k: inputs[k] for k in ("training_loop", "set_to_none") if k in inputs},
                                    **(estimate_kwargs or {})})
    search, groups = _searched(setup, estimate)
    found = [[f for f in _best(g, search.ctx, setup.limit) if f[1] != search.ctx.base] for g in groups]
    turns = [f for tier in itertools.zip_longest(*found) for f in tier if f is not None]
    if search.method == "formula":
        turns = search.confirm(turns, setup.confirm)
    return [search.row(*f) for f in turns[:top]]


@dataclasses.dataclass
class _Setup:
    """Everything one search needs, checked."""

    model: Any
    modules: dict[int | None, Any]
    name: str
    base: _Knobs
    gpu: DeviceMemory
    margin: float
    gpus: int
    precisions: tuple[str, ...]
    optimizers: tuple[str, ...]
    lora_ranks: tuple[int, ...]
    method: str
    confirm: int
    limit: int
    device: str
    seq_len: int | None
    extra: dict[str, Any]
    max_estimates: int
    notes: list[str]


def _setup(model: Any, resolved: ResolvedModel | None, *, gpu: Any, seq_len: Any, gpus: Any, batch_size: Any,
           margin: Any, precision: Any, optimizers: Any, base: Any, lora_ranks: Any, method_prune: Any,
           confirm: Any, limit: Any, device: Any, max_estimates: Any, estimate_kwargs: Any) -> _Setup:
    """Check every argument of :func:`plan`, and build the model."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(f"margin must be a number in [0, 1), got {margin!r}")
    if method_prune not in ("formula", "trace"):
        raise ConfigError(f"method_prune must be 'formula' or 'trace', got {method_prune!r}")
    if isinstance(confirm, bool) or not isinstance(confirm, int) or confirm < 0:
        raise ConfigError(f"confirm must be a whole number of rows (0 for none), got {confirm!r}")
    extra = dict(estimate_kwargs or {})
    if set(extra) - set(_EXTRA_KEYS):
        raise ConfigError(f"estimate_kwargs takes {', '.join(_EXTRA_KEYS)}, not "
                          f"{', '.join(sorted(set(extra) - set(_EXTRA_KEYS)))}")
    knobs = _base_knobs(base, batch_size, precision)
    gpus = knobs.world_size if gpus is None else positive_int("gpus", gpus)
    if gpus < knobs.world_size:
        raise ConfigError(f"gpus={gpus} is fewer than the run's world_size={knobs.world_size}; pass gpus >= it")
    memory, notes = _resolve_gpu(gpu), []
    precisions = _choices("precision", precision, PRECISIONS, knobs.precision, lambda p: resolve_precision(p).name)
    if precision is None and _NO_BF16.search(memory.name.replace("-", " ")):
        precisions = tuple(p for p in precisions if not p.startswith("bf16") or p == knobs.precision)
        notes.append(f"{memory.name} has no bfloat16 arithmetic: no bf16 precision is proposed")
    optimizers = _choices("optimizers", optimizers, OPTIMIZERS, knobs.optimizer, _optimizer_name)
    ranks = () if knobs.lora_rank else tuple(sorted({positive_int("lora_ranks", r) for r in lora_ranks}, reverse=True))
    limit, max_estimates = positive_int("limit", limit), positive_int("max_estimates", max_estimates)
    resolved = resolved or load_model(model)
    if knobs.lora_rank and not resolved.built_here:
        add_lora(resolved, knobs.lora_rank)  # raises the estimator's own ConfigError
    if ranks and not resolved.built_here:
        notes.append("LoRA is planned for models memguard builds (a preset, config or config.json); wrap your "
                     "module with peft.get_peft_model to plan it")
        ranks = ()
    return _Setup(model, {None: resolved.module}, resolved.name, knobs, memory, float(margin), gpus, precisions,
                  optimizers, ranks, method_prune, confirm, limit, device, seq_len, extra,
                  max_estimates, notes)


def _optimizer_name(optimizer: Any) -> Any:
    """A name (canonical) or a ``torch.optim.Optimizer`` class (as is); anything else is a ConfigError."""
    if not isinstance(optimizer, (str, type)):
        raise ConfigError(f"plan takes optimizers by name ({', '.join(_OPT_NAMES)}) or as a torch.optim.Optimizer "
                          f"class, got {optimizer!r}")
    spec = resolve_optimizer(optimizer)
    return spec.name if isinstance(optimizer, str) else optimizer


def _choices(what: str, given: Any, default: Sequence[str], mine: str, canon: Any) -> tuple[str, ...]:
    """The values searched: ``given`` (one or several) by canonical name, else ``default`` and the user's."""
    if given is None:
        return tuple(dict.fromkeys([mine, *default]))
    values = [given] if isinstance(given, str) else list(given)
    if not values:
        raise ConfigError(f"{what} must name at least one value, got {given!r}")
    return tuple(dict.fromkeys(canon(v) for v in values))


def _base_knobs(base: Any, batch_size: Any, precision: Any) -> _Knobs:
    """The user's settings, every value checked; ``precision`` (one name) stands for an absent one."""
    if base is not None and not isinstance(base, Mapping):
        raise ConfigError(f"base must be a dict of estimate settings, got {type(base).__name__}")
    given = dict(base or {})
    unknown = sorted(set(given) - set(_BASE_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in base; expected {', '.join(_BASE_KEYS)}")
    if batch_size is not None and given.get("batch_size") not in (None, batch_size):
        raise ConfigError(f"batch_size={batch_size!r} and base['batch_size']={given['batch_size']!r} disagree")
    if isinstance(precision, str):
        given.setdefault("precision", precision)
    world = positive_int("world_size", given.get("world_size") or 1)
    layout = resolve_parallelism(given.get("strategy") or ("ddp" if world > 1 else "single"), world,
                                 offload_optimizer=given.get("offload_optimizer", False),
                                 offload_params=given.get("offload_params", False))
    ckpt, rank = given.get("gradient_checkpointing") or False, given.get("lora_rank")
    if not isinstance(ckpt, bool):
        raise ConfigError(f"base['gradient_checkpointing'] must be True or False, got {ckpt!r}")
    return _Knobs(resolve_precision(given.get("precision") or "32-true").name,
                  _optimizer_name(given.get("optimizer") or "adamw"), ckpt, layout.strategy, layout.world_size,
                  layout.offload_optimizer, layout.offload_params,
                  None if rank is None else positive_int("lora_rank", rank),
                  positive_int("batch_size", batch_size if batch_size is not None else given.get("batch_size") or 1),
                  positive_int("accumulate_grad_batches", given.get("accumulate_grad_batches") or 1))


def _resolve_gpu(gpu: Any) -> DeviceMemory:
    if isinstance(gpu, DeviceMemory):
        return gpu
    if isinstance(gpu, bool) or not isinstance(gpu, (str, int)):
        raise ConfigError(f"gpu must be a DeviceMemory, a GPU name or size (e.g. 'A100-80GB', '24GiB') or free "
                          f"bytes as an int, got {gpu!r}")
    if isinstance(gpu, int):
        return resolve_budget(gpu)
    return device_memory("cuda" if gpu.strip().lower() == "auto" else gpu)


def _searched(setup: _Setup, asked: MemoryEstimate | None) -> tuple[_Search, list[list[_Found]]]:
    """Estimate the asked run (the trace when the formula cannot), then search each group."""
    base, module = setup.base, setup.modules[None]
    effective = base.batch_size * base.accumulate * base.world_size
    ctx = _Context(base, effective, 1, sum(p.numel() for p in module.parameters()),
                   {None: sum(p.numel() for p in module.parameters() if p.requires_grad)})
    search = _Search(setup, ctx)
    if asked is not None:
        search.cache[(base, asked.method)] = asked
    if search.estimate(base, search.method, strict=search.method == "trace") is None:
        search.failed.clear()
        search.estimate(base, "trace", strict=True)
        setup.notes.append(f"the formula cannot estimate {setup.name}: the trace searched instead")
        search.method = "trace"
    search.seq_len = search.cache[(base, search.method)].inputs.get("seq_len")
    search.ctx = dataclasses.replace(ctx, tokens_per_sample=search.seq_len or COSTS["micro_batch_tokens"])
    keep = setup.limit + setup.confirm + 2
    return search, [search.search(group, states, ranks, keep) for group, states, ranks in _groups(search)]


def _groups(search: _Search) -> list[tuple[str, list[_Knobs], tuple[int | None, ...]]]:
    """Each group's name, states (fewest changes first) and LoRA ranks to try in turn."""
    setup, ctx, base = search.setup, search.ctx, search.ctx.base
    layouts = [(s, 1, oo, op) for s, oo, op in _SINGLE]
    skipped = [w for w in range(2, setup.gpus + 1) if ctx.effective % w]
    layouts += [(s, w, oo, op) for w in range(2, setup.gpus + 1) if w not in skipped for s, oo, op in _MULTI]
    if skipped:
        sizes = f"world size{'s' * (len(skipped) > 1)} {', '.join(map(str, skipped))}"
        setup.notes.append(f"{setup.gpus} GPUs allowed, but {sizes} cannot keep the effective batch of "
                           f"{ctx.effective}: not searched")
    mine = (base.strategy, base.world_size, base.offload_optimizer, base.offload_params)
    layouts = [mine, *(x for x in layouts if x != mine)]
    module = setup.modules[None]
    switch = any(hasattr(module, f) for f in ("activation_checkpointing_enable", "gradient_checkpointing_enable"))
    if not (switch or base.checkpointing):
        setup.notes.append(f"{setup.name} has no checkpointing switch (transformers' gradient_checkpointing_enable): "
                           "gradient checkpointing not searched")
    checkpointing = (base.checkpointing, not base.checkpointing) if switch else (base.checkpointing,)
    out = [(LORA if base.lora_rank else FULL, setup.optimizers, (base.lora_rank,))]
    if setup.lora_ranks:
        try:
            search.module(setup.lora_ranks[0])
            out.append((LORA, (base.optimizer,), setup.lora_ranks))
        except MemguardError as exc:
            setup.notes.append(f"LoRA not planned: {exc}")
    return [(group, _states(base, layouts, setup.precisions, optimizers, checkpointing, ranks[0], ctx), ranks)
            for group, optimizers, ranks in out]


def _states(base: _Knobs, layouts: Sequence[tuple[str, int, bool, bool]], precisions: Sequence[str],
            optimizers: Sequence[str], checkpointing: Sequence[bool], rank: int | None, ctx: _Context) -> list[_Knobs]:
    """Every combination, cheapest first by the least it can cost, then fewest changes; offloaded state
    only with DeepSpeed's or FSDP's CPU Adam (no other optimizer is offloaded)."""
    states = [_Knobs(p, o, ck, s, w, oo, op, rank) for s, w, oo, op in layouts for p in precisions for o in optimizers
              for ck in checkpointing
              if not oo or o in ("adamw", "adam") or (base.offload_optimizer and o == base.optimizer)]

    return sorted(states, key=lambda s: (_lower_bound(s, ctx), len(s.changes(base))))
