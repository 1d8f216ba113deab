"""The error distribution of memguard against published GPU runs, as a plot and a markdown table.

Reads what ``published.py --json`` wrote and draws, for each complete row, the error of the point
estimate and of the upper end of its band (``MemoryEstimate.upper_bytes``: the band's workspaces
added to the statistic the source measured), with the margin that covers every row.

Usage (from the repository root)::

    python benchmarks/published.py --set new --json benchmarks/results/published_new.json
    python benchmarks/published_plot.py benchmarks/results/published_new.json \\
        --png benchmarks/results/published_errors.png

Several files (runs of ``--rows``) are merged, a later one's row replacing an earlier one's
(``--merged FILE`` writes the result).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median


def errors(records: Sequence[dict[str, Any]], method: str) -> list[tuple[str, float, float]]:
    """``(row key, point error, upper error)`` of every row ``method`` predicted."""
    out = []
    for r in records:
        p = r["predictions"].get(method, {})
        if isinstance(p.get("error"), float):  # a failed method has its exception's name there
            out.append((r["key"], p["error"], p.get("upper_error", p["error"])))
    return out


def margin(errs: Sequence[float]) -> float:
    """The share of the usable memory to keep spare so that no row would have been let through: a
    step predicted at ``p = (1 + e) * measured`` is accepted while ``p <= (1 - m) * free``, so it fits
    its measurement whenever ``1 - m <= 1 + e``, for every error ``e``: ``m = -min(e)`` (zero when no
    row is low)."""
    return max(0.0, -min(errs)) if errs else 0.0


def markdown(rows: Sequence[tuple[str, float, float]]) -> str:
    lines = ["| row | point err | upper err |", "|---|---:|---:|"]
    lines += [f"| {k} | {e * 100:+.1f}% | {u * 100:+.1f}% |" for k, e, u in rows]
    point, upper = [e for _, e, _ in rows], [u for _, _, u in rows]
    lines.append(f"| median \\|err\\| | {median([abs(e) for e in point]) * 100:.1f}% | "
                 f"{median([abs(u) for u in upper]) * 100:.1f}% |")
    lines.append(f"| lowest | {min(point) * 100:+.1f}% | {min(upper) * 100:+.1f}% |")
    lines.append(f"| margin that covers every row | {margin(point) * 100:.1f}% | {margin(upper) * 100:.1f}% |")
    return "\n".join(lines)


def plot(rows: Sequence[tuple[str, float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))
    ax.scatter([e * 100 for _, e, _ in rows], y, label="point estimate", marker="o")
    ax.scatter([u * 100 for _, _, u in rows], y, label="upper end of the band", marker="^")
    for i, (_, e, u) in enumerate(rows):
        ax.plot([e * 100, u * 100], [i, i], color="grey", linewidth=0.8)
    low = margin([e for _, e, _ in rows])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvspan(-3, 3, color="green", alpha=0.08, label="±3%")
    ax.axvline(-low * 100, color="red", linestyle="--", linewidth=0.8,
               label=f"lowest point error ({-low * 100:.1f}%)")
    ax.set_yticks(list(y), keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("(prediction - published) / published, %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="what published.py --json wrote; a row in a later file replaces the same row before")
    parser.add_argument("--method", default="trace")
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument("--merged", type=Path, help="write the rows of all files, merged, to this JSON file")
    args = parser.parse_args(argv)
    records: dict[str, dict[str, Any]] = {}
    for path in args.json:
        for r in json.loads(path.read_text())["rows"]:
            records[r["key"]] = r
    if args.merged:
        args.merged.write_text(json.dumps({"rows": list(records.values())}, indent=1) + "\n")
    rows = errors(list(records.values()), args.method)
    print(markdown(rows))
    if args.png:
        plot(rows, args.png, f"memguard ({args.method}) against {len(rows)} published GPU runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
