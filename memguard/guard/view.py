"""A run as a guard sees it: what each framework adapter translates its run into.

The core (:mod:`memguard.guard`) knows no Trainer and no Fabric. An adapter hands it a
:class:`RunView` (this rank, the world, how to gather a row of integers from every rank, how to say
things, how to change the batch size when it can) and, once the first batch is there, a
:class:`StepView` (how to estimate this rank's step at a batch size). A test hands it fakes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from memguard.enums import StrEnum

if TYPE_CHECKING:
    from memguard.estimation.result import MemoryEstimate
    from memguard.fit import Fit

__all__ = ["AllGather", "Framework", "RunView", "StepView", "alone"]

AllGather = Callable[[list[int]], list[list[int]]]
"""Every rank's row of integers, in rank order, from this rank's row (a collective: every rank calls it)."""


class Framework(StrEnum):
    """Whose run a guard watches; it owns the words of that framework's messages."""

    LIGHTNING = "lightning"
    TRAINER = "transformers"
    FABRIC = "fabric"

    @property
    def guard(self) -> str:
        """How the guard names itself at the start of a message."""
        return {"lightning": "MemGuard", "transformers": "MemGuardCallback",
                "fabric": "memguard.fabric.preflight"}[self.value]

    def batch(self, size: int) -> str:
        """A batch size in the framework's words (``per_device_train_batch_size=8``)."""
        return f"per_device_train_batch_size={size}" if self is Framework.TRAINER else f"batch size {size}"

    @property
    def accumulation(self) -> str:
        """The framework's name for gradient accumulation."""
        return {"lightning": "accumulate_grad_batches", "transformers": "gradient_accumulation_steps",
                "fabric": "gradient accumulation"}[self.value]


def alone(row: list[int]) -> list[list[int]]:
    """The :data:`AllGather` of a run on one process."""
    return [row]


def _warn_nowhere(message: str, every_rank: bool = False) -> None:
    del message, every_rank


def _say_nothing(message: str) -> None:
    del message


@dataclasses.dataclass(frozen=True)
class RunView:
    """One rank of a run, in the guard's terms.

    Attributes:
        framework: whose run it is (the words of its messages).
        accumulate: the gradient accumulation asked for.
        rank: this process's global rank.
        world_size: processes taking part in training.
        device: this rank's device.
        processes: training processes on this machine, which share the host's memory (CPU runs).
        all_gather: every rank's row (:data:`AllGather`); :func:`alone` for one process.
        warn: ``warn(message, every_rank)``: a warning (on rank zero only unless ``every_rank``).
        info: a progress line.
        set_batch: ``set_batch(batch_size, accumulate)`` trains with them, for ``"reduce"``; ``None``
            when the framework lets no guard change its batch size.
    """

    framework: Framework
    accumulate: int = 1
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    processes: int = 1
    all_gather: AllGather = alone
    warn: Callable[[str, bool], None] = _warn_nowhere
    info: Callable[[str], None] = _say_nothing
    set_batch: Callable[[int, int], None] | None = None


@dataclasses.dataclass(frozen=True)
class StepView:
    """This rank's training step at its first batch, ready to estimate.

    Attributes:
        batch: the first batch (its shapes are what counts).
        estimate: ``estimate(batch_size, accumulate)``: this run's step at another batch size and
            accumulation (:func:`memguard.estimate` with the framework's loop, optimizer, precision).
        resident: the model's tensors already on the device (its parameters and buffers).
        remedies: what would make the step fit (:func:`memguard.planning.guard_remedies`), or ``None``.
    """

    batch: Any
    estimate: Callable[[int, int], MemoryEstimate]
    resident: Sequence[torch.Tensor] = ()
    remedies: Callable[[Fit], list[Any] | None] = lambda fit: None
