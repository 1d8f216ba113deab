"""The stated band: workspaces the trace sees but cannot size, the upper end, and the fit decided on it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import memguard
from memguard.estimation.cuda_rules import (
    CUBLAS_WORKSPACE_BYTES,
    CUDNN_WGRAD_SPLITS,
    ConvCall,
    attention_backward_bytes,
    conv_workspace_bytes,
)
from memguard.estimation.result import Category, MemoryEstimate
from memguard.fit import Fit

CUBLAS = "cublas: workspace of autograd's backward thread (8-32 MiB by GPU)"


class _PatchNet(nn.Module):
    """A ViT-like patch embedding (kernel = stride = 4) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, kernel_size=4, stride=4)
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.patch(x).flatten(1))


def test_conv_workspace_rule_numbers() -> None:
    call = ConvCall(input=(8, 3, 32, 32), weight=(32, 3, 4, 4), output=(8, 32, 8, 8), element_size=2,
                    grad_input=False, grad_weight=True)
    im2col = 3 * 4 * 4 * 8 * 64 * 2  # C_in x kernel x N x output positions x bytes
    assert conv_workspace_bytes(call) == {
        "forward": im2col, "weight gradient": max(im2col, min(CUDNN_WGRAD_SPLITS, 8 * 64) * 32 * 3 * 4 * 4 * 4)}
    assert conv_workspace_bytes(ConvCall((1, 3, 4, 4), (32, 3, 4, 4), (1, 32, 1, 1), 4, True, True)) == {
        "forward": 192, "data gradient": 192, "weight gradient": 1 * 1536 * 4}
    assert attention_backward_bytes((2, 4, 128, 64), (2, 4, 128, 64), (2, 4, 128, 64)) == 3 * 4 * 2 * 4 * 128 * 64


@pytest.mark.slow
def test_trace_states_the_conv_and_cublas_workspaces_in_the_band() -> None:
    example = torch.randn(8, 3, 32, 32)

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).mean()

    est = memguard.estimate(_PatchNet(), example_input=example, loss_fn=loss, device="cuda", method="trace",
                            precision="32-true", keep_output=False)
    (conv_item,) = [k for k in est.band if k.startswith("cudnn: convolution workspaces (1 calls")]
    wgrad = min(CUDNN_WGRAD_SPLITS, 8 * 64) * (32 * 3 * 4 * 4) * 4
    # The only convolution is the first: its weight gradient runs last in backward, so it adds what it
    # exceeds the peak by, from the live bytes at the end of backward.
    end = [live for _, phase, live in est.timeline if phase in ("backward", "block-backward")][-1]
    peak = max(live for _, _, live in est.timeline)
    assert 0 < est.band[conv_item] == end + wgrad - peak < wgrad
    assert est.band[CUBLAS] == CUBLAS_WORKSPACE_BYTES
    assert est.upper_bytes == est.total_bytes + est.band[conv_item] + CUBLAS_WORKSPACE_BYTES
    assert "upper (band)" in est.table() and "upper" in repr(est)
    # The point estimate is what it was: the band is never in total_bytes.
    assert est.total_bytes == sum(est.breakdown.values())
    cpu = memguard.estimate(_PatchNet(), example_input=example, loss_fn=loss, device="cpu", method="trace",
                            keep_output=False)
    assert cpu.band == {} and cpu.upper_bytes == cpu.total_bytes


def test_a_workspace_hidden_by_the_activations_adds_only_the_im2col_bound() -> None:
    """With many activations alive at the peak, the first convolution's weight gradient at the end of
    backward stays below the peak: the band keeps only the forward's im2col bound."""
    from memguard.estimation.cuda_rules import Workspaces

    call = ConvCall((8, 3, 32, 32), (32, 3, 4, 4), (8, 32, 8, 8), 2, False, True)
    seen = Workspaces(convs=[call])
    timeline = [(0, "forward", 100), (1, "forward", 10**9), (2, "backward", 10**9), (3, "backward", 1000),
                (4, "optimizer", 2000)]
    (item,) = [k for k in seen.band(timeline) if k.startswith("cudnn")]
    assert seen.band(timeline)[item] == conv_workspace_bytes(call)["forward"]
    assert seen.band(timeline, backward=False) == {item: conv_workspace_bytes(call)["forward"]}


def test_formula_band_is_the_cublas_workspace_only() -> None:
    est = memguard.estimate("gpt2", batch_size=1, seq_len=64, device="cuda", method="formula", keep_output=False)
    assert est.band == {CUBLAS: CUBLAS_WORKSPACE_BYTES}


def test_fit_decides_on_the_upper_end_and_round_trips() -> None:
    est = MemoryEstimate("trace", {Category.PARAMETERS: 900}, band={"cudnn: x": 200})
    assert est.upper_bytes == 1100
    assert not Fit(est, 1000, margin=0.0).fits  # the total (900) fits, the upper end does not
    assert Fit(est, 1100, margin=0.0).fits
    assert Fit(est, 1100, margin=0.0).spare_bytes == 0
    assert "(900 B + 200 B uncertain)" in Fit(est, 1000, margin=0.0).describe()
    assert not est.fits(1000, margin=0.0)
    back = MemoryEstimate.from_dict(est.to_dict())
    assert back.band == {"cudnn: x": 200} and back.upper_bytes == 1100
    assert est.to_dict()["upper_bytes"] == 1100
    assert Fit(MemoryEstimate("trace", {Category.PARAMETERS: 900}), 1000, margin=0.0).describe().startswith(
        "FITS: needs 900 B of")


def test_published_rows_of_2023_and_later_and_their_error_table(tmp_path) -> None:
    """30+ rows from 6+ sources the older rows do not use, each complete; the plot script's table and
    margin on a small file of records."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import published, published_plot

    old_sources = {r.url for r in published.ROWS}
    new = published.NEW_ROWS
    assert len(new) >= 30 and len({r.source for r in new}) >= 6
    assert not {r.url for r in new} & old_sources
    assert all(r.measured in published.QUANTITY and r.estimate and not r.incomplete for r in new)
    assert all(set(r.settings) >= {"model", "batch", "seq", "precision", "optimizer", "grad_ckpt", "strategy", "lora"}
               for r in new)
    assert len({r.key for r in published.ALL_ROWS}) == len(published.ALL_ROWS)

    records = [{"key": "a", "predictions": {"trace": {"error": -0.05, "upper_error": 0.01}}},
               {"key": "b", "predictions": {"trace": {"error": 0.02, "upper_error": 0.03}}},
               {"key": "c", "predictions": {"trace": {"error": "UnsupportedModelError"}}}]
    rows = published_plot.errors(records, "trace")
    assert rows == [("a", -0.05, 0.01), ("b", 0.02, 0.03)]
    assert published_plot.margin([e for _, e, _ in rows]) == 0.05
    assert published_plot.margin([u for _, _, u in rows]) == 0.0
    table = published_plot.markdown(rows)
    assert "| a | -5.0% | +1.0% |" in table and "| margin that covers every row | 5.0% | 0.0% |" in table
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": records[:2]}))
    png = tmp_path / "e.png"
    assert published_plot.main([str(path), "--png", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_check_json_and_text_state_the_band(capsys) -> None:
    from memguard.cli import EXIT_OK, main

    assert main(["check", "gpt2", "--batch-size", "1", "--seq-len", "32", "--method", "formula", "--gpu", "T4",
                 "--no-keep-output", "--json"]) == EXIT_OK

    data = json.loads(capsys.readouterr().out)
    assert data["band"] == {CUBLAS: CUBLAS_WORKSPACE_BYTES}
    assert data["upper_bytes"] == data["needed_bytes"] == data["total_bytes"] + CUBLAS_WORKSPACE_BYTES
    assert main(["estimate", "gpt2", "--batch-size", "1", "--seq-len", "32", "--method", "formula"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "upper (band)" in text and "cublas: workspace of autograd's backward thread" in text


def test_data_dependent_stand_ins_are_listed_in_the_band_unsized() -> None:
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            return y[torch.nonzero(y > 0, as_tuple=True)].sum()

    est = memguard.estimate(Picky(), example_input=torch.randn(4, 8), device="cpu", method="trace")
    assert est.uncertain
    (item,) = est.band
    assert item.startswith("data-dependent") and "nonzero" in item and est.band[item] == 0
    assert est.upper_bytes == est.total_bytes


# --------------------------------------------------------------------------- communication (NCCL)

NCCL_ONE = 32 * 2 * (4 * 2**20 + 512 * 2**10 + 4800 * 2**10)  # channels x ring connections x SIMPLE+LL+LL128


def _gpt2_tiny() -> object:
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=64)


def _nccl(est: MemoryEstimate) -> dict[str, int]:
    from memguard.estimation.cuda_rules import NCCL_BAND_ITEM

    return {k: v for k, v in est.band.items() if k.startswith(NCCL_BAND_ITEM)}


def test_nccl_buffers_at_nccls_defaults() -> None:
    """4 MiB SIMPLE + 512 KiB LL + 4800 KiB LL128 per connection (NCCL ``src/init.cc``), 32 channels, two
    ring connections: 588 MiB, within NVIDIA/nccl#964's 544-688 MB measured on A100s."""
    from memguard.estimation.cuda_rules import communication_band, nccl_buffer_bytes

    assert nccl_buffer_bytes() == NCCL_ONE == 616_562_688 == 588 * 2**20
    assert 544e6 < NCCL_ONE < 688e6
    assert nccl_buffer_bytes(2) == 2 * NCCL_ONE
    assert communication_band(1) == {} and list(communication_band(4).values()) == [NCCL_ONE]


@pytest.mark.parametrize("method", ["formula", pytest.param("trace", marks=pytest.mark.slow)])
def test_ddp_band_adds_nccl_outside_the_point_estimate(method: str) -> None:
    """Two DDP ranks on a GPU: the band states NCCL's buffers; the point estimate, which holds DDP's
    bucket copy of the gradients already, does not change by them (they are outside the allocator)."""
    config = _gpt2_tiny()
    kw = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": method}
    single = memguard.estimate(config, **kw)
    ddp = memguard.estimate(config, strategy="ddp", world_size=2, **kw)
    assert _nccl(single) == {}
    (item,) = _nccl(ddp).items()
    assert item[1] == NCCL_ONE and "outside the caching allocator" in item[0]
    trainable = sum(p.numel() for p in memguard.estimation.models.load_model(config).module.parameters()) * 4
    assert ddp.breakdown[Category.GRADIENTS] - single.breakdown[Category.GRADIENTS] == trainable  # the buckets
    assert ddp.upper_bytes - ddp.total_bytes == single.upper_bytes - single.total_bytes + NCCL_ONE
    cpu = memguard.estimate(config, strategy="ddp", world_size=2, **{**kw, "device": "cpu"})
    assert _nccl(cpu) == {}


def test_hybrid_sharding_across_nodes_holds_two_communicators() -> None:
    config = _gpt2_tiny()
    kw = {"batch_size": 2, "seq_len": 32, "device": "cuda", "method": "formula", "strategy": "fsdp_hybrid"}
    assert list(_nccl(memguard.estimate(config, world_size=8, **kw)).values()) == [NCCL_ONE]  # one node
    assert list(_nccl(memguard.estimate(config, world_size=16, **kw)).values()) == [2 * NCCL_ONE]


def test_a_ddp_step_that_fits_only_without_nccl_does_not_fit() -> None:
    """The guard, ``check`` and the search decide on the upper end: 100 MiB short of NCCL's buffers is short."""
    est = memguard.estimate(_gpt2_tiny(), batch_size=2, seq_len=32, device="cuda", method="formula",
                            strategy="ddp", world_size=2)
    free = est.upper_bytes - 100 * 2**20
    assert est.total_bytes < free and not Fit(est, free, 0.0).fits and Fit(est, est.upper_bytes, 0.0).fits


@pytest.mark.slow
def test_published_allocator_statistics_leave_nccl_out_of_the_upper_end() -> None:
    """Lightning's 2-GPU DDP row measured ``max_memory_allocated``: the band's NCCL item (outside the
    caching allocator) is stated but not added to the upper end of that statistic; the rows the
    sources' scripts fixed run what the sources ran."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import published

    rows = {r.key: r for r in published.ALL_ROWS}
    out = published.predict(rows["lt-ddp"], "formula")
    assert list(_nccl(MemoryEstimate("formula", {}, band=out["band"])).values()) == [NCCL_ONE]
    assert out["upper_predicted_bytes"] == out["predicted_bytes"] + sum(out["band"].values()) - NCCL_ONE
    assert rows["lh-tinyllama-full"].estimate()[1]["accumulate_grad_batches"] == 8  # 32 // 4 (full.yaml)
    assert rows["lh-llama2-7b-qlora"].estimate()[1]["accumulate_grad_batches"] == 4  # 8 // 2 (qlora.yaml)
    assert rows["aop-vith-adamw"].estimate()[1]["optimizer"] == "adam"  # ao commit 56d46a286's "Adam"
