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

__all__ = ["shallow"]


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


def _with_layers(config: Any, k: int) -> Any:
    """A copy of ``config`` with ``k`` blocks (and the first ``k`` of its ``layer_types``)."""
    config = copy.deepcopy(config)
    types = getattr(config, "layer_types", None)
    config.num_hidden_layers = k
    if types is not None:
        config.layer_types = list(types)[:k]
    return config
