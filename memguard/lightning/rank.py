"""One rank's estimate for :class:`~memguard.MemGuard`: its real step, at the asked batch and the largest that fits.

Reads the run from the Trainer (the LightningModule's own ``training_step``, its optimizer, the
precision, the strategy, the batch) and the memory this rank may use; decides nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from memguard._cache import cached
from memguard.device.available import available_to
from memguard.errors import MemguardError
from memguard.estimation.estimator import estimate
from memguard.estimation.from_run import batch_size_of, optimizer_factory
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.search import max_batch_size
from memguard.fit import Fit
from memguard.lightning import run as _pl
from memguard.lightning.decision import RankReport
from memguard.planning import guard_remedies

__all__ = ["RankPlan", "plan_rank", "remedies_for"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """One rank's estimates.

    Attributes:
        batch: the batch the estimate was made from.
        requested: its batch size.
        at_requested: the estimate (and its fit) at the requested batch size.
        fitting_batch: the largest batch size that fits (``"reduce"`` only; the requested one when it
            fits, 0 when not even 1 does).
        at_fitting: the estimate at ``fitting_batch`` (at 1 when nothing fits).
        estimate_at: the estimate at any batch size, cached.
        sharded: the sharded strategy in words, or ``None``.
        estimate_kwargs: what :func:`memguard.estimate` needs besides the model to estimate this
            run's step under other settings (the batch, the ``training_step``, the optimizer), for
            :func:`memguard.remedies`.
    """

    batch: Any
    requested: int
    at_requested: Fit
    fitting_batch: int
    at_fitting: MemoryEstimate
    estimate_at: Callable[[int], MemoryEstimate]
    sharded: str | None
    estimate_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def report(self) -> RankReport:
        fit = self.at_requested
        return RankReport(True, fit.fits, self.fitting_batch, fit.estimate.total_bytes, fit.free_bytes)


def plan_rank(trainer: Any, pl_module: Any, info: _pl.RunInfo, batch: Any, *, action: str, margin: float,
              budget: int | str | None, trace_timeout: float | None) -> RankPlan:
    """Estimate this rank's step at the batch size of ``batch`` and, for ``"reduce"``, the largest that fits.

    Raises:
        MemguardError: for a run memguard cannot trace (manual optimization, a module already
            sharded, several optimizers) or a step that cannot run on fake tensors.
    """
    if not pl_module.automatic_optimization:
        raise MemguardError("manual optimization is not traced: its training_step steps the real optimizers")
    if info.sharded_module:
        raise MemguardError(f"{info.strategy} has already sharded the module's parameters when the fit starts, "
                            "so their shapes are not the model's; memguard cannot trace its step yet")
    requested = batch_size_of(batch)
    available, where = available_to(info.device, [*pl_module.parameters(), *pl_module.buffers()], budget,
                                    processes=info.local_world_size)
    estimate_at, kwargs = _estimator(trainer, pl_module, info, batch, requested, trace_timeout)
    fit = Fit(estimate_at(requested), available, margin, where)
    if fit.fits or action != "reduce":
        return RankPlan(batch, requested, fit, requested if fit.fits else 0, fit.estimate, estimate_at, info.sharded,
                        kwargs)
    search = max_batch_size(estimate_at, available, margin=margin, limit=requested)
    return RankPlan(batch, requested, fit, search.batch_size, search.estimate, estimate_at, info.sharded, kwargs)


def _estimator(trainer: Any, pl_module: Any, info: _pl.RunInfo, batch: Any, requested: int,
               trace_timeout: float | None) -> tuple[Callable[[int], MemoryEstimate], dict[str, Any]]:
    """The estimate at a batch size, of this run's real step, cached; and the arguments it passes.

    A batch smaller than the one asked for is trained with accumulation (``"reduce"``), whose later
    micro-batches run their forward beside the gradients.
    """
    optimizers = trainer.optimizers
    if len(optimizers) > 1:
        raise MemguardError(f"{len(optimizers)} optimizers: memguard traces a step of one")
    device = "cuda" if info.device.type == "cuda" else "cpu"
    optimizer: Any = optimizer_factory(pl_module, optimizers[0], device) if optimizers else None
    checkpointing = _checkpointing(pl_module)
    parallel = info.parallel or ("ddp" if info.world_size > 1 else "single")

    def step(b: Any) -> Any:  # runs on the module's private state (memguard.estimation.trace.isolation)
        return pl_module.training_step(b, 0)

    kwargs = {"example_input": batch, "step_fn": step, "optimizer": optimizer, "training_loop": "lightning",
              "trace_timeout": trace_timeout}

    def estimate_at(batch_size: int) -> MemoryEstimate:
        est = estimate(pl_module, batch_size=batch_size, precision=info.precision, device=device, method="trace",
                       strategy=parallel, world_size=info.world_size, offload_optimizer=info.offload_optimizer,
                       offload_params=info.offload_params,
                       accumulate_grad_batches=info.accumulate_grad_batches if batch_size >= requested else 2,
                       **kwargs)
        return dataclasses.replace(est, inputs={**est.inputs, "gradient_checkpointing": checkpointing})

    return cached(estimate_at), kwargs


def _checkpointing(module: torch.nn.Module) -> bool:
    """Whether any part of ``module`` recomputes activations in backward.

    transformers marks the modules it checkpoints with ``gradient_checkpointing = True`` (what its
    ``is_activation_checkpointing`` reads); torch's ``checkpoint_wrapper`` wraps them in a
    ``CheckpointWrapper``.
    """
    return any(getattr(m, "gradient_checkpointing", False) is True or type(m).__name__ == "CheckpointWrapper"
               for m in module.modules())


def remedies_for(plan: RankPlan, pl_module: Any, world_size: int) -> list[Any] | None:
    """What would make this rank's step fit (:func:`memguard.planning.guard_remedies`), or ``None``."""
    kwargs = dict(plan.estimate_kwargs)
    fit = plan.at_requested
    return guard_remedies(fit.estimate, fit.free_bytes, fit.margin, model=pl_module, gpus=world_size,
                          optimizer=kwargs.pop("optimizer"), estimate_kwargs=kwargs)
