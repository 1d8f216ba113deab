"""Ranks as forked processes: one child per rank, its result as JSON, all stopped when one fails.

``benchmarks/distributed.py`` measures every rank in its own process. Starting a fresh Python per
rank costs an import of torch, transformers and peft each time (most of a small case's time on two
cores), so a launcher process imports them once and forks every rank from it, as Lightning's
``ddp_fork`` strategy does. A forked rank is as fresh for the measurement as a new interpreter: the
launcher has only imported modules and built models on the meta device (no kernel has run, so no
OpenMP thread pool exists that ``fork`` could break), it inherits the launcher's allocator settings
(glibc reads ``MALLOC_MMAP_THRESHOLD_`` at start-up, the math libraries read theirs at first use),
and it runs its own warm-up step before it measures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["fork_ranks", "free_port", "launch", "report"]


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fork_ranks(world_size: int, target: Callable[[int], dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run ``target(rank)`` in one forked child per rank; what each returned, by rank.

    Raises:
        RuntimeError: when a rank fails (the end of its traceback is in the message); the other
            ranks are then killed, since they would wait for it in their next collective.
        TimeoutError: when the ranks take longer than ``timeout`` seconds (all are killed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, f"rank{rank}.json") for rank in range(world_size)]
        pids = [_fork(target, rank, path) for rank, path in enumerate(paths)]
        codes = _wait_all(pids, timeout)
        payloads = [json.loads(p.read_text()) if p.exists() else {} for p in paths]
    for rank, (code, payload) in enumerate(zip(codes, payloads, strict=True)):
        if "error" in payload:  # the rank that failed, not the ones killed after it
            raise RuntimeError(f"rank {rank} failed (exit {code}):\n{payload['error']}")
    for rank, (code, payload) in enumerate(zip(codes, payloads, strict=True)):
        if code != 0 or "result" not in payload:
            raise RuntimeError(f"rank {rank} exited with {code} and no result")
    return [payload["result"] for payload in payloads]


def _fork(target: Callable[[int], dict[str, Any]], rank: int, path: Path) -> int:
    """Fork a child that writes ``{"result": target(rank)}`` (or ``{"error": traceback}``) to ``path``."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        try:
            payload: dict[str, Any] = {"result": target(rank)}
            code = 0
        except BaseException:
            payload = {"error": "\n".join(traceback.format_exc().strip().splitlines()[-12:])}
        path.write_text(json.dumps(payload))
    finally:
        os._exit(code)  # never return into the launcher's code


def _wait_all(pids: Sequence[int], timeout: float) -> list[int]:
    """Every child's exit code; all are killed when one fails or the time is up."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        failed = any(code != 0 for code in codes.values())
        if len(codes) < len(pids) and (failed or time.monotonic() > deadline):
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if not failed:
                raise TimeoutError(f"the ranks took longer than {timeout:.0f} s")
        if len(codes) < len(pids):
            time.sleep(0.02)
    return [codes[pid] for pid in pids]


def report(name: str, world_size: int, target: Callable[[int], dict[str, Any]], timeout: float) -> None:
    """In the launcher: :func:`fork_ranks` and print ``{"name", "ranks"}`` (or ``{"name", "failed"}``)."""
    try:
        ranks = fork_ranks(world_size, target, timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(json.dumps({"name": name, "failed": str(exc)}), flush=True)
        return
    print(json.dumps({"name": name, "ranks": ranks}), flush=True)


def launch(script: Path, spec: Mapping[str, Any], names: Sequence[str], *, env: Mapping[str, str],
           timeout: float, show_progress: bool = False) -> dict[str, list[dict[str, Any]] | RuntimeError]:
    """Run the launcher ``python script --launch <spec as JSON>``; what it reported, by name.

    A name the launcher did not report (it died, or ran out of ``timeout`` seconds) maps to a
    ``RuntimeError`` with the end of its stderr; ``show_progress`` lets its stderr through instead.
    """
    try:
        proc = subprocess.run([sys.executable, str(script), "--launch", json.dumps(spec)], env=dict(env),
                              stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE,
                              text=True, timeout=timeout, check=False)
        stdout, why = proc.stdout, f"the launcher exited with {proc.returncode}"
        stderr = proc.stderr or ""
    except subprocess.TimeoutExpired as exc:
        stdout, why = _text(exc.stdout), f"the launcher took longer than {timeout:.0f} s"
        stderr = _text(exc.stderr)
    out: dict[str, list[dict[str, Any]] | RuntimeError] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            out[rec["name"]] = rec["ranks"] if "ranks" in rec else RuntimeError(f"{rec['name']}: {rec['failed']}")
    tail = "\n".join(stderr.strip().splitlines()[-12:])
    for name in names:
        out.setdefault(name, RuntimeError(f"{name}: {why} before it was measured:\n{tail}"))
    return out


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""
