"""Post-training tools on models as users bring them: already sparse, frozen, pruned by ``torch.nn.utils.prune``,
out of reach of the allocation, or fed an input they refuse. Tiny networks on random data, CPU, seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from lightning_clipprune import reconstruct_prune, to_inference
from lightning_clipprune.export.sparse_linear import SparseConv2d
from lightning_clipprune.posttrain import ReconstructionOptions
from lightning_clipprune.search import layer_sensitivity, search_reconstruction, search_threshold


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=g) for _ in range(4)]


def _val() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))]


def _zeros(model: nn.Module) -> tuple[int, int]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


@pytest.mark.parametrize("options", [{}, {"reference": "layer"}, {"update_bias": False}])
def test_sparsity_zero_leaves_the_model_unchanged(options):
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, report = reconstruct_prune(net, _calibration(), 0.0, num_samples=256, progress=False, **options)
    assert report.pruned == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # the refit used to shrink every kept weight by its damping


def test_the_refit_of_a_row_with_nothing_pruned_is_its_target_exactly():
    from lightning_clipprune.posttrain.obs import refit_rows_

    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 6)
    keep = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    w = target * keep
    refit_rows_(w, target, 2 * x.T @ x / 128, keep, damp=0.01)
    assert torch.equal(w[0], target[0])
    assert bool((w[1, ~keep[1]] == 0).all()) and not torch.equal(w[1, keep[1]], target[1, keep[1]])


@pytest.mark.parametrize("options", [{}, {"reference": "layer", "refit": False, "update_bias": False}])
def test_the_report_counts_the_zeros_the_model_already_had(options):
    net = _mlp()
    with torch.no_grad():
        net[0].weight[:, :24] = 0  # 75 % of the first layer is zero before the call
    _, report = reconstruct_prune(net, _calibration(), 0.3, num_samples=256, progress=False, **options)
    zeros, total = _zeros(net)
    assert report.pruned == zeros and report.total == total
    assert report.sparsity == pytest.approx(zeros / total) and report.sparsity > 0.5
    for layer in report.layers:
        w = net.get_parameter(layer.name)
        assert layer.pruned == int((w == 0).sum()), layer.name


def test_the_magnitude_fallback_reports_the_zeros_it_leaves():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    net = Net()
    with torch.no_grad():
        net.attn.in_proj_weight[:40] = 0
    with pytest.warns(UserWarning, match="cannot reconstruct"):
        _, report = reconstruct_prune(net, [torch.randn(8, 5, 16)], 0.3, num_samples=8, progress=False)
    by_name = {layer.name: layer for layer in report.layers}
    w = net.attn.in_proj_weight
    assert by_name["attn.in_proj_weight"].pruned == int((w == 0).sum()) >= 40 * 16


def test_a_sparsity_the_allocation_cannot_reach_is_refused_in_its_words():
    net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    with pytest.raises(ValueError, match="allocation='global_magnitude'") as info:
        reconstruct_prune(net, _calibration(), 0.99, num_samples=256, progress=False)
    assert "max_layer_sparsity" not in str(info.value)  # not an argument of reconstruct_prune
    assert "at most 0.9738 of these weights" in str(info.value)  # (3968 + 1267) / 5376: rows and 1 % kept
    reconstruct_prune(net, _calibration(), 0.99, num_samples=256, progress=False, allocation="er")  # the way out


def test_the_reconstruction_search_caps_grid_points_out_of_reach():
    net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    options = ReconstructionOptions(num_samples=256, progress=False)
    with pytest.warns(UserWarning, match=r"0\.99 searched at 0\.9738"):
        result = search_reconstruction(net, _val(), _calibration(), grid=(0.5, 0.99), tolerance=100.0, options=options)
    assert result.chosen.sparsity < 0.99  # the cap, within this tolerance, not an error
    assert max(p.sparsity for p in result.points) == pytest.approx(result.chosen.sparsity)


def test_a_frozen_model_is_pruned_and_searched_as_a_whole():
    net = _mlp().requires_grad_(False)
    _, report = reconstruct_prune(net, _calibration(), 0.5, num_samples=256, progress=False)
    assert {layer.name for layer in report.layers} == {"0.weight", "2.weight"}
    assert search_threshold(_mlp().requires_grad_(False), _val()).names == ["0.weight", "2.weight"]
    assert list(layer_sensitivity(_mlp().requires_grad_(False), _val(), sparsities=(0.5,)).accuracy) == [
        "0.weight",
        "2.weight",
    ]


def test_a_model_without_prunable_weights_is_refused_by_every_search():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten())
    val = [(torch.randint(0, 10, (8, 1)), torch.randint(0, 4, (8,)))]
    for search in (search_threshold, layer_sensitivity):
        with pytest.raises(ValueError, match="no prunable weight"):
            search(net, val)


def test_a_model_pruned_by_torch_prune_is_refused_with_the_fix():
    net = _mlp()
    tprune.l1_unstructured(net[0], "weight", amount=0.5)
    for call in (
        lambda: reconstruct_prune(net, _calibration(), 0.5, progress=False),
        lambda: search_threshold(net, _val()),
    ):
        with pytest.raises(ValueError, match=r"0\.weight is reparametrised by torch\.nn\.utils\.prune.*prune\.remove"):
            call()
    tprune.remove(net[0], "weight")  # the fix the message gives
    _, report = reconstruct_prune(net, _calibration(), 0.6, num_samples=256, progress=False)
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)


def test_an_allocation_dict_with_an_unknown_key_is_named_as_allocation():
    with pytest.raises(ValueError, match=r"`allocation` keys \['nope\.weight'\]"):
        reconstruct_prune(_mlp(), _calibration(), 0.5, allocation={"nope.weight": 0.7}, progress=False)


def test_sparse_conv2d_takes_an_unbatched_input_as_conv2d_does():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 8, 8)
    torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_to_inference_names_an_example_input_the_model_refuses():
    with pytest.raises(ValueError, match=r"does not run on `example_input` of shape \(1, 31\).*example_input=x\[:1\]"):
        to_inference(_mlp().eval(), example_input=torch.randn(1, 31), batch_size=8)


def _pruned_already(fraction: float = 0.9) -> nn.Sequential:
    net = _mlp()
    weights = [net[0].weight, net[2].weight]
    cut = torch.cat([w.detach().abs().flatten() for w in weights]).kthvalue(int(fraction * 2688)).values
    with torch.no_grad():
        for w in weights:
            w[w.abs() <= cut] = 0
    return net


def test_a_search_on_a_model_pruned_already_starts_at_its_sparsity():
    net = _pruned_already()
    zeros, total = _zeros(net)
    result = search_threshold(net, _val(), grid=(0.5, 0.95), tolerance=100.0, apply=True)
    start = result.sorted_points()[0]
    assert start.sparsity == pytest.approx(zeros / total) and start.stage == "dense"
    assert sorted(round(p.sparsity, 2) for p in result.points if p.stage != "bisect") == [0.9, 0.95]  # 0.5: not below
    assert _zeros(net)[0] == round(result.chosen.sparsity * total)  # the weights hold what the point says


def test_the_reconstruction_search_on_a_model_pruned_already_starts_from_it_as_given():
    from lightning_clipprune.search import evaluate

    net = _pruned_already()
    as_given = evaluate(net, _val())[0]
    options = ReconstructionOptions(num_samples=256, progress=False, allocation="er")
    result = search_reconstruction(net, _val(), _calibration(), grid=(0.5, 0.95), tolerance=100.0, options=options)
    start = result.sorted_points()[0]
    assert start.sparsity == pytest.approx(0.9, abs=1e-3) and start.val_acc == as_given
    assert all(p.sparsity >= start.sparsity for p in result.points)


def test_no_threshold_command_for_a_point_with_threshold_zero():
    from lightning_clipprune.search import SearchPoint, SearchResult

    point = SearchPoint(0.9, 0.0, 0.9, 0.3, "dense", True)
    result = SearchResult([point], point, 0.9, 0.5, "magnitude", ["0.weight"])
    assert result.overrides() == ["prune.sparsity=0.9000 prune.threshold=null"]
