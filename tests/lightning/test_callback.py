"""MemGuard in real Trainer runs on the CPU, with a GPT-2-style transformers model and a budget.

Both ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer`` are tested. The CPU "actual"
is the growth of resident memory, which is exact only when glibc returns freed buffers to the OS:
the module pins its mmap threshold (``mallopt``) as ``MALLOC_MMAP_THRESHOLD_=65536`` would.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import memguard
from memguard import InsufficientMemoryError, MemGuard
from memguard.estimation.from_run import optimizer_factory

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
SAMPLES = 32
SEQ = 128
ASKED = 16
MARGIN = 0.1


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pinned_cpu")]


@functools.cache
def module_class(package: str) -> type:
    """A LightningModule of ``package`` over a tiny GPT-2, recording what it really trains on."""
    pl = importlib.import_module(package)

    class TinyGPT(pl.LightningModule):
        def __init__(self, batch_size: int = ASKED, untraceable: bool = False) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=SEQ,
                                bos_token_id=0, eos_token_id=0)
            self.model = GPT2LMHeadModel(config)
            self.tokens = torch.randint(0, 1000, (SAMPLES, SEQ))
            self.seen: list[int] = []
            self.batch_sizes: list[int] = []

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.arange(SAMPLES)), batch_size=self.hparams.batch_size,
                              shuffle=True)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (index,) = batch
            if self.hparams.untraceable:
                index = torch.from_numpy(index.numpy())  # needs real data: fails on fake tensors
            if not MemGuard.is_tracing():
                self.seen += index.tolist()
                self.batch_sizes.append(len(index))
            ids = self.tokens[index]
            loss = self.model(input_ids=ids, labels=ids).loss
            if self._trainer is not None:
                self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    TinyGPT.__qualname__ = TinyGPT.__name__ = f"TinyGPT_{package.split('.')[0]}"
    return TinyGPT


def trainer(package: str, tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    pl = importlib.import_module(package)
    loggers = importlib.import_module(f"{package}.loggers")
    options = dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                   logger=loggers.CSVLogger(tmp_path))
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@functools.cache
def budget_for(batch_size: int) -> int:
    """A budget that just holds a training step at ``batch_size`` with the margin kept spare."""
    module = module_class("lightning.pytorch")()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = memguard.estimate(module, batch_size=batch_size, example_input=(torch.arange(ASKED),),
                                step_fn=lambda batch: module.training_step(batch, 0), optimizer=torch.optim.AdamW,
                                device="cpu", training_loop="lightning")
    return int(est.total_bytes / (1 - MARGIN)) + 1


def test_is_a_callback_of_both_lightning_packages() -> None:
    guard = MemGuard()
    for package in PACKAGES:
        assert isinstance(guard, importlib.import_module(package).Callback)
    assert guard.state_key == "MemGuard"
    assert guard.state_dict() == {}


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"action": "shrink"}, "'shrink'"),
    ({"margin": 1.0}, "1.0"),
    ({"margin": -0.1}, "-0.1"),
    ({"budget": "12 parsecs"}, "12 parsecs"),
    ({"budget": "120%"}, "120%"),
    ({"budget": 0}, "0"),
    ({"measure_steps": 0}, "0"),
])
def test_bad_arguments_are_named(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(memguard.ConfigError, match=named):
        MemGuard(**kwargs)


@pytest.mark.parametrize("package", PACKAGES)
def test_raise_raises_before_any_training_step(package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remedy_rows = package == PACKAGES[0]
    if not remedy_rows:
        # What would fit is package-blind (memguard.planning, reached through the same callback); the first
        # package asserts its rows, 16 traces of a second or two each. Here the search stops at its first estimate,
        # and the plumbing of this package (raised before a step, on the run's own batch and optimizer) is the subject.
        monkeypatch.setattr("memguard.planning.api.GUARD_ESTIMATES", 1)
    budget = budget_for(4)
    module = module_class(package)()
    guard = MemGuard(action="raise", budget=budget, margin=MARGIN)
    with pytest.raises(InsufficientMemoryError) as info:
        trainer(package, tmp_path, [guard]).fit(module)
    assert module.seen == []  # training_step never ran on real data
    err = info.value
    assert err.free_bytes == budget
    assert err.estimate is not None and err.estimate.inputs["batch_size"] == ASKED
    assert err.estimate.total_bytes > budget * (1 - MARGIN)
    assert err.estimate.inputs["optimizer"] == "adamw"
    if remedy_rows:
        assert "What would fit" in str(err) and "bf16-mixed" in str(err)  # rows of memguard.remedies
    else:  # one estimate, none that fits: a search cut short proves nothing, and the guard claims nothing
        assert "What would fit" not in str(err) and "Nothing memguard can change" not in str(err)


@dataclasses.dataclass
class Reduced:
    """What a ``"reduce"`` fit did, read back from the fresh process that ran and measured it."""

    package: str
    guard: dict[str, Any]
    module: dict[str, Any]
    trainer: dict[str, Any]
    budget: int
    checkpoint: Path
    order_without_guard: list[int]


_REDUCED_FIT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import test_callback as t
from memguard import MemGuard
package, root, budget = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])  # budget_for(4), traced by the parent
torch.manual_seed(1)
module = t.module_class(package)()
torch.manual_seed(1)
guard = MemGuard(action="reduce", budget=budget, margin=t.MARGIN)
run = t.trainer(package, root, [guard])
run.fit(module)
run.save_checkpoint(root / "reduced.ckpt")
print(json.dumps({
    "guard": {"requested_batch_size": guard.requested_batch_size, "batch_size": guard.batch_size,
              "accumulate_grad_batches": guard.accumulate_grad_batches, "metrics": guard.metrics,
              "available_bytes": guard.available_bytes},
    "module": {"hparams_batch_size": module.hparams.batch_size, "batch_sizes": module.batch_sizes, "seen": module.seen},
    "trainer": {"accumulate_grad_batches": run.accumulate_grad_batches, "global_step": run.global_step,
                "log_dir": run.logger.log_dir},
}))
sys.stdout.flush()
os._exit(0)  # all is written: skip the interpreter's teardown of torch, transformers and Lightning (~2 s)
"""


@pytest.fixture(scope="module", params=PACKAGES)
def reduced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reduced:
    """One epoch asked at batch 16 under a budget that holds about 4, with ``action="reduce"``.

    The fit runs, and is measured, in a fresh process started with the threshold pinned: memory that
    earlier tests freed stays in this process's malloc arenas, where a fit would reuse it without
    growing RSS (the measurement would read low). The same fit serves every test of the reduction,
    the measurement included; its results come back as JSON, its checkpoint and CSV log as files.
    """
    package = request.param
    root = tmp_path_factory.mktemp(package.replace(".", "_"))
    torch.manual_seed(1)
    plain = module_class(package)()
    torch.manual_seed(1)
    trainer(package, root / "plain", [], logger=False).fit(plain)

    budget = budget_for(4)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS
    done = subprocess.run([sys.executable, "-c", _REDUCED_FIT, str(Path(__file__).parent), package, str(root),
                           str(budget)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Reduced(package, result["guard"], result["module"], result["trainer"], budget, root / "reduced.ckpt",
                   plain.seen)


def test_reduce_keeps_the_effective_batch(reduced: Reduced) -> None:
    guard, module, run = reduced.guard, reduced.module, reduced.trainer
    assert guard["requested_batch_size"] == ASKED
    assert 1 <= guard["batch_size"] <= 4
    assert module["hparams_batch_size"] == guard["batch_size"]  # set where the batch size lives
    assert run["accumulate_grad_batches"] == guard["accumulate_grad_batches"]
    assert guard["batch_size"] * guard["accumulate_grad_batches"] >= ASKED
    assert guard["batch_size"] * (guard["accumulate_grad_batches"] - 1) < ASKED  # no more micro-batches than needed
    assert max(module["batch_sizes"]) == guard["batch_size"]
    assert run["global_step"] == -(-len(module["batch_sizes"]) // guard["accumulate_grad_batches"])


def test_reduce_sees_every_sample_once_in_the_same_order(reduced: Reduced) -> None:
    assert sorted(reduced.module["seen"]) == list(range(SAMPLES))
    # Peeking at the loader and tracing consumed neither a batch nor random numbers.
    assert reduced.module["seen"] == reduced.order_without_guard


def test_reduce_stays_under_the_budget_as_measured(reduced: Reduced) -> None:
    metrics, budget = reduced.guard["metrics"], reduced.budget
    assert reduced.guard["available_bytes"] == budget == budget_for(4)  # the budget the fresh process guarded with
    predicted, actual = metrics["memguard/predicted_peak_bytes"], metrics["memguard/actual_peak_bytes"]
    assert metrics["memguard/actual_is_lower_bound"] == 0.0  # the threshold is pinned: a true peak
    assert predicted <= budget * (1 - MARGIN)
    assert 0 < actual <= budget
    assert abs(actual / predicted - 1) < MARGIN
    assert metrics["memguard/error"] == pytest.approx(actual / predicted - 1)
    assert "memguard/actual_total_bytes" not in metrics  # NVML has nothing to say about the CPU


def test_metrics_land_in_the_csv_logger(reduced: Reduced) -> None:
    path = Path(reduced.trainer["log_dir"]) / "metrics.csv"
    rows = [r for r in csv.DictReader(path.open()) if r.get("memguard/actual_peak_bytes")]
    assert len(rows) == 1
    for key in ("predicted_peak_bytes", "actual_peak_bytes", "predicted_total_bytes", "error"):
        assert float(rows[0][f"memguard/{key}"]) == pytest.approx(reduced.guard["metrics"][f"memguard/{key}"])


def test_resume_keeps_batch_and_accumulation_without_estimating(reduced: Reduced, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_estimate(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("estimated again on resume")

    monkeypatch.setattr("memguard.estimation.estimator.estimate", no_estimate)
    module = module_class(reduced.package)()
    assert module.hparams.batch_size == ASKED
    guard = MemGuard(action="reduce", budget=reduced.budget, margin=MARGIN, strict=True)
    run = trainer(reduced.package, tmp_path, [guard], max_epochs=2)
    run.fit(module, ckpt_path=reduced.checkpoint)
    assert (guard.batch_size, guard.accumulate_grad_batches) == (reduced.guard["batch_size"],
                                                                 reduced.guard["accumulate_grad_batches"])
    assert module.hparams.batch_size == guard.batch_size
    assert run.accumulate_grad_batches == guard.accumulate_grad_batches
    assert max(module.batch_sizes) == guard.batch_size
    assert sorted(module.seen) == list(range(SAMPLES))  # the second epoch, whole
    assert guard.state_dict()["batch_size"] == guard.batch_size


def test_reduce_raises_when_not_even_one_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every configuration the search traces misses 1 MiB alike; 4 of them (a precision, checkpointing, an optimizer
    # ...) show that none is suggested as well as the 16 traces of a second or two each a guard spends would.
    monkeypatch.setattr("memguard.planning.api.GUARD_ESTIMATES", 4)
    module = module_class("lightning.pytorch")()
    guard = MemGuard(action="reduce", budget="1MiB")
    with pytest.raises(InsufficientMemoryError, match="not even a batch of 1 fits") as info:
        trainer("lightning.pytorch", tmp_path, [guard]).fit(module)
    assert module.seen == []
    text = str(info.value)
    # Nothing fits 1 MiB, so the remedy engine suggests nothing rather than something that does not fit; its search
    # stopped at the guard's bound, so it does not claim that nothing could fit either (the goldens of
    # tests/guard show the line of a search that tried everything).
    assert "What would fit" not in text and "Nothing memguard can change" not in text
    assert info.value.estimate.inputs["batch_size"] == 1


def test_warn_warns_with_the_table_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What would fit is the raise tests' subject (the same search at this budget); here the search stops at its
    # first estimate instead of 16 traces of a second each. The warning, its table and the training are this test's.
    monkeypatch.setattr("memguard.planning.api.GUARD_ESTIMATES", 1)
    module = module_class("lightning.pytorch")()
    guard = MemGuard(action="warn", budget=budget_for(4))
    with pytest.warns(UserWarning, match="may not fit") as record:
        trainer("lightning.pytorch", tmp_path, [guard], limit_train_batches=2).fit(module)
    text = next(str(w.message) for w in record if "may not fit" in str(w.message))
    assert "memguard estimate (trace)" in text and "optimizer_state" in text and "available" in text
    assert module.batch_sizes == [ASKED, ASKED]


def test_a_failed_estimate_warns_and_training_goes_on(tmp_path: Path) -> None:
    module = module_class("lightning.pytorch")(untraceable=True)
    guard = MemGuard(action="raise", budget="1MiB")
    with pytest.warns(UserWarning, match="could not estimate"):
        trainer("lightning.pytorch", tmp_path, [guard], limit_train_batches=2).fit(module)
    assert module.batch_sizes == [ASKED, ASKED]
    assert guard.estimate is None and guard.state_dict() == {}


def test_a_failed_estimate_raises_when_strict(tmp_path: Path) -> None:
    module = module_class("lightning.pytorch")(untraceable=True)
    guard = MemGuard(action="warn", strict=True)
    with pytest.raises(memguard.TraceError):
        trainer("lightning.pytorch", tmp_path, [guard], limit_train_batches=2).fit(module)
    assert module.seen == []


def test_reduce_needs_a_batch_size_attribute(tmp_path: Path) -> None:
    module = module_class("lightning.pytorch")()
    loader = module.train_dataloader()
    guard = MemGuard(action="reduce", batch_arg_name="micro_batch")
    with pytest.raises(memguard.ConfigError, match="'micro_batch'"):
        trainer("lightning.pytorch", tmp_path, [guard]).fit(module)
    with pytest.raises(memguard.ConfigError, match="passed to fit"):
        trainer("lightning.pytorch", tmp_path, [MemGuard(action="reduce")]).fit(module, train_dataloaders=loader)


def test_the_real_optimizer_is_rebuilt_over_exactly_its_params() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    model[2].requires_grad_(False)
    first, second = model[0], model[1]
    opt = torch.optim.AdamW([{"params": first.parameters(), "lr": 0.5},
                             {"params": [second.weight], "weight_decay": 0.0}], lr=1e-3, betas=(0.8, 0.9))
    factory = optimizer_factory(model, opt, "cuda")
    fakes = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    built = factory(fakes)
    assert type(built) is torch.optim.AdamW and factory.__name__ == "adamw"
    assert [len(g["params"]) for g in built.param_groups] == [2, 1]
    assert built.param_groups[0]["params"][0] is fakes[0]
    assert built.param_groups[1]["params"][0] is fakes[2]  # second.bias is not optimized
    assert built.param_groups[0]["lr"] == 0.5 and built.param_groups[1]["weight_decay"] == 0.0
    assert built.param_groups[1]["betas"] == (0.8, 0.9)
    assert all(g["foreach"] for g in built.param_groups)  # what torch picks for CUDA tensors

    est = memguard.estimate(model, example_input=torch.randn(3, 4), loss_fn=lambda out, batch: out.sum(),
                            optimizer=factory, device="cuda", method="trace")
    assert est.inputs["optimizer"] == "adamw"
    # Adam's two moments for exactly the 4*8 + 8 + 8*2 parameters it holds, fp32, in 512-byte blocks.
    moments = 2 * (512 + 512 + 512)
    assert moments <= est.breakdown[memguard.Category.OPTIMIZER_STATE] <= moments + 3 * 512  # + step scalars


_PRECISION_FITS = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import test_callback as t
from memguard import Category, MemGuard
out = {}
for checkpointing in (False, True):
    module = t.module_class("lightning.pytorch")()
    if checkpointing:
        enable = getattr(module.model, "activation_checkpointing_enable", None)
        (enable or module.model.gradient_checkpointing_enable)()
    guard = MemGuard(action="warn", budget="1GiB", reset_peak=True)
    run = t.trainer("lightning.pytorch", Path(sys.argv[2]), [guard], precision="bf16-mixed", limit_train_batches=4)
    run.fit(module)
    est = guard.estimate
    out[str(checkpointing)] = {"precision": est.inputs["precision"], "activations": est.breakdown[Category.ACTIVATIONS],
                               "checkpointing": est.inputs["gradient_checkpointing"], "metrics": guard.metrics}
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)  # all is written: skip the interpreter's teardown of torch, transformers and Lightning (~2 s)
"""


def test_reads_precision_and_gradient_checkpointing_from_the_run(tmp_path: Path) -> None:
    """Measured in a fresh process started with the threshold pinned: in this one, large free chunks that
    earlier tests left in the heap serve the step's buffers, which stay resident when freed (the
    measurement would read high; memguard/device/actual.py)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS
    done = subprocess.run([sys.executable, "-c", _PRECISION_FITS, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    for checkpointing in (False, True):
        run = runs[str(checkpointing)]
        assert run["precision"] == "bf16-mixed"
        assert run["checkpointing"] is checkpointing
        assert run["metrics"]["memguard/actual_is_lower_bound"] == 0.0  # the threshold is pinned: a true peak
        assert abs(run["metrics"]["memguard/error"]) < MARGIN  # the autocast and recomputed steps, measured
    assert runs["True"]["activations"] < runs["False"]["activations"] / 2


def test_strategies_are_read_in_the_estimators_terms() -> None:
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy

    from memguard.lightning.run import run_info

    def strategy(name: str, **attrs: Any) -> Any:
        base = type(name, (), {"root_device": torch.device("cpu"), **attrs})
        return type(f"My{name}", (base,), {})()  # a subclass counts as its base

    def info(strategy: Any, world_size: int = 4) -> Any:
        trainer = type("T", (), {"strategy": strategy, "world_size": world_size, "global_rank": 0, "num_devices": 4,
                                 "precision": "bf16-mixed", "accumulate_grad_batches": 1})()
        got = run_info(trainer)
        return got.parallel, got.offload_optimizer, got.offload_params, got.sharded_module

    assert info(strategy("SingleDeviceStrategy"), 1) == ("single", False, False, False)
    assert info(strategy("DDPStrategy")) == ("ddp", False, False, False)
    fsdp = strategy("FSDPStrategy", sharding_strategy=ShardingStrategy.FULL_SHARD, cpu_offload=CPUOffload(True))
    assert info(fsdp) == ("fsdp", True, True, True)
    grad_op = strategy("FSDPStrategy", sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, cpu_offload=None)
    assert info(grad_op) == ("fsdp_shard_grad_op", False, False, True)
    no_shard = strategy("FSDPStrategy", sharding_strategy=ShardingStrategy.NO_SHARD, cpu_offload=None)
    assert info(no_shard) == ("ddp", False, False, False)
    zero2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}
    assert info(strategy("DeepSpeedStrategy", config=zero2)) == ("deepspeed_stage_2", False, False, False)
    cpu = {"device": "cpu"}
    zero3 = {"zero_optimization": {"stage": 3, "offload_optimizer": cpu, "offload_param": cpu}}
    assert info(strategy("DeepSpeedStrategy", config=zero3)) == ("deepspeed_stage_3", True, True, True)
    assert info(strategy("ModelParallelStrategy")) == (None, False, False, True)
