"""The device functions users already call, each a thin reader of the one grammar (:mod:`memguard.device.spec`)."""

from __future__ import annotations

import warnings

from memguard.device.memory import DeviceMemory
from memguard.device.readers import Readers
from memguard.device.spec import FORMS, DeviceLike, DeviceSpec, SpecKind
from memguard.errors import ConfigError

__all__ = ["device_memory", "parse_budget", "parse_gpu", "resolve_budget"]


def device_memory(device: DeviceLike | None = None, *, readers: Readers | None = None) -> DeviceMemory:
    """The memory of the device a training run will use, or of one it is planned for.

    >>> import memguard
    >>> memguard.device_memory("cpu").source  # a str enum: == "host"
    <MemorySource.HOST: 'host'>
    >>> memguard.device_memory("A100-80GB").total_bytes
    85899345920
    >>> memguard.device_memory("12GiB").free_bytes
    12884901888

    Args:
        device: any form of :mod:`memguard.device.spec`'s table (``None``: the training device, the
            current CUDA device when this process sees a GPU, else the host). An ``int`` is still read
            as a CUDA index here, with a ``FutureWarning``: everywhere else in memguard an ``int`` is
            bytes; write ``"cuda:N"`` or ``torch.device("cuda", N)``.
        readers: where live memory is read from (default: this machine).

    Raises:
        ConfigError: ``device`` is not one of the forms, or not a known GPU name.
        DeviceError: the device's memory cannot be read (e.g. ``"cuda"`` without a GPU); the
            message says what NVML and torch each reported.
    """
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ConfigError(f"a CUDA device index must be >= 0, got {device}")
        warnings.warn(f"device_memory({device}) reads the int as a CUDA index; everywhere else in memguard an int "
                      f"is a number of bytes. Write device_memory('cuda:{device}')", FutureWarning, stacklevel=2)
        return DeviceSpec.cuda(device).read(readers)
    return (DeviceSpec.training() if device is None else DeviceSpec.parse(device)).read(readers)


def parse_budget(value: int | float | str) -> int | float:
    """Check a memory budget without reading any device: what the callbacks' ``budget=`` accepts.

    Args:
        value: bytes (``int``, ``float`` rounded down), a size (``"12GiB"`` binary, ``"12GB"`` decimal), a
            catalog GPU (``"A100-80GB"``: its total) or a share of the run's device (``"80%"``).

    Returns:
        The budget in bytes (an ``int`` > 0), or the share of the device (a ``float`` in ``(0, 1]``):
        ``parse_budget("12GiB") == 12884901888``, ``parse_budget("80%") == 0.8``.

    Raises:
        ConfigError: naming the value, when it cannot be read (a bool, ``None``, a word), is zero
            (``0``, ``"0GB"``, ``"0%"``: nothing would fit), negative, infinite or larger than
            :data:`~memguard.units.MAX_BYTES`, a percentage above 100%, or a live device
            (``"cuda:1"``, ``"1"``, ``"cpu"``: bare digits are a CUDA index, a size needs its unit).
    """
    if value is None:
        raise ConfigError(f"cannot read None as a memory budget; expected a size such as '12GiB', bytes, or "
                          f"a share such as '80%' ({FORMS})")
    spec = DeviceSpec.parse(value)
    if spec.kind is SpecKind.BUDGET:
        if not spec.nbytes:
            raise ConfigError(f"budget {value!r} is no memory at all; give a positive size such as '12GiB'")
        return spec.nbytes
    if spec.kind is SpecKind.SHARE and spec.of is None:
        return float(spec.share or 0)
    if spec.kind is SpecKind.CATALOG:
        return spec.read().total_bytes
    digits = isinstance(value, str) and value.strip().isdigit()
    what = f"bare digits are the CUDA index cuda:{spec.index}" if digits else f"the device {spec}"
    raise ConfigError(f"budget {value!r} is not an amount of memory ({what}); expected bytes, a size with its "
                      "unit such as '12GiB', a catalog GPU such as 'A100-80GB' or a share such as '80%'")


def resolve_budget(value: int | float | str, device: DeviceLike | None = None, *,
                   readers: Readers | None = None) -> DeviceMemory:
    """A memory budget as a :class:`DeviceMemory` with ``source="budget"`` (or ``"catalog"``).

    Args:
        value: what :func:`parse_budget` takes; a share is of ``device``.
        device: the device a share refers to (any form of the grammar); ``None`` is the training
            device, the GPU when this process sees one, else the host (never the host in place of
            a GPU NVML cannot read).
        readers: where live memory is read from (default: this machine).

    Raises:
        ConfigError: naming the value and the accepted forms when it cannot be read or is zero.
        DeviceError: when the device of a share cannot be read.
    """
    parse_budget(value)  # a bad value fails before any device is read
    return DeviceSpec.parse(value).read(readers, training=device)


def parse_gpu(text: str, *, readers: Readers | None = None) -> DeviceMemory:
    """The GPU a training step must fit, as ``--gpu`` and ``--memguard-gpu`` read it.

    Any form of :mod:`memguard.device.spec`'s table; a bare share (``"80%"``) is of the current
    CUDA device.

    Raises:
        ConfigError: naming the spec (see :meth:`DeviceSpec.parse`).
        DeviceError: a live device cannot be read; for bare digits the message says they were read as
            an index.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"cannot read {text!r} as a GPU; expected {FORMS}")
    return DeviceSpec.parse(text).read(readers, training=DeviceSpec.cuda())
