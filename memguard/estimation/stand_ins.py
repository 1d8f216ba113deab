"""Values the trace invents where computed data would decide a branch or a size.

Under ``FakeTensorMode`` a tensor has a shape and a dtype but no values. Most of a training step
never asks for one; what does is data-dependent: ``.item()`` (``aten._local_scalar_dense``) deciding
an ``if``, or an op whose output shape depends on values (``nonzero``, ``torch.where(mask)``,
``masked_select``). The trace must then invent values, and every value it invents is recorded
here, in one of two kinds:

* **modelled**: the indices returned by ``aten.topk``, which is how every transformers
  mixture-of-experts router picks its experts (``torch.topk(router_probs, top_k)`` in
  ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``, ``DeepseekV3MoE.route_tokens_to_experts``).
  They are filled with the routing model of :func:`routed_indices`: balanced by default
  (``top_k * tokens / num_experts`` tokens per expert), or as unequal as a capacity factor allows
  (Switch Transformer, Fedus et al. 2021, section 2.2: an expert takes at most
  ``capacity_factor * tokens * top_k / num_experts`` tokens; GShard, Lepikhin et al. 2020,
  section 2.2, the same "expert capacity"). A ``topk`` that is no router gets the same in-range
  indices, distinct within each row.
* **unmodelled**: any other data-dependent op whose inputs have no known values runs on stand-in
  tensors of ones. The estimate then rests on values nobody chose: it names these ops in
  :attr:`memguard.MemoryEstimate.stand_ins` and is :attr:`~memguard.MemoryEstimate.uncertain`.

Known values propagate: once a ``topk`` has run, an op whose tensor inputs all have known values
(small integer or boolean tensors, as routing tensors are), or a factory without tensor inputs
(``arange``, ``zeros``; not ``empty``), is run on the real values too, so the chain of transformers'
eager experts loop (``one_hot`` of the indices, ``.sum``, ``nonzero``, ``expert_idx ==
num_experts``, ``torch.where(expert_mask[e])``) sees the routing the model chose, not ones; an op
that writes into a known tensor with unknown inputs makes it unknown again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from memguard.errors import TraceError
from memguard.estimation.routing import ROUTINGS, expert_load, resolve_routing, routing_name

__all__ = ["ONES", "ROUTINGS", "StandIns", "expert_load", "resolve_routing", "routed_indices", "routing_name"]

ONES = "ones"
"""How the values of an unmodelled stand-in were made (:attr:`memguard.MemoryEstimate.stand_ins`)."""

_NUMEL_LIMIT = 1 << 24
"""Largest tensor run for real on stand-in or known values (16 Mi elements); a larger result stays
unknown."""

_UNINITIALISED = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                  torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}
"""Factories whose values are whatever memory held: never known."""

_TOPK = torch.ops.aten.topk.default
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


def routed_indices(rows: int, k: int, n: int, capacity: float = 1.0) -> torch.Tensor:
    """Expert indices ``(rows, k)`` for ``rows`` tokens choosing ``k`` of ``n`` experts.

    The ``rows * k`` choices are dealt out slot-major (``s = j * rows + r`` for token ``r``'s
    ``j``-th choice) in runs of :func:`expert_load` tokens per expert: with capacity factor 1 each
    expert takes ``ceil(rows * k / n)`` tokens (balanced); larger factors fill the first experts
    up to their capacity. The ``k`` choices of a token are distinct, since a run is at most
    ``rows`` long.
    """
    load = expert_load(rows, k, n, capacity)
    slots = torch.arange(k).unsqueeze(0) * rows + torch.arange(rows).unsqueeze(1)  # (rows, k)
    return slots // load


class StandIns:
    """The values a trace invents, and the known values that follow from them.

    Attributes:
        capacity: the routing's capacity factor (see :func:`resolve_routing`).
        modelled: ``op -> count`` of ops whose values come from the routing model.
        invented: ``op -> count`` of data-dependent ops run on stand-in ones.
    """

    def __init__(self, fake_mode: FakeTensorMode, capacity: float = 1.0) -> None:
        self.fake_mode = fake_mode
        self.capacity = capacity
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.modelled: dict[str, int] = {}
        self.invented: dict[str, int] = {}

    def after(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Note the known values of ``out``, when ``func`` is a top-k or runs on known values."""
        if func is _TOPK:
            self._route(args, kwargs, out)
            return
        if not len(self.values) or getattr(func, "overloadpacket", None) in _UNINITIALISED:
            return
        tensors = _tensors(args, kwargs)
        known = [t for t in tensors if t in self.values]
        if tensors and not known:
            return
        if len(known) < len(tensors):
            self._forget_written(func, args, kwargs)
            return
        outs = tree_flatten(out)[0]
        if any(isinstance(t, torch.Tensor) and t.numel() > _NUMEL_LIMIT for t in outs):
            return  # too large to run for real (a factory of activations): unknown
        real = self._run_real(func, args, kwargs)
        if real is None:
            return
        for fake, value in zip(outs, tree_flatten(real)[0], strict=False):
            if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor):
                self.values[fake] = value

    def data_dependent(self, func: Any, args: Any, kwargs: Any) -> Any:
        """The result of a data-dependent op: computed from known values where all inputs have
        them, else from stand-in tensors of ones (recorded in :attr:`invented`)."""
        tensors = _tensors(args, kwargs)
        if tensors and all(t in self.values for t in tensors):
            real = self._run_real(func, args, kwargs)
            if real is not None:
                if func is _LOCAL_SCALAR:
                    return real
                out = tree_map_only(torch.Tensor, self.fake_mode.from_tensor, real)
                for fake, value in zip(tree_flatten(out)[0], tree_flatten(real)[0], strict=False):
                    if isinstance(fake, torch.Tensor):
                        self.values[fake] = value
                return out
        name = str(func.overloadpacket.__name__)
        self.invented[name] = self.invented.get(name, 0) + 1
        if func is _LOCAL_SCALAR:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)

        def ones(t: torch.Tensor) -> torch.Tensor:
            if t.numel() > _NUMEL_LIMIT:
                raise TraceError(f"cannot run data-dependent op {name} on a stand-in of {tuple(t.shape)}")
            return torch.ones(t.shape, dtype=t.dtype)

        with _disable_current_modes():
            real_args, real_kwargs = tree_map_only(torch.Tensor, ones, (args, kwargs))
            result = func(*real_args, **real_kwargs)
        return tree_map_only(torch.Tensor, self.fake_mode.from_tensor, result)

    def _route(self, args: Any, kwargs: Any, out: Any) -> None:
        x = args[0]
        k = int(args[1] if len(args) > 1 else kwargs.get("k"))
        dim = int(args[2] if len(args) > 2 else kwargs.get("dim", -1)) % max(x.dim(), 1)
        indices = out[1]
        if x.dim() == 0 or indices.numel() > _NUMEL_LIMIT or k < 1:
            return
        n = x.shape[dim]
        moved = list(indices.movedim(dim, -1).shape)
        rows = math.prod(moved[:-1])
        with _disable_current_modes():
            value = routed_indices(rows, k, n, self.capacity).reshape(moved).movedim(-1, dim).contiguous()
        self.values[indices] = value
        self.modelled["topk"] = self.modelled.get("topk", 0) + 1

    def _run_real(self, func: Any, args: Any, kwargs: Any) -> Any:
        def real(t: torch.Tensor) -> torch.Tensor:
            return self.values[t]

        try:
            with _disable_current_modes():
                real_args, real_kwargs = tree_map_only(torch.Tensor, real, (args, kwargs))
                result = func(*real_args, **real_kwargs)
        except Exception:  # an op the real values cannot run (device, size): unknown from here on
            return None
        big = any(isinstance(t, torch.Tensor) and t.numel() > _NUMEL_LIMIT for t in tree_flatten(result)[0])
        return None if big else result

    def _forget_written(self, func: Any, args: Any, kwargs: Any) -> None:
        """An op mixing known and unknown inputs: the known tensors it writes into become unknown."""
        schema = getattr(func, "_schema", None)
        if schema is None or not schema.is_mutable:
            return
        for i, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is None or not info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and t in self.values:
                    del self.values[t]


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
