"""The seed formula: the estimate memguard started from, kept as a baseline.

The blog post "Estimating memory requirements of transformer networks" (REFERENCES.md, "The seed
formula") estimates, with R transformer blocks, N attention heads, head dimension D, batch size B
and sequence length S, in float64 (8 bytes per number):

* model memory: ``4·R·N²·D²`` numbers (Q, K, V and one MLP matrix of ``(N·D)²`` per block);
* activation memory: ``R·B·N·S·(S + 2D)`` numbers (the ``B·N·S²`` attention scores and two
  ``B·N·S·D`` tensors per block);
* TL;DR: ``bytes = (4·R·N²·D² + R·B·N·S·(S + 2D)) × 8``.

This module computes exactly the TL;DR. The post's body writes ``model + 2 × activations``, which
its TL;DR drops; we follow the TL;DR. The formula ignores gradients, optimizer state, biases,
embeddings and the vocabulary (logits), the 4× MLP width, and dtypes other than float64; measured
on real training steps it is far below the truth. :mod:`memguard.estimation.formula` is the refined answer.
"""

from __future__ import annotations

import dataclasses

from memguard.errors import ConfigError
from memguard.estimation.arch import inspect_architecture
from memguard.estimation.models import ResolvedModel
from memguard.estimation.result import Category
from memguard.estimation.spec import TrainingSpec

__all__ = ["SEED_BYTES_PER_NUMBER", "SeedInputs", "seed_activation_numbers", "seed_breakdown",
           "seed_inputs", "seed_model_numbers"]

SEED_BYTES_PER_NUMBER = 8
"""The blog post counts float64 numbers: 8 bytes each."""


@dataclasses.dataclass(frozen=True)
class SeedInputs:
    """The five numbers of the seed formula.

    Attributes:
        blocks: R, transformer blocks (encoder + decoder blocks of an encoder-decoder model).
        heads: N, attention heads per block.
        head_dim: D, width of one head.
        batch: B, samples per step.
        seq: S, tokens per sample (patches + class token for a vision transformer).
    """

    blocks: int
    heads: int
    head_dim: int
    batch: int
    seq: int


def seed_inputs(model: ResolvedModel, spec: TrainingSpec) -> SeedInputs:
    """Read R, N, D from the model and B, S from the spec.

    Raises:
        UnsupportedModelError: when the model has no readable transformer blocks.
        ConfigError: when a token model comes without a sequence length.
    """
    arch = inspect_architecture(model.module, model.config, name=model.name,
                                needs="the seed formula")
    seq = arch.image_tokens if arch.image_tokens is not None else spec.seq_len
    if seq is None:
        raise ConfigError(f"the seed formula needs seq_len (S) for {model.name!r}; pass seq_len=")
    return SeedInputs(blocks=arch.layers, heads=arch.heads, head_dim=arch.head_dim,
                      batch=spec.batch_size or 1, seq=seq)


def seed_model_numbers(x: SeedInputs) -> int:
    """Model memory of the seed post, in numbers: ``4·R·N²·D²``.

    One ``(N·D) × (N·D)`` matrix each for Q, K, V and the MLP per block ("Estimating memory
    requirements of transformer networks", model memory).
    """
    return 4 * x.blocks * x.heads**2 * x.head_dim**2


def seed_activation_numbers(x: SeedInputs) -> int:
    """Activation memory of the seed post, in numbers: ``R·B·N·S·(S + 2D)``.

    Per block, the ``B·N·S·S`` attention scores and two ``B·N·S·D`` tensors ("Estimating memory
    requirements of transformer networks", activation memory).
    """
    return x.blocks * x.batch * x.heads * x.seq * (x.seq + 2 * x.head_dim)


def seed_breakdown(model: ResolvedModel, spec: TrainingSpec) -> tuple[dict[Category, int],
                                                                      list[str]]:
    """The seed formula's TL;DR, ``(4·R·N²·D² + R·B·N·S·(S + 2D)) × 8`` bytes.

    Model memory goes under :attr:`Category.PARAMETERS`, activation memory under
    :attr:`Category.ACTIVATIONS`; every other category is zero.

    Raises:
        UnsupportedModelError: naming the model, when R, N and D cannot be read (e.g. a plain
            MLP).
        ConfigError: when a token model comes without a sequence length.
    """
    x = seed_inputs(model, spec)
    breakdown = {
        Category.PARAMETERS: seed_model_numbers(x) * SEED_BYTES_PER_NUMBER,
        Category.ACTIVATIONS: seed_activation_numbers(x) * SEED_BYTES_PER_NUMBER,
        Category.GRADIENTS: 0,
        Category.OPTIMIZER_STATE: 0,
        Category.TEMPORARY: 0,
    }
    notes = [
        f"seed formula (blog post TL;DR) with R={x.blocks}, N={x.heads}, D={x.head_dim}, "
        f"B={x.batch}, S={x.seq}: float64, no gradients, optimizer state, embeddings or logits; "
        "a baseline, not a prediction",
    ]
    return breakdown, notes
