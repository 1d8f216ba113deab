"""``memguard report LOGDIR``: predicted against actual peak, per run, and the error distribution."""

from __future__ import annotations

import argparse
from pathlib import Path

from memguard.cli._output import EXIT_OK, Output
from memguard.errors import ConfigError
from memguard.report import Record, error_summary, read_logs
from memguard.units import format_bytes

__all__ = ["cmd_report"]


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    root = Path(args.logdir)
    if not root.is_dir():
        raise ConfigError(f"report {args.logdir}: no such folder")
    records, notes = read_logs(root)
    if not records:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ConfigError(f"report {args.logdir}: nothing memguard logged here (no memguard/* values in a "
                          f"metrics.csv, TensorBoard event file or trainer_state.json){why}")
    summary = error_summary(records)
    if out.json_mode:
        out.json({"runs": [r.to_dict() for r in records], "errors": summary, "notes": notes})
        return EXIT_OK
    for record in records:
        out.text(_line(record, root))
    out.text()
    if summary["count"]:
        out.text(f"error (actual / predicted - 1) over {summary['count']} run(s): median "
                 f"{summary['median']:+.1%}, worst low {summary['worst_low']:+.1%}, "
                 f"worst high {summary['worst_high']:+.1%}")
    else:
        out.text("no run has a known actual peak (each was both a lower and an upper bound)")
    for note in notes:
        out.text(f"note: {note}")
    return EXIT_OK


def _line(record: Record, root: Path) -> str:
    where = Path(record.source)
    name = str(where.relative_to(root)) if where.is_relative_to(root) else record.source
    step = f" step {record.step}" if record.step is not None else ""
    actual = {"exact": "", "lower bound": "at least ", "upper bound": "at most "}.get(record.bound, "")
    text = (f"{name}{step}: predicted peak {format_bytes(record.predicted_peak_bytes)}, actual {actual}"
            f"{format_bytes(record.actual_peak_bytes)}, error {record.error:+.1%}")
    if record.bound == "unknown":
        text += " (actual unknown: both a lower and an upper bound)"
    elif record.bound != "exact":
        text += f" (actual is a {record.bound})"
    if record.predicted_total_bytes is not None:
        text += f"; total predicted {format_bytes(record.predicted_total_bytes)}"
        if record.actual_total_bytes is not None:
            text += f", actual {format_bytes(record.actual_total_bytes)}"
    return text
