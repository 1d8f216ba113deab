"""How :class:`~memguard.MemGuard` changes the batch size of a Lightning run, and checks that it can.

The batch size lives where Lightning's ``BatchSizeFinder`` looks for it (the model, its ``hparams``
or the datamodule: ``lightning_hasattr``/``lightning_setattr``); the fit loop then builds its train
loader again (``reset_train_data``).
"""

from __future__ import annotations

from typing import Any

from memguard.errors import ConfigError, InsufficientMemoryError
from memguard.estimation.from_run import batch_size_of
from memguard.lightning import run as _pl

__all__ = ["reducible", "set_batch"]


def reducible(trainer: Any, pl_module: Any, batch_arg_name: str) -> str | None:
    """Raise when ``"reduce"`` cannot change this run's batch size; a warning when it may be undone.

    Raises:
        ConfigError: for loaders given to ``fit()`` (they cannot be rebuilt) or a batch size that
            lives nowhere Lightning looks.
    """
    if not trainer.fit_loop._data_source.is_module():
        raise ConfigError(
            "MemGuard(action='reduce') rebuilds the train data loader with a smaller batch, which it "
            "cannot do for data loaders passed to fit(); return them from train_dataloader() of the "
            "LightningModule or a LightningDataModule, or use action='raise'"
        )
    if not _pl.utilities(trainer, "parsing").lightning_hasattr(pl_module, batch_arg_name):
        raise ConfigError(
            f"MemGuard(action='reduce') sets the batch size through {batch_arg_name!r}, which is "
            "neither an attribute of the model, nor in its hparams, nor in the datamodule; add it "
            "(and use it in train_dataloader()), pass batch_arg_name=, or use action='raise'"
        )
    if any(type(cb).__name__ == "GradientAccumulationScheduler" for cb in trainer.callbacks):
        return ("MemGuard(action='reduce') raises accumulate_grad_batches when it reduces the batch size, but a "
                "GradientAccumulationScheduler sets it every epoch and will undo that")
    return None


def set_batch(trainer: Any, pl_module: Any, batch_arg_name: str, batch_size: int, accumulate: int, *,
              check: bool = True) -> None:
    """Train with ``batch_size`` and ``accumulate``: set both, and make the fit loop build its loaders again.

    Raises:
        InsufficientMemoryError: with ``check``, when the rebuilt loader still yields larger batches
            (``train_dataloader()`` does not read the batch size from ``batch_arg_name``).
    """
    _pl.utilities(trainer, "parsing").lightning_setattr(pl_module, batch_arg_name, batch_size)
    trainer.accumulate_grad_batches = accumulate
    _pl.reset_train_data(trainer)
    if check and (got := batch_size_of(_pl.peek_batch(trainer))) > batch_size:
        raise InsufficientMemoryError(
            f"MemGuard set {batch_arg_name}={batch_size}, but the train data loader still yields batches of "
            f"{got}: train_dataloader() must read the batch size from {batch_arg_name!r}")
