"""Predicted vs actual: the peak of the first training steps, measured and compared with the estimate.

The first optimizer step warms up (lazy initialisation of kernels and allocators) and is not
measured; the probe starts after it and is read ``measure_steps`` optimizer steps later, or when
training ends sooner. How a device's peak is read, and its limits: :mod:`memguard.device.actual`.
A failure to measure never stops training unless the guard is strict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from memguard.device.actual import Comparison, MemoryProbe, read_and_compare, resident_bytes
from memguard.guard.config import GuardConfig
from memguard.guard.messages import measure_failed
from memguard.guard.view import RunView

__all__ = ["Record", "StepProbe", "Where"]

log = logging.getLogger(__name__)

Record = Callable[[Comparison], None]
"""What the framework does with a comparison: log its metrics (Lightning's loggers, ``log_history``)."""

Where = Callable[[], tuple[torch.device, Sequence[torch.Tensor]]]
"""The device measured, and the tensors training keeps there between steps."""


class StepProbe:
    """Measures the first steps of one run against what was predicted.

    Args:
        config: the guard's arguments (``margin``, ``measure_steps``, ``reset_peak``, ``strict``).
        view: the run (its words, and how to warn and inform).
        record: called with the comparison, before it is said.
        predicted: the ``(peak, total)`` bytes predicted, or ``None``.

    Attributes:
        predicted: the ``(peak, total)`` bytes predicted, or ``None`` (nothing to compare with).
        comparison: what the measured steps gave, once read.
    """

    def __init__(self, config: GuardConfig, view: RunView, record: Record,
                 predicted: tuple[int, int] | None = None) -> None:
        self.config, self.view, self.record = config, view, record
        self.predicted = predicted
        self.comparison: Comparison | None = None
        self._probe: MemoryProbe | None = None
        self._armed = False
        self._start_step = 0

    def arm(self, global_step: int) -> None:
        """Training starts at ``global_step``: measure after its first optimizer step."""
        self._probe, self._armed, self._start_step = None, True, global_step + 1

    def after_step(self, global_step: int, where: Where) -> None:
        """After an optimizer step: start after the first, read ``measure_steps`` steps later.

        ``where`` gives the device and what training keeps between steps (credited as resident at
        the start); it is called only when the probe starts.
        """
        if self._armed and self._probe is None and global_step >= self._start_step:
            if self.predicted is None:  # nothing was predicted: nothing to compare with
                self._armed = False
                return
            self._safely(self._start, global_step, where)
        elif self._probe is not None and global_step >= self._start_step + self.config.measure_steps:
            self._safely(self._measure)

    def finish(self) -> None:
        """Training ends: read now if fewer than ``measure_steps`` steps were measured."""
        if self._probe is not None:
            self._safely(self._measure)
        self._armed = False

    def _start(self, global_step: int, where: Where) -> None:
        """Read (or reset) the peak counters of the device; the tensors resident now are credited."""
        self._armed = False
        self._start_step = global_step
        device, tensors = where()
        probe = MemoryProbe(device, reset=self.config.reset_peak)
        if probe.start(resident_bytes(tensors, device)):
            self._probe = probe
        else:
            log.info("%s cannot measure the memory of %s here; predicted vs actual is not logged",
                     self.view.framework.guard, device)

    def _measure(self) -> None:
        probe, self._probe = self._probe, None
        result = read_and_compare(probe, self.predicted, self.config.margin)
        if result is None or result.measurement is None:
            return
        self.comparison = result
        self.record(result)
        self.view.info(f"{self.view.framework.guard}: {result.summary}")
        if result.warning:
            self.view.warn(f"{self.view.framework.guard}: {result.warning}", False)

    def _safely(self, fn: Callable[..., None], *args: object) -> None:
        """Run a measurement step; its failure is warned about, and never stops training (unless strict)."""
        try:
            fn(*args)
        except Exception as exc:
            self._probe, self._armed = None, False
            if self.config.strict:
                raise
            self.view.warn(measure_failed(self.view.framework, exc), True)
