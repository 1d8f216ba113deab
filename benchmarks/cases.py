"""The benchmark cases: one training step each, shared by ``truth.py`` and ``accuracy.py``.

A :class:`Case` names a model (a memguard preset, a transformers config dict, or a factory of a
plain ``nn.Module``), the batch, the optimizer, the precision and how the model is prepared
(dtype conversion for ``*-true`` precisions, frozen layers, gradient checkpointing).
:func:`prepared_module` applies that preparation the same way for the truth (real weights on the
CPU) and for the estimators (the module built on the meta device), so both see the same module.

Every model is built from a config: nothing is downloaded. Sizes are chosen so a case runs in
seconds on two CPU cores and stays well under 8 GiB.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from memguard.estimation.arch import transformer_blocks
from memguard.estimation.inputs import make_batch
from memguard.estimation.models import load_model
from memguard.estimation.spec import resolve_precision

__all__ = ["CASES", "Case", "build_module", "case_loss", "estimate_kwargs", "get_case",
           "make_inputs", "prepared_module", "warmup_case"]

ModelSource = str | Mapping[str, Any] | Callable[[], nn.Module]
"""A preset name, a transformers config dict (with ``model_type``), or a module factory."""

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one forward call."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One training step to measure and to estimate.

    Attributes:
        name: unique key (used on the command line and in the result files).
        model: a memguard preset name, a transformers config dict, or a factory ``() -> nn.Module``.
        batch_size: samples per step.
        seq_len: tokens per sample (``None`` for vision models).
        optimizer: a memguard optimizer name (``"adamw"``, ``"sgd"``, ...).
        precision: a Lightning precision name (``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"``).
        gradient_checkpointing: enable transformers' (non-reentrant) gradient checkpointing.
        frozen_embeddings: ``requires_grad_(False)`` on every ``nn.Embedding`` (tied heads too).
        frozen_blocks: share of the transformer blocks frozen, counted from the input side.
        example_input: for plain models, ``(batch_size, seq_len, generator) -> inputs``.
        loss_fn: for plain models, ``(output, batch) -> scalar loss``.
        warmup_model: a tiny model of the same kind for the warm-up step; derived from the config
            for transformers models.
        decoder_seq_len: an encoder-decoder's label tokens per sample (``None``: the model's default).
        keep_output: the loop keeps the model's output until the next forward returns
            (``outputs = model(**batch)``); else it is dropped before backward.
        note: what the case is meant to exercise.
    """

    name: str
    model: ModelSource
    batch_size: int
    seq_len: int | None
    optimizer: str = "adamw"
    precision: str = "32-true"
    gradient_checkpointing: bool = False
    frozen_embeddings: bool = False
    frozen_blocks: float = 0.0
    example_input: Callable[[int, int | None, torch.Generator | None], Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    warmup_model: ModelSource | None = None
    decoder_seq_len: int | None = None
    keep_output: bool = False
    note: str = dataclasses.field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (callables by name), used to key cached measurements."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if callable(value):
                value = _callable_name(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[field.name] = value
        out.pop("note")
        for name, default in (("decoder_seq_len", None), ("keep_output", False)):
            if out[name] == default:  # the specs of cached truths from before the field
                out.pop(name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Case:
        """A case from a JSON spec; ``model`` is a preset, a config dict or ``module:factory``."""
        callables = {"example_input", "loss_fn", "warmup_model"}
        known = {f.name for f in dataclasses.fields(cls)} - callables
        fields = {k: v for k, v in data.items() if not (k in callables and v is None)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"case fields {sorted(unknown)} cannot be given in JSON; "
                             f"expected some of {sorted(known)}")
        fields.setdefault("name", "spec")
        return cls(**fields)


def _callable_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, functools.partial):
        args = ", ".join([*map(repr, fn.args), *(f"{k}={v!r}" for k, v in fn.keywords.items())])
        return f"{_callable_name(fn.func)}({args})"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------- plain PyTorch model


class TransformerClassifier(nn.Module):
    """A plain ``nn.TransformerEncoder`` sequence classifier: no transformers, no config.

    Token embedding + learned positions -> pre-norm encoder -> mean pool -> linear head.
    """

    def __init__(self, vocab: int = 8000, d_model: int = 512, nhead: int = 8, layers: int = 6,
                 classes: int = 10, max_len: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, dropout=0.1,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:t]  # (B, T, d)
        x = self.encoder(x)  # (B, T, d)
        return self.head(self.norm(x).mean(dim=1))  # (B, classes)


def token_batch(batch_size: int, seq_len: int | None, generator: torch.Generator | None = None,
                vocab: int = 256) -> torch.Tensor:
    """Random token ids ``(B, T)`` below ``vocab`` (every plain model here has a larger vocab)."""
    return torch.randint(0, vocab, (batch_size, seq_len or 128), generator=generator)


def class_zero_loss(output: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """Cross-entropy of the logits ``(B, classes)`` against class 0; independent of ``batch``."""
    target = torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    return F.cross_entropy(output, target)


# --------------------------------------------------------------------------- transformers configs

LLAMA_SMALL: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
MISTRAL_SMALL: dict[str, Any] = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1792, "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
    "sliding_window": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
QWEN2_SMALL: dict[str, Any] = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
DISTILBERT_SMALL: dict[str, Any] = {
    "model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"], "dim": 384,
    "hidden_dim": 1536, "n_layers": 6, "n_heads": 6, "vocab_size": 30522,
    "max_position_embeddings": 512,
}
BART_SMALL: dict[str, Any] = {
    "model_type": "bart", "architectures": ["BartForConditionalGeneration"], "d_model": 512,
    "encoder_layers": 3, "decoder_layers": 3, "encoder_attention_heads": 8,
    "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
    "vocab_size": 32000, "max_position_embeddings": 512,
}

_MOE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 8000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
"""What the mixture-of-experts cases share: small widths, many tokens, so the experts' activations
weigh as much as the model state."""
MIXTRAL_SMALL: dict[str, Any] = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **_MOE,
    "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2,
}
QWEN2_MOE_SMALL: dict[str, Any] = {
    "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], **_MOE,
    "intermediate_size": 512, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512,
    "num_experts": 8, "num_experts_per_tok": 2,
}
QWEN3_MOE_SMALL: dict[str, Any] = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], **_MOE, "head_dim": 32,
    "intermediate_size": 512, "moe_intermediate_size": 256, "num_experts": 16, "num_experts_per_tok": 4,
}
OLMOE_SMALL: dict[str, Any] = {
    "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], **_MOE,
    "intermediate_size": 256, "num_experts": 16, "num_experts_per_tok": 4,
}
DEEPSEEK_V3_SMALL: dict[str, Any] = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **_MOE,
    "num_key_value_heads": 8, "intermediate_size": 512, "moe_intermediate_size": 256,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 128, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32, "v_head_dim": 32,
}


def _experts(config: dict[str, Any], implementation: str) -> dict[str, Any]:
    """``config`` with transformers' experts implementation (``"grouped_mm"``, its default, or the
    per-expert ``"eager"`` loop; ``PreTrainedModel.get_correct_experts_implementation``)."""
    return {**config, "experts_implementation": implementation}




class LSTMClassifier(nn.Module):
    """Token embedding -> stacked ``nn.LSTM`` -> linear head on the last step: the CPU's oneDNN
    LSTM kernel, whose workspace autograd keeps for the backward."""

    def __init__(self, vocab: int = 8000, width: int = 256, hidden: int = 512, layers: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))  # (B, T, hidden)
        return self.head(out[:, -1])  # (B, classes)


# --------------------------------------------------------------------------- diffusers models


def unet_small() -> nn.Module:
    """A Stable-Diffusion-style ``UNet2DConditionModel``: 3 levels (64/128/256 channels), cross
    attention to 256-wide text states at the two upper levels, latents 4 x 32 x 32 (13 M params)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)


def vae_small() -> nn.Module:
    """An ``AutoencoderKL`` of Stable Diffusion's layout (3 levels, 64/128/128 channels, 4 latent
    channels) on 128 x 128 images (4 M params)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(64, 128, 128), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=128)


def sd3_small() -> nn.Module:
    """An ``SD3Transformer2DModel`` (MMDiT: joint attention over image patches and text): 4 blocks,
    256 wide (8 heads of 32), patch 2 on 4 x 32 x 32 latents (9 M params)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=32, num_attention_heads=8,
        joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=128, out_channels=4,
        pos_embed_max_size=32)


def unet_batch(batch_size: int, seq_len: int | None, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Noisy latents ``(B, 4, 32, 32)``, timesteps and ``seq_len`` text states ``(B, T, 256)``."""
    b = batch_size
    return {"sample": torch.randn(b, 4, 32, 32, generator=generator),
            "timestep": torch.randint(0, 1000, (b,), generator=generator),
            "encoder_hidden_states": torch.randn(b, seq_len or 77, 256, generator=generator)}


def image_batch(batch_size: int, seq_len: int | None, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Images ``(B, 3, 128, 128)`` for the autoencoder."""
    return {"sample": torch.randn(batch_size, 3, 128, 128, generator=generator)}


def sd3_batch(batch_size: int, seq_len: int | None, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Noisy latents, timesteps, ``seq_len`` text states ``(B, T, 256)`` and pooled text ``(B, 128)``."""
    b = batch_size
    return {"hidden_states": torch.randn(b, 4, 32, 32, generator=generator),
            "timestep": torch.randint(0, 1000, (b,), generator=generator),
            "encoder_hidden_states": torch.randn(b, seq_len or 77, 256, generator=generator),
            "pooled_projections": torch.randn(b, 128, generator=generator)}


def denoising_loss(output: Any, batch: Any = None) -> torch.Tensor:
    """What diffusers' training scripts compute on ``output.sample``: ``F.mse_loss(pred.float(),
    target.float())``, here against the batch's own first tensor (the same shape for these models)."""
    target = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return F.mse_loss(output.sample.float(), target.float())


WHISPER_WARMUP: dict[str, Any] = {
    "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "d_model": 384,
    "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 6, "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "num_mel_bins": 80, "max_source_positions": 1500,
    "max_target_positions": 448, "vocab_size": 51865, "pad_token_id": 50257, "bos_token_id": 50257,
    "eos_token_id": 50257, "decoder_start_token_id": 50258,
}
"""whisper-tiny with one block each side; its vocabulary stays (the special token ids are past 512)."""

_WARMUP = {
    "num_hidden_layers": 1, "n_layer": 1, "num_layers": 1, "num_decoder_layers": 1, "n_layers": 1,
    "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 512, "first_k_dense_replace": 0,
}
"""Config values of the warm-up model: one block and a small vocabulary; the widths stay, so the
kernels (and their code paths, which depend on the matrix shapes) are those of the real model."""


# --------------------------------------------------------------------------- the cases

_plain = TransformerClassifier
_plain_warmup = functools.partial(TransformerClassifier, layers=1, vocab=512)

CASES: tuple[Case, ...] = (
    Case("gpt2", "gpt2", 2, 256, note="GPT-2 small, AdamW, fp32"),
    Case("gpt2-sgd", "gpt2", 2, 256, optimizer="sgd", note="no optimizer state"),
    Case("gpt2-bf16-mixed", "gpt2", 2, 256, precision="bf16-mixed", note="autocast bf16"),
    Case("gpt2-ckpt", "gpt2", 2, 256, gradient_checkpointing=True, note="gradient checkpointing"),
    Case("gpt2-keep-output", "gpt2", 2, 256, keep_output=True,
         note="the loop keeps the output (logits, key/value cache) to the next forward"),
    Case("gpt2-frozen", "gpt2", 2, 256, frozen_embeddings=True, frozen_blocks=0.5,
         note="embeddings (and the tied head) and blocks 0-5 frozen"),
    Case("llama-small", LLAMA_SMALL, 2, 256, note="Llama, GQA 8/2 heads, untied head"),
    Case("llama-small-bf16-mixed-keep-output", LLAMA_SMALL, 2, 256, precision="bf16-mixed", keep_output=True,
         note="kept output under autocast: fp32 rotary K and bf16 V in the cache, bf16 logits"),
    Case("llama-small-bf16-true", LLAMA_SMALL, 2, 256, precision="bf16-true",
         note="weights, grads and AdamW state in bf16"),
    Case("llama-small-adafactor", LLAMA_SMALL, 2, 256, optimizer="adafactor",
         note="factored optimizer state"),
    Case("llama-small-ckpt-frozen", LLAMA_SMALL, 2, 256, gradient_checkpointing=True,
         frozen_embeddings=True, frozen_blocks=0.5, note="checkpointing with frozen blocks"),
    Case("mistral-small", MISTRAL_SMALL, 2, 256, optimizer="sgd-momentum",
         note="sliding window (128) shorter than the sequence: masked attention"),
    Case("qwen2-small", QWEN2_SMALL, 2, 256, note="qkv biases, tied head, GQA 8/4"),
    Case("bert-base", "bert-base-uncased", 4, 128, note="masked LM"),
    Case("bert-base-frozen", "bert-base-uncased", 4, 128, frozen_embeddings=True,
         frozen_blocks=0.5, note="fine-tuning the top half"),
    Case("roberta-base", "roberta-base", 4, 128, optimizer="sgd-momentum", note="momentum SGD"),
    Case("distilbert-small", DISTILBERT_SMALL, 4, 128, note="DistilBERT, 384 wide"),
    Case("t5-small", "t5-small", 4, 128, note="encoder-decoder, relative positions"),
    Case("bart-small", BART_SMALL, 4, 128, note="encoder-decoder, learned positions"),
    Case("vit-base", "vit-base", 4, None, note="image classifier 224x224"),
    Case("vit-base-bf16-mixed", "vit-base", 4, None, precision="bf16-mixed", note="autocast bf16"),
    Case("plain-transformer", _plain, 8, 128, example_input=token_batch, loss_fn=class_zero_loss,
         warmup_model=_plain_warmup, note="torch nn.TransformerEncoder classifier"),
    Case("mixtral-moe", _experts(MIXTRAL_SMALL, "grouped_mm"), 4, 256,
         note="Mixtral, 8 experts top-2, transformers' default grouped_mm experts, fp32"),
    Case("mixtral-moe-eager", _experts(MIXTRAL_SMALL, "eager"), 4, 256,
         note="the per-expert loop: data-dependent sizes from the routing"),
    Case("mixtral-moe-bf16-mixed", _experts(MIXTRAL_SMALL, "grouped_mm"), 4, 256, precision="bf16-mixed",
         note="grouped_mm under autocast: fp32 experts"),
    Case("mixtral-moe-eager-bf16-true", _experts(MIXTRAL_SMALL, "eager"), 4, 256, precision="bf16-true",
         note="the per-expert loop in bf16"),
    Case("qwen2-moe", _experts(QWEN2_MOE_SMALL, "grouped_mm"), 4, 256,
         note="Qwen2-MoE: 8 experts top-2 and a gated shared expert"),
    Case("qwen2-moe-eager-bf16-mixed", _experts(QWEN2_MOE_SMALL, "eager"), 4, 256, precision="bf16-mixed",
         note="the per-expert loop under autocast"),
    Case("qwen3-moe-bf16-true", _experts(QWEN3_MOE_SMALL, "grouped_mm"), 4, 256, precision="bf16-true",
         note="Qwen3-MoE: 16 experts top-4, bf16 grouped_mm"),
    Case("olmoe-eager", _experts(OLMOE_SMALL, "eager"), 4, 256, note="OLMoE: 16 experts top-4, per-expert loop"),
    Case("deepseek-v3-moe", _experts(DEEPSEEK_V3_SMALL, "grouped_mm"), 4, 256,
         note="DeepSeek-V3 layout: a dense first layer, 8 routed experts in 2 groups and a shared expert"),
    Case("bart-small-dec32", BART_SMALL, 4, 128, decoder_seq_len=32,
         note="encoder-decoder with a decoder shorter than the encoder"),
    Case("whisper-tiny", "whisper-tiny", 2, None, decoder_seq_len=64, warmup_model=WHISPER_WARMUP,
         note="audio encoder-decoder: 3000 mel frames, 1500 positions, 64 label tokens"),
    Case("lstm", LSTMClassifier, 16, 256, example_input=token_batch, loss_fn=class_zero_loss,
         warmup_model=functools.partial(LSTMClassifier, layers=1, vocab=512),
         note="2-layer nn.LSTM (oneDNN's kernel and its workspace for backward)"),
    Case("unet-small", unet_small, 4, 77, example_input=unet_batch, loss_fn=denoising_loss,
         note="diffusers UNet2DConditionModel, cross attention to 77 text states"),
    Case("vae-small", vae_small, 4, None, example_input=image_batch, loss_fn=denoising_loss,
         note="diffusers AutoencoderKL, reconstruction of 128x128 images"),
    Case("sd3-small", sd3_small, 4, 77, example_input=sd3_batch, loss_fn=denoising_loss,
         note="diffusers SD3Transformer2DModel (MMDiT), 256 patches + 77 text tokens"),
)

_BY_NAME = {c.name: c for c in CASES}
assert len(_BY_NAME) == len(CASES), "duplicate case names"


def get_case(name: str) -> Case:
    """The case called ``name``; ``KeyError`` lists the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(_BY_NAME)}") from None


def select_cases(names: str | None) -> list[Case]:
    """Cases named in a comma-separated list, or all of them for ``None``/``"all"``."""
    if names in (None, "", "all"):
        return list(CASES)
    return [get_case(n.strip()) for n in names.split(",") if n.strip()]


# --------------------------------------------------------------------------- building


def _config_from_dict(data: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    fields = dict(data)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _build(source: ModelSource, device: str | torch.device) -> nn.Module:
    if isinstance(source, Mapping):
        return load_model(_config_from_dict(source), device=device).module
    if isinstance(source, str):
        return load_model(source, device=device).module
    with torch.device(device):
        return source()


def build_module(case: Case, device: str | torch.device = "meta") -> nn.Module:
    """The case's model as built, before any preparation (fp32, all trainable)."""
    return _build(case.model, device)


def prepared_module(case: Case, device: str | torch.device = "meta") -> nn.Module:
    """The case's model on ``device``, prepared as it is trained: dtype, freezing, checkpointing."""
    return prepare(build_module(case, device), case)


def prepare(module: nn.Module, case: Case) -> nn.Module:
    """Convert to the ``*-true`` dtype, freeze, enable checkpointing, set training mode."""
    dtype = resolve_precision(case.precision).param_dtype
    if dtype != torch.float32:
        module.to(dtype)
    _freeze(module, case)
    if case.gradient_checkpointing:
        if not hasattr(module, "gradient_checkpointing_enable"):
            raise ValueError(f"case {case.name!r}: {type(module).__name__} "
                             "has no gradient checkpointing")
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    return module


def _freeze(module: nn.Module, case: Case) -> None:
    if case.frozen_embeddings:
        for sub in module.modules():
            if isinstance(sub, nn.Embedding):
                sub.requires_grad_(False)
    if case.frozen_blocks > 0:
        # the blocks as memguard finds them (memguard.estimation.arch.transformer_blocks)
        blocks = transformer_blocks(module)
        if not blocks:
            raise ValueError(f"case {case.name!r}: {type(module).__name__} has no nn.ModuleList of "
                             "transformer blocks to freeze")
        for block in blocks[: round(len(blocks) * case.frozen_blocks)]:
            block.requires_grad_(False)


def input_dtype(case: Case) -> torch.dtype:
    """The dtype of floating inputs (pixels): the weights' dtype, fp32 under autocast."""
    precision = resolve_precision(case.precision)
    return torch.float32 if precision.autocast_dtype is not None else precision.param_dtype


def make_inputs(case: Case, module: nn.Module, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Inputs:
    """One real batch for ``module``: ``memguard.estimation.inputs.make_batch`` or the case's own inputs."""
    if case.example_input is not None:
        example = case.example_input(case.batch_size, case.seq_len, generator)
        return _as_inputs(_to_device(example, device))
    batch = make_batch(module, case.batch_size, case.seq_len, dtype=input_dtype(case),
                       device="cpu", generator=generator, decoder_seq_len=case.decoder_seq_len)
    return (), _to_device(batch, device)


def _to_device(obj: Any, device: str | torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _as_inputs(example: Any) -> Inputs:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def case_loss(case: Case, output: Any, inputs: Inputs) -> torch.Tensor:
    """The scalar loss of one forward: the case's ``loss_fn``, else ``output.loss``."""
    if case.loss_fn is not None:
        args, kwargs = inputs
        return case.loss_fn(output, kwargs or (args[0] if len(args) == 1 else args))
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    return output.loss


def estimate_kwargs(case: Case) -> dict[str, Any]:
    """Keyword arguments of ``memguard.estimate`` (besides ``model``) for this case."""
    kwargs: dict[str, Any] = {
        "batch_size": case.batch_size, "seq_len": case.seq_len, "optimizer": case.optimizer,
        "precision": case.precision, "gradient_checkpointing": case.gradient_checkpointing,
        "keep_output": case.keep_output,  # what the truth's loop does (benchmarks/truth.py)
    }
    if case.example_input is not None:
        kwargs["example_input"] = case.example_input(case.batch_size, case.seq_len, None)
        kwargs["seq_len"] = None
    if case.loss_fn is not None:
        kwargs["loss_fn"] = case.loss_fn
    if case.decoder_seq_len is not None:
        kwargs["decoder_seq_len"] = case.decoder_seq_len
    return kwargs


# --------------------------------------------------------------------------- warm-up


def warmup_case(case: Case) -> Case:
    """A small case of the same kind: architecture, widths, batch size, sequence length, optimizer,
    precision and preparation, with one block and a small vocabulary.

    Its one step runs the same kernels and library paths, on activations of the same shapes, as
    the real case, so their lazy initialisation happens before the measurement starts, including
    what is sized by the batch (a warm-up at batch 1 left sd3-small's first measured step at
    batch 4 to grow 7.9 MiB of library state that no tensor holds: benchmarks/README.md).
    """
    if case.warmup_model is not None:
        tiny: ModelSource = case.warmup_model
    elif isinstance(case.model, (str, Mapping)):
        tiny = _tiny_config(case.model)
    else:
        tiny = case.model  # no smaller version known: warm up on the model itself
    return dataclasses.replace(case, name=f"{case.name}/warmup", model=tiny)


def _tiny_config(source: str | Mapping[str, Any]) -> dict[str, Any]:
    data = dict(source) if isinstance(source, Mapping) else _preset_config(source)
    for key, value in _WARMUP.items():
        if key in data:
            data[key] = value
    dropped = ("torch_dtype", "dtype", "transformers_version")
    return {k: v for k, v in data.items() if k not in dropped}


def _preset_config(name: str) -> dict[str, Any]:
    return load_model(name, device="meta").config.to_dict()
