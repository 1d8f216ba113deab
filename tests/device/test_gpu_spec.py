"""memguard.device.parse_gpu: the one reader of ``--gpu`` and ``--memguard-gpu``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from memguard import ConfigError, DeviceError, DeviceMemory
from memguard.device import parse_gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fake_nvml import gpus_seen

GIB = 2**30
A100 = DeviceMemory(name="NVIDIA A100-SXM4-40GB", index=0, uuid="GPU-0", total_bytes=40 * GIB,
                    free_bytes=30 * GIB, used_bytes=10 * GIB, source="nvml")


@pytest.fixture
def cuda() -> list[object]:
    """The indices NVML is asked for (``read``: cuda:0 is a 40 GiB GPU with 30 GiB free, no other index)."""
    return []


def read(spec: str, asked: list[object]) -> DeviceMemory:
    return parse_gpu(spec, readers=gpus_seen(A100, asked=asked))


@pytest.mark.parametrize("spec", ["auto", "AUTO", "0", " 0 ", "cuda", "cuda:0", "CUDA:0"])
def test_this_machines_gpu(cuda, spec):
    assert read(spec, cuda).free_bytes == 30 * GIB
    assert cuda == [0]


def test_bare_digits_are_an_index_never_a_size_nor_a_catalog_name(cuda):
    with pytest.raises(DeviceError, match="'4090' is read as the CUDA index cuda:4090, since bare digits are an "
                                          "index and a size needs its unit, such as '4090MiB' \\(for the catalog "
                                          "GPU write 'RTX-4090'\\); there is no cuda:4090"):
        read("4090", cuda)  # the catalog knows an RTX 4090, but digits are an index
    with pytest.raises(DeviceError, match=r"'1' is read as the CUDA index cuda:1, .* such as '24GiB'; there is no"):
        read("1", cuda)
    assert cuda == [4090, 1]
    assert read("RTX 4090", cuda).source == "catalog"


def test_a_number_without_a_unit_is_named(cuda):
    for spec in ("1.5e9", "4096.0", ".5"):
        with pytest.raises(ConfigError, match=f"'{spec}' is a number without a unit: a memory size needs one"):
            read(spec, cuda)
    assert cuda == []  # no device read for a size


@pytest.mark.parametrize(("spec", "source", "free"), [
    ("A100-40GB", "catalog", 40 * GIB), ("a100 40gb", "catalog", 40 * GIB), ("24GiB", "budget", 24 * GIB),
    (" 24GB ", "budget", 24 * 10**9), (".5GiB", "budget", GIB // 2), ("4096B", "budget", 4096),
])
def test_catalog_names_and_sizes(cuda, spec, source, free):
    gpu = read(spec, cuda)
    assert (gpu.source, gpu.free_bytes, gpu.total_bytes) == (source, free, free)
    assert cuda == []  # neither a catalog GPU nor a size reads a device


def test_a_share_of_this_machines_gpu(cuda):
    gpu = read("80%", cuda)
    assert cuda == [0]
    assert (gpu.source, gpu.free_bytes, gpu.index) == ("budget", int(40 * GIB * 0.8), 0)
    assert gpu.name == "80% of NVIDIA A100-SXM4-40GB"


@pytest.mark.parametrize(("spec", "message"), [
    ("H900", "unknown GPU 'H900'. Did you mean 'H200' or 'H100-80GB'? Expected auto, a CUDA index (0, cuda:1), "
             "a catalog name"),
    ("", "cannot read '' as a GPU"),
    ("A100", "'A100' is ambiguous"),
    ("12QiB", "cannot read '12QiB' as a memory size"),
    ("0GiB", "budget '0GiB' is no memory at all"),
    ("0%", "budget '0%' is no memory at all"),
    ("cuda:x", "cannot read 'cuda:x' as a CUDA device"),
])
def test_bad_specs_are_named(cuda, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read(spec, cuda)
    assert cuda == []
