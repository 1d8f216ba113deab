"""Record: run one steady-state training step of the user's module on fake tensors, into a ledger.

Under ``FakeTensorMode`` every tensor carries shape, dtype and device but no data, so the user's
own ``forward`` (or ``step_fn``), the loss, autograd's backward and the optimizer's ``step`` run
exactly as they would, while nothing is allocated. The :class:`~.ledger.CountingMode` stacked on
top records every new storage and its free in the :class:`~.ledger.Ledger`.

The steady state is reached cheaply: one optimizer step on zero gradients makes the optimizer's
state, then one forward, backward and step are recorded. A real run's second step is the same, and
its first step never holds more (it lacks the state), so the peak equals that of two real steps.

While the step runs, every module of the tree holds a private copy of its state (:mod:`.isolation`),
parameters and buffers in the dtypes training keeps. Under ``device="cuda"`` the step runs on fake
CPU tensors with the CUDA rules applied (:mod:`memguard.estimation.cuda_rules`: CUDA's autocast op
lists, SDPA's backend choice, the CUDA attention ops' outputs), and built-in optimizers run their
``foreach`` implementation, the CUDA default. transformers' packed-sequence check, which skips its
data-dependent test on fake tensors, is answered as the real run answers it (:mod:`.packing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memguard.errors import ConfigError
from memguard.estimation.cuda_rules import Workspaces, device_autocast, device_kernels
from memguard.estimation.models import is_checkpointing, set_checkpointing
from memguard.estimation.spec import TrainingSpec, make_optimizer
from memguard.estimation.trace.isolation import isolated, preserved_rng
from memguard.estimation.trace.ledger import CountingMode, Ledger, Phase
from memguard.estimation.trace.packing import Positions, derived_positions, has_position_ids
from memguard.estimation.trace_timeout import DEFAULT_TIMEOUT, check_timeout

__all__ = ["DEFAULT_TIMEOUT", "Inputs", "Loop", "Recording", "check_timeout", "recorded"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one forward call."""


@dataclasses.dataclass(frozen=True)
class Loop:
    """How the user's loop runs the step (the arguments of :func:`memguard.estimation.trace.trace_breakdown`).

    Attributes:
        make_inputs: returns ``(args, kwargs)`` for one forward call; called in the fake mode.
        loss_fn: ``loss_fn(output, batch) -> scalar`` when the output has no loss.
        training_loop: ``"pytorch"`` zeroes gradients after the step; ``"lightning"`` after the
            next forward (Lightning's closure), so last step's gradients live through it.
        step_fn: called with the one positional input instead of ``module(...)`` (e.g. a
            LightningModule's ``training_step``); its result is a loss, a dict with ``"loss"``, or
            an output for ``loss_fn``.
        steps: forward-backward-step rounds to trace after the optimizer's state is made.
        accumulate: micro-batches per optimizer step (gradient accumulation); from the second on,
            each forward runs beside the gradients accumulated so far.
        set_to_none: ``zero_grad(set_to_none=...)``; ``False`` (the default before torch 2.0)
            keeps zeroed gradients alive through every forward.
    """

    make_inputs: Callable[[], Inputs]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    training_loop: str = "pytorch"
    step_fn: Callable[[Any], Any] | None = None
    steps: int = 1
    accumulate: int = 1
    set_to_none: bool = True


@dataclasses.dataclass
class Recording:
    """A recorded step: its ledger, and which storages (ledger indices) played which part in it.

    Attributes:
        ledger: every storage allocated and freed, in order.
        params: the stand-ins of the parameters and buffers.
        grads: every ``.grad`` a trainable parameter had.
        opt_state: every tensor of the optimizer's state.
        activations: what a forward made and still held at its end (activations, with the batch).
        last_input: the last leaf of the latest batch, held until the next batch's leaves exist
            (after the last batch, until the recording ends), as a training loop's variable holds
            its batch: alive, and so unfreed, while the step is analysed. This is the lifetime the
            trace has always given that leaf; estimates depend on it.
    """

    ledger: Ledger
    params: set[int]
    grads: set[int] = dataclasses.field(default_factory=set)
    opt_state: set[int] = dataclasses.field(default_factory=set)
    activations: set[int] = dataclasses.field(default_factory=set)
    last_input: Any = None
    workspaces: Workspaces | None = None
    """The kernels whose workspaces the trace saw but cannot size (CUDA only)."""
    positions: Positions = dataclasses.field(default_factory=Positions)
    """How transformers' packed-sequence check was answered (:mod:`.packing`)."""


@contextlib.contextmanager
def recorded(module: nn.Module, spec: TrainingSpec, loop: Loop, counting: CountingMode,
             blocks: Iterable[nn.Module] = ()) -> Iterator[Recording]:
    """Record a steady-state step of ``module`` into ``counting``'s ledger.

    Yields the :class:`Recording` while the step's objects (module state, optimizer, gradients)
    are still alive, so that what the step keeps has no free in the ledger; on exit the module
    gets its own state back and the random generators their state.

    Args:
        module: the user's module; its weights are neither copied nor touched.
        spec: batch, precision, optimizer, device and checkpointing.
        loop: the training loop's knobs.
        counting: the dispatch mode (and its fake mode and ledger) that records the step.
        blocks: the repeated blocks; their backward marks the ``BLOCK_BACKWARD`` phase.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_rng())
        stack.enter_context(torch.enable_grad())
        stack.enter_context(counting.fake_mode)
        fakes, trainable = _param_stand_ins(module, spec)
        # From here on the module's objects hold private copies of their state (fakes for its
        # tensors), and get their own back on exit; checkpointed layers recompute their
        # forward during backward, so this lasts the whole step.
        stack.enter_context(isolated(module, fakes, _stand_in))
        # transformers' packed-sequence check, answered as the real run answers it (.packing).
        positions = stack.enter_context(derived_positions())
        _prepare(module, bool(spec.gradient_checkpointing))
        _mark_block_backward(counting.ledger, blocks)
        stack.enter_context(counting)
        workspaces = stack.enter_context(device_kernels(spec.device))
        step = _Step(module, spec, loop, counting.ledger, fakes, trainable)
        step.recording.positions = positions
        recording = step.run()
        recording.workspaces = workspaces
        yield recording


class _Step:
    """The training step on the isolated module, under the fake and counting modes."""

    def __init__(self, module: nn.Module, spec: TrainingSpec, loop: Loop, ledger: Ledger,
                 fakes: dict[int, torch.Tensor], trainable: list[torch.Tensor]) -> None:
        self.module, self.spec, self.loop, self.ledger, self.trainable = module, spec, loop, ledger, trainable
        for t in fakes.values():
            ledger.track(t)
        self.named = [(_owner(n, module), p) for n, p in module.named_parameters()]
        ledger.name([*self.named, *((_owner(n, module), b) for n, b in module.named_buffers())])
        ledger.follow(module)
        params = {i for t in fakes.values() if (i := ledger.index_of(t)) is not None}
        self.recording = Recording(ledger, params)
        foreach = True if spec.device == "cuda" else None
        self.optimizer = make_optimizer(spec.optimizer, trainable, foreach=foreach)
        self.output: set[int] = set()  # the ledger's indices of the last forward's output

    def run(self) -> Recording:
        """The optimizer's state, then ``loop.steps`` steps; names the state's storages."""
        if self.optimizer is not None:
            # Reach the steady state without tracing a first forward and backward: one step
            # on zero gradients creates the optimizer's state (and, in Lightning's loop,
            # leaves the gradients the next forward runs beside).
            for t in self.trainable:
                t.grad = torch.zeros_like(t)
            self.recording.grads.update(_storages(self.ledger, [t.grad for t in self.trainable]))
            self.optimizer_step()
        for _ in range(self.loop.steps):
            # With accumulation, every micro-batch after the first runs its forward beside the
            # gradients so far; the second stands for all the others.
            for micro in range(min(self.loop.accumulate, 2)):
                self.micro_batch(first=micro == 0)
            self.optimizer_step()
        state = self.optimizer.state if self.optimizer is not None else {}
        for n, p in self.named:
            self.ledger.name((n, v) for v in state.get(p, {}).values())
        for i in self.output:
            self.ledger.records[i].output = True
        return self.recording

    def micro_batch(self, first: bool) -> None:
        """One forward (its activations noted) and backward (its gradients noted and named)."""
        ledger, loop, recording = self.ledger, self.loop, self.recording
        ledger.set_phase(Phase.FORWARD)
        start = ledger.clock
        args, kwargs = loop.make_inputs()
        recording.positions.given = has_position_ids((args, kwargs))
        leaves = tree_flatten((args, kwargs))[0]
        if leaves:
            recording.last_input = leaves[-1]  # the previous batch's last leaf goes here
        for t in leaves:
            if isinstance(t, torch.Tensor):
                ledger.track(t)
        del leaves
        with device_autocast(self.spec.device, self.spec.precision.autocast_dtype):
            output = loop.step_fn(args[0]) if loop.step_fn is not None else self.module(*args, **kwargs)
            loss = _loss_of(output, kwargs or args, loop.loss_fn)
        end = ledger.clock
        recording.activations.update(i for i, r in ledger.live_at(end) if r.alloc > start)
        # what the output holds beyond the loss, which every loop keeps until its backward
        self.output = {i for t in output_tensors(output) if (i := ledger.index_of(t)) is not None}
        self.output.discard(ledger.index_of(loss))
        del output
        ledger.set_phase(Phase.BACKWARD)
        if loop.training_loop == "lightning" and self.optimizer is not None and first:
            self.optimizer.zero_grad(set_to_none=loop.set_to_none)
        if self.trainable:
            loss.backward()
        del loss, args, kwargs
        recording.grads.update(_storages(ledger, [t.grad for t in self.trainable]))
        ledger.name((n, p.grad) for n, p in self.named)

    def optimizer_step(self) -> None:
        """The optimizer's step (noting its state) and, in PyTorch's loop, ``zero_grad``."""
        self.ledger.set_phase(Phase.OPTIMIZER)
        if self.optimizer is not None:
            self.optimizer.step()
            state = (v for s in self.optimizer.state.values() for v in s.values())
            self.recording.opt_state.update(_storages(self.ledger, state))
            if self.loop.training_loop == "pytorch":
                self.optimizer.zero_grad(set_to_none=self.loop.set_to_none)
        else:
            for t in self.trainable:
                t.grad = None
        self.ledger.set_phase(Phase.OTHER)


def output_tensors(output: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors a loop's ``outputs = model(**batch)`` variable holds: those in ``output``'s
    containers (a transformers ``ModelOutput`` is a dict), and the keys and values of a transformers
    cache in it: a training forward with ``use_cache=True`` returns a ``DynamicCache`` whose layers
    hold ``torch.cat`` copies of every block's K and V (``DynamicLayer.update``,
    ``transformers/cache_utils.py``)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif depth > 4:
        return
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from output_tensors(value, depth + 1)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from output_tensors(value, depth + 1)
    elif type(output).__module__.startswith("transformers.cache_utils"):
        for value in vars(output).values():
            yield from output_tensors(value, depth + 1)


def _loss_of(output: Any, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    """The scalar loss of a forward's ``output``: ``loss_fn``'s, the output itself, its ``.loss``
    (or ``["loss"]``), the mean of a ``last_hidden_state``, or diffusers' loss on a ``.sample``."""
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


def _prepare(module: nn.Module, checkpointing: bool) -> None:
    """Put the (isolated) module in train mode, with checkpointing as asked."""
    if checkpointing != is_checkpointing(module):
        set_checkpointing(module, checkpointing)
    module.train()


def _mark_block_backward(ledger: Ledger, blocks: Iterable[nn.Module]) -> None:
    """Start the ``BLOCK_BACKWARD`` phase when the first of ``blocks`` (isolated) starts its backward."""
    for block in blocks:
        block.register_full_backward_pre_hook(
            lambda *_: ledger.set_phase(Phase.BLOCK_BACKWARD) if ledger.phase is Phase.BACKWARD else None)


def _param_stand_ins(module: nn.Module, spec: TrainingSpec) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
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
