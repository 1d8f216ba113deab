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
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import memguard

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "Output", "fail",
           "github_error", "in_github_actions", "is_terminal", "quiet_libraries"]

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""

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
        sys.stdout.write(text + "\n")

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")

    def progress(self, text: str) -> None:
        if self.progress_shown:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; ``False`` for a replaced or closed stream."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # a replaced or closed stream
        return False


def fail(message: str) -> int:
    """Write ``message`` as one ``memguard: error:`` line on stderr; return :data:`EXIT_USAGE`."""
    line = " ".join(message.split())  # one line, whatever the message holds
    sys.stderr.write(f"{PROG}: error: {line}\n")
    return EXIT_USAGE


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
    """
    tf_logging = None
    if models:
        try:
            from transformers.utils import logging as tf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            tf_logging = None
    tf_level = tf_logging.get_verbosity() if tf_logging else None
    handler = logging.StreamHandler(sys.stderr)
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
        sys.stderr.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")


def _drop_warning(*args: Any, **kwargs: Any) -> None:
    """``--quiet``: no warnings at all."""
