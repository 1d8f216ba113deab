"""The block layouts of the architecture families: one :class:`Family` per family, in one table.

What autograd saves in a transformer block depends on how the block is laid out: which norm it
uses, how many linear layers read each norm's output, where dropout sits, how Q, K and V are
projected, how positions enter attention, and what sits between the last block and the logits.
Each family of :mod:`memguard.estimation.arch` (``Architecture.family``) is one entry of
:data:`FAMILIES`; the formula's terms read these fields rather than testing family names.

The layouts are read from the transformers modelling code of each family
(``modeling_gpt2.py``, ``modeling_bert.py``, ``modeling_distilbert.py``, ``modeling_bart.py``,
``modeling_t5.py``, ``modeling_llama.py``, ``modeling_vit.py``, ``modeling_whisper.py``) and from
``torch/nn/modules/transformer.py``. A model type laid out unlike the family it is read as (CLIP's
towers, ``modeling_clip.py``) has its own entry in :data:`BY_MODEL_TYPE`; one the formula does not
model (CLIP's and SigLIP's dual models, SigLIP's towers, Swin) is refused by
:func:`refuse_unmodelled`, naming what it misses, and left to the trace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from memguard.errors import UnsupportedModelError
from memguard.estimation.arch import Architecture

__all__ = ["BY_MODEL_TYPE", "FAMILIES", "Family", "family_of", "model_type_of", "refuse_unmodelled"]


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
        residual_dropout: dropout on the attention and MLP outputs of each block.
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


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # pre-LayerNorm, one c_attn projection for Q, K and V (modeling_gpt2.py, GPT2Block)
    Family("gpt2", "layernorm", qkv_readers=1, fused_qkv=True, sliding_window=True),
    # post-LayerNorm, separate Q/K/V, embedding LayerNorm, MLM head transform (BertLayer)
    Family("bert", "layernorm", no_attention_dropout=frozenset({"distilbert"}),
           embedding_norm=True, final_norm=False, mlm_transform=True),
    # BERT's layout with a decoder and an fp32 final_logits_bias (BartEncoderLayer)
    Family("bart", "layernorm", embedding_norm=True, final_norm=False, mlm_transform=True,
           fp32_logits_bias=True),
    # pre-RMSNorm keeping its input, relative position bias (T5Block, T5LayerNorm)
    Family("t5", "t5-rmsnorm", gated_readers=True, position_bias=True, final_dropout=True,
           tied_head_rescale=True, encoder_final_norm=True),
    # pre-LayerNorm audio encoder-decoder: conv stem, final LayerNorm in both stacks, head tied to
    # the decoder's embedding without bias (WhisperEncoderLayer, WhisperEncoder, WhisperDecoder)
    Family("whisper", "layernorm", encoder_final_norm=True, conv_stem=True),
    # pre-RMSNorm, rotary Q/K, gated MLP, no dropout on the residual (LlamaDecoderLayer)
    Family("llama", "rmsnorm", gated_readers=True, rotary=True, sliding_window=True,
           residual_dropout=False, eager_fp32_softmax=True),
    # pre-LayerNorm image encoder; the classifier reads the class token (ViTLayer)
    Family("vit", "layernorm", kv_cache=False, eager_fp32_softmax=True, head_input="class-token"),
    # nn.TransformerEncoderLayer / TransformerDecoderLayer over nn.MultiheadAttention
    Family("torch", "layernorm", qkv_readers=1, packed_attention=True, kv_cache=False,
           cross_kv_cache=False, head_input="none", logits_upcast=False,
           note="plain torch model: its embedding and head are not known to the formula; "
                "one LayerNorm after the blocks assumed"),
)}
"""Every family of :mod:`memguard.estimation.arch`, by name."""


_NOT_MODELLED: dict[str, str] = {
    # DeepSeek's attention compresses K and V through low-rank projections with their own norms, and
    # pads V to Q's head size for SDPA (DeepseekV3Attention in modeling_deepseek_v3.py)
    **dict.fromkeys(("deepseek_v2", "deepseek_v3"), "multi-head latent attention"),
    # CLIPModel.forward (modeling_clip.py): a text tower and a vision tower, each pooled and projected,
    # and clip_loss, a cross-entropy over the batch's B x B similarity logits in both directions;
    # ChineseCLIPModel (modeling_chinese_clip.py) pairs a BERT text tower with CLIP's vision tower
    **dict.fromkeys(("clip", "chinese_clip"), "two towers (text and vision) and a contrastive loss over the batch"),
    # SiglipModel.forward (modeling_siglip.py, Siglip2Model in modeling_siglip2.py): the two towers and a
    # sigmoid loss over the batch's B x B pairs
    **dict.fromkeys(("siglip", "siglip2"), "two towers (text and vision) and a sigmoid loss over the batch"),
    # ChineseCLIPVisionTransformer (modeling_chinese_clip.py): CLIP's vision tower, not checked against the trace
    "chinese_clip_vision_model": "Chinese CLIP's vision tower",
    # SiglipVisionTransformer (modeling_siglip.py): patches without a class token (arch counts one), and the
    # forward of the attention-pooling head (SiglipMultiheadAttentionPoolingHead, an nn.MultiheadAttention
    # whose packed K/V projection of every patch is alive with the saved activations at the end of forward)
    "siglip_vision_model": "SigLIP's vision tower (no class token, attention-pooling head)",
    # Siglip2VisionEmbeddings (modeling_siglip2.py): patches of any resolution (NaFlex), position embeddings
    # resized per image and a patch attention mask
    "siglip2_vision_model": "SigLIP 2's vision tower (variable resolution, a patch attention mask)",
    # Siglip2TextTransformer (modeling_siglip2.py): SigLIP's text tower, not checked against the trace
    "siglip2_text_model": "SigLIP 2's text tower",
    # SwinLayer (modeling_swin.py, modeling_swinv2.py): attention within shifted windows with a relative
    # position bias per window (torch.roll, window_partition), heads per stage (num_heads a list), and
    # SwinPatchMerging between stages, which quarters the tokens and doubles the width
    **dict.fromkeys(("swin", "swinv2", "donut-swin", "maskformer-swin"),
                    "windowed attention (shifted windows, patch merging between stages)"),
}
"""Model types whose blocks or loss the formula does not lay out, and what it would miss: estimated
with the nearest family they would be off (a SigLIP image has no class token, a Swin stage windows its
attention and has its own width), so the formula refuses them and the trace estimates them."""


BY_MODEL_TYPE: dict[str, Family] = {f.name: f for f in (
    # CLIPVisionTransformer (modeling_clip.py): ViT's pre-LayerNorm blocks (CLIPEncoderLayer) behind a
    # LayerNorm on the embeddings (pre_layrnorm); post_layernorm normalises the pooled class token only,
    # which a loss on last_hidden_state does not read
    Family("clip_vision_model", "layernorm", kv_cache=False, embedding_norm=True, final_norm=False,
           head_input="none"),
    # CLIPTextTransformer (modeling_clip.py): the same blocks under a causal mask (SDPA's is_causal, no mask
    # tensor), final_layer_norm over every token; the pooled end-of-text token is a gather of its output
    Family("clip_text_model", "layernorm", kv_cache=False, head_input="none"),
    # SiglipTextTransformer (modeling_siglip.py): the same blocks without a mask, final_layer_norm over
    # every token; the linear head reads the last token for pooler_output
    Family("siglip_text_model", "layernorm", kv_cache=False, head_input="none"),
)}
"""Model types laid out unlike the rest of the family :mod:`memguard.estimation.arch` gives them."""


def model_type_of(model: Any) -> str:
    """The transformers ``model_type`` of a resolved model (its config's, else its module's), or ``""``."""
    config = getattr(model, "config", None)
    if config is None:
        config = getattr(getattr(model, "module", None), "config", None)
    return str(getattr(config, "model_type", "") or "")


def refuse_unmodelled(model_type: str) -> None:
    """Raise for a model type the formula does not model (:data:`_NOT_MODELLED`).

    Raises:
        UnsupportedModelError: naming the model type, what the formula does not model, and the trace.
    """
    if model_type in _NOT_MODELLED:
        raise UnsupportedModelError(
            f"the formula does not model {_NOT_MODELLED[model_type]} ({model_type}); use method='trace' "
            "(method='auto' does)")


def family_of(arch: Architecture) -> Family:
    """The :class:`Family` of ``arch``.

    Raises:
        UnsupportedModelError: for a family without a layout here.
    """
    refuse_unmodelled(arch.model_type)
    if arch.model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[arch.model_type]
    try:
        return FAMILIES[arch.family]
    except KeyError:
        raise UnsupportedModelError(
            f"the formula has no block layout for family {arch.family!r} ({arch.model_type}); "
            f"known: {', '.join(FAMILIES)}. Use method='trace' for this model.") from None
