"""memguard.device.spec: one grammar for every form of a device a user writes, read in one place.

Live devices come from injected readers (``tests/_fake_nvml.py:gpus_seen``), never from this machine.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memguard
from memguard import Category, ConfigError, DeviceError, DeviceMemory, MemoryEstimate
from memguard.device import FORMS, DeviceSpec, SpecKind, memory_of, parse_budget
from memguard.device.catalog import lookup_gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fake_nvml import gpus_seen

GIB = 2**30
MIB = 2**20
PACKAGE = Path(memguard.__file__).parent
L4 = DeviceMemory(name="NVIDIA L4", index=0, uuid="GPU-0", total_bytes=22 * GIB, free_bytes=3 * GIB,
                  used_bytes=19 * GIB, source="nvml")
H100 = DeviceMemory(name="NVIDIA H100 80GB HBM3", index=1, uuid="GPU-1", total_bytes=80 * GIB, free_bytes=70 * GIB,
                    used_bytes=10 * GIB, source="nvml")


# -- the table: each form, one value --------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", DeviceSpec.cuda()), ("cuda", DeviceSpec.cuda()), (" CUDA ", DeviceSpec.cuda()),
    ("cuda:1", DeviceSpec.cuda(1)), ("1", DeviceSpec.cuda(1)), (" 1 ", DeviceSpec.cuda(1)),
    (torch.device("cuda", 1), DeviceSpec.cuda(1)), (torch.device("cuda"), DeviceSpec.cuda()),
    ("cpu", DeviceSpec.host()), (torch.device("cpu"), DeviceSpec.host()),
    ("A100-80GB", DeviceSpec.catalog("A100-80GB")), ("nvidia a100-sxm4-80gb", DeviceSpec.catalog("A100-80GB")),
    ("T4", DeviceSpec.catalog("T4")), ("RTX 4090", DeviceSpec.catalog("RTX-4090")),
    ("24GiB", DeviceSpec.budget(24 * GIB)), ("24GB", DeviceSpec.budget(24 * 10**9)), ("4096B", DeviceSpec.budget(4096)),
    (".5GiB", DeviceSpec.budget(GIB // 2)), (2**34, DeviceSpec.budget(2**34)),
    (1.5e9, DeviceSpec.budget(1_500_000_000)), (0, DeviceSpec.budget(0)),
    ("80%", DeviceSpec.share_of(0.8)), ("80% of cpu", DeviceSpec.share_of(0.8, "cpu")),
    ("50% of cuda:1", DeviceSpec.share_of(0.5, "cuda:1")), ("25% of A100-80GB", DeviceSpec.share_of(0.25, "A100-80GB")),
])
def test_every_form_is_one_value(value, expected):
    spec = DeviceSpec.parse(value)
    assert spec == expected
    assert DeviceSpec.parse(spec) is spec


def test_parsing_reads_no_device():
    asked: list[object] = []
    readers = gpus_seen(L4, asked=asked)
    for text in ("auto", "cuda:1", "1", "80%", "cpu", "T4", "24GB"):
        DeviceSpec.parse(text)
    assert asked == []
    with pytest.raises(DeviceError, match="'1' is read as the CUDA index cuda:1"):
        DeviceSpec.parse("1").read(readers)
    assert asked == [1]


def test_an_int_is_bytes_and_bare_digits_are_an_index():
    """The disagreement issue 18 names: ``plan(gpu=2**34)`` was 16 GiB, ``device_memory(2**34)`` cuda:17179869184."""
    assert DeviceSpec.parse(2**34).read() == DeviceMemory(name="budget of 16.00 GiB", index=None, uuid=None,
                                                           total_bytes=16 * GIB, free_bytes=16 * GIB, used_bytes=0,
                                                           source="budget")
    assert DeviceSpec.parse("0").read(gpus_seen(L4)) == L4  # was an error in device_memory, cuda:0 in parse_gpu
    assert memguard.device_memory("0", readers=gpus_seen(L4)) == L4
    with pytest.warns(FutureWarning, match="Write device_memory\\('cuda:0'\\)"):
        assert memguard.device_memory(0, readers=gpus_seen(L4)) == L4  # the old reading, for one release


# -- a percentage: the training device ------------------------------------------------------------


def test_a_bare_share_is_of_the_training_device():
    two = gpus_seen(L4, H100)
    assert DeviceSpec.parse("50%").read(two).total_bytes == 11 * GIB  # the GPU this process sees first
    assert DeviceSpec.parse("50%").read(two, training="cuda:1").total_bytes == 40 * GIB  # the run's device
    assert DeviceSpec.parse("50%").read(two, training=torch.device("cuda", 1)).uuid == "GPU-1"
    host = DeviceSpec.parse("50%").read(gpus_seen())  # no GPU can be here: the host
    assert host.name.startswith("50% of cpu") and host.source == "budget"
    assert host.total_bytes == DeviceSpec.host().read(gpus_seen()).total_bytes // 2
    with pytest.raises(DeviceError, match="cannot read the memory of cuda:0"):
        DeviceSpec.parse("50%").read(gpus_seen(), training=DeviceSpec.cuda())  # --gpu 80%: a GPU, never the host


def test_a_share_of_a_named_device():
    assert DeviceSpec.parse("50% of cuda:1").read(gpus_seen(L4, H100)).total_bytes == 40 * GIB
    a100 = DeviceSpec.parse("25% of A100-80GB").read()
    assert (a100.name, a100.total_bytes, a100.source) == ("25% of A100-80GB", 20 * GIB, "budget")
    with pytest.raises(ConfigError, match="a share is of a device, not of 12GiB"):
        DeviceSpec.parse("50% of 12GiB")


# -- errors name the value and the forms ----------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("H900", "unknown GPU 'H900'. Did you mean 'H200' or 'H100-80GB'? Expected " + FORMS),
    ("", "cannot read '' as a device; expected " + FORMS),
    (None, "cannot read None as a device; expected " + FORMS),
    (True, "cannot read True as a device"),
    ([1], "cannot read [1] as a device"),
    ("A100", "GPU name 'A100' is ambiguous"),
    ("1.5", "'1.5' is a number without a unit"),
    ("0GB", "budget '0GB' is no memory at all"),
    ("0%", "budget '0%' is no memory at all"),
    ("150%", "between 0% and 100%"),
    ("cuda:x", "cannot read 'cuda:x' as a CUDA device"),
    (-1, "must not be negative"),
    (torch.device("meta"), "not device(type='meta')"),
])
def test_errors_name_the_value_and_the_forms(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DeviceSpec.parse(value)


def test_a_zero_budget_compares_but_is_not_a_device():
    assert DeviceSpec.parse(0).free_bytes() == 0  # est.fits(free) on a full GPU: False, not an error
    with pytest.raises(ConfigError, match="budget 0 is no memory at all"):
        DeviceSpec.parse(0).read()


# -- decimal or binary, and cards without bf16 -------------------------------------------------


def test_24gb_is_decimal_and_names_the_cards_sold_as_24_gb():
    spec = DeviceSpec.parse("24GB")
    assert spec.read().total_bytes == 24 * 10**9 < lookup_gpu("A10").total_bytes  # every "24 GB" card has more
    assert spec.note.splitlines() == [
        "24GB is read as 24,000,000,000 bytes (SI: 1 GB = 10^9 bytes), 22.35 GiB; write 24GiB for 24 x 2^30 bytes "
        "(binary, as nvidia-smi counts);",
        "a card sold as 24 GB has 22.49-24.00 GiB as nvidia-smi counts (A10, A10G, L4, RTX-3090, RTX-4090): name the "
        "card instead",
    ]
    assert DeviceSpec.parse("24GiB").note is None and DeviceSpec.parse("T4").note is None
    assert DeviceSpec.parse("7GB").note.count("\n") == 0  # no card is sold as 7 GB


# -- every entry point reads through it ---------------------------------------------------------


def test_est_fits_reads_every_form():
    est = MemoryEstimate("formula", {Category.ACTIVATIONS: 9 * GIB}, inputs={"device": "cuda"})
    assert est.fits("A100-80GB") and est.fits("T4") and not est.fits("V100-16GB", margin=0.5)
    assert est.fits(12 * GIB) and not est.fits(0) and est.fits("80% of A100-80GB")
    with pytest.raises(DeviceError):
        est.fits("80%")  # of the estimate's device, cuda: never the host in its place


def test_parse_budget_takes_amounts_only():
    assert parse_budget("A100-80GB") == 80 * GIB
    for device in ("cpu", "cuda:1", "7"):
        with pytest.raises(ConfigError, match=f"budget '{device}' is not an amount of memory"):
            parse_budget(device)


def test_memory_of_keeps_a_device_memory():
    assert memory_of(L4) is L4
    assert memory_of("T4").total_bytes == 15360 * MIB


def test_cli_gpu_cpu_is_the_host(capsys):
    from memguard.cli import main
    from memguard.device.readers import HostMemory

    host = HostMemory(total_bytes=32 * GIB, available_bytes=20 * GIB, mem_total_bytes=32 * GIB,
                      mem_available_bytes=20 * GIB)
    code = main(["check", "gpt2", "--batch-size", "2", "--seq-len", "32", "--method", "formula",
                 "--device", "cpu", "--gpu", "cpu", "-q"], readers=gpus_seen(host=lambda: host))
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-2] == "GPU: cpu, 20.00 GiB free of 32.00 GiB (host)"


# -- the package: a façade, one parser, no cycle ----------------------------------------------------


def test_device_init_is_a_facade():
    tree = ast.parse((PACKAGE / "device" / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds  # docstring, imports, __all__
    assert [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets] == ["__all__"]


def test_one_place_reads_a_device_spec():
    """Catalog names and sizes are read in device/spec.py only (and the catalog and units, which it uses)."""
    readers = {"matching_gpus(", "lookup_gpu(", "close_gpus("}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PACKAGE).as_posix()
        if any(r in text for r in readers) or re.search(r"parse_bytes\((?![\"'])", text):
            found.add(rel)
    assert found == {"device/spec.py", "device/catalog.py", "units.py"}


@pytest.mark.parametrize("module", ["memguard.device.readers", "memguard.device.spec", "memguard.device.api",
                                    "memguard.estimation.result", "memguard.device"])
def test_no_import_cycle(module):
    code = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False)
    assert code.returncode == 0, code.stderr


def test_spec_kinds():
    assert {k.value for k in SpecKind} == {"training", "cuda", "cpu", "catalog", "budget", "share"}
