"""Physical compaction of channel pruning (issue #24): smaller layers, the masked model's outputs, one-line refusals."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipprune.app.models.networks import CifarResNet
from lightning_clipprune.export import compact_channels, inference_report, to_inference
from lightning_clipprune.export.compact import has_zero_channels

pytest.importorskip("torch_pruning")


def _zero_rows_(layer: nn.Module, rows: list[int], bias: float | None = 0.0) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None and bias is not None:
            layer.bias[rows] = bias


def _assert_equal(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5, rtol=1e-4)


def test_linear_chain_loses_dead_rows_and_matching_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    _zero_rows_(net[0], list(range(0, 32, 2)))  # 16 of 32, bias zero: dead
    _zero_rows_(net[2], [1, 2, 3], bias=-1.0)  # bias -1, then ReLU: zero, so dead too
    _zero_rows_(net[2], [7], bias=0.5)  # bias 0.5 after ReLU: a constant the next layer reads: kept
    x = torch.randn(8, 16)
    small, widths = compact_channels(net, x)
    assert widths == {"0": (32, 16), "2": (24, 21)}
    assert small[0].weight.shape == (16, 16) and small[2].weight.shape == (21, 16) and small[4].weight.shape == (5, 21)
    _assert_equal(small, net, x)
    assert net[0].weight.shape == (32, 16)  # the model given is untouched


def test_the_last_layer_keeps_its_outputs() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    _zero_rows_(net[2], [0, 1])
    small, widths = compact_channels(net, torch.randn(3, 8))
    assert widths == {} and small[2].out_features == 4


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_with_batchnorm_and_residuals(shortcut: str) -> None:
    torch.manual_seed(0)
    net = CifarResNet(20, shortcut=shortcut)
    for m in net.modules():  # trained-looking BatchNorm: the dead-channel test must read it
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1.0, -0.1)  # a zeroed conv then gives a negative constant: 0 after ReLU
    net.eval()
    for block in net.layers:
        _zero_rows_(block.conv1, list(range(0, block.conv1.out_channels, 2)))
    block0 = net.layers[0]
    with torch.no_grad():
        block0.bn1.bias[2] = 0.7  # a zeroed channel with a positive constant after BN + ReLU: must stay
    x = torch.randn(4, 3, 32, 32)
    small, widths = compact_channels(net, x)
    assert widths["layers.0.conv1"] == (16, 9) and widths["layers.0.bn1"] == (16, 9)
    assert widths["layers.8.conv1"] == (64, 32)
    assert small.layers[8].conv2.in_channels == 32
    assert "conv1" not in widths  # the residual stream was not all zero: untouched
    _assert_equal(small, net, x)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in net.parameters())


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.head = nn.Conv2d(14, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(F.relu(self.bn(y))).mean(dim=(2, 3))


def test_concatenation() -> None:
    torch.manual_seed(0)
    net = _Concat().eval()
    _zero_rows_(net.a, [0, 5])
    _zero_rows_(net.b, [1, 2, 4])
    x = torch.randn(2, 3, 10, 10)
    small, widths = compact_channels(net, x)
    assert widths == {"a": (8, 6), "b": (6, 3), "bn": (14, 9)}
    assert small.head.in_channels == 9
    _assert_equal(small, net, x)


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)))


def test_a_layer_it_cannot_compact_is_refused_in_one_line() -> None:
    net = _GroupNormNet()
    _zero_rows_(net.conv, [0, 1])
    with torch.no_grad():
        net.norm.bias.zero_()
        net.norm.weight[:2] = 0  # dead after the norm, but removing channels changes the group statistics
    with pytest.raises(ValueError, match=r"cannot remove channels through GroupNorm 'norm'") as err:
        compact_channels(net, torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value)


def test_to_inference_compacts_channel_pruned_models() -> None:
    torch.manual_seed(0)
    net = CifarResNet(20).eval()
    for block in net.layers:
        _zero_rows_(block.conv1, list(range(block.conv1.out_channels // 2)))
    assert has_zero_channels(net)
    x = torch.randn(2, 3, 32, 32)
    fast = to_inference(net, example_input=x, min_sparsity=1.0)
    assert inference_report(fast).compacted["layers.4.conv1"] == (32, 16)
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    kept = to_inference(net, example_input=x, compact=False, min_sparsity=1.0)
    assert inference_report(kept).compacted == {} and kept.layers[4].conv1.out_channels == 32


def test_missing_torch_pruning_is_one_line_with_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    monkeypatch.setattr("lightning_clipprune.export.compact.torch_pruning_missing", lambda: True)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    _zero_rows_(net[0], [0])
    x = torch.randn(2, 4)
    with pytest.raises(ImportError, match=r"needs Torch-Pruning: pip install 'lightning-clipprune\[compact\]'"):
        compact_channels(net, x)
    with pytest.raises(ImportError, match="pip install"):
        to_inference(net, example_input=x, compact=True)
    with pytest.warns(UserWarning, match="Torch-Pruning is not installed, so they are kept"):
        fast = to_inference(net, example_input=x)
    assert inference_report(fast).compacted == {}


def test_rows_left_zero_by_unstructured_pruning_are_not_called_channel_pruning() -> None:
    # A narrow layer pruned far, unstructured: many rows are all zero by chance and keep their bias. Kept, and
    # no advice about channel pruning; the same count of rows zeroed in a wide layer is channel pruning.
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        narrow[0].weight.mul_(torch.rand_like(narrow[0].weight) > 0.9)
        narrow[0].bias.fill_(0.5)
    assert int((narrow[0].weight == 0).all(1).sum()) >= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compact_channels(narrow, torch.randn(8, 4))
    wide = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        wide[0].weight[:12] = 0.0
        wide[0].bias.fill_(0.5)
    with pytest.warns(UserWarning, match=r"12 output channels .* carry a constant"):
        small, widths = compact_channels(wide, torch.randn(8, 64))
    assert widths == {}  # the constant channels are kept: outputs equal


class _PadsCircularly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.pad(torch.relu(self.a(x)), (1, 1, 1, 1), mode="circular"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")),
         "'2' pads circularly"),
        (_PadsCircularly, "the forward writes into a slice of a tensor"),
    ],
)
def test_circular_padding_is_refused_before_the_tracer_loops(make, match: str) -> None:
    # Torch-Pruning's group search never ends on circular padding (a slice written in place): refused up front,
    # in one line; to_inference's default compact="auto" warns, keeps the channels and still converts.
    net = make().eval()
    layer = net[0] if isinstance(net, nn.Sequential) else net.a
    _zero_rows_(layer, [0, 1])
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=match + r".*compact=False") as err:
        compact_channels(net, x)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="zero output channels are kept: compact: cannot trace"):
        fast = to_inference(net, example_input=x, min_sparsity=1.0)
    assert inference_report(fast).compacted == {}
    _assert_equal(fast, net, x)
    with pytest.raises(ValueError, match=match):
        to_inference(net, example_input=x, compact=True)


def test_a_model_that_would_not_run_compacted_is_refused_in_one_line() -> None:
    # A depthwise convolution reading the model's own input: Torch-Pruning removes its input channels with its
    # outputs, which the input cannot lose. The failure is one line of ours, not torch's shape error.
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 8, 1)).eval()
    _zero_rows_(net[0], [1, 2])
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"no longer runs with its dead channels removed \(RuntimeError: .*compact=False"):
        compact_channels(net, x)
    with pytest.warns(UserWarning, match="zero output channels are kept"):
        fast = to_inference(net, example_input=x, min_sparsity=1.0)
    _assert_equal(fast, net, x)


def test_a_tracer_failure_is_a_warning_under_compact_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever Torch-Pruning raises while tracing, to_inference's default keeps the channels and says so in
    # one line; compact=True raises it as one line too.
    import torch_pruning

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an op the tracer does not know\nsecond line")

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", broken)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    _zero_rows_(net[0], [0, 1])
    x = torch.randn(3, 4)
    said = r"cannot trace this model's channels \(RuntimeError: an op the tracer does not know\); pass compact=False"
    with pytest.warns(UserWarning, match=rf"kept: compact: {said} \(compact=True") as got:
        fast = to_inference(net, example_input=x, min_sparsity=1.0)
    assert all("\n" not in str(w.message) for w in got)
    _assert_equal(fast, net, x)
    with pytest.raises(ValueError, match=said):
        to_inference(net, example_input=x, compact=True)
