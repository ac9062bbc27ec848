"""``Classifier``: the one LightningModule of the experiments (cross entropy, accuracy, SGD + cosine)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_clipprune._validation import check_choice, check_int, check_real
from lightning_clipprune.app.checks import LR_SCHEDULES

__all__ = ["Classifier", "LR_SCHEDULES"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Classifier(L.LightningModule):
    """Trains any network that maps inputs to logits with cross entropy; reports accuracy.

    Logged: ``train/loss`` (per step), ``val/loss`` and ``val/acc`` (per epoch), ``test/loss`` and
    ``test/acc`` when the Trainer tests. The learning rate follows ``lr_schedule`` per optimizer step, over
    the whole run (``trainer.estimated_stepping_batches``), after an optional linear warm-up.

    Args:
        net: the network (``nn.Module``) returning ``(batch, num_classes)`` logits.
        num_classes: number of classes, for the accuracy metric.
        optimizer: a callable that takes the parameters and returns an optimizer, such as
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)`` or a Hydra ``_partial_: true``
            node. ``None``: SGD, lr 0.1, momentum 0.9, weight decay 5e-4.
        lr_schedule: ``"cosine"`` (decay to 0 at the end of training) or ``"constant"``.
        warmup_fraction: fraction of the optimizer steps spent warming the learning rate up linearly from 0.
        label_smoothing: label smoothing of the cross entropy (0 turns it off).

    Raises:
        ValueError: for an unknown ``lr_schedule``, a ``warmup_fraction`` outside [0, 1), a
            ``label_smoothing`` outside [0, 1) or ``num_classes`` < 2.

    Example::

        >>> from functools import partial
        >>> from lightning_clipprune.app.models import MLP
        >>> model = Classifier(MLP(64, [32], 10), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05))
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: str = "cosine",
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("Classifier", "lr_schedule", lr_schedule, LR_SCHEDULES)
        warmup_fraction = check_real("Classifier", "warmup_fraction", warmup_fraction, low=0.0, high=1.0, high_open=True)
        label_smoothing = check_real("Classifier", "label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        check_int("Classifier", "num_classes", num_classes, low=2)
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_fraction = warmup_fraction
        self.label_smoothing = label_smoothing
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _lr_factor(self, step: int, total: int) -> float:
        warmup = int(self.warmup_fraction * total)
        if step < warmup:
            return (step + 1) / warmup
        if self.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        factory = self.optimizer_factory
        if factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = factory(self.parameters())
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            rank_zero_warn("Classifier: training length unknown (no max_epochs/max_steps): constant learning rate")
            return optimizer
        total = int(total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
