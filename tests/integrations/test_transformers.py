"""``MemGuardCallback`` in real ``transformers.Trainer`` runs on the CPU, with a tiny GPT-2 built from a config.

The CPU "actual" is the growth of resident memory, which follows live tensors only when glibc
returns freed buffers to the OS: a process started with ``MALLOC_MMAP_THRESHOLD_=65536``. Its size is
compared with the estimate in such a fresh process (:func:`test_the_measured_peak_is_the_estimate_in_a_fresh_process`):
in this one, free heap chunks that earlier tests left serve tensor buffers, which stay resident when freed
(see memguard/device/actual.py), and the same steps read from +2% to +50% high depending on what ran
before. The runs in this process check everything else, and leave the measurement's own warning out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import memguard
from memguard import Category, ConfigError, InsufficientMemoryError
from memguard.device.actual import mmap_threshold_pinned
from memguard.integrations.trainer_view import optimizer_for, precision_of
from memguard.integrations.transformers import BatchTooLargeError, MemGuardCallback

# SEQ 128, not 64: at 64 a step's many tensors just under glibc's 64 KiB mmap threshold land in heap pages
# that the probe's malloc_trim released, and each faults whole pages (see memguard/device/actual.py).
SAMPLES, SEQ, VOCAB, BATCH, EVAL_BATCH, STEPS = 64, 128, 1000, 8, 3, 4
GENEROUS = "64GiB"
KEYS = {"memguard/predicted_peak_bytes", "memguard/actual_peak_bytes", "memguard/predicted_total_bytes",
        "memguard/error", "memguard/actual_is_lower_bound"}
MEASURED = "the first training steps used"  # memguard.device.actual.compare's warning


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pinned_cpu")]


class Tokens(torch.utils.data.Dataset):
    """Fixed random token windows as causal-LM samples; every index read is recorded in ``seen``."""

    def __init__(self, n: int, seen: list[int], offset: int = 0) -> None:
        g = torch.Generator().manual_seed(1 + offset)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.seen, self.offset = seen, offset

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.seen.append(self.offset + i)
        return {"input_ids": self.x[i], "labels": self.x[i]}


@dataclasses.dataclass
class Run:
    trainer: Trainer
    initial: dict[str, torch.Tensor]
    seen: list[int]
    warned: list[str]  # the guard's warnings, less the measurement's
    rng: torch.Tensor
    error: BaseException | None
    measurement_warned: list[str]  # its warning that the measured peak exceeds the prediction


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0))


def train(tmp: Path, guard: TrainerCallback | None, *, evaluate: bool = False,
          prepare: Callable[[torch.nn.Module], None] | None = None, **overrides: Any) -> Run:
    """Train ``STEPS`` steps (or fail trying); what the user could see afterwards."""
    options: dict[str, Any] = dict(output_dir=str(tmp), per_device_train_batch_size=BATCH, max_steps=STEPS,
                                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                   disable_tqdm=True, seed=0)
    if evaluate:  # an evaluation before the first step: its forward must not be taken for the training one
        options.update(eval_strategy="steps", eval_steps=STEPS, eval_on_start=True,
                       per_device_eval_batch_size=EVAL_BATCH)
    options.update(overrides)
    seen: list[int] = []
    net = model()
    if prepare is not None:
        prepare(net)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = Trainer(model=net, args=TrainingArguments(**options), train_dataset=Tokens(SAMPLES, seen),
                      eval_dataset=Tokens(EVAL_BATCH, seen, offset=1000) if evaluate else None,
                      callbacks=[guard] if guard is not None else [])
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.train()
        except Exception as exc:
            error = exc
    # The measurement's warning is left out: in this process its size depends on the heap earlier tests left
    # (see the module docs); test_the_measured_peak_is_the_estimate_in_a_fresh_process asserts it is not given.
    warned = [str(w.message) for w in caught if "MemGuard" in str(w.message)]
    measured = [w for w in warned if MEASURED in w]
    return Run(trainer, initial, seen, [w for w in warned if w not in measured], torch.get_rng_state(), error, measured)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_memguard(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``log_history`` less the entries memguard added, and less run times (which differ run to run)."""
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
              "eval_samples_per_second", "eval_steps_per_second")
    return [{k: v for k, v in e.items() if k not in timing} for e in history if not KEYS & e.keys()]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run, MemGuardCallback]:
    """The same run without the guard and with ``warn`` and room to spare."""
    plain = train(tmp_path_factory.mktemp("plain"), None, evaluate=True)
    guard = MemGuardCallback("warn", budget=GENEROUS, reset_peak=True)  # an exact actual, whatever ran before
    guarded = train(tmp_path_factory.mktemp("guarded"), guard, evaluate=True)
    assert plain.error is None and guarded.error is None, (plain.error, guarded.error)
    return plain, guarded, guard


# -- arguments ----------------------------------------------------------------------------------


def test_is_a_trainer_callback() -> None:
    assert isinstance(MemGuardCallback(), TrainerCallback)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"action": "shrink"}, "'shrink'"),
    ({"margin": 1.5}, "1.5"),
    ({"margin": True}, "True"),
    ({"budget": "lots"}, "'lots'"),
    ({"budget": 0}, "0"),
    ({"budget": "120%"}, "120%"),
    ({"measure_steps": 0}, "0"),
    ({"trace_timeout": -1}, "-1"),
])
def test_bad_arguments_are_named(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        MemGuardCallback(**kwargs)


# -- it never changes the run it guards ---------------------------------------------------------


def test_warn_with_room_is_the_unguarded_run_bit_for_bit(pair: tuple[Run, Run, MemGuardCallback]) -> None:
    plain, guarded, _ = pair
    assert same_weights(plain.trainer.model.state_dict(), guarded.trainer.model.state_dict())
    assert not same_weights(guarded.initial, guarded.trainer.model.state_dict())  # it did train
    assert guarded.seen == plain.seen and len(plain.seen) >= EVAL_BATCH + STEPS * BATCH  # accelerate reads one ahead
    assert without_memguard(guarded.trainer.state.log_history) == without_memguard(plain.trainer.state.log_history)
    assert torch.equal(guarded.rng, plain.rng)
    assert guarded.warned == []
    net = guarded.trainer.model
    assert not net._forward_pre_hooks and not net._forward_pre_hooks_with_kwargs  # the hook removed itself
    assert not any(isinstance(t, FakeTensor) for t in [*net.parameters(), *net.buffers()])


def test_estimates_the_first_training_batch_of_this_run(pair: tuple[Run, Run, MemGuardCallback]) -> None:
    _, _, guard = pair
    est = guard.estimate
    assert guard.requested_batch_size == BATCH  # not the evaluation's batch of EVAL_BATCH
    assert est is not None and est.method == "trace"
    assert (est.inputs["batch_size"], est.inputs["seq_len"]) == (BATCH, SEQ)
    assert est.inputs["precision"] == "32-true" and est.inputs["device"] == "cpu"
    assert est.inputs["optimizer"] == "adamw" and est.inputs["training_loop"] == "pytorch"
    assert est.inputs["set_to_none"] is True and est.inputs["accumulate_grad_batches"] == 1
    assert guard.available_bytes == 64 << 30


def test_predicted_and_actual_land_in_log_history(pair: tuple[Run, Run, MemGuardCallback]) -> None:
    _, guarded, guard = pair
    entries = [e for e in guarded.trainer.state.log_history if KEYS & e.keys()]
    assert len(entries) == 1
    entry = entries[0]
    assert entry.keys() >= KEYS
    assert entry["step"] == 1 + guard.measure_steps  # the first step warms up, then measure_steps are measured
    assert guard.estimate is not None
    predicted, actual = entry["memguard/predicted_peak_bytes"], entry["memguard/actual_peak_bytes"]
    assert predicted == guard.estimate.peak_bytes
    assert entry["memguard/predicted_total_bytes"] == guard.estimate.total_bytes
    assert entry["memguard/error"] == pytest.approx(actual / predicted - 1)
    assert actual > 0  # its size is asserted in a fresh process (next test)
    assert entry["memguard/actual_is_lower_bound"] is (not mmap_threshold_pinned())
    assert entry["memguard/actual_is_upper_bound"] is False  # reset_peak=True: the counters were reset
    assert guard.metrics == {k: v for k, v in entry.items() if k.startswith("memguard/")}


_MEASURED_RUN = """
import json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import test_transformers as t
from memguard.integrations.transformers import MemGuardCallback
guard = MemGuardCallback("warn", budget=t.GENEROUS, reset_peak=True)
run = t.train(tempfile.mkdtemp(dir=sys.argv[2]), guard, evaluate=True)
entries = [e for e in run.trainer.state.log_history if t.KEYS & e.keys()]
print(json.dumps({"error": repr(run.error), "warned": run.warned + run.measurement_warned,
                  "entries": entries, "metrics": guard.metrics, "peak": guard.estimate.peak_bytes,
                  "steps": guard.measure_steps, "margin": guard.margin}))
sys.stdout.flush()
os._exit(0)  # all is written: skip the interpreter's teardown of torch, transformers and Lightning (~2 s)
"""


def test_the_measured_peak_is_the_estimate_in_a_fresh_process(tmp_path: Path) -> None:
    """The run of ``pair`` with room, in a process started as the measurement asks: its peak is the
    estimate's, within the guard's margin, and the guard says nothing, the measurement included."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS from the start
    done = subprocess.run([sys.executable, "-c", _MEASURED_RUN, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == "None" and result["warned"] == []
    assert len(result["entries"]) == 1
    entry = result["entries"][0]
    assert entry["step"] == 1 + result["steps"]
    predicted, actual = entry["memguard/predicted_peak_bytes"], entry["memguard/actual_peak_bytes"]
    assert predicted == result["peak"]
    assert entry["memguard/actual_is_lower_bound"] is False and entry["memguard/actual_is_upper_bound"] is False
    assert abs(actual / predicted - 1) < result["margin"], entry  # RSS follows live tensors: +1.6% measured
    assert entry["memguard/error"] == pytest.approx(actual / predicted - 1)
    assert result["metrics"] == {k: v for k, v in entry.items() if k.startswith("memguard/")}


def test_warn_without_room_warns_and_trains_the_same(pair: tuple[Run, Run, MemGuardCallback], tmp_path: Path) -> None:
    plain = pair[0]
    run = train(tmp_path, MemGuardCallback("warn", budget="1MiB"), evaluate=True)
    assert run.error is None
    assert len(run.warned) == 1 and "may not fit" in run.warned[0] and "budget of 1.00 MiB" in run.warned[0]
    assert same_weights(plain.trainer.model.state_dict(), run.trainer.model.state_dict())
    assert run.seen == plain.seen


# -- acting ---------------------------------------------------------------------------------------


def test_raise_raises_before_the_first_step(tmp_path: Path) -> None:
    run = train(tmp_path, MemGuardCallback("raise", budget="1MiB"))
    assert isinstance(run.error, InsufficientMemoryError) and not isinstance(run.error, BatchTooLargeError)
    assert f"per_device_train_batch_size={BATCH} does not fit" in str(run.error)
    assert run.error.free_bytes == 1 << 20 and run.error.estimate is not None
    assert run.trainer.state.global_step == 0
    assert same_weights(run.initial, run.trainer.model.state_dict())


def test_reduce_names_the_batch_size_and_accumulation_that_fit(pair: tuple[Run, Run, MemGuardCallback],
                                                               tmp_path: Path) -> None:
    """A Trainer lets no callback change its batch size: ``reduce`` says what to set, and that fits."""
    at_asked = pair[2].estimate
    assert at_asked is not None
    budget = int(0.6 * at_asked.total_bytes)
    run = train(tmp_path / "asked", MemGuardCallback("reduce", budget=budget))
    err = run.error
    assert isinstance(err, BatchTooLargeError) and isinstance(err, ConfigError)
    assert isinstance(err, InsufficientMemoryError) and err.free_bytes == budget
    assert 1 <= err.fitting_batch_size < BATCH and err.batch_size <= err.fitting_batch_size
    assert err.batch_size * err.gradient_accumulation_steps == BATCH  # 8 always has a divisor in [b/2, b]
    assert (f"per_device_train_batch_size={err.batch_size} and gradient_accumulation_steps="
            f"{err.gradient_accumulation_steps}") in str(err)
    assert "before any callback event" in str(err)
    assert run.trainer.state.global_step == 0 and same_weights(run.initial, run.trainer.model.state_dict())
    assert pickle.loads(pickle.dumps(err)).batch_size == err.batch_size

    guard = MemGuardCallback("raise", budget=budget)
    again = train(tmp_path / "told", guard, per_device_train_batch_size=err.batch_size,
                  gradient_accumulation_steps=err.gradient_accumulation_steps)
    assert again.error is None and again.trainer.state.global_step == STEPS
    assert guard.estimate is not None and guard.estimate.fits(budget, guard.margin)
    assert guard.estimate.inputs["accumulate_grad_batches"] == err.gradient_accumulation_steps


def test_reduce_when_nothing_fits_raises_what_would_help(tmp_path: Path) -> None:
    run = train(tmp_path, MemGuardCallback("reduce", budget="64KiB"))
    assert isinstance(run.error, InsufficientMemoryError) and not isinstance(run.error, BatchTooLargeError)
    assert "not even a batch of 1 fits" in str(run.error)
    assert "smaller per_device_train_batch_size" not in str(run.error)  # it would not help


def test_reads_precision_checkpointing_accumulation_and_optimizer(tmp_path: Path) -> None:
    run = train(tmp_path, MemGuardCallback("raise", budget="64KiB"), bf16=True, activation_checkpointing=True,
                gradient_accumulation_steps=2, optim="sgd", optim_args="momentum=0.9")
    assert isinstance(run.error, InsufficientMemoryError) and run.error.estimate is not None
    est = run.error.estimate
    assert est.inputs["precision"] == "bf16-mixed" and est.inputs["gradient_checkpointing"] is True
    assert est.inputs["accumulate_grad_batches"] == 2 and est.inputs["optimizer"] == "sgd"
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    direct = {opt: memguard.estimate(model(), example_input=batch, optimizer=opt, precision="bf16-mixed",
                                     gradient_checkpointing=True, device="cpu", accumulate_grad_batches=2)
              for opt in ("sgd", "sgd-momentum")}
    assert direct["sgd"].breakdown[Category.OPTIMIZER_STATE] == 0  # so the momentum buffers were read from the run
    assert est.breakdown[Category.OPTIMIZER_STATE] == direct["sgd-momentum"].breakdown[Category.OPTIMIZER_STATE] > 0
    assert est.peak_bytes == pytest.approx(direct["sgd-momentum"].peak_bytes, rel=0.02)


def test_a_failed_estimate_warns_and_training_goes_on(tmp_path: Path) -> None:
    run = train(tmp_path / "lax", MemGuardCallback("raise", budget="1MiB", trace_timeout=1e-9))
    assert run.error is None and run.trainer.state.global_step == STEPS
    assert len(run.warned) == 1 and "could not estimate" in run.warned[0]
    assert not any(KEYS & e.keys() for e in run.trainer.state.log_history)  # nothing predicted, nothing compared
    strict = train(tmp_path / "strict", MemGuardCallback("raise", budget="1MiB", trace_timeout=1e-9, strict=True))
    assert isinstance(strict.error, memguard.TraceError) and strict.trainer.state.global_step == 0


# -- the run in memguard's terms --------------------------------------------------------------------


def arguments(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_precision_follows_accelerate(tmp_path: Path) -> None:
    fp32, cpu, cuda = model(), torch.device("cpu"), torch.device("cuda", 0)
    assert precision_of(arguments(tmp_path), fp32, cpu) == "32-true"
    assert precision_of(arguments(tmp_path, bf16=True), fp32, cpu) == "bf16-mixed"
    assert precision_of(arguments(tmp_path, fp16=True), fp32, cuda) == "16-mixed"
    assert precision_of(arguments(tmp_path, fp16=True), fp32, cpu) == "32-true"  # no fp16 autocast on the CPU
    assert precision_of(arguments(tmp_path, bf16=True), model().to(torch.bfloat16), cpu) == "bf16-true"
    assert precision_of(arguments(tmp_path), model().to(torch.float16), cpu) == "16-true"


def test_the_optimizer_is_the_real_one_or_memguards_name(pair: tuple[Run, Run, MemGuardCallback],
                                                         tmp_path: Path) -> None:
    trainer = pair[1].trainer
    wrapped = trainer.optimizer  # accelerate's AcceleratedOptimizer, itself a torch Optimizer, around AdamW
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    net = trainer.model
    factory = optimizer_for(trainer.args, wrapped, net, "cpu")
    rebuilt = factory([torch.zeros_like(p) for p in net.parameters() if p.requires_grad])
    assert type(rebuilt) is torch.optim.AdamW and rebuilt.defaults["fused"] is True  # adamw_torch_fused
    assert [len(g["params"]) for g in rebuilt.param_groups] == [len(g["params"]) for g in wrapped.param_groups]
    assert optimizer_for(arguments(tmp_path, optim="adamw_bnb_8bit"), wrapped, net, "cuda") == "adamw-8bit"
    assert optimizer_for(arguments(tmp_path, optim="adafactor"), None, net, "cpu") == "adafactor"
    momentum = arguments(tmp_path, optim="sgd", optim_args="momentum=0.9")
    assert optimizer_for(momentum, None, net, "cpu") == "sgd-momentum"
    with pytest.raises(ConfigError, match="'lion_32bit'"):
        optimizer_for(arguments(tmp_path, optim="lion_32bit"), None, net, "cpu")


def test_a_hook_that_keeps_tensors_sees_only_the_real_forwards(tmp_path: Path) -> None:
    """A forward hook appending to a list it closes over (issue 15): the trace's forward runs in
    another process, so the list holds the real outputs of the real steps only."""

    def keeping(kept: list[torch.Tensor]) -> Callable[[torch.nn.Module], None]:
        def prepare(net: torch.nn.Module) -> None:
            net.transformer.h[0].register_forward_hook(
                lambda m, i, out: kept.append((out[0] if isinstance(out, tuple) else out).detach()))
        return prepare

    plain_kept: list[torch.Tensor] = []
    guarded_kept: list[torch.Tensor] = []
    plain = train(tmp_path / "plain", None, prepare=keeping(plain_kept))
    guard = MemGuardCallback("warn", budget=GENEROUS)
    guarded = train(tmp_path / "guarded", guard, prepare=keeping(guarded_kept))
    assert guarded.error is None and guard.estimate is not None, guarded.warned
    assert len(plain_kept) == STEPS
    assert len(guarded_kept) == len(plain_kept), f"the hook kept {len(guarded_kept)} outputs, not {len(plain_kept)}"
    assert not any(isinstance(t, FakeTensor) for t in guarded_kept)
    assert all(torch.equal(a, b) for a, b in zip(guarded_kept, plain_kept, strict=True))
    assert same_weights(plain.trainer.model.state_dict(), guarded.trainer.model.state_dict())
