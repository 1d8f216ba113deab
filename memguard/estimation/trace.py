"""The trace: run the real code of a training step on fake tensors and count its storage.

Under ``FakeTensorMode`` every tensor carries shape, dtype and device but no data, so the user's
own ``forward``, the loss, autograd's backward and the optimizer's ``step`` run exactly as they
would, while nothing is allocated. A ``TorchDispatchMode`` stacked on top sees every op's outputs;
each new storage is an allocation of ``nbytes`` (rounded as the device's allocator rounds), and a
``weakref.finalize`` on the storage marks its free. The high-water mark of that ledger is the peak
``torch.cuda.max_memory_allocated()`` would report (the approach of torch's ``MemTracker``, without
its module hooks, which makes it several times faster).

The steady state is reached cheaply: one optimizer step on zero gradients makes the optimizer's
state, then one forward, backward and step are traced. A real run's second step is the same, and
its first step never holds more (it lacks the state), so the peak equals that of two real steps.

Categories at the peak are assigned after the run, from what each storage turned out to be:
parameters and buffers, ``.grad`` of a parameter, a tensor in the optimizer's state, something
made during the forward and alive at its end (activations, with the batch), or anything else
(temporary).

What ``device="cuda"`` changes, since fake CUDA tensors cannot run autograd on a CPU-only build:
the trace runs on fake CPU tensors and applies the CUDA rules itself (:mod:`memguard.estimation.cuda_rules`)
— CUDA's autocast op lists, SDPA's backend choice and the CUDA attention ops' outputs and
backward buffers, the fused dropout kernel (a 1-byte mask); built-in optimizers run their
``foreach`` implementation, the CUDA default; allocations round up to 512 bytes, and the step's
allocations and frees are replayed through the caching allocator (:mod:`memguard.estimation.allocator`).

The user's modules are not copied: each holds a private copy of its state while the step runs
(:mod:`memguard.estimation._isolation`), and :func:`memguard.estimate` runs the whole trace in a
forked child (:mod:`memguard.estimation.sandbox`), so nothing of the trace stays behind; the trace
stops after ``timeout`` seconds.

Known limitations:
    * Values are unknown. ``.item()`` on computed data, and ops whose output shape depends on data
      (``nonzero``, ``masked_select``), run on invented values (:mod:`memguard.estimation.stand_ins`):
      a mixture-of-experts router's ``topk`` on the routing model (balanced unless
      ``spec.moe_routing`` says otherwise), anything else on stand-in tensors of ones. The result
      names each such op in :attr:`TraceResult.stand_ins`.
    * A ``GradScaler``'s own scalars are not traced (they are a few bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensorMode,
)
from torch.utils._pytree import tree_flatten

from memguard.errors import ConfigError, TraceError
from memguard.estimation._isolation import isolated, preserved_rng
from memguard.estimation.allocator import ledger_events, replay
from memguard.estimation.allocator_config import AllocatorConfig
from memguard.estimation.cuda_rules import device_autocast, device_kernels
from memguard.estimation.ledger import CountingMode, Ledger, Record
from memguard.estimation.models import is_checkpointing, set_checkpointing
from memguard.estimation.peak import Phase, analyse
from memguard.estimation.result import Category, PeakTensors
from memguard.estimation.spec import TrainingSpec, make_optimizer
from memguard.estimation.stand_ins import ONES, ROUTINGS, routing_name

__all__ = ["DEFAULT_TIMEOUT", "TraceResult", "check_timeout", "trace_breakdown", "warm_up"]

log = logging.getLogger(__name__)

def check_timeout(value: Any) -> float | None:
    """A ``trace_timeout``: a positive number of seconds, or ``None`` for no limit; else a
    :class:`ConfigError` naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value < math.inf):
        raise ConfigError(f"trace_timeout must be a positive number of seconds or None, got {value!r}")
    return None if value is None else float(value)


DEFAULT_TIMEOUT = 120.0
"""Seconds a trace may take before it stops with a :class:`TraceError`. Traces take seconds (GPT-2
small 1.4 s, Llama-2-7B 3 s on two CPU cores); a step that does not end in two minutes waits on
values a fake tensor does not have."""


def _loss_of(output: Any, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output, batch)
    elif isinstance(output, torch.Tensor):
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        loss = output["loss"]
    elif getattr(output, "last_hidden_state", None) is not None:
        loss = output.last_hidden_state.float().mean()
    elif isinstance(getattr(output, "sample", None), torch.Tensor):
        loss = _denoising_loss(output.sample)
    else:
        raise ConfigError(
            f"the model's output ({type(output).__name__}) is neither a scalar tensor nor has a .loss "
            "(or a diffusers .sample); "
            "pass loss_fn=lambda output, batch: ..."
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"the loss must be a scalar tensor, got {shape}; pass loss_fn= to reduce it")
    return loss


def _denoising_loss(sample: torch.Tensor) -> torch.Tensor:
    """The loss diffusers' training scripts put on a model's ``.sample`` (a UNet's or a diffusion
    transformer's prediction, a VAE's reconstruction): ``F.mse_loss(model_pred.float(),
    target.float(), reduction="mean")`` (``examples/text_to_image/train_text_to_image.py``).

    The target (the noise, or the image) is data the trace does not have; it is zeros here, an
    expanded scalar that holds no storage. The real target is the size of the sample, made before the
    forward in the user's loop: under ``example_input`` pass it in the batch and ``loss_fn`` to count it.
    """
    pred = sample.float()
    return torch.nn.functional.mse_loss(pred, torch.zeros((), dtype=pred.dtype).expand_as(pred))


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """What a trace found.

    Attributes:
        breakdown: bytes per category at the peak.
        notes: anything approximated, in words.
        slack: on CUDA, what the caching allocator reserves beyond its allocated peak, from
            replaying the step's allocations and frees in order (:func:`memguard.estimation.allocator.replay`).
        at_peak: tensors alive at the peak, by module and category (:func:`memguard.estimation.peak.analyse`).
        timeline: live bytes through the step.
        stand_ins: data-dependent ops whose values the trace invented, and how: the routing model
            (``"topk"``), or ``"ones"`` (:data:`memguard.estimation.stand_ins.ONES`) where nothing
            models them.
    """

    breakdown: dict[Category, int]
    notes: list[str]
    slack: int
    at_peak: tuple[PeakTensors, ...]
    timeline: tuple[tuple[int, str, int], ...]
    stand_ins: dict[str, str] = dataclasses.field(default_factory=dict)
    band: dict[str, int] = dataclasses.field(default_factory=dict)
    """Workspaces the trace saw but cannot size (:meth:`memguard.estimation.cuda_rules.Workspaces.band`)."""


def _prepare(module: nn.Module, checkpointing: bool) -> None:
    """Put the (isolated) module in train mode, with checkpointing as asked."""
    if checkpointing != is_checkpointing(module):
        set_checkpointing(module, checkpointing)
    module.train()


def _stand_ins(module: nn.Module, spec: TrainingSpec) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Fake stand-ins for the module's parameters and buffers (by ``id`` of the real tensor), in the
    dtypes training keeps, and the trainable ones in ``named_parameters()`` order.

    Called inside the fake mode: ``empty_strided`` there allocates nothing, and the user's real
    tensors are only read for their metadata. Tied parameters share one stand-in.
    """
    low = spec.precision.param_dtype
    fakes: dict[int, torch.Tensor] = {}
    trainable: list[torch.Tensor] = []
    for p in module.parameters():
        fake = torch.empty_strided(p.shape, p.stride(), dtype=low if p.is_floating_point() else p.dtype,
                                   device="cpu")
        fakes[id(p)] = fake.requires_grad_(p.requires_grad)
        if p.requires_grad:
            trainable.append(fake)
    for b in module.buffers():
        fakes[id(b)] = torch.empty_strided(b.shape, b.stride(), dtype=low if b.is_floating_point() else b.dtype,
                                           device="cpu")
    return fakes, trainable


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor like ``t`` (any other tensor the module holds); called in the fake mode."""
    try:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
    except (RuntimeError, NotImplementedError):  # sparse, nested, quantized ...: no strides
        return torch.empty(t.shape, dtype=t.dtype, device="cpu")


def trace_breakdown(
    module: nn.Module,
    spec: TrainingSpec,
    make_inputs: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    training_loop: str = "pytorch",
    step_fn: Callable[[Any], Any] | None = None,
    weight: Callable[[Category, Phase], float] | None = None,
    extras: Callable[[Phase], dict[Category, int]] | None = None,
    blocks: Iterable[nn.Module] = (),
    steps: int = 1,
    timeout: float | None = DEFAULT_TIMEOUT,
    accumulate: int = 1,
    set_to_none: bool = True,
) -> TraceResult:
    """Trace a steady-state training step of ``module`` on fake tensors and break down the peak.

    (Long because every step of the trace shares one ledger, one fake mode and the module's private
    state; the parts that need none of them are helpers: :func:`_stand_ins`, :func:`_optimizer_step`,
    :func:`memguard.estimation.peak.analyse`, :func:`_allocator_slack`.)

    The optimizer's state is made first, by one optimizer step on zero gradients, so the traced
    step is what the second step of a real run is (the first only differs in lacking the state),
    at half the cost of tracing two.

    Args:
        module: the user's module; its weights are neither copied nor touched.
        spec: batch, precision, optimizer, device and checkpointing.
        make_inputs: returns ``(args, kwargs)`` for one forward call; called in the fake mode.
        loss_fn: ``loss_fn(output, batch) -> scalar`` when the output has no loss.
        training_loop: ``"pytorch"`` zeroes gradients after the step; ``"lightning"`` after the
            next forward (Lightning's closure), so last step's gradients live through it.
        step_fn: called with the one positional input instead of ``module(...)`` (e.g. a
            LightningModule's ``training_step``); its result is a loss, a dict with ``"loss"``, or
            an output for ``loss_fn``.
        weight: share of each allocation, by category and :class:`~memguard.estimation.peak.Phase`,
            that the device holds — how sharding enters (see
            :meth:`memguard.estimation.parallel.Parallelism.weight`); the peak is then the peak of the
            weighted timeline. ``None`` counts everything whole.
        extras: bytes the device holds beyond the traced tensors, by phase (``BACKWARD`` is before
            the first block, ``BLOCK_BACKWARD`` from it on): how
            a sharded strategy's gathered units enter (see :meth:`.parallel.Parallelism.phase_extras`).
        blocks: the repeated blocks; their backward marks the ``BLOCK_BACKWARD`` phase.
        steps: forward-backward-step rounds to trace after the state is made.
        accumulate: micro-batches per optimizer step (gradient accumulation); from the second on,
            each forward runs beside the gradients accumulated so far.
        set_to_none: ``zero_grad(set_to_none=...)``; ``False`` (the default before torch 2.0)
            keeps zeroed gradients alive through every forward.
        timeout: seconds the trace may run (``None``: no limit); past them it stops with a
            :class:`TraceError`. A data-dependent loop (``while h.abs().max() > eps``) sees stand-in
            values that never converge. Checked between ops: a loop that runs no tensor op is not
            stopped.

    Returns:
        A :class:`TraceResult`.

    Raises:
        TraceError: when the model's code cannot run on fake tensors.
        ConfigError: for a loss that is not a scalar.
    """
    ledger = Ledger(spec.device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    counting = CountingMode(ledger, fake_mode, timeout, spec.moe_routing)
    precision = spec.precision
    notes: list[str] = []
    foreach = True if spec.device == "cuda" else None
    trainable: list[torch.Tensor] = []
    optimizer: torch.optim.Optimizer | None = None
    activations: set[int] = set()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_rng())
            stack.enter_context(torch.enable_grad())
            stack.enter_context(fake_mode)
            fakes, trainable = _stand_ins(module, spec)
            # From here on the module's objects hold private copies of their state (fakes for its
            # tensors), and get their own back on exit; checkpointed layers recompute their
            # forward during backward, so this lasts the whole step.
            stack.enter_context(isolated(module, fakes, _stand_in))
            _prepare(module, bool(spec.gradient_checkpointing))
            for block in blocks:
                block.register_full_backward_pre_hook(
                    lambda *_: ledger.set_phase(Phase.BLOCK_BACKWARD) if ledger.phase is Phase.BACKWARD else None)
            stack.enter_context(counting)
            workspaces = stack.enter_context(device_kernels(spec.device))
            for t in fakes.values():
                ledger.track(t)
            named = [(_owner(n, module), p) for n, p in module.named_parameters()]
            ledger.name([*named, *((_owner(n, module), b) for n, b in module.named_buffers())])
            ledger.follow(module)
            params = {ledger.index_of(t) for t in fakes.values()}
            optimizer = make_optimizer(spec.optimizer, trainable, foreach=foreach)
            grads: set[int] = set()
            opt_state: set[int] = set()

            if optimizer is not None:
                # Reach the steady state without tracing a first forward and backward: one step
                # on zero gradients creates the optimizer's state (and, in Lightning's loop,
                # leaves the gradients the next forward runs beside).
                for t in trainable:
                    t.grad = torch.zeros_like(t)
                grads.update(_storages(ledger, [t.grad for t in trainable]))
                _optimizer_step(ledger, optimizer, trainable, opt_state, training_loop, set_to_none)
            for _ in range(steps):
                # With accumulation, every micro-batch after the first runs its forward beside the
                # gradients so far; the second stands for all the others.
                for micro in range(min(accumulate, 2)):
                    ledger.set_phase(Phase.FORWARD)
                    start = ledger.clock
                    args, kwargs = make_inputs()
                    for t in tree_flatten((args, kwargs))[0]:
                        if isinstance(t, torch.Tensor):
                            ledger.track(t)
                    with device_autocast(spec.device, precision.autocast_dtype):
                        output = step_fn(args[0]) if step_fn is not None else module(*args, **kwargs)
                        loss = _loss_of(output, kwargs or args, loss_fn)
                    end = ledger.clock
                    activations.update(i for i, r in ledger.live_at(end) if r.alloc > start)
                    del output
                    ledger.set_phase(Phase.BACKWARD)
                    if training_loop == "lightning" and optimizer is not None and micro == 0:
                        optimizer.zero_grad(set_to_none=set_to_none)
                    if trainable:
                        loss.backward()
                    del loss, args, kwargs
                    grads.update(_storages(ledger, [t.grad for t in trainable]))
                    ledger.name((n, p.grad) for n, p in named)
                _optimizer_step(ledger, optimizer, trainable, opt_state, training_loop, set_to_none)
            kinds: dict[int, Category] = {}
            for i in range(len(ledger.records)):
                if i in params:
                    kinds[i] = Category.PARAMETERS
                elif i in grads:
                    kinds[i] = Category.GRADIENTS
                elif i in opt_state:
                    kinds[i] = Category.OPTIMIZER_STATE
                elif i in activations:
                    kinds[i] = Category.ACTIVATIONS
                else:
                    kinds[i] = Category.TEMPORARY
            for n, p in named:
                ledger.name((n, v) for v in (optimizer.state.get(p, {}) if optimizer else {}).values())
            report = analyse(ledger.records, ledger.marks, kinds, weight, extras)
            slack = _allocator_slack(ledger, kinds, weight) if spec.device == "cuda" else 0
            del fakes, trainable, optimizer
    except (ConfigError, TraceError):
        raise
    except Exception as exc:
        raise TraceError(
            f"could not trace a training step of {type(module).__name__}: {type(exc).__name__}: {exc}"
            + _stand_in_cause(counting)
        ) from exc
    invented = counting.stand_ins
    if invented.invented:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(invented.invented.items()))
        notes.append(f"data-dependent ops ran on stand-in values of ones: {ops}")
    if invented.modelled:
        notes.append(f"{_routing_words(spec.moe_routing)}: the indices of topk x{invented.modelled.get('topk', 0)} "
                     "(the routers' choice of experts) made by the routing model")
    notes.extend(f"not sized by the trace: {what}" for what in sorted(counting.uncounted))
    if precision.grad_scaler:
        notes.append("GradScaler's scalars are not traced (a few bytes)")
    log.debug("trace of %s: peak %d bytes", type(module).__name__, sum(report.breakdown.values()))
    stand_ins = {op: _routing_words(spec.moe_routing) for op in invented.modelled}
    stand_ins.update({op: ONES for op in invented.invented})
    band = workspaces.band(report.timeline) if spec.device == "cuda" else {}
    return TraceResult(report.breakdown, notes, slack, report.at_peak, report.timeline, stand_ins, band)


def _routing_words(capacity: float) -> str:
    """The routing model in words: ``"MoE routing: balanced"`` ..."""
    name = routing_name(capacity)
    return f"MoE routing: {name if name in ROUTINGS else f'capacity factor {name}'}"


def _stand_in_cause(counting: CountingMode) -> str:
    """What a failed trace adds when values it invented may have caused the failure."""
    if not counting.fallbacks:
        return ""
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(counting.fallbacks.items()))
    return (f"; before it, data-dependent ops ran on stand-in values of ones ({ops}), which may be the cause: "
            "a value or size the model computes from its data was invented by the trace")


def _owner(name: str, root: nn.Module) -> str:
    """The module a parameter or buffer belongs to, by its qualified name (``h.0.attn.c_attn``)."""
    return name.rpartition(".")[0] or type(root).__name__


def _storages(ledger: Ledger, tensors: Iterable[Any]) -> Iterator[int]:
    """Ledger indices of the storages of ``tensors`` (``None`` entries skipped)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            i = ledger.index_of(t)
            if i is not None:
                yield i


def _optimizer_step(ledger: Ledger, optimizer: torch.optim.Optimizer | None, trainable: list[torch.Tensor],
                    opt_state: set[int], training_loop: str, set_to_none: bool = True) -> None:
    """The optimizer's step (noting its state) and, in PyTorch's loop, ``zero_grad``."""
    ledger.set_phase(Phase.OPTIMIZER)
    if optimizer is not None:
        optimizer.step()
        opt_state.update(_storages(ledger, (v for s in optimizer.state.values() for v in s.values())))
        if training_loop == "pytorch":
            optimizer.zero_grad(set_to_none=set_to_none)
    else:
        for t in trainable:
            t.grad = None
    ledger.set_phase(Phase.OTHER)


def _allocator_slack(ledger: Ledger, kinds: dict[int, Category],
                     weight: Callable[[Category, Phase], float] | None) -> int:
    """``max_memory_reserved() - max_memory_allocated()`` of the step under the CUDA caching allocator.

    The step's allocations and frees are replayed in order, at their requested sizes (the share a
    rank holds, under sharding), with the allocator settings of ``PYTORCH_CUDA_ALLOC_CONF``.
    """
    def share(i: int, r: Record) -> int:
        return r.requested if weight is None else int(r.requested * weight(kinds[i], r.phase))

    records = [dataclasses.replace(r, nbytes=share(i, r)) for i, r in enumerate(ledger.records)]
    stats = replay(ledger_events(records), AllocatorConfig.from_env())
    return max(0, stats.peak_reserved - stats.peak_allocated)


class _WarmUp(nn.Module):
    """memguard's own tiny language model: the ops most training steps run (embedding, linear,
    layer norm, attention, GELU, dropout, cross-entropy)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv = nn.Embedding(16, 8), nn.Linear(8, 24)
        self.norm, self.head, self.drop = nn.LayerNorm(8), nn.Linear(8, 16), nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))  # (B, T, C)
        q, k, v = self.qkv(h).view(2, 4, 2, 3, 4).permute(3, 0, 2, 1, 4)  # 3 x (B, nh, T, hs)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 4, 8)
        logits = self.head(self.drop(nn.functional.gelu(h + a)))
        return nn.functional.cross_entropy(logits.view(-1, 16), ids.view(-1))


_warmed = False


def warm_up() -> None:
    """Trace :class:`_WarmUp` once in this process, before traces run in forked children.

    A trace's first use of an op imports and caches its fake kernel, decompositions and dispatch
    entries; in a child those die with it. Made once in the parent, on memguard's own module (no
    user code runs), every child inherits them: on this project's machine a traced GPT-2 step in a
    child went from 3.4 to 2.4 s of CPU time (``benchmarks/isolation.py``).
    """
    global _warmed
    if _warmed:
        return
    _warmed = True
    with preserved_rng(), torch.device("meta"):  # no weights initialised, no random number drawn
        module = _WarmUp()
    for precision in ("32-true", "bf16-mixed"):
        spec = TrainingSpec.create(batch_size=2, seq_len=4, optimizer="adamw", precision=precision,
                                   gradient_checkpointing=False, device="cuda")
        try:
            trace_breakdown(module, spec, lambda: ((torch.zeros(2, 4, dtype=torch.long),), {}))
        except Exception as exc:  # only a lost speed-up
            log.debug("warm-up trace failed: %s", exc)
