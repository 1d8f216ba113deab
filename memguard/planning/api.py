"""The entry points :func:`plan` and :func:`remedies`, and the checks of their arguments."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from memguard.device import DeviceMemory, DeviceSpec, memory_of
from memguard.device.catalog import bf16_problem
from memguard.errors import ConfigError, MemguardError
from memguard.estimation.description import ModelDescription, described_preset
from memguard.estimation.estimator import DEFAULT_QLORA_RANK
from memguard.estimation.models import ResolvedModel, add_lora, load_model, lora_rank_limit
from memguard.estimation.parallel import world_size_of
from memguard.estimation.result import MemoryEstimate, Method
from memguard.estimation.spec import OPTIMIZERS as NAMED_OPTIMIZERS
from memguard.estimation.spec import positive_int, resolve_optimizer, resolve_precision
from memguard.estimation.step import Step
from memguard.fit import check_margin
from memguard.planning.costs import COST_MODEL, cost_of
from memguard.planning.rows import FULL, LORA, OPTIMIZER_NAMES, QLORA, SEARCHED_KNOBS, Knobs, Plan, PlanRow
from memguard.planning.search import Setup, memo_key, plan_rows, run_search

__all__ = ["GUARD_ESTIMATES", "guard_remedies", "plan", "remedies"]

log = logging.getLogger(__name__)

GUARD_ESTIMATES = 16
"""Estimates a guard spends on what would fit: a user's module is searched with traces, seconds each."""

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit", "adafactor", "sgd")
LORA_RANKS = (8, 16, 64)
_EXTRA_KEYS = ("example_input", "loss_fn", "step_fn", "training_loop", "set_to_none", "keep_output", "trace_timeout",
               "moe_routing", "decoder_seq_len")
_BASE_KEYS = SEARCHED_KNOBS


def plan(model: Any, *, gpu: DeviceMemory | str | int, seq_len: int | None = None, gpus: int | None = None,
         batch_size: int | None = None, margin: float = 0.1, precision: str | Sequence[str] | None = None,
         optimizers: Sequence[str] | None = None, base: Mapping[str, Any] | None = None,
         lora_ranks: Sequence[int] = LORA_RANKS, method_prune: str = "formula", confirm: int | None = None,
         limit: int = 10, device: str = "cuda", max_estimates: int = 3000,
         estimate_kwargs: Mapping[str, Any] | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
    """The configurations of a training run that fit a GPU, cheapest first by :data:`COST_MODEL`.

    Args:
        model: what :func:`memguard.estimate` takes; LoRA is planned for models memguard builds.
        gpu: a :class:`DeviceMemory`, what :func:`memguard.device_memory` takes (``"A100-80GB"``,
            ``"24GiB"``, ``"cuda:0"``) or ``"auto"``, or the free bytes as an ``int``.
        seq_len: tokens per sample (default: the model's maximum).
        gpus: the GPUs you own (default: ``base``'s world size): strategies are searched on 1 to
            ``gpus`` of them, each taking its share of the effective batch, and rows on different
            counts are listed side by side. World sizes that do not divide the effective batch are
            skipped: they would change it.
        batch_size: the per-device micro-batch the user runs (``memguard check --batch-size``).
            The effective batch, ``batch_size x accumulate_grad_batches x world_size``, is what
            every row keeps: with more GPUs each one takes fewer samples. No row uses a larger
            micro-batch than this.
        margin: share of the free memory to keep spare, as in :meth:`MemoryEstimate.fits`.
        precision: the precisions searched (one or several); ``None``: 32-true, bf16-mixed,
            16-mixed, bf16-true and the user's (no bf16 on GPUs before Ampere).
        optimizers: the optimizers searched; ``None``: AdamW, 8-bit AdamW, Adafactor, SGD and the
            user's (the LoRA group keeps the user's: adapters' state is small).
        base: the user's settings by :func:`memguard.estimate`'s names (``precision``,
            ``optimizer``, ``gradient_checkpointing``, ``strategy``, ``world_size``,
            ``offload_optimizer``, ``offload_params``, ``lora_rank``, ``accumulate_grad_batches``,
            ``batch_size``); rows say what they change from it and are charged for that.
        lora_ranks: the ranks of the LoRA group, when ``base`` is not LoRA already.
        method_prune: ``"formula"`` (the trace when the formula cannot estimate the model) or ``"trace"``.
        confirm: rows of each group confirmed with the trace (``None``, the default: every row
            shown); one it finds too large gives way to the next candidate, and a configuration the
            formula rejects by less than 10% of the usable memory is a candidate the trace decides.
            ``0``: the formula alone.
        limit: rows kept per group; max_estimates: a bound on the search's estimates.
        device: ``"cuda"`` or ``"cpu"``, as in :func:`memguard.estimate`.
        estimate_kwargs: passed to every estimate: ``example_input``, ``loss_fn``, ``step_fn``,
            ``training_loop``, ``set_to_none``, ``trace_timeout``.
        progress: called with a line of progress now and then (each trace, every 25 formula
            estimates); the library itself never prints.

    Raises:
        ConfigError: for a bad argument, naming it.
    """
    start = time.perf_counter()
    setup = make_setup(model, None, gpu=gpu, seq_len=seq_len, gpus=gpus, batch_size=batch_size, margin=margin,
                   precision=precision, optimizers=optimizers, base=base, lora_ranks=lora_ranks,
                   method_prune=method_prune, confirm=limit if confirm is None else confirm, limit=limit,
                   device=device, max_estimates=max_estimates, estimate_kwargs=estimate_kwargs)
    setup.progress = progress
    search, groups = run_search(setup, None)
    base_knobs = search.ctx.base
    pruned = search.cache[(memo_key(base_knobs), search.method)]
    if search.method is Method.FORMULA and (setup.confirm or (search.candidate(pruned) and not search.fits(pruned))):
        search.estimate(base_knobs, Method.TRACE)  # the number `memguard check` gives; a near miss's judge
    mine = search.cache.get((memo_key(base_knobs), Method.TRACE)) or pruned
    if search.fits(mine) and groups:  # the trace may fit what the formula did not: it leads then
        mine_group = QLORA if base_knobs.quantization else LORA if base_knobs.lora_rank else FULL
        groups[0] = [(mine_group, base_knobs, mine),
                     *(f for f in groups[0] if f[1] != base_knobs)]
    rows = plan_rows(search, groups)
    asked = {"settings": {**base_knobs.kwargs(), "seq_len": search.seq_len, "device": setup.device},
             "total_bytes": mine.total_bytes, "needed_bytes": search.needed(mine),
             "headroom_bytes": search.usable - search.needed(mine),
             "method": mine.method.value, "fits": search.fits(mine),
             "flags": base_knobs.flags(base_knobs, search.seq_len, setup.device, setup.margin,
                                       setup.extra.get("keep_output"))}
    return Plan(rows, COST_MODEL, asked, search.fits(mine), setup.name, setup.gpu, setup.margin, search.usable,
                search.ctx.effective, search.all_notes(), search.count,
                round(time.perf_counter() - start, 3), search.traced, len({k for k, _ in search.cache}))


def remedies(estimate: MemoryEstimate, free_bytes: int | str | DeviceMemory, margin: float = 0.1, *,
             top: int = 3, model: Any = None, gpus: int | None = None, confirm: int | None = None,
             base: Mapping[str, Any] | None = None, estimate_kwargs: Mapping[str, Any] | None = None,
             max_estimates: int = 3000) -> list[PlanRow]:
    """The best few changes that make ``estimate``'s run fit: only rows that fit, ``[]`` when none does.

    The one remedy engine of ``memguard check`` and the callback. Rows come in turn from each group
    (:meth:`Plan.best`), without the asked configuration; ``[]`` too when ``estimate`` fits.

    Args:
        estimate: what did not fit; its ``inputs`` are the user's settings.
        free_bytes: free memory: bytes, a size such as ``"24GiB"``, or a :class:`DeviceMemory`.
        margin: as in :meth:`MemoryEstimate.fits`; top: rows returned.
        model: the module estimated, when ``estimate.inputs["model"]`` is not a name memguard can
            build again (a user's module leaves only its class name there).
        gpus: GPUs the run may use (default: its world size, so no GPU it does not have).
        confirm: rows confirmed with the trace (default: ``top`` when ``estimate`` was traced).
        base: settings that replace those read from ``estimate.inputs``, e.g. ``{"optimizer":
            torch.optim.RMSprop}``: the inputs hold an optimizer class by its name only.
        estimate_kwargs: as in :func:`plan`: ``example_input``, ``step_fn`` ... of the run.
        max_estimates: a bound on the search's estimates (the callback keeps it small: a model the
            formula cannot estimate is searched with traces, seconds each). A search that reaches it
            without a row that fits raises a :class:`MemguardError` rather than say ``[]`` (none fits).

    Raises:
        ConfigError: when the model cannot be built again and ``model`` is not given, or the
            optimizer is not a name memguard knows and ``base`` does not give it; for a bad argument.
        MemguardError: when the search reaches ``max_estimates`` without a row that fits.
    """
    gpu = memory_of(free_bytes, training=estimate.inputs.get("device"))  # a share is of the estimate's device
    top = positive_int("top", top)
    if estimate.fits(gpu.free_bytes, margin):
        return []
    inputs, resolved = estimate.inputs, None
    if model is None:
        name = re.sub(r"(\+lora\d+|\+(nf4|fp4|int8)(-dq)?)+$", "", str(inputs.get("model")))
        try:
            model, resolved = name, None if _description_of(name, None, estimate_kwargs) else load_model(name)
        except ConfigError as exc:
            raise ConfigError(f"remedies() cannot build model {name!r} again ({exc}); pass model=, the module "
                              "that was estimated") from None
    traced = estimate.method is Method.TRACE
    setup = make_setup(model, resolved, gpu=gpu, seq_len=inputs.get("seq_len"), gpus=gpus, batch_size=None,
                   margin=margin, precision=None, optimizers=None,
                   base={**{k: inputs[k] for k in _BASE_KEYS if inputs.get(k) is not None}, **(base or {})},
                   lora_ranks=LORA_RANKS,
                   method_prune="formula", confirm=(top if traced else 0) if confirm is None else confirm,
                   limit=top + 2, device=inputs.get("device", "cuda"), max_estimates=max_estimates,
                   estimate_kwargs={**{k: inputs[k] for k in ("training_loop", "set_to_none", "keep_output",
                                                              "moe_routing") if k in inputs},
                                    **(estimate_kwargs or {})})
    search, groups = run_search(setup, estimate)
    ctx = search.ctx
    found = [sorted((f for f in g if f[1] != ctx.base), key=lambda f: (cost_of(f[1], ctx), f[2].total_bytes))
             for g in groups]
    turns = [f for tier in itertools.zip_longest(*found) for f in tier if f is not None]
    turns = search.confirm(turns, setup.confirm, top, ranked=False)
    rows = [search.row(*f) for f in turns[:top]]
    if not rows and search.count >= max_estimates:
        raise MemguardError(f"none of the {search.count} configurations estimated fits, and the search stopped "
                            f"there (max_estimates={max_estimates}): not a proof that nothing does")
    return rows


def make_setup(model: Any, resolved: ResolvedModel | None, *, gpu: Any, seq_len: Any, gpus: Any, batch_size: Any,
           margin: Any, precision: Any, optimizers: Any, base: Any, lora_ranks: Any, method_prune: Any,
           confirm: Any, limit: Any, device: Any, max_estimates: Any, estimate_kwargs: Any) -> Setup:
    """Check every argument of :func:`plan`, and build the model."""
    check_margin(margin)
    if method_prune not in ("formula", "trace"):
        raise ConfigError(f"method_prune must be 'formula' or 'trace', got {method_prune!r}")
    if isinstance(confirm, bool) or not isinstance(confirm, int) or confirm < 0:
        raise ConfigError(f"confirm must be a whole number of rows (0 for none), got {confirm!r}")
    extra = dict(estimate_kwargs or {})
    if set(extra) - set(_EXTRA_KEYS):
        raise ConfigError(f"estimate_kwargs takes {', '.join(_EXTRA_KEYS)}, not "
                          f"{', '.join(sorted(set(extra) - set(_EXTRA_KEYS)))}")
    knobs = _base_knobs(base, batch_size, precision)
    gpus = knobs.world_size if gpus is None else world_size_of("gpus", gpus)
    if gpus < knobs.world_size:
        raise ConfigError(f"gpus={gpus} is fewer than the run's world_size={knobs.world_size}; pass gpus >= it")
    memory, notes = memory_of(gpu, training=DeviceSpec.cuda()), []  # a share is of the CUDA device
    precisions = _choices("precision", precision, PRECISIONS, knobs.precision, lambda p: resolve_precision(p).name)
    if precision is None and bf16_problem(memory.name, "bf16-mixed"):  # the catalog's compute capability < 8.0
        precisions = tuple(p for p in precisions if not p.startswith("bf16") or p == knobs.precision)
        notes.append(f"{memory.name} has no bfloat16 arithmetic (compute capability below 8.0): no bf16 "
                     "precision is proposed")
    optimizers = _choices("optimizers", optimizers, OPTIMIZERS, knobs.optimizer, _optimizer_name)
    ranks = () if knobs.lora_rank else tuple(sorted({positive_int("lora_ranks", r) for r in lora_ranks}, reverse=True))
    limit, max_estimates = positive_int("limit", limit), positive_int("max_estimates", max_estimates)
    desc = _description_of(model, resolved, extra)
    if desc is None:
        resolved = resolved or load_model(model)
        modules, name, built_here = {None: resolved.module}, resolved.name, resolved.built_here
        rank_limit = lora_rank_limit(resolved)
    else:  # a preset memguard would build: the formula reads its description, a trace builds it
        modules, name, built_here, rank_limit = {}, desc.name, True, desc.lora.limit if desc.lora else None
    if knobs.lora_rank and not built_here:
        add_lora(resolved, knobs.lora_rank)  # raises the estimator's own ConfigError
    if ranks and not built_here:
        notes.append("LoRA is planned for models memguard builds (a preset, config or config.json); wrap your "
                     "module with peft.get_peft_model to plan it")
        ranks = ()
    if rank_limit is not None and any(r > rank_limit for r in ranks):
        notes.append(f"LoRA ranks above the hidden size of {name} ({rank_limit}) are not planned")
        ranks = tuple(r for r in ranks if r <= rank_limit)
    return Setup(model, modules, name, knobs, memory, float(margin), gpus, precisions, optimizers, ranks,
                 Method(method_prune), confirm, limit, device, seq_len, extra, max_estimates, notes,
                 built_here=built_here, description=desc)


def _description_of(model: Any, resolved: ResolvedModel | None, extra: Mapping[str, Any] | None,
                    ) -> ModelDescription | None:
    """The shipped description that stands for ``model`` in a plan (:attr:`Setup.description`): a preset named,
    not built yet, without code of the user's for its estimates, whose description says where LoRA goes
    (:class:`~memguard.estimation.description.LoraSites`: a plan searches LoRA); else ``None``."""
    if resolved is not None or any((extra or {}).get(k) is not None for k in ("example_input", "loss_fn", "step_fn")):
        return None
    desc = described_preset(model)
    return desc if desc is not None and desc.lora is not None else None


def _optimizer_name(optimizer: Any) -> Any:
    """A name (canonical) or a ``torch.optim.Optimizer`` class (as is); anything else is a ConfigError."""
    if not isinstance(optimizer, (str, type)):
        raise ConfigError(f"plan takes optimizers by name ({', '.join(OPTIMIZER_NAMES)}) or as a torch.optim.Optimizer "
                          f"class, got {optimizer!r}")
    spec = resolve_optimizer(optimizer)
    return spec.name if isinstance(optimizer, str) else optimizer


def _choices(what: str, given: Any, default: Sequence[str], mine: str, canon: Any) -> tuple[str, ...]:
    """The values searched: ``given`` (one or several) by canonical name, else ``default`` and the user's."""
    if given is None:
        return tuple(dict.fromkeys([mine, *default]))
    values = [given] if isinstance(given, str) else list(given)
    if not values:
        raise ConfigError(f"{what} must name at least one value, got {given!r}")
    return tuple(dict.fromkeys(canon(v) for v in values))


def _base_knobs(base: Any, batch_size: Any, precision: Any) -> Knobs:
    """The user's settings, every value checked; ``precision`` (one name) stands for an absent one."""
    if base is not None and not isinstance(base, Mapping):
        raise ConfigError(f"base must be a dict of estimate settings, got {type(base).__name__}")
    given = dict(base or {})
    unknown = sorted(set(given) - set(_BASE_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in base; expected {', '.join(_BASE_KEYS)}")
    if batch_size is not None and given.get("batch_size") not in (None, batch_size):
        raise ConfigError(f"batch_size={batch_size!r} and base['batch_size']={given['batch_size']!r} disagree")
    if isinstance(precision, str):
        given.setdefault("precision", precision)
    ckpt, rank = given.get("gradient_checkpointing") or False, given.get("lora_rank")
    if not isinstance(ckpt, bool):
        raise ConfigError(f"base['gradient_checkpointing'] must be True or False, got {ckpt!r}")
    world = positive_int("world_size", given.get("world_size") or 1)
    optimizer = _optimizer_name(given.get("optimizer") or "adamw")
    step = Step(precision=given.get("precision") or "32-true", optimizer=optimizer, gradient_checkpointing=ckpt,
                strategy=given.get("strategy") or ("ddp" if world > 1 else "single"), world_size=world,
                offload_optimizer=given.get("offload_optimizer", False),
                offload_params=given.get("offload_params", False), lora_rank=rank,
                batch_size=batch_size if batch_size is not None else given.get("batch_size") or 1,
                accumulate_grad_batches=given.get("accumulate_grad_batches") or 1,
                quantization=given.get("quantization"), double_quant=given.get("double_quant") or False)
    if step.quantization is not None and step.lora_rank is None:
        step = step.replace(lora_rank=DEFAULT_QLORA_RANK)  # what estimate() trains over a quantized base
    return Knobs.from_step(step)


def guard_remedies(estimate: MemoryEstimate, free_bytes: int, margin: float, *, model: Any, step: Step,
                   estimate_kwargs: Mapping[str, Any] | None = None) -> list[PlanRow] | None:
    """:func:`remedies` for a guard watching a real run (the Lightning, Trainer and Fabric guards), or
    ``None`` when the search fails: a guard says nothing rather than something wrong.

    Args:
        model: the module estimated.
        step: the guard's :class:`Step` of the run: its optimizer (a memguard name, an optimizer
            class, or a factory rebuilt from the run's optimizer, whose ``optimizer_class`` names its
            class), its loop, and its world size, the GPUs the rows may use.
        estimate_kwargs: the rest of the run's estimate: ``example_input``, ``step_fn``/``loss_fn``,
            ``trace_timeout``.
    """
    optimizer = getattr(step.optimizer, "optimizer_class", step.optimizer)
    name = optimizer.__name__.lower() if isinstance(optimizer, type) else optimizer
    try:
        return remedies(estimate, free_bytes, margin, model=model, gpus=step.world_size,
                        estimate_kwargs={**(estimate_kwargs or {}), "training_loop": step.training_loop,
                                         "keep_output": step.keep_output},
                        max_estimates=GUARD_ESTIMATES,
                        base={"optimizer": name if name in NAMED_OPTIMIZERS else optimizer})
    except MemguardError as exc:
        log.info("no remedies: %s", exc)
        return None
