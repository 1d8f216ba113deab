"""What a real training run holds, as :func:`memguard.estimate` takes it: its optimizer and its batch.

Shared by the integrations (the Lightning callback, the transformers ``Trainer`` callback): neither
needs the other's framework for this.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["batch_size_of", "optimizer_factory"]


def optimizer_factory(pl_module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      device: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """A ``params -> optimizer`` callable that rebuilds the real ``optimizer`` over fake params.

    :func:`memguard.estimate` calls it with stand-ins for the module's trainable parameters, in
    ``named_parameters()`` order. Each stand-in takes its real parameter's place in the real
    optimizer's param groups, with each group's own hyperparameters; parameters the optimizer does
    not hold stay out of it; an optimizer that holds none of them (a strategy's flat copies) is
    rebuilt over all of them with its defaults. On a GPU, built-in optimizers left to choose take
    their ``foreach`` implementation, as torch does for CUDA tensors; a ``foreach=`` the trace
    passes is honoured.
    """
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # a strategy's wrapper (DeepSpeed's ZeRO optimizer)
    cls = type(optimizer)
    real = [p for _, p in pl_module.named_parameters() if p.requires_grad]
    position = {id(p): i for i, p in enumerate(real)}
    accepted = _keywords(cls) or set(optimizer.defaults)
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    members = [[position[id(p)] for p in g["params"] if id(p) in position] for g in optimizer.param_groups]
    if not any(members):  # it holds copies (flat fp32 partitions), not the module's parameters
        groups, members = [{}], [list(range(len(real)))]
    if device == "cuda" and "foreach" in accepted and kwargs.get("foreach") is None and not kwargs.get("fused"):
        for g in groups:
            if g.get("foreach") is None and not g.get("fused"):
                g["foreach"] = True

    def factory(fakes: list[torch.Tensor], foreach: bool | None = None) -> torch.optim.Optimizer:
        built = [{**g, "params": [fakes[i] for i in idx]} for g, idx in zip(groups, members, strict=True) if idx]
        if foreach is not None and "foreach" in accepted:
            for g in built:
                if not g.get("fused"):
                    g["foreach"] = foreach
        return cls(built, **kwargs)

    factory.__name__ = cls.__name__.lower()
    factory.__qualname__ = factory.__name__
    factory.optimizer_class = cls  # type: ignore[attr-defined]
    return factory


def _keywords(cls: type) -> set[str]:
    """The keyword arguments ``cls.__init__`` takes besides ``params``; empty when it takes ``**kwargs``."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set()
    return set(params) - {"self", "params"}


def batch_size_of(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch``."""
    for t in tree_flatten(batch)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise ValueError(f"the batch holds no tensor with a batch dimension: {type(batch).__name__}")
