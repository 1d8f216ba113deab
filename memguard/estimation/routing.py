"""How a mixture-of-experts router spreads the tokens (``moe_routing``): the capacity factor and the
tokens of the busiest expert; torch-free, read by the argument checks and the formula (the trace's
stand-in indices, :mod:`memguard.estimation.stand_ins`, follow them)."""

from __future__ import annotations

import math
from typing import Any

from memguard.errors import ConfigError

__all__ = ["ROUTINGS", "expert_load", "resolve_routing", "routing_name"]

ROUTINGS: dict[str, float] = {"balanced": 1.0, "worst": math.inf}
"""``moe_routing`` names and the capacity factor each stands for: ``"balanced"`` spreads the
tokens evenly (capacity factor 1); ``"worst"`` sends every token to the same ``top_k`` experts
(no capacity limit: transformers' experts implementations never drop tokens)."""

def resolve_routing(value: Any) -> float:
    """The capacity factor of a ``moe_routing`` argument: ``"balanced"`` (1.0), ``"worst"``
    (infinite: every token on the same experts), or a number >= 1.

    Raises:
        ConfigError: naming the value and what is accepted.
    """
    if isinstance(value, str) and value.strip().lower() in ROUTINGS:
        return ROUTINGS[value.strip().lower()]
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 1:
        return float(value)
    raise ConfigError(f"moe_routing must be 'balanced', 'worst' or a capacity factor >= 1 "
                      f"(Switch Transformer uses 1.25), got {value!r}")


def routing_name(capacity: float) -> str:
    """How a capacity factor is shown: ``"balanced"``, ``"worst"`` or the number."""
    for name, c in ROUTINGS.items():
        if c == capacity:
            return name
    return f"{capacity:g}"


def expert_load(tokens: int, top_k: int, experts: int, capacity: float) -> int:
    """Tokens the busiest expert takes: ``ceil(capacity * tokens * top_k / experts)``, at least the
    balanced share and at most every token (a token picks an expert once)."""
    balanced = -(-tokens * top_k // experts)
    if math.isinf(capacity):
        return tokens
    return max(balanced, min(tokens, math.ceil(capacity * tokens * top_k / experts - 1e-9)))
