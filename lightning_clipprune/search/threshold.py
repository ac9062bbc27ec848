"""The threshold search: the largest global sparsity whose validation accuracy stays within a tolerance.

The weights are ranked once (:class:`~lightning_clipprune.search.ranking.Ranking`), so a sparsity ``s``
is a quantile of that ranking and the magnitude threshold ``eps`` (``|w| <= eps`` pruned) is the score at
that quantile. :func:`search_threshold` evaluates a coarse grid of sparsities on the **validation** split,
then bisects between the largest grid point within ``tolerance`` percentage points of the dense model and
the next grid point. The test split is evaluated once, at the chosen point, after the search.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune._choices import DEFAULT_GRID
from lightning_clipprune._validation import bad_value, check_choice, check_real
from lightning_clipprune.pruning import importance
from lightning_clipprune.search import plots
from lightning_clipprune.search.ranking import (
    Loader,
    Ranking,
    check_reiterable,
    evaluate,
    prunable_parameters,
)

_OWNER = "search_threshold"

__all__ = ["DEFAULT_GRID", "SearchPoint", "SearchResult", "search_threshold"]


#: Below this starting sparsity a model counts as dense (a few exact zeros), and the search offers its threshold.
DENSE_START = 0.01


def sparsity_text(sparsity: float) -> str:
    """``sparsity`` with 4 decimals, or as many more as keep a sparsity below 1 below 1 (the app refuses 1.0).

    Example::

        >>> sparsity_text(0.5), sparsity_text(0.99999)
        ('0.5000', '0.99999')
    """
    for digits in range(4, 17):
        text = f"{sparsity:.{digits}f}"
        if sparsity >= 1.0 or float(text) < 1.0:
            return text.rstrip("0") if digits > 4 else text
    return repr(sparsity)


@dataclass
class SearchPoint:
    """One evaluated point: global sparsity, the threshold that gives it, validation accuracy and loss."""

    sparsity: float
    threshold: float
    val_acc: float
    val_loss: float
    stage: str  # "dense" | "grid" | "bisect"
    within_tolerance: bool


@dataclass
class SearchResult:
    """What :func:`search_threshold` found; ``points`` holds every evaluated point in evaluation order."""

    points: list[SearchPoint]
    chosen: SearchPoint
    dense_val_acc: float
    tolerance: float
    criterion: str
    names: list[str]
    test_acc: float | None = None
    dense_test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def sorted_points(self) -> list[SearchPoint]:
        """Every evaluated point by sparsity (the dense point first)."""
        return sorted(self.points, key=lambda p: (p.sparsity, p.stage != "dense"))

    def next_point(self) -> SearchPoint | None:
        """The evaluated point just above the chosen sparsity (``None`` when the chosen one is the last)."""
        above = [p for p in self.sorted_points() if p.sparsity > self.chosen.sparsity]
        return above[0] if above else None

    def overrides(self) -> list[str]:
        """The app's overrides that prune to the chosen point: the threshold once after training, as the search
        measured it (magnitude, from a start under :data:`DENSE_START`; the threshold rule during training would
        prune from initialisation and end far sparser), and the sparsity, ramped during training; for
        "sparsegpt", the post-training "obs" criterion at that sparsity."""
        # prune.threshold=null: a run whose prune config is the threshold rule would refuse both set
        out = [f"prune.sparsity={sparsity_text(self.chosen.sparsity)} prune.threshold=null"]
        if self.criterion == "sparsegpt":  # post-training reconstruction: the "obs" criterion, after the last step
            return [f"prune=oneshot prune.start=1.0 {out[0]} prune.criterion=obs"]
        if self.criterion == "magnitude":
            # a threshold read off a model pruned already cuts only what its run left: a fresh run with it lands far
            # from the chosen sparsity (90 % chosen, 35 % trained), so it is offered for a (nearly) dense start only
            if self.chosen.threshold > 0 and self.sorted_points()[0].sparsity < DENSE_START:
                out.insert(0, f"prune=threshold_after prune.threshold={self.chosen.threshold:.6g}")
        else:
            out[0] += f" prune.criterion={self.criterion}"
        return out

    def to_table(self, title: str | None = None) -> Any:
        """A ``rich.table.Table`` of every evaluated point, by sparsity, the chosen one highlighted."""
        return plots.search_table(self, title)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Every evaluated point (by sparsity) as csv, ``chosen`` 1 on the chosen row."""
        return plots.write_csv(path, [{**asdict(p), "chosen": int(p is self.chosen)} for p in self.sorted_points()])

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
        """Validation accuracy against sparsity, the tolerance band and the chosen point marked."""
        return plots.search_plot(self, path, ax)


class _Points:
    """Evaluates the model pruned to the ``k`` lowest-ranked weights and records each :class:`SearchPoint`."""

    def __init__(self, model: nn.Module, val_loader: Loader, ranking: Ranking, criterion: str, tolerance: float) -> None:
        self.model, self.val_loader, self.ranking, self.criterion = model, val_loader, ranking, criterion
        self.limit = tolerance / 100.0
        self.magnitudes = torch.sort(torch.cat([w.abs().flatten().float() for w in ranking.original.values()])).values
        self.points: list[SearchPoint] = []
        self.dense_acc: float | None = None

    def at(self, k: int, stage: str) -> SearchPoint:
        self.ranking.apply(k)
        acc, loss = evaluate(self.model, self.val_loader)
        # eps of the threshold rule |w| <= eps: the largest magnitude pruned (magnitude criterion)
        if self.criterion == "magnitude":
            eps = 0.0 if k == 0 else float(self.magnitudes[k - 1])
        else:
            eps = self.ranking.threshold(k)
        ok = self.dense_acc is None or self.dense_acc - acc <= self.limit + 1e-12
        point = SearchPoint(k / self.ranking.numel, eps, acc, loss, stage, ok)
        self.points.append(point)
        if stage == "dense":
            self.dense_acc = acc
        return point


def check_grid_args(owner: str, tolerance: float, grid: Sequence[float], resolution: float) -> None:
    """The checks every search shares: ``tolerance`` (points) >= 0, a grid in (0, 1), a resolution in (0, 1)."""
    check_real(owner, "tolerance", tolerance, low=0.0)  # percentage points
    if not grid or any(not 0.0 < s < 1.0 for s in grid):
        raise bad_value(owner, "grid", "a non-empty sequence of sparsities in (0, 1)", grid)
    check_real(owner, "resolution", resolution, low=0.0, high=1.0, low_open=True, high_open=True)


def _check_search_args(tolerance: float, grid: Sequence[float], resolution: float, criterion: str) -> None:
    check_grid_args(_OWNER, tolerance, grid, resolution)
    check_choice(_OWNER, "criterion", criterion, ("magnitude", "taylor"))


def _scores(
    model: nn.Module, names: Sequence[str] | None, criterion: str, grads: Mapping[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """The taylor scores ``|w * g|`` (``None`` for magnitude: the ranking uses ``|w|``)."""
    if criterion != "taylor":
        return None
    if grads is None:
        raise ValueError("`criterion='taylor'` needs `grads` (see taylor_gradients)")
    return {n: importance(p.detach(), "taylor", grads[n]) for n, p in prunable_parameters(model, names).items()}


def search_threshold(
    model: nn.Module, val_loader: Loader, *, tolerance: float = 0.5, grid: Sequence[float] = DEFAULT_GRID,
    resolution: float = 0.001, max_bisections: int = 20, names: Sequence[str] | None = None,
    criterion: str = "magnitude", grads: Mapping[str, Tensor] | None = None,
    test_loader: Loader | Callable[[], Loader] | None = None, apply: bool = False, progress: bool = False,
) -> SearchResult:
    """The largest global sparsity whose validation accuracy, without retraining, stays within ``tolerance``.

    Each point prunes the ``round(s * n)`` lowest-ranked weights of the original ones and evaluates
    ``val_loader``: the dense model, every ``grid`` sparsity, then a bisection between the largest grid point
    within tolerance and the next one. Every evaluated point above the chosen one is over tolerance.

    Args:
        model: the trained network (any ``nn.Module`` returning logits; a ``Classifier`` works).
        val_loader: batches ``(x, y)`` of the validation split.
        tolerance: the largest allowed drop of validation accuracy, in percentage points.
        grid: the coarse sparsities, each in (0, 1).
        resolution: the bisection stops when the bracket is narrower than this (a sparsity fraction).
        max_bisections: at most this many bisection steps.
        names: the parameters to prune (``None``: every Linear/Conv weight).
        criterion: "magnitude" (``|w|``) or "taylor" (``|w * g|``, ``grads`` from :func:`taylor_gradients`).
        grads: ``{name: averaged gradient}`` for the taylor criterion.
        test_loader: the test split (or a callable returning it, such as ``datamodule.test_dataloader``):
            evaluated once, at the chosen point and dense, after the search. ``None``: no test accuracy.
        apply: leave the model pruned to the chosen point (default: the dense weights are put back).
        progress: show a progress bar over the evaluations.

    Returns:
        A :class:`SearchResult`.

    Raises:
        ValueError: for a bad ``tolerance``, ``grid``, ``resolution`` or ``criterion``, taylor without ``grads``,
            a one-shot iterator as a loader (it is read once per point), or labels that are not class indices.

    A grid point that rounds to every weight (``0.9999`` of 640 weights) is searched one weight short of
    that, with a warning: an all-zero network is no answer.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,)))]
        >>> result = search_threshold(net, data, tolerance=1.0, grid=(0.25, 0.5, 0.75))
        >>> 0.0 <= result.chosen.sparsity < 1.0
        True
    """
    _check_search_args(tolerance, grid, resolution, criterion)
    check_reiterable(val_loader, "`val_loader`")
    ranking = Ranking(model, names, _scores(model, names, criterion, grads))
    points = _Points(model, val_loader, ranking, criterion, tolerance)
    chosen: SearchPoint | None = None
    try:
        chosen = _grid_then_bisect(points, sorted(set(grid)), resolution, max_bisections, progress)
        result = SearchResult(points.points, chosen, points.points[0].val_acc, tolerance, criterion, ranking.names)
        if test_loader is not None:
            loader = test_loader() if callable(test_loader) else test_loader
            check_reiterable(loader, "`test_loader`")
            ranking.restore()
            result.dense_test_acc = evaluate(model, loader)[0]
            ranking.apply(round(chosen.sparsity * ranking.numel))
            result.test_acc = evaluate(model, loader)[0]
    finally:
        if apply:
            ranking.apply(round(chosen.sparsity * ranking.numel) if chosen is not None else 0)
        else:
            ranking.restore()
    return result


def _grid_then_bisect(
    points: _Points, grid: list[float], resolution: float, max_bisections: int, progress: bool
) -> SearchPoint:
    """The dense point, every grid point, then the bisection above the last grid point within tolerance."""
    return grid_then_bisect(points.at, points.ranking.count, points.ranking.numel, grid, resolution, max_bisections,
                            progress, "threshold search (val)")


def grid_then_bisect(
    at: Callable[[int, str], SearchPoint], count: Callable[[float], int], numel: int, grid: list[float],
    resolution: float, max_bisections: int, progress: bool, label: str,
) -> SearchPoint:
    """The search shared by every method: ``at(count(0), "dense")`` (the model as given: dense, or as sparse as
    it is already), ``at(count(s), "grid")`` for each grid sparsity above it (each pruned count once), then the
    bisection on the pruned count above the last grid point within tolerance."""
    first = count(0.0)
    every = sorted(s for s in grid if count(s) >= numel)
    if every and numel > 1:
        warnings.warn(
            f"the grid's {', '.join(map(str, every))} would prune every one of the {numel} weights (an all-zero"
            f" network): searched at {numel - 1} pruned ({sparsity_text((numel - 1) / numel)}) instead; give a"
            " smaller grid point",
            stacklevel=3,
        )
    counts = sorted({min(count(s), max(first, numel - 1)) for s in grid} - {first})
    with plots.progress_bar(progress) as bar:
        task = bar.add_task(label, total=len(counts) + 1)
        dense = at(first, "dense")
        bar.advance(task)
        grid_points = []
        for k in counts:
            grid_points.append(at(k, "grid"))
            bar.advance(task)
        good = [p for p in grid_points if p.within_tolerance]
        lo = good[-1] if good else dense
        above = [p for p in grid_points if p.sparsity > lo.sparsity]
        if above:
            bar.update(task, total=len(counts) + 1 + max_bisections)
            lo = _bisect(lo, above[0], lambda k: at(k, "bisect"), numel,
                         resolution, max_bisections, lambda: bar.advance(task))
    return lo


def _bisect(
    lo: SearchPoint,
    hi: SearchPoint,
    evaluate_at: Callable[[int], SearchPoint],
    numel: int,
    resolution: float,
    max_steps: int,
    advance: Callable[[], Any],
) -> SearchPoint:
    """Bisect on the pruned count between a point within tolerance (``lo``) and one over it (``hi``).

    Returns the largest evaluated point within tolerance, once the bracket is narrower than ``resolution``
    (as a fraction of ``numel``) or after ``max_steps`` evaluations.
    """
    lo_k, hi_k = round(lo.sparsity * numel), round(hi.sparsity * numel)
    steps = 0
    while hi_k - lo_k > max(1, resolution * numel) and steps < max_steps:
        mid = evaluate_at((lo_k + hi_k) // 2)
        if mid.within_tolerance:
            lo_k, lo = round(mid.sparsity * numel), mid
        else:
            hi_k = round(mid.sparsity * numel)
        steps += 1
        advance()
    return lo
