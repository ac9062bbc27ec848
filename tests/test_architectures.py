"""The prune callback on architectures no one here wrote: Lightning's demo Transformer (torch's
``nn.Transformer``), convolutions that are transposed, grouped or depthwise, and an LSTM."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import SimpleLSTM, Transformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune.pruning import (
    DEFAULT_MAX_LAYER_SPARSITY,
    Layout,
    output_rows,
    select_prunable_parameters,
    weight_layouts,
)
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

VOCAB, SEQ = 100, 12


def _token_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Sequences counting up by a per-sequence stride modulo ``VOCAB``: learnable, no download."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=batch_size, shuffle=False)


class DemoTransformerLM(L.LightningModule):
    """``lightning.pytorch.demos.Transformer`` as ``LightningTransformer`` trains it, at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self.model(inputs, target), target.reshape(-1))
        self.losses.append(loss.detach().float())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_demo_transformer_default_selection() -> None:
    names = list(select_prunable_parameters(Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1)))
    enc = "transformer.encoder.layers.0."
    assert enc + "self_attn.in_proj_weight" in names  # the Q/K/V projections (3E, E)
    assert enc + "self_attn.out_proj.weight" in names
    assert "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in names
    assert "decoder.weight" in names
    assert "embedding.weight" not in names  # embeddings stay dense by default
    assert not any("norm" in n for n in names)
    assert len(names) == 11


@pytest.mark.slow  # about 15 s of CPU (bf16 autocast on CPU is slow), minutes on a shared machine
def test_demo_transformer_trains_pruned_under_bf16_and_accumulation(tmp_path) -> None:
    torch.manual_seed(0)
    model = DemoTransformerLM()
    prune = MagnitudePruneCallback(sparsity=0.8, start=0.1, end=0.6, verbose=False)
    logger = MemoryLogger()
    trainer = tiny_trainer(
        tmp_path,
        max_steps=16,
        max_epochs=None,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        logger=logger,
        log_every_n_steps=1,
        deterministic=False,
        callbacks=[GradientClipCallback(clip_val=1.0), prune, SparsityLogger()],
    )
    trainer.fit(model, train_dataloaders=_token_loader())
    assert trainer.global_step == 16
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in prune.parameter_names)
    pruned = {n: int((~m).sum()) for n, m in prune.masks.items()}
    assert sum(pruned.values()) == round(0.8 * total)  # the global target, met exactly
    for name in prune.parameter_names:
        p, m = params[name].detach(), prune.masks[name]
        assert (p[~m] == 0).all(), name
        assert pruned[name] <= math.floor(DEFAULT_MAX_LAYER_SPARSITY * p.numel()), name  # no layer over the ceiling
        assert m.any(), name  # no layer emptied
    # Per-layer budgets (the default ranking) have no ceiling and no per-row floor: a hidden unit may lose
    # every input (here one of linear1's), as in the ER/RigL papers; every logit keeps an input.
    assert output_rows(prune.masks["model.decoder.weight"]).any(dim=1).all()
    assert pruned["model.decoder.weight"] < params["model.decoder.weight"].numel()
    first, last = torch.stack(model.losses[:6]).mean(), torch.stack(model.losses[-6:]).mean()
    assert last < first - 0.15  # it learns while being pruned (measured: 4.63 -> 4.34)
    logged = logger.rows_with("sparsity/global")
    assert logged and abs(logged[-1][1]["sparsity/global"] - 0.8) < 1e-6


def test_demo_transformer_output_layer_collapses_without_ceiling_not_with_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = DemoTransformerLM()
    prune = MagnitudePruneCallback(sparsity=0.8, schedule="oneshot", start=0, ranking="raw", verbose=False)
    with pytest.warns(UserWarning, match=r"to its ceiling: model\.decoder\.weight \(96\.9%\)"):
        tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[prune]).fit(model, _token_loader(n=8))
    assert prune.masks["model.decoder.weight"].any(dim=1).all()  # 1 of 32 inputs kept per logit: 96.9 %
    torch.manual_seed(0)
    model = DemoTransformerLM()
    prune = MagnitudePruneCallback(
        sparsity=0.8, schedule="oneshot", start=0, ranking="raw", max_layer_sparsity=None, verbose=False
    )
    trainer = tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[prune])
    with pytest.warns(UserWarning, match=r"model\.decoder\.weight \(100\.0%\)"):
        trainer.fit(model, train_dataloaders=_token_loader(n=8))
    assert not prune.masks["model.decoder.weight"].any()  # every logit is its bias: what the ceiling prevents
    layer_norm = MagnitudePruneCallback(sparsity=0.8, schedule="oneshot", start=0, ranking="layer_normalized", verbose=False)
    torch.manual_seed(0)
    model = DemoTransformerLM()
    tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[layer_norm]).fit(model, _token_loader(n=8))
    for name, m in layer_norm.masks.items():
        assert 0.7 < 1 - m.float().mean().item() < 0.9, name  # scale-aware: every layer near the target
    budgets = MagnitudePruneCallback(sparsity=0.8, schedule="oneshot", start=0, verbose=False)  # default: ER budgets
    torch.manual_seed(0)
    model = DemoTransformerLM()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ceiling.*")  # per-layer budgets keep every layer below it
        tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[budgets]).fit(model, _token_loader(n=8))
    decoder = 1 - budgets.masks["model.decoder.weight"].float().mean().item()
    assert decoder < 0.9  # measured 82.1 %: far from what raw ranking gives it (100 %, 96.9 % with the ceiling)
    assert sum(int((~m).sum()) for m in budgets.masks.values()) == round(0.8 * sum(m.numel() for m in budgets.masks.values()))


class ConvZoo(L.LightningModule):
    """Standard, depthwise, grouped and transposed (plain and grouped) convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up_grouped = nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.stem, self.dw, self.grouped, self.up, self.up_grouped):
            x = F.relu(layer(x))
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _images(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 8, 8, generator=g)), batch_size=4)


def test_convolution_zoo_selection_and_layouts() -> None:
    net = ConvZoo()
    names = list(select_prunable_parameters(net))
    assert names == [f"{n}.weight" for n in ("stem", "dw", "grouped", "up", "up_grouped", "head")]
    assert weight_layouts(net) == {"up.weight": Layout(True, 1), "up_grouped.weight": Layout(True, 2)}


def test_channel_pattern_silences_output_channels_of_every_convolution_kind(tmp_path) -> None:
    torch.manual_seed(0)
    net = ConvZoo()
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="local", pattern="channel", verbose=False)
    tiny_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[prune]).fit(net, _images())
    x = {"stem": torch.randn(2, 3, 4, 4), "dw": torch.randn(2, 8, 4, 4), "grouped": torch.randn(2, 8, 4, 4)}
    x |= {"up": torch.randn(2, 8, 4, 4), "up_grouped": torch.randn(2, 4, 4, 4), "head": torch.randn(2, 6, 4, 4)}
    with torch.no_grad():
        for name, inp in x.items():
            layer = getattr(net, name)
            out = layer(inp) - layer.bias.view(1, -1, 1, 1)
            silent = out.abs().amax(dim=(0, 2, 3)) == 0  # output channels that no longer see the input
            assert int(silent.sum()) == round(0.5 * layer.out_channels), name
            rows = output_rows(prune.masks[f"{name}.weight"], weight_layouts(net).get(f"{name}.weight", Layout()))
            assert torch.equal(silent, ~rows.any(dim=1)), name


def test_nm_pattern_on_convolutions_refuses_depthwise_and_groups_convtranspose_inputs(tmp_path) -> None:
    net = ConvZoo()
    net.up_grouped = nn.ConvTranspose2d(4, 8, 3, padding=1, groups=1)  # (in 4, out 8): 2:4 along the 4 inputs
    net.head = nn.Conv2d(8, 3, 1)
    refused = MagnitudePruneCallback(pattern="2:4", exclude=["stem.weight"])  # stem: 3 input channels
    with pytest.raises(ValueError, match=r"multiple of 4.*dw\.weight"):
        tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[refused]).fit(net, _images())
    prune = MagnitudePruneCallback(pattern="2:4", schedule="oneshot", start=0, exclude=["dw.weight", "stem.weight"], verbose=False)
    tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[prune]).fit(net, _images())
    up = prune.masks["up.weight"]  # (in 8, out 4, 2, 2): groups of 4 consecutive *input* channels keep 2
    assert (up.reshape(2, 4, 4, 2, 2).sum(dim=1) == 2).all()
    assert (prune.masks["up_grouped.weight"].sum(dim=0) == 2).all()  # (4, 8, 3, 3): one group of 4 inputs
    assert (prune.masks["grouped.weight"].reshape(8, 1, 4).sum(-1) == 2).all()  # 4 inputs per conv group


class TinyLSTM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = SimpleLSTM(vocab_size=VOCAB, ninp=16, nhid=16, nlayers=1, dropout=0.0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        out, _ = self.model(inputs, self.model.init_hidden(inputs.size(0)))
        return F.nll_loss(out, target.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lstm_is_left_alone(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyLSTM()
    prune = MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=0, verbose=False)
    tiny_trainer(tmp_path, max_steps=3, max_epochs=None, callbacks=[prune]).fit(model, _token_loader(n=24))
    assert prune.parameter_names == ["model.decoder.weight"]
    assert int((~prune.masks["model.decoder.weight"]).sum()) == 800
    for name, p in model.model.rnn.named_parameters():
        assert int((p == 0).sum()) == 0, name
    assert int((model.model.encoder.weight == 0).sum()) == 0


def test_callback_layer_sparsity_mapping_reaches_each_layer_target(tmp_path) -> None:
    torch.manual_seed(0)
    net = ConvZoo()
    prune = MagnitudePruneCallback(
        sparsity=0.0, schedule="linear", start=0, end=2, frequency=1, scope="local",
        layer_sparsity={"stem.weight": 0.5, "up*": 0.75}, verbose=False,
    )
    tiny_trainer(tmp_path, max_steps=3, max_epochs=None, callbacks=[prune]).fit(net, _images(12))
    got = {n: round(1 - m.float().mean().item(), 3) for n, m in prune.masks.items()}
    assert got == {"stem.weight": 0.5, "dw.weight": 0.0, "grouped.weight": 0.0, "up.weight": 0.75,
                   "up_grouped.weight": 0.75, "head.weight": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=0.995, ranking="raw"), r"`MagnitudePruneCallback\(max_layer_sparsity=...\)` must be >= sparsity=0.995 or None"),
        (dict(sparsity=0.5, max_layer_sparsity=1.5), r"max_layer_sparsity=...\)` must be 'auto', a number in \(0, 1\] or None, got 1.5"),
        (dict(sparsity=0.5, max_layer_sparsity="off"), r"max_layer_sparsity=...\)` must be 'auto', a number in \(0, 1\] or None, got 'off'"),
        (dict(sparsity=0.5, ranking="snip"), r"ranking=...\)` must be one of 'raw', 'layer_normalized', 'erk'"),
        (dict(sparsity=0.5, layer_sparsity={"a": 0.5}), r"layer_sparsity=...\)` must be None unless scope='local'"),
        (dict(sparsity=0.5, scope="local", layer_sparsity={"a": 1.0}), r"layer_sparsity\['a'\]=...\)` must be"),
        (dict(sparsity=0.5, scope="local", layer_sparsity=[0.5]), r"mapping or None, got \[0.5\]"),
    ],
)
def test_callback_checks_the_new_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MagnitudePruneCallback(**kwargs)
    assert MagnitudePruneCallback(sparsity=0.995, max_layer_sparsity=None).effective_max_layer_sparsity is None
    assert MagnitudePruneCallback(sparsity=0.995, scope="local").effective_max_layer_sparsity == DEFAULT_MAX_LAYER_SPARSITY


def test_default_budgets_reach_99_5_percent_without_a_warning(tmp_path) -> None:
    model = TinyClassifier(in_features=256, hidden=128, classes=10)
    prune = MagnitudePruneCallback(sparsity=0.995, schedule="oneshot", start=0, verbose=False)  # the defaults
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*MagnitudePruneCallback.*")
        tiny_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[prune]).fit(
            model, random_loader(in_features=256, classes=10)
        )
    first, last = (1 - prune.masks[f"net.{i}.weight"].float().mean().item() for i in (0, 2))
    total = sum(m.numel() for m in prune.masks.values())
    assert sum(int((~m).sum()) for m in prune.masks.values()) == round(0.995 * total)
    assert first > 0.995 > last > 0  # the wide layer gives most, the narrow output layer stays denser
    assert prune.masks["net.2.weight"].any()


def test_auto_ceiling_is_off_only_where_per_layer_budgets_decide() -> None:
    # the instance keeps the value given ("auto"); the number in use is effective_max_layer_sparsity
    assert MagnitudePruneCallback(sparsity=0.995).max_layer_sparsity == "auto"
    assert MagnitudePruneCallback(sparsity=0.995).effective_max_layer_sparsity is None  # the defaults: global budgets
    assert MagnitudePruneCallback(sparsity=0.995, ranking="erk").effective_max_layer_sparsity is None
    capped = MagnitudePruneCallback(sparsity=0.9, ranking="erk", max_layer_sparsity=0.95)
    assert capped.max_layer_sparsity == capped.effective_max_layer_sparsity == 0.95
    for kwargs in (dict(sparsity=0.9, ranking="raw"), dict(sparsity=0.9, ranking="layer_normalized"),
                   dict(sparsity=0.5, pattern="channel"), dict(pattern="2:4"), dict(threshold=0.01)):
        assert MagnitudePruneCallback(**kwargs).effective_max_layer_sparsity == DEFAULT_MAX_LAYER_SPARSITY, kwargs
