"""Models pruned with ``torch.nn.utils.prune`` (and Lightning's ``ModelPruning`` before it makes the pruning
permanent), what users bring from those tools: ``to_inference`` converts them without touching them, and the
sparse export stores the pruned weights, not ``weight_orig`` beside a mask (issue #24)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.prune as tp
from torch import nn

from lightning_clipprune.export import (
    SparseLinear,
    inference_report,
    load_inference,
    load_sparse,
    load_sparse_into,
    save_inference,
    save_sparse,
    to_inference,
)
from lightning_clipprune.export.__main__ import main as export_main
from lightning_clipprune.export._reparam import fold_pruning_masks, inference_copy
from lightning_clipprune.export.latency import measure_inference

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _torch_pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    tp.global_unstructured([(net[0], "weight"), (net[2], "weight")], pruning_method=tp.L1Unstructured, amount=0.9)
    return net


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def sparse_wins(module: nn.Module, x: torch.Tensor) -> float:
    return 1.0 if isinstance(module, SparseLinear) else 10.0


def test_to_inference_converts_a_torch_pruned_model_and_leaves_it_as_it_was() -> None:
    net, x = _torch_pruned(), torch.randn(8, 64)
    keys = sorted(net.state_dict())
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    assert inference_report(fast).sparse_names() == ["0", "2"]
    assert sum(round(c.sparsity * 100) for c in inference_report(fast).layers) > 150  # global 90 %: both sparse
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    assert sorted(net.state_dict()) == keys and "weight_orig" in dict(net[0].named_parameters())
    assert net[0]._forward_pre_hooks  # still torch's reparametrisation: it trains on
    net(x).sum().backward()
    assert net[0].weight_orig.grad is not None


def test_inference_copy_makes_torch_pruning_permanent_in_the_copy_only() -> None:
    net = _torch_pruned()
    copy_ = inference_copy(net)
    assert sorted(copy_.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert not copy_[0]._forward_pre_hooks and net[0]._forward_pre_hooks
    assert torch.equal(copy_[0].weight, net[0].weight.detach()) and not copy_.training


def test_old_weight_norm_models_can_be_converted() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        net = nn.Sequential(nn.utils.weight_norm(nn.Linear(16, 8)), nn.ReLU()).eval()
    x = torch.randn(4, 16)
    fast = to_inference(net, example_input=x, timer=sparse_wins)  # dense weights: nothing converted
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-6)


def test_the_sparse_export_stores_the_pruned_weight_not_orig_and_mask(tmp_path) -> None:
    net = _torch_pruned()
    path = tmp_path / "net.lcps"
    size = save_sparse(net, path)
    stored = load_sparse(path)
    assert sorted(stored) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(stored["0.weight"], net[0].weight.detach())
    assert size < sum(t.numel() * 4 for t in stored.values()) // 3  # the zeros are not stored
    plain = _plain()
    load_sparse_into(plain, path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), net(x))
    fast = to_inference(net, example_input=x, timer=sparse_wins)
    save_inference(net, fast, str(tmp_path / "inf.lcps"))
    loaded = load_inference(_plain(), str(tmp_path / "inf.lcps"), example_input=x)
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[2], SparseLinear)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_export_cli_folds_a_model_pruning_checkpoint(tmp_path, capsys) -> None:
    net = _torch_pruned()
    ckpt, out = tmp_path / "mp.ckpt", tmp_path / "mp.lcps"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    assert export_main([str(ckpt), str(out), "--inference-batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    zeros = 1.0 - float(net[0].weight.count_nonzero()) / net[0].weight.numel()
    assert f"inference    net.0: {zeros:.1%} zeros" in printed and "inference    net.2: " in printed
    assert sorted(load_sparse(out)) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]


@pytest.mark.parametrize(
    "state",
    [
        {"w_orig": torch.ones(2), "w_mask": torch.tensor([0.5, 1.0])},  # not a 0/1 mask
        {"w_orig": torch.ones(2), "w_mask": torch.ones(3)},  # another shape
        {"w_orig": torch.ones(2), "w_mask": torch.ones(2), "w": torch.ones(2)},  # the name is taken
        {"w_orig": torch.ones(2)},  # no mask
    ],
)
def test_only_torch_prune_pairs_are_folded(state: dict) -> None:
    assert list(fold_pruning_masks(state)) == list(state)


def test_the_latency_line_of_a_torch_pruned_model() -> None:
    result = measure_inference(_torch_pruned(), torch.randn(1, 64), batch_size=32, rounds=1)
    assert result["dense_ms"] > 0 and result["inference_ms"] > 0
