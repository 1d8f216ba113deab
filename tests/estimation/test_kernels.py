"""Fake-kernel corrections: the sizes the real kernels return, and the trace counting them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import memguard
from memguard import Category
from memguard.estimation.kernels import mkldnn_lstm_workspace

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
    kept = [p for p in est.at_peak if p.dtype == "torch.uint8" and p.category is Category.ACTIVATIONS]
    assert sum(p.nbytes for p in kept) >= per_layer + second  # both alive at the end of the forward
    assert est.notes == ()


def test_on_cuda_the_estimate_names_the_reserve_space_it_cannot_size() -> None:
    est = memguard.estimate(_lstm(16, 32, 1), example_input=torch.randn(2, 8, 16),
                            loss_fn=lambda out, b: out[0].sum(), optimizer="sgd", device="cuda", method="trace")
    assert any("cuDNN's RNN reserve space" in n for n in est.notes)
