"""The one result type that every estimator returns.

Sizes are integer bytes; units appear only in :meth:`MemoryEstimate.table` (``str(est)``). The
category names are the same for every method, so the seed formula, the refined formula and the
trace can be compared line by line (the torch ``MemTracker`` habit of a ``str`` Enum with display
values, and the torchinfo habit of a result that draws its own table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from memguard.device.spec import DeviceSpec
from memguard.enums import StrEnum
from memguard.fit import Fit
from memguard.units import format_bytes

__all__ = ["Category", "MemoryEstimate", "Method", "PeakTensors"]


class Method(StrEnum):
    """How :func:`memguard.estimate` estimates: ``str(Method.TRACE) == "trace"``, the name it takes.
    :attr:`MemoryEstimate.method` is the one that made the estimate (never ``AUTO``, which picks one)."""

    AUTO = "auto"
    TRACE = "trace"
    FORMULA = "formula"
    SEED = "seed"



class Category(StrEnum):
    """Where the bytes of a training step go. Values are the names used in dicts and JSON."""

    PARAMETERS = "parameters"
    """Weights and buffers of the model, in the dtype they are kept in."""
    GRADIENTS = "gradients"
    """``.grad`` of trainable parameters."""
    OPTIMIZER_STATE = "optimizer_state"
    """Optimizer state kept between steps (Adam moments, momentum, master weights)."""
    ACTIVATIONS = "activations"
    """Tensors made in the forward pass and kept for the backward pass (inputs included)."""
    TEMPORARY = "temporary"
    """Everything else alive at the peak: workspaces, intermediate results, logits copies."""
    OVERHEAD = "overhead"
    """What the device adds beyond live tensors: CUDA context, library workspaces, allocator
    rounding and fragmentation. Zero for CPU estimates."""


_ORDER = tuple(Category)
_MADE_BY = tuple(m.value for m in Method if m is not Method.AUTO)
"""The methods an estimate is made by: ``auto`` picks one of them."""


@dataclasses.dataclass(frozen=True)
class PeakTensors:
    """Tensors alive at the peak that one module made, of one category.

    Attributes:
        where: the module whose forward made them, or whose parameters they are, their gradients
            or optimizer state (``transformer.h.3.attn``); else the phase of the step that made
            them (``backward``, ``optimizer``).
        category: what they are.
        nbytes: their bytes (the share a rank holds under sharding).
        count: how many storages.
        shape: the shape of the largest one.
        dtype: its dtype (``"torch.bfloat16"``).
    """

    where: str
    category: Category
    nbytes: int
    count: int
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "category": self.category.value, "bytes": self.nbytes, "count": self.count,
                "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The predicted memory of one steady-state training step.

    Attributes:
        method: the :class:`Method` that made it: ``"seed"``, ``"formula"`` or ``"trace"`` (given as its
            name, it becomes the member).
        breakdown: bytes per :class:`Category`, summing to :attr:`total_bytes`. Every category is
            present (zero when it does not apply).
        inputs: what was estimated (model, batch size, sequence length, precision, ...), JSON-ready.
        notes: anything the method had to assume or approximate, in words.
        host_bytes: host memory needed per rank for what is offloaded (optimizer state, parameter
            shards); not part of :attr:`total_bytes`, which is device memory.
        context_bytes: the part of the overhead that lives outside PyTorch's caching allocator
            (the CUDA context); the rest of it is the allocator's (reserved beyond the tensors,
            library workspaces). Zero on the CPU.
        at_peak: the trace only: tensors alive at the peak, by module and category, largest first.
        timeline: the trace only: ``(event, phase, live_bytes)`` through the step (phases
            ``forward``, ``backward``, ``block-backward``, ``optimizer``, ``other``); its largest
            ``live_bytes`` is :attr:`peak_bytes`.
        stand_ins: the trace only: data-dependent ops (``"nonzero"``, ``"_local_scalar_dense"``,
            ``"topk"``) whose values decided a branch or a size and were invented by the trace, and
            how: a documented model (``"MoE routing: balanced"``, see
            :mod:`memguard.estimation.stand_ins`), or ``"ones"`` where nothing models them, which
            makes the estimate :attr:`uncertain`.
        band: what this step may need beyond :attr:`total_bytes` that memguard cannot size exactly,
            by item (``"cudnn: conv workspaces (3 calls)"`` -> bytes): kernel workspaces whose size
            depends on the target GPU and library version, data-dependent sizes, ops the trace
            cannot see (:mod:`memguard.estimation.cuda_rules`). :attr:`upper_bytes` adds them; the fit
            decision (:mod:`memguard.fit`) compares that upper end.
    """

    method: Method
    breakdown: Mapping[Category, int]
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    host_bytes: int = 0
    context_bytes: int = 0
    at_peak: tuple[PeakTensors, ...] = ()
    timeline: tuple[tuple[int, str, int], ...] = ()
    stand_ins: Mapping[str, str] = dataclasses.field(default_factory=dict)
    band: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in _MADE_BY:
            raise ValueError(f"method must be one of {', '.join(_MADE_BY)}, got {self.method!r}")
        object.__setattr__(self, "method", Method(self.method))
        full = {c: 0 for c in _ORDER}
        for key, value in self.breakdown.items():
            cat = Category(key)
            if int(value) != value or value < 0:
                raise ValueError(f"breakdown[{cat.value!r}] must be a non-negative integer, got {value!r}")
            full[cat] = int(value)
        object.__setattr__(self, "breakdown", full)
        object.__setattr__(self, "inputs", dict(self.inputs))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "at_peak", tuple(self.at_peak))
        object.__setattr__(self, "timeline", tuple(tuple(p) for p in self.timeline))
        object.__setattr__(self, "stand_ins", {str(k): str(v) for k, v in self.stand_ins.items()})
        for what, n in self.band.items():
            if int(n) != n or n < 0:
                raise ValueError(f"band[{what!r}] must be a non-negative integer, got {n!r}")
        object.__setattr__(self, "band", {str(k): int(v) for k, v in self.band.items()})
        if not 0 <= self.context_bytes <= full[Category.OVERHEAD]:
            raise ValueError(f"context_bytes must be within the overhead, got {self.context_bytes!r}")

    @property
    def uncertain(self) -> bool:
        """Whether the estimate rests on values the trace made up without a model of them (stand-in
        ones for a data-dependent op, named in :attr:`stand_ins`): a branch taken or a size chosen
        may differ from the real step's."""
        return any(how == _ONES for how in self.stand_ins.values())

    @property
    def total_bytes(self) -> int:
        """What must be free on the device, what ``nvidia-smi`` shows: :attr:`reserved_bytes` plus
        the CUDA context. :meth:`fits` compares it."""
        return sum(self.breakdown.values())

    @property
    def upper_bytes(self) -> int:
        """The upper end of the stated band: :attr:`total_bytes` plus every uncertain item of
        :attr:`band`. Equal to :attr:`total_bytes` when nothing is uncertain; what :class:`~memguard.fit.Fit`
        compares with the usable memory."""
        return self.total_bytes + sum(self.band.values())

    @property
    def reserved_bytes(self) -> int:
        """What PyTorch's caching allocator holds at its peak: ``torch.cuda.max_memory_reserved()``.

        :attr:`peak_bytes` plus what the allocator reserves beyond live tensors (segment rounding,
        splits, cached blocks; replayed from the trace's allocations, see
        :mod:`memguard.estimation.allocator`) and library workspaces. Equal to :attr:`peak_bytes` on the CPU.
        """
        return self.total_bytes - self.context_bytes

    @property
    def peak_bytes(self) -> int:
        """Peak of live tensor memory in a steady-state step.

        On a GPU this is what ``torch.cuda.max_memory_allocated()`` reports; on the CPU, how far
        the process's resident memory grows.
        """
        return self.total_bytes - self.breakdown[Category.OVERHEAD]

    def fits(self, free_bytes: int | float | str, margin: float = 0.1) -> bool:
        """Whether the step fits in ``free_bytes`` while keeping ``margin`` of it spare.

        ``fits(free, 0.1)`` is true when ``total_bytes <= 0.9 * free``.

        Args:
            free_bytes: the memory available, in any form :class:`memguard.device.DeviceSpec` reads:
                bytes (``int``), a size (``"12GiB"``, ``"24GB"``), a catalog GPU (``"A100-80GB"``),
                a live device (``"cuda:0"``: what it has free) or a share of the estimate's device
                (``"80%"``).
            margin: the share of ``free_bytes`` to keep spare, a number in ``[0, 1)``.

        Raises:
            ConfigError: for a value the grammar cannot read (a bool, a negative or infinite
                number, an unknown name) or a margin outside ``[0, 1)``.
            DeviceError: a live device named cannot be read.
        """
        return Fit(self, DeviceSpec.parse(free_bytes).free_bytes(training=self.inputs.get("device")), margin).fits

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: method, peak and total bytes, breakdown, inputs and notes."""
        return {
            "method": self.method.value,
            "peak_bytes": self.peak_bytes,
            "total_bytes": self.total_bytes,
            "breakdown": {c.value: self.breakdown[c] for c in _ORDER},
            "inputs": dict(self.inputs),
            "notes": list(self.notes),
            "host_bytes": self.host_bytes,
            "reserved_bytes": self.reserved_bytes,
            "context_bytes": self.context_bytes,
            "at_peak": [g.to_dict() for g in self.at_peak],
            "timeline": [list(p) for p in self.timeline],
            "stand_ins": dict(self.stand_ins),
            "uncertain": self.uncertain,
            "band": dict(self.band),
            "upper_bytes": self.upper_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryEstimate:
        """Read back what :meth:`to_dict` wrote."""
        return cls(method=data["method"], breakdown=dict(data["breakdown"]),
                   inputs=dict(data.get("inputs", {})), notes=tuple(data.get("notes", ())),
                   host_bytes=int(data.get("host_bytes", 0)), context_bytes=int(data.get("context_bytes", 0)),
                   at_peak=tuple(PeakTensors(g["where"], Category(g["category"]), int(g["bytes"]), int(g["count"]),
                                             tuple(g["shape"]), g["dtype"]) for g in data.get("at_peak", ())),
                   timeline=tuple((int(e), str(p), int(n)) for e, p, n in data.get("timeline", ())),
                   stand_ins=dict(data.get("stand_ins", {})), band=dict(data.get("band", {})))

    def table(self, top: int = 0) -> str:
        """The breakdown as a text table, one row per category, with shares of the total, and the
        ``top`` largest groups of tensors alive at the peak (trace only)."""
        total = self.total_bytes or 1
        title = f"memguard estimate ({self.method})"
        shown = {k: v for k, v in self.inputs.items()
                 if k in _SHOWN_INPUTS and v is not None and _DEFAULT_INPUTS.get(k, not v) != v}
        lines = [title]
        if shown:
            lines.append(", ".join(f"{k}={v}" for k, v in shown.items()))
        width = max(len(c.value) for c in _ORDER)
        rule = "-" * (width + 26)
        lines.append(rule)
        for cat in _ORDER:
            n = self.breakdown[cat]
            lines.append(f"{cat.value:<{width}}  {format_bytes(n):>12}  {100 * n / total:6.1f}%")
        lines.append(rule)
        if self.context_bytes:
            lines.append(f"{'peak (tensors)':<{width}}  {format_bytes(self.peak_bytes):>12}  max_memory_allocated")
            lines.append(f"{'reserved':<{width}}  {format_bytes(self.reserved_bytes):>12}  max_memory_reserved")
            lines.append(f"{'total':<{width}}  {format_bytes(self.total_bytes):>12}  nvidia-smi (+ context)")
        else:
            lines.append(f"{'peak (tensors)':<{width}}  {format_bytes(self.peak_bytes):>12}")
            lines.append(f"{'total':<{width}}  {format_bytes(self.total_bytes):>12}")
        if self.band:
            lines.append(f"{'upper (band)':<{width}}  {format_bytes(self.upper_bytes):>12}  "
                         f"total + {format_bytes(self.upper_bytes - self.total_bytes)} uncertain:")
            lines.extend(f"  + {format_bytes(n):>12}  {what}" for what, n in self.band.items())
        if self.host_bytes:
            lines.append(f"{'host (offload)':<{width}}  {format_bytes(self.host_bytes):>12}")
        if top and self.at_peak:
            lines.append(f"alive at the peak (largest {min(top, len(self.at_peak))} of {len(self.at_peak)}):")
            lines.extend(f"  {format_bytes(g.nbytes):>12}  {g.category.value:<15}  {g.where}  "
                         f"{g.count} x, largest {list(g.shape)} {g.dtype.removeprefix('torch.')}"
                         for g in self.at_peak[:top])
        if self.stand_ins:
            lines.append(self.stand_in_line())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def stand_in_line(self) -> str:
        """One line on the invented values, ``""`` without any: ``uncertain: data-dependent nonzero ran
        on stand-in values of ones; ...`` or ``stand-ins modelled: topk (MoE routing: balanced)``."""
        if not self.stand_ins:
            return ""
        guessed = sorted(op for op, how in self.stand_ins.items() if how == _ONES)
        modelled = ", ".join(f"{op} ({how})" for op, how in sorted(self.stand_ins.items()) if how != _ONES)
        if guessed:
            line = (f"uncertain: data-dependent {', '.join(guessed)} ran on stand-in values of ones; "
                    "a branch or size may differ from the real step's")
            return f"{line}; modelled: {modelled}" if modelled else line
        return f"stand-ins modelled: {modelled}"

    def __str__(self) -> str:
        return self.table(top=5)

    def __repr__(self) -> str:
        """One short line (a notebook shows it for ``est``): the method, the three totals, what was
        estimated and how much detail it holds; ``str()``/:meth:`table` and :meth:`to_dict` give it all."""
        shown = ", ".join(f"{k}={v!r}" for k, v in self.inputs.items()
                          if k in ("model", "batch_size", "seq_len", "precision") and v is not None)
        detail = "".join(f", {n} {what}" for n, what in ((len(self.at_peak), "groups at_peak"),
                                                         (len(self.timeline), "timeline points")) if n)
        return (f"<MemoryEstimate {self.method}: peak {format_bytes(self.peak_bytes)}, reserved "
                f"{format_bytes(self.reserved_bytes)}, total {format_bytes(self.total_bytes)}"
                f"{f', upper {format_bytes(self.upper_bytes)}' if self.band else ''}"
                f"{'; ' + shown if shown else ''}{detail}>")


_ONES = "ones"
"""How an unmodelled stand-in's values were made (``memguard.estimation.stand_ins.ONES``)."""

_SHOWN_INPUTS = ("model", "batch_size", "seq_len", "decoder_seq_len", "precision", "optimizer", "device",
                 "gradient_checkpointing", "strategy", "world_size", "offload_optimizer", "offload_params")
_DEFAULT_INPUTS = {"strategy": "single", "world_size": 1, "offload_optimizer": False, "offload_params": False}
"""Inputs left out of the table's header while they have these values."""
