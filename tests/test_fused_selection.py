"""The one-pass magnitude selection (``pruning._host.magnitude_keep``) gives the flat-score path's masks, bit for bit.

Each test compares :func:`compute_masks` (which takes the one-pass path for Magnitude on float32 CPU weights with
bool masks: "global" under "er"/"erk" budgets with no ceiling, and "local") with the flat scores of the whole
model ranked by ``capped_global`` / ``keep_mask_by_count`` and ANDed with the old masks, as before the change.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_clipprune.pruning import _host, compute_masks
from lightning_clipprune.pruning import ranking as ranking_module
from lightning_clipprune.pruning.criteria import Criterion, Magnitude
from lightning_clipprune.pruning.ranking import capped_global, flat_scores, keep_mask_by_count


def flat_path(weights: dict[str, Tensor], sparsity: float, masks: dict[str, Tensor] | None, scope: str, ranking: str):
    """The masks of the path without ``magnitude_keep``: the flat scores, then the AND with the old masks."""
    crit = Magnitude()
    if scope == "global":
        new = capped_global(weights, flat_scores(weights, crit, masks), sparsity, None, {}, masks, budget=ranking)
    else:
        new = {
            x: keep_mask_by_count(flat_scores({x: w}, crit, masks), int(round(sparsity * w.numel()))).view(w.shape)
            for x, w in weights.items()
        }
    if masks is not None:
        for x in new:
            new[x] &= masks[x]
    return new


def random_weights(g: torch.Generator, kind: str) -> dict[str, Tensor]:
    shapes = [(128, 160), (96, 256), (40, 520), (7, 11)]  # the last one stays under KEEP_MIN: the flat path
    out = {}
    for i, shape in enumerate(shapes):
        if kind == "normal":
            w = torch.randn(shape, generator=g)
        elif kind == "ties":  # few distinct values: long runs of ties at every cut, zeros among them
            w = torch.randint(-3, 4, shape, generator=g).float()
        elif kind == "rounded":  # ties, +0.0 and -0.0
            w = torch.randn(shape, generator=g).round(decimals=1)
            w[w == 0] = -0.0
            w[: shape[0] // 2][w[: shape[0] // 2] == 0] = 0.0
        else:  # rows of very different scale
            w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).pow(4)
        out[f"layer{i}.weight"] = w
    return out


def random_masks(g: torch.Generator, weights: dict[str, Tensor], case: int) -> dict[str, Tensor] | None:
    if case == 0:
        return None  # the first event
    masks = {x: torch.rand(w.shape, generator=g) > float(torch.rand(1, generator=g)) for x, w in weights.items()}
    if case == 2:
        masks["layer0.weight"][:] = True  # nothing pruned yet in one layer
        masks["layer1.weight"][:] = False  # everything pruned in another
    return masks


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of ``magnitude_keep`` on layers of ``KEEP_MIN`` entries or more that gave a mask
    (``taken``) and those that fell back (``back``)."""
    calls = {"taken": 0, "back": 0}
    inner = _host.magnitude_keep

    def counting(criterion, weight, *args):
        keep = inner(criterion, weight, *args)
        if weight.numel() >= _host.KEEP_MIN:
            calls["back" if keep is None else "taken"] += 1
        return keep

    monkeypatch.setattr(ranking_module, "_magnitude_keep", counting)
    monkeypatch.setattr(_host, "KEEP_MIN", 1 << 10)  # the layers of the tests are small
    return calls


@pytest.mark.parametrize("kind", ["normal", "ties", "rounded", "scaled"])
@pytest.mark.parametrize("scope_ranking", [("global", "er"), ("global", "erk"), ("local", "er")])
def test_one_pass_masks_are_the_flat_path_masks(counted: dict[str, int], kind: str, scope_ranking: tuple) -> None:
    scope, ranking = scope_ranking
    g = torch.Generator().manual_seed(hash((kind, scope, ranking)) % 1000)
    for case in range(3):
        weights = random_weights(g, kind)
        masks = random_masks(g, weights, case)
        for sparsity in (0.0, 0.2, 0.5, 0.8, 0.9, 0.97, 1.0):
            got = compute_masks(weights, sparsity=sparsity, masks=masks, scope=scope, ranking=ranking)
            want = flat_path(weights, sparsity, masks, scope, ranking)
            for x in weights:
                assert torch.equal(got[x], want[x]), (kind, scope, ranking, case, sparsity, x)
                if masks is not None:
                    assert not (got[x] & ~masks[x]).any()  # within the old mask without the caller's AND
    assert counted["taken"] > 0
    if kind in ("normal", "scaled"):  # (long runs of ties at the low bracket fall back: exact, slower)
        assert counted["taken"] > 20 * counted["back"]  # the one-pass path decided nearly all of them


def test_nan_weight_falls_back_to_the_flat_path(counted: dict[str, int]) -> None:
    g = torch.Generator().manual_seed(3)
    weights = random_weights(g, "normal")
    masks = random_masks(g, weights, 1)
    weights["layer0.weight"][5, 7] = float("nan")
    masks["layer0.weight"][5, 7] = True  # a live NaN: the flat path's ranking decides
    weights["layer2.weight"][0, 0] = float("nan")
    masks["layer2.weight"][0, 0] = False  # a pruned NaN scores PRUNED_SCORE: no fallback needed
    got = compute_masks(weights, sparsity=0.6, masks=masks)
    want = flat_path(weights, 0.6, masks, "global", "er")
    assert all(torch.equal(got[x], want[x]) for x in weights)
    assert counted == {"taken": 2, "back": 1}  # layer0 fell back; layer3 is under KEEP_MIN


def test_one_pass_path_is_taken_on_a_default_sized_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(ranking_module, "flat_scores", lambda *a, **k: calls.append(a) or flat_scores(*a, **k))
    g = torch.Generator().manual_seed(5)
    weights = {"a": torch.randn(300, 784, generator=g), "b": torch.randn(100, 300, generator=g)}
    masks = {x: torch.rand(w.shape, generator=g) > 0.4 for x, w in weights.items()}
    got = compute_masks(weights, sparsity=0.75, masks=masks)
    assert calls == []  # no flat scores at all
    want = flat_path(weights, 0.75, masks, "global", "er")
    assert all(torch.equal(got[x], want[x]) for x in weights)
    assert sum(int(m.sum()) for m in got.values()) == 30000 + 235200 - round(0.75 * (30000 + 235200))


@pytest.mark.parametrize("kind", ["normal", "ties", "rounded", "scaled"])
def test_small_layers_are_selected_whole_as_the_flat_path(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Layers under KEEP_MIN entries (an output layer, a bias-sized weight): the whole-layer numpy selection."""
    small = []
    inner = _host._small_keep
    monkeypatch.setattr(_host, "_small_keep", lambda *a: small.append(a[0].size) or inner(*a))
    g = torch.Generator().manual_seed(11)
    for case in range(3):
        weights = {x: w[:7] for x, w in random_weights(g, kind).items()}  # 7 rows each: all under KEEP_MIN
        masks = random_masks(g, weights, case)
        for scope, ranking in (("global", "er"), ("local", "er")):
            for sparsity in (0.1, 0.5, 0.9, 0.99):
                got = compute_masks(weights, sparsity=sparsity, masks=masks, scope=scope, ranking=ranking)
                want = flat_path(weights, sparsity, masks, scope, ranking)
                assert all(torch.equal(got[x], want[x]) for x in weights), (kind, case, scope, sparsity)
    assert len(small) > 50


class Square(Criterion):
    def score(self, name: str, weight: Tensor) -> Tensor:
        return weight.square()


def test_other_criteria_and_float64_keep_the_flat_path(counted: dict[str, int]) -> None:
    g = torch.Generator().manual_seed(7)
    weights = random_weights(g, "normal")
    compute_masks(weights, sparsity=0.5, criterion=Square())
    compute_masks({x: w.double() for x, w in weights.items()}, sparsity=0.5)
    assert counted == {"taken": 0, "back": 0}
