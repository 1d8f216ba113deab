"""QLoRA: the closed-form formula's peak beside the trace's on quantized Llama bases.

Three Llama sizes (512 x 4 layers, 1024 x 4, and 2048 x 2 with GQA 16/4 heads; a 2,000-token
vocabulary by default, so that the blocks weigh more than the embeddings, ``--vocab 32000`` for
Llama's; an untied head, left in 16 bits as transformers' ``BitsAndBytesConfig`` leaves
``lm_head``), LoRA rank 8 on the q and v projections, the base's linear layers in NF4 with double
quantization or LLM.int8; each under ``bf16-mixed`` and ``bf16-true``, with and without gradient
checkpointing, at batch 4 x 512 (past the 4-bit fused kernel's rows) and 1 x 256 (within them).
Both methods on ``device="cuda"`` (what a GPU runs, computed on the CPU); compared: ``peak_bytes``.

error = (formula - trace) / trace; positive means the formula says more than the trace.

Usage (from the repository root)::

    python benchmarks/qlora_vs_trace.py                  # out/benchmarks/qlora_vs_trace.json
    python benchmarks/qlora_vs_trace.py --traces benchmarks/results/qlora_vs_trace.json
                                                         # the formula only, traces reused
    python benchmarks/qlora_vs_trace.py --update-results # benchmarks/results/qlora_vs_trace.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, machine_info, render_table, result_path, write_json


def llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Any:
    """A Llama config with an untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False)


SIZES: dict[str, Callable[[int], Any]] = {
    "512x4": lambda vocab: llama(512, 1376, 4, 8, 8, vocab),
    "1024x4": lambda vocab: llama(1024, 2752, 4, 16, 16, vocab),
    "2048x2-gqa": lambda vocab: llama(2048, 5504, 2, 16, 4, vocab),
}
SHAPES = ((4, 512), (1, 256))
"""Batch size and sequence length: 2,048 rows (the 4-bit base dequantizes its weights) and 256
(its fused kernel, :data:`memguard.estimation.quantization.FUSED_MAX_ROWS`)."""
QUANTIZATIONS = {"nf4-dq": {"quantization": "nf4", "double_quant": True}, "int8": {"quantization": "int8"}}
PRECISIONS = ("bf16-mixed", "bf16-true")
BASE: dict[str, Any] = {"lora_rank": 8, "optimizer": "adamw", "device": "cuda"}


def cells(vocab: int) -> list[dict[str, Any]]:
    """Every combination: size, shape, quantization, precision, checkpointing."""
    out = []
    for size, (b, s), quant, prec, ckpt in itertools.product(SIZES, SHAPES, QUANTIZATIONS, PRECISIONS,
                                                              (False, True)):
        out.append({"size": size, "vocab": vocab, "batch_size": b, "seq_len": s, "quant": quant, "precision": prec,
                    "ckpt": ckpt})
    return out


def key(cell: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a cell (to reuse its trace)."""
    return tuple(cell[k] for k in ("size", "vocab", "batch_size", "seq_len", "quant", "precision", "ckpt"))


def peak(cell: dict[str, Any], method: str) -> int:
    import memguard

    warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing
    logging.getLogger("transformers").setLevel(logging.ERROR)  # use_cache under checkpointing
    est = memguard.estimate(SIZES[cell["size"]](cell["vocab"]), method=method, batch_size=cell["batch_size"],
                            seq_len=cell["seq_len"], precision=cell["precision"],
                            gradient_checkpointing=cell["ckpt"], **QUANTIZATIONS[cell["quant"]], **BASE)
    return est.peak_bytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--vocab", type=int, default=2000, help="vocabulary size (default 2000)")
    parser.add_argument("--traces", type=Path, help="an earlier result whose trace peaks to reuse")
    add_output_arguments(parser, "qlora_vs_trace.json")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"unknown size {bad}; expected {', '.join(SIZES)}")
    traced = {}
    if args.traces is not None:
        traced = {key(r): r["trace"] for r in json.loads(args.traces.read_text())["rows"]}
    rows: list[dict[str, Any]] = []
    out = result_path(args, "qlora_vs_trace.json" if args.vocab == 2000 else f"qlora_vs_trace_v{args.vocab}.json")
    for cell in (c for c in cells(args.vocab) if c["size"] in sizes):
        t0 = time.perf_counter()
        trace = traced.get(key(cell)) or peak(cell, "trace")
        formula = peak(cell, "formula")
        rows.append({**cell, "formula": formula, "trace": trace,
                     "error": round((formula - trace) / trace, 4),
                     "seconds": round(time.perf_counter() - t0, 2)})
        print(f"{cell} {100 * rows[-1]['error']:+.2f}%", file=sys.stderr, flush=True)
        write_json(out, {"machine": machine_info("cpu"), "base": BASE, "rows": rows})
    table = [[r["size"], f"{r['batch_size']}x{r['seq_len']}", r["quant"], r["precision"],
              "on" if r["ckpt"] else "off", f"{r['formula'] / 2**20:,.1f}", f"{r['trace'] / 2**20:,.1f}",
              f"{100 * r['error']:+.1f}%"] for r in rows]
    print(render_table(["size", "shape", "quant", "precision", "ckpt", "formula MiB", "trace MiB", "error"],
                       table))
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"worst: {key(worst)} {100 * worst['error']:+.1f}%  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
