"""Normalise what the user asks for into a :class:`TrainingSpec`.

Precision names follow Lightning's ``Trainer(precision=...)``; optimizer names follow
``torch.optim``. Every bad value raises :class:`~memguard.ConfigError` naming the value and the
accepted set.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from memguard.enums import StrEnum
from memguard.errors import ConfigError
from memguard.estimation.routing import resolve_routing

if TYPE_CHECKING:
    import torch

__all__ = ["ADAMW8BIT_BLOCK", "ADAMW8BIT_MIN_SIZE", "DEVICES", "MAX_COUNT", "MAX_INPUT_ELEMENTS", "OPTIMIZERS",
           "PAGED_MIN_NUMEL", "PRECISIONS", "DeviceKind", "Precision",
           "TrainingSpec", "make_optimizer", "positive_int", "resolve_optimizer", "resolve_precision", "strict_bool"]


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
"""Bytes per element of the dtypes a :class:`Precision` names (``torch.dtype.itemsize``)."""


@dataclasses.dataclass(frozen=True)
class Precision:
    """A Lightning precision setting, as dtypes.

    The dtypes are kept by name (``"float32"``...), so that reading a precision imports no torch
    (the formula on a preset runs without it); :attr:`param_dtype` and :attr:`autocast_dtype` are
    the ``torch.dtype`` objects, :attr:`param_bytes` and :attr:`autocast_bytes` their sizes.

    Attributes:
        name: Lightning's canonical name (``"16-mixed"`` ...).
        param: name of the dtype the weights (and so gradients and optimizer state) are kept in.
        autocast: name of the dtype of ``torch.autocast`` during forward, or ``None`` without autocast.
        grad_scaler: whether a ``GradScaler`` scales the loss (fp16 mixed precision).
    """

    name: str
    param: str
    autocast: str | None = None
    grad_scaler: bool = False

    @property
    def param_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` the weights are kept in."""
        import torch

        return getattr(torch, self.param)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The ``torch.dtype`` of ``torch.autocast``, or ``None`` without autocast."""
        import torch

        return None if self.autocast is None else getattr(torch, self.autocast)

    @property
    def param_bytes(self) -> int:
        """Bytes of one element of the weights (``param_dtype.itemsize``)."""
        return _DTYPE_BYTES[self.param]

    @property
    def autocast_bytes(self) -> int | None:
        """Bytes of one element in autocast's dtype, or ``None`` without autocast."""
        return None if self.autocast is None else _DTYPE_BYTES[self.autocast]


PRECISIONS: dict[str, Precision] = {
    "32-true": Precision("32-true", "float32"),
    "16-mixed": Precision("16-mixed", "float32", "float16", grad_scaler=True),
    "bf16-mixed": Precision("bf16-mixed", "float32", "bfloat16"),
    "16-true": Precision("16-true", "float16"),
    "bf16-true": Precision("bf16-true", "bfloat16"),
    "64-true": Precision("64-true", "float64"),
}
# Lightning's own short forms (lightning.fabric.connector._convert_precision_to_unified_args).
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true",
                      "fp32": "32-true", "fp16": "16-mixed", "transformer-engine": "bf16-mixed"}


def resolve_precision(precision: str | int | Precision | None) -> Precision:
    """Turn ``"bf16-mixed"``, ``16``, ``"32"`` ... into a :class:`Precision`."""
    if isinstance(precision, Precision):
        return precision
    if precision is None:
        return PRECISIONS["32-true"]
    key = str(precision).strip().lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)} "
            f"(or Lightning's short forms {', '.join(_PRECISION_ALIASES)})"
        )
    return PRECISIONS[key]


OptimizerFactory = Callable[..., Any]
"""``factory(params, **options) -> torch.optim.Optimizer``."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name, with what the formula needs to know about its state.

    Attributes:
        name: ``"adamw"``, ``"sgd"``, ... or the class name of a user's optimizer.
        factory: builds the optimizer over parameters (used by the trace), or ``None`` for no
            optimizer step at all.
        state_tensors: full-size state tensors per trainable parameter (Adam 2, momentum SGD 1), in
            the parameter's dtype (``torch.optim`` allocates them with ``zeros_like``). ``None``
            when unknown (a user's class): the formula then assumes Adam's 2.
        factored: Adafactor-style row + column statistics instead of full-size state.
        quantized: 8-bit block-wise state (bitsandbytes), see :class:`AdamW8bitStandIn`.
        paged: bitsandbytes' paged optimizer: state of large parameters in CUDA managed memory
            (see :data:`PAGED_MIN_NUMEL`), fp32 for the 32-bit one (:class:`PagedAdamWStandIn`).
        implementation: ``"fused"`` (``fused=True``: one kernel updates every tensor in place,
            ``torch/optim/adam.py`` ``_fused_adam``, ``torch._fused_adamw_``; the transformers
            Trainer's default ``optim="adamw_torch_fused"``), ``"foreach"`` (``foreach=True`` on
            every device, ``_multi_tensor_adam``) or ``None``: torch's default, ``foreach`` on CUDA
            and the single-tensor loop on the CPU (``torch/optim/optimizer.py``,
            ``_default_to_fused_or_foreach``).
    """

    name: str
    factory: OptimizerFactory | None
    state_tensors: int | None
    factored: bool = False
    quantized: bool = False
    paged: bool = False
    implementation: str | None = None


def _builtin(cls_name: str, **kwargs: Any) -> OptimizerFactory:
    def factory(params: Iterable[torch.nn.Parameter], **extra: Any) -> torch.optim.Optimizer:
        import torch

        cls = getattr(torch.optim, cls_name)
        return cls(params, **{**kwargs, **extra})

    return factory


ADAMW8BIT_BLOCK = 2048
"""Elements per block of bitsandbytes' 8-bit optimizer state, each with one fp32 absmax
(:class:`~memguard.estimation.optim_stand_ins.AdamW8bitStandIn`)."""

ADAMW8BIT_MIN_SIZE = 4096
"""Parameters with fewer elements keep fp32 moments under bitsandbytes' 8-bit optimizers
(``Optimizer8bit``'s ``min_8bit_size``)."""


def _adamw8bit(params: Iterable[torch.nn.Parameter], **_: Any) -> torch.optim.Optimizer:
    from memguard.estimation.optim_stand_ins import AdamW8bitStandIn

    return AdamW8bitStandIn(params)


PAGED_MIN_NUMEL = 100_000
"""Parameters from this many elements have their state paged (bitsandbytes ``Optimizer8bit.get_state_buffer``:
``if not self.is_paged or p.numel() < 1e5: return torch.zeros_like(...)``, else ``F.get_paged``, which
allocates with ``cudaMallocManaged``); smaller ones get ordinary CUDA tensors."""


def _paged_adamw(params: Iterable[torch.nn.Parameter], **_: Any) -> torch.optim.Optimizer:
    from memguard.estimation.optim_stand_ins import PagedAdamWStandIn

    return PagedAdamWStandIn(params)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", _builtin("AdamW", lr=1e-3), 2),
    "adam": OptimizerSpec("adam", _builtin("Adam", lr=1e-3), 2),
    "sgd": OptimizerSpec("sgd", _builtin("SGD", lr=1e-3), 0),
    "sgd-momentum": OptimizerSpec("sgd-momentum", _builtin("SGD", lr=1e-3, momentum=0.9), 1),
    "adafactor": OptimizerSpec("adafactor", _builtin("Adafactor", lr=1e-2), 0, factored=True),
    "adamw-8bit": OptimizerSpec("adamw-8bit", _adamw8bit, 0, quantized=True),
    "paged-adamw": OptimizerSpec("paged-adamw", _paged_adamw, 2, paged=True),
    "paged-adamw-8bit": OptimizerSpec("paged-adamw-8bit", _adamw8bit, 0, quantized=True, paged=True),
    "adamw-fused": OptimizerSpec("adamw-fused", _builtin("AdamW", lr=1e-3, fused=True), 2, implementation="fused"),
    "adamw-foreach": OptimizerSpec("adamw-foreach", _builtin("AdamW", lr=1e-3, foreach=True), 2,
                                   implementation="foreach"),
    "none": OptimizerSpec("none", None, 0),
}
_KNOWN_CLASSES = {"AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1,
                  "RMSprop": 1, "Adadelta": 2, "SGD": None, "Adafactor": 0}


def resolve_optimizer(optimizer: str | type | OptimizerFactory | OptimizerSpec | None) -> OptimizerSpec:
    """Turn ``"adamw"``, ``torch.optim.SGD`` or ``lambda params: ...`` into an :class:`OptimizerSpec`."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if optimizer is None:
        return OPTIMIZERS["none"]
    if isinstance(optimizer, str):
        key = optimizer.strip().lower().replace("_", "-")
        key = {"sgd-nesterov": "sgd-momentum", "momentum": "sgd-momentum", "adam-w": "adamw",
               "adamw8bit": "adamw-8bit", "adamw-bnb-8bit": "adamw-8bit", "pagedadamw": "paged-adamw",
               "pagedadamw8bit": "paged-adamw-8bit", "paged-adamw-32bit": "paged-adamw",
               "adamw-torch-fused": "adamw-fused", "adamw-torch": "adamw"}.get(key, key)
        if key not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}, "
                "a torch.optim.Optimizer class, or a callable params -> optimizer"
            )
        return OPTIMIZERS[key]
    if inspect.isclass(optimizer):
        import torch

        if not issubclass(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer class {optimizer.__name__!r} is not a torch.optim.Optimizer")
        cls = optimizer
        state = _KNOWN_CLASSES.get(cls.__name__)
        needs_lr = "lr" in inspect.signature(cls).parameters

        def factory(params: Iterable[torch.nn.Parameter], **extra: Any) -> torch.optim.Optimizer:
            try:
                return cls(params, **extra)
            except TypeError:
                if needs_lr:
                    return cls(params, lr=1e-3, **extra)
                raise

        return OptimizerSpec(cls.__name__.lower(), factory, state,
                             factored=cls.__name__ == "Adafactor")
    if callable(optimizer):
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        return OptimizerSpec(name, optimizer, None)
    raise ConfigError(
        f"cannot use {optimizer!r} as an optimizer; expected a name ({', '.join(OPTIMIZERS)}), "
        "a torch.optim.Optimizer class, or a callable params -> optimizer"
    )


def make_optimizer(spec: OptimizerSpec, params: list[torch.nn.Parameter],
                   foreach: bool | None = None) -> torch.optim.Optimizer | None:
    """Build the optimizer of ``spec`` over ``params``; ``foreach`` is passed where accepted."""
    if spec.factory is None or not params:
        return None
    bitsandbytes = spec.quantized or spec.paged
    if spec.implementation is not None:  # fused=True or foreach=True already: torch refuses both at once
        return spec.factory(params)
    if foreach is not None and spec.name in OPTIMIZERS and not bitsandbytes and spec.name != "adafactor":
        return spec.factory(params, foreach=foreach)  # type: ignore[call-arg]
    return spec.factory(params)


MAX_COUNT = 2**31 - 1
"""The largest batch size, sequence length, world size or rank memguard takes (int32's maximum).

No device holds a step past it: 2**31 samples of one token of GPT-2 small are ~3 TiB of
activations, more than any GPU or host. Past it the trace's tensor sizes would overflow int64 too.
"""

MAX_INPUT_ELEMENTS = 2**60
"""The most token ids one batch may hold: ``input_ids`` (int64) and its ``labels`` copy would
otherwise take more than 2**63 bytes, which no tensor, allocator or device can count."""


def positive_int(name: str, value: Any, *, limit: int = MAX_COUNT) -> int:
    """``value`` as an ``int`` if it is a whole number in ``[1, limit]``, else a :class:`ConfigError` naming ``name``.

    ``True``/``False`` are not numbers here (``batch_size=True`` is a mistake, not 1), nor are
    strings; floats are taken when whole (``8.0``), never when infinite or NaN.
    """
    if isinstance(value, (bool, str, bytes)):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}") from None
        if as_int != value:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        value = as_int
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value > limit:
        raise ConfigError(f"{name}={value:,} is past any device: memguard takes at most {limit:,}")
    return value


def strict_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; any other value (``"no"``, ``1``, ``None``) is a :class:`ConfigError`.

    ``offload_params="no"`` would otherwise be truthy and mean yes.
    """
    if value is True or value is False:
        return value
    raise ConfigError(f"{name} must be True or False, got {value!r}")


class DeviceKind(StrEnum):
    """Where training runs, as the estimators tell devices apart: ``str(DeviceKind.CUDA) == "cuda"``."""

    CUDA = "cuda"
    CPU = "cpu"


DEVICES = tuple(kind.value for kind in DeviceKind)


def resolve_device(device: str | torch.device | None) -> DeviceKind:
    """``"cuda"``, ``"cuda:1"``, ``torch.device("cpu")`` -> :attr:`DeviceKind.CUDA` or :attr:`DeviceKind.CPU`."""
    if device is None:
        return DeviceKind.CUDA
    torch = sys.modules.get("torch")  # a torch.device exists only once torch is imported
    device_type = torch.device if torch is not None else str
    if not isinstance(device, (str, device_type)):
        raise ConfigError(f"device must be 'cuda' (or 'cuda:N'), 'cpu' or a torch.device, got "
                          f"{type(device).__name__} {device!r}")
    kind = device.type if not isinstance(device, str) else device.split(":")[0].strip().lower()
    if kind == "gpu":
        kind = "cuda"
    if kind not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; expected 'cuda' (or 'cuda:N') or 'cpu'")
    return DeviceKind(kind)


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """Everything about a training step other than the model: what every estimator reads.

    Attributes:
        batch_size: samples per step on one device (``None`` only for an ``example_input`` whose
            batch size is unknown).
        seq_len: tokens per sample for token models (an encoder-decoder's encoder tokens), or ``None``.
        optimizer: the :class:`OptimizerSpec`.
        precision: the :class:`Precision`.
        gradient_checkpointing: ``None`` to read from the model, else forced on or off.
        device: :class:`DeviceKind`: where training will run.
        moe_routing: the capacity factor of the mixture-of-experts routing model: 1.0 balanced,
            ``math.inf`` every token on the same experts (:func:`memguard.estimation.routing.resolve_routing`).
        decoder_seq_len: an encoder-decoder's decoder tokens per sample (the labels' length);
            ``None``: as many as ``seq_len``.
    """

    batch_size: int | None
    seq_len: int | None
    optimizer: OptimizerSpec
    precision: Precision
    gradient_checkpointing: bool | None
    device: DeviceKind
    moe_routing: float = 1.0
    decoder_seq_len: int | None = None

    @classmethod
    def create(cls, *, batch_size: Any = None, seq_len: Any = None, optimizer: Any = "adamw",
               precision: Any = "32-true", gradient_checkpointing: bool | None = None,
               device: Any = "cuda", moe_routing: Any = "balanced", decoder_seq_len: Any = None) -> TrainingSpec:
        """Check and normalise every argument.

        Raises:
            ConfigError: naming the bad value. Batch size and sequence length are whole numbers
                from 1 to :data:`MAX_COUNT` (not bools), and their product at most
                :data:`MAX_INPUT_ELEMENTS` token ids.
        """
        if gradient_checkpointing is not None and not isinstance(gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be None, True or False, got {gradient_checkpointing!r}")
        batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        seq_len = None if seq_len is None else positive_int("seq_len", seq_len)
        decoder_seq_len = None if decoder_seq_len is None else positive_int("decoder_seq_len", decoder_seq_len)
        if batch_size is not None and seq_len is not None and batch_size * seq_len > MAX_INPUT_ELEMENTS:
            raise ConfigError(
                f"batch_size={batch_size} x seq_len={seq_len} = {batch_size * seq_len:,} tokens: the "
                "input ids alone would take more than 2**63 bytes, past any device"
            )
        return cls(
            batch_size=batch_size,
            seq_len=seq_len,
            optimizer=resolve_optimizer(optimizer),
            precision=resolve_precision(precision),
            gradient_checkpointing=gradient_checkpointing,
            device=resolve_device(device),
            moe_routing=resolve_routing(moe_routing),
            decoder_seq_len=decoder_seq_len,
        )

    def replace(self, **changes: Any) -> TrainingSpec:
        return dataclasses.replace(self, **changes)


def __getattr__(name: str) -> Any:
    """The trace's stand-in optimizers (:mod:`memguard.estimation.optim_stand_ins`), imported with torch
    on first use."""
    if name in ("AdamW8bitStandIn", "PagedAdamWStandIn"):
        from memguard.estimation import optim_stand_ins

        return getattr(optim_stand_ins, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
