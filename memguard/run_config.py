"""A training run's own configuration file, read as :func:`memguard.estimate`'s keyword arguments.

So that a CI job checks the run users actually launch, not a re-typed copy of it. Three kinds of
file are read, told apart by their content (not their name):

* a **LightningCLI** YAML (``model: {class_path, init_args}``, ``data: ...``, ``trainer: ...``,
  ``optimizer: ...``): the LightningModule and DataModule it names are built (the current folder is
  importable, as ``python main.py fit --config ...`` has it), the first training batch's shapes are
  peeked in a forked child (:mod:`memguard.estimation.sandbox`: the datamodule's ``prepare_data``,
  ``setup("fit")`` and ``train_dataloader`` run there, nothing is consumed here), and the module's
  own ``training_step`` is what the trace runs, as :mod:`memguard.lightning.rank` does for the
  callback. The optimizer is the YAML's ``optimizer:`` (what LightningCLI's ``configure_optimizers``
  builds) or else the module's ``configure_optimizers()``. Precision, accumulation, strategy and
  world size come from ``trainer:`` (``lightning/pytorch/trainer/trainer.py`` arguments);
* transformers ``TrainingArguments`` as JSON or YAML (``transformers/training_args.py``; absent
  fields take that dataclass's defaults, as ``HfArgumentParser`` gives them), with the model from
  ``model_name_or_path`` when it names a preset or a local config, and the DeepSpeed config its
  ``deepspeed`` field points to;
* a **DeepSpeed** JSON (``deepspeed/runtime/config.py`` and ``zero/config.py`` key names).

Unknown keys are named in one warning; a key that changes memory in a way memguard does not model
is a :class:`~memguard.errors.ConfigError` naming it. Values DeepSpeed leaves to the Trainer
(``"auto"``) are skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from memguard.errors import ConfigError

__all__ = ["KINDS", "config_kind", "read_run_config"]

KINDS = ("lightning", "training_arguments", "deepspeed")

_DEEPSPEED_BUCKET = 200_000_000
"""``reduce_bucket_size`` / ``allgather_bucket_size`` memguard models: DeepSpeed's and Lightning's
default of 2e8 elements (memguard.estimation.parallel.DEEPSPEED_BUCKET_ELEMENTS)."""

_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "zero_optimization",
    "bf16", "fp16", "optimizer", "scheduler", "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "dump_state", "tensorboard", "wandb", "csv_monitor", "comms_logger", "flops_profiler", "checkpoint",
    "data_types", "amp", "activation_checkpointing", "sparse_gradients",
}
_ZERO_KEYS = {
    "stage", "offload_optimizer", "offload_param", "reduce_bucket_size", "allgather_bucket_size",
    "overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions", "round_robin_gradients",
    "sub_group_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "load_from_fp32_weights",
    "elastic_checkpoint", "cpu_offload", "zero_quantized_weights", "zero_quantized_gradients",
    "zero_hpz_partition_size", "memory_efficient_linear", "mics_shard_size", "use_multi_rank_bucket_allreduce",
}

_TA_OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw-fused", "adamw_hf": "adamw", "sgd": "sgd",
    "adafactor": "adafactor", "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit",
    "paged_adamw_8bit": "adamw-8bit", "adagrad": None, "rmsprop": None,
}
"""``TrainingArguments.optim`` (``transformers.training_args.OptimizerNames``) in memguard's names."""

_TA_UNMODELLED = {"use_liger_kernel": "Liger's fused kernels (loss and MLP activations)",
                  "torch_compile": "torch.compile's fused kernels"}

_TA_FSDP = {"full_shard": "fsdp", "shard_grad_op": "fsdp_shard_grad_op", "hybrid_shard": "fsdp_hybrid"}

_LIGHTNING_TOP = {"model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path",
                  "config", "verbose"}

_PRECISIONS = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "32-true": "32-true",
               "16-mixed": "16-mixed", "bf16-mixed": "bf16-mixed", "16-true": "16-true", "bf16-true": "bf16-true"}


def read_run_config(path: str | os.PathLike[str], *, trace_timeout: float | None = None,
                    skip: Collection[str] = ()) -> dict[str, Any]:
    """The keyword arguments of :func:`memguard.estimate` that ``path`` describes.

    Args:
        path: a LightningCLI YAML, a ``TrainingArguments`` JSON/YAML or a DeepSpeed JSON.
        trace_timeout: seconds the peek at a LightningCLI datamodule's first batch may take.
        skip: keys given elsewhere (the command line), not worked out from the file: a LightningCLI
            module's ``configure_optimizers`` is not called when ``"optimizer"`` is in ``skip``.

    Returns:
        A plain dict: ``model`` (a name, or the built LightningModule) where the file names one,
        ``batch_size``, and whichever of ``precision``, ``optimizer``, ``gradient_checkpointing``,
        ``strategy``, ``world_size``, ``offload_optimizer``, ``offload_params``,
        ``accumulate_grad_batches``, ``device``, ``example_input``, ``step_fn``, ``training_loop``
        the file sets.

    Raises:
        ConfigError: unreadable file, unknown kind, a value memguard cannot model.
    """
    data = _load(Path(path))
    kind = config_kind(data, path)
    if kind == "deepspeed":
        return _deepspeed(data, str(path))
    if kind == "training_arguments":
        return _training_arguments(data, Path(path))
    return _lightning(data, str(path), trace_timeout, skip)


def config_kind(data: Any, path: str | os.PathLike[str] = "the file") -> str:
    """``"lightning"``, ``"training_arguments"`` or ``"deepspeed"``, from what ``data`` holds."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if "zero_optimization" in data or "train_micro_batch_size_per_gpu" in data or "train_batch_size" in data:
        return "deepspeed"
    if isinstance(data.get("model"), (dict, str)) and ({"trainer", "data"} & set(data) or _class_path(data["model"])):
        return "lightning"
    if {"per_device_train_batch_size", "gradient_accumulation_steps", "output_dir", "optim"} & set(data):
        return "training_arguments"
    raise ConfigError(f"{path}: not a LightningCLI YAML (model/trainer), TrainingArguments "
                      "(per_device_train_batch_size ...) or DeepSpeed config (zero_optimization ...); "
                      f"its keys are {', '.join(sorted(map(str, data))[:8])}")


def _load(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    import yaml  # JSON is YAML too

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None


def _warn_unknown(path: str, where: str, keys: set[str]) -> None:
    if keys:
        warnings.warn(f"{path}: memguard does not read {where} {', '.join(sorted(keys))}; "
                      "the estimate is made without them", stacklevel=3)


def _not_auto(value: Any) -> bool:
    return value is not None and value != "auto"


# -- DeepSpeed ---------------------------------------------------------------------------------


def _deepspeed(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``zero_optimization`` (stage, offloads, buckets), the micro-batch, accumulation and precision."""
    _warn_unknown(path, "the DeepSpeed keys", set(data) - _DEEPSPEED_KEYS)
    out: dict[str, Any] = {}
    zero = data.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be a mapping, got {zero!r}")
    _warn_unknown(path, "the zero_optimization keys", set(zero) - _ZERO_KEYS)
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        value = zero.get(key)
        if _not_auto(value) and int(float(value)) != _DEEPSPEED_BUCKET:
            raise ConfigError(f"{path}: zero_optimization.{key} {value} changes the bucket memory, and memguard "
                              f"models DeepSpeed's default of {_DEEPSPEED_BUCKET:.0e} elements; remove the key "
                              "(or set it to 2e8) to estimate with the default")
    stage = zero.get("stage", 0)
    if _not_auto(stage):
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}: zero_optimization.stage {stage!r}; DeepSpeed's stages are 0 to 3")
        out["strategy"] = f"deepspeed_stage_{stage}" if stage else "ddp"
        out["offload_optimizer"] = bool(stage) and _offloaded(zero.get("offload_optimizer"), path)
        out["offload_params"] = stage == 3 and _offloaded(zero.get("offload_param"), path)
    micro, accumulation = data.get("train_micro_batch_size_per_gpu"), data.get("gradient_accumulation_steps")
    if _not_auto(micro):
        out["batch_size"] = int(micro)
    if _not_auto(accumulation):
        out["accumulate_grad_batches"] = int(accumulation)
    total = data.get("train_batch_size")
    if _not_auto(total) and _not_auto(micro):  # train_batch_size = micro x accumulation x world size
        per_rank = int(micro) * int(accumulation if _not_auto(accumulation) else 1)
        if int(total) % per_rank:
            raise ConfigError(f"{path}: train_batch_size {total} is not train_micro_batch_size_per_gpu x "
                              f"gradient_accumulation_steps ({per_rank}) x the number of GPUs")
        out["world_size"] = int(total) // per_rank
    precision = _deepspeed_precision(data, path)
    if precision is not None:
        out["precision"] = precision
    return out


def _offloaded(section: Any, path: str) -> bool:
    """Whether an ``offload_*`` section moves state to the host; NVMe is not modelled."""
    if not isinstance(section, dict):
        return False
    where = str(section.get("device", "none")).lower()
    if where == "nvme":
        raise ConfigError(f"{path}: offload to nvme is not modelled (its host buffers differ); "
                          "set device to cpu to estimate the GPU side")
    return where == "cpu"


def _deepspeed_precision(data: Mapping[str, Any], path: str) -> str | None:
    """DeepSpeed's ``bf16``/``fp16`` sections keep fp32 master weights: Lightning's ``*-mixed`` accounting."""
    bf16 = (data.get("bf16") or {}).get("enabled", False)
    fp16 = (data.get("fp16") or {}).get("enabled", False)
    if bf16 == "auto" or fp16 == "auto":
        return None
    if bf16 and fp16:
        raise ConfigError(f"{path}: bf16 and fp16 are both enabled; DeepSpeed takes one")
    return "bf16-mixed" if bf16 else "16-mixed" if fp16 else "32-true"


# -- transformers TrainingArguments ---------------------------------------------------------------


def _training_arguments(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Batch, accumulation, precision, checkpointing, ``optim``, FSDP and the DeepSpeed file it names."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    extra = {"model_name_or_path", "config_name"}
    _warn_unknown(str(path), "the TrainingArguments keys", set(data) - set(fields) - extra)

    def get(key: str) -> Any:
        if key in data:
            return data[key]
        default = fields[key].default
        return None if default is dataclasses.MISSING else default

    for key, what in _TA_UNMODELLED.items():
        if get(key):
            raise ConfigError(f"{path}: {key}: true changes memory through {what}, which memguard does not model; "
                              "set it to false in a copy of the file to estimate the step without it")
    out: dict[str, Any] = {"batch_size": int(get("per_device_train_batch_size")),
                           "accumulate_grad_batches": int(get("gradient_accumulation_steps")),
                           "optimizer": _ta_optimizer(str(get("optim")), path),
                           "keep_output": False}  # Trainer.compute_loss drops the output before backward
    if get("bf16") and get("fp16"):
        raise ConfigError(f"{path}: bf16 and fp16 are both true; the Trainer takes one")
    out["precision"] = "bf16-mixed" if get("bf16") else "16-mixed" if get("fp16") else "32-true"
    if get("gradient_checkpointing") is not None:
        out["gradient_checkpointing"] = bool(get("gradient_checkpointing"))
    out.update(_ta_fsdp(get("fsdp"), path))
    model = data.get("model_name_or_path") or data.get("config_name")
    if model:
        out["model"] = _local_model(str(model), path)
    deepspeed = get("deepspeed")
    if deepspeed:
        ds = deepspeed if isinstance(deepspeed, dict) else _load(_beside(str(deepspeed), path))
        if config_kind(ds, deepspeed if isinstance(deepspeed, str) else path) != "deepspeed" and ds:
            raise ConfigError(f"{path}: deepspeed {deepspeed!r} is not a DeepSpeed config")
        found = _deepspeed(ds, str(deepspeed) if isinstance(deepspeed, str) else f"{path} deepspeed")
        for key, value in found.items():  # the Trainer requires its own values to match the file's
            out.setdefault(key, value)
    return out


def _ta_optimizer(name: str, path: Path) -> str:
    key = name.lower()
    if key not in _TA_OPTIMIZERS or _TA_OPTIMIZERS[key] is None:
        known = ", ".join(k for k, v in _TA_OPTIMIZERS.items() if v)
        raise ConfigError(f"{path}: optim {name!r} is not one memguard models ({known}); "
                          "pass --optimizer with the closest one to estimate anyway")
    memguard_name = str(_TA_OPTIMIZERS[key])
    if memguard_name == "adamw-fused":
        from memguard.estimation.spec import resolve_optimizer

        try:
            resolve_optimizer(memguard_name)
        except ConfigError:  # no fused AdamW in this memguard: the foreach one holds the same state, and more
            warnings.warn(f"{path}: optim {name}: memguard estimates foreach AdamW, whose temporaries make the "
                          "estimate an upper bound of the fused one", stacklevel=3)
            return "adamw"
    return memguard_name


def _ta_fsdp(value: Any, path: Path) -> dict[str, Any]:
    """``fsdp: "full_shard offload auto_wrap"`` (``transformers.trainer_utils.FSDPOption``)."""
    options = value.split() if isinstance(value, str) else list(value or [])
    if not options:
        return {}
    modes = [o for o in options if o in _TA_FSDP]
    unknown = set(options) - set(_TA_FSDP) - {"offload", "auto_wrap"}
    if len(modes) != 1 or unknown:
        raise ConfigError(f"{path}: fsdp {value!r}: memguard models one of {', '.join(_TA_FSDP)}, with offload "
                          "and auto_wrap")
    offload = "offload" in options
    return {"strategy": _TA_FSDP[modes[0]], "offload_optimizer": offload,
            "offload_params": offload and modes[0] != "shard_grad_op"}


def _beside(name: str, path: Path) -> Path:
    """A path as written in ``path``: from the current folder, else beside the file."""
    here = Path(name)
    return here if here.exists() or here.is_absolute() else path.parent / name


def _local_model(name: str, path: Path) -> str:
    """``model_name_or_path`` when it is a preset or a local config; a Hub name is not fetched."""
    from memguard.estimation.models import list_presets

    if name in list_presets():
        return name
    local = _beside(name, path)
    if local.exists():
        return str(local)
    raise ConfigError(f"{path}: model_name_or_path {name!r} is neither a memguard preset nor a local config; "
                      "give the model as MODEL (a preset, a config.json or a model directory)")


# -- LightningCLI ---------------------------------------------------------------------------------


def _class_path(section: Any) -> str | None:
    if isinstance(section, str) and "." in section:
        return section
    if isinstance(section, dict) and isinstance(section.get("class_path"), str):
        return section["class_path"]
    return None


def _import(dotted: str, where: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python main.py fit` has it: the project root importable
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot import {dotted!r} ({type(exc).__name__}: {exc}); run memguard from the "
                          "folder LightningCLI runs from, or put the package on PYTHONPATH") from None


def _instantiate(section: Any, where: str) -> Any:
    """``{class_path, init_args}`` built as jsonargparse builds it, nested ones first."""
    dotted = _class_path(section)
    if dotted is None:
        raise ConfigError(f"{where}: no class_path; memguard needs the class to build (LightningCLI's "
                          "'model: {class_path: pkg.mod.Class, init_args: {...}}')")
    if isinstance(section, dict):
        _warn_unknown(where, f"the keys of {where}", set(section) - {"class_path", "init_args", "dict_kwargs"})
        kwargs = {**(section.get("init_args") or {}), **(section.get("dict_kwargs") or {})}
    else:
        kwargs = {}
    kwargs = {k: _instantiate(v, f"{where}.{k}") if _class_path(v) and isinstance(v, dict) else v
              for k, v in kwargs.items()}
    cls = _import(dotted, where)
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{where}: {dotted}(**init_args) failed ({type(exc).__name__}: {exc})") from None


def _lightning(data: Mapping[str, Any], path: str, trace_timeout: float | None,
               skip: Collection[str]) -> dict[str, Any]:
    """Build the module and datamodule; read the batch, the optimizer and the trainer's settings."""
    if set(data) == {"fit"}:
        data = data["fit"]
    _warn_unknown(path, "the LightningCLI keys", set(data) - _LIGHTNING_TOP)
    module = _instantiate(data["model"], f"{path}: model")
    datamodule = _instantiate(data["data"], f"{path}: data") if data.get("data") else None
    trainer = data.get("trainer") or {}
    out = _trainer_settings(trainer, path)
    batch = _peek(module, datamodule, path, trace_timeout)
    from memguard.estimation.from_run import batch_size_of

    def step(b: Any) -> Any:
        return module.training_step(b, 0)

    out.update(model=module, batch_size=batch_size_of(batch), example_input=batch, step_fn=step,
               training_loop="lightning")
    if "optimizer" not in skip:
        out["optimizer"] = _lightning_optimizer(data.get("optimizer"), module, path, out.get("device", "cuda"))
    return out


def _trainer_settings(trainer: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``precision``, ``accumulate_grad_batches``, ``strategy``, ``devices`` x ``num_nodes``, ``accelerator``."""
    import inspect

    from lightning.pytorch import Trainer

    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    _warn_unknown(path, "the trainer keys", set(trainer) - known)
    out: dict[str, Any] = {}
    if "precision" in trainer:
        text = str(trainer["precision"]).lower()
        if text not in _PRECISIONS:
            raise ConfigError(f"{path}: trainer.precision {trainer['precision']!r}; memguard models "
                              f"{', '.join(sorted(set(_PRECISIONS.values())))}")
        out["precision"] = _PRECISIONS[text]
    if "accumulate_grad_batches" in trainer:
        out["accumulate_grad_batches"] = int(trainer["accumulate_grad_batches"])
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    out["device"] = "cpu" if accelerator == "cpu" else "cuda"
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    count = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else None
    if count is not None:
        out["world_size"] = count * nodes
    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy != "auto":
        out["strategy"] = strategy
    elif isinstance(strategy, dict):
        out.update(_strategy_object(strategy, path))
    if count is None and out.get("strategy", "single") not in ("single", "auto"):
        warnings.warn(f"{path}: trainer.devices {devices!r} depends on the machine; the world size is "
                      "--world-size (default 1)", stacklevel=3)
    return out


def _strategy_object(section: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``{class_path: ...DeepSpeedStrategy|FSDPStrategy|DDPStrategy, init_args: {...}}``."""
    name = str(section.get("class_path", "")).rpartition(".")[2]
    args = section.get("init_args") or {}
    if name == "DeepSpeedStrategy":
        stage = int(args.get("stage", 2))
        return {"strategy": f"deepspeed_stage_{stage}",
                "offload_optimizer": bool(args.get("offload_optimizer")) and stage > 0,
                "offload_params": bool(args.get("offload_parameters")) and stage == 3}
    if name == "FSDPStrategy":
        mode = str(args.get("sharding_strategy", "FULL_SHARD")).upper()
        strategy = {"FULL_SHARD": "fsdp", "SHARD_GRAD_OP": "fsdp_shard_grad_op", "HYBRID_SHARD": "fsdp_hybrid",
                    "NO_SHARD": "ddp"}.get(mode)
        if strategy is None:
            raise ConfigError(f"{path}: FSDPStrategy sharding_strategy {mode!r} is not modelled")
        offload = bool(args.get("cpu_offload"))
        return {"strategy": strategy, "offload_optimizer": offload, "offload_params": offload}
    if name in ("DDPStrategy", "SingleDeviceStrategy"):
        return {"strategy": "ddp" if name == "DDPStrategy" else "single"}
    raise ConfigError(f"{path}: trainer.strategy {name or section!r} is not modelled; memguard knows DDPStrategy, "
                      "FSDPStrategy and DeepSpeedStrategy (or pass --strategy)")


def _peek(module: Any, datamodule: Any, path: str, timeout: float | None) -> Any:
    """The first training batch's skeleton, read in a forked child (:mod:`memguard.estimation.sandbox`)."""
    from memguard.estimation import sandbox
    from memguard.estimation.trace import DEFAULT_TIMEOUT
    from memguard.lightning.run import batch_skeleton, in_one_process

    source = datamodule if datamodule is not None else module

    def first() -> Any:
        import torch

        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
        loader = source.train_dataloader()
        if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
            return None
        in_one_process(loader)
        return batch_skeleton(next(iter(loader)))

    batch = sandbox.run(first, timeout=timeout or DEFAULT_TIMEOUT, what="the peek at the train data")
    if batch is None:
        raise ConfigError(f"{path}: the train data is an IterableDataset, whose first batch memguard does not "
                          "take; use the MemGuard callback in the run instead")
    return batch


def _lightning_optimizer(section: Any, module: Any, path: str, device: str) -> Any:
    """The YAML's ``optimizer:`` (a class and its arguments), else the module's ``configure_optimizers()``."""
    if section is not None:
        dotted = _class_path(section) or (f"torch.optim.{section}" if isinstance(section, str) else None)
        if dotted is None:
            raise ConfigError(f"{path}: optimizer needs a class_path (e.g. torch.optim.AdamW)")
        cls = _import(dotted if "." in dotted else f"torch.optim.{dotted}", f"{path}: optimizer")
        kwargs = dict(section.get("init_args") or {}) if isinstance(section, dict) else {}

        def factory(params: list[Any]) -> Any:
            return cls(params, **kwargs)

        factory.__name__ = cls.__name__.lower()
        factory.memguard_name = _optimizer_name(cls, kwargs)  # type: ignore[attr-defined]
        return factory
    from memguard.estimation.from_run import optimizer_factory

    try:
        found = module.configure_optimizers()
    except Exception as exc:
        raise ConfigError(f"{path}: {type(module).__name__}.configure_optimizers() failed outside a Trainer "
                          f"({type(exc).__name__}: {exc}); name the optimizer with --optimizer") from None
    optimizer = _first_optimizer(found)
    if optimizer is None:
        return "none"
    factory = optimizer_factory(module, optimizer, device)
    factory.memguard_name = _optimizer_name(type(optimizer), optimizer.defaults)  # type: ignore[attr-defined]
    return factory


def _optimizer_name(cls: type, kwargs: Mapping[str, Any]) -> str | None:
    """memguard's name for a built-in optimizer class and its arguments (for ``plan``), else ``None``.

    The state each holds (``torch/optim/sgd.py``: a momentum buffer only when ``momentum != 0``).
    """
    name = cls.__name__
    if name == "SGD":
        return "sgd-momentum" if kwargs.get("momentum") else "sgd"
    return {"AdamW": "adamw", "Adam": "adam", "Adafactor": "adafactor"}.get(name)


def _first_optimizer(found: Any) -> Any:
    """The optimizer in what ``configure_optimizers`` returns (Lightning's documented forms)."""
    import torch

    if found is None or isinstance(found, torch.optim.Optimizer):
        return found
    if isinstance(found, dict):
        return _first_optimizer(found.get("optimizer"))
    if isinstance(found, (list, tuple)) and found:
        return _first_optimizer(found[0])
    return None
