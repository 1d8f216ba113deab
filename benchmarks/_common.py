"""Helpers shared by the benchmark scripts: machine description, tables, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""The tracked results the README and the notes cite; a run writes here only with ``--update-results``."""

SCRATCH = Path(__file__).resolve().parents[1] / "out" / "benchmarks"
"""Where a run writes by default: ``out/`` is ignored by git, so running a benchmark never rewrites
the tracked results."""


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH`` (also ``--output``) and ``--update-results`` for a script that writes ``name``."""
    parser.add_argument("--out", "--output", dest="out", type=Path, default=None,
                        help=f"result file (default: out/benchmarks/{name}, which git ignores)")
    parser.add_argument("--update-results", action="store_true",
                        help=f"write benchmarks/results/{name}, the tracked file the README cites")


def result_path(args: argparse.Namespace, name: str) -> Path:
    """Where this run writes ``name``: ``--out``, else the tracked results with ``--update-results``,
    else :data:`SCRATCH`."""
    if args.out is not None:
        return Path(args.out)
    return (RESULTS if args.update_results else SCRATCH) / name


def readable_result(name: str) -> Path:
    """The newest copy of ``name`` to read (a cache of measured truths): this machine's own run in
    :data:`SCRATCH` when there is one, else the tracked one."""
    scratch = SCRATCH / name
    return scratch if scratch.exists() else RESULTS / name


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, library versions, date."""
    import torch
    import transformers

    import memguard

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": memguard.device_memory("cpu").total_bytes,  # MemTotal, or the container's limit
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "memguard": memguard.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal, for tables."""
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = "-" * len(line(headers))
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def median(values: Sequence[float]) -> float | None:
    """The median, or ``None`` for no values."""
    return statistics.median(values) if values else None
