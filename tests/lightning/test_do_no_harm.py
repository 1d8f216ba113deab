"""The guard never changes the run it guards (issue 9).

``MemGuard`` and ``memguard.estimate`` run the user's own ``forward`` / ``training_step`` on fake
tensors. Whatever that code does to ``self`` (a tensor cached on the first call, a list of
outputs, a counter, a logger call, a torchmetrics update) and whatever the peek at the data does
to a stream or a generator must not reach the real run: a guarded fit ends with the same weights,
bit for bit, as the same fit without the guard, after the same ``training_step`` calls on the same
samples in the same order, with the same logged values and metric states, and no ``FakeTensor``
on any user object.

Each scenario fits twice, with and without the guard, from the same seed, and compares. Both
``lightning.pytorch`` and ``pytorch_lightning`` are tested where the scenario is about Lightning.
A trace that never ends (scenario 5) runs in a forked child that is killed after a deadline, so
that it cannot hang the suite.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import importlib
import io
import multiprocessing
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchmetrics.classification import BinaryAccuracy

import memguard
from memguard import MemGuard

pytestmark = pytest.mark.slow

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
GENEROUS = "64GiB"
MARGIN = 0.1
TIMED_OUT = re.compile(r"(?i)time(d)?[ -]?out|out of time|trace_timeout")


def traced_calls(path: Path) -> int:
    """Calls of ``training_step`` that saw ``is_tracing()`` true, for the run writing ``path``: they
    run in the trace's own process, so they leave their mark where every process can see it, a file."""
    marks = Path(f"{path}.traced")
    return len(marks.read_text()) if marks.exists() else 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; one thread also keeps the forked children safe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_tracing() -> bool:
    """``memguard.is_tracing()``, which ``MemGuard.is_tracing()`` also answers."""
    assert MemGuard.is_tracing() == memguard.is_tracing()
    return memguard.is_tracing()


# -- the harness --------------------------------------------------------------------------------


@functools.cache
def base_class(package: str) -> type:
    """A LightningModule of ``package``: a small MLP over 16 fixed samples, batch size 4."""
    pl = importlib.import_module(package)

    class Base(pl.LightningModule):
        def __init__(self, batch_size: int = 4, samples: int = 16, width: int = 4, hidden: int = 8,
                     log_loss: bool = True) -> None:
            super().__init__()
            self.batch_size = batch_size
            self.log_loss = log_loss
            self.samples, self.width = samples, width
            self.layer = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, 2))

        def dataset(self) -> TensorDataset:
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(self.samples, self.width, generator=g), torch.randn(self.samples, 2, generator=g)
            return TensorDataset(torch.arange(self.samples), x, y)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset(), batch_size=self.batch_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

        def loss(self, batch: Any) -> torch.Tensor:
            _, x, y = batch
            return F.mse_loss(self(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.loss(batch)
            if self.log_loss:
                self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.05)

    Base.__qualname__ = Base.__name__ = f"Base_{package.split('.')[0]}"
    return Base


@functools.cache
def recorder_class(package: str) -> type:
    """A Logger of ``package`` that keeps every ``log_metrics`` call."""
    loggers = importlib.import_module(f"{package}.loggers")

    class Recorder(loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int | None, dict[str, Any]]] = []

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
            self.calls.append((step, dict(metrics)))

    return Recorder


@dataclasses.dataclass
class Run:
    """One fit: the module after it, its final weights and what its user could see."""

    module: Any
    trainer: Any
    guard: MemGuard | None
    state: dict[str, torch.Tensor]
    records: list[tuple[int | None, dict[str, Any]]]
    warned: list[str]


def fit(package: str, make: Callable[[], Any] | None, guard: MemGuard | None = None, *, module: Any = None,
        loader: Any = None, datamodule: Any = None, **trainer_kwargs: Any) -> Run:
    """Fit a module made by ``make`` (or ``module``) from seed 0 with a recording logger.

    Returns the final weights and the logger's records less MemGuard's own ``memguard/*``.
    """
    pl = importlib.import_module(package)
    pl.seed_everything(0, verbose=False)
    if module is None:
        module = make()
    logger = recorder_class(package)()
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=6, enable_progress_bar=False,
                                   enable_checkpointing=False, enable_model_summary=False, logger=logger,
                                   log_every_n_steps=1)
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[guard] if guard is not None else [], **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, train_dataloaders=loader, datamodule=datamodule)
        except Exception as exc:
            if guard is None:
                raise
            pytest.fail(f"the guarded fit crashed at global_step {trainer.global_step} (epoch "
                        f"{trainer.current_epoch}) where the unguarded fit ends: {type(exc).__name__}: {exc}")
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    records = [(step, {k: v for k, v in m.items() if not k.startswith("memguard/")}) for step, m in logger.calls]
    return Run(module, trainer, guard, state, [r for r in records if r[1]], [str(w.message) for w in caught])


def fakes_in(obj: Any, path: str = "", depth: int = 0) -> list[str]:
    """Paths of ``FakeTensor`` objects in ``obj``: a module's attributes, lists, dicts, tuples."""
    if isinstance(obj, FakeTensor):
        return [path]
    if depth > 4 or isinstance(obj, torch.Tensor):
        return []
    if isinstance(obj, nn.Module):
        found = []
        for name, m in obj.named_modules():
            for key, value in vars(m).items():
                if key not in ("_trainer", "_fabric", "_modules"):
                    found += fakes_in(value, f"{path}{name}.{key}".lstrip("."), depth + 1)
            found += [f"{path}{name}.{k}.grad" for k, p in m._parameters.items()
                      if p is not None and isinstance(p.grad, FakeTensor)]
        return found
    if isinstance(obj, dict):
        return [f for k, v in obj.items() for f in fakes_in(v, f"{path}[{k!r}]", depth + 1)]
    if isinstance(obj, (list, tuple, set, collections.deque)):
        return [f for i, v in enumerate(obj) for f in fakes_in(v, f"{path}[{i}]", depth + 1)]
    return []


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
        return False
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


def differences(guarded: Run, plain: Run) -> list[str]:
    """Everything a user could see that differs between the guarded and the plain fit."""
    problems = []
    fakes = fakes_in(guarded.module) + fakes_in(dict(guarded.trainer.callback_metrics), "callback_metrics")
    for i, opt in enumerate(guarded.trainer.optimizers):
        fakes += fakes_in(list(opt.state.values()), f"optimizers[{i}].state")
    if fakes:
        problems.append(f"FakeTensors left on user objects: {fakes}")
    changed = [k for k in plain.state if k not in guarded.state or not _same(guarded.state[k], plain.state[k])]
    if changed or guarded.state.keys() != plain.state.keys():
        problems.append(f"final weights differ from the unguarded fit: {changed}")
    if not _same(guarded.trainer.global_step, plain.trainer.global_step):
        problems.append(f"global_step {guarded.trainer.global_step} != {plain.trainer.global_step}")
    if guarded.records != plain.records:
        problems.append(f"logged records differ:\n  guarded {guarded.records}\n  plain   {plain.records}")
    return problems


def assert_no_harm(guarded: Run, plain: Run, *more: str) -> None:
    """The guarded fit equals the plain one; ``more`` are the scenario's own differences."""
    problems = differences(guarded, plain) + [m for m in more if m]
    warned = "\n".join(f"  warned: {w}" for w in guarded.warned if "MemGuard" in w)
    assert not problems, "the guard changed the run:\n" + "\n".join(problems) + ("\n" + warned if warned else "")


ACTIONS = [
    pytest.param("lightning.pytorch", "warn", id="lightning.pytorch-warn"),
    pytest.param("lightning.pytorch", "reduce", id="lightning.pytorch-reduce"),  # the step fits: no reduction
    pytest.param("pytorch_lightning", "warn", id="pytorch_lightning-warn"),
]
"""The guard with a generous budget: ``warn``, and ``reduce`` where the step fits (it still traces)."""


def budget_holding(package: str, make: Callable[[], Any], fits: int) -> int:
    """A budget that holds a step of ``make()`` at batch ``fits`` (margin kept) but not at ``fits + 1``.

    Read from the callback's own estimates (``MemGuard.estimate`` of a one-step fit at each size),
    so that it holds whatever the callback counts. A batch reduced below the one asked for trains
    with gradient accumulation, so these fits accumulate too.
    """

    def total(b: int) -> int:
        module = make()
        module.batch_size = b
        run = fit(package, None, MemGuard(action="warn", budget=GENEROUS), module=module, max_steps=1,
                  accumulate_grad_batches=2)
        assert run.guard.estimate is not None, run.warned
        return run.guard.estimate.total_bytes

    budget = int(total(fits) / (1 - MARGIN)) + 1
    assert total(fits + 1) > budget * (1 - MARGIN), "setup: the step does not grow with the batch"
    return budget


# -- 1. a tensor cached on the first call ---------------------------------------------------------


class Scale(nn.Module):
    """Multiplies by a tensor made on the first call and cached (as rotary embeddings cache cos/sin)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = torch.linspace(0.5, 1.5, x.shape[-1])
        return x * self.scale


@functools.cache
def cached_class(package: str) -> type:
    class Cached(base_class(package)):
        def __init__(self) -> None:
            super().__init__(log_loss=False)  # logging a fake loss would crash; the weights are the point
            self.scaler = Scale()
            self.offset: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.offset is None:  # cached on the LightningModule itself
                self.offset = torch.full((2,), 0.25)
            return self.scaler(self.layer(x)) + self.offset

    return Cached


@pytest.mark.parametrize(("package", "action"), ACTIONS)
def test_a_tensor_cached_on_the_first_call_stays_real(package: str, action: str) -> None:
    plain = fit(package, cached_class(package))
    guarded = fit(package, cached_class(package), MemGuard(action=action, budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    assert_no_harm(guarded, plain)
    assert torch.equal(guarded.module.scaler.scale, torch.linspace(0.5, 1.5, 2))


class Net(nn.Module):
    """A plain module with a cached tensor in a submodule and a call counter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.scaler = Scale()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.scaler(self.body(x))


def attributes(module: nn.Module) -> dict[str, Any]:
    """Every attribute of every submodule, and the entries of its parameter, buffer and child dicts."""
    found: dict[str, Any] = {}
    for name, m in module.named_modules():
        for key, value in vars(m).items():
            found[f"{name}.{key}"] = value
            if isinstance(value, dict):
                found.update({f"{name}.{key}[{k!r}]": v for k, v in value.items()})
    return found


@pytest.mark.parametrize("how", ["loss_fn", "step_fn"])
def test_estimate_leaves_a_plain_module_as_it_was(how: str) -> None:
    torch.manual_seed(0)
    net = Net()
    twin = copy.deepcopy(net)
    before = attributes(net)
    x = torch.randn(4, 4)
    kwargs: dict[str, Any] = ({"loss_fn": lambda out, batch: out.pow(2).mean()} if how == "loss_fn"
                              else {"step_fn": lambda batch: net(batch).pow(2).mean()})
    est = memguard.estimate(net, example_input=x, device="cpu", method="trace", **kwargs)
    assert est.method == "trace" and est.peak_bytes > 0
    after = attributes(net)
    changed = sorted(k for k in before.keys() | after.keys() if k not in after or k not in before
                     or after[k] is not before[k])
    assert not changed, f"estimate() changed attributes of the module: {[(k, after.get(k)) for k in changed]}"
    out = net(x)
    assert not isinstance(out, FakeTensor) and not fakes_in(net)
    assert torch.equal(out, twin(x))
    assert torch.equal(net.scaler.scale, twin.scaler.scale) and net.calls == twin.calls == 1


# -- 2. outputs kept for the end of the epoch, and a running average ------------------------------


@functools.cache
def epoch_end_class(package: str) -> type:
    class EpochEnd(base_class(package)):
        def __init__(self) -> None:
            super().__init__(log_loss=False)
            self.training_step_outputs: list[torch.Tensor] = []
            self.ema = torch.tensor(0.0)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.loss(batch)
            self.training_step_outputs.append(loss)  # Lightning's documented pattern
            self.ema = 0.9 * self.ema + 0.1 * loss.detach()
            return loss

        def on_train_epoch_end(self) -> None:
            self.log("epoch_mean", torch.stack(self.training_step_outputs).mean())
            self.log("ema", self.ema)
            self.training_step_outputs.clear()

    return EpochEnd


@pytest.mark.parametrize(("package", "action"), ACTIONS)
def test_outputs_kept_for_the_epoch_end_and_a_running_average(package: str, action: str) -> None:
    plain = fit(package, epoch_end_class(package), max_steps=-1, max_epochs=2)
    guarded = fit(package, epoch_end_class(package), MemGuard(action=action, budget=GENEROUS),
                  max_steps=-1, max_epochs=2)
    assert guarded.guard.estimate is not None, guarded.warned
    assert_no_harm(guarded, plain)
    assert guarded.module.training_step_outputs == []
    assert _same(guarded.module.ema, plain.module.ema)
    assert [k for _, r in plain.records for k in r].count("epoch_mean") == 2


# -- 3. counters, lists, a file, the logger -------------------------------------------------------


@functools.cache
def side_effects_class(package: str) -> type:
    class SideEffects(base_class(package)):
        def __init__(self, path: Path, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.path = str(path)
            self.calls = 0
            self.batch_indices: list[int] = []
            self.batch_sizes: list[int] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.calls += 1
            self.batch_indices.append(batch_idx)
            self.batch_sizes.append(len(batch[0]))
            if is_tracing():  # a file is outside memguard's reach: user code must check
                with open(f"{self.path}.traced", "a") as f:
                    f.write("x")
            else:
                with open(self.path, "a") as f:
                    f.write(f"{batch_idx}\n")
            if self.logger is not None:
                self.logger.log_metrics({"user/batch_idx": float(batch_idx)}, step=self.global_step)
            return super().training_step(batch, batch_idx)

    return SideEffects


def lines(path: Path) -> list[int]:
    return [int(s) for s in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize(("package", "action"), ACTIONS)
def test_counters_lists_files_and_logger_calls_see_only_real_steps(package: str, action: str,
                                                                   tmp_path: Path) -> None:
    cls = side_effects_class(package)
    plain = fit(package, lambda: cls(tmp_path / "plain.txt"))
    guarded = fit(package, lambda: cls(tmp_path / "guarded.txt"), MemGuard(action=action, budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    g, p = guarded.module, plain.module
    assert_no_harm(guarded, plain,
                   f"training_step calls {g.calls} != {p.calls}" if g.calls != p.calls else "",
                   f"batch_idx list {g.batch_indices} != {p.batch_indices}" if g.batch_indices != p.batch_indices
                   else "")
    assert p.calls == 6 and lines(tmp_path / "plain.txt") == [0, 1, 2, 3, 0, 1]
    assert traced_calls(tmp_path / "guarded.txt") >= 1, "is_tracing() was never true inside the trace"
    assert lines(tmp_path / "guarded.txt") == lines(tmp_path / "plain.txt")


def test_side_effects_under_a_reducing_guard_count_only_real_steps(tmp_path: Path) -> None:
    package = "lightning.pytorch"
    cls = side_effects_class(package)
    shape = dict(batch_size=16, samples=64, width=256, hidden=2)  # activations outgrow the optimizer step
    budget = budget_holding(package, lambda: cls(tmp_path / "probe.txt", **shape), fits=6)
    guard = MemGuard(action="reduce", budget=budget, margin=MARGIN)
    run = fit(package, lambda: cls(tmp_path / "guarded.txt", **shape), guard, max_steps=2)
    assert guard.batch_size is not None and guard.batch_size <= 6, run.warned  # it did reduce
    real = lines(tmp_path / "guarded.txt")
    assert len(real) == guard.accumulate_grad_batches * 2
    assert traced_calls(tmp_path / "guarded.txt") >= 2  # the search traced several batch sizes
    m = run.module
    assert (m.calls, m.batch_indices) == (len(real), real), "training_step's own counter and list saw the trace"
    assert set(m.batch_sizes) == {guard.batch_size}
    logged = [r["user/batch_idx"] for _, r in run.records if "user/batch_idx" in r]
    assert logged == [float(i) for i in real]
    assert not fakes_in(m)


# -- 4. torchmetrics ----------------------------------------------------------------------------


@functools.cache
def metric_class(package: str, kind: str) -> type:
    class WithMetric(base_class(package)):
        def __init__(self) -> None:
            super().__init__()
            # A sum over the model's lifetime, never reset; or an accuracy that checks its
            # arguments' values (validate_args=True, the default).
            self.metric = torchmetrics.SumMetric() if kind == "sum" else BinaryAccuracy()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            _, x, y = batch
            out = self(x)
            loss = F.mse_loss(out, y)
            if kind == "sum":
                self.metric.update(loss.detach())
            else:
                self.metric.update(torch.sigmoid(out[:, 0].detach()), (y[:, 0] > 0).long())
            self.log("loss", loss)
            return loss

    return WithMetric


def metric_problem(guarded: Any, plain: Any) -> str:
    g, p = guarded.metric, plain.metric
    states = [k for k in p.metric_state if not _same(g.metric_state[k], p.metric_state[k])]
    if states or g._update_count != p._update_count:
        return (f"metric states {states} differ: {g.metric_state} != {p.metric_state}; "
                f"updates {g._update_count} != {p._update_count}")
    return ""


@pytest.mark.parametrize("package", PACKAGES)
def test_a_lifetime_metric_survives_a_second_guarded_fit(package: str) -> None:
    cls = metric_class(package, "sum")
    plain = fit(package, cls)
    guarded = fit(package, cls, MemGuard(action="warn", budget=GENEROUS))
    assert guarded.guard.estimate is not None, f"the guard did nothing: {guarded.warned}"
    assert_no_harm(guarded, plain, metric_problem(guarded.module, plain.module))
    # A second fit of the same model: the lifetime sum keeps growing.
    plain2 = fit(package, None, module=plain.module)
    guarded2 = fit(package, None, MemGuard(action="warn", budget=GENEROUS), module=guarded.module)
    assert plain2.module.metric._update_count == 12
    assert_no_harm(guarded2, plain2, metric_problem(guarded2.module, plain2.module))


@pytest.mark.parametrize("package", PACKAGES)
def test_a_metric_that_validates_its_arguments_is_traced(package: str) -> None:
    cls = metric_class(package, "accuracy")
    plain = fit(package, cls)
    guarded = fit(package, cls, MemGuard(action="warn", budget=GENEROUS))
    assert guarded.guard.estimate is not None, f"the guard did nothing: {guarded.warned}"
    assert_no_harm(guarded, plain, metric_problem(guarded.module, plain.module))
    assert int(plain.module.metric.tp + plain.module.metric.fp + plain.module.metric.tn
               + plain.module.metric.fn) == 24


# -- 5. a loop that ends only on real values ------------------------------------------------------


def halve(h: torch.Tensor) -> torch.Tensor:
    """Halve until small: ends for real values, never for stand-ins of ones."""
    while h.abs().max() > 1e-3:
        h = h / 2
    return h


class Halving(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return halve(self.body(x))


@functools.cache
def halving_class(package: str) -> type:
    class HalvingModule(base_class(package)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return halve(self.layer(x))

    return HalvingModule


def bounded(target: Callable[[], Any], seconds: float) -> dict[str, Any]:
    """Run ``target`` in a forked child killed after ``seconds``.

    Returns ``{"result": ...}``, ``{"error": (class names of the exception, message)}`` or
    ``{"hung": seconds}``, with ``"elapsed"``.
    """
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def main() -> None:
        torch.set_num_threads(1)
        start = time.monotonic()
        try:
            out: dict[str, Any] = {"result": target()}
        except BaseException as exc:
            out = {"error": ([c.__name__ for c in type(exc).__mro__], f"{type(exc).__name__}: {exc}")}
        out["elapsed"] = time.monotonic() - start
        buf = io.BytesIO()
        torch.save(out, buf)
        send.send_bytes(buf.getvalue())

    child = ctx.Process(target=main, daemon=True)
    child.start()
    try:
        if not receive.poll(seconds):
            return {"hung": seconds}
        return torch.load(io.BytesIO(receive.recv_bytes()), weights_only=False)
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)


def expect_error(outcome: dict[str, Any], what: str) -> tuple[list[str], str]:
    """The exception ``outcome`` reports, failing clearly when it hung or returned."""
    if "hung" in outcome:
        pytest.fail(f"{what} had not returned after {outcome['hung']} s: the trace never ends (issue 9)")
    if "error" not in outcome:
        pytest.fail(f"{what} returned {outcome['result']!r} instead of raising")
    classes, message = outcome["error"]
    if "TypeError" in classes and "trace_timeout" in message:
        pytest.fail(f"{what}: trace_timeout is not an argument yet ({message}); without it this trace never ends "
                    "(issue 9)")
    return classes, message


@pytest.mark.parametrize("in_process", [False, True], ids=["forked", "in-process"])
def test_trace_timeout_stops_a_trace_that_never_ends(in_process: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if in_process:  # where fork is missing, the trace's own clock, checked between tensor ops, stops it
        monkeypatch.setenv("MEMGUARD_IN_PROCESS", "1")
    importlib.import_module("memguard.estimation.trace").warm_up()  # once per process, not part of the trace

    def trace() -> str:
        est = memguard.estimate(Halving(), example_input=torch.randn(4, 4), loss_fn=lambda out, b: out.sum(),
                                device="cpu", method="trace", trace_timeout=2)
        return est.method

    outcome = bounded(trace, 20)
    classes, message = expect_error(outcome, "estimate(method='trace', trace_timeout=2)")
    assert "TraceError" in classes, message
    assert TIMED_OUT.search(message), message
    assert outcome["elapsed"] < 5, outcome["elapsed"]


def test_auto_falls_back_or_names_the_timeout() -> None:
    def auto() -> tuple[str, tuple[str, ...]]:
        est = memguard.estimate(Halving(), example_input=torch.randn(4, 4), loss_fn=lambda out, b: out.sum(),
                                device="cpu", method="auto", trace_timeout=1)
        return est.method, est.notes

    outcome = bounded(auto, 20)
    if "result" in outcome:  # the formula took over; the notes say why
        method, notes = outcome["result"]
        assert method == "formula" and any(TIMED_OUT.search(n) for n in notes), notes
    else:
        classes, message = expect_error(outcome, "estimate(method='auto', trace_timeout=1)")
        assert "MemguardError" in classes and TIMED_OUT.search(message), message
    assert outcome["elapsed"] < 5, outcome["elapsed"]


@pytest.mark.parametrize("package", PACKAGES)
def test_the_callback_gives_up_on_a_trace_that_never_ends(package: str) -> None:
    plain = fit(package, halving_class(package))

    def guarded() -> dict[str, Any]:
        run = fit(package, halving_class(package), MemGuard(action="warn", budget=GENEROUS, trace_timeout=1))
        return {"state": run.state, "records": run.records, "warned": run.warned, "fakes": fakes_in(run.module),
                "estimate": run.guard.estimate, "steps": run.trainer.global_step}

    outcome = bounded(guarded, 30)
    if "hung" in outcome:
        pytest.fail(f"the guarded fit had not ended after {outcome['hung']} s: the trace never ends (issue 9)")
    if "error" in outcome:
        expect_error(outcome, "MemGuard(trace_timeout=1)")
        pytest.fail(f"the guarded fit failed: {outcome['error'][1]}")
    got = outcome["result"]
    assert any("MemGuard" in w and TIMED_OUT.search(w) for w in got["warned"]), got["warned"]
    assert got["estimate"] is None and not got["fakes"]
    assert got["steps"] == plain.trainer.global_step == 6
    assert all(torch.equal(got["state"][k], v) for k, v in plain.state.items())
    assert got["records"] == plain.records


# -- 6. data: a stream read once, a shuffle with the user's generator -----------------------------


class OnePass(IterableDataset):
    """A stream: its samples come once; a second ``iter()`` continues where the first stopped."""

    def __init__(self, data: TensorDataset) -> None:
        super().__init__()
        self.stream = iter(data)

    def __iter__(self) -> Iterator[Any]:
        return self.stream


@functools.cache
def seen_class(package: str) -> type:
    class Seen(base_class(package)):
        def __init__(self, data: str) -> None:
            super().__init__(samples=24)
            self.data = data
            self.seen: list[int] = []
            self.generator = torch.Generator().manual_seed(7)
            self.stream = OnePass(self.dataset())

        def train_dataloader(self) -> DataLoader:
            if self.data == "stream":
                return DataLoader(self.stream, batch_size=self.batch_size)
            return DataLoader(self.dataset(), batch_size=self.batch_size, shuffle=True, generator=self.generator)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not is_tracing():
                self.seen += batch[0].tolist()
            return super().training_step(batch, batch_idx)

    return Seen


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("data", ["stream", "shuffle"])
def test_the_same_samples_reach_training_step_in_the_same_order(package: str, data: str) -> None:
    cls = seen_class(package)
    plain = fit(package, lambda: cls(data), max_steps=-1, max_epochs=1)
    guarded = fit(package, lambda: cls(data), MemGuard(action="warn", budget=GENEROUS), max_steps=-1, max_epochs=1)
    assert sorted(plain.module.seen) == list(range(24))
    g, p = guarded.module, plain.module
    assert guarded.guard.estimate is not None, guarded.warned
    assert_no_harm(guarded, plain,
                   f"samples seen {g.seen} != {p.seen}" if g.seen != p.seen else "",
                   "the user's generator ended in another state"
                   if not torch.equal(g.generator.get_state(), p.generator.get_state()) else "")


# -- 7. reduce keeps the effective batch when a divisor of it fits --------------------------------


@pytest.mark.parametrize(("requested", "accumulate", "largest", "expected"), [
    (64, 1, 11, (8, 8)),
    (64, 1, 64, (64, 1)),
    (12, 2, 5, (4, 6)),
    (48, 1, 10, (8, 6)),
    (30, 1, 7, (6, 5)),
    (8, 4, 8, (8, 4)),
    (10, 1, 3, (2, 5)),  # 2 >= 3 / 2 divides 10
    (7, 1, 3, (3, 3)),  # 7 is prime: the fewest micro-batches of at most 3, as even as can be
    (1, 1, 1, (1, 1)),
])
def test_reduced_batch(requested: int, accumulate: int, largest: int, expected: tuple[int, int]) -> None:
    reduced_batch = importlib.import_module("memguard.estimation.search").reduced_batch
    got = reduced_batch(requested, accumulate, largest)
    assert tuple(got) == expected
    batch, micro = got
    assert batch <= largest and batch * micro >= requested * accumulate


def test_reduce_trains_with_a_divisor_of_the_asked_batch(tmp_path: Path) -> None:
    package = "lightning.pytorch"
    cls = side_effects_class(package)
    shape = dict(batch_size=64, samples=64, width=256, hidden=2)  # activations outgrow the optimizer step
    budget = budget_holding(package, lambda: cls(tmp_path / "probe.txt", **shape), fits=11)
    make = functools.partial(cls, tmp_path / "run.txt", **shape)
    guard = MemGuard(action="reduce", budget=budget, margin=MARGIN)
    run = fit(package, make, guard, max_steps=1)
    # 10 to 15 fit: 8 x 8 makes 64 exactly (the old arithmetic trains 10 x 7, 11 x 6, 13 x 5 ...).
    assert 10 <= guard.fitting_batch_size <= 15, f"setup: the budget should hold 11, not {guard.fitting_batch_size}"
    assert (guard.batch_size, guard.accumulate_grad_batches) == (8, 8)
    assert run.trainer.accumulate_grad_batches * run.module.batch_size == 64
    assert lines(tmp_path / "run.txt") == list(range(8))
    assert sorted(set(run.module.batch_sizes)) == [8]


# -- 8. issue 15: what in-process copies could not cover -------------------------------------------
#
# The trace and the peek run in a forked child (memguard.estimation.sandbox). Each scenario below
# changed the guarded run while they ran in the user's process.


@functools.cache
def scheduled_class(package: str) -> type:
    """Steps its scheduler and decays its learning rate inside ``training_step``."""

    class Scheduled(base_class(package)):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.lr_schedulers().step()
            for group in self.optimizers().param_groups:
                group["lr"] *= 0.95
            self.trainer.datamodule.seen.append(len(batch[0]))
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=0.05)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    return Scheduled


@functools.cache
def datamodule_class(package: str) -> type:
    """Serves the base module's data; its loader draws the order from the user's own generators."""
    pl = importlib.import_module(package)
    np = pytest.importorskip("numpy")

    class Data(pl.LightningDataModule):
        def __init__(self, source: Any, how: str = "plain", batch_size: int = 4) -> None:
            super().__init__()
            self.source, self.how, self.batch_size = source, how, batch_size
            self.seen: list[int] = []
            self.rng = np.random.default_rng(3)
            self.cached: DataLoader | None = None

        def train_dataloader(self) -> DataLoader:
            data = self.source.dataset()
            if self.how == "numpy":  # a numpy Generator of the DataModule picks the order
                order = self.rng.permutation(len(data)).tolist()
                return DataLoader(torch.utils.data.Subset(data, order), batch_size=self.batch_size)
            if self.how == "sampler":  # a random.Random in a batch sampler
                return DataLoader(data, batch_sampler=RandomBatches(len(data), self.batch_size))
            if self.how == "dataset":  # a torch.Generator in the Dataset adds noise
                return DataLoader(Noisy(data), batch_size=self.batch_size)
            if self.how == "persistent":  # one loader, cached, with a persistent worker
                if self.cached is None:
                    self.cached = DataLoader(data, batch_size=self.batch_size, num_workers=1,
                                             persistent_workers=True, shuffle=True,
                                             generator=torch.Generator().manual_seed(5))
                return self.cached
            return DataLoader(data, batch_size=self.batch_size)

    return Data


class RandomBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.random = __import__("random").Random(11)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.n))
        self.random.shuffle(order)
        return iter([order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)])

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size


class Noisy(torch.utils.data.Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data, self.generator = data, torch.Generator().manual_seed(13)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        index, x, y = self.data[i]
        return index, x + torch.randn(x.shape, generator=self.generator), y


@pytest.mark.parametrize(("package", "action"), ACTIONS)
def test_a_scheduler_stepped_and_a_learning_rate_changed_in_training_step(package: str, action: str) -> None:
    def run(guard: MemGuard | None) -> tuple[Run, Any]:
        pl = importlib.import_module(package)
        pl.seed_everything(0, verbose=False)
        module = scheduled_class(package)()
        data = datamodule_class(package)(module)
        return fit(package, None, guard, module=module, datamodule=data), data

    plain, plain_data = run(None)
    guarded, guarded_data = run(MemGuard(action=action, budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    lrs = [[g["lr"] for g in r.trainer.optimizers[0].param_groups] for r in (guarded, plain)]
    epochs = [r.trainer.lr_scheduler_configs[0].scheduler.last_epoch for r in (guarded, plain)]
    assert_no_harm(guarded, plain, f"learning rates {lrs[0]} != {lrs[1]}" if lrs[0] != lrs[1] else "",
                   f"scheduler epochs {epochs[0]} != {epochs[1]}" if epochs[0] != epochs[1] else "",
                   f"datamodule.seen {guarded_data.seen} != {plain_data.seen}" if guarded_data.seen != plain_data.seen
                   else "")
    assert epochs[1] == 6 + 1 and plain_data.seen == [4] * 6  # six steps in training_step, one at the epoch end


@pytest.mark.parametrize("how", ["numpy", "sampler", "dataset", "persistent"])
def test_reduce_that_fits_draws_nothing_from_the_users_generators(how: str) -> None:
    package = "lightning.pytorch"
    cls = seen_class(package)

    def run(guard: MemGuard | None) -> tuple[Run, Any]:
        pl = importlib.import_module(package)
        pl.seed_everything(0, verbose=False)
        module = cls("plain")
        data = datamodule_class(package)(module, how)
        return fit(package, None, guard, module=module, datamodule=data, max_steps=-1, max_epochs=2), data

    plain, _ = run(None)
    guarded, _ = run(MemGuard(action="reduce", budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    g, p = guarded.module, plain.module
    assert sorted(p.seen) == sorted(list(range(24)) * 2)
    assert_no_harm(guarded, plain, f"samples seen {g.seen} != {p.seen}" if g.seen != p.seen else "")


# A forward hook that keeps what it sees, a module-level cache, and torch.compile.

KEPT: list[torch.Tensor] = []


@functools.lru_cache(maxsize=4)
def ramp(n: int) -> torch.Tensor:
    """A helper cached at module level, as position tables often are."""
    return torch.linspace(0.0, 1.0, n)


@functools.cache
def hooked_class(package: str) -> type:
    class Hooked(base_class(package)):
        def __init__(self, compiled: Callable[[nn.Module], nn.Module] | None = None) -> None:
            super().__init__(log_loss=False)
            self.layer.register_forward_hook(lambda m, i, out: KEPT.append(out.detach()))
            if compiled is not None:
                self.layer = compiled(self.layer)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) + ramp(2)

        def on_train_epoch_end(self) -> None:
            self.kept_mean = torch.stack(KEPT).mean()  # fails on a FakeTensor the trace left there

    return Hooked


@pytest.mark.parametrize(("package", "action"), ACTIONS)
def test_hooks_that_keep_tensors_and_module_level_caches(package: str, action: str) -> None:
    def run(guard: MemGuard | None) -> tuple[Run, list[torch.Tensor]]:
        KEPT.clear()
        ramp.cache_clear()
        return fit(package, hooked_class(package), guard, max_steps=-1, max_epochs=2), list(KEPT)

    plain, plain_kept = run(None)
    guarded, guarded_kept = run(MemGuard(action=action, budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    same = len(plain_kept) == len(guarded_kept) and all(map(_same, guarded_kept, plain_kept))
    assert_no_harm(guarded, plain, "" if same else f"the hook kept {len(guarded_kept)} tensors, not {len(plain_kept)}",
                   "" if not isinstance(ramp(2), FakeTensor) else "a FakeTensor in the module-level cache")
    assert _same(guarded.module.kept_mean, plain.module.kept_mean)


def test_a_compiled_module_stays_compiled() -> None:
    package = "lightning.pytorch"
    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    def run(guard: MemGuard | None) -> tuple[Run, int]:
        torch._dynamo.reset()
        graphs.clear()
        KEPT.clear()
        make = functools.partial(hooked_class(package), lambda m: torch.compile(m, backend=backend))
        got = fit(package, make, guard, max_steps=-1, max_epochs=2)
        return got, len(graphs)

    plain, plain_graphs = run(None)
    guarded, guarded_graphs = run(MemGuard(action="warn", budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    assert plain_graphs >= 1
    assert_no_harm(guarded, plain, "" if guarded_graphs == plain_graphs else
                   f"dynamo compiled {guarded_graphs} graphs in the guarded fit, {plain_graphs} without the guard")
    # and after the guard, compilation still works in this process
    torch._dynamo.reset()
    graphs.clear()
    torch.compile(nn.Linear(2, 2), backend=backend)(torch.ones(1, 2))
    assert len(graphs) == 1


def test_estimate_of_a_compiled_module_is_the_original_modules() -> None:
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    kwargs = dict(example_input=torch.randn(16, 64), loss_fn=lambda out, b: out.sum(), device="cpu", method="trace")
    compiled = torch.compile(net, backend="eager")
    got, expected = memguard.estimate(compiled, **kwargs), memguard.estimate(net, **kwargs)
    assert got.breakdown == expected.breakdown
    assert got.inputs["model"] == "Sequential"
    assert {t.where for t in got.at_peak} == {t.where for t in expected.at_peak}  # not "_orig_mod.0"


# The user's own peak readings.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("reset_peak", [False, True])
def test_the_users_peak_readings_survive_the_measurement(reset_peak: bool) -> None:
    import resource

    spike = torch.ones(256 * 2**20 // 4)  # 256 MiB resident, then freed: the process's peak
    del spike  # unmapped: the kernel records the high-water mark, which is what the user reads now
    hwm, maxrss = _status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    guard = MemGuard(action="warn", budget=GENEROUS, reset_peak=reset_peak)
    run = fit("lightning.pytorch", base_class("lightning.pytorch"), guard)
    assert guard.measurement is not None, run.warned
    after = _status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset_peak:  # asked for: the counters were reset, and the measurement is exact
        assert after[0] < hwm and not guard.measurement.upper_bound
    else:
        assert after[0] >= hwm and after[1] >= maxrss, "the guard reset the process's peak memory readings"
        assert guard.measurement.upper_bound  # a tiny fit stays under the spike: at most this much
        assert guard.metrics["memguard/actual_is_upper_bound"] == 1.0


# A trace that loops in pure Python, and user objects that are not copied.


class Spinning(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while True:  # no tensor op: only a separate process can be stopped here
            pass


def test_trace_timeout_stops_a_pure_python_loop() -> None:
    def trace() -> str:
        return memguard.estimate(Spinning(), example_input=torch.randn(2, 4), loss_fn=lambda out, b: out.sum(),
                                 device="cpu", method="trace", trace_timeout=2).method

    classes, message = expect_error(bounded(trace, 30), "estimate(method='trace', trace_timeout=2) of a Python loop")
    assert "TraceError" in classes and TIMED_OUT.search(message), message


class CopyWitness:
    """Writes to a file when it is deep-copied: an effect any process can see."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __deepcopy__(self, memo: dict[int, Any]) -> CopyWitness:
        with open(self.path, "a") as f:
            f.write("copied\n")
        return CopyWitness(self.path)


def test_user_objects_are_not_copied_for_the_trace(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    net = nn.Sequential(nn.Linear(8, 8))
    net.witness = CopyWitness(tmp_path / "copies.txt")
    net.table = np.zeros(1)
    memguard.estimate(net, example_input=torch.randn(2, 8), loss_fn=lambda out, b: out.sum(), device="cpu",
                      method="trace")
    assert not (tmp_path / "copies.txt").exists(), "a user object was deep-copied for the trace"


# Where fork is not used, today's in-process isolation still holds, and says so once.


@pytest.mark.parametrize("package", ["lightning.pytorch"])
def test_in_process_fallback_still_isolates_and_warns_once(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard.estimation import sandbox

    monkeypatch.setenv(sandbox.IN_PROCESS_VARIABLE, "1")
    monkeypatch.setattr(sandbox, "_warned", False)
    plain = fit(package, cached_class(package))
    guarded = fit(package, cached_class(package), MemGuard(action="warn", budget=GENEROUS))
    assert guarded.guard.estimate is not None, guarded.warned
    assert_no_harm(guarded, plain)
    assert sum("runs user code in this process" in w for w in guarded.warned) == 1


@functools.cache
def data_dependent_class(package: str) -> type:
    class DataDependent(base_class(package)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x)
            return out * (out > 0).nonzero().shape[0]  # a size the data decides

    return DataDependent


def test_the_guard_warns_when_the_estimate_rests_on_invented_values() -> None:
    package = "lightning.pytorch"
    plain = fit(package, data_dependent_class(package))
    guarded = fit(package, data_dependent_class(package), MemGuard(action="warn", budget=GENEROUS))
    est = guarded.guard.estimate
    assert est is not None and est.uncertain and "nonzero" in " ".join(est.stand_ins), guarded.warned
    assert any("rests on invented values" in w and "nonzero" in w for w in guarded.warned), guarded.warned
    assert_no_harm(guarded, plain)
