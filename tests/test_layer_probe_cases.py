"""Layer types a probe tried: weight norm, channel pruning with biases, tied names in `exclude`, other
parametrisations, lazy layers left dense, spectral norm's reasons; each failed before its fix."""

from __future__ import annotations

import types
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.callbacks._prune_plan import keep_norm_slices
from lightning_clipprune.pruning import compute_masks, select_prunable_parameters
from lightning_clipprune.pruning.coverage import dense_modules
from lightning_clipprune.pruning.wrappers import keep_one_per_norm_slice_, weight_norm_dims


class Net(L.LightningModule):
    def __init__(self, net: nn.Module, width: int = 16) -> None:
        super().__init__()
        self.net, self.width = net, width

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(model: Net, cb: MagnitudePruneCallback, steps: int = 6) -> list[str]:
    data = torch.utils.data.TensorDataset(torch.randn(32, model.width))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, callbacks=[cb]).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("form", ["parametrizations", "hook"])
def test_a_weight_normed_layer_never_loses_a_whole_slice_of_v(form: str) -> None:
    torch.manual_seed(0)
    layer = weight_norm(nn.Linear(16, 32)) if form == "parametrizations" else torch.nn.utils.weight_norm(nn.Linear(16, 32))
    model = Net(nn.Sequential(layer, nn.ReLU(), nn.Linear(32, 8)))
    messages = fit(model, MagnitudePruneCallback(sparsity=0.9, scope="local", start=0, end=2))
    v = layer.parametrizations.weight.original1 if form == "parametrizations" else layer.weight_v
    assert bool((v != 0).any(dim=1).all())  # every row of v keeps a weight
    assert bool(torch.isfinite(layer.weight).all())  # before: 0/0 = NaN, and the fit stopped
    assert any("weight norm" in m and "0/0 = NaN" in m for m in messages)


def test_the_kept_entry_is_the_largest_of_its_slice_and_other_slices_are_untouched() -> None:
    v = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.1, 0.2], [0.3, 0.4, -0.9]])
    mask = torch.tensor([[False, False, False], [True, False, False], [False, False, False]])
    assert keep_one_per_norm_slice_(mask, v, 0) == 2
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, True]]
    columns = torch.zeros(3, 3, dtype=torch.bool)
    assert keep_one_per_norm_slice_(columns, v, 1) == 3 and columns.sum(0).tolist() == [1, 1, 1]
    whole = torch.zeros(3, 3, dtype=torch.bool)
    assert keep_one_per_norm_slice_(whole, v, -1) == 1 and bool(whole[0, 1])
    net = nn.Sequential(weight_norm(nn.Linear(2, 2), dim=None), torch.nn.utils.weight_norm(nn.Conv2d(2, 2, 1), dim=1))
    assert weight_norm_dims(net, ["0.parametrizations.weight.original1", "1.weight_v"]) == {
        "0.parametrizations.weight.original1": -1, "1.weight_v": 1}


@pytest.mark.parametrize("dim", [0, -2])  # -2 of a Linear's weight is its rows too (-1 is torch's "whole tensor")
def test_channel_pruning_of_a_weight_normed_layer_is_refused_at_setup(dim: int) -> None:
    model = Net(nn.Sequential(weight_norm(nn.Linear(16, 32), dim=dim), nn.ReLU(), nn.Linear(32, 8)))
    with pytest.raises(ValueError, match=r"pattern='channel' cannot prune net\.0\..*exclude=\['net\.0\.\*'\]"):
        fit(model, MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", exclude=["net.2.*"]))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_bias_is_pruned_with_its_channel(scope: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3))
    weights = {n: p.detach() for n, p in select_prunable_parameters(net, prune_bias=True).items()}
    masks = compute_masks(weights, sparsity=0.5, scope=scope, pattern="channel")
    for i in (0, 2):
        rows = masks[f"{i}.weight"].reshape(masks[f"{i}.weight"].shape[0], -1)
        assert rows.all(1).equal(rows.any(1))  # whole channels
        assert masks[f"{i}.bias"].equal(rows.any(1))  # before: the complement, ranked on its own
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if scope == "local":
        assert [int((~masks[f"{i}.bias"]).sum()) for i in (0, 2)] == [4, 3]
    else:  # the biases count in the budget: at most round(s * n), short by less than one channel
        assert pruned <= round(0.5 * total) and round(0.5 * total) - pruned < 8 * 9 + 1


@pytest.mark.parametrize("case", ["tied", "registered twice"])
def test_exclude_leaves_a_tensor_dense_whichever_of_its_names_it_matches(case: str) -> None:
    net = nn.ModuleDict({"enc": nn.Linear(8, 8), "dec": nn.Linear(8, 8), "head": nn.Linear(8, 2)})
    if case == "tied":
        net.dec.weight = net.enc.weight
        names = ("enc", "dec")
    else:
        net.alias = net.enc
        names = ("enc", "alias")
    for name in names:
        selected = select_prunable_parameters(net, exclude=[f"{name}.*"])
        assert all(p is not net.enc.weight for p in selected.values()), (name, list(selected))
        assert any(p is net.head.weight for p in selected.values())


def test_another_parametrisation_named_in_include_is_pruned_with_a_warning() -> None:
    model = Net(nn.Sequential(orthogonal(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 4)))
    messages = fit(model, MagnitudePruneCallback(sparsity=0.5, scope="local", start=0, end=1, include=["*original"]), 2)
    assert any("net.0.parametrizations.weight.original is pruned as `include` asks" in m and "_Orthogonal" in m
               for m in messages)


def test_weight_norm_and_spectral_norm_named_in_include_get_no_such_warning() -> None:
    model = Net(nn.Sequential(spectral_norm(nn.Linear(16, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 4))))
    cb = MagnitudePruneCallback(sparsity=0.5, scope="local", start=0, end=1, include=["*original", "*original1"])
    messages = fit(model, cb, 2)
    assert cb.parameter_names == ["net.0.parametrizations.weight.original", "net.2.parametrizations.weight.original1"]
    assert not any("pruned as `include` asks" in m for m in messages)
    assert float((model.net[0].weight == 0).float().mean()) == pytest.approx(0.5)  # original / sigma keeps the zeros


def test_a_lazy_layer_left_dense_does_not_break_setup() -> None:
    model = Net(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LazyLinear(4)))
    fit(model, MagnitudePruneCallback(sparsity=0.5, scope="local", start=0, end=1, exclude=["net.2.*"]), 2)
    assert float((model.net[0].weight == 0).float().mean()) == 0.5
    lazy = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(2))
    assert [(d.name, d.numel, d.reason) for d in dense_modules(lazy, ["0.weight"])][-1] == (
        "1", 0, "not materialised yet (a lazy layer)")


def test_spectral_norm_is_left_dense_with_its_own_reason() -> None:
    for layer, named in ((spectral_norm(nn.Linear(4, 4)), "`*.parametrizations.weight.original`"),
                         (torch.nn.utils.spectral_norm(nn.Linear(4, 4)), "`*.weight_orig`")):
        net = nn.Sequential(layer, nn.Linear(4, 2))
        assert list(select_prunable_parameters(net)) == ["1.weight"]
        reason = next(d.reason for d in dense_modules(net, ["1.weight"]) if d.name.startswith("0"))
        assert "spectral norm" in reason and named in reason, reason  # before: "biases (prune_bias=True ...)"


def test_an_unmatched_pattern_starting_with_a_star_gets_no_star_hint() -> None:
    messages = fit(Net(nn.Sequential(nn.Linear(16, 8))), MagnitudePruneCallback(sparsity=0.5, exclude=["*net.6.*"]), 1)
    line = next(m for m in messages if "matches no parameter name" in m)
    assert "'**net.6.*'" not in line and "comes first" not in line


def test_regrowth_keeps_a_weight_that_is_not_a_regrown_zero_in_every_slice_of_v() -> None:
    net = nn.Sequential(weight_norm(nn.Linear(3, 2)))
    name = "0.parametrizations.weight.original1"
    with torch.no_grad():
        net[0].parametrizations.weight.original1.copy_(torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.0, 3.0]]))
    cb = types.SimpleNamespace(_params=dict(net.named_parameters()))
    new = {name: torch.tensor([[False, False, True], [True, False, False]])}  # row 0: only the regrown entry
    grown = {name: torch.tensor([[False, False, True], [False, False, False]])}
    with pytest.warns(UserWarning, match="weight norm"):
        keep_norm_slices(cb, net, new, grown)
    assert new[name].tolist() == [[False, True, True], [True, False, False]]  # row 0 keeps its largest, -2.0


def test_regrowth_on_a_weight_normed_layer_trains_finite() -> None:
    torch.manual_seed(0)
    layer = weight_norm(nn.Linear(16, 32))
    model = Net(nn.Sequential(layer, nn.ReLU(), nn.Linear(32, 8)))
    cb = MagnitudePruneCallback(sparsity=0.9, scope="local", start=0, end=2,
                                regrow={"method": "set", "fraction": 0.9, "interval": 1, "start": 3, "end": 11})
    fit(model, cb, 12)
    assert cb._regrow.regrown_total > 0 and bool(torch.isfinite(layer.weight).all())
