"""Tiny modules and data shared by the callback tests (CPU, seconds each)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune.loggers import MemoryLogger

__all__ = ["MemoryLogger", "TinyClassifier", "random_loader", "shut_down_process_groups", "tiny_trainer"]


def random_loader(n: int = 128, in_features: int = 16, classes: int = 4, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A fixed, learnable classification problem: labels from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    teacher = torch.randn(in_features, classes, generator=g)
    y = (x @ teacher).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyClassifier(L.LightningModule):
    """Two Linear layers; `optimizer` is "sgd" (momentum 0.9), "adam" or "adamw".

    Args:
        in_features: input width.
        hidden: hidden width.
        classes: number of classes.
        optimizer: which optimizer `configure_optimizers` returns.
        lr: learning rate.
    """

    def __init__(self, in_features: int = 16, hidden: int = 32, classes: int = 4, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}")


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer writing into `tmp_path`; keyword arguments override the defaults."""
    defaults = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def shut_down_process_groups() -> None:
    """End a worker script's process groups on every rank together, while the interpreter is whole.

    Left to the interpreter's exit, gloo's threads can abort a rank that finished its work ("terminate called
    without an active exception", pytorch/pytorch#190489): the run's return code is then -6. Under gloo the
    ranks meet at a barrier that gives up after two minutes, so a rank that failed does not hold the other.
    """
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
    else:
        dist.barrier()
    dist.destroy_process_group()
