"""On a GPU: a guarded fit forked from a process holding a CUDA context and an NCCL group is the unguarded fit.

The trace runs in a forked child (:mod:`memguard.estimation.sandbox`). A child of a process that has
initialised CUDA must not touch CUDA (PyTorch refuses: "Cannot re-initialize CUDA in forked
subprocess") and must not use the parent's NCCL communicator. This script checks, on a real GPU,
that the guard still estimates there and that the run is unchanged: it initialises a one-rank NCCL
process group, fits a small Lightning module on ``cuda:0`` with a scheduler stepped in
``training_step`` twice, without and with ``MemGuard("warn")``, and compares the final weights bit for
bit, the learning rates and the CUDA peak the user reads. Prints one JSON line; exit 0 when equal.

    python benchmarks/gpu_isolation.py
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import torch


def _fit(guard: Any) -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch import nn

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.lr_schedulers().step()
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def train_dataloader(self) -> Any:
            g = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g))
            return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=g)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    pl.seed_everything(0, verbose=False)
    module = Module()
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard] if guard else [])
    trainer.fit(module)
    torch.cuda.synchronize()
    return {"weights": [p.detach().cpu() for p in module.parameters()],
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "estimated": getattr(guard, "estimate", None) is not None if guard else None}


def main() -> int:
    from memguard import MemGuard

    warnings.simplefilter("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    spike = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # the user's own peak, before the fits
    del spike
    user_peak = torch.cuda.max_memory_allocated()
    plain = _fit(None)
    guarded = _fit(MemGuard(action="warn", budget="64GiB"))
    torch.distributed.barrier()  # the parent's NCCL group still works after the children
    same = all(torch.equal(a, b) for a, b in zip(plain["weights"], guarded["weights"], strict=True))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "same_weights": same,
              "same_lr": plain["lr"] == guarded["lr"], "estimated": guarded["estimated"],
              "user_peak_kept": torch.cuda.max_memory_allocated() >= user_peak}
    print(json.dumps(result))
    torch.distributed.destroy_process_group()
    return 0 if same and result["same_lr"] and result["estimated"] and result["user_peak_kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
