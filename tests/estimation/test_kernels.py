"""Fake-kernel corrections: the sizes the real kernels return, and the trace counting them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import memguard
from memguard import Category
from memguard.estimation.kernels import (
    corrected,
    mkldnn_lstm_backward_transient,
    mkldnn_lstm_forward_written,
    mkldnn_lstm_workspace,
)

_RNN_LAYER = torch.ops.aten.mkldnn_rnn_layer.default


class _Workspaces(TorchDispatchMode):
    """The workspaces the real ``mkldnn_rnn_layer`` returns, with the sizes of its call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _RNN_LAYER:
            steps, batch, width = args[0].shape
            self.seen.append((steps, batch, width, args[10], out[3].numel()))
        return out


def _lstm(width: int, hidden: int, layers: int, bidirectional: bool = False) -> nn.LSTM:
    torch.manual_seed(0)
    return nn.LSTM(width, hidden, layers, bidirectional=bidirectional, batch_first=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(("width", "hidden", "layers", "bidirectional", "batch", "steps"), [
    (32, 64, 2, True, 3, 17),     # bidirectional: the second layer reads 2 x 64
    (300, 100, 1, False, 5, 7),   # input wider than the hidden state
    (64, 256, 2, False, 4, 50),   # 4 x 256 gates: a leading dimension moved off 1024
    (8, 8, 1, False, 1, 1),       # smaller than a page in every part
])
def test_lstm_workspace_is_the_real_kernels(width, hidden, layers, bidirectional, batch, steps) -> None:
    lstm = _lstm(width, hidden, layers, bidirectional)
    seen = _Workspaces()
    with seen:
        lstm(torch.randn(batch, steps, width))
    assert len(seen.seen) == layers * (2 if bidirectional else 1)
    for t, b, w, h, real in seen.seen:
        assert real > 0
        assert mkldnn_lstm_workspace(t, b, w, h) == real


def test_the_trace_keeps_each_layers_workspace_until_backward() -> None:
    lstm = _lstm(256, 512, 2)
    batch = torch.randn(16, 64, 256)
    est = memguard.estimate(lstm, example_input=batch, loss_fn=lambda out, b: out[0].sum(),
                            optimizer="sgd", device="cpu", method="trace")
    per_layer = mkldnn_lstm_workspace(64, 16, 256, 512)  # 30.8 MiB; states are max(input, hidden) wide
    second = mkldnn_lstm_workspace(64, 16, 512, 512)
    assert per_layer == second == 32_321_536
    # On the CPU each layer's workspace is resident as far as its forward wrote it: 10.1 MiB.
    written = mkldnn_lstm_forward_written(64, 16, 256, 512)
    assert written == mkldnn_lstm_forward_written(64, 16, 512, 512) == 10_653_696
    kept = [p for p in est.at_peak if p.dtype == "torch.uint8" and p.category is Category.ACTIVATIONS]
    assert sum(p.nbytes for p in kept) >= 2 * written  # both alive at the end of the forward
    assert sum(p.nbytes for p in kept) < per_layer + second
    # The top layer's backward holds the rest beside them (its transient, inside the op).
    inside = sum(p.nbytes for p in est.at_peak if p.where == "(inside an op)")
    assert inside >= mkldnn_lstm_backward_transient(64, 16, 512, 512)
    assert est.notes == ()


def test_a_cuda_estimate_keeps_the_whole_workspace() -> None:
    """The GPU estimate counts the workspace's full allocation (what an allocator holds) and no
    transient in the backward: unchanged by the CPU's resident-page rule."""
    lstm = _lstm(256, 512, 2)
    batch = torch.randn(16, 64, 256)
    est = memguard.estimate(lstm, example_input=batch, loss_fn=lambda out, b: out[0].sum(),
                            optimizer="sgd", device="cuda", method="trace")
    kept = [p for p in est.at_peak if p.dtype == "torch.uint8" and p.category is Category.ACTIVATIONS]
    assert sum(p.nbytes for p in kept) >= 2 * mkldnn_lstm_workspace(64, 16, 256, 512)
    assert not [p for p in est.at_peak if p.where == "(inside an op)"]
    with FakeTensorMode():
        x = torch.empty(64, 16, 256)
        args = (x, *(torch.empty(2048, 256), torch.empty(2048, 512), torch.empty(2048), torch.empty(2048)),
                torch.empty(16, 512), torch.empty(16, 512), False, [], 2, 512, 1, True, False, False, True)
        out = _RNN_LAYER(*args)
        assert corrected(_RNN_LAYER, args, out, "cuda")[3].numel() == mkldnn_lstm_workspace(64, 16, 256, 512)
        assert corrected(_RNN_LAYER, args, out, "cpu")[3].numel() == mkldnn_lstm_forward_written(64, 16, 256, 512)


_LSTM_PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
def status():
    s = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(s["VmRSS"].split()[0]) * 1024, int(s["VmHWM"].split()[0]) * 1024
steps, batch, width, hidden = map(int, sys.argv[1:])
torch.manual_seed(0)
lstm = torch.nn.LSTM(width, hidden, 1)
w = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
x, hx, cx = torch.randn(steps, batch, width), torch.randn(batch, hidden), torch.randn(batch, hidden)
out = {}
for _ in range(2):  # the second round: lazy initialisation done
    before, _ = status()
    y, hy, cy, ws = (t.detach() for t in torch.ops.aten.mkldnn_rnn_layer(
        x, *w, hx, cx, False, [steps], 2, hidden, 1, True, False, False, True))
    out["forward"] = status()[0] - before - y.numel() * 4  # resident growth beside the output
    dy, dhy, dcy = torch.randn(y.shape), torch.randn(hy.shape), torch.randn(cy.shape)
    before, _ = status()
    open("/proc/self/clear_refs", "w").write("5")
    grads = torch.ops.aten.mkldnn_rnn_layer_backward(x, *w, hx, cx, y, hy, cy, dy, dhy, dcy, False, 2, hidden, 1,
                                                     True, True, False, [steps], False, ws)
    out["backward"] = status()[1] - before - sum(g.numel() * g.element_size() for g in grads)
    del y, hy, cy, ws, grads
print(json.dumps(out))
"""


@pytest.mark.slow  # a subprocess each
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(("steps", "batch", "width", "hidden"), [
    (64, 16, 512, 512),   # the benchmark's second layer, a quarter of its steps: 30.8 MiB workspace
    (128, 8, 128, 256),   # narrower, longer: 15.6 MiB
])
def test_the_cpu_lstm_rules_are_what_the_real_kernel_holds(steps, batch, width, hidden) -> None:
    """The forward's resident growth beside its output is the forward-written workspace, and the
    backward's peak beyond its inputs and gradients its transient (``VmHWM`` in a fresh process with
    the truth's allocator settings: every buffer of 64 KiB or more its own mapping)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    done = subprocess.run([sys.executable, "-c", _LSTM_PROBE, *map(str, (steps, batch, width, hidden))],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    measured = json.loads(done.stdout)
    written = mkldnn_lstm_forward_written(steps, batch, width, hidden)
    held = mkldnn_lstm_backward_transient(steps, batch, width, hidden)
    assert written < mkldnn_lstm_workspace(steps, batch, width, hidden) / 2  # the forward writes a third
    mib = 2**20
    # Never low by more than the small buffers the rules leave out; high by at most a few per cent
    # (the backward's reading moves by ~0.1 MiB from run to run; the rule is ~0.7 MiB high on the
    # smaller shape, where a step's rows and the pages' rounding weigh more).
    assert measured["forward"] - mib / 4 <= written <= 1.05 * measured["forward"]
    assert measured["backward"] - mib / 2 <= held <= 1.03 * measured["backward"] + mib


def test_on_cuda_the_estimate_names_the_reserve_space_it_cannot_size() -> None:
    est = memguard.estimate(_lstm(16, 32, 1), example_input=torch.randn(2, 8, 16),
                            loss_fn=lambda out, b: out[0].sum(), optimizer="sgd", device="cuda", method="trace")
    assert any("cuDNN's RNN reserve space" in n for n in est.notes)


# -- oneDNN convolutions: what the real kernel holds inside the op --------------------------------

_CONV_PROBE = r"""
import json, sys, torch
def hwm_over_rss():
    s = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return (int(s["VmHWM"].split()[0]) - int(s["VmRSS"].split()[0])) * 1024
n, c, hw, o, k, cl = map(int, sys.argv[1:])
fmt = torch.channels_last if cl else torch.contiguous_format
x = torch.randn(n, c, hw, hw).to(memory_format=fmt).requires_grad_()
w = torch.randn(o, c, k, k).to(memory_format=fmt).requires_grad_()
out = {}
for _ in range(2):  # the second round: lazy initialisation done
    open("/proc/self/clear_refs", "w").write("5")
    y = torch.ops.aten.convolution(x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1)
    out["forward"] = hwm_over_rss()
    dy = torch.randn(y.shape)  # contiguous NCHW, as a loss's gradient comes
    open("/proc/self/clear_refs", "w").write("5")
    grads = torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1,
                                                [True, True, False])
    out["backward"] = hwm_over_rss()
    del y, dy, grads
print(json.dumps(out))
"""


def _measured_conv(n: int, c: int, hw: int, o: int, k: int, channels_last: bool) -> dict[str, int]:
    """VmHWM - VmRSS after one real convolution forward and backward (bytes held inside the op), in
    a process with the truth's allocator settings (every buffer of 64 KiB or more its own mapping)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # torch's backend choice depends on it
    done = subprocess.run([sys.executable, "-c", _CONV_PROBE, *map(str, (n, c, hw, o, k, int(channels_last)))],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.slow  # a subprocess each
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(("c", "o", "k", "channels_last"), [
    (64, 64, 3, False),   # NCHW: blocked copies of x and y in the forward, of dy and x in the backward
    (128, 64, 1, False),  # a 1 x 1 shortcut: the input twice the output
    (64, 64, 3, True),    # channels-last: viewed, only dy (NCHW) is copied to channels-last
])
def test_conv_transient_is_what_the_real_kernel_holds(c, o, k, channels_last) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memguard.estimation.kernels import transient

    n, hw = 4, 64  # 4 x 64 x 64 x 64 fp32: 4 MiB
    measured = _measured_conv(n, c, hw, o, k, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv, conv_backward = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
    with FakeTensorMode():  # fake CPU tensors, as the trace has them
        x = torch.empty(n, c, hw, hw).to(memory_format=fmt)
        w = torch.empty(o, c, k, k).to(memory_format=fmt)
        args = (x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1)
        y = conv(*args)
        dy = torch.empty(n, o, hw, hw)
        forward = transient(conv, args, y, "cpu")
        backward = transient(conv_backward, (dy, x, w, None, *args[3:], [True, True, False]), None, "cpu")
    mib = 2**20
    # The rule leaves out the kernels' scratchpads (a few hundred KiB at most here), and counts a
    # copy's pages before the kernel has written them all.
    assert 0.95 * forward - mib / 4 <= measured["forward"] <= forward + mib / 2
    assert 0.95 * backward - mib / 4 <= measured["backward"] <= backward + mib / 2
    if not channels_last:
        assert forward == n * max(c, o) * hw * hw * 4 + w.numel() * 4  # the larger blocked copy, and the weights'
    else:
        assert forward == 0 and backward == n * o * hw * hw * 4 + w.numel() * 4  # the copy of dy


def _two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))


def test_the_cpu_trace_holds_the_conv_copies_inside_the_op_and_cuda_does_not() -> None:
    from memguard.estimation.kernels import mkldnn_conv_transient

    batch = torch.randn(4, 8, 64, 64)
    kwargs = dict(example_input=batch, loss_fn=lambda out, b: out.sum(), optimizer="sgd", method="trace")
    cpu = memguard.estimate(_two_convs(), device="cpu", **kwargs)
    inside = [p for p in cpu.at_peak if p.where == "(inside an op)"]
    with torch.device("meta"):
        x, w, dy = torch.empty(4, 64, 64, 64), torch.empty(64, 64, 3, 3), torch.empty(4, 64, 64, 64)
    second = mkldnn_conv_transient(x, w, grad_output=dy, output_mask=(True, True, True))
    assert second == 2 * 4 * 64 * 64 * 64 * 4  # dy and x blocked beside grad_input, while the weights compute
    # The peak is the second convolution's backward: its copies beside its grad_input, and a dense
    # copy of its grad_output (the gradient of .sum() is an expanded scalar, not contiguous).
    held = second + 4 * 64 * 64 * 64 * 4
    assert [(p.category, p.nbytes) for p in inside] == [(Category.TEMPORARY, -(-(held + 64) // 4096) * 4096)]
    cuda = memguard.estimate(_two_convs(), device="cuda", **kwargs)
    assert not [p for p in cuda.at_peak if p.where == "(inside an op)"]
