"""Coupled channel pruning (``couple_channels``): residual streams pruned alike in every layer, so they compact."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.app.models.networks import resnet20
from lightning_clipprune.pruning import channel_groups, compute_masks, select_prunable_parameters
from tests.helpers import random_loader, tiny_trainer

pytest.importorskip("torch_pruning")

INSTALL = "pip install 'lightning-clipprune[compact]'"


def _dead_rows(mask: torch.Tensor) -> list[int]:
    return (~mask.reshape(mask.shape[0], -1).any(dim=1)).nonzero().squeeze(1).tolist()


def _prune_resnet(coupled: bool) -> tuple[nn.Module, dict, list]:
    torch.manual_seed(0)
    net = resnet20(shortcut="B").eval()
    weights = select_prunable_parameters(net)
    groups = channel_groups(net, torch.zeros(1, 3, 32, 32), weights)[0] if coupled else None
    masks = compute_masks(
        {n: p.detach() for n, p in weights.items()}, sparsity=0.5, scope="local", pattern="channel", channel_groups=groups
    )
    with torch.no_grad():
        for n, p in weights.items():
            p.mul_(masks[n])
    return net, masks, groups or []


def test_resnet20_coupled_groups_prune_the_same_channels_and_compact_the_stream() -> None:
    from lightning_clipprune.export.compact import compact_channels

    net, masks, groups = _prune_resnet(coupled=True)
    streams = [g for g in groups if len(g) > 1]
    # the three residual streams: stem + 3 conv2 (16), conv2 + projection + 2 conv2 (32), the same (64)
    assert sorted(len(g) for g in streams) == [4, 4, 4]
    for group in groups:
        # the same group positions are pruned in every member, and half of them
        dead = {name: set(_dead_rows(masks[name])) for name in group}
        positions = [{int((ch == r).nonzero()) for r in dead[name]} for name, ch in group.items()]
        assert all(p == positions[0] for p in positions), list(group)
        width = len(next(iter(group.values())))
        assert len(positions[0]) == round(0.5 * width)
    assert all(torch.equal(g["conv1.weight"], torch.arange(16)) for g in streams if "conv1.weight" in g)

    x = torch.randn(4, 3, 32, 32)
    small, widths = compact_channels(net, x)
    plain, _, _ = _prune_resnet(coupled=False)
    small_plain, _ = compact_channels(plain, x)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < 0.65 * count(small_plain)  # the streams went too (measured: 68.8k vs 123.5k)
    assert widths["conv1"] == (16, 8) and widths["layers.8.conv2"] == (64, 32)  # stream channels removed
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)


def test_option_a_padding_is_not_coupled_and_named() -> None:
    net = resnet20()  # option A: a channel padding Torch-Pruning traces as element-wise
    weights = select_prunable_parameters(net)
    groups, unmapped = channel_groups(net, torch.zeros(1, 3, 32, 32), weights)
    assert "conv1.weight" in unmapped and "layers.8.conv2.weight" in unmapped
    assert all(len(g) == 1 for g in groups) and sum(len(g) for g in groups) == len(weights)
    assert all(m.training for m in net.modules())  # the trace leaves train mode as it was


def test_global_scope_coupled_meets_the_budget() -> None:
    net = resnet20(shortcut="B")
    weights = {n: p.detach() for n, p in select_prunable_parameters(net).items()}
    groups, _ = channel_groups(net, torch.zeros(1, 3, 32, 32), select_prunable_parameters(net))
    masks = compute_masks(weights, sparsity=0.5, scope="global", pattern="channel", channel_groups=groups)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert 0.45 * total < pruned <= round(0.5 * total)
    for group in groups:
        first = next(iter(group))
        pos = {int((group[first] == r).nonzero()) for r in _dead_rows(masks[first])}
        for name, ch in group.items():
            assert {int((ch == r).nonzero()) for r in _dead_rows(masks[name])} == pos


class ResidualNet(nn.Module):
    """A tiny residual MLP: the stem (through BatchNorm) and both blocks' outputs are summed into one 32-wide stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.b1 = nn.Linear(32, 32)
        self.b2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.stem(x))
        h = h + self.b1(torch.relu(h))
        h = h + self.b2(torch.relu(h))
        return self.head(torch.relu(h))


class Residual(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ResidualNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _make(**kwargs) -> MagnitudePruneCallback:  # 32 steps; end 0.75 -> step 24; checkpoint after epoch 2 = step 16
    return MagnitudePruneCallback(
        sparsity=0.5, schedule="cubic", start=0.1, end=0.75, frequency=3, scope="local", pattern="channel",
        couple_channels=True, **kwargs,
    )


def test_fit_reaches_target_keeps_zeros_and_resumes_bit_identical(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    L.seed_everything(0, verbose=False)
    full_cb, full = _make(), Residual()
    tiny_trainer(tmp_path / "a", callbacks=[full_cb, ckpt], max_epochs=4, enable_checkpointing=True).fit(
        full, random_loader()
    )
    stream = ["net.stem.weight", "net.b1.weight", "net.b2.weight"]
    dead = [_dead_rows(full_cb.masks[n]) for n in stream]
    assert dead[0] == dead[1] == dead[2] and len(dead[0]) == 16  # coupled, at the target
    assert len(_dead_rows(full_cb.masks["net.head.weight"])) == 2
    params = dict(full.named_parameters())
    for n, m in full_cb.masks.items():
        assert torch.equal(params[n].detach()[~m], torch.zeros(int((~m).sum()))), n
    mid = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)["callbacks"][full_cb.state_key]
    assert mid["active"] and 0 < mid["current_target"] < 0.5

    L.seed_everything(0, verbose=False)
    resumed_cb, resumed = _make(), Residual()
    tiny_trainer(tmp_path / "b", callbacks=[resumed_cb], max_epochs=4).fit(
        resumed, random_loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt"
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for n in full_cb.masks:
        assert torch.equal(full_cb.masks[n], resumed_cb.masks[n]), n


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({}, id="default: followers"), pytest.param(dict(include=["*"], exclude=["net.head.*"]), id="include")],
)
def test_batchnorm_pruned_with_its_channels_leaves_them_dead_after_training(tmp_path, kwargs) -> None:
    from lightning_clipprune.export.compact import compact_channels

    L.seed_everything(0, verbose=False)
    cb, model = _make(**kwargs), Residual()
    tiny_trainer(tmp_path, callbacks=[cb], max_epochs=4).fit(model, random_loader())
    if not kwargs:  # the BatchNorm and the biases follow their channels; only the layers' weights are ranked
        assert cb._followers == {"net.stem.bias", "net.bn.weight", "net.bn.bias", "net.b1.bias", "net.b2.bias", "net.head.bias"}
        assert cb.parameter_names == list(dict(model.named_parameters()))  # in named_parameters order
    dead = _dead_rows(cb.masks["net.stem.weight"])
    assert len(dead) == 16
    for name in ("net.stem.bias", "net.bn.weight", "net.bn.bias", "net.b1.weight", "net.b1.bias", "net.b2.bias"):
        assert _dead_rows(cb.masks[name]) == dead, name  # BatchNorm's gamma and beta go with the channel
    assert not model.net.bn.bias.detach()[dead].any()
    net = model.net.eval()
    x = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing kept that carries a constant: no warning
        small, widths = compact_channels(net, x)
    assert widths["stem"] == (32, 16) and widths["bn"] == (32, 16)  # the trained stream compacts
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)


def test_trained_batchnorm_keeping_pruned_channels_alive_is_said(tmp_path) -> None:
    # With the BatchNorm excluded, the zeroed channels carry the trained beta: compaction keeps them and says why.
    from lightning_clipprune.export.compact import compact_channels

    L.seed_everything(0, verbose=False)
    cb, model = _make(exclude=["net.bn.*"]), Residual()
    tiny_trainer(tmp_path, callbacks=[cb], max_epochs=4).fit(model, random_loader())
    assert len(_dead_rows(cb.masks["net.stem.weight"])) == 16 and "net.bn.bias" not in cb.masks
    net = model.net.eval()
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"compact_channels: \d+ output channels .* carry a constant.*couple_channels=True"):
        small, widths = compact_channels(net, x)
    assert widths.get("stem", (32, 32))[1] > 16  # the stream kept channels that carry beta
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)


def test_a_batchnorm_after_a_dense_layer_is_not_pruned(tmp_path) -> None:
    # The stem is left dense: the stream's channels stay alive through it, so b1 and b2 lose their weights'
    # rows but nothing follows them (the BatchNorm of the stem, the blocks' biases).
    L.seed_everything(0, verbose=False)
    cb, model = _make(exclude=["net.stem.*"]), Residual()
    tiny_trainer(tmp_path, callbacks=[cb], max_epochs=4).fit(model, random_loader())
    for name in ("net.bn.weight", "net.bn.bias", "net.b1.bias", "net.b2.bias"):
        assert cb.masks[name].all(), name
    assert _dead_rows(cb.masks["net.b1.weight"]) == _dead_rows(cb.masks["net.b2.weight"]) != []
    assert _dead_rows(cb.masks["net.head.bias"]) == _dead_rows(cb.masks["net.head.weight"]) != []  # its own group


def test_pruning_the_models_outputs_is_said_in_one_line(tmp_path) -> None:
    # The head's output channels are the model's outputs (nothing reads them): pruning them removes logits.
    L.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match=r"no layer reads the output channels of net\.head\.weight.*exclude=\['net\.head\.\*'\]") as caught:
        tiny_trainer(tmp_path / "a", callbacks=[_make()], max_epochs=1).fit(Residual(), random_loader())
    assert all("\n" not in str(w.message) for w in caught if "no layer reads" in str(w.message))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path / "b", callbacks=[_make(exclude=["net.head.*"])], max_epochs=1).fit(Residual(), random_loader())
    assert not [w for w in caught if "no layer reads" in str(w.message)]


def test_followers_count_in_the_sparsity_but_never_rank() -> None:
    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(8, 4), "b.weight": torch.randn(8, 6), "bn.weight": torch.zeros(8), "c.bias": torch.randn(3)}
    weights["bn.weight"][:4] = 100.0  # as a follower it would not save channels 0-3
    order = torch.arange(8)
    groups = [{"a.weight": order, "b.weight": order, "bn.weight": order}, {"c.bias": torch.arange(3)}]
    plain = compute_masks({k: weights[k] for k in ("a.weight", "b.weight")}, sparsity=0.5, scope="local",
                          pattern="channel", channel_groups=[{"a.weight": order, "b.weight": order}])
    masks = compute_masks(weights, sparsity=0.5, scope="local", pattern="channel", channel_groups=groups,
                          followers={"bn.weight", "c.bias"})
    assert torch.equal(masks["a.weight"], plain["a.weight"]) and torch.equal(masks["b.weight"], plain["b.weight"])
    assert torch.equal(masks["bn.weight"], plain["a.weight"].any(dim=1))  # pruned with its channels
    assert masks["c.bias"].all()  # a group of followers alone: kept whole
    with pytest.raises(ValueError, match="followers.*channel_groups"):
        compute_masks(weights, sparsity=0.5, pattern="channel", followers={"bn.weight"})


def test_refused_under_model_parallel_in_one_line() -> None:
    from lightning_clipprune.callbacks._prune_sharded import refusal

    cb = MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", couple_channels=True)
    why = refusal(cb, {})
    assert why is not None and "couple_channels" in why and "\n" not in why


def test_refused_in_one_line_without_torch_pruning(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed
    with pytest.raises(ImportError) as info:
        MagnitudePruneCallback(sparsity=0.5, pattern="channel", couple_channels=True)
    message = str(info.value)
    assert "\n" not in message and INSTALL in message and "couple_channels" in message
    with pytest.raises(ImportError, match=r"lightning-clipprune\[compact\]"):
        channel_groups(nn.Linear(2, 2), torch.zeros(1, 2), dict(nn.Linear(2, 2).named_parameters()))
    assert MagnitudePruneCallback(sparsity=0.5, pattern="channel", couple_channels="auto")._couple is False


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        (dict(pattern="channel"), "yes"),
        (dict(pattern="channel"), 1),
        (dict(pattern="channel"), None),
        (dict(pattern="unstructured"), True),
        (dict(pattern="2:4"), True),
        (dict(pattern="channel", scope="local", layer_sparsity={"a*": 0.3}), True),
    ],
)
def test_bad_values_name_the_argument(kwargs: dict, value: object) -> None:
    with pytest.raises(ValueError, match=r"couple_channels"):
        MagnitudePruneCallback(sparsity=0.5, **kwargs, couple_channels=value)


def test_compute_masks_checks_channel_groups() -> None:
    w = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    with pytest.raises(ValueError, match="channel_groups"):
        compute_masks(w, sparsity=0.5, pattern="unstructured", channel_groups=[{"a": torch.arange(4)}])
    with pytest.raises(ValueError, match="permutation"):
        compute_masks(w, sparsity=0.5, pattern="channel", channel_groups=[{"a": torch.tensor([0, 0, 1, 2])}])
    with pytest.raises(ValueError, match="not among"):
        compute_masks(w, sparsity=0.5, pattern="channel", channel_groups=[{"c": torch.arange(4)}])
    # a group of one in order is the plain local "channel" mask
    plain = compute_masks(w, sparsity=0.5, scope="local", pattern="channel")
    grouped = compute_masks(w, sparsity=0.5, scope="local", pattern="channel", channel_groups=[])
    assert all(torch.equal(plain[n], grouped[n]) for n in w)
    # coupled: b's channel 3 - i sits at a's position i
    pair = compute_masks(
        w, sparsity=0.5, scope="local", pattern="channel", channel_groups=[{"a": torch.arange(4), "b": torch.arange(3, -1, -1)}]
    )
    assert _dead_rows(pair["b"]) == sorted(3 - r for r in _dead_rows(pair["a"]))
