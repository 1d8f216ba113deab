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
from typing import TYPE_CHECKING

from memguard.enums import StrEnum
from memguard.errors import ConfigError
from memguard.estimation.arch import block_stacks
from memguard.estimation.phase import Phase
from memguard.estimation.result import Category
from memguard.estimation.spec import positive_int, strict_bool

if TYPE_CHECKING:
    from torch import nn

    from memguard.estimation.formula.inventory import Inventory

__all__ = ["STRATEGIES", "Parallelism", "Strategy", "Units", "resolve_parallelism", "units", "wrapped_blocks"]


class Strategy(StrEnum):
    """A data-parallel strategy, owning which model state it shards (the table above).

    ``str(Strategy.FSDP) == "fsdp"``: the value is the name :func:`memguard.estimate` takes and
    writes into ``inputs``. :meth:`parse` also reads Lightning's registered names
    (``StrategyRegistry``: ``"deepspeed_stage_3_offload"``, ``"ddp_spawn"`` ...); the Lightning
    strategy objects are read with :meth:`from_fsdp_mode` and :meth:`from_deepspeed_stage`.
    """

    SINGLE = "single"
    DDP = "ddp"
    FSDP = "fsdp"
    FSDP_SHARD_GRAD_OP = "fsdp_shard_grad_op"
    FSDP_HYBRID = "fsdp_hybrid"
    DEEPSPEED_STAGE_1 = "deepspeed_stage_1"
    DEEPSPEED_STAGE_2 = "deepspeed_stage_2"
    DEEPSPEED_STAGE_3 = "deepspeed_stage_3"

    @property
    def shards_parameters(self) -> bool:
        """Each rank keeps a shard of the parameters (ZeRO stage 3, FSDP's full sharding)."""
        return self in (Strategy.FSDP, Strategy.FSDP_HYBRID, Strategy.DEEPSPEED_STAGE_3)

    @property
    def shards_gradients(self) -> bool:
        """Each rank keeps a shard of the gradients (ZeRO stage 2 and up)."""
        return self not in (Strategy.SINGLE, Strategy.DDP, Strategy.DEEPSPEED_STAGE_1)

    @property
    def shards_optimizer_state(self) -> bool:
        """Each rank keeps a shard of the optimizer state (ZeRO stage 1 and up)."""
        return self not in (Strategy.SINGLE, Strategy.DDP)

    def shards(self, category: Category) -> bool:
        """Whether a rank keeps only a shard of the model-state ``category`` (else it is whole)."""
        return {Category.PARAMETERS: self.shards_parameters, Category.GRADIENTS: self.shards_gradients,
                Category.OPTIMIZER_STATE: self.shards_optimizer_state}.get(category, False)

    @property
    def sharded(self) -> bool:
        """Some model state is sharded: anything but one device and DDP."""
        return self.shards_optimizer_state

    @property
    def fully_sharded(self) -> bool:
        """Parameters, gradients and optimizer state are all sharded."""
        return self.shards_parameters

    @property
    def is_fsdp(self) -> bool:
        return self in (Strategy.FSDP, Strategy.FSDP_SHARD_GRAD_OP, Strategy.FSDP_HYBRID)

    @property
    def is_deepspeed(self) -> bool:
        return self in (Strategy.DEEPSPEED_STAGE_1, Strategy.DEEPSPEED_STAGE_2, Strategy.DEEPSPEED_STAGE_3)

    @property
    def engine(self) -> str | None:
        """``"deepspeed"`` or ``"fsdp"``: the engine a run adopts for this strategy; ``None`` for one
        device and DDP (torch's own)."""
        return "deepspeed" if self.is_deepspeed else "fsdp" if self.is_fsdp else None

    @property
    def sharding_level(self) -> int:
        """How much of the model state a rank shards, as a rank of intrusiveness: 0 one device, 1 DDP
        (replicated), 2 optimizer state and/or gradients (ZeRO 1 and 2, ``fsdp_shard_grad_op``), 3
        everything (ZeRO 3, FSDP's full and hybrid sharding). A lower level is a smaller change."""
        if self.fully_sharded:
            return 3
        return 2 if self.sharded else int(self is Strategy.DDP)

    @classmethod
    def parse(cls, name: str | None) -> Strategy:
        """The strategy ``name`` means: ours or Lightning's (case, ``-``/``_`` and spaces ignored);
        ``None`` is ``"single"``.

        Raises:
            ConfigError: for a non-string or unknown name, naming it and the accepted ones.
        """
        return cls._lookup(name)[0]

    @classmethod
    def offloads_named(cls, name: str | None) -> tuple[bool, bool]:
        """``(offload_optimizer, offload_params)`` that a Lightning name turns on
        (``"deepspeed_stage_3_offload"``: both); ``(False, False)`` for the rest."""
        return cls._lookup(name)[1:]

    @classmethod
    def _lookup(cls, name: str | None) -> tuple[Strategy, bool, bool]:
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"strategy must be a name such as 'ddp' or 'fsdp', got {type(name).__name__} "
                              f"{name!r}; expected one of {', '.join(STRATEGIES)}")
        key = (name or "single").strip().lower().replace("-", "_")
        if key in _ALIASES:
            return _ALIASES[key]
        try:
            return cls(key), False, False
        except ValueError:
            raise ConfigError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)} "
                              f"(or Lightning's names {', '.join(_ALIASES)})") from None

    @classmethod
    def from_fsdp_mode(cls, mode: str) -> Strategy | None:
        """The strategy of Lightning's ``FSDPStrategy`` with ``sharding_strategy`` named ``mode``
        (torch's ``ShardingStrategy``), or ``None`` for a mode memguard does not know.

        ``_HYBRID_SHARD_ZERO2`` is counted as ``fsdp_hybrid``; ``NO_SHARD`` is DDP.
        """
        return _FSDP_MODES.get(mode)

    @classmethod
    def from_deepspeed_stage(cls, stage: int) -> Strategy:
        """The strategy of Lightning's ``DeepSpeedStrategy`` at ZeRO ``stage`` (0: no sharding, DDP)."""
        return {1: cls.DEEPSPEED_STAGE_1, 2: cls.DEEPSPEED_STAGE_2, 3: cls.DEEPSPEED_STAGE_3}.get(stage, cls.DDP)


STRATEGIES = tuple(s.value for s in Strategy)
"""The names of :class:`Strategy`, as :func:`memguard.estimate` takes them."""

# Lightning's registered strategy names that mean one of ours (``StrategyRegistry``), with the
# offloads (optimizer, parameters) they turn on.
_ALIASES: dict[str, tuple[Strategy, bool, bool]] = {
    "auto": (Strategy.SINGLE, False, False),
    "dp": (Strategy.SINGLE, False, False),
    "ddp_spawn": (Strategy.DDP, False, False),
    "ddp_fork": (Strategy.DDP, False, False),
    "ddp_notebook": (Strategy.DDP, False, False),
    "ddp_find_unused_parameters_true": (Strategy.DDP, False, False),
    "ddp_find_unused_parameters_false": (Strategy.DDP, False, False),
    "fsdp_full_shard": (Strategy.FSDP, False, False),
    "full_shard": (Strategy.FSDP, False, False),
    "shard_grad_op": (Strategy.FSDP_SHARD_GRAD_OP, False, False),
    "hybrid_shard": (Strategy.FSDP_HYBRID, False, False),
    "fsdp_cpu_offload": (Strategy.FSDP, True, True),
    "deepspeed": (Strategy.DEEPSPEED_STAGE_2, False, False),
    "deepspeed_stage_2_offload": (Strategy.DEEPSPEED_STAGE_2, True, False),
    "deepspeed_stage_3_offload": (Strategy.DEEPSPEED_STAGE_3, True, True),
}

_FSDP_MODES: dict[str, Strategy] = {
    "FULL_SHARD": Strategy.FSDP, "SHARD_GRAD_OP": Strategy.FSDP_SHARD_GRAD_OP, "HYBRID_SHARD": Strategy.FSDP_HYBRID,
    "_HYBRID_SHARD_ZERO2": Strategy.FSDP_HYBRID, "NO_SHARD": Strategy.DDP,
}
"""torch's ``ShardingStrategy`` names, as Lightning's ``FSDPStrategy.sharding_strategy`` holds them."""

DEEPSPEED_BUCKET_ELEMENTS = int(2e8)
"""Lightning's ``DeepSpeedStrategy`` defaults ``reduce_bucket_size`` and ``allgather_bucket_size``
to 2e8 elements each; stages 1 and 2 hold one bucket of each."""

NODE_SIZE = 8
"""Ranks per node assumed by ``fsdp_hybrid`` when not given: eight GPUs, as on DGX/HGX nodes."""


@dataclasses.dataclass(frozen=True)
class Units:
    """What the strategies' buffers read of a model: its parameters' elements in all, and FSDP's units.

    Lightning's FSDP wraps the repeated transformer blocks (``auto_wrap_policy`` over the block
    class, :func:`wrapped_blocks`); everything else (embeddings, head, final norm) stays in the root
    unit. A model without repeated blocks is all root. Read from a module by :func:`units`, or from
    its :class:`~memguard.estimation.formula.inventory.Inventory` (a preset's shipped description,
    no torch) by :meth:`of_inventory`.

    Attributes:
        total: elements of every parameter (``module.parameters()``: tied ones once).
        root: elements of the root unit (``total`` less the wrapped blocks').
        block: elements of the largest wrapped block.
        blocks: number of wrapped blocks.
    """

    total: int
    root: int
    block: int
    blocks: int

    @classmethod
    def of_sizes(cls, total: int, sizes: list[int]) -> Units:
        """The units of a model of ``total`` elements whose wrapped blocks hold ``sizes`` elements each."""
        if not sizes:
            return cls(total, total, 0, 0)
        return cls(total, total - sum(sizes), max(sizes), len(sizes))

    @classmethod
    def of_inventory(cls, inv: Inventory) -> Units:
        """The units of the module behind ``inv``: its larger stack of blocks (an encoder-decoder's
        decoder; the encoder of equals, as ``max`` keeps the first), as :func:`wrapped_blocks` picks it
        from the module. The inventory's stacks are the blocks the architecture lays out
        (:func:`~memguard.estimation.arch.block_stacks` without a guess), which for every preset are
        the module's (pinned by the tests)."""
        stacks = [[sum(inv.numel[i] for i in blk) for blk in stack] for stack in (inv.enc_blocks, inv.dec_blocks)]
        return cls.of_sizes(sum(inv.numel), max(stacks, key=sum))


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How training is spread over devices.

    Attributes:
        strategy: the :class:`Strategy` (a name of one is read as it).
        world_size: number of data-parallel ranks.
        offload_optimizer: optimizer state and step in host memory.
        offload_params: parameter shards in host memory (sharded strategies only).
        shard_size: ranks that one copy of the model state is sharded over.
    """

    strategy: Strategy = Strategy.SINGLE
    world_size: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    shard_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            object.__setattr__(self, "strategy", Strategy.parse(self.strategy))

    @property
    def sharded(self) -> bool:
        return self.strategy.sharded

    @property
    def fully_sharded(self) -> bool:
        return self.strategy.fully_sharded

    def factors(self) -> dict[Category, float]:
        """Share of each model-state category a rank keeps on the device."""
        share = {c: 1 / self.shard_size if self.strategy.shards(c) else 1.0
                 for c in (Category.PARAMETERS, Category.GRADIENTS, Category.OPTIMIZER_STATE)}
        if self.offload_optimizer:
            share[Category.OPTIMIZER_STATE] = 0.0
        if self.offload_params:
            share[Category.PARAMETERS] = 0.0
            if self.strategy.is_fsdp:
                share[Category.GRADIENTS] = 0.0  # FSDP's CPUOffload keeps gradient shards on the host too
        return share

    def weight(self, category: Category, phase: Phase) -> float:
        """Share of one allocation a rank holds, by its category and the phase that made it."""
        factors = self.factors()
        if category in factors:
            return factors[category]
        if category == Category.TEMPORARY and phase == Phase.OPTIMIZER:
            return factors[Category.OPTIMIZER_STATE]
        return 1.0

    def extras(self, module: nn.Module | Units, *, bytes_per_element: int,
               trainable_bytes: int) -> dict[Category, int]:
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

        ``module`` is the model, or its :class:`Units` where already read (a preset's description).
        """
        s = self.strategy
        if s is Strategy.DDP and self.world_size > 1:
            return {Category.GRADIENTS: trainable_bytes}
        u = units(module)
        if s.is_deepspeed and not s.fully_sharded:
            bucket = min(DEEPSPEED_BUCKET_ELEMENTS, u.total) * bytes_per_element
            return {Category.GRADIENTS: bucket, Category.PARAMETERS: bucket}
        root, block, blocks = u.root, u.block, u.blocks
        if s is Strategy.FSDP_SHARD_GRAD_OP:
            return {Category.GRADIENTS: max(root, block) * bytes_per_element}
        if s.fully_sharded:
            gathered = root + min(2, blocks) * block
            return {Category.PARAMETERS: gathered * bytes_per_element,
                    Category.GRADIENTS: (block or root) * bytes_per_element}
        return {}

    def phase_extras(self, module: nn.Module | Units, *, bytes_per_element: int,
                     device: str) -> Callable[[Phase], dict[Category, int]]:
        """What full sharding holds gathered in each phase of a step, for the trace.

        Measured with torch's ``FSDPMemTracker`` on FSDP2 runs (``benchmarks/distributed.py``):
        the root unit stays gathered from its forward to the end of backward; in the forward one
        block is gathered (and on a GPU the next one is prefetched on another stream); while the
        head's backward runs, one block is; inside the blocks' backward, the block being computed,
        the one prefetched and the unsharded gradients of the block being reduce-scattered.
        ``module`` is the model, or its :class:`Units`.
        """
        u = units(module)
        root, block, blocks = u.root, u.block, u.blocks
        one = block * bytes_per_element
        root_bytes = root * bytes_per_element
        forward = 1 + (device == "cuda")
        table = {
            Phase.FORWARD: {Category.PARAMETERS: root_bytes + min(forward, blocks) * one},
            Phase.BACKWARD: {Category.PARAMETERS: root_bytes + min(1, blocks) * one},
            Phase.BLOCK_BACKWARD: {Category.PARAMETERS: root_bytes + min(2, blocks) * one,
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


def wrapped_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP wraps one by one, whose backward the trace marks: the larger stack of
    :func:`~memguard.estimation.arch.block_stacks` (an encoder-decoder's decoder).

    ``max`` over the two stacks, by parameters, keeps the first of equals (the encoder).
    """
    enc, dec = block_stacks(module)
    return max(enc, dec, key=lambda stack: sum(p.numel() for b in stack for p in b.parameters()))


def units(module: nn.Module | Units) -> Units:
    """The :class:`Units` of ``module``: its parameters' elements, FSDP's root unit and its wrapped blocks
    (``module`` itself where it is its units already, read from a preset's description)."""
    if isinstance(module, Units):
        return module
    total = sum(p.numel() for p in module.parameters())
    return Units.of_sizes(total, [sum(p.numel() for p in b.parameters()) for b in wrapped_blocks(module)])


MAX_WORLD_SIZE = 2**20
"""The most data-parallel ranks (GPUs) memguard plans for: 1,048,576, ten times the largest GPU
clusters built (~10**5 GPUs). The planner tries world sizes one by one (and lists those it cannot
use), so 2**31 of them would exhaust memory before the first estimate."""


def world_size_of(name: str, value: object) -> int:
    """``value`` as a number of ranks from 1 to :data:`MAX_WORLD_SIZE`, else a :class:`ConfigError` naming ``name``."""
    count = positive_int(name, value)
    if count > MAX_WORLD_SIZE:
        raise ConfigError(f"{name}={count:,} GPUs is more than any cluster holds: memguard takes at most "
                          f"{MAX_WORLD_SIZE:,} (ten times the largest GPU clusters built)")
    return count


def resolve_parallelism(strategy: str | Strategy | None = "single", world_size: int | None = 1, *,
                        offload_optimizer: bool = False, offload_params: bool = False,
                        ranks_per_node: int | None = None) -> Parallelism:
    """Normalise a strategy name (ours or Lightning's, see :meth:`Strategy.parse`) and its options.

    Raises:
        ConfigError: for an unknown or non-string strategy, a bad world size (a whole number from 1
            to :data:`MAX_WORLD_SIZE`, not a bool), offload flags that are not
            ``True``/``False`` (``"no"`` would be truthy), or offload where it cannot apply.
    """
    if strategy is not None and not isinstance(strategy, str):
        Strategy.parse(strategy)  # raises, naming it: the name is checked before the flags
    offload_optimizer = strict_bool("offload_optimizer", offload_optimizer)
    offload_params = strict_bool("offload_params", offload_params)
    key = Strategy.parse(strategy)
    opt_off, par_off = Strategy.offloads_named(strategy)
    offload_optimizer = offload_optimizer or opt_off
    offload_params = offload_params or par_off
    world_size = world_size_of("world_size", world_size)
    if key is Strategy.SINGLE and world_size > 1:
        raise ConfigError(f"strategy 'single' runs on one device, but world_size={world_size}; "
                          "pass strategy='ddp' (or a sharded one)")
    if offload_params and not key.fully_sharded:
        raise ConfigError(f"offload_params needs fully sharded parameters (fsdp or deepspeed_stage_3), "
                          f"not {key.value!r}")
    if offload_optimizer and not key.sharded:
        raise ConfigError(f"offload_optimizer needs a sharded strategy (fsdp or deepspeed_stage_*), not {key.value!r}")
    shard = world_size
    if key is Strategy.FSDP_HYBRID:
        per_node = (min(world_size, NODE_SIZE) if ranks_per_node is None
                    else positive_int("ranks_per_node", ranks_per_node))
        if world_size % per_node:
            raise ConfigError(f"world_size={world_size} is not a multiple of {per_node} ranks per node")
        shard = per_node
    elif not key.sharded:
        shard = 1
    return Parallelism(key, world_size, offload_optimizer, offload_params, shard)
