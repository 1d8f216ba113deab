"""MemGuard under real two-process DDP on the CPU (gloo): the ranks agree on one batch.

The two processes are forked (``ddp_fork``) where the platform can, so they inherit torch,
transformers and Lightning already imported (a few seconds instead of a minute of imports on a
small machine); elsewhere they are spawned (``ddp_spawn``). Only the CPU is used, so forking is safe
even when this process has touched CUDA.

Each rank sees other samples: rank 0 the even ones, 32 tokens long, rank 1 the odd ones, 128 tokens
long (a ``DistributedSampler`` without shuffling, set up by the module). So rank 1's step needs more
memory, the largest batch that fits differs between the ranks, and both must train with the one
that fits on rank 1.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import GPT2Config, GPT2LMHeadModel

import memguard
from memguard import MemGuard
from memguard.estimation.search import reduced_batch

pytestmark = pytest.mark.slow

SAMPLES = 32
SHORT, LONG = 32, 128
ASKED = 8
MARGIN = 0.1
STRATEGY = "ddp_fork" if "fork" in multiprocessing.get_all_start_methods() else "ddp_spawn"


class Parity(Dataset):
    """Sample ``i``: its index and ``LONG`` token ids, of which the first ``SHORT`` are kept when ``i`` is even."""

    def __init__(self) -> None:
        self.tokens = torch.randint(0, 1000, (SAMPLES, LONG), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.tokens[i, : SHORT if i % 2 == 0 else LONG]


class TinyGPT(pl.LightningModule):
    def __init__(self, out: str = "", batch_size: int = ASKED) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=LONG,
                                                bos_token_id=0, eos_token_id=0))
        self.seen: list[int] = []
        self.batch_sizes: list[int] = []

    def train_dataloader(self) -> DataLoader:
        data = Parity()
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        index, ids = batch
        if not MemGuard.is_tracing():
            self.seen += index.tolist()
            self.batch_sizes.append(len(index))
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def on_train_end(self) -> None:
        guard = next(cb for cb in self.trainer.callbacks if isinstance(cb, MemGuard))
        Path(self.hparams.out, f"rank{self.global_rank}.json").write_text(json.dumps({
            "fitting": guard.fitting_batch_size, "batch_size": guard.batch_size,
            "hparams_batch_size": self.hparams.batch_size, "accumulate": self.trainer.accumulate_grad_batches,
            "seen": self.seen, "batch_sizes": self.batch_sizes,
        }))


def _budget_for_long_samples(batch_size: int) -> int:
    module = TinyGPT()
    batch = (torch.arange(ASKED), torch.zeros(ASKED, LONG, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = memguard.estimate(module, batch_size=batch_size, example_input=batch,
                                step_fn=lambda b: module.training_step(b, 0), optimizer=torch.optim.AdamW,
                                device="cpu", training_loop="lightning", strategy="ddp", world_size=2,
                                accumulate_grad_batches=2)  # as the guard estimates a reduced batch
    return int(est.total_bytes / (1 - MARGIN)) + 1


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_ranks_agree_on_the_batch_that_fits_everywhere(tmp_path: Path) -> None:
    budget = _budget_for_long_samples(3)
    guard = MemGuard(action="reduce", budget=budget, margin=MARGIN)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=STRATEGY, max_epochs=1, callbacks=[guard],
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyGPT(out=str(tmp_path)))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    short, long = ranks
    assert long["fitting"] == 3 < short["fitting"]  # rank 0's samples are shorter: it could take more
    agreed, accumulate = reduced_batch(ASKED, 1, long["fitting"])
    for rank in ranks:
        assert rank["batch_size"] == rank["hparams_batch_size"] == agreed
        assert rank["accumulate"] == accumulate
        assert max(rank["batch_sizes"]) == agreed
    assert sorted(short["seen"] + long["seen"]) == list(range(SAMPLES))  # every sample once, on one rank
    assert all(i % 2 == 0 for i in short["seen"]) and all(i % 2 == 1 for i in long["seen"])


class Scheduled(TinyGPT):
    """Steps its scheduler and decays its learning rate in ``training_step`` (issue 15)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.lr_schedulers().step()
        for group in self.optimizers().param_groups:
            group["lr"] *= 0.9
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    def on_train_end(self) -> None:
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in self.parameters())).hexdigest()
        Path(self.hparams.out, f"rank{self.global_rank}.json").write_text(json.dumps({
            "weights": digest, "lr": self.trainer.optimizers[0].param_groups[0]["lr"], "seen": self.seen,
            "scheduler": self.trainer.lr_scheduler_configs[0].scheduler.last_epoch}))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_a_guarded_ddp_run_is_the_unguarded_run(tmp_path: Path) -> None:
    def run(out: Path, guard: MemGuard | None) -> list[dict[str, Any]]:
        out.mkdir()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=STRATEGY, max_steps=3,
                             callbacks=[guard] if guard else [], use_distributed_sampler=False, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Scheduled(out=str(out), batch_size=4))
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    plain = run(tmp_path / "plain", None)
    guarded = run(tmp_path / "guarded", MemGuard(action="warn", budget="64GiB"))
    assert plain[0]["scheduler"] == 3 and plain[0]["seen"]
    assert guarded == plain
