"""The two sparse products of the CSR layers (``kernel="mm"``, MKL's; ``kernel="embedding_bag"``): the same
outputs, chosen per layer by timing, kept through the ``.lcps`` recipe (issue #24); and what users do with
a converted model besides calling it: deep-copy it, convert it again, convert a model with nothing to convert.

Choices are asserted with injected timers only; no assertion depends on the machine's speed.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lightning_clipprune.export import (
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    inference_report,
    load_inference,
    save_inference,
    save_sparse,
    to_inference,
)
from lightning_clipprune.export.recipes import _RECIPE_KEY
from lightning_clipprune.export.sparse_linear import KERNELS, sparse_product, to_csr

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

SPARSE = (SparseLinear, SparseConv1d, SparseConv2d)


def _pruned(module: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return module.eval()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _pruned(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)), 0.9)


def bag_wins(module: nn.Module, x: torch.Tensor) -> float:
    """An injected timer: the embedding_bag kernel 1 s, MKL's 2 s, dense 10 s."""
    if isinstance(module, SPARSE):
        return 1.0 if module.kernel == "embedding_bag" else 2.0
    return 10.0


def mm_wins(module: nn.Module, x: torch.Tensor) -> float:
    if isinstance(module, SPARSE):
        return 1.0 if module.kernel == "mm" else 2.0
    return 10.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (1, 24), (0, 24)])
def test_both_kernels_equal_the_dense_linear(dtype: torch.dtype, bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    lin = _pruned(nn.Linear(24, 12, bias=bias), 0.8).to(dtype)
    with torch.no_grad():
        lin.weight[3] = 0  # an output whose weight row is empty: an empty bag, its bias alone
    x = torch.randn(*shape, dtype=dtype)
    with torch.inference_mode():
        for kernel in KERNELS:
            out = SparseLinear(lin, kernel)(x)
            assert out.shape == lin(x).shape and torch.allclose(out, lin(x), atol=1e-6), kernel


def test_the_embedding_bag_kernel_passes_the_gradient_to_its_input() -> None:
    torch.manual_seed(0)
    lin = _pruned(nn.Linear(24, 12), 0.8)
    x = torch.randn(6, 24, requires_grad=True)
    SparseLinear(lin, "embedding_bag")(x).sum().backward()
    assert torch.allclose(x.grad, lin.weight.detach().sum(0).expand_as(x), atol=1e-6)


def test_a_fully_pruned_layer_gives_its_bias_with_either_kernel() -> None:
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.zero_()
    x = torch.randn(3, 8)
    for kernel in KERNELS:
        assert torch.allclose(SparseLinear(lin, kernel)(x), lin.bias.expand(3, 4).detach()), kernel


def test_sparse_product_is_a_matrix_product_for_both_kernels() -> None:
    torch.manual_seed(0)
    w = torch.randn(30, 50) * (torch.rand(30, 50) > 0.9)
    xt, bias = torch.randn(50, 7), torch.randn(30)
    for kernel in KERNELS:
        assert torch.allclose(sparse_product(to_csr(w), bias, xt, kernel), w @ xt + bias[:, None], atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_both_kernels_equal_the_dense_convolutions(kernel: str) -> None:
    torch.manual_seed(0)
    conv2 = _pruned(nn.Conv2d(3, 8, 3, stride=2, padding=1), 0.7)
    conv1 = _pruned(nn.Conv1d(3, 8, 5, padding=2, dilation=2, bias=False), 0.7)
    with torch.inference_mode():
        x2, x1 = torch.randn(2, 3, 11, 9), torch.randn(2, 3, 17)
        assert torch.allclose(SparseConv2d(conv2, kernel)(x2), conv2(x2), atol=1e-5)
        assert torch.allclose(SparseConv1d(conv1, kernel)(x1), conv1(x1), atol=1e-5)
        assert torch.allclose(SparseConv1d(conv1, kernel)(x1[0]), conv1(x1[0]), atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda k: SparseLinear(nn.Linear(4, 4), k),
    lambda k: SparseConv2d(nn.Conv2d(2, 2, 3), k),
    lambda k: SparseConv1d(nn.Conv1d(2, 2, 3), k),
])
def test_an_unknown_kernel_is_refused_in_one_line(make) -> None:
    with pytest.raises(ValueError, match=r"kernel must be one of \('mm', 'embedding_bag'\), got 'gather'"):
        make("gather")


def test_the_faster_kernel_is_kept_per_layer_and_reported() -> None:
    net, x = _mlp(), torch.randn(4, 64)
    tie = lambda m, x: 1.0 if isinstance(m, SPARSE) else 9.0  # noqa: E731
    for timer, expected in ((bag_wins, "embedding_bag"), (mm_wins, "mm"), (tie, "mm")):
        fast = to_inference(net, example_input=x, timer=timer)
        assert [fast[i].kernel for i in (0, 2, 4)] == [expected] * 3  # a tie: MKL's, the first
        report = inference_report(fast)
        assert [c.kernel for c in report.layers] == [expected] * 3
        assert all(f"({expected} kernel)" in c.reason for c in report.layers)
        assert report.recipe()["kernels"] == {"0": expected, "2": expected, "4": expected}
        with torch.inference_mode():
            assert torch.allclose(fast(x), net(x), atol=1e-5)
    dense = to_inference(net, example_input=x, timer=lambda m, x: 9.0 if isinstance(m, SPARSE) else 1.0)
    assert all(c.kernel is None and c.format == "dense" for c in inference_report(dense).layers)


def test_scripted_traced_and_compiled_with_the_embedding_bag_kernel() -> None:
    torch.manual_seed(0)
    net = _pruned(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)), 0.9)
    x = torch.randn(2, 1, 8, 8)
    fast = to_inference(net, example_input=x, timer=bag_wins)
    assert fast[0].kernel == fast[3].kernel == "embedding_bag"
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(torch.jit.script(fast)(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.trace(fast, x)(x), expected, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_with_the_embedding_bag_kernel() -> None:
    fast = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=bag_wins)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(fast)(x), fast(x), atol=1e-5)


def test_the_recipe_replays_each_layers_kernel(tmp_path) -> None:
    net, x = _mlp(), torch.randn(4, 64)

    def mixed(module: nn.Module, x: torch.Tensor) -> float:  # the first layer prefers MKL, the others the bags
        if isinstance(module, SparseLinear):
            return 1.0 if (module.kernel == "mm") == (module.in_features == 64) else 2.0
        return 10.0

    fast = to_inference(net, example_input=x, timer=mixed)
    path = tmp_path / "net.lcps"
    save_inference(net, fast, str(path))
    loaded = load_inference(_mlp(seed=1), str(path), example_input=x)
    assert [loaded[i].kernel for i in (0, 2, 4)] == ["mm", "embedding_bag", "embedding_bag"]
    assert [c.kernel for c in inference_report(loaded).layers] == ["mm", "embedding_bag", "embedding_bag"]
    with torch.inference_mode():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)

    class Wrapper(nn.Module):  # a LightningModule-like parent: prefix="net." strips the kernels' names too
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapped = Wrapper(net)
    save_inference(wrapped, to_inference(wrapped, example_input=x, timer=mixed), str(path))
    bare = load_inference(_mlp(seed=2), str(path), example_input=x, prefix="net.")
    assert [bare[i].kernel for i in (0, 2, 4)] == ["mm", "embedding_bag", "embedding_bag"]


def _write_recipe(path, net: nn.Module, recipe: dict) -> None:
    save_sparse(net, path, metadata={_RECIPE_KEY: recipe})


def test_a_recipe_from_before_the_kernels_replays_with_mkls(tmp_path) -> None:
    net, path = _mlp(), tmp_path / "old.lcps"
    _write_recipe(path, net, {"device": "cpu", "batch_size": 4, "compact": False, "csr": ["0", "2"]})
    loaded = load_inference(_mlp(seed=1), str(path), example_input=torch.randn(2, 64))
    assert [loaded[0].kernel, loaded[2].kernel] == ["mm", "mm"] and type(loaded[4]) is not SparseLinear


@pytest.mark.parametrize("kernels", [{"0": "os.system"}, ["mm"], {"0": 3}])
def test_a_recipe_with_unknown_kernels_is_refused_in_one_line(tmp_path, kernels) -> None:
    net, path = _mlp(), tmp_path / "bad.lcps"
    _write_recipe(path, net, {"device": "cpu", "batch_size": 4, "compact": False, "csr": ["0"], "kernels": kernels})
    with pytest.raises(ValueError, match="kernels are malformed"):
        load_inference(_mlp(seed=1), str(path), example_input=torch.randn(2, 64))
    assert json.dumps(kernels)  # the file held plain JSON: nothing of it was run


def test_a_converted_model_can_be_deep_copied_and_converted_again() -> None:
    # torch's deepcopy of a CSR tensor raises ("Cannot access storage of SparseCsrTensorImpl"); users copy models
    torch.manual_seed(0)
    net = _pruned(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)), 0.9)
    x = torch.randn(2, 1, 8, 8)
    for timer in (bag_wins, mm_wins):
        fast = to_inference(net, example_input=x, timer=timer)
        copied = copy.deepcopy(fast)
        assert copied[0].weight is not fast[0].weight and copied[0].kernel == fast[0].kernel
        assert copied[0].weight.crow_indices().dtype == torch.int32
        with torch.inference_mode():
            assert torch.allclose(copied(x), fast(x)) and torch.allclose(copied(x), net(x), atol=1e-5)
        again = to_inference(fast, example_input=x, timer=timer)  # deep-copies its input first
        assert inference_report(again).layers == [] or all(c.format == "dense" for c in inference_report(again).layers)
        with torch.inference_mode():
            assert torch.allclose(again(x), net(x), atol=1e-5)
    conv1 = SparseConv1d(_pruned(nn.Conv1d(3, 8, 5), 0.7), "embedding_bag")
    x1 = torch.randn(2, 3, 17)
    assert torch.allclose(copy.deepcopy(conv1)(x1), conv1(x1))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Embedding(50, 8), nn.LayerNorm(8)),
    lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU()),  # depthwise: not a candidate
])
def test_a_model_without_candidate_layers_comes_back_unchanged(make) -> None:
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randint(0, 50, (3, 5)) if isinstance(net[0], nn.Embedding) else torch.randn(2, 4, 8, 8)
    fast = to_inference(net, example_input=x, timer=bag_wins)
    assert inference_report(fast).layers == []
    with torch.inference_mode():
        assert torch.equal(fast(x), net(x))


def test_a_kernel_far_slower_than_dense_in_a_first_round_is_not_timed_further() -> None:
    calls: list[str] = []

    def bag_far_slower(module: nn.Module, x: torch.Tensor) -> float:  # dense 2 s, MKL's 1 s, bags 9 s
        calls.append(getattr(module, "kernel", "dense"))
        return {"dense": 2.0, "mm": 1.0, "embedding_bag": 9.0}[calls[-1]]

    fast = to_inference(_mlp(), example_input=torch.randn(4, 64), timer=bag_far_slower, rounds=3)
    assert [c.kernel for c in inference_report(fast).layers] == ["mm"] * 3
    # three layers: the bags once each (the screening round), MKL's in the screening round and three more
    assert calls.count("embedding_bag") == 3 and calls.count("mm") == 3 * (1 + 3)

    calls.clear()
    dense = to_inference(_mlp(), example_input=torch.randn(4, 64), rounds=3,
                         timer=lambda m, x: calls.append("x") or (5.0 if isinstance(m, SPARSE) else 1.0))
    assert all(c.format == "dense" and c.sparse_s == 5.0 for c in inference_report(dense).layers)
    assert len(calls) == 3 * (1 + len(KERNELS))  # one screening round per layer, nothing more
