"""What a transformers ``Trainer`` says about its run, for its ``MemGuardCallback``.

Small functions over the Trainer's arguments, model and optimizer: whether memguard can estimate
the run, the batch the model receives, its precision and optimizer in memguard's terms, the loss,
and every rank's row of integers (the guard core's ``all_gather``, :mod:`memguard.guard.agreement`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memguard.errors import ConfigError
from memguard.estimation.from_run import optimizer_factory

__all__ = ["all_gather_rows", "example_batch", "optimizer_for", "precision_of", "reason_not_estimated",
           "trainer_loss", "unwrap_optimizer"]

_NAMED_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adafactor": "adafactor", "sgd": "sgd",
                     "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit", "paged_adamw_8bit": "adamw-8bit"}
"""``TrainingArguments.optim`` in :func:`memguard.estimate`'s names (``OptimizerNames`` in transformers)."""

_STAND_IN_ONLY = ("adamw-8bit",)
"""Named optimizers whose real class cannot run on fake tensors (bitsandbytes' CUDA kernels)."""

_TRUE_PRECISION = {torch.bfloat16: "bf16-true", torch.float16: "16-true", torch.float64: "64-true"}

_NOT_ESTIMATED = (
    ("deepspeed", "DeepSpeed shards and casts the model in its own engine"),
    ("fsdp", "FSDP shards the model's parameters"),
    ("torch_compile", "torch.compile would trace the estimate into the compiled graph"),
)


def reason_not_estimated(args: Any, model: Any) -> str | None:
    """Why this run is not estimated, or ``None`` when it is."""
    if not isinstance(model, torch.nn.Module):
        return f"the Trainer passed no model to on_train_begin (got {type(model).__name__})"
    for name, why in _NOT_ESTIMATED:
        if getattr(args, name, None):
            return f"{name} is set ({why})"
    if int(getattr(args, "n_gpu", 0) or 0) > 1:
        return f"DataParallel over {args.n_gpu} GPUs in one process"
    return None


def example_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The forward's inputs as one batch: its keyword arguments (batched tensors first: the Trainer
    adds a 0-dimensional ``num_items_in_batch`` after the collator's keys), else its positional ones."""
    if kwargs:
        batched = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        return {**batched, **kwargs}
    return args[0] if len(args) == 1 else tuple(args)


def precision_of(args: Any, model: torch.nn.Module, device: torch.device) -> str:
    """The precision of the run in Lightning's names, which :func:`memguard.estimate` takes.

    Weights already in 16 bits (``from_pretrained(dtype=torch.bfloat16)``) train in them: ``"*-true"``,
    whatever autocast adds. Otherwise ``bf16``/``fp16`` make accelerate wrap the forward in
    ``torch.autocast`` (``Accelerator.prepare_model``, ``native_amp``), with fp32 weights:
    ``"bf16-mixed"``/``"16-mixed"``; accelerate turns no fp16 autocast on for the CPU.
    """
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    weights = max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32
    if weights in _TRUE_PRECISION:
        return _TRUE_PRECISION[weights]
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else str(getattr(args, "mixed_precision", "no") or "no")
    if mixed == "bf16":
        return "bf16-mixed"
    if mixed == "fp16" and device.type != "cpu":
        return "16-mixed"
    return "32-true"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (itself an ``Optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def optimizer_for(args: Any, optimizer: Any, model: torch.nn.Module, device: str) -> Any:
    """What :func:`memguard.estimate` takes for the Trainer's optimizer.

    The real one whenever memguard can rebuild it over fake parameters: its class and param
    groups, so ``fused``/``foreach``, SGD's ``momentum`` from ``optim_args`` and transformers' own
    ``Adafactor`` are what they are in the run. bitsandbytes' 8-bit AdamW by memguard's stand-in
    (its kernels need CUDA). Without an optimizer, ``args.optim`` by name.
    """
    name = str(getattr(args.optim, "value", args.optim))
    named = _NAMED_OPTIMIZERS.get(name)
    if named in _STAND_IN_ONLY:
        return named
    real = unwrap_optimizer(optimizer)
    if real is not None:
        return optimizer_factory(model, real, device)
    if named == "sgd" and "momentum" in str(getattr(args, "optim_args", "") or ""):
        return "sgd-momentum"
    if named is None:
        raise ConfigError(f"memguard does not know optim={name!r}, and the Trainer made no optimizer to rebuild; "
                          f"known: {', '.join(_NAMED_OPTIMIZERS)}")
    return named


def trainer_loss(output: Any, batch: Any) -> torch.Tensor:
    """The loss as ``Trainer.compute_loss`` takes it (``outputs["loss"]`` or ``outputs[0]``); when the
    model returns none (``compute_loss_func`` or label smoothing make it from the logits), an fp32
    log-softmax over the logits, as large as theirs, stands in."""
    if isinstance(output, Mapping) and output.get("loss") is not None:
        return output["loss"]
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    values = list(output.values()) if isinstance(output, Mapping) else list(output) \
        if isinstance(output, (tuple, list)) else [output]
    if values and isinstance(values[0], torch.Tensor) and values[0].dim() == 0:
        return values[0]
    logits = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0), None)
    if logits is None:
        raise ConfigError(f"the model returned no loss and no logits ({type(output).__name__}) to stand in for one")
    return -torch.log_softmax(logits.float(), dim=-1).mean()


def all_gather_rows(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values``, one row per rank (one row when no process group runs)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [values]
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [row.cpu().tolist() for row in rows]
