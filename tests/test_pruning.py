"""Pure pruning core on hand-built tensors: counts, scopes, patterns, ties, thresholds, torch parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lightning_clipprune.pruning import (
    apply_masks_,
    compute_masks,
    importance,
    keep_mask_by_count,
    kth_smallest,
    mask_optimizer_state_,
    nm_candidates,
    parse_pattern,
    select_prunable_parameters,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(8, 12, generator=g),
        "b": torch.randn(4, 8, 3, 3, generator=g) * 0.1,  # smaller scale: global pruning hits it harder
        "c": torch.randn(3, 16, generator=g) * 3.0,
    }


def test_global_mask_prunes_exact_count_below_one_threshold() -> None:
    w = _weights()
    masks = compute_masks(w, sparsity=0.6)
    n = sum(t.numel() for t in w.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.6 * n)
    largest_pruned = max(float(t[~m].abs().max()) for t, m in zip(w.values(), masks.values(), strict=True) if (~m).any())
    smallest_kept = min(float(t[m].abs().min()) for t, m in zip(w.values(), masks.values(), strict=True) if m.any())
    assert largest_pruned < smallest_kept
    # global: the small-scale layer is pruned harder than the large-scale one
    assert (~masks["b"]).float().mean() > (~masks["c"]).float().mean()
    assert {k: m.shape for k, m in masks.items()} == {k: t.shape for k, t in w.items()}


def test_local_mask_prunes_each_tensor_to_the_same_sparsity() -> None:
    w = _weights()
    masks = compute_masks(w, sparsity=0.6, scope="local")
    for name, t in w.items():
        m = masks[name]
        assert int((~m).sum()) == round(0.6 * t.numel())
        assert float(t[~m].abs().max()) < float(t[m].abs().min())


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_global_masks_equal_torch_global_unstructured_l1(amount: float) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 20), nn.Linear(20, 5))
    ref = copy.deepcopy(net)
    params = select_prunable_parameters(net)
    ours = compute_masks({n: p.detach() for n, p in params.items()}, sparsity=amount)
    layers = [(ref[0], "weight"), (ref[3], "weight"), (ref[4], "weight")]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for name, (module, _) in zip(params, layers, strict=True):
        assert torch.equal(ours[name], module.weight_mask.bool()), name


def test_ties_are_broken_by_flat_index() -> None:
    scores = torch.tensor([5.0, 1.0, 1.0, 0.5, 1.0, 1.0, 7.0])
    keep = keep_mask_by_count(scores, 3)  # 0.5 plus the two first 1.0s
    assert keep.tolist() == [True, False, False, False, True, True, True]
    # all equal: the lowest indices go first, across tensors in dict order for global scope
    w = {"x": torch.ones(2, 3), "y": torch.ones(4)}
    masks = compute_masks(w, sparsity=0.5)
    assert masks["x"].flatten().tolist() == [False] * 5 + [True]
    assert masks["y"].tolist() == [True] * 4
    again = compute_masks(w, sparsity=0.5)
    assert all(torch.equal(masks[k], again[k]) for k in w)


@pytest.mark.parametrize("case", ["normal", "ties", "sentinels", "sorted", "constant"])
def test_kth_smallest_matches_kthvalue_on_the_sampling_path(case: str) -> None:
    g = torch.Generator().manual_seed(7)
    n = 5000
    x = torch.randn(n, generator=g).abs()
    if case == "ties":
        x = (x * 4).round() / 4  # a handful of distinct values
    elif case == "sentinels":
        x[torch.randperm(n, generator=g)[: n // 2]] = -1.0  # half already pruned
    elif case == "sorted":
        x = x.sort().values  # structured layout
    elif case == "constant":
        x = torch.full((n,), 0.5)
    for k in (1, 2, 17, n // 10, n // 2 - 1, n // 2, n // 2 + 1, n - 300, n - 1, n):
        assert kth_smallest(x, k, sample_size=64) == x.kthvalue(k).values, k


def test_keep_mask_by_count_sampling_path_equals_direct() -> None:
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(300_000, generator=g).abs() * 64).round()  # many ties
    for n_prune in (1000, 150_000, 299_000):
        keep = keep_mask_by_count(x, n_prune)
        assert int((~keep).sum()) == n_prune
        cut = x[~keep].max()
        assert (x[keep] >= cut).all()
        tied_pruned = (~keep & (x == cut)).nonzero().squeeze(1)
        tied_kept = (keep & (x == cut)).nonzero().squeeze(1)
        if tied_kept.numel() and tied_pruned.numel():
            assert tied_pruned.max() < tied_kept.min()  # ties pruned by flat index first
        assert kth_smallest(x, n_prune, sample_size=1024) == x.kthvalue(n_prune).values


def test_keep_mask_by_count_edges() -> None:
    s = torch.rand(10)
    assert keep_mask_by_count(s, 0).all()
    assert not keep_mask_by_count(s, 10).any()
    assert not keep_mask_by_count(s, 99).any()


def test_masks_only_grow_even_when_pruned_weights_would_win_back() -> None:
    w = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}
    first = compute_masks(w, sparsity=1 / 3)
    assert first["a"].tolist() == [False, False, True, True, True, True]
    # the pruned weights "regrow" large (e.g. a criterion that would rank them high): they stay pruned
    w2 = {"a": torch.tensor([9.0, 9.0, 0.3, 0.05, 0.5, 0.6])}
    second = compute_masks(w2, sparsity=0.5, masks=first)
    assert second["a"].tolist() == [False, False, True, False, True, True]
    lower = compute_masks(w2, sparsity=0.0, masks=first)
    assert torch.equal(lower["a"], first["a"])


def test_threshold_mode() -> None:
    w = {"a": torch.tensor([[-0.02, 0.01, 0.5], [0.011, -1.0, 0.0]])}
    masks = compute_masks(w, threshold=0.011)
    assert masks["a"].tolist() == [[True, False, True], [False, True, False]]
    assert compute_masks(w, threshold=0.0)["a"].sum() == 5
    prev = {"a": torch.tensor([[False, True, True], [True, True, True]])}
    assert not compute_masks(w, threshold=0.0, masks=prev)["a"][0, 0]
    with pytest.raises(ValueError, match="threshold.*unstructured"):
        compute_masks(w, threshold=0.1, pattern="2:4")


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_nm_masks_are_valid(pattern: str, scope: str) -> None:
    n, m = (int(x) for x in pattern.split(":"))
    g = torch.Generator().manual_seed(3)
    w = {"lin": torch.randn(6, 16, generator=g), "conv": torch.randn(4, 8, 3, 3, generator=g)}
    masks = compute_masks(w, sparsity=1 - n / m, pattern=pattern, scope=scope)
    for name, mask in masks.items():
        groups = mask.movedim(1, -1).reshape(-1, m)
        assert (groups.sum(1) == n).all(), name  # at most N (here exactly N) non-zeros per group
        # the kept ones are the N largest of their group
        scores = w[name].abs().movedim(1, -1).reshape(-1, m)
        kept_min = torch.where(groups, scores, torch.inf).min(1).values
        pruned_max = torch.where(~groups, scores, -torch.inf).max(1).values
        assert (pruned_max <= kept_min).all()


def test_nm_gradual_stays_valid_and_reaches_pattern() -> None:
    g = torch.Generator().manual_seed(4)
    w = {"lin": torch.randn(8, 16, generator=g)}
    half = compute_masks(w, sparsity=0.25, pattern="2:4")
    assert int((~half["lin"]).sum()) == 32
    assert (half["lin"].reshape(-1, 4).sum(1) >= 2).all()
    full = compute_masks(w, sparsity=0.5, pattern="2:4", masks=half)
    assert (full["lin"].reshape(-1, 4).sum(1) == 2).all()
    assert not (full["lin"] & ~half["lin"]).any()  # grew only


def test_nm_candidates_conv_groups_run_along_input_channels() -> None:
    s = torch.arange(2 * 4 * 1 * 1, dtype=torch.float).reshape(2, 4, 1, 1)
    cand = nm_candidates(s, 2, 4)
    assert cand[:, :2].all() and not cand[:, 2:].any()
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_candidates(torch.rand(3, 6), 2, 4)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_channel_masks_prune_whole_rows_by_l2_norm(scope: str) -> None:
    g = torch.Generator().manual_seed(5)
    w = {"lin": torch.randn(10, 6, generator=g), "conv": torch.randn(8, 3, 2, 2, generator=g)}
    w["lin"][[2, 7]] *= 0.01
    masks = compute_masks(w, sparsity=0.3, pattern="channel", scope=scope)
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all(), name  # each row fully kept or fully pruned
    lin_rows = masks["lin"].all(1)
    assert not lin_rows[2] and not lin_rows[7]
    if scope == "local":
        assert int((~lin_rows).sum()) == 3
        assert int((~masks["conv"].reshape(8, -1).all(1)).sum()) == round(0.3 * 8)
        norms = w["lin"].norm(dim=1)
        assert norms[~lin_rows].max() < norms[lin_rows].min()
    else:
        n = sum(t.numel() for t in w.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned <= round(0.3 * n) < pruned + 12  # within one row of the widest layer


def test_taylor_importance_uses_gradient() -> None:
    w = {"a": torch.tensor([1.0, 1.0, 0.1, 0.1])}
    g = {"a": torch.tensor([0.0, 1.0, 10.0, 0.0])}
    masks = compute_masks(w, sparsity=0.5, criterion="taylor", grad_avgs=g)
    assert masks["a"].tolist() == [False, True, True, False]
    assert torch.equal(importance(w["a"]), w["a"].abs())
    with pytest.raises(ValueError, match="grad_avg"):
        importance(w["a"], "taylor")


def test_bad_arguments() -> None:
    w = {"a": torch.rand(4)}
    with pytest.raises(ValueError, match="exactly one"):
        compute_masks(w)
    with pytest.raises(ValueError, match="scope.*'layer'"):
        compute_masks(w, sparsity=0.5, scope="layer")
    with pytest.raises(ValueError, match="criterion.*'hessian'"):
        compute_masks(w, sparsity=0.5, criterion="hessian")
    for bad in ("4:2", "2:2", "x:4", "block"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


def test_apply_masks_and_optimizer_state() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(4, 4)
    opt.step()
    mask = torch.rand(4, 4) > 0.5
    apply_masks_([p], [mask])
    mask_optimizer_state_(opt, [p], [mask])
    assert (p[~mask] == 0).all() and (p[mask] != 0).all()
    st = opt.state[p]
    assert (st["exp_avg"][~mask] == 0).all() and (st["exp_avg_sq"][~mask] == 0).all()
    assert (st["exp_avg"][mask] != 0).all()
    assert float(st["step"]) == 1.0
    p.grad = torch.randn(4, 4)
    apply_masks_([p.grad], [mask])
    opt.step()
    assert (p[~mask] == 0).all()
