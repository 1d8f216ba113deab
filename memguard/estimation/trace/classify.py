"""Classify: the category of every storage of a recorded step, from what it turned out to be.

A storage is assigned after the step ran, from the part it played (:class:`~.record.Recording`):
a parameter or buffer, the ``.grad`` of a parameter, a tensor in the optimizer's state, something
a forward made and still held at its end (activations, with the batch), or anything else
(temporary: what the forward frees, the backward's intermediates, the optimizer's scratch). A
storage that played several parts takes the first of that list.
"""

from __future__ import annotations

from memguard.estimation.result import Category
from memguard.estimation.trace.record import Recording

__all__ = ["classify"]


def classify(recording: Recording) -> dict[int, Category]:
    """The :class:`~memguard.Category` of each record of ``recording.ledger``, by index."""
    kinds: dict[int, Category] = {}
    for i in range(len(recording.ledger.records)):
        if i in recording.params:
            kinds[i] = Category.PARAMETERS
        elif i in recording.grads:
            kinds[i] = Category.GRADIENTS
        elif i in recording.opt_state:
            kinds[i] = Category.OPTIMIZER_STATE
        elif i in recording.activations:
            kinds[i] = Category.ACTIVATIONS
        else:
            kinds[i] = Category.TEMPORARY
    return kinds
