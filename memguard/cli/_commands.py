"""``memguard estimate``, ``check``, ``max-batch``, ``plan`` and ``gpus``: each reads its ``args``, asks the
library, and writes through :class:`~memguard.cli._output.Output`; each returns the exit status.

The verdict is :class:`memguard.fit.Fit`'s: its :meth:`~memguard.fit.Fit.describe` is the
``FITS``/``DOES NOT FIT`` line of ``check``, its :meth:`~memguard.fit.Fit.needs` the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

import memguard
from memguard.cli._output import EXIT_DOES_NOT_FIT, EXIT_OK, Output, github_error, in_github_actions
from memguard.cli._shared import (
    EstimateAt,
    describe_gpu,
    estimate_once,
    estimator,
    model_words,
    remedies,
    resolve_gpu,
    show_remedies,
    verb,
)
from memguard.device.readers import list_devices, why_no_gpu
from memguard.errors import ConfigError
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.search import BatchSearch, max_batch_size
from memguard.fit import Fit, usable_bytes
from memguard.units import format_bytes

__all__ = ["cmd_check", "cmd_estimate", "cmd_gpus", "cmd_max_batch", "cmd_plan", "search"]


def cmd_estimate(args: argparse.Namespace, out: Output) -> int:
    est = estimate_once(args, out)
    if out.json_mode:
        out.json(est.to_dict())
    else:
        out.text(est.table(top=args.top))
    return EXIT_OK


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    gpu = resolve_gpu(args.gpu, args.precision, getattr(args, "readers", None))
    est = estimate_once(args, out)
    fit = Fit(est, gpu.free_bytes, args.margin, gpu.name)
    rows = [] if fit.fits else remedies(est, gpu, args.margin, out)
    if out.json_mode:
        out.json({**est.to_dict(), "device": gpu.to_dict(), "margin": args.margin, "usable_bytes": fit.usable_bytes,
                  "needed_bytes": fit.needed_bytes, "fits": fit.fits,
                  "verdict": "fits" if fit.fits else "does not fit",
                  "remedies": [] if isinstance(rows, str) else [r.to_dict() for r in rows]})
        return EXIT_OK if fit.fits else EXIT_DOES_NOT_FIT
    out.text(est.table())
    out.text()
    out.text(describe_gpu(gpu, args.gpu))
    out.text(fit.describe())
    if fit.fits:
        return EXIT_OK
    show_remedies(rows, model_words(args), args.gpu, out)
    if in_github_actions():
        inputs = est.inputs
        out.text(github_error(
            f"{inputs.get('model')} (batch {inputs.get('batch_size')}, seq {inputs.get('seq_len')}, "
            f"{inputs.get('precision')}) does not fit {gpu.name}: {fit.needs()}"
        ))
    return EXIT_DOES_NOT_FIT


def search(args: argparse.Namespace, gpu: memguard.DeviceMemory, estimate_at: EstimateAt, out: Output,
           method: str) -> BatchSearch:
    """The largest fitting batch at ``--seq-len``, with a progress line per try."""
    out.progress(f"searching the largest batch of {args.model} that fits {gpu.name} "
                 f"({format_bytes(usable_bytes(gpu.free_bytes, args.margin))} usable); "
                 f"{verb(method)} one step per try ...")

    def at(batch_size: int) -> MemoryEstimate:
        est = estimate_at(batch_size, args.seq_len)
        fit = Fit(est, gpu.free_bytes, args.margin)
        verdict = "fits" if fit.fits else "does not fit"
        out.progress(f"  batch {batch_size}: {format_bytes(fit.needed_bytes)}, {verdict}")
        return est

    return max_batch_size(at, gpu.free_bytes, margin=args.margin, limit=args.limit)


def cmd_max_batch(args: argparse.Namespace, out: Output) -> int:
    gpu = resolve_gpu(args.gpu, args.precision, getattr(args, "readers", None))
    found = search(args, gpu, estimator(args), out, args.method or "auto")
    fit = Fit(found.estimate, gpu.free_bytes, args.margin, gpu.name)
    if out.json_mode:
        out.json({
            "max_batch_size": found.batch_size,
            "capped": found.capped,
            "device": gpu.to_dict(),
            "margin": args.margin,
            "usable_bytes": fit.usable_bytes,
            "estimate": found.estimate.to_dict(),
            "trials": [{"batch_size": b, "needed_bytes": t} for b, t in found.trials],
        })
        return EXIT_OK if found.batch_size else EXIT_DOES_NOT_FIT
    out.text(found.estimate.table())
    out.text()
    out.text(describe_gpu(gpu, args.gpu))
    if not found.batch_size:
        out.text(f"NOTHING FITS: batch size 1 {fit.needs()}")
        show_remedies(remedies(found.estimate, gpu, args.margin, out), model_words(args), args.gpu, out)
        return EXIT_DOES_NOT_FIT
    line = (f"max batch size: {found.batch_size} (needs {format_bytes(fit.needed_bytes)} of "
            f"{format_bytes(fit.usable_bytes)} usable, {fit.room()}")
    above = dict(found.trials).get(found.batch_size + 1)
    if above is not None:
        line += f"; {found.batch_size + 1} needs {format_bytes(above)}"
    if found.capped:
        line += f"; the search stopped at --limit {args.limit}"
    out.text(line + ")")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, out: Output) -> int:
    from memguard.planning import plan
    from memguard.planning.rows import SEARCHED_KNOBS

    gpu = resolve_gpu(args.gpu, args.precision, getattr(args, "readers", None))
    base = {**{name: getattr(args, name) for name in SEARCHED_KNOBS if name != "batch_size"},
            "optimizer": _optimizer_for_plan(args.optimizer),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}
    out.progress(f"planning {args.model} on {gpu.name} ...")
    extra = dict(getattr(args, "estimate_extra", {}))  # from --config (memguard.cli._config)
    model = extra.pop("model", args.model)
    if "step_fn" in extra:
        raise ConfigError("plan searches hundreds of configurations through the formula, which a LightningModule's "
                          "own training_step does not have (each would be a traced step); use 'memguard check "
                          "--config' and its remedies, or plan the underlying model (a preset or config.json)")
    found = plan(model, gpu=gpu, seq_len=args.seq_len, gpus=args.gpus, batch_size=args.batch_size or 1,
                 margin=args.margin, base=base, device=args.device, confirm=args.confirm, limit=args.top,
                 method_prune="trace" if args.method == "trace" else "formula",
                 estimate_kwargs={"set_to_none": args.set_to_none, "keep_output": args.keep_output,
                                  "trace_timeout": args.trace_timeout,
                                  "moe_routing": args.moe_routing, "decoder_seq_len": args.decoder_seq_len,
                                  **extra},
                 progress=out.progress if out.progress_shown else None)
    if out.json_mode:
        out.json([row.to_dict() for row in found.rows])
    else:
        out.text(found.table(top=args.top))
    if not args.quiet:  # on a terminal or in a CI log alike: how long the search took
        out.note(f"{found.searched()}")
    return EXIT_OK if found.rows else EXIT_DOES_NOT_FIT


def _optimizer_for_plan(optimizer: Any) -> Any:
    """A name where ``--config`` built the optimizer (:mod:`memguard.run_config`): plan varies optimizers by name."""
    if callable(optimizer) and not isinstance(optimizer, type):
        name = getattr(optimizer, "memguard_name", None)
        if name is None:
            raise ConfigError(f"plan varies optimizers by name, and the file's {optimizer.__name__} has none in "
                              "memguard; give the closest with --optimizer")
        return name
    return optimizer


def cmd_gpus(args: argparse.Namespace, out: Output) -> int:
    devices = list_devices(readers=getattr(args, "readers", None))
    reason = "" if devices else why_no_gpu(readers=getattr(args, "readers", None))
    if out.json_mode:
        data: dict[str, Any] = {"devices": [d.to_dict() for d in devices]}
        if not devices:
            data["reason"] = reason
        if args.catalog:
            data["catalog"] = [{"name": s.name, "vendor": s.vendor, "total_bytes": s.total_bytes}
                               for s in memguard.GPU_CATALOG.values()]
        out.json(data)
        return EXIT_OK
    if devices:
        for d in devices:
            out.text(f"{d.device or d.index}: {d.name}, {format_bytes(d.free_bytes)} free of "
                     f"{format_bytes(d.total_bytes)} ({d.source})")
    else:
        why = f" ({' '.join(reason.split())})" if reason else ""
        out.text(f"no GPU visible to this process{why}; plan against a catalog GPU (--gpu A100-80GB) or a "
                 "size (--gpu 24GiB)")
    if args.catalog:
        out.text()
        out.text("catalog (free = total, assumed empty):")
        for s in memguard.GPU_CATALOG.values():
            out.text(f"  {s.name:<12} {format_bytes(s.total_bytes):>12}  {s.vendor}")
    return EXIT_OK
