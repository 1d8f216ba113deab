"""Formula against trace: the closed-form formula's peak beside the trace's, cell by cell.

For each model size and each cell of the matrix (strategies, offload, LoRA with and without
checkpointing, 8-bit AdamW, precision, accumulation), ``memguard.estimate(..., method="formula")``
against ``method="trace"``, both on ``device="cuda"`` (what a GPU runs, computed on the CPU).
Compared: ``peak_bytes`` (live tensors, no device overhead).

error = (formula - trace) / trace; positive means the formula says more than the trace.

Usage (from the repository root)::

    python benchmarks/formula_vs_trace.py                        # small, llama-2-7b, llama-2-13b
    python benchmarks/formula_vs_trace.py --sizes small --out out/fvt_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, render_table, write_json

CELLS: dict[str, dict[str, Any]] = {
    "single": {},
    "ddp": {"strategy": "ddp", "world_size": 4},
    "fsdp": {"strategy": "fsdp", "world_size": 4},
    "fsdp-offload": {"strategy": "fsdp", "world_size": 4, "offload_optimizer": True,
                     "offload_params": True},
    "shard-grad-op": {"strategy": "fsdp_shard_grad_op", "world_size": 4},
    "ds1": {"strategy": "deepspeed_stage_1", "world_size": 4},
    "ds2": {"strategy": "deepspeed_stage_2", "world_size": 4},
    "ds2-offload": {"strategy": "deepspeed_stage_2", "world_size": 4, "offload_optimizer": True},
    "ds3": {"strategy": "deepspeed_stage_3", "world_size": 4},
    "ds3-offload": {"strategy": "deepspeed_stage_3", "world_size": 4, "offload_optimizer": True,
                    "offload_params": True},
    "lora": {"lora_rank": 8},
    "lora-ckpt": {"lora_rank": 8, "gradient_checkpointing": True},
    "lora-bf16-true-ckpt": {"lora_rank": 8, "gradient_checkpointing": True, "precision": "bf16-true"},
    "ckpt": {"gradient_checkpointing": True},
    "adamw-8bit": {"optimizer": "adamw-8bit"},
    "32-true": {"precision": "32-true"},
    "16-mixed": {"precision": "16-mixed"},
    "bf16-true": {"precision": "bf16-true"},
    "accumulate-4": {"accumulate_grad_batches": 4},
}
"""The matrix: extra ``memguard.estimate`` arguments per cell, on top of :data:`BASE`."""

BASE: dict[str, Any] = {"precision": "bf16-mixed", "optimizer": "adamw", "device": "cuda",
                        "gradient_checkpointing": False}


def llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Any:
    """A Llama config (GQA, rotary, SDPA, SwiGLU)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=2048)


SIZES: dict[str, tuple[Callable[[], Any], int, int]] = {
    "tiny-64": (lambda: llama(64, 176, 2, 4, 2, 512), 2, 32),
    "tiny-128": (lambda: llama(128, 352, 3, 4, 2, 1024), 2, 32),
    "tiny-256": (lambda: llama(256, 688, 4, 8, 4, 2048), 2, 32),
    "small": (lambda: llama(768, 2048, 12, 12, 4, 32000), 2, 512),
    "llama-2-7b": (lambda: "llama-2-7b", 1, 256),
    "llama-2-13b": (lambda: "llama-2-13b", 1, 256),
}
"""Model (a factory), batch size and sequence length per size: short, so each trace takes seconds.
The ``tiny-*`` sizes are the ones ``tests/estimation/formula/test_formula_matrix.py`` traces; ``small`` (~110M
parameters, 12 layers of width 768) and the presets only here."""


def compare(size: str, cells: Sequence[str], traced: dict[tuple[str, str], int] | None = None,
            ) -> list[dict[str, Any]]:
    """Formula and trace peaks of ``cells`` for the model of ``size``; ``traced`` holds trace peaks
    already measured, by ``(size, cell)`` (the trace does not change when the formula does)."""
    import memguard

    make, batch, seq = SIZES[size]
    rows = []
    for cell in cells:
        kwargs = {**BASE, **CELLS[cell], "batch_size": batch, "seq_len": seq}
        peaks: dict[str, int] = {}
        secs: dict[str, float] = {}
        for method in ("formula", "trace"):
            if method == "trace" and traced and (size, cell) in traced:
                peaks[method], secs[method] = traced[size, cell], 0.0
                continue
            t0 = time.perf_counter()
            peaks[method] = memguard.estimate(make(), method=method, **kwargs).peak_bytes
            secs[method] = round(time.perf_counter() - t0, 2)
        err = (peaks["formula"] - peaks["trace"]) / peaks["trace"]
        rows.append({"size": size, "cell": cell, "batch_size": batch, "seq_len": seq,
                     "formula": peaks["formula"], "trace": peaks["trace"], "error": round(err, 4),
                     "seconds": secs})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells of the matrix")
    parser.add_argument("--out", type=Path, default=Path("out/formula_vs_trace.json"))
    parser.add_argument("--traces", type=Path, help="an earlier --out whose trace peaks to reuse")
    args = parser.parse_args(argv)
    traced = None
    if args.traces is not None:
        old = json.loads(args.traces.read_text())["rows"]
        traced = {(r["size"], r["cell"]): r["trace"] for r in old
                  if (r["batch_size"], r["seq_len"]) == SIZES[r["size"]][1:]}
    sizes = [s for s in args.sizes.split(",") if s]
    cells = [c for c in args.cells.split(",") if c]
    for name, known in (("size", SIZES), ("cell", CELLS)):
        bad = [x for x in (sizes if name == "size" else cells) if x not in known]
        if bad:
            parser.error(f"unknown {name} {bad}; expected {', '.join(known)}")
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rows.extend(compare(size, cells, traced))
        write_json(args.out, {"machine": machine_info("cpu"), "base": BASE, "rows": rows})
    table = [[r["size"], r["cell"], f"{r['formula'] / 2**20:,.0f}", f"{r['trace'] / 2**20:,.0f}",
              f"{100 * r['error']:+.1f}%"] for r in rows]
    print(render_table(["size", "cell", "formula MiB", "trace MiB", "error"], table))
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"worst: {worst['size']} {worst['cell']} {100 * worst['error']:+.1f}%  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
