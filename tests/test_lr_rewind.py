"""``MagnitudePruneCallback(lr_rewind=...)``: learning-rate rewinding once the pruning ramp is done (issue 28)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.callbacks._lr_rewind import rewound_lr
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

STEPS = 16  # random_loader(): 8 batches an epoch, 2 epochs


class _Rates(Callback):
    """The learning rate each optimizer step uses (read just before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


class _Cosine(TinyClassifier):
    """TinyClassifier with a per-step cosine to 0 over the run (as the app's Classifier)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(tmp_path, model, factor, **prune) -> tuple[list[float], MagnitudePruneCallback]:
    L.seed_everything(0, verbose=False)
    rates = _Rates()
    cb = MagnitudePruneCallback(sparsity=0.5, lr_rewind=factor, **prune)
    tiny_trainer(tmp_path, callbacks=[cb, rates]).fit(model, random_loader())
    return rates.lrs, cb


def test_the_rate_restarts_at_the_ramp_end_and_decays_to_zero_over_the_module_schedule(tmp_path) -> None:
    plain, _ = _fit(tmp_path / "a", _Cosine(), None, end=0.5)
    rewound, cb = _fit(tmp_path / "b", _Cosine(), 1.0, end=0.5)
    end = cb._positions[1]
    assert end == STEPS // 2 and len(rewound) == STEPS
    assert rewound[:end] == plain[:end]  # the module's own schedule before the ramp ends
    assert plain[end] == pytest.approx(0.05)  # half-way down the module's cosine...
    expected = [rewound_lr(0.1, 1.0, s, end, STEPS) for s in range(end, STEPS)]
    assert rewound[end:] == pytest.approx(expected) and rewound[end] == pytest.approx(0.1)  # ...rewound to the peak
    assert all(a > b for a, b in zip(rewound[end:], rewound[end + 1:], strict=False))
    assert cb._rewind.state_dict() == {"base": [[0.1]], "first": end}


def test_without_a_scheduler_the_base_is_the_rate_at_train_start_times_the_factor(tmp_path) -> None:
    lrs, cb = _fit(tmp_path, TinyClassifier(lr=0.2), 0.5, end=4)
    assert lrs[:4] == [0.2] * 4
    assert lrs[4:] == pytest.approx([rewound_lr(0.2, 0.5, s, 4, STEPS) for s in range(4, STEPS)])
    assert lrs[4] == pytest.approx(0.1)


def test_resume_after_the_restart_sets_the_same_rates_and_ends_bit_identical(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    def run(root, callbacks, **fit):
        L.seed_everything(0, verbose=False)
        rates, model = _Rates(), _Cosine()
        cb = MagnitudePruneCallback(sparsity=0.5, end=0.5, lr_rewind=1.0)
        trainer = tiny_trainer(root, callbacks=[cb, rates, *callbacks], max_epochs=4, enable_checkpointing=bool(callbacks))
        trainer.fit(model, random_loader(), **fit)
        return model, rates.lrs, cb

    full, full_lrs, full_cb = run(tmp_path / "a", [ckpt])
    assert full_cb._rewind.first == 16  # 32 steps, the ramp ends half-way
    resumed, resumed_lrs, resumed_cb = run(tmp_path / "b", [], ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert resumed_lrs == full_lrs[24:]  # stopped 8 steps after the restart
    assert resumed_cb._rewind.state_dict() == full_cb._rewind.state_dict()
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_second_fit_with_the_same_callback_records_its_own_base_rates(tmp_path) -> None:
    rates, cb = _Rates(), MagnitudePruneCallback(sparsity=0.5, end=4, lr_rewind=1.0)
    tiny_trainer(tmp_path / "a", callbacks=[cb, rates]).fit(TinyClassifier(lr=0.2), random_loader())
    rates.lrs.clear()
    tiny_trainer(tmp_path / "b", callbacks=[cb, rates]).fit(TinyClassifier(lr=0.05), random_loader())
    assert cb._rewind.state_dict() == {"base": [[0.05]], "first": 4}
    assert rates.lrs[4] == pytest.approx(0.05) and rates.lrs[:4] == [0.05] * 4


def test_a_learning_rate_monitor_listed_first_logs_the_rewound_rates(tmp_path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_clipprune.loggers import MemoryLogger

    L.seed_everything(0, verbose=False)
    logger, rates = MemoryLogger(), _Rates()
    callbacks = [LearningRateMonitor("step"), MagnitudePruneCallback(sparsity=0.5, end=0.5, lr_rewind=1.0), rates]
    tiny_trainer(tmp_path, callbacks=callbacks, logger=logger, log_every_n_steps=1).fit(_Cosine(), random_loader())
    logged = [m["lr-SGD"] for _, m in logger.rows_with("lr-SGD")]
    assert len(logged) == STEPS and logged == pytest.approx(rates.lrs)  # what each step used, rewound ones included
    assert logged[STEPS // 2] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [0, -1.0, "1.0", True, float("nan")])
def test_bad_lr_rewind_is_refused_in_one_line(bad) -> None:
    with pytest.raises(ValueError, match="lr_rewind"):
        MagnitudePruneCallback(sparsity=0.5, lr_rewind=bad)


def test_the_app_refuses_a_bad_lr_rewind_before_building_anything() -> None:
    from omegaconf import OmegaConf

    from lightning_clipprune.app.checks import ConfigError, check_group_values

    cfg = OmegaConf.create({"prune": {"_target_": "lightning_clipprune.MagnitudePruneCallback", "sparsity": 0.9,
                                      "lr_rewind": 0.0}})
    with pytest.raises((ConfigError, ValueError), match="lr_rewind"):
        check_group_values(cfg)


def test_a_run_of_unknown_length_is_refused_before_any_step(tmp_path) -> None:
    cb = MagnitudePruneCallback(sparsity=0.5, start=0, end=4, lr_rewind=1.0)
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="known training length"):
        trainer.fit(TinyClassifier(), random_loader())
    assert trainer.global_step == 0


def test_a_rewind_after_the_last_step_warns_that_it_has_no_effect(tmp_path) -> None:
    with pytest.warns(UserWarning, match="`lr_rewind` has no effect"):
        lrs, _ = _fit(tmp_path, TinyClassifier(), 1.0, schedule="oneshot")  # post-training: start=1.0
    assert lrs == [0.1] * STEPS
