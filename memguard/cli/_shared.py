"""The pieces every ``memguard`` subcommand shares: the GPU, the estimate, the remedies, their lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import memguard
from memguard._cache import cached
from memguard.cli._output import Output
from memguard.device.catalog import bf16_problem
from memguard.device.memory import MemorySource
from memguard.device.readers import Readers
from memguard.device.spec import DeviceSpec
from memguard.errors import ConfigError, DeviceError, MemguardError
from memguard.estimation.result import MemoryEstimate
from memguard.units import format_bytes

__all__ = ["EstimateAt", "describe_gpu", "describe_inputs", "estimate_kwargs", "estimate_once", "estimator",
           "first_sentence", "model_words", "remedies", "resolve_gpu", "show_remedies", "verb"]

EstimateAt = Callable[[int, int | None], MemoryEstimate]
"""``estimate_at(batch_size, seq_len)``; ``seq_len=None`` is the model's maximum."""


def resolve_gpu(text: str, precision: str | None = None, readers: Readers | None = None) -> memguard.DeviceMemory:
    """``--gpu``, read as :class:`memguard.device.DeviceSpec` (a bare share is of the CUDA device); a CUDA
    device that cannot be read gets the CLI's advice.

    With ``precision`` (``--precision``), a bf16 precision on a GPU without bf16 (T4, V100: catalog's
    :func:`~memguard.device.catalog.bf16_problem`) is refused: the estimate would assume kernels
    that do not run there.
    """
    try:
        gpu = DeviceSpec.parse(text).read(readers, training=DeviceSpec.cuda())
    except DeviceError as exc:
        raise DeviceError(
            f"--gpu {text.strip()}: no CUDA device can be read on this machine ({_without_advice(exc)}); "
            "plan against a catalog GPU (e.g. --gpu A100-80GB; 'memguard gpus --catalog' lists "
            "them) or a size (e.g. --gpu 24GiB)"
        ) from None
    problem = bf16_problem(gpu.name, precision)
    if problem is not None:
        raise ConfigError(f"--precision {precision} on --gpu {text.strip()}: {problem}")
    return gpu


def _without_advice(exc: Exception) -> str:
    """The library's message without its advice to API users (the CLI gives its own)."""
    return str(exc).split(" On a machine without")[0].rstrip(".")


def first_sentence(exc: Exception) -> str:
    text = str(exc)
    return text.split(". ")[0].rstrip(".")


def describe_gpu(gpu: memguard.DeviceMemory, spec: str | None = None) -> str:
    """The ``GPU:`` line; for a size in decimal units (``--gpu 24GB``) a second line says how it is read
    (:attr:`memguard.device.DeviceSpec.note`: SI, 10^9 bytes, and the catalog cards sold at that size)."""
    line = _describe_gpu(gpu)
    note = DeviceSpec.parse(spec).note if spec is not None and gpu.source is MemorySource.BUDGET else None
    return "\n  ".join([line, *note.splitlines()]) if note else line


def _describe_gpu(gpu: memguard.DeviceMemory) -> str:
    """One line: which GPU, how much is free, and where the number comes from."""
    size = format_bytes(gpu.total_bytes)
    if gpu.source == "catalog":
        return f"GPU: {gpu.name}, {size} (catalog GPU, assumed empty: free = total)"
    if gpu.source is MemorySource.BUDGET:
        plain = gpu.name.startswith("budget of")  # a size; "80% of NVIDIA ..." for a share
        return f"GPU: {gpu.name} (free = total)" if plain else f"GPU: {gpu.name}, {size} (budget: free = total)"
    where = f"{gpu.device} " if gpu.device and gpu.device != gpu.name else ""  # "cpu", not "cpu cpu"
    return f"GPU: {where}{gpu.name}, {format_bytes(gpu.free_bytes)} free of {size} ({gpu.source})"


def estimate_kwargs(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """:func:`memguard.estimate`'s keyword arguments from the flags: every knob of a
    :class:`~memguard.estimation.step.Step` that has a flag (the batch size is passed apart), the method
    and the trace's timeout, and what ``--config`` read."""
    from memguard.estimation.step import KNOBS  # only once the command line is read

    return {
        **{name: getattr(args, name) for name in KNOBS if name != "batch_size" and hasattr(args, name)},
        "method": method or args.method or "auto",
        "trace_timeout": args.trace_timeout,
        **getattr(args, "estimate_extra", {}),  # from --config (memguard.cli._config)
    }


def describe_inputs(model: str, batch_size: int | None, seq_len: int | None) -> str:
    seq = "model maximum" if seq_len is None else seq_len
    return f"{model}: batch {batch_size or 1}, seq {seq}"


def verb(method: str) -> str:
    return "tracing" if method in ("auto", "trace") else "estimating"


def estimator(args: argparse.Namespace, method: str | None = None) -> EstimateAt:
    """``estimate_at(batch_size, seq_len)`` for ``args.model``, remembered (:func:`memguard._cache.cached`).

    An estimate at ``seq_len=None`` is also filed under the length ``None`` stood for.
    """
    kwargs = estimate_kwargs(args, method)
    model = kwargs.pop("model", args.model)

    def estimate_at(batch_size: int, seq_len: int | None) -> MemoryEstimate:
        return memguard.estimate(model, batch_size, **{**kwargs, "seq_len": seq_len})

    return cached(estimate_at, aliases=lambda at, est: [(at[0], est.inputs.get("seq_len"))])


def estimate_once(args: argparse.Namespace, out: Output) -> MemoryEstimate:
    """The estimate at ``--batch-size`` (default 1) and ``--seq-len``, with a progress line."""
    method = args.method or "auto"
    out.progress(f"{verb(method)} {describe_inputs(args.model, args.batch_size, args.seq_len)} ...")
    return estimator(args)(args.batch_size or 1, args.seq_len)


def remedies(est: MemoryEstimate, gpu: memguard.DeviceMemory, margin: float, out: Output) -> list[Any] | str:
    """The best few changes that make the step fit, from the one remedy engine (:func:`memguard.remedies`),
    or why the search could not say (it failed, or stopped at its bound): not the same as "none fits"."""
    from memguard.planning import remedies

    out.progress("searching what would fit ...")
    try:
        return remedies(est, gpu, margin, top=3)
    except MemguardError as exc:
        return first_sentence(exc)


def model_words(args: argparse.Namespace) -> str:
    """MODEL and ``--config FILE`` as a command that reproduces this one takes them."""
    built = "model" in getattr(args, "estimate_extra", {})  # a LightningCLI file's module: no MODEL for it
    words = [] if built else [str(args.model)]
    if getattr(args, "config", None):
        words.append(f"--config {args.config}")
    return " ".join(words)


def show_remedies(rows: list[Any] | str, model: str, gpu_arg: str, out: Output) -> None:
    if isinstance(rows, str):
        out.text(f"memguard could not search what would fit: {rows}")
        return
    if not rows:
        out.text("nothing memguard can change (precision, checkpointing, optimizer, batch and accumulation, "
                 "LoRA, sharding, offload) makes it fit this GPU")
        return
    out.text("what would fit (best first; 'memguard plan' lists more):")
    for row in rows:
        out.text(f"  - {row.describe()}")
        out.text(f"    memguard check {model} --gpu {gpu_arg} {' '.join(row.flags)}")
