"""A small LightningModule and DataModule that tests/data/config/lightning.yaml names by class_path."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

SEQ = 64


class TinyLM(pl.LightningModule):
    """A two-layer GPT-2 trained on token ids."""

    def __init__(self, n_layer: int = 2, n_embd: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=1000,
                                                n_positions=128, bos_token_id=0, eos_token_id=0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TinyData(pl.LightningDataModule):
    """Random token ids; ``setup`` builds them (so the peek must call it), ``drawn`` counts loaders made.

    ``built`` keeps every instance, for tests to see what happened to the one a config built.
    """

    built: ClassVar[list[TinyData]] = []

    def __init__(self, batch_size: int = 4, samples: int = 32) -> None:
        super().__init__()
        TinyData.built.append(self)
        self.batch_size, self.samples = batch_size, samples
        self.tokens: torch.Tensor | None = None
        self.drawn = 0

    def setup(self, stage: str) -> None:
        self.tokens = torch.randint(0, 1000, (self.samples, SEQ))

    def train_dataloader(self) -> DataLoader:
        if self.tokens is None:
            raise RuntimeError("setup('fit') was not called")
        self.drawn += 1
        return DataLoader(TensorDataset(self.tokens), batch_size=self.batch_size, shuffle=True)
