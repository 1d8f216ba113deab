"""Host memory for CPU runs: ``MemAvailable``, capped by the cgroup memory limit of a container.

The kernel's ``MemAvailable`` (``/proc/meminfo``, Linux 3.14+) estimates how much memory can be
given to a new workload without swapping: free pages plus the reclaimable part of the page cache
and slabs. Inside a container the process is also bound by its memory cgroup, which the kernel
enforces with the OOM killer however much the host has free, so the answer is the smaller of the
two:

- cgroup v2 (unified hierarchy): ``memory.max`` and ``memory.current`` of the process's cgroup and
  of every ancestor up to the mount root (a parent's limit binds its children too).
- cgroup v1: ``memory.limit_in_bytes`` and ``memory.usage_in_bytes`` of the ``memory``
  controller's cgroup, together with ``hierarchical_memory_limit`` from ``memory.stat`` (the
  smallest limit of the cgroup and its ancestors).

Usage is counted as the cgroup's *working set*, usage minus ``inactive_file`` from
``memory.stat`` (v1: ``total_inactive_file``): inactive page cache is reclaimed before the OOM
killer runs. This is how ``docker stats`` and the kubelet count container memory.

The ``/proc`` and ``/sys/fs/cgroup`` roots are parameters, so tests can lay the files out in a
temporary directory.

Known limitations: ``memory.high`` (v2 throttling, not a hard limit) and swap limits are ignored;
without ``/proc/meminfo`` (macOS, Windows) the numbers come from ``psutil`` when it is installed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from memguard.errors import DeviceError

__all__ = ["HostMemory", "cgroup_memory", "host_memory", "read_meminfo"]

log = logging.getLogger(__name__)

PROC_ROOT = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages);
# anything this large is no limit at all.
_NO_LIMIT = 2**60


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """What the host and the process's memory cgroup allow, in bytes.

    Attributes:
        total_bytes: ``MemTotal``, or the cgroup limit when that is smaller.
        available_bytes: ``MemAvailable``, or what the cgroup has left when that is smaller.
        mem_total_bytes: ``MemTotal`` from ``/proc/meminfo``.
        mem_available_bytes: ``MemAvailable`` from ``/proc/meminfo``.
        cgroup_version: 1 or 2 when a memory cgroup limit applies, else ``None``.
        cgroup_limit_bytes: the tightest cgroup memory limit, or ``None`` when there is none.
        cgroup_available_bytes: limit minus working set at the tightest level, or ``None``.
    """

    total_bytes: int
    available_bytes: int
    mem_total_bytes: int
    mem_available_bytes: int
    cgroup_version: int | None = None
    cgroup_limit_bytes: int | None = None
    cgroup_available_bytes: int | None = None


def read_meminfo(proc_root: str | Path = PROC_ROOT) -> dict[str, int]:
    """Read ``/proc/meminfo`` into a dict of bytes (``{"MemTotal": ..., "MemAvailable": ...}``).

    Raises:
        OSError: when the file cannot be read.
    """
    out: dict[str, int] = {}
    text = (Path(proc_root) / "meminfo").read_text()
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if not fields or not fields[0].isdigit():
            continue
        scale = 1024 if len(fields) > 1 and fields[1].lower() == "kb" else 1
        out[key.strip()] = int(fields[0]) * scale
    return out


def _available_from_meminfo(info: dict[str, int]) -> int:
    if "MemAvailable" in info:
        return info["MemAvailable"]
    # Kernels before 3.14 lack MemAvailable: free pages plus the page cache is the usual stand-in.
    return info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)


def _read_int(path: Path) -> int | None:
    """An integer file such as ``memory.max``; ``None`` for ``max``, a missing or odd file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    return int(text)


def _read_stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _own_cgroups(proc_root: Path) -> tuple[str | None, str | None]:
    """The process's v1 ``memory`` cgroup and its v2 cgroup, from ``/proc/self/cgroup``."""
    v1 = v2 = None
    try:
        text = (proc_root / "self" / "cgroup").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _cgroup_dir(mount: Path, path: str) -> Path:
    """The cgroup's directory under ``mount``; the mount itself when the path is not there.

    In a container with its own cgroup namespace or a bind-mounted cgroup, ``/proc/self/cgroup``
    may name a path of the host's hierarchy while the container's own cgroup is mounted at the
    root.
    """
    candidate = mount / path.lstrip("/")
    return candidate if path.strip("/") and candidate.is_dir() else mount


def _v1_limit(mount: Path, path: str) -> tuple[int, int] | None:
    cg = _cgroup_dir(mount, path)
    limit = _read_int(cg / "memory.limit_in_bytes")
    stat = _read_stat(cg / "memory.stat")
    hierarchical = stat.get("hierarchical_memory_limit")
    limits = [x for x in (limit, hierarchical) if x is not None and x < _NO_LIMIT]
    if not limits:
        return None
    usage = _read_int(cg / "memory.usage_in_bytes") or 0
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    working_set = max(usage - inactive, 0)
    lim = min(limits)
    return lim, max(lim - working_set, 0)


def _v2_limit(mount: Path, path: str) -> tuple[int, int] | None:
    leaf = _cgroup_dir(mount, path)
    best: tuple[int, int] | None = None
    mount_resolved = mount.resolve()
    level = leaf
    while True:
        limit = _read_int(level / "memory.max")
        if limit is not None and limit < _NO_LIMIT:
            usage = _read_int(level / "memory.current") or 0
            inactive = _read_stat(level / "memory.stat").get("inactive_file", 0)
            left = max(limit - max(usage - inactive, 0), 0)
            best = (limit, left) if best is None else (min(best[0], limit), min(best[1], left))
        if level.resolve() == mount_resolved or level.parent == level:
            break
        level = level.parent
    return best


def cgroup_memory(proc_root: str | Path = PROC_ROOT,
                  cgroup_root: str | Path = CGROUP_ROOT) -> tuple[int, int, int] | None:
    """The memory cgroup limit that binds this process.

    Args:
        proc_root: where ``/proc`` is (``self/cgroup`` is read from it).
        cgroup_root: where the cgroup file systems are mounted. cgroup v1 keeps the memory
            controller in ``<root>/memory``; cgroup v2 mounts the unified hierarchy at ``<root>``.

    Returns:
        ``(version, limit_bytes, available_bytes)`` for the tightest level, or ``None`` when no
        memory limit applies (or the files cannot be read).
    """
    proc, root = Path(proc_root), Path(cgroup_root)
    v1, v2 = _own_cgroups(proc)
    if v1 is not None and (root / "memory").is_dir():
        found = _v1_limit(root / "memory", v1)
        if found is not None:
            return (1, *found)
    if v2 is not None and (root / "cgroup.controllers").is_file():
        found = _v2_limit(root, v2)
        if found is not None:
            return (2, *found)
    return None


def host_memory(proc_root: str | Path = PROC_ROOT,
                cgroup_root: str | Path = CGROUP_ROOT) -> HostMemory:
    """Total and available host memory for this process, capped by its memory cgroup.

    Args:
        proc_root: where ``/proc`` is mounted.
        cgroup_root: where the cgroup file systems are mounted.

    Raises:
        DeviceError: when neither ``/proc/meminfo`` nor ``psutil`` can answer.
    """
    try:
        info = read_meminfo(proc_root)
        mem_total, mem_avail = info["MemTotal"], _available_from_meminfo(info)
    except (OSError, KeyError):
        mem_total, mem_avail = _psutil_memory(proc_root)
    cg = cgroup_memory(proc_root, cgroup_root)
    if cg is None:
        return HostMemory(total_bytes=mem_total, available_bytes=min(mem_avail, mem_total),
                          mem_total_bytes=mem_total, mem_available_bytes=mem_avail)
    version, limit, left = cg
    total = min(mem_total, limit)
    log.debug("memory cgroup v%d: limit %d bytes, %d bytes left", version, limit, left)
    return HostMemory(total_bytes=total, available_bytes=min(mem_avail, left, total),
                      mem_total_bytes=mem_total, mem_available_bytes=mem_avail,
                      cgroup_version=version, cgroup_limit_bytes=limit,
                      cgroup_available_bytes=left)


def _psutil_memory(proc_root: str | Path) -> tuple[int, int]:
    try:
        import psutil
    except ImportError:
        raise DeviceError(
            f"cannot read host memory: {Path(proc_root) / 'meminfo'} is not readable and psutil is "
            "not installed; install it with: pip install psutil"
        ) from None
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)
