"""A trace of memguard's own tiny model, run once in the parent before traces run in forked children."""

from __future__ import annotations

import logging

import torch
from torch import nn

from memguard.estimation.spec import TrainingSpec
from memguard.estimation.trace.isolation import preserved_rng
from memguard.estimation.trace.pipeline import trace_breakdown

__all__ = ["warm_up"]

log = logging.getLogger(__name__)


class _WarmUp(nn.Module):
    """memguard's own tiny language model: the ops most training steps run (embedding, linear,
    layer norm, attention, GELU, dropout, cross-entropy)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv = nn.Embedding(16, 8), nn.Linear(8, 24)
        self.norm, self.head, self.drop = nn.LayerNorm(8), nn.Linear(8, 16), nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))  # (B, T, C)
        q, k, v = self.qkv(h).view(2, 4, 2, 3, 4).permute(3, 0, 2, 1, 4)  # 3 x (B, nh, T, hs)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 4, 8)
        logits = self.head(self.drop(nn.functional.gelu(h + a)))
        return nn.functional.cross_entropy(logits.view(-1, 16), ids.view(-1))


_warmed = False


def warm_up() -> None:
    """Trace :class:`_WarmUp` once in this process, before traces run in forked children.

    A trace's first use of an op imports and caches its fake kernel, decompositions and dispatch
    entries; in a child those die with it. Made once in the parent, on memguard's own module (no
    user code runs), every child inherits them: on this project's machine a traced GPT-2 step in a
    child went from 3.4 to 2.4 s of CPU time (``benchmarks/isolation.py``).
    """
    global _warmed
    if _warmed:
        return
    _warmed = True
    with preserved_rng(), torch.device("meta"):  # no weights initialised, no random number drawn
        module = _WarmUp()
    for precision in ("32-true", "bf16-mixed"):
        spec = TrainingSpec.create(batch_size=2, seq_len=4, optimizer="adamw", precision=precision,
                                   gradient_checkpointing=False, device="cuda")
        try:
            trace_breakdown(module, spec, lambda: ((torch.zeros(2, 4, dtype=torch.long),), {}))
        except Exception as exc:  # only a lost speed-up
            log.debug("warm-up trace failed: %s", exc)
