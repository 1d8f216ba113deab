"""Tests for memguard.device, memguard.device._nvml and memguard.device._host.

The host is read for real and from cgroup files laid out in a temporary directory; NVML is a fake
``pynvml`` module (``tests/_fake_nvml.py``) that raises the installed pynvml's exception types.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pynvml
import pytest
import torch

from memguard.device import (
    DeviceMemory,
    MemorySource,
    Readers,
    _host,
    _nvml,
    device_memory,
    list_devices,
    parse_budget,
    resolve_budget,
    why_no_gpu,
)
from memguard.device import actual as _actual
from memguard.device.catalog import lookup_gpu
from memguard.errors import ConfigError, DeviceError, MemguardError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fake_nvml import MIB, FakeGpu, FakeMig, FakeNvml, gpus_seen, uuid

GIB = 2**30
A100 = "NVIDIA A100-SXM4-80GB"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("MEMGUARD_NVML_TIMEOUT", raising=False)
    _nvml.shutdown()
    yield monkeypatch
    _nvml.shutdown()


@pytest.fixture
def no_driver(tmp_path) -> Readers:
    """This machine's readers, but no NVIDIA driver files, whatever machine the tests run on."""
    return Readers(driver_files=(str(tmp_path / "no-driver" / "version"),))


@pytest.fixture
def nvml(clean_env):
    """Install a fake pynvml: ``nvml([FakeGpu(...), ...], init_error=..., errors=...)``."""

    def install(gpus, **kwargs):
        fake = FakeNvml(gpus, **kwargs)
        clean_env.setitem(sys.modules, "pynvml", fake.module)
        _nvml.shutdown()
        return fake

    return install


@pytest.fixture
def torch_gpu(monkeypatch):
    """Make torch.cuda report one GPU with 20 GiB free of 24 GiB."""
    state = {"calls": 0}

    def mem_get_info(index=None):
        state["calls"] += 1
        return 20 * GIB, 24 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name="NVIDIA GeForce RTX 4090", uuid="0a0b0c0d-1111-2222-3333-444455556666"))
    return state


@pytest.fixture
def no_torch_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def two_gpus(name0=A100, name1=A100):
    return [FakeGpu(uuid(1), name0, 80 * GIB, used=10 * GIB),
            FakeGpu(uuid(2), name1, 80 * GIB, used=30 * GIB)]


# -- the host ----------------------------------------------------------------------------------


def read_proc_meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value.split()[0]) * 1024
    return out


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_cpu_matches_proc_meminfo():
    before = read_proc_meminfo()
    mem = device_memory("cpu")
    after = read_proc_meminfo()
    cg = _host.cgroup_memory()
    limit = cg[1] if cg else None
    assert mem.source == "host"
    assert mem.name == "cpu" and mem.index is None and mem.uuid is None
    assert mem.total_bytes == min(before["MemTotal"], limit or before["MemTotal"])
    low = min(before["MemAvailable"], after["MemAvailable"]) - 64 * MIB
    high = max(before["MemAvailable"], after["MemAvailable"]) + 64 * MIB
    if cg is None:  # no container limit here: the numbers are /proc/meminfo's
        assert mem.total_bytes == before["MemTotal"]
        assert low <= mem.free_bytes <= high
    else:
        assert mem.free_bytes <= min(high, cg[2] + 64 * MIB)
    assert mem.used_bytes == mem.total_bytes - mem.free_bytes
    assert device_memory(torch.device("cpu")).total_bytes == mem.total_bytes


def make_host(tmp_path: Path, *, cgroup: str, meminfo: str | None = None) -> tuple[Path, Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(meminfo or (
        "MemTotal:       16777216 kB\n"
        "MemFree:         4194304 kB\n"
        "MemAvailable:   12582912 kB\n"
        "Buffers:          102400 kB\n"
        "Cached:          2097152 kB\n"
        "HugePages_Total:       0\n"
    ))
    (proc / "self" / "cgroup").write_text(cgroup)
    root = tmp_path / "cgroup"
    root.mkdir()
    return proc, root


def write(path: Path, **files: str | int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (path / name.replace("__", ".")).write_text(f"{value}\n")


def test_host_without_cgroup_limit(tmp_path):
    proc, root = make_host(tmp_path, cgroup="0::/\n")
    mem = _host.host_memory(proc, root)
    assert mem.total_bytes == 16 * GIB
    assert mem.available_bytes == 12 * GIB
    assert mem.cgroup_version is None and mem.cgroup_limit_bytes is None


def test_host_without_memavailable_uses_free_plus_cache(tmp_path):
    proc, root = make_host(tmp_path, cgroup="0::/\n", meminfo=(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"))
    mem = _host.host_memory(proc, root)
    assert mem.total_bytes == 1000 * 1024
    assert mem.available_bytes == 420 * 1024


def test_cgroup_v2_limit_minus_working_set(tmp_path):
    proc, root = make_host(tmp_path, cgroup="0::/kubepods/pod1\n")
    write(root, cgroup__controllers="cpu memory")
    write(root / "kubepods" / "pod1", memory__max=4 * GIB, memory__current=3 * GIB,
          memory__stat=f"anon 1000\ninactive_file {GIB}\nactive_file 5")
    mem = _host.host_memory(proc, root)
    assert mem.cgroup_version == 2
    assert mem.cgroup_limit_bytes == 4 * GIB
    assert mem.total_bytes == 4 * GIB
    assert mem.available_bytes == 2 * GIB  # 4 GiB - (3 GiB - 1 GiB inactive page cache)


def test_cgroup_v2_parent_limit_binds(tmp_path):
    proc, root = make_host(tmp_path, cgroup="0::/parent/child\n")
    write(root, cgroup__controllers="memory")
    write(root / "parent", memory__max=2 * GIB, memory__current=GIB)
    write(root / "parent" / "child", memory__max="max", memory__current=GIB // 2)
    mem = _host.host_memory(proc, root)
    assert mem.total_bytes == 2 * GIB
    assert mem.available_bytes == GIB


def test_cgroup_v2_namespace_root(tmp_path):
    """In a container with its own cgroup namespace, /proc/self/cgroup says '0::/'."""
    proc, root = make_host(tmp_path, cgroup="0::/\n")
    write(root, cgroup__controllers="memory", memory__max=6 * GIB, memory__current=5 * GIB)
    mem = _host.host_memory(proc, root)
    assert (mem.total_bytes, mem.available_bytes) == (6 * GIB, GIB)


def test_cgroup_v2_limit_above_memtotal(tmp_path):
    proc, root = make_host(tmp_path, cgroup="0::/big\n")
    write(root, cgroup__controllers="memory")
    write(root / "big", memory__max=64 * GIB, memory__current=GIB)
    mem = _host.host_memory(proc, root)
    assert mem.total_bytes == 16 * GIB  # MemTotal
    assert mem.available_bytes == 12 * GIB  # MemAvailable is smaller than 63 GiB


def test_cgroup_v1_limit(tmp_path):
    proc, root = make_host(tmp_path, cgroup="4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    write(root / "memory" / "docker" / "abc", memory__limit_in_bytes=2 * GIB,
          memory__usage_in_bytes=3 * GIB // 2,
          memory__stat=f"cache 5\ntotal_inactive_file {GIB // 2}\n"
                       f"hierarchical_memory_limit {9223372036854771712}")
    mem = _host.host_memory(proc, root)
    assert mem.cgroup_version == 1
    assert mem.total_bytes == 2 * GIB
    assert mem.available_bytes == GIB  # 2 GiB - (1.5 GiB - 0.5 GiB)


def test_cgroup_v1_hierarchical_limit_and_mount_root(tmp_path):
    """The host path is not under the mount (container view): the mount root is the cgroup."""
    proc, root = make_host(tmp_path, cgroup="9:memory:/docker/not-here\n0::/\n")
    write(root / "memory", memory__limit_in_bytes=9223372036854771712,
          memory__usage_in_bytes=GIB, memory__stat=f"hierarchical_memory_limit {3 * GIB}\n")
    mem = _host.host_memory(proc, root)
    assert (mem.cgroup_version, mem.total_bytes, mem.available_bytes) == (1, 3 * GIB, 2 * GIB)


def test_cgroup_v1_unlimited(tmp_path):
    proc, root = make_host(tmp_path, cgroup="4:memory:/\n")
    write(root / "memory", memory__limit_in_bytes=9223372036854771712,
          memory__usage_in_bytes=GIB)
    mem = _host.host_memory(proc, root)
    assert mem.cgroup_version is None
    assert (mem.total_bytes, mem.available_bytes) == (16 * GIB, 12 * GIB)


def test_host_without_proc_meminfo_uses_psutil(tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(total=8 * GIB, available=5 * GIB))
    mem = _host.host_memory(tmp_path / "no-proc", tmp_path / "no-cgroup")
    assert (mem.total_bytes, mem.available_bytes) == (8 * GIB, 5 * GIB)
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(DeviceError, match="pip install psutil"):
        _host.host_memory(tmp_path / "no-proc", tmp_path / "no-cgroup")


def test_device_memory_cpu_uses_cgroup(tmp_path, monkeypatch):
    proc, root = make_host(tmp_path, cgroup="0::/job\n")
    write(root, cgroup__controllers="memory")
    write(root / "job", memory__max=8 * GIB, memory__current=5 * GIB)
    readers = Readers(host=functools.partial(_host.host_memory, proc_root=proc, cgroup_root=root))
    mem = device_memory("cpu", readers=readers)
    assert (mem.total_bytes, mem.free_bytes, mem.used_bytes) == (8 * GIB, 3 * GIB, 5 * GIB)


# -- NVML: devices as CUDA sees them -----------------------------------------------------------


def test_nvml_reads_each_device(nvml):
    nvml(two_gpus())
    d0 = device_memory("cuda")
    assert d0 == DeviceMemory(name=A100, index=0, uuid=uuid(1), total_bytes=80 * GIB,
                              free_bytes=70 * GIB, used_bytes=10 * GIB, source="nvml")
    assert d0.device == "cuda:0"
    for spelling in ("cuda:1", "1", torch.device("cuda", 1), " CUDA:1 "):
        d1 = device_memory(spelling)
        assert (d1.index, d1.uuid, d1.free_bytes) == (1, uuid(2), 50 * GIB)
    with pytest.warns(FutureWarning, match=r"device_memory\(1\) reads the int as a CUDA index; everywhere else"):
        assert device_memory(1) == d1  # the old reading of an int, until it is bytes here too
    assert device_memory(torch.device("cuda")).index == 0
    assert [d.uuid for d in list_devices()] == [uuid(1), uuid(2)]


def test_none_is_the_gpu_when_there_is_one(nvml):
    nvml(two_gpus())
    assert device_memory().source == "nvml"
    assert device_memory().index == 0


def test_none_is_the_host_without_gpu(nvml, no_torch_gpu):  # NVML answers and sees no GPU
    nvml([])
    assert device_memory().source == "host"
    assert list_devices() == []
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        device_memory("cuda")


def test_nvml_initialised_once_and_shut_down(nvml):
    fake = nvml(two_gpus())
    device_memory("cuda")
    list_devices()
    device_memory("cuda:1")
    assert fake.init_calls == 1
    assert fake.initialized == 1
    _nvml.shutdown()
    assert fake.shutdown_calls == 1 and fake.initialized == 0
    _nvml.shutdown()  # a second shutdown does nothing
    assert fake.shutdown_calls == 1
    device_memory("cuda")  # initialises again after a shutdown
    assert fake.init_calls == 2


def test_failed_shutdown_does_not_raise(nvml):
    fake = nvml(two_gpus(), errors={"nvmlShutdown": pynvml.NVMLError_GpuIsLost()})
    device_memory("cuda")
    _nvml.shutdown()
    assert fake.shutdown_calls == 1


def test_missing_index_names_the_visible_devices(nvml):
    nvml(two_gpus())
    with pytest.raises(DeviceError, match=r"no cuda:2; this process sees 2 CUDA device\(s\)"):
        device_memory("cuda:2")


@pytest.mark.parametrize(("visible", "expected"), [
    ("1", [uuid(2)]),
    ("1,0", [uuid(2), uuid(1)]),
    ("2, 0", [uuid(3), uuid(1)]),
    ("0,7,1", [uuid(1)]),  # the list ends at the first entry that names no device
    ("1gpu,0", [uuid(2), uuid(1)]),  # CUDA reads entries with strtoul
    ("-1,0", []),
    ("", []),
    (uuid(3), [uuid(3)]),
    (f"{uuid(3)},{uuid(1)}", [uuid(3), uuid(1)]),
    (uuid(2)[:12], [uuid(2)]),  # a unique UUID prefix is enough
    ("GPU-0000000", []),  # ... an ambiguous one is not
    (f"{uuid(2)},GPU-ffff", [uuid(2)]),
    ("0,1,0", []),  # a device named twice: CUDA sees none
])
def test_cuda_visible_devices(nvml, visible, expected, monkeypatch):
    nvml([*two_gpus(), FakeGpu(uuid(3), A100, 80 * GIB)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [d.uuid for d in list_devices()] == expected
    assert [d.index for d in list_devices()] == list(range(len(expected)))
    if expected:
        assert device_memory("cuda:0").uuid == expected[0]
    else:
        with pytest.raises(DeviceError, match=r"no CUDA device is visible.*CUDA_VISIBLE_DEVICES"):
            device_memory("cuda")


def mig_machine():
    mig_a = FakeMig(uuid(11, "MIG"), f"{A100} MIG 3g.40gb", 40 * GIB - 512 * MIB, used=GIB)
    mig_b = FakeMig(uuid(12, "MIG"), f"{A100} MIG 2g.20gb", 20 * GIB - 256 * MIB, used=2 * GIB)
    return [
        FakeGpu(uuid(1), A100, 80 * GIB, used=3 * GIB, mig_capable=True, mig_enabled=True,
                migs=[None, mig_a, mig_b]),
        FakeGpu(uuid(2), A100, 80 * GIB, used=GIB, mig_capable=True, mig_enabled=False),
        FakeGpu(uuid(3), "Tesla T4", 15360 * MIB),  # no MIG support at all
    ], mig_a, mig_b


def test_mig_gpu_stands_for_its_first_instance(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    gpus, mig_a, _ = mig_machine()
    nvml(gpus)
    devs = list_devices()
    assert [d.uuid for d in devs] == [mig_a.uuid, uuid(2), uuid(3)]
    d0 = device_memory("cuda:0")
    # the MIG instance's own memory, not the whole GPU's
    assert (d0.total_bytes, d0.free_bytes, d0.used_bytes) == (mig_a.total, mig_a.total - GIB, GIB)
    assert d0.name.endswith("MIG 3g.40gb")


def test_mig_uuid_in_cuda_visible_devices(nvml, monkeypatch):
    gpus, mig_a, mig_b = mig_machine()
    nvml(gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig_b.uuid)
    d = device_memory("cuda")
    assert (d.uuid, d.total_bytes, d.used_bytes) == (mig_b.uuid, mig_b.total, 2 * GIB)
    # a CUDA process enumerates a single MIG instance
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{mig_b.uuid},{mig_a.uuid}")
    assert [x.uuid for x in list_devices()] == [mig_b.uuid]
    # the legacy MIG-GPU-<uuid>/<gi>/<ci> form is not understood: no device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"MIG-{uuid(1)}/1/0")
    assert list_devices() == []


def test_mig_gpu_without_instances_is_no_device(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    gpus, _, _ = mig_machine()
    gpus[0].migs = []
    nvml(gpus)
    assert [d.uuid for d in list_devices()] == [uuid(2), uuid(3)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        device_memory("cuda")


def test_order_warning_for_different_gpus(nvml, monkeypatch):
    nvml(two_gpus(name1="Tesla T4"))
    with pytest.warns(UserWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        device_memory("cuda")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_memory("cuda").uuid == uuid(1)
        monkeypatch.delenv("CUDA_DEVICE_ORDER")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuid(2)},{uuid(1)}")
        assert device_memory("cuda").uuid == uuid(2)


def test_cuda_uuids_from_initialised_torch_map_exactly(nvml, monkeypatch):
    """With CUDA initialised, torch's device UUIDs fix the order (e.g. fastest first)."""
    nvml(two_gpus(name1="Tesla T4"))
    order = [uuid(2), uuid(1)]  # CUDA put the second PCI device first
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=order[i].removeprefix("GPU-")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ordering warning: the mapping is exact
        assert [d.uuid for d in list_devices()] == order
        current = device_memory("cuda")
    assert (current.index, current.uuid) == (1, uuid(1))


# -- NVML failures: a warning and the torch fallback, or a clear DeviceError -------------------

INIT_ERRORS = [
    (pynvml.NVMLError_LibraryNotFound, "libnvidia-ml.so"),
    (pynvml.NVMLError_DriverNotLoaded, "driver is not loaded"),
    (pynvml.NVMLError_LibRmVersionMismatch, "different versions"),
    (pynvml.NVMLError_NoPermission, "no permission"),
    (pynvml.NVMLError_Unknown, "NVMLError_Unknown"),
]


@pytest.mark.parametrize(("error", "says"), INIT_ERRORS)
def test_init_failure_falls_back_to_torch(nvml, torch_gpu, error, says):
    fake = nvml(two_gpus(), init_error=error())
    with pytest.warns(UserWarning, match=re.escape(says)) as record:
        mem = device_memory("cuda")
    assert "creates a CUDA context" in str(record[0].message)
    assert mem == DeviceMemory(name="NVIDIA GeForce RTX 4090", index=0,
                               uuid="GPU-0a0b0c0d-1111-2222-3333-444455556666",
                               total_bytes=24 * GIB, free_bytes=20 * GIB, used_bytes=4 * GIB,
                               source="torch")
    with pytest.warns(UserWarning):
        assert [d.source for d in list_devices()] == ["torch"]
    assert fake.init_calls == 1  # the failure is remembered, not retried on every call


@pytest.mark.parametrize(("error", "says"), INIT_ERRORS)
def test_init_failure_without_torch_gpu_is_a_device_error(nvml, no_torch_gpu, no_driver, error, says):
    nvml(two_gpus(), init_error=error())
    with pytest.raises(DeviceError, match=re.escape(says)) as info:
        device_memory("cuda:1")
    assert "cuda:1" in str(info.value) and "torch.cuda.is_available() is False" in str(info.value)
    assert isinstance(info.value, MemguardError)
    assert list_devices() == []
    assert says in why_no_gpu()
    if error is pynvml.NVMLError_LibraryNotFound:  # no driver library, no driver files: no GPU can be here
        assert device_memory(readers=no_driver).source == "host"
        return
    # The driver's library is installed, so a GPU is there: never its host RAM in its place.
    with pytest.raises(DeviceError, match=r"NVIDIA driver's NVML library is installed.*" + re.escape(says)):
        device_memory()
    with pytest.raises(DeviceError, match=re.escape(says)):
        resolve_budget("80%")


@pytest.mark.parametrize(("visible", "meant"), [("0", True), ("GPU-1234", True), ("1,0", True),
                                                ("", False), ("-1", False), ("NoDevFiles", False)])
def test_none_is_not_the_host_when_cuda_visible_devices_names_a_gpu(nvml, no_torch_gpu, monkeypatch, no_driver,
                                                                     visible, meant):
    nvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if not meant:
        assert device_memory(readers=no_driver).source == "host"
        return
    with pytest.raises(DeviceError, match=re.escape(f"CUDA_VISIBLE_DEVICES={visible!r} names a GPU")) as info:
        device_memory()
    assert "libnvidia-ml.so" in str(info.value) and "device='cpu'" in str(info.value)
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES"):
        resolve_budget("80%")
    assert device_memory("cpu").source == "host"  # asked for by name, the host is fine


def test_none_is_not_the_host_when_the_nvidia_driver_is_loaded(nvml, no_torch_gpu, monkeypatch, tmp_path):
    nvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    with pytest.raises(DeviceError, match=re.escape(f"the NVIDIA driver is loaded ({version} exists)")):
        device_memory(readers=Readers(driver_files=(str(version),)))


def test_broken_pynvml_import_is_a_device_error(clean_env, no_torch_gpu, no_driver, tmp_path):
    (tmp_path / "pynvml.py").write_text("raise RuntimeError('half-installed bindings')\n")
    clean_env.syspath_prepend(str(tmp_path))
    clean_env.delitem(sys.modules, "pynvml")
    with pytest.raises(DeviceError, match=r"importing 'pynvml' failed \(RuntimeError: half-installed bindings\)"):
        device_memory("cuda")
    assert list_devices() == []
    assert "half-installed bindings" in why_no_gpu()
    assert device_memory(readers=no_driver).source == "host"  # no driver here, no GPU named: the host is the device


class HungInitNvml(FakeNvml):
    """A fake NVML whose ``nvmlInit`` blocks until :attr:`release` is set (a driver in a bad state)."""

    def __init__(self, gpus):
        self.release = threading.Event()
        super().__init__(gpus)

    def nvmlInit(self) -> None:
        self.release.wait(30)
        super().nvmlInit()


def test_hung_nvml_init_times_out(clean_env, no_torch_gpu):
    fake = HungInitNvml(two_gpus())
    clean_env.setitem(sys.modules, "pynvml", fake.module)
    clean_env.setenv("MEMGUARD_NVML_TIMEOUT", "0.2")
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"nvmlInit did not return within 0.2 s.*MEMGUARD_NVML_TIMEOUT"):
        device_memory("cuda")
    assert time.monotonic() - start < 5
    with pytest.raises(DeviceError, match="nvmlInit did not return"):
        device_memory()  # a hung driver is a GPU that cannot be read, not the host
    assert time.monotonic() - start < 5  # the failure is remembered: no second wait
    assert fake.init_calls == 0  # still blocked inside the call
    fake.release.set()  # the driver answers at last: memguard shuts NVML down again
    for thread in threading.enumerate():
        if thread.name == "memguard-nvmlInit":
            thread.join(5)
    assert (fake.init_calls, fake.shutdown_calls, fake.initialized) == (1, 1, 0)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_bad_nvml_timeout_is_a_config_error(nvml, value, monkeypatch):
    nvml(two_gpus())
    monkeypatch.setenv("MEMGUARD_NVML_TIMEOUT", value)
    with pytest.raises(ConfigError, match=f"MEMGUARD_NVML_TIMEOUT={value!r}: expected a positive number"):
        device_memory("cuda")


@pytest.mark.parametrize(("call", "error", "says"), [
    ("nvmlDeviceGetMemoryInfo", pynvml.NVMLError_GpuIsLost, "GPU is lost"),
    ("nvmlDeviceGetMemoryInfo", pynvml.NVMLError_NoPermission, "no permission"),
    ("nvmlDeviceGetCount", pynvml.NVMLError_GpuIsLost, "GPU is lost"),
    ("nvmlDeviceGetUUID", pynvml.NVMLError_Unknown, "NVMLError_Unknown"),
])
def test_query_failure_falls_back_to_torch(nvml, torch_gpu, call, error, says):
    nvml(two_gpus(), errors={call: error()})
    with pytest.warns(UserWarning, match=re.escape(says)):
        assert device_memory("cuda").source == "torch"
    assert torch_gpu["calls"] == 1


def test_gpu_lost_without_torch_gpu_is_a_device_error(nvml, no_torch_gpu):
    nvml(two_gpus(), errors={"nvmlDeviceGetMemoryInfo": pynvml.NVMLError_GpuIsLost()})
    with pytest.raises(DeviceError, match="GPU is lost"):
        device_memory("cuda")


def test_pynvml_not_installed(clean_env, no_torch_gpu):
    clean_env.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(DeviceError, match="pip install nvidia-ml-py"):
        device_memory("cuda")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceError, match="pip install nvidia-ml-py"):
        device_memory()  # a GPU is named, so not the host


def test_pynvml_not_installed_falls_back(clean_env, torch_gpu):
    clean_env.setitem(sys.modules, "pynvml", None)
    with pytest.warns(UserWarning, match="nvidia-ml-py"):
        assert device_memory("cuda").free_bytes == 20 * GIB


def test_torch_fallback_errors_are_device_errors(nvml, torch_gpu, monkeypatch):
    nvml([], init_error=pynvml.NVMLError_DriverNotLoaded())

    def broken(index=None):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when the fallback fails too
        with pytest.raises(DeviceError, match=r"torch\.cuda cannot read .*unspecified launch"):
            device_memory("cuda")


def test_broken_torch_cuda_is_a_device_error(nvml, monkeypatch):
    nvml([], init_error=pynvml.NVMLError_NoPermission())

    def broken():
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    with pytest.raises(DeviceError, match=r"no permission.*torch\.cuda failed: CUDA driver"):
        device_memory("cuda")


def test_cuda_build_without_gpu_says_so(nvml, no_torch_gpu, monkeypatch):
    nvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match="no GPU, no driver, or no device visible"):
        device_memory("cuda")


def test_torch_uuids_unknown_to_nvml_fall_back_to_the_environment(nvml, monkeypatch):
    nvml(two_gpus())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=uuid(99).removeprefix("GPU-")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.uuid for d in list_devices()] == [uuid(2)]


def test_torch_fallback_checks_the_index(nvml, torch_gpu):
    nvml([], init_error=pynvml.NVMLError_DriverNotLoaded())
    with pytest.raises(DeviceError, match="no cuda:3; torch sees 1"):
        device_memory("cuda:3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_this_machine_is_a_clear_error(clean_env):
    """The real pynvml and torch: no GPU here, so no answer, and a message that says why."""
    with pytest.raises(DeviceError) as info:
        device_memory("cuda")
    text = str(info.value)
    assert "NVML: " in text and "torch: " in text
    assert "A100-80GB" in text  # what to do instead
    assert list_devices() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_agrees_with_torch(clean_env):
    mem = device_memory("cuda")
    free, total = torch.cuda.mem_get_info(0)
    assert mem.source == "nvml"
    assert mem.uuid and mem.uuid.startswith(("GPU-", "MIG-"))
    assert abs(mem.total_bytes - total) <= 0.03 * total
    assert abs(mem.free_bytes - free) <= 0.03 * total
    assert lookup_gpu(mem.name).total_bytes == mem.total_bytes


# -- budgets and other forms -------------------------------------------------------------------


def test_budgets():
    b = device_memory("12GiB")
    assert (b.total_bytes, b.free_bytes, b.used_bytes) == (12 * GIB, 12 * GIB, 0)
    assert b.source == "budget"
    assert device_memory("24GB").total_bytes == 24 * 10**9
    assert device_memory("512 MiB").free_bytes == 512 * MIB
    assert resolve_budget(1000).total_bytes == 1000
    assert resolve_budget("4096B").total_bytes == 4096
    with pytest.raises(ConfigError, match=r"budget '4096' is not an amount of memory \(bare digits are the CUDA "
                                          r"index cuda:4096\)"):
        resolve_budget("4096")  # bare digits are an index in every reader; a size needs its unit
    share = resolve_budget("80%", "A100-80GB")
    assert share.total_bytes == int(81920 * MIB * 0.8)
    assert share.name == "80% of A100-80GB" and share.source == "budget"


@pytest.mark.parametrize(("value", "expected"), [
    ("12GiB", 12 * GIB), (4096, 4096), ("4096B", 4096), ("A100-80GB", 80 * GIB), (1.5e9, 1_500_000_000),
    ("80%", 0.8), ("100%", 1.0), (" 12.5 %", 0.125), ("1e-3%", 1e-5),
])
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected
    assert isinstance(parse_budget(value), int if isinstance(expected, int) else float)


@pytest.mark.parametrize(("value", "message"), [
    (0, "no memory at all"), ("0", "bare digits are the CUDA index cuda:0"), ("0GiB", "no memory at all"),
    ("0%", "no memory at all"),
    (0.4, "no memory at all"), ("1e400GiB", "larger than any memory"), ("1e400", "number without a unit"),
    (2**63, "larger than any memory"), ("150%", "between 0% and 100%"), (True, "cannot read True"),
    (None, "cannot read None"), ("lots", "unknown GPU 'lots'"), ("cpu", "the device cpu"), (-1, "must not be negative"),
])
def test_bad_budgets_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_budget(value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_budget(value, "A100-80GB")


def test_a_share_smaller_than_a_byte_is_a_config_error():
    with pytest.raises(ConfigError, match="less than one byte"):
        resolve_budget("1e-12%", "T4")


def test_percentage_of_the_gpu(nvml):
    nvml(two_gpus())
    mem = device_memory("50%")
    assert (mem.total_bytes, mem.index, mem.uuid, mem.source) == (40 * GIB, 0, uuid(1), "budget")
    assert resolve_budget("25%", "cuda:1").uuid == uuid(2)


def test_percentage_of_the_host_without_gpu(nvml, no_torch_gpu, tmp_path, no_driver):
    nvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    proc, root = make_host(tmp_path, cgroup="0::/\n")
    readers = dataclasses.replace(
        no_driver, host=functools.partial(_host.host_memory, proc_root=proc, cgroup_root=root))
    assert device_memory("50%", readers=readers).total_bytes == 8 * GIB
    assert device_memory("50% of cpu", readers=readers).total_bytes == 8 * GIB


def test_catalog_device():
    mem = device_memory("a100-80gb")
    assert mem == DeviceMemory(name="A100-80GB", index=None, uuid=None, total_bytes=81920 * MIB,
                               free_bytes=81920 * MIB, used_bytes=0, source="catalog")
    assert device_memory("NVIDIA H100 80GB HBM3").total_bytes == 81559 * MIB
    assert device_memory("RTX 3090").name == "RTX-3090"
    with pytest.raises(DeviceError, match="'3090' is read as the CUDA index cuda:3090"):
        device_memory("3090", readers=gpus_seen())  # bare digits are an index, as on the command line
    assert mem.device is None and device_memory("cpu").device == "cpu"


@pytest.mark.parametrize(("device", "message"), [
    ("A100", "ambiguous.*A100-40GB.*A100-80GB"),
    ("B300", r"unknown GPU 'B300'. Did you mean 'B200' or 'RTX-3090'\? Expected auto, .* catalog knows: T4"),
    ("12 parsecs", "cannot read '12 parsecs'"),
    ("1.5", "'1.5B'"),
    ("cuda:x", "'cuda' or 'cuda:N'"),
    ("150%", "between 0% and 100%"),
    (-1, ">= 0"),
    (True, "cannot read True"),
    ([2], "cannot read \\[2\\]"),
    (torch.device("meta"), "not device"),
])
def test_bad_devices_are_config_errors(device, message):
    with pytest.raises(ConfigError, match=message):
        device_memory(device)


def test_device_memory_to_dict_and_validation():
    mem = DeviceMemory(name="x", index=0, uuid=uuid(1), total_bytes=10, free_bytes=4,
                       used_bytes=6, source="nvml")
    data = json.loads(json.dumps(mem.to_dict()))
    assert data == {"name": "x", "index": 0, "uuid": uuid(1), "total_bytes": 10, "free_bytes": 4,
                    "used_bytes": 6, "source": "nvml"}
    assert DeviceMemory(**data) == mem
    assert str(mem) == "cuda:0 x: 4 B free of 10 B (nvml)"
    with pytest.raises(ValueError, match="source"):
        DeviceMemory(name="x", index=None, uuid=None, total_bytes=1, free_bytes=1, used_bytes=0,
                     source="guess")
    with pytest.raises(ValueError, match="free_bytes"):
        DeviceMemory(name="x", index=None, uuid=None, total_bytes=1, free_bytes=-1, used_bytes=0,
                     source="host")


# -- CPU actuals: resident-memory growth, a lower bound unless glibc's mmap threshold is pinned ----


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs a writable Linux /proc/self/clear_refs")
@pytest.mark.parametrize(("env", "pinned"), [
    ({}, False),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, False),
])
def test_cpu_measurement_says_when_it_is_a_lower_bound(monkeypatch, env, pinned):
    for name in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    probe = _actual.MemoryProbe(torch.device("cpu"), reset=True)
    assert probe.start(resident=0)  # clear_refs is writable (the skipif): the probe must start
    # 48 MiB: above glibc's largest dynamic threshold (32 MiB), so always a fresh mmap that makes
    # RSS grow. (A 16 MiB buffer freed before is reused from the heap: the next test.)
    buffer = torch.ones(48 * MIB // 4)
    got = probe.read()
    del buffer
    assert got is not None and 47 * MIB <= got.peak_bytes < 56 * MIB
    assert got.lower_bound is (not pinned)
    if pinned:
        assert got.caveat == ""
    else:
        assert "lower bound" in got.caveat and "MALLOC_MMAP_THRESHOLD_=65536" in got.caveat
    assert _actual.mmap_threshold_pinned() is pinned


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a writable /proc/self/clear_refs")
def test_the_cpu_probe_counts_heap_memory_freed_before_it_started() -> None:
    """Memory freed before the start and reused by the measured steps counts: the probe hands glibc's
    free pages back (``malloc_trim``) first. Without it this reads 0 MiB (measured): the 16 MiB buffer
    comes from the heap, resident since the earlier one was freed. A fresh process, unpinned, so that
    the heap's state is the one written here."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from memguard.device import actual\n"
        "MIB = 1 << 20\n"
        "a = torch.ones(20 * MIB // 4); del a  # an mmapped chunk freed: the threshold rises to 20 MiB\n"
        "b = torch.ones(16 * MIB // 4); del b  # now from the heap, and resident after its free\n"
        "probe = actual.MemoryProbe(torch.device('cpu'), reset=True)\n"
        "assert probe.start(resident=0)\n"
        "c = torch.ones(16 * MIB // 4)\n"
        "print(probe.read().peak_bytes)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 16 * MIB <= int(out.stdout) < 18 * MIB


def test_process_memory_is_what_nvml_lists_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``actual_total_bytes`` of a GPU run: this process's line in nvidia-smi, through NVML."""
    import os
    import sys
    import types

    from _fake_nvml import MIB, FakeGpu, FakeNvml, uuid

    from memguard.device import _nvml, process_memory

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([FakeGpu(uuid(i), "NVIDIA H100", 80 * 1024 * MIB) for i in range(2)])
    listed = {uuid(1): [types.SimpleNamespace(pid=1, usedGpuMemory=5 * MIB),
                        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=700 * MIB)],
              uuid(0): [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]}
    fake.module.nvmlDeviceGetComputeRunningProcesses = lambda handle: listed[handle.gpu.uuid]
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    _nvml.shutdown()
    try:
        assert process_memory(1) == 700 * MIB
        assert process_memory(1, pid=1) == 5 * MIB
        assert process_memory(1, pid=2) is None  # not listed: no context there, or another PID namespace
        assert process_memory(0) is None  # NVML does not know the usage (some MIG and vGPU setups)
        assert process_memory(5) is None  # no such device
    finally:
        _nvml.shutdown()


def test_the_source_is_an_enum_that_reads_as_its_name() -> None:
    budget = device_memory("12GiB")
    assert budget.source is MemorySource.BUDGET and budget.source == "budget" and budget.device is None
    assert type(budget.to_dict()["source"]) is str and json.loads(json.dumps(budget.to_dict()))["source"] == "budget"
    assert str(budget).endswith("(budget)")
    gpu = DeviceMemory("A", 1, None, 8, 8, 0, "torch")  # given by its name, stored as the member
    assert gpu.source is MemorySource.TORCH and gpu.source.cuda and gpu.device == "cuda:1"
    assert DeviceMemory("cpu", None, None, 8, 8, 0, MemorySource.HOST).device == "cpu"
    with pytest.raises(ValueError, match="source must be one of"):
        DeviceMemory("A", 0, None, 8, 8, 0, "nvidia")
