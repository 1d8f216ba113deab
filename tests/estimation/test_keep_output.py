"""A loop that keeps the model's output (``outputs = model(**batch); outputs.loss.backward()``): its
logits and returned key/value cache live through backward, the optimizer step and the next forward.
``keep_output=True`` counts them, ``False`` drops them, ``None`` (not known) puts them in the band."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, T5Config

import memguard
from memguard.errors import ConfigError
from memguard.estimation.estimator import KEPT_OUTPUT
from memguard.estimation.formula.phases import output_bytes
from memguard.estimation.models import load_model
from memguard.estimation.spec import TrainingSpec
from memguard.estimation.step import Step
from memguard.estimation.trace.record import output_tensors
from memguard.run_config import read_run_config

GPT2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=128)
LLAMA = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=500, max_position_embeddings=128)
T5 = T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=500,
              decoder_start_token_id=0, pad_token_id=0)


def _activations(model, keep: bool | None, method: str, **kw) -> memguard.MemoryEstimate:
    return memguard.estimate(model, batch_size=2, seq_len=32, method=method, keep_output=keep, **kw)


@pytest.mark.parametrize("config", [GPT2, LLAMA, T5], ids=["gpt2", "llama", "t5"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_kept_output_is_counted_or_banded_and_the_formula_equals_the_trace(config, precision: str) -> None:
    kept = {}
    for method in ("trace", "formula"):
        dropped = _activations(config, False, method, precision=precision)
        keep = _activations(config, True, method, precision=precision)
        unknown = _activations(config, None, method, precision=precision)
        kept[method] = keep.breakdown["activations"] - dropped.breakdown["activations"]
        assert kept[method] > 0
        assert KEPT_OUTPUT not in dropped.band and KEPT_OUTPUT not in keep.band
        # not known: estimated as dropped, the output's bytes in the band, so the fit decision covers both
        assert unknown.total_bytes == dropped.total_bytes
        assert unknown.band[KEPT_OUTPUT] == kept[method]
        assert unknown.upper_bytes >= keep.total_bytes
        assert any("keep_output=True" in n for n in keep.notes)
    assert kept["formula"] == kept["trace"]  # logits, cache and encoder output, to the byte


def test_llama_keeps_fp32_rotary_keys_and_16_bit_values_and_logits() -> None:
    """Under autocast the cache's K is fp32 (``apply_rotary_pos_emb`` multiplies the bf16 K by the fp32
    cos and sin), V and the logits bf16: counted element by element."""
    est = _activations(LLAMA, True, "trace", precision="bf16-mixed")
    dropped = _activations(LLAMA, False, "trace", precision="bf16-mixed")
    b, s, kv, layers = 2, 32, 2 * 16, 2
    want = b * s * 500 * 2 + layers * b * s * kv * (4 + 2)
    assert est.breakdown["activations"] - dropped.breakdown["activations"] == want


def test_a_real_forward_holds_what_the_formula_counts() -> None:
    """The tensors of a real training forward's output (CPU, real weights), beyond the loss, are the
    bytes the formula counts: logits and every layer's cached K and V."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2).train()
    ids = torch.randint(0, 500, (2, 32))
    out = model(input_ids=ids, labels=ids)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in output_tensors(out)
            if t is not out.loss}
    assert len(held) == 1 + 2 * 2  # the logits, K and V of both layers
    spec = TrainingSpec.create(batch_size=2, seq_len=32, device="cpu")
    assert sum(held.values()) == output_bytes(load_model(GPT2), spec)


def test_lightning_and_the_trainer_drop_the_output() -> None:
    assert Step(training_loop="lightning").keep_output is False
    assert Step(training_loop="pytorch").keep_output is None
    est = memguard.estimate(GPT2, batch_size=2, seq_len=32, method="formula", training_loop="lightning")
    assert KEPT_OUTPUT not in est.band


def test_training_arguments_say_the_output_is_dropped(tmp_path) -> None:
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "out", "per_device_train_batch_size": 2}))
    assert read_run_config(path)["keep_output"] is False


def test_keep_output_must_be_a_bool_or_none() -> None:
    with pytest.raises(ConfigError, match="keep_output must be True, False or None"):
        Step(keep_output=1)


def test_the_cli_flag(capsys) -> None:
    from memguard.cli import EXIT_OK, main

    got = {}
    for flag in ("--keep-output", "--no-keep-output", None):
        argv = ["estimate", "gpt2", "--batch-size", "1", "--seq-len", "32", "--method", "formula", "--json"]
        assert main(argv + ([flag] if flag else [])) == EXIT_OK
        got[flag] = json.loads(capsys.readouterr().out)
    logits = 32 * 50257 * 4
    assert got["--keep-output"]["inputs"]["keep_output"] is True
    assert got["--keep-output"]["breakdown"]["activations"] - got["--no-keep-output"]["breakdown"]["activations"] \
        == got[None]["band"][KEPT_OUTPUT] > logits
    assert KEPT_OUTPUT not in got["--no-keep-output"]["band"]
