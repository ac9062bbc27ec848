"""The networks and the Classifier LightningModule."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn

from lightning_clipprune.app.models import (
    MLP,
    CifarResNet,
    Classifier,
    LeNet5,
    LeNet300100,
    resnet20,
    resnet32,
    resnet56,
)
from lightning_clipprune.app.models.networks import _BasicBlock

from .helpers import random_loader, tiny_trainer


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("net", "x"),
    [
        (MLP(64, [32, 16], 10), torch.randn(5, 1, 8, 8)),
        (LeNet300100(), torch.randn(5, 1, 28, 28)),
        (LeNet5(), torch.randn(5, 1, 28, 28)),
        (LeNet5(channels=(20, 50), hidden=(500,)), torch.randn(5, 1, 28, 28)),
        (CifarResNet(20, shortcut="A"), torch.randn(5, 3, 32, 32)),
        (CifarResNet(20, shortcut="B"), torch.randn(5, 3, 32, 32)),
    ],
)
def test_networks_map_inputs_to_logits_and_backprop(net: nn.Module, x: torch.Tensor) -> None:
    out = net(x)
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_lenet_300_100_is_784_300_100_10() -> None:
    shapes = [tuple(m.weight.shape) for m in LeNet300100().modules() if isinstance(m, nn.Linear)]
    assert shapes == [(300, 784), (100, 300), (10, 100)]
    assert n_params(LeNet300100()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


@pytest.mark.parametrize(("factory", "millions"), [(resnet20, 0.27), (resnet32, 0.46), (resnet56, 0.85)])
def test_cifar_resnet_sizes_match_he_et_al(factory, millions: float) -> None:
    # Table 6 of He et al. (2016): 0.27 M, 0.46 M, 0.85 M parameters with option A shortcuts
    assert round(n_params(factory()) / 1e6, 2) == millions
    assert n_params(factory(shortcut="B")) > n_params(factory())  # B adds 1x1 projections


def test_resnet_depth_is_6n_plus_2() -> None:
    net = CifarResNet(32)
    blocks = [m for m in net.modules() if isinstance(m, _BasicBlock)]
    assert len(blocks) == 15
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # + the final linear layer


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = _BasicBlock(16, 32, stride=2, shortcut="A")
    x = torch.randn(2, 16, 8, 8)
    short = block._option_a(x)
    assert short.shape == (2, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: CifarResNet(21), "depth"),
        (lambda: CifarResNet(20, shortcut="C"), "shortcut"),
        (lambda: MLP(64, [0], 10), "positive"),
        (lambda: MLP(64, [8], 10, dropout=1.0), "dropout"),
        (lambda: LeNet5(channels=(6,)), "channels"),
        (lambda: Classifier(MLP(4, [4], 2), num_classes=2, lr_schedule="step"), "lr_schedule"),
        (lambda: Classifier(MLP(4, [4], 2), num_classes=2, warmup_fraction=1.0), "warmup_fraction"),
        (lambda: Classifier(MLP(4, [4], 2), num_classes=2, label_smoothing=-0.1), "label_smoothing"),
        (lambda: Classifier(MLP(4, [4], 1), num_classes=1), "num_classes"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


class _LRRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(tmp_path, classifier: Classifier, epochs: int = 2, **kw) -> L.Trainer:
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=kw.pop("callbacks", []), **kw)
    trainer.fit(classifier, random_loader(n=128, batch_size=16), random_loader(n=64, batch_size=32, seed=1))
    return trainer


def test_cosine_schedule_decays_per_step_to_zero_after_warmup(tmp_path) -> None:
    rec = _LRRecorder()
    model = Classifier(
        MLP(16, [32], 4), num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.2), warmup_fraction=0.25
    )
    _fit(tmp_path, model, epochs=2, callbacks=[rec])
    total, warmup = 16, 4  # 8 batches x 2 epochs, a quarter of them warm-up
    assert len(rec.lrs) == total
    assert rec.lrs[:warmup] == pytest.approx([0.2 * (i + 1) / warmup for i in range(warmup)])
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)]
    assert rec.lrs[warmup:] == pytest.approx(expected)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_keeps_the_learning_rate(tmp_path) -> None:
    rec = _LRRecorder()
    model = Classifier(MLP(16, [32], 4), num_classes=4, optimizer=partial(torch.optim.Adam, lr=0.01), lr_schedule="constant")
    _fit(tmp_path, model, epochs=1, callbacks=[rec])
    assert isinstance(model.trainer.optimizers[0], torch.optim.Adam)
    assert rec.lrs == [0.01] * 8


def test_classifier_learns_and_logs_loss_and_accuracy(tmp_path) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(16, [64], 4), num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = tiny_trainer(tmp_path, max_epochs=15, log_every_n_steps=1)
    trainer.fit(model, random_loader(n=128, batch_size=16), random_loader(n=128, batch_size=32))
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/acc"] > 0.85  # the labels are a linear function of the inputs: learnable
    test = trainer.test(model, random_loader(n=128, batch_size=32), verbose=False)[0]
    assert test["test/acc"] == pytest.approx(float(metrics["val/acc"]))  # same data, same accuracy
    assert "test/loss" in test


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_label_smoothing_raises_the_loss_of_confident_predictions() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.bias[0] = 20.0  # confident class 0
    y[:] = 0
    plain = Classifier(net, num_classes=3)
    smooth = Classifier(net, num_classes=3, label_smoothing=0.1)
    assert smooth.training_step((x, y), 0) > plain.training_step((x, y), 0) + 0.5
