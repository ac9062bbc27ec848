"""Resuming as users do, cases a probe found: the sparsity logger under gradient accumulation, optimizer values
changed on the app's resume command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn

from lightning_clipprune import MagnitudePruneCallback, SparsityLogger


class Steps(Logger):
    """Records the step of every ``sparsity/global`` row."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "sparsity/global" in metrics:
            self.steps.append(int(step))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _fit(tmp_path: Path, epochs: int, ckpt_path: str | None = None) -> Steps:
    torch.manual_seed(0)
    logger = Steps()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 8)), batch_size=8)
    trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=2, log_every_n_steps=2, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[MagnitudePruneCallback(sparsity=0.5, end=0.5),
                                   SparsityLogger(log_every_n_steps=2, print_table=False, inference_latency=False)])
    trainer.fit(Net(), data, ckpt_path=ckpt_path)
    return logger


def test_a_resumed_run_with_accumulation_does_not_log_its_resume_step_again(tmp_path: Path) -> None:
    first = _fit(tmp_path / "a", 2)  # 4 batches an epoch, 2 optimizer steps: global_step 4 at the end
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    resumed = _fit(tmp_path / "b", 4, str(ckpt))
    whole = _fit(tmp_path / "c", 4)
    assert first.steps and whole.steps[: len(first.steps)] == first.steps
    # before: the first batch after the resume (no optimizer step yet, global_step still 4) logged again
    assert resumed.steps == whole.steps[len(first.steps):]
