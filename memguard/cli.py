"""The ``memguard`` command: will a training step fit, before a GPU is booked or a config merged.

A pipeline of small functions, after accelerate's ``commands/estimate.py``: parse the command line,
resolve the GPU, estimate, judge, render. Every subcommand takes ``--json`` for machines and
``--quiet`` to drop the progress lines written on stderr.

::

    memguard estimate MODEL [--batch-size N --seq-len N --precision P --optimizer O --method M
                             --device D --gradient-checkpointing --strategy S --world-size N
                             --offload-optimizer --offload-params --lora-rank R]
    memguard check MODEL ... --gpu auto|INDEX|CATALOG-NAME|SIZE [--margin 0.1]
    memguard max-batch MODEL --seq-len N --gpu ...
    memguard plot MODEL --seq-len N --gpu ... -o FILE.png
    memguard gpus [--catalog]

``MODEL`` is a preset name (``memguard.list_presets()``), a ``config.json`` path or model directory,
or ``package.module:factory`` naming a callable that returns an ``nn.Module``.

Exit status: 0 success (``check``: it fits), 1 it does not fit (``check``; ``max-batch`` when not
even batch size 1 fits), 2 bad usage or input, reported as one line on stderr, 130 interrupted
(Ctrl-C, at any moment, one line and no traceback). Under GitHub Actions (``GITHUB_ACTIONS=true``)
a ``check`` that does not fit also writes an error annotation.

Progress lines ("tracing gpt2: batch 8, seq 1024 ...") are written only when stderr is a terminal,
so a CI log or a script that reads stderr sees warnings and errors alone. torch and the estimator
are imported inside :func:`main`, so a Ctrl-C while torch loads is handled like any other; only
Python's own start and the import of this module (the first ~0.1 s) come before :func:`main`.

With ``--strategy`` and ``--world-size`` the estimate is per device (:mod:`memguard.estimation.parallel`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import memguard
from memguard import device as _device
from memguard import plot as _plot
from memguard.device.catalog import matching_gpus
from memguard.errors import ConfigError, DeviceError, MemguardError
from memguard.estimation.result import MemoryEstimate
from memguard.estimation.search import BatchSearch, max_batch_size
from memguard.units import format_bytes

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""

_PROG = "memguard"
_PACKAGE_DIR = Path(memguard.__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memguard`` command and return its exit status.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 success, 1 does not fit, 2 bad usage or input, 130 interrupted.
    """
    with _watch_ctrl_c() as interrupted:
        try:
            code = _main(argv)
        except KeyboardInterrupt:  # anywhere: importing torch, parsing, tracing, writing
            interrupted.append(True)
        except Exception:
            if not interrupted:
                raise
        if interrupted:  # also when a library swallowed the KeyboardInterrupt and failed later
            with contextlib.suppress(KeyboardInterrupt, OSError):
                sys.stderr.write(f"{_PROG}: interrupted\n")
            return EXIT_INTERRUPTED
        return code


@contextlib.contextmanager
def _watch_ctrl_c() -> Iterator[list[bool]]:
    """Note every SIGINT while ``main`` runs, then raise ``KeyboardInterrupt`` as Python does.

    A ``KeyboardInterrupt`` that lands inside a library's import can be swallowed there by a broad
    ``except`` and come back as another error (an import of numpy cut short, then a
    ``ModuleNotFoundError`` from transformers); the note makes that an interruption too. Left alone
    where SIGINT is ignored or handled by someone else, or off the main thread.
    """
    seen: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    previous = None
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield seen
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = _build_parser()
    except MemguardError as exc:
        return _fail(str(exc))
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    quiet = args.quiet or args.json
    out = _Output(json_mode=args.json, quiet=quiet, progress_shown=not quiet and _is_terminal(sys.stderr))
    try:
        with _quiet_libraries(quiet=args.quiet, models=args.command != "gpus"):
            return args.run(args, out)
    except MemguardError as exc:
        return _fail(str(exc))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # a replaced or closed stream
        return False


# -- the command line ------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line argparse cannot read; the message is argparse's, with a hint."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become one line on stderr instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    from memguard.estimation.spec import MAX_COUNT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text} is past any device; at most {MAX_COUNT:,}")
    return value


def _margin(text: str) -> float:
    """``0.1`` or ``10%``: the share of the GPU's free memory to keep spare."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.1 or 10%, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1 (0% to 99%), got {text!r}")
    return value


_TRACE_TIMEOUT = 120.0  # memguard.estimation.trace.DEFAULT_TIMEOUT, without importing torch to build the parser


def _count(text: str) -> int:
    """A whole number, zero allowed."""
    return 0 if text.strip() == "0" else _positive_int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _import_estimator() -> Any:
    """``memguard.estimation.estimator`` (and so torch and transformers), or a one-line error naming what broke.

    A broken install anywhere below torch (a ``pynvml.py`` that raises on import, which torch
    imports too; a half-removed package) would otherwise end the command with a traceback.
    """
    import importlib

    try:
        return importlib.import_module("memguard.estimation.estimator")
    except MemguardError:
        raise
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f", raised in {tb.tb_frame.f_code.co_filename}" if tb is not None else ""
        raise MemguardError(f"cannot load the estimator and torch ({type(exc).__name__}: {exc}{where}); "
                            "repair or reinstall the package that file belongs to") from None


def _build_parser() -> _Parser:
    methods = _import_estimator().METHODS

    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON on stdout, for machines")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines and no warnings on stderr")

    model = _Parser(add_help=False)
    model.add_argument("model", metavar="MODEL",
                       help="a preset name (e.g. gpt2, llama-3-8b), a config.json path or model "
                            "directory, or package.module:factory returning an nn.Module")
    model.add_argument("--seq-len", type=_positive_int, metavar="N",
                       help="tokens per sample (default: the model's maximum, where it has one)")
    model.add_argument("--precision", default="32-true",
                       help="Lightning precision: 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true "
                            "(default: %(default)s)")
    model.add_argument("--optimizer", default="adamw",
                       help="adamw, adam, adamw-8bit, sgd, sgd-momentum, adafactor or none (default: %(default)s)")
    model.add_argument("--method", choices=methods, default=None,
                       help="how to estimate: trace the step on fake tensors, or use a formula "
                            "(default: auto, which traces and falls back to the formula)")
    model.add_argument("--device", default="cuda",
                       help="where training runs: cuda or cpu (default: %(default)s)")
    model.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="force activation checkpointing on or off (default: as the model is set)")
    model.add_argument("--strategy", default="single",
                       help="single, ddp, fsdp, fsdp_shard_grad_op, fsdp_hybrid, deepspeed_stage_1/2/3, or a "
                            "Lightning strategy name (default: %(default)s); the estimate is per device")
    model.add_argument("--world-size", type=_positive_int, default=1, metavar="N",
                       help="data-parallel processes (default: %(default)s)")
    model.add_argument("--offload-optimizer", action="store_true",
                       help="optimizer state and step in host memory (sharded strategies)")
    model.add_argument("--offload-params", action="store_true",
                       help="parameter shards in host memory (fsdp, deepspeed_stage_3)")
    model.add_argument("--lora-rank", type=_positive_int, default=None, metavar="R",
                       help="fine-tune LoRA adapters of rank R on a frozen base model (needs peft)")
    model.add_argument("--accumulate-grad-batches", type=_positive_int, default=1, metavar="N",
                       help="micro-batches per optimizer step; from the second on, each forward runs beside the "
                            "gradients (default: %(default)s)")
    model.add_argument("--set-to-none", action=argparse.BooleanOptionalAction, default=True,
                       help="zero_grad(set_to_none=...): --no-set-to-none keeps zeroed gradients alive, torch's "
                            "default before 2.0 (default: set to none)")
    model.add_argument("--trace-timeout", type=_seconds, default=_TRACE_TIMEOUT, metavar="S",
                       help="seconds a trace may run before it gives up, and auto falls back to the formula "
                            "(default: %(default)g)")

    batch = _Parser(add_help=False)
    batch.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="samples per step on one device (default: 1)")

    gpu = _Parser(add_help=False)
    gpu.add_argument("--gpu", default="auto",
                     help="the GPU to fit: auto (this machine's current CUDA device), a CUDA index, "
                          "a catalog name such as A100-40GB (see 'memguard gpus --catalog') or a "
                          "size such as 24GiB (default: %(default)s)")
    gpu.add_argument("--margin", type=_margin, default=0.1,
                     help="share of the GPU's free memory to keep spare, 0.1 or 10%% (default: 0.1)")

    parser = _Parser(prog=_PROG, description="Predict the peak memory of a training step before it runs.")
    parser.add_argument("--version", action="version", version=f"{_PROG} {memguard.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub = commands.add_parser("estimate", parents=[model, batch, output],
                              help="the memory breakdown of one training step")
    sub.add_argument("--top", type=_count, default=5, metavar="K",
                     help="show the K largest groups of tensors alive at the peak, by module (trace only; "
                          "default: %(default)s, 0 for none)")
    sub.set_defaults(run=_cmd_estimate)
    sub = commands.add_parser("check", parents=[model, batch, gpu, output],
                              help="whether a training step fits the GPU (exit 0 fits, 1 does not)")
    sub.set_defaults(run=_cmd_check)
    sub = commands.add_parser("max-batch", parents=[model, gpu, output],
                              help="the largest batch size that fits the GPU")
    sub.add_argument("--limit", type=_positive_int, default=1 << 16, metavar="N",
                     help="the largest batch size considered (default: %(default)s)")
    sub.set_defaults(run=_cmd_max_batch)
    sub = commands.add_parser("plot", parents=[model, batch, gpu, output],
                              help="a picture of memory against batch size and sequence length")
    sub.add_argument("-o", "--output", required=True, metavar="FILE",
                     help="the image to write (.png, .svg, .pdf)")
    sub.add_argument("--limit", type=_positive_int, default=1 << 16, metavar="N",
                     help="the largest batch size considered (default: %(default)s)")
    sub.add_argument("--timeline", action="store_true",
                     help="draw live memory through one traced step at --batch-size instead (phases, peak)")
    sub.set_defaults(run=_cmd_plot)
    sub = commands.add_parser("plan", parents=[model, batch, gpu, output],
                              help="what would make a step fit the GPU, cheapest first, with the flags for check")
    sub.add_argument("--gpus", type=_positive_int, default=None, metavar="N",
                     help="GPUs the run may use (default: --world-size)")
    sub.add_argument("--top", type=_positive_int, default=10, metavar="K",
                     help="rows per group (full fine-tuning, LoRA) (default: %(default)s)")
    sub.add_argument("--confirm", type=_count, default=2, metavar="K",
                     help="best rows per group confirmed with the trace (default: %(default)s)")
    sub.set_defaults(run=_cmd_plan)
    sub = commands.add_parser("gpus", parents=[output], help="the GPUs this machine sees, and their memory")
    sub.add_argument("--catalog", action="store_true", help="also list the GPUs memguard knows by name")
    sub.set_defaults(run=_cmd_gpus)
    return parser


# -- output ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Output:
    """Where the command writes: results on stdout, progress on stderr.

    Progress is shown only when ``progress_shown``: not quiet, not JSON, and stderr a terminal.
    """

    json_mode: bool
    quiet: bool
    progress_shown: bool = False

    def text(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")

    def progress(self, text: str) -> None:
        if self.progress_shown:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message holds
    sys.stderr.write(f"{_PROG}: error: {line}\n")
    return EXIT_USAGE


@contextlib.contextmanager
def _quiet_libraries(*, quiet: bool, models: bool) -> Iterator[None]:
    """Keep stdout and stderr to what memguard says.

    transformers logs about configs and deprecations while models are built; those lines are
    muted. memguard's own warnings (``warnings`` and the ``memguard`` loggers) are shown as one
    ``memguard: warning:`` line each, unless ``quiet``.
    """
    tf_logging = None
    if models:
        try:
            from transformers.utils import logging as tf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            tf_logging = None
    tf_level = tf_logging.get_verbosity() if tf_logging else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(f"{_PROG}: warning: %(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger = logging.getLogger("memguard")
    propagate = logger.propagate
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning if not quiet else _drop_warning
        if tf_logging:
            tf_logging.set_verbosity_error()
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            if tf_logging and tf_level is not None:
                tf_logging.set_verbosity(tf_level)


class _OneLine(logging.Formatter):
    """A log record on one line, whatever its message holds (a C++ backtrace from torch ...)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(super().format(record).split())


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Show a warning memguard raised (or attributed to its caller, the CLI); drop the rest."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        ours = False
    if ours:
        sys.stderr.write(f"{_PROG}: warning: {' '.join(str(message).split())}\n")


def _drop_warning(*args: Any, **kwargs: Any) -> None:
    """``--quiet``: no warnings at all."""


# -- the pieces every subcommand shares ----------------------------------------------------------


def _resolve_gpu(text: str) -> memguard.DeviceMemory:
    """``--gpu``: ``auto``, a CUDA index or ``cuda:N``, a catalog name, a size or a percentage."""
    value = text.strip()
    low = value.lower()
    try:
        if low == "auto":
            return _device.device_memory("cuda")
        if value.isdigit():
            return _device.device_memory(int(value))
        if low.startswith("cuda"):
            return _device.device_memory(low)
        if value.endswith("%"):
            return _device.resolve_budget(value, "cuda")
    except DeviceError as exc:
        raise DeviceError(
            f"--gpu {value}: no CUDA device can be read on this machine ({_without_advice(exc)}); "
            "plan against a catalog GPU (e.g. --gpu A100-80GB; 'memguard gpus --catalog' lists "
            "them) or a size (e.g. --gpu 24GiB)"
        ) from None
    if matching_gpus(value):
        return _device.device_memory(value)  # a catalog GPU; several matches raise "ambiguous"
    if value[:1].isdigit() or value.startswith("."):
        return _device.resolve_budget(value)
    raise ConfigError(f"unknown GPU {value!r}; --gpu takes auto, a CUDA index, a size such as 24GiB, "
                      f"or a catalog name: {', '.join(memguard.list_gpus())}")


def _without_advice(exc: Exception) -> str:
    """The library's message without its advice to API users (the CLI gives its own)."""
    return str(exc).split(" On a machine without")[0].rstrip(".")


def _first_sentence(exc: Exception) -> str:
    text = str(exc)
    return text.split(". ")[0].rstrip(".")


def _describe_gpu(gpu: memguard.DeviceMemory) -> str:
    """One line: which GPU, how much is free, and where the number comes from."""
    size = format_bytes(gpu.total_bytes)
    if gpu.source == "catalog":
        return f"GPU: {gpu.name}, {size} (catalog GPU, assumed empty: free = total)"
    if gpu.source == "budget":
        plain = gpu.name.startswith("budget of")  # a size; "80% of NVIDIA ..." for a share
        return f"GPU: {gpu.name} (free = total)" if plain else f"GPU: {gpu.name}, {size} (budget: free = total)"
    where = f"{gpu.device} " if gpu.device else ""
    return f"GPU: {where}{gpu.name}, {format_bytes(gpu.free_bytes)} free of {size} ({gpu.source})"


def _estimate_kwargs(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    return {
        "seq_len": args.seq_len,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "method": method or args.method or "auto",
        "device": args.device,
        "gradient_checkpointing": args.gradient_checkpointing,
        "strategy": args.strategy,
        "world_size": args.world_size,
        "offload_optimizer": args.offload_optimizer,
        "offload_params": args.offload_params,
        "lora_rank": args.lora_rank,
        "accumulate_grad_batches": args.accumulate_grad_batches,
        "set_to_none": args.set_to_none,
        "trace_timeout": args.trace_timeout,
    }


def _describe_inputs(model: str, batch_size: int | None, seq_len: int | None) -> str:
    seq = "model maximum" if seq_len is None else seq_len
    return f"{model}: batch {batch_size or 1}, seq {seq}"


def _verb(method: str) -> str:
    return "tracing" if method in ("auto", "trace") else "estimating"


EstimateAt = Callable[[int, int | None], MemoryEstimate]
"""``estimate_at(batch_size, seq_len)``; ``seq_len=None`` is the model's maximum."""


def _estimator(args: argparse.Namespace, method: str | None = None) -> EstimateAt:
    """``estimate_at(batch_size, seq_len)`` for ``args.model``, remembered."""
    kwargs = _estimate_kwargs(args, method)
    cache: dict[tuple[int, int | None], MemoryEstimate] = {}

    def estimate_at(batch_size: int, seq_len: int | None) -> MemoryEstimate:
        if (batch_size, seq_len) not in cache:
            est = memguard.estimate(args.model, batch_size, **{**kwargs, "seq_len": seq_len})
            cache[(batch_size, seq_len)] = est
            cache[(batch_size, est.inputs.get("seq_len"))] = est  # the length None stood for
        return cache[(batch_size, seq_len)]

    return estimate_at


def _estimate_once(args: argparse.Namespace, out: _Output) -> MemoryEstimate:
    method = args.method or "auto"
    out.progress(f"{_verb(method)} {_describe_inputs(args.model, args.batch_size, args.seq_len)} ...")
    return _estimator(args)(args.batch_size or 1, args.seq_len)


def _percent(margin: float) -> str:
    return f"{margin * 100:g}%"


def _usable(gpu: memguard.DeviceMemory, margin: float) -> int:
    """What a step may use: the GPU's free memory less the margin, as ``MemoryEstimate.fits``."""
    return int(gpu.free_bytes * (1 - margin))


def _room(gpu: memguard.DeviceMemory, margin: float) -> str:
    spare = f"less a {_percent(margin)} margin" if margin else "no margin"
    return f"{format_bytes(gpu.free_bytes)} free {spare}"


def _remedies(est: MemoryEstimate, gpu: memguard.DeviceMemory, margin: float, out: _Output) -> list[Any]:
    """The best few changes that make the step fit, from the one remedy engine (:func:`memguard.remedies`)."""
    from memguard.planning import remedies

    out.progress("searching what would fit ...")
    try:
        return remedies(est, gpu, margin, top=3)
    except MemguardError as exc:
        out.progress(f"no remedies: {_first_sentence(exc)}")
        return []


def _show_remedies(rows: list[Any], model: str, gpu_arg: str, out: _Output) -> None:
    if not rows:
        out.text("nothing memguard can change (precision, checkpointing, optimizer, batch and accumulation, "
                 "LoRA, sharding, offload) makes it fit this GPU")
        return
    out.text("what would fit (best first; 'memguard plan' lists more):")
    for row in rows:
        out.text(f"  - {row.describe()}")
        out.text(f"    memguard check {model} --gpu {gpu_arg} {' '.join(row.flags)}")


def _github_error(message: str) -> str:
    """A GitHub Actions error annotation; the message escaped as workflow commands require."""
    data = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"::error title={_PROG}::{data}"


def _in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS", "").lower() == "true"


# -- subcommands -----------------------------------------------------------------------------


def _cmd_estimate(args: argparse.Namespace, out: _Output) -> int:
    est = _estimate_once(args, out)
    if out.json_mode:
        out.json(est.to_dict())
    else:
        out.text(est.table(top=args.top))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, out: _Output) -> int:
    gpu = _resolve_gpu(args.gpu)
    est = _estimate_once(args, out)
    fits = est.fits(gpu.free_bytes, args.margin)
    usable = _usable(gpu, args.margin)
    rows = [] if fits else _remedies(est, gpu, args.margin, out)
    if out.json_mode:
        out.json({**est.to_dict(), "device": gpu.to_dict(), "margin": args.margin, "usable_bytes": usable,
                  "fits": fits, "verdict": "fits" if fits else "does not fit",
                  "remedies": [r.to_dict() for r in rows]})
        return EXIT_OK if fits else EXIT_DOES_NOT_FIT
    out.text(est.table())
    out.text()
    out.text(_describe_gpu(gpu))
    need = format_bytes(est.total_bytes)
    if fits:
        out.text(f"FITS: needs {need} of {format_bytes(usable)} usable ({_room(gpu, args.margin)}); "
                 f"{format_bytes(usable - est.total_bytes)} to spare")
        return EXIT_OK
    verdict = (f"DOES NOT FIT: needs {need}, has {format_bytes(usable)} usable ({_room(gpu, args.margin)}); "
               f"{format_bytes(est.total_bytes - usable)} short")
    out.text(verdict)
    _show_remedies(rows, args.model, args.gpu, out)
    if _in_github_actions():
        inputs = est.inputs
        out.text(_github_error(
            f"{inputs.get('model')} (batch {inputs.get('batch_size')}, seq {inputs.get('seq_len')}, "
            f"{inputs.get('precision')}) does not fit {gpu.name}: needs {need}, has {format_bytes(usable)} "
            f"usable ({_room(gpu, args.margin)})"
        ))
    return EXIT_DOES_NOT_FIT


def _search(args: argparse.Namespace, gpu: memguard.DeviceMemory, estimate_at: EstimateAt, out: _Output,
            method: str) -> BatchSearch:
    """The largest fitting batch at ``--seq-len``, with a progress line per try."""
    usable = _usable(gpu, args.margin)
    out.progress(f"searching the largest batch of {args.model} that fits {gpu.name} "
                 f"({format_bytes(usable)} usable); {_verb(method)} one step per try ...")

    def at(batch_size: int) -> MemoryEstimate:
        est = estimate_at(batch_size, args.seq_len)
        verdict = "fits" if est.total_bytes <= usable else "does not fit"
        out.progress(f"  batch {batch_size}: {format_bytes(est.total_bytes)}, {verdict}")
        return est

    return max_batch_size(at, gpu.free_bytes, margin=args.margin, limit=args.limit)


def _cmd_max_batch(args: argparse.Namespace, out: _Output) -> int:
    gpu = _resolve_gpu(args.gpu)
    method = args.method or "auto"
    found = _search(args, gpu, _estimator(args), out, method)
    usable = _usable(gpu, args.margin)
    if out.json_mode:
        out.json({
            "max_batch_size": found.batch_size,
            "capped": found.capped,
            "device": gpu.to_dict(),
            "margin": args.margin,
            "usable_bytes": usable,
            "estimate": found.estimate.to_dict(),
            "trials": [{"batch_size": b, "total_bytes": t} for b, t in found.trials],
        })
        return EXIT_OK if found.batch_size else EXIT_DOES_NOT_FIT
    out.text(found.estimate.table())
    out.text()
    out.text(_describe_gpu(gpu))
    if not found.batch_size:
        out.text(f"NOTHING FITS: batch size 1 needs {format_bytes(found.estimate.total_bytes)}, has "
                 f"{format_bytes(usable)} usable ({_room(gpu, args.margin)})")
        _show_remedies(_remedies(found.estimate, gpu, args.margin, out), args.model, args.gpu, out)
        return EXIT_DOES_NOT_FIT
    line = (f"max batch size: {found.batch_size} (needs {format_bytes(found.estimate.total_bytes)} of "
            f"{format_bytes(usable)} usable, {_room(gpu, args.margin)}")
    above = dict(found.trials).get(found.batch_size + 1)
    if above is not None:
        line += f"; {found.batch_size + 1} needs {format_bytes(above)}"
    if found.capped:
        line += f"; the search stopped at --limit {args.limit}"
    out.text(line + ")")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace, out: _Output) -> int:
    from memguard.planning import plan

    gpu = _resolve_gpu(args.gpu)
    base = {"precision": args.precision, "optimizer": args.optimizer,
            "gradient_checkpointing": bool(args.gradient_checkpointing), "strategy": args.strategy,
            "world_size": args.world_size, "offload_optimizer": args.offload_optimizer,
            "offload_params": args.offload_params, "lora_rank": args.lora_rank,
            "accumulate_grad_batches": args.accumulate_grad_batches}
    out.progress(f"planning {args.model} on {gpu.name} ...")
    found = plan(args.model, gpu=gpu, seq_len=args.seq_len, gpus=args.gpus, batch_size=args.batch_size or 1,
                 margin=args.margin, base=base, device=args.device, confirm=args.confirm, limit=args.top,
                 method_prune="trace" if args.method == "trace" else "formula",
                 estimate_kwargs={"set_to_none": args.set_to_none, "trace_timeout": args.trace_timeout})
    if out.json_mode:
        out.json([row.to_dict() for row in found.rows])
    else:
        out.text(found.table(top=args.top))
    return EXIT_OK if found.rows else EXIT_DOES_NOT_FIT


def _plot_estimator(args: argparse.Namespace, out: _Output) -> tuple[str, EstimateAt]:
    """``--method`` if given; else the formula (a sweep takes many estimates) where it works, else the trace."""
    if args.method:
        return args.method, _estimator(args, args.method)
    formula = _estimator(args, "formula")
    try:
        formula(1, args.seq_len)
    except (MemguardError, ImportError) as exc:
        out.progress(f"the formula cannot estimate {args.model} ({_first_sentence(exc)}); tracing instead")
        return "trace", _estimator(args, "trace")
    return "formula", formula


def _cmd_plot(args: argparse.Namespace, out: _Output) -> int:
    gpu = _resolve_gpu(args.gpu)
    path = _plot.check_output(args.output)
    if args.timeline:
        return _plot_timeline(args, out, gpu, path)
    method, estimate_at = _plot_estimator(args, out)
    found = _search(args, gpu, estimate_at, out, method)
    seq_len = found.estimate.inputs.get("seq_len")
    batch_sizes = _plot.batch_sizes_for(found.batch_size)
    by_batch = _plot.sweep(_traced(estimate_at, out, method, args.model, seq_len=seq_len),
                           "batch_size", batch_sizes)
    fixed_batch = args.batch_size or max(1, found.batch_size)
    by_seq = None
    if seq_len is not None:
        by_seq = _plot.sweep(_traced(estimate_at, out, method, args.model, batch_size=fixed_batch),
                             "seq_len", _plot.seq_lens_for(seq_len), stop_at_error=True)
    inputs = found.estimate.inputs
    title = (f"{inputs.get('model')}: {inputs.get('precision')}, {inputs.get('optimizer')}, "
             f"{inputs.get('device')} ({found.estimate.method})")
    _plot.render(by_batch, by_seq, path, capacity_bytes=gpu.free_bytes, margin=args.margin,
                 max_batch=found.batch_size, gpu_name=_short_name(gpu), title=title, seq_len=seq_len,
                 batch_size=fixed_batch)
    if out.json_mode:
        out.json({"output": str(path), "max_batch_size": found.batch_size, "capped": found.capped,
                  "device": gpu.to_dict(), "margin": args.margin, "usable_bytes": _usable(gpu, args.margin),
                  "method": found.estimate.method, "batch_sweep": by_batch.to_dict(),
                  "seq_sweep": by_seq.to_dict() if by_seq else None})
        return EXIT_OK
    out.text(f"wrote {path} ({found.estimate.method} estimates)")
    out.text(f"  batch sizes {by_batch.values[0]}-{by_batch.values[-1]} at seq {seq_len}; largest that fits "
             f"{gpu.name} ({format_bytes(_usable(gpu, args.margin))} usable): {found.batch_size}")
    if by_seq is not None:
        out.text(f"  sequence lengths {by_seq.values[0]}-{by_seq.values[-1]} at batch {fixed_batch}")
        if by_seq.stopped:
            out.text(f"  {by_seq.stopped}")
    return EXIT_OK


def _plot_timeline(args: argparse.Namespace, out: _Output, gpu: memguard.DeviceMemory, path: Any) -> int:
    """``plot --timeline``: live memory through one traced step."""
    if args.method not in (None, "auto", "trace"):
        raise ConfigError(f"--timeline draws a traced step; --method {args.method} makes no timeline")
    args.method = "trace"
    est = _estimate_once(args, out)
    inputs = est.inputs
    title = (f"{inputs.get('model')}: batch {inputs.get('batch_size')}, seq {inputs.get('seq_len')}, "
             f"{inputs.get('precision')}, {inputs.get('optimizer')}")
    _plot.render_timeline(est, path, capacity_bytes=gpu.free_bytes, margin=args.margin, title=title)
    if out.json_mode:
        out.json({"output": str(path), **est.to_dict()})
    else:
        out.text(f"wrote {path}: peak {format_bytes(est.peak_bytes)} of live tensors, {len(est.timeline)} points")
    return EXIT_OK


def _short_name(gpu: memguard.DeviceMemory) -> str:
    """The GPU's name for a legend: ``"budget"`` for a plain size, whose name repeats the size."""
    return "budget" if gpu.source == "budget" and gpu.name.startswith("budget of") else gpu.name


def _traced(estimate_at: EstimateAt, out: _Output, method: str, model: str, *,
            batch_size: int | None = None, seq_len: int | None = None) -> Callable[[int], MemoryEstimate]:
    """One axis of ``estimate_at`` (the other fixed), with a progress line per estimate."""

    def at(value: int) -> MemoryEstimate:
        b, s = (value, seq_len) if batch_size is None else (batch_size, value)
        est = estimate_at(b, s)
        out.progress(f"  {_describe_inputs(model, b, s)}: {format_bytes(est.total_bytes)}")
        return est

    return at


def _cmd_gpus(args: argparse.Namespace, out: _Output) -> int:
    devices = _device.list_devices()
    reason = "" if devices else _device.why_no_gpu()
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
