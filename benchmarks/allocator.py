"""Allocator: what PyTorch's CUDA caching allocator reserves over a traced training step.

memguard's trace of a steady-state step (``memguard.estimate(..., device="cuda")``) records every
storage allocated and freed, in order. This script captures that ledger, turns it into events
(``memguard.estimation.allocator.ledger_events``) and replays them through the allocator model
(``memguard.estimation.allocator.replay``) under several ``PYTORCH_CUDA_ALLOC_CONF`` settings, printing
peak allocated (``max_memory_allocated``), peak reserved (``max_memory_reserved``), the overhead
and the replay time. It then times a replay of at least 100k events (the step's events repeated
under fresh keys).

No GPU is involved: these are the model's predictions, not measurements of ``torch.cuda``.

Usage (from the repository root)::

    python benchmarks/allocator.py     # GPT-2 small, batch 8 x 1024, bf16-mixed: out/benchmarks/allocator_gpt2_cpu.json
    python benchmarks/allocator.py --model llama-2-7b --batch-size 1 --seq-len 2048 --precision bf16-true
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, machine_info, mib, render_table, result_path, write_json

SETTINGS = ["", "expandable_segments:True", "max_split_size_mb:128", "roundup_power2_divisions:4",
            "max_split_size_mb:128,expandable_segments:True"]


def traced_events(model: str, batch_size: int, seq_len: int, precision: str, optimizer: str) -> list[Any]:
    """The ledger records of memguard's CUDA trace of one steady-state step."""
    import memguard
    import memguard.estimation.trace.pipeline as trace

    ledgers: list[Any] = []
    original = trace.Ledger

    class _Capturing(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            ledgers.append(self)

    trace.Ledger = _Capturing  # type: ignore[misc]
    try:
        memguard.estimate(model, batch_size, seq_len, precision=precision, optimizer=optimizer,
                          device="cuda", method="trace")
    finally:
        trace.Ledger = original  # type: ignore[misc]
    return ledgers[-1].records


def repeated(events: list[tuple[int, int]], at_least: int) -> list[tuple[int, int]]:
    """``events`` again and again under fresh keys, freeing what each copy left live."""
    out: list[tuple[int, int]] = []
    span = max(k for k, _ in events) + 1
    copy = 0
    while len(out) < at_least:
        out.extend((k + copy * span, n) for k, n in events)
        freed = {k for k, n in events if n < 0}
        out.extend((k + copy * span, -1) for k, n in events if n >= 0 and k not in freed)
        copy += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from memguard.estimation.allocator import AllocatorConfig, ledger_events, replay

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--events", type=int, default=100_000, help="events in the timed replay")
    add_output_arguments(parser, "allocator_<model>_cpu.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    records = traced_events(args.model, args.batch_size, args.seq_len, args.precision, args.optimizer)
    trace_s = time.perf_counter() - start
    events = ledger_events(records)
    print(f"{args.model} batch {args.batch_size} x {args.seq_len}, {args.precision}, {args.optimizer}: "
          f"{len(records)} storages, {len(events)} events, traced in {trace_s:.1f} s\n")

    rows, results = [], []
    for setting in SETTINGS:
        config = AllocatorConfig.parse(setting)
        start = time.perf_counter()
        stats = replay(events, config)
        took = time.perf_counter() - start
        rows.append([setting or "(defaults)", mib(stats.peak_requested), mib(stats.peak_allocated),
                     mib(stats.peak_reserved), f"{stats.overhead:+.2%}", str(stats.segments), f"{took * 1e3:.0f}"])
        results.append({"setting": setting, "seconds": took, **dataclasses.asdict(stats)})
    print(render_table(["PYTORCH_CUDA_ALLOC_CONF", "requested MiB", "allocated MiB", "reserved MiB",
                        "overhead", "segments", "replay ms"], rows))

    many = repeated(events, args.events)
    start = time.perf_counter()
    replay(many)
    took = time.perf_counter() - start
    print(f"\nreplay of {len(many)} events: {took:.3f} s ({took / len(many) * 1e6:.2f} us per event)")
    output = result_path(args, f"allocator_{args.model}_cpu.json")
    case = {k: v for k, v in vars(args).items() if k not in ("out", "update_results")}
    write_json(output, {
        "machine": machine_info(), "case": case, "events": len(events), "configs": results,
        "timing": {"events": len(many), "seconds": took}})
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
