"""The formula's reading of the family table (:mod:`memguard.estimation.families`): the block layout
of a model (:func:`family_of`), and the refusal of a model type it does not model
(:func:`refuse_unmodelled`), naming what it misses and leaving it to the trace."""

from __future__ import annotations

from typing import Any

from memguard.errors import UnsupportedModelError
from memguard.estimation.arch import Architecture
from memguard.estimation.families import FAMILIES, Family, facts_of

__all__ = ["family_of", "model_type_of", "refuse_unmodelled"]


def model_type_of(model: Any) -> str:
    """The transformers ``model_type`` of a resolved model (its config's, else its module's), or ``""``."""
    config = getattr(model, "config", None)
    if config is None:
        config = getattr(getattr(model, "module", None), "config", None)
    return str(getattr(config, "model_type", "") or "")


def refuse_unmodelled(model_type: str) -> None:
    """Raise for a model type the formula does not model (``ModelType.not_modelled``).

    Raises:
        UnsupportedModelError: naming the model type, what the formula does not model, and the trace.
    """
    missing = facts_of(model_type).not_modelled
    if missing:
        raise UnsupportedModelError(
            f"the formula does not model {missing} ({model_type}); use method='trace' "
            "(method='auto' does)")


def family_of(arch: Architecture) -> Family:
    """The :class:`~memguard.estimation.families.Family` of ``arch``: its model type's own layout, else
    its family's.

    Raises:
        UnsupportedModelError: for a model type the formula does not model, or a family without a
            layout.
    """
    facts = facts_of(arch.model_type)
    refuse_unmodelled(arch.model_type)
    if facts.layout is not None:
        return facts.layout
    try:
        return FAMILIES[arch.family]
    except KeyError:
        raise UnsupportedModelError(
            f"the formula has no block layout for family {arch.family!r} ({arch.model_type}); "
            f"known: {', '.join(FAMILIES)}. Use method='trace' for this model.") from None
