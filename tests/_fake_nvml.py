"""A fake ``pynvml`` module for tests: real exception types, fake GPUs.

It carries the installed ``pynvml``'s ``NVMLError`` classes and ``NVML_*`` constants, and
implements the calls memguard makes the way NVML behaves: functions raise
``NVMLError_Uninitialized`` before ``nvmlInit``, an out-of-range index raises
``NVMLError_InvalidArgument``, MIG calls on a GPU without MIG support raise
``NVMLError_NotSupported``, an empty MIG slot raises ``NVMLError_NotFound``, and memory info is an
object with ``.total``, ``.free`` and ``.used``. Any call can be made to raise a given exception.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import pynvml as real

MIB = 2**20
MAX_MIG = 7


@dataclasses.dataclass
class FakeMig:
    uuid: str
    name: str
    total: int
    used: int = 0


@dataclasses.dataclass
class FakeGpu:
    uuid: str
    name: str
    total: int
    used: int = 0
    mig_capable: bool = False
    mig_enabled: bool = False
    migs: list[FakeMig | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Handle:
    gpu: FakeGpu
    mig: FakeMig | None = None


class FakeNvml:
    """Holds the fake GPUs and counts calls; :attr:`module` is what goes into ``sys.modules``."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: BaseException | None = None,
                 errors: dict[str, BaseException] | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.errors = dict(errors or {})
        self.initialized = 0
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: list[str] = []
        self.module = self._build()

    # -- behaviour ---------------------------------------------------------------------------

    def _check(self, fn: str) -> None:
        self.calls.append(fn)
        if fn in self.errors:
            raise self.errors[fn]
        if fn not in ("nvmlInit", "nvmlShutdown") and not self.initialized:
            raise real.NVMLError_Uninitialized()

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._check("nvmlInit")
        if self.init_error is not None:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._check("nvmlShutdown")
        if not self.initialized:
            raise real.NVMLError_Uninitialized()
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError_InvalidArgument()
        return _Handle(self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle:
        self._check("nvmlDeviceGetHandleByUUID")
        for g in self.gpus:
            if g.uuid == uuid:
                return _Handle(g)
            for m in g.migs:
                if m is not None and m.uuid == uuid:
                    return _Handle(g, m)
        raise real.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetUUID")
        return handle.mig.uuid if handle.mig else handle.gpu.uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetName")
        return handle.mig.name if handle.mig else handle.gpu.name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: Any = None) -> Any:
        self._check("nvmlDeviceGetMemoryInfo")
        owner = handle.mig or handle.gpu
        return types.SimpleNamespace(total=owner.total, used=owner.used,
                                     free=owner.total - owner.used)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        self._check("nvmlDeviceGetMigMode")
        if handle.mig is not None or not handle.gpu.mig_capable:
            raise real.NVMLError_NotSupported()
        on = handle.gpu.mig_enabled
        mode = real.NVML_DEVICE_MIG_ENABLE if on else real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMaxMigDeviceCount")
        if handle.mig is not None or not handle.gpu.mig_capable:
            raise real.NVMLError_NotSupported()
        return MAX_MIG

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        self._check("nvmlDeviceGetMigDeviceHandleByIndex")
        if not handle.gpu.mig_enabled:
            raise real.NVMLError_InvalidArgument()
        if not 0 <= index < MAX_MIG:
            raise real.NVMLError_InvalidArgument()
        migs = handle.gpu.migs
        if index >= len(migs) or migs[index] is None:
            raise real.NVMLError_NotFound()
        return _Handle(handle.gpu, migs[index])

    # -- the module --------------------------------------------------------------------------

    def _build(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(mod, name, getattr(real, name))
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        return mod


def uuid(n: int, kind: str = "GPU") -> str:
    """A UUID in NVML's format, distinct for each ``n``."""
    return f"{kind}-{n:08x}-1111-2222-3333-{n:012x}"


# -- readers for memguard.device: what a machine sees, injected (memguard.device.Readers) ----------


class NoTorchCuda:
    """torch's CUDA view on a machine without a GPU, whatever machine the tests run on."""

    def count(self) -> int:
        from memguard.device import TorchUnavailable

        raise TorchUnavailable("torch.cuda.is_available() is False: no CUDA (test)")

    def memory(self, index: int) -> Any:
        raise AssertionError("torch is not asked for the memory of a device it does not see")

    def current_index(self) -> int:
        return 0

    def uuids(self) -> list[str] | None:
        return None


def gpus_seen(*gpus: Any, asked: list[Any] | None = None, **kwargs: Any) -> Any:
    """:class:`memguard.device.Readers` that see exactly these GPUs through NVML, and a torch without CUDA.

    Each GPU is a :class:`memguard.device.DeviceMemory` (its ``index`` is its position). Without any, NVML's
    library is missing and no driver file exists: the machine has no GPU. ``asked`` collects the indices
    NVML is asked for (``None``: all). ``kwargs`` set other readers (``host=...``).
    """
    from memguard.device.readers import NvmlDevice, NvmlUnavailable, Readers
    from memguard.errors import DeviceError

    seen = [NvmlDevice(index=i, name=g.name, uuid=g.uuid or f"GPU-{i}", total_bytes=g.total_bytes,
                       free_bytes=g.free_bytes, used_bytes=g.used_bytes, nvml_index=i) for i, g in enumerate(gpus)]

    def devices(index: int | None = None, *, cuda_uuids: Any = None) -> list[Any]:
        if asked is not None:
            asked.append(index)
        if not seen:
            raise NvmlUnavailable("nvmlInit failed: the NVML library (libnvidia-ml.so) was not found (test)",
                                  "library")
        if index is None:
            return list(seen)
        if 0 <= index < len(seen):
            return [seen[index]]
        raise DeviceError(f"there is no cuda:{index}; this process sees {len(seen)} CUDA device(s)")

    kwargs.setdefault("driver_files", ())
    kwargs.setdefault("env", {})
    return Readers(nvml=devices, torch=NoTorchCuda(), **kwargs)
