"""A model as the formula reads it, as data: :class:`ModelDescription`.

The formula (:mod:`memguard.estimation.formula`) reads a module twice: its architecture
(:func:`memguard.estimation.arch.inspect_architecture`) and its parameters
(:func:`memguard.estimation.formula.inventory.inventory`); the planning of the batch reads a few
fields of its config (:mod:`memguard.estimation.inputs`). :func:`describe` gathers all of them from a
resolved model into one JSON-able object. Each preset's description is shipped beside it
(``presets/described/NAME.json``, written by ``python -m memguard.estimation.description`` and
checked against the meta model by the tests), so ``estimate(PRESET, method="formula")`` neither
builds the model nor imports torch or transformers (:func:`preset_description`): the same formula,
read from data. Where peft's default targets put LoRA adapters is recorded too (:class:`LoraSites`, read
from peft on a copy of the module), so ``lora_rank=r`` derives the adapted model's description
(:func:`with_lora`) instead of building it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from memguard.estimation.arch import Architecture, MoE
from memguard.estimation.formula.inventory import Inventory
from memguard.estimation.inputs import TaskKind
from memguard.estimation.quantization_kinds import (
    CODE_DYNAMIC,
    F32,
    Quantization,
    QuantizedShape,
    linear_storage,
    matches_module,
    quantized_note,
)

if TYPE_CHECKING:
    from memguard.estimation.models import ResolvedModel

__all__ = ["DESCRIPTION_DIR", "LoraSites", "ModelDescription", "describe", "described_preset", "preset_description",
           "quantizable", "with_lora", "with_quantized_base", "write_descriptions"]

DESCRIPTION_DIR = Path(__file__).parent / "presets" / "described"
"""Where the presets' descriptions are shipped, one ``NAME.json`` per preset."""

CONFIG_FIELDS = ("model_type", "max_position_embeddings", "n_positions", "num_mel_bins", "max_source_positions",
                 "max_target_positions", "vocab_size", "num_labels", "image_size", "num_channels",
                 "is_encoder_decoder")
"""The config fields the planning of a batch reads (:func:`memguard.estimation.inputs.max_positions`,
``audio_positions``, ``decoder_length``, ``check_batch``), as the transformers config class fills them."""


CHECKPOINTING_SWITCHES = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
"""transformers' methods that turn gradient checkpointing on (:func:`memguard.estimation.models.set_checkpointing`)."""


@dataclasses.dataclass(frozen=True)
class LoraSites:
    """Where :func:`memguard.estimation.models.add_lora` puts peft's adapters on a model, read from peft itself
    (its default ``target_modules`` for the architecture), so :func:`with_lora` derives the adapted model's
    description as data.

    Attributes:
        class_name: the class of peft's model (``PeftModel``: a ``LoraConfig`` without ``task_type``).
        limit: the largest rank worth taking (:func:`~memguard.estimation.models.lora_rank_limit`).
        targets: for each adapted layer, ``(index of its last parameter, in, out)``: its ``lora_A`` and
            ``lora_B`` weights follow that parameter in ``module.parameters()`` (peft's ``LoraLayer``
            registers ``base_layer`` before ``lora_A`` and ``lora_B``); ``in``/``out`` are the widths peft
            reads (GPT-2's ``Conv1D`` transposed: ``fan_in_fan_out``).
        linears: the layers :func:`~memguard.estimation.quantization.quantize_model` may quantize in the
            adapted model (``nn.Linear`` and GPT-2's ``Conv1D``, peft's adapters left out), each
            ``(name in the adapted model, index of its weight or -1 where the weight is tied to another
            parameter, in, out, whether transformers' default skips it)``.
    """

    class_name: str
    limit: int | None
    targets: tuple[tuple[int, int, int], ...]
    linears: tuple[tuple[str, int, int, int, bool], ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What an estimate by the formula reads of a model.

    Attributes:
        name: the model's display name (:attr:`ResolvedModel.name`: the preset's).
        class_name: the module's class, for messages (``LlamaForCausalLM``).
        task: what its head computes (:func:`memguard.estimation.inputs.model_task`).
        arch: its :class:`~memguard.estimation.arch.Architecture`.
        inventory: its parameters (:class:`~memguard.estimation.formula.inventory.Inventory`).
        fields: the config's :data:`CONFIG_FIELDS` that are set.
        checkpointing: gradient checkpointing is on in the module (transformers'
            ``is_gradient_checkpointing``).
        lora: where LoRA adapters go (:class:`LoraSites`), or ``None`` (the module is built for LoRA then).
        checkpointing_switch: the module has transformers' switch (``activation_checkpointing_enable`` or
            ``gradient_checkpointing_enable``), so a plan searches checkpointing
            (:mod:`memguard.planning.search`).
        quantized: the quantized linear layers of a base :func:`with_quantized_base` derived (``()`` for a
            preset's own description; not written by :meth:`to_dict`: a derived description is not shipped).
    """

    name: str
    class_name: str
    task: TaskKind
    arch: Architecture
    inventory: Inventory
    fields: dict[str, Any]
    checkpointing: bool = False
    lora: LoraSites | None = None
    checkpointing_switch: bool = False
    quantized: tuple[QuantizedShape, ...] = ()

    @property
    def config(self) -> Any:
        """The config's :data:`CONFIG_FIELDS` as attributes, for the functions that read a config."""
        return SimpleNamespace(**self.fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON values; :meth:`from_dict` reads them back."""
        return {"name": self.name, "class_name": self.class_name, "task": str(self.task),
                "arch": {**dataclasses.asdict(self.arch), "head": str(self.arch.head)},
                "inventory": self.inventory.to_dict(), "fields": self.fields, "checkpointing": self.checkpointing,
                "lora": None if self.lora is None else dataclasses.asdict(self.lora),
                "checkpointing_switch": self.checkpointing_switch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDescription:
        arch = dict(data["arch"])
        if arch.get("moe") is not None:
            arch["moe"] = MoE(**arch["moe"])
        lora = data.get("lora")
        sites = None if lora is None else LoraSites(
            lora["class_name"], lora["limit"], tuple((int(i), int(a), int(b)) for i, a, b in lora["targets"]),
            tuple((str(n), int(w), int(a), int(b), bool(skip)) for n, w, a, b, skip in lora["linears"]))
        return cls(name=data["name"], class_name=data["class_name"], task=TaskKind(data["task"]),
                   arch=Architecture(**arch), inventory=Inventory.from_dict(data["inventory"]),
                   fields=dict(data["fields"]), checkpointing=bool(data["checkpointing"]), lora=sites,
                   checkpointing_switch=bool(data.get("checkpointing_switch", False)))


def describe(model: ResolvedModel) -> ModelDescription:
    """The :class:`ModelDescription` of a resolved model, read from its module (imports torch).

    Raises:
        UnsupportedModelError: when the formula cannot read its architecture.
    """
    from memguard.estimation.arch import inspect_architecture
    from memguard.estimation.formula.inventory import inventory
    from memguard.estimation.inputs import model_task
    from memguard.estimation.models import is_checkpointing

    module = model.module
    arch = inspect_architecture(module, model.config, name=model.name, needs="the formula")
    config = getattr(module, "config", None)
    fields = {}
    for name in CONFIG_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            fields[name] = list(value) if isinstance(value, tuple) else value
    inv = dataclasses.replace(inventory(module, arch), generation=0)
    return ModelDescription(name=model.name, class_name=type(module).__name__, task=model_task(module), arch=arch,
                            inventory=inv, fields=fields, checkpointing=is_checkpointing(module),
                            lora=None if inv.adapters else _lora_sites(model),
                            checkpointing_switch=any(hasattr(module, f) for f in CHECKPOINTING_SWITCHES))


def _lora_sites(model: ResolvedModel) -> LoraSites | None:
    """Where :func:`~memguard.estimation.models.add_lora` puts adapters on ``model``, read from peft's own choice
    on a copy of its module; ``None`` where it does not add any (a module of the user's, no peft, or no default
    targets for the architecture: the module path says why)."""
    import copy

    from memguard.errors import MemguardError
    from memguard.estimation.models import ResolvedModel, add_lora, lora_rank_limit

    if not model.built_here:
        return None
    try:
        lora = add_lora(ResolvedModel(copy.deepcopy(model.module), model.name, model.config, built_here=True), 1)
    except MemguardError:
        return None
    index = {name: i for i, (name, _) in enumerate(model.module.named_parameters())}
    targets = []
    for name, m in lora.module.named_modules():
        adapter = getattr(m, "lora_A", None)
        if adapter is None or "default" not in adapter:
            continue
        layer = name.removeprefix("base_model.model.")
        last = max(index[f"{layer}.{p}"] for p, _ in m.base_layer.named_parameters())
        a, b = adapter["default"].weight, m.lora_B["default"].weight
        targets.append((last, int(a.shape[1]), int(b.shape[0])))
    return LoraSites(type(lora.module).__name__, lora_rank_limit(model), tuple(sorted(targets)),
                     _linears(lora.module, index))


def _linears(module: Any, index: dict[str, int]) -> tuple[tuple[str, int, int, int, bool], ...]:
    """The layers of peft's ``module`` that :func:`~memguard.estimation.quantization.quantize_model` may
    replace, as it walks them (see :attr:`LoraSites.linears`); ``index``: the base model's parameter indices
    by name (a weight tied to another parameter has none there: -1)."""
    from torch import nn

    from memguard.estimation.quantization import default_skips, is_adapter

    skips = default_skips(module)
    found = []
    for name, parent in module.named_modules():
        for child_name, child in parent._modules.items():
            full = f"{name}.{child_name}" if name else child_name
            conv1d = type(child).__name__ == "Conv1D"
            if child is None or not (isinstance(child, nn.Linear) or conv1d) or is_adapter(full):
                continue
            in_f, out_f = child.weight.shape if conv1d else (child.in_features, child.out_features)
            base = full.removeprefix("base_model.model.").replace(".base_layer", "")
            found.append((full, index.get(f"{base}.weight", -1), int(in_f), int(out_f), id(child) in skips))
    return tuple(found)


def with_lora(desc: ModelDescription, rank: int) -> ModelDescription:
    """The description of ``desc``'s model with LoRA adapters of ``rank``, as
    :func:`~memguard.estimation.models.add_lora` makes it (``NAME+loraR``): every base parameter frozen, each
    adapted layer followed by its trainable ``lora_A`` (``rank x in``) and ``lora_B`` (``out x rank``) weights,
    matmul weights without bias, which :func:`~memguard.estimation.formula.adapters.lora_weights` records as
    adapters; the architecture, config fields and checkpointing are the base's (peft wraps the same module).

    Raises:
        ConfigError: for a rank above the model's hidden size (:func:`~memguard.estimation.models.check_lora_rank`).
    """
    from memguard.estimation.models import check_lora_rank

    assert desc.lora is not None  # the caller checks: otherwise the module is built
    check_lora_rank(rank, desc.name, desc.lora.limit)
    return dataclasses.replace(desc, name=f"{desc.name}+lora{rank}", class_name=desc.lora.class_name,
                               inventory=_adapted(desc.inventory, desc.lora.targets, rank), lora=None)


def _chosen(sites: LoraSites, quant: Quantization) -> list[tuple[str, int, int, int, bool]]:
    """The layers of :attr:`LoraSites.linears` that ``quant`` quantizes: all but transformers' default skips
    (``skip_modules=None``) or those its ``skip_modules`` name (transformers' matching)."""
    patterns = quant.skip_modules or ()
    return [layer for layer in sites.linears
            if not ((quant.skip_modules is None and layer[4]) or matches_module(layer[0], patterns))]


def quantizable(desc: ModelDescription, quant: Quantization) -> bool:
    """Whether :func:`with_quantized_base` derives ``desc``'s model over a base quantized as ``quant``: it says
    where adapters go, and no weight ``quant`` quantizes is tied to another (a quantized copy would untie it)."""
    return desc.lora is not None and all(layer[1] >= 0 for layer in _chosen(desc.lora, quant))


def with_quantized_base(desc: ModelDescription, rank: int, quant: Quantization) -> tuple[ModelDescription, list[str]]:
    """The description of ``desc``'s model with LoRA adapters of ``rank`` (:func:`with_lora`) over a base whose
    linear layers are quantized as ``quant``, as the estimator builds it (``add_lora``, then
    :func:`~memguard.estimation.quantization.quantize_model`: ``NAME+loraR+nf4-dq``), and its note.

    Each quantized layer's weight becomes its packed storage (a flat ``uint8``/``int8`` parameter of
    :func:`~memguard.estimation.quantization_kinds.linear_storage`'s ``weight`` bytes, no longer a matmul weight),
    its constants non-floating buffers (fp32 ones held as ``int32``), and double quantization's dynamic code is
    one buffer shared by all (:class:`~memguard.estimation.quantization.QuantizedLinear`).

    Raises:
        ConfigError: for a rank above the hidden size, or when ``quant`` leaves no layer to quantize.
    """
    from memguard.errors import ConfigError

    assert desc.lora is not None and quantizable(desc, quant)  # the caller checks
    chosen = _chosen(desc.lora, quant)
    lora = with_lora(dataclasses.replace(desc, inventory=_quantized(desc.inventory, chosen, quant)), rank)
    if not chosen:
        raise ConfigError(f"quantization={quant.kind.value!r}, but {lora.name} has no nn.Linear layer to quantize "
                          "(skip_modules may name them all)")
    storage = [linear_storage(out_f, in_f, quant) for _, _, in_f, out_f, _ in chosen]
    note = quantized_note(quant, len(chosen), sum(in_f * out_f for _, _, in_f, out_f, _ in chosen),
                          sum(sum(parts.values()) for parts in storage))
    return dataclasses.replace(lora, name=f"{lora.name}+{quant.kind}{'-dq' * quant.double_quant}",
                               quantized=tuple(QuantizedShape(in_f, out_f, quant) for _, _, in_f, out_f, _ in chosen)
                               ), [note]


def _quantized(inv: Inventory, chosen: list[tuple[str, int, int, int, bool]], quant: Quantization) -> Inventory:
    """``inv`` with the ``chosen`` layers' weights stored as ``quant`` stores them (see :func:`with_quantized_base`)."""
    numel, factored, matmul = list(inv.numel), list(inv.factored), list(inv.matmul)
    float_numel, other = list(inv.float_numel), list(inv.other_bytes)
    matmul_numel, buffers = inv.matmul_numel, inv.buffer_other
    for _, w, in_f, out_f, _ in chosen:
        parts = linear_storage(out_f, in_f, quant)
        matmul_numel -= numel[w] if matmul[w] else 0
        numel[w] = factored[w] = other[w] = parts["weight"]  # one byte an element, a vector
        matmul[w], float_numel[w] = False, 0
        buffers += sum(v for k, v in parts.items() if k != "weight")
    if quant.double_quant and chosen:
        buffers += F32 * CODE_DYNAMIC
    return dataclasses.replace(inv, numel=tuple(numel), factored=tuple(factored), matmul=tuple(matmul),
                               float_numel=tuple(float_numel), other_bytes=tuple(other), matmul_numel=matmul_numel,
                               buffer_other=buffers)


def _adapted(inv: Inventory, targets: tuple[tuple[int, int, int], ...], rank: int) -> Inventory:
    """``inv`` with the adapters of ``rank`` after each target's last parameter (see :func:`with_lora`);
    ``torch.optim.Adafactor`` factors each adapter's ``r x in`` weight into ``r + in`` elements."""
    after = {last: (fan_in, fan_out) for last, fan_in, fan_out in targets}
    cols: dict[str, list[Any]] = {k: [] for k in ("grad", "numel", "factored", "matmul", "float_numel", "other_bytes")}
    new_of: list[int] = []
    added: dict[int, tuple[int, int]] = {}
    adapters: dict[int, tuple[int, int]] = {}

    def add(numel: int, factored: int, grad: bool, matmul: bool, floating: int, other: int) -> int:
        for key, value in zip(cols, (grad, numel, factored, matmul, floating, other), strict=True):
            cols[key].append(value)
        return len(cols["numel"]) - 1

    for i, n in enumerate(inv.numel):
        new_of.append(add(n, inv.factored[i], False, inv.matmul[i], inv.float_numel[i], inv.other_bytes[i]))
        if i in after:
            fan_in, fan_out = after[i]
            a = add(rank * fan_in, rank + fan_in, True, True, rank * fan_in, 0)
            b = add(fan_out * rank, fan_out + rank, True, True, fan_out * rank, 0)
            added[i], adapters[a], adapters[b] = (a, b), (fan_in, rank), (0, 0)

    def remap(indices: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(j for i in indices for j in (new_of[i], *added.get(i, ())))

    lora_numel = sum(cols["numel"][j] for j in adapters)
    return dataclasses.replace(
        inv, **{k: tuple(v) for k, v in cols.items()}, pre=remap(inv.pre),
        enc_blocks=tuple(remap(blk) for blk in inv.enc_blocks), dec_blocks=tuple(remap(blk) for blk in inv.dec_blocks),
        head=None if inv.head is None else new_of[inv.head], matmul_numel=inv.matmul_numel + lora_numel,
        adapters=adapters)


def described_preset(model: Any) -> ModelDescription | None:
    """The shipped description of the preset ``model`` names (aliases and spellings read,
    :func:`~memguard.estimation.models.preset_key`), or ``None``: not a preset's name, or none shipped."""
    from memguard.estimation.models import preset_key

    key = preset_key(model) if isinstance(model, str) else None
    return preset_description(key) if key is not None else None


@functools.cache
def preset_description(name: str) -> ModelDescription | None:
    """The shipped description of preset ``name`` (its key, as :func:`memguard.estimation.models.list_presets`
    names it), or ``None`` where none is shipped."""
    path = DESCRIPTION_DIR / f"{name}.json"
    if not path.is_file():
        return None
    return ModelDescription.from_dict(json.loads(path.read_text(encoding="utf-8")))


def description_text(name: str) -> str:
    """The JSON text of preset ``name``'s description, read from its meta model (imports torch)."""
    from memguard.estimation.models import load_model

    return json.dumps(describe(load_model(name)).to_dict(), sort_keys=True, separators=(",", ":")) + "\n"


def write_descriptions() -> list[Path]:
    """Write every preset's description into :data:`DESCRIPTION_DIR`; the paths written."""
    from memguard.estimation.models import list_presets

    DESCRIPTION_DIR.mkdir(exist_ok=True)
    written = []
    for name in list_presets():
        path = DESCRIPTION_DIR / f"{name}.json"
        path.write_text(description_text(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # python -m memguard.estimation.description
    for p in write_descriptions():
        print(p)
