"""Layer sensitivity: one layer pruned at a time, and a per-layer allocation for a global budget.

:func:`layer_sensitivity` (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks", https://arxiv.org/abs/1506.02626) prunes one layer at a time to a grid of sparsities, the others
dense; :func:`suggest_layer_sparsity` turns it into per-layer sparsities for a global budget (the most
tolerant layers pruned most) and :func:`compare_allocation` checks that allocation against the global
ranking at the same budget.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_clipprune._choices import DEFAULT_LAYER_GRID
from lightning_clipprune.search import plots
from lightning_clipprune.search.ranking import (
    Loader,
    Ranking,
    check_reiterable,
    evaluate,
    prunable_parameters,
)

__all__ = [
    "DEFAULT_LAYER_GRID",
    "SensitivityResult",
    "compare_allocation",
    "layer_sensitivity",
    "layer_sparsity_snippets",
    "suggest_layer_sparsity",
]



@dataclass
class SensitivityResult:
    """Validation accuracy with one layer pruned (by magnitude within the layer) to each grid sparsity."""

    sparsities: list[float]
    dense_val_acc: float
    accuracy: dict[str, list[float]]  # {parameter name: val acc per sparsity}
    numel: dict[str, int]

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: name, number of weights, val acc at each sparsity."""
        return [
            {"layer": n, "numel": self.numel[n], **{f"acc@{s:g}": a for s, a in zip(self.sparsities, accs, strict=True)}}
            for n, accs in self.accuracy.items()
        ]

    def to_table(self) -> Any:
        """A ``rich.table.Table``: one row per layer, val accuracy at each sparsity of that layer alone."""
        return plots.sensitivity_table(self)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """:meth:`rows` as csv."""
        return plots.write_csv(path, self.rows())

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
        """One line per layer: validation accuracy against that layer's sparsity."""
        return plots.sensitivity_plot(self, path, ax)


def layer_sensitivity(
    model: nn.Module,
    val_loader: Loader,
    *,
    sparsities: Sequence[float] = DEFAULT_LAYER_GRID,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> SensitivityResult:
    """Prune one layer at a time to each of ``sparsities`` (magnitude within the layer), others dense.

    The model's weights are put back at the end.

    Raises:
        ValueError: for a sparsity outside (0, 1), or a one-shot iterator as ``val_loader`` (it is read once per
            layer and sparsity: give a list of batches or a DataLoader).

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> res = layer_sensitivity(net, [(torch.randn(32, 8), torch.randint(0, 3, (32,)))], sparsities=(0.5, 0.9))
        >>> list(res.accuracy)
        ['0.weight', '2.weight']
    """
    if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"`sparsities` must be a non-empty sequence of values in (0, 1), got {sparsities!r}")
    sparsities = sorted(set(sparsities))
    check_reiterable(val_loader, "`val_loader`")
    params = prunable_parameters(model, names)
    dense_acc = evaluate(model, val_loader)[0]
    accuracy: dict[str, list[float]] = {}
    with plots.progress_bar(progress) as bar:
        task = bar.add_task("layer sensitivity (val)", total=len(params) * len(sparsities))
        for name in params:
            ranking = Ranking(model, [name])
            try:
                accs = []
                for s in sparsities:
                    ranking.apply(ranking.count(s))
                    accs.append(evaluate(model, val_loader)[0])
                    bar.advance(task)
                accuracy[name] = accs
            finally:
                ranking.restore()
    return SensitivityResult(list(sparsities), dense_acc, accuracy, {n: p.numel() for n, p in params.items()})


def _max_sparsity_within(sens: SensitivityResult, name: str, drop: float) -> float:
    """The largest sparsity of ``name`` whose (monotone envelope of) accuracy drop is <= ``drop``, interpolated."""
    xs = [0.0, *sens.sparsities]
    drops, worst = [], 0.0
    for a in [sens.dense_val_acc, *sens.accuracy[name]]:
        worst = max(worst, sens.dense_val_acc - a)  # a layer that lost accuracy at s is not trusted above s
        drops.append(worst)
    best = 0.0
    for (x0, d0), (x1, d1) in zip(zip(xs, drops, strict=True), zip(xs[1:], drops[1:], strict=True), strict=False):
        if d1 <= drop:
            best = x1
        elif d0 <= drop:
            best = x0 + (x1 - x0) * (drop - d0) / (d1 - d0)
            break
        else:
            break
    return best


def suggest_layer_sparsity(sens: SensitivityResult, target: float, *, clamp: bool = False) -> dict[str, float]:
    """Per-layer sparsities that reach the global ``target`` with the most tolerant layers pruned most.

    Every layer gets the largest sparsity whose own accuracy drop (from :func:`layer_sensitivity`, linearly
    interpolated, made monotone) stays below one common level; that level is bisected until the weighted
    mean sparsity equals ``target``.

    Args:
        sens: the result of :func:`layer_sensitivity`.
        target: the global sparsity, in [0, 1).
        clamp: a ``target`` above the grid's largest sparsity (nothing is measured there) is lowered to it,
            with one warning, instead of refused (a target that came from a search, not from the user).

    Raises:
        ValueError: ``target`` is outside [0, 1), or (without ``clamp``) above the grid's largest sparsity.

    Example::

        >>> sens = SensitivityResult([0.5, 0.9], 0.9, {"a": [0.9, 0.9], "b": [0.9, 0.1]}, {"a": 100, "b": 100})
        >>> alloc = suggest_layer_sparsity(sens, 0.6)  # "a" lost nothing at 0.9: it is pruned most
        >>> alloc["a"] > alloc["b"], round((alloc["a"] + alloc["b"]) / 2, 4)
        (True, 0.6)
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"`target` must be in [0, 1), got {target!r}")
    total = sum(sens.numel.values())
    cap = max(sens.sparsities)
    if target > cap + 1e-9:
        if not clamp:
            raise ValueError(
                f"`target` {target!r} is above the largest sparsity of the sensitivity grid ({cap!r}): nothing is"
                f" measured there; add a grid sparsity >= {target:.4g} to `layer_sensitivity(sparsities=...)`, or"
                " lower `target`"
            )
        warnings.warn(
            f"the global sparsity {target:.4g} is above the largest sparsity of the sensitivity grid ({cap:g}):"
            f" the per-layer allocation is for {cap:g} (add a larger grid sparsity to reach {target:.4g})",
            stacklevel=2,
        )
        target = cap

    def alloc(level: float) -> dict[str, float]:
        return {n: _max_sparsity_within(sens, n, level) for n in sens.accuracy}

    def global_sparsity(a: Mapping[str, float]) -> float:
        return sum(a[n] * sens.numel[n] for n in a) / total

    lo, hi = 0.0, 1.0 + 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        if global_sparsity(alloc(mid)) < target:
            lo = mid
        else:
            hi = mid
    result = alloc(hi)
    # a flat segment can overshoot: scale the allocation down to the exact budget
    reached = global_sparsity(result)
    if reached > target and reached > 0:
        result = {n: s * target / reached for n, s in result.items()}
    return {n: round(s, 4) for n, s in result.items()}


def compare_allocation(model: nn.Module, val_loader: Loader, allocation: Mapping[str, float]) -> dict[str, float]:
    """Validation accuracy (no retraining) of the per-layer ``allocation`` and of the global ranking at the same budget.

    Returns:
        ``{"sparsity": global sparsity reached, "layerwise_val_acc": ..., "global_val_acc": ...}``.

    Raises:
        ValueError: a one-shot iterator as ``val_loader`` (it is read twice), or a name that is no parameter.
    """
    check_reiterable(val_loader, "`val_loader`")
    names = list(allocation)
    params = prunable_parameters(model, names)
    rankings = [Ranking(model, [n]) for n in names]
    pruned = 0
    try:
        for n, r in zip(names, rankings, strict=True):
            k = r.count(allocation[n])
            r.apply(k)
            pruned += k
        layerwise = evaluate(model, val_loader)[0]
    finally:
        for r in rankings:
            r.restore()
    total = sum(p.numel() for p in params.values())
    ranking = Ranking(model, names)
    try:
        ranking.apply(pruned)
        global_acc = evaluate(model, val_loader)[0]
    finally:
        ranking.restore()
    return {"sparsity": pruned / total, "layerwise_val_acc": layerwise, "global_val_acc": global_acc}


def layer_sparsity_snippets(allocation: Mapping[str, float]) -> tuple[str, str]:
    """The allocation as a ``MagnitudePruneCallback(...)`` call and as Hydra overrides of the app."""
    body = ", ".join(f"{n!r}: {s:g}" for n, s in allocation.items())
    python = f'MagnitudePruneCallback(scope="local", layer_sparsity={{{body}}})'
    hydra_value = ",".join(f"{n}:{s:g}" for n, s in allocation.items())
    return python, f"prune.scope=local '++prune.layer_sparsity={{{hydra_value}}}'"
