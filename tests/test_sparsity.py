"""Pure sparsity accounting: counts, tied weights, the compressed-size formula, the report and its table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.prune as tprune
from rich.console import Console
from torch import nn

from lightning_clipprune.pruning import select_prunable_parameters
from lightning_clipprune.sparsity import (
    compressed_size_bytes,
    encoded_sizes,
    has_negative_zero,
    nonzero_counts,
    parameter_counts,
    prunable_names,
    sparsity_metrics,
    sparsity_report,
    split_parameters,
    unique_parameters,
)


def _net_with_zeros() -> tuple[nn.Module, int, int]:
    """Linear(10, 20) -> Linear(20, 5) with 50 and 30 zeros planted in the weights, no zero elsewhere."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # strictly positive: the only zeros are the planted ones
        net[0].weight.view(-1)[:50] = 0.0
        net[2].weight.view(-1)[::4] = 0.0  # 25 zeros
    return net, 50, 25


class Tied(nn.Module):
    """An embedding tied to the output layer, and one Linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.shared = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.emb.weight
        self.blocks = nn.ModuleList([self.shared, self.shared])


def test_parameter_counts_known_zeros():
    net, z0, z2 = _net_with_zeros()
    total = 10 * 20 + 20 + 20 * 5 + 5
    assert parameter_counts(net) == (total, total - z0 - z2)
    assert parameter_counts(net, ["0.weight"]) == (200, 200 - z0)
    assert parameter_counts(net, []) == (0, 0)


def test_each_tensor_counted_once():
    m = Tied()
    with torch.no_grad():
        m.emb.weight.fill_(1.0)
        m.shared.weight.fill_(1.0)
        m.shared.weight[0].zero_()
    # emb/head share 42 values, shared/blocks.0/blocks.1 share 36: 78 in all.
    assert parameter_counts(m) == (78, 72)
    assert list(unique_parameters(m)) == ["emb.weight", "shared.weight"]
    # Names reaching an already-listed tensor are dropped, whatever name comes first.
    assert list(unique_parameters(m, ["head.weight", "emb.weight", "blocks.1.weight"])) == ["head.weight",
                                                                                          "blocks.1.weight"]
    assert parameter_counts(m, ["head.weight", "emb.weight"]) == (42, 42)
    # The default prunable set: the Linear used twice, once; the head tied to the embedding is left dense
    # (issue 25: it would prune the embedding), unless include_tied.
    assert prunable_names(m) == ["shared.weight"]
    selected, rest = split_parameters(m, prunable_names(m))
    assert sum(p.numel() for p in selected.values()) == 36 and list(rest) == ["emb.weight"]
    assert list(select_prunable_parameters(m, include_tied=True)) == ["shared.weight", "head.weight"]


def test_unknown_name_is_a_key_error():
    net, _, _ = _net_with_zeros()
    with pytest.raises(KeyError, match="nope.weight"):
        unique_parameters(net, ["0.weight", "nope.weight"])


def test_encoded_sizes_formula_with_ints_and_tensors():
    numel, nonzero, itemsize = 1001, 97, 2
    dense, bitmask = encoded_sizes(numel, nonzero, itemsize, False)
    assert dense == 2002
    assert bitmask == math.ceil(1001 / 8) + 97 * 2
    _, with_signs = encoded_sizes(numel, nonzero, itemsize, True)
    assert with_signs == bitmask + math.ceil((1001 - 97) / 8)
    t = encoded_sizes(torch.tensor([numel]), torch.tensor([nonzero]), itemsize, torch.tensor([1]))
    assert (int(t[0]), int(t[1])) == (dense, with_signs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compressed_size_bytes(dtype):
    w = torch.zeros(1000, dtype=dtype)
    w[:100] = 1.5
    assert compressed_size_bytes(w) == 125 + 100 * w.element_size()
    dense = torch.ones(1000, dtype=dtype)
    assert compressed_size_bytes(dense) == 1000 * w.element_size()  # bitmask would be larger: stored dense
    w_neg = w.clone()
    w_neg[500:] = -0.0
    assert has_negative_zero(w_neg) and not has_negative_zero(w)
    assert compressed_size_bytes(w_neg) == 125 + 100 * w.element_size() + math.ceil(900 / 8)
    assert compressed_size_bytes(torch.zeros(0)) == 0


def test_nonzero_counts_is_a_device_tensor():
    counts = nonzero_counts([torch.tensor([0.0, 1.0, -0.0]), torch.ones(2, 2)])
    assert counts.dtype == torch.int64 and counts.tolist() == [1, 4]
    with pytest.raises(ValueError, match="tensors"):
        nonzero_counts([])


def test_sparsity_report_rows_totals_and_sizes():
    net, z0, z2 = _net_with_zeros()
    report = sparsity_report(net, ["0.weight", "2.weight"])
    assert [r.name for r in report.rows] == ["0.weight", "2.weight"]
    assert [r.shape for r in report.rows] == [(20, 10), (5, 20)]
    assert [r.nonzero for r in report.rows] == [200 - z0, 100 - z2]
    assert report.rows[0].sparsity == pytest.approx(z0 / 200)
    assert report.sparsity == pytest.approx((z0 + z2) / 300)
    assert report.other is not None and report.other.numel == 25 and report.other.nonzero == 25
    assert report.total_numel == 325 and report.total_nonzero == 325 - z0 - z2
    assert report.dense_bytes == 325 * 4
    expected = sum(compressed_size_bytes(p) for p in net.parameters())
    assert report.compressed_bytes == expected < report.dense_bytes
    full = sparsity_report(net)
    assert full.other is None and len(full.rows) == 4 and full.sparsity == pytest.approx((z0 + z2) / 325)


def test_table_renders_rows_and_totals():
    net, _, _ = _net_with_zeros()
    console = Console(record=True, width=140)
    console.print(sparsity_report(net, ["0.weight", "2.weight"], title="My table").to_table())
    text = console.export_text()
    assert "My table" in text
    for needle in ("0.weight", "20x10", "150", "75", "25.00%", "Total", "325", "250", "other parameters", "KiB"):
        assert needle in text, needle


def test_metrics_match_the_report():
    net, z0, z2 = _net_with_zeros()
    selected, rest = split_parameters(net, ["0.weight", "2.weight"])
    metrics = sparsity_metrics({**selected, **rest}, list(selected), per_layer=True)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    report = sparsity_report(net, ["0.weight", "2.weight"])
    assert metrics["sparsity/global"].item() == pytest.approx(report.sparsity)
    assert metrics["sparsity/0.weight"].item() == pytest.approx(z0 / 200)
    assert metrics["sparsity/2.weight"].item() == pytest.approx(z2 / 100)
    assert int(metrics["params/total"]) == report.total_numel
    assert int(metrics["params/nonzero"]) == report.total_nonzero
    assert int(metrics["size/dense_bytes"]) == report.dense_bytes
    assert int(metrics["size/compressed_bytes"]) == report.compressed_bytes
    no_layers = sparsity_metrics({**selected, **rest}, list(selected))
    assert not any(k.startswith("sparsity/0") for k in no_layers)
    assert sparsity_metrics({**selected, **rest}, [])["sparsity/global"].item() == 0.0


def test_metrics_need_no_host_sync():
    """On the meta device every data-dependent host read fails, so this passes only without a sync."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).half()
    metrics = sparsity_metrics(dict(net.named_parameters()), ["0.weight", "1.weight"], per_layer=True)
    assert metrics and all(v.device.type == "meta" for v in metrics.values())


def test_torch_prune_reparametrisation_is_seen_through():
    net, _, _ = _net_with_zeros()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    tprune.l1_unstructured(net[0], "weight", amount=0.3)  # weight_orig (dense) + weight_mask
    assert "0.weight" in prunable_names(net) and "0.weight_orig" not in unique_parameters(net)
    report = sparsity_report(net, prunable_names(net))
    assert report.rows[0].name == "0.weight" and report.rows[0].nonzero == 140


def test_dense_model_reports_zero_sparsity():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.25)
    report = sparsity_report(net, prunable_names(net))
    assert report.sparsity == 0.0 and [r.name for r in report.rows] == ["0.weight", "2.weight"]
    assert report.compressed_bytes == report.dense_bytes
