"""memguard: predict the peak memory of a training step before it runs.

>>> import memguard
>>> est = memguard.estimate("gpt2", batch_size=8, seq_len=1024, precision="bf16-mixed")
>>> est.fits(40 * 2**30)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from memguard._version import __version__
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
    "Category",
    "ConfigError",
    "DeviceError",
    "InsufficientMemoryError",
    "MemGuard",
    "MemguardError",
    "MemoryEstimate",
    "MissingDependencyError",
    "TraceError",
    "UnsupportedModelError",
    "__version__",
    "estimate",
    "format_bytes",
    "list_presets",
    "parse_bytes",
]


def __getattr__(name: str) -> Any:
    # The callback imports Lightning, which is slow: load it only when asked for.
    if name == "MemGuard":
        from memguard.callback import MemGuard

        return MemGuard
    raise AttributeError(f"module 'memguard' has no attribute {name!r}")
