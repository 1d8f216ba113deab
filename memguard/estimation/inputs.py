"""The inputs of a training step for a model memguard builds: what its head computes, and one batch.

:class:`TaskKind` reads a transformers model's class and owns what follows from it (tokens or
pixels, labels per token or per sample); :func:`make_batch` builds the batch the model takes (fake
or meta tensors under the trace cost nothing); :func:`max_positions` is the longest sequence a
config allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memguard.enums import StrEnum
from memguard.errors import ConfigError
from memguard.estimation.families import facts_of

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Head", "TaskKind", "audio_positions", "check_batch", "decoder_length", "make_batch", "max_positions",
           "model_task"]


class Head(StrEnum):
    """What a model's output head computes: :attr:`memguard.estimation.arch.Architecture.head`, read
    from the class (:attr:`TaskKind.head`) or, for plain torch, from its last linear layer.

    ``str(Head.CAUSAL_LM) == "causal-lm"``.
    """

    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"
    SEQ2SEQ = "seq2seq"
    SEQ_CLS = "seq-cls"
    IMAGE_CLS = "image-cls"
    BASE = "base"
    UNKNOWN = "unknown"

    @property
    def labels_per_token(self) -> bool:
        """Its loss takes a label per token, over the vocabulary (language models, encoder-decoders)."""
        return self in (Head.CAUSAL_LM, Head.MASKED_LM, Head.SEQ2SEQ)

    @property
    def headless(self) -> bool:
        """No head the formula knows: a base model, or one it cannot tell (no labels, no loss of its own)."""
        return self in (Head.BASE, Head.UNKNOWN)


class TaskKind(StrEnum):
    """What a transformers model computes from its head, which decides the batch it takes.

    ``str(TaskKind.CAUSAL_LM) == "causal-lm"``.
    """

    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"
    SEQ2SEQ = "seq2seq"
    SEQ_CLS = "seq-cls"
    IMAGE_CLS = "image-cls"
    TOKEN_BASE = "token-base"
    IMAGE_BASE = "image-base"
    UNKNOWN = "unknown"

    @property
    def takes_pixels(self) -> bool:
        """Its input is ``pixel_values`` (no sequence length)."""
        return self in (TaskKind.IMAGE_CLS, TaskKind.IMAGE_BASE)

    @property
    def takes_tokens(self) -> bool:
        """Its input is ``input_ids`` of some sequence length."""
        return not (self.takes_pixels or self is TaskKind.UNKNOWN)

    @property
    def labels_per_token(self) -> bool:
        """Its loss takes a label per token (language models; an encoder-decoder makes its decoder inputs of them)."""
        return self in (TaskKind.CAUSAL_LM, TaskKind.MASKED_LM, TaskKind.SEQ2SEQ)

    @property
    def labels_per_sample(self) -> bool:
        """Its loss takes a class label per sample (classifiers)."""
        return self in (TaskKind.SEQ_CLS, TaskKind.IMAGE_CLS)

    @property
    def head(self) -> Head:
        """As :attr:`memguard.estimation.arch.Architecture.head` names it: :attr:`Head.BASE` without a head."""
        return Head.BASE if self in (TaskKind.TOKEN_BASE, TaskKind.IMAGE_BASE) else Head(self.value)


def model_task(module: nn.Module) -> TaskKind:
    """What kind of inputs and labels a transformers model takes, read from its class."""
    if hasattr(module, "get_base_model"):  # a peft wrapper: the head is the base model's
        module = module.get_base_model()
    name = type(module).__name__
    config = getattr(module, "config", None)
    if config is None:
        return TaskKind.UNKNOWN
    if name.endswith(("ForCausalLM", "LMHeadModel")) and not getattr(config, "is_encoder_decoder", False):
        return TaskKind.CAUSAL_LM
    if getattr(config, "is_encoder_decoder", False):
        return TaskKind.SEQ2SEQ
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        return TaskKind.MASKED_LM
    if name.endswith("ForImageClassification"):
        return TaskKind.IMAGE_CLS
    if name.endswith("ForSequenceClassification"):
        return TaskKind.SEQ_CLS
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return TaskKind.IMAGE_BASE
    if hasattr(config, "vocab_size"):
        return TaskKind.TOKEN_BASE
    return TaskKind.UNKNOWN


def make_batch(module: nn.Module, batch_size: int, seq_len: int | None, *,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               generator: torch.Generator | None = None,
               decoder_seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs and labels that fit the head of a transformers model.

    Token models get ``input_ids`` (and ``labels``: one per token for language models, one per
    sample for classifiers); encoder-decoders get ``labels`` of ``decoder_seq_len`` tokens
    (default: ``seq_len``), from which they make their own decoder inputs; an audio
    encoder-decoder (Whisper) gets ``input_features`` of the frames its encoder takes
    (:func:`audio_positions`) in ``dtype`` and labels of :func:`decoder_length`; vision models get
    ``pixel_values`` of the configured image size in ``dtype`` (default fp32). No attention mask is passed: with
    every token attended, transformers takes its fast path (and would drop an all-ones mask anyway).

    Raises:
        ConfigError: if the model is not a transformers model (give ``example_input`` instead), a
            token model is asked for without ``seq_len``, or the batch would hold more than
            :data:`~memguard.estimation.spec.MAX_INPUT_ELEMENTS` elements (its bytes would overflow int64).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    task = model_task(module)
    config = getattr(module, "config", None)
    b = batch_size
    decoder_seq_len = check_batch(task, config, type(module).__name__, b, seq_len, decoder_seq_len)
    if task.takes_pixels:
        vision = _vision_config(config)
        size = vision.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.rand(b, vision.num_channels, *size, generator=generator, device=device).to(dtype)
        batch = {"pixel_values": pixels}
        if task.labels_per_sample:
            batch["labels"] = torch.randint(0, config.num_labels, (b,), generator=generator, device=device)
        return batch
    if task is TaskKind.SEQ2SEQ and audio_positions(config) is not None:
        return _audio_batch(config, b, decoder_seq_len, dtype=dtype, device=device, generator=generator)
    ids = torch.randint(0, config.vocab_size, (b, seq_len), generator=generator, device=device)
    batch = {"input_ids": ids}
    if task is TaskKind.SEQ2SEQ and decoder_seq_len is not None and decoder_seq_len != seq_len:
        batch["labels"] = torch.randint(0, config.vocab_size, (b, decoder_seq_len), generator=generator,
                                        device=device)
    elif task.labels_per_token:
        batch["labels"] = ids.clone()
    elif task.labels_per_sample:
        batch["labels"] = torch.randint(0, config.num_labels, (b,), generator=generator, device=device)
    return batch


def check_batch(task: TaskKind, config: Any, class_name: str, b: int, seq_len: int | None,
                decoder_seq_len: int | None) -> int | None:
    """Check that :func:`make_batch` can build the batch of a ``task`` model of ``config`` (its class
    ``class_name``, for messages); without tensors, so the formula on a preset's description checks the
    same. Returns the decoder's tokens of an audio model (:func:`decoder_length`), else ``decoder_seq_len``.

    Raises:
        ConfigError: as :func:`make_batch` says.
    """
    if task.takes_pixels:
        vision = _vision_config(config)
        size = vision.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        _check_elements(b, vision.num_channels, *size, what="pixel values")
        return decoder_seq_len
    if task is TaskKind.SEQ2SEQ and audio_positions(config) is not None:
        dec = decoder_length(config, seq_len, decoder_seq_len)
        _check_elements(b, config.num_mel_bins, 2 * int(config.max_source_positions), what="mel features")
        return dec
    if not task.takes_tokens:
        raise ConfigError(
            f"memguard cannot build inputs for {class_name}: pass example_input= "
            "(one batch as forward takes it: a tensor, a tuple or a dict of tensors)"
        )
    if seq_len is None:
        raise ConfigError(f"seq_len is needed to build token inputs for {class_name}")
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"seq_len={seq_len} is longer than {class_name} can take "
            f"(max_position_embeddings={limit})"
        )
    _check_elements(b, seq_len, what="token ids")
    if task is TaskKind.SEQ2SEQ and decoder_seq_len is not None and decoder_seq_len != seq_len:
        _check_elements(b, decoder_seq_len, what="labels")
    return decoder_seq_len


def _vision_config(config: Any) -> Any:
    """Where an image model's ``image_size`` and ``num_channels`` are: the config itself, or its
    ``vision_config`` for a text-image config classifying images (``CLIPForImageClassification`` and
    ``SiglipForImageClassification`` read ``config.vision_config``, transformers' modeling files)."""
    if not hasattr(config, "image_size") and hasattr(config, "vision_config"):
        return config.vision_config
    return config


def audio_positions(config: Any) -> int | None:
    """Positions of an audio encoder-decoder's encoder (Whisper: ``max_source_positions``, 1500),
    else ``None``.

    Whisper's encoder takes log-mel features ``(batch, num_mel_bins, frames)`` of exactly
    ``max_source_positions * 2`` frames (3000: 30 s at 100 frames a second); its second conv has
    stride 2, so its blocks see ``max_source_positions`` positions (``WhisperEncoder.forward``,
    ``transformers/models/whisper/modeling_whisper.py``, which refuses any other length).
    """
    if getattr(config, "num_mel_bins", None) and getattr(config, "max_source_positions", None):
        return int(config.max_source_positions)
    return None


def decoder_length(config: Any, seq_len: int | None, decoder_seq_len: int | None) -> int | None:
    """The decoder's tokens per sample: ``decoder_seq_len`` when given; else for an audio model
    (Whisper) its decoder's ``max_target_positions`` (448: the longest labels it takes, an upper
    bound of a batch padded to its longest transcript), else ``seq_len`` (T5, BART).

    Raises:
        ConfigError: for labels longer than the decoder's positions.
    """
    limit = getattr(config, "max_target_positions", None) if audio_positions(config) is not None else None
    if decoder_seq_len is None:
        return int(limit) if limit else seq_len
    if limit and decoder_seq_len > limit:
        raise ConfigError(f"decoder_seq_len={decoder_seq_len} is longer than the decoder can take "
                          f"(max_target_positions={limit})")
    return decoder_seq_len


def _audio_batch(config: Any, b: int, dec: int | None, *, dtype: torch.dtype, device: str | torch.device,
                 generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Whisper's batch: log-mel ``input_features`` ``(B, mels, 2 x positions)`` and ``labels``."""
    import torch

    frames = 2 * int(config.max_source_positions)  # the encoder's conv stem halves them
    dec = dec or 1
    features = torch.randn(b, config.num_mel_bins, frames, generator=generator, device=device).to(dtype)
    labels = torch.randint(0, config.vocab_size, (b, dec), generator=generator, device=device)
    return {"input_features": features, "labels": labels}


def _check_elements(batch_size: int, *dims: int, what: str) -> None:
    """A :class:`ConfigError` when a batch of ``batch_size`` x ``dims`` is past any device."""
    from memguard.estimation.spec import MAX_INPUT_ELEMENTS

    n = batch_size
    for d in dims:
        n *= d
    if n > MAX_INPUT_ELEMENTS:
        shape = " x ".join(str(d) for d in (batch_size, *dims))
        raise ConfigError(f"batch_size={batch_size} makes {n:,} {what} ({shape}): their bytes would overflow "
                          "int64, past any device; give a smaller batch_size")


def max_positions(config: Any) -> int | None:
    """The longest sequence a model with learned absolute positions can take, else ``None``
    (``ModelType.max_positions`` and ``position_offset`` of :mod:`memguard.estimation.families`)."""
    facts = facts_of(str(getattr(config, "model_type", None)))
    if facts.max_positions:
        n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if facts.position_offset and n:
            n -= facts.position_offset
        return n
    return None
