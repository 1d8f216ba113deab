"""``memguard.estimate`` (defined here, in ``memguard.estimation.estimator``): the one entry point to every estimator.

It normalises the arguments (:mod:`memguard.estimation.spec`), resolves the model
(:mod:`memguard.estimation.models`), runs the chosen method — :mod:`memguard.estimation.seed`,
:mod:`memguard.estimation.formula` or :mod:`memguard.estimation.trace` — and adds what the device costs beyond live
tensors (:mod:`memguard.estimation.overhead`).

A preset estimated by the formula alone (no code of the user's; LoRA, a quantized base and every strategy
derived from data) is read from its shipped description instead of its built module
(:mod:`memguard.estimation.description`): the same formula and the same answer without importing torch or
transformers, which this module and the ones it imports at its top leave to the paths that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memguard.errors import ConfigError, MemguardError
from memguard.estimation import sandbox
from memguard.estimation.description import (
    ModelDescription,
    described_preset,
    quantizable,
    with_lora,
    with_quantized_base,
)
from memguard.estimation.formula.inventory import Inventory
from memguard.estimation.inputs import (
    TaskKind,
    audio_positions,
    check_batch,
    decoder_length,
    make_batch,
    max_positions,
    model_task,
)
from memguard.estimation.models import ResolvedModel, add_lora, is_checkpointing, load_model
from memguard.estimation.overhead import device_overhead
from memguard.estimation.parallel import Parallelism, Strategy, Units
from memguard.estimation.quantization_kinds import Quantization, quantized_note
from memguard.estimation.result import Category, MemoryEstimate, Method, PeakTensors
from memguard.estimation.spec import TrainingSpec, resolve_precision
from memguard.estimation.step import DEFAULTS, KNOBS, METHODS, Step
from memguard.estimation.trace_timeout import DEFAULT_TIMEOUT, check_timeout

if TYPE_CHECKING:
    import torch

    from memguard.estimation.trace import Inputs, TraceResult

__all__ = ["METHODS", "Inputs", "Step", "estimate"]


def __getattr__(name: str) -> Any:
    """``Inputs``, the trace's type of one forward's arguments, imported with torch on first use."""
    if name == "Inputs":
        from memguard.estimation.trace import Inputs

        return Inputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger(__name__)


def estimate(
    model: Any,
    batch_size: int | None = None,
    seq_len: int | None = None,
    *,
    example_input: Any = None,
    optimizer: Any = "adamw",
    precision: Any = "32-true",
    gradient_checkpointing: bool | None = None,
    device: str | torch.device = "cuda",
    method: str = "auto",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    training_loop: str = "pytorch",
    step_fn: Callable[[Any], Any] | None = None,
    strategy: str | Strategy = "single",
    world_size: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    lora_rank: int | None = None,
    trace_timeout: float | None = DEFAULT_TIMEOUT,
    accumulate_grad_batches: int = 1,
    set_to_none: bool = True,
    keep_output: bool | None = None,
    quantization: str | None = None,
    double_quant: bool = False,
    skip_modules: list[str] | None = None,
    moe_routing: str | float = "balanced",
    decoder_seq_len: int | None = None,
    step: Step | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one steady-state training step.

    A pipeline: the arguments are checked before any work starts (the knobs once, as a
    :class:`Step`; the rest by :func:`_checked_loop`), the model is built or read
    (:func:`_resolved_model`) and its inputs planned (:func:`_plan_inputs`), one method runs
    (:func:`_by_method`), and the device's share and costs are added (:func:`_per_device`).

    Args:
        model: an ``nn.Module`` (real weights on any device, or built on the meta device), a
            transformers config, a ``config.json`` path or model directory, a preset name
            (``memguard.list_presets()``), or ``"package.module:factory"``.
        batch_size: samples per step. With ``example_input`` it overrides the example's first
            dimension; otherwise it defaults to 1.
        seq_len: tokens per sample for token models; defaults to the model's maximum where it has
            one (GPT-2 1024, BERT 512). For an encoder-decoder, the encoder's tokens; Whisper's
            encoder always sees 1500 positions (3000 mel frames through a stride-2 conv), which
            it takes by default.
        example_input: one batch as ``forward`` takes it: a tensor, a tuple (positional
            arguments) or a dict (keyword arguments) of tensors. Needed for models that are not
            transformers models.
        optimizer: ``"adamw"``, ``"adam"``, ``"adamw-8bit"`` (bitsandbytes' block-wise 8-bit
            AdamW), ``"sgd"``, ``"sgd-momentum"``, ``"adafactor"``, ``"none"``, a
            ``torch.optim.Optimizer`` class, or a callable ``params -> optimizer``.
        precision: Lightning's names: ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``,
            ``"16-true"``, ``"bf16-true"``.
        gradient_checkpointing: ``None`` reads it from the model (transformers'
            ``is_gradient_checkpointing``); ``True``/``False`` overrides.
        device: where training will run, ``"cuda"`` or ``"cpu"``. ``"cuda"`` reflects what a GPU
            does (fused attention, foreach optimizers, 512-byte allocator blocks, CUDA context)
            even when computed on a CPU-only build of torch.
        method: ``"trace"``, ``"formula"``, ``"seed"``, or ``"auto"`` (trace, else formula).
        loss_fn: ``loss_fn(output, batch) -> scalar``; needed only when the output is neither a
            scalar tensor nor has a ``.loss`` (a diffusers output's ``.sample`` gets diffusers'
            training loss, ``F.mse_loss(sample.float(), target)``, see :mod:`memguard.estimation.trace.record`).
        training_loop: ``"pytorch"`` (forward, backward, step, ``zero_grad``) or ``"lightning"``
            (``zero_grad`` runs after the next forward, so last step's gradients live through it).
        step_fn: ``step_fn(batch) -> loss or output`` replaces ``model(...)`` in the trace, e.g.
            ``lambda batch: lightning_module.training_step(batch, 0)``. It receives
            ``example_input`` whole (resized to ``batch_size``), which it then requires.
        strategy: ``"single"``, ``"ddp"``, ``"fsdp"``, ``"fsdp_shard_grad_op"``, ``"fsdp_hybrid"``,
            ``"deepspeed_stage_1"``/``2``/``3`` (a :class:`~memguard.estimation.parallel.Strategy`),
            or Lightning's strategy names. The estimate is
            per device; ``batch_size`` is the per-device batch. See :mod:`memguard.estimation.parallel`.
        world_size: data-parallel ranks.
        offload_optimizer: optimizer state and step in host memory (sharded strategies).
        offload_params: parameter shards in host memory (fully sharded strategies).
        lora_rank: fine-tune LoRA adapters of this rank on the frozen model (needs ``peft``; only
            for models memguard builds — wrap your own module with peft and pass it instead).
        accumulate_grad_batches: micro-batches per optimizer step. From the second on, each forward
            runs beside the gradients accumulated so far (in Lightning's loop, every one does).
        set_to_none: ``optimizer.zero_grad(set_to_none=...)``. ``False`` (torch's default before
            2.0) keeps zeroed gradients alive through every forward.
        keep_output: whether the loop holds the model's output until the next forward returns, as
            ``outputs = model(**batch); outputs.loss.backward()`` does (native PyTorch, Accelerate and
            Fabric loops): its logits and any key/value cache it returns (``use_cache=True``) then live
            through backward, the optimizer step and the next forward. ``True`` counts them at the peak
            (in full: the previous step's output is alive through the next forward, and the peak of
            most steps is at or before its end); ``False`` drops them before backward, as the
            transformers ``Trainer`` and Lightning do; ``None`` (not known, the default) estimates
            ``False`` and puts the output's bytes in the :attr:`~MemoryEstimate.band`, so the fit
            decision holds either way. Lightning's loop (``training_loop="lightning"``) drops it.
        decoder_seq_len: an encoder-decoder's decoder tokens per sample, the labels' length (T5,
            BART, Whisper). Default: ``seq_len`` for T5 and BART; for Whisper its decoder's
            ``max_target_positions`` (448), the longest labels it takes — an upper bound for
            transcripts padded to the longest of the batch. With ``example_input``, read from its
            ``labels`` (or ``decoder_input_ids``).
        trace_timeout: seconds the trace may run before it stops with a :class:`TraceError`
            (``"auto"`` then falls back to the formula); ``None`` for no limit.
        quantization: ``"nf4"``, ``"fp4"`` (bitsandbytes 4-bit) or ``"int8"`` (LLM.int8) base
            weights: every ``nn.Linear`` is stored so, as Lightning's ``BitsandbytesPrecision`` and
            transformers' ``BitsAndBytesConfig`` do (see :mod:`memguard.estimation.quantization`).
            ``None`` reads it from the model: bitsandbytes ``Linear4bit``/``Linear8bitLt`` layers,
            or a config's ``quantization_config``. A quantized base is frozen: on a model memguard
            builds, LoRA adapters of ``lora_rank`` (default 8, peft's) are trained over it (QLoRA).
        double_quant: quantize the 4-bit absmax again (``bnb_4bit_use_double_quant``; QLoRA's).
        skip_modules: names of ``nn.Linear`` modules left unquantized (``llm_int8_skip_modules``,
            matched as transformers matches them); ``None`` keeps transformers' default, the output
            head; ``[]`` quantizes every linear layer, as Lightning's plugin does.
        moe_routing: how a mixture-of-experts router spreads the tokens: ``"balanced"``
            (``top_k * tokens / num_experts`` per expert), ``"worst"`` (every token on the same
            ``top_k`` experts), or a capacity factor >= 1 (each expert takes at most that many
            times its balanced share, as in Switch Transformer). See
            :mod:`memguard.estimation.stand_ins`.
        step: the knobs above as one :class:`Step` (``estimate(model, step=Step(batch_size=8, ...))``);
            keyword arguments not left at their defaults replace its values.

    The trace runs ``model``'s own ``forward`` (or ``step_fn``) on fake tensors. For a module,
    factory, ``step_fn`` or ``loss_fn`` of the user's, it runs in a forked child process that sends
    back only the numbers (:mod:`memguard.estimation.sandbox`): whatever that code caches, appends,
    counts, steps or draws stays in the child, and the child is killed after ``trace_timeout``
    seconds; :func:`memguard.is_tracing` is true there, for code with effects outside the process
    (files) to skip. Where fork is not available, the trace runs in process, with every module
    holding a private copy of its state (:mod:`memguard.estimation.trace.isolation`). A model memguard
    builds from a preset or config is nobody else's, and is traced in process.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ConfigError: for a bad argument, naming it.
        MemguardError: when no method can estimate this model.
    """
    knobs = {name: value for name, value in locals().items() if name in KNOBS}
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    step = _step_of(step, knobs)
    trace_timeout = _checked_loop(trace_timeout, loss_fn, step_fn, example_input)
    parallel = step.layout
    spec, master_weights = _deepspeed_precision(step.spec, parallel)
    described = _described(model, step, method, example_input, loss_fn, step_fn)
    if described is not None:
        return _estimate_described(described, step, spec, parallel, master_weights=master_weights)
    resolved, quant, lora_rank, quant_notes = _resolved_model(model, step)
    spec, make_inputs = _plan_inputs(resolved, spec, example_input, whole=step_fn is not None)
    if spec.gradient_checkpointing is None:
        spec = spec.replace(gradient_checkpointing=is_checkpointing(resolved.module))

    found = _by_method(Method(method), resolved, spec, parallel, make_inputs, loss_fn=loss_fn,
                       training_loop=step.training_loop, step_fn=step_fn, trace_timeout=trace_timeout,
                       accumulate=step.accumulate_grad_batches, set_to_none=step.set_to_none)
    return _estimate_of(found, resolved, step, spec, parallel, method=method, master_weights=master_weights,
                        lora_rank=lora_rank, quant=quant, quant_notes=quant_notes)


def _estimate_of(found: _Found, model: ResolvedModel | ModelDescription, step: Step, spec: TrainingSpec,
                 parallel: Parallelism, *, method: str, master_weights: bool = False, lora_rank: int | None = None,
                 quant: Quantization | None = None, quant_notes: list[str] | None = None) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of what one method found: the device's share and costs added
    (:func:`_per_device`), the inputs as settled; the model's output counted where the loop keeps it."""
    found = _kept_output(found, step.keep_output)
    breakdown, host, context, notes = _per_device(found, model, spec, parallel, master_weights=master_weights)
    settled = {"batch_size": spec.batch_size, "seq_len": spec.seq_len, "decoder_seq_len": spec.decoder_seq_len,
               "gradient_checkpointing": spec.gradient_checkpointing, "lora_rank": lora_rank,
               **({} if quant is None else quant.to_dict())}
    inputs = step.inputs(model.name, method, **settled)
    return MemoryEstimate(method=found.method, breakdown=breakdown, inputs=inputs,
                          notes=(*(quant_notes or ()), *notes), host_bytes=host, context_bytes=context,
                          at_peak=found.at_peak, timeline=found.timeline, stand_ins=found.stand_ins,
                          band=_band(found, spec, parallel, step.keep_output))


def _described(model: Any, step: Step, method: str, example_input: Any, loss_fn: Any,
               step_fn: Any) -> ModelDescription | None:
    """The shipped description of a preset that the formula estimates as memguard builds it (no example, loss or
    step of the user's; on any strategy; with LoRA, over a quantized base too, where the description says where
    adapters go and what is quantized: :func:`_estimate_described` derives them), else ``None``: that model
    is built (:func:`_resolved_model`). The description is the meta model's, read once and pinned by the
    tests (:mod:`memguard.estimation.description`), so the answer is the same without torch."""
    if method != Method.FORMULA or example_input is not None or loss_fn is not None or step_fn is not None:
        return None
    desc = described_preset(model)
    if desc is None or (step.lora_rank is not None and desc.lora is None):
        return None
    return None if step.quant is not None and not quantizable(desc, step.quant) else desc


def runs_without_torch(model: Any, **kwargs: Any) -> bool:
    """Whether ``estimate(model, **kwargs)`` runs on a preset's shipped description, so without torch
    (:func:`_described`); ``False`` for arguments :class:`Step` refuses (the estimate raises then).
    The CLI asks, to import torch up front only where the estimate will need it."""
    try:
        step = Step(**{name: value for name, value in kwargs.items() if name in KNOBS})
    except MemguardError:
        return False
    return _described(model, step, kwargs.get("method", "auto"), kwargs.get("example_input"),
                      kwargs.get("loss_fn"), kwargs.get("step_fn")) is not None


def _estimate_described(desc: ModelDescription, step: Step, spec: TrainingSpec,
                        parallel: Parallelism, *, master_weights: bool = False) -> MemoryEstimate:
    """:func:`estimate` by the formula from a preset's description, as from its module: the same adapters
    (:func:`~memguard.estimation.description.with_lora`), the same settling of the inputs (:func:`_settled`),
    the same formula, the same device costs."""
    rank, notes = step.lora_rank, []
    if step.quant is not None:  # QLoRA: adapters of peft's default rank over a quantized base (_resolved_model)
        rank = DEFAULT_QLORA_RANK if rank is None else rank
        desc, notes = with_quantized_base(desc, rank, step.quant)
    elif rank is not None:
        desc = with_lora(desc, rank)
    spec = _settled(spec, desc.task, desc.config, desc.config, desc.name, desc.class_name)
    if spec.gradient_checkpointing is None:
        spec = spec.replace(gradient_checkpointing=desc.checkpointing)
    loop = _formula_loop(step.training_loop, step.accumulate_grad_batches, step.set_to_none)
    found = _by_formula(desc, spec, loop, parallel)
    return _estimate_of(found, desc, step, spec, parallel, method=Method.FORMULA.value, master_weights=master_weights,
                        lora_rank=rank, quant=step.quant, quant_notes=notes)


def _step_of(step: Step | None, knobs: dict[str, Any]) -> Step:
    """The :class:`Step` of :func:`estimate`'s keyword arguments, or ``step`` with those of them not
    left at their defaults in place of its own."""
    if step is None:
        return Step(**knobs)
    if not isinstance(step, Step):
        raise ConfigError(f"step must be a memguard.Step, got {type(step).__name__} {step!r}")
    given = {k: v for k, v in knobs.items()
             if not (v is DEFAULTS[k] or (type(v) is type(DEFAULTS[k]) and v == DEFAULTS[k]))}
    return step.replace(**given) if given else step


def _checked_loop(trace_timeout: Any, loss_fn: Any, step_fn: Any, example_input: Any) -> float | None:
    """Check what the loop runs beside the :class:`Step`; the trace's timeout, normalised."""
    timeout = check_timeout(trace_timeout)
    for name, fn in (("loss_fn", loss_fn), ("step_fn", step_fn)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be callable, got {fn!r}")
    if step_fn is not None and example_input is None:
        raise ConfigError("step_fn needs example_input: the batch it is called with")
    return timeout


def _resolved_model(model: Any, step: Step) -> tuple[ResolvedModel, Quantization | None, int | None, list[str]]:
    """The model to estimate, with LoRA adapters and quantized linear layers as ``step`` asks; its
    quantization, LoRA rank (QLoRA's default over a quantized base memguard builds) and notes."""
    from memguard.estimation.quantization import detect_quantization
    from memguard.estimation.shallow import finished, where_it_pays

    lora_rank = step.lora_rank
    resolved = load_model(model)
    quant = step.quant or detect_quantization(resolved.module, resolved.config)
    if quant is not None and lora_rank is None and resolved.built_here:
        lora_rank = DEFAULT_QLORA_RANK
    # A deep model memguard builds is traced by depth (its 1-4-block steps, the same estimate to the byte),
    # where that costs less than its whole step; a plan's model comes with its own (``private``).
    depth = None
    if resolved.built_here and resolved.depth is None:
        depth = where_it_pays(resolved, functools.partial(finished, rank=lora_rank, quant=quant))
    if lora_rank is not None:
        resolved = add_lora(resolved, lora_rank)
    quant_notes: list[str] = []
    if quant is not None:
        resolved, quant_notes = _quantize(resolved, quant)
    if depth is not None:
        resolved = dataclasses.replace(resolved, depth=depth)
    return resolved, quant, lora_rank, quant_notes


def _per_device(found: _Found, resolved: ResolvedModel | ModelDescription, spec: TrainingSpec,
                parallel: Parallelism, *, master_weights: bool) -> tuple[dict[Category, int], int, int, list[str]]:
    """What one device holds: the method's breakdown with the strategy's share and buffers
    (:func:`_distribute`) and the device's overhead; the host bytes, the CUDA context and notes."""
    breakdown, notes = dict(found.breakdown), [*found.notes, *_paged_notes(resolved, spec)]
    host = 0
    if found.method is not Method.SEED and parallel.strategy is not Strategy.SINGLE:
        breakdown, host, more = _distribute(breakdown, parallel, resolved, spec, master_weights=master_weights)
        notes.extend(more)
    peak = sum(v for k, v in breakdown.items() if k != Category.OVERHEAD)
    context = 0
    if found.method is not Method.SEED:
        breakdown[Category.OVERHEAD], context = device_overhead(spec.device, peak, found.slack)
    return breakdown, host, context, notes


KEPT_OUTPUT = "the model's output, if the loop keeps it (outputs = model(**batch)): keep_output, --[no-]keep-output"
"""The band's item for the output a loop may keep (``keep_output=None``)."""


def _kept_output(found: _Found, keep_output: bool | None) -> _Found:
    """``found`` with the model's output counted as activations at the peak when the loop keeps it."""
    if not keep_output or not found.output_bytes:
        return found
    breakdown = dict(found.breakdown)
    breakdown[Category.ACTIVATIONS] = breakdown.get(Category.ACTIVATIONS, 0) + found.output_bytes
    note = (f"the loop keeps the model's output (keep_output=True): its {found.output_bytes:,} bytes (logits, "
            "returned key/value cache) are counted at the peak, where the previous step's output is still alive")
    return dataclasses.replace(found, breakdown=breakdown, notes=[*found.notes, note])


def _band(found: _Found, spec: TrainingSpec, parallel: Parallelism, keep_output: bool | None) -> dict[str, int]:
    """The estimate's band: what the trace saw but cannot size; the formula sees no kernel, so only the
    cuBLAS workspace of autograd's thread (:meth:`memguard.estimation.cuda_rules.Workspaces.band`).
    Where the loop may keep the model's output (``keep_output=None``), the output's bytes
    (:data:`KEPT_OUTPUT`).
    On a GPU with more than one rank, NCCL's buffers
    (:func:`~memguard.estimation.cuda_rules.communication_band`; two communicators under hybrid
    sharding across nodes). Data-dependent ops that ran on stand-in ones are listed at 0 bytes: their
    size is not known, and :attr:`MemoryEstimate.uncertain` says so."""
    from memguard.estimation.band import communication_band, cublas_band

    band = dict(found.band)
    if found.method is Method.FORMULA and spec.device == "cuda":
        band = cublas_band()  # what Workspaces().band() holds without a traced kernel
    if spec.device == "cuda" and found.method is not Method.SEED:
        across_nodes = parallel.strategy is Strategy.FSDP_HYBRID and parallel.world_size > parallel.shard_size
        band.update(communication_band(parallel.world_size, 2 if across_nodes else 1))
    if keep_output is None and found.output_bytes:
        band[KEPT_OUTPUT] = found.output_bytes
    if not found.stand_ins:  # only a trace has stand-ins, and torch then
        return band
    from memguard.estimation.stand_ins import ONES

    guessed = sorted(op for op, how in found.stand_ins.items() if how == ONES)
    if guessed:
        band[f"data-dependent {', '.join(guessed)} on stand-in values (size not known)"] = 0
    return band


DEFAULT_QLORA_RANK = 8
"""LoRA rank over a quantized base when none is given: peft's ``LoraConfig`` default ``r``."""


def _quantize(resolved: ResolvedModel, quant: Quantization) -> tuple[ResolvedModel, list[str]]:
    """``resolved`` with its linear layers quantized (in place only for a model memguard built), and a note."""
    import torch

    from memguard.estimation.quantization import quantize_model, quantized_layers

    module, n = quantize_model(resolved.module, quant, in_place=resolved.built_here)
    if n == 0 and not quantized_layers(module):
        raise ConfigError(f"quantization={quant.kind.value!r}, but {resolved.name} has no nn.Linear layer to quantize "
                          "(skip_modules may name them all)")
    layers = quantized_layers(module)
    stored = sum(p.numel() * p.element_size() for m in layers for p in (*m.parameters(), *m.buffers())
                 if p.dtype in (torch.uint8, torch.int8, torch.int32) and p is not getattr(m, "dynamic_code", None))
    weights = sum(m.in_features * m.out_features for m in layers)
    note = quantized_note(quant, len(layers), weights, stored)
    name = f"{resolved.name}+{quant.kind}{'-dq' * quant.double_quant}"
    # A depth that came with the model (a plan's, whose module arrives quantized: n == 0) builds its few blocks
    # quantized already; where this call quantized the layers, the few blocks would not be: trace the whole model.
    depth = resolved.depth if n == 0 else None
    return dataclasses.replace(resolved, module=module, name=name, depth=depth), [note]


def _paged_notes(model: ResolvedModel | ModelDescription, spec: TrainingSpec) -> list[str]:
    """What of a paged optimizer's state ``torch.cuda.max_memory_allocated()`` does not see."""
    if not spec.optimizer.paged:
        return []
    from memguard.estimation.formula.model_state import paged_state_bytes

    paged = paged_state_bytes(_inventory_of(model), spec)
    if paged == 0:
        return [f"{spec.optimizer.name}: no trainable parameter has 100,000 elements or more, so bitsandbytes pages "
                "none of its state (Optimizer8bit.get_state_buffer): all of it is ordinary CUDA memory, which "
                "torch.cuda.max_memory_allocated() counts"]
    return [f"{spec.optimizer.name}: {paged:,} bytes of its state are in CUDA managed memory (bitsandbytes "
            "get_paged, cudaMallocManaged, for parameters of 100,000 elements or more): torch.cuda."
            "max_memory_allocated() and memory_reserved() do not count them, nvidia-smi does while they are "
            "resident; they are counted here as resident, and under memory pressure the driver pages them out "
            "to host memory instead of failing"]


def _inventory_of(model: ResolvedModel | ModelDescription) -> Inventory:
    """The parameters of ``model`` as the formula reads them."""
    if isinstance(model, ModelDescription):
        return model.inventory
    from memguard.estimation.formula.inventory import inventory

    return inventory(model.module)


@dataclasses.dataclass(frozen=True)
class _Found:
    """What one method found: its breakdown and notes; the trace adds the allocator's slack (``None``
    for the others: the overhead module then takes its share), the tensors at the peak and the timeline."""

    method: Method
    breakdown: dict[Category, int]
    notes: list[str]
    slack: int | None = None
    at_peak: tuple[PeakTensors, ...] = ()
    timeline: tuple[tuple[int, str, int], ...] = ()
    stand_ins: dict[str, str] = dataclasses.field(default_factory=dict)
    band: dict[str, int] = dataclasses.field(default_factory=dict)
    output_bytes: int = 0
    """What the model's output holds (:func:`memguard.estimation.formula.phases.output_bytes`, or the
    trace's :attr:`~memguard.estimation.trace.TraceResult.output_bytes`)."""


def _by_method(method: Method, resolved: ResolvedModel, spec: TrainingSpec, parallel: Parallelism,
               make_inputs: Callable[[], Inputs], *, loss_fn: Any, training_loop: str, step_fn: Any,
               trace_timeout: float | None, accumulate: int, set_to_none: bool) -> _Found:
    """Run ``method``; under ``"auto"`` a trace that fails falls back to the formula, saying why."""
    formula_loop = _formula_loop(training_loop, accumulate, set_to_none)
    if method is Method.SEED:
        from memguard.estimation.seed import seed_breakdown

        breakdown, notes = seed_breakdown(resolved, spec)
        if parallel.strategy is not Strategy.SINGLE:
            notes = [*notes, f"the seed formula knows no strategy: {parallel.strategy} is ignored"]
        return _Found(Method.SEED, breakdown, notes)
    if method is Method.FORMULA:
        return _by_formula(resolved, spec, formula_loop, parallel)
    from memguard.estimation.parallel import wrapped_blocks
    from memguard.estimation.trace import trace_breakdown, warm_up
    from memguard.estimation.trace.depth import trace_by_depth
    from memguard.estimation.trace.record import Loop

    sharding: dict[str, Any] = {}
    if parallel.sharded:
        sharding["weight"] = parallel.weight
    if parallel.fully_sharded:
        sharding["extras"] = parallel.phase_extras(resolved.module, device=spec.device,
                                                   bytes_per_element=_element_bytes(spec))
        sharding["blocks"] = wrapped_blocks(resolved.module)

    def trace() -> TraceResult:
        if resolved.depth is not None and step_fn is None and loss_fn is None:
            loop = Loop(make_inputs, None, training_loop, None, 1, accumulate, set_to_none)
            found = trace_by_depth(resolved.depth, spec, loop, wrapped_blocks, mark_blocks="blocks" in sharding,
                                   weight=sharding.get("weight"), extras=sharding.get("extras"),
                                   timeout=trace_timeout)
            if found is not None:
                return found
        return trace_breakdown(resolved.module, spec, make_inputs, loss_fn=loss_fn, training_loop=training_loop,
                               step_fn=step_fn, timeout=trace_timeout, accumulate=accumulate,
                               set_to_none=set_to_none, **sharding)

    # User code (a module, factory, step or loss of the user's) runs in a forked child; a model memguard
    # built from a preset or config here (or a plan's copy of one, ``private``) is nobody else's, and runs here.
    user_code = not (resolved.built_here or resolved.private) or step_fn is not None or loss_fn is not None
    try:
        if user_code and sandbox.forks() and not sandbox.in_child():
            warm_up()
        traced = sandbox.run(trace, timeout=trace_timeout) if user_code else trace()
        return _Found(Method.TRACE, traced.breakdown, traced.notes, traced.slack, traced.at_peak, traced.timeline,
                      traced.stand_ins, traced.band, traced.output_bytes)
    except ConfigError:
        raise  # a bad argument is no reason to try another method
    except MemguardError as exc:
        if method is Method.TRACE:
            raise
        log.warning("trace failed (%s); falling back to the formula", exc)
        try:
            found = _by_formula(resolved, spec, formula_loop, parallel)
        except MemguardError as formula_exc:
            raise type(formula_exc)(f"neither method can estimate {resolved.name}: the trace failed ({exc}), "
                                    f"and the formula too ({formula_exc})") from exc
        return dataclasses.replace(found, notes=[f"trace failed ({exc}); formula used instead", *found.notes])


def _formula_loop(training_loop: str, accumulate: int, set_to_none: bool) -> str:
    """The loop as the formula knows it: only whether gradients live through the forward (Lightning's loop,
    accumulation past the first micro-batch, ``set_to_none=False``)."""
    return "lightning" if accumulate > 1 or not set_to_none else training_loop


def _distribute(breakdown: dict[Category, int], parallel: Parallelism, resolved: ResolvedModel | ModelDescription,
                spec: TrainingSpec, *, master_weights: bool = False,
                ) -> tuple[dict[Category, int], int, list[str]]:
    """Add the strategy's buffers to a per-device breakdown, and DeepSpeed's master weights.

    Both the trace (allocation by allocation) and the formula (moment by moment,
    :func:`memguard.estimation.formula.phases.shard_phases`) come already weighted by the share a
    rank keeps, full sharding's gathered units included.
    With ``master_weights`` (DeepSpeed's mixed precision, see :func:`_deepspeed_precision`) the
    optimizer state is DeepSpeed's: an fp32 master copy of each trainable parameter plus the
    optimizer's state over it, in fp32, sharded as optimizer state.

    What it reads of the model (its parameters' elements, the trainable ones', the optimizer state by
    :func:`~memguard.estimation.formula.model_state.model_state`, the one source of the state's size,
    and FSDP's units) comes from its inventory, so a preset's description serves as its module does.
    """
    from memguard.estimation.formula.model_state import model_state

    inv = _inventory_of(resolved)
    element = _element_bytes(spec)
    trainable_numel = inv.trainable_numel
    trainable = trainable_numel * element
    states = model_state(inv, spec).optimizer_state
    notes = []
    if master_weights:
        fp32_states = model_state(inv, spec.replace(precision=resolve_precision("32-true"))).optimizer_state
        states = fp32_states + 4 * trainable_numel
        breakdown[Category.OPTIMIZER_STATE] = int(states * parallel.factors()[Category.OPTIMIZER_STATE])
        # str(torch.bfloat16) == "torch.bfloat16", without importing torch
        notes.append(f"{parallel.strategy} with mixed precision: the module in torch.{spec.precision.param}, its "
                     "optimizer over fp32 master weights (DeepSpeed's fp16/bf16 modes; 2 + 2 + 12 bytes per "
                     "parameter for Adam, ZeRO paper)")
    full = {Category.PARAMETERS: sum(inv.numel) * element, Category.OPTIMIZER_STATE: states}
    if not parallel.fully_sharded:  # both methods added those phase by phase
        units = Units.of_inventory(inv) if isinstance(resolved, ModelDescription) else resolved.module
        for cat, extra in parallel.extras(units, bytes_per_element=element, trainable_bytes=trainable).items():
            breakdown[cat] = breakdown.get(cat, 0) + extra
    if parallel.sharded:
        notes.append(f"{parallel.strategy} over {parallel.shard_size} ranks: model state per device as in ZeRO "
                     "(Rajbhandari et al. 2020), with gathered units and buckets added")
    return breakdown, parallel.host_bytes(full), notes


def _deepspeed_precision(spec: TrainingSpec, parallel: Parallelism) -> tuple[TrainingSpec, bool]:
    """The precision DeepSpeed trains in, and whether its optimizer keeps fp32 master weights.

    Under a DeepSpeed strategy, Lightning's ``16-mixed``/``bf16-mixed`` turn on DeepSpeed's
    ``fp16``/``bf16`` mode (``DeepSpeedPrecision`` in Lightning, ``_format_precision_config`` of
    its ``DeepSpeedStrategy``): DeepSpeed casts the module to 16-bit (so parameters, gradients and
    activations are 16-bit, with no autocast), and its ZeRO optimizer keeps fp32 master partitions
    (``deepspeed/runtime/zero/stage_1_and_2.py``, ``single_partition_of_fp32_groups``;
    ``bf16_optimizer.py``). Under torch AMP (DDP, FSDP) parameters and gradients stay fp32.
    """
    if not parallel.strategy.is_deepspeed or spec.precision.autocast is None:
        return spec, False
    low = "bf16-true" if spec.precision.autocast == "bfloat16" else "16-true"
    return spec.replace(precision=resolve_precision(low)), True


def _element_bytes(spec: TrainingSpec) -> int:
    """Bytes of one element of the parameters as training keeps them."""
    return spec.precision.param_bytes  # every precision keeps floating-point parameters


def _by_formula(model: ResolvedModel | ModelDescription, spec: TrainingSpec, training_loop: str,
                parallel: Parallelism) -> _Found:
    """What the formula finds: its breakdown, each moment of the step weighted per device as the trace
    weights it, its notes, and what the model's output holds."""
    from memguard.estimation.formula.phases import formula_breakdown, output_bytes

    breakdown, notes = formula_breakdown(model, spec, training_loop=training_loop, parallel=parallel)
    return _Found(Method.FORMULA, breakdown, notes, output_bytes=output_bytes(model, spec))


def _plan_inputs(resolved: ResolvedModel, spec: TrainingSpec, example_input: Any,
                 whole: bool = False) -> tuple[TrainingSpec, Callable[[], Inputs]]:
    """Settle batch size and sequence length, and return a builder of the forward's arguments.

    The builder is called under the trace's fake-tensor mode, so the tensors it makes there cost
    nothing.
    """
    module = resolved.module
    task = model_task(module)
    audio = audio_positions(resolved.config) if task is TaskKind.SEQ2SEQ else None
    if example_input is not None:
        spec, build_example = _plan_example(spec, example_input, whole)
        if audio is not None:  # the lengths of a Whisper batch are its encoder's and its labels'
            spec = spec.replace(seq_len=audio)
        return spec, build_example
    import torch

    spec = _settled(spec, task, resolved.config, getattr(module, "config", None), resolved.name, type(module).__name__)
    # Pixels come in the weights' dtype, or fp32 under autocast (which casts them itself).
    dtype = torch.float32 if spec.precision.autocast is not None else spec.precision.param_dtype
    batch_size, seq_len, dec_len = spec.batch_size, spec.seq_len, spec.decoder_seq_len

    def build() -> Inputs:
        return (), make_batch(module, batch_size, seq_len, dtype=dtype, decoder_seq_len=dec_len)

    return spec, build


def _settled(spec: TrainingSpec, task: TaskKind, config: Any, batch_config: Any, name: str,
             class_name: str) -> TrainingSpec:
    """``spec`` with the batch size, sequence length and decoder length a ``task`` model of ``config``
    takes without an example; ``batch_config`` is its module's config, which builds the batch
    (:func:`~memguard.estimation.inputs.check_batch`), checked now, so a bad seq_len fails before any
    tracing starts."""
    audio = audio_positions(config) if task is TaskKind.SEQ2SEQ else None
    batch_size = spec.batch_size or 1
    seq_len = spec.seq_len
    if audio is not None:
        if seq_len not in (None, audio):
            raise ConfigError(
                f"seq_len={seq_len}: {name}'s encoder always sees {audio} positions ({2 * audio} mel "
                "frames through its stride-2 conv); leave seq_len out and give the labels' length as decoder_seq_len")
        seq_len = audio
    elif task.takes_pixels:
        seq_len = None
    elif task.takes_tokens and seq_len is None:
        seq_len = max_positions(config)
        if seq_len is None:
            raise ConfigError(f"seq_len is needed for {name} (it has no fixed maximum length)")
    dec_len = spec.decoder_seq_len
    if task is TaskKind.SEQ2SEQ:
        dec_len = decoder_length(config, seq_len, dec_len)
    elif dec_len is not None:
        raise ConfigError(f"decoder_seq_len={dec_len} is for encoder-decoder models; {name} has no decoder "
                          "with cross-attention: leave it out")
    check_batch(task, batch_config, class_name, batch_size, seq_len, dec_len)
    return spec.replace(batch_size=batch_size, seq_len=seq_len, decoder_seq_len=dec_len)


def _plan_example(spec: TrainingSpec, example: Any, whole: bool) -> tuple[TrainingSpec, Callable[[], Inputs]]:
    """Plan a forward on ``example`` (a batch as given), resized to ``spec.batch_size``.

    A tensor is the one positional argument, a tuple or list the positional arguments and a dict
    the keyword arguments; with ``whole`` the batch is passed as one argument, as it is to a
    ``training_step``. Every tensor whose first dimension is the example's batch size is resized.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_map_only

    tensors = [t for t in tree_flatten(example)[0] if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ConfigError(f"example_input holds no tensor: {type(example).__name__}")
    if tensors[0].dim() == 0:
        raise ConfigError("the first tensor of example_input must have a batch dimension")
    given = tensors[0].shape[0]
    batch_size = spec.batch_size or given
    seq_len, dec_len = spec.seq_len, spec.decoder_seq_len
    named = example if isinstance(example, dict) else {}
    lead = named.get("input_ids", tensors[0])
    # (batch, tokens) or (batch, tokens, features); never Whisper's (batch, mel bins, frames)
    if seq_len is None and "input_features" not in named and lead.dim() in (2, 3):
        seq_len = lead.shape[1]
    labels = named.get("labels", named.get("decoder_input_ids"))
    if dec_len is None and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        dec_len = labels.shape[1]

    def resize(t: torch.Tensor) -> torch.Tensor:
        shape = (batch_size, *t.shape[1:]) if t.dim() > 0 and t.shape[0] == given else t.shape
        return torch.empty(shape, dtype=t.dtype)

    def build() -> Inputs:
        batch = tree_map_only(torch.Tensor, resize, example)
        if whole:
            return (batch,), {}
        if isinstance(batch, torch.Tensor):
            return (batch,), {}
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
        if isinstance(batch, dict):
            return (), dict(batch)
        raise ConfigError(
            f"example_input must be a tensor, a tuple or a dict of tensors, got {type(example).__name__}"
        )

    if not whole and not isinstance(example, (torch.Tensor, tuple, list, dict)):
        raise ConfigError(
            f"example_input must be a tensor, a tuple or a dict of tensors, got {type(example).__name__}"
        )
    return spec.replace(batch_size=batch_size, seq_len=seq_len, decoder_seq_len=dec_len), build


