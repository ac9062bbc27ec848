"""Pure pruning core on hand-built tensors: counts, scopes, patterns, ties, thresholds, torch parity."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lightning_clipprune import MagnitudePruneCallback, pruning
from lightning_clipprune.pruning import (
    DEFAULT_RANKING,
    PATTERNS,
    Layout,
    apply_masks_,
    check_pattern_fits,
    erk_counts,
    importance,
    keep_mask_by_count,
    kth_smallest,
    layer_cap,
    mask_optimizer_state_,
    matrix_shape,
    nm_candidates,
    output_rows,
    parse_pattern,
    resolve_layer_sparsity,
    saturated_layers,
    select_prunable_parameters,
    weight_layouts,
)

# Most tests below pin one global ranking with no ceiling ("raw", None: one threshold over every tensor,
# torch's global_unstructured); a test that means another ranking or ceiling names it, which overrides these.
compute_masks = functools.partial(pruning.compute_masks, ranking="raw", max_layer_sparsity=None)


def test_compute_masks_and_the_callback_share_one_set_of_defaults() -> None:
    masks_defaults = inspect.signature(pruning.compute_masks).parameters
    callback_defaults = inspect.signature(MagnitudePruneCallback).parameters
    for name in ("ranking", "max_layer_sparsity", "scope", "pattern", "criterion"):
        assert masks_defaults[name].default == callback_defaults[name].default, name
    assert masks_defaults["ranking"].default == DEFAULT_RANKING == "er"
    w = {"wide": torch.randn(64, 64), "narrow": torch.randn(4, 64)}
    default = pruning.compute_masks(w, sparsity=0.9)
    spelled = pruning.compute_masks(w, sparsity=0.9, ranking="er", max_layer_sparsity=None)  # "auto" under budgets
    assert all(torch.equal(default[n], spelled[n]) for n in w)
    assert not torch.equal(default["narrow"], compute_masks(w, sparsity=0.9)["narrow"])  # raw ranks differently


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


# ---------------------------------------------------------------------------------------------------------
# Per-layer ceiling under global ranking, scale-aware ranking, per-layer sparsity, layouts
# ---------------------------------------------------------------------------------------------------------


def _collapsing_weights() -> dict[str, torch.Tensor]:
    """One layer (``small``) at 1/100 of the others' scale: plain global ranking prunes it entirely."""
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(20, 10, generator=g),
        "small": torch.randn(6, 5, generator=g) * 0.01,
        "other": torch.randn(8, 10, generator=g),
    }


def _pruned(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: m.numel() - int(m.count_nonzero()) for n, m in masks.items()}


def test_global_ranking_without_ceiling_collapses_a_small_scale_layer() -> None:
    w = _collapsing_weights()
    masks = compute_masks(w, sparsity=0.5)
    assert not masks["small"].any()  # the failure the ceiling exists for
    assert saturated_layers(masks, None) == {"small": 1.0}


def test_ceiling_keeps_every_layer_and_one_weight_per_row_with_the_exact_count() -> None:
    w = _collapsing_weights()
    n = sum(t.numel() for t in w.values())
    plain = compute_masks(w, sparsity=0.5)
    capped = compute_masks(w, sparsity=0.5, max_layer_sparsity=0.9)
    assert sum(_pruned(capped).values()) == sum(_pruned(plain).values()) == round(0.5 * n)
    # small (6 rows of 5): cap = min(floor(0.9 * 30), 30 - 6) = 24, reached exactly
    assert layer_cap((6, 5), 0.9) == 24
    assert _pruned(capped)["small"] == 24
    assert capped["small"].any(dim=1).all()  # one weight per output row
    kept = w["small"].abs().max(dim=1).values
    assert torch.equal(w["small"].abs()[capped["small"]], kept)  # the kept one is each row's largest
    # the 6 entries small keeps are taken from the other layers: they are pruned more than without ceiling
    assert _pruned(capped)["big"] + _pruned(capped)["other"] == _pruned(plain)["big"] + _pruned(plain)["other"] + 6
    # and below one threshold there: every pruned entry of big/other is smaller than every kept one
    rest = {k: w[k] for k in ("big", "other")}
    largest_pruned = max(float(t[~capped[k]].abs().max()) for k, t in rest.items())
    smallest_kept = min(float(t[capped[k]].abs().min()) for k, t in rest.items())
    assert largest_pruned < smallest_kept
    assert saturated_layers(capped, 0.9) == {"small": 0.8}


def test_ceiling_fraction_binds_on_a_wide_layer() -> None:
    g = torch.Generator().manual_seed(8)
    w = {"wide": torch.randn(2, 200, generator=g) * 0.001, "rest": torch.randn(40, 40, generator=g)}
    capped = compute_masks(w, sparsity=0.3, max_layer_sparsity=0.75)
    assert _pruned(capped)["wide"] == 300  # floor(0.75 * 400), below 400 - 2 rows
    assert sum(_pruned(capped).values()) == round(0.3 * 2000)


def test_ceiling_is_deterministic_and_masks_only_grow() -> None:
    w = _collapsing_weights()
    first = compute_masks(w, sparsity=0.3, max_layer_sparsity=0.9)
    again = compute_masks(w, sparsity=0.3, max_layer_sparsity=0.9)
    assert all(torch.equal(first[k], again[k]) for k in w)
    second = compute_masks(w, sparsity=0.6, max_layer_sparsity=0.9, masks=first)
    assert all(not (second[k] & ~first[k]).any() for k in w)
    assert sum(_pruned(second).values()) == round(0.6 * sum(t.numel() for t in w.values()))
    assert second["small"].any(dim=1).all()
    # ties: all-equal weights, the ceiling binds on the first tensor and the lowest indices go first
    eq = {"x": torch.ones(2, 4), "y": torch.ones(2, 4)}
    masks = compute_masks(eq, sparsity=0.5, max_layer_sparsity=0.5)
    # x: each row's first entry is protected, 4 of the other 6 pruned by index; y takes the remaining 4
    assert masks["x"].flatten().tolist() == [True, False, False, False, True, False, True, True]
    assert masks["y"].flatten().tolist() == [True, False, False, False, True, False, True, True]


def test_ceiling_that_cannot_be_met_raises() -> None:
    w = {"a": torch.rand(4, 2), "b": torch.rand(4, 2)}  # at most 4 of 8 prunable in each (one per row kept)
    with pytest.raises(ValueError, match="cannot be met.*max_layer_sparsity=None"):
        compute_masks(w, sparsity=0.6, max_layer_sparsity=0.99)
    assert sum(_pruned(compute_masks(w, sparsity=0.5, max_layer_sparsity=0.99)).values()) == 8


def test_channel_pattern_ceiling_keeps_a_row_of_every_layer() -> None:
    g = torch.Generator().manual_seed(9)
    w = {"small": torch.randn(4, 6, generator=g) * 0.01, "big": torch.randn(10, 6, generator=g)}
    plain = compute_masks(w, sparsity=0.3, pattern="channel")
    assert not plain["small"].any()
    capped = compute_masks(w, sparsity=0.3, pattern="channel", max_layer_sparsity=0.99)
    rows = capped["small"].all(dim=1)
    assert int(rows.sum()) == 1 and capped["small"].any(dim=1).sum() == 1
    assert sum(_pruned(capped).values()) <= round(0.3 * 84)


def test_layer_normalized_ranking_prunes_layers_of_different_scale_alike() -> None:
    w = _collapsing_weights()
    masks = compute_masks(w, sparsity=0.5, ranking="layer_normalized")
    n = sum(t.numel() for t in w.values())
    assert sum(_pruned(masks).values()) == round(0.5 * n)
    for name, t in w.items():
        assert 0.3 < _pruned(masks)[name] / t.numel() < 0.7, name
    # scale-free: multiplying one layer by 1000 changes nothing
    scaled = dict(w, small=w["small"] * 1000)
    again = compute_masks(scaled, sparsity=0.5, ranking="layer_normalized")
    assert all(torch.equal(masks[k], again[k]) for k in w)


def test_erk_ranking_gives_narrow_layers_more_density_with_the_exact_count() -> None:
    g = torch.Generator().manual_seed(10)
    w = {"wide": torch.randn(100, 100, generator=g), "narrow": torch.randn(20, 100, generator=g), "tiny": torch.randn(4, 4, generator=g)}
    masks = compute_masks(w, sparsity=0.7, ranking="erk")
    pruned = _pruned(masks)
    assert sum(pruned.values()) == round(0.7 * 12016)
    assert pruned["tiny"] == 0  # ERK density above 1: dense
    assert pruned["wide"] / 10000 > pruned["narrow"] / 2000  # (in + out) / (in * out) is smaller for wide
    for name, t in w.items():  # within a layer, the lowest magnitudes go
        if 0 < pruned[name] < t.numel():
            assert float(t[~masks[name]].abs().max()) < float(t[masks[name]].abs().min())
    assert erk_counts({"wide": (100, 100), "narrow": (20, 100)}, 8800) == {"wide": 8000, "narrow": 800}
    # ceiling and masks-only-grow hold: a capped ERK share is redistributed, the count stays exact
    capped = erk_counts({"a": (10, 10), "b": (10, 1000)}, 9000, caps={"a": 50, "b": 9990})
    assert capped["a"] <= 50 and sum(capped.values()) == 9000
    second = compute_masks(w, sparsity=0.9, ranking="erk", masks=masks, max_layer_sparsity=0.99)
    assert all(not (second[k] & ~masks[k]).any() for k in w)
    assert sum(_pruned(second).values()) == round(0.9 * 12016)


def test_er_budgets_equal_erk_for_linear_layers_and_count_a_kernel_in_the_fan_in() -> None:
    g = torch.Generator().manual_seed(4)
    linear = {"a": torch.randn(300, 784, generator=g), "b": torch.randn(100, 300, generator=g), "c": torch.randn(10, 100, generator=g)}
    er, erk = compute_masks(linear, sparsity=0.98, ranking="er"), compute_masks(linear, sparsity=0.98, ranking="erk")
    assert all(torch.equal(er[k], erk[k]) for k in linear)  # 2-D weights: the same budgets
    conv = {"conv": torch.randn(16, 6, 5, 5, generator=g), "fc": torch.randn(120, 256, generator=g)}
    er, erk = compute_masks(conv, sparsity=0.9, ranking="er"), compute_masks(conv, sparsity=0.9, ranking="erk")
    assert sum(_pruned(er).values()) == sum(_pruned(erk).values()) == round(0.9 * (2400 + 30720))
    # ERK's kernel term prunes this small convolution about as hard as the wide linear layer (89 % / 90 %);
    # ER counts the kernel in the fan-in and keeps it far denser (58 %)
    assert _pruned(erk)["conv"] / 2400 > 0.85 and _pruned(er)["conv"] / 2400 < 0.6
    assert matrix_shape((16, 6, 5, 5)) == (16, 150)
    assert matrix_shape((6, 16, 5, 5), Layout(transposed=True, groups=1)) == (16, 150)
    assert matrix_shape((4, 2, 3), Layout(transposed=True, groups=2)) == (4, 6)


@pytest.mark.parametrize("ranking", ["erk", "er", "layer_normalized"])
def test_nm_pattern_holds_in_every_layer_whatever_the_ranking(ranking: str) -> None:
    # ERK's per-layer counts once left the narrow layer dense and took 52 % of the wide one: no 2:4 at all
    g = torch.Generator().manual_seed(3)
    w = {"wide": torch.randn(64, 256, generator=g), "narrow": torch.randn(10, 64, generator=g)}
    masks = compute_masks(w, sparsity=0.5, pattern="2:4", ranking=ranking)
    for name, m in masks.items():
        assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all(), name
    raw = compute_masks(w, sparsity=0.5, pattern="2:4", ranking="raw")
    assert all(torch.equal(masks[k], raw[k]) for k in w)  # in each group the 2 smallest go, whatever the ranking


def test_layer_sparsity_mapping_in_local_scope() -> None:
    w = {"enc.0.weight": torch.rand(10, 10), "enc.1.weight": torch.rand(10, 10), "head.weight": torch.rand(4, 10)}
    masks = compute_masks(w, sparsity=0.0, scope="local", layer_sparsity={"enc.*": 0.5, "enc.1.weight": 0.9})
    assert _pruned(masks) == {"enc.0.weight": 50, "enc.1.weight": 90, "head.weight": 0}
    assert resolve_layer_sparsity(w, {"head.*": 0.25}, 0.1) == {"enc.0.weight": 0.1, "enc.1.weight": 0.1, "head.weight": 0.25}
    with pytest.raises(ValueError, match=r"keys \['dec\.\*'\] match no prunable parameter"):
        compute_masks(w, sparsity=0.5, scope="local", layer_sparsity={"dec.*": 0.5})
    with pytest.raises(ValueError, match=r"layer_sparsity=...\)` must be None unless scope='local'"):
        compute_masks(w, sparsity=0.5, layer_sparsity={"enc.*": 0.5})
    with pytest.raises(ValueError, match=r"layer_sparsity\['enc.\*'\]=...\)` must be a finite number in \[0, 1\), got 1.5"):
        compute_masks(w, sparsity=0.5, scope="local", layer_sparsity={"enc.*": 1.5})


def test_new_arguments_are_checked_with_the_shared_messages() -> None:
    w = {"a": torch.rand(4)}
    with pytest.raises(ValueError, match=r"`compute_masks\(ranking=...\)` must be one of 'raw', 'layer_normalized', 'erk'"):
        compute_masks(w, sparsity=0.5, ranking="snip")
    with pytest.raises(ValueError, match=r"`compute_masks\(max_layer_sparsity=...\)` must be 'auto', a number in \(0, 1\] or None, got 0.0"):
        compute_masks(w, sparsity=0.5, max_layer_sparsity=0.0)
    with pytest.raises(ValueError, match=r"`compute_masks\(sparsity=...\)` must be a finite number in \[0, 1\] or None"):
        compute_masks(w, sparsity=1.5)
    with pytest.raises(ValueError, match=r"`MagnitudePruneCallback\(pattern=...\)`"):
        parse_pattern("2:2", owner="MagnitudePruneCallback")
    assert PATTERNS == ("unstructured", "nm", "channel")  # what parse_pattern returns
    assert {parse_pattern(p)[0] for p in ("unstructured", "channel", "2:4")} == set(PATTERNS)


def test_default_selection_takes_attention_projections_and_convtranspose_not_embeddings_or_rnns() -> None:
    net = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 8),
            "attn": nn.MultiheadAttention(8, 2),
            "sep": nn.MultiheadAttention(8, 2, kdim=4, vdim=6),
            "up": nn.ConvTranspose2d(8, 4, 3),
            "dw": nn.Conv2d(8, 8, 3, groups=8),
            "lstm": nn.LSTM(8, 8),
            "gru": nn.GRU(8, 8),
            "norm": nn.LayerNorm(8),
        }
    )
    assert list(select_prunable_parameters(net)) == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "sep.q_proj_weight",
        "sep.k_proj_weight",
        "sep.v_proj_weight",
        "sep.out_proj.weight",
        "up.weight",
        "dw.weight",
    ]
    with_bias = select_prunable_parameters(net, prune_bias=True)
    assert "attn.in_proj_bias" in with_bias and "attn.out_proj.bias" in with_bias
    assert "emb.weight" in select_prunable_parameters(net, include=["*weight*"], exclude=["norm.*", "lstm.*", "gru.*"])
    assert weight_layouts(net) == {"up.weight": Layout(transposed=True, groups=1)}


def test_nm_runs_along_the_input_dim_of_in_proj_and_convtranspose() -> None:
    mha = nn.MultiheadAttention(8, 2)
    w = {"in_proj_weight": mha.in_proj_weight.detach()}
    assert w["in_proj_weight"].shape == (24, 8)  # (3E, E): the input dim is 1
    masks = compute_masks(w, sparsity=0.5, pattern="2:4")
    assert (masks["in_proj_weight"].reshape(24, 2, 4).sum(-1) == 2).all()
    # ConvTranspose2d(8 in, 3 out, groups=2): weight (8, 3, 2, 2); groups of 4 along dim 0, inside a conv group
    ct = torch.randn(8, 3, 2, 2)
    layout = {"ct": Layout(transposed=True, groups=2)}
    masks = compute_masks({"ct": ct}, sparsity=0.5, pattern="2:4", layouts=layout)
    assert (masks["ct"].reshape(2, 4, 3, 2, 2).sum(1) == 2).all()
    with pytest.raises(ValueError, match=r"multiple of 4: `ct` \(6, 4, 2, 2\): 3 input channels per group.*exclude=\['ct'\]"):
        compute_masks({"ct": torch.randn(6, 4, 2, 2)}, sparsity=0.5, pattern="2:4", layouts=layout)
    with pytest.raises(ValueError, match=r"1 input channels per group \(a one-channel input, or a depthwise.*exclude=\['dw'\]"):
        check_pattern_fits({"dw": torch.randn(8, 1, 3, 3)}, "2:4")


def test_output_rows_of_a_grouped_convtranspose_are_its_output_channels() -> None:
    conv = nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False)  # weight (4 in, 3 out per group, 2, 2)
    layout = Layout(transposed=True, groups=2)
    assert output_rows(conv.weight.detach(), layout).shape == (6, 2 * 2 * 2)
    with torch.no_grad():
        conv.weight[0:2, 1] *= 0.01  # output channel 1 = group 0, column 1
        conv.weight[2:4, 2] *= 0.01  # output channel 5 = group 1, column 2
    masks = compute_masks(
        {"w": conv.weight.detach()}, sparsity=2 / 6, pattern="channel", scope="local", layouts={"w": layout}
    )
    with torch.no_grad():
        conv.weight.mul_(masks["w"])
    out = conv(torch.randn(1, 4, 3, 3))
    silent = out.abs().flatten(2).amax(-1)[0] == 0
    assert silent.tolist() == [False, True, False, False, False, True]  # exactly output channels 1 and 5
    assert int((~masks["w"]).sum()) == 2 * 2 * 2 * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_ranked_like_their_float32_values(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(16, 8, generator=g).to(dtype), "b": torch.randn(4, 16, generator=g).to(dtype)}
    masks = compute_masks(w, sparsity=0.5)
    expected = compute_masks({k: v.float() for k, v in w.items()}, sparsity=0.5)
    assert all(torch.equal(masks[k], expected[k]) for k in w)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * (128 + 64))


class _InOut(nn.Module):
    """A layer whose weight is stored (in, out), as Hugging Face's Conv1D."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_user_layout_is_one_registration() -> None:
    from lightning_clipprune.pruning import layout_of, register_layout

    net = nn.Sequential(nn.Linear(4, 6), _InOut(6, 5))
    assert list(select_prunable_parameters(net)) == ["0.weight"]  # unknown type: not selected, standard layout
    assert layout_of(net[1]) == Layout()
    register_layout(_InOut, Layout(transposed=True), prunable=True)
    assert list(select_prunable_parameters(net)) == ["0.weight", "1.weight"]
    layouts = weight_layouts(net)
    assert layouts == {"1.weight": Layout(transposed=True, groups=1)}
    w = {"1.weight": net[1].weight.detach()}
    masks = compute_masks(w, sparsity=0.4, pattern="channel", scope="local", layouts=layouts)["1.weight"]
    assert masks.all(dim=0).sum() == 3 and (~masks).all(dim=0).sum() == 2  # whole output columns go
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layout(int, Layout())


def test_frozen_parameters_are_not_selected_unless_asked() -> None:
    from lightning_clipprune.pruning import frozen_names

    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    net[0].weight.requires_grad_(False)
    assert list(select_prunable_parameters(net)) == ["1.weight"]
    assert list(select_prunable_parameters(net, include_frozen=True)) == ["0.weight", "1.weight"]
    assert frozen_names(net) == ["0.weight"]
