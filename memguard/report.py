"""Predicted against actual, from what memguard's callbacks logged in real runs.

The callbacks (:class:`~memguard.MemGuard`, :class:`~memguard.MemGuardCallback`) log
``memguard/predicted_peak_bytes``, ``memguard/actual_peak_bytes``, ``memguard/predicted_total_bytes``,
``memguard/actual_total_bytes`` (where NVML lists the process), ``memguard/error``,
``memguard/actual_is_lower_bound`` and ``memguard/actual_is_upper_bound``
(:func:`memguard.device.actual.compare`). They land in:

* Lightning's ``CSVLogger``: ``metrics.csv``, one column per key (``lightning/fabric/loggers/csv_logs.py``);
* Lightning's ``TensorBoardLogger``: ``events.out.tfevents.*`` files, read with tensorboard's
  ``EventAccumulator`` (scalars are stored as float32: byte counts above 2**24 keep 24 significant
  bits, so the error read back is exact to about 1e-7);
* the transformers ``Trainer``'s ``trainer_state.json``: ``log_history`` entries
  (``transformers/trainer_callback.py`` ``TrainerState.save_to_json``).

:func:`read_logs` finds them under a folder, recursively; :func:`error_summary` sums the errors up.
The error is ``actual / predicted - 1`` of the peak, recomputed from the two numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["Record", "error_summary", "read_logs"]

_PREFIX = "memguard/"
_PREDICTED = "memguard/predicted_peak_bytes"
_ACTUAL = "memguard/actual_peak_bytes"


@dataclasses.dataclass(frozen=True)
class Record:
    """One measurement a callback logged.

    Attributes:
        source: the file it was read from.
        step: the global step it was logged at, where known.
        predicted_peak_bytes: the estimate's peak.
        actual_peak_bytes: the measured peak.
        predicted_total_bytes: the estimate's total (peak plus the device's overhead).
        actual_total_bytes: the process's memory as NVML lists it, or ``None``.
        lower_bound: the actual peak is at least this (CPU resident memory without glibc's mmap
            threshold pinned).
        upper_bound: the actual peak is at most this (another allocation shared the counters).
    """

    source: str
    step: int | None
    predicted_peak_bytes: int
    actual_peak_bytes: int
    predicted_total_bytes: int | None
    actual_total_bytes: int | None
    lower_bound: bool
    upper_bound: bool

    @property
    def error(self) -> float:
        """``actual / predicted - 1`` of the peak; NaN without a prediction."""
        return self.actual_peak_bytes / self.predicted_peak_bytes - 1 if self.predicted_peak_bytes else math.nan

    @property
    def bound(self) -> str:
        """``"exact"``, ``"lower bound"`` (at least), ``"upper bound"`` (at most) or ``"unknown"`` (both)."""
        if self.lower_bound and self.upper_bound:
            return "unknown"
        return "lower bound" if self.lower_bound else "upper bound" if self.upper_bound else "exact"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "error": self.error, "bound": self.bound}


def read_logs(logdir: str | Path) -> tuple[list[Record], list[str]]:
    """Every measurement under ``logdir`` (recursively), and notes on what could not be read.

    Returns:
        The records, sorted by file and step, and one note per file skipped (TensorBoard event
        files without tensorboard installed, unreadable files).
    """
    root = Path(logdir)
    records: list[Record] = []
    notes: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.name == "metrics.csv":
                records += _from_csv(path)
            elif path.name == "trainer_state.json":
                records += _from_trainer_state(path)
        except (OSError, ValueError, csv.Error) as exc:
            notes.append(f"{path}: not read ({type(exc).__name__}: {exc})")
    events = sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})
    if events:
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError:
            notes.append(f"{len(events)} TensorBoard folder(s) skipped: tensorboard is not installed "
                         "(pip install tensorboard)")
        else:
            for folder in events:
                for record in _from_events(folder, EventAccumulator):
                    twin = _twin(record, records)
                    if twin is None:
                        records.append(record)
                    else:
                        notes.append(f"{folder}: the measurement of {twin.source} (step {twin.step}), also "
                                     "logged to TensorBoard; counted once")
    return records, notes


def _twin(record: Record, found: list[Record]) -> Record | None:
    """The CSV record of the same run, logged by a second logger: same folder tree, step and numbers.

    Lightning gives each logger of a run its own ``version_N`` folder under the same
    ``lightning_logs``; TensorBoard's float32 keeps 24 bits of each number.
    """
    for other in found:
        if (Path(other.source).parent.parent == Path(record.source).parent and other.step == record.step
                and other.bound == record.bound
                and all(math.isclose(a, b, rel_tol=2**-23) for a, b in (
                    (other.predicted_peak_bytes, record.predicted_peak_bytes),
                    (other.actual_peak_bytes, record.actual_peak_bytes)))):
            return other
    return None


def _record(source: Path, step: Any, values: dict[str, Any]) -> Record | None:
    def number(key: str) -> float | None:
        value = values.get(key)
        if value in (None, ""):
            return None
        value = float(value)
        return None if math.isnan(value) else value

    predicted, actual = number(_PREDICTED), number(_ACTUAL)
    if predicted is None or actual is None:
        return None
    total, actual_total = number("memguard/predicted_total_bytes"), number("memguard/actual_total_bytes")
    return Record(str(source), None if step in (None, "") else int(float(step)), round(predicted), round(actual),
                  None if total is None else round(total), None if actual_total is None else round(actual_total),
                  bool(number("memguard/actual_is_lower_bound")), bool(number("memguard/actual_is_upper_bound")))


def _from_csv(path: Path) -> list[Record]:
    """``metrics.csv`` of Lightning's ``CSVLogger``: one row per ``log_metrics`` call, ``step`` a column."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in (_record(path, row.get("step"), row) for row in rows) if r is not None]


def _from_trainer_state(path: Path) -> list[Record]:
    """``trainer_state.json``: its ``log_history`` entries that hold ``memguard/*`` keys."""
    state = json.loads(path.read_text())
    history = state.get("log_history", []) if isinstance(state, dict) else []
    return [r for r in (_record(path, e.get("step"), e) for e in history if isinstance(e, dict)) if r is not None]


def _from_events(folder: Path, accumulator: Any) -> list[Record]:
    """The ``memguard/*`` scalars of one TensorBoard run folder, grouped by step."""
    events = accumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in events.Tags().get("scalars", []):
        if tag.startswith(_PREFIX):
            for event in events.Scalars(tag):
                by_step.setdefault(int(event.step), {})[tag] = float(event.value)
    return [r for r in (_record(folder, step, values) for step, values in sorted(by_step.items()))
            if r is not None]


def error_summary(records: list[Record]) -> dict[str, Any]:
    """Count, median, worst low (most negative) and worst high error, over records with a known actual."""
    errors = sorted(r.error for r in records if r.bound != "unknown" and not math.isnan(r.error))
    if not errors:
        return {"count": 0, "median": None, "worst_low": None, "worst_high": None}
    return {"count": len(errors), "median": statistics.median(errors), "worst_low": errors[0],
            "worst_high": errors[-1]}
