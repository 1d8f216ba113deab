"""Run user code where it cannot touch the user's process: a forked child that sends back only a result.

The trace runs the user's own ``forward`` and ``training_step``, and the guard's peek runs the
user's ``train_dataloader``. Whatever that code does — step a scheduler, change a param group's
learning rate, append to a list a hook closes over, fill a ``functools.lru_cache``, draw from any
random generator, compile with ``torch.compile``, call a data loader once more — must not reach
the run being guarded. Copying the user's objects (:mod:`memguard.estimation.trace.isolation`) can
only ever cover the patterns it enumerates; a separate process covers them all by construction.

:func:`run` forks. The child gets a copy-on-write image of the whole process (the module, the
optimizer, the schedulers, the trainer, the data and every global) and runs the function there;
the parent keeps its own, untouched. The child sends back the result, or the exception, pickled
through a pipe, and ends with ``os._exit`` (no ``atexit`` handler, no flush of buffers it
inherited). The parent waits at most ``timeout`` seconds, then kills the child (``SIGKILL``:
whatever it runs, a pure Python loop included) and raises :class:`~memguard.TraceError`.

In the child, before the function runs:

* one CPU thread (as DataLoader workers do: an OpenMP pool does not survive a fork);
* ``torch.distributed``'s collectives raise: a collective would talk to the parent's peers over
  the parent's connections (a step that calls one cannot be traced, as before);
* ``torch.compile`` is off (``torch._dynamo.config.disable``): compiled code runs eagerly, as the
  trace needs, and dynamo's caches of the parent are neither used nor changed;
* logging is off and warnings are ignored: the child does not write to the user's handlers;
* ``SIGINT`` is ignored (Ctrl-C reaches the parent, which kills the child) and every other signal
  handler the user installed is back to its default.

CUDA is never initialised in the child: the trace runs on fake tensors. If user code in the
child calls into CUDA anyway, PyTorch's own fork guard stops it ("Cannot re-initialize CUDA in
forked subprocess"), which fails the trace, not the run.

Where ``os.fork`` is missing (Windows) or unsafe with system frameworks (macOS), or when the
environment sets ``MEMGUARD_IN_PROCESS=1``, the function runs in the calling process, under the
in-process isolation of :mod:`memguard.estimation.trace.isolation`; a warning says so once.

Cost, measured on this project's 2-core machine (``benchmarks/isolation.py``): a fork, an empty run
and the reaping take 24 ms from a process of 234 MiB, 95 ms with 1 GiB more resident, 470 ms with
8 GiB more (page tables; the parent's resident memory does not change), and the child copies only
the pages it writes. A traced GPT-2 step takes as long in the child as in the process (1.45 s and
1.56 s at batch 2 x 256).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from memguard.errors import MemguardError, TraceError

__all__ = ["IN_PROCESS_VARIABLE", "forks", "in_child", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")

IN_PROCESS_VARIABLE = "MEMGUARD_IN_PROCESS"
"""Set to ``1`` to run user code in the calling process instead of a forked child."""

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
                "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list",
                "gather", "gather_object", "irecv", "isend", "monitored_barrier", "recv", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send")

_in_child = False
_warned = False


def in_child() -> bool:
    """Whether this process is a child that :func:`run` forked."""
    return _in_child


def forks() -> bool:
    """Whether :func:`run` forks here: Linux, and not turned off by ``MEMGUARD_IN_PROCESS``."""
    if os.environ.get(IN_PROCESS_VARIABLE, "").strip().lower() in ("1", "true", "yes"):
        return False
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def run(fn: Callable[[], T], *, timeout: float | None, what: str = "the trace") -> T:
    """``fn()``, computed in a forked child; its result (or exception) comes back pickled.

    Args:
        fn: what to run; it sees the process as it is now. Its result must pickle.
        timeout: seconds the child may run before it is killed (``None``: no limit).
        what: the work in words, for the errors (``"the trace"``, ``"the peek at the data"``).

    Raises:
        TraceError: when the child ran out of time, died, or sent back nothing usable.
        Exception: whatever ``fn`` raised in the child, when it pickles (else a
            :class:`~memguard.MemguardError` with its type and message).
    """
    if _in_child:
        return fn()
    if not forks():
        _warn_in_process()
        return fn()
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns about forking a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        _warn_in_process(f"cannot fork ({exc})")
        return fn()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(fn, write_end)
    os.close(write_end)
    started = time.monotonic()
    try:
        data = _receive(read_end, pid, timeout, what)
    finally:
        os.close(read_end)
        _reap(pid)
    log.debug("%s ran in child %d for %.2f s", what, pid, time.monotonic() - started)
    status, value = pickle.loads(data)
    if status == "error":
        raise value
    return value  # type: ignore[no-any-return]


def _child(fn: Callable[[], Any], fd: int) -> None:
    """Run ``fn`` in the forked child, write ``(status, value)`` to ``fd`` and end the process."""
    global _in_child
    try:
        _in_child = True
        _settle()
        try:
            payload: tuple[str, Any] = ("ok", fn())
        except BaseException as exc:
            payload = ("error", exc)
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            err = payload[1] if payload[0] == "error" else exc
            data = pickle.dumps(("error", MemguardError(f"{type(err).__name__}: {err}")))
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(len(data).to_bytes(8, "little") + data)
    finally:
        os._exit(0)


def _settle() -> None:
    """Make the child harmless to the parent's world (see the module's docs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.config.disable = True
    else:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read when dynamo is first imported
    _stub_collectives()


def _stub_collectives() -> None:
    """Make ``torch.distributed``'s collectives raise: they would use the parent's connections."""
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed import distributed_c10d

    def stub(name: str) -> Callable[..., Any]:
        def collective(*args: Any, **kwargs: Any) -> Any:
            raise TraceError(f"the step calls torch.distributed.{name}, a collective, which memguard does not run "
                             "while tracing")

        return collective

    for name in _COLLECTIVES:
        for namespace in (dist, distributed_c10d):
            if hasattr(namespace, name):
                setattr(namespace, name, stub(name))


def _receive(fd: int, pid: int, timeout: float | None, what: str) -> bytes:
    """The message the child writes to ``fd`` (its length in 8 bytes, then the pickle); kills it past ``timeout``.

    The length, not the end of the pipe, says when the message is whole: a process the child
    started may hold the pipe open after the child is done.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: list[bytes] = []
    received, size = 0, None
    while size is None or received < size + 8:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            _kill(pid)
            raise TraceError(f"{what} ran out of time: it was stopped after {timeout:g} s (trace_timeout); a loop "
                             "that waits on computed values never ends on fake data (stand-in values of ones); "
                             "raise trace_timeout if the step is just long")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise TraceError(f"{what} ended without a result: its process {_died(pid)}")
        chunks.append(chunk)
        received += len(chunk)
        if size is None and received >= 8:
            size = int.from_bytes(b"".join(chunks)[:8], "little")
    return b"".join(chunks)[8:]


def _died(pid: int) -> str:
    """How the child ended, in words."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # collected by a SIGCHLD handler of the program
        return "ended"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
        return f"died of signal {signal.Signals(sig).name}{hint}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Collect the child, killing it first if it still runs (the parent was interrupted)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            _kill(pid)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already collected by _receive


def _warn_in_process(why: str = "") -> None:
    global _warned
    if _warned:
        return
    _warned = True
    reason = why or (f"{IN_PROCESS_VARIABLE} is set" if sys.platform.startswith("linux")
                     else f"fork is not safe on {sys.platform}")
    warnings.warn(f"memguard runs user code in this process ({reason}): each module gets a private copy of its "
                  "state for the trace, but effects outside the modules (globals, schedulers, caches, data "
                  "loaders) can reach the run, and only tensor ops are checked against trace_timeout",
                  stacklevel=3)
