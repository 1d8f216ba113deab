"""What memguard knows of each architecture family and each transformers ``model_type``: one table.

Two kinds of record, each in one place:

* :class:`Family`, one per block family (:data:`FAMILIES`): how its blocks are laid out, which
  decides what autograd saves in them — which norm, how many linear layers read each norm's output,
  where dropout sits, how Q, K and V are projected, how positions enter attention, what sits between
  the last block and the logits — and the few facts :mod:`memguard.estimation.arch` reads per family
  (encoder-decoder, pre-norm, a key/value cache in training, how the config's activation and
  dropouts apply). The formula's terms and ``arch`` read these fields rather than testing family names.
* :class:`ModelType`, one per transformers ``model_type`` memguard knows (:data:`MODEL_TYPES`): the
  family it is read as, whether its attention normalises Q and K, its own layout where it is laid out
  unlike its family (CLIP's towers), what the formula does not model in it (then the formula refuses
  it, naming what it misses, and leaves it to the trace), and the longest sequence its positions take.
  :func:`facts_of` reads one; a model type not in the table is :data:`UNLISTED` (its family guessed
  from the shape of its config).

The layouts are read from the transformers modelling code of each family
(``modeling_gpt2.py``, ``modeling_bert.py``, ``modeling_distilbert.py``, ``modeling_bart.py``,
``modeling_t5.py``, ``modeling_llama.py``, ``modeling_vit.py``, ``modeling_whisper.py``) and from
``torch/nn/modules/transformer.py``; the model types' facts from the files named beside each.
:mod:`memguard.estimation.arch` and :mod:`memguard.estimation.formula` read this table and nothing
else; ``tests/estimation/test_families.py`` checks that each model type appears once and that every
family a record names has a layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["FAMILIES", "FAMILY_OF_MODEL_TYPE", "MODEL_TYPES", "UNLISTED", "Family", "ModelType", "facts_of"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How the blocks of one architecture family are laid out.

    Attributes:
        name: the family, as ``Architecture.family`` names it.
        norm: ``"layernorm"`` (``native_layer_norm``), ``"rmsnorm"`` (Llama's: the input upcast
            to fp32) or ``"t5-rmsnorm"`` (``T5LayerNorm``, which also keeps its own input).
        qkv_readers: linear layers that read the attention's input: 1 for one fused or packed
            projection (GPT-2's ``c_attn``, torch's ``in_proj``), 3 for separate Q, K and V.
        gated_readers: a gated MLP's gate and up projections both read the MLP's input (else,
            and for an ungated MLP, one linear layer reads it).
        packed_attention: torch's ``nn.MultiheadAttention`` (a packed in-projection whose
            output stays alive), not transformers' Q/K/V handed to SDPA or eager attention.
        fused_qkv: Q, K and V are views of one projection output.
        rotary: rotary positions are applied to Q and K (Llama).
        kv_cache: the self-attention returns a key/value cache when the config asks for one.
        cross_kv_cache: the cross-attention's K/V are cached too.
        sliding_window: a sliding window shorter than the sequence passes an explicit mask.
        residual_dropout: dropout on the attention and MLP outputs of each block (without it, none on
            the embeddings either: Llama).
        no_attention_dropout: model types of the family without dropout after the attention
            (DistilBERT adds the attention output to the residual directly).
        eager_fp32_softmax: eager attention takes its softmax in fp32 (Llama, ViT:
            ``softmax(..., dtype=torch.float32)``).
        position_bias: T5's relative position bias, computed once and added to every attention.
        embedding_norm: a LayerNorm on the embeddings (BERT, BART).
        final_norm: a norm after the last block (pre-norm models; counted for plain torch).
        head_input: what the output head saves: ``"linear"`` (the last hidden states),
            ``"class-token"`` (ViT's classifier reads the class token) or ``"none"`` (plain
            torch: the head is unknown).
        mlm_transform: a masked-LM head has BERT's transform (dense, GELU, LayerNorm) before
            its decoder.
        final_dropout: dropout after the final norm, whose mask and output are kept (T5).
        tied_head_rescale: a tied head's input is scaled by ``d_model ** -0.5`` (T5).
        encoder_final_norm: an encoder-decoder's encoder output passes a final norm and dropout
            that the cross-attentions' input keeps (T5).
        logits_upcast: a causal-LM head upcasts its logits to fp32 before the loss
            (transformers' ``ForCausalLMLoss``: ``logits.float()``).
        fp32_logits_bias: the head adds an fp32 bias, so the logits are fp32 (BART's
            ``final_logits_bias``).
        conv_stem: the encoder's input passes two 1-D convolutions with GELU, the second of
            stride 2, over log-mel frames (Whisper; :func:`memguard.estimation.formula.embeddings.audio_stem_bytes`).
        note: what the estimate notes for this family, or ``""``.
        encoder_decoder: a decoder with cross-attention over an encoder (T5, BART, Whisper), whatever
            the config's ``is_encoder_decoder`` says.
        norm_first: pre-norm blocks, the norm inside the residual branch (plain torch: read from each
            layer's ``norm_first`` instead).
        training_cache: a training forward returns the key/value cache when the config's ``use_cache``
            asks (BART-like models turn it off themselves when given labels: ``BartModel.forward``).
        always_gated: the MLP is gated whatever the config's activation is called (``LlamaMLP``'s
            ``gate_proj``).
        one_dropout: one probability, the config's ``dropout_rate``, drops the residual branches, the
            attention weights and the MLP's activations (T5's ``nn.Dropout(config.dropout_rate)`` in
            ``T5Attention`` and ``T5DenseActDense``), whatever else the config names.
        gated_gelu_new: a gated ``gelu`` MLP runs ``gelu_new`` (T5 v1.1's ``gated-gelu``:
            ``T5Config`` maps it to ``gelu_new``).
    """

    name: str
    norm: Literal["layernorm", "rmsnorm", "t5-rmsnorm"]
    qkv_readers: int = 3
    gated_readers: bool = False
    packed_attention: bool = False
    fused_qkv: bool = False
    rotary: bool = False
    kv_cache: bool = True
    cross_kv_cache: bool = True
    sliding_window: bool = False
    residual_dropout: bool = True
    no_attention_dropout: frozenset[str] = frozenset()
    eager_fp32_softmax: bool = False
    position_bias: bool = False
    embedding_norm: bool = False
    final_norm: bool = True
    head_input: Literal["linear", "class-token", "none"] = "linear"
    mlm_transform: bool = False
    final_dropout: bool = False
    tied_head_rescale: bool = False
    encoder_final_norm: bool = False
    logits_upcast: bool = True
    fp32_logits_bias: bool = False
    conv_stem: bool = False
    note: str = ""
    encoder_decoder: bool = False
    norm_first: bool = True
    training_cache: bool = False
    always_gated: bool = False
    one_dropout: bool = False
    gated_gelu_new: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # pre-LayerNorm, one c_attn projection for Q, K and V (modeling_gpt2.py, GPT2Block)
    Family("gpt2", "layernorm", qkv_readers=1, fused_qkv=True, sliding_window=True, training_cache=True),
    # post-LayerNorm, separate Q/K/V, embedding LayerNorm, MLM head transform (BertLayer)
    Family("bert", "layernorm", no_attention_dropout=frozenset({"distilbert"}),
           embedding_norm=True, final_norm=False, mlm_transform=True, norm_first=False),
    # BERT's layout with a decoder and an fp32 final_logits_bias (BartEncoderLayer)
    Family("bart", "layernorm", embedding_norm=True, final_norm=False, mlm_transform=True,
           fp32_logits_bias=True, encoder_decoder=True, norm_first=False),
    # pre-RMSNorm keeping its input, relative position bias (T5Block, T5LayerNorm)
    Family("t5", "t5-rmsnorm", gated_readers=True, position_bias=True, final_dropout=True,
           tied_head_rescale=True, encoder_final_norm=True, encoder_decoder=True, training_cache=True,
           one_dropout=True, gated_gelu_new=True),
    # pre-LayerNorm audio encoder-decoder: conv stem, final LayerNorm in both stacks, head tied to
    # the decoder's embedding without bias (WhisperEncoderLayer, WhisperEncoder, WhisperDecoder)
    Family("whisper", "layernorm", encoder_final_norm=True, conv_stem=True, encoder_decoder=True, training_cache=True),
    # pre-RMSNorm, rotary Q/K, gated MLP, no dropout on the residual (LlamaDecoderLayer)
    Family("llama", "rmsnorm", gated_readers=True, rotary=True, sliding_window=True,
           residual_dropout=False, eager_fp32_softmax=True, training_cache=True, always_gated=True),
    # pre-LayerNorm image encoder; the classifier reads the class token (ViTLayer)
    Family("vit", "layernorm", kv_cache=False, eager_fp32_softmax=True, head_input="class-token"),
    # nn.TransformerEncoderLayer / TransformerDecoderLayer over nn.MultiheadAttention
    Family("torch", "layernorm", qkv_readers=1, packed_attention=True, kv_cache=False,
           cross_kv_cache=False, head_input="none", logits_upcast=False,
           note="plain torch model: its embedding and head are not known to the formula; "
                "one LayerNorm after the blocks assumed"),
)}
"""Every family (``Architecture.family``), by name: the layout of its blocks."""


@dataclasses.dataclass(frozen=True)
class ModelType:
    """What memguard knows of one transformers ``model_type``.

    Attributes:
        name: the ``model_type`` (``config.model_type``).
        family: the :data:`FAMILIES` entry it is read as, or ``""``: guessed from the shape of its
            config (``memguard.estimation.arch``).
        qk_norm: its attention normalises Q and K after their projections
            (``self.q_norm(self.q_proj(x))``).
        fused_qkv: one projection makes Q, K and V (GPT-2's ``c_attn``).
        layout: its own block layout, where it is laid out unlike the rest of its family (CLIP's
            towers); ``None``: its family's.
        not_modelled: what the formula does not model in it, ``""`` when it does; the formula then
            refuses it and the trace estimates it.
        max_positions: its learned absolute positions bound the sequence: at most the config's
            ``max_position_embeddings`` (``n_positions``) less :attr:`position_offset`.
        position_offset: positions its embedding takes before the first token's (RoBERTa's start
            after the padding index: ``create_position_ids_from_input_ids``).
    """

    name: str
    family: str = ""
    qk_norm: bool = False
    fused_qkv: bool = False
    layout: Family | None = None
    not_modelled: str = ""
    max_positions: bool = False
    position_offset: int = 0


def _each(family: str, names: str, **facts: Any) -> tuple[ModelType, ...]:
    """One :class:`ModelType` per name of ``names`` (space-separated), with the same facts."""
    return tuple(ModelType(name, family, **facts) for name in names.split())


MODEL_TYPES: tuple[ModelType, ...] = (
    ModelType("gpt2", "gpt2", fused_qkv=True, max_positions=True),
    *_each("gpt2", "gpt_neo gptj opt", max_positions=True),
    *_each("gpt2", "gpt_bigcode"),
    *_each("bert", "bert electra distilbert", max_positions=True),
    *_each("bert", "roberta xlm-roberta", max_positions=True, position_offset=2),
    *_each("bert", "camembert"),
    *_each("bart", "bart mbart marian pegasus blenderbot"),
    *_each("t5", "t5 mt5 umt5"),
    *_each("llama", "llama mistral qwen2 gemma gemma2 phi3 mixtral olmo granite qwen2_moe"),
    # the attention's q_norm/k_norm (modeling_qwen3.py, modeling_qwen3_moe.py, modeling_olmoe.py)
    *_each("llama", "qwen3 qwen3_moe olmoe", qk_norm=True),
    *_each("vit", "vit deit dinov2"),
    ModelType("whisper", "whisper"),
    # unlisted families, guessed from the config: ALBERT's learned positions (modeling_albert.py);
    # OLMo 2's q_norm/k_norm (modeling_olmo2.py)
    ModelType("albert", max_positions=True),
    ModelType("olmo2", qk_norm=True),
    # DeepSeek's attention compresses K and V through low-rank projections with their own norms, and
    # pads V to Q's head size for SDPA (DeepseekV3Attention in modeling_deepseek_v3.py)
    *_each("", "deepseek_v2 deepseek_v3", not_modelled="multi-head latent attention"),
    # CLIPModel.forward (modeling_clip.py): a text tower and a vision tower, each pooled and projected,
    # and clip_loss, a cross-entropy over the batch's B x B similarity logits in both directions;
    # ChineseCLIPModel (modeling_chinese_clip.py) pairs a BERT text tower with CLIP's vision tower
    *_each("", "clip chinese_clip",
           not_modelled="two towers (text and vision) and a contrastive loss over the batch"),
    # SiglipModel.forward (modeling_siglip.py, Siglip2Model in modeling_siglip2.py): the two towers and a
    # sigmoid loss over the batch's B x B pairs
    *_each("", "siglip siglip2", not_modelled="two towers (text and vision) and a sigmoid loss over the batch"),
    # ChineseCLIPVisionTransformer (modeling_chinese_clip.py): CLIP's vision tower, not checked against the trace
    ModelType("chinese_clip_vision_model", not_modelled="Chinese CLIP's vision tower"),
    # SiglipVisionTransformer (modeling_siglip.py): patches without a class token (arch counts one), and the
    # forward of the attention-pooling head (SiglipMultiheadAttentionPoolingHead, an nn.MultiheadAttention
    # whose packed K/V projection of every patch is alive with the saved activations at the end of forward)
    ModelType("siglip_vision_model", not_modelled="SigLIP's vision tower (no class token, attention-pooling head)"),
    # Siglip2VisionEmbeddings (modeling_siglip2.py): patches of any resolution (NaFlex), position embeddings
    # resized per image and a patch attention mask
    ModelType("siglip2_vision_model",
              not_modelled="SigLIP 2's vision tower (variable resolution, a patch attention mask)"),
    # Siglip2TextTransformer (modeling_siglip2.py): SigLIP's text tower, not checked against the trace
    ModelType("siglip2_text_model", not_modelled="SigLIP 2's text tower"),
    # SwinLayer (modeling_swin.py, modeling_swinv2.py): attention within shifted windows with a relative
    # position bias per window (torch.roll, window_partition), heads per stage (num_heads a list), and
    # SwinPatchMerging between stages, which quarters the tokens and doubles the width
    *_each("", "swin swinv2 donut-swin maskformer-swin",
           not_modelled="windowed attention (shifted windows, patch merging between stages)"),
    # CLIPVisionTransformer (modeling_clip.py): ViT's pre-LayerNorm blocks (CLIPEncoderLayer) behind a
    # LayerNorm on the embeddings (pre_layrnorm); post_layernorm normalises the pooled class token only,
    # which a loss on last_hidden_state does not read
    ModelType("clip_vision_model", layout=Family("clip_vision_model", "layernorm", kv_cache=False,
                                                 embedding_norm=True, final_norm=False, head_input="none")),
    # CLIPTextTransformer (modeling_clip.py): the same blocks under a causal mask (SDPA's is_causal, no mask
    # tensor), final_layer_norm over every token; the pooled end-of-text token is a gather of its output
    ModelType("clip_text_model", layout=Family("clip_text_model", "layernorm", kv_cache=False, head_input="none")),
    # SiglipTextTransformer (modeling_siglip.py): the same blocks without a mask, final_layer_norm over
    # every token; the linear head reads the last token for pooler_output
    ModelType("siglip_text_model",
              layout=Family("siglip_text_model", "layernorm", kv_cache=False, head_input="none")),
)
"""Every transformers ``model_type`` memguard knows, once each (a test pins it)."""

_BY_NAME: dict[str, ModelType] = {m.name: m for m in MODEL_TYPES}

UNLISTED = ModelType("")
"""The facts of a model type not in :data:`MODEL_TYPES`: a guessed family, nothing else known."""

FAMILY_OF_MODEL_TYPE: dict[str, str] = {m.name: m.family for m in MODEL_TYPES if m.family}
"""transformers ``model_type`` -> block family, for the model types whose family is listed."""


def facts_of(model_type: str) -> ModelType:
    """The :class:`ModelType` of ``model_type``, :data:`UNLISTED` for one not in the table."""
    return _BY_NAME.get(model_type, UNLISTED)
