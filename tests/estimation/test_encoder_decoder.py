"""Encoder-decoders with two lengths: the encoder's tokens (or Whisper's frames) and the decoder's labels."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import memguard
from memguard import ConfigError
from memguard.cli import EXIT_OK, EXIT_USAGE, main
from memguard.estimation.inputs import make_batch

VOCAB = 1000
POSITIONS = 64  # the small Whisper's encoder positions: 128 mel frames


def _whisper_config(**kw: object) -> WhisperConfig:
    fields = {"vocab_size": VOCAB, "num_mel_bins": 80, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "max_source_positions": POSITIONS, "max_target_positions": 48,
              "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 1}
    return WhisperConfig(**{**fields, **kw})


BUILDERS = {
    "t5": lambda: T5ForConditionalGeneration(T5Config(
        num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=VOCAB,
        decoder_start_token_id=0)),
    "bart": lambda: BartForConditionalGeneration(BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=128)),
    "whisper": lambda: WhisperForConditionalGeneration(_whisper_config()),
}


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return BUILDERS[name]()


@pytest.mark.slow
@pytest.mark.parametrize("decoder_seq_len", [8, 40])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_formula_follows_the_trace_at_either_decoder_length(name: str, decoder_seq_len: int) -> None:
    """Within 5% of the trace with a short and a long decoder (the peak moves between phases)."""
    module = _meta(name)
    seq_len = None if name == "whisper" else 64
    kwargs = {"batch_size": 2, "seq_len": seq_len, "decoder_seq_len": decoder_seq_len, "device": "cpu"}
    traced = memguard.estimate(module, method="trace", **kwargs)
    formula = memguard.estimate(module, method="formula", **kwargs)
    assert traced.inputs["decoder_seq_len"] == formula.inputs["decoder_seq_len"] == decoder_seq_len
    assert traced.inputs["seq_len"] == (POSITIONS if name == "whisper" else 64)
    assert abs(formula.peak_bytes - traced.peak_bytes) / traced.peak_bytes < 0.05


@pytest.mark.slow
def test_the_decoder_length_changes_the_estimate_both_ways() -> None:
    module = _meta("t5")
    peaks = [memguard.estimate(module, batch_size=2, seq_len=64, decoder_seq_len=d, device="cpu",
                               method=m).peak_bytes for m in ("trace", "formula") for d in (8, None, 128)]
    trace, formula = peaks[:3], peaks[3:]
    assert trace[0] < trace[1] < trace[2]
    assert formula[0] < formula[1] < formula[2]
    same = memguard.estimate(module, batch_size=2, seq_len=64, decoder_seq_len=64, device="cpu", method="trace")
    assert same.peak_bytes == trace[1]  # the default is the encoder's length


def test_batches_have_two_lengths() -> None:
    t5 = make_batch(_meta("t5"), 3, 16, decoder_seq_len=5, device="meta")
    assert {k: tuple(v.shape) for k, v in t5.items()} == {"input_ids": (3, 16), "labels": (3, 5)}
    whisper = make_batch(_meta("whisper"), 3, None, device="meta")
    # 2 x 64 mel frames, the conv stem's stride 2 halves them; labels as long as the decoder allows
    assert {k: tuple(v.shape) for k, v in whisper.items()} == {"input_features": (3, 80, 128), "labels": (3, 48)}
    assert whisper["input_features"].dtype == torch.float32
    short = make_batch(_meta("whisper"), 1, None, decoder_seq_len=7, device="meta")
    assert tuple(short["labels"].shape) == (1, 7)


@pytest.mark.slow
def test_whisper_lengths_come_from_the_config_never_from_the_mel_axis() -> None:
    module = _meta("whisper")
    batch = {"input_features": torch.zeros(2, 80, 2 * POSITIONS), "labels": torch.zeros(2, 12, dtype=torch.long)}
    est = memguard.estimate(module, example_input=batch, device="cpu", method="formula")
    assert (est.inputs["seq_len"], est.inputs["decoder_seq_len"]) == (POSITIONS, 12)  # not 80 mel bins
    traced = memguard.estimate(module, example_input=batch, device="cpu", method="trace")
    assert abs(est.peak_bytes - traced.peak_bytes) / traced.peak_bytes < 0.05


def test_bad_lengths_name_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"seq_len=80: .* always sees 64 positions .*decoder_seq_len"):
        memguard.estimate(_meta("whisper"), seq_len=80, device="cpu", method="formula")
    with pytest.raises(ConfigError, match=r"decoder_seq_len=49 is longer .*max_target_positions=48"):
        memguard.estimate(_meta("whisper"), decoder_seq_len=49, device="cpu", method="formula")
    with pytest.raises(ConfigError, match="decoder_seq_len=8 is for encoder-decoder models"):
        memguard.estimate("gpt2", seq_len=16, decoder_seq_len=8, device="cpu", method="formula")
    with pytest.raises(ConfigError, match="decoder_seq_len"):
        memguard.estimate(_meta("t5"), seq_len=16, decoder_seq_len=0, device="cpu", method="formula")


def test_whisper_tiny_preset_has_the_published_size() -> None:
    est = memguard.estimate("whisper-tiny", decoder_seq_len=32, device="cpu", method="formula")
    assert est.breakdown[memguard.Category.PARAMETERS] == 37_760_640 * 4  # openai/whisper-tiny
    assert (est.inputs["seq_len"], est.inputs["decoder_seq_len"]) == (1500, 32)


def test_cli_takes_the_decoder_length(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "t5-small", "--seq-len", "64", "--device", "cpu", "--method", "formula", "--json"]
    assert main([*argv, "--decoder-seq-len", "16"]) == EXIT_OK
    short = json.loads(capsys.readouterr().out)
    assert main(argv) == EXIT_OK
    default = json.loads(capsys.readouterr().out)
    assert short["inputs"]["decoder_seq_len"] == 16 and default["inputs"]["decoder_seq_len"] == 64
    assert short["peak_bytes"] < default["peak_bytes"]
    assert main([*argv, "--decoder-seq-len", "0"]) == EXIT_USAGE
