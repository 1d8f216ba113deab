"""The one exception hierarchy of memguard.

Every error that memguard raises on purpose derives from :class:`MemguardError`, so callers can
catch one type. Subclasses say what went wrong; the message always names the offending value and
what would be accepted instead (the einops habit of re-raising with the input in the message).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memguard.estimation.result import MemoryEstimate

DISTRIBUTION = "memguard-train"
"""memguard's name on the package index (``pip install memguard-train``); the import name and the
command are ``memguard``. The names ``memguard`` and ``ml-memguard`` there belong to other projects."""

__all__ = [
    "BatchTooLargeError",
    "ConfigError",
    "DeviceError",
    "InsufficientMemoryError",
    "MemguardError",
    "MissingDependencyError",
    "TraceError",
    "UnsupportedModelError",
]


class MemguardError(Exception):
    """Root of every error memguard raises on purpose."""


class ConfigError(MemguardError, ValueError):
    """A bad argument or input: unknown preset, bad number, unknown optimizer or precision."""


class UnsupportedModelError(MemguardError):
    """The model lacks what a method needs (e.g. transformer blocks for the seed formula)."""


class TraceError(MemguardError):
    """The fake-tensor trace of a training step could not run."""


class DeviceError(MemguardError):
    """The memory of a device cannot be read (no GPU, NVML missing and no fallback, bad index)."""


class MissingDependencyError(MemguardError, ImportError):
    """An optional dependency is needed for this feature; the message says what to install."""


class InsufficientMemoryError(MemguardError):
    """A training step will not fit in the memory that is free.

    Attributes:
        estimate: the :class:`~memguard.MemoryEstimate` that did not fit.
        free_bytes: the memory that was available, in bytes.
    """

    def __init__(self, message: str, *, estimate: MemoryEstimate | None = None,
                 free_bytes: int | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.free_bytes = free_bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_insufficient, (str(self), self.estimate, self.free_bytes))


def _rebuild_insufficient(message: str, estimate: Any, free_bytes: Any) -> InsufficientMemoryError:
    return InsufficientMemoryError(message, estimate=estimate, free_bytes=free_bytes)


class BatchTooLargeError(ConfigError, InsufficientMemoryError):
    """``action="reduce"``: the step does not fit, and the guard cannot change the batch size of the run.

    The transformers ``Trainer`` builds its data loader before any callback event, and a Lightning
    Fabric loop owns its own; the error names the batch size and accumulation to set instead. Both a
    :class:`ConfigError` and an :class:`InsufficientMemoryError`, raised before the first step.

    Attributes:
        batch_size: the per-device batch size to train with.
        gradient_accumulation_steps: the gradient accumulation that goes with it.
        fitting_batch_size: the largest batch size that fits (``batch_size`` is at most it).
        estimate: the estimate at the batch size asked for; ``free_bytes``: the memory compared with.
    """

    def __init__(self, message: str, *, batch_size: int, gradient_accumulation_steps: int, fitting_batch_size: int,
                 estimate: MemoryEstimate | None = None, free_bytes: int | None = None) -> None:
        InsufficientMemoryError.__init__(self, message, estimate=estimate, free_bytes=free_bytes)
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.fitting_batch_size = fitting_batch_size

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_too_large, (str(self), {"batch_size": self.batch_size,
                                                 "fitting_batch_size": self.fitting_batch_size,
                                                 "gradient_accumulation_steps": self.gradient_accumulation_steps,
                                                 "estimate": self.estimate, "free_bytes": self.free_bytes}))


def _rebuild_too_large(message: str, fields: dict[str, Any]) -> BatchTooLargeError:
    return BatchTooLargeError(message, **fields)


def did_you_mean(choices: list[str]) -> str:
    """``" Did you mean 'a' or 'b'?"`` for the names closest to a bad one, or ``""`` when none is close;
    the one wording of every "unknown name" message (presets, GPUs)."""
    if not choices:
        return ""
    quoted = [repr(c) for c in choices]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" Did you mean {listed}?"


def require(module: str, extra: str, feature: str) -> Any:
    """Import an optional dependency, or raise :class:`MissingDependencyError` with a hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the {module!r} package, which is not installed; "
            f"install it with: pip install '{DISTRIBUTION}[{extra}]'"
        ) from exc
