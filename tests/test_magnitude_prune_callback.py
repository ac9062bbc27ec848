"""MagnitudePruneCallback on tiny CPU runs: targets, zeros under every optimizer, resume, checkpoints."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_clipprune.callbacks import _prune_masking
from lightning_clipprune.callbacks.contract import GradientMasker, PruneState, find_callbacks
from lightning_clipprune.callbacks.magnitude_prune import MagnitudePruneCallback
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

# random_loader(): 128 samples, batch 16 -> 8 optimizer steps per epoch


def _fit(tmp_path, cb: MagnitudePruneCallback, model: L.LightningModule | None = None, **kw) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    model = model or TinyClassifier()
    callbacks = kw.pop("callbacks", [])
    trainer = tiny_trainer(tmp_path, callbacks=[cb, *callbacks], **kw)
    trainer.fit(model, random_loader())
    return model


def _pruned_fraction(model: nn.Module, names) -> float:
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / sum(params[n].numel() for n in names)


class _Probe(Callback):
    """Records the number of zero prunable weights after each optimizer step."""

    def __init__(self, prune: MagnitudePruneCallback) -> None:
        self.prune, self.zeros = prune, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        self.zeros[trainer.global_step] = {n: int((params[n] == 0).sum()) for n in self.prune.parameter_names}


@pytest.mark.parametrize("scope", ["global", "local"])
def test_target_reached_at_end_and_gradual_before(tmp_path, scope: str) -> None:
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="cubic", start=2, end=10, frequency=3, scope=scope, verbose=False)
    probe = _Probe(prune)
    model = _fit(tmp_path, prune, callbacks=[probe])  # 16 steps
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in prune.parameter_names}
    total = sum(sizes.values())
    # events at steps 2, 5, 8, 10; probe key k = state after the step that started at global_step k - 1
    assert sum(probe.zeros[2].values()) == 0
    after_first = sum(probe.zeros[3].values())
    assert after_first == 0  # s_i = 0 at start
    mid = sum(probe.zeros[6].values())  # after the event at step 5
    assert 0 < mid < round(0.8 * total)
    assert mid == pytest.approx(total * (0.8 - 0.8 * (1 - 3 / 8) ** 3), abs=1)
    for step in (11, 16):  # reached at end and held to the end of training
        zeros = probe.zeros[step]
        if scope == "local":
            for n, z in zeros.items():
                assert abs(z - round(0.8 * sizes[n])) <= 1, n
        else:
            assert abs(sum(zeros.values()) - round(0.8 * total)) <= len(sizes)
    assert prune.current_target == pytest.approx(0.8)
    pruned = {n: int((~m).sum()) for n, m in prune.masks.items()}
    if scope == "global":
        assert sum(pruned.values()) == round(0.8 * total)
    else:
        assert pruned == {n: round(0.8 * k) for n, k in sizes.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_pruned_weights_and_optimizer_state_stay_zero(tmp_path, optimizer: str) -> None:
    prune = MagnitudePruneCallback(sparsity=0.7, schedule="linear", start=0, end=6, frequency=2, verbose=False)
    model = _fit(tmp_path, prune, model=TinyClassifier(optimizer=optimizer, lr=0.05), max_epochs=3)
    params = dict(model.named_parameters())
    opt = model.trainer.optimizers[0]
    for name in prune.parameter_names:
        mask = prune.masks[name]
        assert (params[name][~mask] == 0).all(), name
        # +0.0, not -0.0: the sparse export then needs no sign bit per zero
        assert not torch.signbit(params[name][~mask]).any(), name
        assert (params[name][mask] != 0).all(), name  # survivors moved and did not hit zero
        for key, value in opt.state[params[name]].items():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert (value[~mask] == 0).all(), (name, key)
    assert _pruned_fraction(model, prune.parameter_names) == pytest.approx(0.7, abs=1e-2)
    # hooks are gone after fit: a later step does not touch the weights through us
    assert len(opt._optimizer_step_post_hooks) == 0


def test_gradients_masked_before_any_clip_callback_whatever_the_order(tmp_path) -> None:
    class ClipSpy(Callback):
        """Stands in for GradientClipCallback: calls mask_gradients first, then looks at the grads."""

        def __init__(self) -> None:
            self.checked = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            for masker in find_callbacks(trainer, GradientMasker, exclude=self):
                masker.mask_gradients()
            params = dict(pl_module.named_parameters())
            for cb in find_callbacks(trainer, PruneState):
                if cb.current_target:  # after the first event
                    for n in cb.parameter_names:
                        assert (params[n].grad[~cb.masks[n]] == 0).all()
                    self.checked += 1

    spy = ClipSpy()
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1, verbose=False)
    L.seed_everything(0, verbose=False)
    trainer = tiny_trainer(tmp_path, callbacks=[spy, prune], max_epochs=1, gradient_clip_val=0.5)
    trainer.fit(TinyClassifier(), random_loader())
    assert spy.checked == 7


@pytest.mark.parametrize("clip_first", [True, False])
def test_real_clip_callback_masks_once_per_step_in_either_order(tmp_path, monkeypatch, clip_first: bool) -> None:
    from lightning_clipprune import GradientClipCallback

    class Checker(Callback):
        """Last in the list: the gradients the optimizer is about to use."""

        def __init__(self) -> None:
            self.checked = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if prune.current_target:  # after the event
                params = dict(pl_module.named_parameters())
                for n in prune.parameter_names:
                    assert (params[n].grad[~prune.masks[n]] == 0).all(), n
                self.checked += 1

    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1, verbose=False)
    model = TinyClassifier()
    grad_passes = []
    original = _prune_masking.apply_masks_  # the hot path lives in callbacks/_prune_masking.py

    def counting(tensors, masks):
        grads = {id(p.grad) for p in model.parameters() if p.grad is not None}
        grad_passes.extend(1 for t in tensors[:1] if id(t) in grads)
        original(tensors, masks)

    monkeypatch.setattr(_prune_masking, "apply_masks_", counting)
    clip = GradientClipCallback(clip_val=0.5)
    checker = Checker()
    L.seed_everything(0, verbose=False)
    callbacks = [clip, prune, checker] if clip_first else [prune, clip, checker]
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    trainer.fit(model, random_loader())
    assert checker.checked == 7
    assert len(grad_passes) == trainer.global_step - 1 == 7  # one gradient pass per step after the event, not two


def test_mask_gradients_is_idempotent_and_zeroes_only_pruned(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    model = _fit(tmp_path, prune, max_epochs=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    prune.mask_gradients()
    prune.mask_gradients()
    params = dict(model.named_parameters())
    for n in prune.parameter_names:
        assert torch.equal(params[n].grad, prune.masks[n].float())
    assert (model.net[0].bias.grad == 1).all()
    # only the first call between two backward passes works ...
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    prune.mask_gradients()
    assert all(bool((p.grad == 1).all()) for p in model.parameters())
    # ... and a new backward pass re-arms it
    prune.on_after_backward(model.trainer, model)
    prune.mask_gradients()
    for n in prune.parameter_names:
        assert torch.equal(params[n].grad, prune.masks[n].float())


def _weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_resume_mid_schedule_is_bit_identical(tmp_path, criterion: str) -> None:
    def make() -> MagnitudePruneCallback:  # 32 steps; end = 0.75 -> 24; checkpoint after epoch 2 = step 16
        return MagnitudePruneCallback(sparsity=0.75, schedule="cubic", start=0.1, end=0.75, frequency=3, criterion=criterion, verbose=False)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    L.seed_everything(0, verbose=False)
    full_cb = make()
    full = TinyClassifier(optimizer="adamw", lr=0.01)
    tiny_trainer(tmp_path / "a", callbacks=[full_cb, ckpt], max_epochs=4, enable_checkpointing=True).fit(full, random_loader())
    mid_state = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)
    state = mid_state["callbacks"][full_cb.state_key]
    assert state["active"] and 0 < state["current_target"] < 0.75  # really mid-schedule

    class HookCount(Callback):
        def __init__(self) -> None:
            self.counts: set[int] = set()

        def on_train_batch_start(self, trainer, *args) -> None:
            self.counts.add(len(trainer.optimizers[0]._optimizer_step_post_hooks))

    L.seed_everything(0, verbose=False)
    resumed_cb, hooks = make(), HookCount()
    resumed = TinyClassifier(optimizer="adamw", lr=0.01)
    trainer = tiny_trainer(tmp_path / "b", callbacks=[resumed_cb, hooks], max_epochs=4)
    trainer.fit(resumed, random_loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    a, b = _weights_of(full), _weights_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for n in full_cb.masks:
        assert torch.equal(full_cb.masks[n], resumed_cb.masks[n])
    assert resumed_cb.current_target == full_cb.current_target == pytest.approx(0.75)
    assert hooks.counts == {1}  # registered once on resume
    assert len(trainer.optimizers[0]._optimizer_step_post_hooks) == 0  # and removed at fit end


def test_state_dict_keys_unchanged_and_checkpoint_loads_into_dense_model(tmp_path) -> None:
    dense = TinyClassifier()
    keys = list(dense.state_dict())
    prune = MagnitudePruneCallback(sparsity=0.6, schedule="oneshot", start=0, verbose=False)
    model = _fit(tmp_path, prune, model=dense, max_epochs=1)
    assert list(model.state_dict()) == keys
    fresh = TinyClassifier()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert _pruned_fraction(fresh, prune.parameter_names) == pytest.approx(0.6, abs=1e-2)
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in model.modules())


class MixedNet(L.LightningModule):
    """Embedding -> LSTM -> Conv1d -> BatchNorm1d -> Linear: only the Conv1d and Linear weights are prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(tokens))
        h = self.bn(self.conv(h.transpose(1, 2))).relu().mean(2)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_works_beside_batchnorm_embedding_and_lstm(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (64, 6), generator=g)
    y = x[:, 0] % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = MixedNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=4, frequency=2, verbose=False)
    L.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, callbacks=[prune], max_epochs=2).fit(model, loader)
    assert prune.parameter_names == ["conv.weight", "head.weight"]
    assert list(model.state_dict()) == list(before)
    assert _pruned_fraction(model, prune.parameter_names) == pytest.approx(0.5, abs=1 / 200)
    for name, p in model.named_parameters():
        if name not in prune.parameter_names:
            assert (p != 0).all(), name  # dense
            assert not torch.equal(p.detach(), before[name]), name  # and trained


def test_nm_and_channel_patterns_in_training(tmp_path) -> None:
    nm = MagnitudePruneCallback(pattern="2:4", schedule="cubic", start=0, end=6, frequency=2, verbose=False)
    model = _fit(tmp_path, nm, max_epochs=1)
    assert nm.sparsity == 0.5
    for n in nm.parameter_names:
        w = dict(model.named_parameters())[n]
        assert ((w != 0).reshape(-1, 4).sum(1) <= 2).all()

    ch = MagnitudePruneCallback(sparsity=0.25, pattern="channel", scope="local", schedule="oneshot", start=2, verbose=False)
    model = _fit(tmp_path / "ch", ch, max_epochs=1)
    rows = model.net[0].weight.detach().abs().sum(1)
    assert int((rows == 0).sum()) == 8


def test_threshold_mode_and_current_target(tmp_path) -> None:
    prune = MagnitudePruneCallback(threshold=0.1, schedule="oneshot", start=1.0, verbose=False)
    model = _fit(tmp_path, prune, max_epochs=1)
    assert prune.current_target is None
    for n in prune.parameter_names:
        w = dict(model.named_parameters())[n].detach()
        assert ((w == 0) | (w.abs() > 0.1)).all()
        assert (w == 0).any()


def test_oneshot_after_training_prunes_in_on_train_end(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.9, schedule="oneshot", start=1.0, verbose=False)
    probe = _Probe(prune)
    model = _fit(tmp_path, prune, callbacks=[probe])
    assert all(z == 0 for zeros in probe.zeros.values() for z in zeros.values())  # dense while training
    assert _pruned_fraction(model, prune.parameter_names) == pytest.approx(0.9, abs=1e-2)
    assert prune.metrics_before_pruning is not None and "train/loss" in prune.metrics_before_pruning


def test_unit_epoch(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.6, schedule="linear", start=0, end=2, unit="epoch", verbose=False)
    probe = _Probe(prune)
    _fit(tmp_path, prune, callbacks=[probe], max_epochs=3)
    total = sum(probe.zeros[1].values()) + 0
    assert total == 0  # epoch 0: target 0
    assert sum(probe.zeros[9].values()) == pytest.approx(0.3 * 640, abs=2)  # epoch 1
    assert sum(probe.zeros[24].values()) == pytest.approx(0.6 * 640, abs=2)  # epoch 2


def test_taylor_ema_sees_clipped_gradients(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, criterion="taylor", schedule="oneshot", start=1.0, verbose=False)
    _fit(tmp_path, prune, max_epochs=1, gradient_clip_val=1e-3)
    state = prune.state_dict()["criterion"]  # the Taylor criterion carries its own state
    ema_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in state["grad_avg"].values()]))
    assert 0 < float(ema_norm) <= 1e-3 * (1 + 1e-4)
    assert state["ema_steps"] == 8


def test_no_prunable_parameters_is_an_error_at_setup(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, include=["nothing.*"])
    with pytest.raises(ValueError, match="no prunable parameter"):
        _fit(tmp_path, prune, max_epochs=1)


def test_nm_shape_mismatch_is_an_error_at_setup(tmp_path) -> None:
    prune = MagnitudePruneCallback(pattern="2:8", verbose=False)  # in_features 12 is not a multiple of 8
    with pytest.raises(ValueError, match="multiple of 8"):
        _fit(tmp_path, prune, model=TinyClassifier(in_features=12), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `sparsity` and `threshold`"),
        ({"sparsity": 0.5, "threshold": 0.1}, "exactly one"),
        ({"sparsity": 1.0}, r"sparsity=.*\[0, 1\).*1.0"),
        ({"sparsity": -0.1}, r"sparsity=.*-0.1"),
        ({"threshold": -1.0}, r"threshold=.*>= 0.*-1.0"),
        ({"sparsity": 0.5, "schedule": "exp"}, r"schedule=.*'oneshot'.*'exp'"),
        ({"sparsity": 0.5, "pattern": "4:2"}, r"pattern=.*'4:2'"),
        ({"sparsity": 0.5, "scope": "layer"}, r"scope=.*'global'.*'layer'"),
        ({"sparsity": 0.5, "criterion": "hessian"}, r"criterion=.*'taylor'.*'hessian'"),
        ({"sparsity": 0.5, "start": 10, "end": 5}, r"`start` must be <= `end`.*start=10, end=5"),
        ({"sparsity": 0.5, "start": 0.8, "end": 0.2}, r"start=0.8, end=0.2"),
        ({"sparsity": 0.5, "end": 1.5}, r"end=.*\[0, 1\].*1.5"),
        ({"sparsity": 0.5, "start": -3}, r"start=.*-3"),
        ({"sparsity": 0.5, "unit": "batch"}, r"unit=.*'batch'"),
        ({"sparsity": 0.5, "frequency": 0}, r"frequency=.*0"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, r"initial_sparsity=.*0.6"),
        ({"sparsity": 0.5, "taylor_beta": 1.0}, r"taylor_beta=.*1.0"),
        ({"sparsity": 0.3, "pattern": "2:4"}, r"`sparsity` must be 0.5.*0.3"),
        ({"threshold": 0.1, "pattern": "channel"}, r"threshold=.*'channel'"),
    ],
)
def test_arguments_checked_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MagnitudePruneCallback(**kwargs)


def test_fraction_needs_known_length(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, start=0.0, end=0.5, unit="epoch", verbose=False)
    trainer = tiny_trainer(tmp_path, callbacks=[prune], max_epochs=-1, max_steps=4)
    with pytest.raises(ValueError, match="fraction"):
        trainer.fit(TinyClassifier(), random_loader())


class ManualOpt(TinyClassifier):
    """Manual optimization, two optimizer steps per batch."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for _ in range(2):
            loss = nn.functional.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()


@pytest.mark.parametrize("mode", ["accumulate", "manual"])
def test_accumulation_and_manual_optimization(tmp_path, mode: str) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=4, frequency=2, verbose=False)
    if mode == "accumulate":
        model = _fit(tmp_path, prune, max_epochs=2, accumulate_grad_batches=2)  # 8 optimizer steps
        assert model.trainer.global_step == 8
    else:
        model = _fit(tmp_path, prune, model=ManualOpt(), max_epochs=1)  # 16 optimizer steps
        assert model.trainer.global_step == 16
    params = dict(model.named_parameters())
    for n in prune.parameter_names:
        assert (params[n][~prune.masks[n]] == 0).all()
    assert _pruned_fraction(model, prune.parameter_names) == pytest.approx(0.5, abs=1e-2)


class _RankMasks(Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        prune = next(cb for cb in trainer.callbacks if isinstance(cb, MagnitudePruneCallback))
        flat = torch.cat([prune.masks[n].flatten() for n in prune.parameter_names]).float()
        gathered = trainer.strategy.all_gather(flat)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1])
        assert 0.45 < float(1 - flat.mean()) < 0.55


class _RankData(L.LightningDataModule):
    def train_dataloader(self):
        return random_loader(batch_size=8, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_ddp_masks_identical_on_every_rank(tmp_path, criterion: str) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=4, frequency=2, criterion=criterion, verbose=False)
    trainer = tiny_trainer(tmp_path, callbacks=[prune, _RankMasks()], max_epochs=1, devices=2, strategy="ddp_spawn")
    trainer.fit(TinyClassifier(), datamodule=_RankData())


def test_taylor_ema_sees_unscaled_gradients_under_amp_grad_scaler(tmp_path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    norms = {}
    for scale in (None, 2.0**12):
        prune = MagnitudePruneCallback(sparsity=0.5, criterion="taylor", schedule="linear", start=0, end=6, frequency=2, verbose=False)
        kw = {"precision": "bf16-mixed"}
        if scale is not None:  # fp16 autocast with a GradScaler that scales by 4096
            kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))]}
        model = _fit(tmp_path / str(scale), prune, max_epochs=1, **kw)
        norms[scale] = float(torch.stack([g.norm() for g in prune.state_dict()["criterion"]["grad_avg"].values()]).norm())
        params = dict(model.named_parameters())
        assert all(bool((params[n][~prune.masks[n]] == 0).all()) for n in prune.parameter_names)
    assert norms[2.0**12] == pytest.approx(norms[None], rel=0.05)  # not 4096x larger


def test_parameter_selection_options() -> None:
    def names(**kw) -> list[str]:
        prune = MagnitudePruneCallback(sparsity=0.5, verbose=False, **kw)
        prune.setup(None, MixedNet(), "fit")  # setup reads only the module
        return prune.parameter_names

    assert names() == ["conv.weight", "head.weight"]
    assert names(prune_bias=True) == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    assert names(exclude=["head.*"]) == ["conv.weight"]
    assert names(include=["lstm.weight_*", "emb.weight"]) == ["emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    with pytest.raises(ValueError, match="no prunable parameter"):
        names(keep_first_and_last=True)  # two prunable layers: both kept dense


def test_checkpoint_of_another_module_is_rejected(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    _fit(tmp_path, prune, max_epochs=1)
    state = prune.state_dict()
    other = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    other.setup(None, MixedNet(), "fit")
    with pytest.raises(ValueError, match="the checkpoint pruned .*another model, or another `include`/`exclude`"):
        other.load_state_dict(state)
    # the same instance reused on another module starts afresh
    prune.setup(None, MixedNet(), "fit")
    assert prune.parameter_names == ["conv.weight", "head.weight"] and prune.masks == {}
    assert prune.current_target == 0.0 and prune.state_dict()["active"] is False


def test_channel_pruning_of_the_models_outputs_is_said_in_one_line(tmp_path) -> None:
    # net.2 is the classifier: its output channels are what the module returns, so pruning them removes logits.
    cb = MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", start=0.0, end=0.5)
    with pytest.warns(UserWarning, match=r"no layer reads the output channels of net\.2\.weight.*exclude=\['net\.2\.\*'\]") as caught:
        model = _fit(tmp_path / "a", cb)
    said = [w for w in caught if "no layer reads" in str(w.message)]
    assert len(said) == 1 and "\n" not in str(said[0].message)  # once per fit, one line
    assert model.training and all(m.training for m in model.modules())  # the check left train mode as it was
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", exclude=["net.2.*"]))
        _fit(tmp_path / "c", MagnitudePruneCallback(sparsity=0.5))  # unstructured: the head may lose weights
    assert not [w for w in caught if "no layer reads" in str(w.message)]


def test_the_output_check_leaves_training_bit_identical(tmp_path) -> None:
    # The check runs one forward of one sample (eval mode, random state restored): the fit is unchanged by it.
    from lightning_clipprune.callbacks import _prune_coupling

    def fit(check: bool) -> dict[str, torch.Tensor]:
        cb = MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", start=0.0, end=0.5)
        if not check:
            cb._outputs_checked = True
            cb.on_train_start = lambda *a, _f=cb.on_train_start: (_f(*a), setattr(cb, "_outputs_checked", True))
        torch.manual_seed(0)  # the same initial weights for both fits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _fit(tmp_path / str(check), cb, model=_DropoutNet())
        return {k: v.clone() for k, v in model.state_dict().items()}

    assert _prune_coupling.check_outputs  # the function under test exists
    with_check, without = fit(True), fit(False)
    assert all(torch.equal(with_check[k], without[k]) for k in with_check)


class _DropoutNet(TinyClassifier):
    """TinyClassifier with dropout and BatchNorm: a forward that draws random numbers and moves statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


def test_an_include_or_exclude_pattern_matching_no_parameter_is_said(tmp_path) -> None:
    # "fc.*" misses a LightningModule's "net." prefix: the layer would be pruned although the user excluded it.
    cb = MagnitudePruneCallback(sparsity=0.5, exclude=["2.*"])
    with pytest.warns(UserWarning, match=r"exclude pattern '2\.\*' matches no parameter name .*'net\.0\.weight'.*'\*2\.\*'"):
        _fit(tmp_path, cb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", MagnitudePruneCallback(sparsity=0.5, exclude=["net.2.*"], include=["net.*.weight"]))
    assert not [w for w in caught if "matches no parameter" in str(w.message)]
