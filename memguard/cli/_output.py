"""What the ``memguard`` command writes: results on stdout, progress and one-line errors on stderr.

Also its exit statuses, and the muffling of library chatter (transformers' logging, warnings raised
outside memguard) while a subcommand runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import memguard

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "Output",
           "fail", "github_error", "in_github_actions", "internal_error", "is_terminal", "quiet_libraries", "write"]

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
"""Also what Python exits with on an uncaught exception: :func:`memguard.cli.main` lets none escape."""
EXIT_USAGE = 2
EXIT_INTERNAL = 3
"""An unexpected exception, not a mistake of the user's: a bug of memguard's (or of a library under
it) that a CI must not read as "does not fit"."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, what a shell reports for a command whose reader went away (``memguard ... | head``)."""

PROG = "memguard"
_PACKAGE_DIR = Path(memguard.__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Output:
    """Where the command writes: results on stdout, progress on stderr.

    Progress is shown only when ``progress_shown``: not quiet, not JSON, and stderr a terminal.
    """

    json_mode: bool
    quiet: bool
    progress_shown: bool = False

    def text(self, text: str = "") -> None:
        write(sys.stdout, text + "\n")

    def json(self, data: Any) -> None:
        write(sys.stdout, json.dumps(data, indent=2) + "\n")

    def progress(self, text: str) -> None:
        if self.progress_shown:
            write(sys.stderr, text + "\n")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        """A line on stderr whether or not it is a terminal (``--quiet`` is the caller's to check)."""
        write(sys.stderr, f"{PROG}: {text}\n")
        sys.stderr.flush()


def write(stream: Any, text: str) -> None:
    """Write ``text`` to ``stream``; what its encoding cannot hold is written as ``\\x..``/``\\udc..`` escapes.

    A file name that is not UTF-8 reaches Python as lone surrogates (PEP 383, ``surrogateescape``);
    a stream opened with ``errors="strict"`` (``PYTHONIOENCODING=utf-8``, or an ASCII locale for
    other characters) raises ``UnicodeEncodeError`` on them. ``TextIOWrapper.write`` encodes the
    whole text before writing any of it, so the second try does not repeat a part.
    """
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; ``False`` for a replaced or closed stream."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # a replaced or closed stream
        return False


def fail(message: str) -> int:
    """Write ``message`` as one ``memguard: error:`` line on stderr, in the command's words
    (:func:`in_flags`); return :data:`EXIT_USAGE`."""
    line = in_flags(" ".join(message.split()))  # one line, whatever the message holds
    write(sys.stderr, f"{PROG}: error: {line}\n")
    return EXIT_USAGE


_FLAGS = ("seq_len", "batch_size", "lora_rank", "world_size", "accumulate_grad_batches", "trace_timeout",
          "offload_optimizer", "offload_params", "gradient_checkpointing")
_WORDS = ("precision", "optimizer", "strategy")  # plain words in prose: a flag only as `precision=`
_ARGUMENT = re.compile(r"(?<![\w'\"./-])(?:(" + "|".join(_FLAGS) + r")\b|(" + "|".join(_WORDS) + r")(?==))"
                       r"(=(?=\S))?(=)?")
_PYTHON_ONLY = re.compile(r"pass (example_input|loss_fn)=")
_LORA_NAME = re.compile(r"(\S+)\+lora(\d+)\b")


def in_flags(message: str) -> str:
    """A library message in the command's words: ``seq_len=4096`` as ``--seq-len 4096``, ``pass
    seq_len=`` as ``pass --seq-len``; arguments that only Python takes (``example_input=``,
    ``loss_fn=``) as the call that takes them; a preset with adapters (``mistral-7b+lora16``, the
    name memguard gives the model internally) as ``mistral-7b with LoRA rank 16``."""

    def flag(m: re.Match[str]) -> str:
        name = "--" + (m.group(1) or m.group(2)).replace("_", "-")
        return f"{name} " if m.group(3) else name

    message = _PYTHON_ONLY.sub(lambda m: f"this needs {m.group(1)}=, which only Python takes: "
                                         f"memguard.estimate(model, {m.group(1)}=...)", message)
    message = _ARGUMENT.sub(flag, message)
    return _LORA_NAME.sub(lambda m: f"{m.group(1)} with LoRA rank {m.group(2)}", message)


def internal_error(exc: BaseException) -> int:
    """Write an unexpected exception as one ``memguard: internal error:`` line; return :data:`EXIT_INTERNAL`.

    The line names the exception, its message and the innermost frame it was raised in, enough for a
    bug report; the full traceback would bury it in a CI log.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (raised in {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""
    line = " ".join(f"{type(exc).__name__}: {exc}{where}".split())
    with contextlib.suppress(Exception):
        write(sys.stderr, f"{PROG}: internal error: {line}; this is a bug, please report it with the command line\n")
    return EXIT_INTERNAL


def github_error(message: str) -> str:
    """A GitHub Actions error annotation; the message escaped as workflow commands require."""
    data = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"::error title={PROG}::{data}"


def in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS", "").lower() == "true"


@contextlib.contextmanager
def quiet_libraries(*, quiet: bool, models: bool) -> Iterator[None]:
    """Keep stdout and stderr to what memguard says.

    transformers logs about configs and deprecations while models are built; those lines are
    muted. memguard's own warnings (``warnings`` and the ``memguard`` loggers) are shown as one
    ``memguard: warning:`` line each, unless ``quiet``.

    transformers is not imported for that (seconds, which a formula estimate of a preset does
    without): until it is, ``TRANSFORMERS_VERBOSITY=error`` is set for the block, which transformers
    reads when it first configures its logger (``transformers/utils/logging.py``,
    ``_get_default_logging_level``); a user's own ``TRANSFORMERS_VERBOSITY`` is overridden by importing
    it now, as before.
    """
    tf_logging = None
    lazy = False
    if models and "transformers.utils.logging" not in sys.modules and "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        lazy = True
    elif models:
        try:
            from transformers.utils import logging as tf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            tf_logging = None
    tf_level = tf_logging.get_verbosity() if tf_logging else None
    handler = _Handler(sys.stderr)
    handler.setFormatter(_OneLine(f"{PROG}: warning: %(message)s"))
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
            if lazy:
                os.environ.pop("TRANSFORMERS_VERBOSITY", None)
                imported = sys.modules.get("transformers.utils.logging")
                if imported is not None:  # back to transformers' default (_default_log_level), as before the block
                    imported.set_verbosity(logging.WARNING)


class _OneLine(logging.Formatter):
    """A log record on one line, whatever its message holds (a C++ backtrace from torch ...)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(super().format(record).split())


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes through :func:`write`: a record naming a file that is not UTF-8 is
    shown escaped, not replaced by logging's "--- Logging error ---" traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.stream, self.format(record) + self.terminator)
            self.flush()
        except Exception:  # as logging.StreamHandler.emit does
            self.handleError(record)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Show a warning attributed to memguard's code; drop the rest.

    ``filename`` is where ``stacklevel`` points, so a library (torch, transformers, a user's model
    factory) that warns with ``stacklevel=2`` while memguard calls it lands in memguard's files
    too. The frame that called ``warnings.warn`` tells them apart: memguard's own warnings are
    ``memguard: warning: ...``; another module's are shown with its name (``memguard: warning from
    transformers.modeling_utils: ...``), except its deprecation notices, which are for the code's
    authors, not for a CLI user.
    """
    if not _within(filename, _PACKAGE_DIR):
        return
    text = " ".join(str(message).split())
    origin = _warning_origin()
    if origin is None or origin == "memguard" or origin.startswith("memguard."):
        write(sys.stderr, f"{PROG}: warning: {text}\n")
    elif not issubclass(category, (DeprecationWarning, FutureWarning)):
        write(sys.stderr, f"{PROG}: warning from {origin}: {text}\n")


def _within(filename: str, folder: Path) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False


def _warning_origin() -> str | None:
    """The module that called ``warnings.warn`` (the first frame above this module and
    :mod:`warnings`), or ``None`` when it cannot be told."""
    frame = sys._getframe(1)
    skip = {__file__, warnings.__file__}
    while frame is not None and frame.f_code.co_filename in skip:
        frame = frame.f_back
    if frame is None:
        return None
    return frame.f_globals.get("__name__") or None


def _drop_warning(*args: Any, **kwargs: Any) -> None:
    """``--quiet``: no warnings at all."""
