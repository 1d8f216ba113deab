"""What running the trace in a forked child costs (memguard.estimation.sandbox).

Two measurements on this machine:

1. The fork itself, from a process holding ``R`` GiB of resident tensors (a model's weights on the
   CPU; a 7B model in bf16 holds 12.6 GiB): the wall time of ``sandbox.run(lambda: 0)``, which forks,
   runs nothing, pickles ``0`` back and reaps the child, and the parent's resident memory before and
   after (the child copies only the pages it writes; the parent's do not change).
2. A traced GPT-2 step (``memguard.estimate``, trace) in process (``MEMGUARD_IN_PROCESS=1``) and in a
   forked child: wall and CPU time (parent and children), median of ``--repeats`` after one untimed
   warm-up each. The child starts from the parent's warmed state (:func:`memguard.estimation.trace.warm_up`)
   but loses what it caches itself.

    python benchmarks/isolation.py [--gib 0 1 4 8] [--out out/isolation_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_info, render_table, write_json


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fork_cost(gib: float, repeats: int) -> dict[str, float]:
    """Median wall time of an empty :func:`sandbox.run` while ``gib`` GiB of tensors are resident."""
    import torch

    from memguard.estimation import sandbox

    held = torch.ones(int(gib * 2**30) // 4) if gib else None  # written: every page resident
    before = _rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sandbox.run(lambda: 0, timeout=60)
        times.append(time.perf_counter() - start)
    after = _rss_mib()
    del held
    return {"gib": gib, "fork_ms": 1e3 * statistics.median(times), "rss_before_mib": before, "rss_after_mib": after}


def trace_cost(in_process: bool, repeats: int, batch: int, seq: int) -> dict[str, float]:
    """Median wall and CPU seconds of a traced GPT-2 step, in process or in a forked child."""
    import memguard
    from memguard.estimation import sandbox
    from memguard.estimation.models import load_model

    if in_process:
        os.environ[sandbox.IN_PROCESS_VARIABLE] = "1"
    else:
        os.environ.pop(sandbox.IN_PROCESS_VARIABLE, None)
    module = load_model("gpt2").module  # a module of the user's: its trace runs in a child unless in_process
    walls, cpus, peaks = [], [], set()
    for i in range(repeats + 1):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        est = memguard.estimate(module, batch_size=batch, seq_len=seq, method="trace")
        if i:  # the first is a warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(_cpu_seconds() - cpu)
        peaks.add(est.peak_bytes)
    return {"in_process": in_process, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "peak_bytes": peaks.pop() if len(peaks) == 1 else -1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[0, 1, 4, 8], help="resident GiB to fork from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("out/isolation_cpu.json"),
                        help="where the JSON goes (benchmarks/results/isolation_cpu.json to update the committed one)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    forks = [fork_cost(g, args.repeats) for g in args.gib]
    print(render_table(["resident GiB", "fork + reap ms", "parent RSS before MiB", "after MiB"],
                       [[f"{f['gib']:g}", f"{f['fork_ms']:.1f}", f"{f['rss_before_mib']:.0f}",
                         f"{f['rss_after_mib']:.0f}"] for f in forks]))
    traces = [trace_cost(in_process, args.repeats, args.batch_size, args.seq_len) for in_process in (True, False)]
    print(f"\nGPT-2 small, batch {args.batch_size} x {args.seq_len}, trace (median of {args.repeats}):")
    print(render_table(["where", "wall s", "CPU s", "peak bytes"],
                       [["in process" if t["in_process"] else "forked child", f"{t['wall_s']:.2f}",
                         f"{t['cpu_s']:.2f}", str(t["peak_bytes"])] for t in traces]))
    write_json(args.out, {"machine": machine_info(), "forks": forks, "traces": traces, "case": {
        "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
