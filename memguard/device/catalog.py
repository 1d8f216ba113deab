"""A catalog of GPUs, for planning a run on a machine that does not have the GPU.

Each entry's memory is the total that the vendor's tool reports for the card, in bytes: for
NVIDIA, ``nvidia-smi``'s "Total" in MiB with R520+ drivers; for AMD, ``rocm-smi``'s
"VRAM Total Memory". That is what NVML reports as ``total`` on the real card, so an estimate checked
against the catalog is checked against the same number :func:`memguard.device_memory` would read
there. It is an upper bound of what a training process can use: the driver keeps a few hundred
MiB of it (``nvidia-smi -q`` shows it as "Reserved"; older drivers subtracted it from the total,
e.g. 15109 MiB for a T4, 40536 MiB for an A100 40GB, 16160 and 32510 MiB for the V100s), and the
CUDA context takes another 300-500 MB once the process starts.

Names are looked up forgivingly (:func:`lookup_gpu`): case, spaces, dashes and underscores do not
matter, vendor and form-factor words (``NVIDIA``, ``Tesla``, ``GeForce``, ``SXM4``, ``PCIe``,
``HBM3`` ...) are ignored, so ``"a100-80gb"``, ``"A100 80GB"``, ``"NVIDIA A100-SXM4-80GB"`` all find
the same entry. A name that fits several entries (``"A100"``: 40 or 80 GB) is an error that lists
them, never a guess.
"""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

from memguard.errors import ConfigError

__all__ = ["GPU_CATALOG", "GpuSpec", "list_gpus", "lookup_gpu", "matching_gpus"]

_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU model and its memory.

    Attributes:
        name: the catalog name, e.g. ``"A100-80GB"``.
        vendor: ``"NVIDIA"`` or ``"AMD"``.
        total_bytes: memory as the vendor's tool reports it on the card (see the module docs).
        nominal_gb: the size printed on the box, in GB as vendors write it.
        product_names: names the card reports (``nvidia-smi``, NVML, ``rocm-smi``).
        source: where :attr:`total_bytes` comes from.
    """

    name: str
    vendor: str
    total_bytes: int
    nominal_gb: int
    product_names: tuple[str, ...]
    source: str

    @property
    def model(self) -> str:
        """The model token (``"a100"``, ``"3090"``), lower case."""
        return _model_of(self.name)


def _nvidia_smi(mib: int, seen: str) -> str:
    return f"nvidia-smi total {mib} MiB ({seen})"


_SPECS = (
    GpuSpec("T4", "NVIDIA", 15360 * _MIB, 16, ("Tesla T4",),
            _nvidia_smi(15360, "R520+ drivers; older drivers print 15109 MiB")),
    GpuSpec("V100-16GB", "NVIDIA", 16384 * _MIB, 16,
            ("Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB"),
            _nvidia_smi(16384, "R520+ drivers; older drivers print 16160 MiB")),
    GpuSpec("V100-32GB", "NVIDIA", 32768 * _MIB, 32,
            ("Tesla V100-SXM2-32GB", "Tesla V100-PCIE-32GB"),
            _nvidia_smi(32768, "R520+ drivers; older drivers print 32510 MiB")),
    GpuSpec("A10G", "NVIDIA", 23028 * _MIB, 24, ("NVIDIA A10G",),
            _nvidia_smi(23028, "AWS g5 instances")),
    GpuSpec("L4", "NVIDIA", 23034 * _MIB, 24, ("NVIDIA L4",),
            _nvidia_smi(23034, "GCP g2 instances")),
    GpuSpec("RTX-3090", "NVIDIA", 24576 * _MIB, 24, ("NVIDIA GeForce RTX 3090",),
            _nvidia_smi(24576, "GeForce RTX 3090")),
    GpuSpec("RTX-4090", "NVIDIA", 24564 * _MIB, 24, ("NVIDIA GeForce RTX 4090",),
            _nvidia_smi(24564, "GeForce RTX 4090")),
    GpuSpec("A100-40GB", "NVIDIA", 40960 * _MIB, 40,
            ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
            _nvidia_smi(40960, "R520+ drivers; older drivers print 40536 MiB")),
    GpuSpec("A100-80GB", "NVIDIA", 81920 * _MIB, 80,
            ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
            _nvidia_smi(81920, "SXM4 and PCIe")),
    GpuSpec("L40S", "NVIDIA", 46068 * _MIB, 48, ("NVIDIA L40S",),
            _nvidia_smi(46068, "L40S")),
    GpuSpec("H100-80GB", "NVIDIA", 81559 * _MIB, 80,
            ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"),
            _nvidia_smi(81559, "H100 SXM5 80GB HBM3")),
    GpuSpec("H200", "NVIDIA", 143771 * _MIB, 141, ("NVIDIA H200",),
            _nvidia_smi(143771, "H200 SXM 141GB")),
    GpuSpec("MI300X", "AMD", 206141652992, 192, ("AMD Instinct MI300X",),
            "rocm-smi 'VRAM Total Memory (B)': 206141652992, i.e. 192 GiB less 16 MiB "
            "(ROCm/legacy-rocm-build#4750)"),
)

GPU_CATALOG: MappingProxyType[str, GpuSpec] = MappingProxyType({s.name: s for s in _SPECS})
"""Every catalog entry by its catalog name (read-only)."""

# Vendor, brand and form-factor words that do not change the memory of a card.
_NOISE = frozenset({
    "nvidia", "tesla", "geforce", "rtx", "amd", "instinct", "gpu",
    "sxm", "sxm2", "sxm4", "sxm5", "pcie", "hbm2", "hbm2e", "hbm3", "hbm3e",
})
_MEMORY = re.compile(r"^(\d+)g(?:b)?$")


def _tokens(name: str) -> list[str]:
    words = re.split(r"[^a-z0-9]+", name.lower())
    out = []
    for w in words:
        if w.startswith("rtx") and w[3:].isdigit():
            w = w[3:]  # "rtx3090" -> "3090"
        if w and w not in _NOISE:
            out.append(w)
    return out


def _model_of(catalog_name: str) -> str:
    return next(t for t in _tokens(catalog_name) if not _MEMORY.match(t))


def list_gpus() -> list[str]:
    """The catalog names, e.g. ``["T4", "V100-16GB", ..., "MI300X"]``."""
    return list(GPU_CATALOG)


def lookup_gpu(name: str) -> GpuSpec:
    """Find a GPU in the catalog by a forgiving name.

    ``"a100-80gb"``, ``"A100 80GB"``, ``"NVIDIA A100-SXM4-80GB"``, ``"h100"``, ``"RTX 4090"``,
    ``"4090"`` and ``"Tesla T4"`` all work. A memory size in the name (``80GB``, ``80G``) must match
    the card's nominal size.

    Args:
        name: a catalog name, a product name as ``nvidia-smi`` prints it, or a short form.

    Returns:
        The :class:`GpuSpec`.

    Raises:
        ConfigError: when no entry matches (listing the catalog), or several do (listing them).
    """
    matches = matching_gpus(name)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(
            f"GPU name {name!r} is ambiguous: it fits "
            + ", ".join(f"{s.name} ({s.nominal_gb} GB)" for s in matches)
            + "; add the memory size, e.g. " + repr(matches[-1].name)
        )
    raise ConfigError(f"unknown GPU {name!r}; the catalog knows: {', '.join(GPU_CATALOG)}")


def matching_gpus(name: str) -> list[GpuSpec]:
    """Every catalog entry that ``name`` fits (none, one, or several when it is ambiguous)."""
    if not isinstance(name, str):
        return []
    tokens = _tokens(name)
    sizes = [int(m.group(1)) for t in tokens if (m := _MEMORY.match(t))]
    rest = [t for t in tokens if not _MEMORY.match(t)]
    if len(rest) != 1 or len(sizes) > 1:
        return []
    return [s for s in _SPECS
            if s.model == rest[0] and (not sizes or sizes[0] == s.nominal_gb)]
