"""A model as the formula reads it, as data: :class:`ModelDescription`.

The formula (:mod:`memguard.estimation.formula`) reads a module twice: its architecture
(:func:`memguard.estimation.arch.inspect_architecture`) and its parameters
(:func:`memguard.estimation.formula.inventory.inventory`); the planning of the batch reads a few
fields of its config (:mod:`memguard.estimation.inputs`). :func:`describe` gathers all of them from a
resolved model into one JSON-able object. Each preset's description is shipped beside it
(``presets/described/NAME.json``, written by ``python -m memguard.estimation.description`` and
checked against the meta model by the tests), so ``estimate(PRESET, method="formula")`` neither
builds the model nor imports torch or transformers (:func:`preset_description`): the same formula,
read from data.
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

if TYPE_CHECKING:
    from memguard.estimation.models import ResolvedModel

__all__ = ["DESCRIPTION_DIR", "ModelDescription", "describe", "preset_description", "write_descriptions"]

DESCRIPTION_DIR = Path(__file__).parent / "presets" / "described"
"""Where the presets' descriptions are shipped, one ``NAME.json`` per preset."""

CONFIG_FIELDS = ("model_type", "max_position_embeddings", "n_positions", "num_mel_bins", "max_source_positions",
                 "max_target_positions", "vocab_size", "num_labels", "image_size", "num_channels",
                 "is_encoder_decoder")
"""The config fields the planning of a batch reads (:func:`memguard.estimation.inputs.max_positions`,
``audio_positions``, ``decoder_length``, ``check_batch``), as the transformers config class fills them."""


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
    """

    name: str
    class_name: str
    task: TaskKind
    arch: Architecture
    inventory: Inventory
    fields: dict[str, Any]
    checkpointing: bool = False

    @property
    def config(self) -> Any:
        """The config's :data:`CONFIG_FIELDS` as attributes, for the functions that read a config."""
        return SimpleNamespace(**self.fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON values; :meth:`from_dict` reads them back."""
        return {"name": self.name, "class_name": self.class_name, "task": str(self.task),
                "arch": {**dataclasses.asdict(self.arch), "head": str(self.arch.head)},
                "inventory": self.inventory.to_dict(), "fields": self.fields, "checkpointing": self.checkpointing}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDescription:
        arch = dict(data["arch"])
        if arch.get("moe") is not None:
            arch["moe"] = MoE(**arch["moe"])
        return cls(name=data["name"], class_name=data["class_name"], task=TaskKind(data["task"]),
                   arch=Architecture(**arch), inventory=Inventory.from_dict(data["inventory"]),
                   fields=dict(data["fields"]), checkpointing=bool(data["checkpointing"]))


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
    return ModelDescription(name=model.name, class_name=type(module).__name__, task=model_task(module), arch=arch,
                            inventory=dataclasses.replace(inventory(module, arch), generation=0), fields=fields,
                            checkpointing=is_checkpointing(module))


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
