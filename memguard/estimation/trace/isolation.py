"""Run user code on fake tensors without letting anything it does reach the user's objects.

The trace calls the user's own ``forward`` and ``training_step``. Those write to their module:
caches made on the first call (``if self.cache is None: self.cache = ...``), lists of outputs,
counters, loss averages, torchmetrics states, calls to ``self.log`` and the loggers. Run on fake
tensors inside a live fit, every such write would leave a fake tensor or an extra entry behind.

:func:`isolated` prevents that without copying a module: for the duration of the trace, the
``__dict__`` of every module of the tree is swapped for a structural copy of it that shares nothing
mutable with the original, and the original dictionaries are put back afterwards, even when the
trace fails. In the copy:

* parameters and buffers are the trace's fake stand-ins (created by the caller);
* every other tensor attribute is a fake stand-in of the same shape and dtype;
* lists, tuples, dicts and sets are new containers of copied values; a ``torch.Generator`` is a new
  generator in the same state; other objects are deep copies (sharing the stand-ins and modules),
  except datasets, data loaders, optimizers and objects that cannot be copied, which are shared;
* child modules are the same objects, whose own dictionaries are swapped too, so closures and bound
  methods that reach a module (``lambda b: model.training_step(b, 0)``) see the copy;
* a LightningModule's ``log``, ``log_dict`` and ``print`` do nothing, and its trainer is a read-only
  view whose loggers and their ``experiment`` drop every call;
* a torchmetrics metric does not validate its arguments' values (``validate_args``): a fake tensor
  has none, and ``if torch.any(bad): raise`` would see a stand-in ``True``.

In a child forked by :mod:`memguard.estimation.sandbox`, where the trace normally runs, nothing
can reach the user's process anyway: there, only the tensors are replaced, and every other
object (a large numpy array, a list of outputs) is shared with the child's copy-on-write image
instead of copied.

Because the module objects keep their identity, ``module.training_step`` and any ``step_fn`` that
closes over the module run on the copy. What cannot be undone is outside Python's objects: files
written, sockets, module-level globals and objects that are shared (above). User code can skip such
work while :func:`memguard.is_tracing` is true.

Not safe to use while another thread runs the same module.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import enum
import logging
import random
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Copier", "is_tracing", "isolated", "preserved_rng"]

log = logging.getLogger(__name__)

_STATE = threading.local()

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, range, slice, type(Ellipsis),
           types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
           torch.dtype, torch.device, torch.memory_format, torch.layout, enum.Enum)


def is_tracing() -> bool:
    """Whether memguard is running user code on fake tensors in this thread right now.

    Code with side effects outside Python objects (writing files, sending metrics) can skip them::

        if not memguard.is_tracing():
            self.csv.write(f"{loss.item()}\\n")
    """
    return bool(getattr(_STATE, "depth", 0))


def _shared(value: Any) -> bool:
    """Objects the copy shares: data, loaders, optimizers (large, or meaningless to copy)."""
    return isinstance(value, (torch.utils.data.Dataset, torch.utils.data.DataLoader,
                              torch.utils.data.Sampler, torch.optim.Optimizer, torch.Storage,
                              threading.Thread))


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _Silent:
    """Accepts any call and attribute, does nothing: a logger's ``experiment`` during the trace."""

    def __getattr__(self, name: str) -> _Silent:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _SilentLogger:
    """A Lightning logger whose methods and ``experiment`` do nothing; its other attributes are read."""

    def __init__(self, logger: Any) -> None:
        object.__setattr__(self, "_logger", logger)

    def __getattr__(self, name: str) -> Any:
        if name == "experiment":
            return _Silent()
        value = getattr(self._logger, name)
        return _noop if callable(value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        return None


class _TrainerView:
    """The trainer as a traced ``training_step`` sees it: attributes read from the real one, writes
    kept here, loggers silent."""

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)

    def __getattr__(self, name: str) -> Any:
        if name == "logger":
            logger = self._trainer.logger
            return None if logger is None else _SilentLogger(logger)
        if name == "loggers":
            return [_SilentLogger(lg) for lg in self._trainer.loggers]
        return getattr(self._trainer, name)


class Copier:
    """Structural copies of values, sharing no mutable state with the originals."""

    def __init__(self, stand_in: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any],
                 share: bool = False) -> None:
        self.stand_in = stand_in
        self.memo = memo  # id -> copy; also the memo of copy.deepcopy
        self.share = share  # share objects instead of deep-copying them (in a sandbox's child)
        self.modules: list[nn.Module] = []

    def module_dict(self, module: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers"):
                out[key] = {n: None if t is None else self.value(t) for n, t in value.items()}
            elif key == "_modules":
                out[key] = dict(value)
                for child in value.values():
                    if child is not None:
                        self.value(child)
            elif key == "_trainer" and value is not None:
                out[key] = _TrainerView(value)
            else:
                out[key] = self.value(value)
        if callable(getattr(type(module), "log_dict", None)) and "_trainer" in module.__dict__:
            out.update(log=_noop, log_dict=_noop, print=_noop)  # a LightningModule
        if out.get("validate_args") is True and type(module).__module__.startswith("torchmetrics"):
            out["validate_args"] = False  # checks of values (`if torch.any(bad): raise`) mean nothing on fake data
        return out

    def value(self, value: Any) -> Any:
        key = id(value)
        if key in self.memo:
            return self.memo[key]
        if isinstance(value, _ATOMIC):
            return value
        if isinstance(value, nn.Module):
            self.memo[key] = value
            self.modules.append(value)
            return value
        if isinstance(value, torch.Tensor):
            out: Any = self.stand_in(value)
        elif isinstance(value, torch.Generator):
            out = torch.Generator(device=value.device)
            out.set_state(value.get_state())
        elif self.share or _shared(value):
            out = value
        elif isinstance(value, (list, dict, set, tuple, collections.deque)):
            out = self._container(value)
        else:
            try:
                out = copy.deepcopy(value, self.memo)
            except Exception as exc:
                log.debug("sharing a %s with the trace: it cannot be copied (%s)", type(value).__name__, exc)
                out = value
        self.memo[key] = out
        return out

    def _container(self, value: Any) -> Any:
        """A new container of ``value``'s type holding copies of its items; ``value`` is only read.

        The built-in types are made empty and filled (registered first, so a container that holds
        itself is copied with its cycle). A subclass's methods are the user's code and may refuse
        to mutate (diffusers' ``FrozenDict`` config raises on ``update``, ``pop`` and ``setdefault``,
        ``diffusers/configuration_utils.py``): it is constructed whole from the copied items, as
        ``type(value)(items)`` (``defaultdict``: with its ``default_factory`` first), with the
        instance attributes the constructor did not set copied over; a subclass that cannot be
        built so becomes a plain container of its base type.
        """
        if isinstance(value, tuple):
            items = [self.value(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        base = next(t for t in (collections.OrderedDict, collections.defaultdict, dict, list,
                                collections.deque, set) if isinstance(value, t))
        plain: Any = (collections.defaultdict(value.default_factory) if base is collections.defaultdict
                      else collections.deque(maxlen=value.maxlen) if base is collections.deque
                      else base())
        self.memo[id(value)] = plain  # before the items, for cycles
        if isinstance(value, dict):
            plain.update((k, self.value(v)) for k, v in value.items())
        elif isinstance(value, (list, collections.deque)):
            plain.extend(self.value(v) for v in value)
        else:
            plain.update(self.value(v) for v in value)
        if type(value) is base:
            return plain
        try:
            out = (type(value)(value.default_factory, plain) if base is collections.defaultdict
                   else type(value)(plain))
            extra = {k: self.value(v) for k, v in getattr(value, "__dict__", {}).items()
                     if k not in getattr(out, "__dict__", {})}
            if extra:
                vars(out).update(extra)  # the instance's dict, not the container's methods
        except Exception as exc:  # a constructor with another signature
            log.debug("copying a %s as a %s: it cannot be built from its items (%s)",
                      type(value).__name__, base.__name__, exc)
            return plain
        return out


@contextlib.contextmanager
def isolated(root: nn.Module, stand_ins: dict[int, torch.Tensor],
             stand_in: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Give every module reachable from ``root`` a private copy of its state for the duration.

    Args:
        root: the user's module.
        stand_ins: fake tensors to use for given real ones, by ``id`` (the parameters and buffers,
            in the dtypes training keeps them).
        stand_in: makes a fake stand-in for any other tensor found.
    """
    from memguard.estimation.sandbox import in_child

    copier = Copier(stand_in, dict(stand_ins), share=in_child())
    for m in root.modules():
        copier.value(m)
    swapped: list[tuple[nn.Module, dict[str, Any]]] = []
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        done = 0
        while done < len(copier.modules):  # deep copies may reach modules outside the tree
            module = copier.modules[done]
            done += 1
            private = copier.module_dict(module)
            swapped.append((module, module.__dict__))
            object.__setattr__(module, "__dict__", private)
        yield
    finally:
        for module, original in reversed(swapped):
            object.__setattr__(module, "__dict__", original)
        _STATE.depth -= 1


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the CPU random number generators of torch, ``random`` and numpy on exit.

    A trace (stand-in values made for data-dependent ops) or a peek at a shuffled data loader (a
    seed drawn from torch's generator) must not move the user's random streams: the real run would
    see other numbers than it would without memguard.
    """
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np is not None and np_state is not None:
            np.random.set_state(np_state)
