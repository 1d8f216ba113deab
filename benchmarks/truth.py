"""Ground truth: the real peak memory of two training steps, measured on the CPU (or a GPU).

CPU, the RSS method (../shared/REFERENCES.md, "Measuring the truth on a CPU"): each case runs in a
fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor buffer by
``mmap`` and gives it back to the OS when freed, and with the caches of the math libraries off
(``MKL_DISABLE_FAST_MM=1``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``; ``--library-caches`` leaves
them on); resident memory then follows live buffers. In that process:

1. one throwaway training step of a small model of the same kind, with the same widths and
   sequence length (kernels, autograd, optimizer and autocast initialise lazily, and code pages
   are read in on first use; none of that is counted);
2. ``VmRSS`` is read just before the real model is built;
3. the model is built on the CPU with real weights and prepared (dtype, freezing, checkpointing),
   and one batch is made;
4. the high-water mark is reset (``/proc/self/clear_refs`` = 5), so init transients do not count;
5. two full steps: forward (under ``torch.autocast`` for ``*-mixed``) and loss,
   ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Only
   the loss outlives the forward (the model's output, logits included, is dropped before
   ``backward``), as in Lightning, whose ``training_step`` returns just the loss; the one batch
   is built before the steps and lives through both;
6. truth = ``VmHWM`` - ``VmRSS`` before the model: weights, batch and everything the steps add.

CUDA (only where ``torch.cuda.is_available()``): the same steps on the GPU; truth =
``torch.cuda.max_memory_allocated()`` (peak stats reset after the model is built) minus what was
allocated before the model; also recorded: peak reserved bytes and NVML's used memory of the
process (context, workspaces and cached blocks included).

Usage (from the repository root)::

    python benchmarks/truth.py --case gpt2               # measure in this process, print JSON
    python benchmarks/truth.py --spec '{"model": "gpt2", "batch_size": 1, "seq_len": 64}'
    python benchmarks/truth.py --cases all               # one fresh process per case, table,
                                                         # updates benchmarks/results/truth_cpu.json
    python benchmarks/truth.py --cases gpt2 --repeat 3   # repeatability: spread of 3 runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    RESULTS,
    machine_info,
    median,
    mib,
    read_json,
    render_table,
    write_json,
)
from benchmarks.cases import Case, get_case, select_cases

STEPS = 2
SUBPROCESS_TIMEOUT_S = 900

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: serve every allocation of 64 KiB or more by ``mmap``, so freed buffers leave RSS."""

CACHES_OFF_ENV = {"MKL_DISABLE_FAST_MM": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
"""No caches inside the math libraries. MKL keeps the packing buffers of its fp32 GEMMs in a pool
of its own (tens of MiB on these models, up to 7% of the peak), and oneDNN keeps the primitives
of its bf16 kernels with their buffers. With both off, RSS follows live buffers as
``torch.cuda.max_memory_allocated`` does on a GPU, where cached blocks are not counted either."""


def allocator_env(library_caches: bool = False) -> dict[str, str]:
    """The environment of a measuring process: this one's, with the allocator settings."""
    env = {**os.environ, **MALLOC_ENV}
    for key, value in CACHES_OFF_ENV.items():
        if library_caches:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _env_ready(library_caches: bool) -> bool:
    wanted = allocator_env(library_caches)
    return all(os.environ.get(k) == wanted.get(k) for k in (*MALLOC_ENV, *CACHES_OFF_ENV))


def cache_path(device: str, library_caches: bool = False) -> Path:
    """Where measured truths are kept: ``benchmarks/results/truth_<device>.json``."""
    return RESULTS / f"truth_{device}{'_library-caches' if library_caches else ''}.json"


# --------------------------------------------------------------------------- in this process


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> None:
    """Reset ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _train_steps(module: Any, case: Case, inputs: Any, device: str,
                 steps: int = STEPS) -> list[float]:
    """``steps`` full training steps as a PyTorch loop runs them; returns the losses."""
    import torch

    from benchmarks.cases import case_loss
    from memguard.estimation.spec import make_optimizer, resolve_optimizer, resolve_precision

    precision = resolve_precision(case.precision)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(resolve_optimizer(case.optimizer), params)
    scaler = torch.amp.GradScaler(device) if precision.grad_scaler else None
    args, kwargs = inputs
    losses = []
    for _ in range(steps):
        with _autocast(device, precision.autocast_dtype):
            output = module(*args, **kwargs)
            loss = case_loss(case, output, inputs)
        del output  # only the loss outlives the forward, as in Lightning's training_step
        (scaler.scale(loss) if scaler else loss).backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))
        del loss
    return losses


@contextlib.contextmanager
def _autocast(device: str, dtype: Any) -> Iterator[None]:
    import torch

    if dtype is None:
        yield
        return
    with torch.autocast(device, dtype=dtype):
        yield


def _warm_up(case: Case, device: str) -> None:
    """One throwaway step of a tiny model of the same kind, then free it."""
    import torch

    from benchmarks.cases import make_inputs, prepared_module, warmup_case

    tiny = warmup_case(case)
    torch.manual_seed(0)
    module = prepared_module(tiny, device)
    _train_steps(module, tiny, make_inputs(tiny, module, device=device), device, steps=1)
    del module
    gc.collect()


def _build(case: Case, device: str) -> tuple[Any, Any]:
    import torch

    from benchmarks.cases import make_inputs, prepared_module

    torch.manual_seed(0)
    module = prepared_module(case, device)
    inputs = make_inputs(case, module, torch.Generator().manual_seed(0), device=device)
    return module, inputs


def measure_cpu(case: Case, library_caches: bool = False) -> dict[str, Any]:
    """Measure ``case`` in this process by the RSS method (see the module docstring)."""
    if not _env_ready(library_caches):
        raise RuntimeError("start the process with the environment of allocator_env()")
    _warm_up(case, "cpu")
    rss_before = _proc_status_bytes("VmRSS")
    module, inputs = _build(case, "cpu")
    rss_built = _proc_status_bytes("VmRSS")
    _reset_hwm()
    start = time.perf_counter()
    losses = _train_steps(module, case, inputs, "cpu")
    seconds = time.perf_counter() - start
    hwm = _proc_status_bytes("VmHWM")
    return {
        "case": case.name, "device": "cpu", "peak_bytes": hwm - rss_before,
        "model_and_batch_bytes": rss_built - rss_before, "rss_before_model": rss_before,
        "vm_hwm": hwm, "param_bytes": _param_bytes(module), "steps": STEPS,
        "step_seconds": seconds / STEPS, "losses": losses, "library_caches": library_caches,
    }


def measure_cuda(case: Case) -> dict[str, Any]:
    """Measure ``case`` on the current GPU with the caching allocator's statistics and NVML."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA build of torch and a visible GPU")
    _warm_up(case, "cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated()
    module, inputs = _build(case, "cuda")
    torch.cuda.synchronize()
    built = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = _train_steps(module, case, inputs, "cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "case": case.name, "device": "cuda",
        "peak_bytes": torch.cuda.max_memory_allocated() - allocated_before,
        "model_and_batch_bytes": built - allocated_before,
        "allocated_before_model": allocated_before,
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "nvml_process_used_bytes": _nvml_process_used(),
        "param_bytes": _param_bytes(module), "steps": STEPS, "step_seconds": seconds / STEPS,
        "losses": losses,
    }


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _nvml_process_used() -> int | None:
    """NVML's used memory of this process on the current GPU, or ``None`` if NVML cannot tell.

    Read after the steps: the caching allocator keeps its peak reserved blocks, so this is the
    device memory the step needed, CUDA context and library workspaces included. The GPU is found
    by UUID (CUDA and NVML number devices differently); under MIG or in a PID namespace where NVML
    cannot see our PID, a lone process on the device is taken to be this one.
    """
    import torch

    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except (pynvml.NVMLError, AttributeError, RuntimeError):
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    mine = [p for p in procs if p.pid == os.getpid()] or (procs if len(procs) == 1 else [])
    used = mine[0].usedGpuMemory if mine else None
    return int(used) if used is not None else None


def measure(case: Case, device: str = "cpu", library_caches: bool = False) -> dict[str, Any]:
    """Measure ``case`` in this process; it must be fresh (nothing measured in it before)."""
    return measure_cuda(case) if device == "cuda" else measure_cpu(case, library_caches)


# --------------------------------------------------------------------------- fresh processes


def measure_in_subprocess(case: Case, device: str = "cpu", timeout: float = SUBPROCESS_TIMEOUT_S,
                          library_caches: bool = False) -> dict[str, Any]:
    """Measure ``case`` in a fresh Python process with the allocator settings of the method."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device]
    if _is_listed(case):
        cmd += ["--case", case.name]
    else:
        cmd += ["--spec", json.dumps(case.to_dict())]
    if library_caches:
        cmd.append("--library-caches")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=allocator_env(library_caches),
                          timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"truth for {case.name!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _is_listed(case: Case) -> bool:
    try:
        return get_case(case.name) == case
    except KeyError:
        return False


def measure_repeated(case: Case, device: str, repeat: int,
                     library_caches: bool = False) -> dict[str, Any]:
    """``repeat`` fresh-process runs of ``case``: the median run, all peaks and their spread."""
    runs = [measure_in_subprocess(case, device, library_caches=library_caches) for _ in range(repeat)]
    peaks = [r["peak_bytes"] for r in runs]
    mid = sorted(runs, key=lambda r: r["peak_bytes"])[(len(runs) - 1) // 2]
    record = dict(mid)
    record["runs"] = peaks
    record["spread"] = (max(peaks) - min(peaks)) / median(peaks) if len(peaks) > 1 else None
    record["spec"] = case.to_dict()
    record["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def load_cache(device: str, library_caches: bool = False) -> dict[str, Any]:
    """The cached truths of ``device``: ``{"machine": ..., "cases": {name: record}}``."""
    data = read_json(cache_path(device, library_caches))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
        return {"machine": None, "cases": {}}
    return data


def save_cache(device: str, data: dict[str, Any], library_caches: bool = False) -> None:
    data["machine"] = machine_info(device)
    data["environment"] = {k: v for k, v in allocator_env(library_caches).items()
                           if k in (*MALLOC_ENV, *CACHES_OFF_ENV)}
    write_json(cache_path(device, library_caches), data)


def cached_truth(cases: Sequence[Case], device: str = "cpu", *, refresh: bool = False,
                 log: Any = None) -> dict[str, dict[str, Any] | Exception]:
    """The truth of each case: from the cache when its spec is unchanged, else measured.

    New measurements are written to the cache one by one. A case that cannot be measured maps to
    its exception.
    """
    cache = load_cache(device)
    out: dict[str, dict[str, Any] | Exception] = {}
    for case in cases:
        record = cache["cases"].get(case.name)
        if refresh or not record or record.get("spec") != case.to_dict():
            if log:
                log(f"measuring truth of {case.name} ...")
            try:
                record = measure_repeated(case, device, 1)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                out[case.name] = exc
                continue
            cache["cases"][case.name] = record
            save_cache(device, cache)
        out[case.name] = record
    return out


# --------------------------------------------------------------------------- command line


def _table(records: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        spread = r.get("spread")
        rows.append([
            r["case"], str(r["peak_bytes"]), mib(r["peak_bytes"]), mib(r["model_and_batch_bytes"]),
            f"{r['step_seconds']:.2f}", str(len(r.get("runs", [1]))),
            "-" if spread is None else f"{100 * spread:.2f}%",
        ])
    headers = ["case", "peak bytes", "peak MiB", "model+batch MiB", "s/step", "runs", "spread"]
    return render_table(headers, rows)


def _measure_here(args: argparse.Namespace) -> int:
    if args.device == "cpu" and not _env_ready(args.library_caches):
        # glibc and MKL read their variables at start-up only: start again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], allocator_env(args.library_caches))
    case = get_case(args.case) if args.case else Case.from_dict(json.loads(args.spec))
    print(json.dumps(measure(case, args.device, args.library_caches)))
    return 0


def _measure_many(args: argparse.Namespace) -> int:
    cache = load_cache(args.device, args.library_caches)
    records = []
    for case in select_cases(args.cases):
        print(f"measuring {case.name} ({args.repeat} run(s)) ...", file=sys.stderr, flush=True)
        try:
            record = measure_repeated(case, args.device, args.repeat, args.library_caches)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"  failed: {exc}", file=sys.stderr)
            continue
        records.append(record)
        if not args.no_write:
            cache["cases"][case.name] = record
            save_cache(args.device, cache, args.library_caches)
    print(_table(records))
    if not args.no_write:
        print(f"\nwritten to {cache_path(args.device, args.library_caches)}")
    return 0 if records else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--case", help="measure this case in this process and print JSON")
    what.add_argument("--spec", help="measure a case given as JSON in this process")
    what.add_argument("--cases", help="comma-separated case names or 'all': one process each")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (with --cases)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-write", action="store_true", help="do not update the result file")
    parser.add_argument("--library-caches", action="store_true",
                        help="leave MKL's and oneDNN's caches on (CPU; results go to "
                             "truth_cpu_library-caches.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no GPU is visible to torch here")
    if args.case or args.spec:
        return _measure_here(args)
    return _measure_many(args)


if __name__ == "__main__":
    sys.exit(main())
