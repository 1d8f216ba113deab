"""Shallow copies of a model memguard builds: the same config with fewer blocks, for the trace by depth.

:mod:`memguard.estimation.trace.depth` traces a stack of ``L`` blocks from traces of 1, 2 and 3 of
them and checks, record by record, that the step is one block's events repeated. This module says
how to build those models: the transformers config with ``num_hidden_layers`` (GPT-2's ``n_layer``
through the config's ``attribute_map``) set to ``k``, built on the meta device as
:func:`~memguard.estimation.models.load_model` builds the whole one, then given the same adapters
and quantization by ``finish``.

Only a decoder or encoder with one stack qualifies: an encoder-decoder has two stacks of their own
depths, and a config whose ``layer_types`` differ from layer to layer (sliding-window and global
attention) has blocks that are not identical, which :func:`~memguard.estimation.trace.depth.learn`
would reject anyway, after three traces.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from memguard.estimation.models import ResolvedModel, load_model
from memguard.estimation.parallel import wrapped_blocks
from memguard.estimation.trace.depth import DEPTHS, Depth

__all__ = ["DEPTH_PAYS_FROM", "finished", "shallow", "where_it_pays"]

DEPTH_PAYS_FROM = 16
"""The fewest blocks from which :func:`memguard.estimate` and a plan trace a model memguard builds by depth
(:func:`where_it_pays`): the 1-, 2-, 3- and 4-block steps record 10 blocks in four steps, each with its own
embedding, head, loss and optimizer step, so a shallow stack is cheaper traced whole. Measured on this
project's 2-core machine (bf16-mixed, batch 2 x 512; the estimate is the same either way): GPT-2 (12 blocks)
1.3-1.7 s whole, 2.2-2.4 s by depth; BERT-base (12) 2.2 s and 1.9-3.6 s; Llama-2-7B (32) 4.5-4.7 s and
1.7-2.7 s."""


def shallow(resolved: ResolvedModel, finish: Callable[[ResolvedModel], nn.Module]) -> Depth | None:
    """How to build ``resolved``'s model with ``k`` blocks (``finish`` adds its adapters and
    quantization), or ``None`` where it has no single stack of identical blocks deeper than
    :data:`~memguard.estimation.trace.depth.DEPTHS`."""
    config = resolved.config
    if not resolved.built_here or config is None or getattr(config, "is_encoder_decoder", False):
        return None
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= max(DEPTHS):
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and (not isinstance(types, (list, tuple)) or len(set(types)) > 1):
        return None
    if len(wrapped_blocks(resolved.module)) != layers:
        return None
    built: dict[int, nn.Module] = {}

    def build(k: int) -> nn.Module:
        if k not in built:
            built[k] = finish(load_model(_with_layers(config, k)))
        return built[k]

    return Depth(build, layers)


def where_it_pays(resolved: ResolvedModel, finish: Callable[[ResolvedModel], nn.Module]) -> Depth | None:
    """:func:`shallow` for a model of at least :data:`DEPTH_PAYS_FROM` blocks, else ``None`` (trace it whole)."""
    layers = getattr(resolved.config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < DEPTH_PAYS_FROM:
        return None
    return shallow(resolved, finish)


def finished(resolved: ResolvedModel, *, rank: int | None, quant: Any = None) -> nn.Module:
    """``resolved``'s module with LoRA adapters of ``rank`` over a base quantized as ``quant`` (a
    :class:`~memguard.estimation.quantization_kinds.Quantization`), as the estimator builds the whole model:
    the ``finish`` of :func:`shallow` for a model with adapters or a quantized base."""
    from memguard.estimation.models import add_lora
    from memguard.estimation.quantization import quantize_model

    module = resolved.module if rank is None else add_lora(resolved, rank).module
    if quant is not None:
        module, _ = quantize_model(module, quant)
    return module


def _with_layers(config: Any, k: int) -> Any:
    """A copy of ``config`` with ``k`` blocks (and the first ``k`` of its ``layer_types``)."""
    config = copy.deepcopy(config)
    types = getattr(config, "layer_types", None)
    config.num_hidden_layers = k
    if types is not None:
        config.layer_types = list(types)[:k]
    return config
