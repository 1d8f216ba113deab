"""memguard.estimation.description: a preset's shipped description is its meta model's, and the formula on
it gives what the formula on the module gives, byte for byte, errors included (issue 19: the formula on a
preset without torch)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import memguard
from memguard import ConfigError
from memguard.estimation.description import (
    DESCRIPTION_DIR,
    ModelDescription,
    describe,
    description_text,
    preset_description,
    with_lora,
)
from memguard.estimation.estimator import runs_without_torch
from memguard.estimation.formula.inventory import inventory
from memguard.estimation.models import add_lora, list_presets, load_model

# every kind of preset: decoder-only (learned and rotary positions), encoder, encoder-decoder, audio, vision
KINDS = ["gpt2", "llama-2-7b", "bert-base-uncased", "t5-small", "whisper-tiny", "vit-base"]

STEPS = [
    {"batch_size": 2, "precision": "bf16-mixed"},
    {"batch_size": 3, "precision": "32-true", "optimizer": "sgd-momentum", "gradient_checkpointing": True},
    {"batch_size": 1, "precision": "16-mixed", "optimizer": "adafactor", "device": "cpu"},
    {"batch_size": 2, "precision": "bf16-true", "optimizer": "adamw-8bit", "training_loop": "lightning"},
    {"batch_size": 2, "precision": "16-true", "optimizer": "paged-adamw", "accumulate_grad_batches": 2},
    {"batch_size": 4, "optimizer": "adamw-fused", "set_to_none": False, "moe_routing": "worst"},
]

_MODULES: dict[str, memguard.estimation.models.ResolvedModel] = {}


def _module(name: str) -> memguard.estimation.models.ResolvedModel:
    """The preset's meta model, built once: ``estimate`` of it takes the module's path."""
    if name not in _MODULES:
        _MODULES[name] = load_model(name)
    return _MODULES[name]


def _seq(name: str) -> dict[str, int]:
    return {} if name in ("vit-base", "whisper-tiny") else {"seq_len": 128}


@pytest.mark.parametrize("name", KINDS)
def test_the_formula_on_a_preset_is_the_same_from_its_description_and_from_its_module(name: str) -> None:
    for kwargs in STEPS:
        kwargs = {**kwargs, **_seq(name), "method": "formula"}
        assert runs_without_torch(name, **kwargs)
        from_description = memguard.estimate(name, **kwargs)
        from_module = memguard.estimate(_module(name), **kwargs)
        assert from_description.to_dict() == from_module.to_dict(), kwargs
        assert from_description.peak_bytes > 0


@pytest.mark.parametrize("name", KINDS)
def test_the_shipped_description_is_what_the_module_reads(name: str) -> None:
    """Every moment of the step, not only the peak, from the description and from the module."""
    from memguard.estimation.formula.phases import step_phases
    from memguard.estimation.spec import TrainingSpec

    assert preset_description(name) == describe(_module(name))
    spec = TrainingSpec.create(batch_size=2, seq_len=None if name == "vit-base" else 128, precision="bf16-mixed",
                               decoder_seq_len=64 if name in ("t5-small", "whisper-tiny") else None)
    if name == "whisper-tiny":
        spec = spec.replace(seq_len=1500)
    assert step_phases(preset_description(name), spec) == step_phases(_module(name), spec)


def test_the_lengths_settle_as_from_the_module() -> None:
    """Defaults (the model's maximum, Whisper's 1500 positions and 448 labels) and a decoder's own length."""
    for name, kwargs in [("gpt2", {}), ("bert-base-uncased", {}), ("whisper-tiny", {"decoder_seq_len": 64}),
                         ("t5-small", {"seq_len": 64, "decoder_seq_len": 16}), ("whisper-tiny", {})]:
        est = memguard.estimate(name, 2, method="formula", **kwargs)
        assert est.to_dict() == memguard.estimate(_module(name), 2, method="formula", **kwargs).to_dict()
    assert memguard.estimate("gpt2", method="formula").inputs["seq_len"] == 1024
    whisper = memguard.estimate("whisper-tiny", method="formula").inputs
    assert (whisper["seq_len"], whisper["decoder_seq_len"]) == (1500, 448)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("gpt2", {"seq_len": 4096}, "seq_len=4096 is longer than GPT2LMHeadModel can take"),
        ("gpt2", {"seq_len": 64, "decoder_seq_len": 8}, "decoder_seq_len=8 is for encoder-decoder models; gpt2"),
        ("whisper-tiny", {"seq_len": 64}, "seq_len=64: whisper-tiny's encoder always sees 1500 positions"),
        ("whisper-tiny", {"decoder_seq_len": 449}, "decoder_seq_len=449 is longer than the decoder can take"),
        ("bert-base-uncased", {"seq_len": 513},
         r"seq_len=513 is longer than \w+ can take \(max_position_embeddings=512\)"),
        ("roberta-base", {"seq_len": 515}, r"\(max_position_embeddings=512\)"),
        ("vit-base", {"batch_size": 2**31 - 1, "precision": "fp8"}, "unknown precision 'fp8'"),
    ],
)
def test_a_bad_argument_is_refused_with_the_module_paths_words(name: str, kwargs: dict, match: str) -> None:
    messages = []
    for model in (name, _module(name)):
        with pytest.raises(ConfigError, match=match) as info:
            memguard.estimate(model, method="formula", **kwargs)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "auto"},
        {"method": "trace"},
        {"method": "formula", "quantization": "nf4", "skip_modules": []},  # GPT-2's tied head quantized: built
        {"method": "formula", "loss_fn": lambda out, batch: out.loss},
        {"method": "formula", "optimizer": "lion"},  # refused by the estimate itself
    ],
)
def test_only_a_plain_formula_estimate_of_a_preset_reads_the_description(kwargs: dict) -> None:
    assert not runs_without_torch("gpt2", seq_len=64, **kwargs)


# decoder-only (learned positions, Conv1D; rotary MHA; rotary GQA), encoder, encoder-decoder (FSDP wraps its decoder)
SHARDED_PRESETS = ["gpt2", "llama-2-7b", "mistral-7b", "bert-base-uncased", "t5-small"]

LAYOUTS = [
    {"strategy": "ddp", "world_size": 2},
    {"strategy": "ddp", "world_size": 1},
    {"strategy": "fsdp", "world_size": 2},
    {"strategy": "fsdp", "world_size": 8, "offload_optimizer": True},
    {"strategy": "fsdp", "world_size": 4, "offload_optimizer": True, "offload_params": True},
    {"strategy": "fsdp_shard_grad_op", "world_size": 4},
    {"strategy": "fsdp_hybrid", "world_size": 16, "offload_optimizer": True},
    {"strategy": "deepspeed_stage_1", "world_size": 2},
    {"strategy": "deepspeed_stage_2", "world_size": 1},
    {"strategy": "deepspeed_stage_2", "world_size": 4, "offload_optimizer": True},
    {"strategy": "deepspeed_stage_3", "world_size": 3},
    {"strategy": "deepspeed_stage_3", "world_size": 8, "offload_optimizer": True, "offload_params": True},
]

SHARDED_STEPS = [
    {"precision": "bf16-mixed"},
    {"precision": "32-true", "gradient_checkpointing": True, "accumulate_grad_batches": 2},
    {"precision": "bf16-true", "optimizer": "adamw-8bit"},
    {"precision": "16-mixed", "optimizer": "adafactor", "gradient_checkpointing": True, "device": "cpu"},
    {"precision": "bf16-mixed", "optimizer": "sgd", "accumulate_grad_batches": 2, "training_loop": "lightning"},
]


@pytest.mark.parametrize("name", SHARDED_PRESETS)
def test_a_sharded_strategy_on_a_preset_is_the_same_from_its_description_and_from_its_module(name: str) -> None:
    """Every strategy, offload and world size (DeepSpeed's master weights under mixed precision, FSDP's
    gathered units, the buckets, the host's share) from the description as from the module, byte for byte."""
    for layout in LAYOUTS:
        for kwargs in SHARDED_STEPS:
            kwargs = {**kwargs, **layout, "batch_size": 2, "seq_len": 64, "method": "formula"}
            assert runs_without_torch(name, **kwargs)
            from_description = memguard.estimate(name, **kwargs)
            assert from_description.to_dict() == memguard.estimate(_module(name), **kwargs).to_dict(), kwargs
            assert from_description.inputs["strategy"] == layout["strategy"]


@pytest.mark.parametrize("name", ["gpt2", "t5-small", "whisper-tiny", "vit-base"])
def test_fsdp_units_from_the_inventory_are_the_modules(name: str) -> None:
    from memguard.estimation.parallel import Units, units

    module = _module(name).module
    assert Units.of_inventory(preset_description(name).inventory) == units(module)
    assert units(module).blocks in (4, 6, 12)


@contextlib.contextmanager
def _none_shipped() -> Iterator[None]:
    """No description shipped: ``estimate(PRESET, ...)`` builds the module (and adds LoRA with peft) as before."""
    import memguard.estimation.description as description

    shipped = description.DESCRIPTION_DIR
    description.DESCRIPTION_DIR = Path("/nonexistent-memguard-descriptions")
    preset_description.cache_clear()
    try:
        yield
    finally:
        description.DESCRIPTION_DIR = shipped
        preset_description.cache_clear()


def _from_module(name: str, **kwargs: object) -> dict:
    with _none_shipped():
        assert not runs_without_torch(name, **kwargs)
        return memguard.estimate(name, **kwargs).to_dict()


LORA_STEPS = [
    {"precision": "bf16-mixed"},
    {"precision": "32-true", "gradient_checkpointing": True},
    {"precision": "bf16-true", "accumulate_grad_batches": 2},
    {"precision": "bf16-mixed", "gradient_checkpointing": True, "accumulate_grad_batches": 2, "optimizer": "adafactor"},
    {"precision": "16-mixed", "device": "cpu", "optimizer": "adamw-8bit", "keep_output": True},
    {"precision": "bf16-mixed", "strategy": "ddp", "world_size": 2},
    {"precision": "bf16-mixed", "strategy": "fsdp", "world_size": 4, "offload_optimizer": True},
    {"precision": "bf16-mixed", "strategy": "deepspeed_stage_2", "world_size": 2},
    {"precision": "32-true", "strategy": "deepspeed_stage_3", "world_size": 2, "offload_params": True,
     "offload_optimizer": True, "gradient_checkpointing": True},
]


@pytest.mark.parametrize("name", SHARDED_PRESETS)
@pytest.mark.parametrize("rank", [8, 64])
def test_lora_on_a_preset_is_the_same_from_its_description_and_from_its_module(name: str, rank: int) -> None:
    """peft's adapters derived from the description (its default targets, GPT-2's Conv1D transposed, the base
    frozen) as :func:`add_lora` puts them on the module: the description, and every estimate, byte for byte."""
    assert with_lora(preset_description(name), rank) == describe(add_lora(load_model(name), rank))
    for kwargs in LORA_STEPS:
        kwargs = {**kwargs, "batch_size": 2, "seq_len": 64, "method": "formula", "lora_rank": rank}
        assert runs_without_torch(name, **kwargs)
        from_description = memguard.estimate(name, **kwargs)
        assert from_description.to_dict() == _from_module(name, **kwargs), kwargs
        assert from_description.inputs["model"] == f"{name}+lora{rank}"


def test_a_lora_rank_above_the_hidden_size_is_refused_with_the_module_paths_words() -> None:
    kwargs = {"batch_size": 1, "seq_len": 64, "method": "formula", "lora_rank": 769}
    with pytest.raises(ConfigError, match=r"lora_rank=769 is above the hidden size of gpt2 \(768\)") as described:
        memguard.estimate("gpt2", **kwargs)
    with _none_shipped(), pytest.raises(ConfigError) as built:
        memguard.estimate("gpt2", **kwargs)
    assert str(described.value) == str(built.value)
    assert memguard.estimate("gpt2", **{**kwargs, "lora_rank": 768}).inputs["lora_rank"] == 768


def test_lora_where_peft_has_no_default_targets_builds_the_module() -> None:
    """ViT and Whisper: peft names no default ``target_modules``; the module path says so."""
    assert preset_description("vit-base").lora is None
    assert not runs_without_torch("vit-base", method="formula", lora_rank=8)
    with pytest.raises(ConfigError, match="cannot add LoRA adapters to vit-base"):
        memguard.estimate("vit-base", method="formula", lora_rank=8)


QLORA_STEPS = [
    {"quantization": "nf4", "double_quant": True, "precision": "bf16-true"},
    {"quantization": "nf4", "precision": "bf16-mixed", "gradient_checkpointing": True, "lora_rank": 64},
    {"quantization": "fp4", "precision": "32-true", "accumulate_grad_batches": 2},
    {"quantization": "int8", "precision": "bf16-mixed", "lora_rank": 64},
    {"quantization": "int8", "precision": "16-true", "gradient_checkpointing": True, "accumulate_grad_batches": 2},
    # past the fused kernel's rows
    {"quantization": "nf4", "double_quant": True, "precision": "bf16-true", "batch_size": 4, "seq_len": 512},
    {"quantization": "nf4", "double_quant": True, "precision": "bf16-true", "strategy": "ddp", "world_size": 2},
    {"quantization": "nf4", "double_quant": True, "precision": "bf16-mixed",
     "skip_modules": ["q_proj", "query", "q", "lm_head", "decoder"]},  # the tied heads skipped too
]


@pytest.mark.parametrize("name", SHARDED_PRESETS)
def test_qlora_on_a_preset_is_the_same_from_its_description_and_from_its_module(name: str) -> None:
    """A quantized base (NF4, FP4, int8; double quantization; skip_modules; peft's default rank 8 or another)
    derived from the description as :func:`quantize_model` stores it over ``add_lora``'s model: byte for byte,
    the note on the stored bytes included."""
    for kwargs in QLORA_STEPS:
        kwargs = {"batch_size": 2, "seq_len": 64, "method": "formula", **kwargs}
        assert runs_without_torch(name, **kwargs), kwargs
        from_description = memguard.estimate(name, **kwargs)
        assert from_description.to_dict() == _from_module(name, **kwargs), kwargs
        assert from_description.inputs["quantization"] == kwargs["quantization"]
        assert from_description.inputs["model"].startswith(f"{name}+lora{kwargs.get('lora_rank', 8)}+")


def test_quantizing_every_linear_layer_of_an_untied_model_is_derived_too() -> None:
    """Llama's head is its own weight: ``skip_modules=[]`` quantizes it as well, from the description."""
    kwargs = {"batch_size": 1, "seq_len": 64, "method": "formula", "quantization": "nf4", "skip_modules": []}
    assert runs_without_torch("llama-2-7b", **kwargs)
    assert memguard.estimate("llama-2-7b", **kwargs).to_dict() == _from_module("llama-2-7b", **kwargs)


def test_a_quantization_that_skips_every_layer_is_refused_with_the_module_paths_words() -> None:
    kwargs = {"batch_size": 1, "seq_len": 64, "method": "formula", "quantization": "nf4", "skip_modules": [".*"]}
    with pytest.raises(ConfigError, match=r"quantization='nf4', but llama-2-7b\+lora8 has no nn.Linear") as described:
        memguard.estimate("llama-2-7b", **kwargs)
    with _none_shipped(), pytest.raises(ConfigError) as built:
        memguard.estimate("llama-2-7b", **kwargs)
    assert str(described.value) == str(built.value)


def test_models_other_than_presets_are_built() -> None:
    assert runs_without_torch("GPT2", seq_len=64, method="formula")  # a preset's other spelling
    assert not runs_without_torch("no-such-model", method="formula")
    assert not runs_without_torch(_module("gpt2"), method="formula")


def test_a_description_round_trips_through_json() -> None:
    desc = describe(_module("t5-small"))
    again = ModelDescription.from_dict(json.loads(json.dumps(desc.to_dict())))
    assert again == desc
    assert again.arch.decoder_layers == 6 and again.task == "seq2seq"
    assert sum(again.inventory.numel) == sum(p.numel() for p in _module("t5-small").module.parameters())


def test_the_inventory_reads_requires_grad_on_every_call() -> None:
    module = load_model("gpt2").module
    before = inventory(module)
    assert all(before.grad)
    module.transformer.wte.weight.requires_grad_(False)
    after = inventory(module)
    assert after.grad.count(False) == 1 and after.numel == before.numel
    assert not after.requires_grad()[after.pre[0]]


def test_a_preset_without_a_shipped_description_is_built(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("memguard.estimation.description.DESCRIPTION_DIR", tmp_path)
    preset_description.cache_clear()
    try:
        assert preset_description("gpt2") is None
        assert not runs_without_torch("gpt2", method="formula")
    finally:
        preset_description.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_presets())
def test_each_shipped_description_is_its_meta_models(name: str) -> None:
    """Regenerate with ``python -m memguard.estimation.description`` after a change to a preset, to what the
    formula reads (the architecture, the inventory), or to transformers' model classes."""
    shipped = (DESCRIPTION_DIR / f"{name}.json").read_text(encoding="utf-8")
    assert shipped == description_text(name), (
        f"{name}'s shipped description is stale: run python -m memguard.estimation.description")


def test_every_preset_has_a_description() -> None:
    assert sorted(p.stem for p in DESCRIPTION_DIR.glob("*.json")) == list_presets()
