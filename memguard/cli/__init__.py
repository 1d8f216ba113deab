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
    memguard plan MODEL ... --gpu ...
    memguard gpus [--catalog]
    memguard report LOGDIR

Every command that takes MODEL also takes ``--config FILE``: the run's LightningCLI YAML,
``TrainingArguments`` or DeepSpeed file (:mod:`memguard.run_config`, :mod:`memguard.cli._config`);
flags given win over the file.

``MODEL`` is a preset name (``memguard.list_presets()``), a ``config.json`` path or model directory,
or ``package.module:factory`` naming a callable that returns an ``nn.Module``. ``--gpu`` is read by
:class:`memguard.device.DeviceSpec` (bare digits are a CUDA index; a size needs its unit) and the
verdict is :class:`memguard.fit.Fit`'s, as in the pytest plugin and the Lightning callback.

Exit status: 0 success (``check``: it fits), 1 it does not fit (``check``; ``max-batch`` when not
even batch size 1 fits; ``plan`` when no row fits), 2 bad usage or input, reported as one line on
stderr, 3 internal error (an unexpected exception: a bug, one ``memguard: internal error:`` line
naming it and where it was raised; never 1, which a CI reads as "does not fit"), 130 interrupted
(Ctrl-C, at any moment, one line and no traceback), 141 when the reader of stdout went away
(``memguard ... | head``). Under GitHub Actions (``GITHUB_ACTIONS=true``)
a ``check`` that does not fit also writes an error annotation. Names that are not UTF-8 (a file
name's lone surrogates, PEP 383) are written escaped, whatever the streams' encoding.

Progress lines ("tracing gpt2: batch 8, seq 1024 ...") are written only when stderr is a terminal,
so a CI log or a script that reads stderr sees warnings and errors alone. torch and the estimator
are imported inside :func:`main`, once the command line is read (``--help``, ``--version`` and a
usage error import neither), so a Ctrl-C while torch loads is handled like any other; only Python's
own start and the import of this package (the first ~0.1 s) come before :func:`main`.

With ``--strategy`` and ``--world-size`` the estimate is per device (:mod:`memguard.estimation.parallel`).

The package, one concern a module:

- ``__init__``: :func:`main`, Ctrl-C and the exit status.
- ``_parser``: the command line and the checks of its values.
- ``_output``: stdout, stderr, exit codes, library chatter muted.
- ``_shared``: what every subcommand needs (the GPU, the cached estimator, the remedies).
- ``_commands``: ``estimate``, ``check``, ``max-batch``, ``plan``, ``gpus``.
- ``_plot``: ``plot`` and ``plot --timeline``.
- ``_config``: ``--config FILE`` read into the arguments.
- ``_report``: ``report``, predicted vs actual from the callbacks' logs (:mod:`memguard.report`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from memguard.cli._output import (
    EXIT_BROKEN_PIPE,
    EXIT_DOES_NOT_FIT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Output,
    fail,
    internal_error,
    is_terminal,
    quiet_libraries,
)
from memguard.cli._parser import UsageError as _UsageError
from memguard.cli._parser import build_parser
from memguard.cli._parser import import_estimator as _import_estimator
from memguard.errors import MemguardError

if TYPE_CHECKING:
    from memguard.device.readers import Readers

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

def main(argv: Sequence[str] | None = None, *, readers: Readers | None = None) -> int:
    """Run the ``memguard`` command and return its exit status.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.
        readers: where GPU and host memory are read (:class:`memguard.device.Readers`; default: this
            machine), for tests and embedders.

    Returns:
        0 success, 1 does not fit, 2 bad usage or input, 3 internal error, 130 interrupted, 141 stdout
        closed early (a pipe).
    """
    with _watch_ctrl_c() as interrupted:
        try:
            code = _main(argv, readers)
        except KeyboardInterrupt:  # anywhere: importing torch, parsing, tracing, writing
            interrupted.append(True)
        except BrokenPipeError:  # the reader of stdout went away (`memguard ... | head`): nothing to say to it
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return EXIT_BROKEN_PIPE
        except Exception as exc:  # a bug, not the user's mistake: its own code, never 1 ("does not fit")
            if not interrupted:
                return internal_error(exc)
        if interrupted:  # also when a library swallowed the KeyboardInterrupt and failed later
            with contextlib.suppress(KeyboardInterrupt, OSError):
                sys.stderr.write(f"{PROG}: interrupted\n")
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


def _main(argv: Sequence[str] | None, readers: Readers | None = None) -> int:
    try:
        parser = build_parser()
    except MemguardError as exc:
        return fail(str(exc))
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return fail(str(exc))
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        if isinstance(getattr(args, "model", None), str):  # a bad config.json: refused before torch is imported
            from memguard.estimation.models import check_config_file

            check_config_file(args.model)
        needs_torch = not _without_torch(args)
        # torch and the estimator: only now, so --help and --version answer at once
        _import_estimator(torch=needs_torch)
    except MemguardError as exc:
        return fail(str(exc))
    _factories_from_here(getattr(args, "model", None))
    args.readers = readers
    quiet = args.quiet or args.json
    out = Output(json_mode=args.json, quiet=quiet, progress_shown=not quiet and is_terminal(sys.stderr))
    try:
        with quiet_libraries(quiet=args.quiet, models=args.command != "gpus"):
            _model_from_config(parser, args, sys.argv[1:] if argv is None else argv)
            return args.run(args, out)
    except MemguardError as exc:
        return fail(str(exc))


def _without_torch(args: Any) -> bool:
    """Whether the command estimates by the formula from a preset's shipped description only
    (:func:`memguard.estimation.estimator.runs_without_torch`): ``estimate``, ``check`` and
    ``max-batch`` with ``--method formula`` on a preset, without ``--config`` (LoRA, quantization and
    sharding derived from the description); ``plan --confirm 0`` of a preset, whose search estimates by the
    formula (:mod:`memguard.planning.search`: a near miss it traces imports torch then). torch (~2.5 s) and
    transformers are then not imported up front."""
    if args.command not in ("estimate", "check", "max-batch", "plan") or getattr(args, "config", None):
        return False
    from memguard.cli._shared import estimate_kwargs
    from memguard.estimation.estimator import runs_without_torch

    if args.command == "plan":
        if args.confirm != 0 or args.method == "trace":
            return False
        return runs_without_torch(args.model, **{**estimate_kwargs(args), "method": "formula"})
    if getattr(args, "method", None) != "formula":
        return False
    return runs_without_torch(args.model, **estimate_kwargs(args))


def _factories_from_here(model: Any) -> None:
    """Put the current folder on ``sys.path`` for a ``package.module:factory`` MODEL, as
    ``python -m memguard`` does: the console script's ``sys.path[0]`` is its own ``bin`` folder, so
    ``memguard check my_model:build`` in the folder of ``my_model.py`` would not find it."""
    if isinstance(model, str) and ":" in model:
        here = os.getcwd()
        if here not in sys.path and "" not in sys.path:
            sys.path.insert(0, here)


def _model_from_config(parser: Any, args: Any, argv: Sequence[str]) -> None:
    """``--config FILE`` read into ``args`` (:mod:`memguard.cli._config`); MODEL is needed without it."""
    if "model" not in vars(args):
        return
    if getattr(args, "config", None):
        from memguard.cli._config import apply_config

        command = parser._subparsers._group_actions[0].choices[args.command]
        apply_config(args, command, argv)
    if args.model is None:
        raise MemguardError("the following arguments are required: MODEL (a preset, a config.json, "
                            "package.module:factory), or --config FILE naming one "
                            f"(see '{PROG} {args.command} --help')")
