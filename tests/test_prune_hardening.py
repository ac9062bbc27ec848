"""Pruning under stress: optimizers that keep zeros without a re-mask, non-finite weights, configurations
that cannot do what they say, bad constructor values, quiet event lines."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_clipprune import SparsityLogger
from lightning_clipprune.callbacks.contract import GradientMasker, PruneState
from lightning_clipprune.callbacks.magnitude_prune import MagnitudePruneCallback
from lightning_clipprune.pruning import (
    apply_masks_,
    compute_masks,
    keeps_pruned_weights_zero,
    mask_factors,
    mask_optimizer_state_,
)
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

# random_loader(): 128 samples, batch 16 -> 8 optimizer steps per epoch

# ------------------------------------------------------------------------------------------------------
# Optimizers that keep pruned weights at exactly zero with the weight re-mask skipped
# ------------------------------------------------------------------------------------------------------

optim = torch.optim
ZERO_KEEPING = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd-momentum-nesterov-wd": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-dampening-maximize-loop": lambda p: optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3, maximize=True, foreach=False),
    "adam": lambda p: optim.Adam(p, lr=0.05),
    "adam-amsgrad-wd-maximize": lambda p: optim.Adam(p, lr=0.05, amsgrad=True, weight_decay=0.1, maximize=True),
    "adam-loop": lambda p: optim.Adam(p, lr=0.05, foreach=False),
    "adamw": lambda p: optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "adamw-amsgrad-loop": lambda p: optim.AdamW(p, lr=0.05, amsgrad=True, foreach=False),
    "nadam-decoupled": lambda p: optim.NAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "radam-wd": lambda p: optim.RAdam(p, lr=0.05, weight_decay=0.1),
    "rmsprop-centered-momentum-wd": lambda p: optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    "adagrad-init-acc-decay": lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.5),
    "adadelta-wd": lambda p: optim.Adadelta(p, lr=1.0, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(ZERO_KEEPING))
def test_zero_keeping_optimizer_keeps_pruned_weights_and_state_exactly_zero(name: str) -> None:
    """The callback's per-step protocol with the re-mask skipped: mask the gradients, step, nothing else."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 10, generator=g)), nn.Parameter(torch.randn(6, 12, generator=g))]
    targets = [torch.randn(p.shape, generator=g) * 3 for p in params]  # pulls every entry away from zero
    opt = ZERO_KEEPING[name](params)
    assert keeps_pruned_weights_zero(opt)

    def step(masks: list[torch.Tensor] | None) -> None:
        opt.zero_grad()
        noise = [torch.randn(p.shape, generator=g) for p in params]
        sum(((p - t) ** 2 * n.abs()).sum() for p, t, n in zip(params, targets, noise, strict=True)).backward()
        if masks is not None:
            apply_masks_([p.grad for p in params], masks)
        opt.step()

    for _ in range(5):  # dense: the state is non-zero everywhere
        step(None)
    # the pruning event, as MagnitudePruneCallback does it
    bool_masks = list(compute_masks({str(i): p.detach() for i, p in enumerate(params)}, sparsity=0.6).values())
    factors = mask_factors(bool_masks, params)
    apply_masks_(params, factors)
    with torch.no_grad():
        torch._foreach_add_(params, 0.0)
    mask_optimizer_state_(opt, params, bool_masks)
    for _ in range(200):
        step(factors)
        for p, m in zip(params, bool_masks, strict=True):
            assert (p.detach()[~m] == 0).all(), name
            for key, value in opt.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert (value[~m] == 0).all(), (name, key)
    for p, m in zip(params, bool_masks, strict=True):
        assert (p.detach()[m] != 0).all(), name  # the kept entries trained


class NoisySGD(torch.optim.SGD):
    """A subclass whose step moves every weight, pruned or not: must not be trusted to keep zeros."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


class NoisyClassifier(TinyClassifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return NoisySGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("make", "trusted"),
    [
        (lambda p: optim.SGD(p, lr=0.1), True),
        (lambda p: NoisySGD(p, lr=0.1), False),  # a subclass
        (lambda p: optim.Adam(p, eps=0.0), False),  # 0 / (sqrt(0) + 0) is NaN
        (lambda p: optim.AdamW(p, fused=True), False),
        (lambda p: optim.LBFGS(p), False),
        (lambda p: optim.ASGD(p), False),  # not verified
        (lambda p: optim.Adamax(p), False),  # its exp_inf state becomes eps
    ],
)
def test_which_optimizers_are_trusted(make, trusted: bool) -> None:
    assert keeps_pruned_weights_zero(make([nn.Parameter(torch.zeros(3))])) is trusted


def _fit_pruned(tmp_path, make_model, end: int) -> tuple[MagnitudePruneCallback, L.LightningModule, dict]:
    """One seeded epoch pruned to 50 % by step ``end``; asserts every pruned weight is zero afterwards."""
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=end, frequency=2)
    L.seed_everything(0, verbose=False)
    model = make_model()
    tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    params = dict(model.named_parameters())
    for n in prune.parameter_names:
        assert (params[n][~prune.masks[n]] == 0).all(), n
    return prune, model, params


def test_unknown_optimizer_gets_the_weights_remasked_after_every_step(tmp_path) -> None:
    _, model, _ = _fit_pruned(tmp_path, NoisyClassifier, end=6)
    assert (model.net[0].bias != 0).all()  # the noise did reach what is not pruned


class RawStep(TinyClassifier):
    """Manual optimization that steps the raw torch optimizer: Lightning's on_before_optimizer_step never runs."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers().optimizer
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()


def test_a_step_without_gradient_masking_falls_back_to_the_safe_path(tmp_path) -> None:
    prune, model, params = _fit_pruned(tmp_path, RawStep, end=4)
    opt = model.trainer.optimizers[0]
    for n in prune.parameter_names:
        mask = prune.masks[n]
        for key, value in opt.state[params[n]].items():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert (value[~mask] == 0).all(), (n, key)


def test_the_callback_implements_the_contract() -> None:
    prune = MagnitudePruneCallback(sparsity=0.5)
    assert isinstance(prune, GradientMasker) and isinstance(prune, PruneState)
    assert prune.parameter_names == [] and prune.current_target == 0.0
    assert MagnitudePruneCallback(threshold=0.1).current_target is None


# ------------------------------------------------------------------------------------------------------
# Non-finite weights, two callbacks, windows training never reaches
# ------------------------------------------------------------------------------------------------------


class DivergesAtStep3(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 3 else loss


def test_nan_weights_are_never_ranked(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=8, frequency=2)
    L.seed_everything(0, verbose=False)
    model = DivergesAtStep3()
    with pytest.raises(FloatingPointError) as err:
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    message = str(err.value)
    assert "\n" not in message
    assert "step 4" in message and "net.0.weight" in message and "net.2.weight" in message
    assert prune.current_target < 0.5  # the event at step 4 did not happen


def test_two_prune_callbacks_are_refused_at_setup(tmp_path) -> None:
    # one rule for a second callback of a kind, as for GradientClipCallback: MisconfigurationException
    callbacks = [MagnitudePruneCallback(sparsity=0.5), MagnitudePruneCallback(sparsity=0.9)]
    with pytest.raises(MisconfigurationException, match="2 MagnitudePruneCallbacks, at most one") as err:
        tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(TinyClassifier(), random_loader())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "needles"),
    [
        ({"schedule": "cubic", "start": 0, "end": 1000000}, 2, ["end=1000000", "a run of 16 steps"]),
        ({"schedule": "oneshot", "start": 500}, 1, ["start=500", "a run of 8 steps"]),
        ({"schedule": "cubic", "start": 0.5, "end": 3}, 2, ["start=0.5", "step 8", "end=3", "a run of 16 steps"]),
        ({"schedule": "linear", "start": 1, "end": 5, "unit": "epoch"}, 2, ["end=5", "a run of 2 epochs"]),
    ],
)
def test_prune_window_training_never_reaches_is_refused(tmp_path, kwargs, max_epochs, needles) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, **kwargs)
    model = TinyClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=max_epochs).fit(model, random_loader())
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before training


@pytest.mark.parametrize("kwargs", [{"schedule": "linear", "start": 0, "end": 16}, {"schedule": "oneshot", "start": 1.0}])
def test_a_window_ending_with_the_run_is_post_training_pruning(tmp_path, kwargs) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, frequency=4, **kwargs)
    model = TinyClassifier()
    tiny_trainer(tmp_path, callbacks=[prune]).fit(model, random_loader())  # 16 steps
    zeros = sum(int((dict(model.named_parameters())[n] == 0).sum()) for n in prune.parameter_names)
    assert zeros == 320 and prune.current_target == 0.5


# ------------------------------------------------------------------------------------------------------
# Bad constructor values: one line naming the argument and the value
# ------------------------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
PRUNE_BAD = [
    ({"sparsity": NAN}, "sparsity", "nan"),
    ({"sparsity": INF}, "sparsity", "inf"),
    ({"sparsity": 1.0}, "sparsity", "1.0"),
    ({"sparsity": -0.5}, "sparsity", "-0.5"),
    ({"sparsity": "0.9"}, "sparsity", "'0.9'"),
    ({"sparsity": True}, "sparsity", "True"),
    ({"threshold": INF}, "threshold", "inf"),
    ({"threshold": NAN}, "threshold", "nan"),
    ({"threshold": -0.1}, "threshold", "-0.1"),
    ({"sparsity": 0.5, "power": INF}, "power", "inf"),
    ({"sparsity": 0.5, "power": NAN}, "power", "nan"),
    ({"sparsity": 0.5, "power": 0}, "power", "0"),
    ({"sparsity": 0.5, "power": -3}, "power", "-3"),
    ({"sparsity": 0.5, "start": NAN}, "start", "nan"),
    ({"sparsity": 0.5, "start": INF}, "start", "inf"),
    ({"sparsity": 0.5, "start": 1.5}, "start", "1.5"),
    ({"sparsity": 0.5, "start": -1}, "start", "-1"),
    ({"sparsity": 0.5, "start": "0"}, "start", "'0'"),
    ({"sparsity": 0.5, "end": NAN}, "end", "nan"),
    ({"sparsity": 0.5, "end": -0.25}, "end", "-0.25"),
    ({"sparsity": 0.5, "end": None}, "end", "None"),
    ({"sparsity": 0.5, "frequency": 0}, "frequency", "0"),
    ({"sparsity": 0.5, "frequency": 2.5}, "frequency", "2.5"),
    ({"sparsity": 0.5, "frequency": -1}, "frequency", "-1"),
    ({"sparsity": 0.5, "initial_sparsity": NAN}, "initial_sparsity", "nan"),
    ({"sparsity": 0.5, "initial_sparsity": 0.7}, "initial_sparsity", "0.7"),
    ({"sparsity": 0.5, "taylor_beta": NAN}, "taylor_beta", "nan"),
    ({"sparsity": 0.5, "taylor_beta": -0.1}, "taylor_beta", "-0.1"),
    ({"sparsity": 0.5, "schedule": "Cubic"}, "schedule", "'Cubic'"),
    ({"sparsity": 0.5, "schedule": None}, "schedule", "None"),
    ({"sparsity": 0.5, "unit": "steps"}, "unit", "'steps'"),
    ({"sparsity": 0.5, "scope": 1}, "scope", "1"),
    ({"sparsity": 0.5, "criterion": "l1"}, "criterion", "'l1'"),
    ({"sparsity": 0.5, "pattern": "2:2"}, "pattern", "'2:2'"),
    ({"sparsity": 0.5, "pattern": "a:b"}, "pattern", "'a:b'"),
    ({"sparsity": 0.5, "pattern": 4}, "pattern", "4"),
    ({"sparsity": 0.5, "include": [1, 2]}, "include", "[1, 2]"),
    ({"sparsity": 0.5, "exclude": 3}, "exclude", "3"),
    ({"sparsity": 0.5, "prune_bias": "yes"}, "prune_bias", "'yes'"),
    ({"sparsity": 0.5, "keep_first_and_last": 1}, "keep_first_and_last", "1"),
    ({"sparsity": 0.5, "verbose": "false"}, "verbose", "'false'"),
    ({"sparsity": 0.5, "start": 9, "end": 3}, "start", "start=9, end=3"),
    ({"sparsity": 0.5, "threshold": 0.1}, "sparsity", "threshold=0.1"),
    ({"threshold": 0.1, "pattern": "2:4"}, "threshold", "'2:4'"),
]
LOGGER_BAD = [
    ({"per_layer": 1}, "per_layer", "1"),
    ({"per_layer": "auto"}, "per_layer", "'auto'"),
    ({"max_layers_per_layer_logging": -1}, "max_layers_per_layer_logging", "-1"),
    ({"max_layers_per_layer_logging": 1.5}, "max_layers_per_layer_logging", "1.5"),
    ({"max_layers_per_layer_logging": NAN}, "max_layers_per_layer_logging", "nan"),
    ({"log_every_n_steps": -1}, "log_every_n_steps", "-1"),
    ({"log_every_n_steps": INF}, "log_every_n_steps", "inf"),
    ({"log_every_n_steps": "10"}, "log_every_n_steps", "'10'"),
    ({"log_every_n_steps": True}, "log_every_n_steps", "True"),
    ({"print_table": None}, "print_table", "None"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument", "shown"),
    [(MagnitudePruneCallback, *row) for row in PRUNE_BAD] + [(SparsityLogger, *row) for row in LOGGER_BAD],
    ids=[f"prune-{i}" for i in range(len(PRUNE_BAD))] + [f"logger-{i}" for i in range(len(LOGGER_BAD))],
)
def test_bad_constructor_values_give_one_line_naming_the_value(cls, kwargs, argument, shown) -> None:
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert argument in message and shown in message, message
    assert cls.__name__ in message, message


def test_log_every_n_steps_zero_means_epoch_ends_only() -> None:
    assert SparsityLogger(log_every_n_steps=0).log_every_n_steps == 0  # documented: no per-step logging


# ------------------------------------------------------------------------------------------------------
# Quiet by default
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verbose", [False, True])
def test_event_lines_go_to_the_package_logger_and_to_the_console_only_when_verbose(tmp_path, caplog, verbose) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=4, frequency=2, verbose=verbose)
    with caplog.at_level(logging.INFO):
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(TinyClassifier(), random_loader())
    ours = [r for r in caplog.records if r.name == "lightning_clipprune" and "MagnitudePruneCallback" in r.message]
    console = [r for r in caplog.records if r.name.startswith("lightning.") and "MagnitudePruneCallback" in r.message]
    assert len(ours) == 3  # events at steps 0, 2, 4
    assert "step 4: target 0.5000" in ours[-1].message
    assert len(console) == (3 if verbose else 0)
