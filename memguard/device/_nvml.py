"""GPU memory through NVML (``pynvml`` from ``nvidia-ml-py``), as the training process sees it.

NVML is initialised once per process, on first use, and shut down at exit (:func:`shutdown`,
registered with :mod:`atexit`). NVML does not create a CUDA context, so asking costs no GPU
memory. Whatever goes wrong inside NVML (library missing, driver not loaded, driver/library
version mismatch, no permission, GPU lost, a ``pynvml`` that raises on import, an ``nvmlInit``
that hangs) becomes :class:`NvmlUnavailable` with a sentence that says what is missing and a
:attr:`~NvmlUnavailable.kind`; :mod:`memguard.device` turns it into a warning and a fallback, or a
:class:`~memguard.errors.DeviceError`. A failed initialisation is remembered until
:func:`shutdown`, so a machine without NVML pays for the attempt once.

``nvmlInit`` runs in a daemon thread and is given up after :data:`DEFAULT_INIT_TIMEOUT` seconds
(``MEMGUARD_NVML_TIMEOUT`` in the environment sets another). Without persistence mode the driver
initialises each GPU when a client first attaches, which NVIDIA's "Driver Persistence" document
puts at seconds per GPU, and a driver in a bad state may not return at all; a memory query must
not hang a CI job or a training script on it. If the call returns after it was given up, NVML is
shut down again.

How CUDA device ordinals map to NVML handles:

1. When CUDA is already initialised in this process, the caller passes the UUIDs of the CUDA
   devices in CUDA's order (``torch.cuda.get_device_properties(i).uuid``), and each ordinal is
   matched to the NVML device or MIG instance with that UUID. This is exact.
2. Otherwise ``CUDA_VISIBLE_DEVICES`` is read the way CUDA reads it: a comma-separated list whose
   entries are integer indices, ``GPU-`` UUIDs or ``MIG-`` UUIDs (a unique prefix is enough); the
   list ends at the first entry that names no device, and a device listed twice makes the list
   empty (CUDA then sees no device). UUID entries map exactly. Integer entries are NVML indices.
   NVML numbers GPUs by PCI bus id; CUDA numbers them the same way when
   ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and otherwise puts the fastest first, which agrees with PCI
   order on a machine of identical GPUs. When the GPUs differ and the order is not pinned, a
   warning says so.
3. A GPU in MIG mode is not a CUDA device itself: CUDA enumerates its MIG instances, and a CUDA
   process sees at most one MIG instance (NVIDIA MIG user guide, "CUDA device enumeration"). A
   MIG-mode GPU named by index or ``GPU-`` UUID therefore stands for its first MIG instance (and
   for nothing when it has none), and only the first MIG instance of the list is kept. A MIG
   instance's memory is read from its own MIG handle.

Known limitations: the legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` form of ``CUDA_VISIBLE_DEVICES``
(R450 drivers) is not understood and ends the list, as does an unknown entry.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from memguard.errors import ConfigError, DeviceError

__all__ = ["DEFAULT_INIT_TIMEOUT", "KINDS", "NvmlDevice", "NvmlUnavailable", "devices", "shutdown"]

log = logging.getLogger(__name__)

DEFAULT_INIT_TIMEOUT = 10.0
"""Seconds ``nvmlInit`` may take before memguard gives up on NVML (``MEMGUARD_NVML_TIMEOUT``)."""
TIMEOUT_VARIABLE = "MEMGUARD_NVML_TIMEOUT"

KINDS = ("import", "library", "init", "timeout", "query")
"""What :attr:`NvmlUnavailable.kind` says went wrong: ``pynvml`` does not import; the NVML
library (``libnvidia-ml.so``, installed with the driver) is not found; ``nvmlInit`` failed
otherwise (driver not loaded, version mismatch, no permission ...); it did not return in time; or
a query after a good initialisation failed (GPU lost ...)."""

_LOCK = threading.RLock()
_ABANDON_LOCK = threading.Lock()
_module: Any = None
_failure: NvmlUnavailable | None = None
_atexit_registered = False


class NvmlUnavailable(Exception):
    """NVML cannot answer; ``reason`` says why in words. Private to memguard: never escapes it.

    Attributes:
        reason: the sentence.
        kind: one of :data:`KINDS`. Only ``"import"`` and ``"library"`` leave open that this
            machine has no NVIDIA driver at all; the others mean it has one.
    """

    def __init__(self, reason: str, kind: str = "query") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class NvmlDevice:
    """One CUDA device as NVML sees it, memory in bytes.

    Attributes:
        index: the CUDA ordinal in this process (what ``cuda:N`` means).
        name: NVML's product name (a MIG instance's name includes its profile).
        uuid: ``GPU-...`` or ``MIG-...``.
        total_bytes, free_bytes, used_bytes: from ``nvmlDeviceGetMemoryInfo``.
        nvml_index: NVML index of the physical GPU.
        mig: whether this is a MIG instance.
    """

    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    nvml_index: int
    mig: bool = False


@dataclasses.dataclass
class _Slot:
    handle: Any
    uuid: str
    name: str
    nvml_index: int
    mig: bool = False
    mig_mode: bool = False
    migs: list[_Slot] = dataclasses.field(default_factory=list)


_HINTS = {
    "NVMLError_LibraryNotFound": "the NVML library (libnvidia-ml.so) was not found: no NVIDIA "
                                 "driver is installed, or it is not mounted into this container",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
    "NVMLError_LibRmVersionMismatch": "the NVML library and the loaded NVIDIA kernel driver have "
                                      "different versions (reload the driver or reboot after a "
                                      "driver upgrade)",
    "NVMLError_NoPermission": "this process has no permission to query the GPU through NVML",
    "NVMLError_GpuIsLost": "the GPU is lost (it fell off the bus or stopped responding)",
    "NVMLError_FunctionNotFound": "the installed NVIDIA driver is too old for this NVML call",
}


def describe(exc: BaseException) -> str:
    """A sentence for an NVML exception: the hint for its type and NVML's own message."""
    kind = type(exc).__name__
    hint = _HINTS.get(kind)
    try:
        text = str(exc)
    except Exception:  # str() of an NVMLError can itself call into NVML
        text = kind
    return f"{hint} ({kind}: {text})" if hint else f"{kind}: {text}"


def _library() -> Any:
    """The initialised ``pynvml`` module; initialises NVML on first call."""
    global _module, _failure, _atexit_registered
    if _module is not None:
        return _module
    if _failure is not None:
        raise NvmlUnavailable(_failure.reason, _failure.kind)
    try:
        pynvml = _import()
        _init(pynvml)
    except NvmlUnavailable as exc:
        _failure = exc
        raise
    log.debug("NVML initialised")
    _module = pynvml
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True
    return pynvml


def _import() -> Any:
    """``import pynvml``; any failure of the import (not only ``ImportError``) is NVML unavailable."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("the 'pynvml' module is not importable; install NVIDIA's bindings with: "
                              "pip install nvidia-ml-py", "import") from None
    except (Exception, SystemExit) as exc:  # a broken or shadowing pynvml.py can raise anything
        raise NvmlUnavailable(f"importing 'pynvml' failed ({type(exc).__name__}: {exc}); reinstall NVIDIA's "
                              "bindings with: pip install --force-reinstall nvidia-ml-py", "import") from None
    return pynvml


def init_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for ``nvmlInit``: ``MEMGUARD_NVML_TIMEOUT``, else :data:`DEFAULT_INIT_TIMEOUT`.

    Raises:
        ConfigError: when the variable is set to something other than a positive number of seconds.
    """
    text = (os.environ if env is None else env).get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_INIT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of seconds, such as 10")
    return value


def _init(pynvml: Any) -> None:
    """``nvmlInit`` in a daemon thread, given up after :func:`init_timeout` seconds."""
    timeout = init_timeout()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            pynvml.nvmlInit()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        with _ABANDON_LOCK:
            box["finished"] = True
            late = box.get("abandoned", False)
        done.set()
        if late and "error" not in box:
            _shutdown_quietly(pynvml)

    threading.Thread(target=run, name="memguard-nvmlInit", daemon=True).start()
    if not done.wait(timeout):
        with _ABANDON_LOCK:
            if not box.get("finished"):
                box["abandoned"] = True
                raise NvmlUnavailable(
                    f"nvmlInit did not return within {timeout:g} s (the NVIDIA driver may be hung or "
                    f"still initialising the GPU; {TIMEOUT_VARIABLE} sets the wait)", "timeout")
    exc = box.get("error")
    if exc is None:
        return
    if _is(exc, pynvml, "NVMLError_LibraryNotFound"):
        raise NvmlUnavailable(f"nvmlInit failed: {describe(exc)}", "library") from None
    if _is(exc, pynvml, "NVMLError"):
        raise NvmlUnavailable(f"nvmlInit failed: {describe(exc)}", "init") from None
    if isinstance(exc, OSError):
        raise NvmlUnavailable(f"nvmlInit failed: {exc}", "library") from None
    if isinstance(exc, (Exception, SystemExit)):
        raise NvmlUnavailable(f"nvmlInit failed: {type(exc).__name__}: {exc}", "init") from None
    raise exc  # KeyboardInterrupt: not NVML's to swallow


def _is(exc: BaseException, pynvml: Any, name: str) -> bool:
    cls = getattr(pynvml, name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _shutdown_quietly(pynvml: Any) -> None:
    """Undo an ``nvmlInit`` that returned after memguard had given up on it."""
    try:
        pynvml.nvmlShutdown()
    except Exception as exc:
        log.debug("nvmlShutdown after a late nvmlInit failed: %s", exc)


def shutdown() -> None:
    """Shut NVML down if memguard initialised it, and forget a remembered failure."""
    global _module, _failure
    with _LOCK:
        lib, _module, _failure = _module, None, None
        if lib is None:
            return
        try:
            lib.nvmlShutdown()
        except lib.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", describe(exc))
        else:
            log.debug("NVML shut down")


def _text(value: Any) -> str:
    # nvidia-ml-py < 11.515 returned bytes for names and UUIDs.
    return value.decode() if isinstance(value, bytes) else str(value)


def _bare_uuid(uuid: str) -> str:
    """``GPU-ab12...`` / ``MIG-ab12...`` / ``ab12...`` -> ``ab12...`` (lower case)."""
    u = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            return u[len(prefix):]
    return u


def _mig_mode(lib: Any, handle: Any) -> bool:
    try:
        current, _pending = lib.nvmlDeviceGetMigMode(handle)
    except (lib.NVMLError_NotSupported, lib.NVMLError_FunctionNotFound, AttributeError):
        return False
    return bool(current == getattr(lib, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_slots(lib: Any, parent: _Slot) -> list[_Slot]:
    out = []
    for j in range(lib.nvmlDeviceGetMaxMigDeviceCount(parent.handle)):
        try:
            h = lib.nvmlDeviceGetMigDeviceHandleByIndex(parent.handle, j)
        except (lib.NVMLError_NotFound, lib.NVMLError_InvalidArgument):
            continue  # an empty MIG slot
        out.append(_Slot(h, _text(lib.nvmlDeviceGetUUID(h)), _text(lib.nvmlDeviceGetName(h)),
                         parent.nvml_index, mig=True))
    return out


def _physical(lib: Any) -> list[_Slot]:
    slots = []
    for i in range(lib.nvmlDeviceGetCount()):
        h = lib.nvmlDeviceGetHandleByIndex(i)
        slot = _Slot(h, _text(lib.nvmlDeviceGetUUID(h)), _text(lib.nvmlDeviceGetName(h)), i)
        slot.mig_mode = _mig_mode(lib, h)
        if slot.mig_mode:
            slot.migs = _mig_slots(lib, slot)
        slots.append(slot)
    return slots


def _strtoul(entry: str) -> int | None:
    """The integer an entry starts with, as CUDA's ``strtoul`` reads it (``"1gpu"`` -> 1)."""
    digits = ""
    for c in entry:
        if not c.isdigit():
            break
        digits += c
    return int(digits) if digits else None


def _by_prefix(entry: str, slots: Sequence[_Slot]) -> _Slot | None:
    want = _bare_uuid(entry)
    found = [s for s in slots if _bare_uuid(s.uuid).startswith(want)]
    return found[0] if len(found) == 1 else None


def _from_env(phys: list[_Slot], env: Mapping[str, str]) -> tuple[list[_Slot], str]:
    """Apply ``CUDA_VISIBLE_DEVICES``; returns the chosen NVML slots and a note for messages."""
    var = env.get("CUDA_VISIBLE_DEVICES")
    if var is None:
        return list(phys), "CUDA_VISIBLE_DEVICES is not set"
    note = f"CUDA_VISIBLE_DEVICES={var!r}"
    migs = [m for p in phys for m in p.migs]
    chosen: list[_Slot] = []
    for raw in var.split(","):
        entry = raw.strip()
        slot: _Slot | None
        if entry.upper().startswith("MIG-GPU-"):
            log.debug("legacy MIG entry %r in CUDA_VISIBLE_DEVICES is not supported", entry)
            slot = None
        elif entry.upper().startswith("MIG-"):
            slot = _by_prefix(entry, migs)
        elif entry.upper().startswith("GPU-"):
            slot = _by_prefix(entry, phys)
        else:
            n = _strtoul(entry)
            slot = phys[n] if n is not None and n < len(phys) else None
        if slot is None:
            log.debug("%s: entry %r names no device; the list ends there", note, entry)
            break
        if any(s is slot for s in chosen):
            log.debug("%s names a device twice; CUDA then sees no device", note)
            return [], f"{note} names a device twice, so CUDA sees no device"
        chosen.append(slot)
    return chosen, note


def _expand_mig(chosen: list[_Slot]) -> list[_Slot]:
    """MIG-mode GPUs stand for their first MIG instance; CUDA enumerates one MIG instance."""
    out: list[_Slot] = []
    seen_mig = False
    for slot in chosen:
        if slot.mig_mode:
            if not slot.migs:
                log.debug("GPU %s is in MIG mode without MIG instances: no CUDA device", slot.uuid)
                continue
            slot = slot.migs[0]
        if slot.mig:
            if seen_mig:
                log.debug("CUDA enumerates one MIG instance per process; %s is left out", slot.uuid)
                continue
            seen_mig = True
        out.append(slot)
    return out


def _by_cuda_uuids(phys: list[_Slot], cuda_uuids: Sequence[str]) -> list[_Slot] | None:
    table = {_bare_uuid(s.uuid): s for p in phys for s in (p, *p.migs)}
    found = [table.get(_bare_uuid(u)) for u in cuda_uuids]
    if any(s is None for s in found):
        log.debug("CUDA device UUIDs %s not all known to NVML; reading CUDA_VISIBLE_DEVICES",
                  cuda_uuids)
        return None
    return [s for s in found if s is not None]


def _warn_order(slots: list[_Slot], env: Mapping[str, str]) -> None:
    var = env.get("CUDA_VISIBLE_DEVICES")
    by_index = var is None or not var.strip().upper().startswith(("GPU-", "MIG-"))
    if (by_index and len({s.name for s in slots}) > 1
            and env.get("CUDA_DEVICE_ORDER", "").upper() != "PCI_BUS_ID"):
        warnings.warn(
            "these GPUs differ (" + ", ".join(sorted({s.name for s in slots})) + "), and CUDA "
            "numbers them fastest first while NVML numbers them by PCI bus, so cuda:N may be "
            "another GPU than memguard reads; set CUDA_DEVICE_ORDER=PCI_BUS_ID (or name GPUs by "
            "UUID in CUDA_VISIBLE_DEVICES) to make the order certain",
            stacklevel=4,
        )


def _visible(lib: Any, env: Mapping[str, str],
             cuda_uuids: Sequence[str] | None) -> tuple[list[_Slot], str]:
    phys = _physical(lib)
    if cuda_uuids:
        mapped = _by_cuda_uuids(phys, cuda_uuids)
        if mapped is not None:
            return mapped, "mapped by the UUIDs CUDA reports"
    chosen, note = _from_env(phys, env)
    _warn_order([s for s in chosen if not s.mig], env)
    return _expand_mig(chosen), note


def _read(lib: Any, index: int, slot: _Slot) -> NvmlDevice:
    mem = lib.nvmlDeviceGetMemoryInfo(slot.handle)
    return NvmlDevice(index=index, name=slot.name, uuid=slot.uuid, total_bytes=int(mem.total),
                      free_bytes=int(mem.free), used_bytes=int(mem.used),
                      nvml_index=slot.nvml_index, mig=slot.mig)


def devices(index: int | None = None, *, env: Mapping[str, str] | None = None,
            cuda_uuids: Sequence[str] | None = None) -> list[NvmlDevice]:
    """The CUDA devices this process sees, with their memory, in CUDA's order.

    Args:
        index: a CUDA ordinal to read only that device (a list of one); ``None`` for all.
        env: the environment to read ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` from
            (default :data:`os.environ`).
        cuda_uuids: UUIDs of the CUDA devices in CUDA's order, when CUDA is already initialised;
            they make the mapping exact.

    Raises:
        NvmlUnavailable: NVML cannot answer (missing, broken, no permission, GPU lost).
        DeviceError: NVML answers, but no device (or not ``index``) is visible.
    """
    env = os.environ if env is None else env
    with _LOCK:
        lib = _library()
        try:
            slots, note = _visible(lib, env, cuda_uuids)
            if index is None:
                return [_read(lib, i, s) for i, s in enumerate(slots)]
            if 0 <= index < len(slots):
                return [_read(lib, index, slots[index])]
        except lib.NVMLError as exc:
            raise NvmlUnavailable(f"NVML failed: {describe(exc)}", "query") from None
    if not slots:
        raise DeviceError(f"no CUDA device is visible to this process ({note})")
    listing = ", ".join(f"cuda:{i} {s.name}" for i, s in enumerate(slots))
    raise DeviceError(f"there is no cuda:{index}; this process sees {len(slots)} CUDA "
                      f"device(s) ({note}): {listing}")


def process_used_bytes(index: int, pid: int, *, env: Mapping[str, str] | None = None,
                       cuda_uuids: Sequence[str] | None = None) -> int | None:
    """GPU memory that process ``pid`` uses on CUDA device ``index``, as NVML counts it.

    This is what ``nvidia-smi`` lists per process: the CUDA context, library workspaces and every
    block the caching allocator holds (``nvmlDeviceGetComputeRunningProcesses``).

    Args:
        index: the CUDA ordinal in this process.
        pid: the process id, as NVML sees it.
        env: as for :func:`devices`.
        cuda_uuids: as for :func:`devices`.

    Returns:
        Bytes, or ``None`` when NVML does not list the process on that device (no CUDA context
        there yet, or a container whose PID namespace hides host PIDs from NVML) or does not know
        its usage (some MIG and vGPU setups).

    Raises:
        NvmlUnavailable: NVML cannot answer.
        DeviceError: there is no such device.
    """
    env = os.environ if env is None else env
    with _LOCK:
        lib = _library()
        try:
            slots, note = _visible(lib, env, cuda_uuids)
            if not 0 <= index < len(slots):
                raise DeviceError(f"there is no cuda:{index}; this process sees {len(slots)} CUDA "
                                  f"device(s) ({note})")
            procs = lib.nvmlDeviceGetComputeRunningProcesses(slots[index].handle)
        except lib.NVMLError as exc:
            raise NvmlUnavailable(f"NVML failed: {describe(exc)}", "query") from None
    for proc in procs:
        if int(proc.pid) == pid:
            used = getattr(proc, "usedGpuMemory", None)
            return None if used is None else int(used)
    return None
