"""Fine-tune a small GPT-2-style model with the transformers ``Trainer``, guarded by ``MemGuardCallback``.

The model is a GPT-2 built from a small config (4 layers, 128 wide, byte-level vocabulary), trained
on the docstrings of a few standard-library modules; everything runs offline on the CPU. The run
asks for batches of 32 under a memory budget that holds about a quarter of that. A ``Trainer``
builds its data loader before any callback runs, so ``MemGuardCallback(action="reduce")`` cannot
shrink the batch itself: before the first step it raises ``BatchTooLargeError`` with the
``per_device_train_batch_size`` and ``gradient_accumulation_steps`` that fit, and this script
trains again with them. After the first steps the callback puts the memory the steps really used
next to its prediction in ``trainer.state.log_history``.

    python examples/finetune_trainer.py                  # budget 128MiB, batch 32: retrain with what fits
    python examples/finetune_trainer.py --budget 1GiB    # everything fits: nothing changes
    python examples/finetune_trainer.py --action raise   # stop before the first step instead

On the CPU, "actual" is the growth of the process's resident memory over the steps after the
first; it follows live tensors when glibc returns freed buffers to the OS, which this script asks
for by starting itself again with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from memguard import InsufficientMemoryError, format_bytes
from memguard.integrations.transformers import BatchTooLargeError, MemGuardCallback

SEQ = 128


class Windows(Dataset):
    """Non-overlapping windows of ``SEQ`` bytes of some standard-library docstrings, as causal-LM samples."""

    def __init__(self) -> None:
        names = ("argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "functools", "json",
                 "logging", "pathlib", "re", "typing", "unittest", "zipfile")
        text = "\n\n".join(importlib.import_module(n).__doc__ or "" for n in names)
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.windows = data[: len(data) // SEQ * SEQ].view(-1, SEQ)  # (n, SEQ)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}  # the model shifts the labels


def train(batch_size: int, accumulation: int, guard: MemGuardCallback, max_steps: int, out: str) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=max_steps, learning_rate=3e-3,
                             weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Windows(), callbacks=[guard])
    trainer.remove_callback(PrinterCallback)  # the losses are summed up at the end
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="128MiB", help="memory one step may use (default: 128MiB)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--action", default="reduce", choices=("warn", "raise", "reduce"))
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a model this small gains little from more)")
    args = parser.parse_args()

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start: run again with it set
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed buffers go back to the OS
        os.execv(sys.executable, [sys.executable, *sys.argv])
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("memguard").setLevel(logging.INFO)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="memguard-trainer-")

    start = time.perf_counter()
    batch, accumulation = args.batch_size, 1
    guard = MemGuardCallback(args.action, budget=args.budget, margin=0.1)
    try:
        trainer = train(batch, accumulation, guard, args.max_steps, out)
    except BatchTooLargeError as err:
        print(f"\n{err}\n")
        batch, accumulation = err.batch_size, err.gradient_accumulation_steps
        print(f"=== training again with per_device_train_batch_size={batch}, "
              f"gradient_accumulation_steps={accumulation} ===")
        guard = MemGuardCallback("raise", budget=args.budget, margin=0.1)
        trainer = train(batch, accumulation, guard, args.max_steps, out)
    except InsufficientMemoryError as err:
        print(f"\nstopped before the first step:\n{err}")
        return
    elapsed = time.perf_counter() - start

    entry: dict[str, Any] = next((e for e in trainer.state.log_history if "memguard/error" in e), {})
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"\n=== memguard: predicted vs actual ({elapsed:.1f} s, {trainer.state.global_step} optimizer steps) ===")
    print(f"batch size        asked {args.batch_size:>4}  trained {batch:>4}")
    print(f"accumulation      asked {1:>4}  trained {accumulation:>4}")
    print(f"effective batch   asked {args.batch_size:>4}  trained {batch * accumulation:>4}")
    print(f"budget            {format_bytes(guard.available_bytes or 0)} (margin 10%)")
    if entry:
        bound = "  (a lower bound: glibc's mmap threshold is not pinned in the environment)" \
            if entry["memguard/actual_is_lower_bound"] else ""
        print(f"predicted peak    {format_bytes(entry['memguard/predicted_peak_bytes'])}")
        print(f"actual peak       {format_bytes(entry['memguard/actual_peak_bytes'])}  "
              f"(error {100 * entry['memguard/error']:+.1f}%){bound}")
        print(f"log_history       {entry}")
    else:
        print("actual peak       not measured here")
    if losses:
        print(f"train loss        {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"\n{guard.estimate}")


if __name__ == "__main__":
    main()
