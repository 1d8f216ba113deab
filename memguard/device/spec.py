"""One grammar for a device: every form a user writes becomes one :class:`DeviceSpec`, read in one place.

``--gpu`` (the ``memguard`` command), ``--memguard-gpu`` (the pytest plugin), the callbacks' ``budget=``,
``plan(gpu=)``, ``remedies(free_bytes=)``, ``MemoryEstimate.fits(...)`` and :func:`memguard.device_memory`
all parse what they are given with :meth:`DeviceSpec.parse`; only :meth:`DeviceSpec.read` asks a device
for its memory, through injectable :class:`~memguard.device.readers.Readers` (as httpx turns every form
of a timeout into one ``Timeout``).

=========================================  ==================================  ============================
What you write                             What it is                          :attr:`DeviceMemory.source`
=========================================  ==================================  ============================
``None`` (``device_memory()``)            the training device (see below)     ``nvml``/``torch``/``host``
``"auto"``, ``"cuda"``                     the current CUDA device             ``nvml`` (``torch``)
``"cuda:1"``, ``"1"``, ``torch.device``    CUDA device 1; bare digits are an   ``nvml`` (``torch``)
                                           index, never a size
``"cpu"``                                  host memory, capped by the cgroup   ``host``
``"A100-80GB"``, ``"T4"``, ``"RTX 4090"``  a catalog GPU, empty: free = total  ``catalog``
``"24GiB"``, ``"512MiB"``, ``"4096B"``     a budget: binary units (2^30)       ``budget``
``"24GB"``, ``"1.5 TB"``                   a budget: decimal units (10^9, SI)  ``budget``
``25769803776`` (an ``int``, Python)       a budget in bytes                   ``budget``
``"80%"``                                  80% of the training device's total  ``budget``
``"80% of cuda:1"``, ``"50% of cpu"``      a share of the device named         ``budget``
=========================================  ==================================  ============================

**The training device** (what ``None`` and a bare ``"80%"`` refer to) is the device the run trains on
where the caller knows it: the run's device for the callbacks' ``budget=``, the estimate's ``device``
for ``est.fits("80%")`` and ``remedies``, a CUDA device for ``--gpu``, ``--memguard-gpu`` and
``plan(gpu=)`` (they name a GPU). Elsewhere (:func:`memguard.device_memory`) it is the current CUDA
device when this process sees a GPU, else the host, and never the host in place of a GPU that NVML
cannot read.

**Decimal or binary.** ``"24GB"`` is 24 x 10^9 bytes, 22.35 GiB (IEC 80000-13, and what
``accelerate``'s ``max_memory`` means), while a card sold as "24 GB" has 22.5-24 GiB as
``nvidia-smi`` counts it (the catalog: A10 22.49 GiB, RTX-4090 23.99 GiB). Write ``"24GiB"`` for
24 x 2^30 bytes, or name the card. :attr:`DeviceSpec.note` says so, and ``memguard check`` prints it.

**An int is bytes**, as in ``est.fits(free)``; a CUDA index is written ``"cuda:1"``, ``"1"`` or
``torch.device("cuda", 1)``. (:func:`memguard.device_memory` still reads an ``int`` as an index,
with a ``FutureWarning``.)
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import TYPE_CHECKING, Union

from memguard.device.catalog import GPU_CATALOG, GpuSpec, close_gpus, list_gpus, lookup_gpu, matching_gpus
from memguard.device.memory import DeviceMemory, MemorySource
from memguard.device.readers import Readers, read_cuda, read_host, read_training_device
from memguard.enums import StrEnum
from memguard.errors import ConfigError, DeviceError, did_you_mean
from memguard.units import decimal_reading, format_bytes, parse_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["FORMS", "DeviceLike", "DeviceSpec", "SpecKind", "memory_of"]

DeviceLike = Union[str, int, float, "torch.device", "DeviceSpec"]
"""What :meth:`DeviceSpec.parse` accepts."""

FORMS = ("auto, a CUDA index (0, cuda:1), a catalog name such as A100-40GB, a size such as 24GiB (binary) "
         "or 24GB (decimal), a share such as 80% (or '80% of cuda:1'), or cpu (host memory)")
"""The accepted forms, as every error of the grammar lists them."""

_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?$")
"""A number without a unit: not a size here (a size needs its unit) and, unless all digits, no index."""
_CUDA = re.compile(r"^cuda(?::(\d+))?$")
_SHARE = re.compile(r"^(?P<pct>[^%]*%)(?:\s+of\s+(?P<of>.+))?$", re.I)


class SpecKind(StrEnum):
    """What a :class:`DeviceSpec` stands for."""

    TRAINING = "training"
    """The training device (``None``): see the module docs."""
    CUDA = "cuda"
    """A CUDA device, read now; :attr:`DeviceSpec.index` ``None`` is the current one."""
    HOST = "cpu"
    """Host memory, capped by the memory cgroup."""
    CATALOG = "catalog"
    """A catalog GPU, assumed empty."""
    BUDGET = "budget"
    """A number of bytes."""
    SHARE = "share"
    """A share of a device's total memory."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """A device or a memory budget, as one value: what every form of the grammar becomes.

    Build it with :meth:`parse` (any form in the module's table) or a constructor
    (:meth:`cuda`, :meth:`host`, :meth:`catalog`, :meth:`budget`, :meth:`share_of`); read the
    device's memory with :meth:`read`. Parsing reads no device.

    Attributes:
        kind: what it stands for (:class:`SpecKind`).
        index: the CUDA ordinal (``CUDA``; ``None``: the current device).
        gpu: the catalog name (``CATALOG``).
        nbytes: the budget in bytes (``BUDGET``).
        share: the share in ``(0, 1]`` (``SHARE``).
        of: the device a share is of (``SHARE``; ``None``: the training device).
        text: what the user wrote, for messages (not compared).
    """

    kind: SpecKind
    index: int | None = None
    gpu: str | None = None
    nbytes: int | None = None
    share: float | None = None
    of: DeviceSpec | None = None
    text: str | None = dataclasses.field(default=None, compare=False)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def training(cls) -> DeviceSpec:
        """The training device (what ``device_memory()`` reads): see the module docs."""
        return cls(SpecKind.TRAINING)

    @classmethod
    def cuda(cls, index: int | None = None) -> DeviceSpec:
        """CUDA device ``index`` as this process numbers it; ``None`` is the current device."""
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise ConfigError(f"a CUDA device index must be an int >= 0, got {index!r}")
        return cls(SpecKind.CUDA, index=index)

    @classmethod
    def host(cls) -> DeviceSpec:
        """Host memory, capped by the container's memory cgroup."""
        return cls(SpecKind.HOST)

    @classmethod
    def catalog(cls, name: str) -> DeviceSpec:
        """A catalog GPU by a forgiving name (:func:`~memguard.device.catalog.lookup_gpu`)."""
        return cls(SpecKind.CATALOG, gpu=lookup_gpu(name).name, text=name)

    @classmethod
    def budget(cls, nbytes: int | float) -> DeviceSpec:
        """A budget of ``nbytes`` bytes (a ``float`` is rounded down)."""
        return cls(SpecKind.BUDGET, nbytes=parse_bytes(nbytes))

    @classmethod
    def share_of(cls, share: float, of: DeviceLike | None = None) -> DeviceSpec:
        """``share`` (in ``(0, 1]``) of ``of``'s total memory; ``of=None`` is the training device."""
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"a share of a device must be in (0, 1], got {share!r}; e.g. 0.8 for 80%")
        base = None if of is None else cls.parse(of)
        if base is not None and base.kind in (SpecKind.SHARE, SpecKind.BUDGET):
            raise ConfigError(f"a share is of a device, not of {base.text or base}; name a device such as "
                              "'cuda:0', 'cpu' or 'A100-80GB'")
        return cls(SpecKind.SHARE, share=float(share), of=base)

    @classmethod
    def parse(cls, value: DeviceLike) -> DeviceSpec:
        """Any form of the module's table as one :class:`DeviceSpec`; reads no device.

        Raises:
            ConfigError: naming the value and listing :data:`FORMS`: an unknown or ambiguous GPU
                name, a size that cannot be read or is zero, a number without a unit, ``cuda:x``.
        """
        if isinstance(value, DeviceSpec):
            return value
        if isinstance(value, bool) or value is None:
            raise ConfigError(f"cannot read {value!r} as a device; expected {FORMS}")
        if isinstance(value, (int, float)):
            return cls(SpecKind.BUDGET, nbytes=parse_bytes(value))
        if isinstance(value, str):
            return _parse_text(value)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.device):
            if value.type == "cpu":
                return cls.host()
            if value.type == "cuda":
                return cls.cuda(value.index)
            raise ConfigError(f"memguard reads the memory of 'cuda' and 'cpu' devices, not {value!r}")
        raise ConfigError(f"cannot read {value!r} as a device; expected {FORMS}")

    # -- what it is -----------------------------------------------------------------------------

    @property
    def reads_a_device(self) -> bool:
        """Whether :meth:`read` asks a live device (NVML, torch, the host), not the catalog or a number."""
        if self.kind is SpecKind.SHARE:
            return self.of is None or self.of.reads_a_device
        return self.kind in (SpecKind.TRAINING, SpecKind.CUDA, SpecKind.HOST)

    @property
    def note(self) -> str | None:
        """How a size in decimal units (``"24GB"``) is read, and the catalog cards sold at that size; else ``None``.

        Two lines for ``"24GB"``: ``24GB is read as 24,000,000,000 bytes (SI: 1 GB = 10^9 bytes), 22.35 GiB;
        write 24GiB for 24 x 2^30 bytes (binary, as nvidia-smi counts);`` and ``a card sold as 24 GB has
        22.49-24.00 GiB as nvidia-smi counts (A10, A10G, L4, RTX-3090, RTX-4090): name the card instead``.
        """
        if self.kind is not SpecKind.BUDGET or self.text is None:
            return None
        reading = decimal_reading(self.text)
        if reading is None:
            return None
        sold = _sold_as(self.text)
        if not sold:
            return reading
        low, high = format_bytes(min(s.total_bytes for s in sold)), format_bytes(max(s.total_bytes for s in sold))
        span = low if low == high else f"{low.split()[0]}-{high}"
        return (f"{reading};\na card sold as {sold[0].nominal_gb} GB has {span} as nvidia-smi counts "
                f"({', '.join(s.name for s in sold)}): name the card instead")

    def __str__(self) -> str:
        if self.text is not None:
            return self.text.strip()
        if self.kind is SpecKind.CUDA:
            return "cuda" if self.index is None else f"cuda:{self.index}"
        if self.kind is SpecKind.SHARE:
            share = f"{self.share * 100:g}%"
            return share if self.of is None else f"{share} of {self.of}"
        return {SpecKind.TRAINING: "the training device", SpecKind.HOST: "cpu",
                SpecKind.CATALOG: str(self.gpu), SpecKind.BUDGET: f"{self.nbytes}B"}[self.kind]

    # -- reading --------------------------------------------------------------------------------

    def read(self, readers: Readers | None = None, *, training: DeviceLike | None = None) -> DeviceMemory:
        """The memory this spec stands for.

        Args:
            readers: where live memory is read from (default: this machine).
            training: the training device, for :attr:`SpecKind.TRAINING` and a bare share
                (``None``: the current CUDA device when this process sees a GPU, else the host).

        Raises:
            ConfigError: a budget or share of no memory at all.
            DeviceError: a live device cannot be read; the message says what NVML and torch reported.
        """
        if self.kind is SpecKind.TRAINING:
            base = None if training is None else DeviceSpec.parse(training)
            return read_training_device(readers) if base is None or base.kind is SpecKind.TRAINING \
                else base.read(readers)
        if self.kind is SpecKind.CUDA:
            try:
                return read_cuda(self.index, readers)
            except DeviceError as exc:
                if self.text is not None and self.text.strip().isdigit():
                    raise _read_as_an_index(self.text.strip(), exc) from None
                raise
        if self.kind is SpecKind.HOST:
            return read_host(readers)
        if self.kind is SpecKind.CATALOG:
            spec = GPU_CATALOG[str(self.gpu)]
            return DeviceMemory(name=spec.name, index=None, uuid=None, total_bytes=spec.total_bytes,
                                free_bytes=spec.total_bytes, used_bytes=0, source=MemorySource.CATALOG)
        if self.kind is SpecKind.BUDGET:
            n = int(self.nbytes or 0)
            if n <= 0:
                raise ConfigError(f"budget {self.text if self.text is not None else n!r} is no memory at all; "
                                  "give a positive size such as '12GiB'")
            return DeviceMemory(name=f"budget of {format_bytes(n)}", index=None, uuid=None,
                                total_bytes=n, free_bytes=n, used_bytes=0, source=MemorySource.BUDGET)
        return self._read_share(readers, training)

    def free_bytes(self, readers: Readers | None = None, *, training: DeviceLike | None = None) -> int:
        """What :meth:`read` says is free; a budget of 0 bytes is 0 (a full device), not an error."""
        if self.kind is SpecKind.BUDGET:
            return int(self.nbytes or 0)
        return self.read(readers, training=training).free_bytes

    def _read_share(self, readers: Readers | None, training: DeviceLike | None) -> DeviceMemory:
        base = (self.of or DeviceSpec.training()).read(readers, training=training)
        share = float(self.share or 0)
        n = int(base.total_bytes * share)
        pct = self.text.strip().split("%")[0].strip() + "%" if self.text else f"{share * 100:g}%"
        if n <= 0:
            raise ConfigError(f"budget {pct!r} of {base.name} ({format_bytes(base.total_bytes)}) is less "
                              "than one byte; give a larger share")
        return DeviceMemory(name=f"{pct} of {base.name}", index=base.index, uuid=base.uuid,
                            total_bytes=n, free_bytes=n, used_bytes=0, source=MemorySource.BUDGET)


def memory_of(value: DeviceMemory | DeviceLike, readers: Readers | None = None, *,
              training: DeviceLike | None = None) -> DeviceMemory:
    """A :class:`DeviceMemory` as it is, anything else parsed and read: the entry points' one call."""
    if isinstance(value, DeviceMemory):
        return value
    return DeviceSpec.parse(value).read(readers, training=training)


# -- the text forms -----------------------------------------------------------------------------


def _parse_text(text: str) -> DeviceSpec:
    value = text.strip()
    low = value.lower()
    if not value:
        raise ConfigError(f"cannot read {text!r} as a device; expected {FORMS}")
    if low in ("auto", "cuda"):
        return DeviceSpec(SpecKind.CUDA, text=text)
    if value.isdigit():
        return DeviceSpec(SpecKind.CUDA, index=int(value), text=text)
    cuda = _CUDA.match(low)
    if cuda:
        return DeviceSpec(SpecKind.CUDA, index=int(cuda.group(1)) if cuda.group(1) else None, text=text)
    if low.startswith("cuda"):
        raise ConfigError(f"cannot read {text!r} as a CUDA device; expected 'cuda' or 'cuda:N'")
    if low == "cpu":
        return DeviceSpec(SpecKind.HOST, text=text)
    share = _SHARE.match(value)
    if share:
        return _parse_share(text, share.group("pct"), share.group("of"))
    matches = matching_gpus(value)
    if len(matches) > 1:
        lookup_gpu(value)  # raises the catalog's "ambiguous" error, which lists the matches
    if matches:
        return DeviceSpec(SpecKind.CATALOG, gpu=matches[0].name, text=text)
    if _NUMBER.match(value):
        raise ConfigError(f"{value!r} is a number without a unit: a memory size needs one ('{value}B', "
                          "'24GiB'), and bare digits are a CUDA index")
    if value[:1].isdigit() or value.startswith("."):
        n = parse_bytes(value)
        if n <= 0:
            raise ConfigError(f"budget {value!r} is no memory at all; give a positive size such as '12GiB'")
        return DeviceSpec(SpecKind.BUDGET, nbytes=n, text=text)
    raise ConfigError(f"unknown GPU {value!r}.{did_you_mean(close_gpus(value))} Expected {FORMS}. GPU names the "
                      f"catalog knows: {', '.join(list_gpus())}")


def _parse_share(text: str, pct: str, of: str | None) -> DeviceSpec:
    parse_bytes(pct, total=1)  # checks the form and the 0%-100% range
    share = float(pct.strip()[:-1]) / 100
    if share <= 0 or not math.isfinite(share):
        raise ConfigError(f"budget {pct.strip()!r} is no memory at all; give a share above 0%, such as '80%'")
    spec = DeviceSpec.share_of(share, None if of is None else _parse_text(of))
    return dataclasses.replace(spec, text=text)


def _sold_as(text: str) -> list[GpuSpec]:
    """The catalog cards whose box says the size ``text`` writes in GB (``"24GB"``: A10 ... RTX-4090)."""
    match = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*GB?\s*$", text, re.I)
    if not match or not text.strip().upper().endswith("GB"):
        return []
    return [s for s in GPU_CATALOG.values() if float(match.group(1)) == s.nominal_gb]


def _read_as_an_index(value: str, exc: DeviceError) -> DeviceError:
    """The error of an unreadable CUDA index written as bare digits: it says they were read as an index."""
    size = f"{value}MiB" if len(value) > 2 else "24GiB"
    named = matching_gpus(value)  # "4090": the catalog's RTX-4090
    card = f" (for the catalog GPU write '{named[0].name}')" if len(named) == 1 else ""
    return DeviceError(f"{value!r} is read as the CUDA index cuda:{int(value)}, since bare digits are an "
                       f"index and a size needs its unit, such as '{size}'{card}; {exc}")


