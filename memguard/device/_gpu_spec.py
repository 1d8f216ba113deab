"""The one reader of a GPU spec, as a user writes it: ``auto``, ``0``, ``cuda:1``, ``A100-40GB``, ``24GiB``, ``80%``.

The ``memguard`` command (``--gpu``) and the pytest plugin (``--memguard-gpu``) both take it, so
``0`` is the same GPU in both. Re-exported as :func:`memguard.device.parse_gpu`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from memguard.device.catalog import close_gpus, list_gpus, matching_gpus
from memguard.errors import ConfigError, DeviceError, did_you_mean

if TYPE_CHECKING:
    from memguard.device import DeviceMemory

__all__ = ["parse_gpu"]

_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?$")
"""A number without a unit: not a size here (a size needs its unit) and, unless all digits, no index."""


def parse_gpu(text: str) -> DeviceMemory:
    """The GPU a training step must fit, from a spec.

    The forms, tried in this order (case and surrounding spaces do not matter):

    - ``"auto"``: this machine's current CUDA device, read now (``device_memory("cuda")``).
    - bare digits, ``"0"``, ``"1"``: a **CUDA index**, ``cuda:N``. Never a size, which needs its
      unit (``"4096MiB"``, ``"4096B"``), and never a catalog name (``"4090"`` is ``cuda:4090``;
      write ``"RTX 4090"``).
    - ``"cuda"``, ``"cuda:N"``: the current or the N-th CUDA device.
    - a percentage, ``"80%"``: that share of the current CUDA device's total memory, as a budget
      (:func:`~memguard.device.resolve_budget`).
    - a catalog name, ``"A100-40GB"`` (:func:`~memguard.device.catalog.list_gpus`): assumed
      empty, free = total.
    - a size with its unit, ``"24GiB"`` (binary), ``"24GB"`` (decimal), ``".5GiB"``, ``"4096B"``:
      a budget, free = total.

    Args:
        text: the spec.

    Returns:
        The device's memory; ``source`` says which form it was (``"nvml"``/``"torch"`` for a CUDA
        device, ``"catalog"``, ``"budget"``).

    Raises:
        ConfigError: naming the spec: an unknown or ambiguous GPU name, a size that cannot be read
            or is zero, a number without a unit, ``cuda:x``.
        DeviceError: a CUDA device (``auto``, an index, ``cuda:N``, a percentage) cannot be read;
            for bare digits the message says they were read as an index.
    """
    from memguard import device  # the package, at call time: its device_memory can be replaced in tests

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"cannot read {text!r} as a GPU; expected {_FORMS}")
    value = text.strip()
    low = value.lower()
    if low == "auto":
        return device.device_memory("cuda")
    if value.isdigit():
        try:
            return device.device_memory(int(value))
        except DeviceError as exc:
            size = f"{value}MiB" if len(value) > 2 else "24GiB"
            named = matching_gpus(value)  # "4090": the catalog's RTX-4090
            card = f" (for the catalog GPU write '{named[0].name}')" if len(named) == 1 else ""
            raise DeviceError(f"{value!r} is read as the CUDA index cuda:{int(value)}, since bare digits are an "
                              f"index and a size needs its unit, such as '{size}'{card}; {exc}") from None
    if low.startswith("cuda"):
        return device.device_memory(low)
    if value.endswith("%"):
        return device.resolve_budget(value, "cuda")
    if matching_gpus(value):
        return device.device_memory(value)  # a catalog GPU; several matches raise "ambiguous"
    if _NUMBER.match(value):
        raise ConfigError(f"{value!r} is a number without a unit: a memory size needs one ('{value}B', "
                          "'24GiB'), and bare digits are a CUDA index")
    if value[:1].isdigit() or value.startswith("."):
        return device.resolve_budget(value)
    raise ConfigError(f"unknown GPU {value!r}.{did_you_mean(close_gpus(value))} Expected {_FORMS}. GPU names the "
                      f"catalog knows: {', '.join(list_gpus())}")


_FORMS = ("auto, a CUDA index (0, cuda:1), a catalog name such as A100-40GB, a size such as 24GiB or a share "
          "such as 80%")
