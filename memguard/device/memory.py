"""What a device has: :class:`DeviceMemory`, in integer bytes, and where the numbers come from."""

from __future__ import annotations

import dataclasses
from typing import Any

from memguard.enums import StrEnum
from memguard.units import format_bytes

__all__ = ["SOURCES", "DeviceMemory", "MemorySource"]


class MemorySource(StrEnum):
    """Where the numbers of a :class:`DeviceMemory` come from (:mod:`memguard.device.readers`,
    :mod:`memguard.device.spec`): ``str(MemorySource.NVML) == "nvml"``."""

    NVML = "nvml"
    """A CUDA device read through NVML."""
    TORCH = "torch"
    """A CUDA device read by ``torch.cuda.mem_get_info``, NVML's fallback."""
    HOST = "host"
    """Host memory, capped by the memory cgroup."""
    CATALOG = "catalog"
    """A catalog GPU, assumed empty."""
    BUDGET = "budget"
    """A number of bytes the user gave."""

    @property
    def cuda(self) -> bool:
        """A live CUDA device was read (NVML or torch)."""
        return self in (MemorySource.NVML, MemorySource.TORCH)


SOURCES = tuple(s.value for s in MemorySource)
"""The values of :attr:`DeviceMemory.source`."""


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """The memory of one device, in integer bytes.

    Attributes:
        name: the device's product name (``"NVIDIA A100-SXM4-80GB"``), ``"cpu"``, a catalog name
            or a description of the budget.
        index: the CUDA ordinal in this process (``cuda:N``), or ``None`` when not a CUDA device.
        uuid: the NVML UUID (``GPU-...``/``MIG-...``) when known.
        total_bytes: all memory of the device (for the host: capped by the cgroup limit).
        free_bytes: what a new allocation can get now.
        used_bytes: what is in use, by this process and others.
        source: a :class:`MemorySource` (one of :data:`SOURCES`: ``"nvml"``, ``"torch"``, ``"host"``,
            ``"catalog"``, ``"budget"``; given as its name, it becomes the member).
    """

    name: str
    index: int | None
    uuid: str | None
    total_bytes: int
    free_bytes: int
    used_bytes: int
    source: MemorySource

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        object.__setattr__(self, "source", MemorySource(self.source))
        for field in ("total_bytes", "free_bytes", "used_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, field, int(value))

    @property
    def device(self) -> str | None:
        """``"cuda:N"`` for a CUDA device, ``"cpu"`` for the host, else ``None``."""
        if self.index is not None and self.source.cuda:
            return f"cuda:{self.index}"
        return "cpu" if self.source is MemorySource.HOST else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (the source by its name)."""
        return {**dataclasses.asdict(self), "source": self.source.value}

    def __str__(self) -> str:
        where = f"{self.device} " if self.device and self.device != self.name else ""
        return (f"{where}{self.name}: {format_bytes(self.free_bytes)} free of "
                f"{format_bytes(self.total_bytes)} ({self.source})")
