"""The memory of the training device: a GPU through NVML, the host, a catalog GPU, a budget.

An estimate is only useful against what is really free on the device the run will use, or, on a
CI runner or a laptop, against the GPU the run is planned for. Every form a user writes (``"cuda:1"``,
``"A100-80GB"``, ``"24GiB"``, ``"80%"`` ...) becomes one :class:`DeviceSpec` (the table is in
:mod:`memguard.device.spec`), and :meth:`DeviceSpec.read` reads it through injectable
:class:`Readers` (:mod:`memguard.device.readers`).

>>> import memguard
>>> memguard.device_memory("A100-80GB").total_bytes
85899345920
>>> memguard.device.DeviceSpec.parse("12GiB").read().free_bytes
12884901888

This package's ``__init__`` only re-exports: :mod:`~memguard.device.memory` (the result),
:mod:`~memguard.device.spec` (the grammar), :mod:`~memguard.device.readers` (NVML, torch, the host),
:mod:`~memguard.device.api` (the functions users already call), :mod:`~memguard.device.catalog`.
"""

from __future__ import annotations

from memguard.device.api import device_memory, parse_budget, parse_gpu, resolve_budget
from memguard.device.memory import SOURCES, DeviceMemory, MemorySource
from memguard.device.readers import (
    DRIVER_FILES,
    SYSTEM,
    Readers,
    TorchCuda,
    TorchUnavailable,
    list_devices,
    process_memory,
    why_no_gpu,
)
from memguard.device.spec import FORMS, DeviceLike, DeviceSpec, SpecKind, memory_of

__all__ = ["DRIVER_FILES", "FORMS", "SOURCES", "SYSTEM", "DeviceLike", "DeviceMemory", "DeviceSpec", "MemorySource",
           "Readers", "SpecKind", "TorchCuda", "TorchUnavailable", "device_memory", "list_devices", "memory_of",
           "parse_budget", "parse_gpu", "process_memory", "resolve_budget", "why_no_gpu"]
