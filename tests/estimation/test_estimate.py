"""memguard.estimate: argument handling, bad input, and the properties every estimate has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import memguard
from memguard import Category, ConfigError
from memguard.estimation.models import ResolvedModel, load_model
from memguard.estimation.result import Method

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 256}


@pytest.fixture(scope="module")
def tiny_gpt2() -> GPT2LMHeadModel:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(**TINY_GPT2))


@pytest.fixture(scope="module")
def tiny_gpt2_here() -> ResolvedModel:
    """The same model built by memguard from its config: nobody else's, so traced in this process (a user's
    module is traced in a forked child, twice the time for a model this small)."""
    return load_model(GPT2Config(**TINY_GPT2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": -3}, "batch_size must be a positive integer, got -3"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'; expected one of adamw, adam, sgd"),
        ({"precision": "fp8"}, "unknown precision 'fp8'; expected one of 32-true"),
        ({"method": "guess"}, "unknown method 'guess'; expected one of auto, trace, formula, seed"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"training_loop": "jax"}, "unknown training_loop 'jax'"),
        ({"seq_len": 4096}, "seq_len=4096 is longer than GPT2LMHeadModel can take"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, match: str) -> None:
    args = {"batch_size": 1, "seq_len": 16, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(match)):
        memguard.estimate("gpt2", **args)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'gpt5'.*Presets: bert-base-cased"):
        memguard.estimate("gpt5", 1, 16)


def test_malformed_config_file(tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot read .* as a JSON model config"):
        memguard.estimate(str(bad), 1, 16)
    bad.write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ConfigError, match="has no 'model_type'"):
        memguard.estimate(str(tmp_path), 1, 16)
    bad.write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ConfigError, match="malformed"):
        memguard.estimate(str(bad), 1, 16)


@pytest.mark.slow
def test_config_path_and_config_object_match_the_preset(tmp_path) -> None:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=256)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    a = memguard.estimate(str(tmp_path), 2, 32, device="cpu", method="trace")
    b = memguard.estimate(config, 2, 32, device="cpu", method="trace")
    assert a.breakdown == b.breakdown
    assert a.inputs["model"] == str(tmp_path)


def test_seq_len_defaults_to_the_models_maximum(tiny_gpt2) -> None:
    est = memguard.estimate(tiny_gpt2, batch_size=1, device="cpu", method="trace")
    assert est.inputs["seq_len"] == 256


def test_plain_module_without_example_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="pass example_input="):
        memguard.estimate(torch.nn.Linear(4, 4), 2)


def test_to_dict_is_json_and_round_trips(tiny_gpt2) -> None:
    est = memguard.estimate(tiny_gpt2, 2, 32, precision="bf16-mixed", device="cuda", method="trace")
    data = json.loads(json.dumps(est.to_dict()))
    assert data["peak_bytes"] == est.peak_bytes
    assert data["total_bytes"] == est.total_bytes == sum(data["breakdown"].values())
    assert set(data["breakdown"]) == {c.value for c in Category}
    assert data["inputs"]["precision"] == "bf16-mixed"
    assert memguard.MemoryEstimate.from_dict(data) == est


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 6), seq=st.integers(8, 96))
def test_trace_grows_with_batch_and_sequence(tiny_gpt2_here, batch: int, seq: int) -> None:
    kwargs = {"device": "cuda", "method": "trace"}
    est = memguard.estimate(tiny_gpt2_here, batch, seq, **kwargs)
    assert memguard.estimate(tiny_gpt2_here, batch + 1, seq, **kwargs).peak_bytes >= est.peak_bytes
    assert memguard.estimate(tiny_gpt2_here, batch, seq + 32, **kwargs).peak_bytes >= est.peak_bytes


def test_fits_keeps_the_margin_spare(tiny_gpt2) -> None:
    est = memguard.estimate(tiny_gpt2, 2, 32, device="cpu", method="trace", keep_output=False)
    assert est.fits(est.total_bytes, margin=0)
    assert not est.fits(est.total_bytes, margin=0.1)
    assert est.fits(int(est.total_bytes / 0.9) + 1, margin=0.1)
    with pytest.raises(ConfigError, match="margin"):
        est.fits(10, margin=1.5)


def test_table_lists_every_category(tiny_gpt2) -> None:
    text = str(memguard.estimate(tiny_gpt2, 2, 32, device="cuda", method="trace"))
    for cat in Category:
        assert cat.value in text
    assert "batch_size=2" in text and "total" in text


# -- the training loop and DeepSpeed's precision ----------------------------------------------------


def _model_state(est: memguard.MemoryEstimate) -> tuple[int, int, int]:
    b = est.breakdown
    return b[Category.PARAMETERS], b[Category.GRADIENTS], b[Category.OPTIMIZER_STATE]


@pytest.mark.slow
def test_accumulation_and_set_to_none_keep_gradients_alive_through_the_forward(tiny_gpt2: GPT2LMHeadModel) -> None:
    base = memguard.estimate(tiny_gpt2, 4, 128, method="trace", device="cpu")
    acc = memguard.estimate(tiny_gpt2, 4, 128, method="trace", device="cpu", accumulate_grad_batches=4)
    zeroed = memguard.estimate(tiny_gpt2, 4, 128, method="trace", device="cpu", set_to_none=False)
    n = sum(p.numel() for p in tiny_gpt2.parameters())
    # The second micro-batch (and every later one) runs its forward beside all the gradients.
    assert acc.peak_bytes > base.peak_bytes
    assert acc.breakdown[Category.GRADIENTS] == pytest.approx(4 * n, rel=0.05)  # all, with CPU page rounding
    assert acc.peak_bytes == zeroed.peak_bytes  # the same situation: gradients alive at the forward
    assert acc.inputs["accumulate_grad_batches"] == 4 and zeroed.inputs["set_to_none"] is False
    # Beyond two micro-batches nothing changes: the second stands for all the later ones.
    assert memguard.estimate(tiny_gpt2, 4, 128, method="trace", device="cpu",
                             accumulate_grad_batches=2).peak_bytes == acc.peak_bytes
    formula = memguard.estimate(tiny_gpt2, 4, 128, method="formula", device="cpu", accumulate_grad_batches=4)
    assert formula.peak_bytes == pytest.approx(acc.peak_bytes, rel=0.05)
    with pytest.raises(ConfigError, match="accumulate_grad_batches must be a positive integer, got 0"):
        memguard.estimate(tiny_gpt2, 4, 128, accumulate_grad_batches=0)
    with pytest.raises(ConfigError, match="set_to_none must be True or False, got 'no'"):
        memguard.estimate(tiny_gpt2, 4, 128, set_to_none="no")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trace", "formula"])
def test_deepspeed_mixed_precision_keeps_a_16_bit_module_and_fp32_master_weights(
        tiny_gpt2: GPT2LMHeadModel, method: str) -> None:
    n = sum(p.numel() for p in tiny_gpt2.parameters())
    kwargs = {"method": method, "device": "cpu", "strategy": "deepspeed_stage_3", "world_size": 4}
    mixed = memguard.estimate(tiny_gpt2, 2, 64, precision="bf16-mixed", **kwargs)
    fp32 = memguard.estimate(tiny_gpt2, 2, 64, precision="32-true", **kwargs)
    # ZeRO paper: 2 + 2 + 12 bytes per parameter, each sharded over the 4 ranks under stage 3
    # (plus the gathered units, the same number of elements in both precisions).
    assert mixed.breakdown[Category.OPTIMIZER_STATE] == pytest.approx(12 * n / 4, rel=0.01)
    # (The trace's own fp32 state has a step counter and allocator rounding per tensor.)
    assert fp32.breakdown[Category.OPTIMIZER_STATE] == pytest.approx(8 * n / 4, rel=0.05)
    p16, _, _ = _model_state(mixed)
    p32, _, _ = _model_state(fp32)
    assert p16 == pytest.approx(p32 / 2, rel=0.02)
    assert mixed.inputs["precision"] == "bf16-mixed"
    assert any("fp32 master weights" in note for note in mixed.notes)
    # Under torch AMP (DDP) the parameters stay fp32 and there is no master copy.
    ddp = memguard.estimate(tiny_gpt2, 2, 64, precision="bf16-mixed", method=method, device="cpu",
                            strategy="ddp", world_size=4)
    assert ddp.breakdown[Category.PARAMETERS] >= 4 * n


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "adafactor", "sgd-momentum"])
def test_offloaded_optimizer_state_is_the_optimizers_own(tiny_gpt2: GPT2LMHeadModel, optimizer: str) -> None:
    kwargs = {"optimizer": optimizer, "method": "formula", "device": "cpu", "strategy": "deepspeed_stage_2",
              "world_size": 2}
    here = memguard.estimate(tiny_gpt2, 2, 64, **kwargs)
    away = memguard.estimate(tiny_gpt2, 2, 64, offload_optimizer=True, **kwargs)
    assert away.breakdown[Category.OPTIMIZER_STATE] == 0
    assert here.breakdown[Category.OPTIMIZER_STATE] > 0
    # What leaves the device is what the optimizer keeps (8-bit and factored states included).
    assert away.host_bytes == here.breakdown[Category.OPTIMIZER_STATE]


# -- what the caching allocator reserves --------------------------------------------------------------


@pytest.mark.slow
def test_reserved_is_a_replay_of_the_traced_step(tiny_gpt2: GPT2LMHeadModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard.estimation.overhead import CUDA_CONTEXT_BYTES, CUDA_WORKSPACE_BYTES

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    est = memguard.estimate(tiny_gpt2, 8, 256, method="trace")
    slack = est.reserved_bytes - est.peak_bytes - CUDA_WORKSPACE_BYTES
    # Small-pool segments are 2 MiB and large ones 20 MiB: a small model's step reserves more
    # than it allocates, and never less.
    assert slack > 0
    assert est.context_bytes == CUDA_CONTEXT_BYTES
    assert est.total_bytes == est.reserved_bytes + CUDA_CONTEXT_BYTES
    assert memguard.MemoryEstimate.from_dict(json.loads(json.dumps(est.to_dict()))) == est
    assert "max_memory_reserved" in str(est)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    expandable = memguard.estimate(tiny_gpt2, 8, 256, method="trace")
    assert expandable.peak_bytes == est.peak_bytes
    assert expandable.reserved_bytes != est.reserved_bytes
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:oops")
    with pytest.raises(ConfigError, match="max_split_size_mb"):
        memguard.estimate(tiny_gpt2, 8, 256, method="trace")


def test_the_cpu_reserves_nothing_beyond_its_tensors(tiny_gpt2: GPT2LMHeadModel) -> None:
    est = memguard.estimate(tiny_gpt2, 2, 64, method="trace", device="cpu")
    assert est.reserved_bytes == est.total_bytes == est.peak_bytes
    assert est.context_bytes == 0


@pytest.mark.parametrize(("strategy", "name"), [("auto", "single"), ("ddp_spawn", "ddp"), ("FSDP", "fsdp"),
                                                ("deepspeed_stage_3_offload", "deepspeed_stage_3")])
def test_inputs_keep_the_strategys_plain_name(tiny_gpt2: GPT2LMHeadModel, strategy: str, name: str) -> None:
    est = memguard.estimate(tiny_gpt2, 1, 16, method="formula", strategy=strategy,
                            world_size=1 if name == "single" else 2)
    assert type(est.inputs["strategy"]) is str and est.inputs["strategy"] == name
    assert json.loads(json.dumps(est.to_dict()))["inputs"]["strategy"] == name


def test_an_image_model_takes_no_sequence_length() -> None:
    est = memguard.estimate("vit-base", 2, method="formula", device="cpu")
    assert est.inputs["seq_len"] is None  # TaskKind.IMAGE_CLS takes pixels


def test_a_text_image_config_classifying_images_gets_pixels_of_its_vision_tower(tmp_path: Path) -> None:
    """A ``CLIPConfig`` builds ``CLIPForImageClassification``, whose image size is the vision config's:
    reading it from the top config was an internal error (AttributeError) at the CLI."""
    from transformers import CLIPConfig

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8}).save_pretrained(tmp_path)
    est = memguard.estimate(str(tmp_path), 3, method="trace")
    pixels = [g for g in est.at_peak if g.shape == (3, 3, 32, 32)]
    assert est.inputs["seq_len"] is None and pixels, est.at_peak


def test_repr_is_one_short_line_and_str_the_whole_table() -> None:
    """A notebook shows ``repr(est)``: with the timeline and every group inside, it was 111 KB."""
    mib = 2**20
    est = memguard.MemoryEstimate(
        "trace", {Category.PARAMETERS: 300 * mib, Category.ACTIVATIONS: 700 * mib, Category.OVERHEAD: 24 * mib},
        inputs={"model": "gpt2", "batch_size": 8, "seq_len": 1024, "precision": "bf16-mixed", "optimizer": "adamw",
                "device": "cuda"},
        notes=("a note",), context_bytes=8 * mib,
        at_peak=tuple(memguard.estimation.result.PeakTensors(f"transformer.h.{i}", Category.ACTIVATIONS, mib, 2,
                                                              (8, 1024, 768), "torch.float32") for i in range(300)),
        timeline=tuple((i, "forward", i * 1000) for i in range(2000)))
    assert repr(est) == ("<MemoryEstimate trace: peak 1000.00 MiB, reserved 1016.00 MiB, total 1.00 GiB; "
                         "model='gpt2', batch_size=8, seq_len=1024, precision='bf16-mixed', 300 groups at_peak, "
                         "2000 timeline points>")
    assert str(est) == est.table(top=5) and "alive at the peak (largest 5 of 300)" in str(est)
    assert repr(memguard.MemoryEstimate("formula", {Category.ACTIVATIONS: 1024})) == (
        "<MemoryEstimate formula: peak 1.00 KiB, reserved 1.00 KiB, total 1.00 KiB>")


def test_the_method_is_stored_as_a_method_that_reads_as_its_name() -> None:
    est = memguard.MemoryEstimate("trace", {Category.ACTIVATIONS: 1024})
    assert est.method is Method.TRACE and est.method == "trace" and str(est.method) == "trace"
    assert {"trace": 1}[est.method] == 1  # hashes as its name: dicts keyed by names answer it
    data = est.to_dict()
    assert type(data["method"]) is str and json.loads(json.dumps(data))["method"] == "trace"
    assert memguard.MemoryEstimate.from_dict(data).method is Method.TRACE
    assert est.table().splitlines()[0] == "memguard estimate (trace)"
    for bad in ("auto", "guess"):  # auto picks a method, it makes no estimate
        with pytest.raises(ValueError, match=f"method must be one of trace, formula, seed, got '{bad}'"):
            memguard.MemoryEstimate(bad, {})
    formula = memguard.estimate("gpt2", 1, 32, method=Method.FORMULA, device="cpu")
    assert formula.method is Method.FORMULA and formula.inputs["method"] == "formula"
    assert type(formula.inputs["method"]) is str
