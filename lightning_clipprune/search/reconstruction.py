"""The sparsity search with layer-wise reconstruction (SparseGPT / OBS) instead of the magnitude threshold.

:func:`search_reconstruction` walks the same coarse grid and bisection as
:func:`~lightning_clipprune.search.search_threshold`, on the **validation** split, but each point is the
dense model pruned by :func:`~lightning_clipprune.posttrain.reconstruct_prune` at that sparsity (kept weights
updated to preserve each layer's outputs), calibrated on batches of the **training** split collected once.
The test split is read once, at the chosen point, after the search.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_clipprune._choices import SEARCH_METHODS
from lightning_clipprune.posttrain import ReconstructionOptions, collect_calibration, reconstruct_prune
from lightning_clipprune.posttrain.allocation import most_prunable
from lightning_clipprune.pruning import weight_layouts
from lightning_clipprune.search.ranking import Loader, check_reiterable, evaluate, prunable_parameters
from lightning_clipprune.search.threshold import (
    DEFAULT_GRID,
    SearchPoint,
    SearchResult,
    check_grid_args,
    grid_then_bisect,
)

__all__ = ["METHODS", "search_reconstruction"]

_OWNER = "search_reconstruction"
#: The search methods by name (the command line's ``--method``); "obs" is another name of "sparsegpt".
METHODS = SEARCH_METHODS


class _Points:
    """Evaluates the dense model reconstructed at ``k`` pruned weights and records each :class:`SearchPoint`."""

    def __init__(
        self, model: nn.Module, val_loader: Loader, calibration: list[torch.Tensor], names: list[str] | None,
        options: ReconstructionOptions, tolerance: float,
    ) -> None:
        self.model, self.val_loader, self.calibration, self.names, self.options = (
            model, val_loader, calibration, names, options
        )
        params = prunable_parameters(model, names)
        self.numel = sum(p.numel() for p in params.values())
        self.most = (
            self.numel
            if isinstance(options.allocation, Mapping)
            else most_prunable(params, options.allocation, weight_layouts(model, params))
        )
        self.already = min(self.most, sum(int((p == 0).sum()) for p in params.values()))  # a model pruned already
        self.dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.limit = tolerance / 100.0
        self.points: list[SearchPoint] = []
        self.dense_acc: float | None = None

    def count(self, sparsity: float) -> int:
        """The pruned count at ``sparsity``: at least the zeros the model has, at most what the allocation can
        prune."""
        return min(self.most, max(self.already, round(sparsity * self.numel)))

    def prune(self, k: int) -> None:
        """The weights as given back, then (``k`` above the zeros they have) the reconstruction pruning exactly
        ``k`` weights."""
        self.model.load_state_dict(self.dense)
        if k > self.already:
            reconstruct_prune(
                self.model, self.calibration, k / self.numel, include=self.names,
                **{**self.options.as_kwargs(), "progress": False},
            )

    def at(self, k: int, stage: str) -> SearchPoint:
        self.prune(k)
        acc, loss = evaluate(self.model, self.val_loader)
        ok = self.dense_acc is None or self.dense_acc - acc <= self.limit + 1e-12
        point = SearchPoint(k / self.numel, math.nan, acc, loss, stage, ok)  # no threshold: weights are updated
        self.points.append(point)
        if stage == "dense":
            self.dense_acc = acc
        return point


def search_reconstruction(
    model: nn.Module, val_loader: Loader, calibration_loader: Iterable[Any], *, tolerance: float = 0.5,
    grid: Sequence[float] = DEFAULT_GRID, resolution: float = 0.001, max_bisections: int = 20,
    names: Sequence[str] | None = None, options: ReconstructionOptions | None = None,
    test_loader: Loader | Callable[[], Loader] | None = None, apply: bool = False, progress: bool = False,
) -> SearchResult:
    """The largest global sparsity whose validation accuracy after :func:`reconstruct_prune` (no retraining)
    stays within ``tolerance`` percentage points of the dense model.

    Args:
        model: the trained network; its prunable weights must be of layers the reconstruction handles.
        val_loader: batches ``(x, y)`` of the validation split (the accuracy that chooses).
        calibration_loader: batches of the TRAINING split; ``options.num_samples`` samples are taken once,
            under ``options.seed``, and reused at every point. Never give the validation or test split.
        tolerance, grid, resolution, max_bisections, test_loader, apply, progress: as
            :func:`~lightning_clipprune.search.search_threshold`.
        names: the weights to prune (``None``: the default selection of :func:`reconstruct_prune`).
        options: the reconstruction's settings (:class:`~lightning_clipprune.posttrain.ReconstructionOptions`).

    Returns:
        A :class:`~lightning_clipprune.search.SearchResult` with ``criterion="sparsegpt"``; its points'
        ``threshold`` is NaN (the kept weights are changed, so no magnitude threshold reproduces them).

    Raises:
        ValueError: for a bad ``tolerance``, ``grid`` or ``resolution``, a one-shot iterator as ``val_loader``
            or ``test_loader`` (read once per point), an empty calibration loader, or what
            :func:`reconstruct_prune` refuses (a layer it cannot reconstruct, a Hessian over the memory allowed).

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> val = [(torch.randn(32, 8), torch.randint(0, 3, (32,)))]
        >>> train = [(torch.randn(64, 8), torch.randint(0, 3, (64,)))]
        >>> result = search_reconstruction(net, val, train, grid=(0.5,), options=ReconstructionOptions(num_samples=64))
        >>> result.criterion, 0.0 <= result.chosen.sparsity < 1.0
        ('sparsegpt', True)
    """
    check_grid_args(_OWNER, tolerance, grid, resolution)
    check_reiterable(val_loader, "`val_loader`")
    options = options or ReconstructionOptions()
    calibration = collect_calibration(calibration_loader, options.num_samples, options.seed)
    names = None if names is None else list(names)
    points = _Points(model, val_loader, calibration, names, options, tolerance)
    capped = sorted(s for s in set(grid) if round(s * points.numel) > points.most)
    if capped:
        warnings.warn(
            f"{_OWNER}: allocation={options.allocation!r} can prune at most {points.most / points.numel:.4f} of"
            f" these weights (each layer keeps 1 % and every output row's largest weight): the grid's"
            f" {', '.join(map(str, capped))} searched at {points.most / points.numel:.4f}",
            stacklevel=2,
        )
    chosen: SearchPoint | None = None
    try:
        chosen = grid_then_bisect(points.at, points.count, points.numel, sorted(set(grid)), resolution,
                                  max_bisections, progress, "reconstruction search (val)")
        result = SearchResult(points.points, chosen, points.points[0].val_acc, tolerance, "sparsegpt",
                              list(prunable_parameters(model, names)))
        result.extra["calibration_samples"] = sum(b.shape[0] for b in calibration)
        if test_loader is not None:
            loader = test_loader() if callable(test_loader) else test_loader
            check_reiterable(loader, "`test_loader`")
            points.prune(0)
            result.dense_test_acc = evaluate(model, loader)[0]
            points.prune(points.count(chosen.sparsity))
            result.test_acc = evaluate(model, loader)[0]
    finally:
        points.prune(points.count(chosen.sparsity) if apply and chosen is not None else 0)
    return result
