"""Turn what the user names into a module (the batch it takes: :mod:`memguard.estimation.inputs`).

A model may be given as an ``nn.Module``, a transformers ``PretrainedConfig``, a ``config.json``
path or model directory, or the name of a preset shipped in ``memguard/estimation/presets`` (so everything
works offline). Models built here are built on the meta device: no weights are allocated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memguard.errors import ConfigError, MemguardError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MAX_CONFIG_BYTES", "MAX_LAYERS", "MAX_PARAMETERS", "ResolvedModel", "add_lora", "check_config_shapes",
           "check_config_sizes", "check_lora_rank", "is_checkpointing", "list_presets", "load_model", "lora_rank_limit",
           "preset_key", "set_checkpointing"]

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


def preset_key(name: str) -> str | None:
    """The preset ``name`` stands for (its key in :func:`list_presets`, aliases and spellings read), or ``None``."""
    key = _normalised(name)
    key = _ALIASES.get(key, key)
    return key if key in list_presets() else None


def _normalised(name: str) -> str:
    """A model name as presets are keyed: lower case, no hub owner, ``-`` for ``_``, no ``-hf``."""
    key = name.strip().lower().split("/")[-1].replace("_", "-")
    return re.sub(r"-hf$", "", key)


def close_presets(name: str, limit: int = 3) -> list[str]:
    """Presets a mistyped ``name`` may mean (``gpt-2`` -> gpt2, ``mistral`` -> mistral-7b,
    ``llama-7b`` -> llama-2-7b), best first; ``[]`` when none is close.

    Compared on normalised names without separators (``-``, ``.``), aliases included: an equal
    name alone; else names it begins, then :func:`difflib.get_close_matches` (ratio of at least
    0.6), those of the same family (``t5``, ``roberta``: the name up to its first ``-``) first.
    """
    import difflib

    def squash(text: str) -> str:
        return re.sub(r"[-.\s]", "", text)

    key = squash(_normalised(name))
    if not key:
        return []
    names = {squash(p): p for p in list_presets()}
    names.update({squash(alias): preset for alias, preset in _ALIASES.items() if squash(alias) not in names})
    found: list[str] = []

    def add(preset: str) -> None:
        if preset not in found:
            found.append(preset)

    if key in names:
        return [names[key]]
    for squashed in sorted(names):
        if squashed.startswith(key) and len(key) >= 3:
            add(names[squashed])
    family = _normalised(name).split("-")[0]
    close = difflib.get_close_matches(key, list(names), n=limit * 2, cutoff=0.6)
    close.sort(key=lambda squashed: not squashed.startswith(family))
    for squashed in close:
        add(names[squashed])
    return found[:limit]


@dataclasses.dataclass
class ResolvedModel:
    """A module with what memguard knows about where it came from.

    Attributes:
        module: the ``nn.Module``.
        name: a display name (preset name, path, or class name).
        config: the transformers config, when there is one.
        built_here: memguard built the module (from a preset or config), so it may change it.
        depth: how to build the same module with fewer of its repeated blocks
            (:class:`memguard.estimation.trace.depth.Depth`), for a trace of a few blocks that
            stands for all of them; ``None``: the trace runs the whole module.
        private: nobody outside memguard holds the module, so the trace runs it in this process, as it
            runs a module ``built_here`` (:func:`memguard.estimate`), without ``built_here``'s other
            readings (QLoRA's default adapters, quantizing in place): a plan's modules, built from a
            model memguard built, adapters and quantized base already added
            (:meth:`memguard.planning.search.Search.model`).
    """

    module: nn.Module
    name: str
    config: Any = None
    built_here: bool = False
    depth: Any = None
    private: bool = False


MAX_CONFIG_BYTES = 16 * 2**20
"""The largest file read as a ``config.json``. Real ones are a few KiB (Llama-3's is 0.7 KiB); a
larger file is a weights file or something else given by mistake, and is refused before it is read."""

MAX_LAYERS = 1024
"""The most layers one stack of a config may have (each depth key: ``n_layer``, ``num_hidden_layers``,
``encoder_layers`` ...). The deepest published transformer, DeepNet (Wang et al. 2022, "DeepNet:
Scaling Transformers to 1,000 Layers"), has 1,000; Llama-3.1-405B has 126. Building the modules
takes time even on the meta device (~20 ms a GPT-2 block on a busy CPU): 100,000 layers take minutes,
2**31 never end, so a deeper config is refused before anything is built."""

MAX_PARAMETERS = 10**13
"""The most parameters a config may describe, checked on a lower bound computed from its sizes
before anything is built (:func:`_parameters_at_least`). Ten times the largest model trained so far
(Switch-C, 1.6 x 10**12, Fedus et al. 2022); its fp32 weights alone are 40 TB. A config past it is a
typo or a probe, not a model: a width of 2**31 would give tensors whose sizes overflow int64."""

_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_FFN_KEYS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim", "encoder_ffn_dim", "decoder_ffn_dim")
_DEPTH_KEYS = ("n_layer", "n_layers", "num_hidden_layers", "num_layers", "num_decoder_layers",
               "encoder_layers", "decoder_layers")

_SIZE_KEYS = frozenset({
    # widths
    *_WIDTH_KEYS, "d_kv", "head_dim", *_FFN_KEYS,
    # depths
    *_DEPTH_KEYS,
    # heads
    "n_head", "n_heads", "num_heads", "num_attention_heads", "num_key_value_heads",
    "encoder_attention_heads", "decoder_attention_heads",
    # vocabularies, lengths and images
    "vocab_size", "type_vocab_size", "n_positions", "n_ctx", "max_position_embeddings",
    "num_channels", "patch_size", "image_size",
})
"""Keys of a transformers config that are counts or sizes: whole numbers from 1 up (or ``null``,
which transformers reads as "derive it", e.g. GPT-2's ``n_inner``). The names are those of the
transformers configs of GPT-2, BERT, Llama, Mistral, T5, BART, DistilBERT and ViT."""


def _read_config_dict(source: str | Path) -> tuple[dict[str, Any], str]:
    """The JSON object in a ``config.json`` (or a model directory's), read with bounded memory and time.

    A path that is not a regular file (``/dev/zero``, a pipe) or is larger than
    :data:`MAX_CONFIG_BYTES` is refused before anything is read; bytes that are not UTF-8 JSON
    are one clear error. The file is opened with ``O_NONBLOCK`` and checked again on the open
    descriptor: a kernel file that says it is regular but waits for data (``/proc/kmsg``: a regular
    file of size 0 whose ``read`` blocks until the kernel logs, see ``kmsg_read`` in Linux's
    ``kernel/printk/printk.c``) is refused instead of blocking, and so is a path swapped for a pipe
    between the two checks (``open(2)``: with ``O_NONBLOCK`` opening a FIFO for reading returns at once).
    """
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    where = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {where!r}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {where!r} as a JSON model config: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where!r} is not a regular file (a device, pipe or socket); give a model's "
                          "config.json or its directory")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where!r} is {info.st_size:,} bytes, too large for a config.json (at most "
                          f"{MAX_CONFIG_BYTES // 2**20} MiB): is it a weights file? Give the config.json "
                          "next to it, or the model's directory")
    raw = _read_bounded(path, where)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB, too large for a config.json")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where!r} is not a text file (byte 0x{raw[exc.start]:02x} at offset {exc.start} is "
                          "not UTF-8), so not a config.json: is it a weights file?") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"cannot read {where!r} as a JSON model config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where!r} holds JSON but not a config object")
    return data, str(source)


def _read_bounded(path: Path, where: str) -> bytes:
    """At most ``MAX_CONFIG_BYTES + 1`` bytes of a regular file, without ever waiting for data."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(f"cannot read {where!r} as a JSON model config: {exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{where!r} is not a regular file (a device, pipe or socket); give a model's "
                                  "config.json or its directory")
            chunks, size = [], 0
            while size <= MAX_CONFIG_BYTES:
                chunk = f.read(MAX_CONFIG_BYTES + 1 - size)
                if chunk is None:  # O_NONBLOCK and nothing to read yet: a file that waits for data
                    raise BlockingIOError("it has no data to read now")
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except BlockingIOError:
            raise ConfigError(f"{where!r} is not a config.json: a kernel or device file that waits for data "
                              "(reading it would block); give a model's config.json or its directory") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {where!r} as a JSON model config: {exc}") from None
    return b"".join(chunks)


def check_config_sizes(data: Mapping[str, Any], origin: str) -> None:
    """Check the counts and sizes of a config (widths, depths, heads, vocabulary ...), before anything is built.

    Each key of :data:`_SIZE_KEYS` present, here or in a nested sub-config, must be ``None`` or a
    whole number from 1 to :data:`memguard.estimation.spec.MAX_COUNT`, or a list of them: pairs
    (``image_size``, ``patch_size``) and per-stage sizes of hierarchical models (Swin's
    ``num_heads``, ``SwinConfig`` in transformers/models/swin/configuration_swin.py).
    transformers checks few of them: ``n_positions: -5`` fails deep
    inside torch, ``n_layer: -1`` builds a model with no blocks, ``num_attention_heads: 0`` divides by
    zero. Each depth key is at most :data:`MAX_LAYERS`, and the parameters the sizes describe (a lower
    bound, :func:`_parameters_at_least`) at most :data:`MAX_PARAMETERS`: building more would not end.

    Raises:
        ConfigError: naming the config, the key and the value.
    """
    from memguard.estimation.spec import MAX_COUNT

    for key, value in data.items():
        if isinstance(value, Mapping):
            check_config_sizes(value, origin)
            continue
        if key not in _SIZE_KEYS or value is None:
            continue
        several = isinstance(value, (list, tuple)) and len(value) > 0
        for v in value if several else [value]:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_COUNT:
                raise ConfigError(f"model config {origin!r}: {key} must be a whole number from 1 to "
                                  f"{MAX_COUNT:,}, got {value!r}")
        if key in _DEPTH_KEYS and not several and value > MAX_LAYERS:
            raise ConfigError(f"model config {origin!r}: {key}={value:,} layers is more than memguard builds (at "
                              f"most {MAX_LAYERS:,}; the deepest published transformer has 1,000); give the "
                              "model's real depth")
    at_least, sizes = _parameters_at_least(data)
    if at_least > MAX_PARAMETERS:
        raise ConfigError(f"model config {origin!r}: {sizes} describe at least {at_least:.2e} parameters, more "
                          f"than memguard builds (at most {MAX_PARAMETERS:.0e}, ten times the largest model "
                          "trained); give the model's real sizes")


def _parameters_at_least(data: Mapping[str, Any]) -> tuple[int, str]:
    """A lower bound of the parameters of one (sub-)config's transformer, and the sizes it read.

    ``layers x (2 h**2 + 2 h f) + vocab x h``: each block has at least a query and an output
    projection (h x h each) and an MLP up and down (h x f each), the embedding ``vocab x h``
    (Vaswani et al. 2017; GPT-2, BERT, Llama and T5 all have more: k and v projections, a gate, norms).
    A size absent counts as 0, so the bound never exceeds the real count.
    """
    def size(keys: tuple[str, ...]) -> tuple[int, str]:
        for key in keys:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{key}={value:,}"
        return 0, ""

    (h, h_text), (f, f_text), (v, v_text) = size(_WIDTH_KEYS), size(_FFN_KEYS), size(("vocab_size",))
    layers = [(data[k], f"{k}={data[k]:,}") for k in _DEPTH_KEYS
              if isinstance(data.get(k), int) and not isinstance(data.get(k), bool) and data[k] > 0]
    depth, depth_text = max(layers, default=(0, ""))
    at_least = depth * (2 * h * h + 2 * h * f) + v * h
    return at_least, ", ".join(t for t in (depth_text, h_text, f_text, v_text) if t)


def check_config_shapes(data: Mapping[str, Any], origin: str) -> None:
    """Check sizes that must agree for the forward to run, here or in a nested sub-config.

    transformers builds such a model without complaint, and its forward then fails deep inside
    torch with a message that names no config key:

    - ``num_key_value_heads`` must divide ``num_attention_heads``: each key/value head serves
      ``num_attention_heads // num_key_value_heads`` query heads (``repeat_kv`` and
      ``num_key_value_groups`` in transformers/models/llama/modeling_llama.py; Mistral, Qwen2,
      Gemma copy it), so 4 heads over 3 key/value heads fail at the attention product.
    - ``patch_size`` may not exceed ``image_size`` (either side of a pair): the patch embedding is a
      ``Conv2d`` with ``kernel_size=stride=patch_size`` (``ViTPatchEmbeddings`` in
      transformers/models/vit/modeling_vit.py), and torch refuses a kernel larger than its input.

    Raises:
        ConfigError: naming the config, both keys and their values.
    """
    for value in data.values():
        if isinstance(value, Mapping):
            check_config_shapes(value, origin)
    heads, kv = data.get("num_attention_heads"), data.get("num_key_value_heads")
    if _whole(heads) and _whole(kv) and heads % kv:
        fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0) if heads <= 1024 else "a divisor"
        raise ConfigError(f"model config {origin!r}: num_key_value_heads={kv} does not divide "
                          f"num_attention_heads={heads} (each key/value head serves the same number of query "
                          f"heads); use one of {fits}")
    image, patch = _pair(data.get("image_size")), _pair(data.get("patch_size"))
    if image and patch and (patch[0] > image[0] or patch[1] > image[1]):
        raise ConfigError(f"model config {origin!r}: patch_size={data['patch_size']!r} is larger than "
                          f"image_size={data['image_size']!r}, so the image holds no patch; use a patch_size "
                          "of at most the image_size")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pair(value: Any) -> tuple[int, int] | None:
    """``224`` or ``[224, 224]`` as a pair of sides, or ``None`` for anything else."""
    if _whole(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_whole(v) for v in value):
        return value[0], value[1]
    return None


def check_config_file(model: str) -> None:
    """Refuse a ``config.json`` path (or model directory) that :func:`load_model` would refuse before it
    builds anything (not a regular file, too large, not JSON, no ``model_type``, sizes out of range),
    without importing torch or transformers: the CLI asks first, so that a bad file is one line at once,
    not after seconds of imports. A preset's name, or a name that is no existing path, passes."""
    if preset_key(model) is None and _exists(model):
        _checked_config_dict(*_read_config_dict(model))


def _checked_config_dict(data: Mapping[str, Any], origin: str) -> tuple[str, dict[str, Any]]:
    """The ``model_type`` of a config's dict and the rest of it, its sizes checked (:func:`check_config_sizes`)."""
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model config {origin!r} has no 'model_type'; it cannot be built offline")
    if not isinstance(model_type, str):
        raise ConfigError(f"model config {origin!r}: model_type must be a string, got {model_type!r}")
    check_config_sizes(data, origin)
    return model_type, data


def _config_from_dict(data: Mapping[str, Any], origin: str) -> Any:
    from transformers import AutoConfig

    model_type, data = _checked_config_dict(data, origin)
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError, its own validation errors
        raise ConfigError(f"model config {origin!r} is malformed: {type(exc).__name__}: {exc}") from None


def _build_from_config(config: Any, *, device: str | torch.device = "meta", origin: str | None = None) -> nn.Module:
    """Build the model of a transformers config on ``device``.

    Raises:
        ConfigError: naming the config, for a config transformers has no model class for, or any
            error transformers or torch raise while building it (a size that does not divide, a
            negative dimension ...).
    """
    import torch
    import transformers

    origin = origin or type(config).__name__
    data = _config_dict(config)
    check_config_sizes(data, origin)
    check_config_shapes(data, origin)
    cls = _architecture(transformers, config, origin)
    try:
        if cls is None:
            return _build_auto(transformers, config, device, origin)
        with torch.device(device):
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    except MemguardError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot build a model from config {origin!r}: {type(exc).__name__}: {exc}") from None


def _architecture(transformers: Any, config: Any, origin: str) -> type[nn.Module] | None:
    """The first model class of transformers that the config's ``architectures`` names, if any.

    Only a model class is built: a name transformers exports that is not an ``nn.Module``
    subclass (``"Trainer"``, ``"AutoTokenizer"``, a function) is refused, not called with the
    config; a name transformers does not know (a model of remote code) is passed over.
    """
    from torch import nn

    archs = getattr(config, "architectures", None) or []
    for arch in archs if isinstance(archs, (list, tuple)) else [archs]:
        if not isinstance(arch, str) or not arch.isidentifier() or arch.startswith("_"):
            continue
        found = getattr(transformers, arch, None)
        if found is None:
            continue
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise ConfigError(f"model config {origin!r}: architectures names {arch!r}, which is not a model class "
                              f"(transformers.{arch} is not a torch.nn.Module); name the model's class, e.g. "
                              "'LlamaForCausalLM', or drop 'architectures'")
        return found
    return None


def _build_auto(transformers: Any, config: Any, device: str | torch.device, origin: str) -> nn.Module:
    """The first ``AutoModelFor*`` head that knows the config's class."""
    import torch

    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                 "AutoModelForImageClassification", "AutoModel"):
        try:
            with torch.device(device):
                return getattr(transformers, auto).from_config(config)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
    raise ConfigError(f"transformers has no model class for config {origin!r} of type "
                      f"{getattr(config, 'model_type', None)!r}")


def _config_dict(config: Any) -> Mapping[str, Any]:
    try:
        data = config.to_dict()
    except Exception:  # a config that cannot describe itself is checked by transformers alone
        return {}
    return data if isinstance(data, Mapping) else {}


def load_model(model: Any, *, device: str | torch.device = "meta") -> ResolvedModel:
    """Resolve ``model`` into a module.

    Args:
        model: a :class:`ResolvedModel` or an ``nn.Module`` (returned as is), a transformers config, a path to a
            ``config.json`` or a model directory, a preset name (see :func:`list_presets`), or a
            ``package.module:factory`` string naming a callable that returns a module.
        device: where modules built here are put; ``"meta"`` allocates nothing.

    Raises:
        ConfigError: for an unknown name, an unreadable or malformed config (a binary or weights
            file, sizes that are not positive whole numbers, anything transformers cannot build), or
            a factory that does not import, raises, exits, needs arguments or returns no module.
    """
    from torch import nn

    if isinstance(model, ResolvedModel):
        return model
    if isinstance(model, nn.Module):
        model = _uncompiled(model)
        config = getattr(model, "config", None)
        return ResolvedModel(model, type(model).__name__, config)
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        return ResolvedModel(_build_from_config(model, device=device), type(model).__name__, model, True)
    if isinstance(model, (str, Path)):
        text = str(model)
        key = preset_key(text) if isinstance(model, str) else None
        if key is not None:
            data, _ = _read_config_dict(_PRESET_DIR / f"{key}.json")
            config = _config_from_dict(data, key)
            return ResolvedModel(_build_from_config(config, device=device, origin=key), key, config, True)
        if _exists(text):
            data, origin = _read_config_dict(text)
            config = _config_from_dict(data, origin)
            return ResolvedModel(_build_from_config(config, device=device, origin=origin), text, config, True)
        if ":" in text and not text.endswith((".json",)):
            return _from_factory(text)
        raise ConfigError(
            f"unknown model {text!r}: not a preset, not an existing config.json or model directory, "
            f"nor a 'package.module:factory'.{did_you_mean(close_presets(text))} Presets: {', '.join(list_presets())}"
        )
    raise ConfigError(
        f"cannot use {type(model).__name__} {model!r} as a model; expected an nn.Module, a "
        "transformers config, a config.json path, a preset name, or 'package.module:factory'"
    )


def _exists(text: str) -> bool:
    """Whether a path exists; a name too long or with a NUL byte for the OS is no path."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


_FACTORY_FORM = ("'package.module:factory' names a module importable here and, in it, a callable that takes "
                 "no arguments and returns a torch.nn.Module")


def _from_factory(spec: str) -> ResolvedModel:
    """Import ``package.module`` and call its ``factory``; whatever the user's code does is a ConfigError.

    Importing and calling the user's code may raise anything, ``SystemExit`` included
    (``sys.exit`` in a script's module body); only ``KeyboardInterrupt`` goes through.
    """
    import importlib

    from torch import nn

    module_name, _, attr = spec.partition(":")
    if not module_name.strip() or module_name.startswith(".") or not attr.strip():
        raise ConfigError(f"cannot use {spec!r} as a model: {_FACTORY_FORM} (an absolute module name "
                          "before the ':' and a name after it)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"importing {module_name!r} for model {spec!r} failed: {_describe(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})") from None
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"reading {attr!r} of {module_name!r} (model {spec!r}) failed: "
                              f"{_describe(exc)}") from None
    built = obj
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            built = obj()
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"calling {spec}() failed: {_describe(exc)}; {_FACTORY_FORM}") from None
    if not isinstance(built, nn.Module):
        raise ConfigError(f"{spec!r} returned {type(built).__name__}, not a torch.nn.Module")
    return ResolvedModel(built, spec, getattr(built, "config", None), True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``, torch/_dynamo/eval_frame.py).

    The trace runs eagerly in any case (dynamo is off in its process); tracing the original module
    keeps the parameters' names the user's own.
    """
    from torch import nn

    inner = getattr(module, "_orig_mod", None)
    return inner if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else module

def lora_rank_limit(resolved: ResolvedModel) -> int | None:
    """The largest LoRA rank worth taking for ``resolved``: its hidden size, or ``None`` when unknown.

    A LoRA update ``B @ A`` of a ``d_out x d_in`` weight has rank at most ``min(r, d_in, d_out)``
    (Hu et al. 2021, section 4.1), and the attention projections peft targets are ``hidden x
    hidden`` (or narrower for grouped key/values): adapters of a larger rank add parameters that
    can learn nothing more. transformers configs name the width ``hidden_size`` (GPT-2's ``n_embd``
    and T5's ``d_model`` through their ``attribute_map``).
    """
    hidden = getattr(resolved.config, "hidden_size", None)
    return hidden if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0 else None


def check_lora_rank(rank: int, name: str, limit: int | None) -> None:
    """Refuse a LoRA ``rank`` above ``limit``, the hidden size of model ``name`` (:func:`lora_rank_limit`).

    Raises:
        ConfigError: naming the rank and the largest one worth taking.
    """
    if limit is not None and rank > limit:
        raise ConfigError(f"lora_rank={rank:,} is above the hidden size of {name} ({limit:,}): an adapter's "
                          f"update has rank at most the width of the layer it adapts; use a rank of at most {limit:,} "
                          "(8 to 64 is usual)")


def add_lora(resolved: ResolvedModel, rank: int) -> ResolvedModel:
    """Freeze the base model and add LoRA adapters of ``rank`` (Hu et al. 2021) with ``peft``.

    The adapters go where peft puts them by default for the architecture (the attention
    projections for most), with ``lora_alpha = 2 * rank`` and no adapter dropout. On a base model
    on the meta device (as :func:`load_model` builds them) the adapters are built there too, with
    peft's ``low_cpu_mem_usage=True`` (``init_empty_weights`` in peft/tuners/tuners_utils.py):
    without it peft allocates each adapter on the CPU before moving it to the base layer's device
    (rank 1024 on Llama-2-7B: 1.9 GB resident, for nothing).

    Raises:
        ConfigError: for a module the user built (adding adapters would change it: wrap it with
            peft yourself and pass the result), a rank above the model's hidden size
            (:func:`lora_rank_limit`), or an architecture peft has no default targets for.
        MissingDependencyError: without ``peft``.
    """
    from memguard.errors import require
    from memguard.estimation.spec import positive_int

    rank = positive_int("lora_rank", rank)
    peft = require("peft", "peft", "lora_rank")
    if not resolved.built_here:
        raise ConfigError(
            "lora_rank adds adapters to models memguard builds (a preset, config or config.json); "
            "for your own module, wrap it with peft.get_peft_model and pass the result"
        )
    check_lora_rank(rank, resolved.name, lora_rank_limit(resolved))
    on_meta = any(p.device.type == "meta" for p in resolved.module.parameters())
    # GPT-2's Conv1D layers store their weights transposed; peft wants to be told.
    conv1d = any(type(m).__name__ == "Conv1D" for m in resolved.module.modules())
    try:
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, fan_in_fan_out=conv1d)
        module = peft.get_peft_model(resolved.module, config, low_cpu_mem_usage=on_meta)
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
