"""One rank of a Lightning run, for the guard core: its step as :func:`memguard.estimate` traces it.

Reads the LightningModule's own ``training_step``, its optimizer, the precision and the strategy
(:class:`~memguard.lightning.run.RunInfo`), and gives the core a :class:`~memguard.guard.StepView`;
decides nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from memguard.errors import MemguardError
from memguard.estimation.from_run import optimizer_factory
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.step import Step
from memguard.fit import Fit
from memguard.guard import StepView, traced
from memguard.lightning.run import RunInfo
from memguard.planning import guard_remedies

__all__ = ["checkpointing", "step_view"]

log = logging.getLogger(__name__)


def step_view(trainer: Any, pl_module: Any, info: RunInfo, batch: Any, trace_timeout: float | None) -> StepView:
    """This rank's ``training_step`` at ``batch``, with the run's optimizer, precision and strategy.

    Raises:
        MemguardError: for a run memguard cannot trace (manual optimization, a module already
            sharded, several optimizers).
    """
    if not pl_module.automatic_optimization:
        raise MemguardError("manual optimization is not traced: its training_step steps the real optimizers")
    if info.sharded_module:
        raise MemguardError(f"{info.strategy} has already sharded the module's parameters when the fit starts, "
                            "so their shapes are not the model's; memguard cannot trace its step yet")
    optimizers = trainer.optimizers
    if len(optimizers) > 1:
        raise MemguardError(f"{len(optimizers)} optimizers: memguard traces a step of one")
    device = "cuda" if info.device.type == "cuda" else "cpu"
    optimizer: Any = optimizer_factory(pl_module, optimizers[0], device) if optimizers else None
    recomputes = checkpointing(pl_module)
    parallel = info.parallel or ("ddp" if info.world_size > 1 else "single")

    def step(b: Any) -> Any:  # runs on the module's private state (memguard.estimation.trace.isolation)
        return pl_module.training_step(b, 0)

    kwargs = {"example_input": batch, "step_fn": step, "trace_timeout": trace_timeout}

    run = Step(precision=info.precision, optimizer=optimizer, device=device, training_loop="lightning",
               strategy=parallel, world_size=info.world_size, offload_optimizer=info.offload_optimizer,
               offload_params=info.offload_params)
    traced_at = traced(pl_module, run, **kwargs)

    def estimate_at(batch_size: int, accumulate: int) -> MemoryEstimate:
        est = traced_at(batch_size, accumulate)
        return dataclasses.replace(est, inputs={**est.inputs, "gradient_checkpointing": recomputes})

    def remedies(fit: Fit) -> list[Any] | None:
        return guard_remedies(fit.estimate, fit.free_bytes, fit.margin, model=pl_module, step=run,
                              estimate_kwargs=kwargs)

    return StepView(batch, estimate_at, [*pl_module.parameters(), *pl_module.buffers()], remedies)


def checkpointing(module: torch.nn.Module) -> bool:
    """Whether any part of ``module`` recomputes activations in backward.

    transformers marks the modules it checkpoints with ``gradient_checkpointing = True`` (what its
    ``is_activation_checkpointing`` reads); torch's ``checkpoint_wrapper`` wraps them in a
    ``CheckpointWrapper``.
    """
    return any(getattr(m, "gradient_checkpointing", False) is True or type(m).__name__ == "CheckpointWrapper"
               for m in module.modules())
