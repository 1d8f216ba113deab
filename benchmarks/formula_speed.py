"""How long one ``memguard estimate/check --method formula`` call takes, and what it is made of.

Issue 19 asks for ``--method formula`` under 2 s per CLI call. Each command below runs in a fresh
process, as a user runs it; the table gives its wall time and its CPU time (user + sys of the child),
the machine's load average beside it: on a shared machine wall time grows with the load, CPU time
much less, so the CPU time is the estimate of a quiet machine's wall time (the formula runs on one
core). The floor rows time what every such call imports before memguard computes anything: the
interpreter, ``import torch``, transformers' config of a model, its model class.

``--snapshot DIR`` writes the ``--json`` output (and exit status) of ``estimate`` and ``check``
with ``--method formula`` for every preset, and LoRA and 4-bit variants, into ``DIR`` (one process,
``memguard.cli.main`` per command); ``--compare DIR`` checks that the outputs of this checkout are the
same bytes. A speed change to the formula's path must keep them.

Usage (from the repository root)::

    python benchmarks/formula_speed.py                 # per-call times (~5 min on 2 busy cores)
    python benchmarks/formula_speed.py --only gpt2     # the commands whose words contain 'gpt2'
    python benchmarks/formula_speed.py --breakdown     # CPU seconds by phase: imports, 1st call, warm call
    python benchmarks/formula_speed.py --snapshot /tmp/before
    python benchmarks/formula_speed.py --compare /tmp/before
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import render_table

MIXTRAL_8X7B = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
}
"""mistralai/Mixtral-8x7B-v0.1's config.json (its sizes; no preset ships a mixture of experts)."""

MOE = "{moe}"
"""Stands for the path of :data:`MIXTRAL_8X7B` written as a config.json."""

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("estimate", "gpt2", "--batch-size", "2", "--seq-len", "1024"),
    ("check", "gpt2", "--gpu", "T4", "--batch-size", "8", "--seq-len", "1024"),
    ("check", "llama-2-7b", "--gpu", "A100-80GB", "--batch-size", "2", "--seq-len", "1024"),
    ("estimate", "llama-2-7b", "--batch-size", "2", "--seq-len", "1024", "--precision", "bf16-true"),
    ("estimate", "mistral-7b", "--batch-size", "2", "--seq-len", "1024", "--precision", "bf16-mixed"),
    ("estimate", MOE, "--batch-size", "1", "--seq-len", "1024", "--precision", "bf16-true"),
    ("estimate", "t5-small", "--batch-size", "8", "--seq-len", "512"),
    ("estimate", "whisper-tiny", "--batch-size", "8"),
    ("estimate", "vit-base", "--batch-size", "32"),
    ("estimate", "llama-2-7b", "--batch-size", "2", "--seq-len", "1024", "--lora-rank", "16",
     "--precision", "bf16-true"),
    ("estimate", "llama-2-7b", "--batch-size", "2", "--seq-len", "1024", "--quantization", "nf4",
     "--precision", "bf16-mixed"),
)
"""The timed calls, each followed by ``--method formula`` (presets of every family the formula lays out,
a mixture of experts, LoRA and a 4-bit base)."""

FLOOR: tuple[tuple[str, str], ...] = (
    ("python (empty)", "pass"),
    ("import memguard.cli (no torch)", "import memguard.cli"),
    ("import torch", "import torch"),
    ("+ transformers LlamaConfig", "import torch; from transformers import AutoConfig; AutoConfig.for_model('llama')"),
    ("+ LlamaForCausalLM class", "import torch; from transformers import AutoConfig, LlamaForCausalLM; "
                                 "AutoConfig.for_model('llama')"),
    ("+ peft", "import torch; from transformers import AutoConfig, LlamaForCausalLM; "
               "AutoConfig.for_model('llama'); import peft"),
)
"""What every call pays before memguard computes: the imports, each row including the ones above it."""


_PHASES = """
import contextlib, io, json, sys, time

marks = [(time.perf_counter(), time.process_time())]

def mark():
    marks.append((time.perf_counter(), time.process_time()))

import memguard.cli
mark()
import torch
mark()
import memguard.estimation.estimator
mark()
for _ in range(2):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        memguard.cli.main(sys.argv[1:])
    mark()
print(json.dumps([(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in zip(marks, marks[1:])]))
"""
"""A call's phases in one process: memguard's CLI, torch, the estimator, the call, the same call again."""

PHASES = ("memguard.cli", "torch", "estimator", "1st call", "2nd call")


def breakdown(only: str | None) -> None:
    """Print each command's CPU seconds by phase, in one fresh process: the imports before the call, the
    first call (transformers' config and model class imported, the model built, the estimate), and the
    same call again (the estimate alone, on a warm process: memguard's own compute)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        moe = _moe_config(Path(tmp))
        for command in COMMANDS:
            label = " ".join(command).replace(MOE, "mixtral-8x7b.json")
            if only and only not in label:
                continue
            done = subprocess.run([sys.executable, "-c", _PHASES, *_words(command, moe)], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                rows.append((label, *["-"] * len(PHASES), "failed"))
                continue
            phases = json.loads(done.stdout.splitlines()[-1])
            rows.append((label, *(f"{cpu:.2f}" for _, cpu in phases), f"{os.getloadavg()[0]:.1f}"))
            print(f"  {label}: " + ", ".join(f"{n} {cpu:.2f}" for n, (_, cpu) in zip(PHASES, phases, strict=True)),
                  file=sys.stderr, flush=True)
    print("CPU seconds by phase, one fresh process per call (2nd call: the same call again, warm):")
    print(render_table(("call (--method formula)", *PHASES, "load"), rows))


def _timed_child(argv: Sequence[str]) -> tuple[float, float, int]:
    """Run ``argv`` with its output discarded: wall seconds, CPU seconds (user + sys), exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def _moe_config(folder: Path) -> str:
    path = folder / "mixtral-8x7b.json"
    path.write_text(json.dumps(MIXTRAL_8X7B))
    return str(path)


def _words(command: Sequence[str], moe: str) -> list[str]:
    return [moe if w == MOE else w for w in command] + ["--method", "formula"]


def time_calls(only: str | None, reps: int) -> None:
    """Print the import floor and each command's wall and CPU time per call (best of ``reps``)."""
    python = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        moe = _moe_config(Path(tmp))
        jobs = [(label, [python, "-c", code]) for label, code in FLOOR]
        jobs += [(" ".join(c).replace(MOE, "mixtral-8x7b.json"), [python, "-m", "memguard", *_words(c, moe)])
                 for c in COMMANDS]
        for label, argv in jobs:
            if only and only not in label:
                continue
            runs = [_timed_child(argv) for _ in range(reps)]
            wall, cpu, code = min(runs, key=lambda r: r[1])
            load = os.getloadavg()[0]
            rows.append((label, f"{wall:.2f}", f"{cpu:.2f}", f"{load:.1f}", str(code)))
            print(f"  {label}: {wall:.2f} s wall, {cpu:.2f} s user+sys (load {load:.1f})", file=sys.stderr, flush=True)
    print(f"per call on {os.cpu_count()} cores (best of {reps} by CPU time; exit 1 = does not fit):")
    print(render_table(("call (--method formula)", "wall s", "user+sys s", "load", "exit"), rows))


def snapshot_cases() -> list[tuple[str, list[str]]]:
    """(file name, words) of every snapshot: estimate and check of each preset, LoRA and nf4 variants."""
    from memguard import list_presets

    cases = []
    for preset in [*list_presets(), MOE]:
        name = "mixtral" if preset == MOE else preset
        variants: list[tuple[str, list[str]]] = [("", []), ("-bf16", ["--precision", "bf16-mixed"])]
        if preset in ("gpt2", "llama-2-7b", "t5-small", "mistral-7b", "bert-base-uncased", "vit-base",
                      "whisper-tiny", MOE):
            variants += [("-lora16", ["--lora-rank", "16"]), ("-nf4", ["--quantization", "nf4"])]
        for suffix, extra in variants:
            size = ["--batch-size", "2"] + ([] if preset in ("vit-base", "whisper-tiny") else ["--seq-len", "512"])
            cases.append((f"estimate-{name}{suffix}", ["estimate", preset, *size, *extra]))
            cases.append((f"check-{name}{suffix}", ["check", preset, "--gpu", "A100-80GB", *size, *extra]))
    return cases


def _run_in_process(words: list[str]) -> tuple[str, str, int]:
    """stdout, stderr and the exit status of ``memguard WORDS``."""
    from memguard.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(words)
    return out.getvalue(), err.getvalue(), code


def snapshot(folder: Path, compare: bool, only: str | None = None) -> int:
    """Write (or compare against) ``folder/<case>.json``: the exit status, stderr and the ``--json`` output;
    with ``only``, of the cases whose file name contains it. Returns 1 when an output differs, else 0."""
    folder.mkdir(parents=True, exist_ok=True)
    differ = 0
    cases = [(name, words) for name, words in snapshot_cases() if not only or only in name]
    with tempfile.TemporaryDirectory() as tmp:
        moe = _moe_config(Path(tmp))
        for name, words in cases:
            text, err, code = _run_in_process([*_words(words, moe), "--json"])
            got = f"exit {code}\n{err}{text}".replace(moe, "mixtral-8x7b.json")
            path = folder / f"{name}.json"
            if not compare:
                path.write_text(got)
            elif not path.exists() or path.read_text() != got:
                differ += 1
                print(f"DIFFERS: {name} ({' '.join(words)})")
    print(f"{len(cases)} outputs {'compared' if compare else 'written'} in {folder}; {differ} differ")
    return 1 if differ else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="only the calls whose words (snapshot: file names) contain this")
    parser.add_argument("--reps", type=int, default=1, help="runs of each call (the best is shown)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU seconds of each call by phase (imports, first call, warm call)")
    parser.add_argument("--snapshot", type=Path, help="write every preset's --json formula outputs here")
    parser.add_argument("--compare", type=Path, help="compare this checkout's outputs with a --snapshot folder")
    args = parser.parse_args(argv)
    if args.snapshot or args.compare:
        return snapshot(args.snapshot or args.compare, compare=args.compare is not None, only=args.only)
    if args.breakdown:
        breakdown(args.only)
    else:
        time_calls(args.only, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
