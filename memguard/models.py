"""Turn what the user names into a module, and build the batch a training step would see.

A model may be given as an ``nn.Module``, a transformers ``PretrainedConfig``, a ``config.json``
path or model directory, or the name of a preset shipped in ``memguard/presets`` (so everything
works offline). Models built here are built on the meta device: no weights are allocated.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memguard.errors import ConfigError

__all__ = ["ResolvedModel", "TaskKind", "add_lora", "is_checkpointing", "list_presets", "load_model", "make_batch",
           "max_positions", "model_task", "set_checkpointing"]

_PRESET_DIR = Path(__file__).parent / "presets"
_ALIASES = {
    "gpt2-small": "gpt2", "bert-base": "bert-base-uncased", "bert-large": "bert-large-uncased",
    "roberta": "roberta-base", "t5": "t5-small", "llama-2": "llama-2-7b", "llama2-7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b", "llama-3": "llama-3-8b", "llama3-8b": "llama-3-8b",
    "meta-llama-3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "mistral-7b-v0.1": "mistral-7b",
    "vit": "vit-base", "vit-base-patch16-224": "vit-base",
}


def list_presets() -> list[str]:
    """Names of the model presets shipped with memguard."""
    return sorted(p.stem for p in _PRESET_DIR.glob("*.json"))


def _preset_key(name: str) -> str | None:
    key = name.strip().lower().split("/")[-1].replace("_", "-")
    key = re.sub(r"-hf$", "", key)
    key = _ALIASES.get(key, key)
    return key if (_PRESET_DIR / f"{key}.json").is_file() else None


@dataclasses.dataclass
class ResolvedModel:
    """A module with what memguard knows about where it came from.

    Attributes:
        module: the ``nn.Module``.
        name: a display name (preset name, path, or class name).
        config: the transformers config, when there is one.
        built_here: memguard built the module (from a preset or config), so it may change it.
    """

    module: nn.Module
    name: str
    config: Any = None
    built_here: bool = False


def _read_config_dict(source: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {str(path)!r}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {str(path)!r} as a JSON model config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} holds JSON but not a config object")
    return data, str(source)


def _config_from_dict(data: Mapping[str, Any], origin: str) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model config {origin!r} has no 'model_type'; it cannot be built offline")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model config {origin!r} is malformed: {exc}") from None


def _build_from_config(config: Any, *, device: str | torch.device = "meta") -> nn.Module:
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    cls = None
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    if cls is None:
        for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                     "AutoModelForImageClassification", "AutoModel"):
            try:
                with torch.device(device):
                    return getattr(transformers, auto).from_config(config)
            except ValueError:
                continue
        raise ConfigError(f"transformers has no model class for config of type {config.model_type!r}")
    with torch.device(device):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)


def load_model(model: Any, *, device: str | torch.device = "meta") -> ResolvedModel:
    """Resolve ``model`` into a module.

    Args:
        model: an ``nn.Module`` (returned as is), a transformers config, a path to a
            ``config.json`` or a model directory, a preset name (see :func:`list_presets`), or a
            ``package.module:factory`` string naming a callable that returns a module.
        device: where modules built here are put; ``"meta"`` allocates nothing.

    Raises:
        ConfigError: for an unknown name, an unreadable or malformed config.
    """
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        return ResolvedModel(model, type(model).__name__, config)
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        return ResolvedModel(_build_from_config(model, device=device), type(model).__name__, model, True)
    if isinstance(model, (str, Path)):
        text = str(model)
        key = _preset_key(text) if isinstance(model, str) else None
        if key is not None:
            data, _ = _read_config_dict(_PRESET_DIR / f"{key}.json")
            config = _config_from_dict(data, key)
            return ResolvedModel(_build_from_config(config, device=device), key, config, True)
        path = Path(text)
        if path.exists():
            data, origin = _read_config_dict(path)
            config = _config_from_dict(data, origin)
            return ResolvedModel(_build_from_config(config, device=device), text, config, True)
        if ":" in text and not text.endswith((".json",)):
            return _from_factory(text)
        raise ConfigError(
            f"unknown model {text!r}: not a preset, not an existing config.json or model directory, "
            f"nor a 'package.module:factory'. Presets: {', '.join(list_presets())}"
        )
    raise ConfigError(
        f"cannot use {type(model).__name__} {model!r} as a model; expected an nn.Module, a "
        "transformers config, a config.json path, a preset name, or 'package.module:factory'"
    )


def _from_factory(spec: str) -> ResolvedModel:
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    built = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(built, nn.Module):
        raise ConfigError(f"{spec!r} returned {type(built).__name__}, not a torch.nn.Module")
    return ResolvedModel(built, spec, getattr(built, "config", None), True)


def add_lora(resolved: ResolvedModel, rank: int) -> ResolvedModel:
    """Freeze the base model and add LoRA adapters of ``rank`` (Hu et al. 2021) with ``peft``.

    The adapters go where peft puts them by default for the architecture (the attention
    projections for most), with ``lora_alpha = 2 * rank`` and no adapter dropout.

    Raises:
        ConfigError: for a module the user built (adding adapters would change it: wrap it with
            peft yourself and pass the result), or an architecture peft has no default targets for.
        MissingDependencyError: without ``peft``.
    """
    from memguard.errors import require

    peft = require("peft", "peft", "lora_rank")
    if not resolved.built_here:
        raise ConfigError(
            "lora_rank adds adapters to models memguard builds (a preset, config or config.json); "
            "for your own module, wrap it with peft.get_peft_model and pass the result"
        )
    # GPT-2's Conv1D layers store their weights transposed; peft wants to be told.
    conv1d = any(type(m).__name__ == "Conv1D" for m in resolved.module.modules())
    try:
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, fan_in_fan_out=conv1d)
        module = peft.get_peft_model(resolved.module, config)
    except ValueError as exc:
        raise ConfigError(f"cannot add LoRA adapters to {resolved.name}: {exc}") from None
    return ResolvedModel(module, f"{resolved.name}+lora{rank}", resolved.config, built_here=True)


def is_checkpointing(module: nn.Module) -> bool:
    """Whether a transformers model, or one inside ``module`` (a LightningModule's), checkpoints."""
    for m in module.modules():
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(m), name):
                if getattr(m, name):
                    return True
                break
    return False


def set_checkpointing(module: nn.Module, on: bool) -> None:
    """Turn checkpointing of a transformers model on (non-reentrant, as torch recommends) or off.

    Raises:
        ConfigError: for a module without the transformers checkpointing switch.
    """
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.activation_checkpointing_disable()
    elif hasattr(module, "gradient_checkpointing_enable"):
        if on:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_disable()
    elif on:
        raise ConfigError(
            f"gradient_checkpointing=True, but {type(module).__name__} has no checkpointing switch; "
            "checkpoint it in the model's code and pass gradient_checkpointing=None"
        )


TaskKind = str
"""One of ``"causal-lm"``, ``"masked-lm"``, ``"seq2seq"``, ``"seq-cls"``, ``"image-cls"``,
``"token-base"``, ``"image-base"`` or ``"unknown"``."""


def model_task(module: nn.Module) -> TaskKind:
    """What kind of inputs and labels a transformers model takes, read from its class."""
    if hasattr(module, "get_base_model"):  # a peft wrapper: the head is the base model's
        module = module.get_base_model()
    name = type(module).__name__
    config = getattr(module, "config", None)
    if config is None:
        return "unknown"
    if name.endswith(("ForCausalLM", "LMHeadModel")) and not getattr(config, "is_encoder_decoder", False):
        return "causal-lm"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        return "masked-lm"
    if name.endswith("ForImageClassification"):
        return "image-cls"
    if name.endswith("ForSequenceClassification"):
        return "seq-cls"
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return "image-base"
    if hasattr(config, "vocab_size"):
        return "token-base"
    return "unknown"


def make_batch(module: nn.Module, batch_size: int, seq_len: int | None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Inputs and labels that fit the head of a transformers model.

    Token models get ``input_ids`` (and ``labels``: one per token for language models, one per
    sample for classifiers); encoder-decoders get ``labels`` of the same length, from which they
    make their own decoder inputs; vision models get ``pixel_values`` of the configured image size
    in ``dtype``. No attention mask is passed: with every token attended, transformers takes its
    fast path (and would drop an all-ones mask anyway).

    Raises:
        ConfigError: if the model is not a transformers model (give ``example_input`` instead), or
            a token model is asked for without ``seq_len``.
    """
    task = model_task(module)
    config = getattr(module, "config", None)
    b = batch_size
    if task in ("image-cls", "image-base"):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.rand(b, config.num_channels, *size, generator=generator, device=device).to(dtype)
        batch = {"pixel_values": pixels}
        if task == "image-cls":
            batch["labels"] = torch.randint(0, config.num_labels, (b,), generator=generator, device=device)
        return batch
    if task == "unknown":
        raise ConfigError(
            f"memguard cannot build inputs for {type(module).__name__}: pass example_input= "
            "(one batch as forward takes it: a tensor, a tuple or a dict of tensors)"
        )
    if seq_len is None:
        raise ConfigError(f"seq_len is needed to build token inputs for {type(module).__name__}")
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"seq_len={seq_len} is longer than {type(module).__name__} can take "
            f"(max_position_embeddings={limit})"
        )
    ids = torch.randint(0, config.vocab_size, (b, seq_len), generator=generator, device=device)
    batch = {"input_ids": ids}
    if task in ("causal-lm", "masked-lm", "seq2seq"):
        batch["labels"] = ids.clone()
    elif task == "seq-cls":
        batch["labels"] = torch.randint(0, config.num_labels, (b,), generator=generator, device=device)
    return batch


def max_positions(config: Any) -> int | None:
    """The longest sequence a model with learned absolute positions can take, else ``None``."""
    if getattr(config, "model_type", None) in ("gpt2", "gpt_neo", "gptj", "opt", "bert", "roberta",
                                               "distilbert", "electra", "albert", "xlm-roberta"):
        n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if getattr(config, "model_type", None) in ("roberta", "xlm-roberta") and n:
            n -= 2  # RoBERTa's positions start after the padding index
        return n
    return None
