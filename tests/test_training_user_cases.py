"""Training set-ups users bring, where the schedule's clock, a threshold or a precision used to mislead: two
optimizers stepped by hand with regrowth, ``max_steps`` under manual optimization, an epoch schedule with
regrowth, threshold pruning with the ramp's arguments or a ceiling, a GradScaler skipping a step for an
overflow in a pruned entry, Adam in float16. Tiny CPU fits, a few seconds in all.
"""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback
from lightning_clipprune.callbacks._prune_plan import _divergence_advice
from lightning_clipprune.pruning import keeps_pruned_weights_zero
from tests.helpers import TinyClassifier, random_loader, tiny_trainer


class _TwoOptimizers(TinyClassifier):
    """Manual optimization: one backward, then two optimizers step (each its own layer)."""

    def __init__(self, steps_per_batch: int = 2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps_per_batch = steps_per_batch

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        for opt in optimizers[: self.steps_per_batch]:
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class _Regrown(Logger):
    name, version = "regrown", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, float]] = []

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "prune/regrown" in metrics:
            self.rows.append((step, metrics["prune/regrown"]))


def test_two_optimizers_stepped_by_hand_regrow_once_per_event_and_keep_the_counts(tmp_path):
    prune = MagnitudePruneCallback(sparsity=0.8, end=10, frequency=2, regrow={"method": "rigl", "interval": 4, "start": 10, "end": 30})
    logger, model = _Regrown(), _TwoOptimizers()
    tiny_trainer(tmp_path, max_epochs=4, logger=logger, callbacks=[prune, GradientClipCallback()]).fit(model, random_loader())
    assert prune._regrow.events == 4 and [step for step, _ in logger.rows] == [14, 18, 22, 26]
    for name, p in model.named_parameters():
        if name in prune.masks:
            mask = prune.masks[name]
            assert torch.equal(p.detach() != 0, mask & (p.detach() != 0)) and not p.detach()[~mask].any()
    kept = sum(int(m.sum()) for m in prune.masks.values())
    assert kept == round(0.2 * sum(m.numel() for m in prune.masks.values()))


def test_max_steps_under_manual_optimization_warns_when_batches_step_other_than_once(tmp_path):
    prune = MagnitudePruneCallback(sparsity=0.5, end=0.5)
    with pytest.warns(UserWarning, match=r"max_steps=16 counts optimizer steps \(2 in the first 1 batch\(es\)\): end=0.5 was"):
        tiny_trainer(tmp_path, max_steps=16, callbacks=[prune]).fit(_TwoOptimizers(), random_loader())
    # one optimizer step per batch: max_steps counts the batches, nothing to say
    prune = MagnitudePruneCallback(sparsity=0.5, end=0.5)
    with _no_warning("counts optimizer steps"):
        tiny_trainer(tmp_path, max_steps=16, callbacks=[prune]).fit(_TwoOptimizers(steps_per_batch=1), random_loader())
    assert prune._positions[1] == 8


def test_the_manual_clock_warning_says_when_the_ramp_ends_after_the_run(tmp_path):
    prune = MagnitudePruneCallback(sparsity=0.5, end=0.9)  # batch 14 of "16", where the run ends near batch 8
    with pytest.warns(UserWarning, match=r"the run ends near batch 8, before the ramp's end \(batch 14\): the target will not"):
        tiny_trainer(tmp_path, max_steps=16, callbacks=[prune]).fit(_TwoOptimizers(), random_loader())


class _no_warning:
    def __init__(self, text: str) -> None:
        self.text = text

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.caught if self.text in str(w.message)]


@pytest.mark.parametrize(("max_epochs", "max_steps"), [(5, -1), (10, 40), (-1, 40)])
def test_an_epoch_schedule_starts_regrowth_where_its_last_epoch_ends(tmp_path, max_epochs, max_steps):
    prune = MagnitudePruneCallback(sparsity=0.5, unit="epoch", end=2, regrow={"method": "rigl", "interval": 4})
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, max_steps=max_steps, callbacks=[prune])
    trainer.fit(TinyClassifier(), random_loader())  # 8 batches an epoch
    assert prune._regrow._window[0] == 16 and prune._regrow.events > 0


def test_threshold_pruning_refuses_a_ceiling_and_says_what_has_no_effect(tmp_path):
    with pytest.raises(ValueError, match=r"threshold=0.3, max_layer_sparsity=0.9\)`: a threshold prunes every weight"):
        MagnitudePruneCallback(threshold=0.3, max_layer_sparsity=0.9)
    with pytest.warns(UserWarning, match=r"with `threshold`, schedule='linear', scope='local' have no effect"):
        MagnitudePruneCallback(threshold=0.3, schedule="linear", scope="local")
    with _no_warning("no effect"):
        MagnitudePruneCallback(threshold=0.3, schedule="oneshot")
        MagnitudePruneCallback(threshold=0.3, max_layer_sparsity=None)


def test_a_threshold_that_empties_a_layer_says_so(tmp_path):
    prune = MagnitudePruneCallback(threshold=0.3, scope="local")
    with pytest.warns(UserWarning, match=r"threshold 0.3 pruned every weight of 2 layer\(s\): net.0.weight, net.2.weight"):
        tiny_trainer(tmp_path, max_steps=4, callbacks=[prune]).fit(TinyClassifier(), random_loader())


class _InfInPrunedGradient(TinyClassifier):
    def __init__(self, prune: MagnitudePruneCallback) -> None:
        super().__init__()
        self.prune = prune

    def on_after_backward(self):
        if self.global_step == 12:  # the ramp is done: a pruned entry of the first layer overflows alone
            row, col = (~self.prune.masks["net.0.weight"]).nonzero()[0]
            self.net[0].weight.grad[row, col] = float("inf")


def test_a_scaler_skip_for_an_overflow_in_a_pruned_entry_is_counted(tmp_path):
    prune, clip = MagnitudePruneCallback(sparsity=0.8, end=8, frequency=4), GradientClipCallback(clip_val=0.5)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    tiny_trainer(tmp_path, max_steps=16, plugins=[plugin], callbacks=[clip, prune]).fit(_InfInPrunedGradient(prune), random_loader())
    assert plugin.scaler.get_scale() == 2.0**15 and clip.summary()["nonfinite_skipped"] == 1


def test_adam_in_float16_is_not_trusted_to_keep_pruned_weights_zero():
    def adam(dtype: torch.dtype, eps: float = 1e-8) -> torch.optim.Optimizer:
        return torch.optim.Adam([nn.Parameter(torch.zeros(2, dtype=dtype))], eps=eps)

    assert keeps_pruned_weights_zero(adam(torch.float32)) and keeps_pruned_weights_zero(adam(torch.bfloat16))
    assert not keeps_pruned_weights_zero(adam(torch.float16))  # 1e-8 is 0 in float16: 0 / 0 at a pruned entry
    assert keeps_pruned_weights_zero(adam(torch.float16, eps=1e-4))


def test_the_divergence_advice_does_not_ask_for_a_clip_callback_that_is_there():
    alone = types.SimpleNamespace(callbacks=[], precision="32-true")
    clipped = types.SimpleNamespace(callbacks=[GradientClipCallback()], precision="16-true")
    assert "add a GradientClipCallback" in _divergence_advice(alone)
    advice = _divergence_advice(clipped)
    assert "add a GradientClipCallback" not in advice and "eps" in advice and "finite" in advice


class _DictBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


def _dict_loader() -> torch.utils.data.DataLoader:
    data = [{"x": x, "y": y} for x, y in random_loader(batch_size=1).dataset]
    return torch.utils.data.DataLoader(data, batch_size=16)


def test_a_calibrating_criterion_refuses_unreadable_batches_at_the_first_batch_and_takes_inputs(tmp_path):
    from lightning_clipprune.posttrain.criterion import Reconstruction

    prune = MagnitudePruneCallback(sparsity=0.5, criterion="obs", schedule="oneshot", start=1.0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[prune])
    with pytest.raises(ValueError, match=r"cannot read this loader's dict batches.*Reconstruction\(inputs=\.\.\., forward=\.\.\.\)"):
        trainer.fit(_DictBatches(), _dict_loader())
    assert trainer.global_step == 0
    criterion = Reconstruction(inputs=lambda b: b["x"], progress=False, num_samples=64)
    prune = MagnitudePruneCallback(sparsity=0.5, criterion=criterion, schedule="oneshot", start=1.0)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(_DictBatches(), _dict_loader())
    assert sum(int((~m).sum()) for m in prune.masks.values()) == sum(m.numel() for m in prune.masks.values()) // 2


def test_an_nm_pattern_names_its_sparsity_rounded():
    with pytest.raises(ValueError, match=r"so `sparsity` must be 0.333333 \(or left out\)"):
        MagnitudePruneCallback(sparsity=0.5, pattern="2:3")
