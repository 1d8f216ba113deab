"""Accuracy: memguard's estimates against the measured peak of real training steps.

For every case of ``benchmarks/cases.py``: the truth (``truth.py``, one fresh process per case,
cached in ``out/benchmarks/truth_<device>.json``, read from ``benchmarks/results/`` until this machine
has its own; ``--refresh`` measures again), and
``memguard.estimate(..., method=m)`` for the trace, the formula and the seed formula, each timed.
The estimators get the same prepared module the truth trained (built on the meta device), so
dtype conversion, frozen layers and checkpointing are the same on both sides.

error = (estimate.peak_bytes - truth) / truth; negative means the estimate is too low.

Usage (from the repository root)::

    python benchmarks/accuracy.py                      # all cases, CPU
    python benchmarks/accuracy.py --cases gpt2,t5-small
    python benchmarks/accuracy.py --refresh            # measure every truth again
    python benchmarks/accuracy.py --device cuda        # on a GPU machine: accuracy_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    add_output_arguments,
    machine_info,
    median,
    mib,
    render_table,
    result_path,
    write_json,
)
from benchmarks.cases import Case, estimate_kwargs, prepared_module, select_cases
from benchmarks.truth import cached_truth, load_cache

METHODS = ("trace", "formula", "seed")

TARGETS = {
    "trace_max_abs": 0.02,
    "trace_median_abs": 0.01,
    "trace_min_signed": -0.02,
    "formula_median_abs": 0.10,
}
"""trace within 2% on every case (median under 1%) and never more than 2% below the truth;
the formula's median error within 10%."""


# --------------------------------------------------------------------------- estimates


def estimate_case(case: Case, method: str, device: str) -> dict[str, Any]:
    """``memguard.estimate`` of ``case`` by ``method``: bytes, time, or the error it raised."""
    import memguard

    try:
        module = prepared_module(case, "meta")
        kwargs = estimate_kwargs(case)
        start = time.perf_counter()
        est = memguard.estimate(module, device=device, method=method, **kwargs)
        seconds = time.perf_counter() - start
    except Exception as exc:  # a method not written yet, or one that fails on this model
        return {"error": type(exc).__name__, "message": str(exc)[:500],
                "where": traceback.format_exc(limit=-3)[-1500:]}
    out = {k: v for k, v in est.to_dict().items() if k not in ("at_peak", "timeline")}  # the numbers only
    out["seconds"] = seconds
    return out


def error_of(estimate: dict[str, Any], truth: int | None, key: str = "peak_bytes") -> float | None:
    """(estimate - truth) / truth, or ``None`` when either side is missing."""
    if truth is None or truth <= 0 or "error" in estimate or estimate.get(key) is None:
        return None
    return (estimate[key] - truth) / truth


def evaluate(cases: Sequence[Case], device: str, methods: Sequence[str],
             refresh: bool, update_results: bool = False) -> list[dict[str, Any]]:
    """Truth and estimates of every case, as JSON-ready rows; truths measured anew go to the scratch
    cache, or to the tracked one with ``update_results``."""
    truths = cached_truth(cases, device, refresh=refresh, log=_log, update_results=update_results)
    rows = []
    for case in cases:
        _log(f"estimating {case.name} ...")
        truth = truths[case.name]
        record: dict[str, Any] = {"case": case.name, "spec": case.to_dict(), "note": case.note}
        if isinstance(truth, Exception):
            record["truth"] = {"error": type(truth).__name__, "message": str(truth)[-1500:]}
            truth_bytes = None
        else:
            record["truth"] = truth
            truth_bytes = truth["peak_bytes"]
        record["estimates"] = {m: estimate_case(case, m, device) for m in methods}
        record["errors"] = {m: error_of(e, truth_bytes) for m, e in record["estimates"].items()}
        if device == "cuda" and not isinstance(truth, Exception):
            nvml = truth.get("nvml_process_used_bytes")
            record["total_errors"] = {m: error_of(e, nvml, "total_bytes")
                                      for m, e in record["estimates"].items()}
            # max_memory_reserved() against the allocator replay (less what was allocated before the model)
            reserved = truth["max_reserved"] - truth["allocated_before_model"]
            record["reserved_errors"] = {m: error_of(e, reserved, "reserved_bytes")
                                         for m, e in record["estimates"].items()}
        rows.append(record)
    return rows


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- summary


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Median and largest absolute error per method, the worst under-estimate, targets met."""
    summary: dict[str, Any] = {}
    for m in methods:
        errs = {r["case"]: r["errors"][m] for r in rows if r["errors"].get(m) is not None}
        failed = [r["case"] for r in rows if "error" in r["estimates"].get(m, {})]
        if not errs:
            summary[m] = {"cases": 0, "failed": failed}
            continue
        worst_case = min(errs, key=lambda c: errs[c])
        summary[m] = {
            "cases": len(errs), "failed": failed,
            "median_abs": median([abs(e) for e in errs.values()]),
            "max_abs": max(abs(e) for e in errs.values()),
            "min_signed": errs[worst_case], "min_signed_case": worst_case,
            "median_seconds": median([r["estimates"][m]["seconds"] for r in rows
                                      if "seconds" in r["estimates"].get(m, {})]),
        }
    summary["targets"] = _targets_met(summary, len(rows))
    return summary


def _targets_met(summary: dict[str, Any], n_cases: int) -> dict[str, bool | None]:
    trace = summary.get("trace", {})
    formula = summary.get("formula", {})
    complete = trace.get("cases") == n_cases  # a target over every case needs every case
    return {
        "trace_max_abs": (trace["max_abs"] <= TARGETS["trace_max_abs"] and complete)
        if "max_abs" in trace else None,
        "trace_median_abs": trace["median_abs"] < TARGETS["trace_median_abs"]
        if "median_abs" in trace else None,
        "trace_min_signed": (trace["min_signed"] >= TARGETS["trace_min_signed"] and complete)
        if "min_signed" in trace else None,
        "formula_median_abs": formula["median_abs"] <= TARGETS["formula_median_abs"]
        if "median_abs" in formula else None,
    }


# --------------------------------------------------------------------------- display


def _cell(row: dict[str, Any], method: str, key: str = "errors") -> str:
    err = row.get(key, {}).get(method)
    if err is not None:
        return f"{100 * err:+.2f}%"
    est = row["estimates"].get(method, {})
    return f"n/a ({est['error']})" if "error" in est else "n/a"


def _seconds(row: dict[str, Any], method: str) -> str:
    est = row["estimates"].get(method, {})
    return f"{est['seconds']:.3f}" if "seconds" in est else "-"


def render(rows: Sequence[dict[str, Any]], methods: Sequence[str], device: str) -> str:
    headers = ["case", "truth MiB", *(f"{m} err" for m in methods)]
    if device == "cuda":
        headers += ["reserved MiB", *(f"{m} reserved err" for m in methods)]
        headers += ["NVML MiB", *(f"{m} total err" for m in methods)]
    headers += [f"{m} s" for m in methods]
    lines = []
    for r in rows:
        truth = r["truth"].get("peak_bytes")
        cells = [r["case"], mib(truth) if truth is not None else f"failed ({r['truth']['error']})"]
        cells += [_cell(r, m) for m in methods]
        if device == "cuda":
            cells.append(mib(r["truth"].get("max_reserved")))
            cells += [_cell(r, m, "reserved_errors") for m in methods]
            cells.append(mib(r["truth"].get("nvml_process_used_bytes")))
            cells += [_cell(r, m, "total_errors") for m in methods]
        cells += [_seconds(r, m) for m in methods]
        lines.append(cells)
    return render_table(headers, lines)


def render_summary(summary: dict[str, Any], methods: Sequence[str]) -> str:
    lines = []
    for m in methods:
        s = summary[m]
        if not s["cases"]:
            lines.append(f"{m:8} no estimates ({len(s['failed'])} cases raised)")
            continue
        lines.append(
            f"{m:8} median |err| {100 * s['median_abs']:.2f}%   "
            f"max |err| {100 * s['max_abs']:.2f}%   "
            f"worst under-estimate {100 * s['min_signed']:+.2f}% ({s['min_signed_case']})   "
            f"median time {s['median_seconds']:.3f} s"
            + (f"   n/a: {', '.join(s['failed'])}" if s["failed"] else "")
        )
    met = summary["targets"]
    lines.append("")
    lines.append("targets:")
    lines.append(f"  trace   |err| <= 2% on every case       {_verdict(met['trace_max_abs'])}")
    lines.append(f"  trace   median |err| < 1%               {_verdict(met['trace_median_abs'])}")
    lines.append(f"  trace   never more than 2% below truth  {_verdict(met['trace_min_signed'])}")
    lines.append(f"  formula median |err| <= 10%             {_verdict(met['formula_median_abs'])}")
    return "\n".join(lines)


def library_cache_share(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How much higher each case's RSS peak is with the math libraries' caches on, where measured.

    Read from ``truth_cpu_library-caches.json`` (``truth.py --cases all --library-caches``): what
    a CPU training process holds beyond live buffers, which the truth leaves out.
    """
    pooled = load_cache("cpu", library_caches=True)["cases"]
    out = {}
    for r in rows:
        other = pooled.get(r["case"])
        truth = r["truth"].get("peak_bytes")
        if truth and other and other.get("spec") == r["spec"]:
            out[r["case"]] = (other["peak_bytes"] - truth) / truth
    return out


def render_library_caches(shares: dict[str, float]) -> str:
    if not shares:
        return ""
    values = sorted(shares.values())
    return (f"with MKL's and oneDNN's caches on (truth_cpu_library-caches.json, "
            f"{len(values)} cases) the RSS peak differs by "
            f"{100 * values[0]:+.1f}% to {100 * values[-1]:+.1f}% "
            f"(median {100 * median(values):+.1f}%): CPU memory beyond live buffers")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


# --------------------------------------------------------------------------- command line


def _kept(output: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The tracked results of a run of some cases: the file's other cases kept, in their order, with
    this run's rows in place of theirs (new cases at the end), and its other keys (a ``note``)."""
    if not output.exists():
        return {}
    old = json.loads(output.read_text())
    new = {row["case"]: row for row in rows}
    merged = [new.pop(row["case"], row) for row in old.get("cases", [])]
    return {**old, "cases": [*merged, *new.values()]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="all", help="comma-separated case names, or 'all'")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--refresh", action="store_true", help="measure every truth again")
    add_output_arguments(parser, "accuracy_<device>.json")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a GPU visible to torch; run it on a GPU machine")
    try:
        cases = select_cases(args.cases)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = evaluate(cases, args.device, methods, args.refresh, args.update_results and args.out is None)
    output = result_path(args, f"accuracy_{args.device}.json")
    kept = _kept(output, rows) if args.update_results and args.cases != "all" else {}
    rows = kept.pop("cases", rows)
    summary = summarize(rows, methods)
    print(render(rows, methods, args.device))
    print()
    print(render_summary(summary, methods))
    pool = library_cache_share(rows) if args.device == "cpu" else {}
    if pool:
        print("\n" + render_library_caches(pool))
    write_json(output, {**kept, "machine": machine_info(args.device), "device": args.device,
                        "targets": TARGETS, "summary": summary, "library_cache_share": pool,
                        "cases": rows})
    print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
