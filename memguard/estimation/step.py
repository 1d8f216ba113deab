"""One training step's knobs as one value: :class:`Step`, checked once.

Every entry point that describes a step (:func:`memguard.estimate`'s keyword arguments, the CLI's
flags, :func:`memguard.plan`'s ``base``, the guards) builds a :class:`Step`, the way httpx turns
every form of a timeout into one ``Timeout`` (``httpx/_config.py``): the rest of the library only
reads the value. The knobs are :data:`KNOBS`, the field names of :class:`Step`, which are the names
of :func:`memguard.estimate`'s keyword arguments (a test pins it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memguard.enums import StrEnum
from memguard.errors import ConfigError
from memguard.estimation.parallel import Parallelism, resolve_parallelism
from memguard.estimation.quantization_kinds import Quantization, resolve_quantization
from memguard.estimation.result import Method
from memguard.estimation.spec import OptimizerSpec, TrainingSpec, positive_int, resolve_optimizer

__all__ = ["DEFAULTS", "KNOBS", "LOOPS", "METHODS", "Method", "Step", "TrainingLoop", "training_loop_of"]


class TrainingLoop(StrEnum):
    """Whose loop runs the step: ``"pytorch"`` (forward, backward, step, ``zero_grad``) or
    ``"lightning"`` (``zero_grad`` after the next forward: Lightning's ``_AutomaticOptimization``)."""

    PYTORCH = "pytorch"
    LIGHTNING = "lightning"


METHODS = tuple(m.value for m in Method)
LOOPS = tuple(loop.value for loop in TrainingLoop)


def training_loop_of(loop: Any) -> TrainingLoop:
    """``loop`` as a :class:`TrainingLoop`: the one check of a training loop's name.

    Raises:
        ConfigError: for anything but ``"pytorch"`` or ``"lightning"``, naming it.
    """
    if loop not in LOOPS:
        raise ConfigError(f"unknown training_loop {loop!r}; expected one of {', '.join(LOOPS)}")
    return TrainingLoop(loop)


def _canonical_optimizer(optimizer: Any, spec: OptimizerSpec) -> Any:
    """A name by its canonical spelling (``"AdamW_8bit"`` -> ``"adamw-8bit"``); a class, factory or
    :class:`OptimizerSpec` as given (equal steps keep equal optimizers)."""
    if optimizer is None or isinstance(optimizer, str):
        return spec.name
    return optimizer


@dataclasses.dataclass(frozen=True)
class Step:
    """What one training step is, model aside: every knob :func:`memguard.estimate` takes, checked once.

    Construct it with :func:`memguard.estimate`'s names and values (``Step(batch_size=8,
    precision="bf16-mixed", strategy="fsdp", world_size=4)``); every value is checked and
    normalised on construction, raising the :class:`~memguard.ConfigError` :func:`memguard.estimate`
    raises for it. Pass it as ``memguard.estimate(model, step=step)``.

    Normalised: ``precision`` by Lightning's canonical name, ``optimizer`` a memguard name (or the
    class or factory given), ``device`` a :class:`~memguard.estimation.spec.DeviceKind`, ``strategy`` a
    :class:`~memguard.estimation.parallel.Strategy` (a Lightning name's offload turned into the
    flags), ``training_loop`` a :class:`TrainingLoop`, ``quantization`` a
    :class:`~memguard.estimation.quantization.QuantizationKind`, ``skip_modules``
    a tuple; ``moe_routing`` stays as given (checked).

    Attributes:
        batch_size, seq_len, decoder_seq_len: samples per device and tokens per sample (``None``:
            from the model or the example input).
        precision, optimizer, gradient_checkpointing, device: as :func:`memguard.estimate` takes them.
        training_loop, strategy, world_size, offload_optimizer, offload_params: the loop and the layout.
        lora_rank, quantization, double_quant, skip_modules: what is trained, over what base.
        accumulate_grad_batches, set_to_none, keep_output, moe_routing: as :func:`memguard.estimate`
            takes them (``keep_output`` ``None`` becomes ``False`` in Lightning's loop, which drops
            ``training_step``'s output itself).
    """

    batch_size: Any = None
    seq_len: Any = None
    decoder_seq_len: Any = None
    precision: Any = "32-true"
    optimizer: Any = "adamw"
    gradient_checkpointing: Any = None
    device: Any = "cuda"
    training_loop: Any = "pytorch"
    strategy: Any = "single"
    world_size: Any = 1
    offload_optimizer: Any = False
    offload_params: Any = False
    lora_rank: Any = None
    accumulate_grad_batches: Any = 1
    set_to_none: Any = True
    keep_output: Any = None
    quantization: Any = None
    double_quant: Any = False
    skip_modules: Any = None
    moe_routing: Any = "balanced"

    def __post_init__(self) -> None:
        """Check every knob, in the order :func:`memguard.estimate` always checked them: the loop, the
        layout (:func:`resolve_parallelism`), the spec (:meth:`TrainingSpec.create`), LoRA, quantization.

        The layout and the spec built to check the knobs are kept (:attr:`layout`, :attr:`spec`):
        built once, here; they are no fields, so equality, hashing and pickling see the knobs alone."""
        loop = training_loop_of(self.training_loop)
        accumulate = positive_int("accumulate_grad_batches", self.accumulate_grad_batches)
        if not isinstance(self.set_to_none, bool):
            raise ConfigError(f"set_to_none must be True or False, got {self.set_to_none!r}")
        if self.keep_output is not None and not isinstance(self.keep_output, bool):
            raise ConfigError(f"keep_output must be True, False or None (not known), got {self.keep_output!r}")
        keep = False if self.keep_output is None and loop is TrainingLoop.LIGHTNING else self.keep_output
        layout = resolve_parallelism(self.strategy, self.world_size, offload_optimizer=self.offload_optimizer,
                                     offload_params=self.offload_params)
        spec = TrainingSpec.create(batch_size=self.batch_size, seq_len=self.seq_len, optimizer=self.optimizer,
                                   precision=self.precision, gradient_checkpointing=self.gradient_checkpointing,
                                   device=self.device, moe_routing=self.moe_routing,
                                   decoder_seq_len=self.decoder_seq_len)
        lora_rank = None if self.lora_rank is None else positive_int("lora_rank", self.lora_rank)
        if isinstance(self.quantization, Quantization):
            quant: Quantization | None = self.quantization
        else:
            quant = resolve_quantization(self.quantization, self.double_quant, self.skip_modules)
        values = {
            "batch_size": spec.batch_size, "seq_len": spec.seq_len, "decoder_seq_len": spec.decoder_seq_len,
            "precision": spec.precision.name, "optimizer": _canonical_optimizer(self.optimizer, spec.optimizer),
            "gradient_checkpointing": spec.gradient_checkpointing, "device": spec.device,
            "training_loop": loop, "strategy": layout.strategy,
            "world_size": layout.world_size, "offload_optimizer": layout.offload_optimizer,
            "offload_params": layout.offload_params, "lora_rank": lora_rank, "accumulate_grad_batches": accumulate,
            "keep_output": keep,
            "quantization": None if quant is None else quant.kind, "double_quant": bool(quant and quant.double_quant),
            "skip_modules": None if quant is None else quant.skip_modules,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_spec", spec)

    def __reduce__(self) -> tuple[type[Step], tuple[Any, ...]]:
        """Pickled as its knobs, and checked again when unpickled (as :meth:`replace` does): the kept
        spec may hold a closure (an optimizer class's factory) that does not pickle."""
        return Step, tuple(getattr(self, name) for name in KNOBS)

    def __repr__(self) -> str:
        """The knobs not at their defaults, by their names (``Step(batch_size=8, strategy='fsdp')``)."""
        shown = {k: v for k, v in self.to_dict().items() if v != DEFAULTS[k]}
        if "optimizer" in shown and not isinstance(self.optimizer, str):
            shown["optimizer"] = self.optimizer
        return f"Step({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def replace(self, **changes: Any) -> Step:
        """This step with ``changes`` (by :func:`memguard.estimate`'s names), checked again."""
        return dataclasses.replace(self, **changes)

    @property
    def spec(self) -> TrainingSpec:
        """What every estimator reads of the step (:class:`TrainingSpec`), built once on construction."""
        spec: TrainingSpec = self.__dict__["_spec"]
        return spec

    @property
    def layout(self) -> Parallelism:
        """The strategy, world size and offload as a :class:`Parallelism`, built once on construction."""
        layout: Parallelism = self.__dict__["_layout"]
        return layout

    @property
    def quant(self) -> Quantization | None:
        """The base's quantization asked for, or ``None`` (the estimator then reads the model's)."""
        if self.quantization is None:
            return None
        return Quantization(self.quantization, self.double_quant, self.skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """Every knob, JSON-ready and in :data:`KNOBS`' order: names for the enums, an optimizer
        class or factory by its name (:class:`OptimizerSpec`'s), ``skip_modules`` a list."""
        data = {name: getattr(self, name) for name in KNOBS}
        data["optimizer"] = resolve_optimizer(self.optimizer).name
        data["device"] = self.device.value
        data["training_loop"] = self.training_loop.value
        data["strategy"] = self.strategy.value
        data["quantization"] = None if self.quantization is None else self.quantization.value
        data["skip_modules"] = None if self.skip_modules is None else list(self.skip_modules)
        return data

    def inputs(self, model: str, method: str, **settled: Any) -> dict[str, Any]:
        """:attr:`memguard.MemoryEstimate.inputs`: the model's name, :meth:`to_dict` with the method
        after ``device``, and what the estimator ``settled`` (lengths, checkpointing, LoRA rank and
        quantization read from the model) in place of what was asked."""
        data = {**self.to_dict(), **settled}
        before = KNOBS.index("training_loop")
        return {"model": model, **{k: data[k] for k in KNOBS[:before]}, "method": str(method),
                **{k: data[k] for k in KNOBS[before:]}}


KNOBS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Step))
"""The knobs of a step, in the order :attr:`memguard.MemoryEstimate.inputs` lists them: the one list."""

DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Step)}
"""Each knob's default, :func:`memguard.estimate`'s keyword default of the same name."""
