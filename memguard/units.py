"""Bytes in and out: the one pair of helpers that turns integers into text and back.

Inside memguard every size is an ``int`` number of bytes. Units appear only here. Binary units
(KiB, MiB, GiB: what NVML and ``nvidia-smi`` report) are written with an ``i``; decimal ones (KB,
MB, GB: what GPU vendors print on the box) without, following IEC 80000-13.
"""

from __future__ import annotations

import math
import re

from memguard.errors import ConfigError

__all__ = ["MAX_BYTES", "decimal_reading", "format_bytes", "parse_bytes"]

MAX_BYTES = 2**63 - 1
"""The largest size memguard reads: NVML, torch and the kernel count memory in signed or unsigned
64-bit integers, so nothing larger is memory (8 EiB; a float such as ``"1e400"`` is infinite)."""

_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.I)
_ACCEPTED = (
    "an integer number of bytes, a size such as '24GiB' (binary), '24GB' (decimal), "
    "or a percentage such as '90%' of the device"
)


def parse_bytes(value: int | float | str, *, total: int | None = None) -> int:
    """Parse a memory size given by a user into integer bytes.

    Args:
        value: ``1024``, ``"1024"``, ``"24GiB"``, ``"24 GB"``, ``"1.5Gi"``, ``"512MiB"``, or a
            percentage ``"90%"`` of ``total``.
        total: the device's total bytes, needed only for percentages.

    Returns:
        The size in bytes, rounded down to an integer.

    Raises:
        ConfigError: naming the value and the accepted forms when it cannot be read, is negative,
            is not finite or above :data:`MAX_BYTES`, or is a percentage without a ``total``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"cannot read {value!r} as a memory size; expected {_ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"memory size must not be negative, got {value}")
        return _bounded(value, value)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"memory size must be a finite non-negative number, got {value!r}")
        return _bounded(value, value)
    if not isinstance(value, str):
        raise ConfigError(f"cannot read {value!r} as a memory size; expected {_ACCEPTED}")
    text = value.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ConfigError(f"cannot read {value!r} as a percentage; expected e.g. '90%'") from None
        if not 0 <= pct <= 100:
            raise ConfigError(f"percentage must be between 0% and 100%, got {value!r}")
        if total is None:
            raise ConfigError(
                f"{value!r} is a percentage of the device's memory, but no device total is known here; "
                "give an absolute size such as '12GiB'"
            )
        return int(total * pct / 100)
    match = _PATTERN.match(text)
    if not match:
        raise ConfigError(f"cannot read {value!r} as a memory size; expected {_ACCEPTED}")
    number, prefix, binary, _ = match.groups()
    prefix = prefix.lower()
    scale = _BINARY[prefix] if binary else _DECIMAL[prefix]
    return _bounded(float(number) * scale, value)


def decimal_reading(value: str) -> str | None:
    """How a size with a decimal unit is read, for a user who may have meant the binary one, or ``None``.

    ``"24GB"`` is 24 x 10^9 bytes (IEC 80000-13), 22.35 GiB, while a GPU sold as "24 GB" has about
    24 GiB (``nvidia-smi`` counts MiB): ``decimal_reading("24GB")`` says so and how to write the other.
    ``None`` for binary units, plain bytes and percentages.
    """
    match = _PATTERN.match(value) if isinstance(value, str) else None
    if not match:
        return None
    number, prefix, binary, _ = match.groups()
    if binary or not prefix:
        return None
    n = parse_bytes(value)
    p = prefix.upper()
    power = " KMGTP".index(p)
    return (f"{value.strip()} is read as {n:,} bytes (SI: 1 {p}B = 10^{3 * power} bytes), {format_bytes(n)}; "
            f"write {number}{p}iB for {number} x 2^{10 * power} bytes (binary, as nvidia-smi counts)")


def _bounded(n: int | float, value: object) -> int:
    """``n`` as integer bytes, or a :class:`ConfigError` when it is infinite or past :data:`MAX_BYTES`."""
    if not math.isfinite(n) or n > MAX_BYTES:
        raise ConfigError(f"memory size {value!r} is larger than any memory (at most 2**63 - 1 bytes, "
                          "8 EiB); give a size such as '24GiB'")
    return int(n)


def format_bytes(n: int | float, *, digits: int = 2) -> str:
    """Format a byte count with binary units: ``format_bytes(1536) == '1.50 KiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
