"""The prune callback beside Lightning's own callbacks, cases a probe found: a run that ends before Lightning's
estimate of its length (EarlyStopping, a Timer, an accumulation schedule), weight averaging (SWA, EMA) that
copies a denser past back in after training, and the post-training report of a later fit."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn

from lightning_clipprune import MagnitudePruneCallback


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class StopAt(L.Callback):
    """Stops the fit as EarlyStopping does (``trainer.should_stop``) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=8)


def fit(model: Net, callbacks: list, epochs: int = 4, **kw: Any) -> tuple[L.Trainer, list[str]]:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=callbacks, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(), _loader() if kw.get("limit_val_batches") != 0 else None)
    return trainer, [str(w.message) for w in caught]


def _sparsity(model: Net) -> float:
    weights = [model.net[0].weight, model.net[2].weight]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_post_training_pruning_runs_when_the_run_ends_before_its_estimated_length() -> None:
    """EarlyStopping at step 12 of 32: the post-training event was scheduled at step 32 and never ran (0 % sparse)."""
    torch.manual_seed(0)
    model = Net()
    cb = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1.0)
    fit(model, [cb, StopAt(12)], limit_val_batches=0)
    assert _sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert cb.metrics_before_pruning is not None


def test_a_ramp_the_run_ends_before_is_named_in_a_warning() -> None:
    torch.manual_seed(0)
    model = Net()
    _, messages = fit(model, [MagnitudePruneCallback(sparsity=0.9, end=0.9), StopAt(8)], limit_val_batches=0)
    line = next(m for m in messages if "before the prune ramp's end" in m)
    assert "stopped early" in line and "not the target 0.9" in line
    assert _sparsity(model) < 0.9


def test_weight_averaging_before_the_ramps_end_leaves_the_model_sparse_with_a_warning() -> None:
    """SWA from epoch 1 of 4, the ramp to 0.9 ending at 60 %: the average was copied in with the pruned entries of
    the denser epochs (0.42 sparse)."""
    torch.manual_seed(0)
    model = Net()
    cb = MagnitudePruneCallback(sparsity=0.9, end=0.6)
    _, messages = fit(model, [cb, StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)], limit_val_batches=0)
    assert _sparsity(model) == pytest.approx(0.9, abs=2e-3)
    assert all(not bool((p.detach() != 0)[~m].any()) for n, p in model.named_parameters() if (m := cb.masks.get(n)) is not None)
    assert any("StochasticWeightAveraging put weights back" in m for m in messages)


def test_the_post_training_report_is_not_made_on_a_later_fits_validation(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Net()
    cb = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1.0)
    trainer, _ = fit(model, [cb], epochs=1)
    trainer.fit_loop.max_epochs = 2
    with caplog.at_level(logging.INFO):
        trainer.fit(model, _loader(), _loader())  # retrains: its validation is not "after post-training pruning"
    assert "after post-training pruning" not in caplog.text
    with caplog.at_level(logging.INFO):
        trainer.validate(model, _loader(), verbose=False)  # after the second fit's own post-training event: reported
    assert "after post-training pruning" in caplog.text


def test_a_best_checkpoint_from_before_the_ramps_end_is_named(tmp_path) -> None:
    """ModelCheckpoint(monitor="val_loss") kept epoch 0's checkpoint, 0.55 sparse for a 0.95 target, silently."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Rising(Net):  # val_loss rises every epoch: the first checkpoint stays the best
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", float(self.current_epoch))

    torch.manual_seed(0)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MagnitudePruneCallback(sparsity=0.95, end=0.75), best])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Rising(), _loader(), _loader())
    assert "step=8" in best.best_model_path
    assert any("best checkpoint" in str(w.message) and "written at step 8" in str(w.message) for w in caught)


def test_lr_rewind_beside_swa_is_named_in_a_warning() -> None:
    """SWA's `swa_lrs` were silently replaced by the rewind's cosine in its epochs."""
    torch.manual_seed(0)
    cb = MagnitudePruneCallback(sparsity=0.5, end=0.5, lr_rewind=1.0)
    _, messages = fit(Net(), [cb, StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3)], limit_val_batches=0)
    assert any("`lr_rewind` sets the learning rate" in m and "swa_lrs" in m for m in messages)
