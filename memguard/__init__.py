"""memguard: predict the peak memory of a training step before it runs.

>>> import memguard
>>> est = memguard.estimate("gpt2", batch_size=8, seq_len=1024, precision="bf16-mixed")  # doctest: +SKIP
>>> est.fits(memguard.device_memory("A100-40GB").free_bytes)  # doctest: +SKIP
True

Names that need torch (``estimate``, ``MemGuard`` ...) are imported on first use, so importing
memguard (as pytest does for the plugin) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memguard._version import __version__
from memguard.device.catalog import GPU_CATALOG, GpuSpec, list_gpus, lookup_gpu
from memguard.errors import (
    BatchTooLargeError,
    ConfigError,
    DeviceError,
    InsufficientMemoryError,
    MemguardError,
    MissingDependencyError,
    TraceError,
    UnsupportedModelError,
)
from memguard.estimation.result import Category, MemoryEstimate
from memguard.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from memguard.device import (
        DeviceMemory,
        DeviceSpec,
        device_memory,
        list_devices,
        parse_budget,
        parse_gpu,
        resolve_budget,
    )
    from memguard.estimation.estimator import estimate
    from memguard.estimation.models import list_presets
    from memguard.estimation.step import Step
    from memguard.estimation.trace import is_tracing
    from memguard.fit import Fit
    from memguard.lightning.callback import MemGuard
    from memguard.planning import Plan, PlanRow, plan, remedies

_LAZY = {
    "MemGuard": "memguard.lightning.callback",
    "DeviceMemory": "memguard.device",
    "DeviceSpec": "memguard.device",
    "device_memory": "memguard.device",
    "list_devices": "memguard.device",
    "resolve_budget": "memguard.device",
    "parse_budget": "memguard.device",
    "parse_gpu": "memguard.device",
    "estimate": "memguard.estimation.estimator",
    "is_tracing": "memguard.estimation.trace",
    "list_presets": "memguard.estimation.models",
    "plan": "memguard.planning",
    "remedies": "memguard.planning",
    "Plan": "memguard.planning",
    "PlanRow": "memguard.planning",
    "Fit": "memguard.fit",
    "Step": "memguard.estimation.step",
}

__all__ = [
    "GPU_CATALOG",
    "BatchTooLargeError",
    "Category",
    "ConfigError",
    "DeviceError",
    "DeviceMemory",
    "DeviceSpec",
    "Fit",
    "GpuSpec",
    "InsufficientMemoryError",
    "MemGuard",
    "MemguardError",
    "MemoryEstimate",
    "MissingDependencyError",
    "Plan",
    "PlanRow",
    "Step",
    "TraceError",
    "UnsupportedModelError",
    "__version__",
    "device_memory",
    "estimate",
    "format_bytes",
    "is_tracing",
    "list_devices",
    "list_gpus",
    "list_presets",
    "lookup_gpu",
    "parse_budget",
    "parse_bytes",
    "parse_gpu",
    "plan",
    "remedies",
    "resolve_budget",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
