"""The refined formula: exact model-state bytes, activation terms, phases, speed, accuracy."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import memguard
from memguard.errors import ConfigError, UnsupportedModelError
from memguard.estimation.arch import inspect_architecture
from memguard.estimation.formula import (
    activation_bytes,
    formula_breakdown,
    model_state,
    optimizer_state_bytes,
)
from memguard.estimation.formula.attention import attention_core_bytes
from memguard.estimation.formula.context import make_ctx
from memguard.estimation.formula.inventory import inventory
from memguard.estimation.formula.loss import loss_backward_bytes, loss_saved_bytes
from memguard.estimation.formula.mlp import mlp_bytes
from memguard.estimation.formula.phases import step_phases
from memguard.estimation.models import ResolvedModel, load_model
from memguard.estimation.result import Category
from memguard.estimation.spec import TrainingSpec

GPT2_PARAMS = 124_439_808


def _spec(**kw: object) -> TrainingSpec:
    kw.setdefault("batch_size", 2)
    kw.setdefault("seq_len", 64)
    return TrainingSpec.create(**kw)  # type: ignore[arg-type]


def _tiny_gpt2() -> ResolvedModel:
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=1000, n_positions=512)
    with torch.device("meta"):
        return load_model(GPT2LMHeadModel(config))


def _tiny_llama() -> ResolvedModel:
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=160,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        return load_model(LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def gpt2() -> ResolvedModel:
    return load_model("gpt2")


# --------------------------------------------------------------------------- model states


# What each of these tests reads of the model state, for a bare module (the library asks model_state).
def parameter_bytes(module: torch.nn.Module, spec: TrainingSpec) -> int:
    return model_state(inventory(module), spec).parameters


def gradient_bytes(module: torch.nn.Module, spec: TrainingSpec) -> int:
    return model_state(inventory(module), spec).gradients


def optimizer_step_bytes(module: torch.nn.Module, spec: TrainingSpec) -> int:
    return model_state(inventory(module), spec).optimizer_step


def test_parameter_bytes_of_gpt2(gpt2: ResolvedModel) -> None:
    m = gpt2.module
    assert sum(p.numel() for p in m.parameters()) == GPT2_PARAMS  # tied head counted once
    assert parameter_bytes(m, _spec(precision="32-true")) == GPT2_PARAMS * 4
    assert parameter_bytes(m, _spec(precision="bf16-mixed")) == GPT2_PARAMS * 4  # fp32 master
    assert parameter_bytes(m, _spec(precision="bf16-true")) == GPT2_PARAMS * 2


def test_gradients_and_adamw_state(gpt2: ResolvedModel) -> None:
    m = gpt2.module
    n_tensors = len(list(m.parameters()))
    spec = _spec(optimizer="adamw")
    assert gradient_bytes(m, spec) == GPT2_PARAMS * 4
    state, notes = optimizer_state_bytes(m, spec)
    assert state == 2 * GPT2_PARAMS * 4 + 4 * n_tensors  # exp_avg, exp_avg_sq, fp32 step
    assert notes == []
    bf16 = _spec(optimizer="adamw", precision="bf16-true")
    assert optimizer_state_bytes(m, bf16)[0] == 2 * GPT2_PARAMS * 2 + 4 * n_tensors
    assert optimizer_state_bytes(m, _spec(optimizer="sgd"))[0] == 0
    assert optimizer_state_bytes(m, _spec(optimizer="sgd-momentum"))[0] == GPT2_PARAMS * 4
    assert optimizer_state_bytes(m, _spec(optimizer="none"))[0] == 0


def test_adafactor_keeps_rows_and_columns() -> None:
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(300, 200), nn.LayerNorm(200))
    spec = _spec(optimizer="adafactor")
    # weight 200x300: 200 + 300 numbers; bias 200, LayerNorm weight and bias 200 each: full
    expected = (200 + 300 + 200 + 200 + 200) * 4 + 4 * 4  # + a step per tensor
    assert optimizer_state_bytes(m, spec)[0] == expected
    assert optimizer_step_bytes(m, spec) == 200 * 300 * 4  # row_var @ col_var


def test_one_model_state_for_every_caller(gpt2: ResolvedModel) -> None:
    """The public sizes and the formula's phases read the same :class:`ModelState`."""
    m = gpt2.module
    spec = _spec(optimizer="adafactor", precision="bf16-true", device="cpu")
    state = model_state(inventory(m), spec)
    assert state.parameters == parameter_bytes(m, spec) == GPT2_PARAMS * 2
    assert state.gradients == gradient_bytes(m, spec) == GPT2_PARAMS * 2
    assert (state.optimizer_state, list(state.notes)) == optimizer_state_bytes(m, spec)
    assert state.optimizer_step == optimizer_step_bytes(m, spec) == 50257 * 768 * 2  # row_var @ col_var
    phases, _ = step_phases(gpt2, spec)
    step = phases["optimizer step"]
    assert step[Category.OPTIMIZER_STATE] == state.optimizer_state
    assert (step[Category.PARAMETERS], step[Category.GRADIENTS]) == (state.parameters, state.gradients)


def test_optimizer_step_temporaries(gpt2: ResolvedModel) -> None:
    m = gpt2.module
    largest = 50257 * 768 * 4  # the tied embedding
    assert optimizer_step_bytes(m, _spec(device="cpu")) == 2 * largest
    assert optimizer_step_bytes(m, _spec(device="cuda")) == GPT2_PARAMS * 4  # foreach sqrt copy
    assert optimizer_step_bytes(m, _spec(optimizer="sgd", device="cuda")) == 0


def test_unknown_optimizer_assumes_adam() -> None:
    model = _tiny_gpt2().module

    def mine(params: object) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params)  # type: ignore[arg-type]

    spec = _spec(optimizer=mine)
    state, notes = optimizer_state_bytes(model, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert state == 2 * gradient_bytes(model, spec) + 4 * len(trainable)
    assert any("assumed Adam" in n for n in notes)


def test_frozen_parameters_get_no_grads_or_state() -> None:
    resolved = _tiny_gpt2()
    m = resolved.module
    spec = _spec()
    full_grads = gradient_bytes(m, spec)
    full_state = optimizer_state_bytes(m, spec)[0]
    m.transformer.wte.requires_grad_(False)  # the tied head too
    frozen = 1000 * 64 * 4
    assert gradient_bytes(m, spec) == full_grads - frozen
    assert optimizer_state_bytes(m, spec)[0] == full_state - 2 * frozen - 4
    assert parameter_bytes(m, spec) == sum(p.numel() for p in m.parameters()) * 4
    # freezing the embeddings and the lower half of the blocks: those blocks keep nothing
    acts_emb_frozen = activation_bytes(resolved, spec).saved
    for block in m.transformer.h[:2]:
        block.requires_grad_(False)
    assert activation_bytes(resolved, spec).saved < acts_emb_frozen
    breakdown, _ = formula_breakdown(resolved, spec)
    assert breakdown.get(Category.GRADIENTS, 0) <= full_grads - frozen


# --------------------------------------------------------------------------- activations, phases


_PROPERTY_MODEL = _tiny_gpt2()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 32), s=st.integers(1, 500),
       precision=st.sampled_from(["32-true", "bf16-mixed", "bf16-true"]),
       ckpt=st.booleans(), device=st.sampled_from(["cpu", "cuda"]))
def test_properties(b: int, s: int, precision: str, ckpt: bool, device: str) -> None:
    """Non-negative integers; the peak grows with batch and sequence; activations are affine in
    the batch size (batch-independent terms: rotary tables, position buckets)."""
    def spec(bb: int, ss: int) -> TrainingSpec:
        return _spec(batch_size=bb, seq_len=ss, precision=precision, gradient_checkpointing=ckpt,
                     device=device)

    breakdown, notes = formula_breakdown(_PROPERTY_MODEL, spec(b, s))
    assert all(isinstance(v, int) and v >= 0 for v in breakdown.values())
    assert any("peak at" in n for n in notes)
    peak = sum(breakdown.values())
    assert sum(formula_breakdown(_PROPERTY_MODEL, spec(b + 1, s))[0].values()) >= peak
    assert sum(formula_breakdown(_PROPERTY_MODEL, spec(b, s + 1))[0].values()) >= peak
    a0, a1, a2 = (activation_bytes(_PROPERTY_MODEL, spec(b + k, s)).saved for k in range(3))
    assert a2 - a1 == a1 - a0 > 0


def test_checkpointing_and_fused_attention_keep_less() -> None:
    resolved = _tiny_gpt2()
    plain = activation_bytes(resolved, _spec(batch_size=4, seq_len=256, device="cpu")).saved
    ckpt = activation_bytes(resolved, _spec(batch_size=4, seq_len=256, device="cpu",
                                            gradient_checkpointing=True)).saved
    fused = activation_bytes(resolved, _spec(batch_size=4, seq_len=256, device="cuda")).saved
    assert ckpt < plain / 4
    # GPT-2 has attention dropout: the CPU's math kernel keeps S x S matrices, CUDA's fused none
    s_by_s = 4 * 4 * 256 * 256 * 4  # batch * heads * S * S * fp32, per matrix
    assert plain - fused > 4 * 3 * s_by_s  # softmax, noise, dropped probabilities per block


def test_logits_dominate_a_small_lm() -> None:
    """The loss's copies of the logits (B x S x V): three fp32 ones at the start of backward."""
    resolved = _tiny_llama()
    spec = _spec(batch_size=4, seq_len=128, device="cpu")
    breakdown, notes = formula_breakdown(resolved, spec)
    logits = 4 * 128 * 1000 * 4
    assert "formula: peak at the start of backward" in notes
    assert breakdown[Category.TEMPORARY] == 2 * logits  # nll_loss and log_softmax gradients
    assert breakdown[Category.ACTIVATIONS] > logits  # log_softmax output among them


def test_needs_seq_len_and_a_transformer() -> None:
    with pytest.raises(ConfigError, match="seq_len"):
        formula_breakdown(load_model("llama-2-7b"), _spec(seq_len=None))
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError):
        formula_breakdown(load_model(mlp), _spec())


def test_estimate_entry_point() -> None:
    kw = {"batch_size": 2, "seq_len": 512, "method": "formula", "optimizer": "sgd"}
    cpu = memguard.estimate("gpt2", device="cpu", **kw)
    cuda = memguard.estimate("gpt2", device="cuda", **kw)
    assert cpu.method == "formula" and cpu.breakdown[Category.OVERHEAD] == 0
    assert cuda.breakdown[Category.OVERHEAD] > 0
    assert cpu.breakdown[Category.PARAMETERS] == GPT2_PARAMS * 4
    assert cpu.peak_bytes > cuda.peak_bytes  # the CPU keeps S x S attention matrices


def test_fast_once_inspected() -> None:
    resolved = load_model("llama-2-7b")
    spec = _spec(batch_size=8, seq_len=2048, precision="bf16-mixed")
    formula_breakdown(resolved, spec)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        formula_breakdown(resolved, spec)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 5e-3  # well under 1 ms on a developer machine


def test_lightning_loop_keeps_last_steps_gradients_through_forward() -> None:
    resolved = _tiny_gpt2()
    spec = _spec(batch_size=4, seq_len=128, device="cpu")
    grads = gradient_bytes(resolved.module, spec)
    pytorch, _ = step_phases(resolved, spec)
    lightning, _ = step_phases(resolved, spec, training_loop="lightning")
    fwd_pt, fwd_l = pytorch["end of forward"], lightning["end of forward"]
    assert fwd_pt.get(Category.GRADIENTS, 0) == 0 and fwd_l[Category.GRADIENTS] == grads
    assert sum(fwd_l.values()) == sum(fwd_pt.values()) + grads
    assert lightning["optimizer step"] == pytorch["optimizer step"]
    with pytest.raises(ConfigError, match="training_loop"):
        formula_breakdown(resolved, spec, training_loop="keras")


# --------------------------------------------------------------------------- CUDA's autocast rules


def _bert_ctx(device: str, precision: str = "bf16-mixed", **config: object) -> tuple[Any, Any]:
    cfg = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                     vocab_size=1000, attn_implementation="eager", **config)
    with torch.device("meta"):
        module = BertForMaskedLM(cfg)
    arch = inspect_architecture(module, cfg)
    spec = _spec(batch_size=2, seq_len=64, precision=precision, device=device)
    return make_ctx(arch, spec), arch


def test_eager_attention_keeps_7_bytes_per_score_on_cuda_in_bf16() -> None:
    """CUDA's autocast runs softmax in fp32 (4 bytes), dropout keeps a 1-byte mask and the second
    matmul a bf16 copy (2); the CPU's autocast leaves softmax in bf16: 2 + 2-byte noise + 2."""
    b, h, s, hidden = 2, 4, 64, 128
    scores, out = b * h * s * s, b * s * hidden * 2
    cuda, _ = _bert_ctx("cuda")
    cpu, _ = _bert_ctx("cpu")
    assert attention_core_bytes(cuda, b * s, s, s, masked=False, dropout=0.1) - out == 7 * scores
    assert attention_core_bytes(cpu, b * s, s, s, masked=False, dropout=0.1) - out == 6 * scores
    assert attention_core_bytes(cuda, b * s, s, s, masked=False, dropout=0.0) - out == 6 * scores


def test_gelu_new_runs_in_fp32_under_cuda_autocast() -> None:
    """gelu_new calls torch.pow, on CUDA's fp32 list: it saves the fp32 input cast, tanh and
    1 + tanh (fp32) and 0.5·x (bf16); the next linear saves a bf16 cast of its fp32 output."""
    cuda, _ = _bert_ctx("cuda")
    cpu, _ = _bert_ctx("cpu")
    rows, ffn = 128, 512
    assert mlp_bytes(cuda, rows, ffn, False, "gelu_new", 0.0) == rows * ffn * (3 * 4 + 2 + 2)
    assert mlp_bytes(cpu, rows, ffn, False, "gelu_new", 0.0) == rows * ffn * 5 * 2
    assert mlp_bytes(cuda, rows, ffn, False, "gelu", 0.0) == mlp_bytes(cpu, rows, ffn, False, "gelu", 0.0)


def test_cross_entropy_of_bf16_logits_on_cuda() -> None:
    """CUDA has no autocast rule for cross_entropy_loss: log_softmax stays bf16 and nll_loss saves
    an fp32 copy (6 bytes per logit); the CPU casts the logits to fp32 first (4). Causal-LM heads
    upcast the logits themselves (4 on both)."""
    n = 1000
    cuda, _ = _bert_ctx("cuda")
    cpu, _ = _bert_ctx("cpu")
    assert loss_saved_bytes(cuda, n) == 6 * n and loss_backward_bytes(cuda, n) == 10 * n
    assert loss_saved_bytes(cpu, n) == 4 * n and loss_backward_bytes(cpu, n) == 12 * n
    resolved = _tiny_gpt2()
    arch = inspect_architecture(resolved.module, resolved.config)
    gpt2 = make_ctx(arch, _spec(precision="bf16-mixed", device="cuda"))
    assert loss_saved_bytes(gpt2, n) == 4 * n
