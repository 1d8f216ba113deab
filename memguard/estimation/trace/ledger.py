"""The trace's ledger: every storage allocated and freed in a traced step, in order, and the
dispatch mode that fills it.

Under ``FakeTensorMode`` nothing is allocated; :class:`CountingMode` sees every op's outputs and
records each new storage (its size as the device's allocator rounds it, the :class:`Phase` of the
step, the module whose forward made it, shape and dtype); a ``weakref.finalize`` on the storage
records its free. Data-dependent ops run on the values :mod:`memguard.estimation.stand_ins` invents
and records; ops whose fake kernels refuse what the real ones run take
:mod:`memguard.estimation.fake_kernels`; the mode stops the trace past its time budget.

Each record carries the :class:`Phase` of the step it was made in; the timeline, the result and
its JSON keep the phase's plain string (``"forward"``...).
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memguard.errors import TraceError
from memguard.estimation.fake_kernels import corrected
from memguard.estimation.kernels import corrected as with_workspace
from memguard.estimation.kernels import transient, uncounted
from memguard.estimation.phase import Phase
from memguard.estimation.stand_ins import StandIns

__all__ = ["CountingMode", "Ledger", "Phase", "Record", "rounded"]


_CUDA_BLOCK = 512
"""PyTorch's CUDA caching allocator rounds every block up to 512 bytes (REFERENCES.md)."""

_MMAP_THRESHOLD = 65536
_PAGE = 4096
_CPU_ALIGN = 64
_CLOCK_EVERY = 256

_DEVICE = torch.ops.prim.device.default
"""The device query C++ asks of a fake tensor (autograd asks it of every input it records): two thirds of the
ops a trace dispatches (a Llama step: 7,530 of 11,314), none of which allocates or reads a value."""
"""Ops between two looks at the clock (a look costs about as much as an op)."""

def rounded(nbytes: int, device: str) -> int:
    """Bytes one allocation of ``nbytes`` costs on ``device``.

    CUDA: 512-byte blocks. CPU (the RSS the truth measures): torch aligns CPU buffers to 64 bytes;
    buffers from ``MALLOC_MMAP_THRESHOLD_`` (64 KiB) up are mmapped whole pages, with malloc's
    header.
    """
    if device == "cuda":
        return -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK
    if nbytes < _MMAP_THRESHOLD:
        return -(-nbytes // _CPU_ALIGN) * _CPU_ALIGN
    return -(-(nbytes + _CPU_ALIGN) // _PAGE) * _PAGE


@dataclasses.dataclass
class Record:
    """One storage: its size, and the ledger's clock at its allocation and (``None`` while alive) free."""

    nbytes: int  # as the device's allocator rounds it
    alloc: int
    free: int | None = None
    phase: Phase = Phase.OTHER
    requested: int = 0  # as asked for
    where: str = ""  # the module whose forward made it, or the parameter it belongs to
    shape: tuple[int, ...] = ()
    dtype: str = ""
    output: bool = False  # held by the model's output as the loop receives it (the last micro-batch's)


class Ledger:
    """Allocation and free events of storages, in order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.records: list[Record] = []
        self.by_storage: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.clock = 0
        self.phase = Phase.OTHER
        self.marks: list[tuple[int, Phase]] = [(0, Phase.OTHER)]
        self.modules: list[str] = []  # the forward calls under way, outermost first

    def set_phase(self, phase: Phase) -> None:
        """Start ``phase``."""
        if phase != self.phase:
            self.phase = phase
            self.marks.append((self.clock, phase))

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.by_storage:
            return
        nbytes = storage.nbytes()
        self.clock += 1
        index = len(self.records)
        self.records.append(Record(rounded(nbytes, self.device) if nbytes else 0, self.clock,
                                    phase=self.phase, requested=nbytes,
                                    where=self.modules[-1] if self.modules else "",
                                    shape=tuple(t.shape), dtype=str(t.dtype)))
        self.by_storage[storage] = index
        weakref.finalize(storage, self._free, index)

    def hold(self, nbytes: int) -> None:
        """A buffer a real kernel allocates and frees inside the op just recorded (beside its
        outputs; :func:`memguard.estimation.kernels.transient`): allocated and freed at once."""
        self.clock += 1
        self.records.append(Record(rounded(nbytes, self.device), self.clock, self.clock + 1, phase=self.phase,
                                   requested=nbytes, where=self.modules[-1] if self.modules else "(inside an op)"))
        self.clock += 1

    def index_of(self, t: torch.Tensor) -> int | None:
        return self.by_storage.get(t.untyped_storage())

    def name(self, tensors: Iterable[tuple[str, Any]]) -> None:
        """Say which module the storages of ``(module path, tensor)`` pairs belong to (parameters,
        their gradients and optimizer state)."""
        for name, t in tensors:
            i = self.index_of(t) if isinstance(t, torch.Tensor) else None
            if i is not None:
                self.records[i].where = name

    def follow(self, root: nn.Module) -> None:
        """Note which module's forward each allocation happens in (hooks on the isolated module)."""
        def enter(name: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                self.modules.append(name)
            return hook

        def leave(*_: Any) -> None:  # a hook that returns something replaces the output
            if self.modules:
                self.modules.pop()

        for name, m in root.named_modules():
            m.register_forward_pre_hook(enter(name or type(root).__name__))
            m.register_forward_hook(leave)

    def _free(self, index: int) -> None:
        record = self.records[index]
        if record.free is None:
            self.clock += 1
            record.free = self.clock

    def live_at(self, clock: int) -> Iterator[tuple[int, Record]]:
        for i, r in enumerate(self.records):
            if r.alloc <= clock and (r.free is None or r.free > clock):
                yield i, r


class CountingMode(TorchDispatchMode):
    """Records every storage an op returns; runs data-dependent ops on the values of :attr:`stand_ins`.

    Args:
        routing: the capacity factor of the MoE routing model (:func:`memguard.estimation.stand_ins.resolve_routing`).
    """

    def __init__(self, ledger: Ledger, fake_mode: FakeTensorMode, timeout: float | None = None,
                 routing: float = 1.0) -> None:
        super().__init__()
        self.ledger = ledger
        self.fake_mode = fake_mode
        self.stand_ins = StandIns(fake_mode, routing)
        self.uncounted: set[str] = set()  # buffers of real kernels the trace cannot size, in words
        self.timeout = timeout
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        self.ops = 0

    @property
    def fallbacks(self) -> dict[str, int]:
        """Data-dependent ops run on stand-in values of ones, with their counts."""
        return self.stand_ins.invented

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _DEVICE:  # nothing to count, correct or stand in for: straight to the fake mode
            return func(*args)
        kwargs = kwargs or {}
        try:
            out = corrected(func, args, kwargs)
            if out is None:
                out = func(*args, **kwargs)
            self.stand_ins.after(func, args, kwargs, out)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = self.stand_ins.data_dependent(func, args, kwargs)
        if isinstance(out, tuple):  # ops with buffers for backward return several tensors
            out = with_workspace(func, args, out, self.ledger.device)
            missing = uncounted(func, self.ledger.device)
            if missing:
                self.uncounted.add(missing)
        if isinstance(out, torch.Tensor):  # the common case, without a tree walk
            self.ledger.track(out)
            # Only ops that return tensors look at the clock: metadata queries (prim.device ...)
            # are called from C++ that cannot pass an exception on.
            self.ops += 1
            if not self.ops % _CLOCK_EVERY and time.monotonic() > self.deadline:
                raise TraceError(
                    f"the trace ran out of time: {self.ops} ops in more than {self.timeout:g} s (trace_timeout) "
                    "without finishing the step; a loop that waits for computed values to converge never ends "
                    "on fake data (stand-in values of ones); raise trace_timeout if the step is just long"
                )
        elif out is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.ledger.track(t)
        held = transient(func, args, out, self.ledger.device)
        if held:
            self.ledger.hold(held)
        return out
