"""Tests for memguard.device.catalog: the GPUs, their memory, and forgiving but unambiguous names."""

from __future__ import annotations

import pytest

from memguard.device import DeviceSpec, device_memory
from memguard.device.catalog import (
    GPU_CATALOG,
    GpuSpec,
    bf16_problem,
    close_gpus,
    list_gpus,
    lookup_gpu,
    matching_gpus,
)
from memguard.errors import ConfigError

MIB = 2**20

# nvidia-smi "Total" in MiB (R520+ drivers); rocm-smi bytes for the MI300X.
EXPECTED = {
    "T4": 15360 * MIB,
    "V100-16GB": 16384 * MIB,
    "V100-32GB": 32768 * MIB,
    "A10": 23028 * MIB,
    "A10G": 23028 * MIB,
    "L4": 23034 * MIB,
    "RTX-3090": 24576 * MIB,
    "RTX-4090": 24564 * MIB,
    "RTX-5090": 32607 * MIB,
    "RTX-A6000": 49140 * MIB,
    "A100-40GB": 40960 * MIB,
    "A100-80GB": 81920 * MIB,
    "L40": 46068 * MIB,
    "L40S": 46068 * MIB,
    "H100-80GB": 81559 * MIB,
    "H200": 143771 * MIB,
    "B200": 183359 * MIB,
    "MI300X": 206141652992,
}

# compute capability per card (https://developer.nvidia.com/cuda-gpus); None: AMD
CAPABILITY = {
    "T4": (7, 5), "V100-16GB": (7, 0), "V100-32GB": (7, 0), "A10": (8, 6), "A10G": (8, 6), "L4": (8, 9),
    "RTX-3090": (8, 6), "RTX-4090": (8, 9), "RTX-5090": (12, 0), "RTX-A6000": (8, 6), "A100-40GB": (8, 0),
    "A100-80GB": (8, 0), "L40": (8, 9), "L40S": (8, 9), "H100-80GB": (9, 0), "H200": (9, 0), "B200": (10, 0),
    "MI300X": None,
}


def test_catalog_has_every_required_gpu_with_its_memory():
    assert {name: spec.total_bytes for name, spec in GPU_CATALOG.items()} == EXPECTED
    assert list_gpus() == list(EXPECTED)


@pytest.mark.parametrize("spec", GPU_CATALOG.values(), ids=list(GPU_CATALOG))
def test_every_entry_is_consistent(spec: GpuSpec):
    assert lookup_gpu(spec.name) is spec
    for product in spec.product_names:
        assert lookup_gpu(product) is spec, product
    # the memory is a little below the size printed on the box (decimal GB)
    assert 0.9 * spec.nominal_gb * 10**9 < spec.total_bytes < 1.1 * spec.nominal_gb * 10**9
    assert spec.total_bytes % MIB == 0 or spec.vendor == "AMD"
    assert spec.source


@pytest.mark.parametrize(("name", "expected"), [
    ("a100-80gb", "A100-80GB"),
    ("A100 80GB", "A100-80GB"),
    ("A100_80G", "A100-80GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("A100-PCIE-40GB", "A100-40GB"),
    ("H100", "H100-80GB"),
    ("h100 sxm5 80gb", "H100-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("h200", "H200"),
    ("H200 141GB", "H200"),
    ("t4", "T4"),
    ("Tesla T4", "T4"),
    ("tesla v100-sxm2-32gb", "V100-32GB"),
    ("V100 16GB", "V100-16GB"),
    ("a10g", "A10G"),
    ("L4", "L4"),
    ("l40s", "L40S"),
    ("RTX 3090", "RTX-3090"),
    ("rtx3090", "RTX-3090"),
    ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ("4090", "RTX-4090"),
    ("mi300x", "MI300X"),
    ("AMD Instinct MI300X", "MI300X"),
    ("A10", "A10"),
    ("NVIDIA A10", "A10"),
    ("a6000", "RTX-A6000"),
    ("NVIDIA RTX A6000", "RTX-A6000"),
    ("RTX A6000 48GB", "RTX-A6000"),
    ("L40", "L40"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA H200 NVL", "H200"),
    ("b200", "B200"),
    ("NVIDIA B200", "B200"),
    ("RTX 5090", "RTX-5090"),
    ("NVIDIA GeForce RTX 5090", "RTX-5090"),
    ("5090", "RTX-5090"),
])
def test_forgiving_names(name, expected):
    assert lookup_gpu(name).name == expected
    if name.isdigit():  # in the device grammar bare digits are a CUDA index (--gpu 4090 is cuda:4090)
        assert DeviceSpec.parse(name) == DeviceSpec.cuda(int(name))
        return
    assert device_memory(name).total_bytes == EXPECTED[expected]


@pytest.mark.parametrize(("name", "choices"), [
    ("A100", ["A100-40GB", "A100-80GB"]),
    ("nvidia a100", ["A100-40GB", "A100-80GB"]),
    ("V100", ["V100-16GB", "V100-32GB"]),
])
def test_ambiguous_names_list_the_choices(name, choices):
    assert [s.name for s in matching_gpus(name)] == choices
    with pytest.raises(ConfigError, match="ambiguous") as info:
        lookup_gpu(name)
    for choice in choices:
        assert choice in str(info.value)


@pytest.mark.parametrize("name", [
    "B300", "A100 48GB", "H100 NVL", "RTX 3090 Ti", "A30", "L20", "", "a100 80gb 40gb",
    "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
])
def test_unknown_names_list_the_catalog(name):
    assert matching_gpus(name) == []
    with pytest.raises(ConfigError, match=r"unknown GPU .*The catalog knows: T4, V100-16GB"):
        lookup_gpu(name)


@pytest.mark.parametrize(("name", "close"), [
    ("a100-40", ["A100-40GB"]),
    ("H100-94GB", ["H100-80GB", "A100-40GB", "H200"]),
    ("rtx6000", ["RTX-A6000"]),
    ("RTX 3090 Ti", ["RTX-3090"]),
    ("4080", ["RTX-4090"]),
    ("B300", ["B200", "RTX-3090"]),
    ("MI250", []),
    ("", []),
])
def test_unknown_names_say_which_card_was_meant(name, close):
    assert close_gpus(name) == close
    with pytest.raises(ConfigError) as info:
        lookup_gpu(name)
    if close:
        quoted = " or ".join(repr(c) for c in close) if len(close) < 3 else \
            f"{close[0]!r}, {close[1]!r} or {close[2]!r}"
        assert f"unknown GPU {name!r}. Did you mean {quoted}? The catalog knows: T4," in str(info.value)
    else:
        assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize("spec", GPU_CATALOG.values(), ids=list(GPU_CATALOG))
def test_bf16_follows_the_compute_capability(spec: GpuSpec):
    assert spec.compute_capability == CAPABILITY[spec.name]
    assert spec.bf16 is (spec.name not in ("T4", "V100-16GB", "V100-32GB"))


def test_bf16_precision_on_a_card_without_bf16_is_a_problem():
    problem = bf16_problem("T4", "bf16-mixed")
    assert problem == ("T4 has no bfloat16 support (compute capability 7.5; bf16 needs 8.0, Ampere or newer): "
                       "torch only emulates it there, slowly, and without the fused attention kernels this "
                       "estimate assumes. Use --precision 16-mixed (fp16 with a gradient scaler) or 32-true on a T4")
    assert bf16_problem("Tesla V100-SXM2-32GB", "bf16-true").startswith("V100-32GB has no bfloat16 support "
                                                                         "(compute capability 7.0;")
    assert bf16_problem("T4", "16-mixed") is None
    assert bf16_problem("A100-40GB", "bf16-mixed") is None
    assert bf16_problem("MI300X", "bf16-true") is None
    assert bf16_problem("budget of 24.00 GiB", "bf16-mixed") is None


def test_lookup_rejects_non_strings():
    with pytest.raises(ConfigError, match="unknown GPU 80"):
        lookup_gpu(80)  # type: ignore[arg-type]


def test_catalog_is_read_only():
    with pytest.raises(TypeError):
        GPU_CATALOG["X"] = GPU_CATALOG["T4"]  # type: ignore[index]
