"""Post-training pruning by layer-wise reconstruction (``lightning_clipprune.posttrain``, issue #23).

Hand-built matrices and tiny networks on random data, CPU, a few seconds in all.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipprune.posttrain import layer_counts, reconstruct_matrix_, reconstruct_prune
from lightning_clipprune.posttrain.calibration import layer_hessian, weight_to_groups
from lightning_clipprune.posttrain.criterion import Reconstruction
from lightning_clipprune.posttrain.obs import block_counts, refit_rows_
from lightning_clipprune.pruning import select_prunable_parameters


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (as real activations have): where reconstruction has something to use."""
    mix = torch.randn(cols, cols, generator=_gen(seed)) / math.sqrt(cols)
    return torch.randn(n, cols, generator=_gen(seed + 1)) @ (torch.eye(cols) + 2 * mix) + 0.5


def _output_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x @ w.T - x @ w_new.T))


def _magnitude(w: torch.Tensor, n_prune: int) -> torch.Tensor:
    out = w.clone().reshape(-1)
    out[w.abs().reshape(-1).argsort()[:n_prune]] = 0.0
    return out.view_as(w)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_reconstruction_has_lower_output_error_than_magnitude_at_same_budget(seed, sparsity):
    x = _correlated_inputs(512, 48, seed)
    w = torch.randn(24, 48, generator=_gen(seed + 7))
    layer = nn.Linear(48, 24, bias=False)
    layer.weight.data.copy_(w)
    reconstruct_prune(layer, [x], sparsity, num_samples=512, block_size=16, progress=False)
    k = round(sparsity * w.numel())
    assert int((layer.weight == 0).sum()) == k
    ratio = _output_error(x, w, layer.weight.detach()) / _output_error(x, w, _magnitude(w, k))
    assert ratio < (0.9 if sparsity <= 0.8 else 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparsegpt_core_beats_magnitude_and_estimates_its_error(seed, sparsity):
    x = _correlated_inputs(512, 48, seed)
    w = torch.randn(24, 48, generator=_gen(seed + 7))
    k = round(sparsity * w.numel())
    w_obs = w.clone()
    keep, est = reconstruct_matrix_(w_obs, 2 * x.T @ x / len(x), n_prune=k, block_size=16)
    assert int((~keep).sum()) == k == int((w_obs == 0).sum())
    assert _output_error(x, w, w_obs) < _output_error(x, w, _magnitude(w, k))
    # the OBS estimate is the squared error it adds, per sample, halved by the 2 in H = 2 X^T X / n
    assert est == pytest.approx(_output_error(x, w, w_obs) ** 2 / len(x), rel=0.05)


def test_same_mask_reconstruction_beats_the_mask_alone():
    """Holding the mask fixed, the update of the kept weights alone reduces the error (the compensation works)."""
    x = _correlated_inputs(512, 32, 3)
    w = torch.randn(16, 32, generator=_gen(4))
    w_obs = w.clone()
    keep, _ = reconstruct_matrix_(w_obs, 2 * x.T @ x / len(x), n_prune=256, block_size=8)
    assert _output_error(x, w, w_obs) < 0.9 * _output_error(x, w, w * keep)


def test_block_counts_sum_exactly():
    for n, cols, b in [(0, 10, 3), (7, 10, 3), (1000, 784, 128), (99, 100, 128)]:
        counts = block_counts(n, cols, b)
        assert sum(counts) == n and len(counts) == math.ceil(cols / b)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_nm_pattern_holds_on_every_group(pattern, n, m):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    data = [_correlated_inputs(64, 32, i) for i in range(4)]
    reconstruct_prune(net, data, None, pattern=pattern, num_samples=256, block_size=8, progress=False)
    for w in select_prunable_parameters(net).values():
        kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((kept == n).all())


def test_nm_on_conv_groups_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    data = [torch.randn(8, 8, 6, 6, generator=_gen(i)) for i in range(2)]
    reconstruct_prune(net, data, 0.5, pattern="2:4", num_samples=16, block_size=8, progress=False)
    for w in (net[0].weight, net[2].weight):
        kept = (w != 0).reshape(w.shape[0], 2, 4, *w.shape[2:]).sum(2)  # groups of 4 input channels
        assert bool((kept == 2).all())


def _unfolded_linear_equivalent(
    conv: nn.Conv2d, x: torch.Tensor
) -> tuple[list[nn.Linear], list[torch.Tensor]]:
    """One Linear per group on the unfolded input, columns kernel-position-major (as the module documents)."""
    g, c = conv.groups, conv.in_channels // conv.groups
    k = conv.kernel_size[0] * conv.kernel_size[1]
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    b, _, pos = cols.shape
    cols = cols.reshape(b, g, c, k, pos).permute(1, 0, 4, 3, 2).reshape(g, b * pos, k * c)
    grouped = weight_to_groups(conv, conv.weight)
    linears = []
    for i, bias in enumerate(conv.bias.detach().reshape(g, -1)):
        lin = nn.Linear(k * c, conv.out_channels // g)
        lin.weight.data.copy_(grouped[i])
        lin.bias.data.copy_(bias)
        linears.append(lin)
    return linears, list(cols)


@pytest.mark.parametrize("groups", [1, 2, 4])  # 4: depthwise
def test_conv2d_equals_the_unfolded_linear_layer(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(16, 4, 9, 9, generator=_gen(1))
    linears, inputs = _unfolded_linear_equivalent(conv, x)
    reconstruct_prune(conv, [x], 0.5, allocation="uniform", num_samples=16, block_size=8, progress=False)
    pruned_conv = weight_to_groups(conv, conv.weight)
    biases = conv.bias.detach().reshape(groups, -1)
    for g, (lin, xg) in enumerate(zip(linears, inputs, strict=True)):
        reconstruct_prune(
            lin, [xg], 0.5, allocation="uniform", num_samples=len(xg), block_size=8, progress=False
        )
        torch.testing.assert_close(pruned_conv[g], lin.weight.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(biases[g], lin.bias.detach(), rtol=1e-4, atol=1e-4)
        assert torch.equal(pruned_conv[g] == 0, lin.weight == 0)


def test_conv1d_hessian_matches_its_unfolded_input():
    conv = nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="circular")
    x = torch.randn(5, 3, 11, generator=_gen(0))
    h, _ = layer_hessian(conv, conv, [x], lambda m, t: m(t))
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode="circular")
    cols = (
        F.unfold(padded.unsqueeze(2), (1, 3), dilation=(1, 2))
        .reshape(5, 3, 3, -1)
        .permute(0, 3, 2, 1)
        .reshape(-1, 9)
    )
    torch.testing.assert_close(h[0], 2 * cols.T @ cols / len(cols), rtol=1e-5, atol=1e-5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


class _Shuffled:
    """A loader that shuffles with the global random state, as a DataLoader with shuffle=True does."""

    def __init__(self, x: torch.Tensor, batch: int) -> None:
        self.x, self.batch = x, batch

    def __iter__(self):
        return iter(self.x[torch.randperm(len(self.x))].split(self.batch))


def test_deterministic_under_a_seed_and_leaves_the_random_state_alone():
    loader = _Shuffled(torch.randn(300, 20, generator=_gen(0)), 32)
    a, b, c = _mlp(), _mlp(), _mlp()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    reconstruct_prune(a, loader, 0.7, num_samples=100, seed=5, progress=False)
    assert torch.rand(1) == before  # the caller's random stream is not consumed
    reconstruct_prune(b, loader, 0.7, num_samples=100, seed=5, progress=False)
    reconstruct_prune(c, loader, 0.7, num_samples=100, seed=6, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("allocation", ["global_magnitude", "er", "uniform", {"4.weight": 0.8}])
@pytest.mark.parametrize("sparsity", [0.33, 0.9, 0.95])
def test_exact_global_sparsity(allocation, sparsity):
    net = _mlp()
    data = [torch.randn(64, 20, generator=_gen(i)) for i in range(3)]
    _, report = reconstruct_prune(net, data, sparsity, allocation=allocation, num_samples=192, progress=False)
    params = select_prunable_parameters(net)
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros == report.pruned == round(sparsity * total)
    if isinstance(allocation, dict):
        assert int((net[4].weight == 0).sum()) == round(0.8 * net[4].weight.numel())


def test_global_magnitude_allocation_is_what_one_threshold_gives():
    w = {"a": torch.randn(30, 20, generator=_gen(0)), "b": 3 * torch.randn(10, 30, generator=_gen(1))}
    counts = layer_counts(w, 0.6, "global_magnitude")
    flat = torch.cat([t.abs().reshape(-1) for t in w.values()])
    cut = flat.sort().values[round(0.6 * flat.numel()) - 1]
    assert counts == {n: int((t.abs() <= cut).sum()) for n, t in w.items()}
    assert counts["a"] > 0.6 * 600 > 0.6 * 300 > counts["b"]  # the small-weight layer loses more


def test_too_large_hessian_is_refused_in_one_line_before_allocating(monkeypatch):
    net = nn.Sequential(nn.Linear(9216, 2))
    before = net[0].weight.detach().clone()

    def no_allocation(*args, **kwargs):
        raise AssertionError("a Hessian was allocated")

    monkeypatch.setattr("lightning_clipprune.posttrain.calibration.layer_hessian", no_allocation)
    monkeypatch.setattr("lightning_clipprune.posttrain.reconstruct.layer_hessian", no_allocation)
    never_read = _Raising("the loader must not be read before the check")
    with pytest.raises(ValueError) as err:
        reconstruct_prune(net, never_read, 0.5, max_hessian_bytes=300 * 2**20, progress=False)
    message = str(err.value)
    assert (
        "\n" not in message
        and "0.weight" in message
        and "324 MiB" in message
        and "max_hessian_bytes" in message
    )
    assert torch.equal(net[0].weight, before)


class _Raising:
    def __init__(self, why: str) -> None:
        self.why = why

    def __iter__(self):
        raise AssertionError(self.why)


def test_calibration_reads_only_the_loader_given():
    net = _mlp()
    seen = []

    class Recording:
        def __iter__(self):
            for i in range(10):
                seen.append(i)
                yield torch.randn(32, 20, generator=_gen(i))

    _, report = reconstruct_prune(net, Recording(), 0.5, num_samples=80, progress=False)
    assert seen == [0, 1, 2] and report.num_samples == 80  # first samples in loader order, iterated once


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0.5, "allocation": "wanda"}, "allocation"),
        ({"sparsity": 0.5, "pattern": "channel"}, "pattern"),
        ({"sparsity": 0.9, "pattern": "2:4"}, "sparsity"),
        ({"sparsity": 0.5, "pattern": "2:4", "block_size": 6}, "block_size"),
        ({"sparsity": 0.5, "damp": 0.0}, "damp"),
        ({"sparsity": 0.5, "num_samples": 0}, "num_samples"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        reconstruct_prune(_mlp(), [torch.randn(4, 20)], progress=False, **{"num_samples": 4, **kwargs})
    assert "\n" not in str(err.value)


def test_layers_it_cannot_reconstruct_go_to_magnitude_with_one_warning_naming_the_exclude():
    net = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (8, 1)), nn.ConvTranspose1d(8, 8, 1))
    dense = net[2].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"2.weight \(a ConvTranspose1d\).*exclude=\['2.weight'\]") as record:
        _, report = reconstruct_prune(net, [torch.randn(4, 8)], 0.5, num_samples=4, progress=False)
    assert len(record) == 1
    methods = {r.name: r.method for r in report.layers}
    assert methods == {"0.weight": "obs", "2.weight": "magnitude"} and report.pruned == 64  # the target, exact
    # by magnitude within the layer, no update: the kept entries are the dense ones, the largest |w|
    w = net[2].weight.detach()
    kept = w != 0
    assert torch.equal(w[kept], dense[kept])
    assert dense[kept].abs().min() >= dense[~kept].abs().max()
    assert "magnitude" in report.table()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_attention_projections_go_to_magnitude_and_the_linear_layers_are_reconstructed(pattern):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    net = Block()
    data = [torch.randn(32, 5, 16, generator=_gen(0))]
    sparsity = 0.5 if pattern == "2:4" else 0.6
    with pytest.warns(UserWarning, match="attn.in_proj_weight") as record:
        _, report = reconstruct_prune(net, data, None if pattern == "2:4" else sparsity, pattern=pattern,
                                      num_samples=32, progress=False)
    assert len(record) == 1 and "attn.out_proj.weight (never called as a module" in str(record[0].message)
    methods = {r.name: r.method for r in report.layers}
    assert methods == {"attn.in_proj_weight": "magnitude", "attn.out_proj.weight": "magnitude", "head.weight": "obs"}
    total = sum(r.numel for r in report.layers)
    assert report.pruned == round(sparsity * total) == sum(int((p == 0).sum()) for p in
                                                           (net.attn.in_proj_weight, net.attn.out_proj.weight,
                                                            net.head.weight))
    if pattern == "2:4":  # along the input dimension, as the rest of the suite
        for w in (net.attn.in_proj_weight, net.attn.out_proj.weight, net.head.weight):
            assert bool(((w.detach().reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def test_layers_are_visited_in_forward_order_and_report_adds_up():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(16, 4)
            self.first = nn.Linear(8, 16)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    torch.manual_seed(0)
    net = Reversed()
    _, report = reconstruct_prune(
        net, [torch.randn(64, 8, generator=_gen(0))], 0.5, num_samples=64, progress=False
    )
    assert [r.name for r in report.layers] == ["first.weight", "second.weight"]
    assert report.pruned == sum(r.pruned for r in report.layers) == 96 and report.sparsity == 0.5
    assert (
        "total" in report.table() and report.as_dict()["layers"][0]["sparsity"] == report.layers[0].sparsity
    )


# ---------------------------------------------------------------- MagnitudePruneCallback(criterion="obs")


class _Armed:
    """A loader that raises once armed (after training), so a test can prove that it is never read then."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
        self.x, self.y, self.name, self.armed, self.reads_after = x, y, name, False, 0

    def __iter__(self):
        if self.armed:
            if self.name == "val":
                raise AssertionError("the validation loader was read after training (calibration)")
            self.reads_after += 1
        return iter(zip(self.x.split(32), self.y.split(32), strict=True))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / 32)


def test_callback_obs_prunes_after_training_on_the_train_loader_never_validation():
    import lightning as L

    from lightning_clipprune import MagnitudePruneCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = torch.randn(128, 20, generator=_gen(0)), torch.randint(0, 5, (128,), generator=_gen(1))
    train, val = _Armed(x, y, "train"), _Armed(x[:64], y[:64], "val")

    class Arm(L.Callback):
        def on_train_end(self, trainer, pl_module):  # runs before the pruning callback (earlier in the list)
            train.armed = val.armed = True

    obs = Reconstruction(progress=False, num_samples=96)
    prune = MagnitudePruneCallback(sparsity=0.8, criterion=obs, schedule="oneshot", start=1.0)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[Arm(), prune],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = Net()
    trainer.fit(model, train, val)
    assert train.reads_after == 1  # calibration read the training loader, once
    params = select_prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    assert sum(int((p == 0).sum()) for p in params.values()) == round(0.8 * total)
    assert all(torch.equal(prune.masks[n], p != 0) for n, p in params.items())
    assert obs.report.num_samples == 96 and obs.report.sparsity == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"schedule": "cubic"}, {"schedule": "oneshot", "start": 1}, {"schedule": "oneshot", "start": 0.5}],
)
def test_callback_obs_outside_post_training_is_refused_in_one_line(kwargs):
    from lightning_clipprune import MagnitudePruneCallback

    with pytest.raises(ValueError, match="start=1.0") as err:
        MagnitudePruneCallback(sparsity=0.8, criterion="obs", **kwargs)
    assert "\n" not in str(err.value)


def test_refit_rows_is_the_least_squares_optimum_for_the_mask():
    x = _correlated_inputs(256, 12, 0)
    target = torch.randn(3, 12, generator=_gen(1))
    keep = torch.rand(3, 12, generator=_gen(2)) > 0.5
    w = torch.zeros(3, 12)
    refit_rows_(w, target, 2 * x.T @ x / len(x), keep, damp=1e-9)
    for r in range(3):
        cols = keep[r].nonzero().squeeze(1)
        best = torch.linalg.lstsq(
            x[:, cols].double(), (x @ target[r]).double().unsqueeze(1)
        ).solution.squeeze(1)
        torch.testing.assert_close(w[r, cols].double(), best, rtol=1e-3, atol=1e-3)
        assert bool((w[r, ~keep[r]] == 0).all())


def test_dead_inputs_keep_their_weights_and_the_count_stays_exact():
    x = _correlated_inputs(256, 16, 0)
    x[:, 3] = 0.0  # an input that is 0 on every calibration sample (a dead ReLU unit)
    layer = nn.Linear(16, 8)
    reconstruct_prune(layer, [x], 0.05, num_samples=256, progress=False)
    # dead entries are pruned first (they cost nothing): 6 of the 8, and the 2 kept are not set to 0
    assert int((layer.weight == 0).sum()) == 6 == round(0.05 * 128)
    assert int((layer.weight[:, 3] == 0).sum()) == 6


def test_bias_in_the_update_lowers_the_output_error_on_shifted_inputs():
    for seed in range(3):
        x = _correlated_inputs(512, 32, seed) + 2.0
        dense = nn.Linear(32, 16)
        errors = []
        for update_bias in (False, True):
            layer = nn.Linear(32, 16)
            layer.load_state_dict(dense.state_dict())
            reconstruct_prune(layer, [x], 0.8, num_samples=512, update_bias=update_bias, progress=False)
            with torch.no_grad():
                errors.append(float(torch.linalg.matrix_norm(dense(x) - layer(x))))
        assert errors[1] < errors[0]


def test_a_short_loader_warns_with_the_count_used():
    with pytest.warns(UserWarning, match="gave 40 samples, fewer than num_samples=100"):
        reconstruct_prune(_mlp(), [torch.randn(40, 20)], 0.5, num_samples=100, progress=False)


@pytest.mark.parametrize("reference", ["dense", "layer"])
def test_a_failure_half_way_leaves_the_model_as_it_was(monkeypatch, reference):
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer: the first is pruned already
            raise ValueError("the Hessian of `2.weight` is not positive definite")
        return original(*args, **kwargs)

    import lightning_clipprune.posttrain.reconstruct as module

    original = module.reconstruct_matrix_
    monkeypatch.setattr(module, "reconstruct_matrix_", failing)
    with pytest.raises(ValueError, match="positive definite"):
        reconstruct_prune(
            net, [torch.randn(64, 20)], 0.5, num_samples=64, reference=reference, progress=False
        )
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2) as a stand-in: ``y = x @ W + b``, ``W`` stored ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, generator=_gen(3)))
        self.bias = nn.Parameter(torch.randn(nf, generator=_gen(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


_Conv1D.__name__ = "Conv1D"  # what the duck type looks for, beside `nf` and the (nx, nf) weight


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_hf_conv1d_is_reconstructed_as_the_equivalent_linear_layer(pattern, recwarn):
    conv1d = _Conv1D(6, 8)
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.copy_(conv1d.weight.t())
        lin.bias.copy_(conv1d.bias)
    x = torch.randn(64, 5, 8, generator=_gen(5))  # (batch, tokens, features), as GPT-2 feeds it
    sparsity = 0.5 if pattern == "unstructured" else None
    _, report = reconstruct_prune(conv1d, [x], sparsity, pattern=pattern, num_samples=64, block_size=4, progress=False)
    reconstruct_prune(lin, [x], sparsity, pattern=pattern, num_samples=64, block_size=4, progress=False)
    assert not [w for w in recwarn if "cannot reconstruct" in str(w.message)]  # not sent to the magnitude fallback
    torch.testing.assert_close(conv1d.weight.detach().t(), lin.weight.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(conv1d.weight.t() == 0, lin.weight == 0)
    if pattern == "2:4":  # N of every M along the INPUT dimension (the rows of the stored (in, out) weight)
        groups = (conv1d.weight.detach().t() != 0).reshape(6, 2, 4).sum(dim=-1)
        assert bool((groups <= 2).all())
    else:
        assert report.sparsity == pytest.approx(0.5)


def test_report_table_columns_stay_aligned_for_long_layer_names():
    long = nn.Sequential()
    long.add_module("a_very_long_transformer_block_name_0_attention_projection", nn.Linear(8, 8))
    _, report = reconstruct_prune(long, [torch.randn(32, 8, generator=_gen(6))], 0.5, num_samples=32, progress=False)
    header, row, total = report.table().splitlines()
    assert row.index("(8, 8)") == header.index("shape")  # the name did not push the shape column right
    assert row.index("0.5000") + len("0.5000") == header.index("sparsity") + len("sparsity") == total.index("0.5000") + 6
