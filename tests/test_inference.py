"""Sparse CPU inference (issue #24): CSR layers equal the dense ones, the timing rule picks per layer, round trips.

The timing is injected (``timer=``) wherever a test asserts a choice, so no assertion depends on the machine's speed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_clipprune
from lightning_clipprune.export import (
    FeatureMajorLinear,
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    inference_report,
    load_inference,
    save_inference,
    save_sparse,
    to_inference,
)
from lightning_clipprune.export.sparse_linear import KERNELS, _numpy_copy_pays, _transposed_copy, to_csr

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _prune_(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _prune_(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                                 nn.Linear(32, 10)), 0.9, seed)


def sparse_wins(module: nn.Module, x: torch.Tensor) -> float:
    """An injected timer: every CSR layer takes 1 s, every dense one 10 s."""
    return 1.0 if isinstance(module, (SparseLinear, SparseConv1d, SparseConv2d)) else 10.0


def dense_wins(module: nn.Module, x: torch.Tensor) -> float:
    return 10.0 if isinstance(module, (SparseLinear, SparseConv1d, SparseConv2d)) else 1.0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (1, 24)])
def test_sparse_linear_equals_dense(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    lin = _prune_(nn.Linear(24, 12, bias=bias), 0.8)
    x = torch.randn(*shape)
    sparse = SparseLinear(lin)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), lin(x), atol=1e-6)
        # A transposed view (what a CSR layer hands the next one) gives the same values.
        assert torch.allclose(sparse(x.reshape(-1, 24).t().contiguous().t()), lin(x.reshape(-1, 24)), atol=1e-6)
    assert sparse.weight.layout == torch.sparse_csr
    assert sparse.weight.values().numel() == int(torch.count_nonzero(lin.weight))


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: torch.randn(6, 24, dtype=torch.float64), id="float64"),
        pytest.param(lambda: torch.randn(24, 6).t(), id="non-contiguous"),
        pytest.param(lambda: torch.randn(40)[4:28].reshape(1, 24), id="storage-offset"),
        pytest.param(lambda: torch.randn(6, 24, requires_grad=True), id="requires-grad"),
    ],
)
def test_sparse_linear_inputs_numpy_cannot_lay_out(make_input) -> None:
    # Eager float32 inputs are laid out by numpy; every other input takes torch's copy, with the same values
    # and, for an input that requires grad, a gradient.
    torch.manual_seed(0)
    lin = _prune_(nn.Linear(24, 12), 0.8)
    x = make_input()
    sparse = SparseLinear(lin.to(x.dtype))
    if x.dtype == torch.float64:
        sparse.weight = sparse.weight.to(torch.float64)
    out = sparse(x)
    assert torch.allclose(out, lin(x), atol=1e-6)
    if x.requires_grad:
        out.sum().backward()
        assert torch.allclose(x.grad, lin.weight.detach().sum(0).expand_as(x), atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_feature_major_linear_equals_linear_in_both_layouts(bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 12, bias=bias)
    layer = FeatureMajorLinear(lin)
    assert layer.weight is lin.weight and set(layer.state_dict()) == set(lin.state_dict())
    rows = torch.randn(24, 5)
    with torch.inference_mode():
        out = layer(rows.t())  # the (features, batch) layout a CSR layer hands on
        assert torch.allclose(out, lin(rows.t()), atol=1e-6)
        assert out.t().is_contiguous()  # handed on in the same layout
        for x in (torch.randn(5, 24), torch.randn(2, 3, 24), torch.randn(1, 24)):  # every other input: nn.Linear
            assert torch.allclose(layer(x), lin(x), atol=1e-6) and layer(x).is_contiguous()
        scripted = torch.jit.script(layer)
        assert torch.allclose(scripted(rows.t()), out, atol=1e-6)


def test_a_dense_linear_after_a_csr_one_keeps_its_layout() -> None:
    net = _mlp()
    x = torch.randn(4, 64)
    fast = to_inference(net, example_input=x, timer=middle_layer_slow)
    assert type(fast[1]) is SparseLinear and type(fast[3]) is FeatureMajorLinear and type(fast[5]) is SparseLinear
    assert "layout" in {c.name: c for c in inference_report(fast).layers}["3"].reason
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    # nothing sparse before it: a dense layer stays a plain nn.Linear
    assert all(type(m) is nn.Linear for m in to_inference(net, example_input=x, timer=dense_wins).modules()
               if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    ("rows", "cols", "numpy"),
    [(256, 784, True), (64, 300, True), (300, 784, True), (256, 1000, True), (256, 1024, False), (256, 768, False),
     (512, 784, False), (4096, 784, False)],
)
def test_numpy_lays_out_only_the_inputs_where_it_was_measured_faster(rows: int, cols: int, numpy: bool) -> None:
    # numpy's transposing copy is 1.5-6x slower than torch's for widths that are multiples of 128 floats
    # (cache-set conflicts), batches that are multiples of 512, and inputs beyond 2**18 floats
    assert _numpy_copy_pays(rows, cols) is numpy
    x = torch.randn(rows, cols)
    assert torch.equal(_transposed_copy(x), x.t())  # the slabs cover every row


def test_to_csr_holds_int32_indices_on_the_cpu() -> None:
    csr = to_csr(_prune_(nn.Linear(16, 8), 0.7).weight)
    assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int32


@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"), [(1, 0, 1, True), (2, 1, 1, False), (1, 2, 2, True)])
def test_sparse_conv2d_equals_dense(stride: int, padding: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = _prune_(nn.Conv2d(3, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias), 0.7)
    x = torch.randn(2, 3, 11, 9)
    with torch.inference_mode():
        assert torch.allclose(SparseConv2d(conv)(x), conv(x), atol=1e-5)


def test_sparse_conv2d_refuses_groups() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))


def _conv1d_net(sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv1d(2, 8, 5), nn.ReLU(), nn.Conv1d(8, 4, 3, padding=1, bias=False))
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.weight.mul_(torch.rand(m.weight.shape) >= sparsity)
    return net.eval()


@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"), [(1, 0, 1, True), (2, 1, 1, False), (1, 2, 2, True)])
def test_sparse_conv1d_equals_dense(stride: int, padding: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) >= 0.7)
    x = torch.randn(2, 3, 17)
    with torch.inference_mode():
        assert torch.allclose(SparseConv1d(conv)(x), conv(x), atol=1e-5)
        assert torch.allclose(SparseConv1d(conv)(x[0]), conv(x[0]), atol=1e-5)  # unbatched, as Conv1d takes
    with pytest.raises(ValueError, match="SparseConv1d: only groups=1"):
        SparseConv1d(nn.Conv1d(4, 4, 3, groups=2))


def test_conv1d_through_unfolded_inputs_scripted_and_stored(tmp_path) -> None:
    net, x = _conv1d_net(), torch.randn(3, 2, 20)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    assert isinstance(fast[0], SparseConv1d) and isinstance(fast[2], SparseConv1d)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(fast(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.script(fast)(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.trace(fast, x)(x), expected, atol=1e-5)
    path = tmp_path / "net.lcps"
    save_inference(net, fast, str(path))
    loaded = load_inference(_conv1d_net(seed=1), str(path), example_input=x)
    assert isinstance(loaded[0], SparseConv1d)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_to_inference_converts_where_csr_is_faster_and_outputs_match() -> None:
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 8, 8)
    fast = lightning_clipprune.to_inference(net, example_input=x, batch_size=16, timer=sparse_wins)
    assert [type(m) for m in fast.modules()].count(SparseLinear) == 3
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model given is untouched
    assert not any(isinstance(m, SparseLinear) for m in net.modules())
    report = inference_report(fast)
    assert report.batch_size == 16 and report.sparse_names() == ["1", "3", "5"]
    assert all(c.dense_s == 10.0 and c.sparse_s == 1.0 for c in report.layers)


def test_selection_leaves_a_layer_dense_when_told_csr_is_slower() -> None:
    net = _mlp()
    fast = to_inference(net, example_input=torch.randn(2, 64), batch_size=8, timer=dense_wins)
    assert not any(isinstance(m, SparseLinear) for m in fast.modules())
    assert {c.format for c in inference_report(fast).layers} == {"dense"}
    assert all("not faster" in c.reason for c in inference_report(fast).layers)


def middle_layer_slow(module: nn.Module, x: torch.Tensor) -> float:
    """An injected timer: CSR wins everywhere except on the 48-input layer, where it is twice as slow."""
    if isinstance(module, SparseLinear):
        return 20.0 if module.in_features == 48 else 1.0
    return 10.0


def test_selection_is_per_layer() -> None:
    fast = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=middle_layer_slow)
    assert [c.format for c in inference_report(fast).layers] == ["csr", "dense", "csr"]
    assert isinstance(fast[3], nn.Linear) and isinstance(fast[1], SparseLinear)


def test_layers_below_min_sparsity_stay_dense_untimed() -> None:
    timed: list[type] = []

    def recording(module: nn.Module, x: torch.Tensor) -> float:
        timed.append(type(module))
        return sparse_wins(module, x)

    net = _mlp()
    torch.nn.init.normal_(net[3].weight)  # dense again
    fast = to_inference(net, example_input=torch.randn(2, 64), timer=recording, rounds=2)
    choice = {c.name: c for c in inference_report(fast).layers}["3"]
    assert choice.format == "dense" and choice.dense_s is None and "min_sparsity" in choice.reason
    layer_calls = [t for t in timed if t is not nn.Sequential]
    # two layers timed, a screening round and two rounds, dense and each kernel
    assert len(layer_calls) == 2 * (1 + 2) * (1 + len(KERNELS))
    assert timed.count(nn.Sequential) == 2 * 2  # then the end-to-end guard: two rounds, both arms


def test_conv_through_unfolded_inputs_when_faster() -> None:
    torch.manual_seed(0)
    net = _prune_(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                                nn.Linear(4 * 6 * 6, 10)), 0.9)
    x = torch.randn(3, 1, 8, 8)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    assert isinstance(fast[0], SparseConv2d) and isinstance(fast[2], SparseConv2d)
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_round_trip_through_lcps_replays_the_recipe(tmp_path) -> None:
    net = _mlp()
    x = torch.randn(4, 64)
    fast = to_inference(net, example_input=x, batch_size=32, timer=middle_layer_slow)
    path = tmp_path / "net.lcps"
    save_inference(net, fast, str(path))
    fresh = _mlp(seed=1)  # other weights: everything must come from the file
    loaded = load_inference(fresh, str(path), example_input=x)
    report = inference_report(loaded)
    assert report.sparse_names() == ["1", "5"] and report.batch_size == 32
    assert type(loaded[3]) is FeatureMajorLinear  # the dense layer fed by a CSR one, as in `fast`
    with torch.inference_mode():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_lcps_without_a_recipe_is_decided_at_load(tmp_path) -> None:
    net = _mlp()
    path = tmp_path / "plain.lcps"
    save_sparse(net, path)
    loaded = load_inference(_mlp(seed=3), str(path), example_input=torch.randn(2, 64), batch_size=8, timer=sparse_wins)
    assert inference_report(loaded).sparse_names() == ["1", "3", "5"]


def test_a_recipe_naming_another_models_layer_is_refused(tmp_path) -> None:
    net = _mlp()
    fast = to_inference(net, example_input=torch.randn(2, 64), timer=sparse_wins)
    inference_report(fast).layers[0].name = "encoder.9"
    path = tmp_path / "other.lcps"
    save_inference(net, fast, str(path))
    with pytest.raises(ValueError, match=r"'encoder.9', which is not a module of Sequential"):
        load_inference(_mlp(), str(path), example_input=torch.randn(2, 64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "tpu"}, "`device` must be 'cpu' or 'cuda'"),
        ({"batch_size": 0}, "`batch_size` must be a positive int"),
        ({"compact": "yes"}, "`compact` must be True, False or 'auto'"),
        ({"min_sparsity": 1.5}, "`min_sparsity` must be in"),
        ({"margin": 0.5}, "`margin` must be >= 1"),
        ({"example_input": [1, 2]}, "`example_input` must be a batch tensor"),
        ({"progress": "yes"}, "`progress` must be True or False"),
    ],
)
def test_bad_arguments_are_one_line(kwargs: dict, match: str) -> None:
    args = {"example_input": torch.randn(2, 64), **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        to_inference(_mlp(), **args)
    assert "\n" not in str(err.value)


def test_progress_bar_changes_nothing_but_the_console() -> None:
    quiet = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=middle_layer_slow)
    shown = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=middle_layer_slow, progress=True)
    assert inference_report(shown).sparse_names() == inference_report(quiet).sparse_names() == ["1", "5"]


def test_report_of_a_plain_model_is_refused() -> None:
    with pytest.raises(ValueError, match="not made by to_inference"):
        inference_report(nn.Linear(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available; use device='cpu'"):
        to_inference(_mlp(), example_input=torch.randn(2, 64), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compute capability >= 8.0)")
def test_cuda_picks_semi_structured_for_two_four_layers() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0")
    lin = nn.Linear(128, 128).half()
    with torch.no_grad():
        lin.weight.view(-1, 4)[:, :2] = 0
    net = nn.Sequential(lin)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    fast = to_inference(net, example_input=x, device="cuda")
    assert inference_report(fast).sparse_names() == ["0"]
    with torch.inference_mode():
        assert torch.allclose(fast(x), net.cuda()(x), atol=1e-2)


def test_torchscript_script_and_trace() -> None:
    torch.manual_seed(0)
    net = _prune_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)), 0.9)
    x = torch.randn(2, 1, 8, 8)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(torch.jit.script(fast)(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.trace(fast, x)(x), expected, atol=1e-5)


def test_traced_linear_chain_follows_new_inputs() -> None:
    # Eager CSR layers lay their input out with numpy; a trace must record torch's copy instead, or the
    # example input would be frozen into the graph as a constant.
    torch.manual_seed(0)
    net = _prune_(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), 0.9)
    x, other = torch.randn(4, 32), torch.randn(4, 32)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    assert len(inference_report(fast).sparse_names()) == 2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fast, x)
        assert torch.allclose(traced(other), net(other), atol=1e-5)
        assert torch.allclose(fast(other), net(other), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("timer", [sparse_wins, middle_layer_slow], ids=["all CSR", "CSR, dense in their layout, CSR"])
def test_torch_compile_with_graph_breaks(timer) -> None:
    fast = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=timer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(fast)(x), fast(x), atol=1e-5)
        assert torch.allclose(torch.jit.trace(fast, torch.randn(8, 64))(x), fast(x), atol=1e-5)
        assert torch.allclose(torch.jit.script(fast)(x), fast(x), atol=1e-5)


class _ReadsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = _prune_(nn.Linear(8, 8), 0.9)
        self.head = _prune_(nn.Linear(8, 2), 0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) + self.fc.weight.view(-1)[:8])  # a dense-only read outside fc's forward


def test_a_layer_whose_weight_is_read_outside_its_forward_stays_dense() -> None:
    torch.manual_seed(0)
    net = _ReadsItsWeight()
    x = torch.randn(4, 8)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    formats = {c.name: (c.format, c.reason) for c in inference_report(fast).layers}
    assert formats["fc"] == ("dense", "the model's forward fails with a CSR weight there")
    assert formats["head"][0] == "csr"
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_transformer_block_keeps_fused_layers_dense_and_matches() -> None:
    from lightning.pytorch.demos import Transformer

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.t(tokens, tokens)

    torch.manual_seed(0)
    net = _prune_(Block(), 0.9).eval()
    x = torch.randint(0, 50, (3, 7))
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    names = inference_report(fast).sparse_names()
    assert "t.decoder" in names and "t.transformer.decoder.layers.0.linear1" in names
    assert not any(".encoder." in n or "self_attn" in n for n in names)  # fused fast path / attention: dense
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_csr_layers_that_make_the_whole_model_slower_go_back_to_dense() -> None:
    def whole_model_slower(module: nn.Module, x: torch.Tensor) -> float:
        if isinstance(module, nn.Sequential):  # end to end: the CSR model loses
            return 50.0 if any(isinstance(m, SparseLinear) for m in module.modules()) else 10.0
        return sparse_wins(module, x)

    fast = to_inference(_mlp(), example_input=torch.randn(2, 64), timer=whole_model_slower)
    assert not any(isinstance(m, SparseLinear) for m in fast.modules())
    assert all(c.format == "dense" and c.reason.startswith("end to end 0.20x") for c in inference_report(fast).layers)


def test_only_the_csr_layers_that_make_the_whole_model_faster_are_kept() -> None:
    # Each layer alone is faster in CSR, but the first one's (features, batch) output slows what follows it (a
    # LayerNorm, in the case measured): all CSR is slower than dense; layer by layer, the two others are kept.
    def first_layer_slows_the_model(module: nn.Module, x: torch.Tensor) -> float:
        if isinstance(module, nn.Sequential):
            csr = [m for m in module.modules() if isinstance(m, SparseLinear)]
            return 10.0 + sum(30.0 if m.in_features == 64 else -3.0 for m in csr)
        return sparse_wins(module, x)

    net, x = _mlp(), torch.randn(2, 64)
    fast = to_inference(net, example_input=x, timer=first_layer_slows_the_model)
    report = inference_report(fast)
    assert report.sparse_names() == ["3", "5"]
    first = next(c for c in report.layers if c.name == "1")
    assert first.reason.startswith("end to end 0.25x with CSR there (all CSR: 0.29x)")
    assert type(fast[1]) is nn.Linear and type(fast[3]) is SparseLinear and type(fast[5]) is SparseLinear
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_stay_dense_on_the_cpu(dtype: torch.dtype, tmp_path) -> None:
    # torch has no CPU CSR product in half precision: even when told CSR is faster the layers stay dense, the
    # report says why, and a float32 model's recipe replayed on a half-precision one keeps them dense too.
    net = _mlp().to(dtype)
    x = torch.randn(4, 64).to(dtype)
    fast = to_inference(net, example_input=x, batch_size=32, timer=sparse_wins)
    report = inference_report(fast)
    assert report.sparse_names() == []
    assert all("float32/float64 only" in c.reason and str(dtype) in c.reason for c in report.layers)
    with torch.inference_mode():
        assert torch.equal(fast(x), net(x))
    path = tmp_path / "net.lcps"  # the half-precision weights with a float32 model's recipe (all CSR)
    save_inference(net, to_inference(_mlp(), example_input=x.float(), batch_size=32, timer=sparse_wins), str(path))
    loaded = load_inference(_mlp(seed=1).to(dtype), str(path), example_input=x)
    assert inference_report(loaded).sparse_names() == []
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2), as ``transformers.pytorch_utils`` writes it: ``x @ W + b``, ``W`` is ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class _DictOut(nn.Module):
    """Two HF-style ``Conv1D`` layers and a dict output, as a Hugging Face model returns its ``ModelOutput``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.proj = Conv1D(48, 32), Conv1D(32, 48)
        with torch.no_grad():
            for layer in (self.fc, self.proj):
                layer.weight.mul_(torch.rand(layer.weight.shape) >= 0.9)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.fc(x))
        return {"logits": self.proj(hidden), "hidden": hidden}


def test_hugging_face_conv1d_layers_and_dict_outputs_are_converted(tmp_path) -> None:
    # GPT-2's layers are Conv1D, not Linear, and Hugging Face models return a dict-like ModelOutput: both were
    # left dense before (a dict output read as "outputs differ"). The outputs must match tensor by tensor.
    net, x = _DictOut().eval(), torch.randn(2, 5, 32)
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    report = inference_report(fast)
    assert report.sparse_names() == ["fc", "proj"] and {c.kind for c in report.layers} == {"Conv1D"}
    assert isinstance(fast.fc, SparseLinear) and fast.fc.in_features == 32 and fast.fc.out_features == 48
    with torch.inference_mode():
        got, ref = fast(x), net(x)
    assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
    path = tmp_path / "net.lcps"
    save_inference(net, fast, str(path))
    loaded = load_inference(_DictOut(), str(path), example_input=x)
    assert inference_report(loaded).sparse_names() == ["fc", "proj"]
    with torch.inference_mode():
        assert torch.allclose(loaded(x)["logits"], ref["logits"], atol=1e-5)


def test_gpt2_layers_compute_in_csr() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    net = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for module in net.transformer.h.modules():
            if type(module).__name__ == "Conv1D":
                module.weight.mul_(torch.rand(module.weight.shape) >= 0.9)
    tokens = torch.randint(0, 64, (2, 8))
    fast = to_inference(net, example_input=tokens, timer=sparse_wins)
    names = inference_report(fast).sparse_names()
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"} <= set(names)
    with torch.inference_mode():
        assert torch.allclose(fast(tokens).logits, net(tokens).logits, atol=1e-4)
