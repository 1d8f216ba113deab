"""Architecture facts read from real transformers models (built from configs on the meta device)
and from plain ``torch.nn.TransformerEncoder`` models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memguard.errors import UnsupportedModelError
from memguard.estimation.arch import (
    Architecture,
    block_stacks,
    find_architecture,
    inspect_architecture,
    transformer_blocks,
)
from memguard.estimation.models import load_model


def _arch(name: str) -> Architecture:
    resolved = load_model(name)
    arch = find_architecture(resolved.module, resolved.config)
    assert arch is not None
    return arch


def test_gpt2_preset() -> None:
    a = _arch("gpt2")
    assert (a.family, a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim) == ("gpt2", 12, 768, 12,
                                                                              12, 64)
    assert (a.ffn, a.vocab, a.activation) == (3072, 50257, "gelu_new")
    assert a.tied_embeddings and a.norm_first and a.fused_qkv and not a.gated_mlp
    assert (a.hidden_dropout, a.attention_dropout, a.embedding_dropout) == (0.1, 0.1, 0.1)
    assert a.attn_implementation == "sdpa"
    assert (a.positions, a.norm, a.head, a.use_cache) == ("learned", "layernorm", "causal-lm", True)
    assert a.decoder_layers == 0 and not a.is_encoder_decoder


def test_bert_and_roberta_presets() -> None:
    bert = _arch("bert-base-uncased")
    assert (bert.family, bert.layers, bert.hidden, bert.heads, bert.ffn) == ("bert", 12, 768, 12,
                                                                            3072)
    assert (bert.vocab, bert.head, bert.norm_first, bert.activation) == (30522, "masked-lm", False,
                                                                        "gelu")
    assert bert.attention_dropout == 0.1 and bert.tied_embeddings
    roberta = _arch("roberta-base")
    assert (roberta.family, roberta.vocab, roberta.layers) == ("bert", 50265, 12)


def test_t5_counts_encoder_and_decoder_blocks() -> None:
    a = _arch("t5-small")
    assert (a.family, a.encoder_layers, a.decoder_layers, a.layers) == ("t5", 6, 6, 12)
    assert (a.heads, a.head_dim, a.hidden, a.ffn) == (8, 64, 512, 2048)
    assert (a.activation, a.gated_mlp, a.positions, a.norm) == ("relu", False, "relative",
                                                                "rmsnorm")
    assert a.is_encoder_decoder and a.head == "seq2seq"
    # T5 applies dropout_rate to attention weights and inside the MLP as well
    assert a.attention_dropout == a.activation_dropout == a.hidden_dropout == 0.1


def test_llama_and_mistral_presets() -> None:
    llama = _arch("llama-2-7b")
    assert (llama.family, llama.layers, llama.heads, llama.kv_heads, llama.head_dim) == (
        "llama", 32, 32, 32, 128)
    assert (llama.ffn, llama.vocab, llama.gated_mlp, llama.activation) == (11008, 32000, True,
                                                                          "silu")
    assert (llama.positions, llama.norm, llama.tied_embeddings) == ("rotary", "rmsnorm", False)
    assert llama.hidden_dropout == llama.attention_dropout == 0.0
    mistral = _arch("mistral-7b")
    assert (mistral.kv_heads, mistral.sliding_window, mistral.ffn) == (8, 4096, 14336)


def test_vit_sequence_is_patches_plus_class_token() -> None:
    a = _arch("vit-base")
    assert a.family == "vit" and a.image_tokens == (224 // 16) ** 2 + 1 == 197
    assert a.vocab is None and a.head == "image-cls" and a.num_labels == 1000


@pytest.mark.slow
def test_distilbert_and_bart_from_configs() -> None:
    from transformers import BartConfig, DistilBertConfig

    d = _arch_of(DistilBertConfig(dim=128, hidden_dim=256, n_layers=2, n_heads=4, vocab_size=100))
    assert (d.family, d.layers, d.hidden, d.heads, d.ffn) == ("bert", 2, 128, 4, 256)
    b = _arch_of(BartConfig(d_model=64, encoder_layers=2, decoder_layers=3,
                            encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100))
    assert (b.family, b.encoder_layers, b.decoder_layers, b.layers) == ("bart", 2, 3, 5)
    assert not b.use_cache  # BART turns its cache off when given labels


def _arch_of(config: object) -> Architecture:
    resolved = load_model(config)
    arch = find_architecture(resolved.module, resolved.config)
    assert arch is not None
    return arch


def test_plain_torch_transformer_encoder() -> None:
    layer = nn.TransformerEncoderLayer(256, 8, dim_feedforward=1024, dropout=0.2,
                                       batch_first=True, norm_first=True)
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(1000, 256),
                              nn.TransformerEncoder(layer, 3, enable_nested_tensor=False),
                              nn.Linear(256, 1000))
    a = inspect_architecture(model)
    assert (a.family, a.layers, a.hidden, a.heads, a.head_dim, a.ffn) == ("torch", 3, 256, 8, 32,
                                                                          1024)
    assert (a.hidden_dropout, a.attention_dropout, a.norm_first, a.activation) == (0.2, 0.2, True,
                                                                                  "relu")
    assert (a.vocab, a.head) == (1000, "causal-lm")


def test_not_a_transformer() -> None:
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    assert find_architecture(mlp) is None
    with pytest.raises(UnsupportedModelError, match="my-mlp"):
        inspect_architecture(mlp, name="my-mlp")


def test_cached_per_module_and_refreshed_on_change() -> None:
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    with torch.device("meta"):
        model = nn.Module()
        model.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    first = find_architecture(model)
    assert find_architecture(model) is first
    with torch.device("meta"):
        model.more = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    again = find_architecture(model)
    assert again is not None and again.layers == 3


def test_blocks_of_decoder_and_encoder_only_models() -> None:
    gpt2 = load_model("gpt2").module
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h) and len(gpt2.transformer.h) == 12
    bert = load_model("bert-base-uncased").module
    assert transformer_blocks(bert) == list(bert.bert.encoder.layer)
    llama = load_model("llama-2-7b").module
    assert block_stacks(llama) == (list(llama.model.layers), [])


def test_blocks_of_encoder_decoder_models_come_encoder_first() -> None:
    t5 = load_model("t5-small").module
    enc, dec = block_stacks(t5)
    assert enc == list(t5.encoder.block) and dec == list(t5.decoder.block)  # not T5's block[i].layer lists
    assert transformer_blocks(t5) == [*t5.encoder.block, *t5.decoder.block]
    with torch.device("meta"):
        model = nn.Transformer(32, 4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, batch_first=True)
    enc, dec = block_stacks(model)
    assert enc == list(model.encoder.layers) and dec == list(model.decoder.layers)


def test_blocks_without_an_architecture_are_the_largest_list() -> None:
    gpt2 = load_model("gpt2").module
    wrapper = nn.Module()  # as a LightningModule holds a transformers model: no config of its own
    wrapper.model = gpt2
    wrapper.heads = nn.ModuleList(nn.Linear(768, 2) for _ in range(20))  # longer, but smaller
    assert find_architecture(wrapper) is None
    assert transformer_blocks(wrapper) == list(gpt2.transformer.h)
    assert transformer_blocks(nn.Sequential(nn.Linear(3, 3))) == []


@pytest.mark.slow
def test_blocks_the_architecture_does_not_lay_out_are_a_guess() -> None:
    from transformers import AlbertConfig

    # ALBERT's 4 layers run one shared group: no list of 4 modules.
    albert = load_model(AlbertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     num_hidden_layers=4, embedding_size=16, vocab_size=64)).module
    assert find_architecture(albert) is not None
    assert block_stacks(albert, guess=False) == ([], [])
    guessed, _ = block_stacks(albert)
    assert guessed == list(albert.albert.encoder.albert_layer_groups)
