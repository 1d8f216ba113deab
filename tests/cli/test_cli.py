"""The ``memguard`` command: exit codes, JSON schema, golden tables, one-line errors.

Most tests run ``main()`` in this process on a tiny GPT-2 (``test_cli:tiny_gpt2``, built on the
meta device) so a trace takes a fraction of a second. Golden files live in ``tests/golden``;
regenerate them with ``MEMGUARD_UPDATE_GOLDEN=1 pytest tests/cli/test_cli.py`` after a deliberate
change of the estimates or of the output format, and review the diff.
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

import memguard
from memguard import Category, DeviceMemory
from memguard.cli import EXIT_DOES_NOT_FIT, EXIT_OK, EXIT_USAGE, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fake_nvml import gpus_seen

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY = "test_cli:tiny_gpt2"
TINY_ARGS = [TINY, "--batch-size", "2", "--seq-len", "32", "--method", "trace"]
GIB = 2**30


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 on the meta device: the ``package.module:factory`` form of MODEL."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=128)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def not_a_module() -> str:
    return "I am not a module"


def run(capsys: pytest.CaptureFixture[str], *argv: str, readers: Any = None) -> tuple[int, str, str]:
    code = main(list(argv), readers=readers)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMGUARD_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path}; see the module docstring to regenerate"


def as_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, stderr (captured by capsys) says it is a terminal, where progress is shown.

    Called in the test's body: capsys puts its stream in place only when the test runs.
    """
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


@pytest.fixture
def no_gpu() -> Any:
    """Readers of a machine without a GPU, whatever machine the tests run on (``main(readers=...)``)."""
    return gpus_seen()


A100_40 = DeviceMemory(name="NVIDIA A100-SXM4-40GB", index=0, uuid="GPU-0", total_bytes=40 * GIB,
                       free_bytes=30 * GIB, used_bytes=10 * GIB, source="nvml")


@pytest.fixture
def one_gpu() -> Any:
    """Readers that see an A100 40GB at cuda:0 with 30 GiB free, as NVML would report it."""
    return gpus_seen(A100_40)


# -- golden output ----------------------------------------------------------------------------


@pytest.mark.slow
def test_estimate_table_golden(capsys, monkeypatch):
    as_terminal(monkeypatch)
    code, out, err = run(capsys, "estimate", "gpt2", "--batch-size", "2", "--seq-len", "64",
                         "--device", "cpu", "--method", "trace")
    assert code == EXIT_OK
    check_golden("estimate_gpt2_b2_s64_cpu.txt", out)
    assert err == "tracing gpt2: batch 2, seq 64 ...\n"


@pytest.mark.slow
def test_check_does_not_fit_golden(capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "256MiB")
    assert code == EXIT_DOES_NOT_FIT
    check_golden("check_tiny_256MiB.txt", out)


# -- check ------------------------------------------------------------------------------------


def test_check_fits_against_a_catalog_gpu(capsys):
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "A100-40GB", "--quiet")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert "GPU: A100-40GB, 40.00 GiB (catalog GPU, assumed empty: free = total)" in lines
    assert lines[-1].startswith("FITS: needs ")
    assert "of 36.00 GiB usable (40.00 GiB free less a 10% margin)" in lines[-1]


def test_check_json_schema(capsys):
    code, out, err = run(capsys, "check", *TINY_ARGS, "--gpu", "A100-40GB", "--json", "--margin", "20%")
    assert code == EXIT_OK
    assert err == ""  # no progress with --json
    data = json.loads(out)
    assert {"method", "peak_bytes", "total_bytes", "breakdown", "inputs", "notes",
            "device", "margin", "usable_bytes", "fits", "verdict"} <= set(data)
    assert set(data["breakdown"]) == {c.value for c in Category}
    assert sum(data["breakdown"].values()) == data["total_bytes"]
    assert data["peak_bytes"] == data["total_bytes"] - data["breakdown"]["overhead"]
    assert data["device"]["name"] == "A100-40GB" and data["device"]["source"] == "catalog"
    assert data["margin"] == pytest.approx(0.2)
    assert data["usable_bytes"] == int(40 * GIB * 0.8)
    assert (data["fits"], data["verdict"]) == (True, "fits")
    assert data["inputs"]["model"] == TINY and data["inputs"]["batch_size"] == 2


@pytest.mark.slow
def test_check_json_does_not_fit_exits_1(capsys):
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "256MiB", "--json")
    assert code == EXIT_DOES_NOT_FIT
    data = json.loads(out)
    assert (data["fits"], data["verdict"]) == (False, "does not fit")
    assert data["device"]["source"] == "budget"
    assert data["total_bytes"] > data["usable_bytes"]


@pytest.mark.slow
def test_check_verdict_agrees_with_memory_estimate_fits(capsys):
    est = memguard.estimate(TINY, 2, 32, method="trace")
    # The decision compares the upper end of the band. Exactly at the limit fits; one byte less does not.
    assert est.upper_bytes > est.total_bytes
    free = int(est.upper_bytes / 0.9) + 1
    assert est.fits(free) and not est.fits(est.upper_bytes) and not est.fits(int(est.total_bytes / 0.9) + 1)
    assert run(capsys, "check", *TINY_ARGS, "--gpu", f"{free}B", "-q")[0] == EXIT_OK
    # (a budget the upper end misses by well over 10%: near misses would be traced for remedies, slowly)
    assert run(capsys, "check", *TINY_ARGS, "--gpu", f"{est.total_bytes}B", "-q")[0] == EXIT_DOES_NOT_FIT
    assert run(capsys, "check", *TINY_ARGS, "--gpu", f"{est.upper_bytes}B", "--margin", "0", "-q")[0] == EXIT_OK


@pytest.mark.slow
def test_check_github_actions_annotation(capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "256MiB", "-q")
    assert code == EXIT_DOES_NOT_FIT
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    assert len(annotations) == 1
    assert annotations[0].startswith("::error title=memguard::test_cli:tiny_gpt2 (batch 2, seq 32, 32-true) "
                                     "does not fit budget of 256.00 MiB: needs ")
    assert "10%25 margin" in annotations[0]  # '%' escaped as workflow commands require
    # No annotation when it fits, nor inside JSON.
    assert "::error" not in run(capsys, "check", *TINY_ARGS, "--gpu", "A100-40GB", "-q")[1]
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "256MiB", "--json")
    assert code == EXIT_DOES_NOT_FIT and "::error" not in out
    json.loads(out)


@pytest.mark.slow
def test_check_against_this_machines_gpu(capsys, one_gpu):
    code, out, _ = run(capsys, "check", *TINY_ARGS, "-q", readers=one_gpu)  # --gpu auto
    assert code == EXIT_OK
    assert "GPU: cuda:0 NVIDIA A100-SXM4-40GB, 30.00 GiB free of 40.00 GiB (nvml)" in out.splitlines()
    code, out, _ = run(capsys, "check", *TINY_ARGS, "--gpu", "0", "--json", readers=one_gpu)
    assert json.loads(out)["device"]["free_bytes"] == A100_40.free_bytes


# -- estimate ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_estimate_json_is_the_api_result(capsys):
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--precision", "bf16-mixed", "--json")
    assert code == EXIT_OK
    expected = memguard.estimate(TINY, 2, 32, method="trace", precision="bf16-mixed").to_dict()
    assert json.loads(out) == expected


@pytest.mark.slow
def test_gradient_checkpointing_flags(capsys):
    for flag, value in (("--gradient-checkpointing", True), ("--no-gradient-checkpointing", False)):
        code, out, _ = run(capsys, "estimate", *TINY_ARGS, flag, "--json")
        assert code == EXIT_OK
        assert json.loads(out)["inputs"]["gradient_checkpointing"] is value


@pytest.mark.slow
def test_strategies_give_the_per_device_estimate(capsys):
    _, single, _ = run(capsys, "estimate", *TINY_ARGS, "--json")
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--strategy", "ddp", "--world-size", "4", "--json")
    assert code == EXIT_OK
    ddp, single = json.loads(out), json.loads(single)
    assert (ddp["inputs"]["strategy"], ddp["inputs"]["world_size"]) == ("ddp", 4)
    assert ddp["peak_bytes"] > single["peak_bytes"]  # DDP's gradient buckets: one more copy of the gradients
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--strategy", "deepspeed_stage_3", "--world-size", "4",
                       "--offload-optimizer", "--json")
    assert code == EXIT_OK
    zero3 = json.loads(out)
    assert zero3["breakdown"]["optimizer_state"] == 0
    assert zero3["host_bytes"] > 0
    _, table, _ = run(capsys, "estimate", *TINY_ARGS, "--strategy", "ddp", "--world-size", "4")
    assert "strategy=ddp, world_size=4" in table


def test_progress_on_stderr_unless_quiet(capsys, monkeypatch):
    as_terminal(monkeypatch)
    code, out, err = run(capsys, "estimate", *TINY_ARGS)
    assert code == EXIT_OK
    assert err == f"tracing {TINY}: batch 2, seq 32 ...\n"
    assert out.startswith("memguard estimate (trace)\n")
    code, out, err = run(capsys, "estimate", *TINY_ARGS, "--quiet")
    assert (code, err) == (EXIT_OK, "")


def test_no_progress_when_stderr_is_not_a_terminal(capsys):
    assert not sys.stderr.isatty()  # captured: a file, as in CI logs and pipes
    code, out, err = run(capsys, "estimate", *TINY_ARGS)
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith("memguard estimate (trace)\n")


def test_model_from_a_config_json_and_a_model_directory(capsys, tmp_path):
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128,
              "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for model in (str(tmp_path / "config.json"), str(tmp_path)):
        code, out, _ = run(capsys, "estimate", model, "--seq-len", "16", "--method", "trace", "--json")
        assert code == EXIT_OK
        assert json.loads(out)["inputs"]["seq_len"] == 16


# -- max-batch --------------------------------------------------------------------------------


@pytest.mark.slow
def test_max_batch_is_the_largest_that_fits(capsys):
    at8 = memguard.estimate(TINY, 8, 32, method="trace", device="cpu")
    free = int(at8.upper_bytes / 0.9) + 1  # batch 8 fits; memory grows with the batch
    code, out, err = run(capsys, "max-batch", TINY, "--seq-len", "32", "--method", "trace", "--device", "cpu",
                         "--gpu", f"{free}B", "--json")
    assert code == EXIT_OK and err == ""
    data = json.loads(out)
    n = data["max_batch_size"]
    assert n >= 8 and data["capped"] is False
    assert data["usable_bytes"] == int(free * 0.9)
    assert data["estimate"]["inputs"]["batch_size"] == n
    trials = {t["batch_size"]: t["needed_bytes"] for t in data["trials"]}
    assert trials[n] == data["estimate"]["upper_bytes"] <= data["usable_bytes"] < trials[n + 1]
    assert next(iter(trials)) == 1


@pytest.mark.slow
def test_max_batch_human_output_and_progress(capsys, monkeypatch):
    as_terminal(monkeypatch)
    code, out, err = run(capsys, "max-batch", TINY, "--seq-len", "32", "--method", "trace", "--gpu", "A100-40GB",
                         "--limit", "4")
    assert code == EXIT_OK
    assert out.splitlines()[-1].startswith("max batch size: 4 (needs ")
    assert "the search stopped at --limit 4" in out
    assert err.splitlines()[0].startswith(f"searching the largest batch of {TINY} that fits A100-40GB")
    assert "  batch 1: " in err and "fits" in err


@pytest.mark.slow
def test_max_batch_nothing_fits_exits_1(capsys):
    code, out, _ = run(capsys, "max-batch", *TINY_ARGS[:1], "--seq-len", "32", "--method", "trace",
                       "--gpu", "1MiB", "--json")
    assert code == EXIT_DOES_NOT_FIT
    assert json.loads(out)["max_batch_size"] == 0
    code, out, _ = run(capsys, "max-batch", TINY, "--seq-len", "32", "--method", "trace", "--gpu", "1MiB", "-q")
    assert code == EXIT_DOES_NOT_FIT
    assert "NOTHING FITS: batch size 1 needs" in out


# -- gpus -------------------------------------------------------------------------------------


def test_gpus_lists_devices_and_the_catalog(capsys, one_gpu):
    code, out, _ = run(capsys, "gpus", "--catalog", readers=one_gpu)
    assert code == EXIT_OK
    assert out.splitlines()[0] == "cuda:0: NVIDIA A100-SXM4-40GB, 30.00 GiB free of 40.00 GiB (nvml)"
    assert "  A100-80GB" in out
    data = json.loads(run(capsys, "gpus", "--json", "--catalog", readers=one_gpu)[1])
    assert data["devices"][0]["free_bytes"] == 30 * GIB
    assert {"name": "T4", "vendor": "NVIDIA", "total_bytes": memguard.lookup_gpu("T4").total_bytes} in data["catalog"]


# -- bad input: one line on stderr, exit 2 ------------------------------------------------------

BAD = {
    "no command": ([], "required: COMMAND"),
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "no model": (["check"], "required: MODEL"),
    "unknown flag": (["estimate", "gpt2", "--bogus"], "unrecognized arguments: --bogus"),
    "unknown model": (["estimate", "nope"], "unknown model 'nope'"),
    "missing config": (["estimate", "/no/such/config.json"], "unknown model '/no/such/config.json'"),
    "factory module": (["estimate", "no_such_module_xyz:factory"], "cannot import 'no_such_module_xyz'"),
    "factory result": (["estimate", "test_cli:not_a_module"], "not a torch.nn.Module"),
    "batch size": (["estimate", "gpt2", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    "batch word": (["estimate", "gpt2", "--batch-size", "eight"], "expected a positive integer, got 'eight'"),
    "seq len": (["estimate", "gpt2", "--seq-len", "-3"], "argument --seq-len"),
    "seq too long": (["estimate", "gpt2", "--seq-len", "5000"], "--seq-len 5000 is longer"),
    "precision": (["estimate", "gpt2", "--precision", "fp7"], "unknown precision 'fp7'"),
    "optimizer": (["estimate", "gpt2", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    "method": (["estimate", "gpt2", "--method", "magic"], "invalid choice: 'magic'"),
    "device": (["estimate", "gpt2", "--device", "tpu"], "unknown device 'tpu'"),
    "strategy": (["estimate", "gpt2", "--strategy", "horovod"], "unknown strategy 'horovod'"),
    "offload": (["check", "gpt2", "--strategy", "ddp", "--offload-optimizer", "--gpu", "T4"],
                "--offload-optimizer needs a sharded strategy"),
    "world size": (["check", "gpt2", "--world-size", "2", "--gpu", "T4"], "strategy 'single' runs on one device"),
    "lora": (["estimate", "gpt2", "--lora-rank", "0"], "argument --lora-rank"),
    "gpu name": (["check", "gpt2", "--gpu", "H900"], "unknown GPU 'H900'"),
    "ambiguous gpu": (["check", "gpt2", "--gpu", "A100"], "'A100' is ambiguous"),
    "gpu size": (["check", "gpt2", "--gpu", "12QiB"], "cannot read '12QiB' as a memory size"),
    "gpu number": (["check", "gpt2", "--gpu", "1.5e9"], "'1.5e9' is a number without a unit"),
    "no gpu": (["check", "gpt2", "--gpu", "auto"], "--gpu auto: no CUDA device can be read"),
    "no gpu index": (["max-batch", "gpt2", "--gpu", "1"], "--gpu 1: no CUDA device can be read on this machine ('1' "
                                                          "is read as the CUDA index cuda:1, since bare digits"),
    "margin": (["check", "gpt2", "--gpu", "T4", "--margin", "2"], "argument --margin"),
    "margin word": (["check", "gpt2", "--gpu", "T4", "--margin", "lots"], "expected a share"),
    "plot folder": (["plot", "gpt2", "--gpu", "T4", "-o", "/no/such/dir/p.png"], "does not exist"),
    "plot format": (["plot", "gpt2", "--gpu", "T4", "-o", "p.txt"], "give a file ending in .png"),
    "plot output": (["plot", "gpt2", "--gpu", "T4"], "required: -o/--output"),
}


@pytest.mark.parametrize("argv, expected", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2(capsys, no_gpu, argv, expected):
    quiet = ["--quiet"] if argv and argv[0] in ("estimate", "check", "max-batch", "plot", "gpus") else []
    code, out, err = run(capsys, *argv, *quiet, readers=no_gpu)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("memguard: error: ")
    assert expected in err
    assert "Traceback" not in err


def test_plot_without_matplotlib_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "plot", TINY, "--gpu", "T4", "-o", str(tmp_path / "p.png"))
    assert (code, out) == (EXIT_USAGE, "")
    assert err == ("memguard: error: memguard plot needs the 'matplotlib' package, which is not installed; "
                   "install it with: pip install 'memguard-train[plot]'\n")


def test_help_and_version_exit_0(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "max-batch" in capsys.readouterr().out
    assert main(["check", "--help"]) == EXIT_OK
    assert "--gpu" in capsys.readouterr().out
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"memguard {memguard.__version__}\n"


@pytest.mark.slow
def test_python_m_memguard_is_the_same_command():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "memguard", "estimate", "nope"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == EXIT_USAGE
    assert done.stdout == ""
    # stderr is a pipe: no progress line, only the error on one line; no traceback, no library chatter.
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("memguard: error: unknown model 'nope': not a preset")


def a_linear_layer() -> torch.nn.Module:
    """A module memguard cannot build inputs for: it needs example_input=, which only Python takes."""
    return torch.nn.Linear(4, 4)


@pytest.mark.parametrize(("argv", "expected"), [
    (["check", "gpt2", "--precision", "bf16-mixed", "--gpu", "T4", "--seq-len", "64"],
     "--precision bf16-mixed on --gpu T4: T4 has no bfloat16 support (compute capability 7.5; bf16 needs 8.0, "
     "Ampere or newer): torch only emulates it there, slowly, and without the fused attention kernels this "
     "estimate assumes. Use --precision 16-mixed (fp16 with a gradient scaler) or 32-true on a T4"),
    (["max-batch", "gpt2", "--precision", "bf16-true", "--gpu", "Tesla V100-SXM2-16GB", "--seq-len", "64"],
     "--precision bf16-true on --gpu Tesla V100-SXM2-16GB: V100-16GB has no bfloat16 support (compute "
     "capability 7.0;"),
    (["check", "gpt-2", "--gpu", "T4"], "unknown model 'gpt-2': not a preset, not an existing config.json or model "
                                        "directory, nor a 'package.module:factory'. Did you mean 'gpt2'? Presets:"),
    (["check", "mistral", "--gpu", "T4"], "nor a 'package.module:factory'. Did you mean 'mistral-7b'? Presets:"),
    (["check", "llama-7b", "--gpu", "T4"],
     "Did you mean 'llama-2-7b', 'llama-3-8b' or 'llama-2-13b'? Presets:"),
    (["check", "gpt2", "--gpu", "a100-40"], "unknown GPU 'a100-40'. Did you mean 'A100-40GB'? Expected auto,"),
    (["check", "gpt2", "--gpu", "rtx6000"], "unknown GPU 'rtx6000'. Did you mean 'RTX-A6000'? Expected auto,"),
    (["check", "gpt2", "--gpu", "4090"], "such as '4090MiB' (for the catalog GPU write 'RTX-4090'); "),
    (["estimate", "t5-small", "--method", "formula"],
     "memguard: error: --seq-len is needed for t5-small (it has no fixed maximum length)"),
    (["estimate", "t5-small", "--lora-rank", "4"],
     "memguard: error: --seq-len is needed for t5-small with LoRA rank 4 (it has no fixed maximum length)"),
    (["estimate", "test_cli:a_linear_layer"],
     "memguard: error: memguard cannot build inputs for Linear: this needs example_input=, which only Python "
     "takes: memguard.estimate(model, example_input=...) (one batch as forward takes it"),
])
def test_errors_speak_the_commands_words(capsys, no_gpu, argv, expected):
    code, out, err = run(capsys, *argv, readers=no_gpu)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.count("\n") == 1 and err.startswith("memguard: error: ")
    assert expected in err
    assert "seq_len" not in err and "+lora" not in err


def test_a_size_in_decimal_units_says_how_it_is_read(capsys):
    code, out, _ = run(capsys, "check", TINY, "--seq-len", "32", "--method", "formula", "--gpu", "24GB")
    assert code == EXIT_OK
    lines = out.splitlines()
    at = lines.index("GPU: budget of 22.35 GiB (free = total)")
    assert lines[at + 1] == ("  24GB is read as 24,000,000,000 bytes (SI: 1 GB = 10^9 bytes), 22.35 GiB; write 24GiB "
                             "for 24 x 2^30 bytes (binary, as nvidia-smi counts);")
    assert lines[at + 2] == ("  a card sold as 24 GB has 22.49-24.00 GiB as nvidia-smi counts (A10, A10G, L4, "
                             "RTX-3090, RTX-4090): name the card instead")  # each "24 GB" card above 22.35 GiB
    assert lines[at + 3].startswith("FITS: ")
    code, out, _ = run(capsys, "check", TINY, "--seq-len", "32", "--method", "formula", "--gpu", "24GiB")
    assert code == EXIT_OK and "GPU: budget of 24.00 GiB (free = total)\nFITS" in out and "SI" not in out


FACTORY_HERE = """
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build():
    warnings.warn("this model uses a layer that will change", UserWarning, stacklevel=2)
    warnings.warn("an old argument", FutureWarning, stacklevel=2)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)
"""


@pytest.mark.slow
def test_console_script_finds_a_factory_in_the_current_folder(tmp_path):
    """`memguard check my_model:build` where my_model.py is, from the installed console script, whose
    sys.path[0] is its bin folder; the factory's warnings are shown as its own, not memguard's."""
    script = Path(sys.executable).with_name("memguard")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (memguard is not installed in this environment)")
    (tmp_path / "my_model.py").write_text(FACTORY_HERE)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's memguard, not the current folder
    done = subprocess.run([str(script), "check", "my_model:build", "--seq-len", "16", "--method", "formula",
                           "--gpu", "T4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.splitlines()[-1].startswith("FITS: needs ")
    assert done.stderr == "memguard: warning from my_model: this model uses a layer that will change\n"


@pytest.mark.slow
def test_estimate_shows_the_largest_tensors_alive_at_the_peak(capsys):
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--top", "2")
    assert code == EXIT_OK
    assert "alive at the peak (largest 2 of" in out
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--top", "0")
    assert "alive at the peak" not in out
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--json")
    data = json.loads(out)
    assert data["at_peak"][0]["bytes"] == max(g["bytes"] for g in data["at_peak"])
    assert max(p[2] for p in data["timeline"]) == data["peak_bytes"]


def test_training_loop_flags_reach_the_estimate(capsys):
    code, out, _ = run(capsys, "estimate", *TINY_ARGS, "--accumulate-grad-batches", "4", "--no-set-to-none",
                       "--trace-timeout", "60", "--json")
    assert code == EXIT_OK
    inputs = json.loads(out)["inputs"]
    assert (inputs["accumulate_grad_batches"], inputs["set_to_none"]) == (4, False)
    code, _, err = run(capsys, "estimate", *TINY_ARGS, "--trace-timeout", "-1")
    assert code == EXIT_USAGE and "must be a positive number of seconds, got '-1'" in err


def test_the_parser_default_timeout_is_the_trace_default():
    from memguard.cli._parser import TRACE_TIMEOUT
    from memguard.estimation.trace import DEFAULT_TIMEOUT

    assert TRACE_TIMEOUT == DEFAULT_TIMEOUT


def test_the_parser_methods_and_counts_are_the_estimators():
    from memguard.cli import _parser
    from memguard.estimation import estimator, spec

    assert (_parser.METHODS, _parser.MAX_COUNT) == (estimator.METHODS, spec.MAX_COUNT)


_STARTUP = """
import contextlib, io, sys
from memguard.cli import main

def loaded(names):
    return sorted(n for n in names if n in sys.modules)

heavy = ("torch", "transformers", "numpy")
for argv in (["--version"], ["--help"], ["estimate", "--help"], ["estimate", "gpt2", "--batch-size", "0"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    print(" ".join(argv), loaded(heavy))
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["estimate", "gpt2", "--method", "formula", "--batch-size", "8", "--seq-len", "1024", "--json"])
print("formula", code, "peak_bytes" in out.getvalue(),
      loaded(("lightning", "pytorch_lightning", "peft", "matplotlib", "deepspeed", "bitsandbytes")))
"""


@pytest.mark.slow
def test_formula_and_help_import_only_what_they_need():
    """``--help``, ``--version`` and a usage error import no torch; a formula estimate of a preset none of
    Lightning, peft, matplotlib, DeepSpeed, bitsandbytes (issue 19: each import is seconds of a CLI call).
    In a fresh interpreter, as the console script runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(memguard.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "--version []",
        "--help []",
        "estimate --help []",
        "estimate gpt2 --batch-size 0 []",
        "formula 0 True []",
    ]


_FORMULA_RUNS = [
    ["estimate", "llama-2-7b", "--batch-size", "2", "--seq-len", "1024", "--precision", "bf16-mixed", "--method",
     "formula", "--json"],
    ["estimate", "whisper-tiny", "--optimizer", "adafactor", "--gradient-checkpointing", "--method", "formula",
     "--json"],
    ["check", "gpt2", "--batch-size", "2", "--seq-len", "512", "--gpu", "A100-80GB", "--method", "formula", "--json"],
    ["max-batch", "bert-base-uncased", "--seq-len", "128", "--gpu", "8GiB", "--method", "formula", "--json"],
]

_WITHOUT_TORCH = """
import contextlib, io, json, sys
from memguard.cli import main

runs = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(argv)
    runs.append([code, json.loads(out.getvalue())])
print(json.dumps({"runs": runs, "loaded": sorted(n for n in ("torch", "transformers", "numpy") if n in sys.modules)}))
"""


@pytest.mark.slow
def test_formula_on_a_preset_imports_no_torch_and_answers_as_the_module_does(capsys, tmp_path, monkeypatch):
    """``estimate``/``check``/``max-batch --method formula`` on a preset read its shipped description: neither
    torch nor transformers is imported (issue 19: under 2 s a call), and the JSON is the one the built
    module gives (the same command with no description shipped)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(memguard.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, json.dumps(_FORMULA_RUNS)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fast = json.loads(proc.stdout)
    assert fast["loaded"] == []
    from memguard.estimation.description import preset_description

    monkeypatch.setattr("memguard.estimation.description.DESCRIPTION_DIR", tmp_path)  # none shipped: the module
    preset_description.cache_clear()
    try:
        for argv, (code, data) in zip(_FORMULA_RUNS, fast["runs"], strict=True):
            built = run(capsys, *argv)
            assert (built[0], json.loads(built[1])) == (code, data), argv
    finally:
        preset_description.cache_clear()
    assert fast["runs"][2][1]["fits"] and fast["runs"][3][1]["max_batch_size"] > 1


@pytest.mark.slow
def test_check_lists_only_remedies_that_fit_with_their_flags(capsys):
    code, out, _ = run(capsys, "check", TINY, "--batch-size", "64", "--seq-len", "128", "--method", "formula",
                       "--gpu", "768MiB", "--json")
    assert code == EXIT_DOES_NOT_FIT
    rows = json.loads(out)["remedies"]
    # 768 MiB: the CUDA context (500 MiB) and the cuBLAS band (32 MiB) leave no room for a step at 640 MiB
    assert rows, "a tiny model can be made to fit 768 MiB"
    for row in rows[:2]:  # each row's flags make `check` pass
        code, out, _ = run(capsys, "check", TINY, "--gpu", "768MiB", "--method", "formula", *row["flags"], "--json")
        assert code == EXIT_OK, row
        assert json.loads(out)["total_bytes"] == row["total_bytes"]


@pytest.mark.slow
def test_plan_prints_rows_that_fit_and_their_json(capsys):
    code, out, _ = run(capsys, "plan", TINY, "--batch-size", "64", "--seq-len", "128", "--gpu", "768MiB",
                       "--confirm", "0", "--top", "3", "--json")
    assert code == EXIT_OK
    rows = json.loads(out)
    assert rows and all(r["total_bytes"] <= int(768 * 2**20 * 0.9) for r in rows)
    assert all(isinstance(r["flags"], list) for r in rows)
    code, out, _ = run(capsys, "plan", TINY, "--batch-size", "64", "--seq-len", "128", "--gpu", "768MiB",
                       "--confirm", "0", "--top", "3")
    assert "cost =" in out and "flags: --batch-size" in out


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``memguard ... | head``: stdout closed before the output is written is exit 141, no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    done = subprocess.run([sys.executable, "-m", "memguard", "estimate", "gpt2", "--seq-len", "32", "--method",
                           "formula", "--json"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
