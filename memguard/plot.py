"""Predicted memory against batch size and sequence length, and a picture of it.

The data functions are pure: :func:`sweep` runs an estimator over a range of one input and
returns a :class:`Sweep`; :func:`batch_sizes_for` and :func:`seq_lens_for` choose the points.
:func:`render` draws one or two sweeps as areas stacked by :class:`~memguard.Category`, with the
GPU's capacity, the margin and the largest fitting batch marked. matplotlib is an optional extra
(``pip install 'memguard-train[plot]'``), imported only by :func:`render` and :func:`check_output`.

>>> import memguard
>>> from memguard import plot
>>> at = lambda b: memguard.estimate("gpt2", b, 256, method="trace")  # doctest: +SKIP
>>> plot.render(plot.sweep(at, "batch_size", [1, 2, 4, 8]), None, "mem.png")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memguard.errors import ConfigError, require
from memguard.estimation.result import Category, MemoryEstimate
from memguard.fit import usable_bytes
from memguard.units import format_bytes, parse_bytes

__all__ = ["AXES", "Sweep", "batch_sizes_for", "check_output", "render", "render_timeline", "seq_lens_for", "sweep"]

AXES = ("batch_size", "seq_len")
"""What a sweep can vary."""

_LABELS = {"batch_size": "batch size", "seq_len": "sequence length (tokens)"}
_COLORS = {
    Category.PARAMETERS: "#4c72b0",
    Category.GRADIENTS: "#55a868",
    Category.OPTIMIZER_STATE: "#8172b2",
    Category.ACTIVATIONS: "#dd8452",
    Category.TEMPORARY: "#ccb974",
    Category.OVERHEAD: "#8c8c8c",
}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Estimates along one input, the others fixed.

    Attributes:
        axis: ``"batch_size"`` or ``"seq_len"``.
        values: the input's values, increasing.
        estimates: the estimate at each value.
        stopped: why the sweep ended before its last value (e.g. the model's maximum length), or
            ``None``.
    """

    axis: str
    values: tuple[int, ...]
    estimates: tuple[MemoryEstimate, ...]
    stopped: str | None = None

    def series(self) -> dict[Category, list[int]]:
        """Bytes of each category along the sweep."""
        return {c: [e.breakdown[c] for e in self.estimates] for c in Category}

    def totals(self) -> list[int]:
        """Total bytes along the sweep."""
        return [e.total_bytes for e in self.estimates]

    def uppers(self) -> list[int]:
        """The upper end of each point's band (what the fit decision compares) along the sweep."""
        return [e.upper_bytes for e in self.estimates]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the axis, and per point its value, total, upper end and breakdown."""
        return {
            "axis": self.axis,
            "points": [{self.axis: v, "total_bytes": e.total_bytes, "upper_bytes": e.upper_bytes,
                        "peak_bytes": e.peak_bytes, "breakdown": e.to_dict()["breakdown"]}
                       for v, e in zip(self.values, self.estimates, strict=True)],
            "stopped": self.stopped,
        }


def sweep(estimate_at: Callable[[int], MemoryEstimate], axis: str, values: Sequence[int], *,
          stop_at_error: bool = False) -> Sweep:
    """Estimate at each of ``values``.

    Args:
        estimate_at: the estimate for one value of ``axis``.
        axis: ``"batch_size"`` or ``"seq_len"``.
        values: the points, increasing.
        stop_at_error: end the sweep at the first value that raises :class:`ConfigError` once at
            least one value worked (a sequence longer than the model can take); the error goes in
            :attr:`Sweep.stopped`. Otherwise, and for the first value, the error is raised.

    Raises:
        ConfigError: for an unknown axis, no values, values not increasing, or a failed estimate.
    """
    if axis not in AXES:
        raise ConfigError(f"unknown sweep axis {axis!r}; expected one of {', '.join(AXES)}")
    points = [int(v) for v in values]
    if not points:
        raise ConfigError("a sweep needs at least one value")
    if any(b <= a for a, b in itertools.pairwise(points)) or points[0] < 1:
        raise ConfigError(f"sweep values must be positive and increasing, got {points}")
    done: list[int] = []
    estimates: list[MemoryEstimate] = []
    stopped = None
    for v in points:
        try:
            estimates.append(estimate_at(v))
        except ConfigError as exc:
            if not (stop_at_error and estimates):
                raise
            stopped = f"stopped before {axis} {v}: {exc}"
            break
        done.append(v)
    return Sweep(axis, tuple(done), tuple(estimates), stopped)


def batch_sizes_for(max_batch: int, points: int = 6) -> list[int]:
    """Batch sizes that show the memory up to, and a little past, the largest that fits.

    About ``points`` sizes spread evenly from 1 to a quarter past ``max_batch``, plus
    ``max_batch`` and ``max_batch + 1`` (where the capacity is crossed). When nothing fits
    (``max_batch`` 0), 1, 2, 4 and 8.
    """
    if max_batch < 1:
        return [1, 2, 4, 8]
    top = max(max_batch + 1, math.ceil(max_batch * 1.25))
    step = (top - 1) / max(1, points - 1)
    spread = {1 + round(i * step) for i in range(points)}
    return sorted(spread | {max_batch, max_batch + 1})


def seq_lens_for(seq_len: int, points: int = 5) -> list[int]:
    """Sequence lengths doubling up to twice ``seq_len``: ``seq_lens_for(1024)`` is 128 ... 2048."""
    below = max(0, points - 2)
    values = {seq_len * 2} | {max(1, seq_len >> k) for k in range(below + 1)}
    return sorted(values)


_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")


def check_output(path: str | Path) -> Path:
    """Check, before any estimate runs, that ``path`` can be written as an image.

    Raises:
        MissingDependencyError: matplotlib is not installed (with the install hint).
        ConfigError: an image format matplotlib cannot write, or a folder that does not exist.
    """
    require("matplotlib", "plot", "memguard plot")
    out = Path(path)
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in _FORMATS:
        raise ConfigError(f"cannot write a plot to {str(out)!r}: give a file ending in .png, .svg or .pdf")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write a plot to {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def render(by_batch: Sweep, by_seq: Sweep | None, path: str | Path, *, capacity_bytes: int | None = None,
           margin: float = 0.1, max_batch: int | None = None, gpu_name: str = "GPU", title: str = "",
           seq_len: int | None = None, batch_size: int | None = None, dpi: int = 120) -> Path:
    """Draw memory against batch size (and, with ``by_seq``, against sequence length) to ``path``.

    Args:
        by_batch: a sweep along ``batch_size``.
        by_seq: a sweep along ``seq_len`` for the second panel, or ``None`` for one panel.
        path: the image to write; the format follows the suffix.
        capacity_bytes: the GPU's free memory, drawn as a line with the usable memory
            (:func:`memguard.fit.usable_bytes`) below it.
        margin: the share of ``capacity_bytes`` kept spare, as in :class:`memguard.fit.Fit`.
        max_batch: the largest fitting batch, marked on the first panel (0 or ``None``: none).
        gpu_name: the GPU's name (or ``"budget"``) for the legend.
        title: the figure's title.
        seq_len: the sequence length of the batch panel, marked on the second panel.
        batch_size: the batch size of the sequence panel, for its title.
        dpi: resolution of raster formats.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        ConfigError: the file cannot be written, or, with ``capacity_bytes``, ``margin`` is outside
            ``[0, 1)``.
    """
    require("matplotlib", "plot", "memguard plot")
    from matplotlib.figure import Figure

    sweeps = [s for s in (by_batch, by_seq) if s is not None and s.values]
    if not sweeps:
        raise ConfigError("nothing to plot: the sweeps are empty")
    top = max(max(s.uppers()) for s in sweeps)
    if capacity_bytes:
        top = max(top, capacity_bytes)
    unit_name, unit = ("GiB", parse_bytes("1GiB")) if top >= parse_bytes("2GiB") else ("MiB", parse_bytes("1MiB"))

    fig = Figure(figsize=(6.4 * len(sweeps), 4.8), layout="constrained")
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, s in zip(axes, sweeps, strict=True):
        _draw_stack(ax, s, unit)
        if s.uppers() != s.totals():  # the band: what fits is decided on its upper end
            ax.plot(list(s.values), [u / unit for u in s.uppers()], color="black", linewidth=1.0, linestyle="-.",
                    label="upper end of the band (what must fit)")
        if capacity_bytes:
            ax.axhline(capacity_bytes / unit, color="#c44e52", linewidth=1.6,
                       label=f"{gpu_name}: {format_bytes(capacity_bytes)} free")
            if margin:
                ax.axhline(usable_bytes(capacity_bytes, margin) / unit, color="#c44e52", linewidth=1.0,
                           linestyle="--", label=f"usable with a {margin * 100:g}% margin")
        ax.set_xlabel(_LABELS[s.axis])
        ax.set_ylabel(f"predicted memory ({unit_name})")
        ax.set_ylim(0, top * 1.08 / unit)
        ax.grid(True, alpha=0.3)
    if sweeps[0] is by_batch:
        _mark_batch_panel(axes[0], by_batch, unit, max_batch=max_batch, seq_len=seq_len)
    if by_seq is not None and by_seq.values:
        _mark_seq_panel(axes[-1], by_seq, unit, seq_len=seq_len, batch_size=batch_size)
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="upper left", fontsize="small", framealpha=0.9)
    return _save(fig, path, title, dpi)


def _mark_batch_panel(ax: Any, by_batch: Sweep, unit: int, *, max_batch: int | None, seq_len: int | None) -> None:
    """Integer ticks, the title, and the largest fitting batch as a line and a point."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"against batch size (seq {seq_len})" if seq_len else "against batch size")
    if max_batch:
        totals = dict(zip(by_batch.values, by_batch.totals(), strict=True))
        ax.axvline(max_batch, color="#2ca02c", linestyle=":", linewidth=1.6,
                   label=f"largest fitting batch: {max_batch}")
        if max_batch in totals:
            ax.plot([max_batch], [totals[max_batch] / unit], marker="o", color="#2ca02c", clip_on=False)


def _mark_seq_panel(ax: Any, by_seq: Sweep, unit: int, *, seq_len: int | None, batch_size: int | None) -> None:
    """A log-2 axis at the swept lengths, the title, and ``--seq-len`` as a line and a point."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(by_seq.values), [str(v) for v in by_seq.values])
    ax.set_title(f"against sequence length (batch {batch_size})" if batch_size else "against sequence length")
    if seq_len:
        ax.axvline(seq_len, color="#2ca02c", linestyle=":", linewidth=1.6, label=f"--seq-len {seq_len}")
        totals = dict(zip(by_seq.values, by_seq.totals(), strict=True))
        if seq_len in totals:
            ax.plot([seq_len], [totals[seq_len] / unit], marker="o", color="#2ca02c", clip_on=False)


def _save(fig: Any, path: str | Path, title: str, dpi: int) -> Path:
    """Title ``fig`` and write it to ``path``, the format following the suffix; a failure is a :class:`ConfigError`."""
    if title:
        fig.suptitle(title)
    out = Path(path)
    try:
        fig.savefig(out, dpi=dpi)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot write a plot to {str(out)!r}: {exc}") from None
    return out


_PHASE_COLORS = {"forward": "#dd8452", "backward": "#4c72b0", "block-backward": "#4c72b0",
                 "optimizer": "#8172b2", "other": "#8c8c8c"}


def render_timeline(est: MemoryEstimate, path: str | Path, *, capacity_bytes: int | None = None,
                    margin: float = 0.1, title: str = "", dpi: int = 120) -> Path:
    """Draw live bytes through the traced step (:attr:`MemoryEstimate.timeline`), phase by phase,
    with the peak and the GPU's usable memory marked: what PyTorch's memory snapshot viewer shows.

    Raises:
        ConfigError: the estimate has no timeline (only the trace makes one), or the file cannot be
            written.
        MissingDependencyError: matplotlib is not installed.
    """
    if not est.timeline:
        raise ConfigError(f"the {est.method} estimate has no timeline; only method='trace' makes one")
    require("matplotlib", "plot", "memguard plot --timeline")
    from matplotlib.figure import Figure

    top = max(live for _, _, live in est.timeline)
    unit_name, unit = ("GiB", parse_bytes("1GiB")) if top >= parse_bytes("2GiB") else ("MiB", parse_bytes("1MiB"))
    fig = Figure(figsize=(9.6, 4.8), layout="constrained")
    ax = fig.subplots()
    xs = list(range(len(est.timeline)))
    ys = [live / unit for _, _, live in est.timeline]
    ax.plot(xs, ys, color="#222222", linewidth=1.2)
    start, seen = 0, set()
    for k in range(1, len(est.timeline) + 1):  # shade each run of one phase
        if k == len(est.timeline) or est.timeline[k][1] != est.timeline[start][1]:
            phase = est.timeline[start][1]
            label = None if phase in seen else phase
            seen.add(phase)
            ax.axvspan(start, k - 1, color=_PHASE_COLORS.get(phase, "#8c8c8c"), alpha=0.15, label=label)
            start = k
    peak_at = max(xs, key=lambda k: est.timeline[k][2])
    ax.plot([peak_at], [ys[peak_at]], marker="o", color="#c44e52",
            label=f"peak {format_bytes(top)} ({est.timeline[peak_at][1]})")
    if capacity_bytes:
        usable = usable_bytes(capacity_bytes, margin)
        ax.axhline(usable / unit, color="#c44e52", linestyle="--", linewidth=1.0,
                   label=f"usable: {format_bytes(usable)}")
    ax.set_xlabel("allocation and free events of one training step")
    ax.set_ylabel(f"live tensors ({unit_name})")
    ax.set_ylim(0, max(top, capacity_bytes or 0) * 1.08 / unit)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    return _save(fig, path, title, dpi)


def _draw_stack(ax: Any, s: Sweep, unit: int) -> None:
    """The categories of ``s`` as stacked areas, in the order of :class:`Category`, zeros left out."""
    series = {c: v for c, v in s.series().items() if any(v)}
    ax.stackplot(list(s.values), *[[b / unit for b in v] for v in series.values()],
                 labels=[c.value.replace("_", " ") for c in series], colors=[_COLORS[c] for c in series],
                 alpha=0.85)
    ax.plot(list(s.values), [t / unit for t in s.totals()], color="black", linewidth=1.0, marker=".")
    if len(s.values) > 1:
        ax.set_xlim(s.values[0], s.values[-1])
