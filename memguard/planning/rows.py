"""The knobs of a training run and what :func:`~memguard.planning.plan` returns: rows and their table.

A :class:`Knobs` is one configuration of what the user controls, with what it changes from the
user's in words and the ``memguard check`` flags that reproduce it; a :class:`PlanRow` is one that
fits, a :class:`Plan` all of them with the ask and draws its own table (integer bytes inside, units
only through :func:`memguard.units.format_bytes`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from memguard.device import DeviceMemory
from memguard.estimation.parallel import Strategy
from memguard.estimation.step import KNOBS, Method, Step
from memguard.units import format_bytes

__all__ = ["FIXED_KNOBS", "FULL", "LORA", "OPTIMIZER_NAMES", "QLORA", "SEARCHED_KNOBS", "Knobs", "Plan", "PlanRow",
           "quantization_args", "remedy_lines"]

FULL, LORA, QLORA = "full fine-tuning", "LoRA", "QLoRA"
FIXED_KNOBS = ("seq_len", "decoder_seq_len", "device", "training_loop", "set_to_none", "keep_output", "skip_modules",
               "moe_routing")
"""The knobs of a :class:`~memguard.estimation.step.Step` that a plan keeps as the user has them."""
SEARCHED_KNOBS = tuple(k for k in KNOBS if k not in FIXED_KNOBS)
"""The others: what a plan varies, by :func:`memguard.estimate`'s names (the keys of :meth:`Knobs.kwargs`)."""
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw-fused": "fused AdamW", "adamw-foreach": "foreach AdamW", "adam": "Adam",
              "adamw-8bit": "8-bit AdamW", "adafactor": "Adafactor",
              "sgd": "SGD", "sgd-momentum": "SGD with momentum", "paged-adamw": "paged AdamW",
              "paged-adamw-8bit": "paged 8-bit AdamW"}
_QUANT_NAMES = {"nf4-dq": "QLoRA base: NF4 with double quantization", "nf4": "NF4 base", "fp4": "FP4 base",
                "fp4-dq": "FP4 base with double quantization", "int8": "int8 base (LLM.int8)"}
"""A :attr:`Knobs.quantization` in words; ``-dq``: double quantization."""


@dataclasses.dataclass(frozen=True)
class Knobs:
    """One configuration of what the user controls: the searched part of a
    :class:`~memguard.estimation.step.Step` (:data:`SEARCHED_KNOBS`), hashable, by the planner's names.

    ``strategy`` is a :class:`~memguard.estimation.parallel.Strategy` (a name is read as one)."""

    precision: str
    optimizer: str
    checkpointing: bool
    strategy: Strategy
    world_size: int
    offload_optimizer: bool
    offload_params: bool
    lora_rank: int | None
    batch_size: int = 1
    accumulate: int = 1
    quantization: str | None = None
    """The base's bitsandbytes storage: ``"nf4"``, ``"fp4"``, ``"int8"``, ``-dq`` for double quantization."""

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            object.__setattr__(self, "strategy", Strategy.parse(self.strategy))

    @classmethod
    def from_step(cls, step: Step) -> Knobs:
        """The searched knobs of ``step``."""
        quantization = None if step.quantization is None else step.quantization + "-dq" * step.double_quant
        return cls(step.precision, step.optimizer, bool(step.gradient_checkpointing), step.strategy, step.world_size,
                   step.offload_optimizer, step.offload_params, step.lora_rank, step.batch_size or 1,
                   step.accumulate_grad_batches, quantization)

    @property
    def half_module(self) -> bool:
        """Whether the module's weights are 16-bit: a 16-bit precision, or DeepSpeed's mixed precision."""
        return self.precision in ("bf16-true", "16-true") or (self.strategy.is_deepspeed and "mixed" in self.precision)

    def kwargs(self) -> dict[str, Any]:
        """:func:`memguard.estimate`'s keyword arguments for these knobs (:data:`SEARCHED_KNOBS`, in order)."""
        kind, dq = quantization_args(self.quantization)
        return {"batch_size": self.batch_size, "precision": self.precision, "optimizer": self.optimizer,
                "gradient_checkpointing": self.checkpointing, "strategy": self.strategy.value,
                "world_size": self.world_size, "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params, "lora_rank": self.lora_rank,
                "accumulate_grad_batches": self.accumulate, "quantization": kind, "double_quant": dq}

    def changes(self, base: Knobs) -> list[str]:
        """What differs from ``base``, in words."""
        out = [f"LoRA rank {self.lora_rank}"] if self.lora_rank != base.lora_rank else []
        if self.quantization != base.quantization:
            out.append(_QUANT_NAMES.get(self.quantization or "", "16-bit base"))
        if (self.strategy, self.world_size) != (base.strategy, base.world_size):
            many = self.world_size > 1
            how = " (16-bit module, fp32 master weights)" if "mixed" in self.precision and self.half_module else ""
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

    def flags(self, base: Knobs, seq_len: int | None, device: str, margin: float,
              keep_output: bool | None = None) -> list[str]:
        """The arguments after ``memguard check MODEL --gpu G`` that reproduce this configuration (with the
        loop's ``keep_output`` where it was said: it decides the band)."""
        out = ["--batch-size", str(self.batch_size)]
        out += ["--accumulate-grad-batches", str(self.accumulate)] * (self.accumulate != 1)
        out += ["--seq-len", str(seq_len)] * (seq_len is not None)
        optimizer = self.optimizer if isinstance(self.optimizer, str) else self.optimizer.__name__.lower()
        out += ["--precision", self.precision, "--optimizer", optimizer]
        if self.checkpointing or base.checkpointing:
            out.append("--gradient-checkpointing" if self.checkpointing else "--no-gradient-checkpointing")
        out += ["--strategy", self.strategy.value] * (self.strategy is not Strategy.SINGLE)
        out += ["--world-size", str(self.world_size)] * (self.world_size != 1)
        out += ["--offload-optimizer"] * self.offload_optimizer + ["--offload-params"] * self.offload_params
        out += ["--lora-rank", str(self.lora_rank)] * bool(self.lora_rank)
        kind, dq = quantization_args(self.quantization)
        out += ["--quantization", kind] * bool(kind) + ["--double-quant"] * dq
        out += ["--device", device] * (device != "cuda")
        out += [] if keep_output is None else ["--keep-output" if keep_output else "--no-keep-output"]
        return out + ["--margin", f"{margin:g}"] * (margin != 0.1)


def quantization_args(label: str | None) -> tuple[str | None, bool]:
    """``"nf4-dq"`` -> ``("nf4", True)``: :func:`memguard.estimate`'s ``quantization`` and ``double_quant``."""
    if not label:
        return None, False
    kind, _, dq = label.partition("-")
    return kind, dq == "dq"


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One configuration that fits.

    Attributes:
        group: :data:`FULL` or :data:`LORA`.
        changes: what differs from the user's settings, in words (empty: as asked).
        settings: keyword arguments of :func:`memguard.estimate` that, with the model and
            ``method=``:attr:`method`, give :attr:`total_bytes` again.
        total_bytes: the estimate's total on each GPU (what :attr:`settings` give again).
        needed_bytes: what must be free on each GPU: the upper end of the estimate's band, what the
            fit is decided on (:attr:`memguard.fit.Fit.needed_bytes`).
        headroom_bytes: usable memory left over by :attr:`needed_bytes`
            (:attr:`memguard.fit.Fit.spare_bytes`).
        cost: the sum of :attr:`cost_terms`, what the cost model (:data:`COST_MODEL`) charged.
        method: the :class:`~memguard.estimation.result.Method`, ``"formula"`` or ``"trace"``, that gave
            :attr:`total_bytes`.
        flags: arguments of ``memguard check MODEL --gpu G`` that reproduce the configuration.
        host_bytes: host memory per rank for what is offloaded.
    """

    group: str
    changes: list[str]
    settings: dict[str, Any]
    total_bytes: int
    needed_bytes: int
    headroom_bytes: int
    cost: float
    cost_terms: dict[str, float]
    method: Method
    flags: list[str]
    host_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an optimizer class in :attr:`settings` by its name."""
        data = dataclasses.asdict(self)
        data["settings"]["optimizer"] = _opt_name(self.settings["optimizer"], display=False)
        data["method"] = self.method.value
        return data

    def describe(self) -> str:
        """One line for a message: what changes, what it needs and leaves, its cost."""
        host = f", {format_bytes(self.host_bytes)} of host memory" if self.host_bytes else ""
        return (f"{', '.join(self.changes) or 'as asked'}: needs {format_bytes(self.needed_bytes)} ({self.method}), "
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
        traced: how many of the estimates were traces; configurations: how many configurations
            were estimated (an accumulation of 2 or more counted once: they estimate alike).
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
    traced: int = 0
    configurations: int = 0

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
                 f"asked: {_summary(ask['settings'])}: needs {format_bytes(ask['needed_bytes'])} "
                 f"({ask['method']}): {verdict}"]
        for name in dict.fromkeys(r.group for r in self.rows):
            rows = self.group(name)
            lines += ["", f"{name}: the {min(top, len(rows))} cheapest configurations that fit",
                      f"{'#':>3}  {'cost':>5}  {'needs':>10}  {'headroom':>10}  {'by':<7}  changes"]
            for i, r in enumerate(rows[:top], 1):
                host = f" (host {format_bytes(r.host_bytes)})" if r.host_bytes else ""
                lines += [f"{i:>3}  {r.cost:>5.2f}  {format_bytes(r.needed_bytes):>10}  "
                          f"{format_bytes(r.headroom_bytes):>10}  {r.method:<7}  "
                          f"{', '.join(r.changes) or 'as asked'}{host}", f"{'':>5}flags: {' '.join(r.flags)}"]
        lines += ["", "nothing searched fits this GPU"] * (not self.rows)
        lines += ["", self.cost_model, *(f"note: {n}" for n in self.notes)]
        return "\n".join([*lines, self.searched()])

    def searched(self) -> str:
        """The closing line: ``searched N configurations in T s`` and the estimates behind it."""
        return (f"searched {self.configurations} configurations in {self.seconds:.1f} s ({self.estimates} "
                f"estimates, {self.traced} traced)")

    def __str__(self) -> str:
        return self.table()


def _opt_name(optimizer: Any, display: bool = True) -> str:
    """An optimizer's name: ours in words (``display``) or as given, a class's ``__name__``."""
    if isinstance(optimizer, str):
        return OPTIMIZER_NAMES.get(optimizer, optimizer) if display else optimizer
    return optimizer.__name__


def _summary(s: Mapping[str, Any]) -> str:
    accumulate = f" x accumulate {s['accumulate_grad_batches']}" if s["accumulate_grad_batches"] != 1 else ""
    parts = [f"batch {s['batch_size']}{accumulate}", s["precision"], _opt_name(s["optimizer"])]
    parts += ["gradient checkpointing"] * bool(s["gradient_checkpointing"])
    parts += [f"{s['strategy']} x {s['world_size']}"] * (s["strategy"] != "single")
    parts += [f"LoRA rank {s['lora_rank']}"] * bool(s["lora_rank"])
    kind = s.get("quantization")
    return ", ".join(parts + [f"{kind}{' + double quantization' * bool(s.get('double_quant'))} base"] * bool(kind))


def remedy_lines(rows: Sequence[PlanRow] | None) -> list[str]:
    """The rows of :func:`memguard.remedies`, one line each, or why there are none (nothing when the
    search itself failed: ``None``)."""
    if rows is None:
        return []
    if not rows:
        return ["Nothing memguard can change (precision, checkpointing, optimizer, batch and accumulation, LoRA, "
                "QLoRA, sharding, offload) makes it fit."]
    return ["What would fit (best first; `memguard plan` lists more, with the flags):",
            *(f"  - {row.describe()}" for row in rows)]
