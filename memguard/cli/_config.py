"""``--config FILE``: the run's own configuration file (:mod:`memguard.run_config`) under the command line.

Flags given on the command line win over the file; the rest of the file's settings replace the
flags' defaults. What the command line cannot hold (a built LightningModule, its first batch, its
``training_step``) travels in ``args.estimate_extra`` to :func:`memguard.cli._shared.estimator`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from memguard.errors import ConfigError

__all__ = ["apply_config", "given_flags"]

_NOT_FLAGS = ("example_input", "step_fn", "training_loop")
"""What a LightningCLI file gives that no flag holds: the first batch and the module's ``training_step``."""


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option written in ``argv`` (``--x v``, ``--x=v``, ``--no-x``, a unique prefix)."""
    options = {s: a.dest for a in parser._actions for s in a.option_strings if s.startswith("--")}
    given = set()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0]
        matches = {dest for s, dest in options.items() if s == name} or \
                  {dest for s, dest in options.items() if s.startswith(name)}
        if len(matches) == 1:
            given |= matches
    return given


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Read ``args.config`` and put its settings in ``args`` where no flag was given.

    Raises:
        ConfigError: the file cannot be read, or it and ``MODEL`` both name a model to build.
    """
    from memguard.run_config import read_run_config

    explicit = given_flags(parser, argv)
    found = read_run_config(args.config, trace_timeout=args.trace_timeout, skip=explicit)
    extra: dict[str, Any] = {}
    model = found.pop("model", None)
    if model is not None and not isinstance(model, str):
        if args.model is not None:
            raise ConfigError(f"--config {args.config} builds its own model ({type(model).__name__}); "
                              f"drop MODEL ({args.model}) or the file's model section")
        args.model = type(model).__name__
        extra["model"] = model
    elif args.model is None:
        args.model = model
    for key, value in found.items():
        if key in explicit:
            continue
        if key in vars(args):
            setattr(args, key, value)
        elif key in _NOT_FLAGS:
            extra[key] = value
        # else a setting this command searches itself (max-batch: the batch size)
    args.estimate_extra = extra
