"""``MemGuardCallback``: memguard for the transformers ``Trainer``.

>>> from memguard.integrations.transformers import MemGuardCallback
>>> trainer = Trainer(model, args, train_dataset=data, callbacks=[MemGuardCallback("raise")])  # doctest: +SKIP

It does for ``transformers.Trainer`` what :class:`memguard.MemGuard` does for Lightning. What the
Trainer lets a callback see, and when (transformers 5.24, ``Trainer.train``, ``_inner_training_loop``):

1. ``Trainer.__init__`` copies ``per_device_train_batch_size`` to ``Trainer._train_batch_size``
   *before* ``on_init_end``; ``train()`` builds the train data loader from it first thing, then
   the number of steps, the optimizer, ``accelerator.prepare`` and the scheduler.
2. ``on_train_begin`` (model, optimizer, loader): the callback reads the run and puts a forward
   pre-hook on the model. The batch size can no longer change (see ``"reduce"`` below).
3. ``get_batch_samples`` draws the first micro-batches, ``on_step_begin`` runs (no callback event
   gets a batch), ``training_step`` calls ``model(**inputs)``: the hook sees the first batch as
   the model gets it, removes itself, estimates and acts, before that forward runs.
4. ``optimizer.step()``, then ``model.zero_grad()`` (``set_to_none=True``, torch's default since
   2.0: a PyTorch-style loop), then ``on_step_end``: after the first, the memory probe starts;
   ``measure_steps`` steps later it is read and logged.

The callback in detail:

It traces one step on fake tensors (:func:`memguard.estimate`, ``training_loop="pytorch"``)
from the run as the Trainer set it up: the model (weights' dtype, gradient checkpointing), the
real optimizer (class and param groups, ``fused``/``foreach`` included; bitsandbytes' 8-bit
AdamW by memguard's stand-in), ``bf16``/``fp16``, ``gradient_accumulation_steps``, the world
size and the first batch as the model receives it; and compares it with ``budget``, or else
with the free memory of ``args.device`` (a GPU: free in NVML plus what this process holds; the
CPU: available host memory shared among this machine's processes, plus the model's resident
tensors), keeping ``margin`` spare. It never changes the run: no data is drawn, the hook removes
itself, and the trace runs in a forked child that sends back only the numbers and is killed after
``trace_timeout`` (:mod:`memguard.estimation.sandbox`), so whatever the model's code does there
(hooks that keep tensors, caches, random draws, compilation) stays in the child. A guarded run
that goes on is the unguarded run, bit for bit.

When the step does not fit, ``"warn"`` warns with the estimate's table, ``"raise"`` raises
:class:`~memguard.InsufficientMemoryError`, and ``"reduce"`` finds the largest batch size that
fits and raises :class:`~memguard.BatchTooLargeError` naming the ``per_device_train_batch_size`` and
``gradient_accumulation_steps`` to set (:func:`memguard.estimation.search.reduced_batch`), since a
Trainer builds its data loader before any callback event (see the module's docs). Under several
processes the ranks agree as the Lightning callback's do (:mod:`memguard.guard`).

After the first optimizer step (a warm-up) and ``measure_steps`` more, it appends one entry to
``state.log_history`` (as ``Trainer.log`` writes them, with ``epoch`` and ``step``):
``memguard/predicted_peak_bytes``, ``memguard/actual_peak_bytes``,
``memguard/predicted_total_bytes``, ``memguard/error`` (actual over predicted peak, minus 1),
``memguard/actual_is_lower_bound`` (CPU resident-memory growth without glibc's mmap threshold
pinned, :mod:`memguard.device.actual`), ``memguard/actual_is_upper_bound`` (the process had
peaked higher before; ``reset_peak=True`` resets the counters instead of reading them) and,
where NVML lists the process, ``memguard/actual_total_bytes``; it warns when the actual peak
exceeds the prediction by more than ``margin``.

Known limitations:
    * DeepSpeed, FSDP, ``torch_compile`` and ``DataParallel`` (several GPUs in one process)
      are not estimated: the callback warns and training goes on.
    * A ``Trainer`` subclass whose ``compute_loss`` does more than ``model(**inputs)`` is
      estimated for the model's forward and loss. A model that returns no loss
      (``compute_loss_func``, label smoothing) gets a log-softmax over its logits instead.
    * Gradient clipping's per-tensor norms and evaluation are not estimated.
    * Only ``log_history`` gets the entry: a callback cannot call ``Trainer.log``, so the
      reporting integrations (TensorBoard, W&B) do not.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from memguard.device.actual import Comparison, Measurement, training_tensors
from memguard.errors import BatchTooLargeError, MissingDependencyError
from memguard.estimation.from_run import batch_size_of
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.step import Step
from memguard.estimation.trace import DEFAULT_TIMEOUT
from memguard.fit import Fit
from memguard.guard import Framework, GuardConfig, RunView, StepProbe, StepView, Verdict, act, assess, traced
from memguard.integrations.trainer_view import (
    all_gather_rows,
    example_batch,
    optimizer_for,
    precision_of,
    reason_not_estimated,
    trainer_loss,
    unwrap_optimizer,
)
from memguard.planning import guard_remedies

try:
    from transformers import TrainerCallback
except ImportError as exc:  # transformers is a dependency of memguard, but an install may lack it
    raise MissingDependencyError("MemGuardCallback needs transformers: pip install transformers") from exc

__all__ = ["BatchTooLargeError", "MemGuardCallback"]  # BatchTooLargeError lives in memguard.errors

log = logging.getLogger(__name__)


class MemGuardCallback(TrainerCallback):  # type: ignore[misc]
    """Predict the memory of a ``Trainer``'s training step before the first one runs, and act on it.

    It never changes the run it guards; what it reads, does and logs: see the module's docstring.

    Args:
        action: ``"warn"``, ``"raise"`` or ``"reduce"``.
        margin: share of the free memory (or budget) to keep spare, in ``[0, 1)``; also the
            tolerance of the predicted-vs-actual warning.
        budget: the memory one process may use instead of what its device has free: bytes
            (``int``), a size (``"12GiB"``) or a share of the device's total memory (``"80%"``).
        strict: raise when the estimate fails instead of warning and training on.
        measure_steps: optimizer steps measured after the first.
        trace_timeout: seconds one trace may take (``None``: no limit); past them its process is killed.
        reset_peak: reset the device's peak counters before measuring (exact even when the process
            peaked higher before training, but the program's own reading of that peak is lost);
            by default they are only read (:mod:`memguard.device.actual`).

    Attributes:
        estimate: the :class:`~memguard.MemoryEstimate` at the batch size asked for, or ``None``.
        available_bytes: the memory compared with (budget or free), before the margin.
        requested_batch_size: the batch size of the first batch.
        fitting_batch_size: the largest batch size that fits (``"reduce"``, when it does not fit).
        measurement: what the first steps really used (a ``Measurement``), or ``None``.
        metrics: the ``memguard/*`` values put into ``log_history``.
    """

    def __init__(self, action: str = "warn", margin: float = 0.1, budget: int | str | None = None, *,
                 strict: bool = False, measure_steps: int = 2,
                 trace_timeout: float | None = DEFAULT_TIMEOUT, reset_peak: bool = False) -> None:
        self.config = GuardConfig(action, margin, budget, strict, measure_steps, trace_timeout, reset_peak)
        self.action = action
        self.margin = self.config.margin
        self.budget = budget
        self.strict = self.config.strict
        self.measure_steps = measure_steps
        self.reset_peak = reset_peak
        self.trace_timeout = trace_timeout
        self._reset()
        self._handle: Any = None

    def _reset(self) -> None:
        self.estimate: MemoryEstimate | None = None
        self.available_bytes: int | None = None
        self.requested_batch_size: int | None = None
        self.fitting_batch_size: int | None = None
        self.measurement: Measurement | None = None
        self.metrics: dict[str, Any] = {}
        self._args: Any = None
        self._state: Any = None
        self._optimizer: Any = None
        self._probe: StepProbe | None = None

    # -- Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Read the run and wait for the first forward, where the first batch is."""
        self._remove_hook()
        self._reset()
        self._args, self._state, self._optimizer = args, state, optimizer
        self._probe = StepProbe(self.config, self._view(), lambda got: self._record(state, got))
        self._probe.arm(state.global_step)
        reason = reason_not_estimated(args, model)
        if reason is not None:
            self._warn(f"MemGuardCallback does not estimate this run: {reason}; training goes on unchecked")
            return
        self._handle = model.register_forward_pre_hook(self._first_forward, with_kwargs=True)

    def _first_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The forward pre-hook: estimate from the first training batch, before its forward runs."""
        if not (module.training and torch.is_grad_enabled()):
            return  # an evaluation before training (eval_on_start): wait for a training forward
        self._remove_hook()
        self._decide(module, example_batch(args, kwargs))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Start measuring after the first optimizer step, and read ``measure_steps`` steps later."""
        if self._handle is not None:
            self._remove_hook()
            self._warn("MemGuardCallback saw no training forward of the model before the first optimizer step "
                       "(a training_step that does not call it?), so the step was not estimated")
        if self._probe is not None and model is not None:
            self._probe.after_step(state.global_step, lambda: self._where(model, optimizer))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Read now if training stopped before ``measure_steps`` steps were measured."""
        self._remove_hook()
        if self._probe is not None:
            self._probe.finish()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- the decision -------------------------------------------------------------------------

    def _view(self) -> RunView:
        """The run in the guard core's terms (:class:`memguard.guard.RunView`); a Trainer's batch size never changes."""
        args = self._args
        device = torch.device(args.device)
        return RunView(Framework.TRAINER, int(args.gradient_accumulation_steps), int(args.process_index),
                       int(args.world_size), device, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)),
                       lambda row: all_gather_rows(row, device), lambda message, every_rank: self._warn(message),
                       log.info)

    def _decide(self, model: torch.nn.Module, batch: Any) -> None:
        """Estimate on this process, agree with the other ranks, and act."""
        view = self._view()
        found = assess(self.config, view, lambda: self._step(model, batch, view.device), can_change_batch=False)
        if found is None or found.plan is None or found.decision is None:
            return
        plan, decision = found.plan, found.decision
        self.available_bytes = plan.at_requested.free_bytes
        self.estimate = plan.at_requested.estimate
        if decision.verdict is Verdict.STREAM:
            self.fitting_batch_size = decision.largest
        training = act(self.config, view, plan, decision, found.reports)
        if training is not None and self._probe is not None:
            self._probe.predicted = (training.estimate.peak_bytes, training.estimate.total_bytes)

    def _step(self, model: torch.nn.Module, batch: Any, device: torch.device) -> StepView:
        """This process's step at ``batch``: the model's forward and loss, the run's optimizer and precision."""
        args = self._args
        self.requested_batch_size = batch_size_of(batch)
        kind = "cuda" if device.type == "cuda" else "cpu"
        optimizer = optimizer_for(args, self._optimizer, model, kind)
        precision = precision_of(args, model, device)
        world = int(args.world_size)

        # Trainer.compute_loss drops the model's output when it returns the loss, before backward
        run = Step(optimizer=optimizer, precision=precision, device=kind, training_loop="pytorch", set_to_none=True,
                   keep_output=False, strategy="ddp" if world > 1 else "single", world_size=world)
        estimate_at = traced(model, run, example_input=batch, loss_fn=trainer_loss, trace_timeout=self.trace_timeout)

        def remedies(fit: Fit) -> list[Any] | None:
            return guard_remedies(fit.estimate, fit.free_bytes, fit.margin, model=model, step=run,
                                  estimate_kwargs={"example_input": batch, "loss_fn": trainer_loss})

        return StepView(batch, estimate_at, [*model.parameters(), *model.buffers()], remedies)

    # -- predicted vs actual ------------------------------------------------------------------

    def _where(self, model: Any, optimizer: Any) -> tuple[torch.device, Sequence[torch.Tensor]]:
        """The device, and what training keeps there between steps (the optimizer inside accelerate's)."""
        inner = unwrap_optimizer(optimizer if optimizer is not None else self._optimizer)
        return torch.device(self._args.device), training_tensors(model, [inner] if inner is not None else [])

    def _record(self, state: Any, result: Comparison) -> None:
        """Append the comparison to ``log_history``, as ``Trainer.log`` writes its entries."""
        if result.measurement is None:  # StepProbe records only what it measured
            return
        self.measurement, self.metrics = result.measurement, result.metrics
        entry: dict[str, Any] = {**result.metrics, "memguard/actual_is_lower_bound": result.measurement.lower_bound,
                                 "memguard/actual_is_upper_bound": result.measurement.upper_bound}
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})

    def _warn(self, message: str) -> None:
        """A warning on the main process; the other ranks log it."""
        if self._state is None or getattr(self._state, "is_world_process_zero", True):
            warnings.warn(message, stacklevel=3)
        else:
            log.warning(message)
