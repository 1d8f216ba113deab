"""Memory per device under data parallelism, sharding and offload.

Each rank of a data-parallel run holds its own batch, so activations and temporaries are those of
a single-device step at the per-device batch size. What changes is how much of the model state a
rank keeps (Rajbhandari et al. 2020, "ZeRO", section 5; ../shared/REFERENCES.md):

============================  ==========  =========  ===============
strategy                      parameters  gradients  optimizer state
============================  ==========  =========  ===============
single, ddp                   1           1          1
deepspeed_stage_1             1           1          1/N
deepspeed_stage_2             1           1/N        1/N
fsdp_shard_grad_op            1           1/N        1/N
deepspeed_stage_3, fsdp       1/N         1/N        1/N
fsdp_hybrid                   1/n         1/n        1/n   (n = ranks per node, sharded within it)
============================  ==========  =========  ===============

Temporaries of the optimizer step scale with the optimizer state: the step runs on the local shard.
Offloading the optimizer (DeepSpeed ``offload_optimizer``, FSDP ``CPUOffload``) moves its state
and step to host memory; offloading parameters moves the parameter shards (and, for FSDP, the
gradient shards) too. Each strategy also adds communication buffers, given per strategy below.

We follow the paper's partitioning and the defaults of Lightning's strategies (not DeepSpeed's
own estimator, which counts every parameter as trainable and keeps fp32 gradient partitions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from torch import nn

from memguard.errors import ConfigError
from memguard.estimation.result import Category
from memguard.estimation.spec import positive_int, strict_bool

__all__ = ["STRATEGIES", "Parallelism", "resolve_parallelism"]

STRATEGIES = ("single", "ddp", "fsdp", "fsdp_shard_grad_op", "fsdp_hybrid",
              "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")

# Lightning's registered strategy names that mean one of ours (``StrategyRegistry``).
_ALIASES: dict[str, tuple[str, bool, bool]] = {
    "auto": ("single", False, False),
    "dp": ("single", False, False),
    "ddp_spawn": ("ddp", False, False),
    "ddp_fork": ("ddp", False, False),
    "ddp_notebook": ("ddp", False, False),
    "ddp_find_unused_parameters_true": ("ddp", False, False),
    "ddp_find_unused_parameters_false": ("ddp", False, False),
    "fsdp_full_shard": ("fsdp", False, False),
    "full_shard": ("fsdp", False, False),
    "shard_grad_op": ("fsdp_shard_grad_op", False, False),
    "hybrid_shard": ("fsdp_hybrid", False, False),
    "fsdp_cpu_offload": ("fsdp", True, True),
    "deepspeed": ("deepspeed_stage_2", False, False),
    "deepspeed_stage_2_offload": ("deepspeed_stage_2", True, False),
    "deepspeed_stage_3_offload": ("deepspeed_stage_3", True, True),
}

DEEPSPEED_BUCKET_ELEMENTS = int(2e8)
"""Lightning's ``DeepSpeedStrategy`` defaults ``reduce_bucket_size`` and ``allgather_bucket_size``
to 2e8 elements each; stages 1 and 2 hold one bucket of each."""

NODE_SIZE = 8
"""Ranks per node assumed by ``fsdp_hybrid`` when not given: eight GPUs, as on DGX/HGX nodes."""


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How training is spread over devices.

    Attributes:
        strategy: one of :data:`STRATEGIES`.
        world_size: number of data-parallel ranks.
        offload_optimizer: optimizer state and step in host memory.
        offload_params: parameter shards in host memory (sharded strategies only).
        shard_size: ranks that one copy of the model state is sharded over.
    """

    strategy: str = "single"
    world_size: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    shard_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.strategy not in ("single", "ddp")

    def factors(self) -> dict[Category, float]:
        """Share of each model-state category a rank keeps on the device."""
        n = self.shard_size
        s = self.strategy
        p = 1 / n if s in ("fsdp", "fsdp_hybrid", "deepspeed_stage_3") else 1.0
        g = 1.0 if s in ("single", "ddp", "deepspeed_stage_1") else 1 / n
        o = 1.0 if s in ("single", "ddp") else 1 / n
        if self.offload_optimizer:
            o = 0.0
        if self.offload_params:
            p = 0.0
            if s.startswith("fsdp"):
                g = 0.0  # FSDP's CPUOffload keeps gradient shards on the host too
        return {Category.PARAMETERS: p, Category.GRADIENTS: g, Category.OPTIMIZER_STATE: o}

    def weight(self, category: Category, phase: str) -> float:
        """Share of one allocation a rank holds, by its category and the phase that made it."""
        factors = self.factors()
        if category in factors:
            return factors[category]
        if category == Category.TEMPORARY and phase == "optimizer":
            return factors[Category.OPTIMIZER_STATE]
        return 1.0

    def extras(self, module: nn.Module, *, bytes_per_element: int, trainable_bytes: int) -> dict[Category, int]:
        """Communication and gathering buffers a rank holds on top of its shards.

        * ``ddp``: the gradient buckets, one more copy of all gradients (``DistributedDataParallel``
          with its default ``gradient_as_bucket_view=False``; its docs say the view saves "the
          total gradients size").
        * ``deepspeed_stage_1``/``2``: one reduce (gradients) and one all-gather (parameters)
          bucket of :data:`DEEPSPEED_BUCKET_ELEMENTS` elements, at most the model's size.
        * ``fsdp_shard_grad_op``: the unit's full gradients before they are reduce-scattered.
        * full sharding (``fsdp``, ``fsdp_hybrid``, ``deepspeed_stage_3``): the most that is held
          at once, inside the blocks' backward (see :meth:`phase_extras`): the root unit, two
          blocks and one block's unsharded gradients. The formula adds this at its peak; the
          trace adds :meth:`phase_extras` phase by phase instead.
        """
        if self.strategy == "ddp" and self.world_size > 1:
            return {Category.GRADIENTS: trainable_bytes}
        if self.strategy in ("deepspeed_stage_1", "deepspeed_stage_2"):
            bucket = min(DEEPSPEED_BUCKET_ELEMENTS, sum(p.numel() for p in module.parameters())) * bytes_per_element
            return {Category.GRADIENTS: bucket, Category.PARAMETERS: bucket}
        root, block, blocks = _units(module)
        if self.strategy == "fsdp_shard_grad_op":
            return {Category.GRADIENTS: max(root, block) * bytes_per_element}
        if self.strategy in ("fsdp", "fsdp_hybrid", "deepspeed_stage_3"):
            gathered = root + min(2, blocks) * block
            return {Category.PARAMETERS: gathered * bytes_per_element,
                    Category.GRADIENTS: (block or root) * bytes_per_element}
        return {}

    @property
    def fully_sharded(self) -> bool:
        return self.strategy in ("fsdp", "fsdp_hybrid", "deepspeed_stage_3")

    def phase_extras(self, module: nn.Module, *, bytes_per_element: int,
                     device: str) -> Callable[[str], dict[Category, int]]:
        """What full sharding holds gathered in each phase of a step, for the trace.

        Measured with torch's ``FSDPMemTracker`` on FSDP2 runs (``benchmarks/distributed.py``):
        the root unit stays gathered from its forward to the end of backward; in the forward one
        block is gathered (and on a GPU the next one is prefetched on another stream); while the
        head's backward runs, one block is; inside the blocks' backward, the block being computed,
        the one prefetched and the unsharded gradients of the block being reduce-scattered.
        """
        root, block, blocks = _units(module)
        one = block * bytes_per_element
        root_bytes = root * bytes_per_element
        forward = 1 + (device == "cuda")
        table = {
            "forward": {Category.PARAMETERS: root_bytes + min(forward, blocks) * one},
            "backward": {Category.PARAMETERS: root_bytes + min(1, blocks) * one},
            "block-backward": {Category.PARAMETERS: root_bytes + min(2, blocks) * one,
                               Category.GRADIENTS: one},
        }
        return lambda phase: table.get(phase, {})

    def host_bytes(self, full: Mapping[Category, int]) -> int:
        """Host memory a rank needs for what it offloads, from the unsharded bytes ``full``."""
        n = self.shard_size
        host = 0
        if self.offload_optimizer:
            host += full.get(Category.OPTIMIZER_STATE, 0) // n
        if self.offload_params:
            host += full.get(Category.PARAMETERS, 0) // n
        return host


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the largest ``ModuleList``), which FSDP wraps one by one."""
    blocks = max((m for m in module.modules() if isinstance(m, nn.ModuleList)),
                 key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    return list(blocks) if blocks is not None else []


def _units(module: nn.Module) -> tuple[int, int, int]:
    """Elements of FSDP's root unit and of its largest block, and the number of blocks.

    Lightning's FSDP wraps the repeated transformer blocks (``auto_wrap_policy`` over the block
    class); everything else (embeddings, head, final norm) stays in the root unit. A model without
    repeated blocks is all root.
    """
    blocks = repeated_blocks(module)
    total = sum(p.numel() for p in module.parameters())
    if not blocks:
        return total, 0, 0
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return total - sum(sizes), max(sizes), len(blocks)


def resolve_parallelism(strategy: str | None = "single", world_size: int | None = 1, *,
                        offload_optimizer: bool = False, offload_params: bool = False,
                        ranks_per_node: int | None = None) -> Parallelism:
    """Normalise a strategy name (ours or Lightning's) and its options.

    Raises:
        ConfigError: for an unknown or non-string strategy, a bad world size (a whole number from 1
            to :data:`~memguard.estimation.spec.MAX_COUNT`, not a bool), offload flags that are not
            ``True``/``False`` (``"no"`` would be truthy), or offload where it cannot apply.
    """
    if strategy is not None and not isinstance(strategy, str):
        raise ConfigError(f"strategy must be a name such as 'ddp' or 'fsdp', got {type(strategy).__name__} "
                          f"{strategy!r}; expected one of {', '.join(STRATEGIES)}")
    offload_optimizer = strict_bool("offload_optimizer", offload_optimizer)
    offload_params = strict_bool("offload_params", offload_params)
    key = (strategy or "single").strip().lower().replace("-", "_")
    if key in _ALIASES:
        key, opt_off, par_off = _ALIASES[key]
        offload_optimizer = offload_optimizer or opt_off
        offload_params = offload_params or par_off
    if key not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)} "
                          f"(or Lightning's names {', '.join(_ALIASES)})")
    world_size = positive_int("world_size", world_size)
    if key == "single" and world_size > 1:
        raise ConfigError(f"strategy 'single' runs on one device, but world_size={world_size}; "
                          "pass strategy='ddp' (or a sharded one)")
    if offload_params and key not in ("fsdp", "fsdp_hybrid", "deepspeed_stage_3"):
        raise ConfigError(f"offload_params needs fully sharded parameters (fsdp or deepspeed_stage_3), "
                          f"not {key!r}")
    if offload_optimizer and key in ("single", "ddp"):
        raise ConfigError(f"offload_optimizer needs a sharded strategy (fsdp or deepspeed_stage_*), not {key!r}")
    shard = world_size
    if key == "fsdp_hybrid":
        per_node = (min(world_size, NODE_SIZE) if ranks_per_node is None
                    else positive_int("ranks_per_node", ranks_per_node))
        if world_size % per_node:
            raise ConfigError(f"world_size={world_size} is not a multiple of {per_node} ranks per node")
        shard = per_node
    elif key in ("single", "ddp"):
        shard = 1
    return Parallelism(key, world_size, offload_optimizer, offload_params, shard)
