"""memguard.fabric.preflight with a real ``lightning.fabric.Fabric`` on the CPU and a tiny model."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

import memguard
from memguard import BatchTooLargeError, ConfigError, InsufficientMemoryError
from memguard.fabric import preflight
from memguard.guard import Verdict

pytestmark = pytest.mark.slow

BATCH, FEATURES, HIDDEN = 256, 32, 1024  # activations (about 9 KiB a sample) outweigh the model state


def loss_of(model: nn.Module) -> Any:
    return lambda batch: nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def run() -> tuple[Fabric, Any, Any, tuple[torch.Tensor, torch.Tensor], memguard.MemoryEstimate]:
    """A Fabric-wrapped MLP and AdamW, one batch, and the estimate of its step made directly."""
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    batch = (torch.randn(BATCH, FEATURES), torch.randint(0, 10, (BATCH,)))
    direct = memguard.estimate(net, example_input=batch, step_fn=loss_of(net), optimizer="adamw", device="cpu",
                               training_loop="pytorch")
    model, optimizer = fabric.setup(net, optimizer)
    return fabric, model, optimizer, batch, direct


@pytest.fixture
def first_remedy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search for what would fit stops at its first estimate instead of 16 traces: a test that asserts
    nothing about it (tests/lightning/test_callback.py and tests/planning/test_plan.py do) spares them."""
    monkeypatch.setattr("memguard.planning.api.GUARD_ESTIMATES", 1)


def test_a_step_that_fits_returns_the_decision_and_changes_nothing(run: Any) -> None:
    fabric, model, optimizer, batch, _ = run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        decision = preflight(fabric, model, optimizer, batch, step_fn=loss_of(model), budget="1GiB")
    assert decision is not None and decision.verdict is Verdict.FITS
    assert (decision.batch_size, decision.accumulate) == (BATCH, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # no real step ran


@pytest.mark.usefixtures("first_remedy_only")
def test_raise_stops_with_the_estimate_of_the_real_step(run: Any) -> None:
    fabric, model, optimizer, batch, direct = run
    budget = direct.total_bytes  # usable is 90% of it
    with pytest.raises(InsufficientMemoryError) as info:
        preflight(fabric, model, optimizer, batch, action="raise", step_fn=loss_of(model), budget=budget)
    err = info.value
    assert not isinstance(err, BatchTooLargeError)
    assert str(err).startswith(f"memguard.fabric.preflight: a training step at batch size {BATCH} does not fit")
    assert err.free_bytes == budget and err.estimate is not None
    assert err.estimate.total_bytes == direct.total_bytes  # the same step: model, AdamW, fp32, the loop's loss
    assert err.estimate.inputs["optimizer"] == "adamw" and err.estimate.inputs["precision"] == "32-true"


@pytest.mark.usefixtures("first_remedy_only")
def test_warn_warns_and_returns_the_warn_verdict(run: Any) -> None:
    fabric, model, optimizer, batch, direct = run
    with pytest.warns(UserWarning, match="may not fit"):
        decision = preflight(fabric, model, optimizer, batch, step_fn=loss_of(model), budget=direct.total_bytes)
    assert decision is not None and decision.verdict is Verdict.WARN


def test_reduce_names_the_batch_and_accumulation_that_fit(run: Any) -> None:
    fabric, model, optimizer, batch, direct = run
    budget = direct.total_bytes
    with pytest.raises(BatchTooLargeError) as info:
        preflight(fabric, model, optimizer, batch, action="reduce", step_fn=loss_of(model), budget=budget,
                  accumulate=2)
    err = info.value
    assert isinstance(err, ConfigError)
    assert 1 <= err.batch_size <= err.fitting_batch_size < BATCH
    assert err.batch_size * err.gradient_accumulation_steps == BATCH * 2  # 512 has a divisor in [b/2, b]
    assert "cannot change the batch size of a Fabric loop" in str(err)
    smaller = (batch[0][: err.batch_size], batch[1][: err.batch_size])
    decision = preflight(fabric, model, optimizer, smaller, action="raise", step_fn=loss_of(model), budget=budget,
                         accumulate=err.gradient_accumulation_steps)
    assert decision is not None and decision.verdict is Verdict.FITS  # what it named fits


def test_a_failed_estimate_warns_or_raises_when_strict(run: Any) -> None:
    fabric, model, optimizer, batch, _ = run

    def untraceable(b: Any) -> torch.Tensor:
        return model(torch.from_numpy(b[0].numpy())).sum()  # needs real data

    with pytest.warns(UserWarning, match="could not estimate"):
        assert preflight(fabric, model, optimizer, batch, step_fn=untraceable, budget="1GiB") is None
    with pytest.raises(memguard.TraceError):
        preflight(fabric, model, optimizer, batch, step_fn=untraceable, budget="1GiB", strict=True)


@pytest.mark.parametrize(("kwargs", "named"), [({"action": "shrink"}, "'shrink'"), ({"margin": 1.0}, "1.0"),
                                               ({"accumulate": 0}, "0")])
def test_bad_arguments_are_named(run: Any, kwargs: dict[str, Any], named: str) -> None:
    fabric, model, optimizer, batch, _ = run
    with pytest.raises(ConfigError, match=named):
        preflight(fabric, model, optimizer, batch, **kwargs)
