"""The parts of a training step (:class:`Phase`), which the trace records and the formula's moments
fall in; torch-free, so the formula and :mod:`memguard.estimation.parallel` read it without the trace."""

from __future__ import annotations

from memguard.enums import StrEnum

__all__ = ["Phase"]


class Phase(StrEnum):
    """The part of a training step the trace is in when something is allocated.

    ``BACKWARD`` is the backward before the first repeated block (the loss and the head);
    ``BLOCK_BACKWARD`` starts when the first block's backward does (a sharded strategy holds more
    gathered there, see :meth:`memguard.estimation.parallel.Parallelism.phase_extras`).
    ``str(Phase.FORWARD) == "forward"``, the string the timeline and JSON keep.
    """

    FORWARD = "forward"
    BACKWARD = "backward"
    BLOCK_BACKWARD = "block-backward"
    OPTIMIZER = "optimizer"
    OTHER = "other"
