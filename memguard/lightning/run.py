"""What :class:`~memguard.MemGuard` reads from a Lightning run, and how it changes the batch size.

Private helpers, each a small function over a ``Trainer``; the callback only wires them together.
They work with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``: Lightning's
own helpers are imported from the package the trainer comes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from memguard.errors import DISTRIBUTION, MissingDependencyError
from memguard.estimation import sandbox
from memguard.estimation.parallel import Strategy
from memguard.estimation.trace import DEFAULT_TIMEOUT, preserved_rng

__all__ = [
    "RunInfo",
    "agree",
    "batch_skeleton",
    "callback_bases",
    "in_one_process",
    "package_of",
    "parallelism",
    "peek_batch",
    "reset_train_data",
    "run_info",
    "utilities",
]

log = logging.getLogger(__name__)

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` classes of every Lightning package that imports, ``pytorch_lightning`` first.

    A class deriving from all of them is an instance of each Trainer's own ``Callback``, which both
    Trainers check for.
    """
    bases: list[type] = []
    for name in _PACKAGES:
        try:
            bases.append(importlib.import_module(f"{name}.callbacks").Callback)
        except ImportError:
            log.debug("%s is not installed", name)
    if not bases:
        raise MissingDependencyError(
            "MemGuard (the Lightning callback) needs Lightning, which is not installed; install it "
            f"with: pip install '{DISTRIBUTION}[lightning]' (or pytorch-lightning, if your code imports "
            "pytorch_lightning)")
    return tuple(bases)


def package_of(trainer: Any) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the package ``trainer`` comes from."""
    top = type(trainer).__module__.split(".")[0]
    return importlib.import_module("lightning.pytorch" if top == "lightning" else "pytorch_lightning")


def utilities(trainer: Any, name: str) -> ModuleType:
    """``<package>.utilities.<name>`` of the package ``trainer`` comes from (``parsing``, ``rank_zero``).

    Each package keeps its own rank of the process for ``rank_zero_*``, set by its own Trainer.
    """
    return importlib.import_module(f"{package_of(trainer).__name__}.utilities.{name}")


# -- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the Trainer says about the run.

    Attributes:
        device: the root device of this rank.
        precision: Lightning's precision name (``"bf16-mixed"`` ...).
        strategy: the strategy's class name.
        world_size: processes taking part in training.
        rank: this process's global rank.
        local_world_size: processes on this machine (they share the host's memory).
        parallel: the strategy in :func:`memguard.estimate`'s terms (a :class:`Strategy`, equal to
            its name ``"ddp"``, ``"fsdp"`` ...), or ``None`` when memguard does not know it.
        offload_optimizer: optimizer state and step in host memory (DeepSpeed, FSDP ``CPUOffload``).
        offload_params: parameter shards in host memory.
        sharded_module: whether the module's parameters are already sharded when the fit starts
            (FSDP, DeepSpeed stage 3, model parallelism), so that their shapes are not the model's.
        accumulate_grad_batches: the Trainer's gradient accumulation.
        handles_accumulation: whether the strategy accumulates gradients itself (DeepSpeed), so
            that changing the Trainer's setting after setup has no effect.
    """

    device: torch.device
    precision: str
    strategy: str
    world_size: int
    rank: int
    local_world_size: int
    parallel: Strategy | None
    offload_optimizer: bool
    offload_params: bool
    sharded_module: bool
    accumulate_grad_batches: int
    handles_accumulation: bool

    @property
    def sharded(self) -> str | None:
        """The sharded strategy in words, or ``None`` for one device and DDP."""
        if self.parallel is not None and not self.parallel.sharded:
            return None
        return self.parallel.value if self.parallel is not None else self.strategy


def parallelism(strategy: Any, world_size: int) -> tuple[Strategy | None, bool, bool, bool]:
    """Lightning's strategy object (a Trainer's or a Fabric's) in memguard's terms: name, offloads, and
    whether params are sharded.

    Read from ``FSDPStrategy.sharding_strategy`` and ``.cpu_offload``, and from
    ``DeepSpeedStrategy.config["zero_optimization"]`` (``stage``, ``offload_optimizer``,
    ``offload_param``).
    """
    names = {c.__name__ for c in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        mode = getattr(getattr(strategy, "sharding_strategy", None), "name", "FULL_SHARD")
        offload = bool(getattr(getattr(strategy, "cpu_offload", None), "offload_params", False))
        parallel = Strategy.from_fsdp_mode(mode)
        return (parallel, offload and parallel is not Strategy.DDP,
                offload and parallel is not None and parallel.fully_sharded, parallel is not Strategy.DDP)
    if "DeepSpeedStrategy" in names:
        config = getattr(strategy, "config", None)
        zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
        stage = int(zero.get("stage", 0) or 0)
        parallel = Strategy.from_deepspeed_stage(stage)
        offload_optimizer = _offloaded(zero.get("offload_optimizer")) and stage > 0
        offload_params = _offloaded(zero.get("offload_param")) and stage == 3
        return parallel, offload_optimizer, offload_params, stage == 3
    if names & set(_SHARDED):
        return None, False, False, True
    if "SingleDeviceStrategy" in names:
        return Strategy.SINGLE, False, False, False
    if "DDPStrategy" in names or world_size > 1:
        return Strategy.DDP, False, False, False
    return Strategy.SINGLE, False, False, False


def _offloaded(section: Any) -> bool:
    """Whether a DeepSpeed ``offload_*`` section moves something off the GPU (``device`` not ``"none"``)."""
    return isinstance(section, dict) and str(section.get("device", "none")).lower() not in ("none", "")


def run_info(trainer: Any) -> RunInfo:
    """Read the strategy, precision, world size and accumulation of ``trainer``."""
    strategy = trainer.strategy
    world_size = int(trainer.world_size)
    parallel, offload_optimizer, offload_params, sharded_module = parallelism(strategy, world_size)
    return RunInfo(
        device=torch.device(strategy.root_device),
        precision=str(trainer.precision),
        strategy=type(strategy).__name__,
        world_size=world_size,
        rank=int(trainer.global_rank),
        local_world_size=max(1, int(getattr(trainer, "num_devices", 1) or 1)),
        parallel=parallel,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        sharded_module=sharded_module,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        handles_accumulation=bool(getattr(strategy, "handles_gradient_accumulation", False)),
    )


def peek_batch(trainer: Any, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """The shapes of this rank's first training batch, read in a forked child (no data is consumed).

    In a child forked by :mod:`memguard.estimation.sandbox`, the train data loader is requested from
    its source (the LightningModule, the datamodule or the loaders given to ``fit``) and prepared as
    the fit loop prepares it (the distributed sampler of this rank injected), in one process (no
    workers, no pinned memory: a persistent worker of the parent's loader is never woken), and its
    first batch goes through the module's batch-transfer hooks. Whatever that does — another call
    of ``train_dataloader()``, draws from any random generator, a loader cached on the module —
    happens in the child only. What comes back is the batch's skeleton: the same structure, with
    every tensor on the meta device (its shape and dtype, no data), which is all a trace needs.

    Without fork (see :mod:`memguard.estimation.sandbox`) the peek runs here, restoring the global
    random generators and every ``torch.Generator`` of the loaders and their samplers.

    Returns ``None`` for an ``IterableDataset``: a stream may be single-pass, and a peek would take
    its first batch away from training.

    Raises:
        TraceError: when the peek does not end within ``timeout`` seconds.
    """
    return sandbox.run(lambda: batch_skeleton(_first_batch(trainer)), timeout=timeout,
                       what="the peek at the train data")


def _first_batch(trainer: Any) -> Any:
    pl = package_of(trainer)
    connector = importlib.import_module(f"{pl.__name__}.trainer.connectors.data_connector")
    states = importlib.import_module(f"{pl.__name__}.trainer.states")
    combined_mod = importlib.import_module(f"{pl.__name__}.utilities.combined_loader")
    with preserved_rng():
        loaders = connector._request_dataloader(trainer.fit_loop._data_source)
        combined = loaders if isinstance(loaders, combined_mod.CombinedLoader) else \
            combined_mod.CombinedLoader(loaders, "max_size_cycle")
        if any(isinstance(getattr(dl, "dataset", dl), torch.utils.data.IterableDataset) for dl in combined.flattened):
            return None
        if sandbox.in_child():
            for dl in combined.flattened:
                in_one_process(dl)
        with _generators_kept(combined.flattened):
            combined.flattened = [
                connector._process_dataloader(trainer, states.TrainerFn.FITTING, states.RunningStage.TRAINING, dl)
                for dl in combined.flattened
            ]
            iterator = iter(combined)
            try:
                batch, _, _ = next(iterator)
            finally:
                del iterator
        try:
            batch = trainer.strategy.batch_to_device(batch)
        except Exception as exc:  # the raw batch has the same shapes in nearly every case
            log.debug("the batch-transfer hooks failed on the peeked batch (%s); using it as loaded", exc)
    return batch


def in_one_process(loader: Any) -> None:
    """Make the child's copy of a ``DataLoader`` load in the child itself: no workers, no pinning.

    A persistent loader of the parent keeps its iterator and live workers (``DataLoader.__iter__``
    reuses ``_iterator`` when ``persistent_workers``); waking them from the child would move them.
    ``object.__setattr__``: ``DataLoader.__setattr__`` refuses ``persistent_workers`` after init.
    """
    if isinstance(loader, torch.utils.data.DataLoader):
        for name, value in (("num_workers", 0), ("persistent_workers", False), ("prefetch_factor", None),
                            ("pin_memory", False), ("_iterator", None)):
            object.__setattr__(loader, name, value)


def batch_skeleton(batch: Any) -> Any:
    """``batch`` with every tensor replaced by an empty one on the meta device (shape and dtype kept)."""
    return tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), batch)


@contextlib.contextmanager
def _generators_kept(loaders: list[Any]) -> Iterator[None]:
    """Restore the state of every ``torch.Generator`` of ``loaders``, their samplers and batch samplers.

    ``DataLoader(shuffle=True, generator=g)`` draws the epoch's permutation (and the workers' base
    seed) from ``g`` each time it is iterated (``RandomSampler.__iter__``, ``_BaseDataLoaderIter``).
    """
    found: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
    todo, seen = list(loaders), set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        for value in getattr(obj, "__dict__", {}).values():
            if isinstance(value, torch.Generator):
                found[id(value)] = (value, value.get_state())
            elif isinstance(value, (torch.utils.data.Sampler, torch.utils.data.BatchSampler)):
                todo.append(value)
    try:
        yield
    finally:
        for generator, state in found.values():
            generator.set_state(state)


def reset_train_data(trainer: Any) -> None:
    """Make the fit loop build its train and val loaders again, as Lightning's batch-size finder does.

    ``_reset_dataloaders`` in ``tuner/batch_size_scaling.py`` drops the loaders and builds them at
    once; here they are only dropped, and the fit loop builds them itself when it starts, so a
    checkpoint's loader state is still loaded into the new loader on resume.
    """
    loop = trainer.fit_loop
    loop._combined_loader = None
    loop.epoch_loop.val_loop._combined_loader = None


def agree(trainer: Any, values: list[int]) -> list[list[int]]:
    """Every rank's ``values``, one row per rank (one row without a distributed strategy)."""
    mine = torch.tensor(values, dtype=torch.int64, device=trainer.strategy.root_device)
    if int(trainer.world_size) <= 1:
        return [values]
    gathered = trainer.strategy.all_gather(mine)
    return gathered.reshape(-1, len(values)).cpu().tolist()
