"""What a training step really used: the truth that a prediction is compared with.

On a GPU the peak of live tensors is ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, and the process's whole footprint is what NVML lists for it (the
CUDA context, workspaces and every block the caching allocator holds), as ``nvidia-smi`` shows.

On the CPU the truth is the growth of resident memory (../shared/REFERENCES.md, "Measuring the
truth on a CPU"): the high-water mark ``VmHWM`` is reset by writing ``5`` to
``/proc/self/clear_refs``, ``VmRSS`` is read at that moment, and after the steps

    actual peak ≈ VmHWM − VmRSS at the start + bytes of tensors already resident at the start

where the tensors already resident are the model's parameters and buffers (and gradients and
optimizer state, when a run resumes), which the estimate counts and which the start's ``VmRSS``
already holds.

Known limitations (CPU):
    * Everything else the process allocates between the start and the peak is counted too:
      Python objects, the logger, lazy initialisation of kernels in the first step.
    * glibc keeps freed buffers in its heap unless its mmap threshold is pinned
      (``MALLOC_MMAP_THRESHOLD_=65536`` in the environment, or ``mallopt``); then the
      high-water mark is above the true peak of live tensors by what the heap held on to.
    * Without write access to ``/proc/self/clear_refs`` the mark cannot be reset, and the
      measurement is not taken (:meth:`MemoryProbe.start` says so by returning ``False``).
    * Data-loader worker processes are other processes, and are not counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from memguard.device import process_memory

__all__ = ["Measurement", "MemoryProbe", "resident_bytes"]

log = logging.getLogger(__name__)

_PROC_SELF = Path("/proc/self")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What the steps since :meth:`MemoryProbe.start` used, in bytes.

    Attributes:
        peak_bytes: peak of live tensors (GPU), or growth of resident memory plus the tensors
            resident at the start (CPU).
        total_bytes: the process's footprint on the GPU as NVML lists it, or ``None`` where NVML
            cannot tell (and always on the CPU).
    """

    peak_bytes: int
    total_bytes: int | None


def resident_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes of the distinct storages of ``tensors`` that live on ``device``."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != device.type:
            continue
        if device.index is not None and t.device.index not in (None, device.index):
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or key == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB, or ``None``."""
    try:
        text = (_PROC_SELF / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


class MemoryProbe:
    """Measures the peak memory of the steps between :meth:`start` and :meth:`read`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss_start: int | None = None
        self._resident = 0
        self._started = False

    def start(self, resident: int) -> bool:
        """Reset the peak counters; ``resident`` is the bytes of tensors already on the device.

        Returns:
            Whether the measurement could start.
        """
        self._resident = resident
        self._started = False
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            except Exception as exc:  # a broken CUDA must not break training
                log.debug("cannot reset the CUDA peak counters: %s", exc)
                return False
            self._started = True
            return True
        if self.device.type != "cpu":
            return False
        try:
            (_PROC_SELF / "clear_refs").write_text("5")
        except OSError as exc:
            log.debug("cannot reset VmHWM through /proc/self/clear_refs: %s", exc)
            return False
        self._rss_start = _status_kib("VmRSS")
        self._started = self._rss_start is not None
        return self._started

    def read(self) -> Measurement | None:
        """The peak since :meth:`start`, or ``None`` when it was not started or cannot be read."""
        if not self._started:
            return None
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                peak = int(torch.cuda.max_memory_allocated(self.device))
            except Exception as exc:
                log.debug("cannot read the CUDA peak: %s", exc)
                return None
            return Measurement(peak, process_memory(self.device.index, os.getpid()))
        hwm = _status_kib("VmHWM")
        if hwm is None or self._rss_start is None:
            return None
        return Measurement(max(0, hwm - self._rss_start) * 1024 + self._resident, None)
