"""How a base's linear weights are quantized (:class:`Quantization`) and what one quantized weight
stores (:func:`linear_storage`): the torch-free half of :mod:`memguard.estimation.quantization`, which
re-exports it; the argument checks (:class:`memguard.estimation.step.Step`) and the formula read it
without importing torch."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from memguard.enums import StrEnum
from memguard.errors import ConfigError

__all__ = ["BLOCKSIZE", "FUSED_MAX_ROWS", "NESTED_BLOCKSIZE", "QLORA", "QUANTIZATIONS", "Quantization",
           "QuantizationKind", "QuantizedShape", "dequantize_temporary", "linear_storage", "matches_module",
           "quantized_note", "resolve_quantization"]


class QuantizationKind(StrEnum):
    """How a base's linear weights are stored: bitsandbytes' 4-bit NF4 or FP4 (``Linear4bit``'s
    ``quant_type``) or LLM.int8 (``Linear8bitLt``); ``str(QuantizationKind.NF4) == "nf4"``."""

    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"

    @property
    def bits(self) -> int:
        """Bits per stored weight: 8 for LLM.int8, else 4."""
        return 8 if self is QuantizationKind.INT8 else 4


QUANTIZATIONS = tuple(k.value for k in QuantizationKind)
BLOCKSIZE = 64
"""Weights per absmax of 4-bit storage: ``Params4bit``'s and ``quantize_4bit``'s default blocksize."""
NESTED_BLOCKSIZE = 256
"""absmax per second-level fp32 constant under double quantization (``quantize_4bit``)."""
CODE_4BIT = 16
"""Entries of the NF4/FP4 code (``get_4bit_type``), fp32, one per layer."""
CODE_DYNAMIC = 256
"""Entries of the 8-bit "dynamic" code of the quantized absmax, fp32, cached once (``name2qmap``)."""
FUSED_MAX_ROWS = 1536
"""Rows of input up to which ``gemm_4bit`` on CUDA runs its fused kernel (``_gemm_4bit_custom_max_m``)."""
F32 = 4


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are stored.

    Attributes:
        kind: a :class:`QuantizationKind`, ``"nf4"``, ``"fp4"`` or ``"int8"`` (given as its name, it
            becomes the member).
        double_quant: 4-bit absmax quantized again (``bnb_4bit_use_double_quant``).
        skip_modules: names of modules left in 16 bits (``llm_int8_skip_modules``); ``None`` for
            transformers' default, the output head (``get_keys_to_not_convert``).
    """

    kind: QuantizationKind
    double_quant: bool = False
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization {self.kind!r}; expected one of {', '.join(QUANTIZATIONS)}")
        object.__setattr__(self, "kind", QuantizationKind(self.kind))

    @property
    def bits(self) -> int:
        return self.kind.bits

    @property
    def label(self) -> str:
        """``nf4``, ``nf4 + double quantization``, ``int8``."""
        return self.kind + " + double quantization" * self.double_quant

    def to_dict(self) -> dict[str, Any]:
        return {"quantization": self.kind.value, "double_quant": self.double_quant,
                "skip_modules": None if self.skip_modules is None else list(self.skip_modules)}


QLORA = Quantization(QuantizationKind.NF4, double_quant=True)
"""The QLoRA paper's setting: NF4 with double quantization (and a bf16 compute dtype)."""


def resolve_quantization(quantization: Any, double_quant: Any = False,
                         skip_modules: Any = None) -> Quantization | None:
    """Check ``estimate``'s ``quantization``, ``double_quant`` and ``skip_modules``.

    Raises:
        ConfigError: naming the bad value and the accepted ones.
    """
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    if quantization is None:
        if double_quant:
            raise ConfigError("double_quant=True needs quantization='nf4' or 'fp4'")
        if skip_modules is not None:
            raise ConfigError("skip_modules needs a quantization ('nf4', 'fp4' or 'int8')")
        return None
    if isinstance(quantization, Quantization):
        return quantization
    key = quantization.strip().lower() if isinstance(quantization, str) else quantization
    if key not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)} "
                          "(bitsandbytes' 4-bit NF4/FP4 or LLM.int8) or None")
    if double_quant and key == "int8":
        raise ConfigError("double_quant=True applies to 4-bit quantization ('nf4' or 'fp4'), not 'int8'")
    if skip_modules is not None:
        if isinstance(skip_modules, str) or not isinstance(skip_modules, Iterable):
            raise ConfigError(f"skip_modules must be a list of module names, got {skip_modules!r}")
        skip_modules = tuple(skip_modules)
        bad = [s for s in skip_modules if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ConfigError(f"skip_modules must hold module names, got {bad[0]!r}")
    return Quantization(key, double_quant, skip_modules)


def linear_storage(out_features: int, in_features: int, q: Quantization) -> dict[str, int]:
    """Bytes of one quantized ``out_features x in_features`` weight, part by part.

    Parts: ``weight`` (packed 4-bit or int8), ``absmax`` (per block of 64, fp32; ``uint8`` under
    double quantization), ``absmax2`` and ``offset`` (double quantization's fp32 constants),
    ``code`` (the NF4/FP4 table), ``scale`` (int8's fp32 ``SCB`` per output row). The dynamic
    code of double quantization (1 KiB) is shared by every layer and not included.
    """
    n = out_features * in_features
    if q.kind is QuantizationKind.INT8:
        return {"weight": n, "scale": F32 * out_features}
    blocks = -(-n // BLOCKSIZE)
    parts = {"weight": (n + 1) // 2, "code": F32 * CODE_4BIT}
    if q.double_quant:
        parts.update(absmax=blocks, absmax2=F32 * -(-blocks // NESTED_BLOCKSIZE), offset=F32)
    else:
        parts["absmax"] = F32 * blocks
    return parts


class _Quantized(Protocol):
    """What :func:`dequantize_temporary` reads of a quantized layer."""

    in_features: int
    out_features: int
    quantization: Quantization


@dataclasses.dataclass(frozen=True)
class QuantizedShape:
    """A quantized linear layer as the formula reads it, without its tensors: what a
    :class:`memguard.estimation.quantization.QuantizedLinear` of a preset's description would be
    (:func:`memguard.estimation.description.with_quantized_base`)."""

    in_features: int
    out_features: int
    quantization: Quantization


def dequantize_temporary(layers: Iterable[_Quantized], elem: int) -> int:
    """The largest temporary a quantized layer's matmul makes: its weight dequantized into
    ``elem``-byte elements (plus fp32 absmax, one per block of :data:`BLOCKSIZE` weights, under double
    quantization), or int8's scaled copy."""
    most = 0
    for m in layers:
        n = m.in_features * m.out_features
        if m.quantization.kind is QuantizationKind.INT8:
            extra = F32 * m.out_features
        else:
            extra = F32 * -(-n // BLOCKSIZE) * m.quantization.double_quant
        most = max(most, n * elem + extra)
    return most


def matches_module(name: str, patterns: Sequence[str]) -> bool:
    """transformers' ``should_convert_module``: a pattern matches from the start up to a module
    boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        if name.endswith(key):
            return True
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return True
        except re.error:
            continue
    return False


def quantized_note(q: Quantization, layers: int, weights: int, stored: int) -> str:
    """The estimate's note on a base of ``layers`` linear layers quantized as ``q``: ``weights`` weights
    kept in ``stored`` bytes with their quantization constants (:func:`linear_storage`)."""
    return (f"{q.label} base: {layers} linear layers, {weights:,} weights in {stored:,} bytes with their "
            f"quantization constants ({8 * stored / max(weights, 1):.3f} bits each; bitsandbytes, QLoRA paper "
            "section 3), frozen; each matmul dequantizes its weight into a temporary")
