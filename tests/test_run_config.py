"""``--config FILE`` (memguard.run_config): LightningCLI YAML, TrainingArguments and DeepSpeed files.

The files are real ones in tests/data/config; the LightningCLI YAML names the LightningModule and
DataModule of tests/config_helpers.py by class_path, as a project's own config names its classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from config_helpers import TinyLM

import memguard
from memguard import ConfigError
from memguard.cli import main
from memguard.estimation.cuda_rules import nccl_buffer_bytes
from memguard.estimation.from_run import optimizer_factory
from memguard.run_config import config_kind, read_run_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*optim adamw_torch_fused:UserWarning")]
DATA = Path("tests/data/config")  # as a user writes it, from the project root
TINY = str(DATA / "tiny-gpt2")
FILE_ESTIMATE = ("method", "peak_bytes", "total_bytes", "breakdown", "host_bytes", "reserved_bytes", "inputs")


@pytest.fixture(autouse=True)
def _from_the_project_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``memguard ARGV`` in a new process started as the console script is: from a script elsewhere."""
    script = tmp_path / "memguard_entry.py"
    script.write_text("import sys\nfrom memguard.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}, captured.err


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert {k: a[k] for k in FILE_ESTIMATE} == {k: b[k] for k in FILE_ESTIMATE}


# -- reading the files ----------------------------------------------------------------------------


def test_deepspeed_files() -> None:
    assert read_run_config(DATA / "deepspeed.json") == {  # "auto" is left to the Trainer
        "strategy": "deepspeed_stage_2", "offload_optimizer": True, "offload_params": False}
    with pytest.warns(UserWarning, match=r"deepspeed_zero3.json: memguard does not read the DeepSpeed keys "
                                         r"my_custom_key; the estimate is made without them"):
        found = read_run_config(DATA / "deepspeed_zero3.json")
    assert found == {"strategy": "deepspeed_stage_3", "offload_optimizer": True, "offload_params": True,
                     "batch_size": 2, "accumulate_grad_batches": 4, "world_size": 4, "precision": "16-mixed"}


def test_training_arguments_json_and_yaml_with_their_deepspeed_file(tmp_path: Path) -> None:
    expected = {"batch_size": 4, "accumulate_grad_batches": 8, "optimizer": "adamw-8bit", "precision": "bf16-mixed",
                "gradient_checkpointing": True, "model": TINY, "strategy": "deepspeed_stage_2",
                "offload_optimizer": True, "offload_params": False, "keep_output": False}
    assert read_run_config(DATA / "training_args.json") == expected
    import yaml

    data = json.loads((DATA / "training_args.json").read_text())
    data["deepspeed"] = str(DATA / "deepspeed.json")
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(data))
    assert read_run_config(tmp_path / "args.yaml") == expected


def test_training_arguments_defaults_are_the_trainers(tmp_path: Path) -> None:
    """Absent fields are TrainingArguments' defaults: batch 8, fused AdamW, fp32, no accumulation."""
    (tmp_path / "args.json").write_text('{"output_dir": "out", "fsdp": "full_shard offload"}')
    found = read_run_config(tmp_path / "args.json")
    assert found["batch_size"] == 8 and found["accumulate_grad_batches"] == 1 and found["precision"] == "32-true"
    assert found["optimizer"] in ("adamw-fused", "adamw")  # foreach AdamW where memguard has no fused one
    assert (found["strategy"], found["offload_optimizer"], found["offload_params"]) == ("fsdp", True, True)


@pytest.mark.parametrize(("text", "named"), [
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}', "zero_optimization.reduce_bucket_size 5"),
    ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}', "offload to nvme"),
    ('{"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "train_batch_size": 16}',
     "train_batch_size 16 is not"),
    ('{"output_dir": "o", "optim": "lion_8bit"}', "optim 'lion_8bit' is not one memguard models"),
    ('{"output_dir": "o", "use_liger_kernel": true}', "use_liger_kernel: true changes memory"),
    ('{"output_dir": "o", "bf16": true, "fp16": true}', "bf16 and fp16 are both true"),
    ('{"output_dir": "o", "model_name_or_path": "meta-llama/Llama-2-7b-hf"}', "neither a memguard preset"),
    ('{"learning_rate": 0.1}', "not a LightningCLI YAML"),
])
def test_what_memguard_cannot_model_is_an_error_naming_it(tmp_path: Path, text: str, named: str) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        read_run_config(tmp_path / "run.json")


def test_unknown_training_arguments_are_named(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"output_dir": "o", "per_device_train_batch_sise": 4, "lora_r": 8}')
    with pytest.warns(UserWarning, match="memguard does not read the TrainingArguments keys lora_r, "
                                         "per_device_train_batch_sise"):
        assert read_run_config(tmp_path / "run.json")["batch_size"] == 8


def test_lightning_yaml_builds_the_module_and_peeks_without_consuming() -> None:
    assert config_kind({"model": {"class_path": "a.B"}}) == "lightning"
    found = read_run_config(DATA / "lightning.yaml")
    helpers = sys.modules["tests.config_helpers"]  # imported by its class_path, from the current folder
    data = helpers.TinyData.built[-1]
    assert (data.drawn, data.tokens) == (0, None)  # setup and train_dataloader ran in the forked child only
    module = found.pop("model")
    assert isinstance(module, helpers.TinyLM) and module.hparams.n_layer == 2
    (batch,) = found.pop("example_input")
    assert (batch.shape, batch.dtype, batch.device.type) == (torch.Size([6, 64]), torch.int64, "meta")
    step, optimizer = found.pop("step_fn"), found.pop("optimizer")
    assert optimizer.optimizer_class is torch.optim.SGD
    assert found == {"precision": "bf16-mixed", "accumulate_grad_batches": 4, "device": "cuda", "world_size": 2,
                     "strategy": "ddp", "batch_size": 6, "training_loop": "lightning"}
    assert callable(step)


# -- the command line: the file's estimate is the flags' ------------------------------------------


def test_check_training_arguments_in_a_new_process_equals_the_flags(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    done = cli(tmp_path, "check", "--config", str(DATA / "training_args.json"), "--gpu", "24GiB", "--json")
    assert done.returncode == 0, done.stderr
    from_file = json.loads(done.stdout)
    code, from_flags, _ = run_main(capsys, "check", TINY, "--batch-size", "4", "--accumulate-grad-batches", "8",
                                   "--precision", "bf16-mixed", "--gradient-checkpointing", "--optimizer",
                                   "adamw-8bit", "--strategy", "deepspeed_stage_2", "--offload-optimizer",
                                   "--no-keep-output", "--gpu", "24GiB", "--json")
    assert code == 0
    same(from_file, from_flags)
    assert from_file["fits"] is True and from_file["inputs"]["batch_size"] == 4


def test_lightning_yaml_in_a_new_process_equals_the_library_call(tmp_path: Path) -> None:
    """The class_path imports from the current folder, as LightningCLI's does; the trace is training_step's."""
    done = cli(tmp_path, "estimate", "--config", str(DATA / "lightning.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    from_file = json.loads(done.stdout)
    module = TinyLM(n_layer=2, lr=0.001)
    expected = memguard.estimate(
        module, 6, example_input=(torch.empty(6, 64, dtype=torch.int64, device="meta"),),
        step_fn=lambda b: module.training_step(b, 0), training_loop="lightning", precision="bf16-mixed",
        strategy="ddp", world_size=2, accumulate_grad_batches=4,
        optimizer=optimizer_factory(module, torch.optim.SGD(module.parameters(), lr=0.001, momentum=0.9), "cuda"),
    ).to_dict()
    assert from_file["total_bytes"] == expected["total_bytes"] and from_file["peak_bytes"] == expected["peak_bytes"]
    assert from_file["breakdown"] == expected["breakdown"]
    assert from_file["inputs"]["model"] == "TinyLM"


def test_flags_win_over_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, got, _ = run_main(capsys, "estimate", "--config", str(DATA / "training_args.json"), "--batch-size", "2",
                            "--precision=32-true", "--no-gradient-checkpointing", "--json")
    assert code == 0
    code, flags, _ = run_main(capsys, "estimate", TINY, "--batch-size", "2", "--accumulate-grad-batches", "8",
                              "--precision", "32-true", "--no-gradient-checkpointing", "--optimizer", "adamw-8bit",
                              "--strategy", "deepspeed_stage_2", "--offload-optimizer", "--no-keep-output", "--json")
    same(got, flags)


def test_deepspeed_file_with_model_and_its_warning(capsys: pytest.CaptureFixture[str]) -> None:
    code, got, err = run_main(capsys, "estimate", TINY, "--config", str(DATA / "deepspeed_zero3.json"), "--json")
    assert code == 0
    assert "memguard: warning: tests/data/config/deepspeed_zero3.json: memguard does not read the DeepSpeed keys " \
           "my_custom_key; the estimate is made without them" in err
    code, flags, _ = run_main(capsys, "estimate", TINY, "--batch-size", "2", "--accumulate-grad-batches", "4",
                              "--world-size", "4", "--precision", "16-mixed", "--strategy", "deepspeed_stage_3",
                              "--offload-optimizer", "--offload-params", "--json")
    same(got, flags)


def test_a_file_without_a_model_needs_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--config", str(DATA / "deepspeed.json")]) == 2
    assert capsys.readouterr().err == ("memguard: error: the following arguments are required: MODEL (a preset, a "
                                       "config.json, package.module:factory), or --config FILE naming one (see "
                                       "'memguard estimate --help')\n")
    assert main(["estimate", "gpt2", "--config", "nope.yaml"]) == 2
    assert capsys.readouterr().err.startswith("memguard: error: --config nope.yaml: cannot read it")


def test_lightning_yaml_optimizer_section_strategy_object_and_unknown_trainer_keys(tmp_path: Path) -> None:
    (tmp_path / "fit.yaml").write_text("""
trainer:
  precision: 16
  devices: auto
  max_epoch: 3
  strategy:
    class_path: lightning.pytorch.strategies.DeepSpeedStrategy
    init_args: {stage: 3, offload_optimizer: true, offload_parameters: true}
model:
  class_path: tests.config_helpers.TinyLM
data:
  class_path: tests.config_helpers.TinyData
  init_args: {batch_size: 3}
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 0.1}
""")
    with pytest.warns(UserWarning) as caught:
        found = read_run_config(tmp_path / "fit.yaml")
    messages = [str(w.message) for w in caught]
    assert f"{tmp_path / 'fit.yaml'}: memguard does not read the trainer keys max_epoch; the estimate is made " \
           "without them" in messages
    assert f"{tmp_path / 'fit.yaml'}: trainer.devices 'auto' depends on the machine; the world size is " \
           "--world-size (default 1)" in messages
    optimizer = found["optimizer"]
    assert optimizer.memguard_name == "adamw"
    built = optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert type(built) is torch.optim.AdamW and built.defaults["lr"] == 0.1
    assert {k: found[k] for k in ("precision", "strategy", "offload_optimizer", "offload_params", "batch_size")} == {
        "precision": "16-mixed", "strategy": "deepspeed_stage_3", "offload_optimizer": True, "offload_params": True,
        "batch_size": 3}
    assert "world_size" not in found


def test_max_batch_from_a_deepspeed_file_equals_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # 640 MiB: the 32 MiB cuBLAS band on top of 536 MiB at batch 1 leaves nothing at 600 MiB; four ranks
    # add NCCL's 588 MiB to the band, so the budget gives it as usable memory (588 MiB / 0.9 more)
    gpu = f"{640 * 2**20 + -(-nccl_buffer_bytes() * 10 // 9)}B"
    code, got, _ = run_main(capsys, "max-batch", TINY, "--config", str(DATA / "deepspeed_zero3.json"),
                            "--gpu", gpu, "--json", "--quiet")
    code_flags, flags, _ = run_main(capsys, "max-batch", TINY, "--accumulate-grad-batches", "4", "--world-size", "4",
                                    "--precision", "16-mixed", "--strategy", "deepspeed_stage_3",
                                    "--offload-optimizer", "--offload-params", "--gpu", gpu, "--json")
    assert code == code_flags == 0
    assert got["max_batch_size"] == flags["max_batch_size"] == 2
    assert got["trials"] == flags["trials"]
