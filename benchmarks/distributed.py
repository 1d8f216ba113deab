"""Multi-process truth on the CPU: DDP and FSDP over gloo, and LoRA, against memguard's estimates.

Every rank is its own process: a launcher started with the environment of the CPU truth method
(``truth.allocator_env``: ``MALLOC_MMAP_THRESHOLD_=65536``, MKL's and oneDNN's caches off;
../shared/REFERENCES.md, "Measuring the truth on a CPU") imports torch, transformers and peft once
and forks one child per rank of each case (:mod:`benchmarks._ranks`), which finds its peer over the
loopback (``MASTER_ADDR=127.0.0.1``, a free port per case). In each rank:

1. ``torch.distributed.init_process_group("gloo")`` (not for single-process cases);
2. warm-up: one whole throwaway training step of the *same* case (same model, wrapper, optimizer
   and batch shapes), then everything is deleted and ``gc.collect()`` runs. The math libraries
   size their workspaces and read in their code by the largest GEMM they see, and gloo and the
   wrappers initialise lazily; none of that is the step's memory;
3. ``VmRSS`` is read just before the model is built;
4. the model is built on the CPU with real weights (seed 0, as memguard builds it:
   ``memguard.estimation.models.load_model``), given LoRA adapters when the case asks (``peft.get_peft_model``
   with ``LoraConfig(r, lora_alpha=2r)``, ``fan_in_fan_out`` for GPT-2's ``Conv1D``, the base
   frozen, as ``memguard.estimation.models.add_lora`` does), wrapped, and the optimizer (AdamW over
   the trainable parameters) and the rank's batch are made;
5. memguard's probe (``memguard.device.actual.MemoryProbe``) resets the high-water mark
   (``/proc/self/clear_refs`` = 5);
6. three steps (``STEPS``): ``loss = model(**batch).loss``, ``loss.backward()``,
   ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Three, not the two of
   ``truth.py``: DDP rebuilds its gradient buckets in the forward of its second iteration (in the
   order the first backward made the gradients ready), and the new buckets are fresh ``mmap``
   pages that are not resident until the second backward writes them, so DDP's steady state,
   buckets resident through the forward, starts with the third step. For the other wrappers the
   third step repeats the second;
7. truth = ``VmHWM`` - ``VmRSS`` before the model. The high-water mark after each phase is kept too
   (``phases``, relative to the same ``VmRSS``), and the peak of the first two steps alone
   (``peak_two_steps_bytes``).

Wrappers: ``ddp`` is ``DistributedDataParallel`` with its defaults (``gradient_as_bucket_view=False``:
the reducer keeps its own flat buckets, one more copy of the gradients); ``ddp_bucket_view`` passes
``gradient_as_bucket_view=True`` (the gradients *are* the buckets); ``fsdp2`` is
``torch.distributed.fsdp.fully_shard`` on each transformer block (found as memguard's FSDP model
finds them, ``memguard.estimation.arch.transformer_blocks``) and then on the root (full shard, as
Lightning's auto-wrap does per block); ``fsdp1`` is ``FullyShardedDataParallel`` with a
``transformer_auto_wrap_policy`` on the block class, ``device_id=torch.device("cpu")`` (with
``device_id=None`` torch 2.13 refuses: "FSDP needs a non-CPU accelerator device").

Estimates: ``memguard.estimate(<the transformers config or preset>, batch_size, seq_len,
device="cpu", method=m, strategy=..., world_size=..., lora_rank=...)`` for the trace and the
formula, and the single-device trace for reference. error = (estimate - truth) / truth.

Usage (from the repository root)::

    python benchmarks/distributed.py                 # every case; writes out/benchmarks/distributed_cpu.json
    python benchmarks/distributed.py --update-results  # ... benchmarks/results/distributed_cpu.json
    python benchmarks/distributed.py --cases ddp,fsdp2 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, machine_info, mib, render_table, result_path, write_json
from benchmarks._ranks import free_port, launch, report
from benchmarks.truth import allocator_env, env_ready, rss_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim import Optimizer

    from memguard.device.actual import MemoryProbe

STEPS = 3
RANK_TIMEOUT_S = 600
RESULT_NAME = "distributed_cpu.json"
WRAPS = ("none", "ddp", "ddp_bucket_view", "fsdp2", "fsdp1")

GPT2_SMALL: dict[str, Any] = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 4, "n_embd": 256,
    "n_head": 4, "vocab_size": 8000, "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0,
}
"""A GPT-2-style decoder of 5.3M parameters: fast on two cores, large enough that tensors dominate."""

GPT2_WIDE: dict[str, Any] = {**GPT2_SMALL, "n_embd": 512, "n_head": 8, "vocab_size": 2000, "n_positions": 128}
"""13.7M parameters whose blocks (12.0 MiB each) outweigh the root (embeddings, 4.2 MiB), where
``GPT2_SMALL``'s root (8.1 MiB) outweighs its blocks (3.0 MiB): FSDP's gathered units differ."""


@dataclasses.dataclass(frozen=True)
class DistCase:
    """One data-parallel (or LoRA) training step to measure on every rank and to estimate.

    Attributes:
        name: unique key.
        model: a memguard preset name or a transformers config dict (with ``model_type``).
        wrap: one of :data:`WRAPS`.
        world_size: ranks (processes); 1 for ``wrap="none"``.
        batch_size: samples per rank.
        seq_len: tokens per sample.
        lora_rank: LoRA adapters of this rank on the frozen model, or ``None``.
    """

    name: str
    model: str | Mapping[str, Any]
    wrap: str = "ddp"
    world_size: int = 2
    batch_size: int = 2
    seq_len: int = 128
    lora_rank: int | None = None

    @property
    def strategy(self) -> str:
        """memguard's strategy name for this wrapper."""
        if self.wrap == "none":
            return "single"
        return "ddp" if self.wrap.startswith("ddp") else "fsdp"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model if isinstance(self.model, str) else dict(self.model)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistCase:
        return cls(**data)


CASES: tuple[DistCase, ...] = (
    DistCase("ddp", GPT2_SMALL, "ddp"),
    DistCase("ddp-bucket-view", GPT2_SMALL, "ddp_bucket_view"),
    DistCase("fsdp2", GPT2_SMALL, "fsdp2"),
    DistCase("fsdp1", GPT2_SMALL, "fsdp1"),
    DistCase("fsdp2-wide", GPT2_WIDE, "fsdp2"),
    DistCase("lora-small", GPT2_SMALL, "none", world_size=1, lora_rank=8),
    DistCase("lora-gpt2", "gpt2", "none", world_size=1, lora_rank=8),
)


def select(names: str | None) -> list[DistCase]:
    """Cases by comma-separated names (``None`` or ``"all"``: every case)."""
    if not names or names == "all":
        return list(CASES)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names.split(",")]


# --------------------------------------------------------------------------- model and steps


def model_source(case: DistCase) -> Any:
    """What both sides build the model from: a preset name, or a transformers config object."""
    if isinstance(case.model, str):
        return case.model
    from transformers import AutoConfig

    data = dict(case.model)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_module(case: DistCase, device: str = "cpu") -> nn.Module:
    """The case's model in train mode, built as memguard builds it, with LoRA when asked."""
    import torch

    from memguard.estimation.models import load_model

    torch.manual_seed(0)
    module = load_model(model_source(case), device=device).module
    if case.lora_rank is not None:
        import peft

        conv1d = any(type(m).__name__ == "Conv1D" for m in module.modules())  # GPT-2's transposed weights
        config = peft.LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank, fan_in_fan_out=conv1d)
        module = peft.get_peft_model(module, config)
    return module.train()


def block_class(module: nn.Module) -> type[nn.Module]:
    """The class of the transformer blocks, as memguard finds them for FSDP's units."""
    from memguard.estimation.arch import transformer_blocks

    blocks = transformer_blocks(module)
    if not blocks:
        raise ValueError(f"{type(module).__name__} has no nn.ModuleList of transformer blocks to wrap")
    return type(blocks[0])


def wrap_module(module: nn.Module, wrap: str) -> nn.Module:
    """Wrap ``module`` for data parallelism as ``wrap`` says (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    if wrap == "none":
        return module
    if wrap in ("ddp", "ddp_bucket_view"):
        return DistributedDataParallel(module, gradient_as_bucket_view=wrap == "ddp_bucket_view")
    block = block_class(module)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for sub in [m for m in module.modules() if isinstance(m, block)]:
            fully_shard(sub)
        return fully_shard(module)
    if wrap == "fsdp1":
        return _fsdp1(module, block)
    raise ValueError(f"unknown wrap {wrap!r}; expected one of {', '.join(WRAPS)}")


def _fsdp1(module: nn.Module, block: type[nn.Module]) -> nn.Module:
    import functools

    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={block})
    return FullyShardedDataParallel(module, auto_wrap_policy=policy, device_id=torch.device("cpu"))


@dataclasses.dataclass
class Run:
    """A wrapped model, its optimizer and one batch of the rank."""

    model: nn.Module
    optimizer: Optimizer
    batch: dict[str, torch.Tensor]


def setup(case: DistCase, rank: int) -> Run:
    """Build, wrap, make the optimizer (AdamW over trainable parameters) and the rank's batch."""
    import torch

    from memguard.estimation.inputs import make_batch
    from memguard.estimation.spec import make_optimizer, resolve_optimizer

    module = build_module(case)
    batch = make_batch(module, case.batch_size, case.seq_len, generator=torch.Generator().manual_seed(rank))
    model = wrap_module(module, case.wrap)
    optimizer = make_optimizer(resolve_optimizer("adamw"), [p for p in model.parameters() if p.requires_grad])
    if optimizer is None:
        raise RuntimeError(f"{case.name}: the model has no trainable parameters")
    return Run(model, optimizer, batch)


def train_steps(run: Run, steps: int, mark: Callable[[str], None] | None = None) -> list[float]:
    """``steps`` training steps; ``mark`` is called with ``"<step>:<phase>"`` after each phase."""
    losses = []
    for i in range(steps):
        loss = run.model(**run.batch).loss
        if mark:
            mark(f"{i}:forward")
        loss.backward()
        if mark:
            mark(f"{i}:backward")
        run.optimizer.step()
        if mark:
            mark(f"{i}:step")
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
    return losses


# --------------------------------------------------------------------------- one rank


def warm_up(case: DistCase, rank: int) -> None:
    """One throwaway step of the same case, then free all of it."""
    run = setup(case, rank)
    train_steps(run, 1)
    del run
    gc.collect()


def measure_rank(case: DistCase, rank: int) -> dict[str, Any]:
    """Measure ``case`` on ``rank`` in this process (the process group, if any, is up).

    memguard's probe (:class:`memguard.device.actual.MemoryProbe`) resets ``VmHWM`` after the
    setup, with the setup's growth of ``VmRSS`` as already resident, so each reading is
    ``VmHWM`` - ``VmRSS`` before the model.
    """
    import torch

    from memguard.device.actual import MemoryProbe

    warm_up(case, rank)
    probe = MemoryProbe(torch.device("cpu"), reset=True)
    before = rss_bytes()
    run = setup(case, rank)
    built = rss_bytes() - before
    if not probe.start(resident=built):
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs (Linux >= 4.0 needed)")
    phases: dict[str, int] = {}

    def mark(label: str) -> None:
        phases[label] = _peak(probe)

    start = time.perf_counter()
    losses = train_steps(run, STEPS, mark)
    seconds = time.perf_counter() - start
    return {
        "rank": rank, "peak_bytes": _peak(probe), "peak_two_steps_bytes": phases["1:step"],
        "setup_bytes": built, "rss_before_model": before, "local_param_bytes": _local_param_bytes(run.model),
        "phases": phases, "step_seconds": seconds / STEPS, "losses": losses,
    }


def _peak(probe: MemoryProbe) -> int:
    """The probe's exact reading so far; a lower bound (mmap threshold not pinned) is an error."""
    measured = probe.read()
    if measured is None or measured.lower_bound:
        raise RuntimeError(f"no exact CPU measurement: {measured.caveat if measured else 'VmHWM unreadable'}")
    return measured.peak_bytes


def _local_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a shard's local part under FSDP)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def process_group(world_size: int, rank: int) -> Iterator[None]:
    """gloo's process group for ``world_size > 1`` (address and port from the environment)."""
    if world_size == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def worker(case: DistCase, rank: int, threads: int) -> dict[str, Any]:
    """The body of one rank's process."""
    import torch

    if not env_ready():
        raise RuntimeError("a rank must start with truth.allocator_env() (run it through run_cases)")
    torch.set_num_threads(threads)
    with process_group(case.world_size, rank):
        return measure_rank(case, rank)


# --------------------------------------------------------------------------- launching ranks


def launcher_env() -> dict[str, str]:
    """The environment of the launcher and its ranks: the truth's allocator settings, loopback."""
    return {**allocator_env(), "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}


def run_cases(cases: Sequence[DistCase], *, threads: int | None = None, timeout: float = RANK_TIMEOUT_S,
              show_progress: bool = False) -> dict[str, list[dict[str, Any]] | RuntimeError]:
    """Measure every rank of every case; each case's rank records, or why it failed.

    One launcher process (``--launch``, started with :func:`launcher_env`) imports everything
    once and forks one fresh process per rank of each case in turn (:mod:`benchmarks._ranks`).
    ``threads`` is torch's threads per rank (default: the cores shared among the ranks);
    ``timeout`` is per case.
    """
    spec = {"cases": [c.to_dict() for c in cases], "threads": threads, "timeout": timeout}
    return launch(Path(__file__).resolve(), spec, [c.name for c in cases], env=launcher_env(),
                  timeout=300 + timeout * len(cases), show_progress=show_progress)


def _launch_here(spec: Mapping[str, Any]) -> int:
    """The launcher: fork the ranks of each case, print one JSON line per case."""
    if not env_ready():
        raise RuntimeError("the launcher must start with launcher_env() (run it through run_cases)")
    cases = [DistCase.from_dict(c) for c in spec["cases"]]
    for case in cases:  # import transformers, the model classes and peft before any fork; no kernel runs
        build_module(case, "meta")
    for case in cases:
        print(f"measuring {case.name} ({case.world_size} rank(s), {case.wrap}) ...", file=sys.stderr, flush=True)
        threads = spec["threads"] or max(1, (os.cpu_count() or 1) // case.world_size)
        os.environ["MASTER_PORT"] = str(free_port())
        report(case.name, case.world_size, functools.partial(worker, case, threads=threads), spec["timeout"])
    return 0


# --------------------------------------------------------------------------- estimates


def estimate_case(case: DistCase, method: str, strategy: str | None = None) -> dict[str, Any]:
    """``memguard.estimate`` of ``case`` (its strategy unless ``strategy`` is given)."""
    import memguard

    strategy = strategy or case.strategy
    world = case.world_size if strategy != "single" else 1
    try:
        est = memguard.estimate(model_source(case), case.batch_size, case.seq_len, device="cpu",
                                method=method, strategy=strategy, world_size=world,
                                lora_rank=case.lora_rank)
    except Exception as exc:  # report, do not hide: the table shows it
        return {"error": type(exc).__name__, "message": str(exc)[:500]}
    return est.to_dict()


def estimates(case: DistCase) -> dict[str, dict[str, Any]]:
    """Trace and formula with the case's strategy, and the single-device trace."""
    out = {m: estimate_case(case, m) for m in ("trace", "formula")}
    out["trace_single"] = out["trace"] if case.strategy == "single" else estimate_case(case, "trace", "single")
    return out


def error(estimate: Mapping[str, Any], truth: int) -> float | None:
    """(estimate - truth) / truth, or ``None`` when the estimate failed."""
    peak = estimate.get("peak_bytes")
    return None if peak is None or truth <= 0 else (peak - truth) / truth


# --------------------------------------------------------------------------- report


def collect(case: DistCase, ranks: list[dict[str, Any]] | RuntimeError) -> dict[str, Any]:
    """The record of ``case``: its ranks' measurements (or why they failed) and the estimates."""
    record: dict[str, Any] = {"case": case.name, "spec": case.to_dict(), "strategy": case.strategy}
    if isinstance(ranks, RuntimeError):
        record["failed"] = str(ranks)
        return record
    record["ranks"] = ranks
    record["estimates"] = estimates(case)
    record["errors"] = {m: [error(e, r["peak_bytes"]) for r in record["ranks"]]
                        for m, e in record["estimates"].items()}
    return record


def _cell(estimate: Mapping[str, Any], err: float | None) -> str:
    if "error" in estimate:
        return f"n/a ({estimate['error']})"
    return f"{mib(estimate['peak_bytes'])} ({100 * err:+.1f}%)" if err is not None else "n/a"


def render(records: Sequence[Mapping[str, Any]]) -> str:
    """case | rank | truth | trace (err) | formula (err) | single-device trace, in MiB."""
    rows = []
    for rec in records:
        if "failed" in rec:
            reason = rec["failed"].strip().splitlines()[-1][:70]
            rows.append([rec["case"], "-", "failed", reason, "", ""])
            continue
        for i, rank in enumerate(rec["ranks"]):
            est, errs = rec["estimates"], rec["errors"]
            rows.append([rec["case"], str(rank["rank"]), mib(rank["peak_bytes"]),
                         _cell(est["trace"], errs["trace"][i]), _cell(est["formula"], errs["formula"][i]),
                         _cell(est["trace_single"], errs["trace_single"][i])])
    headers = ["case", "rank", "truth MiB", "trace MiB (err)", "formula MiB (err)", "single trace MiB (err)"]
    return render_table(headers, rows)


def machine() -> dict[str, Any]:
    """machine_info() with peft's version and the measuring environment."""
    import peft

    info = machine_info("cpu")
    info["peft"] = peft.__version__
    env = allocator_env()
    info["environment"] = {k: env[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MKL_DISABLE_FAST_MM",
                                                "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names, or 'all' (default)")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: the cores shared)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULT_NAME}")
    add_output_arguments(parser, RESULT_NAME)
    parser.add_argument("--launch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.launch:
        return _launch_here(json.loads(args.launch))
    cases = select(args.cases)
    measured = run_cases(cases, threads=args.threads, show_progress=True)
    records = [collect(case, measured[case.name]) for case in cases]
    print(render(records))
    if not args.no_write:
        output = result_path(args, RESULT_NAME)
        write_json(output, {"machine": machine(), "steps": STEPS, "cases": records})
        print(f"\nwritten to {output}")
    return 0 if all("failed" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
