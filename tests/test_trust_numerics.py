"""Issue 21, point 6 (prune side): numerics a hostile run can reach.

Pruned entries stay exactly +0.0 whatever the gradient (NaN and inf included); a run whose weights are not
finite ends with one line, never as a success; a second ``fit`` after a layer was replaced rebuilds the
masks and says so; frozen parameters are left alone (and named); a lazy layer that is not materialised is
one line saying what to do.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn, optim

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.pruning import (
    ZERO_KEEPING_OPTIMIZERS,
    apply_masks_,
    compute_masks,
    keeps_pruned_weights_zero,
    mask_factors,
    mask_optimizer_state_,
)
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

NAN, INF = float("nan"), float("inf")

# random_loader(): 128 samples, batch 16 -> 8 optimizer steps per epoch


# ------------------------------------------------------------------------------------------------------
# Exact zeros whatever the gradient
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "factors", "float"])
def test_masking_gives_exact_positive_zero_over_nan_and_inf(dtype, mask_kind) -> None:
    t = torch.tensor([NAN, -INF, INF, -2.0, -0.0, 3.0], dtype=dtype)
    keep = torch.tensor([False, False, False, False, True, True])
    mask = {"bool": keep, "factors": mask_factors([keep], [t])[0], "float": keep.to(dtype)}[mask_kind]
    apply_masks_([t], [mask])
    assert torch.equal(t[:4], torch.zeros(4, dtype=dtype))
    assert not torch.signbit(t[:4]).any()  # +0.0, not -0.0 (no sign bit for the sparse export)
    assert torch.signbit(t[4]) and t[5] == 3.0  # kept entries untouched, bit for bit


def test_optimizer_state_of_pruned_entries_is_reset_even_when_nan() -> None:
    p = nn.Parameter(torch.ones(2, 3))
    opt = optim.Adam([p], lr=0.1)
    p.grad = torch.full((2, 3), NAN)
    opt.step()
    keep = torch.tensor([[True, False, True], [False, False, True]])
    mask_optimizer_state_(opt, [p], [keep])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p][key][~keep], torch.zeros(3)), key


def _zero_keeping() -> dict[str, object]:
    return {
        "sgd-momentum-nesterov-wd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        "adam-amsgrad-wd": lambda ps: optim.Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.1),
        "adamw": lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.5),
        "nadam": lambda ps: optim.NAdam(ps, lr=0.05, weight_decay=0.1),
        "radam": lambda ps: optim.RAdam(ps, lr=0.05),
        "rmsprop-centered": lambda ps: optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
        "adagrad": lambda ps: optim.Adagrad(ps, lr=0.1),
        "adadelta-wd": lambda ps: optim.Adadelta(ps, lr=1.0, weight_decay=0.1),
    }


@pytest.mark.parametrize("name", list(_zero_keeping()))
def test_nan_gradients_never_reach_pruned_weights_of_trusted_optimizers(name: str) -> None:
    """The per-step protocol with the weight re-mask skipped: nothing leaks through momentum or moments."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 10, generator=g)), nn.Parameter(torch.randn(6, 12, generator=g))]
    opt = _zero_keeping()[name](params)
    assert keeps_pruned_weights_zero(opt) and type(opt) in ZERO_KEEPING_OPTIMIZERS
    for p in params:  # dense steps first: state non-zero everywhere
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    masks = list(compute_masks({str(i): p.detach() for i, p in enumerate(params)}, sparsity=0.6).values())
    factors = mask_factors(masks, params)
    apply_masks_(params, factors)
    mask_optimizer_state_(opt, params, masks)
    for step in range(20):
        for p in params:  # NaN and inf in every pruned entry (and in some live ones on odd steps)
            grad = torch.randn(p.shape, generator=g)
            grad[torch.rand(p.shape, generator=g) < 0.5] = NAN if step % 2 else INF
            p.grad = grad
        apply_masks_([p.grad for p in params], factors)
        opt.step()
        for p, m in zip(params, masks, strict=True):
            assert torch.equal(p.detach()[~m], torch.zeros(int((~m).sum()))), name
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert torch.equal(value[~m], torch.zeros(int((~m).sum()))), (name, key)


class _NanIntoPruned(L.Callback):
    """After the first event, every backward writes NaN into the gradient of each pruned entry."""

    def __init__(self, prune: MagnitudePruneCallback) -> None:
        self.prune = prune

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.prune.current_target:
            params = dict(pl_module.named_parameters())
            for n in self.prune.parameter_names:
                params[n].grad[~self.prune.masks[n]] = NAN


class _Adamax(optim.Adamax):
    """Not a trusted class: the callback re-masks the weights after every step."""


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "untrusted"])
def test_nan_gradients_of_pruned_entries_leave_them_exactly_zero_in_training(tmp_path, optimizer: str) -> None:
    class Model(TinyClassifier):
        def configure_optimizers(self):
            if optimizer == "untrusted":
                return _Adamax(self.parameters(), lr=0.01)
            return super().configure_optimizers()

    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=8, frequency=2, scope="local", verbose=False)
    L.seed_everything(0, verbose=False)
    model = Model(optimizer=optimizer if optimizer != "untrusted" else "sgd", lr=0.01)
    trainer = tiny_trainer(tmp_path, callbacks=[prune, _NanIntoPruned(prune)], max_epochs=2)
    trainer.fit(model, random_loader())  # finishes: the live weights stay finite
    params = dict(model.named_parameters())
    for n in prune.parameter_names:
        pruned = params[n].detach()[~prune.masks[n]]
        assert pruned.numel() and torch.equal(pruned, torch.zeros_like(pruned)), n
        assert not torch.signbit(pruned).any(), n
        assert torch.isfinite(params[n]).all(), n
        for value in trainer.optimizers[0].state[params[n]].values():
            if isinstance(value, torch.Tensor) and value.shape == params[n].shape:
                assert torch.isfinite(value).all(), n


# ------------------------------------------------------------------------------------------------------
# A run whose weights are not finite ends with one line
# ------------------------------------------------------------------------------------------------------


class _DivergesFrom(TinyClassifier):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.diverge_at = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * NAN if self.trainer.global_step >= self.diverge_at else loss


def test_nan_weights_after_the_last_event_end_the_run_with_one_line(tmp_path) -> None:
    # the only event is at step 1; the run diverges at step 5 with no clip callback to skip the steps
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1, verbose=False)
    L.seed_everything(0, verbose=False)
    model = _DivergesFrom(5)
    with pytest.raises(FloatingPointError) as err:
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    message = str(err.value)
    assert "\n" not in message
    assert "training ended with weights that are not finite: `net.0.weight`" in message and "hold NaN or inf" in message
    params = dict(model.named_parameters())
    for n in prune.parameter_names:  # the live weights went NaN; the pruned ones are still exactly 0
        assert torch.isnan(params[n][prune.masks[n]]).any(), n
        assert torch.equal(params[n][~prune.masks[n]], torch.zeros(int((~prune.masks[n]).sum()))), n


def test_nan_before_an_event_leaves_pruned_entries_zero_until_the_event_refuses(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="linear", start=0, end=8, frequency=2, verbose=False)
    seen: list[bool] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            params = dict(pl_module.named_parameters())
            seen.extend(bool((params[n][~prune.masks[n]] == 0).all()) for n in prune.parameter_names)

    L.seed_everything(0, verbose=False)
    with pytest.raises(FloatingPointError, match=r"at step 4 .*net\.0\.weight") as err:
        tiny_trainer(tmp_path, callbacks=[prune, Probe()], max_epochs=1).fit(_DivergesFrom(3), random_loader())
    assert "\n" not in str(err.value)
    assert seen and all(seen)  # steps 3 (NaN) included


def test_a_finite_run_is_not_refused(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=1, verbose=False)
    L.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(TinyClassifier(), random_loader())
    assert prune.current_target == 0.5


# ------------------------------------------------------------------------------------------------------
# A second fit after a layer was replaced
# ------------------------------------------------------------------------------------------------------


def _oneshot_local() -> MagnitudePruneCallback:
    return MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="local", verbose=False)


def test_second_fit_after_replacing_a_layer_of_the_same_shape_rebuilds_its_masks(tmp_path) -> None:
    prune = _oneshot_local()
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    tiny_trainer(tmp_path / "a", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    old_mask = prune.masks["net.0.weight"].clone()
    model.net[0] = nn.Linear(16, 32)  # a new layer, same shape
    fresh = model.net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"prunable parameters changed since the last fit \(`net.0.weight` is a new tensor") as record:
        tiny_trainer(tmp_path / "b", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert all("\n" not in str(w.message) for w in record)
    expected = compute_masks({"w": fresh}, sparsity=0.5, scope="local")["w"]
    assert torch.equal(prune.masks["net.0.weight"], expected)  # ranked on the new weights alone
    assert not torch.equal(prune.masks["net.0.weight"], old_mask)
    assert int((~prune.masks["net.0.weight"]).sum()) == 16 * 32 // 2


def test_second_fit_after_changing_shapes_rebuilds_instead_of_a_size_mismatch(tmp_path) -> None:
    prune = _oneshot_local()
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    tiny_trainer(tmp_path / "a", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    model.net[0], model.net[2] = nn.Linear(16, 24), nn.Linear(24, 4)
    with pytest.warns(UserWarning, match=r"`net.0.weight` changed shape from \(32, 16\) to \(24, 16\)"):
        tiny_trainer(tmp_path / "b", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert prune.masks["net.0.weight"].shape == (24, 16)
    assert int((~prune.masks["net.2.weight"]).sum()) == 24 * 4 // 2


def test_second_fit_on_the_same_parameters_keeps_the_masks_without_a_warning(tmp_path, recwarn) -> None:
    prune = _oneshot_local()
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    tiny_trainer(tmp_path / "a", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    before = {n: m.clone() for n, m in prune.masks.items()}
    tiny_trainer(tmp_path / "b", callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert not [w for w in recwarn if "changed since the last fit" in str(w.message)]
    assert all(torch.equal(before[n], prune.masks[n]) for n in before)


# ------------------------------------------------------------------------------------------------------
# Frozen parameters, lazy layers
# ------------------------------------------------------------------------------------------------------


def test_frozen_parameters_are_left_dense_and_named_in_one_info_line(tmp_path, caplog) -> None:
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    L.seed_everything(0, verbose=False)
    with caplog.at_level(logging.INFO):
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert prune.parameter_names == ["net.2.weight"]
    assert torch.equal(model.net[0].weight, frozen)  # not one value changed
    lines = [r.getMessage() for r in caplog.records if "frozen parameter" in r.getMessage()]
    assert len(lines) == 1 and "net.0.weight" in lines[0] and "prune_frozen=True" in lines[0]


def test_frozen_parameters_are_pruned_when_asked(tmp_path) -> None:
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="local", prune_frozen=True, verbose=False)
    L.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert prune.parameter_names == ["net.0.weight", "net.2.weight"]
    assert int((model.net[0].weight == 0).sum()) == 16 * 32 // 2


class _Lazy(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net[0] = nn.LazyLinear(32)


def test_lazy_layer_not_materialised_is_one_line_saying_what_to_do(tmp_path) -> None:
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    with pytest.raises(ValueError) as err:
        tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(_Lazy(), random_loader())
    message = str(err.value)
    assert "\n" not in message
    assert "net.0.weight" in message and "not materialised" in message and "one forward pass" in message


def test_lazy_layer_materialised_by_one_forward_pass_is_pruned(tmp_path) -> None:
    model = _Lazy()
    model(torch.zeros(1, 16))  # materialise
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="local", verbose=False)
    L.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(model, random_loader())
    assert int((model.net[0].weight == 0).sum()) == 16 * 32 // 2


def test_a_checkpoint_whose_masks_have_other_shapes_is_one_line(tmp_path) -> None:
    prune = _oneshot_local()
    L.seed_everything(0, verbose=False)
    tiny_trainer(tmp_path / "a", callbacks=[prune], max_epochs=1).fit(TinyClassifier(), random_loader())
    state = prune.state_dict()
    other = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="local", verbose=False)
    other.load_state_dict(state)  # same names, before any module is seen
    with pytest.raises(ValueError) as err:
        tiny_trainer(tmp_path / "b", callbacks=[other], max_epochs=1).fit(TinyClassifier(hidden=24), random_loader())
    assert "\n" not in str(err.value)
    assert "`net.0.weight` has shape (32, 16) but the parameter (24, 16)" in str(err.value)
