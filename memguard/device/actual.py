"""What a training step really used: the truth that a prediction is compared with.

On a GPU the peak of live tensors is ``torch.cuda.max_memory_allocated()``, and the process's
whole footprint is what NVML lists for it (the CUDA context, workspaces and every block the caching
allocator holds), as ``nvidia-smi`` shows.

On the CPU the truth is the growth of resident memory (../shared/REFERENCES.md, "Measuring the
truth on a CPU"): ``VmRSS`` is read at the start, the high-water mark ``VmHWM`` after the steps, and

    actual peak ≈ VmHWM − VmRSS at the start + bytes of tensors already resident at the start

where the tensors already resident are the model's parameters and buffers (and gradients and
optimizer state, when a run resumes), which the estimate counts and which the start's ``VmRSS``
already holds.

Both counters are the process's, and the user may read them too (``torch.cuda.max_memory_allocated``,
``VmHWM``, ``ru_maxrss``). So the probe does not reset them unless asked (``reset=True``, as the
benchmarks do): it reads the high-water mark at the start and again after the steps. When the mark
rose, the new mark was reached during the steps, and is their peak, exactly. When it did not, the
steps peaked no higher than the mark the process had reached before them, and the measurement is
an upper bound (:attr:`Measurement.upper_bound`): exact numbers then need ``reset=True`` (the
callbacks' ``reset_peak=True``), which loses the user's own reading of the peak before it.

Resetting, on the CPU: writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` (and ``ru_maxrss``)
to ``VmRSS``; on a GPU ``torch.cuda.reset_peak_memory_stats()``.

Why the CPU number is only a lower bound unless glibc's mmap threshold is pinned: glibc serves an
allocation of ``M_MMAP_THRESHOLD`` bytes or more (128 KiB at start) with its own ``mmap`` and
returns it to the kernel on ``free``, so resident memory falls when a tensor dies. But the
threshold is dynamic (``mallopt(3)``, ``M_MMAP_THRESHOLD``): when an mmapped chunk is freed, the
threshold rises to that chunk's size (up to 32 MiB on 64-bit systems) and the trim threshold to
twice that, so later buffers of up to 32 MiB come from the heap and arenas and stay resident after
they are freed. By the time the probe starts, after a first step, the heap holds freed buffers that
the measured steps reuse without any growth of ``VmRSS``: the growth undercounts the peak. The probe
therefore asks glibc to hand its free pages back first (``malloc_trim(0)``, which since glibc 2.8
releases every whole free page of every arena with ``madvise(MADV_DONTNEED)``, ``malloc_trim(3)``), so
that memory freed before the start (an earlier step, earlier work of the process) is counted again when
the measured steps reuse it; the computation is not touched. Buffers freed and reused between the start
and the peak can still hide a peak of a different shape, so the number stays a lower bound. Setting
``MALLOC_MMAP_THRESHOLD_`` (or the ``glibc.malloc.mmap_threshold`` tunable) in the environment
before the process starts pins the threshold and turns the adjustment off. Measured on this
project's machine, a 4-layer GPT-2 (n_embd 256, batch 8 x 256, AdamW, after one warm-up step): the
same two steps read 349-413 MiB unpinned (three runs) and 667 MiB pinned; the trace estimates 596 MiB.
:attr:`Measurement.lower_bound` and :attr:`Measurement.caveat` say which case a number is.

Known limitations (CPU):
    * Everything else the process allocates between the start and the peak is counted too:
      Python objects, the logger, lazy initialisation of kernels in the first step.
    * After the trim, allocations that glibc serves from its heap (under the mmap threshold) land in
      pages it released, and each faults a whole page: in a heap fragmented by earlier work, many
      such small buffers read more than their bytes. Measured on this project's machine, a 2-layer
      GPT-2 (n_embd 64, batch 8 x 64) read +0.5-1.7% against the trace on a fresh heap and +8-12%
      after 20,000 blocks of up to 60 KB had been allocated and two in three freed; at batch 8 x 128
      the same heap reads +0.1-1.4%. The error is on the high side, which the guard treats as a warning.
    * A threshold pinned in the middle of a process's life (``mallopt``) does not undo the heap it
      had built: glibc maps a buffer of the threshold or more only when no free chunk of its arena fits
      it (``malloc/malloc.c``: ``sysmalloc`` is reached after the bins and the top chunk), so the large
      free chunks that earlier work left in the heap serve tensor buffers, which stay resident when
      freed, while the next buffer faults pages elsewhere. Measured on this project's machine, a 2-layer
      GPT-2 (n_embd 64, batch 8 x 128) read +0.6% in a process started with the threshold pinned,
      +1.6% after a ``mallopt`` at its start, and +51% after the same ``mallopt`` in a process that had
      first freed a hundred heap buffers of 0.5-1 MiB. Exact numbers need a process started pinned.
    * Without the threshold pinned, the growth is a lower bound (see above). The environment
      is what is checked: a ``mallopt`` call made by the program itself cannot be seen.
    * With ``reset=True`` and without write access to ``/proc/self/clear_refs`` the mark cannot be
      reset, and the measurement is not taken (:meth:`MemoryProbe.start` says so by returning ``False``).
    * Data-loader worker processes are other processes, and are not counted.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from memguard.device import process_memory
from memguard.units import format_bytes

__all__ = ["Comparison", "Measurement", "MemoryProbe", "compare", "mmap_threshold_pinned", "read_and_compare",
           "resident_bytes", "training_tensors"]

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
        lower_bound: ``True`` when :attr:`peak_bytes` may be below the true peak and is not to be
            compared with an estimate as if exact: on the CPU when glibc's mmap threshold is not
            pinned (see the module docs).
        caveat: why it is a bound and how to get a comparable number, in one sentence; ``""`` when
            the measurement is exact as far as memguard knows.
        upper_bound: ``True`` when the steps did not raise the process's high-water mark, so that
            their own peak is at most :attr:`peak_bytes` (see the module docs).
    """

    peak_bytes: int
    total_bytes: int | None
    lower_bound: bool = False
    caveat: str = ""
    upper_bound: bool = False

    @property
    def exact(self) -> bool:
        """Whether :attr:`peak_bytes` is the steps' peak (neither bound)."""
        return not (self.lower_bound or self.upper_bound)


MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"

UNPINNED_CAVEAT = (
    "resident-memory growth with glibc's mmap threshold not pinned: freed buffers stay in the heap and "
    "are reused without growth, so this is a lower bound of the step's peak; start the process with "
    "MALLOC_MMAP_THRESHOLD_=65536 for a number comparable with the estimate"
)


UNRAISED_CAVEAT = (
    "the measured steps did not raise the process's peak above the one reached before them, so theirs is at "
    "most this; reset_peak=True resets the peak counters for an exact number (the process's own reading of "
    "its earlier peak is then lost)"
)


def mmap_threshold_pinned(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment pins glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_`` or the tunable).

    glibc reads both when the process starts; setting the threshold turns its dynamic adjustment
    off (``mallopt(3)``: "Dynamic adjustment of the mmap threshold is disabled if any of
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, or M_MMAP_MAX parameters is set"; glibc's
    ``malloc/malloc.c`` sets ``no_dyn_threshold``). Only the threshold itself is taken as pinned:
    the other three stop the adjustment without making freed tensor buffers leave the heap.
    """
    env = os.environ if env is None else env
    if env.get(MMAP_THRESHOLD_VARIABLE, "").strip():
        return True
    return "glibc.malloc.mmap_threshold=" in env.get("GLIBC_TUNABLES", "")


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


def _release_free_heap_pages() -> None:
    """``malloc_trim(0)`` where the C library is glibc (see the module docs); nothing elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, glibc's among them
    except (OSError, AttributeError) as exc:  # not glibc (musl, macOS): nothing to release this way
        log.debug("malloc_trim is not available: %s", exc)


class MemoryProbe:
    """Measures the peak memory of the steps between :meth:`start` and :meth:`read`.

    Args:
        device: the device to measure.
        reset: reset the process's peak counters at :meth:`start` (exact, but what the process
            itself would read of its earlier peak is lost); else compare the high-water marks at
            the start and at the end (see the module docs).
    """

    def __init__(self, device: torch.device, *, reset: bool = False) -> None:
        self.device = device
        self.reset = reset
        self._rss_start: int | None = None
        self._mark = 0  # the high-water mark at the start: bytes (GPU) or KiB (CPU)
        self._resident = 0
        self._started = False

    def start(self, resident: int) -> bool:
        """Read (or reset) the peak counters; ``resident`` is the bytes of tensors already on the device.

        Returns:
            Whether the measurement could start.
        """
        self._resident = resident
        self._started = False
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                if self.reset:
                    torch.cuda.reset_peak_memory_stats(self.device)
                self._mark = int(torch.cuda.max_memory_allocated(self.device))
            except Exception as exc:  # a broken CUDA must not break training
                log.debug("cannot read the CUDA peak counters: %s", exc)
                return False
            self._started = True
            return True
        if self.device.type != "cpu":
            return False
        _release_free_heap_pages()
        if self.reset:
            try:
                (_PROC_SELF / "clear_refs").write_text("5")
            except OSError as exc:
                log.debug("cannot reset VmHWM through /proc/self/clear_refs: %s", exc)
                return False
        self._rss_start = _status_kib("VmRSS")
        mark = _status_kib("VmHWM")
        self._mark = mark or 0
        self._started = self._rss_start is not None and mark is not None
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
            total = process_memory(self.device.index, os.getpid())
            if self.reset or peak > self._mark:
                return Measurement(peak, total)
            return Measurement(peak, total, caveat=UNRAISED_CAVEAT, upper_bound=True)
        hwm = _status_kib("VmHWM")
        if hwm is None or self._rss_start is None:
            return None
        peak = max(0, hwm - self._rss_start) * 1024 + self._resident
        unraised = not self.reset and hwm <= self._mark
        pinned = mmap_threshold_pinned()
        caveat = " and ".join(c for c, on in ((UNRAISED_CAVEAT, unraised), (UNPINNED_CAVEAT, not pinned)) if on)
        return Measurement(peak, None, lower_bound=not pinned, caveat=caveat, upper_bound=unraised)


def training_tensors(module: torch.nn.Module, optimizers: Iterable[Any]) -> list[torch.Tensor]:
    """What a training run keeps between steps: parameters, buffers, gradients, optimizer state.

    A probe started between steps credits them as already resident (see :meth:`MemoryProbe.start`).
    """
    tensors: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for opt in optimizers:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Predicted against measured, as the integrations log it.

    Attributes:
        metrics: ``memguard/predicted_peak_bytes``, ``memguard/actual_peak_bytes``,
            ``memguard/predicted_total_bytes``, ``memguard/error`` (actual over predicted peak, minus
            1), ``memguard/actual_is_lower_bound``, ``memguard/actual_is_upper_bound`` and, where NVML
            lists the process,
            ``memguard/actual_total_bytes``.
        summary: one line for the log.
        warning: a line to warn with when the actual peak exceeds the prediction by more than the
            margin, else ``None``.
    """

    metrics: dict[str, float]
    summary: str
    warning: str | None
    measurement: Measurement | None = None


def compare(got: Measurement, peak: int, total: int, margin: float) -> Comparison:
    """Compare a measurement with the predicted peak and total (bytes), with ``margin`` of tolerance."""
    error = got.peak_bytes / peak - 1 if peak else float("nan")
    metrics = {
        "memguard/predicted_peak_bytes": float(peak),
        "memguard/actual_peak_bytes": float(got.peak_bytes),
        "memguard/predicted_total_bytes": float(total),
        "memguard/error": error,
        "memguard/actual_is_lower_bound": float(got.lower_bound),
    }
    if got.total_bytes is not None:
        metrics["memguard/actual_total_bytes"] = float(got.total_bytes)
    if got.exact:
        actual = f"{format_bytes(got.peak_bytes)} ({100 * error:+.1f}%)"
    elif got.upper_bound and got.lower_bound:
        actual = f"unknown ({got.caveat})"
    else:
        actual = f"{'at most' if got.upper_bound else 'at least'} {format_bytes(got.peak_bytes)} ({got.caveat})"
    metrics["memguard/actual_is_upper_bound"] = float(got.upper_bound)
    warning = None
    if not got.upper_bound and got.peak_bytes > peak * (1 + margin):
        warning = (f"the first training steps used {format_bytes(got.peak_bytes)} at their peak, {100 * error:.1f}% "
                   f"above the {format_bytes(peak)} predicted (margin {margin:.0%}); memory may run out")
    return Comparison(metrics, f"predicted peak {format_bytes(peak)}, actual {actual}", warning, got)


def read_and_compare(probe: MemoryProbe | None, predicted: tuple[int, int] | None, margin: float) -> Comparison | None:
    """Read ``probe`` and compare it with the ``(peak, total)`` predicted; ``None`` when either is missing."""
    got = probe.read() if probe is not None and predicted is not None else None
    return None if got is None or predicted is None else compare(got, *predicted, margin)
