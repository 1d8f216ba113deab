"""``memguard plot``: memory against batch size and sequence length, or ``--timeline`` through one step.

The sweeps and the drawing are :mod:`memguard.plot`'s; this module chooses the estimator, runs the
search and the sweeps with progress lines, and writes the summary.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import memguard
from memguard import plot as _plot
from memguard.cli._commands import search
from memguard.cli._output import EXIT_OK, Output
from memguard.cli._shared import EstimateAt, describe_inputs, estimate_once, estimator, first_sentence, resolve_gpu
from memguard.device.memory import MemorySource
from memguard.device.readers import Readers
from memguard.errors import ConfigError, DeviceError, MemguardError
from memguard.estimation.result import MemoryEstimate
from memguard.fit import usable_bytes
from memguard.units import format_bytes

__all__ = ["cmd_plot"]


def cmd_plot(args: argparse.Namespace, out: Output) -> int:
    readers = getattr(args, "readers", None)
    if args.timeline:
        gpu_or_none = _timeline_gpu(args.gpu, args.precision, readers)
        return _plot_timeline(args, out, gpu_or_none, _plot.check_output(args.output))
    gpu = resolve_gpu(args.gpu, args.precision, readers)
    path = _plot.check_output(args.output)
    method, estimate_at = _plot_estimator(args, out)
    found = search(args, gpu, estimate_at, out, method)
    seq_len = found.estimate.inputs.get("seq_len")
    batch_sizes = _plot.batch_sizes_for(found.batch_size)
    by_batch = _plot.sweep(_traced(estimate_at, out, args.model, seq_len=seq_len), "batch_size", batch_sizes)
    fixed_batch = args.batch_size or max(1, found.batch_size)
    by_seq = None
    if seq_len is not None:
        by_seq = _plot.sweep(_traced(estimate_at, out, args.model, batch_size=fixed_batch),
                             "seq_len", _plot.seq_lens_for(seq_len), stop_at_error=True)
    inputs = found.estimate.inputs
    title = (f"{inputs.get('model')}: {inputs.get('precision')}, {inputs.get('optimizer')}, "
             f"{inputs.get('device')} ({found.estimate.method})")
    _plot.render(by_batch, by_seq, path, capacity_bytes=gpu.free_bytes, margin=args.margin,
                 max_batch=found.batch_size, gpu_name=_short_name(gpu), title=title, seq_len=seq_len,
                 batch_size=fixed_batch)
    usable = usable_bytes(gpu.free_bytes, args.margin)
    if out.json_mode:
        out.json({"output": str(path), "max_batch_size": found.batch_size, "capped": found.capped,
                  "device": gpu.to_dict(), "margin": args.margin, "usable_bytes": usable,
                  "method": found.estimate.method, "batch_sweep": by_batch.to_dict(),
                  "seq_sweep": by_seq.to_dict() if by_seq else None})
        return EXIT_OK
    out.text(f"wrote {path} ({found.estimate.method} estimates)")
    out.text(f"  batch sizes {by_batch.values[0]}-{by_batch.values[-1]} at seq {seq_len}; largest that fits "
             f"{gpu.name} ({format_bytes(usable)} usable): {found.batch_size}")
    if by_seq is not None:
        out.text(f"  sequence lengths {by_seq.values[0]}-{by_seq.values[-1]} at batch {fixed_batch}")
        if by_seq.stopped:
            out.text(f"  {by_seq.stopped}")
    return EXIT_OK


def _plot_estimator(args: argparse.Namespace, out: Output) -> tuple[str, EstimateAt]:
    """``--method`` if given; else the formula (a sweep takes many estimates) where it works, else the trace."""
    if args.method:
        return args.method, estimator(args, args.method)
    formula = estimator(args, "formula")
    try:
        formula(1, args.seq_len)
    except (MemguardError, ImportError) as exc:
        out.progress(f"the formula cannot estimate {args.model} ({first_sentence(exc)}); tracing instead")
        return "trace", estimator(args, "trace")
    return "formula", formula


def _timeline_gpu(text: str, precision: str | None, readers: Readers | None) -> memguard.DeviceMemory | None:
    """The GPU whose usable memory the timeline marks, or ``None``: a timeline needs no GPU, so
    ``--gpu auto`` (the default) on a machine without a readable one draws the step without the line.
    A GPU named on purpose (a catalog name, a size, an index) must still be read."""
    try:
        return resolve_gpu(text, precision, readers)
    except DeviceError:
        if text.strip().lower() != "auto":
            raise
        return None


def _plot_timeline(args: argparse.Namespace, out: Output, gpu: memguard.DeviceMemory | None, path: Any) -> int:
    """``plot --timeline``: live memory through one traced step, against ``gpu`` when there is one."""
    if args.method not in (None, "auto", "trace"):
        raise ConfigError(f"--timeline draws a traced step; --method {args.method} makes no timeline")
    args.method = "trace"
    est = estimate_once(args, out)
    inputs = est.inputs
    title = (f"{inputs.get('model')}: batch {inputs.get('batch_size')}, seq {inputs.get('seq_len')}, "
             f"{inputs.get('precision')}, {inputs.get('optimizer')}")
    _plot.render_timeline(est, path, capacity_bytes=gpu.free_bytes if gpu is not None else None,
                          margin=args.margin, title=title)
    if out.json_mode:
        out.json({"output": str(path), "device": gpu.to_dict() if gpu is not None else None, **est.to_dict()})
    else:
        out.text(f"wrote {path}: peak {format_bytes(est.peak_bytes)} of live tensors, {len(est.timeline)} points")
        if gpu is None:
            out.text("  no GPU can be read here, so no usable-memory line (--gpu A100-40GB or --gpu 24GiB adds one)")
    return EXIT_OK


def _short_name(gpu: memguard.DeviceMemory) -> str:
    """The GPU's name for a legend: ``"budget"`` for a plain size, whose name repeats the size."""
    return "budget" if gpu.source is MemorySource.BUDGET and gpu.name.startswith("budget of") else gpu.name


def _traced(estimate_at: EstimateAt, out: Output, model: str, *,
            batch_size: int | None = None, seq_len: int | None = None) -> Callable[[int], MemoryEstimate]:
    """One axis of ``estimate_at`` (the other fixed), with a progress line per estimate."""

    def at(value: int) -> MemoryEstimate:
        b, s = (value, seq_len) if batch_size is None else (batch_size, value)
        est = estimate_at(b, s)
        out.progress(f"  {describe_inputs(model, b, s)}: {format_bytes(est.total_bytes)}")
        return est

    return at
