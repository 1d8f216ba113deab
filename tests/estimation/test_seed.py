"""The seed formula, exactly as the blog post's TL;DR states it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memguard
from memguard.errors import ConfigError, UnsupportedModelError
from memguard.estimation.models import ResolvedModel, load_model
from memguard.estimation.result import Category
from memguard.estimation.seed import seed_breakdown
from memguard.estimation.spec import TrainingSpec


def _seed(model: object, batch: int, seq: int | None) -> dict[Category, int]:
    resolved = model if isinstance(model, ResolvedModel) else load_model(model)
    spec = TrainingSpec.create(batch_size=batch, seq_len=seq)
    breakdown, notes = seed_breakdown(resolved, spec)
    assert notes and "seed formula" in notes[0]
    return breakdown


def test_gpt2_by_hand() -> None:
    # R=12 blocks, N=12 heads, D=64, B=8, S=1024
    model = 4 * 12 * 12**2 * 64**2 * 8
    acts = 12 * 8 * 12 * 1024 * (1024 + 2 * 64) * 8
    assert (model, acts) == (226_492_416, 10_871_635_968)
    b = _seed("gpt2", 8, 1024)
    assert b[Category.PARAMETERS] == model
    assert b[Category.ACTIVATIONS] == acts
    others = (Category.GRADIENTS, Category.OPTIMIZER_STATE, Category.TEMPORARY)
    assert all(b[c] == 0 for c in others)


def test_estimate_entry_point_returns_the_tldr_total() -> None:
    est = memguard.estimate("gpt2", batch_size=8, seq_len=1024, method="seed")
    assert est.method == "seed"
    assert est.total_bytes == est.peak_bytes == 11_098_128_384


def test_t5_counts_encoder_and_decoder_blocks() -> None:
    # t5-small: 6 + 6 blocks, 8 heads of 64
    r, n, d, b, s = 12, 8, 64, 2, 128
    got = _seed("t5-small", b, s)
    assert got[Category.PARAMETERS] == 4 * r * n**2 * d**2 * 8
    assert got[Category.ACTIVATIONS] == r * b * n * s * (s + 2 * d) * 8


def test_vit_sequence_is_patches_plus_one() -> None:
    r, n, d, b, s = 12, 12, 64, 4, 197
    got = _seed("vit-base", b, None)
    assert got[Category.ACTIVATIONS] == r * b * n * s * (s + 2 * d) * 8


def test_plain_torch_encoder() -> None:
    layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, batch_first=True)
    with torch.device("meta"):
        model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    r, n, d, b, s = 3, 4, 32, 2, 50
    got = _seed(model, b, s)
    assert got[Category.PARAMETERS] == 4 * r * n**2 * d**2 * 8
    assert got[Category.ACTIVATIONS] == r * b * n * s * (s + 2 * d) * 8


def test_refuses_a_plain_mlp() -> None:
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*\(R\).*\(N\).*\(D\)"):
        _seed(mlp, 4, 16)
    with pytest.raises(UnsupportedModelError):
        memguard.estimate(mlp, example_input=torch.zeros(4, 32), method="seed")


def test_needs_a_sequence_length() -> None:
    resolved = load_model("llama-2-7b")
    spec = TrainingSpec.create(batch_size=1, seq_len=None)
    with pytest.raises(ConfigError, match="seq_len"):
        seed_breakdown(resolved, spec)
