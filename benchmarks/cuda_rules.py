"""CUDA rules on a CPU-only machine: what ``device="cuda"`` estimates, trace and formula side by side.

The trace runs on fake CPU tensors and applies CUDA's rules itself (``memguard/estimation/cuda_rules.py``:
CUDA's autocast op lists, PyTorch's SDPA backend choice and the CUDA attention ops' output
shapes); the formula (``memguard/estimation/formula/``) writes the same rules in closed form. This script
prints the peak and the activations of both, at ``bf16-mixed`` with AdamW, for four models:

* GPT-2 small, batch 8 x 1024 (preset ``gpt2``, sdpa attention);
* BERT-large with ``eager`` attention, batch 4 x 512 (preset ``bert-large``);
* a small Llama (hidden 512, 4 layers, 8 heads, vocabulary 32000), batch 4 x 1024;
* ViT-base, batch 32 (preset ``vit-base``).

No GPU is involved: these are estimates, not measurements. ``--label`` names the run (e.g.
``before`` and ``after`` a change); ``--save`` merges it into ``out/benchmarks/cuda_rules_cpu.json``
(git ignores ``out/``), or into the tracked ``benchmarks/results/cuda_rules_cpu.json`` with
``--update-results``.

Usage (from the repository root)::

    python benchmarks/cuda_rules.py
    python benchmarks/cuda_rules.py --save --label after
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, machine_info, mib, read_json, render_table, result_path, write_json

RESULT_NAME = "cuda_rules_cpu.json"


def _bert_large_eager() -> Any:
    from memguard.estimation.models import load_model

    config = copy.deepcopy(load_model("bert-large").config)
    config._attn_implementation = "eager"
    return config


def _small_llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, intermediate_size=1376, vocab_size=32000)


CASES: dict[str, dict[str, Any]] = {
    "gpt2 b8x1024": {"model": lambda: "gpt2", "batch_size": 8, "seq_len": 1024},
    "bert-large-eager b4x512": {"model": _bert_large_eager, "batch_size": 4, "seq_len": 512},
    "llama-small b4x1024": {"model": _small_llama, "batch_size": 4, "seq_len": 1024},
    "vit-base b32": {"model": lambda: "vit-base", "batch_size": 32, "seq_len": None},
}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Trace and formula estimates of one case at bf16-mixed on ``device="cuda"``."""
    import memguard
    from memguard import Category

    out: dict[str, Any] = {}
    for method in ("trace", "formula"):
        start = time.perf_counter()
        est = memguard.estimate(case["model"](), case["batch_size"], case["seq_len"],
                                precision="bf16-mixed", optimizer="adamw", device="cuda",
                                method=method)
        out[method] = {"peak_bytes": est.peak_bytes,
                       "activations_bytes": est.breakdown[Category.ACTIVATIONS],
                       "temporary_bytes": est.breakdown[Category.TEMPORARY],
                       "seconds": round(time.perf_counter() - start, 3)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true",
                        help=f"merge the results into {RESULT_NAME} (where --out / --update-results say)")
    add_output_arguments(parser, RESULT_NAME)
    parser.add_argument("--label", default="current", help="name of this run in the JSON file")
    args = parser.parse_args(argv)
    results = {name: run_case(case) for name, case in CASES.items()}
    rows = []
    for name, r in results.items():
        t, f = r["trace"], r["formula"]
        diff = (f["peak_bytes"] - t["peak_bytes"]) / t["peak_bytes"]
        rows.append([name, mib(t["peak_bytes"]), mib(t["activations_bytes"]), mib(f["peak_bytes"]),
                     mib(f["activations_bytes"]), f"{diff:+.1%}"])
    print(render_table(["case (bf16-mixed, cuda)", "trace peak MiB", "trace act. MiB",
                        "formula peak MiB", "formula act. MiB", "formula vs trace"], rows))
    if args.save:
        output = result_path(args, RESULT_NAME)
        data = read_json(output) or {}
        data.setdefault("runs", {})[args.label] = {"machine": machine_info(), "cases": results}
        write_json(output, data)
        print(f"saved as {args.label!r} in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
