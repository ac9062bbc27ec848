"""`+experiment=seed`: the method's own example (SeedCNN, clip norm 0.5, post-training threshold 0.01)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.models import SeedCNN
from lightning_clipprune.run import config_dir, train

from .conftest import write_mnist_like

pytestmark = pytest.mark.usefixtures("offline")

# a few steps on a small MNIST-format data set, quietly (conf/debug/smoke.yaml: 2 steps)
SMOKE = ["debug=smoke", "data.batch_size=16", "data.download=false"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def mnist_like(tmp_path: Path) -> Path:
    return write_mnist_like(tmp_path / "fashion", n_train=120, n_test=40)


def compose_seed(tmp_path: Path, *overrides: str) -> tuple[DictConfig, list[str]]:
    overrides_ = ["+experiment=seed", *SMOKE, *overrides]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path / 'out'}", *overrides_]), overrides_


def test_seed_cnn_is_the_methods_network() -> None:
    net = SeedCNN()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (100, 64 * 12 * 12), (100,), (10, 100), (10,)]
    assert isinstance(net.features[4], torch.nn.AvgPool2d) and net.features[4].kernel_size == 2
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="`image_size` must be >= 6"):
        SeedCNN(image_size=4)


def test_seed_preset_is_the_methods_recipe(tmp_path: Path) -> None:
    cfg, _ = compose_seed(tmp_path)
    assert cfg.model.net._target_ == "lightning_clipprune.app.models.SeedCNN"
    assert cfg.data._target_ == "lightning_clipprune.app.data.FashionMNISTDataModule"
    opt = cfg.model.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.weight_decay) == ("torch.optim.SGD", 0.01, 0.9, 0.0)
    assert cfg.model.lr_schedule == "constant"
    assert (cfg.clip.algorithm, cfg.clip.clip_val) == ("norm", 0.5)
    prune = cfg.prune
    assert (prune.threshold, prune.sparsity, prune.schedule, prune.start) == (0.01, None, "oneshot", 1.0)
    assert prune.prune_bias is False and prune.include is None  # weights of Linear/Conv layers only
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        full = compose("config", overrides=[f"output_dir={tmp_path}", "+experiment=seed"])
    assert full.trainer.max_epochs == 10 and full.data.batch_size == 64


def test_seed_experiment_prunes_after_training_and_reports_before_and_after(tmp_path: Path, mnist_like: Path) -> None:
    cfg, overrides = compose_seed(tmp_path, f"data.root={mnist_like}")
    results = train(cfg, overrides)
    assert results["experiment"] == "seed" and results["steps"] == 2
    assert 0.0 <= results["val_acc_before_prune"] <= 1.0 and 0.0 <= results["val_acc"] <= 1.0
    # post-training pruning at |w| <= 0.01: the first linear layer starts uniform in +-1/sqrt(9216) = +-0.0104,
    # so most of its weights fall under the threshold after 2 small steps
    assert 0.5 < results["sparsity"] < 1.0
    assert results["params_total"] == sum(p.numel() for p in SeedCNN().parameters())
    assert results["params_nonzero"] < results["params_total"]
    # biases are not pruned: every weight zero is a prunable zero
    zeros = results["params_total"] - results["params_nonzero"]
    assert zeros == results["prunable_total"] - results["prunable_nonzero"]
    assert results["prunable_total"] == results["params_total"] - (32 + 64 + 100 + 10)
    assert results["clip"]["steps"] == 2
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["val_acc_before_prune"] == results["val_acc_before_prune"]


def test_seed_experiment_threshold_rule_on_the_final_weights(tmp_path: Path, mnist_like: Path) -> None:
    """After training, exactly the weights with |w| <= 0.01 are zero (<=, not the text's <); others are kept."""
    cfg, overrides = compose_seed(tmp_path, f"data.root={mnist_like}", "~callbacks.checkpoint")
    captured: dict[str, dict[str, torch.Tensor]] = {}
    original = MagnitudePruneCallback.on_train_end

    def spy(self, trainer, pl_module) -> None:
        captured["before"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        original(self, trainer, pl_module)
        captured["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MagnitudePruneCallback, "on_train_end", spy)
        train(cfg, overrides)
    for name, before in captured["before"].items():
        after = captured["after"][name]
        if name.endswith(".weight"):
            expected = torch.where(before.abs() <= 0.01, torch.zeros_like(before), before)
            assert torch.equal(after, expected), name
        else:
            assert torch.equal(after, before), name  # biases untouched by the preset


@pytest.mark.parametrize("override", ["prune.prune_bias=true", "prune.include=[*]"])
def test_seed_experiment_other_reading_prunes_biases_too(tmp_path: Path, mnist_like: Path, override: str) -> None:
    cfg, overrides = compose_seed(tmp_path, f"data.root={mnist_like}", override)
    results = train(cfg, overrides)
    assert results["prunable_total"] == results["params_total"]  # every parameter is prunable now
    assert 0.5 < results["sparsity"] < 1.0
