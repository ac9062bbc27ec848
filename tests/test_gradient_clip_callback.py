"""GradientClipCallback on tiny LightningModules (CPU, fixed seeds, a fraction of a second per fit)."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_clipprune import GradientClipCallback
from lightning_clipprune.callbacks.gradient_clip import DEFAULT_CLIP_VAL
from lightning_clipprune.clipping import AGC, AutoClip, NormClip, ValueClip, ZClip
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

# 128 samples / batch 16: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8


class GradSnapshot(Callback):
    """Copies every gradient in `on_before_optimizer_step`; its place in the callback list decides whether it
    sees them before or after the clip callback."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.optim.Optimizer, dict[str, torch.Tensor | None]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {
            n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.named_parameters()
        }
        self.steps.append((optimizer, grads))

    def norm(self, step: int, prefix: str = "", norm_type: float = 2.0) -> float:
        grads = [
            g.flatten() for n, g in self.steps[step][1].items() if g is not None and n.startswith(prefix)
        ]
        return torch.linalg.vector_norm(torch.cat(grads), norm_type).item()


class ManualClassifier(TinyClassifier):
    """TinyClassifier with manual optimization."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()


class TwoOptimizers(L.LightningModule):
    """Two independent heads, one optimizer each, stepped one after the other (manual optimization)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(16, 4)
        self.b = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.a(x), y) + 3 * nn.functional.cross_entropy(self.b(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


class InfLossAt(TinyClassifier):
    """TinyClassifier whose loss is multiplied by inf at one batch of the first epoch (inf/NaN gradients)."""

    def __init__(self, bad_batch: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.current_epoch == 0 and batch_idx == self.bad_batch:
            loss = loss * math.inf
        return loss


class StepWatch(Callback):
    """Copies the parameters and optimizer state before one batch and keeps them beside those after it."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.before: tuple[dict, dict] | None = None
        self.after: tuple[dict, dict] | None = None

    def _snap(self, trainer, pl_module) -> tuple[dict, dict]:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        return params, copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            self.before = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            self.after = self._snap(trainer, pl_module)


def assert_state_equal(a: Any, b: Any) -> None:
    """Exact equality of nested dicts/lists of tensors and numbers (optimizer state dicts)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


def fit(module: L.LightningModule, tmp_path, callbacks: list[Callback], **trainer_kwargs: Any) -> L.Trainer:
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, random_loader())
    return trainer


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------- arguments


# Every wrong value: one ValueError line naming the argument, what is allowed and the value received.
BAD_ARGUMENTS = [
    ({"algorithm": "l2"}, "algorithm", "one of 'norm', 'value', 'agc', 'autoclip', 'zclip'"),
    ({"algorithm": None}, "algorithm", "one of 'norm'"),
    ({"algorithm": nn.Linear}, "algorithm", "or a clipper object"),
    ({"clip_val": 0.0}, "clip_val", "finite number > 0"),
    ({"clip_val": -1.0}, "clip_val", "finite number > 0"),
    ({"clip_val": math.inf}, "clip_val", "finite number > 0"),
    ({"clip_val": math.nan}, "clip_val", "finite number > 0"),
    ({"clip_val": True}, "clip_val", "finite number > 0"),
    ({"clip_val": "1.0"}, "clip_val", "finite number > 0"),
    ({"clip_val": None}, "clip_val", "a finite number > 0, got"),
    ({"clip_val": None, "algorithm": "agc"}, "clip_val", "a finite number > 0, got"),
    ({"clip_val": math.inf, "algorithm": "zclip"}, "clip_val", "finite number > 0 or None"),
    ({"norm_type": 0}, "norm_type", "a number > 0"),
    ({"norm_type": -2.0}, "norm_type", "a number > 0"),
    ({"norm_type": "fro"}, "norm_type", "a number > 0"),
    ({"norm_type": math.nan}, "norm_type", "a number > 0"),
    ({"exclude": [1]}, "exclude", "fnmatch patterns"),
    ({"exclude": None}, "exclude", "fnmatch patterns"),
    ({"exclude": 3}, "exclude", "fnmatch patterns"),
    ({"nonfinite": "ignore"}, "nonfinite", "one of 'skip', 'error'"),
    ({"nonfinite": None}, "nonfinite", "one of 'skip', 'error'"),
    ({"algorithm_options": [("alpha", 0.9)]}, "algorithm_options", "a dict of option name -> value"),
    ({"algorithm_options": {"alpha": 0.9}}, "algorithm_options", "a dict of options of NormClip (max_norm)"),
    ({"clip_val": 0.5, "algorithm_options": {"max_norm": 0.5}}, "algorithm_options", "without 'max_norm'"),
    ({"log_every_n_steps": 0}, "log_every_n_steps", "an integer >= 1 or None"),
    ({"log_every_n_steps": 1.5}, "log_every_n_steps", "an integer >= 1 or None"),
]


@pytest.mark.parametrize(("kwargs", "name", "allowed"), BAD_ARGUMENTS)
def test_invalid_arguments_name_argument_allowed_and_received(kwargs, name, allowed):
    with pytest.raises(ValueError) as info:
        GradientClipCallback(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"`GradientClipCallback({name}=...)` must be ")
    assert allowed in message
    assert message.endswith(f"got {kwargs[name]!r}.")


# The keywords of the previous release: still checked (by the algorithm's class), named as the user typed them.
DEPRECATED_BAD_ARGUMENTS = [
    ("agc", {"agc_eps": 0.0}, "finite number > 0"),
    ("agc", {"agc_eps": math.inf}, "finite number > 0"),
    ("agc", {"agc_eps": "1e-3"}, "finite number > 0"),
    ("autoclip", {"autoclip_percentile": 101}, "[0, 100]"),
    ("autoclip", {"autoclip_percentile": -1}, "[0, 100]"),
    ("autoclip", {"autoclip_percentile": "10"}, "[0, 100]"),
    ("autoclip", {"history_size": 0}, "an integer >= 1 or None"),
    ("autoclip", {"history_size": 2.5}, "an integer >= 1 or None"),
    ("autoclip", {"history_size": "1000"}, "an integer >= 1 or None"),
    ("autoclip", {"autoclip_per_parameter": "yes"}, "True or False"),
    ("autoclip", {"autoclip_per_parameter": 1}, "True or False"),
    ("zclip", {"zclip_alpha": 1.0}, "(0, 1)"),
    ("zclip", {"zclip_alpha": 0}, "(0, 1)"),
    ("zclip", {"zclip_z_thresh": -2.0}, "finite number > 0"),
    ("zclip", {"zclip_z_thresh": math.inf}, "finite number > 0"),
    ("zclip", {"zclip_warmup_steps": 0}, "an integer >= 1"),
    ("zclip", {"zclip_warmup_steps": 2.0}, "an integer >= 1"),
    ("zclip", {"zclip_mode": "mean"}, "one of 'zscore', 'percentile'"),
    ("zclip", {"zclip_clip_option": "clip"}, "one of 'adaptive_scaling', 'mean'"),
    ("zclip", {"zclip_clip_factor": 0.0}, "finite number > 0"),
    ("zclip", {"zclip_clip_factor": "0.7"}, "finite number > 0"),
    ("zclip", {"zclip_skip_update_on_spike": "false"}, "True or False"),
    ("zclip", {"zclip_eps": -1e-6}, "finite number >= 0"),
]


@pytest.mark.parametrize(("algorithm", "kwargs", "allowed"), DEPRECATED_BAD_ARGUMENTS)
def test_deprecated_keywords_are_checked_by_the_class_and_named_as_typed(algorithm, kwargs, allowed):
    (name,) = kwargs
    with pytest.warns(FutureWarning, match=f"{name}=.*deprecated"), pytest.raises(ValueError) as info:
        GradientClipCallback(algorithm=algorithm, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"`GradientClipCallback({name}=...)` must be ")
    assert allowed in message
    assert message.endswith(f"got {kwargs[name]!r}.")


def test_valid_arguments():
    for algorithm in ("autoclip", "zclip"):
        assert GradientClipCallback(None, algorithm).clip_val is None
    cb = GradientClipCallback(2, "agc", float("inf"), exclude="fc.*")
    assert cb.clip_val == 2.0 and cb.norm_type == math.inf and cb.exclude == ("fc.*",)


@pytest.mark.parametrize(
    ("algorithm", "cls", "expected"),
    [("norm", NormClip, 1.0), ("value", ValueClip, 1.0), ("agc", AGC, 0.01), ("autoclip", AutoClip, None),
     ("zclip", ZClip, 1.0)],
)
def test_clip_val_left_out_is_the_algorithms_published_default(algorithm, cls, expected):
    cb = GradientClipCallback(algorithm=algorithm)
    assert type(cb.clipper) is cls and cb.algorithm == algorithm
    assert cb.clip_val == expected == DEFAULT_CLIP_VAL[algorithm]
    # every other option is the class's own default: the callback restates none of them
    assert repr(cb.clipper) == repr(cls())


def test_options_reach_the_class_and_old_keywords_map_onto_them_with_a_warning():
    new = GradientClipCallback(algorithm="zclip", algorithm_options={"alpha": 0.9, "warmup_steps": 3})
    with pytest.warns(FutureWarning, match=r"zclip_alpha=.*deprecated.*algorithm_options=\{'alpha': 0.9") as caught:
        old = GradientClipCallback(algorithm="zclip", zclip_alpha=0.9, zclip_warmup_steps=3)
    assert caught[0].filename == __file__  # the warning points at the user's line
    assert repr(old.clipper) == repr(new.clipper) == repr(ZClip(alpha=0.9, warmup_steps=3))
    with pytest.warns(FutureWarning, match="history_size"):
        auto = GradientClipCallback(algorithm="autoclip", history_size=12, autoclip_per_parameter=True)
    assert (auto.clipper.history_size, auto.clipper.per_parameter) == (12, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # None is "not given" (the Hydra presets list the old names as null)
        GradientClipCallback(algorithm="zclip", zclip_alpha=None, zclip_eps=None)


def test_old_keyword_of_another_algorithm_and_unknown_keywords_are_refused():
    with pytest.raises(ValueError, match=r"^`GradientClipCallback\(zclip_alpha=...\)` must be left out: it is an "
                       r"option of algorithm 'zclip', algorithm is 'norm', got 0.9\.$"):
        GradientClipCallback(1.0, "norm", zclip_alpha=0.9)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zclip_alhpa'"):
        GradientClipCallback(algorithm="zclip", zclip_alhpa=0.9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"clip_val": 1.0}, "clip_val"), ({"clip_val": None}, "clip_val"),
     ({"algorithm_options": {"alpha": 0.9}}, "algorithm_options"), ({"zclip_alpha": 0.9}, "zclip_alpha")],
)
def test_a_clipper_object_carries_its_own_options(kwargs, name):
    zclip = ZClip(alpha=0.9, max_norm=None)
    cb = GradientClipCallback(algorithm=zclip)
    assert cb.clipper is zclip and cb.algorithm == "zclip" and cb.clip_val is None
    with pytest.raises(ValueError, match=rf"^`GradientClipCallback\({name}=...\)` must be left out when algorithm is "
                       r"a clipper object: set it on the object \(ZClip\(...\)\)"):
        GradientClipCallback(algorithm=zclip, **kwargs)


def test_a_class_is_built_like_a_name():
    cb = GradientClipCallback(0.5, AutoClip, algorithm_options={"percentile": 25.0})
    assert isinstance(cb.clipper, AutoClip) and (cb.clipper.max_norm, cb.clipper.percentile) == (0.5, 25.0)
    with pytest.raises(ValueError, match=r"^`AutoClip\(percentile=...\)` must be a finite number in \[0, 100\]"):
        GradientClipCallback(algorithm="autoclip", algorithm_options={"percentile": 150})


def test_two_clip_callbacks_are_refused_with_one_line(tmp_path):
    # In the Trainer's list: Lightning itself refuses two stateful callbacks of one type, at construction.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GradientClipCallback`") as info:
        tiny_trainer(tmp_path, callbacks=[GradientClipCallback(1.0), GradientClipCallback(algorithm="agc")])
    assert "\n" not in str(info.value)
    # Added later (past Lightning's check): the callback refuses in setup, before any step.
    trainer = tiny_trainer(tmp_path, callbacks=[GradientClipCallback(1.0)])
    trainer.callbacks.append(GradientClipCallback(algorithm="agc"))
    module = TinyClassifier()
    start = weights(module)
    with pytest.raises(MisconfigurationException, match=r"2 `GradientClipCallback`s.*keep one") as info:
        trainer.fit(module, random_loader())
    assert "\n" not in str(info.value)
    assert_state_equal(weights(module), start)


def test_trainer_gradient_clip_val_conflict_is_an_error_in_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"gradient_clip_val=0\.5.*Drop one") as info:
        fit(TinyClassifier(), tmp_path, [GradientClipCallback(1.0)], gradient_clip_val=0.5)
    assert "remove `gradient_clip_val` from the Trainer" in str(info.value)
    assert "remove the callback" in str(info.value)


# ---------------------------------------------------------------------------------------- clipping in a run


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_same_weights_as_lightning_builtin_clipping(tmp_path, algorithm):
    torch.manual_seed(0)
    ours, builtin = TinyClassifier(), TinyClassifier()
    builtin.load_state_dict(ours.state_dict())
    cb = GradientClipCallback(0.05, algorithm)
    fit(ours, tmp_path, [cb], max_epochs=2)
    fit(builtin, tmp_path, [], max_epochs=2, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)
    for k, v in weights(ours).items():
        assert torch.equal(v, weights(builtin)[k]), k
    summary = cb.summary()
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["clipped_fraction"] == 1.0  # 0.05 is below every norm of this problem


def test_logs_pre_clip_norm_and_coef_every_n_steps(tmp_path):
    before, after, logger = GradSnapshot(), GradSnapshot(), MemoryLogger()
    cb = GradientClipCallback(0.3, "norm", log_every_n_steps=3)
    fit(TinyClassifier(), tmp_path, [before, cb, after], logger=logger)
    rows = logger.rows_with("grad/norm")
    assert len(rows) == STEPS_PER_EPOCH // 3  # after optimizer steps 3 and 6
    for (step, metrics), k in zip(rows, (2, 5), strict=True):
        assert step == k  # the Trainer's logging step: optimizer steps taken before this one
        norm = before.norm(k)
        assert metrics["grad/norm"] == pytest.approx(norm, rel=1e-5)
        assert metrics["grad/clip_coef"] == pytest.approx(min(1.0, 0.3 / (norm + 1e-6)), rel=1e-5)
        assert metrics["grad/nonfinite_skipped"] == 0.0
    assert all(after.norm(k) <= 0.3 * (1 + 1e-5) for k in range(STEPS_PER_EPOCH))
    assert any(before.norm(k) > 0.3 for k in range(STEPS_PER_EPOCH))  # clipping did something
    summary = cb.summary()
    norms = [before.norm(k) for k in range(STEPS_PER_EPOCH)]
    assert summary["mean_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert summary["max_norm"] == pytest.approx(max(norms), rel=1e-5)
    assert summary["clipped_fraction"] == sum(n > 0.3 for n in norms) / len(norms)


def test_log_cadence_defaults_to_trainer_and_no_logger_is_fine(tmp_path):
    logger = MemoryLogger()
    fit(TinyClassifier(), tmp_path, [GradientClipCallback(1.0)], logger=logger, log_every_n_steps=2)
    assert len(logger.rows_with("grad/norm")) == STEPS_PER_EPOCH // 2
    cb = GradientClipCallback(1.0, log_every_n_steps=1)
    fit(TinyClassifier(), tmp_path, [cb], logger=False)
    assert cb.summary()["steps"] == STEPS_PER_EPOCH


def test_gradient_accumulation_clips_the_accumulated_gradient_once_per_step(tmp_path):
    torch.manual_seed(0)
    module = TinyClassifier()
    start = copy.deepcopy(module)
    logger, calls = MemoryLogger(), GradSnapshot()
    cb = GradientClipCallback(0.2, log_every_n_steps=1)
    fit(module, tmp_path, [cb, calls], logger=logger, accumulate_grad_batches=4)
    assert cb.summary()["steps"] == STEPS_PER_EPOCH // 4
    assert len(calls.steps) == STEPS_PER_EPOCH // 4
    # the first step's norm is that of the gradient accumulated over batches 0..3 (Lightning divides by 4)
    for i, (x, y) in enumerate(random_loader()):
        if i == 4:
            break
        (nn.functional.cross_entropy(start(x), y) / 4).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in start.parameters()])).item()
    assert logger.rows_with("grad/norm")[0][1]["grad/norm"] == pytest.approx(expected, rel=1e-5)
    assert calls.norm(0) <= 0.2 * (1 + 1e-5)


def test_manual_optimization_is_clipped(tmp_path):
    after, logger = GradSnapshot(), MemoryLogger()
    cb = GradientClipCallback(0.1, log_every_n_steps=1)
    fit(ManualClassifier(), tmp_path, [cb, after], logger=logger)
    assert cb.summary()["steps"] == STEPS_PER_EPOCH
    assert len(logger.rows_with("grad/norm")) == STEPS_PER_EPOCH
    assert all(after.norm(k) <= 0.1 * (1 + 1e-5) for k in range(STEPS_PER_EPOCH))
    assert all(m["grad/norm"] > 0.1 for _, m in logger.rows_with("grad/norm"))  # so every step was clipped


def test_two_optimizers_clip_only_the_stepped_parameters(tmp_path):
    before, after, logger = GradSnapshot(), GradSnapshot(), MemoryLogger()
    cb = GradientClipCallback(0.05, log_every_n_steps=1)
    module = TwoOptimizers()
    trainer = fit(module, tmp_path, [before, cb, after], logger=logger)
    opt_a, opt_b = trainer.optimizers
    assert [o for o, _ in before.steps[:2]] == [opt_a, opt_b]
    # stepping opt_a: a clipped, b untouched; stepping opt_b: b clipped (a's grads were already applied)
    assert before.norm(0, "a.") > 0.05 and after.norm(0, "a.") <= 0.05 * (1 + 1e-5)
    for name, g in before.steps[0][1].items():
        if name.startswith("b."):
            assert torch.equal(g, after.steps[0][1][name])
    assert before.norm(1, "b.") > 0.05 and after.norm(1, "b.") <= 0.05 * (1 + 1e-5)
    first = logger.rows_with("grad/norm")[0][1]
    assert first["grad/norm"] == pytest.approx(before.norm(0, "a."), rel=1e-5)
    second = logger.rows_with("grad/norm_opt1")[0][1]
    assert second["grad/norm_opt1"] == pytest.approx(before.norm(1, "b."), rel=1e-5)
    assert "grad/clip_coef_opt1" in second
    assert cb.summary()["steps"] == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("algorithm", ["norm", "agc"])
def test_excluded_parameters_are_not_clipped_nor_counted(tmp_path, algorithm):
    before, after, logger = GradSnapshot(), GradSnapshot(), MemoryLogger()
    clip_val = 0.05 if algorithm == "norm" else 0.001
    cb = GradientClipCallback(clip_val, algorithm, exclude=["net.2.*"], log_every_n_steps=1)
    fit(TinyClassifier(), tmp_path, [before, cb, after], logger=logger)
    for k in range(STEPS_PER_EPOCH):
        for name in ("net.2.weight", "net.2.bias"):
            assert torch.equal(before.steps[k][1][name], after.steps[k][1][name])
        assert after.norm(k, "net.0.") < before.norm(k, "net.0.")
        row = logger.rows_with("grad/norm")[k][1]
        assert row["grad/norm"] == pytest.approx(before.norm(k, "net.0."), rel=1e-5)
        assert row["grad/clip_coef"] == pytest.approx(
            after.norm(k, "net.0.") / before.norm(k, "net.0."), rel=1e-4
        )


def test_exclude_pattern_matching_nothing_warns(tmp_path):
    with pytest.warns(UserWarning, match="'head.*' matches no parameter"):
        fit(TinyClassifier(), tmp_path, [GradientClipCallback(1.0, exclude=["head.*"])])


class ZeroSomeGradients(Callback):
    """A stand-in for a pruning callback, a `GradientMasker`: `mask_gradients` zeroes some fixed gradients."""

    def __init__(self) -> None:
        self.mask = (torch.arange(32 * 16).reshape(32, 16) % 3 != 0).float()  # prunes a third
        self.calls = 0

    def mask_gradients(self) -> None:
        self.calls += 1
        self.grad_owner.grad.mul_(self.mask)

    def setup(self, trainer, pl_module, stage) -> None:
        self.grad_owner = pl_module.net[0].weight


def test_pruning_masks_are_applied_before_the_norm_whatever_the_order(tmp_path):
    before, logger, pruner = GradSnapshot(), MemoryLogger(), ZeroSomeGradients()
    cb = GradientClipCallback(0.1, log_every_n_steps=1)
    fit(TinyClassifier(), tmp_path, [before, cb, pruner], logger=logger)  # the pruner comes after the clip
    assert pruner.calls == STEPS_PER_EPOCH
    for k, (_, row) in enumerate(logger.rows_with("grad/norm")):
        raw = before.steps[k][1]
        masked = [raw["net.0.weight"] * pruner.mask] + [g for n, g in raw.items() if n != "net.0.weight"]
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in masked])).item()
        unmasked = before.norm(k)
        assert row["grad/norm"] == pytest.approx(expected, rel=1e-5)
        assert abs(expected - unmasked) > 1e-4 * unmasked  # the mask changes the norm, so this can fail


# ---------------------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_nonfinite_step_is_skipped_params_and_optimizer_state_unchanged(tmp_path, optimizer):
    watch, logger = StepWatch(batch=3), MemoryLogger()
    cb = GradientClipCallback(1.0, log_every_n_steps=1)
    module = InfLossAt(bad_batch=3, optimizer=optimizer, lr=0.01)
    with pytest.warns(UserWarning, match=r"non-finite gradient norm .* global step 3.*skipped"):
        fit(module, tmp_path, [cb, watch], logger=logger, max_epochs=2)
    (params_before, opt_before), (params_after, opt_after) = watch.before, watch.after
    assert_state_equal(params_before, params_after)
    assert_state_equal(opt_before, opt_after)
    # training went on: the weights moved after the skipped step and are finite
    final = dict(module.named_parameters())
    assert all(torch.isfinite(p).all() for p in final.values())
    assert any(not torch.equal(final[n], params_after[n]) for n in final)
    assert cb.summary()["nonfinite_skipped"] == 1.0
    assert cb.summary()["steps"] == 2 * STEPS_PER_EPOCH
    rows = logger.rows_with("grad/norm")
    assert [m["grad/nonfinite_skipped"] for _, m in rows[:5]] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert not math.isfinite(rows[3][1]["grad/norm"])


class NanGradientAt(Callback):
    """Puts a NaN into one parameter's gradient at one optimizer step (place it before the clip callback)."""

    def __init__(self, name: str, step: int) -> None:
        self.name, self.step, self.calls = name, step, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.calls == self.step:
            dict(pl_module.named_parameters())[self.name].grad[0] = math.nan
        self.calls += 1


@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_nan_in_an_excluded_parameter_never_reaches_the_weights(tmp_path, nonfinite):
    watch, logger = StepWatch(batch=3), MemoryLogger()
    cb = GradientClipCallback(1.0, exclude=["net.2.*"], nonfinite=nonfinite, log_every_n_steps=1)
    module = TinyClassifier(optimizer="adam", lr=0.01)
    callbacks = [NanGradientAt("net.2.bias", step=3), cb, watch]
    if nonfinite == "error":
        with pytest.raises(RuntimeError, match=r"gradient norm is nan at global step 3"):
            fit(module, tmp_path, callbacks)
        return
    with pytest.warns(UserWarning, match=r"non-finite gradient norm .* global step 3.*skipped"):
        fit(module, tmp_path, callbacks, logger=logger)
    (params_before, opt_before), (params_after, opt_after) = watch.before, watch.after
    assert_state_equal(params_before, params_after)
    assert_state_equal(opt_before, opt_after)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    rows = logger.rows_with("grad/norm")
    assert math.isfinite(rows[3][1]["grad/norm"])  # the clipped parameters' norm was finite
    assert [m["grad/nonfinite_skipped"] for _, m in rows[2:5]] == [0.0, 1.0, 1.0]
    assert cb.summary()["nonfinite_skipped"] == 1.0


def test_without_the_callback_the_same_run_is_ruined(tmp_path):
    """Control for the test above: the inf step really does poison the weights when nothing skips it."""
    module = InfLossAt(bad_batch=3, optimizer="sgd", lr=0.01)
    fit(module, tmp_path, [], max_epochs=1)
    assert not all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_error_names_the_step(tmp_path):
    cb = GradientClipCallback(1.0, nonfinite="error")
    with pytest.raises(
        RuntimeError, match=r"gradient norm is (nan|inf) at global step 3 \(optimizer 0, epoch 0\)"
    ):
        fit(InfLossAt(bad_batch=3), tmp_path, [cb])


def test_amp_scaler_path_sees_unscaled_gradients_and_leaves_skipping_to_the_scaler(tmp_path):
    torch.manual_seed(0)
    amp_module = InfLossAt(bad_batch=3)
    fp32_module = copy.deepcopy(amp_module)
    fp32_module.bad_batch = -1  # a clean fp32 reference run
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    watch, amp_log, fp32_log = StepWatch(batch=3), MemoryLogger(), MemoryLogger()
    cb = GradientClipCallback(100.0, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(amp_module, tmp_path, [cb, watch], logger=amp_log, plugins=[plugin])
    # the callback left the skip to the scaler: it did not drop the gradients itself (that path warns)
    assert not any("the step is skipped" in str(w.message) for w in caught)
    fit(fp32_module, tmp_path, [GradientClipCallback(100.0, log_every_n_steps=1)], logger=fp32_log)
    # step 0 is identical up to half precision, so the callback saw the unscaled gradient (not 4096x)
    amp_norm, fp32_norm = amp_log.rows_with("grad/norm")[0][1]["grad/norm"], fp32_log.rows_with("grad/norm")[0][1]["grad/norm"]
    assert amp_norm == pytest.approx(fp32_norm, rel=2e-2)
    # the inf step: counted, skipped by the scaler (weights unchanged), scale lowered
    assert cb.summary()["nonfinite_skipped"] == 1.0
    assert_state_equal(watch.before[0], watch.after[0])
    assert scaler.get_scale() < 2.0**12


# ---------------------------------------------------------------------------------------- resume


class AmnesiacClip(GradientClipCallback):
    """Ignores the state in the checkpoint: the control of the resume test."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def run(tmp_path, algorithm: str, epochs: int, ckpt_path=None, load_callback_state: bool = True):
    torch.manual_seed(0)
    module = TinyClassifier()
    options = {
        "autoclip": {"percentile": 10.0, "history_size": 12},
        "zclip": {"warmup_steps": 3, "z_thresh": 0.5, "alpha": 0.8},
    }.get(algorithm)
    cls = GradientClipCallback if load_callback_state else AmnesiacClip
    cb = cls(0.5 if algorithm == "norm" else None, algorithm, algorithm_options=options)
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=epochs)
    trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
    return module, cb, trainer


@pytest.mark.parametrize("algorithm", ["norm", "autoclip", "zclip"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, algorithm):
    full, full_cb, _ = run(tmp_path, algorithm, epochs=4)
    _, _, half = run(tmp_path, algorithm, epochs=2)
    ckpt = tmp_path / "mid.ckpt"
    half.save_checkpoint(ckpt)
    resumed, resumed_cb, _ = run(tmp_path, algorithm, epochs=4, ckpt_path=ckpt)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert resumed_cb.summary() == full_cb.summary()
    assert full_cb.summary()["clipped_fraction"] > 0.2  # clipping shaped this run
    if algorithm != "norm":
        assert_state_equal(full_cb.state_dict(), resumed_cb.state_dict())
        # control: the same resume without the callback's history ends elsewhere
        amnesiac, _, _ = run(tmp_path, algorithm, epochs=4, ckpt_path=ckpt, load_callback_state=False)
        assert any(not torch.equal(v, weights(amnesiac)[k]) for k, v in weights(full).items())


def test_loading_history_of_another_algorithm_warns_and_starts_fresh(tmp_path):
    _, source, _ = run(tmp_path, "autoclip", epochs=1)
    state = source.state_dict()
    assert state["clippers"][0]["count"] == STEPS_PER_EPOCH
    target = GradientClipCallback(None, "zclip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(state)
    assert any("fresh history" in str(w.message) for w in caught)
    assert target.state_dict()["clippers"] == {}
    same = GradientClipCallback(None, "autoclip", algorithm_options={"percentile": 10.0, "history_size": 12})
    same.load_state_dict(state)
    assert_state_equal(same.state_dict(), state)


def test_summary_before_any_step():
    assert GradientClipCallback().summary() == {
        "steps": 0.0,
        "clipped_fraction": 0.0,
        "clipped_steps": 0.0,
        "mean_norm": 0.0,
        "max_norm": 0.0,
        "nonfinite_skipped": 0.0,
    }


def test_summary_is_the_same_whatever_the_folding_batch(tmp_path, monkeypatch):
    """The per-step norms are folded into the accumulators in batches; the batch size must not matter."""
    from lightning_clipprune.callbacks import gradient_clip

    summaries = []
    for fold_every in (256, 3):
        monkeypatch.setattr(gradient_clip, "_FOLD_EVERY", fold_every)
        torch.manual_seed(0)
        cb = GradientClipCallback(0.8)
        fit(TinyClassifier(), tmp_path, [cb], max_epochs=2)
        summaries.append(cb.summary())
    assert summaries[0]["steps"] == summaries[1]["steps"] == 2 * STEPS_PER_EPOCH
    for key, value in summaries[0].items():
        assert summaries[1][key] == pytest.approx(value, rel=1e-12)
    assert 0.0 < summaries[0]["clipped_fraction"] < 1.0


# ---------------------------------------------------------------------------------------- the app's presets


@pytest.mark.parametrize("choice", ["norm", "value", "agc", "autoclip", "zclip"])
def test_clip_presets_use_the_callbacks_defaults(choice):
    import inspect

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_clipprune.callbacks._clip_algorithm import DEPRECATED_KEYWORDS
    from lightning_clipprune.clipping import CLIPPERS, option_defaults
    from lightning_clipprune.run import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=[f"clip={choice}"])
    preset = OmegaConf.to_container(cfg.clip)
    assert preset.pop("_target_") == "lightning_clipprune.GradientClipCallback"
    assert preset.pop("algorithm") == choice
    clip_val = preset.pop("clip_val")
    if choice == "agc":  # NFNets' lambda at batch 4096, scaled to the preset's batch: 0.01 * sqrt(4096 / 64)
        assert cfg.data.batch_size == 64
        assert clip_val == pytest.approx(DEFAULT_CLIP_VAL["agc"] * math.sqrt(4096 / cfg.data.batch_size))
    else:
        assert clip_val == DEFAULT_CLIP_VAL[choice]
    # every option of the class but the bound, at the class's default (the preset shows them; the class holds them)
    cls = CLIPPERS[choice]
    expected = {k: v for k, v in option_defaults(cls).items() if k != cls.clip_val_option}
    assert preset.pop("algorithm_options", {}) == expected
    # the previous release's names of those options, null (not given) for one more release
    old = {k for k, (name, _) in DEPRECATED_KEYWORDS.items() if name == choice}
    assert {k: preset.pop(k) for k in old} == dict.fromkeys(old)
    defaults = {k: p.default for k, p in inspect.signature(GradientClipCallback).parameters.items()}
    for key, value in preset.items():
        expected = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
        assert value == expected, key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the presets use no deprecated spelling
        cb = hydra_instantiate(cfg.clip)
    assert repr(cb.clipper) == repr(cls(**{cls.clip_val_option: clip_val}))


def test_clip_preset_overrides_new_and_old_spelling():
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.run import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        new = compose("config", overrides=["clip=zclip", "clip.algorithm_options.alpha=0.9", "clip.clip_val=null"])
        old = compose("config", overrides=["clip=zclip", "clip.zclip_alpha=0.9", "clip.clip_val=null"])
    assert repr(hydra_instantiate(new.clip).clipper) == repr(ZClip(alpha=0.9, max_norm=None))
    with pytest.warns(FutureWarning, match=r"clip.algorithm_options.alpha="):
        assert repr(hydra_instantiate(old.clip).clipper) == repr(ZClip(alpha=0.9, max_norm=None))


def hydra_instantiate(node: Any) -> GradientClipCallback:
    import hydra

    return hydra.utils.instantiate(node, _convert_="all")
