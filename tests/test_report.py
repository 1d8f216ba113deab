"""``memguard report``: what real Lightning (CSV, TensorBoard) and transformers runs logged, read back."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from config_helpers import TinyData, TinyLM
from lightning.pytorch import Trainer as PLTrainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from memguard import MemGuard
from memguard.cli import main
from memguard.integrations.transformers import MemGuardCallback
from memguard.report import error_summary, read_logs
from memguard.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pinned_cpu")]


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randint(0, 1000, (16, 32), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


@dataclasses.dataclass
class Logs:
    root: Path
    lightning: dict[str, float]
    transformers: dict[str, float]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Logs:
    """A 3-step Lightning run with a CSV and a TensorBoard logger, and a 3-step transformers Trainer run."""
    root = tmp_path_factory.mktemp("logs")
    # reset_peak: the process's high-water mark is reset, so the actual is not an upper bound whatever ran before
    guard = MemGuard(action="warn", budget="64GiB", reset_peak=True)
    trainer = PLTrainer(accelerator="cpu", devices=1, max_steps=3, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                        callbacks=[guard], logger=[CSVLogger(root / "pl"), TensorBoardLogger(root / "pl")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyLM(), datamodule=TinyData(batch_size=4))
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=32,
                                     bos_token_id=0, eos_token_id=0))
    callback = MemGuardCallback("warn", budget="64GiB", reset_peak=True)
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=4, max_steps=3,
                             logging_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=net, args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    assert guard.metrics and callback.metrics, (guard.metrics, callback.metrics)
    return Logs(root, guard.metrics, callback.metrics)


def test_reads_every_log_a_callback_wrote(logs: Logs) -> None:
    records, notes = read_logs(logs.root)
    tensorboard = logs.root / "pl" / "lightning_logs" / "version_1"  # the run's second logger
    csv_path = logs.root / "pl" / "lightning_logs" / "version_0" / "metrics.csv"
    assert notes == [f"{tensorboard}: the measurement of {csv_path} (step 3), also logged to TensorBoard; "
                     "counted once"]
    by_file = {Path(r.source).name: r for r in records}
    assert set(by_file) == {"metrics.csv", "trainer_state.json"}, [r.source for r in records]
    csv_, hf = by_file["metrics.csv"], by_file["trainer_state.json"]
    pl, tf = logs.lightning, logs.transformers
    assert csv_.step == 3
    assert csv_.predicted_peak_bytes == pl["memguard/predicted_peak_bytes"]
    assert csv_.actual_peak_bytes == pl["memguard/actual_peak_bytes"]
    assert csv_.predicted_total_bytes == pl["memguard/predicted_total_bytes"]
    assert csv_.error == pytest.approx(pl["memguard/error"], rel=1e-12)
    assert csv_.lower_bound == bool(pl["memguard/actual_is_lower_bound"])
    assert csv_.upper_bound == bool(pl["memguard/actual_is_upper_bound"])
    assert hf.predicted_peak_bytes == tf["memguard/predicted_peak_bytes"]
    assert hf.actual_peak_bytes == tf["memguard/actual_peak_bytes"]
    assert hf.error == pytest.approx(tf["memguard/error"], rel=1e-12)
    assert Path(hf.source).parent.name == "checkpoint-3"
    (tb,), notes = read_logs(tensorboard)  # alone, the event file is read
    assert notes == [] and tb.source == str(tensorboard) and tb.step == 3 and tb.bound == csv_.bound
    # TensorBoard keeps float32: 24 significant bits
    assert tb.predicted_peak_bytes == pytest.approx(pl["memguard/predicted_peak_bytes"], rel=2**-23)
    assert tb.actual_peak_bytes == pytest.approx(pl["memguard/actual_peak_bytes"], rel=2**-23)


def test_the_error_distribution(logs: Logs) -> None:
    records, _ = read_logs(logs.root)
    assert [r.bound for r in records] != ["unknown"] * 2
    low, high = sorted(r.error for r in records)
    assert error_summary(records) == {"count": 2, "median": (low + high) / 2, "worst_low": low, "worst_high": high}


def test_the_command_prints_each_run_and_the_distribution(logs: Logs, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(logs.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    records, _ = read_logs(logs.root)
    summary = error_summary(records)
    pl = logs.lightning
    csv_line = next(line for line in lines if line.startswith("pl/lightning_logs/version_0/metrics.csv"))
    actual = "at least " if pl["memguard/actual_is_lower_bound"] else "at most " \
        if pl["memguard/actual_is_upper_bound"] else ""
    assert (f"predicted peak {format_bytes(int(pl['memguard/predicted_peak_bytes']))}, actual {actual}"
            f"{format_bytes(int(pl['memguard/actual_peak_bytes']))}, error {pl['memguard/error']:+.1%}") in csv_line
    assert any(line.startswith("hf/checkpoint-3/trainer_state.json step ") for line in lines)
    assert lines[-1].startswith("note: ") and lines[-1].endswith("also logged to TensorBoard; counted once")
    assert lines[-2] == (f"error (actual / predicted - 1) over 2 run(s): median {summary['median']:+.1%}, "
                         f"worst low {summary['worst_low']:+.1%}, worst high {summary['worst_high']:+.1%}")


def test_json(logs: Logs, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(logs.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["runs"]) == 2 and data["errors"]["count"] == 2 and len(data["notes"]) == 1
    run = next(r for r in data["runs"] if r["source"].endswith("trainer_state.json"))
    assert run["actual_peak_bytes"] == logs.transformers["memguard/actual_peak_bytes"]
    assert math.isclose(run["error"], logs.transformers["memguard/error"], rel_tol=1e-12)


def test_without_tensorboard_event_files_are_skipped_with_a_note(logs: Logs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    records, notes = read_logs(logs.root)
    assert len(records) == 2
    assert notes == ["1 TensorBoard folder(s) skipped: tensorboard is not installed (pip install tensorboard)"]


def test_nothing_logged_is_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,loss\n0,0,1.5\n")
    done = subprocess.run([sys.executable, "-m", "memguard", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"memguard: error: report {tmp_path}: nothing memguard logged here (no memguard/* values "
                           "in a metrics.csv, TensorBoard event file or trainer_state.json)\n")


