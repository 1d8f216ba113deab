"""How long a trace may run (``trace_timeout``): its default and its check, torch-free, so that
:func:`memguard.estimate` checks its arguments before anything imports torch."""

from __future__ import annotations

import math
from typing import Any

from memguard.errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT", "check_timeout"]

DEFAULT_TIMEOUT = 120.0
"""Seconds a trace may take before it stops with a :class:`TraceError`. Traces take seconds (GPT-2
small 1.4 s, Llama-2-7B 3 s on two CPU cores); a step that does not end in two minutes waits on
values a fake tensor does not have."""


def check_timeout(value: Any) -> float | None:
    """A ``trace_timeout``: a positive number of seconds, or ``None`` for no limit; else a
    :class:`ConfigError` naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value < math.inf):
        raise ConfigError(f"trace_timeout must be a positive number of seconds or None, got {value!r}")
    return None if value is None else float(value)
