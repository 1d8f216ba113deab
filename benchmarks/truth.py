"""Ground truth: the real peak memory of two training steps, measured on the CPU (or a GPU).

CPU, the RSS method (../shared/REFERENCES.md, "Measuring the truth on a CPU"): each case runs in a
fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor buffer by
``mmap`` and gives it back to the OS when freed, and with the caches of the math libraries off
(``MKL_DISABLE_FAST_MM=1``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``; ``--library-caches`` leaves
them on); resident memory then follows live buffers. In that process:

1. one throwaway training step of a small model of the same kind, with the same widths, batch
   size and sequence length (kernels, autograd, optimizer and autocast initialise lazily, and code
   pages are read in on first use; none of that is counted, including the part that grows with
   the batch: the truth is the steady-state step);
2. ``VmRSS`` is read just before the real model is built;
3. the model is built on the CPU with real weights and prepared (dtype, freezing, checkpointing),
   and one batch is made;
4. memguard's own probe (:class:`memguard.device.actual.MemoryProbe`) resets the high-water mark
   (``/proc/self/clear_refs`` = 5), so init transients do not count;
5. two full steps: forward (under ``torch.autocast`` for ``*-mixed``) and loss,
   ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Only
   the loss outlives the forward (the model's output, logits included, is dropped before
   ``backward``), as in Lightning, whose ``training_step`` returns just the loss (a case with
   ``keep_output`` holds it until the next forward returns, as ``outputs = model(**batch)`` does); the
   one batch is built before the steps and lives through both;
6. truth = ``VmHWM`` - ``VmRSS`` before the model: weights, batch and everything the steps add
   (the probe's reading, given the build's growth of ``VmRSS`` as already resident).

CUDA (only where ``torch.cuda.is_available()``): the same steps on the GPU; truth =
``torch.cuda.max_memory_allocated()`` (peak stats reset by the probe after the model is built)
minus what was allocated before the model; also recorded: peak reserved bytes and NVML's used
memory of the process (:func:`memguard.device.process_memory`: context, workspaces and cached
blocks included).

Usage (from the repository root)::

    python benchmarks/truth.py --case gpt2               # measure in this process, print JSON
    python benchmarks/truth.py --spec '{"model": "gpt2", "batch_size": 1, "seq_len": 64}'
    python benchmarks/truth.py --cases all               # one fresh process per case, table,
                                                         # writes out/benchmarks/truth_cpu.json
    python benchmarks/truth.py --cases all --update-results   # ... benchmarks/results/truth_cpu.json
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
    SCRATCH,
    machine_info,
    median,
    mib,
    read_json,
    readable_result,
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


def env_ready(library_caches: bool = False) -> bool:
    """Whether this process started with the allocator settings of :func:`allocator_env`."""
    wanted = allocator_env(library_caches)
    return all(os.environ.get(k) == wanted.get(k) for k in (*MALLOC_ENV, *CACHES_OFF_ENV))


def cache_name(device: str, library_caches: bool = False) -> str:
    """The file measured truths are kept in: ``truth_<device>.json``."""
    return f"truth_{device}{'_library-caches' if library_caches else ''}.json"


def cache_path(device: str, library_caches: bool = False, *, update_results: bool = False) -> Path:
    """Where new truths are written: ``out/benchmarks/`` (ignored by git), or the tracked
    ``benchmarks/results/`` with ``update_results``."""
    return (RESULTS if update_results else SCRATCH) / cache_name(device, library_caches)


# --------------------------------------------------------------------------- in this process


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``; psutil reads ``/proc/self/statm``)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


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
    losses, kept = [], None
    for _ in range(steps):
        with _autocast(device, precision.autocast_dtype):
            output = module(*args, **kwargs)
            loss = case_loss(case, output, inputs)
        if case.keep_output:  # outputs = model(**batch): the last output lived until this one returned
            kept = output
        del output  # else only the loss outlives the forward, as in Lightning's training_step
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
    del kept
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
    """Measure ``case`` in this process by the RSS method (see the module docstring).

    The high-water mark is memguard's own probe (:class:`memguard.device.actual.MemoryProbe`, the
    one the callback compares its predictions with): started after the build with the build's
    growth of ``VmRSS`` as what is already resident, it reads ``VmHWM`` - ``VmRSS`` before the model.
    """
    import torch

    from memguard.device.actual import MemoryProbe

    if not env_ready(library_caches):
        raise RuntimeError("start the process with the environment of allocator_env()")
    _warm_up(case, "cpu")
    probe = MemoryProbe(torch.device("cpu"), reset=True)
    rss_before = rss_bytes()
    module, inputs = _build(case, "cpu")
    built = rss_bytes() - rss_before
    if not probe.start(resident=built):  # resets VmHWM: the build's transients are not counted
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs (Linux >= 4.0 needed)")
    start = time.perf_counter()
    losses = _train_steps(module, case, inputs, "cpu")
    seconds = time.perf_counter() - start
    measured = probe.read()
    if measured is None or measured.lower_bound:
        raise RuntimeError(f"no exact CPU measurement: {measured.caveat if measured else 'VmHWM unreadable'}")
    return {
        "case": case.name, "device": "cpu", "peak_bytes": measured.peak_bytes,
        "model_and_batch_bytes": built, "rss_before_model": rss_before,
        "param_bytes": _param_bytes(module), "steps": STEPS,
        "step_seconds": seconds / STEPS, "losses": losses, "library_caches": library_caches,
    }


def measure_cuda(case: Case) -> dict[str, Any]:
    """Measure ``case`` on the current GPU with memguard's probe: allocator statistics and NVML.

    :class:`memguard.device.actual.MemoryProbe` resets the peak statistics after the build and
    reads ``torch.cuda.max_memory_allocated()`` and the process's NVML usage
    (:func:`memguard.device.process_memory`, the GPU matched by UUID; ``None`` where NVML does not
    list this process, e.g. in a container whose PID namespace hides it).
    """
    import torch

    from memguard.device.actual import MemoryProbe

    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA build of torch and a visible GPU")
    _warm_up(case, "cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    probe = MemoryProbe(torch.device("cuda", torch.cuda.current_device()), reset=True)
    allocated_before = torch.cuda.memory_allocated()
    module, inputs = _build(case, "cuda")
    torch.cuda.synchronize()
    built = torch.cuda.memory_allocated()
    if not probe.start(resident=built):
        raise RuntimeError("cannot reset the CUDA peak memory statistics")
    start = time.perf_counter()
    losses = _train_steps(module, case, inputs, "cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    measured = probe.read()
    if measured is None:
        raise RuntimeError("cannot read torch.cuda.max_memory_allocated()")
    return {
        "case": case.name, "device": "cuda",
        "peak_bytes": measured.peak_bytes - allocated_before,
        "model_and_batch_bytes": built - allocated_before,
        "allocated_before_model": allocated_before,
        "max_allocated": measured.peak_bytes,
        "max_reserved": torch.cuda.max_memory_reserved(),
        "nvml_process_used_bytes": measured.total_bytes,
        "param_bytes": _param_bytes(module), "steps": STEPS, "step_seconds": seconds / STEPS,
        "losses": losses,
    }


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure(case: Case, device: str = "cpu", library_caches: bool = False) -> dict[str, Any]:
    """Measure ``case`` in this process; it must be fresh (nothing measured in it before)."""
    return measure_cuda(case) if device == "cuda" else measure_cpu(case, library_caches)


# --------------------------------------------------------------------------- fresh processes


def measure_in_subprocess(case: Case, device: str = "cpu", timeout: float = SUBPROCESS_TIMEOUT_S,
                          library_caches: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Measure ``case`` in a fresh Python process with the allocator settings of the method.

    ``threads``: torch's intra-op threads there (default: torch's own choice, one per core). One
    thread suits a tiny model, which gains nothing from more and, on a busy machine, waits for them.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device]
    if threads is not None:
        cmd += ["--threads", str(threads)]
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
    data = read_json(readable_result(cache_name(device, library_caches)))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
        return {"machine": None, "cases": {}}
    return data


def save_cache(device: str, data: dict[str, Any], library_caches: bool = False, *,
               update_results: bool = False) -> None:
    data["machine"] = machine_info(device)
    data["environment"] = {k: v for k, v in allocator_env(library_caches).items()
                           if k in (*MALLOC_ENV, *CACHES_OFF_ENV)}
    write_json(cache_path(device, library_caches, update_results=update_results), data)


def cached_truth(cases: Sequence[Case], device: str = "cpu", *, refresh: bool = False,
                 log: Any = None, update_results: bool = False) -> dict[str, dict[str, Any] | Exception]:
    """The truth of each case: from the cache when its spec is unchanged, else measured.

    New measurements are written to the cache one by one (:func:`cache_path`: the scratch copy
    unless ``update_results``). A case that cannot be measured maps to its exception.
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
            save_cache(device, cache, update_results=update_results)
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
    if args.device == "cpu" and not env_ready(args.library_caches):
        # glibc and MKL read their variables at start-up only: start again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], allocator_env(args.library_caches))
    case = get_case(args.case) if args.case else Case.from_dict(json.loads(args.spec))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
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
            save_cache(args.device, cache, args.library_caches, update_results=args.update_results)
    print(_table(records))
    if not args.no_write:
        print(f"\nwritten to {cache_path(args.device, args.library_caches, update_results=args.update_results)}")
    return 0 if records else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--case", help="measure this case in this process and print JSON")
    what.add_argument("--spec", help="measure a case given as JSON in this process")
    what.add_argument("--cases", help="comma-separated case names or 'all': one process each")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (with --cases)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (with --case or --spec; default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="do not update the result file")
    parser.add_argument("--update-results", action="store_true",
                        help="write benchmarks/results/truth_<device>.json, the tracked file, instead of "
                             "out/benchmarks/ (which git ignores)")
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
