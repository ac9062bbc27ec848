"""Resuming and re-validating the way users do: changed callback arguments, `end` moved before the checkpoint's
last event, a second validate of an older checkpoint after post-training pruning; the post-training tools and
the logger on set-ups users bring (a frozen BatchNorm in a model in train mode, dict batches, the Trainer's
`log_every_n_steps=0`, the epoch-end step). Tiny CPU fits.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger, to_inference
from lightning_clipprune.posttrain import reconstruct_prune
from lightning_clipprune.search import evaluate, search_threshold
from tests.helpers import TinyClassifier, random_loader, tiny_trainer


class _Crash(Exception):
    pass


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise _Crash


def _checkpoint(tmp_path, **prune) -> str:
    """A `last.ckpt` written at step 4 of a run pruning to 0.8 (linear, events every 2 steps)."""
    prune = {"sparsity": 0.8, "schedule": "linear", "end": 0.5, "frequency": 2, **prune}
    callbacks = [MagnitudePruneCallback(**prune), ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4)]
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[*callbacks, _StopAt(5)], enable_checkpointing=True)
    with pytest.raises(_Crash):
        trainer.fit(TinyClassifier(), random_loader())
    return str(tmp_path / "ck" / "last.ckpt")


@pytest.mark.parametrize(("changed", "said"), [
    ({"unit": "epoch", "start": 0, "end": 2}, r"unit='step' there, 'epoch' here"),
    ({"scope": "local"}, r"scope='global' there, 'local' here"),
])
def test_resuming_with_another_unit_or_scope_is_refused_in_one_line(tmp_path, changed, said):
    ckpt = _checkpoint(tmp_path)
    prune = MagnitudePruneCallback(**{"sparsity": 0.8, "schedule": "linear", "end": 0.5, "frequency": 2, **changed})
    with pytest.raises(ValueError, match=rf"MagnitudePruneCallback: the checkpoint's pruning ran with {said}.*without ckpt_path"):
        tiny_trainer(tmp_path / "r", max_epochs=4, callbacks=[prune]).fit(TinyClassifier(), random_loader(), ckpt_path=ckpt)


def test_resuming_with_other_parameters_names_the_fix(tmp_path):
    ckpt = _checkpoint(tmp_path)
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="linear", end=0.5, frequency=2, exclude=["net.2.weight"])
    with pytest.raises(ValueError, match=r"MagnitudePruneCallback: the checkpoint pruned .* another `include`/`exclude`"):
        tiny_trainer(tmp_path / "r", max_epochs=4, callbacks=[prune]).fit(TinyClassifier(), random_loader(), ckpt_path=ckpt)


def test_an_end_moved_before_the_checkpoints_last_event_still_reaches_the_target(tmp_path):
    ckpt = _checkpoint(tmp_path)  # events at 0 and 2 of a ramp to step 8; checkpoint at step 4
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="linear", end=1, frequency=2)
    model = TinyClassifier()
    with pytest.warns(UserWarning, match=r"last pruning event \(step \d+\) lies at or past this run's end \(step 1\)"):
        tiny_trainer(tmp_path / "r", max_epochs=4, callbacks=[prune]).fit(model, random_loader(), ckpt_path=ckpt)
    assert prune.current_target == pytest.approx(0.8)
    weights = [model.net[0].weight, model.net[2].weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))


def test_only_the_validate_right_after_post_training_pruning_compares(tmp_path, caplog):
    class Validated(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    prune = MagnitudePruneCallback(sparsity=0.8, schedule="oneshot")
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[prune])
    model, loader = Validated(), random_loader()
    with caplog.at_level(logging.INFO):
        trainer.fit(model, loader, loader)
        trainer.validate(model, loader)
        trainer.validate(model, loader)  # (a checkpoint of before the event would read "x -> x")
    assert sum("after post-training pruning" in r.getMessage() for r in caplog.records) == 1


class _FrozenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("tool", ["evaluate", "search_threshold", "reconstruct_prune", "to_inference"])
def test_the_post_training_tools_leave_a_frozen_batch_norm_frozen(tool):
    """Fine-tuning: the model in train(), its BatchNorm in eval(); the tools must put back each module's mode."""
    model = _FrozenBN().train()
    model.net[1].eval()
    loader = random_loader()
    if tool == "evaluate":
        evaluate(model, loader)
    elif tool == "search_threshold":
        search_threshold(model, loader, grid=(0.5,))
    elif tool == "reconstruct_prune":
        reconstruct_prune(model, loader, 0.5, num_samples=32)
    else:
        with torch.no_grad():
            model.net[0].weight[model.net[0].weight.abs() < 0.2] = 0
        to_inference(model, example_input=next(iter(loader))[0], min_sparsity=0.0, compact=False)
    assert model.training and model.net[0].training and not model.net[1].training


def test_the_search_names_a_batch_that_is_not_a_pair():
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match=r"the loader gave a dict with keys \['x', 'y'\]; .*\(inputs, labels\)"):
        evaluate(nn.Linear(16, 4), [{"x": x, "y": y}])
    with pytest.raises(ValueError, match=r"the loader gave a tuple of 3; .*\(inputs, labels\)"):
        evaluate(nn.Linear(16, 4), [(x, y, y)])


class _Rows(Logger):
    name, version = "rows", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_the_trainers_log_every_n_steps_0_turns_clip_logging_off(tmp_path):
    rows = _Rows()
    clip = GradientClipCallback(clip_val=1.0)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[clip], logger=rows, log_every_n_steps=0).fit(TinyClassifier(), random_loader())
    assert clip.summary()["steps"] == 8 and not any("grad/norm" in m for _, m in rows.rows)


def test_sparsity_rows_at_an_epochs_end_share_the_trainers_step(tmp_path):
    class Epochs(TinyClassifier):
        def on_train_epoch_end(self):
            self.log("epoch_marker", float(self.current_epoch), on_epoch=True, on_step=False)

    rows = _Rows()
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", end=0.5, frequency=2)
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, callbacks=[prune, SparsityLogger(print_table=False)], logger=rows, log_every_n_steps=3
    )
    trainer.fit(Epochs(), random_loader())
    epoch_steps = [s for s, m in rows.rows if "epoch_marker" in m]
    sparsity_steps = [s for s, m in rows.rows if "sparsity/global" in m]
    assert epoch_steps == [7, 15] and set(epoch_steps) <= set(sparsity_steps) and max(sparsity_steps) == 15


def test_latency_on_dict_batches_says_it_was_not_measured(tmp_path, caplog):
    class Dicts(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pairs = random_loader().dataset
    loader = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in pairs], batch_size=16)
    logger = SparsityLogger(inference_latency=True)
    with caplog.at_level(logging.INFO):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[logger]).fit(Dicts(), loader)
    assert logger.inference_latency is None
    assert any("inference latency not measured" in r.getMessage() for r in caplog.records)


def test_a_dict_input_batch_is_refused_with_advice_that_works():
    class DictInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, batch):
            return self.lin(batch["x"])

    loader = [({"x": torch.randn(32, 16)}, torch.zeros(32))]
    with pytest.raises(ValueError, match=r"first element is a dict: give `reconstruct_prune` `inputs=`"):
        reconstruct_prune(DictInput(), loader, 0.5, num_samples=32)
    model = DictInput()
    _, report = reconstruct_prune(
        model, loader, 0.5, num_samples=32, inputs=lambda b: b[0]["x"], forward=lambda m, x: m({"x": x})
    )
    assert report.pruned == 32 and int((model.lin.weight == 0).sum()) == 32
