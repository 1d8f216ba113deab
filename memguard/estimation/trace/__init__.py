"""The trace: run the real code of a training step on fake tensors and count its storage.

A pipeline of three stages, one module each, over one :class:`~.ledger.Ledger`:

1. **record** (:mod:`.record`): the user's own ``forward``, the loss, autograd's backward and the
   optimizer's ``step`` run under ``FakeTensorMode`` (shape, dtype and device, no data), on the
   module's private state (:mod:`.isolation`). A ``TorchDispatchMode`` stacked on top
   (:class:`~.ledger.CountingMode`) sees every op's outputs; each new storage is an allocation of
   ``nbytes`` (rounded as the device's allocator rounds), and a ``weakref.finalize`` on the storage
   marks its free (the approach of torch's ``MemTracker``, without its module hooks, which makes it
   several times faster). One optimizer step on zero gradients makes the optimizer's state, then
   one forward, backward and step are recorded: the steady state of a real run.
2. **classify** (:mod:`.classify`): each storage's :class:`~memguard.Category`, from what it turned
   out to be (parameter, gradient, optimizer state, activation, temporary).
3. **analyse** (:mod:`.analyse`): the high-water mark of the ledger, the peak
   ``torch.cuda.max_memory_allocated()`` would report, by category (each allocation weighted by the
   share a rank holds); the tensors alive then, by module (attribution); the timeline; on CUDA, the
   caching allocator's slack, from replaying the step's allocations and frees
   (:mod:`memguard.estimation.allocator`).

:func:`trace_breakdown` (:mod:`.pipeline`) runs the three and returns a :class:`TraceResult`.

What ``device="cuda"`` changes, since fake CUDA tensors cannot run autograd on a CPU-only build:
the trace runs on fake CPU tensors and applies the CUDA rules itself (:mod:`memguard.estimation.cuda_rules`)
— CUDA's autocast op lists, SDPA's backend choice and the CUDA attention ops' outputs and
backward buffers, the fused dropout kernel (a 1-byte mask); built-in optimizers run their
``foreach`` implementation, the CUDA default; allocations round up to 512 bytes, and the step's
allocations and frees are replayed through the caching allocator.

The user's modules are not copied: each holds a private copy of its state while the step runs
(:mod:`.isolation`), and :func:`memguard.estimate` runs the whole trace in a forked child
(:mod:`memguard.estimation.sandbox`), so nothing of the trace stays behind; the trace stops after
``timeout`` seconds. :func:`warm_up` traces memguard's own tiny model once in the parent, so that
children inherit the fake kernels it loads.

Known limitations:
    * Values are unknown. ``.item()`` on computed data, and ops whose output shape depends on data
      (``nonzero``, ``masked_select``), run on invented values (:mod:`memguard.estimation.stand_ins`):
      a mixture-of-experts router's ``topk`` on the routing model (balanced unless
      ``spec.moe_routing`` says otherwise), anything else on stand-in tensors of ones. The result
      names each such op in :attr:`TraceResult.stand_ins`.
    * A ``GradScaler``'s own scalars are not traced (they are a few bytes).
"""

from memguard.estimation.trace.isolation import is_tracing, preserved_rng
from memguard.estimation.trace.ledger import Phase
from memguard.estimation.trace.pipeline import TraceResult, trace_breakdown
from memguard.estimation.trace.record import DEFAULT_TIMEOUT, Inputs, check_timeout
from memguard.estimation.trace.warm_up import warm_up

__all__ = [
    "DEFAULT_TIMEOUT",
    "Inputs",
    "Phase",
    "TraceResult",
    "check_timeout",
    "is_tracing",
    "preserved_rng",
    "trace_breakdown",
    "warm_up",
]
