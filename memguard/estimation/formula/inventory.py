"""What the formula needs to know about a module's parameters, gathered once per module.

:func:`inventory` walks the module once — its parameters, which are matmul weights, which run
before the first block, which belong to each block, the output head, the buffers — and caches the
answer until the module's structure changes (:func:`memguard.estimation.arch.structure_generation`).
Only ``requires_grad`` is read again on every estimate: freezing a layer changes no structure.

An :class:`Inventory` is data only (no tensor): a preset's is shipped as JSON with its architecture
(:mod:`memguard.estimation.description`), so the formula on a preset runs without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memguard.estimation.arch import (
    Architecture,
    block_stacks,
    find_architecture,
    structure_generation,
)
from memguard.estimation.formula.adapters import lora_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Inventory", "inventory"]


@dataclasses.dataclass(frozen=True)
class Inventory:
    """The parameters of a module as the formula reads them.

    Attributes:
        grad: ``requires_grad`` of each parameter, in the order of ``module.parameters()`` (tied ones
            once: it deduplicates), as :func:`inventory` read it.
        numel: elements of each parameter.
        factored: elements of Adafactor's statistics for each parameter.
        matmul: whether each is the weight of a matmul-like layer (cast by autocast).
        pre: indices of parameters that run before the first block (embeddings).
        enc_blocks: parameter indices of each encoder (or only) block.
        dec_blocks: parameter indices of each decoder block.
        head: index of the output head's weight, or ``None``.
        buffer_float: elements of floating-point buffers.
        buffer_other: bytes of other buffers.
        generation: the structure generation this was built at.
        float_numel: elements of each parameter if it is floating point, else 0.
        other_bytes: bytes of each parameter if it is not floating point, else 0.
        matmul_numel: elements of all matmul weights.
        adapters: peft's LoRA weights, parameter index -> ``(in, r)`` of a ``lora_A``, ``(0, 0)``
            for a ``lora_B`` (:func:`~memguard.estimation.formula.adapters.lora_weights`).
    """

    grad: tuple[bool, ...]
    numel: tuple[int, ...]
    factored: tuple[int, ...]
    matmul: tuple[bool, ...]
    pre: tuple[int, ...]
    enc_blocks: tuple[tuple[int, ...], ...]
    dec_blocks: tuple[tuple[int, ...], ...]
    head: int | None
    buffer_float: int
    buffer_other: int
    generation: int
    float_numel: tuple[int, ...]
    other_bytes: tuple[int, ...]
    matmul_numel: int
    adapters: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def requires_grad(self) -> list[bool]:
        """``requires_grad`` of each parameter (:func:`inventory` reads it on every call)."""
        return list(self.grad)

    @property
    def trainable_numel(self) -> int:
        """Elements of the trainable parameters (``requires_grad``)."""
        return sum(n for n, g in zip(self.numel, self.grad, strict=True) if g)

    def size(self, i: int, elem: int) -> int:
        """Bytes of parameter ``i`` with floating point kept in ``elem``-byte elements."""
        return self.float_numel[i] * elem + self.other_bytes[i]

    def to_dict(self) -> dict[str, Any]:
        """The inventory as JSON values (:meth:`from_dict` reads them back), without the structure
        generation, which only this process's cache knows."""
        data = dataclasses.asdict(self)
        del data["generation"]
        data["adapters"] = [[i, *shape] for i, shape in sorted(self.adapters.items())]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inventory:
        """The :class:`Inventory` of :meth:`to_dict`'s values."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"generation"}
        values: dict[str, Any] = {"generation": 0}
        for name in fields:
            value = data[name]
            if name in ("enc_blocks", "dec_blocks"):
                value = tuple(tuple(blk) for blk in value)
            elif name == "adapters":
                value = {int(i): (int(a), int(r)) for i, a, r in value}
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)


_INVENTORIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[nn.Parameter, ...], Inventory]] = (
    weakref.WeakKeyDictionary())
"""module -> (its parameters, its inventory as last built)."""


def inventory(module: nn.Module, arch: Architecture | None = None) -> Inventory:
    """The cached :class:`Inventory` of ``module``, built on first use and again whenever the
    structure generation has moved.

    Args:
        module: the model (on any device, the meta device included).
        arch: its architecture, when already read; looked up otherwise.
    """
    generation = structure_generation()
    try:
        cached = _INVENTORIES.get(module)
    except TypeError:  # a module that cannot be weakly referenced: do not cache
        cached = None
    if cached is None or cached[1].generation != generation:
        params = tuple(module.parameters())
        cached = (params, _build(module, params, arch if arch is not None else find_architecture(module),
                                 generation))
        with contextlib.suppress(TypeError):
            _INVENTORIES[module] = cached
    params, inv = cached
    grad = tuple(p.requires_grad for p in params)
    return inv if grad == inv.grad else dataclasses.replace(inv, grad=grad)


def _build(module: nn.Module, params: tuple[nn.Parameter, ...], arch: Architecture | None,
           generation: int) -> Inventory:
    index = {id(p): i for i, p in enumerate(params)}
    matmul = _matmul_weights(module, index, len(params))
    # the blocks the architecture lays out, each run once: no guessing at a largest list
    enc, dec = block_stacks(module, arch=arch, guess=False) if arch is not None else ([], [])
    head_weight = getattr(_output_head(module), "weight", None)
    floating_buffers = [b for b in module.buffers() if b.is_floating_point()]
    return Inventory(
        grad=tuple(p.requires_grad for p in params),
        numel=tuple(p.numel() for p in params),
        factored=tuple(_factored_elements(p) for p in params),
        matmul=tuple(matmul),
        pre=tuple(_before_blocks(module, index, enc, dec)),
        enc_blocks=tuple(tuple(index[id(p)] for p in blk.parameters()) for blk in enc),
        dec_blocks=tuple(tuple(index[id(p)] for p in blk.parameters()) for blk in dec),
        head=index.get(id(head_weight)) if head_weight is not None else None,
        buffer_float=sum(b.numel() for b in floating_buffers),
        buffer_other=sum(b.numel() * b.element_size() for b in module.buffers()
                         if not b.is_floating_point()),
        generation=generation,
        float_numel=tuple(p.numel() if p.is_floating_point() else 0 for p in params),
        other_bytes=tuple(0 if p.is_floating_point() else p.numel() * p.element_size()
                          for p in params),
        matmul_numel=sum(p.numel() for p, mm in zip(params, matmul, strict=True) if mm),
        adapters=lora_weights(module, index),
    )


def _matmul_weights(module: nn.Module, index: dict[int, int], n: int) -> list[bool]:
    """Which parameters are matrices that a matmul reads (``weight``/``in_proj_weight`` of two or
    more dimensions, outside embeddings and LayerNorms): the ones autocast casts."""
    from torch import nn

    matmul = [False] * n
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.LayerNorm)):
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and name in ("weight", "in_proj_weight") and id(p) in index:
                matmul[index[id(p)]] = True
    return matmul


def _before_blocks(module: nn.Module, index: dict[int, int], enc: list[nn.Module],
                   dec: list[nn.Module]) -> list[int]:
    """Indices of the parameters that run before the first block: registered before it, or named
    as part of the embeddings (BART registers its ``layernorm_embedding`` after its layers)."""
    first = (enc or dec or [None])[0]
    if first is None:
        return []
    pre: list[int] = []
    for m in module.modules():
        if m is first:
            break
        pre.extend(index[id(p)] for p in m.parameters(recurse=False) if id(p) in index)
    in_blocks = {id(p) for blk in (*enc, *dec) for p in blk.parameters()}
    pre.extend(index[id(p)] for name, p in module.named_parameters()
               if "emb" in name.lower() and id(p) not in in_blocks and index[id(p)] not in pre)
    return pre


def _output_head(module: nn.Module) -> nn.Module | None:
    """transformers' ``get_output_embeddings()`` (the LM head), or ``None``."""
    get_out = getattr(module, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except (AttributeError, NotImplementedError):
        return None


def _factored_elements(p: torch.Tensor) -> int:
    """Elements of Adafactor's second-moment statistics of one parameter.

    ``torch.optim.Adafactor`` keeps, for a tensor of two or more dimensions, a row factor (the
    last dimension reduced to 1) and a column factor (the second-to-last reduced to 1); for a
    vector, a full-size ``variance`` (``torch/optim/_adafactor.py``, ``_init_group``).
    """
    if p.dim() < 2:
        return p.numel()
    lead = math.prod(p.shape[:-2])
    return lead * (p.shape[-2] + p.shape[-1])
