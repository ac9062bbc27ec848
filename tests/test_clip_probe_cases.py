"""GradientClipCallback and the clippers on the cases a probe found wrong (CPU, tiny modules, seconds each)."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_clipprune import GradientClipCallback
from lightning_clipprune.clipping import AutoClip, ZClip
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

# 128 samples / batch 16: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8


@contextmanager
def caught_warnings() -> Iterator[list[str]]:
    """Every warning raised in the block, as its message text."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught)


def fit(module: Any, tmp_path: Any, callbacks: list[Callback], **kwargs: Any) -> Any:
    kwargs.setdefault("max_epochs", 1)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, random_loader())
    return trainer


class Norms(Callback):
    """The total gradient norm at every `on_before_optimizer_step` (put it before the clip callback)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


# ---------------------------------------------------------------------------------------- which calls are steps


class Wrapped(torch.optim.Optimizer):
    """A thin wrapper that skips `Optimizer.__init__` (as timm's Lookahead does): torch never wraps its `step`,
    so its step hooks never fire; `hook_dicts=False` leaves out the hook dicts as well."""

    def __init__(self, base: torch.optim.Optimizer, hook_dicts: bool = True) -> None:
        if hook_dicts:
            self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
            self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self.base = base
        self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, base.state

    def step(self, closure=None):
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)


class WrappedClassifier(TinyClassifier):
    def __init__(self, hook_dicts: bool = True) -> None:
        super().__init__()
        self.hook_dicts = hook_dicts

    def configure_optimizers(self):
        return Wrapped(torch.optim.SGD(self.parameters(), lr=0.1), hook_dicts=self.hook_dicts)


@pytest.mark.parametrize("hook_dicts", [True, False], ids=["hooks-never-fire", "no-hook-dicts"])
def test_an_optimizer_whose_step_torch_does_not_hook_has_every_step_counted_logged_and_recorded(tmp_path, hook_dicts):
    logger, cb = MemoryLogger(), GradientClipCallback(algorithm="autoclip", log_every_n_steps=1)
    trainer = fit(WrappedClassifier(hook_dicts), tmp_path, [cb], logger=logger)
    assert trainer.global_step == STEPS_PER_EPOCH
    assert cb.summary()["steps"] == STEPS_PER_EPOCH
    assert [step for step, _ in logger.rows_with("grad/norm")] == list(range(STEPS_PER_EPOCH))
    assert cb.clipper.count == STEPS_PER_EPOCH  # AutoClip's history: one norm per step


class LbfgsClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_re_evaluations_are_still_counted_once_and_raise_no_warning(tmp_path):
    norms, cb = Norms(), GradientClipCallback(algorithm="autoclip")
    with caught_warnings() as messages:
        fit(LbfgsClassifier(), tmp_path, [norms, cb])
    assert len(norms.norms) > STEPS_PER_EPOCH  # the closure was evaluated more than once a step
    assert cb.summary()["steps"] == cb.clipper.count == STEPS_PER_EPOCH
    assert not any("GradientClipCallback" in m for m in messages)


# ---------------------------------------------------------------------------------------- clipping twice


class ManualClipsToo(TinyClassifier):
    """Manual optimization that clips with Lightning's API, as Lightning's manual-optimization docs show."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_clip_gradients_beside_the_callback_warns_once(tmp_path):
    cb = GradientClipCallback(0.3)
    with caught_warnings() as messages:
        trainer = fit(ManualClipsToo(), tmp_path, [cb])
    twice = [m for m in messages if "clips twice" in m]
    assert len(twice) == 1, messages
    assert "clip_gradients(gradient_clip_val=0.5, gradient_clip_algorithm='norm')" in twice[0]
    assert "GradientClipCallback(clip_val=0.3, algorithm='norm')" in twice[0]  # what to keep instead
    assert "clip_gradients" not in vars(trainer.precision_plugin)  # the plugin has its own method back


class OwnClipping(TinyClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.005, gradient_clip_algorithm="value")


def test_an_overridden_configure_gradient_clipping_is_named_at_fit_start(tmp_path):
    cb = GradientClipCallback(0.5)
    with caught_warnings() as messages:
        trainer = tiny_trainer(tmp_path, callbacks=[cb], max_steps=1)
        trainer.fit(OwnClipping(), random_loader())
    named = [m for m in messages if "configure_gradient_clipping" in m]
    assert len(named) == 1, messages  # one line, and no second one when the override then clips
    assert not any("clips twice" in m for m in messages)
    assert "`OwnClipping.configure_gradient_clipping` is overridden" in named[0]
    assert "clipped twice" in named[0] and "remove the override" in named[0]
    with caught_warnings() as messages:
        fit(TinyClassifier(), tmp_path, [GradientClipCallback(0.5)], max_steps=1)
    assert not any("configure_gradient_clipping" in m or "clips twice" in m for m in messages)


# ---------------------------------------------------------------------------------------- steps the hook misses


class RawStep(TinyClassifier):
    def __init__(self, raw: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch, batch_idx):
        opt = self.optimizers(use_pl_optimizer=not self.raw)
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()


@pytest.mark.parametrize("raw", [True, False], ids=["raw-optimizer", "lightning-optimizer"])
def test_an_optimizer_stepped_around_lightning_warns_once(tmp_path, raw):
    cb = GradientClipCallback(0.1)
    with caught_warnings() as messages:
        fit(RawStep(raw), tmp_path, [cb])
    missed = [m for m in messages if "did not precede" in m]
    if not raw:
        assert not missed and cb.summary()["steps"] == STEPS_PER_EPOCH
        return
    assert len(missed) == 1, messages
    assert "optimizer 0 (SGD)" in missed[0] and "use_pl_optimizer=False" in missed[0]
    assert "opt = self.optimizers()" in missed[0]  # what to call instead


@pytest.mark.parametrize("setup", ["accumulate", "amp-scaler"])
def test_steps_through_lightning_never_warn_about_missed_steps(tmp_path, setup):
    from lightning.pytorch.plugins.precision import MixedPrecision

    kwargs: dict[str, Any] = {"accumulate_grad_batches": 2}
    if setup == "amp-scaler":  # the hook runs before `scaler.step`, outside the optimizer's step()
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    cb = GradientClipCallback(0.1)
    with caught_warnings() as messages:
        trainer = fit(TinyClassifier(), tmp_path, [cb], **kwargs)
    assert not any("did not precede" in m for m in messages), messages
    assert cb.summary()["steps"] == trainer.global_step > 0


# ---------------------------------------------------------------------------------------- AutoClip per parameter


def test_per_parameter_autoclip_keeps_the_history_when_parameters_are_appended():
    clipper = AutoClip(per_parameter=True, percentile=50.0)
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    for g in (1.0, 2.0, 3.0):
        a.grad, b.grad = torch.full((3,), g), torch.full((3,), 10 * g)
        clipper.clip([a, b])
    old = clipper.history[: clipper.count].clone()
    a.grad, b.grad, c.grad = torch.full((3,), 0.5), torch.full((3,), 5.0), torch.full((3,), 7.0)
    with caught_warnings() as messages:
        clipper.clip([a, b, c])  # a param group added mid-fit: the new parameter comes last
    assert not messages
    assert clipper.count == 4
    assert torch.equal(clipper.history[:3, :2], old)  # the old parameters' history is kept
    assert torch.isnan(clipper.history[:3, 2]).all()  # the new one starts empty...
    # ...so its first norm is its own threshold (scaled by n / (n + 1e-6), as the reference does), and a and b,
    # under the medians of their own histories, are left as they are
    torch.testing.assert_close(c.grad, torch.full((3,), 7.0), rtol=1e-6, atol=0.0)
    assert torch.equal(a.grad, torch.full((3,), 0.5)) and torch.equal(b.grad, torch.full((3,), 5.0))
    # resume: the saved history (NaN column included) continues exactly as the live one
    resumed = AutoClip(per_parameter=True, percentile=50.0)
    resumed.load_state_dict(clipper.state_dict())
    for g in (4.0, 0.1):
        grads = [torch.full((3,), g * k) for k in (1.0, 2.0, 3.0)]
        out = []
        for which in (clipper, resumed):
            params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
            for p, x in zip(params, grads, strict=True):
                p.grad = x.clone()
            which.clip(params)
            out.append([p.grad for p in params])
        for x, y in zip(*out, strict=True):
            assert torch.equal(x, y)
    live, restored = (torch.nan_to_num(c.history[: c.count], nan=-1.0) for c in (clipper, resumed))
    assert torch.equal(live, restored)


def test_per_parameter_autoclip_warns_when_the_parameters_change_otherwise():
    clipper = AutoClip(per_parameter=True)
    params = [torch.zeros(2, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(2)
    clipper.clip(params)
    with caught_warnings() as messages:
        clipper.clip(params[:2])
    assert any("starting afresh" in m for m in messages) and clipper.count == 1


class Unfreeze(Callback):
    """Adds a param group at global step 4, as BackboneFinetuning does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            first = pl_module.net[0]
            first.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(first.parameters())})


class FrozenFirstLayer(TinyClassifier):
    def configure_optimizers(self):
        self.net[0].requires_grad_(False)
        return torch.optim.SGD(self.net[2].parameters(), lr=0.1)


def test_per_parameter_autoclip_history_survives_backbone_finetuning(tmp_path):
    cb = GradientClipCallback(algorithm="autoclip", algorithm_options={"per_parameter": True})
    fit(FrozenFirstLayer(), tmp_path, [Unfreeze(), cb], max_steps=7)
    assert cb.clipper.count == 7 and cb.clipper.history.shape[1] == 4
    assert torch.isnan(cb.clipper.history[:4, 2:]).all()  # the added layer's norms start at step 4


# ---------------------------------------------------------------------------------------- ZClip's end-of-fit warning


@pytest.mark.parametrize(
    ("clip_val", "mean", "names", "not_named"),
    [
        (None, 75.0, ["spike rule", "clip_val=None", "z_thresh"], ["is below the usual"]),
        (100.0, 75.0, ["spike rule", "clip_val=100.0 is above the mean"], ["is below the usual"]),
        (0.1, 75.0, ["hard cap clip_val=0.1 is below the usual gradient norm"], ["spike rule"]),
    ],
)
def test_zclip_mostly_clipped_warning_names_the_rule_that_clipped(monkeypatch, clip_val, mean, names, not_named):
    cb = GradientClipCallback(clip_val, algorithm="zclip")
    summary = {"steps": 24.0, "clipped_fraction": 0.88, "clipped_steps": 21.0, "mean_norm": mean, "max_norm": 90.0}
    monkeypatch.setattr(cb, "summary", lambda: {**summary, "nonfinite_skipped": 0.0})
    with caught_warnings() as messages:
        cb.on_train_end(None, None)  # type: ignore[arg-type]
    assert len(messages) == 1 and "clipped 88% of 24 steps" in messages[0]
    assert all(n in messages[0] for n in names), messages[0]
    assert not any(n in messages[0] for n in not_named), messages[0]


# ---------------------------------------------------------------------------------------- logging cadence


class SometimesNone(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx in (1, 2) else loss


def test_grad_rows_are_the_trainers_rows_when_training_step_returns_none(tmp_path):
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*returned `None`.*")
        fit(SometimesNone(), tmp_path, [GradientClipCallback(1.0)], logger=logger, log_every_n_steps=3, max_epochs=2)
    grad_rows = [step for step, _ in logger.rows_with("grad/norm")]
    loss_rows = [step for step, _ in logger.rows_with("train/loss")]
    assert loss_rows == [2, 5, 8, 11, 14]  # Lightning's rows
    assert grad_rows == [5, 8, 11, 14]  # the same, minus step 2, whose batch had no gradient


# ---------------------------------------------------------------------------------------- numbers from numpy / torch


@pytest.mark.parametrize(
    ("clip_val", "expected"),
    [(np.float32(0.5), 0.5), (np.int64(1), 1.0), (torch.tensor(0.5), 0.5), (np.array(0.25), 0.25)],
    ids=["np.float32", "np.int64", "0-d tensor", "0-d array"],
)
def test_clip_val_accepts_numpy_and_torch_scalars(clip_val, expected):
    cb = GradientClipCallback(clip_val)
    assert cb.clip_val == expected and type(cb.clip_val) is float


@pytest.mark.parametrize(
    "clip_val", [True, np.bool_(True), torch.tensor(True), torch.tensor([0.5]), np.float32("nan")]
)
def test_clip_val_still_refuses_bools_non_scalars_and_nan(clip_val):
    with pytest.raises(ValueError, match=r"`GradientClipCallback\(clip_val=\.\.\.\)` must be a finite number > 0"):
        GradientClipCallback(clip_val)


# ---------------------------------------------------------------------------------------- what counts as clipped


class LargeGradients(TinyClassifier):
    """Gradient norms between 1 and 3: torch's +1e-6 scales a norm right at the bound by less than 1e-6, yet by
    more than float32 rounds away (a norm of 50 would give a coefficient of exactly 1.0)."""

    def training_step(self, batch, batch_idx):
        return 3.0 * super().training_step(batch, batch_idx)


def test_autoclip_at_percentile_100_clips_nothing_and_says_so(tmp_path):
    norms, cb = Norms(), GradientClipCallback(algorithm="autoclip", algorithm_options={"percentile": 100.0})
    fit(LargeGradients(lr=0.01), tmp_path, [norms, cb], max_epochs=2)
    assert min(norms.norms) > 1.0 and max(norms.norms) < 10.0  # the case this test is about
    assert cb.summary()["clipped_steps"] == 0.0 and cb.summary()["clipped_fraction"] == 0.0


def test_a_clipping_norm_clip_still_counts(tmp_path):
    norms, cb = Norms(), GradientClipCallback(1.0)
    fit(LargeGradients(lr=0.01), tmp_path, [norms, cb])
    assert cb.summary()["clipped_steps"] == sum(n > 1.0 for n in norms.norms) == STEPS_PER_EPOCH


def test_zclip_clip_option_given_in_percentile_mode_warns_that_it_does_nothing():
    with caught_warnings() as messages:
        ZClip(mode="percentile", clip_option="mean")
    assert len(messages) == 1 and "clip_option='mean' has no effect with mode='percentile'" in messages[0]
    with caught_warnings() as messages:
        ZClip(mode="percentile")
        ZClip(mode="percentile", clip_option="adaptive_scaling")  # the default, as Hydra's preset passes it
        ZClip(clip_option="mean")
    assert not messages
    with caught_warnings() as messages:
        GradientClipCallback(algorithm="zclip", algorithm_options={"mode": "percentile", "clip_option": "mean"})
    assert any("has no effect" in m for m in messages)


def test_zclip_clip_factor_without_adaptive_scaling_warns():
    with caught_warnings() as messages:
        ZClip(clip_option="mean", clip_factor=0.7)
    assert len(messages) == 1 and "clip_factor=0.7 has no effect" in messages[0]
    assert math.isclose(ZClip(clip_factor=0.7).clip_factor, 0.7)
