"""The memory of the training device: a GPU through NVML, the host, a catalog GPU, a budget.

An estimate is only useful against what is really free on the device the run will use, or, on a
CI runner or a laptop, against the GPU the run is planned for. :func:`device_memory` answers both:

>>> import memguard
>>> memguard.device_memory("cpu").source
'host'
>>> memguard.device_memory("A100-80GB").total_bytes
85899345920
>>> memguard.device_memory("12GiB").free_bytes
12884901888

Where the numbers come from (:attr:`DeviceMemory.source`):

- ``"nvml"``: a CUDA device read through NVML (``pynvml``, from ``nvidia-ml-py``), which creates no
  CUDA context. See :mod:`memguard.device._nvml` for how ``cuda:N`` is mapped to NVML devices under
  ``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER`` and MIG.
- ``"torch"``: ``torch.cuda.mem_get_info``, the fallback when NVML is missing or fails. It creates
  a CUDA context on the device (300-500 MB of GPU memory that stays until the process exits) if
  the process has none yet, and a warning names the NVML failure.
- ``"host"``: host memory for CPU runs, ``MemAvailable`` capped by the container's memory cgroup
  (see :mod:`memguard.device._host`).
- ``"catalog"``: a GPU from :mod:`memguard.device.catalog`, assumed empty (free = total).
- ``"budget"``: a size the user allows (``"12GiB"``) or a share of the training device's total
  memory (``"80%"``): total = free = the budget. :func:`parse_budget` is the one check of a
  budget value (a positive size or a share in (0%, 100%]) that every entry point uses.

When NVML fails, host memory is never read in place of a GPU's: ``"cuda"``/``"cuda:N"`` fall back
to torch or raise :class:`~memguard.errors.DeviceError` naming the NVML failure, and ``None`` means
the host only when no GPU can exist here: NVML's library is missing (or ``pynvml`` does not
import), no NVIDIA driver files are present (``/proc/driver/nvidia/version``, ``/dev/nvidiactl``),
``CUDA_VISIBLE_DEVICES`` names no device and torch sees no CUDA device. Any other NVML failure
(driver not loaded, version mismatch, no permission, a hung ``nvmlInit``) means a GPU is there but
cannot be read, and is a :class:`~memguard.errors.DeviceError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Union

from memguard.device import _host, _nvml
from memguard.device.catalog import close_gpus, list_gpus, lookup_gpu, matching_gpus
from memguard.errors import ConfigError, DeviceError, did_you_mean
from memguard.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["SOURCES", "DeviceLike", "DeviceMemory", "device_memory", "list_devices", "parse_budget", "parse_gpu",
           "process_memory", "resolve_budget", "why_no_gpu"]

log = logging.getLogger(__name__)

SOURCES = ("nvml", "torch", "host", "catalog", "budget")
"""The values of :attr:`DeviceMemory.source`."""

DeviceLike = Union[None, str, int, "torch.device"]
"""What :func:`device_memory` accepts."""

# A size with a unit ("12GiB", "1.5 GB", "512MiB", "4096B"); bare digits are not a size here.
_SIZE = re.compile(r"^\s*[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\s*(?:[kmgtp]i?b?|b)\s*$", re.I)
_CUDA = re.compile(r"^cuda(?::(\d+))?$")
_ACCEPTED = ("None, 'cpu', 'cuda', 'cuda:N', a torch.device, an int CUDA index, a GPU name from "
             "the catalog (e.g. 'A100-80GB'), a size such as '12GiB' or a percentage such as '80%'")


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """The memory of one device, in integer bytes.

    Attributes:
        name: the device's product name (``"NVIDIA A100-SXM4-80GB"``), ``"cpu"``, a catalog name
            or a description of the budget.
        index: the CUDA ordinal in this process (``cuda:N``), or ``None`` when not a CUDA device.
        uuid: the NVML UUID (``GPU-...``/``MIG-...``) when known.
        total_bytes: all memory of the device (for the host: capped by the cgroup limit).
        free_bytes: what a new allocation can get now.
        used_bytes: what is in use, by this process and others.
        source: one of :data:`SOURCES`: ``"nvml"``, ``"torch"``, ``"host"``, ``"catalog"``,
            ``"budget"``.
    """

    name: str
    index: int | None
    uuid: str | None
    total_bytes: int
    free_bytes: int
    used_bytes: int
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        for field in ("total_bytes", "free_bytes", "used_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, field, int(value))

    @property
    def device(self) -> str | None:
        """``"cuda:N"`` for a CUDA device, ``"cpu"`` for the host, else ``None``."""
        if self.index is not None and self.source in ("nvml", "torch"):
            return f"cuda:{self.index}"
        return "cpu" if self.source == "host" else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = f"{self.device} " if self.device and self.device != self.name else ""
        return (f"{where}{self.name}: {format_bytes(self.free_bytes)} free of "
                f"{format_bytes(self.total_bytes)} ({self.source})")


def device_memory(device: DeviceLike = None) -> DeviceMemory:
    """The memory of the device a training run will use, or of one it is planned for.

    Args:
        device: what to read.

            - ``None``: the current CUDA device when this process sees a GPU, else the host.
            - ``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)``, or an ``int`` N: a CUDA
              device as this process sees it (``"cuda"`` is the current device: ``cuda:0``
              unless CUDA is initialised with another one). Read through NVML; when NVML is
              missing or fails, through ``torch.cuda.mem_get_info``, which creates a CUDA
              context on the device if there is none yet.
            - ``"cpu"`` or ``torch.device("cpu")``: host memory, capped by the container's
              memory cgroup.
            - a GPU name from the catalog (``"A100-80GB"``, ``"h100"``, ``"RTX 4090"``): that GPU,
              empty.
            - a size with a unit (``"12GiB"``, ``"24GB"``) or a percentage (``"80%"`` of the
              total of the device ``None`` stands for): a budget, see :func:`resolve_budget`.
              An ``int`` is a CUDA index, never a byte count; pass bytes to
              :func:`resolve_budget` or write them with a unit.

    Returns:
        A :class:`DeviceMemory`.

    Raises:
        ConfigError: ``device`` is not one of the forms above, or not a known GPU name.
        DeviceError: the device's memory cannot be read (e.g. ``"cuda"`` without a GPU); the
            message says what NVML and torch each reported.
    """
    if device is None:
        return _default_device()
    if isinstance(device, bool):
        raise ConfigError(f"cannot read {device!r} as a device; expected {_ACCEPTED}")
    if isinstance(device, int):
        if device < 0:
            raise ConfigError(f"a CUDA device index must be >= 0, got {device}")
        return _cuda_memory(device)
    if isinstance(device, str):
        return _from_text(device)
    if _is_torch_device(device):
        if device.type == "cpu":
            return _host_memory()
        if device.type == "cuda":
            return _cuda_memory(device.index)
        raise ConfigError(f"memguard reads the memory of 'cuda' and 'cpu' devices, not {device!r}")
    raise ConfigError(f"cannot read {device!r} as a device; expected {_ACCEPTED}")


def list_devices() -> list[DeviceMemory]:
    """Every CUDA device this process sees, in CUDA's order; empty when there is none.

    Read through NVML, or through ``torch.cuda`` (which creates a CUDA context on every device)
    when NVML is missing or fails. The host is not listed: ask ``device_memory("cpu")``. When the
    list is empty, :func:`why_no_gpu` says why (NVML's failure, or what NVML and torch see).
    """
    try:
        found = _nvml.devices(cuda_uuids=_cuda_uuids())
    except _nvml.NvmlUnavailable as exc:
        nvml_reason = exc.reason
    else:
        return [_from_nvml(d) for d in found]
    try:
        count = _torch_cuda_count()
    except _TorchUnavailable as exc:
        log.debug("no CUDA device: NVML: %s; torch: %s", nvml_reason, exc)
        return []
    found_by_torch = [_torch_memory(i) for i in range(count)]
    _warn_fallback(nvml_reason)
    return found_by_torch


def parse_budget(value: int | float | str) -> int | float:
    """Check a memory budget without reading any device: the one validator of a budget value.

    Args:
        value: bytes (``int``, or a whole ``float``), a size (``"12GiB"`` binary, ``"12GB"``
            decimal, ``"4096"``), or a percentage of a device's total memory (``"80%"``).

    Returns:
        The budget in bytes (an ``int`` > 0) for a size, or the share of the device (a ``float``
        in ``(0, 1]``) for a percentage: ``parse_budget("12GiB") == 12884901888``,
        ``parse_budget("80%") == 0.8``.

    Raises:
        ConfigError: naming the value, when it cannot be read (a bool, ``None``, a word), is zero
            (``0``, ``"0"``, ``"0%"``: nothing would fit), negative, infinite or larger than
            :data:`~memguard.units.MAX_BYTES`, or a percentage above 100%.
    """
    if isinstance(value, str) and value.strip().endswith("%"):
        parse_bytes(value, total=1)  # checks the form and the 0%-100% range
        share = float(value.strip()[:-1]) / 100
        if share <= 0:
            raise ConfigError(f"budget {value!r} is no memory at all; give a share above 0%, such as '80%'")
        return share
    n = parse_bytes(value)
    if n <= 0:
        raise ConfigError(f"budget {value!r} is no memory at all; give a positive size such as '12GiB'")
    return n


def resolve_budget(value: int | float | str, device: DeviceLike = None) -> DeviceMemory:
    """A memory budget as a :class:`DeviceMemory` with ``source="budget"``.

    Args:
        value: what :func:`parse_budget` takes: bytes, a size or a percentage of ``device``'s
            total memory (``"80%"``).
        device: the device a percentage refers to (anything :func:`device_memory` accepts,
            including a catalog name); ``None`` is the training device, the GPU when this process
            sees one, else the host (never the host in place of a GPU NVML cannot read).

    Returns:
        total = free = the budget, used = 0; a percentage keeps the device's index and UUID.

    Raises:
        ConfigError: naming the value and the accepted forms when it cannot be read or is zero.
        DeviceError: when the device of a percentage cannot be read.
    """
    budget = parse_budget(value)  # a bad value fails before any device is read
    if isinstance(budget, float):
        base = device_memory(device)
        n = parse_bytes(value, total=base.total_bytes)
        if n <= 0:
            raise ConfigError(f"budget {value!r} of {base.name} ({format_bytes(base.total_bytes)}) is less "
                              "than one byte; give a larger share")
        return DeviceMemory(name=f"{str(value).strip()} of {base.name}", index=base.index,
                            uuid=base.uuid, total_bytes=n, free_bytes=n, used_bytes=0,
                            source="budget")
    return DeviceMemory(name=f"budget of {format_bytes(budget)}", index=None, uuid=None,
                        total_bytes=budget, free_bytes=budget, used_bytes=0, source="budget")


# -- the forms a device can take -------------------------------------------------------------


def _from_text(text: str) -> DeviceMemory:
    low = text.strip().lower()
    if low == "cpu":
        return _host_memory()
    cuda = _CUDA.match(low)
    if cuda:
        return _cuda_memory(int(cuda.group(1)) if cuda.group(1) else None)
    if low.startswith("cuda"):
        raise ConfigError(f"cannot read {text!r} as a CUDA device; expected 'cuda' or 'cuda:N'")
    if low.endswith("%") or _SIZE.match(low):
        return resolve_budget(text)
    matches = matching_gpus(text)
    if len(matches) > 1:
        lookup_gpu(text)  # raises the catalog's "ambiguous" error, which lists the matches
    if not matches and low.isdigit():
        raise ConfigError(f"{text!r} is neither a GPU name nor a size; write a budget with its "
                          f"unit ('{text}B', '{text}MiB'), or 'cuda:{text}' for a device index")
    if not matches:
        raise ConfigError(f"cannot read {text!r} as a device; expected {_ACCEPTED}.{did_you_mean(close_gpus(text))} "
                          f"GPU names the catalog knows: {', '.join(list_gpus())}")
    spec = matches[0]
    return DeviceMemory(name=spec.name, index=None, uuid=None, total_bytes=spec.total_bytes,
                        free_bytes=spec.total_bytes, used_bytes=0, source="catalog")


def _is_torch_device(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.device)


def _default_device() -> DeviceMemory:
    try:
        gpus = _nvml.devices(cuda_uuids=_cuda_uuids())
    except _nvml.NvmlUnavailable as exc:
        failure: _nvml.NvmlUnavailable | None = exc
        log.debug("NVML cannot answer (%s); asking torch whether CUDA is available", exc.reason)
    else:
        current = _current_index()
        if current < len(gpus):
            return _from_nvml(gpus[current])
        if not gpus:
            log.debug("device=None stands for the host: NVML answers and sees no CUDA device")
            return _host_memory()
        failure = None
    try:
        has_gpu = _torch_cuda_count() > 0
        torch_reason = ""
    except _TorchUnavailable as exc:
        has_gpu, torch_reason = False, str(exc)
    if has_gpu or failure is None:
        return _cuda_memory(None)
    meant = _gpu_meant(failure)
    if meant:
        raise DeviceError(
            f"cannot tell the memory of this machine's GPU: {meant}, but NVML cannot read it "
            f"({failure.reason}) and torch cannot either ({torch_reason}). Fix the driver, or name "
            "the device: device='cpu' for host memory, a catalog GPU (e.g. 'A100-80GB') or a budget "
            "(e.g. '40GiB')"
        )
    log.debug("device=None stands for the host: no GPU can exist here (NVML: %s; torch: %s)",
              failure.reason, torch_reason)
    return _host_memory()


DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl")
"""Files that exist whenever the NVIDIA kernel driver is loaded; any of them means a GPU may be here."""


def _gpu_meant(failure: _nvml.NvmlUnavailable) -> str | None:
    """Why this machine should have a GPU although NVML failed, in words; ``None`` when none can exist."""
    if failure.kind not in ("import", "library"):
        return "the NVIDIA driver's NVML library is installed"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if first[:1].isdigit() or first.upper().startswith(("GPU-", "MIG-")):
            return f"CUDA_VISIBLE_DEVICES={visible!r} names a GPU"
    for path in DRIVER_FILES:
        if os.path.exists(path):
            return f"the NVIDIA driver is loaded ({path} exists)"
    return None


def why_no_gpu() -> str:
    """Why :func:`list_devices` finds no CUDA device, in one sentence (what NVML and torch say).

    Returns ``""`` when there is a device after all.
    """
    try:
        found = _nvml.devices(cuda_uuids=_cuda_uuids())
    except _nvml.NvmlUnavailable as exc:
        nvml = f"NVML: {exc.reason}"
    else:
        if found:
            return ""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        nvml = f"NVML works and sees no CUDA device{note}"
    try:
        count = _torch_cuda_count()
    except _TorchUnavailable as exc:
        return f"{nvml}; torch: {exc}"
    return "" if count else nvml


def _host_memory() -> DeviceMemory:
    mem = _host.host_memory()
    return DeviceMemory(name="cpu", index=None, uuid=None, total_bytes=mem.total_bytes,
                        free_bytes=mem.available_bytes,
                        used_bytes=mem.total_bytes - mem.available_bytes, source="host")


# -- CUDA devices ----------------------------------------------------------------------------


class _TorchUnavailable(Exception):
    """torch cannot read CUDA memory either; the message says why."""


def _from_nvml(d: _nvml.NvmlDevice) -> DeviceMemory:
    return DeviceMemory(name=d.name, index=d.index, uuid=d.uuid, total_bytes=d.total_bytes,
                        free_bytes=d.free_bytes, used_bytes=d.used_bytes, source="nvml")


def _cuda_memory(index: int | None) -> DeviceMemory:
    want = _current_index() if index is None else index
    try:
        (found,) = _nvml.devices(want, cuda_uuids=_cuda_uuids())
    except _nvml.NvmlUnavailable as exc:
        nvml_reason = exc.reason
    else:
        return _from_nvml(found)
    try:
        count = _torch_cuda_count()
    except _TorchUnavailable as exc:
        raise DeviceError(
            f"cannot read the memory of cuda:{want}. NVML: {nvml_reason}. torch: {exc}. On a "
            "machine without the GPU, plan against a catalog GPU (e.g. device='A100-80GB') or a "
            "budget (e.g. device='40GiB')"
        ) from None
    if want >= count:
        raise DeviceError(f"there is no cuda:{want}; torch sees {count} CUDA device(s)")
    mem = _torch_memory(want)
    _warn_fallback(nvml_reason)
    return mem


def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"NVML cannot read GPU memory ({reason}); using torch.cuda.mem_get_info instead, which "
        "creates a CUDA context on the device if this process has none",
        stacklevel=3,
    )


def _current_index() -> int:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception as exc:  # a broken CUDA must not break the question
        log.debug("torch.cuda.current_device() failed: %s", exc)
    return 0


def _cuda_uuids() -> list[str] | None:
    """UUIDs of the CUDA devices in CUDA's order, only when CUDA is already initialised here."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid)
                for i in range(torch.cuda.device_count())]
    except Exception as exc:  # the mapping then falls back to CUDA_VISIBLE_DEVICES
        log.debug("cannot read CUDA device UUIDs from torch: %s", exc)
        return None


def _torch_cuda_count() -> int:
    try:
        import torch
    except ImportError:
        raise _TorchUnavailable("torch is not installed") from None
    except Exception as exc:  # e.g. a broken pynvml.py, which torch.cuda imports too
        raise _TorchUnavailable(f"importing torch failed ({type(exc).__name__}: {exc})") from None
    try:
        available = torch.cuda.is_available()
        count = int(torch.cuda.device_count()) if available else 0
    except Exception as exc:
        raise _TorchUnavailable(f"torch.cuda failed: {exc}") from None
    if not available or count == 0:
        if torch.version.cuda is None and torch.version.hip is None:
            raise _TorchUnavailable("torch.cuda.is_available() is False: this torch build has "
                                    "no CUDA support")
        raise _TorchUnavailable("torch.cuda.is_available() is False: no GPU, no driver, or no "
                                "device visible")
    return count


def _torch_memory(index: int) -> DeviceMemory:
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
                        free_bytes=int(free), used_bytes=int(total) - int(free), source="torch")


def process_memory(index: int | None = None, pid: int | None = None) -> int | None:
    """GPU memory a process uses on a CUDA device, as NVML (and ``nvidia-smi``) counts it.

    Args:
        index: the CUDA ordinal (``cuda:N``); ``None`` is the current device.
        pid: the process; ``None`` is this one.

    Returns:
        Bytes: the CUDA context, library workspaces and all the caching allocator holds. ``None``
        when NVML cannot answer, does not list the process (no context on that device yet, or a
        container that hides host PIDs from NVML), or does not know its usage.
    """
    want = _current_index() if index is None else index
    try:
        return _nvml.process_used_bytes(want, os.getpid() if pid is None else pid,
                                        cuda_uuids=_cuda_uuids())
    except (_nvml.NvmlUnavailable, DeviceError) as exc:
        log.debug("cannot read the memory of process %s on cuda:%d: %s", pid, want, exc)
        return None


# The one GPU-spec parser (--gpu, --memguard-gpu); bare digits are a CUDA index. Imported last: it reads
# device_memory and resolve_budget above.
from memguard.device._gpu_spec import parse_gpu  # noqa: E402
