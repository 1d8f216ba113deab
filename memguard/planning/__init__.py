"""``memguard.plan``: the cheapest way to make a training step fit a GPU, with numbers.

A run that does not fit has a few knobs: micro-batch and gradient accumulation (keeping the
effective batch), precision, gradient checkpointing, optimizer, LoRA, data-parallel strategy and
world size, offload. :func:`plan` searches them, keeps what fits and ranks it by a stated cost
model (:data:`COSTS`, :data:`COST_MODEL`); :func:`remedies` is the same engine asked what would make
one estimate fit, for ``memguard check`` and the callback.

Every combination of precision, optimizer, checkpointing and layout (strategy, world size,
offload) is a *state*; for each, the largest micro-batch that fits is found among the divisors of
the per-device effective batch, so the effective batch is kept exactly. States are visited fewest
changes first; one is skipped unestimated when a fit already found needs a subset of its changes
and no more accumulation (it could only be dominated), and such dominated rows are never shown.
The formula prunes (~2 ms an estimate once the model is inspected); the trace confirms the first
rows, and a row the trace finds too large is dropped.

Modules: the knobs, rows and their table (:mod:`.rows`), the cost model (:mod:`.costs`), the
search (:mod:`.search`), the entry points and their argument checks (:mod:`.api`).
"""

from __future__ import annotations

from memguard.planning.api import guard_remedies, plan, remedies
from memguard.planning.costs import COST_MODEL, COSTS
from memguard.planning.rows import FULL, LORA, Plan, PlanRow, remedy_lines

__all__ = ["COSTS", "COST_MODEL", "FULL", "LORA", "Plan", "PlanRow", "guard_remedies", "plan", "remedies",
           "remedy_lines"]
