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
fits and raises :class:`BatchTooLargeError` naming the ``per_device_train_batch_size`` and
``gradient_accumulation_steps`` to set (:func:`memguard.estimation.search.reduced_batch`), since a
Trainer builds its data loader before any callback event (see the module's docs).

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

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from memguard._cache import cached
from memguard.device.actual import Measurement, MemoryProbe, read_and_compare, resident_bytes, training_tensors
from memguard.device.available import available_to
from memguard.errors import ConfigError, InsufficientMemoryError, MemguardError, MissingDependencyError
from memguard.estimation.estimator import estimate
from memguard.estimation.from_run import batch_size_of
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.search import max_batch_size, reduced_batch
from memguard.estimation.trace import DEFAULT_TIMEOUT
from memguard.fit import check_margin
from memguard.integrations._trainer import _agree, _example, _loss, _not_estimated, _optimizer, _precision, _unwrap
from memguard.lightning.decision import check_arguments
from memguard.planning import guard_remedies, remedy_lines
from memguard.units import format_bytes

try:
    from transformers import TrainerCallback
except ImportError as exc:  # transformers is a dependency of memguard, but an install may lack it
    raise MissingDependencyError("MemGuardCallback needs transformers: pip install transformers") from exc

__all__ = ["BatchTooLargeError", "MemGuardCallback"]

log = logging.getLogger(__name__)


class BatchTooLargeError(ConfigError, InsufficientMemoryError):
    """``action="reduce"``: the step does not fit, and a ``Trainer`` lets no callback change its batch size.

    Both a :class:`~memguard.ConfigError` and an :class:`~memguard.InsufficientMemoryError`, raised
    before the first forward.

    Attributes:
        batch_size: the ``per_device_train_batch_size`` to train with.
        gradient_accumulation_steps: the ``gradient_accumulation_steps`` that goes with it.
        fitting_batch_size: the largest batch size that fits (``batch_size`` is at most it).
        estimate: the estimate at the batch size asked for; ``free_bytes``: the memory compared with.
    """

    def __init__(self, message: str, *, batch_size: int, gradient_accumulation_steps: int, fitting_batch_size: int,
                 estimate: MemoryEstimate | None = None, free_bytes: int | None = None) -> None:
        InsufficientMemoryError.__init__(self, message, estimate=estimate, free_bytes=free_bytes)
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.fitting_batch_size = fitting_batch_size

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self), {"batch_size": self.batch_size, "fitting_batch_size": self.fitting_batch_size,
                                       "gradient_accumulation_steps": self.gradient_accumulation_steps,
                                       "estimate": self.estimate, "free_bytes": self.free_bytes}))


def _rebuild(message: str, fields: dict[str, Any]) -> BatchTooLargeError:
    return BatchTooLargeError(message, **fields)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """This rank's estimate at the batch size asked for, and the largest that fits (``"reduce"``)."""

    requested: int
    accumulate: int
    at_requested: MemoryEstimate
    fits: bool
    fitting_batch: int
    available: int
    where: str


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
        check_arguments(action, margin, budget, measure_steps, trace_timeout, reset_peak)
        self.action = action
        self.margin = check_margin(margin)
        self.budget = budget
        self.strict = bool(strict)
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
        self._predicted: tuple[int, int] | None = None  # peak, total
        self._probe: MemoryProbe | None = None
        self._probe_step = 0
        self._start_step = 0

    # -- Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Read the run and wait for the first forward, where the first batch is."""
        self._remove_hook()
        self._reset()
        self._args, self._state, self._optimizer = args, state, optimizer
        self._start_step = state.global_step + 1
        reason = _not_estimated(args, model)
        if reason is not None:
            self._warn(f"MemGuardCallback does not estimate this run: {reason}; training goes on unchecked")
            return
        self._handle = model.register_forward_pre_hook(self._first_forward, with_kwargs=True)

    def _first_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The forward pre-hook: estimate from the first training batch, before its forward runs."""
        if not (module.training and torch.is_grad_enabled()):
            return  # an evaluation before training (eval_on_start): wait for a training forward
        self._remove_hook()
        self._decide(module, _example(args, kwargs))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Start measuring after the first optimizer step, and read ``measure_steps`` steps later."""
        if self._handle is not None:
            self._remove_hook()
            self._warn("MemGuardCallback saw no training forward of the model before the first optimizer step "
                       "(a training_step that does not call it?), so the step was not estimated")
        if self._predicted is None:
            return
        if self._probe is None and not self.metrics and state.global_step >= self._start_step and model is not None:
            self._safely(self._start_probe, state, model, optimizer)
        elif self._probe is not None and state.global_step >= self._probe_step + self.measure_steps:
            self._safely(self._measure, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Read now if training stopped before ``measure_steps`` steps were measured."""
        self._remove_hook()
        if self._probe is not None:
            self._safely(self._measure, state)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- the decision -------------------------------------------------------------------------

    def _decide(self, model: torch.nn.Module, batch: Any) -> None:
        """Estimate on this process, agree with the other ranks, and act."""
        device = torch.device(self._args.device)
        plan: _Plan | None = None
        failure: Exception | None = None
        try:
            plan = self._plan(model, batch, device)
        except Exception as exc:
            failure = exc
        # Every rank takes part in the same collective, whatever happened to it.
        rows = _agree([0, 0, 0] if plan is None else [1, int(plan.fits), plan.fitting_batch], device)
        if plan is None:
            if self.strict and failure is not None:
                raise failure
            self._warn(f"MemGuardCallback could not estimate the memory of a training step, so training goes on "
                       f"unchecked: {type(failure).__name__}: {failure}")
            return
        failed = [rank for rank, row in enumerate(rows) if row[0] == 0]
        if failed:
            if self.strict:
                raise MemguardError(f"MemGuardCallback could not estimate the memory of a training step on rank(s) "
                                    f"{failed}")
            self._warn(f"MemGuardCallback could not estimate a training step on rank(s) {failed}, so training goes "
                       "on unchecked")
            return
        if plan.at_requested.uncertain:
            self._warn(f"MemGuardCallback: the estimate rests on invented values, {plan.at_requested.stand_in_line()}")
        self._act(plan, rows)

    def _plan(self, model: torch.nn.Module, batch: Any, device: torch.device) -> _Plan:
        args = self._args
        requested = batch_size_of(batch)
        accumulate = int(args.gradient_accumulation_steps)
        self.requested_batch_size = requested
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        available, where = available_to(device, [*model.parameters(), *model.buffers()], self.budget,
                                        processes=processes)
        self.available_bytes = available
        optimizer = _optimizer(self._args, self._optimizer, model, "cuda" if device.type == "cuda" else "cpu")
        self._inputs = (model, batch, optimizer)
        estimate_at = self._estimator(model, batch, requested, device, optimizer)
        est = estimate_at(requested)
        self.estimate = est
        fits = est.fits(available, self.margin)
        fitting = requested if fits else 0
        if not fits and self.action == "reduce":
            fitting = max_batch_size(estimate_at, available, margin=self.margin, limit=requested).batch_size
        return _Plan(requested, accumulate, est, fits, fitting, available, where)

    def _remedies(self, est: MemoryEstimate, available: int) -> list[Any] | None:
        """What would make the step fit, or ``None`` (:func:`memguard.planning.guard_remedies`)."""
        model, batch, optimizer = self._inputs
        return guard_remedies(est, available, self.margin, model=model, optimizer=optimizer,
                              estimate_kwargs={"example_input": batch, "loss_fn": _loss, "training_loop": "pytorch"})

    def _estimator(self, model: torch.nn.Module, batch: Any, requested: int, device: torch.device,
                   optimizer: Any) -> Callable[[int], MemoryEstimate]:
        """The estimate of this run's step at a batch size, cached; a smaller batch than asked trains
        with accumulation, whose later micro-batches run their forward beside the gradients."""
        args = self._args
        kind = "cuda" if device.type == "cuda" else "cpu"
        precision = _precision(args, model, device)
        accumulate = int(args.gradient_accumulation_steps)
        world = int(args.world_size)

        def estimate_at(batch_size: int) -> MemoryEstimate:
            return estimate(
                model, batch_size=batch_size, example_input=batch, optimizer=optimizer, precision=precision,
                device=kind, method="trace", loss_fn=_loss, training_loop="pytorch", set_to_none=True,
                strategy="ddp" if world > 1 else "single", world_size=world, trace_timeout=self.trace_timeout,
                accumulate_grad_batches=accumulate if batch_size >= requested else max(accumulate, 2))

        return cached(estimate_at)

    def _act(self, plan: _Plan, rows: list[list[int]]) -> None:
        est = plan.at_requested
        too_big = [rank for rank, row in enumerate(rows) if row[1] == 0]
        on_ranks = f" on rank(s) {too_big}" if len(rows) > 1 else ""
        summary = (f"{format_bytes(est.total_bytes)} predicted, {format_bytes(plan.available)} available "
                   f"({plan.where}), margin {self.margin:.0%}")
        asked = f"a training step at per_device_train_batch_size={plan.requested}"
        if not too_big:
            self._predicted = (est.peak_bytes, est.total_bytes)
            log.info("MemGuardCallback: %s fits: %s", asked, summary)
            return
        if self.action == "warn":
            self._predicted = (est.peak_bytes, est.total_bytes)
            self._warn(f"MemGuardCallback: {asked} may not fit{on_ranks}: {summary}.\n{est.table()}")
            return
        largest = min(row[2] for row in rows)
        if self.action == "raise" or largest == 0:
            head = f"MemGuardCallback: {asked} does not fit{on_ranks}: {summary}"
            none_fit = self.action == "reduce"
            if none_fit:
                head += "; not even a batch of 1 fits"
            lines = [f"{head}.", *remedy_lines(self._remedies(est, plan.available)), est.table()]
            raise InsufficientMemoryError("\n".join(lines), estimate=est, free_bytes=plan.available)
        self.fitting_batch_size = largest
        batch, accumulate = reduced_batch(plan.requested, plan.accumulate, largest)
        effective, wanted = batch * accumulate, plan.requested * plan.accumulate
        kept = (f"the same effective batch of {effective}" if effective == wanted else
                f"an effective batch of {effective}, not {wanted}: no divisor of {wanted} lies between "
                f"{largest / 2:g} and {largest}")
        raise BatchTooLargeError(
            f"MemGuardCallback: {asked} does not fit{on_ranks} ({summary}); the largest batch that fits is "
            f"{largest}. action='reduce' cannot change the batch size of a transformers Trainer: it builds its "
            "train data loader from per_device_train_batch_size when train() starts, before any callback event "
            "(on_init_end comes after __init__ copies the batch size, on_train_begin after the loader, the "
            f"step count and the scheduler are made). Set per_device_train_batch_size={batch} and "
            f"gradient_accumulation_steps={accumulate} (was {plan.accumulate}; {kept} per device) in "
            "TrainingArguments and train again.",
            batch_size=batch, gradient_accumulation_steps=accumulate, fitting_batch_size=largest,
            estimate=est, free_bytes=plan.available)

    # -- predicted vs actual ------------------------------------------------------------------

    def _start_probe(self, state: Any, model: Any, optimizer: Any) -> None:
        """Read (or reset) the peak counters of the device; the tensors resident now are credited."""
        device = torch.device(self._args.device)
        inner = _unwrap(optimizer if optimizer is not None else self._optimizer)
        probe = MemoryProbe(device, reset=self.reset_peak)
        if probe.start(resident_bytes(training_tensors(model, [inner] if inner is not None else []), device)):
            self._probe, self._probe_step = probe, state.global_step
        else:
            self._predicted = None
            log.info("MemGuardCallback cannot measure the memory of %s here; predicted vs actual is not logged",
                     device)

    def _measure(self, state: Any) -> None:
        probe, self._probe = self._probe, None
        result = read_and_compare(probe, self._predicted, self.margin)
        if result is None or result.measurement is None:
            return
        self.measurement, self.metrics = result.measurement, result.metrics
        entry: dict[str, Any] = {**result.metrics, "memguard/actual_is_lower_bound": result.measurement.lower_bound,
                                 "memguard/actual_is_upper_bound": result.measurement.upper_bound}
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})  # as Trainer.log writes its entries
        log.info("MemGuardCallback: %s", result.summary)
        if result.warning:
            self._warn(f"MemGuardCallback: {result.warning}")

    def _safely(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a measurement step; its failure is warned about and never stops training (unless strict)."""
        try:
            fn(*args)
        except Exception as exc:
            self._probe, self._predicted = None, None
            if self.strict:
                raise
            self._warn(f"MemGuardCallback could not measure the memory of the first steps: "
                       f"{type(exc).__name__}: {exc}")

    def _warn(self, message: str) -> None:
        """A warning on the main process; the other ranks log it."""
        if self._state is None or getattr(self._state, "is_world_process_zero", True):
            warnings.warn(message, stacklevel=3)
        else:
            log.warning(message)


# -- what the Trainer says, in memguard's terms ----------------------------------------------
