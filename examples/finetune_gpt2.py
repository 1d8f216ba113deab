"""Fine-tune a small GPT-2-style model on the CPU with MemGuard guarding the memory of each step.

The model is a GPT-2 built from a small config (4 layers, 128 wide, byte-level vocabulary), trained
on the docstrings of a few standard-library modules; everything runs offline on the CPU in well
under a minute. The run asks for batches of 32 under a memory budget that holds about a quarter of
that, so ``MemGuard(action="reduce")`` picks a smaller batch and more gradient accumulation
before the first step, and logs the memory the steps really used next to its prediction.

    python examples/finetune_gpt2.py                  # budget 128MiB, batch 32
    python examples/finetune_gpt2.py --budget 1GiB    # everything fits: nothing changes
    python examples/finetune_gpt2.py --action raise   # stop before the first step instead

On the CPU, "actual" is the growth of the process's resident memory over the steps after the
first; it follows live tensors when glibc returns freed buffers to the OS, which this script asks
for (as ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment would).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import importlib
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from memguard import InsufficientMemoryError, MemGuard, format_bytes

try:  # the unified package, else the standalone one: MemGuard works with both
    pl = importlib.import_module("lightning.pytorch")
except ImportError:
    pl = importlib.import_module("pytorch_lightning")

SEQ = 128


def corpus() -> torch.Tensor:
    """Bytes of some standard-library docstrings: a few tens of KiB of English and code."""
    names = ("argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "functools", "json",
             "logging", "pathlib", "re", "typing", "unittest", "zipfile")
    text = "\n\n".join(importlib.import_module(n).__doc__ or "" for n in names)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class TextData(pl.LightningDataModule):
    """Non-overlapping windows of ``SEQ + 1`` bytes; the batch size lives here, where MemGuard sets it."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        data = corpus()
        n = (len(data) - 1) // SEQ
        self.windows = data[: n * SEQ + 1].unfold(0, SEQ + 1, SEQ)  # (n, SEQ + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows), batch_size=self.batch_size, shuffle=True)


class ByteGPT(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=SEQ, bos_token_id=0,
                            eos_token_id=0)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (window,) = batch
        inputs, targets = window[:, :-1], window[:, 1:]
        logits = self.model(input_ids=inputs).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="128MiB", help="memory one step may use (default: 128MiB)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--action", default="reduce", choices=("warn", "raise", "reduce"))
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a model this small gains little from more, and on a busy "
                             "machine they wait for each other)")
    args = parser.parse_args()

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed buffers go back to the OS
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("memguard.estimation.search").setLevel(logging.INFO)  # the batch sizes tried
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    guard = MemGuard(action=args.action, budget=args.budget, margin=0.1)
    data = TextData(batch_size=args.batch_size)
    logs = Path(tempfile.mkdtemp(prefix="memguard-example-"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.max_steps, callbacks=[guard],
                         logger=pl.loggers.CSVLogger(logs), log_every_n_steps=1, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    start = time.perf_counter()
    try:
        trainer.fit(ByteGPT(), datamodule=data)
    except InsufficientMemoryError as err:
        print(f"\nstopped before the first step:\n{err}")
        return
    elapsed = time.perf_counter() - start

    print(f"\n=== memguard: predicted vs actual ({elapsed:.1f} s, {trainer.global_step} optimizer steps) ===")
    print(f"batch size        asked {guard.requested_batch_size:>4}  trained {guard.batch_size:>4}")
    print(f"accumulation      asked {guard.requested_accumulate_grad_batches:>4}  "
          f"trained {guard.accumulate_grad_batches:>4}")
    print(f"effective batch   asked {guard.requested_batch_size * guard.requested_accumulate_grad_batches:>4}  "
          f"trained {guard.batch_size * guard.accumulate_grad_batches:>4}")
    print(f"budget            {format_bytes(guard.available_bytes)} (margin 10%)")
    m = guard.metrics
    if m:
        print(f"predicted peak    {format_bytes(m['memguard/predicted_peak_bytes'])}")
        print(f"actual peak       {format_bytes(m['memguard/actual_peak_bytes'])}  "
              f"(error {100 * m['memguard/error']:+.1f}%)")
    else:
        print("actual peak       not measured here")
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]
    if losses:
        print(f"train loss        {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"metrics           {Path(trainer.logger.log_dir) / 'metrics.csv'}")
    print(f"\n{guard.estimate}")


if __name__ == "__main__":
    main()
