"""Multi-process truth on the CPU: DDP and FSDP over gloo, and LoRA, against memguard's estimates.

Every rank is its own Python process (started with ``subprocess``, ``MASTER_ADDR=127.0.0.1`` and a
free port on the loopback), with the environment of the CPU truth method (``truth.allocator_env``:
``MALLOC_MMAP_THRESHOLD_=65536``, MKL's and oneDNN's caches off; ../shared/REFERENCES.md,
"Measuring the truth on a CPU"). In each rank:

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
5. the high-water mark is reset (``/proc/self/clear_refs`` = 5);
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
``torch.distributed.fsdp.fully_shard`` on each transformer block and then on the root (full shard,
as Lightning's auto-wrap does per block); ``fsdp1`` is ``FullyShardedDataParallel`` with a
``transformer_auto_wrap_policy`` on the block class, ``device_id=torch.device("cpu")`` (with
``device_id=None`` torch 2.13 refuses: "FSDP needs a non-CPU accelerator device").

Estimates: ``memguard.estimate(<the transformers config or preset>, batch_size, seq_len,
device="cpu", method=m, strategy=..., world_size=..., lora_rank=...)`` for the trace and the
formula, and the single-device trace for reference. error = (estimate - truth) / truth.

Usage (from the repository root)::

    python benchmarks/distributed.py                 # every case; writes results/distributed_cpu.json
    python benchmarks/distributed.py --cases ddp,fsdp2 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, machine_info, mib, render_table, write_json
from benchmarks.truth import _env_ready, _proc_status_bytes, _reset_hwm, allocator_env

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim import Optimizer

STEPS = 3
RANK_TIMEOUT_S = 600
RESULT_PATH = RESULTS / "distributed_cpu.json"
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


def _block_class(module: nn.Module) -> type[nn.Module]:
    """The class of the repeated transformer blocks (the largest ``nn.ModuleList``'s items)."""
    from torch import nn

    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return type(blocks[0])


def wrap_module(module: nn.Module, wrap: str) -> nn.Module:
    """Wrap ``module`` for data parallelism as ``wrap`` says (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    if wrap == "none":
        return module
    if wrap in ("ddp", "ddp_bucket_view"):
        return DistributedDataParallel(module, gradient_as_bucket_view=wrap == "ddp_bucket_view")
    block = _block_class(module)
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

    from memguard.estimation.models import make_batch
    from memguard.estimation.spec import make_optimizer, resolve_optimizer

    module = build_module(case)
    batch = make_batch(module, case.batch_size, case.seq_len, generator=torch.Generator().manual_seed(rank))
    model = wrap_module(module, case.wrap)
    optimizer = make_optimizer(resolve_optimizer("adamw"), [p for p in model.parameters() if p.requires_grad])
    if optimizer is None:
        raise RuntimeError(f"{case.name}: the model has no trainable parameters")
    return Run(model, optimizer, batch)


def train_steps(run: Run, steps: int, marks: list[tuple[str, int]] | None = None) -> list[float]:
    """``steps`` training steps; with ``marks``, the ``VmHWM`` after each phase is appended."""
    losses = []
    for i in range(steps):
        loss = run.model(**run.batch).loss
        _mark(marks, f"{i}:forward")
        loss.backward()
        _mark(marks, f"{i}:backward")
        run.optimizer.step()
        _mark(marks, f"{i}:step")
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
    return losses


def _mark(marks: list[tuple[str, int]] | None, label: str) -> None:
    if marks is not None:
        marks.append((label, _proc_status_bytes("VmHWM")))


# --------------------------------------------------------------------------- one rank


def warm_up(case: DistCase, rank: int) -> None:
    """One throwaway step of the same case, then free all of it."""
    run = setup(case, rank)
    train_steps(run, 1)
    del run
    gc.collect()


def measure_rank(case: DistCase, rank: int) -> dict[str, Any]:
    """Measure ``case`` on ``rank`` in this process (the process group, if any, is up)."""
    warm_up(case, rank)
    before = _proc_status_bytes("VmRSS")
    run = setup(case, rank)
    built = _proc_status_bytes("VmRSS")
    _reset_hwm()
    marks: list[tuple[str, int]] = []
    start = time.perf_counter()
    losses = train_steps(run, STEPS, marks)
    seconds = time.perf_counter() - start
    hwm = _proc_status_bytes("VmHWM")
    return {
        "rank": rank, "peak_bytes": hwm - before, "peak_two_steps_bytes": dict(marks)["1:step"] - before,
        "setup_bytes": built - before,
        "rss_before_model": before, "vm_hwm": hwm, "local_param_bytes": _local_param_bytes(run.model),
        "phases": {label: value - before for label, value in marks},
        "step_seconds": seconds / STEPS, "losses": losses,
    }


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

    if not _env_ready(False):
        raise RuntimeError("a rank must start with truth.allocator_env() (run it through run_case)")
    torch.set_num_threads(threads)
    with process_group(case.world_size, rank):
        return measure_rank(case, rank)


# --------------------------------------------------------------------------- launching ranks


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(port: int) -> dict[str, str]:
    """The environment of a rank: the truth's allocator settings and the rendezvous address."""
    return {**allocator_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TOKENIZERS_PARALLELISM": "false"}


def run_case(case: DistCase, timeout: float = RANK_TIMEOUT_S) -> list[dict[str, Any]]:
    """Run ``case`` with one fresh process per rank; each rank's measurement, by rank.

    Raises:
        RuntimeError: when a rank fails (its last lines of stderr are in the message); the other
            ranks are then stopped, since they would wait for it in their next collective.
        subprocess.TimeoutExpired: when the ranks take longer than ``timeout`` seconds.
    """
    threads = max(1, (os.cpu_count() or 1) // case.world_size)
    env = rank_env(free_port())
    with contextlib.ExitStack() as stack:
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")), stack.enter_context(tempfile.TemporaryFile("w+")))
                 for _ in range(case.world_size)]
        procs = [subprocess.Popen(_worker_command(case, rank, threads), env=env, stdout=out, stderr=err, text=True)
                 for rank, (out, err) in enumerate(files)]
        _wait_all(procs, timeout)
        return [_rank_record(case, rank, proc.returncode, out, err)
                for rank, (proc, (out, err)) in enumerate(zip(procs, files, strict=True))]


def _worker_command(case: DistCase, rank: int, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case.to_dict()),
            "--rank", str(rank), "--threads", str(threads)]


def _wait_all(procs: Sequence[subprocess.Popen[str]], timeout: float) -> None:
    """Wait for every rank; stop them all when one fails or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return
        failed = any(c not in (None, 0) for c in codes)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if not failed:
                raise subprocess.TimeoutExpired([str(a) for a in procs[0].args], timeout)
            return
        time.sleep(0.1)


def _rank_record(case: DistCase, rank: int, code: int | None, out: IO[str], err: IO[str]) -> dict[str, Any]:
    """The JSON line a rank printed, or a ``RuntimeError`` with the tail of its stderr."""
    out.seek(0)
    lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
    if code == 0 and lines:
        return dict(json.loads(lines[-1]))
    err.seek(0)
    tail = "\n".join(err.read().strip().splitlines()[-12:])
    raise RuntimeError(f"{case.name}: rank {rank} failed (exit {code}):\n{tail}")


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


def collect(case: DistCase, log: Any = None) -> dict[str, Any]:
    """Measure every rank of ``case`` and estimate it; a failure is recorded, not raised."""
    record: dict[str, Any] = {"case": case.name, "spec": case.to_dict(), "strategy": case.strategy}
    if log:
        log(f"measuring {case.name} ({case.world_size} rank(s), {case.wrap}) ...")
    try:
        record["ranks"] = run_case(case)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        record["failed"] = str(exc)
        return record
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
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULT_PATH.name}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(DistCase.from_dict(json.loads(args.worker)), args.rank, args.threads)))
        return 0
    records = [collect(case, log=lambda m: print(m, file=sys.stderr, flush=True)) for case in select(args.cases)]
    print(render(records))
    if not args.no_write:
        write_json(RESULT_PATH, {"machine": machine(), "steps": STEPS, "cases": records})
        print(f"\nwritten to {RESULT_PATH}")
    return 0 if all("failed" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
