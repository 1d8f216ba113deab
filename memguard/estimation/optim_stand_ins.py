"""The optimizers the trace runs in place of bitsandbytes' (which needs CUDA): only their memory is
the real one's. Kept apart from :mod:`memguard.estimation.spec`, which names optimizers without
importing torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from memguard.estimation.spec import ADAMW8BIT_BLOCK, ADAMW8BIT_MIN_SIZE

__all__ = ["AdamW8bitStandIn", "PagedAdamWStandIn"]


class _StandInOptimizer(torch.optim.Optimizer):
    """An optimizer that keeps the state of another for the trace: made on the first step by
    :meth:`init_state`, then each parameter moved by its gradient. Only the memory is the real one's."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    def init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self.init_state(p, state)
                p.add_(p.grad, alpha=-group["lr"])


class AdamW8bitStandIn(_StandInOptimizer):
    """The memory of bitsandbytes' ``AdamW8bit``, for the trace (bitsandbytes needs CUDA).

    Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": both Adam moments are
    kept as ``uint8`` with one fp32 absmax per block of 2048 elements; parameters with fewer than
    ``min_8bit_size`` (4096) elements keep fp32 moments (bitsandbytes ``Optimizer8bit``). The
    update runs in place, block by block, with no full-size temporaries.
    """

    BLOCK = ADAMW8BIT_BLOCK
    MIN_8BIT_SIZE = ADAMW8BIT_MIN_SIZE

    def init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if p.numel() < self.MIN_8BIT_SIZE:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
            return
        blocks = -(-p.numel() // self.BLOCK)
        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


class PagedAdamWStandIn(_StandInOptimizer):
    """The memory of bitsandbytes' ``PagedAdamW`` (32-bit), for the trace (bitsandbytes needs CUDA).

    ``Optimizer2State.init_state`` with 32 optimizer bits keeps both moments in fp32 whatever the
    parameter's dtype (``get_state_buffer(p, dtype=torch.float32)``); the fused ``cadam32bit``
    kernel updates in place, with no temporaries. Where the state lives (managed memory for large
    parameters) is said in the estimate's notes.
    """

    def init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
