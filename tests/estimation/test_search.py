"""The batch-size search finds the exact largest size in a handful of estimates."""

from __future__ import annotations

import pytest

from memguard import Category, ConfigError, MemoryEstimate
from memguard.estimation.search import max_batch_size


def _curve(fn):
    return lambda b: MemoryEstimate("formula", {Category.ACTIVATIONS: fn(b)})


@pytest.mark.parametrize(
    ("fn", "free", "most_trials"),
    [
        (lambda b: 1000 + 37 * b, 10_000, 4),  # affine: the secant lands on it
        (lambda b: max(1000 + 10 * b, 50 * b), 5_000, 10),  # two phases, as a real step has
        (lambda b: 100 * b * b, 10**6, 20),  # convex
        (lambda b: 7 * b, 10**5, 4),
    ],
)
def test_finds_the_exact_largest_batch(fn, free: int, most_trials: int) -> None:
    found = max_batch_size(_curve(fn), free, margin=0.1)
    expected = max(b for b in range(1, 20_000) if fn(b) <= free * 0.9)
    assert found.batch_size == expected
    assert found.estimate.total_bytes == fn(expected)
    assert len(found.trials) <= most_trials


def test_nothing_fits() -> None:
    found = max_batch_size(_curve(lambda b: 10**9 * b), 100)
    assert found.batch_size == 0
    assert found.trials == ((1, 10**9),)


def test_limit_caps_the_search() -> None:
    found = max_batch_size(_curve(lambda b: b), 10**9, limit=64)
    assert (found.batch_size, found.capped) == (64, True)


def test_bad_margin() -> None:
    with pytest.raises(ConfigError, match=r"margin must be a number in \[0, 1\), got 1.0"):
        max_batch_size(_curve(lambda b: b), 100, margin=1.0)
