"""Where device memory is read from: NVML, torch's CUDA fallback and the host, as one injectable object.

Every reader of live memory takes a :class:`Readers` (``readers=None`` is :data:`SYSTEM`, this machine).
Tests pass their own, as :func:`memguard.device._host.host_memory` takes its ``proc_root``: a fake
NVML, a host laid out in a temporary directory, a torch without CUDA. Nothing is patched on a module.

Where the numbers come from (:attr:`~memguard.device.DeviceMemory.source`):

- ``"nvml"``: a CUDA device read through NVML (``pynvml``, from ``nvidia-ml-py``), which creates no
  CUDA context. See :mod:`memguard.device._nvml` for how ``cuda:N`` is mapped to NVML devices under
  ``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER`` and MIG.
- ``"torch"``: ``torch.cuda.mem_get_info``, the fallback when NVML is missing or fails. It creates
  a CUDA context on the device (300-500 MB of GPU memory that stays until the process exits) if
  the process has none yet, and a warning names the NVML failure.
- ``"host"``: host memory for CPU runs, ``MemAvailable`` capped by the container's memory cgroup
  (see :mod:`memguard.device._host`).

When NVML fails, host memory is never read in place of a GPU's: ``"cuda"``/``"cuda:N"`` fall back
to torch or raise :class:`~memguard.errors.DeviceError` naming the NVML failure, and the training
device (``None``) means the host only when no GPU can exist here: NVML's library is missing (or
``pynvml`` does not import), no NVIDIA driver files are present (``/proc/driver/nvidia/version``,
``/dev/nvidiactl``), ``CUDA_VISIBLE_DEVICES`` names no device and torch sees no CUDA device. Any
other NVML failure (driver not loaded, version mismatch, no permission, a hung ``nvmlInit``) means a
GPU is there but cannot be read, and is a :class:`~memguard.errors.DeviceError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping

from memguard.device import _host, _nvml
from memguard.device.memory import DeviceMemory, MemorySource
from memguard.errors import DeviceError

HostMemory = _host.HostMemory
"""What :attr:`Readers.host` returns (:class:`memguard.device._host.HostMemory`)."""
NvmlDevice = _nvml.NvmlDevice
"""What :attr:`Readers.nvml` returns a list of (:class:`memguard.device._nvml.NvmlDevice`)."""
NvmlUnavailable = _nvml.NvmlUnavailable
"""What :attr:`Readers.nvml` raises when NVML cannot answer (:class:`memguard.device._nvml.NvmlUnavailable`)."""

__all__ = ["DRIVER_FILES", "SYSTEM", "HostMemory", "NvmlDevice", "NvmlUnavailable", "Readers", "TorchCuda",
           "TorchUnavailable", "list_devices", "process_memory", "read_cuda", "read_host",
           "read_training_device", "why_no_gpu"]

log = logging.getLogger(__name__)

DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl")
"""Files that exist whenever the NVIDIA kernel driver is loaded; any of them means a GPU may be here."""


class TorchUnavailable(Exception):
    """torch cannot read CUDA memory either; the message says why."""


class TorchCuda:
    """torch's view of CUDA: the fallback reader when NVML cannot answer, and the current device.

    Each method reads ``torch.cuda`` when it is called; a subclass (in tests) answers for a torch
    that is not there.
    """

    def count(self) -> int:
        """CUDA devices torch sees; :class:`TorchUnavailable` (with the reason) when none."""
        try:
            import torch
        except ImportError:
            raise TorchUnavailable("torch is not installed") from None
        except Exception as exc:  # e.g. a broken pynvml.py, which torch.cuda imports too
            raise TorchUnavailable(f"importing torch failed ({type(exc).__name__}: {exc})") from None
        try:
            available = torch.cuda.is_available()
            count = int(torch.cuda.device_count()) if available else 0
        except Exception as exc:
            raise TorchUnavailable(f"torch.cuda failed: {exc}") from None
        if not available or count == 0:
            if torch.version.cuda is None and torch.version.hip is None:
                raise TorchUnavailable("torch.cuda.is_available() is False: this torch build has "
                                       "no CUDA support")
            raise TorchUnavailable("torch.cuda.is_available() is False: no GPU, no driver, or no "
                                   "device visible")
        return count

    def memory(self, index: int) -> DeviceMemory:
        """``torch.cuda.mem_get_info(index)``, which creates a CUDA context there if there is none."""
        import torch

        try:
            free, total = torch.cuda.mem_get_info(index)
            props = torch.cuda.get_device_properties(index)
        except Exception as exc:
            raise DeviceError(f"torch.cuda cannot read the memory of cuda:{index}: {exc}") from None
        uuid = getattr(props, "uuid", None)
        uuid_text = None if uuid is None else str(uuid)
        if uuid_text and not uuid_text.upper().startswith(("GPU-", "MIG-")):
            uuid_text = f"GPU-{uuid_text}"
        return DeviceMemory(name=str(props.name), index=index, uuid=uuid_text, total_bytes=int(total),
                            free_bytes=int(free), used_bytes=int(total) - int(free), source=MemorySource.TORCH)

    def current_index(self) -> int:
        """The current CUDA device when CUDA is initialised in this process, else 0."""
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                return int(torch.cuda.current_device())
        except Exception as exc:  # a broken CUDA must not break the question
            log.debug("torch.cuda.current_device() failed: %s", exc)
        return 0

    def uuids(self) -> list[str] | None:
        """UUIDs of the CUDA devices in CUDA's order, only when CUDA is already initialised here."""
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_initialized():
                return None
            return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        except Exception as exc:  # the mapping then falls back to CUDA_VISIBLE_DEVICES
            log.debug("cannot read CUDA device UUIDs from torch: %s", exc)
            return None


@dataclasses.dataclass(frozen=True)
class Readers:
    """The readers of live memory; every field has this machine's default.

    Attributes:
        nvml: ``devices(index=None, *, cuda_uuids=None)``, as :func:`memguard.device._nvml.devices`:
            the CUDA devices NVML sees; raises :class:`~memguard.device._nvml.NvmlUnavailable`.
        nvml_process: ``process_used_bytes(index, pid, *, cuda_uuids=None)``, as
            :func:`memguard.device._nvml.process_used_bytes`.
        host: ``() -> HostMemory``, e.g. ``functools.partial(host_memory, proc_root=tmp)``.
        torch: the CUDA fallback and the current device (:class:`TorchCuda`).
        driver_files: files whose presence means the NVIDIA driver is loaded (:data:`DRIVER_FILES`).
        env: where ``CUDA_VISIBLE_DEVICES`` is read when explaining a missing GPU (default
            :data:`os.environ`).
    """

    nvml: Callable[..., list[_nvml.NvmlDevice]] = _nvml.devices
    nvml_process: Callable[..., int | None] = _nvml.process_used_bytes
    host: Callable[[], _host.HostMemory] = _host.host_memory
    torch: TorchCuda = dataclasses.field(default_factory=TorchCuda)
    driver_files: tuple[str, ...] = DRIVER_FILES
    env: Mapping[str, str] | None = None

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self.env is None else self.env

    def nvml_devices(self, index: int | None = None) -> list[_nvml.NvmlDevice]:
        """:attr:`nvml` with the CUDA UUIDs torch knows (exact mapping once CUDA is initialised)."""
        return self.nvml(index, cuda_uuids=self.torch.uuids())


SYSTEM = Readers()
"""This machine's readers: NVML, torch and ``/proc``."""


def _or_system(readers: Readers | None) -> Readers:
    return SYSTEM if readers is None else readers


def _from_nvml(d: _nvml.NvmlDevice) -> DeviceMemory:
    """An NVML device as a :class:`DeviceMemory` (``source="nvml"``)."""
    return DeviceMemory(name=d.name, index=d.index, uuid=d.uuid, total_bytes=d.total_bytes,
                        free_bytes=d.free_bytes, used_bytes=d.used_bytes, source=MemorySource.NVML)


def read_host(readers: Readers | None = None) -> DeviceMemory:
    """Host memory, ``MemAvailable`` capped by the memory cgroup (``source="host"``)."""
    mem = _or_system(readers).host()
    return DeviceMemory(name="cpu", index=None, uuid=None, total_bytes=mem.total_bytes,
                        free_bytes=mem.available_bytes,
                        used_bytes=mem.total_bytes - mem.available_bytes, source=MemorySource.HOST)


def read_cuda(index: int | None, readers: Readers | None = None) -> DeviceMemory:
    """A CUDA device (``None``: the current one) through NVML, else through torch with a warning.

    Raises:
        DeviceError: neither can read it; the message says what NVML and torch each reported.
    """
    r = _or_system(readers)
    want = r.torch.current_index() if index is None else index
    try:
        (found,) = r.nvml_devices(want)
    except _nvml.NvmlUnavailable as exc:
        nvml_reason = exc.reason
    else:
        return _from_nvml(found)
    try:
        count = r.torch.count()
    except TorchUnavailable as exc:
        raise DeviceError(
            f"cannot read the memory of cuda:{want}. NVML: {nvml_reason}. torch: {exc}. On a "
            "machine without the GPU, plan against a catalog GPU (e.g. device='A100-80GB') or a "
            "budget (e.g. device='40GiB')"
        ) from None
    if want >= count:
        raise DeviceError(f"there is no cuda:{want}; torch sees {count} CUDA device(s)")
    mem = r.torch.memory(want)
    _warn_fallback(nvml_reason)
    return mem


def read_training_device(readers: Readers | None = None) -> DeviceMemory:
    """The device ``None`` stands for: the current CUDA device when this process sees a GPU, else the host.

    Raises:
        DeviceError: a GPU is here (a driver, ``CUDA_VISIBLE_DEVICES``) but neither NVML nor torch
            can read it: the host is never read in its place.
    """
    r = _or_system(readers)
    try:
        gpus = r.nvml_devices()
    except _nvml.NvmlUnavailable as exc:
        failure: _nvml.NvmlUnavailable | None = exc
        log.debug("NVML cannot answer (%s); asking torch whether CUDA is available", exc.reason)
    else:
        current = r.torch.current_index()
        if current < len(gpus):
            return _from_nvml(gpus[current])
        if not gpus:
            log.debug("device=None stands for the host: NVML answers and sees no CUDA device")
            return read_host(r)
        failure = None
    try:
        has_gpu = r.torch.count() > 0
        torch_reason = ""
    except TorchUnavailable as exc:
        has_gpu, torch_reason = False, str(exc)
    if has_gpu or failure is None:
        return read_cuda(None, r)
    meant = _gpu_meant(failure, r)
    if meant:
        raise DeviceError(
            f"cannot tell the memory of this machine's GPU: {meant}, but NVML cannot read it "
            f"({failure.reason}) and torch cannot either ({torch_reason}). Fix the driver, or name "
            "the device: device='cpu' for host memory, a catalog GPU (e.g. 'A100-80GB') or a budget "
            "(e.g. '40GiB')"
        )
    log.debug("device=None stands for the host: no GPU can exist here (NVML: %s; torch: %s)",
              failure.reason, torch_reason)
    return read_host(r)


def _gpu_meant(failure: _nvml.NvmlUnavailable, readers: Readers) -> str | None:
    """Why this machine should have a GPU although NVML failed, in words; ``None`` when none can exist."""
    if failure.kind not in ("import", "library"):
        return "the NVIDIA driver's NVML library is installed"
    visible = readers.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if first[:1].isdigit() or first.upper().startswith(("GPU-", "MIG-")):
            return f"CUDA_VISIBLE_DEVICES={visible!r} names a GPU"
    for path in readers.driver_files:
        if os.path.exists(path):
            return f"the NVIDIA driver is loaded ({path} exists)"
    return None


def list_devices(*, readers: Readers | None = None) -> list[DeviceMemory]:
    """Every CUDA device this process sees, in CUDA's order; empty when there is none.

    Read through NVML, or through ``torch.cuda`` (which creates a CUDA context on every device)
    when NVML is missing or fails. The host is not listed: ask ``device_memory("cpu")``. When the
    list is empty, :func:`why_no_gpu` says why (NVML's failure, or what NVML and torch see).
    """
    r = _or_system(readers)
    try:
        found = r.nvml_devices()
    except _nvml.NvmlUnavailable as exc:
        nvml_reason = exc.reason
    else:
        return [_from_nvml(d) for d in found]
    try:
        count = r.torch.count()
    except TorchUnavailable as exc:
        log.debug("no CUDA device: NVML: %s; torch: %s", nvml_reason, exc)
        return []
    found_by_torch = [r.torch.memory(i) for i in range(count)]
    _warn_fallback(nvml_reason)
    return found_by_torch


def why_no_gpu(*, readers: Readers | None = None) -> str:
    """Why :func:`list_devices` finds no CUDA device, in one sentence (what NVML and torch say).

    Returns ``""`` when there is a device after all.
    """
    r = _or_system(readers)
    try:
        found = r.nvml_devices()
    except _nvml.NvmlUnavailable as exc:
        nvml = f"NVML: {exc.reason}"
    else:
        if found:
            return ""
        visible = r.environ.get("CUDA_VISIBLE_DEVICES")
        note = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        nvml = f"NVML works and sees no CUDA device{note}"
    try:
        count = r.torch.count()
    except TorchUnavailable as exc:
        return f"{nvml}; torch: {exc}"
    return "" if count else nvml


def process_memory(index: int | None = None, pid: int | None = None, *,
                   readers: Readers | None = None) -> int | None:
    """GPU memory a process uses on a CUDA device, as NVML (and ``nvidia-smi``) counts it.

    Args:
        index: the CUDA ordinal (``cuda:N``); ``None`` is the current device.
        pid: the process; ``None`` is this one.
        readers: where to read (default: this machine).

    Returns:
        Bytes: the CUDA context, library workspaces and all the caching allocator holds. ``None``
        when NVML cannot answer, does not list the process (no context on that device yet, or a
        container that hides host PIDs from NVML), or does not know its usage.
    """
    r = _or_system(readers)
    want = r.torch.current_index() if index is None else index
    try:
        return r.nvml_process(want, os.getpid() if pid is None else pid, cuda_uuids=r.torch.uuids())
    except (_nvml.NvmlUnavailable, DeviceError) as exc:
        log.debug("cannot read the memory of process %s on cuda:%d: %s", pid, want, exc)
        return None


def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"NVML cannot read GPU memory ({reason}); using torch.cuda.mem_get_info instead, which "
        "creates a CUDA context on the device if this process has none",
        stacklevel=3,
    )


