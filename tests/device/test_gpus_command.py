"""``memguard gpus`` through the real NVML layer (memguard/device/_nvml.py) with a fake pynvml.

What a user reads when NVML fails or sees nothing: the reader's reasons, end to end through the
command line (moved from tests/cli/test_cli.py: they test the device layer's words).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from memguard.cli import EXIT_OK, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    """Install a fake pynvml (tests/_fake_nvml.py) and a torch without CUDA."""
    from _fake_nvml import FakeNvml

    from memguard.device import _nvml

    def install(gpus, **kwargs):
        fake = FakeNvml(gpus, **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake.module)
        _nvml.shutdown()
        return fake

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    yield install
    _nvml.shutdown()


@pytest.mark.parametrize(("error", "says"), [
    ("NVMLError_LibraryNotFound", "the NVML library (libnvidia-ml.so) was not found"),
    ("NVMLError_DriverNotLoaded", "the NVIDIA kernel driver is not loaded"),
    ("NVMLError_Unknown", "nvmlInit failed: NVMLError_Unknown"),
])
def test_gpus_says_why_nvml_failed(capsys, fake_nvml, error, says):
    import pynvml

    fake_nvml([], init_error=getattr(pynvml, error)())
    code, out, err = run(capsys, "gpus")
    assert (code, err) == (EXIT_OK, "")
    assert out.count("\n") == 1
    assert out.startswith("no GPU visible to this process (NVML: nvmlInit failed: ")
    assert says in out
    assert "torch: torch.cuda.is_available() is False" in out
    assert out.rstrip().endswith("plan against a catalog GPU (--gpu A100-80GB) or a size (--gpu 24GiB)")
    code, out, _ = run(capsys, "gpus", "--json")
    data = json.loads(out)
    assert data["devices"] == [] and says in data["reason"]


def test_gpus_when_nvml_sees_no_device(capsys, fake_nvml, monkeypatch):
    fake_nvml([])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    code, out, _ = run(capsys, "gpus")
    assert code == EXIT_OK
    assert out.startswith("no GPU visible to this process (NVML works and sees no CUDA device with "
                          "CUDA_VISIBLE_DEVICES='-1'; torch: ")
