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
them, never a guess; an unknown name gets the closest catalog names (:func:`close_gpus`).

Each entry also carries the card's compute capability (NVIDIA's table,
https://developer.nvidia.com/cuda-gpus), which says whether it runs bfloat16 (:attr:`GpuSpec.bf16`).
The size on the box (:attr:`GpuSpec.nominal_gb`) is the vendor's datasheet's, cited beside each entry.
"""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

from memguard.errors import ConfigError, did_you_mean

__all__ = ["GPU_CATALOG", "GpuSpec", "bf16_problem", "close_gpus", "list_gpus", "lookup_gpu", "matching_gpus"]

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
        compute_capability: NVIDIA's ``(major, minor)`` (``torch.cuda.get_device_capability()``), or
            ``None`` for AMD.
    """

    name: str
    vendor: str
    total_bytes: int
    nominal_gb: int
    product_names: tuple[str, ...]
    source: str
    compute_capability: tuple[int, int] | None = None

    @property
    def model(self) -> str:
        """The model token (``"a100"``, ``"3090"``), lower case."""
        return _model_of(self.name)

    @property
    def bf16(self) -> bool:
        """Whether the card computes in bfloat16: compute capability 8.0 (Ampere) or newer, or AMD.

        The rule of ``torch.cuda.is_bf16_supported(including_emulation=False)``
        (``torch/cuda/__init__.py``: ROCm always, CUDA when ``major >= 8``). On older cards (T4:
        7.5, V100: 7.0) torch only emulates bf16, slowly, and SDPA's flash and memory-efficient
        kernels refuse it (``sdp_utils.cpp``: bf16 needs sm80), so attention falls back to the math
        kernel and its S x S scores.
        """
        return self.compute_capability is None or self.compute_capability >= (8, 0)


def _nvidia_smi(mib: int, seen: str) -> str:
    return f"nvidia-smi total {mib} MiB ({seen})"


_SPECS = (
    # Datasheets (the size on the box) and compute capabilities (https://developer.nvidia.com/cuda-gpus):
    # T4: "16 GB GDDR6", sm 7.5 (Turing), https://www.nvidia.com/en-us/data-center/tesla-t4/
    GpuSpec("T4", "NVIDIA", 15360 * _MIB, 16, ("Tesla T4",),
            _nvidia_smi(15360, "R520+ drivers; older drivers print 15109 MiB"), (7, 5)),
    # V100: "16 GB / 32 GB HBM2", sm 7.0 (Volta), https://www.nvidia.com/en-us/data-center/v100/
    GpuSpec("V100-16GB", "NVIDIA", 16384 * _MIB, 16,
            ("Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB"),
            _nvidia_smi(16384, "R520+ drivers; older drivers print 16160 MiB"), (7, 0)),
    GpuSpec("V100-32GB", "NVIDIA", 32768 * _MIB, 32,
            ("Tesla V100-SXM2-32GB", "Tesla V100-PCIE-32GB"),
            _nvidia_smi(32768, "R520+ drivers; older drivers print 32510 MiB"), (7, 0)),
    # A10: "24 GB GDDR6", sm 8.6, https://www.nvidia.com/en-us/data-center/products/a10-gpu/
    GpuSpec("A10", "NVIDIA", 23028 * _MIB, 24, ("NVIDIA A10",),
            _nvidia_smi(23028, "NVML total 24146608128 B, driver 535, mayooot/detect-gpu#3"), (8, 6)),
    # A10G: AWS's A10 variant, "24 GB" per GPU, sm 8.6, https://aws.amazon.com/ec2/instance-types/g5/
    GpuSpec("A10G", "NVIDIA", 23028 * _MIB, 24, ("NVIDIA A10G",),
            _nvidia_smi(23028, "AWS g5 instances"), (8, 6)),
    # L4: "24 GB GDDR6", sm 8.9 (Ada), https://www.nvidia.com/en-us/data-center/l4/
    GpuSpec("L4", "NVIDIA", 23034 * _MIB, 24, ("NVIDIA L4",),
            _nvidia_smi(23034, "GCP g2 instances"), (8, 9)),
    # RTX 3090: "24 GB GDDR6X", sm 8.6,
    # https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3090-3090ti/
    GpuSpec("RTX-3090", "NVIDIA", 24576 * _MIB, 24, ("NVIDIA GeForce RTX 3090",),
            _nvidia_smi(24576, "GeForce RTX 3090"), (8, 6)),
    # RTX 4090: "24 GB GDDR6X", sm 8.9, https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/
    GpuSpec("RTX-4090", "NVIDIA", 24564 * _MIB, 24, ("NVIDIA GeForce RTX 4090",),
            _nvidia_smi(24564, "GeForce RTX 4090"), (8, 9)),
    # RTX 5090: "32 GB GDDR7", sm 12.0 (Blackwell), https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/
    GpuSpec("RTX-5090", "NVIDIA", 32607 * _MIB, 32, ("NVIDIA GeForce RTX 5090",),
            _nvidia_smi(32607, "GeForce RTX 5090, drivers 570+"), (12, 0)),
    # RTX A6000: "48 GB GDDR6 with ECC", sm 8.6, https://www.nvidia.com/en-us/design-visualization/rtx-a6000/
    GpuSpec("RTX-A6000", "NVIDIA", 49140 * _MIB, 48, ("NVIDIA RTX A6000",),
            _nvidia_smi(49140, "R520+ drivers; older drivers print 48685 MiB"), (8, 6)),
    # A100: "40 GB HBM2 / 80 GB HBM2e", sm 8.0, https://www.nvidia.com/en-us/data-center/a100/
    GpuSpec("A100-40GB", "NVIDIA", 40960 * _MIB, 40,
            ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
            _nvidia_smi(40960, "R520+ drivers; older drivers print 40536 MiB"), (8, 0)),
    GpuSpec("A100-80GB", "NVIDIA", 81920 * _MIB, 80,
            ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
            _nvidia_smi(81920, "SXM4 and PCIe"), (8, 0)),
    # L40: "48 GB GDDR6 with ECC", sm 8.9, https://www.nvidia.com/en-us/data-center/l40/
    GpuSpec("L40", "NVIDIA", 46068 * _MIB, 48, ("NVIDIA L40",),
            _nvidia_smi(46068, "L40, drivers 550+"), (8, 9)),
    # L40S: "48 GB GDDR6 with ECC", sm 8.9, https://www.nvidia.com/en-us/data-center/l40s/
    GpuSpec("L40S", "NVIDIA", 46068 * _MIB, 48, ("NVIDIA L40S",),
            _nvidia_smi(46068, "L40S"), (8, 9)),
    # H100 SXM: "80 GB HBM3", sm 9.0 (Hopper), https://www.nvidia.com/en-us/data-center/h100/
    GpuSpec("H100-80GB", "NVIDIA", 81559 * _MIB, 80,
            ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"),
            _nvidia_smi(81559, "H100 SXM5 80GB HBM3"), (9, 0)),
    # H200 (SXM and NVL): "141 GB HBM3e", sm 9.0, https://www.nvidia.com/en-us/data-center/h200/
    GpuSpec("H200", "NVIDIA", 143771 * _MIB, 141, ("NVIDIA H200", "NVIDIA H200 NVL"),
            _nvidia_smi(143771, "H200 SXM 141GB and H200 NVL"), (9, 0)),
    # B200: 180 GB HBM3e per GPU ("1,440 GB total GPU memory" for 8, DGX B200 datasheet), sm 10.0,
    # https://www.nvidia.com/en-us/data-center/dgx-b200/
    GpuSpec("B200", "NVIDIA", 183359 * _MIB, 180, ("NVIDIA B200",),
            _nvidia_smi(183359, "B200 in DGX/HGX B200, drivers 570+"), (10, 0)),
    # MI300X: "192 GB HBM3", https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html
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
    raise ConfigError(f"unknown GPU {name!r}.{did_you_mean(close_gpus(name))} The catalog knows: "
                      f"{', '.join(GPU_CATALOG)}")


def close_gpus(name: str, limit: int = 3) -> list[str]:
    """Catalog names a mistyped or unknown GPU name may mean (``a6000`` -> RTX-A6000, ``H100-94GB`` ->
    H100-80GB), best first; ``[]`` when none is close. The names are compared as :func:`lookup_gpu`
    reads them (vendor and form-factor words dropped) by :class:`difflib.SequenceMatcher`'s ratio: at
    least 0.6, and within 0.1 of the closest."""
    import difflib

    if not isinstance(name, str):
        return []
    key = "".join(_tokens(name))
    if not key:
        return []
    keys: dict[str, str] = {}
    for spec in _SPECS:
        for text in (spec.name, *spec.product_names, f"{spec.model}{spec.nominal_gb}gb"):
            keys.setdefault("".join(_tokens(text)), spec.name)
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in keys), reverse=True)
    found: list[str] = []
    for ratio, match in scored:
        # close enough, and nearly as close as the best: 'a100-40' is A100-40GB, not also RTX-A6000
        if ratio >= 0.6 and ratio >= scored[0][0] - 0.1 and keys[match] not in found:
            found.append(keys[match])
    return found[:limit]


def bf16_problem(gpu_name: str, precision: str | None) -> str | None:
    """Why ``precision`` cannot run as asked on the catalog GPU ``gpu_name``, or ``None``.

    A bfloat16 precision (``bf16-mixed``, ``bf16-true``, ``bf16``) on a card without bf16
    (:attr:`GpuSpec.bf16`: T4, V100) is the one case: torch would emulate it, slowly, and without the
    fused attention kernels memguard's CUDA estimate assumes. A name the catalog does not know (a
    size, a budget) has no problem.
    """
    if not precision or not str(precision).lower().startswith("bf16"):
        return None
    matches = matching_gpus(gpu_name) if isinstance(gpu_name, str) else []
    if len(matches) != 1 or matches[0].bf16:
        return None
    spec = matches[0]
    major, minor = spec.compute_capability or (0, 0)
    return (f"{spec.name} has no bfloat16 support (compute capability {major}.{minor}; bf16 needs 8.0, Ampere "
            f"or newer): torch only emulates it there, slowly, and without the fused attention kernels this "
            f"estimate assumes. Use --precision 16-mixed (fp16 with a gradient scaler) or 32-true on a {spec.name}")


def matching_gpus(name: str) -> list[GpuSpec]:
    """Every catalog entry that ``name`` fits (none, one, or several when it is ambiguous)."""
    if not isinstance(name, str):
        return []
    tokens = _tokens(name)
    exact = [s for s in _SPECS if any(_tokens(p) == tokens for p in s.product_names)]
    if exact:  # a product name as the card reports it ("NVIDIA H200 NVL")
        return exact
    sizes = [int(m.group(1)) for t in tokens if (m := _MEMORY.match(t))]
    rest = [t for t in tokens if not _MEMORY.match(t)]
    if len(rest) != 1 or len(sizes) > 1:
        return []
    return [s for s in _SPECS
            if s.model == rest[0] and (not sizes or sizes[0] == s.nominal_gb)]
