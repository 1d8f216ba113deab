"""What every guard takes (``MemGuard``, the Trainer's ``MemGuardCallback``, ``memguard.fabric.preflight``),
checked once.

Arguments are checked where they are given, with messages that name the bad value and the allowed
set (Lightning's ``EarlyStopping.__init__`` does the same); the device is read later.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memguard.device import parse_budget
from memguard.errors import ConfigError
from memguard.estimation.trace import DEFAULT_TIMEOUT, check_timeout
from memguard.fit import check_margin

__all__ = ["ACTIONS", "GuardConfig", "check_arguments"]

ACTIONS = ("warn", "raise", "reduce")


def check_arguments(action: Any, margin: Any, budget: Any, measure_steps: Any, trace_timeout: Any,
                    reset_peak: Any = False) -> None:
    """The arguments every guard takes, each a :class:`ConfigError` naming the bad value."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown action {action!r}; expected one of {', '.join(map(repr, ACTIONS))}")
    check_margin(margin)
    if budget is not None:
        parse_budget(budget)
    if isinstance(measure_steps, bool) or not isinstance(measure_steps, int) or measure_steps < 1:
        raise ConfigError(f"measure_steps must be a positive integer, got {measure_steps!r}")
    check_timeout(trace_timeout)
    if not isinstance(reset_peak, bool):
        raise ConfigError(f"reset_peak must be True or False, got {reset_peak!r}")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """A guard's arguments, checked when made.

    Attributes:
        action: ``"warn"``, ``"raise"`` or ``"reduce"``: what to do when the step does not fit.
        margin: share of the free memory (or budget) kept spare, in ``[0, 1)``; also the tolerance
            of the predicted-vs-actual warning.
        budget: the memory one rank may use instead of what its device has free, as the user wrote
            it (bytes, ``"12GiB"``, ``"80%"``), or ``None``.
        strict: raise when the estimate (or the measurement) fails instead of warning.
        measure_steps: optimizer steps measured after the first, which warms up.
        trace_timeout: seconds one trace may take (``None``: no limit).
        reset_peak: reset the device's peak counters before measuring instead of reading them.
    """

    action: str = "warn"
    margin: float = 0.1
    budget: int | str | None = None
    strict: bool = False
    measure_steps: int = 2
    trace_timeout: float | None = DEFAULT_TIMEOUT
    reset_peak: bool = False

    def __post_init__(self) -> None:
        check_arguments(self.action, self.margin, self.budget, self.measure_steps, self.trace_timeout,
                        self.reset_peak)
        object.__setattr__(self, "margin", float(self.margin))
        object.__setattr__(self, "strict", bool(self.strict))
