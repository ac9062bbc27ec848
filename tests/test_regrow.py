"""Regrowth (RigL, SET) in MagnitudePruneCallback: the pure math on hand-built tensors, then tiny CPU runs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback
from lightning_clipprune.callbacks._regrow import REGROWN_METRIC, RegrowConfig
from lightning_clipprune.pruning.regrow import (
    clipped_pruned_scores,
    cosine_fraction,
    drop_and_grow,
    random_scores,
    regrow_due,
    regrow_masks,
)
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

# ---------------------------------------------------------------------------------------------- pure math


def test_cosine_fraction_decays_from_fraction_to_zero() -> None:
    assert cosine_fraction(100, 100, 300, 0.3) == pytest.approx(0.3)
    assert cosine_fraction(200, 100, 300, 0.3) == pytest.approx(0.15)
    assert cosine_fraction(250, 100, 300, 0.3) == pytest.approx(0.15 * (1 + math.cos(0.75 * math.pi)))
    assert cosine_fraction(300, 100, 300, 0.3) == 0.0
    assert cosine_fraction(400, 100, 300, 0.3) == 0.0


def test_regrow_due_every_interval_after_start_before_end() -> None:
    assert [t for t in range(50) if regrow_due(t, 10, 40, 10)] == [20, 30]
    assert not any(regrow_due(t, 10, 15, 10) for t in range(50))


def test_drop_and_grow_swaps_smallest_live_for_largest_scored_and_keeps_the_count() -> None:
    w = torch.tensor([[0.5, 0.0, -0.1, 0.0, 0.3, 0.0], [0.2, 0.0, 0.0, -0.4, 0.0, 0.05]])
    mask = w != 0
    score = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0, 0.2], [0.0, 2.0, 0.5, 0.0, 9.0, 0.0]])
    new, grown = drop_and_grow(w, mask, score, fraction=0.5)  # 6 live -> k = 3
    assert int(new.sum()) == int(mask.sum())
    # dropped: the three smallest |w| that are not their row's largest (0.05, -0.1, 0.2)
    assert not new[1, 5] and not new[0, 2] and not new[1, 0]
    # grown: the three largest scores among the positions pruned before (9, 3, 2)
    assert grown.nonzero().tolist() == [[0, 3], [1, 1], [1, 4]]
    assert torch.equal(new & ~grown, mask & new)  # every kept position was kept or grown
    assert not (grown & mask).any()


def test_drop_and_grow_never_grows_without_signal_nor_empties_a_row() -> None:
    w = torch.tensor([[0.5, 0.0, 0.0], [0.01, 0.0, 0.0]])
    mask = w != 0
    new, grown = drop_and_grow(w, mask, torch.zeros(2, 3), fraction=1.0)
    assert torch.equal(new, mask) and not grown.any()  # no positive score: nothing moves
    new, grown = drop_and_grow(w, mask, torch.ones(2, 3), fraction=1.0)
    assert torch.equal(new, mask) and not grown.any()  # each live weight is its row's last: kept
    assert new.sum(1).tolist() == [1, 1]


def test_clipped_scores_scale_by_the_clip_coefficient_and_skip_a_skipped_step() -> None:
    raw = torch.tensor([[3.0, 4.0, 10.0, -20.0]])
    mask = torch.tensor([[True, True, False, False]])
    clipped = torch.tensor([[0.3, 0.4, 0.0, 0.0]])  # the live part clipped from norm 5 to norm 0.5
    assert torch.allclose(clipped_pruned_scores(raw, clipped, mask), torch.tensor([[0.0, 0.0, 1.0, 2.0]]))
    assert not clipped_pruned_scores(raw, None, mask).any()  # the clip skipped the step (grad None)
    nan = torch.tensor([[3.0, 4.0, float("nan"), float("inf")]])
    assert not clipped_pruned_scores(nan, clipped, mask).any()  # non-finite raw gradients never grow


def test_a_spiking_row_clipped_per_unit_loses_the_regrowth_to_a_quiet_one() -> None:
    # AGC clips per output row: row 0 spikes (clipped 100x), row 1 does not. By the raw gradient row 0
    # would take the regrown position; by the clipped gradient row 1 does.
    raw = torch.tensor([[100.0, 500.0], [1.0, 2.0]])
    mask = torch.tensor([[True, False], [True, False]])
    clipped = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.9, 0.0]])
    score = clipped_pruned_scores(raw, clipped, mask)
    assert torch.allclose(score, torch.tensor([[0.0, 5.0], [0.0, 2.0]]))
    w3 = torch.cat([w, torch.tensor([[0.1, 0.0]])])  # a third row with a weight to drop
    mask3 = torch.cat([mask, torch.tensor([[True, True]])])
    _, by_raw = drop_and_grow(w3, mask3, torch.cat([raw.abs() * ~mask, torch.zeros(1, 2)]), 0.25)
    _, by_clipped = drop_and_grow(w3, mask3, torch.cat([score, torch.zeros(1, 2)]), 0.25)
    assert by_raw.nonzero().tolist() == [[0, 1]]
    assert by_clipped.nonzero().tolist() == [[0, 1]]  # 5 > 2: still row 0 here...
    score[0, 1] = 1.5  # ...but once its clipped gradient is below row 1's, row 1 wins
    _, by_clipped = drop_and_grow(w3, mask3, torch.cat([score, torch.zeros(1, 2)]), 0.25)
    assert by_clipped.nonzero().tolist() == [[1, 1]]


def test_random_scores_are_reproducible_and_only_on_pruned_positions() -> None:
    mask = torch.rand(50, generator=torch.Generator().manual_seed(1)) > 0.5
    a = random_scores(mask, torch.Generator().manual_seed(7))
    b = random_scores(mask, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert (a[mask] == 0).all() and (a[~mask] > 0).all()


def test_regrow_masks_keeps_every_layers_count() -> None:
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 10, generator=g), "b": torch.randn(4, 8, generator=g)}
    masks = {n: w.abs() > 0.8 for n, w in weights.items()}
    scores = {n: torch.rand(w.shape, generator=g) * ~masks[n] for n, w in weights.items()}
    new, grown = regrow_masks(weights, masks, scores, 0.3)
    for n in weights:
        assert int(new[n].sum()) == int(masks[n].sum())
        assert int(grown[n].sum()) == round(0.3 * int(masks[n].sum()))


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regrow": "rig"}, r"regrow=.*must be one of"),
        ({"regrow": 3}, r"regrow=.*must be None"),
        ({"regrow": {"method": "rigl", "every": 10}}, r"a mapping of"),
        ({"regrow": {"fraction": 0.0}}, r"fraction"),
        ({"regrow": {"interval": 0}}, r"interval"),
        ({"regrow": {"end": 1.5}}, r"end"),
        ({"regrow": "rigl", "sparsity": None, "threshold": 0.1}, r"needs a `sparsity` target"),
        ({"regrow": "set", "pattern": "2:4", "sparsity": None}, r"pattern='unstructured'"),
    ],
)
def test_bad_regrow_arguments_raise_one_line(kwargs: dict, match: str) -> None:
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        MagnitudePruneCallback(**kwargs)


def test_regrow_accepts_a_name_a_mapping_or_a_config() -> None:
    assert MagnitudePruneCallback(sparsity=0.5, regrow="set")._regrow.config.method == "set"
    cb = MagnitudePruneCallback(sparsity=0.5, regrow={"fraction": 0.1, "interval": 50})
    assert cb._regrow.config == RegrowConfig(fraction=0.1, interval=50)
    assert MagnitudePruneCallback(sparsity=0.5, regrow=RegrowConfig(end=0.9))._regrow.config.end == 0.9
    assert MagnitudePruneCallback(sparsity=0.5)._regrow is None


def test_the_app_preset_builds_a_regrowing_callback(tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_clipprune.run import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "prune=regrow", "prune.regrow.method=set"])
    cb = instantiate(cfg.prune, _convert_="all")
    assert cb._regrow.config == RegrowConfig(method="set")


# ---------------------------------------------------------------------------------------------- training


def _regrow_cb(method: str = "rigl", **regrow) -> MagnitudePruneCallback:
    # 8 steps an epoch: the target (0.8) at step 8, then events at 10, 12, ... 28 (end 0.9 of 32 steps: 29)
    config = {"method": method, "interval": 2, "end": 0.9, "fraction": 0.3, **regrow}
    return MagnitudePruneCallback(sparsity=0.8, schedule="cubic", start=0, end=8, frequency=2, regrow=config, verbose=False)


class _Watch(Callback):
    """Per step: layer counts after the target, zeros of pruned weights, and what each event changed."""

    def __init__(self, prune: MagnitudePruneCallback) -> None:
        self.prune = prune
        self.counts: set[tuple[int, ...]] = set()
        self.grown_clean: list[bool] = []
        self.changed = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {n: m.clone() for n, m in self.prune.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        prune, params = self.prune, dict(pl_module.named_parameters())
        for n in prune.parameter_names:
            assert (params[n][~prune.masks[n]] == 0).all(), "a pruned weight is not zero between updates"
        if trainer.global_step <= 8:
            return
        self.counts.add(tuple(int(prune.masks[n].sum()) for n in prune.parameter_names))
        state = trainer.optimizers[0].state
        for n in prune.parameter_names:
            grown = prune.masks[n] & ~self.before[n]
            if grown.any():
                self.changed += int(grown.sum())
                moments = [v for v in state[params[n]].values() if torch.is_tensor(v) and v.shape == grown.shape]
                self.grown_clean.append(bool((params[n][grown] == 0).all()) and all(bool((v[grown] == 0).all()) for v in moments))


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_regrowth_keeps_every_layers_sparsity_zeros_and_starts_regrown_weights_clean(tmp_path, method: str) -> None:
    prune, logger = _regrow_cb(method), MemoryLogger()
    watch = _Watch(prune)
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer="adam", lr=0.01)
    callbacks = [GradientClipCallback(clip_val=0.5), prune, watch]
    tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=4, logger=logger).fit(model, random_loader())
    assert len(watch.counts) == 1  # the live count of every layer never moved after the target
    assert prune._regrow.events == 10 and prune._regrow.regrown_total > 0
    assert watch.changed == prune._regrow.regrown_total
    assert watch.grown_clean and all(watch.grown_clean)  # regrown: weight 0, Adam moments 0
    logged = [(step, row[REGROWN_METRIC]) for step, row in logger.rows_with(REGROWN_METRIC)]
    assert [s for s, _ in logged] == list(range(10, 29, 2)) and len(logged) == 10
    assert sum(v for _, v in logged) == prune._regrow.regrown_total
    assert prune.state_dict()["regrow"]["regrown_total"] == prune._regrow.regrown_total


class _ClipSees(Callback):
    """After the clip in the list: at each step, whether pruned gradients were zero when the clip ran."""

    def __init__(self, prune: MagnitudePruneCallback) -> None:
        self.prune, self.armed_steps, self.dense_copies = prune, [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.named_parameters())
        for n in self.prune.parameter_names:
            g = params[n].grad
            assert g is None or (g[~self.prune.masks[n]] == 0).all(), "the clip saw a pruned gradient"
        if self.prune._regrow._raw is not None:
            self.armed_steps.append(trainer.global_step)
            raw = self.prune._regrow._raw
            self.dense_copies += sum(int((raw[n][~self.prune.masks[n]] != 0).sum()) for n in raw)


def test_the_clip_norm_excludes_pruned_gradients_and_only_regrowth_steps_copy_them(tmp_path) -> None:
    prune = _regrow_cb()
    sees = _ClipSees(prune)
    L.seed_everything(0, verbose=False)
    callbacks = [prune, GradientClipCallback(clip_val=0.5), sees]  # the clip after the masker: order is free
    tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=4).fit(TinyClassifier(), random_loader())
    assert sees.armed_steps == list(range(10, 29, 2))  # a dense copy exists at regrowth steps only
    assert sees.dense_copies > 0  # and it holds the pruned positions' gradients


def test_rigl_and_set_choose_differently_and_each_is_reproducible(tmp_path) -> None:
    masks = {}
    for i, method in enumerate(["rigl", "rigl", "set"]):
        prune = _regrow_cb(method)
        L.seed_everything(0, verbose=False)
        tiny_trainer(tmp_path / str(i), callbacks=[GradientClipCallback(clip_val=0.5), prune], max_epochs=4).fit(
            TinyClassifier(), random_loader()
        )
        masks[i] = torch.cat([prune.masks[n].flatten() for n in prune.parameter_names])
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_resume_across_regrowth_events_is_bit_identical(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    def run(root, callbacks, **fit) -> tuple[TinyClassifier, MagnitudePruneCallback]:
        L.seed_everything(0, verbose=False)
        prune = _regrow_cb()
        model = TinyClassifier(optimizer="adamw", lr=0.01)
        trainer = tiny_trainer(root, callbacks=[GradientClipCallback(clip_val=0.5, algorithm="autoclip"), prune, *callbacks],
                               max_epochs=4, enable_checkpointing=bool(callbacks))
        trainer.fit(model, random_loader(), **fit)
        return model, prune

    full, full_cb = run(tmp_path / "a", [ckpt])
    mid = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)["callbacks"][full_cb.state_key]
    assert 0 < mid["regrow"]["events"] < full_cb._regrow.events  # events before and after the stop
    resumed, resumed_cb = run(tmp_path / "b", [], ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for n in full_cb.masks:
        assert torch.equal(full_cb.masks[n], resumed_cb.masks[n])
    assert resumed_cb._regrow.state_dict() == full_cb._regrow.state_dict()


class _RankMasks(Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        prune = next(cb for cb in trainer.callbacks if isinstance(cb, MagnitudePruneCallback))
        assert prune._regrow.regrown_total > 0
        flat = torch.cat([prune.masks[n].flatten() for n in prune.parameter_names]).float()
        gathered = trainer.strategy.all_gather(flat)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])


class _RankData(L.LightningDataModule):
    def train_dataloader(self):
        return random_loader(batch_size=8, seed=0)


@pytest.mark.slow
def test_ddp_regrown_masks_identical_on_every_rank(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="linear", start=0, end=2, frequency=1,
                                   regrow={"interval": 1, "end": 1.0}, verbose=False)
    trainer = tiny_trainer(tmp_path, callbacks=[GradientClipCallback(clip_val=0.5), prune, _RankMasks()],
                           max_epochs=1, devices=2, strategy="ddp_spawn")
    trainer.fit(TinyClassifier(), datamodule=_RankData())


def test_regrowth_under_gradient_accumulation_counts_optimizer_steps(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="cubic", start=0, end=4, frequency=2,
                                   regrow={"interval": 2, "end": 0.9}, verbose=False)
    sees = _ClipSees(prune)
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer="adam", lr=0.01)
    trainer = tiny_trainer(tmp_path, callbacks=[GradientClipCallback(clip_val=0.5), prune, sees], max_epochs=4,
                           accumulate_grad_batches=2)  # 16 optimizer steps: events at 6, 8, 10, 12 (end 0.9: 14)
    trainer.fit(model, random_loader())
    assert sees.armed_steps == [6, 8, 10, 12] and prune._regrow.events == 4
    params = dict(model.named_parameters())
    for n in prune.parameter_names:
        assert (params[n][~prune.masks[n]] == 0).all()
    assert 1 - sum(int(m.sum()) for m in prune.masks.values()) / sum(m.numel() for m in prune.masks.values()) == pytest.approx(0.8, abs=1e-3)
