"""The callbacks in Trainer set-ups users bring beyond a plain MLP: complex weights, sparse-gradient embeddings,
a backbone added to the optimizer mid-fit (Lightning's ``BackboneFinetuning``) under an optimizer the suite does
not trust, LBFGS (a closure evaluated several times a step), ``ModelParallelStrategy`` on an unsharded model.
Tiny CPU fits, a few seconds in all.
"""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune.callbacks._strategy import check_model_sharded
from lightning_clipprune.posttrain import reconstruct_prune
from lightning_clipprune.search import search_threshold
from tests.helpers import TinyClassifier, random_loader, tiny_trainer


class _Complex(TinyClassifier):
    """A complex Linear layer in front of a real head."""

    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__(optimizer=optimizer, lr=0.01)
        self.c = nn.Linear(16, 32, dtype=torch.cfloat)
        self.net = nn.Sequential(nn.Linear(32, 4))

    def forward(self, x):
        return self.net(self.c(x.to(torch.cfloat)).abs())


def test_complex_weights_are_refused_by_pruning_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"cannot prune `c.weight`: complex weights .* exclude=\['c.weight'\]"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[MagnitudePruneCallback(sparsity=0.5)]).fit(_Complex(), random_loader())
    # leaving it out as told trains, and the real layer is pruned
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", exclude=["c.weight"])
    model = _Complex()
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(model, random_loader())
    assert list(prune.masks) == ["net.0.weight"] and float((model.net[0].weight == 0).float().mean()) == 0.5


def test_complex_weights_are_refused_by_the_post_training_tools():
    model = _Complex()
    with pytest.raises(ValueError, match=r"`reconstruct_prune` cannot prune `c.weight`: complex"):
        reconstruct_prune(model, random_loader(), 0.5, include=["*weight"])
    with pytest.raises(ValueError, match=r"cannot prune `c.weight`: complex .* `names` that leave out \['c.weight'\]"):
        search_threshold(model, random_loader(), names=["c.weight", "net.0.weight"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_complex_parameters_clip_by_norm_and_value_clipping_says_why_not(tmp_path, optimizer):
    clip = GradientClipCallback(clip_val=0.01, algorithm="norm")
    model = _Complex(optimizer)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[clip]).fit(model, random_loader())
    assert clip.summary()["clipped_steps"] > 0
    with pytest.raises(ValueError, match="cannot clamp a complex gradient: clip complex parameters by norm"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[GradientClipCallback(0.01, "value")]).fit(_Complex(), random_loader())


class _SparseEmbedding(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, sparse=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.emb((x.abs() * 10).long().clamp(max=49)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("algorithm", ["norm", "value", "agc"])
def test_sparse_gradients_are_refused_by_clipping_in_one_line(tmp_path, algorithm):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[GradientClipCallback(algorithm=algorithm)])
    with pytest.raises(ValueError, match=r"gradient of `emb.weight` is sparse .* build the layer with `sparse=False`"):
        trainer.fit(_SparseEmbedding(), random_loader())


def test_a_sparse_gradient_embedding_is_refused_by_pruning_with_the_fix(tmp_path):
    prune = MagnitudePruneCallback(sparsity=0.5, include=["emb.weight", "head.weight"])
    with pytest.raises(ValueError, match=r"cannot prune `emb.weight`: its layer is built with `sparse=True`"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(_SparseEmbedding(), random_loader())
    # the default selection leaves embeddings out: it trains
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot")
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(_SparseEmbedding(), random_loader())
    assert list(prune.masks) == ["head.weight"]


class _Noisy(torch.optim.Optimizer):
    """SGD plus noise on every entry (a Langevin step): a user optimizer the suite does not trust to keep zeros."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"]).add_(torch.randn_like(p), alpha=1e-3)


class _Backbone(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return _Noisy([p for p in self.parameters() if p.requires_grad])


class _PrunedStayZero(Callback):
    """Every pruned weight's value after every batch: the largest sum of magnitudes of a layer's pruned weights."""

    def __init__(self, prune: MagnitudePruneCallback) -> None:
        self.prune, self.worst = prune, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, mask in self.prune.masks.items():
            if self.prune.current_target:
                self.worst = max(self.worst, float(params[name].detach()[~mask].abs().sum()))


def test_a_backbone_added_to_an_untrusted_optimizer_mid_fit_keeps_its_pruned_weights_zero(tmp_path):
    """BackboneFinetuning adds the (frozen, pruned) backbone with `add_param_group` at epoch 2; the noisy optimizer
    would move its pruned weights every step unless they are re-masked after it."""
    prune = MagnitudePruneCallback(sparsity=0.7, end=0.3, frequency=2, prune_frozen=True)
    watch = _PrunedStayZero(prune)
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=2, lambda_func=lambda e: 1.0, backbone_initial_ratio_lr=1.0)
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[finetune, prune, watch])
    trainer.fit(_Backbone(), random_loader())
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone was added
    assert "backbone.0.weight" in prune.masks and watch.worst == 0.0


class _Lbfgs(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


@pytest.mark.parametrize("algorithm", ["norm", "autoclip", "zclip"])
def test_lbfgs_counts_and_logs_each_step_once_and_clips_every_evaluation(tmp_path, algorithm):
    logged: list[int] = []

    class _Logger(L.pytorch.loggers.Logger):
        name, version = "mem", 0

        def log_metrics(self, metrics, step=None):
            if "grad/norm" in metrics:
                logged.append(step)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    clip = GradientClipCallback(clip_val=0.05, algorithm=algorithm, log_every_n_steps=1)
    norms: list[float] = []
    original = clip.clipper.clip

    def watched(params, norm_type=2.0):
        out = original(params, norm_type)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return out

    clip.clipper.clip = watched
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[clip], logger=_Logger(), log_every_n_steps=1)
    trainer.fit(_Lbfgs(), random_loader())
    steps = trainer.global_step
    assert steps == 8 and len(norms) > steps  # LBFGS evaluated the closure more than once a step
    assert clip.summary()["steps"] == steps and logged == list(range(steps))
    state = clip.clipper.state_dict()  # an adaptive clipper's history: one norm per step
    assert int(state.get("count", state.get("step", steps))) == steps
    if algorithm == "norm":
        assert max(norms) <= 0.05 * (1 + 1e-5)  # every evaluation's gradient was clipped


def test_model_parallel_on_an_unsharded_model_is_refused_in_one_line():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    module = TinyClassifier()
    trainer = types.SimpleNamespace(world_size=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    for owner in ("GradientClipCallback", "MagnitudePruneCallback", "SparsityLogger"):
        with pytest.raises(MisconfigurationException, match=rf"{owner}: ModelParallelStrategy runs 2 processes but no"):
            check_model_sharded(trainer, module, owner)
    check_model_sharded(types.SimpleNamespace(world_size=1, strategy=trainer.strategy), module, "x")  # one process
    check_model_sharded(types.SimpleNamespace(world_size=2, strategy=DDPStrategy()), module, "x")  # DDP syncs


def test_every_callback_checks_the_model_is_sharded(monkeypatch, tmp_path):
    """The three callbacks call the check in on_fit_start (a one-process fit: it passes)."""
    from lightning_clipprune.callbacks import gradient_clip, magnitude_prune, sparsity_logger

    seen = []
    for module in (gradient_clip, magnitude_prune, sparsity_logger):
        monkeypatch.setattr(module, "check_model_sharded", lambda trainer, pl_module, owner: seen.append(owner))
    monkeypatch.setattr(magnitude_prune, "is_model_parallel", lambda trainer: True)
    callbacks = [GradientClipCallback(), SparsityLogger(print_table=False), MagnitudePruneCallback(sparsity=0.5)]
    tiny_trainer(tmp_path, max_epochs=1, callbacks=callbacks).fit(TinyClassifier(), random_loader())
    assert sorted(seen) == ["GradientClipCallback", "MagnitudePruneCallback", "SparsityLogger"]
