"""Every bad input is one line and exit 2 at the command line, a ``MemguardError`` in the API, never a hang.

The command line is run two ways. Cases that need a process of their own (a memory limit, a file
that never ends, a real Ctrl-C) run ``python -m memguard`` in subprocesses, started together and
each checked by its own test; the others call ``memguard.cli.main`` in this process, with capsys.
API cases are plain ``pytest.raises`` checks.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memguard
from memguard import Category, ConfigError, MemguardError, MemoryEstimate, parse_bytes
from memguard.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from memguard.estimation.inputs import make_batch
from memguard.estimation.models import load_model
from memguard.estimation.parallel import resolve_parallelism
from memguard.estimation.spec import MAX_COUNT, TrainingSpec

GIB = 2**30
MEMORY_LIMIT = 4 * GIB
"""Address space of each ``python -m memguard`` (RLIMIT_AS): reading a weights file whole, or
/dev/zero until memory runs out, fails inside it instead of taking the machine's memory."""
WALL_LIMIT = 60.0
AT_ONCE = 3


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


FACTORIES = '''
import sys
import torch

def raises():
    raise RuntimeError("boom in the factory")

def needs_args(width):
    return torch.nn.Linear(width, width)

def not_a_module():
    return 42

def exits():
    sys.exit(3)

def interrupted():
    raise KeyboardInterrupt

from transformers import GPT2Config, GPT2LMHeadModel

class NoParameters(GPT2LMHeadModel):
    def parameters(self, recurse=True):
        if getattr(self, "built", False):
            raise RuntimeError("parameters are gone")
        return super().parameters(recurse)

def broken_module():
    with torch.device("meta"):
        model = NoParameters(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.built = True
    return model
'''


@pytest.fixture(scope="module")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of user modules, good and broken, put on ``sys.path``."""
    root = tmp_path_factory.mktemp("user_code")
    (root / "mg_factories.py").write_text(FACTORIES)
    (root / "mg_syntax.py").write_text("def f(:\n")
    (root / "mg_raising.py").write_text("raise RuntimeError('boom at import')\n")
    (root / "mg_exiting.py").write_text("import sys\nsys.exit('bye from the module body')\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in ("mg_factories", "mg_syntax", "mg_raising", "mg_exiting"):
        sys.modules.pop(name, None)


def write_config(folder: Path, name: str, **fields: object) -> str:
    path = folder / name
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                "vocab_size": 64, "n_positions": 32, **fields}))
    return str(path)


# -- the command line, in subprocesses ----------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _as_from_a_terminal() -> None:
    """The memory limit, and SIGINT handled as a terminal's command gets it: pytest started in the
    background of a non-interactive shell (``pytest &``) ignores SIGINT, and its children inherit that."""
    _limit_memory()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], *paths: Path) -> tuple[subprocess.Popen, float]:
    pythonpath = [*(str(p) for p in paths), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.Popen([sys.executable, "-m", "memguard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_from_a_terminal)
    return proc, time.monotonic()


SUBPROCESS_CASES = {
    # case: (arguments, what the one line says). A process that imports torch takes ~2 s of CPU (a bad
    # config file is refused before, test_a_bad_config_file_is_refused_before_torch_is_imported), so only
    # the cases that need a process of their own are here: a memory limit, a broken pynvml on the
    # path. Other binary files, broken modules and sys.exit run in this process below (a
    # SystemExit escaping main() would fail those tests as it would end the command).
    "1.6 GB weights file": (["estimate", "{inputs}/pytorch_model.bin"],
                            "1,600,000,000 bytes, too large for a config.json"),
    "/dev/zero": (["estimate", "/dev/zero"], "'/dev/zero' is not a regular file"),
    # torch.cuda imports pynvml too, so torch itself fails to import: named, in one line.
    "pynvml raising at import": (["gpus"], "RuntimeError: half-installed bindings, raised in {broken}/pynvml.py"),
    # Round two (issue 15). Building 2**31 blocks never ended (100,000 took minutes), even on meta.
    "n_layer 2**31-1": (["estimate", "{inputs}/deep.json", "--seq-len", "8"],
                        "n_layer=2,147,483,647 layers is more than memguard builds (at most 1,024"),
    # The planner listed every world size up to --gpus: a MemoryError traceback.
    "plan --gpus 2**31-1": (["plan", "{inputs}/tiny.json", "--seq-len", "8", "--gpu", "T4", "--confirm", "0",
                             "--method", "formula", "--gpus", str(MAX_COUNT)],
                            "gpus=2,147,483,647 GPUs is more than any cluster holds: memguard takes at most 1,048,576"),
    "plan --world-size 2**31-1": (["plan", "{inputs}/tiny.json", "--seq-len", "8", "--gpu", "T4", "--confirm", "0",
                                   "--method", "formula", "--strategy", "ddp", "--world-size", str(MAX_COUNT)],
                                  "--world-size 2,147,483,647 GPUs is more than any cluster holds"),
}
if Path("/proc/kmsg").exists():
    # A regular file of size 0 whose read waits for the kernel to log: it blocked forever. Where it may
    # not be opened (no CAP_SYSLOG) the open fails at once, also in one line naming it.
    SUBPROCESS_CASES["/proc/kmsg"] = (["estimate", "/proc/kmsg"], "'/proc/kmsg'")


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every subprocess case, :data:`AT_ONCE` at a time (each imports torch: more at once on a shared
    machine would time the CPU's queue, not the command)."""
    inputs = tmp_path_factory.mktemp("inputs")
    with open(inputs / "pytorch_model.bin", "wb") as f:
        f.truncate(1_600_000_000)  # sparse: no disk used, but 1.6 GB to read
    write_config(inputs, "deep.json", n_layer=MAX_COUNT)
    write_config(inputs, "tiny.json")
    broken = tmp_path_factory.mktemp("broken")
    (broken / "pynvml.py").write_text("raise RuntimeError('half-installed bindings')\n")

    def run(case: str) -> dict:
        args, says = SUBPROCESS_CASES[case]
        argv = [a.format(inputs=inputs) for a in args] + ["--json"]
        proc, t0 = _start(argv, *([broken] if "pynvml" in case else []))
        try:
            out, err = proc.communicate(timeout=WALL_LIMIT + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return {"rc": proc.returncode, "out": out, "err": err, "seconds": time.monotonic() - t0,
                "says": says.format(broken=broken)}

    with concurrent.futures.ThreadPoolExecutor(AT_ONCE) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_bad_input_in_a_subprocess_is_one_line_and_exit_2(subprocess_runs, case):
    run = subprocess_runs[case]
    lines = [line for line in run["err"].splitlines() if line.strip()]
    assert "Traceback" not in run["err"], run["err"]
    assert run["rc"] == EXIT_USAGE, run["err"]
    assert run["out"] == ""  # --json: nothing on stdout
    assert len(lines) == 1, run["err"]
    assert lines[0].startswith("memguard: error: ")
    assert run["says"] in lines[0]
    assert run["seconds"] < WALL_LIMIT


_NO_TORCH_PROBE = ("import sys, runpy; sys.argv = ['memguard', *sys.argv[1:]]\n"
                   "try:\n    runpy.run_module('memguard', run_name='__main__')\nexcept SystemExit as exc:\n"
                   "    imported = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
                   "    print(exc.code, imported, file=sys.stderr)")


@pytest.mark.slow
def test_a_bad_config_file_is_refused_before_torch_is_imported(tmp_path):
    """A device, a config too deep or without a model_type, a folder without a config.json: refused
    before the ~3 s of importing torch and transformers (``models.check_config_file``)."""
    no_type, deep = tmp_path / "no_type.json", write_config(tmp_path, "deep.json", n_layer=MAX_COUNT)
    no_type.write_text(json.dumps({"n_layer": 2}))
    (tmp_path / "empty").mkdir()
    for args in (["estimate", "/dev/zero"], ["check", str(no_type), "--gpu", "T4", "--seq-len", "8"],
                 ["max-batch", deep, "--gpu", "T4"], ["check", str(tmp_path / "empty"), "--gpu", "T4"]):
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, *args], capture_output=True, text=True,
                              timeout=WALL_LIMIT)
        assert proc.stderr.splitlines()[-1] == f"{EXIT_USAGE} []", (args, proc.stderr)
        assert proc.stderr.startswith("memguard: error: "), proc.stderr


def _wait_for_torch(proc: subprocess.Popen, timeout: float = WALL_LIMIT) -> None:
    """Until the process maps torch's library: it is then inside ``main``, importing torch."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{proc.pid}/maps")
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("the process never loaded torch")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/<pid>/maps")
def test_early_ctrl_c_exits_130_without_traceback():
    proc, t0 = _start(["estimate", "gpt2", "--seq-len", "64", "--json"])
    _wait_for_torch(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WALL_LIMIT)
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines() == ["memguard: interrupted"]
    assert out == ""
    assert time.monotonic() - t0 < WALL_LIMIT


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path):
    """PEP 383: the name's byte 0xff reaches Python as the lone surrogate U+DCFF, which a strict UTF-8
    stdout refuses: the table's ``model=`` line ended in a UnicodeEncodeError traceback."""
    name = os.fsdecode(b"caf\xff.json")
    write_config(tmp_path, name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "memguard", "estimate", str(tmp_path / name), "--seq-len", "8",
                           "--method", "formula"], capture_output=True, text=True, env=env, timeout=WALL_LIMIT,
                          errors="surrogateescape", preexec_fn=_limit_memory)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_OK, proc.stderr
    assert f"model={tmp_path}/caf\\udcff.json, batch_size=1, seq_len=8" in proc.stdout


def test_messages_with_surrogates_are_one_line_on_a_strict_stream(capsys, tmp_path):
    """capsys's stream is strict UTF-8, as stdout under PYTHONIOENCODING=utf-8."""
    name = os.fsdecode(b"caf\xff.json")
    write_config(tmp_path, name)
    code = main(["estimate", str(tmp_path / name), "--seq-len", "8", "--method", "formula", "--top", "0"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "caf\\udcff.json" in captured.out
    code = main(["check", "gpt2", "--seq-len", "8", "--gpu", "A100\udcff"])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE and captured.err.count("\n") == 1, captured.err
    assert "A100\\udcff" in captured.err


# -- the command line, in this process -------------------------------------------------------

CONFIGS = {
    # name: (config fields, what the one line says)
    "n_embd a word": ({"n_embd": "abc"}, "n_embd must be a whole number from 1 to 2,147,483,647, got 'abc'"),
    "negative n_positions": ({"n_positions": -5}, "n_positions must be a whole number from 1"),
    "zero heads": ({"model_type": "llama", "num_attention_heads": 0}, "num_attention_heads must be a whole number"),
    "negative n_layer": ({"n_layer": -1}, "n_layer must be a whole number from 1 to 2,147,483,647, got -1"),
    "zero vocab": ({"vocab_size": 0}, "vocab_size must be a whole number"),
    "bool heads": ({"n_head": True}, "n_head must be a whole number from 1 to 2,147,483,647, got True"),
    "float width": ({"n_embd": 32.5}, "n_embd must be a whole number"),
    "huge width": ({"n_embd": 2**40}, "n_embd must be a whole number"),
    "nested": ({"model_type": "t5", "d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": -64},
               "d_ff must be a whole number"),
    "heads do not divide": ({"n_embd": 33, "n_head": 2}, "cannot build a model from config"),
    "model_type a number": ({"model_type": 5}, "model_type must be a string, got 5"),
    "unknown model_type": ({"model_type": "no-such-arch"}, "is malformed"),
    # Round two (issue 15): bounded before anything is built.
    "1,025 layers": ({"n_layer": 1025}, "n_layer=1,025 layers is more than memguard builds (at most 1,024"),
    "10**14 parameters": ({"n_layer": 8, "n_embd": 2**22, "n_head": 2},
                          "n_layer=8, n_embd=4,194,304, vocab_size=64 describe at least 2.81e+14 parameters, more "
                          "than memguard builds (at most 1e+13"),
    "encoder 2**31-1 layers": ({"model_type": "t5", "d_model": 32, "num_heads": 2, "num_layers": MAX_COUNT,
                                "d_ff": 64}, "num_layers=2,147,483,647 layers is more than memguard builds"),
    # ... and their forward could not run: the trace failed, the formula answered, exit 0.
    "kv heads do not divide": ({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3},
                               "num_key_value_heads=3 does not divide num_attention_heads=4 (each key/value head "
                               "serves the same number of query heads); use one of 1, 2, 4"),
    "ViT patch larger than its image": ({"model_type": "vit", "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16,
                                         "patch_size": 32},
                                        "patch_size=32 is larger than image_size=16, so the image holds no patch"),
    "ViT patch pair": ({"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "image_size": [64, 16], "patch_size": [16, 32]},
                       "patch_size=[16, 32] is larger than image_size=[64, 16]"),
    # A class of transformers that is no model: transformers.Trainer(config) was built.
    "architectures Trainer": ({"architectures": ["Trainer"]},
                              "architectures names 'Trainer', which is not a model class (transformers.Trainer is "
                              "not a torch.nn.Module)"),
    "architectures a function": ({"architectures": ["set_seed"]}, "architectures names 'set_seed'"),
    "LoRA rank above the width": ({}, "--lora-rank 33 is above the hidden size of"),
    "LoRA rank 2**31-1": ({}, "--lora-rank 2,147,483,647 is above the hidden size of"),
}
LORA_RANKS = {"LoRA rank above the width": "33", "LoRA rank 2**31-1": str(MAX_COUNT)}


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, time.monotonic() - t0


def assert_one_line(code: int, out: str, err: str, seconds: float, says: str) -> None:
    assert "Traceback" not in err
    assert (code, out) == (EXIT_USAGE, ""), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("memguard: error: ")
    assert says in err
    assert seconds < WALL_LIMIT


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_values(capsys, tmp_path, case):
    fields, says = CONFIGS[case]
    path = write_config(tmp_path, "config.json", **fields)
    lora = ["--lora-rank", LORA_RANKS[case], "--method", "formula"] if case in LORA_RANKS else []
    assert_one_line(*cli(capsys, "estimate", path, "--seq-len", "8", *lora), says)


def test_bad_config_files(capsys, tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"model_type": "gpt2",')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes('{"model_type": "gpt2", "name": "caf\xe9"}'.encode("latin-1"))
    (tmp_path / "binary.dat").write_bytes(b"\x00\x01\xff\xfe not json " * 8)
    torch.save({"w": torch.zeros(4)}, tmp_path / "weights.pt")
    (tmp_path / "empty_dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening it would block until a writer comes
    cases = {
        "list.json": "holds JSON but not a config object",
        "broken.json": "cannot read",
        "deep.json": "cannot read",
        "latin1.json": "is not a text file (byte 0xe9",
        "binary.dat": "is not a text file (byte 0xff at offset 2 is not UTF-8)",
        "weights.pt": "is not a text file",
        "empty_dir": "no config.json at",
        "fifo": "is not a regular file",
    }
    for name, says in cases.items():
        assert_one_line(*cli(capsys, "estimate", str(tmp_path / name), "--seq-len", "8"), says)


FACTORY_CASES = {
    "mg_factories:raises": "calling mg_factories:raises() failed: RuntimeError: boom in the factory",
    "mg_factories:needs_args": "calling mg_factories:needs_args() failed: TypeError",
    "mg_factories:not_a_module": "'mg_factories:not_a_module' returned int, not a torch.nn.Module",
    "mg_factories:exits": "it called sys.exit(3)",
    "mg_factories:nothing_here": "has no attribute 'nothing_here'",
    "mg_factories:": "cannot use 'mg_factories:' as a model",
    "mg_syntax:f": "importing 'mg_syntax' for model 'mg_syntax:f' failed: SyntaxError",
    "mg_raising:f": "importing 'mg_raising' for model 'mg_raising:f' failed: RuntimeError: boom at import",
    "mg_exiting:f": "it called sys.exit('bye from the module body')",
    ":foo": "cannot use ':foo' as a model",
    ".rel:foo": "cannot use '.rel:foo' as a model",
    "no_such_module_xyz:f": "cannot import 'no_such_module_xyz'",
}


@pytest.mark.parametrize("spec", list(FACTORY_CASES))
def test_bad_factories(capsys, user_code, spec):
    assert_one_line(*cli(capsys, "estimate", spec, "--seq-len", "8"), FACTORY_CASES[spec])


def test_an_internal_error_is_one_line_and_exit_3(capsys, user_code):
    """An exception memguard did not expect is a bug: its own exit code, never 1 ("does not fit")."""
    code = main(["estimate", "mg_factories:broken_module", "--seq-len", "8", "--method", "formula", "--json"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (EXIT_INTERNAL, ""), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("memguard: internal error: RuntimeError: parameters are gone (raised in ")
    assert "mg_factories.py:" in captured.err and captured.err.endswith("please report it with the command line\n")


def test_ctrl_c_inside_the_users_code_exits_130(capsys, user_code):
    code = main(["estimate", "mg_factories:interrupted", "--seq-len", "8", "--json"])
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err) == (EXIT_INTERRUPTED, "", "memguard: interrupted\n")


SIZES = {
    "batch 2**70": (["estimate", "gpt2", "--seq-len", "8", "--batch-size", str(2**70)], "is past any device"),
    "batch 2**31": (["estimate", "gpt2", "--seq-len", "8", "--batch-size", str(2**31)], "is past any device"),
    "world size 2**70": (["estimate", "gpt2", "--strategy", "ddp", "--world-size", str(2**70)], "past any device"),
    "gpu 1e400GiB": (["check", "gpt2", "--seq-len", "8", "--gpu", "1e400GiB"], "larger than any memory"),
    "gpu 1e400%": (["check", "gpt2", "--seq-len", "8", "--gpu", "1e400%"], "between 0% and 100%"),
    "gpu 0GiB": (["check", "gpt2", "--seq-len", "8", "--gpu", "0GiB"], "no memory at all"),
    "gpu 0B": (["check", "gpt2", "--seq-len", "8", "--gpu", "0B"], "no memory at all"),
    "gpu 0%": (["check", "gpt2", "--seq-len", "8", "--gpu", "0%"], "no memory at all"),
    "max-batch limit 2**70": (["max-batch", "gpt2", "--seq-len", "8", "--gpu", "T4", "--limit", str(2**70)],
                              "past any device"),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_sizes_past_any_device_and_zero_budgets(capsys, case):
    argv, says = SIZES[case]
    assert_one_line(*cli(capsys, *argv), says)


# -- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "says"), [
    ("1e400", "larger than any memory"), ("1e400GiB", "larger than any memory"),
    (2**63, "larger than any memory"), (1e300, "larger than any memory"), (math.inf, "finite"),
])
def test_parse_bytes_past_any_memory(value, says):
    with pytest.raises(ConfigError, match=says):
        parse_bytes(value)


def test_memory_estimate_fits_reads_sizes():
    est = MemoryEstimate("formula", {Category.ACTIVATIONS: 9 * GIB})
    assert est.fits("12GiB") and est.fits(12 * GIB) and est.fits("10GiB")  # 9 GiB <= 0.9 x 10 GiB
    assert not est.fits("9.5GiB") and est.fits("9.5GiB", margin=0)
    assert est.fits("A100-40GB") and est.fits("T4") and est.fits("80% of A100-40GB")  # the one grammar
    for bad, says in ((True, "cannot read True"), ("150%", "between 0% and 100%"), (-1, "negative"),
                      (math.inf, "finite"), ("lots", "unknown GPU 'lots'"), (None, "cannot read None")):
        with pytest.raises(ConfigError, match=says):
            est.fits(bad)
    for margin in ("0.1", True, math.nan, 1, -0.1):
        with pytest.raises(ConfigError, match="margin must be a number in"):
            est.fits("12GiB", margin=margin)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"batch_size": math.inf}, "batch_size must be a positive integer, got inf"),
    ({"batch_size": math.nan}, "batch_size must be a positive integer, got nan"),
    ({"batch_size": True}, "batch_size must be a positive integer, got True"),
    ({"batch_size": 2**70}, "batch_size=1,180,591,620,717,411,303,424 is past any device"),
    ({"batch_size": 1.5}, "batch_size must be a positive integer, got 1.5"),
    ({"batch_size": "8"}, "batch_size must be a positive integer, got '8'"),
    ({"seq_len": True}, "seq_len must be a positive integer, got True"),
    ({"batch_size": MAX_COUNT, "seq_len": MAX_COUNT}, "the input ids alone would take more than 2**63 bytes"),
    ({"world_size": math.inf, "strategy": "ddp"}, "world_size must be a positive integer, got inf"),
    ({"world_size": True, "strategy": "ddp"}, "world_size must be a positive integer, got True"),
    ({"strategy": 5}, "strategy must be a name such as 'ddp'"),
    ({"strategy": b"ddp"}, "strategy must be a name such as 'ddp'"),
    ({"device": 5}, "device must be 'cuda' (or 'cuda:N'), 'cpu' or a torch.device, got int 5"),
    ({"device": ["cpu"]}, "device must be 'cuda'"),
    ({"lora_rank": True}, "lora_rank must be a positive integer, got True"),
    ({"offload_params": "no", "strategy": "fsdp", "world_size": 2}, "offload_params must be True or False, got 'no'"),
    ({"offload_optimizer": "no", "strategy": "fsdp", "world_size": 2}, "offload_optimizer must be True or False"),
    ({"offload_optimizer": None, "strategy": "fsdp", "world_size": 2}, "offload_optimizer must be True or False"),
    ({"gradient_checkpointing": 1}, "gradient_checkpointing must be None, True or False, got 1"),
])
def test_estimate_rejects_bad_values(kwargs, says):
    args = {"batch_size": 1, "seq_len": 8, "method": "formula", **kwargs}
    with pytest.raises(ConfigError) as info:
        memguard.estimate(tiny_gpt2(), **args)
    assert says in str(info.value)


def test_specs_and_strategies_take_real_numbers_and_bools():
    assert TrainingSpec.create(batch_size=8.0, seq_len=16).batch_size == 8  # a whole float is a number
    assert resolve_parallelism("fsdp", 2, offload_params=True).offload_params is True
    with pytest.raises(ConfigError, match="ranks_per_node must be a positive integer"):
        resolve_parallelism("fsdp_hybrid", 8, ranks_per_node=0)


def test_make_batch_refuses_batches_whose_bytes_overflow():
    from transformers import LlamaConfig, ViTConfig

    llama = load_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=64)).module
    with pytest.raises(ConfigError, match=r"token ids .* would overflow int64"):
        make_batch(llama, MAX_COUNT, MAX_COUNT, device="meta")
    vit = load_model(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=2**20, patch_size=2**16)).module
    with pytest.raises(ConfigError, match=r"pixel values .* would overflow int64"):
        make_batch(vit, MAX_COUNT, None, device="meta")


def test_config_objects_are_checked_and_build_errors_wrapped():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"n_layer must be a whole number from 1 .* got -1"):
        load_model(GPT2Config(n_layer=-1, n_embd=32, n_head=2))
    with pytest.raises(ConfigError, match="cannot build a model from config 'GPT2Config': ValueError"):
        load_model(GPT2Config(n_layer=1, n_embd=33, n_head=2))


def test_config_objects_whose_forward_cannot_run_are_refused():
    from transformers import LlamaConfig, ViTConfig

    with pytest.raises(ConfigError, match=r"num_key_value_heads=3 does not divide num_attention_heads=4"):
        load_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=3, vocab_size=64))
    with pytest.raises(ConfigError, match=r"patch_size=32 is larger than image_size=16"):
        load_model(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=16, patch_size=32))
    with pytest.raises(ConfigError, match=r"num_hidden_layers=1,025 layers is more than memguard builds"):
        load_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1025, num_attention_heads=4,
                               vocab_size=64))
    ok = load_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64))  # 2 divides 4: grouped-query attention
    assert ok.module.model.layers[0].self_attn.k_proj.out_features == 16


def test_plan_refuses_gpus_past_any_cluster_and_skips_lora_ranks_past_the_width(tmp_path):
    from memguard.estimation.parallel import MAX_WORLD_SIZE
    from memguard.planning import plan

    path = write_config(tmp_path, "config.json")
    with pytest.raises(ConfigError, match=r"gpus=1,048,577 GPUs is more than any cluster holds"):
        plan(path, gpu="T4", seq_len=8, gpus=MAX_WORLD_SIZE + 1, confirm=0)
    with pytest.raises(ConfigError, match=r"world_size=1,048,577 GPUs is more than any cluster holds"):
        plan(path, gpu="T4", seq_len=8, base={"strategy": "ddp", "world_size": MAX_WORLD_SIZE + 1}, confirm=0)
    found = plan(path, gpu="T4", seq_len=8, confirm=0, lora_ranks=(16, 64), batch_size=6, gpus=64)
    assert "LoRA ranks above the hidden size of " in " ".join(found.notes)
    assert {row.settings["lora_rank"] for row in found.rows if row.settings["lora_rank"]} == {16}
    skipped = [n for n in found.notes if "cannot keep the effective batch of 6" in n]
    assert skipped == ["64 GPUs allowed, but world sizes 4, 5, 7, 8, 9, 10, 11, 12 and 52 more cannot keep the "
                       "effective batch of 6: not searched"]


def test_load_model_paths_the_os_refuses():
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("x" * 5000)  # longer than a file name may be
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("a\0b")


def test_callback_budget_goes_through_parse_bytes():
    from memguard.lightning.callback import MemGuard

    with pytest.raises(ConfigError, match="larger than any memory"):
        MemGuard(budget="1e400GiB")


def test_every_error_here_is_a_memguard_error():
    assert issubclass(ConfigError, MemguardError) and issubclass(ConfigError, ValueError)
