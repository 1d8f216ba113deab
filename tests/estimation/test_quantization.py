"""Quantized bases (bitsandbytes NF4/FP4/int8), paged optimizers and QLoRA in plan and at the CLI.

The byte counts below are bitsandbytes' own: ``bitsandbytes.functional.quantize_4bit`` of a
4096 x 4096 bf16 weight (bitsandbytes 0.50.2 on the CPU) returns a packed ``uint8`` tensor of
8,388,608 bytes, fp32 absmax of 262,144 blocks, or with ``compress_statistics=True`` ``uint8`` absmax
of 262,144 bytes with 1,024 fp32 second-level absmax, an fp32 offset and the 256-entry code.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

import memguard
from memguard import Category, ConfigError
from memguard.cli import EXIT_USAGE, main
from memguard.estimation.quantization import (
    QLORA,
    Quantization,
    QuantizationKind,
    QuantizedLinear,
    detect_quantization,
    linear_storage,
    quantize_model,
)
from memguard.estimation.spec import PAGED_MIN_NUMEL

NF4, NF4_DQ, INT8 = Quantization("nf4"), Quantization("nf4", True), Quantization("int8")


def small_llama(**extra: object) -> LlamaConfig:
    return LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=2000, max_position_embeddings=1024, **extra)


# -- bytes per layer -------------------------------------------------------------------------------


def test_nf4_storage_of_a_4096_square_layer_is_bitsandbytes():
    assert linear_storage(4096, 4096, NF4) == {"weight": 8_388_608, "absmax": 4 * 262_144, "code": 64}
    assert sum(linear_storage(4096, 4096, NF4).values()) == 9_437_248


def test_nf4_double_quant_storage_of_a_4096_square_layer_is_bitsandbytes():
    parts = linear_storage(4096, 4096, NF4_DQ)
    assert parts == {"weight": 8_388_608, "absmax": 262_144, "absmax2": 4 * 1024, "offset": 4, "code": 64}
    assert sum(parts.values()) == 8_654_916


def test_int8_storage_is_one_byte_per_weight_and_a_row_scale():
    assert linear_storage(4096, 11008, INT8) == {"weight": 4096 * 11008, "scale": 4 * 4096}


def test_odd_sizes_round_up_to_whole_bytes_and_blocks():
    # 3 x 7 = 21 weights: 11 bytes packed, one block of 64
    assert linear_storage(3, 7, NF4) == {"weight": 11, "absmax": 4, "code": 64}
    assert linear_storage(3, 7, NF4_DQ) == {"weight": 11, "absmax": 1, "absmax2": 4, "offset": 4, "code": 64}


def bits_per_parameter(q: Quantization, out_features: int = 4096, in_features: int = 4096) -> float:
    """Bits of storage per weight of an ``out x in`` layer, everything of ``linear_storage`` included."""
    return 8 * sum(linear_storage(out_features, in_features, q).values()) / (out_features * in_features)


def test_bits_per_weight_are_the_qlora_papers():
    # QLoRA section 3: constants cost 32/64 = 0.5 bit, with double quantization 8/64 + 32/(64*256) = 0.127
    assert bits_per_parameter(NF4) == pytest.approx(4.5, abs=1e-4)
    assert bits_per_parameter(NF4_DQ) == pytest.approx(4.127, abs=1e-3)


def test_stand_in_holds_exactly_the_storage_and_no_gradient():
    layer = QuantizedLinear(4096, 4096, NF4_DQ)
    held = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    assert held == 8_654_916 + 4 * 256  # and the shared 256-entry dynamic code
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.dtype == torch.uint8 and layer.weight.dim() == 1  # no matrix for autocast to cast


# -- the model ------------------------------------------------------------------------------------


def test_parameters_of_a_qlora_llama_are_counted_byte_exactly():
    cfg = small_llama()
    est = memguard.estimate(cfg, batch_size=1, seq_len=64, precision="bf16-true", quantization="nf4",
                            double_quant=True, lora_rank=8, method="formula")
    h, f, v, n = 512, 1376, 2000, 4
    linears = n * (4 * sum(linear_storage(h, h, NF4_DQ).values()) + 3 * sum(linear_storage(f, h, NF4_DQ).values()))
    bf16 = 2 * (2 * v * h + (2 * n + 1) * h)  # embeddings and lm_head (left in 16 bits) and the norms
    lora = 2 * n * 2 * (8 * h + h * 8)  # q and v, A and B, bf16
    # the shared 256-entry dynamic code (fp32), and rotary inv_freq and original_inv_freq (32 each, in bf16)
    buffers = 4 * 256 + 2 * 2 * 32
    assert est.breakdown[Category.PARAMETERS] == linears + bf16 + lora + buffers
    assert est.inputs["quantization"] == "nf4" and est.inputs["double_quant"] is True
    assert est.inputs["lora_rank"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("quantization, double_quant", [("nf4", False), ("nf4", True)])
def test_trace_and_formula_agree_within_5_percent_on_a_qlora_llama(quantization, double_quant):
    cfg = small_llama()
    kwargs = dict(batch_size=4, seq_len=512, precision="bf16-true", lora_rank=8, quantization=quantization,
                  double_quant=double_quant, gradient_checkpointing=True, device="cuda")
    traced = memguard.estimate(cfg, method="trace", **kwargs)
    formula = memguard.estimate(cfg, method="formula", **kwargs)
    assert traced.method == "trace" and formula.method == "formula"
    assert formula.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.05)
    assert formula.breakdown[Category.PARAMETERS] == pytest.approx(traced.breakdown[Category.PARAMETERS], rel=0.01)


def test_an_int8_base_keeps_its_inputs_and_computes_its_mlp_in_the_inputs_dtype():
    # MatMul8bitLt keeps its input A for backward under a frozen weight (ctx.tensors = (CAt, subA, A))
    # and returns output.to(A.dtype); a 4-bit base keeps neither. Per block, over 2 x 256 rows:
    cfg = small_llama()
    rows, h, f, n = 2 * 256, 512, 1376, 4
    extra = {}
    for precision in ("bf16-true", "bf16-mixed"):
        kwargs = dict(batch_size=2, seq_len=256, precision=precision, lora_rank=8, method="formula")
        int8 = memguard.estimate(cfg, quantization="int8", **kwargs)
        nf4 = memguard.estimate(cfg, quantization="nf4", **kwargs)
        extra[precision] = int8.breakdown[Category.ACTIVATIONS] - nf4.breakdown[Category.ACTIVATIONS]
    # bf16-true: down_proj's input and the MLP norm's output, in bf16 (the attention norm's output
    # is the tensor the q and v adapters keep already)
    assert extra["bf16-true"] == n * rows * (f + h) * 2
    # bf16-mixed: both norms' fp32 outputs (the adapters keep their own bf16 casts) and down_proj's
    # fp32 input; the MLP runs in fp32 in both (on 512 rows the 4-bit base's fused kernel returns
    # fp32 too, Ctx.uncast)
    assert extra["bf16-mixed"] == n * rows * (2 * h * 4 + f * 4)


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "precision"), [
    ("int8", "bf16-true"), ("int8", "bf16-mixed"),
    ("nf4", "bf16-mixed"),  # 512 rows, up to FUSED_MAX_ROWS: the fused kernel returns fp32 under autocast
])
def test_trace_and_formula_agree_within_5_percent_on_qlora_in_16_bits(quantization, precision):
    cfg = small_llama()
    kwargs = dict(batch_size=2, seq_len=256, precision=precision, lora_rank=8, quantization=quantization,
                  device="cuda")
    traced = memguard.estimate(cfg, method="trace", **kwargs)
    formula = memguard.estimate(cfg, method="formula", **kwargs)
    assert traced.method == "trace" and formula.method == "formula"
    assert formula.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "precision", "batch_size", "seq_len"), [
    ("nf4", "bf16-true", 1, 256), ("int8", "bf16-mixed", 1, 256), ("int8", "bf16-true", 1, 256),
    ("nf4", "bf16-mixed", 4, 512),  # 2,048 rows: past the fused kernel, the weight dequantized in the forward
])
def test_trace_and_formula_agree_within_5_percent_on_a_qlora_gqa_model(quantization, precision, batch_size, seq_len):
    """Two wide GQA blocks (1024 wide, 8/2 heads) under a small vocabulary, so that the blocks and
    the quantized layers' temporaries make the peak: the formula was +5.6% to +8.0% on the first
    three before its top block's backward stopped holding what the final norm and the head saved
    (their autocast weight copy included) and took its MLP gradients and the dequantized weight in
    the MLP's own dtype (issue 16)."""
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, precision=precision, lora_rank=8,
                  quantization=quantization, double_quant=quantization == "nf4", device="cuda")
    traced = memguard.estimate(cfg, method="trace", **kwargs)
    formula = memguard.estimate(cfg, method="formula", **kwargs)
    assert formula.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.05)


def test_a_frozen_final_norm_and_head_keep_neither_the_normalised_tensor_nor_the_heads_input():
    # LlamaRMSNorm in bf16: the fp32 upcast of its input and rsqrt per row; ``weight * x`` saves x only for
    # the weight's gradient, and the head's matmul saves its input only for the head's: frozen under QLoRA
    from memguard.estimation.formula.activations import activation_bytes
    from memguard.estimation.models import load_model

    rows, h = 2 * 64, 512
    spec = memguard.Step(batch_size=2, seq_len=64, precision="bf16-true", gradient_checkpointing=False).spec
    frozen = load_model(small_llama())
    for p in frozen.module.parameters():
        p.requires_grad_(False)
    frozen.module.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # gradients pass the top
    trained = load_model(small_llama())
    assert activation_bytes(frozen, spec).final == rows * h * 4 + rows * 4
    # trainable: the normalised tensor in bf16 and the head's input (the same bf16 tensor's copy) too
    assert activation_bytes(trained, spec).final == rows * h * 4 + rows * 4 + rows * h * 2 + rows * h * 2


@pytest.mark.slow
def test_the_formula_of_a_checkpointed_qlora_llama_in_bf16_mixed_is_within_5_percent_of_the_trace():
    """The cell that was +6.9% (benchmarks/qlora_vs_trace.py, 512 x 4 layers, 4 x 512, NF4 with double
    quantization, bf16-mixed, checkpointing) while the formula kept what a frozen final norm and head
    do not save; +2.5% since."""
    kwargs = dict(batch_size=4, seq_len=512, precision="bf16-mixed", lora_rank=8, quantization="nf4",
                  double_quant=True, gradient_checkpointing=True, device="cuda")
    traced = memguard.estimate(small_llama(), method="trace", **kwargs)
    formula = memguard.estimate(small_llama(), method="formula", **kwargs)
    assert formula.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.05)


@pytest.mark.slow
def test_the_final_rmsnorms_backward_holds_five_fp32_copies_of_its_input():
    # pow_backward's three fp32 tensors, mean's gradient and the gradient x waits to sum with them: the
    # peak of a 16-bit LoRA Llama whose blocks outweigh its logits, in the trace and in the formula
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    kwargs = dict(batch_size=4, seq_len=512, precision="bf16-true", lora_rank=8, quantization="nf4",
                  double_quant=True, device="cuda")
    traced = memguard.estimate(cfg, method="trace", **kwargs)
    formula = memguard.estimate(cfg, method="formula", **kwargs)
    five = 5 * 4 * 512 * 1024 * 4
    assert "formula: peak at the final norm's backward" in formula.notes
    assert formula.breakdown[Category.TEMPORARY] == five
    assert traced.breakdown[Category.TEMPORARY] == pytest.approx(five, abs=512)
    assert formula.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.05)


@pytest.mark.slow
def test_quantized_base_saves_memory_and_keeps_the_activations():
    cfg = small_llama()
    kwargs = dict(batch_size=2, seq_len=256, precision="bf16-true", lora_rank=8, method="trace", device="cuda")
    plain = memguard.estimate(cfg, **kwargs)
    nf4 = memguard.estimate(cfg, quantization="nf4", **kwargs)
    saved = plain.breakdown[Category.PARAMETERS] - nf4.breakdown[Category.PARAMETERS]
    weights = 4 * (4 * 512 * 512 + 3 * 512 * 1376)
    assert saved == pytest.approx(2 * weights - 4.5 / 8 * weights, rel=0.01)
    # bitsandbytes 0.50's MatMul4Bit keeps no input, like a frozen nn.Linear
    assert nf4.breakdown[Category.ACTIVATIONS] == plain.breakdown[Category.ACTIVATIONS]


def test_backward_dequantizes_the_weight_into_a_temporary():
    """A quantized layer between two trainable ones: its backward makes the dequantized weight
    (out x in, in the gradient's dtype) to compute the input's gradient (``MatMul4Bit.backward``)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 1024), nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 8))
    est = memguard.estimate(model, example_input=torch.zeros(2, 64), quantization="nf4", skip_modules=["0", "3"],
                            loss_fn=lambda out, _: out.sum(), method="trace", device="cuda")
    assert isinstance(model[1], nn.Linear)  # the user's module is left as it was
    temporaries = [t for t in est.at_peak if t.category is Category.TEMPORARY]
    assert any(t.shape == (4096, 1024) and t.dtype == "torch.float32" for t in temporaries), est.at_peak
    parts = linear_storage(4096, 1024, NF4)
    assert est.breakdown[Category.PARAMETERS] == (
        4 * (64 * 1024 + 1024 + 4096 * 8) + 512  # the trainable layers, fp32 (the 8-wide bias: one 512-byte block)
        + parts["weight"] + parts["absmax"] + 512 + 4 * 4096)  # the quantized one (its code: a block) and its bias


def test_a_user_module_is_not_changed():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    copy, n = quantize_model(model, NF4)
    assert n == 1  # the last layer is the output head, left in 16 bits as transformers does
    assert all(type(m) is nn.Linear for m in model)
    assert isinstance(copy[0], QuantizedLinear) and copy[1] is not model[1]
    every, n = quantize_model(model, Quantization("nf4", skip_modules=()))
    assert n == 2 and all(isinstance(m, QuantizedLinear) for m in every)


# -- detection ------------------------------------------------------------------------------------


class Linear4bit(nn.Linear):
    """Named as bitsandbytes' layer: memguard reads its settings by class name, without bitsandbytes."""


def test_bitsandbytes_layers_are_detected_by_class_name():
    with torch.device("meta"):
        model = nn.Sequential(Linear4bit(32, 64), nn.ReLU(), nn.Linear(64, 4))
    model[0].weight.quant_type = "nf4"
    model[0].weight.compress_statistics = True
    assert detect_quantization(model) == Quantization("nf4", True)
    converted, n = quantize_model(model, Quantization("fp4"))
    assert n == 1 and converted[0].quantization == Quantization("nf4", True)  # its own settings
    assert type(converted[2]) is nn.Linear  # the user left it in 16 bits


def test_a_config_quantization_config_is_applied():
    cfg = small_llama(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                           "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True})
    est = memguard.estimate(cfg, batch_size=1, seq_len=64, precision="bf16-true", method="formula")
    assert (est.inputs["quantization"], est.inputs["double_quant"], est.inputs["lora_rank"]) == ("nf4", True, 8)
    lora = 2 * 4 * 2 * (8 * 512 + 512 * 8)  # q and v of 4 layers, A and B, bf16
    assert est.breakdown[Category.OPTIMIZER_STATE] == 2 * lora + 4 * 2 * 4 * 2  # AdamW's moments, step counters


# -- optimizers -----------------------------------------------------------------------------------


def test_paged_adamw_keeps_fp32_moments_and_says_what_is_paged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 8))  # 262,144 and 4,096 weights
    est = memguard.estimate(model, example_input=torch.zeros(2, 512), loss_fn=lambda out, _: out.sum(),
                            precision="bf16-true", optimizer="paged-adamw", method="trace", device="cuda")

    def block(n: int) -> int:  # CUDA's 512-byte allocation blocks
        return -(-n // 512) * 512

    # two fp32 moments per parameter whatever its dtype (bitsandbytes Optimizer2State, 32 bits), no step tensor
    numels = (512 * 512, 512, 512 * 8, 8)
    assert est.breakdown[Category.OPTIMIZER_STATE] == sum(2 * block(4 * n) for n in numels)
    paged = 2 * 4 * 512 * 512
    assert 512 * 512 >= PAGED_MIN_NUMEL > 512 * 8
    assert any(f"{paged:,} bytes of its state are in CUDA managed memory" in n for n in est.notes), est.notes


def test_paged_adamw_8bit_over_lora_pages_nothing():
    est = memguard.estimate(small_llama(), batch_size=1, seq_len=64, quantization="nf4", optimizer="paged-adamw-8bit",
                            method="formula")
    assert est.inputs["optimizer"] == "paged-adamw-8bit"
    assert any("pages none of its state" in n for n in est.notes), est.notes


# -- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"quantization": "nf3"}, "unknown quantization 'nf3'"),
    ({"quantization": "int8", "double_quant": True}, "not 'int8'"),
    ({"double_quant": True}, "needs quantization="),
    ({"double_quant": "yes", "quantization": "nf4"}, "double_quant must be True or False"),
    ({"skip_modules": ["lm_head"]}, "skip_modules needs a quantization"),
    ({"quantization": "nf4", "skip_modules": "lm_head"}, "must be a list of module names"),
])
def test_bad_quantization_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        memguard.estimate("gpt2", batch_size=1, seq_len=8, method="formula", **kwargs)


# -- plan -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_offers_qlora_for_llama_2_7b_on_a_24gb_card():
    from memguard.planning import plan

    found = plan("llama-2-7b", gpu="24GiB", seq_len=512, batch_size=1, precision="bf16-true",
                 optimizers=["adamw"], lora_ranks=[16], confirm=0, limit=2)
    rows = found.group("QLoRA")
    assert rows, found.table()
    best = rows[0]
    assert (best.settings["quantization"], best.settings["double_quant"]) == ("nf4", True)
    assert best.settings["precision"] == "bf16-true" and best.settings["lora_rank"] == 16
    assert best.flags[-3:] == ["--quantization", "nf4", "--double-quant"] or "--double-quant" in best.flags
    assert "QLoRA base: NF4 with double quantization" in best.changes
    assert best.cost_terms.get("quantized base") == 0.5
    lora = found.group("LoRA")
    same = [r for r in lora if r.settings["gradient_checkpointing"] == best.settings["gradient_checkpointing"]
            and r.settings["strategy"] == "single" and r.settings["batch_size"] == best.settings["batch_size"]]
    assert not same or best.total_bytes < same[0].total_bytes - 8 * 2**30  # 4-bit base: ~9 GiB less


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_flags_reach_the_estimate(capsys):
    code = main(["estimate", "llama-2-7b", "--seq-len", "128", "--precision", "bf16-true", "--method", "formula",
                 "--quantization", "nf4", "--double-quant", "--lora-rank", "16", "--optimizer", "paged-adamw",
                 "--json", "--quiet"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (data["inputs"]["quantization"], data["inputs"]["double_quant"]) == ("nf4", True)
    assert data["inputs"]["optimizer"] == "paged-adamw"
    assert data["inputs"]["model"] == "llama-2-7b+lora16+nf4-dq"


def test_cli_skip_modules_reaches_the_estimate(capsys):
    code = main(["estimate", "gpt2", "--seq-len", "8", "--method", "formula", "--quantization", "int8",
                 "--skip-modules", "lm_head,h.0", "--json", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["skip_modules"] == ["lm_head", "h.0"]


@pytest.mark.parametrize("argv, expected", [
    (["estimate", "gpt2", "--quantization", "nf3"], "argument --quantization: invalid choice: 'nf3'"),
    (["check", "gpt2", "--double-quant", "--gpu", "T4"], "double_quant=True needs quantization="),
    (["max-batch", "gpt2", "--quantization", "int8", "--double-quant", "--gpu", "T4"], "not 'int8'"),
    (["plan", "gpt2", "--quantization", "nf4", "--skip-modules", ",,", "--gpu", "T4"],
     "argument --skip-modules: module names must be comma-separated"),
])
def test_cli_bad_quantization_is_one_line_and_exit_2(capsys, argv, expected):
    code = main([*argv, "--quiet"] if argv[0] != "plan" else argv)
    out, err = capsys.readouterr()
    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("memguard: error: ") and err.count("\n") == 1, err
    assert expected in err


def test_gpt2_conv1d_layers_are_quantized_as_transformers_does():
    est = memguard.estimate("gpt2", 2, 128, quantization="nf4", double_quant=True, method="formula")
    # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 12 blocks; the tied LM head stays in 16 bits
    weights = 12 * (768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768)
    assert f"48 linear layers, {weights:,} weights" in est.notes[0]
    assert est.inputs["model"] == "gpt2+lora8+nf4-dq"


def test_the_kind_is_an_enum_that_reads_as_its_name() -> None:
    assert NF4.kind is QuantizationKind.NF4 and INT8.kind == "int8" and (NF4.bits, INT8.bits) == (4, 8)
    assert QLORA.label == "nf4 + double quantization" and type(QLORA.label) is str
    assert QLORA.to_dict() == {"quantization": "nf4", "double_quant": True, "skip_modules": None}
    assert type(QLORA.to_dict()["quantization"]) is str
    step = memguard.Step(quantization="FP4", double_quant=True)
    assert step.quantization is QuantizationKind.FP4 and step.quant == Quantization("fp4", True)
    assert type(step.to_dict()["quantization"]) is str
    assert repr(step) == "Step(quantization='fp4', double_quant=True)"
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; expected one of nf4, fp4, int8"):
        Quantization("int4")
