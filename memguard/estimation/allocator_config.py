"""The settings of PyTorch's CUDA caching allocator, read from ``PYTORCH_CUDA_ALLOC_CONF``.

The keys, their accepted values and the environment variables follow
``AcceleratorAllocatorConfig::parseArgs`` in ``c10/core/AllocatorConfig.cpp`` and
``CUDAAllocatorConfig`` (torch 2.13); :mod:`memguard.estimation.allocator` replays allocations under them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from memguard.errors import ConfigError

__all__ = ["AllocatorConfig"]

_MiB = 1 << 20
_LARGE_BUFFER = 20 * _MiB  # kLargeBuffer, the default large_segment_size
_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB
_MIN_LARGE_ALLOC = 10 * _MiB  # kMinLargeAlloc
# 2.13 uses the first of these that is set (AcceleratorAllocatorConfig::instance, CUDAAllocatorConfig::
# instance), though a header comment calls PYTORCH_ALLOC_CONF the primary one.
_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_KEYS = frozenset({  # what 2.13 accepts; from "pinned_use_background_threads" on, nothing on the device
    "large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb", "roundup_power2_divisions",
    "garbage_collection_threshold", "expandable_segments", "backend", "per_process_memory_fraction",
    "pinned_use_background_threads", "pinned_max_round_threshold_mb", "pinned_max_cached_size_mb",
    "release_lock_on_cudamalloc", "release_lock_on_hipmalloc", "pinned_use_cuda_host_register",
    "pinned_use_hip_host_register", "graph_capture_record_stream_reuse", "pinned_reserve_segment_size_mb",
    "pinned_num_register_threads", "pinned_free_catch_all", "throw_on_cudamalloc_oom"})
_TOKEN = re.compile(r"[,:\[\]]|[^,:\[\]]+")


@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    """The caching allocator's settings that change what it reserves (integer bytes).

    Attributes:
        expandable_segments: grow one segment per pool instead of allocating new ones.
        max_split_size: blocks of at least this size are not split (``None``: no limit).
        max_non_split_rounding_size: how much larger than a request of at least
            ``max_split_size`` a reused block may be (``None``: ``large_segment_size``).
        large_segment_size: the segment for large-pool requests below 10 MiB (20 MiB).
        roundup_power2_divisions: divisions of each power-of-two interval from 1 MiB to 64 GiB
            (16 entries; 0 or 1: plain 512 B rounding).
        garbage_collection_threshold: read, not modelled (0: off).
        backend: ``"native"`` or ``"cudaMallocAsync"`` (not modelled).
        per_process_memory_fraction: read, not modelled (``None``: not set).
        source: the environment variable the settings came from, if any.
    """

    expandable_segments: bool = False
    max_split_size: int | None = None
    max_non_split_rounding_size: int | None = None
    large_segment_size: int = _LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * _INTERVALS
    garbage_collection_threshold: float = 0.0
    backend: str = "native"
    per_process_memory_fraction: float | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.large_segment_size <= _MIN_LARGE_ALLOC:
            raise ConfigError(f"large_segment_size must be above 10 MiB, got {self.large_segment_size} bytes")
        for name in ("max_split_size", "max_non_split_rounding_size"):
            value = getattr(self, name)
            if value is not None and value < self.large_segment_size:
                raise ConfigError(f"{name} must be at least large_segment_size ({self.large_segment_size} "
                                  f"bytes) or None for no limit, got {value}")
        divisions = self.roundup_power2_divisions
        if len(divisions) != _INTERVALS or any(d < 0 or d & (d - 1) for d in divisions):
            raise ConfigError(f"roundup_power2_divisions must be {_INTERVALS} zeros or powers of two, "
                              f"got {divisions!r}")

    @property
    def unmodelled(self) -> tuple[str, ...]:
        """The settings given that :func:`replay` does not model, as ``key:value``."""
        notes = [f"garbage_collection_threshold:{self.garbage_collection_threshold}"] * bool(
            self.garbage_collection_threshold)
        if self.per_process_memory_fraction is not None:
            notes.append(f"per_process_memory_fraction:{self.per_process_memory_fraction}")
        if self.backend != "native":
            notes.append(f"backend:{self.backend}")
        return tuple(notes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AllocatorConfig:
        """The settings a CUDA process started with ``env`` (default ``os.environ``) uses.

        The first variable set of ``PYTORCH_CUDA_ALLOC_CONF``, ``PYTORCH_HIP_ALLOC_CONF`` and
        ``PYTORCH_ALLOC_CONF`` is read, alone (``AcceleratorAllocatorConfig::instance``, 2.13).

        Raises:
            ConfigError: naming the variable, key and value PyTorch would reject.
        """
        env = os.environ if env is None else env
        name = next((n for n in _ENV_VARS if n in env), None)
        return cls() if name is None else cls.parse(env[name], source=name)

    @classmethod
    def parse(cls, text: str, *, source: str = "PYTORCH_CUDA_ALLOC_CONF") -> AllocatorConfig:
        """Read settings such as ``"expandable_segments:True,max_split_size_mb:128"``.

        As ``AcceleratorAllocatorConfig::parseArgs``: comma-separated ``key:value`` pairs, spaces
        ignored, lists in brackets, ``large_segment_size_mb`` applied before the keys it bounds,
        unknown keys rejected, the last of a repeated key kept.

        Raises:
            ConfigError: naming ``source``, the key, the value and what is accepted.
        """
        pairs = _pairs(text, source)
        fields: dict[str, Any] = {"source": source}
        segment_mb = _LARGE_BUFFER // _MiB
        for key, value in pairs:
            if key == "large_segment_size_mb":
                segment_mb = _integer(source, key, value, 11, "an integer number of MiB above 10")
                fields["large_segment_size"] = segment_mb * _MiB
        for key, value in pairs:
            if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
                name = "max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"
                fields[name] = _MiB * _integer(source, key, value, segment_mb,
                                               f"an integer number of MiB, at least {segment_mb}")
            elif key in ("garbage_collection_threshold", "per_process_memory_fraction"):
                fields[key] = _fraction(source, key, value, closed=key == "per_process_memory_fraction")
            elif key == "roundup_power2_divisions":
                fields[key] = _divisions(source, value)
            elif key in ("expandable_segments", "backend"):
                allowed = ("True", "False") if key == "expandable_segments" else ("native", "cudaMallocAsync")
                if value not in allowed:
                    raise _bad(source, key, value, " or ".join(allowed) + " (as written)")
                fields[key] = value == "True" if key == "expandable_segments" else value
        return cls(**fields)


def _bad(source: str, key: str, value: Any, accepted: str) -> ConfigError:
    if isinstance(value, list):
        value = "[" + "".join(value) + "]"
    return ConfigError(f"{source}: PyTorch's caching allocator rejects {key}:{value}; {key} takes {accepted}")


def _pairs(text: str, source: str) -> list[tuple[str, Any]]:
    """The ``key:value`` pairs of a setting string (``ConfigTokenizer``); a ``[...]`` value is a list."""
    tokens = _TOKEN.findall("".join(text.split()))
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key not in _KEYS:
            raise ConfigError(f"{source}: unrecognized key {key!r} in {text!r}; PyTorch 2.13 accepts "
                              f"{', '.join(sorted(_KEYS))}")
        if tokens[i + 1:i + 2] != [":"] or i + 2 >= len(tokens):
            raise ConfigError(f"{source}: expected '{key}:<value>' in {text!r}")
        if tokens[i + 2] == "[":
            if "]" not in tokens[i:]:
                raise ConfigError(f"{source}: missing ']' after '{key}:[' in {text!r}")
            end = tokens.index("]", i)
            pairs.append((key, tokens[i + 3:end]))
            i = end + 1
        else:
            pairs.append((key, tokens[i + 2]))
            i += 3
        if i < len(tokens) and tokens[i] != ",":
            raise ConfigError(f"{source}: expected ',' after {key} in {text!r}, got {tokens[i]!r}")
        i += 1
    return pairs


def _integer(source: str, key: str, value: Any, least: int, accepted: str) -> int:
    if not isinstance(value, str) or not value.isdigit() or int(value) < least:
        raise _bad(source, key, value, accepted)
    return int(value)


def _fraction(source: str, key: str, value: Any, *, closed: bool) -> float:
    """A number in (0, 1), or in [0, 1] when ``closed`` (``parsePerProcessMemoryFraction``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = -1.0
    if not (0.0 < x < 1.0 or (closed and x in (0.0, 1.0))):
        raise _bad(source, key, value, "a number in [0, 1]" if closed else "a number in (0, 1)")
    return x


def _divisions(source: str, value: Any) -> tuple[int, ...]:
    """``parseRoundUpPower2Divisions``: a power of two for every interval, or ``[MiB:div,...,>:div]``."""
    key, accepted = "roundup_power2_divisions", "a power of two, or a list such as [256:4,>:1]"
    if isinstance(value, str):
        d = _integer(source, key, value, 1, accepted)
        if d & (d - 1):
            raise _bad(source, key, value, accepted)
        return (d,) * _INTERVALS
    items = [t for t in value if t != ","]
    if len(items) % 3 or any(items[j + 1] != ":" for j in range(0, len(items), 3)):
        raise _bad(source, key, value, accepted)
    out, last, first = [0] * _INTERVALS, 0, True
    for bound, _, div in (items[j:j + 3] for j in range(0, len(items), 3)):
        d = _integer(source, key, div, 0, "divisions that are 0 or powers of two")
        if d & (d - 1):
            raise _bad(source, key, value, "divisions that are 0 or powers of two")
        if bound == ">":
            out[last + 1:] = [d] * (_INTERVALS - last - 1)
            continue
        mb = _integer(source, key, bound, 1, "interval bounds in MiB that are powers of two")
        if mb & (mb - 1):
            raise _bad(source, key, value, "interval bounds in MiB that are powers of two")
        last = min(mb.bit_length() - 1, _INTERVALS - 1)
        if first:  # the first bound also sets every interval below it
            out[:last], first = [d] * last, False
        out[last] = d
    return tuple(out)
