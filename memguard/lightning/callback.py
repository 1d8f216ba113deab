"""``MemGuard``: a Lightning callback that checks the memory of a training step before it runs.

>>> from memguard import MemGuard
>>> trainer = Trainer(callbacks=[MemGuard(action="reduce", margin=0.1)])  # doctest: +SKIP

The callback reads the run as the Trainer has set it up (the LightningModule, its optimizer, the
precision, the strategy and a real batch), predicts the peak memory of one training step with
:func:`memguard.estimate` by tracing the module's own ``training_step`` on fake tensors, and acts
before the first step: it warns, raises, or trains with a batch size that fits and more gradient
accumulation, keeping the effective batch. After the first steps it logs what the step really used
next to the prediction.

When it acts, in Lightning 2.x's order (``Trainer._run``):

1. ``setup("fit")``: checks that ``"reduce"`` can change the batch size of this run.
2. ``load_state_dict`` (resuming): keeps the checkpoint's batch size and accumulation.
3. ``strategy.setup``: the model is on its device, the optimizers exist.
4. ``on_fit_start``: applies a checkpoint's decision; with ``"reduce"`` it peeks at a batch,
   estimates, agrees across ranks and acts, before the fit loop builds its train data loader.
5. ``on_train_batch_start`` of the first batch (``"warn"``, ``"raise"``, or ``"reduce"`` on a
   stream): estimates from the batch the fit loop hands over, agrees across ranks and acts,
   before the first step runs.
6. ``on_train_start``, ``on_train_batch_end``: after the first optimizer step the peak counters
   are read (reset only with ``reset_peak=True``), and ``measure_steps`` steps later the actual
   peak is read and logged (``on_train_end`` reads it if training stops sooner).

It never changes the run it guards: a fit with ``"warn"``, or with any action when the step
fits, is the fit without it, bit for bit. What it reads:

* the first batch of this rank: with ``"warn"`` and ``"raise"``, the one the fit loop hands to
  ``on_train_batch_start`` before the first step (no data is touched); with ``"reduce"``, which
  must set the batch size before the loader is built, the shapes of the first batch of a fresh
  loader in ``on_fit_start``, read in a forked child (:func:`memguard.lightning.run.peek_batch`:
  whatever ``train_dataloader()`` and the loader do there, calls, random draws, workers, stays in
  the child); a stream, an ``IterableDataset``, is not peeked at: it is decided at its first
  batch, where a step that does not fit raises with the batch size that would;
* the LightningModule, whose ``training_step`` is traced on fake tensors resized to each batch
  size tried, in a forked child that sends back only the numbers and is killed after
  ``trace_timeout`` (:mod:`memguard.estimation.sandbox`): whatever the step does there (steps a
  scheduler, appends, counts, caches, compiles, draws random numbers) stays in the child;
  ``self.log``, the loggers and ``print`` do nothing, and :func:`memguard.is_tracing` tells code
  with effects outside the process (files) to skip them;
* the real optimizer (its class and each param group's hyperparameters, over exactly the
  parameters it holds), the Trainer's precision, the gradient checkpointing of the model, and
  the strategy (world size, sharding).

It compares the estimate with ``budget`` when given, else with the free memory of the root
device: for a GPU, what NVML reports free plus what this process already holds there; for the
CPU, the host's available memory shared among the processes on the machine, plus the model's
tensors that are already resident. ``margin`` of it is kept spare.

Actions when the step does not fit:

* ``"warn"``: a rank-zero warning with the estimate's table and the free memory.
* ``"raise"``: :class:`~memguard.InsufficientMemoryError` (with ``.estimate`` and
  ``.free_bytes``) before any step runs.
* ``"reduce"``: the largest batch size that fits, ``b_max``, is found on the estimator (no
  trial steps). With ``b`` asked and accumulation ``a``, the effective batch ``E = b * a`` is
  kept exactly whenever ``E`` has a divisor between ``b_max / 2`` and ``b_max``: the largest
  one becomes the batch size and ``accumulate_grad_batches`` makes up the rest (asked 64, 11
  fit: 8 x 8). Otherwise the fewest micro-batches of at most ``b_max`` that make at least
  ``E``, and a warning says what changed (:func:`memguard.estimation.search.reduced_batch`). The
  batch size is set where it lives (the model, its ``hparams`` or the datamodule, as Lightning's
  ``lightning_setattr`` finds it) and the data loaders are rebuilt. When even a batch of 1 does
  not fit, it raises.

``"raise"``, ``"warn"`` and a ``"reduce"`` that cannot fit list what would
(:func:`memguard.remedies`: only changes that fit, with their predicted totals).

Under a distributed strategy every rank estimates for its own device, and the ranks agree:
the smallest batch size that fits on all of them, and one raise when any does not fit.

After the first optimizer step (a warm-up) and ``measure_steps`` more, it logs to the Trainer's
loggers ``memguard/predicted_peak_bytes``, ``memguard/actual_peak_bytes``,
``memguard/predicted_total_bytes``, ``memguard/actual_total_bytes`` (the process's memory in
NVML, where NVML lists it) and ``memguard/error`` (actual over predicted peak, minus 1), and
warns when the actual peak is above the prediction by more than ``margin``. On a GPU the
actual peak is ``torch.cuda.max_memory_allocated``; on the CPU the growth of resident memory
(see :mod:`memguard.device.actual` for how, and its limits).

The chosen batch size and accumulation are saved in checkpoints and restored on resume,
without estimating again.

When the estimate itself fails (a ``training_step`` that cannot run on fake tensors, manual
optimization, an unknown precision plugin), the callback warns and training goes on, unless
``strict=True``.

Known limitations:
    * Fully sharded strategies (FSDP, DeepSpeed stage 3) have sharded the module's parameters
      before the fit starts, so the step cannot be traced from them yet: the callback warns
      and training goes on. DeepSpeed stages 1 and 2 get the sharded estimate (model state per
      ZeRO), DDP its gradient buckets; a strategy memguard does not know is estimated as one
      unsharded replica, with a warning.
    * Manual optimization is not traced (``training_step`` steps real optimizers itself).
    * Only the training step is estimated, not validation.
    * ``training_step`` runs once per batch size tried, in a forked child; effects outside the
      process (files, sockets) happen then, unless the code checks :func:`memguard.is_tracing`.
      Where fork is not available (Windows, macOS) it runs in this process on private copies of
      the modules' state, which cannot cover effects outside the modules (a warning says so).
    * The trace stops after ``trace_timeout`` seconds (a loop waiting on computed values never
      ends on fake data); the callback then warns and training goes on.
    * Collectives inside ``training_step`` (``SyncBatchNorm``) cannot be traced.
    * The actual peak is exact when the measured steps raise the process's high-water mark; when
      the process peaked higher before the fit, it is an upper bound unless ``reset_peak=True``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memguard.device.actual import Comparison, Measurement, training_tensors
from memguard.errors import ConfigError
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.trace import DEFAULT_TIMEOUT, is_tracing
from memguard.guard import Framework, GuardConfig, RunView, StepProbe, StepView, act, assess
from memguard.lightning import run as _pl
from memguard.lightning.batch import reducible, set_batch
from memguard.lightning.rank import step_view

__all__ = ["MemGuard"]

log = logging.getLogger(__name__)


class MemGuard(*_pl.callback_bases()):  # type: ignore[misc]
    """Predict the memory of a training step before the first one runs, and act on it.

    An instance of the ``Callback`` class of both ``pytorch_lightning`` and ``lightning.pytorch``
    (whichever are installed), so either Trainer takes it. It never changes the run it guards: a
    fit with ``"warn"``, or with any action when the step fits, is the fit without it, bit for bit.
    What it reads, how it decides and what it logs: see the module's docstring.

    Args:
        action: ``"warn"``, ``"raise"`` or ``"reduce"``.
        margin: share of the free memory (or budget) to keep spare, in ``[0, 1)``; also the
            tolerance of the predicted-vs-actual warning.
        budget: the memory one rank may use instead of what its device has free: bytes (``int``),
            a size (``"12GiB"``) or a share of the device's total memory (``"80%"``).
        batch_arg_name: the attribute holding the batch size, for ``"reduce"`` (Lightning's
            ``BatchSizeFinder`` uses the same name and lookup).
        strict: raise when the estimate fails instead of warning.
        measure_steps: optimizer steps over which the actual peak is measured, after the first
            step, which warms up (lazy initialisation of kernels and allocators) and is not
            measured. Every measured step is in the steady state the estimate predicts, with
            optimizer state and last step's gradients alive.
        trace_timeout: seconds one trace of ``training_step`` (or the peek at the data) may take
            (``None``: no limit); past them its process is killed.
        reset_peak: reset the device's peak counters (``torch.cuda.reset_peak_memory_stats``,
            ``VmHWM``) before measuring, for an exact actual peak even when the process peaked
            higher before the fit; what the program itself would read of that earlier peak is then
            lost. By default the counters are only read (:mod:`memguard.device.actual`).

    Attributes:
        estimate: the :class:`~memguard.MemoryEstimate` at the batch size trained with (``None``
            before ``fit``, after a failed estimate, and on resume).
        available_bytes: the memory compared with (budget or free), before the margin.
        requested_batch_size: the batch size of the data loader as given.
        fitting_batch_size: the largest batch size that fits on this rank, before the ranks agree
            (``"reduce"`` only; 0 when not even 1 fits).
        batch_size: the batch size trained with.
        requested_accumulate_grad_batches: the accumulation as given.
        accumulate_grad_batches: the accumulation trained with.
        measurement: what the first steps really used (a ``Measurement``), or ``None``.
        metrics: the values logged as ``memguard/*``.
    """

    def __init__(self, action: str = "warn", margin: float = 0.1, budget: int | str | None = None, *,
                 batch_arg_name: str = "batch_size", strict: bool = False, measure_steps: int = 2,
                 trace_timeout: float | None = DEFAULT_TIMEOUT, reset_peak: bool = False) -> None:
        self.config = GuardConfig(action, margin, budget, strict, measure_steps, trace_timeout, reset_peak)
        if not isinstance(batch_arg_name, str) or not batch_arg_name:
            raise ConfigError(f"batch_arg_name must be a non-empty string, got {batch_arg_name!r}")
        self.action = action
        self.trace_timeout = trace_timeout
        self.margin = self.config.margin
        self.budget = budget
        self.batch_arg_name = batch_arg_name
        self.strict = self.config.strict
        self.measure_steps = measure_steps
        self.reset_peak = reset_peak

        self.estimate: MemoryEstimate | None = None
        self.available_bytes: int | None = None
        self.requested_batch_size: int | None = None
        self.fitting_batch_size: int | None = None
        self.batch_size: int | None = None
        self.requested_accumulate_grad_batches: int | None = None
        self.accumulate_grad_batches: int | None = None
        self.measurement: Measurement | None = None
        self.metrics: dict[str, float] = {}
        self._predicted: tuple[int, int] | None = None  # peak, total
        self._reduced = False
        self._restored: dict[str, Any] = {}
        self._probe: StepProbe | None = None
        self._pending = False  # the decision waits for a batch

    @staticmethod
    def is_tracing() -> bool:
        """Whether a ``training_step`` runs on fake tensors for the estimate, right now
        (:func:`memguard.is_tracing`)."""
        return is_tracing()

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check that ``"reduce"`` can change the batch size of this run."""
        if stage != "fit" or self.action != "reduce":
            return
        warning = reducible(trainer, pl_module, self.batch_arg_name)
        if warning:
            self._warn(trainer, warning)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply a checkpoint's decision; for ``"reduce"``, decide now, before the loader is built."""
        self._pending = False
        if self._restored.get("batch_size") is not None:
            self._resume(trainer, pl_module)
            self._restored = {}
            return
        if trainer.limit_train_batches == 0:
            return
        self._pending = True
        if self.action == "reduce":  # the batch size can only change before the fit loop builds its loader
            self._decide(trainer, pl_module, lambda: _pl.peek_batch(trainer, self.trace_timeout), early=True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Decide from the first batch the fit loop hands over, before its step runs."""
        if self._pending:
            self._decide(trainer, pl_module, lambda: batch, early=False)

    def _view(self, trainer: Any, pl_module: Any, info: _pl.RunInfo | None = None) -> RunView:
        """The run in the guard core's terms (:class:`memguard.guard.RunView`)."""

        def warn(message: str, every_rank: bool) -> None:
            self._warn(trainer, message, every_rank)

        if info is None:
            return RunView(Framework.LIGHTNING, warn=warn, info=lambda message: self._info(trainer, message))

        def train_with(batch_size: int, accumulate: int) -> None:
            set_batch(trainer, pl_module, self.batch_arg_name, batch_size, accumulate)
            if info.handles_accumulation:
                self._warn(trainer, f"{info.strategy} configures gradient accumulation when it sets up, so the "
                                    f"accumulation of {accumulate} MemGuard chose may not apply")

        return RunView(Framework.LIGHTNING, info.accumulate_grad_batches, info.rank, info.world_size, info.device,
                       info.local_world_size, lambda row: _pl.agree(trainer, row), warn,
                       lambda message: self._info(trainer, message), train_with)

    def _decide(self, trainer: Any, pl_module: Any, fetch: Callable[[], Any], *, early: bool) -> None:
        """Estimate at the batch ``fetch`` returns, agree with the other ranks, and act.

        ``fetch`` returns ``None`` for a stream that cannot be peeked at: the decision then waits
        for the first batch of the fit.
        """
        info = _pl.run_info(trainer)
        self.requested_accumulate_grad_batches = self.accumulate_grad_batches = info.accumulate_grad_batches
        self._pending = False

        def step() -> StepView | None:
            batch = fetch()
            if batch is None:  # the same kind of data on every rank, so every rank returns here
                log.info("MemGuard: the train data is a stream; deciding at its first batch")
                return None
            if info.parallel is None:
                self._warn(trainer, f"memguard does not know how {info.strategy} shards the model: the estimate is "
                                    "for one unsharded replica, an over-estimate")
            return step_view(trainer, pl_module, info, batch, self.trace_timeout)

        view = self._view(trainer, pl_module, info)
        found = assess(self.config, view, step, can_change_batch=early)
        if found is None:
            self._pending = True
            return
        plan = found.plan
        if plan is None or found.decision is None:
            return
        self.available_bytes = plan.at_requested.free_bytes
        if self.action == "reduce":
            self.fitting_batch_size = plan.fitting_batch
        training = act(self.config, view, plan, found.decision, found.reports)
        if training is not None:
            self.estimate = training.estimate
            self._reduced = training.reduced
            self._decided(plan.requested, training.estimate, training.batch_size, training.accumulate)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Arm the measurement: it starts after the first optimizer step."""
        self._probe = StepProbe(self.config, self._view(trainer, pl_module), lambda got: self._record(trainer, got),
                                self._predicted)
        self._probe.arm(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Start measuring after the first optimizer step, and read after ``measure_steps`` more."""
        if self._probe is not None:
            self._probe.after_step(trainer.global_step, lambda: self._where(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Read now if training stopped before ``measure_steps`` steps were measured."""
        if self._probe is not None:
            self._probe.finish()

    def state_dict(self) -> dict[str, Any]:
        """The batch size and accumulation chosen, and what was predicted: flat, JSON-ready."""
        if self.batch_size is None:
            return {}
        peak, total = self._predicted or (None, None)
        return {
            "batch_size": self.batch_size,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "requested_batch_size": self.requested_batch_size,
            "requested_accumulate_grad_batches": self.requested_accumulate_grad_batches,
            "reduced": self._reduced,
            "predicted_peak_bytes": peak,
            "predicted_total_bytes": total,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's decision, applied in ``on_fit_start`` without estimating again."""
        self._restored = dict(state_dict)

    def _decided(self, requested: int, est: MemoryEstimate, batch_size: int, accumulate: int) -> None:
        self.requested_batch_size = requested
        self.batch_size = batch_size
        self.accumulate_grad_batches = accumulate
        self._predicted = (est.peak_bytes, est.total_bytes)
        if self._probe is not None:  # decided at the first batch, after on_train_start
            self._probe.predicted = self._predicted

    def _resume(self, trainer: Any, pl_module: Any) -> None:
        state = self._restored
        self.batch_size = int(state["batch_size"])
        self.accumulate_grad_batches = int(state.get("accumulate_grad_batches") or trainer.accumulate_grad_batches)
        self.requested_batch_size = state.get("requested_batch_size", self.batch_size)
        self.requested_accumulate_grad_batches = state.get("requested_accumulate_grad_batches",
                                                           self.accumulate_grad_batches)
        self._reduced = bool(state.get("reduced", False))
        peak, total = state.get("predicted_peak_bytes"), state.get("predicted_total_bytes")
        self._predicted = (int(peak), int(total)) if peak is not None and total is not None else None
        if self._reduced and not _pl.utilities(trainer, "parsing").lightning_hasattr(pl_module, self.batch_arg_name):
            self._warn(trainer, f"MemGuard cannot restore the batch size {self.batch_size} of the checkpoint: "
                                f"{self.batch_arg_name!r} is no longer on the model, its hparams or the datamodule")
        elif self._reduced:
            set_batch(trainer, pl_module, self.batch_arg_name, self.batch_size, self.accumulate_grad_batches,
                      check=False)
        self._info(trainer, f"MemGuard: resuming with batch size {self.batch_size} and accumulate_grad_batches="
                            f"{self.accumulate_grad_batches} from the checkpoint, without estimating again")

    # -- predicted vs actual ------------------------------------------------------------------

    @staticmethod
    def _where(trainer: Any, pl_module: Any) -> tuple[torch.device, Sequence[torch.Tensor]]:
        """The root device, and what training keeps there between steps."""
        return torch.device(trainer.strategy.root_device), training_tensors(pl_module, trainer.optimizers)

    def _record(self, trainer: Any, result: Comparison) -> None:
        self.measurement, self.metrics = result.measurement, result.metrics
        for logger in trainer.loggers:
            logger.log_metrics(result.metrics, step=trainer.global_step)

    # -- messages -----------------------------------------------------------------------------

    def _warn(self, trainer: Any, message: str, every_rank: bool = False) -> None:
        if every_rank and int(trainer.global_rank) != 0:
            warnings.warn(f"[rank {trainer.global_rank}] {message}", stacklevel=2)
            return
        _pl.utilities(trainer, "rank_zero").rank_zero_warn(message)

    def _info(self, trainer: Any, message: str) -> None:
        log.info(message)
        _pl.utilities(trainer, "rank_zero").rank_zero_info(message)
