"""MagnitudePruneCallback and SparsityLogger in set-ups users bring: manual optimization that steps several
optimizers a batch (or one every other batch), post-training pruning seen by the logger, targets the ceiling
makes impossible, streams of unknown length. Tiny CPU fits, a few seconds in all.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_clipprune import MagnitudePruneCallback, SparsityLogger
from tests.helpers import TinyClassifier, random_loader, tiny_trainer


class _Manual(TinyClassifier):
    """The tiny classifier under manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(_Manual):
    """Each layer has its own optimizer, both stepped every batch (global_step += 2)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class EveryOtherBatch(_Manual):
    """Accumulation by hand: one optimizer step every second batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y) / 2)
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()


class _Zeros(Callback):
    """The fraction of zeros of the first layer after every training batch."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.seen.append(float((pl_module.net[0].weight == 0).float().mean()))


def _fit(tmp_path: Path, model: L.LightningModule, prune: MagnitudePruneCallback, **kw) -> _Zeros:
    L.seed_everything(0, verbose=False)
    zeros = _Zeros()
    loader = kw.pop("loader", None)
    loader = random_loader() if loader is None else loader
    trainer = tiny_trainer(tmp_path, callbacks=[prune, zeros, *kw.pop("callbacks", [])], **kw)
    trainer.fit(model, loader)
    return zeros


def test_post_training_pruning_under_two_manual_optimizers_waits_for_the_end(tmp_path: Path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", verbose=False)  # start=1.0: after training
    model = TwoOptimizers()
    zeros = _fit(tmp_path, model, prune, max_epochs=1)  # 8 batches, 16 optimizer steps
    assert model.trainer.global_step == 16
    assert zeros.seen == [0.0] * 8  # never during training (it used to prune at step 8, half-way)
    assert prune.metrics_before_pruning is not None  # the post-training event ran, in on_train_end
    assert float((model.net[0].weight == 0).float().mean()) > 0.3


def test_a_fraction_is_of_the_batches_when_a_manual_step_spans_two_batches(tmp_path: Path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", end=0.5, verbose=False)
    zeros = _fit(tmp_path, EveryOtherBatch(), prune, max_epochs=2)  # 16 batches, 8 optimizer steps
    assert prune._positions[:2] == (0, 8)  # end=0.5: batch 8 of 16, not the last
    # the last event before batch 9 of 16 (8 done): the target half-way, then the sparse network trains
    assert zeros.seen[7] < zeros.seen[8] == zeros.seen[-1] > 0.3
    assert prune.metrics_before_pruning is None  # not a post-training event


def test_the_sparsity_logger_logs_what_post_training_pruning_left(tmp_path: Path) -> None:
    for logger_first in (True, False):  # either order
        logger = SparsityLogger(print_table=False)
        prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", verbose=False)
        callbacks = [logger, prune] if logger_first else [prune, logger]
        csv_logger = CSVLogger(tmp_path, name="order", version=str(logger_first))
        L.seed_everything(0, verbose=False)
        tiny_trainer(tmp_path, callbacks=callbacks, logger=csv_logger).fit(TinyClassifier(), random_loader())
        with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("sparsity/global")]
        assert float(rows[-1]["sparsity/global"]) == pytest.approx(0.5, abs=0.01)
        assert float(rows[0]["sparsity/global"]) == 0.0  # during training: dense
        assert logger.last_metrics["sparsity/global"] == pytest.approx(0.5, abs=0.01)


def test_a_target_the_ceiling_forbids_is_refused_before_the_first_step(tmp_path: Path) -> None:
    # 16-32-4: each layer keeps 1 % and every row's largest weight, so at most (480 + 124) / 640 = 0.9437 can go
    prune = MagnitudePruneCallback(sparsity=0.99, ranking="raw", end=0.8, verbose=False)
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"sparsity=0\.99 cannot be reached.*at most 0\.9437"):
        _fit(tmp_path, model, prune, max_epochs=3)
    assert model.trainer.global_step == 0


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(64):
            yield torch.randn(16, generator=g), torch.randint(0, 4, (), generator=g)


def test_fractions_over_a_stream_of_unknown_length_are_named(tmp_path: Path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, verbose=False)
    with pytest.raises(ValueError, match=r"end=0\.5 is a fraction.*no length.*as an int \(steps\)"):
        _fit(tmp_path, TinyClassifier(), prune, loader=DataLoader(_Stream(), batch_size=16))


def test_post_training_pruning_over_a_stream_of_unknown_length_runs_at_the_end(tmp_path: Path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", verbose=False)
    model = TinyClassifier()
    zeros = _fit(tmp_path, model, prune, loader=DataLoader(_Stream(), batch_size=16))
    assert zeros.seen and set(zeros.seen) == {0.0}
    pruned = sum(int((model.get_parameter(n) == 0).sum()) for n in prune.parameter_names)
    assert pruned / sum(model.get_parameter(n).numel() for n in prune.parameter_names) == pytest.approx(0.5, abs=1e-2)


def test_lr_rewind_that_cannot_act_warns_in_epochs_too(tmp_path: Path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, unit="epoch", start=0, end=2, lr_rewind=1.0, verbose=False)
    with pytest.warns(UserWarning, match=r"`lr_rewind` has no effect: the pruning ramp ends at epoch 2"):
        _fit(tmp_path, TinyClassifier(), prune, max_epochs=2)
