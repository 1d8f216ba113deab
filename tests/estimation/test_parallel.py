"""Per-device memory under DDP, FSDP and DeepSpeed ZeRO, offload, and LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memguard
from memguard import Category, ConfigError
from memguard.estimation.parallel import Parallelism, Strategy, resolve_parallelism, wrapped_blocks
from memguard.estimation.trace import Phase

P, G, OPT = Category.PARAMETERS, Category.GRADIENTS, Category.OPTIMIZER_STATE


@pytest.mark.parametrize(("strategy", "paper_gb"), [
    ("ddp", 120.0),                # ZeRO paper, Figure 1: Ψ = 7.5B, N = 64, K = 12 (mixed-precision Adam)
    ("deepspeed_stage_1", 31.4),
    ("deepspeed_stage_2", 16.6),
    ("deepspeed_stage_3", 1.9),
])
def test_model_state_shares_reproduce_the_zero_paper(strategy: str, paper_gb: float) -> None:
    psi, n = 7.5e9, 64
    share = resolve_parallelism(strategy, n).factors()
    per_device = 2 * psi * share[P] + 2 * psi * share[G] + 12 * psi * share[OPT]
    assert round(per_device / 1e9, 1) == paper_gb


def _linear(strategy: str, world_size: int, **kwargs) -> memguard.MemoryEstimate:
    model = nn.Linear(1024, 1024, bias=False)  # 4 MiB of fp32 weights, a multiple of 512
    return memguard.estimate(model, example_input=torch.randn(64, 1024), loss_fn=lambda out, batch: out.sum(),
                             optimizer="adamw", device="cuda", method="trace", strategy=strategy,
                             world_size=world_size, **kwargs)


def test_trace_shards_each_allocation() -> None:
    mib4 = 4 * 2**20
    single = _linear("single", 1)
    assert (single.breakdown[P], single.breakdown[G], single.breakdown[OPT]) == (mib4, mib4, 2 * mib4 + 512)
    ddp = _linear("ddp", 4)
    assert ddp.breakdown[G] == 2 * mib4  # the gradient and DDP's bucket copy of it
    zero2 = _linear("deepspeed_stage_2", 4)
    # Parameters whole plus an all-gather bucket of the model's size (under 2e8 elements); gradients
    # and Adam's moments a quarter each, plus a reduce bucket; the foreach temporary a quarter too.
    assert zero2.breakdown[P] == 2 * mib4
    assert zero2.breakdown[OPT] == (2 * mib4 + 512) // 4
    assert zero2.breakdown[Category.TEMPORARY] == mib4 // 4
    zero3 = _linear("deepspeed_stage_3", 4)
    assert zero3.peak_bytes < zero2.peak_bytes < ddp.peak_bytes
    offload = _linear("deepspeed_stage_3", 4, offload_optimizer=True, offload_params=True)
    assert offload.breakdown[OPT] == 0
    # Parameter and state shards on the host: the weight, Adam's two moments and its step counter.
    assert offload.host_bytes == (mib4 + 2 * mib4 + 4) // 4


@pytest.mark.slow
def test_llama_fsdp_fits_where_single_device_does_not() -> None:
    single = memguard.estimate("llama-2-7b", 1, 1024, precision="bf16-true", method="trace")
    fsdp = memguard.estimate("llama-2-7b", 1, 1024, precision="bf16-true", method="trace",
                             strategy="fsdp", world_size=8)
    psi = 6_738_415_616
    assert single.peak_bytes > 8 * psi  # weights, gradients and two moments in bf16 at least
    assert fsdp.peak_bytes < single.peak_bytes / 2
    assert fsdp.inputs["strategy"] == "fsdp" and fsdp.inputs["world_size"] == 8


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"strategy": "horovod"}, "unknown strategy 'horovod'"),
    ({"strategy": "ddp", "world_size": 0}, "world_size must be a positive integer, got 0"),
    ({"strategy": "single", "world_size": 2}, "strategy 'single' runs on one device"),
    ({"strategy": "ddp", "world_size": 2, "offload_optimizer": True}, "offload_optimizer needs a sharded"),
    ({"strategy": "deepspeed_stage_2", "world_size": 2, "offload_params": True}, "offload_params needs"),
    ({"strategy": "fsdp_hybrid", "world_size": 12}, "not a multiple of 8 ranks per node"),
    ({"strategy": 3}, "strategy must be a name such as 'ddp'"),
    ({"strategy": "ddp", "world_size": True}, "world_size must be a positive integer, got True"),
    ({"strategy": "ddp", "world_size": float("inf")}, "world_size must be a positive integer, got inf"),
    ({"strategy": "ddp", "world_size": 2**31}, "world_size=2,147,483,648 is past any device"),
    ({"strategy": "fsdp", "world_size": 2, "offload_params": "no"}, "offload_params must be True or False, got 'no'"),
    ({"strategy": "fsdp", "world_size": 2, "offload_optimizer": 1}, "offload_optimizer must be True or False, got 1"),
])
def test_bad_strategies(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        memguard.estimate("gpt2", 1, 16, **kwargs)


# The ZeRO table of memguard/estimation/parallel.py's docstring: which state a rank keeps a shard of.
ZERO_TABLE = {  # strategy: (parameters, gradients, optimizer state)
    "single": (False, False, False),
    "ddp": (False, False, False),
    "deepspeed_stage_1": (False, False, True),
    "deepspeed_stage_2": (False, True, True),
    "fsdp_shard_grad_op": (False, True, True),
    "deepspeed_stage_3": (True, True, True),
    "fsdp": (True, True, True),
    "fsdp_hybrid": (True, True, True),
}


def test_each_strategy_shards_what_the_zero_table_says() -> None:
    assert set(ZERO_TABLE) == {s.value for s in Strategy}
    for name, (params, grads, states) in ZERO_TABLE.items():
        s = Strategy(name)
        assert (s.shards_parameters, s.shards_gradients, s.shards_optimizer_state) == (params, grads, states), name
        assert (s.shards(P), s.shards(G), s.shards(OPT), s.shards(Category.ACTIVATIONS)) == (params, grads, states,
                                                                                          False)
        assert s.sharded == states and s.fully_sharded == params
        share = resolve_parallelism(name, 1 if s is Strategy.SINGLE else 8).factors()
        n = 8 if s.sharded else 1  # the hybrid's 8 ranks make one node
        assert share == {P: 1 / n if params else 1.0, G: 1 / n if grads else 1.0, OPT: 1 / n if states else 1.0}
    assert [s.value for s in Strategy if s.is_fsdp] == ["fsdp", "fsdp_shard_grad_op", "fsdp_hybrid"]
    assert [s.value for s in Strategy if s.is_deepspeed] == [f"deepspeed_stage_{i}" for i in (1, 2, 3)]


def test_a_strategy_is_its_plain_name() -> None:
    import json

    assert str(Strategy.FSDP) == f"{Strategy.FSDP}" == "fsdp" == Strategy.FSDP
    assert json.dumps({"s": Strategy.DEEPSPEED_STAGE_3}) == '{"s": "deepspeed_stage_3"}'
    est = memguard.estimate("gpt2", 1, 16, method="formula", strategy=Strategy.FSDP, world_size=2)
    assert type(est.inputs["strategy"]) is str and est.inputs["strategy"] == "fsdp"
    assert Parallelism("ddp_spawn").strategy is Strategy.DDP  # a name given to the dataclass is parsed


@pytest.mark.parametrize(("name", "strategy", "offloads"), [
    ("auto", Strategy.SINGLE, (False, False)),
    (None, Strategy.SINGLE, (False, False)),
    ("dp", Strategy.SINGLE, (False, False)),
    ("DDP-Spawn", Strategy.DDP, (False, False)),
    ("ddp_find_unused_parameters_true", Strategy.DDP, (False, False)),
    ("full_shard", Strategy.FSDP, (False, False)),
    ("shard_grad_op", Strategy.FSDP_SHARD_GRAD_OP, (False, False)),
    ("hybrid_shard", Strategy.FSDP_HYBRID, (False, False)),
    ("fsdp_cpu_offload", Strategy.FSDP, (True, True)),
    ("deepspeed", Strategy.DEEPSPEED_STAGE_2, (False, False)),
    ("deepspeed_stage_2_offload", Strategy.DEEPSPEED_STAGE_2, (True, False)),
    (" deepspeed_stage_3_offload ", Strategy.DEEPSPEED_STAGE_3, (True, True)),
    ("fsdp", Strategy.FSDP, (False, False)),
    (Strategy.DEEPSPEED_STAGE_1, Strategy.DEEPSPEED_STAGE_1, (False, False)),
])
def test_parse_reads_lightning_names(name: str | None, strategy: Strategy, offloads: tuple[bool, bool]) -> None:
    assert Strategy.parse(name) is strategy
    assert Strategy.offloads_named(name) == offloads


@pytest.mark.parametrize(("name", "match"), [
    ("zero", r"unknown strategy 'zero'; expected one of single, ddp, fsdp, fsdp_shard_grad_op, fsdp_hybrid, "
             r"deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_3 \(or Lightning's names auto, dp, ddp_spawn"),
    ("deepspeed_stage_4", "unknown strategy 'deepspeed_stage_4'"),
    ("fsdp2", "unknown strategy 'fsdp2'"),
    (3, "strategy must be a name such as 'ddp' or 'fsdp', got int 3; expected one of single, ddp"),
])
def test_parse_names_a_bad_value_and_the_accepted_ones(name: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Strategy.parse(name)  # type: ignore[arg-type]


def test_lightning_strategy_objects_map_to_strategies() -> None:
    modes = {m: Strategy.from_fsdp_mode(m) for m in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD",
                                                      "_HYBRID_SHARD_ZERO2", "NO_SHARD", "SOMETHING_NEW")}
    assert modes == {"FULL_SHARD": Strategy.FSDP, "SHARD_GRAD_OP": Strategy.FSDP_SHARD_GRAD_OP,
                     "HYBRID_SHARD": Strategy.FSDP_HYBRID, "_HYBRID_SHARD_ZERO2": Strategy.FSDP_HYBRID,
                     "NO_SHARD": Strategy.DDP, "SOMETHING_NEW": None}
    assert [Strategy.from_deepspeed_stage(i) for i in range(5)] == [
        Strategy.DDP, Strategy.DEEPSPEED_STAGE_1, Strategy.DEEPSPEED_STAGE_2, Strategy.DEEPSPEED_STAGE_3, Strategy.DDP]


def test_sharded_weights_by_phase() -> None:
    zero2 = resolve_parallelism("deepspeed_stage_2", 4)
    assert zero2.weight(Category.TEMPORARY, Phase.OPTIMIZER) == 1 / 4  # the step runs on the local shard
    assert zero2.weight(Category.TEMPORARY, Phase.BACKWARD) == 1.0
    assert zero2.weight(P, Phase.FORWARD) == 1.0 and zero2.weight(G, Phase.BACKWARD) == 1 / 4
    offload = resolve_parallelism("fsdp", 4, offload_params=True)
    assert offload.factors() == {P: 0.0, G: 0.0, OPT: 1 / 4}  # FSDP's CPUOffload keeps gradient shards on the host
    ds3 = resolve_parallelism("deepspeed_stage_3", 4, offload_params=True)
    assert ds3.factors() == {P: 0.0, G: 1 / 4, OPT: 1 / 4}


def test_fsdp_units_are_the_larger_stack_of_blocks() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=64)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    assert wrapped_blocks(model) == list(model.decoder.block)  # cross-attention makes them larger
    extras = resolve_parallelism("fsdp", 4).phase_extras(model, bytes_per_element=4, device="cuda")
    total = sum(p.numel() for p in model.parameters())
    sizes = [sum(p.numel() for p in b.parameters()) for b in model.decoder.block]
    block, root = max(sizes), total - sum(sizes)  # the first block holds the relative position bias
    assert extras(Phase.BLOCK_BACKWARD) == {P: 4 * (root + 2 * block), G: 4 * block}
    assert extras(Phase.FORWARD) == {P: 4 * (root + 2 * block)}  # one block and the prefetched next
    assert extras(Phase.OPTIMIZER) == {}
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert wrapped_blocks(mlp) == []
    assert resolve_parallelism("fsdp", 2).extras(mlp, bytes_per_element=4, trainable_bytes=0) == {
        P: 4 * 20, G: 4 * 20}  # all root


def test_lightning_names_are_understood() -> None:
    assert resolve_parallelism("ddp_spawn", 2).strategy == "ddp"
    offload = resolve_parallelism("deepspeed_stage_3_offload", 8)
    assert (offload.strategy, offload.offload_optimizer, offload.offload_params) == ("deepspeed_stage_3", True, True)
    assert resolve_parallelism("fsdp_hybrid", 16).shard_size == 8


@pytest.mark.slow
def test_lora_freezes_the_base_and_trains_adapters_only() -> None:
    pytest.importorskip("peft")
    full = memguard.estimate("gpt2", 2, 128, device="cpu", method="trace")
    lora = memguard.estimate("gpt2", 2, 128, device="cpu", method="trace", lora_rank=8)
    # GPT-2's default LoRA target is c_attn (768 -> 2304) in 12 blocks: r * (768 + 2304) weights each.
    adapters = 12 * 8 * (768 + 2304)
    assert lora.inputs["model"] == "gpt2+lora8"
    assert adapters * 4 * 2 <= lora.breakdown[OPT] < adapters * 4 * 2 * 1.2  # Adam moments of adapters only
    assert lora.peak_bytes < full.peak_bytes / 2


def test_lora_refuses_a_users_module() -> None:
    pytest.importorskip("peft")
    with pytest.raises(ConfigError, match=r"wrap it with peft\.get_peft_model"):
        memguard.estimate(nn.Linear(4, 4), example_input=torch.randn(2, 4), loss_fn=lambda o, b: o.sum(),
                          lora_rank=4)


def test_formula_is_distributed_too() -> None:
    single = memguard.estimate("gpt2", 2, 128, device="cpu", method="formula")
    ddp = memguard.estimate("gpt2", 2, 128, device="cpu", method="formula", strategy="ddp", world_size=2)
    trainable = 124_439_808 * 4
    assert ddp.breakdown[G] - single.breakdown[G] == trainable  # the bucket copy of the gradients
    zero1 = memguard.estimate("gpt2", 2, 128, device="cpu", method="formula", strategy="deepspeed_stage_1",
                              world_size=4)
    assert zero1.breakdown[OPT] == single.breakdown[OPT] // 4


def test_8bit_adamw_keeps_one_byte_moments_and_block_absmax() -> None:
    model = nn.Linear(4096, 1024)  # weight 4,194,304 elements (8-bit); bias 1,024 (< 4096: fp32)
    est = memguard.estimate(model, example_input=torch.randn(8, 4096), loss_fn=lambda out, batch: out.sum(),
                            optimizer="adamw-8bit", device="cuda", method="trace")
    weight = 2 * 4_194_304 + 2 * 4 * (4_194_304 // 2048)
    bias = 2 * 4 * 1024
    assert est.breakdown[OPT] == weight + bias
    assert est.breakdown[Category.TEMPORARY] < 4096  # the update runs in place


@pytest.mark.slow
def test_8bit_adamw_formula_matches_the_trace_on_llama() -> None:
    trace = memguard.estimate("llama-2-7b", 1, 256, precision="bf16-true", optimizer="adamw-8bit")
    formula = memguard.estimate("llama-2-7b", 1, 256, precision="bf16-true", optimizer="adamw-8bit",
                                method="formula")
    psi = 6_738_415_616
    assert 2 * psi < formula.breakdown[OPT] < 2.01 * psi
    assert abs(trace.breakdown[OPT] - formula.breakdown[OPT]) < 2**20  # 512-byte rounding only
