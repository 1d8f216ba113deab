"""The memory one training process may use: a budget, or what its device has free.

Shared by the integrations, which compare an estimate with it (:class:`memguard.fit.Fit`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memguard.device.actual import resident_bytes
from memguard.device.readers import Readers, process_memory
from memguard.device.spec import DeviceSpec
from memguard.units import format_bytes

__all__ = ["available_to"]


def available_to(device: torch.device, resident: Iterable[torch.Tensor], budget: int | str | None = None, *,
                 processes: int = 1, readers: Readers | None = None) -> tuple[int, str]:
    """The bytes a process training on ``device`` may use (before the margin), and where the number comes from.

    Args:
        device: the process's device.
        resident: the model's tensors already on it (parameters and buffers): a CPU run's estimate
            counts them, the host's available memory does not any more.
        budget: instead of what is free, any form of :class:`~memguard.device.DeviceSpec`: bytes, a size
            (``"12GiB"``), a catalog GPU, or a share of ``device`` (``"80%"``).
        processes: training processes on this machine, which share the host's memory (CPU runs).
        readers: where live memory is read from (default: this machine).

    For a GPU, what NVML reports free plus what this process already holds there (its cached
    blocks are the step's to use); for the CPU, the host's available memory shared among the
    processes, plus the model's tensors already resident.
    """
    if budget is not None:
        mem = DeviceSpec.parse(budget).read(readers, training=device)
        return mem.free_bytes, mem.name
    mem = DeviceSpec.parse(device).read(readers)
    if device.type == "cuda":
        held = process_memory(device.index, readers=readers)
        if held is None:
            held = int(torch.cuda.memory_reserved(device))
        return mem.free_bytes + held, f"{mem} + {format_bytes(held)} held by this process"
    held = resident_bytes(resident, device)
    split = f" / {processes} processes" if processes > 1 else ""
    return mem.free_bytes // processes + held, f"{mem}{split} + {format_bytes(held)} of model tensors resident"
