"""Mixture of experts: the routing model of the trace and the formula, both of transformers' experts
implementations, and the stand-ins every estimate names (``memguard.estimation.stand_ins``)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

import memguard
from memguard import Category, ConfigError, TraceError, UnsupportedModelError
from memguard.cli import EXIT_OK, EXIT_USAGE, main
from memguard.estimation.stand_ins import expert_load, resolve_routing, routed_indices

MIB = 2**20


def mixtral(implementation: str = "grouped_mm", **overrides: object) -> nn.Module:
    """A 2-layer Mixtral, 4 experts top-2, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": False, **overrides}
    config = AutoConfig.for_model("mixtral", experts_implementation=implementation, **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def qwen2_moe(implementation: str = "grouped_mm") -> nn.Module:
    """A 2-layer Qwen2-MoE with a gated shared expert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
        experts_implementation=implementation)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trace(model: nn.Module, **kwargs: object) -> memguard.MemoryEstimate:
    return memguard.estimate(model, 4, 64, device="cpu", method="trace", **kwargs)


@functools.cache
def traced(implementation: str, precision: str = "32-true", routing: str = "balanced") -> memguard.MemoryEstimate:
    """The trace of :func:`mixtral`, once per test session."""
    return trace(mixtral(implementation), precision=precision, moe_routing=routing)


def experts_bytes(est: memguard.MemoryEstimate) -> int:
    """Activations the experts of every layer keep at the peak."""
    return sum(g.nbytes for g in est.at_peak
               if g.category is Category.ACTIVATIONS and ".mlp.experts" in g.where)


# -- the routing model ----------------------------------------------------------------------------


def test_balanced_routing_gives_every_expert_its_share_and_each_token_distinct_experts() -> None:
    idx = routed_indices(rows=100, k=2, n=8)
    assert idx.shape == (100, 2)
    assert torch.bincount(idx.flatten(), minlength=8).tolist() == [25] * 8
    assert bool((idx[:, 0] != idx[:, 1]).all())


def test_worst_routing_sends_every_token_to_the_same_experts() -> None:
    idx = routed_indices(rows=100, k=2, n=8, capacity=float("inf"))
    assert torch.bincount(idx.flatten(), minlength=8).tolist() == [100, 100, 0, 0, 0, 0, 0, 0]


def test_capacity_factor_caps_the_busiest_expert() -> None:
    idx = routed_indices(rows=100, k=2, n=8, capacity=1.5)
    counts = torch.bincount(idx.flatten(), minlength=8).tolist()
    assert max(counts) == expert_load(100, 2, 8, 1.5) == 38  # ceil(1.5 * 100 * 2 / 8)
    assert sum(counts) == 200
    assert bool((idx[:, 0] != idx[:, 1]).all())


@pytest.mark.parametrize("bad", ["fair", 0.5, True, float("nan"), None])
def test_bad_routing_is_a_config_error_naming_it(bad: object) -> None:
    with pytest.raises(ConfigError, match="moe_routing"):
        resolve_routing(bad)


# -- the trace ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_grouped_mm_experts_trace_outside_bf16(precision: str) -> None:
    """torch's meta kernel of _grouped_mm demands bf16; the CPU and CUDA kernels take fp32."""
    est = traced("grouped_mm", precision)
    assert est.method == "trace"
    assert est.stand_ins == {"topk": "MoE routing: balanced"}
    assert not est.uncertain
    # every layer keeps the experts' saved tensors for 4 * 64 tokens, 2 experts each
    pairs = 4 * 64 * 2
    assert experts_bytes(est) >= 2 * pairs * (2 * 64 + 4 * 128) * 4


@pytest.mark.slow
def test_eager_experts_loop_runs_every_expert_on_the_routing_model() -> None:
    """The loop's `if expert_idx == num_experts: continue` sees the routing, not a stand-in True."""
    grouped, eager = traced("grouped_mm"), traced("eager")
    assert eager.stand_ins == {"topk": "MoE routing: balanced"}
    assert not eager.uncertain
    # the same pairs are saved either way (a loop that skipped its experts saved none); the loop's
    # index_add_ also keeps its source (h per pair)
    pairs = 4 * 64 * 2
    assert experts_bytes(eager) >= experts_bytes(grouped) + 2 * pairs * 64 * 4


@pytest.mark.slow
def test_worst_routing_raises_the_eager_loops_peak_but_not_grouped_mms() -> None:
    """Routing moves only the loop's per-expert temporaries (every expert's pairs are saved either
    way): with wide experts and many tokens the peak is in a block's backward, where they count."""
    def peaks(implementation: str, method: str) -> list[int]:
        model = mixtral(implementation, intermediate_size=512)
        ests = [memguard.estimate(model, 16, 64, device="cpu", method=method, moe_routing=r)
                for r in ("balanced", "worst")]
        if method == "trace":
            assert [e.stand_ins["topk"] for e in ests] == ["MoE routing: balanced", "MoE routing: worst"]
        return [e.peak_bytes for e in ests]

    for method in ("trace", "formula"):
        balanced, worst = peaks("eager", method)
        assert worst > balanced
        balanced, worst = peaks("grouped_mm", method)
        assert worst == balanced


# -- the formula ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("build", "implementation", "precision"), [
    (mixtral, "grouped_mm", "32-true"), (mixtral, "eager", "bf16-true"),
    (qwen2_moe, "grouped_mm", "bf16-mixed"), (qwen2_moe, "eager", "32-true"),
])
def test_formula_models_the_experts_within_5_percent_of_the_trace(build, implementation, precision) -> None:
    model = build(implementation)
    formula = memguard.estimate(model, 4, 64, device="cpu", method="formula", precision=precision)
    assert formula.peak_bytes == pytest.approx(trace(model, precision=precision).peak_bytes, rel=0.05)


def test_formula_counts_the_experts_not_one_dense_mlp() -> None:
    """Four experts of width 128 on 2 of 4 choices save twice what one MLP of width 128 would."""
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = memguard.estimate(mixtral(), 4, 64, device="cpu", method="formula")
    dense_config = AutoConfig.for_model("mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        tie_word_embeddings=False)
    with torch.device("meta"):
        dense = memguard.estimate(AutoModelForCausalLM.from_config(dense_config), 4, 64, device="cpu",
                                  method="formula")
    extra = moe.breakdown[Category.ACTIVATIONS] - dense.breakdown[Category.ACTIVATIONS]
    # per layer and token: two pairs of (gathered input, 4 ffn, weighted output) instead of one MLP's 4 ffn
    assert extra >= 2 * 4 * 64 * (2 * (2 * 64 + 4 * 128) - 4 * 128) * 4


@pytest.mark.slow
def test_formula_refuses_latent_attention_and_auto_traces() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        memguard.estimate(model, 2, 32, device="cpu", method="formula")
    est = memguard.estimate(model, 2, 32, device="cpu")
    assert est.method == "trace" and est.stand_ins == {"topk": "MoE routing: balanced"}


# -- stand-ins that nothing models ----------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.abs().max().item() > 1e6:  # decided by a stand-in value
            h = h / 2
        return h.mean()


def test_an_unmodelled_stand_in_makes_the_estimate_uncertain() -> None:
    est = memguard.estimate(Branchy(), example_input=torch.randn(4, 16), device="cpu", method="trace")
    assert est.stand_ins == {"_local_scalar_dense": "ones"}
    assert est.uncertain
    assert "uncertain: data-dependent _local_scalar_dense ran on stand-in values of ones" in est.table()
    data = est.to_dict()
    assert data["uncertain"] is True and data["stand_ins"] == {"_local_scalar_dense": "ones"}
    assert memguard.MemoryEstimate.from_dict(json.loads(json.dumps(data))) == est


def test_the_result_and_the_trace_name_unmodelled_stand_ins_alike() -> None:
    from memguard.estimation import result, stand_ins

    assert result._ONES == stand_ins.ONES


def test_an_estimate_without_stand_ins_reads_back_from_an_old_dict() -> None:
    old = {"method": "formula", "breakdown": {"parameters": 10}}
    est = memguard.MemoryEstimate.from_dict(old)
    assert est.stand_ins == {} and not est.uncertain and est.stand_in_line() == ""


class Indexing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = (nn.Linear(8, 1),)
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int((self.body(x) > 1e9).sum().item())  # 0 on real data, 1 on a stand-in of ones
        return self.heads[n](x).mean()


def test_a_trace_that_fails_after_a_stand_in_names_it() -> None:
    with pytest.raises(TraceError, match=r"stand-in values of ones \(_local_scalar_dense x1\), which may be"):
        memguard.estimate(Indexing(), example_input=torch.randn(4, 8), device="cpu", method="trace")


# -- the command line ------------------------------------------------------------------------------


def tiny_mixtral_eager() -> nn.Module:
    """``package.module:factory`` for the CLI."""
    return mixtral("eager")


@pytest.mark.slow
def test_cli_shows_the_stand_ins_in_one_line_and_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "test_moe:tiny_mixtral_eager", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
            "--method", "trace"]
    assert main([*args, "--moe-routing", "worst"]) == EXIT_OK
    text = capsys.readouterr().out
    assert [ln for ln in text.splitlines() if "stand-ins" in ln] == [
        "stand-ins modelled: topk (MoE routing: worst)"]
    assert main([*args, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["stand_ins"] == {"topk": "MoE routing: balanced"} and data["uncertain"] is False
    assert data["inputs"]["moe_routing"] == "balanced"
    assert main([*args, "--moe-routing", "0.5"]) == EXIT_USAGE
    assert "capacity factor >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("a_shape", "b_shape", "offs"), [
    ((12, 16), (3, 16, 8), [4, 8, 12]),  # the experts' case: tokens sorted by expert x per-expert weights
    ((16, 12), (12, 8), [4, 8, 12]),  # 2-D x 2-D: the weight gradient, one product per group
])
def test_grouped_mm_correction_gives_what_the_cpu_kernel_gives(a_shape, b_shape, offs) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memguard.estimation.fake_kernels import corrected

    a, b = torch.randn(a_shape), torch.randn(b_shape)
    offsets = torch.tensor(offs, dtype=torch.int32)
    real = torch._grouped_mm(a, b, offs=offsets)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = corrected(torch.ops.aten._grouped_mm.default, (a, b, offsets), {})
        bf16 = corrected(torch.ops.aten._grouped_mm.default, (a.bfloat16(), b.bfloat16(), offsets), {})
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype) == (real.shape, torch.float32)
    assert bf16 is None  # bf16 takes torch's own fake kernel
