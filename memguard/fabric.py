"""``memguard.fabric.preflight``: the guard for a Lightning Fabric loop, checked before its first step.

>>> fabric = Fabric(accelerator="cuda", devices=2, precision="bf16-mixed")  # doctest: +SKIP
>>> fabric.launch()  # doctest: +SKIP
>>> model, optimizer = fabric.setup(model, optimizer)  # doctest: +SKIP
>>> batch = next(iter(loader))  # doctest: +SKIP
>>> decision = memguard.fabric.preflight(fabric, model, optimizer, batch, action="raise")  # doctest: +SKIP

A Fabric loop is the user's own, so there are no hooks to wait in: the loop calls
:func:`preflight` once, with the first batch, before its first step. It does what the Lightning
callback :class:`memguard.MemGuard` does at that point, through the same core
(:mod:`memguard.guard`): traces one step of ``model`` on fake tensors (``step_fn(batch)``, or
``model`` called on the batch as :func:`memguard.estimate` calls it), with the real optimizer,
Fabric's precision and strategy, compares it with ``budget`` or the free memory of
``fabric.device`` keeping ``margin`` spare, agrees with the other ranks (``fabric.all_gather``),
and warns or raises.

Known limitations:
    * ``action="reduce"`` cannot change the batch size: the loop builds its own data loader. It
      raises :class:`~memguard.BatchTooLargeError` naming the batch size and the gradient
      accumulation that would fit (the decision every rank agreed on), which the loop can apply.
    * Predicted vs actual is not measured (no hooks after the first steps); compare the estimate
      with ``torch.cuda.max_memory_allocated()`` in your loop.
    * Fully sharded strategies (FSDP, DeepSpeed stage 3) have sharded the parameters in
      ``fabric.setup``: the estimate fails with a warning (``strict=True``: raises), as in the
      Lightning callback.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from memguard.errors import ConfigError, MemguardError, require
from memguard.estimation.from_run import optimizer_factory
from memguard.estimation.step import Step
from memguard.estimation.trace import DEFAULT_TIMEOUT
from memguard.fit import Fit
from memguard.guard import Decision, Framework, GuardConfig, RunView, StepView, act, alone, assess, traced
from memguard.lightning.run import parallelism
from memguard.planning import guard_remedies

__all__ = ["preflight"]

log = logging.getLogger(__name__)


def preflight(fabric: Any, model: torch.nn.Module, optimizer: Any, batch: Any, *, action: str = "warn",
              margin: float = 0.1, budget: int | str | None = None, strict: bool = False,
              step_fn: Callable[[Any], Any] | None = None, loss_fn: Callable[[Any, Any], Any] | None = None,
              accumulate: int = 1, trace_timeout: float | None = DEFAULT_TIMEOUT,
              keep_output: bool | None = None) -> Decision | None:
    """Check that one training step of a Fabric loop fits, before it runs; every rank calls it.

    Args:
        fabric: the ``lightning.fabric.Fabric`` (launched; its device, precision and strategy are read).
        model: the model, as ``fabric.setup`` returned it (or before).
        optimizer: the optimizer (as ``fabric.setup`` returned it, or the torch one), a memguard name
            (``"adamw"``) or ``None`` for no optimizer step.
        batch: this rank's first batch, as the loop feeds it (its shapes are what counts).
        action: ``"warn"``, ``"raise"`` or ``"reduce"`` (raises :class:`~memguard.BatchTooLargeError`
            with what would fit: see the module's docs).
        margin: share of the free memory (or budget) to keep spare, in ``[0, 1)``.
        budget: the memory one rank may use instead of what its device has free: bytes, ``"12GiB"``
            or ``"80%"``.
        strict: raise when the estimate fails instead of warning.
        step_fn: ``step_fn(batch) -> loss``: the loop's forward and loss; default: ``model`` called on
            the batch (a tuple as positional, a dict as keyword arguments).
        loss_fn: ``loss_fn(output, batch) -> loss`` when ``model``'s output is not the loss.
        accumulate: micro-batches per optimizer step in the loop.
        trace_timeout: seconds one trace may take (``None``: no limit).
        keep_output: the loop keeps the model's output to the next forward (``output = model(batch)``
            in the loop, not inside ``step_fn``): ``True`` counts it, ``False`` drops it, ``None`` puts its
            bytes in the estimate's band (:func:`memguard.estimate`).

    Returns:
        The decision every rank reached (``verdict`` ``"fits"`` or ``"warn"``; ``"unchecked"`` when
        another rank could not estimate), or ``None`` when this rank could not (a warning says why).

    Raises:
        InsufficientMemoryError: ``"raise"`` and the step does not fit, or not even a batch of 1 does.
        BatchTooLargeError: ``"reduce"`` and the step does not fit: what would.
        ConfigError: for a bad argument.
    """
    require("lightning.fabric", "lightning", "memguard.fabric.preflight")
    config = GuardConfig(action, margin, budget, strict, trace_timeout=trace_timeout)
    view = _view(fabric, accumulate)
    found = assess(config, view, lambda: _step(fabric, model, optimizer, batch, step_fn, loss_fn, trace_timeout,
                                                          keep_output),
                   can_change_batch=False)
    if found is None or found.plan is None or found.decision is None:
        return None
    act(config, view, found.plan, found.decision, found.reports)
    return found.decision


def _view(fabric: Any, accumulate: int) -> RunView:
    """The Fabric run in the guard core's terms; its batch size never changes."""
    rank_zero = require("lightning.fabric.utilities.rank_zero", "lightning", "memguard.fabric.preflight")
    rank, world = int(fabric.global_rank), int(fabric.world_size)

    def warn(message: str, every_rank: bool) -> None:
        if every_rank and rank != 0:
            warnings.warn(f"[rank {rank}] {message}", stacklevel=2)
        else:
            rank_zero.rank_zero_warn(message)

    def info(message: str) -> None:
        log.info(message)
        rank_zero.rank_zero_info(message)

    def all_gather(row: list[int]) -> list[list[int]]:
        gathered = fabric.all_gather(torch.tensor(row, dtype=torch.int64, device=fabric.device))
        return gathered.reshape(-1, len(row)).cpu().tolist()

    return RunView(Framework.FABRIC, _positive(accumulate), rank, world, torch.device(fabric.device),
                   max(1, int(getattr(fabric.strategy, "num_processes", 1) or 1)),
                   all_gather if world > 1 else alone, warn, info)


def _positive(accumulate: Any) -> int:
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"accumulate must be a positive integer, got {accumulate!r}")
    return accumulate


def _step(fabric: Any, model: torch.nn.Module, optimizer: Any, batch: Any, step_fn: Callable[[Any], Any] | None,
          loss_fn: Callable[[Any, Any], Any] | None, trace_timeout: float | None,
          keep_output: bool | None) -> StepView:
    """This rank's step at ``batch``, with Fabric's precision and strategy and the real optimizer."""
    wrappers = require("lightning.fabric.wrappers", "lightning", "memguard.fabric.preflight")
    module = model.module if wrappers.is_wrapped(model) and hasattr(model, "module") else model
    world = int(fabric.world_size)
    parallel, offload_optimizer, offload_params, sharded = parallelism(fabric.strategy, world)
    if sharded:
        raise MemguardError(f"{type(fabric.strategy).__name__} has already sharded the module's parameters in "
                            "fabric.setup, so their shapes are not the model's; memguard cannot trace its step yet")
    device = "cuda" if torch.device(fabric.device).type == "cuda" else "cpu"
    inner = optimizer.optimizer if wrappers.is_wrapped(optimizer) else optimizer
    rebuilt: Any = optimizer_factory(module, inner, device) if isinstance(inner, torch.optim.Optimizer) else inner
    kwargs: dict[str, Any] = {"example_input": batch, "trace_timeout": trace_timeout}
    if step_fn is not None:
        kwargs["step_fn"] = step_fn
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    precision = str(getattr(fabric.strategy.precision, "precision", "32-true"))

    run = Step(optimizer=rebuilt or "none", precision=precision, device=device, training_loop="pytorch",
               strategy=parallel or ("ddp" if world > 1 else "single"), world_size=world,
               offload_optimizer=offload_optimizer, offload_params=offload_params, keep_output=keep_output)
    estimate_at = traced(module, run, **kwargs)

    def remedies(fit: Fit) -> list[Any] | None:
        return guard_remedies(fit.estimate, fit.free_bytes, fit.margin, model=module, step=run,
                              estimate_kwargs=kwargs)

    return StepView(batch, estimate_at, [*module.parameters(), *module.buffers()], remedies)
