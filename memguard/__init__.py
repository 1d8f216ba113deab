"""memguard: predict the peak memory of a training step before it runs.

>>> import memguard
>>> est = memguard.estimate("gpt2", batch_size=8, seq_len=1024, precision="bf16-mixed")
>>> est.fits(40 * 2**30)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from memguard._version import __version__
from memguard.catalog import GPU_CATALOG, GpuSpec, list_gpus, lookup_gpu
from memguard.device import DeviceMemory, device_memory, list_devices, resolve_budget
from memguard.errors import (
    ConfigError,
    DeviceError,
    InsufficientMemoryError,
    MemguardError,
    MissingDependencyError,
    TraceError,
    UnsupportedModelError,
)
from memguard.estimate import estimate
from memguard.models import list_presets
from memguard.result import Category, MemoryEstimate
from memguard.units import format_bytes, parse_bytes

__all__ = [
    "GPU_CATALOG",
    "Category",
    "ConfigError",
    "DeviceError",
    "DeviceMemory",
    "GpuSpec",
    "InsufficientMemoryError",
    "MemGuard",
    "MemguardError",
    "MemoryEstimate",
    "MissingDependencyError",
    "TraceError",
    "UnsupportedModelError",
    "__version__",
    "device_memory",
    "estimate",
    "format_bytes",
    "list_devices",
    "list_gpus",
    "list_presets",
    "lookup_gpu",
    "parse_bytes",
    "resolve_budget",
]


def __getattr__(name: str) -> Any:
    # The callback imports Lightning, which is slow: load it only when asked for.
    if name == "MemGuard":
        from memguard.callback import MemGuard

        return MemGuard
    raise AttributeError(f"module 'memguard' has no attribute {name!r}")
