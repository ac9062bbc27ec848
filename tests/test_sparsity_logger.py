"""SparsityLogger: metric names and values through real loggers, cadence, prune-callback coupling, the table."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.utils.prune as tprune
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lightning_clipprune.callbacks.magnitude_prune import MagnitudePruneCallback
from lightning_clipprune.callbacks.sparsity_logger import SparsityLogger
from lightning_clipprune.sparsity import parameter_counts
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

TITLE = "Sparsity of"


class FakePrune(Callback):
    """What SparsityLogger reads from MagnitudePruneCallback."""

    def __init__(self, names: list[str], target: float | None) -> None:
        self.parameter_names = names
        self.current_target = target


class TiedClassifier(TinyClassifier):
    """TinyClassifier whose second layer is used twice and whose first weight is also a buffer-free alias."""

    def __init__(self) -> None:
        super().__init__(in_features=16, hidden=16, classes=4, lr=0.0)
        self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.net[2].weight = self.net[0].weight  # tied


def _known_zeros_model() -> TinyClassifier:
    """lr=0: the weights never change. 200 of 512 and 32 of 128 weights are zero, nothing else is."""
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.1)
        model.net[0].weight.view(-1)[:200] = 0.0
        model.net[2].weight.view(-1)[::4] = 0.0
    return model


def _fit(model, callbacks, tmp_path, **kw) -> MemoryLogger:
    logger = kw.pop("logger", MemoryLogger())
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, logger=logger, **kw)
    trainer.fit(model, random_loader())  # 8 batches per epoch, 2 epochs
    return logger


def _bitmask_or_dense(numel: int, nonzero: int, itemsize: int = 4) -> int:
    return min(numel * itemsize, math.ceil(numel / 8) + nonzero * itemsize)


def test_metric_names_values_and_cadence(tmp_path):
    logger = _fit(_known_zeros_model(), [SparsityLogger(log_every_n_steps=3, print_table=False)], tmp_path)
    records = logger.rows_with("sparsity/global")
    # Steps 3, 6, 9, 12, 15 and two epoch ends, at the step Lightning logs its own metrics (an epoch's at its
    # last step: 7 and 15).
    assert [s for s, _ in records] == [2, 5, 7, 8, 11, 14, 15]
    expected = {
        "sparsity/global": 232 / 640,
        "sparsity/net.0.weight": 200 / 512,
        "sparsity/net.2.weight": 32 / 128,
        "params/total": 676,
        "params/nonzero": 676 - 232,
        "size/dense_bytes": 676 * 4,
        "size/compressed_bytes": _bitmask_or_dense(512, 312) + 32 * 4 + _bitmask_or_dense(128, 96) + 4 * 4,
    }
    for _, metrics in records:
        assert set(metrics) == set(expected)  # no target without a prune callback
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6), key
        assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_follows_the_trainers_log_every_n_steps(tmp_path):
    logger = _fit(_known_zeros_model(), [SparsityLogger(print_table=False)], tmp_path, log_every_n_steps=4)
    assert [s for s, _ in logger.rows_with("sparsity/global")] == [3, 7, 7, 11, 15, 15]
    logger = _fit(_known_zeros_model(), [SparsityLogger(log_every_n_steps=0, print_table=False)], tmp_path)
    assert [s for s, _ in logger.rows_with("sparsity/global")] == [7, 15]


def test_accumulated_batches_log_once_per_optimizer_step(tmp_path):
    cb = SparsityLogger(log_every_n_steps=1, print_table=False)
    logger = _fit(_known_zeros_model(), [cb], tmp_path, accumulate_grad_batches=2)
    # 4 optimizer steps per epoch, each logged once, plus the two epoch ends.
    assert len(logger.rows_with("sparsity/global")) == 4 * 2 + 2


@pytest.mark.parametrize("target", [0.25, None])
def test_names_and_target_from_a_prune_callback(tmp_path, target):
    cbs = [SparsityLogger(log_every_n_steps=0, print_table=False), FakePrune(["net.2.weight"], target)]
    records = _fit(_known_zeros_model(), cbs, tmp_path).rows_with("sparsity/global")
    metrics = records[-1][1]
    assert metrics["sparsity/global"] == pytest.approx(32 / 128)
    assert "sparsity/net.2.weight" in metrics and "sparsity/net.0.weight" not in metrics
    assert metrics["params/total"] == 676  # counts and sizes stay over the whole model
    if target is None:
        assert "sparsity/target" not in metrics
    else:
        assert metrics["sparsity/target"] == target


def test_with_the_real_magnitude_prune_callback(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    prune = MagnitudePruneCallback(sparsity=0.6, schedule="linear", start=0, end=8, frequency=2,
                                             verbose=False)
    cb = SparsityLogger(log_every_n_steps=2, print_table=False)
    records = _fit(model, [prune, cb], tmp_path).rows_with("sparsity/global")
    targets = [m["sparsity/target"] for _, m in records]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.6)
    total, nonzero = parameter_counts(model, prune.parameter_names)
    assert records[-1][1]["sparsity/global"] == pytest.approx(1 - nonzero / total, abs=1e-6)
    assert records[-1][1]["sparsity/global"] == pytest.approx(0.6, abs=0.01)
    assert records[0][1]["sparsity/global"] < records[-1][1]["sparsity/global"]


@pytest.mark.parametrize(
    ("kwargs", "per_layer"),
    [({}, True), ({"max_layers_per_layer_logging": 1}, False), ({"per_layer": False}, False),
     ({"per_layer": True, "max_layers_per_layer_logging": 1}, True)],
)
def test_per_layer_switch(tmp_path, kwargs, per_layer):
    cb = SparsityLogger(log_every_n_steps=0, print_table=False, **kwargs)
    metrics = _fit(_known_zeros_model(), [cb], tmp_path).rows_with("sparsity/global")[-1][1]
    assert ("sparsity/net.0.weight" in metrics) is per_layer
    assert "sparsity/global" in metrics


def test_tied_weights_counted_once(tmp_path):
    model = TiedClassifier()
    cb = SparsityLogger(log_every_n_steps=0, print_table=False)
    metrics = _fit(model, [cb], tmp_path).rows_with("sparsity/global")[-1][1]
    assert metrics["params/total"] == 16 * 16 + 16 + 16 + 16 * 4 + 4  # the tied 16x16 once
    assert "sparsity/net.0.weight" in metrics and "sparsity/net.2.weight" not in metrics


def test_dense_and_torch_pruned_models_reported_as_they_are(tmp_path):
    dense = TinyClassifier(lr=0.0)
    metrics = _fit(dense, [SparsityLogger(log_every_n_steps=0, print_table=False)], tmp_path).rows_with("sparsity/global")
    assert metrics[-1][1]["sparsity/global"] == 0.0
    other = TinyClassifier(lr=0.0)
    tprune.l1_unstructured(other.net[0], "weight", amount=0.5)  # weight_orig + weight_mask, not our pruning
    metrics = _fit(other, [SparsityLogger(log_every_n_steps=0, print_table=False)], tmp_path).rows_with("sparsity/global")
    assert metrics[-1][1]["sparsity/net.0.weight"] == pytest.approx(0.5)
    assert metrics[-1][1]["params/total"] == 676  # weight_orig is not counted beside weight


def test_csv_logger_gets_the_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _fit(_known_zeros_model(), [SparsityLogger(log_every_n_steps=4, print_table=False)], tmp_path, logger=logger)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsity/global")]
    assert len(rows) == 6
    assert float(rows[-1]["sparsity/global"]) == pytest.approx(232 / 640)
    assert int(rows[-1]["params/nonzero"]) == 444 and float(rows[-1]["sparsity/net.2.weight"]) == 0.25


def test_nothing_computed_without_a_logger(tmp_path):
    cb = SparsityLogger(log_every_n_steps=1, print_table=False)
    trainer = tiny_trainer(tmp_path, callbacks=[cb])  # logger=False
    trainer.fit(_known_zeros_model(), random_loader())
    assert cb.last_metrics == {}


def test_table_printed_once_at_the_end_of_fit(tmp_path, capsys):
    _fit(_known_zeros_model(), [SparsityLogger()], tmp_path)
    out = capsys.readouterr().out
    assert out.count(TITLE) == 1
    for needle in ("net.0.weight", "32x16", "312", "39.06%", "Total", "676", "444", "compressed"):
        assert needle in out, needle
    _fit(_known_zeros_model(), [SparsityLogger(print_table=False)], tmp_path)
    assert TITLE not in capsys.readouterr().out


def test_table_gated_to_rank_zero(tmp_path, capsys, monkeypatch):
    cb = SparsityLogger()
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    model = _known_zeros_model()
    trainer.fit(model, random_loader())
    capsys.readouterr()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cb.on_fit_end(trainer, model)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    cb.on_fit_end(trainer, model)
    assert capsys.readouterr().out.count(TITLE) == 1


@pytest.mark.slow
def test_table_printed_once_under_two_processes(tmp_path, capfd):
    """A real 2-process gloo run: the table appears once, from rank zero."""
    trainer = tiny_trainer(tmp_path, callbacks=[SparsityLogger(log_every_n_steps=2)], devices=2,
                           strategy="ddp_spawn", max_epochs=1, logger=CSVLogger(tmp_path, name="ddp"))
    trainer.fit(_known_zeros_model(), random_loader())
    out = capfd.readouterr().out
    assert out.count(TITLE) == 1
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsity/global")]
    assert rows and float(rows[-1]["sparsity/global"]) == pytest.approx(232 / 640)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_layer": "yes"}, r"per_layer=.*must be True or False or None, got 'yes'"),
        ({"max_layers_per_layer_logging": -1}, r"max_layers_per_layer_logging=.*must be an integer >= 0, got -1"),
        ({"log_every_n_steps": 2.5}, r"log_every_n_steps=.*must be an integer >= 0 or None, got 2.5"),
        ({"log_every_n_steps": -3}, "got -3"),
        ({"print_table": 1}, r"print_table=.*must be True or False, got 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityLogger(**kwargs)
