"""How far can a trained model be pruned without retraining? Threshold search and layer sensitivity.

::

    python -m lightning_clipprune.search outputs/2026-11-29/01-00-00            # a run folder of the app
    python -m lightning_clipprune.search outputs/.../checkpoints/final.ckpt --tolerance 0.5 --sensitivity
    python -m lightning_clipprune.search RUN_DIR --criterion taylor --finetune-epochs 2

The threshold search (:func:`search_threshold`) ranks every prunable weight once (by ``|w|``, or by
``|w * g|`` with ``--criterion taylor``), so that a sparsity ``s`` is a quantile of that ranking and the
magnitude threshold ``eps`` (``|w| <= eps`` pruned) is the score at that quantile. It evaluates a coarse grid
of sparsities on the **validation** split, then bisects between the largest grid point whose accuracy stays
within ``tolerance`` percentage points of the dense model and the next grid point, and returns the largest
sparsity found within tolerance. The test split is evaluated once, at the chosen point, after the search.

The layer sensitivity (:func:`layer_sensitivity`, Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks", https://arxiv.org/abs/1506.02626) prunes one layer at a time
to a grid of sparsities, the others dense; :func:`suggest_layer_sparsity` turns it into per-layer
sparsities for a global budget (the most tolerant layers pruned most) and :func:`compare_allocation` checks
that allocation against the global ranking at the same budget.

A run folder is a file from somewhere else, and the command line treats it so: the model is rebuilt only from
the suite's own config groups, with the overrides of the run's own record (``run_config.json``; older folders:
``.hydra/overrides.yaml``, else ``results.json``), each read bounded and checked, and every ``_target_`` of
the composed config must be one of the suite's own classes (:mod:`lightning_clipprune.app.targets`). The
checkpoint is read by :func:`lightning_clipprune.checkpoint.load_checkpoint` (nothing outside an allowed list
is unpickled) and checked key by key against the model. Outputs go into ``RUN/search`` (a real folder, never a
link) through temporary files and renames. Every refusal is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clipprune._io import atomic_path, atomic_write_text
from lightning_clipprune._validation import bad_value, check_choice, check_real

_OWNER = "search_threshold"

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_LAYER_GRID",
    "Ranking",
    "SearchPoint",
    "SearchResult",
    "SensitivityResult",
    "compare_allocation",
    "evaluate",
    "layer_sensitivity",
    "main",
    "search_threshold",
    "suggest_layer_sparsity",
    "taylor_gradients",
]

#: The coarse grid of global sparsities evaluated before the bisection.
DEFAULT_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: The per-layer sparsities of the layer sensitivity.
DEFAULT_LAYER_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)

Loader = Iterable[tuple[Tensor, Tensor]]


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy loss)`` of ``model`` over ``loader`` (batches of ``(x, y)``), in eval mode.

    Example::

        >>> net = nn.Linear(4, 3)
        >>> acc, loss = evaluate(net, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        >>> 0.0 <= acc <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the loader gave no samples")
    return correct.item() / n, loss_sum.item() / n


def prunable_parameters(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the weights the search prunes: ``names``, or every Linear/Conv weight."""
    from lightning_clipprune.pruning import select_prunable_parameters

    if names is None:
        return select_prunable_parameters(model)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"`names` must be parameter names of the model, got unknown {missing}")
    return {n: params[n] for n in names}


def taylor_gradients(
    model: nn.Module,
    train_loader: Loader,
    names: Sequence[str] | None = None,
    batches: int = 10,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
) -> dict[str, Tensor]:
    """The gradient of the training loss averaged over ``batches`` training batches, clipped per batch.

    Each batch's gradient is clipped as the run clipped it (``clip_algorithm`` "norm": total norm at most
    ``clip_val``; "value": entries clamped to ``[-clip_val, clip_val]``; ``clip_val=None``: unclipped) before
    it joins the average. The model's weights and ``.grad`` are left as they were.

    Raises:
        ValueError: for ``batches`` < 1 or a ``clip_algorithm`` other than "norm" and "value".
    """
    from lightning_clipprune.clipping import clip_grad_norm, clip_grad_value

    if batches < 1:
        raise ValueError(f"`batches` must be >= 1, got {batches!r}")
    if clip_algorithm not in ("norm", "value"):
        raise ValueError(f"`clip_algorithm` must be one of ('norm', 'value'), got {clip_algorithm!r}")
    params = prunable_parameters(model, names)
    everything = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [None if p.grad is None else p.grad.clone() for p in everything]
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout or batch-norm statistics update: the gradient of the model as evaluated
    device, seen = _device(model), 0
    try:
        for x, y in loader_batches(train_loader, batches):
            for p in everything:
                p.grad = None
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            if clip_val is not None:
                grads = [p for p in everything if p.grad is not None]
                (clip_grad_norm if clip_algorithm == "norm" else clip_grad_value)(grads, clip_val)
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad
            seen += 1
    finally:
        model.train(was_training)
        for p, g in zip(everything, saved_grads, strict=True):
            p.grad = g
    if seen == 0:
        raise ValueError("taylor_gradients: the training loader gave no batches")
    return {n: s / seen for n, s in sums.items()}


def loader_batches(loader: Loader, n: int) -> Iterable[tuple[Tensor, Tensor]]:
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


class Ranking:
    """All prunable weights ranked once by importance: a sparsity is a quantile, its threshold the score there.

    Args:
        model: the network; the weights are read now (a copy is kept to restore them).
        names: the parameters to rank (``None``: every Linear/Conv weight).
        scores: ``{name: importance}``; ``None`` ranks by magnitude ``|w|``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None, scores: Mapping[str, Tensor] | None = None) -> None:
        self.params = prunable_parameters(model, names)
        if not self.params:
            raise ValueError("the model has no prunable parameters (Linear/Conv weights, or `names`)")
        self.names = list(self.params)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        flat = torch.cat([(scores[n] if scores is not None else p.detach().abs()).flatten().float() for n, p in self.params.items()])
        self.sorted_scores, self.order = torch.sort(flat, stable=True)  # the only sort
        self.sizes = [p.numel() for p in self.params.values()]
        self.numel = int(flat.numel())

    def count(self, sparsity: float) -> int:
        """The number of weights pruned at ``sparsity``."""
        return min(self.numel, max(0, round(sparsity * self.numel)))

    def threshold(self, k: int) -> float:
        """The score of the k-th smallest weight: pruning ``score <= threshold`` prunes (at least) these k."""
        return 0.0 if k == 0 else float(self.sorted_scores[k - 1])

    def masks(self, k: int) -> dict[str, Tensor]:
        """``{name: keep mask}`` pruning the ``k`` lowest-ranked weights."""
        keep = torch.ones(self.numel, dtype=torch.bool, device=self.order.device)
        keep[self.order[:k]] = False
        return {n: m.view_as(self.params[n]) for n, m in zip(self.names, keep.split(self.sizes), strict=True)}

    @torch.no_grad()
    def apply(self, k: int) -> None:
        """Set the weights to the original ones with the ``k`` lowest-ranked weights zeroed (in place)."""
        for n, m in self.masks(k).items():
            self.params[n].copy_(self.original[n] * m)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original (dense) weights back."""
        for n, p in self.params.items():
            p.copy_(self.original[n])


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
        return sorted(self.points, key=lambda p: (p.sparsity, p.stage != "dense"))

    def next_point(self) -> SearchPoint | None:
        """The evaluated point just above the chosen sparsity (``None`` when the chosen one is the last)."""
        above = [p for p in self.sorted_points() if p.sparsity > self.chosen.sparsity]
        return above[0] if above else None

    def overrides(self) -> list[str]:
        """The app's overrides that prune to the chosen point: threshold rule (magnitude only) and sparsity."""
        # prune.threshold=null: a run whose prune config is the threshold rule would refuse both set
        out = [f"prune.sparsity={self.chosen.sparsity:.4f} prune.threshold=null"]
        if self.criterion == "magnitude":
            out.insert(0, f"prune=threshold prune.threshold={self.chosen.threshold:.6g}")
        else:
            out[0] += f" prune.criterion={self.criterion}"
        return out

    def to_table(self, title: str | None = None):
        """A ``rich.table.Table`` of every evaluated point, by sparsity, the chosen one highlighted."""
        from rich.table import Table

        table = Table(title=title or f"Threshold search ({self.criterion}, tolerance {self.tolerance:g} points)", title_justify="left")
        for col in ("sparsity %", "threshold", "val acc %", "val loss", "drop (points)", "stage", ""):
            table.add_column(col, justify="right" if col not in ("stage", "") else "left")
        for p in self.sorted_points():
            mark = "chosen" if p is self.chosen else ("" if p.within_tolerance else "over")
            table.add_row(
                f"{100 * p.sparsity:.2f}", f"{p.threshold:.4g}", f"{100 * p.val_acc:.2f}", f"{p.val_loss:.4f}",
                f"{100 * (self.dense_val_acc - p.val_acc):+.2f}", p.stage, mark,
                style="bold green" if p is self.chosen else None,
            )
        caption = f"chosen: sparsity {100 * self.chosen.sparsity:.2f} %, val acc {100 * self.chosen.val_acc:.2f} %"
        if self.test_acc is not None:
            caption += f"; test acc at the chosen point (evaluated once, after the search): {100 * self.test_acc:.2f} %"
        table.caption = caption
        return table

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Every evaluated point (by sparsity) as csv, ``chosen`` 1 on the chosen row."""
        rows = [{**asdict(p), "chosen": int(p is self.chosen)} for p in self.sorted_points()]
        return _write_csv(Path(path), rows)

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
        """Validation accuracy against sparsity, the tolerance band and the chosen point marked."""
        ax = ax if ax is not None else new_axes(path is not None)
        pts = self.sorted_points()
        ax.plot([100 * p.sparsity for p in pts], [100 * p.val_acc for p in pts], "o-", ms=4, label="val accuracy, no retraining")
        ax.axhline(100 * (self.dense_val_acc - self.tolerance / 100), color="grey", ls="--", lw=1, label=f"dense - {self.tolerance:g} points")
        ax.plot([100 * self.chosen.sparsity], [100 * self.chosen.val_acc], "r*", ms=14, label=f"chosen: {100 * self.chosen.sparsity:.1f} %")
        ax.set_xlabel("global sparsity (%)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"Threshold search ({self.criterion})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        if path is not None:
            _save_figure(ax.figure, Path(path))
        return ax


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def new_axes(detached: bool, figsize: tuple[float, float] = (7, 4.5)) -> Any:
    """Axes on a new figure: a pyplot figure (shown by notebooks), or a detached one only saved to a file."""
    if detached:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize).subplots()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def _save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a fresh temporary name: a planted `*.tmp.png` link is never written through
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


def search_threshold(
    model: nn.Module,
    val_loader: Loader,
    *,
    tolerance: float = 0.5,
    grid: Sequence[float] = DEFAULT_GRID,
    resolution: float = 0.001,
    max_bisections: int = 20,
    names: Sequence[str] | None = None,
    criterion: str = "magnitude",
    grads: Mapping[str, Tensor] | None = None,
    test_loader: Loader | Callable[[], Loader] | None = None,
    apply: bool = False,
    progress: bool = False,
) -> SearchResult:
    """The largest global sparsity whose validation accuracy, without retraining, stays within ``tolerance``.

    The weights are ranked once; each point prunes the ``round(s * n)`` lowest-ranked ones from the
    original weights and evaluates ``val_loader``. First the dense model and every ``grid`` sparsity, then
    a bisection between the largest grid point within tolerance and the next grid point, until the bracket
    is narrower than ``resolution`` (or ``max_bisections`` steps). Every grid point above the chosen one is
    over tolerance, and so is every bisection point above it.

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
        ValueError: for a bad ``tolerance``, ``grid``, ``resolution`` or ``criterion``, or taylor without ``grads``.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,)))]
        >>> result = search_threshold(net, data, tolerance=1.0, grid=(0.25, 0.5, 0.75))
        >>> 0.0 <= result.chosen.sparsity < 1.0
        True
    """
    from lightning_clipprune.pruning import importance

    check_real(_OWNER, "tolerance", tolerance, low=0.0)  # percentage points
    if not grid or any(not 0.0 < s < 1.0 for s in grid):
        raise bad_value(_OWNER, "grid", "a non-empty sequence of sparsities in (0, 1)", grid)
    check_real(_OWNER, "resolution", resolution, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice(_OWNER, "criterion", criterion, ("magnitude", "taylor"))
    scores = None
    if criterion == "taylor":
        if grads is None:
            raise ValueError("`criterion='taylor'` needs `grads` (see taylor_gradients)")
        params = prunable_parameters(model, names)
        scores = {n: importance(p.detach(), "taylor", grads[n]) for n, p in params.items()}
    ranking = Ranking(model, names, scores)
    magnitudes = torch.sort(torch.cat([w.abs().flatten().float() for w in ranking.original.values()])).values
    grid = sorted(set(grid))
    points: list[SearchPoint] = []
    limit = tolerance / 100.0

    def point(k: int, stage: str, dense_acc: float | None) -> SearchPoint:
        ranking.apply(k)
        acc, loss = evaluate(model, val_loader)
        # eps of the threshold rule |w| <= eps: the largest magnitude pruned (magnitude criterion)
        eps = (0.0 if k == 0 else float(magnitudes[k - 1])) if criterion == "magnitude" else ranking.threshold(k)
        ok = dense_acc is None or dense_acc - acc <= limit + 1e-12
        p = SearchPoint(k / ranking.numel, eps, acc, loss, stage, ok)
        points.append(p)
        return p

    lo: SearchPoint | None = None
    try:
        with _progress(len(grid) + 1, "search", progress) as bar:
            task = bar.add_task("threshold search (val)", total=len(grid) + 1)
            dense = point(0, "dense", None)
            bar.advance(task)
            grid_points = []
            for s in grid:
                grid_points.append(point(ranking.count(s), "grid", dense.val_acc))
                bar.advance(task)
            good = [p for p in grid_points if p.within_tolerance]
            lo = good[-1] if good else dense
            above = [p for p in grid_points if p.sparsity > lo.sparsity]
            if above:
                bar.update(task, total=len(grid) + 1 + max_bisections)
                lo = _bisect(lo, above[0], lambda k: point(k, "bisect", dense.val_acc), ranking.numel,
                             resolution, max_bisections, lambda: bar.advance(task))
        result = SearchResult(points, lo, dense.val_acc, tolerance, criterion, ranking.names)
        if test_loader is not None:
            loader = test_loader() if callable(test_loader) else test_loader
            ranking.restore()
            result.dense_test_acc = evaluate(model, loader)[0]
            ranking.apply(round(lo.sparsity * ranking.numel))
            result.test_acc = evaluate(model, loader)[0]
    finally:
        if apply:
            ranking.apply(round(lo.sparsity * ranking.numel) if lo is not None else 0)
        else:
            ranking.restore()
    return result


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


# ---------------------------------------------------------------------------------------------------------
# Layer sensitivity
# ---------------------------------------------------------------------------------------------------------


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

    def to_table(self):
        from rich.table import Table

        table = Table(title=f"Layer sensitivity: val acc % with one layer pruned (dense {100 * self.dense_val_acc:.2f} %)", title_justify="left")
        table.add_column("layer")
        table.add_column("weights", justify="right")
        for s in self.sparsities:
            table.add_column(f"{100 * s:g} %", justify="right")
        for n, accs in self.accuracy.items():
            table.add_row(n, f"{self.numel[n]:,}", *(f"{100 * a:.2f}" for a in accs))
        return table

    def write_csv(self, path: str | os.PathLike) -> Path:
        return _write_csv(Path(path), self.rows())

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
        """One line per layer: validation accuracy against that layer's sparsity."""
        ax = ax if ax is not None else new_axes(path is not None)
        for n, accs in self.accuracy.items():
            ax.plot([100 * s for s in self.sparsities], [100 * a for a in accs], "o-", ms=4, label=f"{n} ({self.numel[n]:,})")
        ax.axhline(100 * self.dense_val_acc, color="grey", ls="--", lw=1, label="dense")
        ax.set_xlabel("sparsity of the one pruned layer (%)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("Layer sensitivity (others dense, no retraining)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
        if path is not None:
            _save_figure(ax.figure, Path(path))
        return ax


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
        ValueError: for a sparsity outside (0, 1).

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> res = layer_sensitivity(net, [(torch.randn(32, 8), torch.randint(0, 3, (32,)))], sparsities=(0.5, 0.9))
        >>> list(res.accuracy)
        ['0.weight', '2.weight']
    """
    if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"`sparsities` must be a non-empty sequence of values in (0, 1), got {sparsities!r}")
    sparsities = sorted(set(sparsities))
    params = prunable_parameters(model, names)
    dense_acc = evaluate(model, val_loader)[0]
    accuracy: dict[str, list[float]] = {}
    with _progress(len(params) * len(sparsities), "sensitivity", progress) as bar:
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


def suggest_layer_sparsity(sens: SensitivityResult, target: float) -> dict[str, float]:
    """Per-layer sparsities that reach the global ``target`` with the most tolerant layers pruned most.

    Every layer gets the largest sparsity whose own accuracy drop (from :func:`layer_sensitivity`, linearly
    interpolated, made monotone) stays below one common level; that level is bisected until the weighted
    mean sparsity equals ``target``.

    Raises:
        ValueError: ``target`` is outside [0, 1) or above what the grid's largest sparsity allows.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"`target` must be in [0, 1), got {target!r}")
    total = sum(sens.numel.values())
    cap = max(sens.sparsities)
    if target > cap + 1e-9:
        raise ValueError(f"`target` {target!r} is above the largest sparsity of the sensitivity grid ({cap!r})")

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
    """
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


# ---------------------------------------------------------------------------------------------------------
# Command line: a run folder or checkpoint of the app
# ---------------------------------------------------------------------------------------------------------


def _run_dir_of(path: Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` from a run folder or a checkpoint inside one."""
    if path.is_dir() and path.suffix in (".ckpt", ".pt", ".pth"):
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file")
    if os.path.lexists(path) and not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{path} is not a regular file (a device, a pipe, or a broken or special link)")
    if path.is_dir():
        for name in ("final.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path, path / "checkpoints" / name
        raise FileNotFoundError(f"no checkpoints/final.ckpt or checkpoints/last.ckpt in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no such run folder or checkpoint: {path}")
    return (path.parent.parent if path.parent.name == "checkpoints" else path.parent), path


def run_overrides(run_dir: Path) -> list[str]:
    """The overrides the run was made with, read and checked as untrusted input.

    From the run's own ``run_config.json``, else (older folders) ``.hydra/overrides.yaml``, else
    ``results.json``'s ``overrides`` (:func:`lightning_clipprune.app.rundir.read_run_overrides`).

    Raises:
        ValueError: a record that cannot be read, or an override that would build anything but the suite's
            own classes (one line naming the file and the override).
    """
    from lightning_clipprune.app.rundir import read_run_overrides

    return read_run_overrides(run_dir)[0]


def compose_run_config(overrides: Sequence[str], output_dir: Path) -> Any:
    """The app's config composed with ``overrides`` (as ``python -m lightning_clipprune.run`` would), checked.

    Only the suite's own config groups are used, and the composed config goes through
    :func:`lightning_clipprune.app.targets.check_targets`: every ``_target_`` in it is one of the suite's
    own classes. The returned config is resolved (no interpolation left): build from it.

    Raises:
        ConfigError: (a ``ValueError``) an override Hydra cannot apply, or a refused ``_target_`` (one line).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from lightning_clipprune.app.checks import ConfigError, one_line
    from lightning_clipprune.app.targets import check_targets
    from lightning_clipprune.run import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except HydraException as err:  # an unknown key or group option: Hydra's first line names it
        raise ConfigError(one_line(str(err).split("\n")[0]) + " (in the run's overrides or the extra ones given)") from None
    finally:
        GlobalHydra.instance().clear()
    # set after composing, not as an override: a folder name may hold what the override grammar parses (",", "'")
    if "${" in str(output_dir):
        raise ConfigError(f"output folder {str(output_dir)!r}: a name holding '${{' would be read as an interpolation; rename it")
    cfg.output_dir = str(output_dir)
    return check_targets(cfg)


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (or a bare state dict) into ``model``, running no code.

    The file is read with :func:`lightning_clipprune.checkpoint.load_checkpoint` (no global outside its
    allowed list is unpickled, reads are bounded); every key, shape and value is checked against ``model``
    before any weight is written.

    Raises:
        CheckpointError: (a ``ValueError``) the file is unsafe, broken, or not this model's; one line naming it.
    """
    from lightning_clipprune.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(checkpoint, f"its 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [str(k) for k in state if k not in own]
    if missing or unexpected:
        what = "its state_dict" if "state_dict" in ckpt else "it has no 'state_dict' entry, and as a bare state dict it"
        raise CheckpointError(
            checkpoint, f"{what} does not match this run's model ({len(missing)} keys missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); is it the checkpoint of this run folder?"
        )
    for key, ref in own.items():
        value = state[key]
        if not isinstance(value, Tensor) or value.shape != ref.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(checkpoint, f"{key} is {got}, the model's is {tuple(ref.shape)}; not this run's model")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(checkpoint, f"{key} holds NaN or infinite values; nothing to search on")
        if value.is_complex() or (ref.is_floating_point() and not value.is_floating_point()):
            raise CheckpointError(checkpoint, f"{key} is {value.dtype}, the model's is {ref.dtype}")
    model.load_state_dict(state, strict=True)


def save_pruned(model: nn.Module, out_dir: Path, metadata: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``pruned.ckpt`` (``{"state_dict": ...}``, Lightning's shape) and ``pruned.lcps`` into ``out_dir``."""
    from lightning_clipprune.app.untrusted import make_output_dir
    from lightning_clipprune.export import save_sparse

    make_output_dir(out_dir)
    ckpt, lcps = out_dir / "pruned.ckpt", out_dir / "pruned.lcps"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hparams = dict(getattr(model, "hparams", {}) or {})
    with atomic_path(ckpt) as tmp:
        torch.save({"state_dict": state, "hyper_parameters": hparams, "search": dict(metadata)}, tmp)
    save_sparse(state, lcps, metadata=dict(metadata))
    return ckpt, lcps


def _clip_settings(cfg: Any) -> tuple[float | None, str]:
    clip = cfg.get("clip")
    if clip is None:
        return None, "norm"
    algorithm = clip.get("algorithm", "norm")
    # agc/autoclip/zclip have no single fixed bound on a one-off gradient; their clip_val is the cap (or None)
    return (None if clip.get("clip_val") is None else float(clip.clip_val)), ("value" if algorithm == "value" else "norm")


def finetune(cfg: Any, model: nn.Module, datamodule: Any, sparsity: float, epochs: int, lr: float | None) -> dict[str, float]:
    """Fine-tune ``model`` (already pruned) for ``epochs`` at ``sparsity`` with the run's clip; masks kept fixed.

    Returns ``{"val_acc": ..., "test_acc": ...}`` after fine-tuning.
    """
    import hydra
    import lightning as L
    from omegaconf import open_dict

    from lightning_clipprune import MagnitudePruneCallback

    model_cfg = cfg.model.copy()
    if lr is not None and model_cfg.get("optimizer") is not None:
        with open_dict(model_cfg):
            model_cfg.optimizer.lr = lr
    tuned = hydra.utils.instantiate(model_cfg, _convert_="all")
    tuned.load_state_dict(model.state_dict())
    # ranking="raw": the global magnitude ranking the search measured, so the pruned entries stay the same
    callbacks: list[Any] = [
        MagnitudePruneCallback(sparsity=sparsity, schedule="oneshot", start=0.0, ranking="raw", verbose=False)
    ]
    if cfg.get("clip") is not None:
        callbacks.insert(0, hydra.utils.instantiate(cfg.clip))
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=True, num_sanity_val_steps=0,
    )
    trainer.fit(tuned, datamodule=datamodule)
    val = trainer.validate(tuned, datamodule=datamodule, verbose=False)[0]["val/acc"]
    test = trainer.test(tuned, datamodule=datamodule, verbose=False)[0]["test/acc"] if datamodule.has_test else None
    model.load_state_dict(tuned.state_dict())
    return {"val_acc": float(val), "test_acc": None if test is None else float(test)}


def _parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_clipprune.search RUN_DIR_OR_CKPT [options] [overrides]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_clipprune.search",
        description="Find the largest global sparsity whose validation accuracy, without retraining, stays within "
        "a tolerance of the dense model; optionally the per-layer sensitivity and a short fine-tune.",
    )
    parser.add_argument("run", help="a run folder of `python -m lightning_clipprune.run` or a checkpoint inside it")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (such as data.root=...) after the run's own")
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed val accuracy drop, percentage points (0.5)")
    parser.add_argument("--grid", type=_parse_floats, default=list(DEFAULT_GRID), help="coarse sparsity grid, comma-separated")
    parser.add_argument("--resolution", type=float, default=0.001, help="bisection stops at this sparsity width (0.001)")
    parser.add_argument("--criterion", choices=("magnitude", "taylor"), default="magnitude")
    parser.add_argument("--taylor-batches", type=int, default=20, help="training batches averaged for the taylor gradient")
    parser.add_argument("--sensitivity", action="store_true", help="also the per-layer sensitivity and an allocation")
    parser.add_argument("--layer-grid", type=_parse_floats, default=list(DEFAULT_LAYER_GRID))
    parser.add_argument("--target", type=float, default=None, help="global sparsity of the per-layer allocation (default: the one found)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune at the sparsity found for N epochs")
    parser.add_argument("--finetune-lr", type=float, default=None, help="peak learning rate of the fine-tune (default: run's / 10)")
    parser.add_argument("--no-test", action="store_true", help="do not evaluate the test split at all")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/search)")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except (OSError, ValueError) as err:  # FileNotFoundError, CheckpointError, ConfigError, UntrustedFileError...
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        text = " ".join(str(err).split())
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
            text = f"{err.filename}: {text}"
        print(f"error: {text}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightning_clipprune.app.build import instantiate
    from lightning_clipprune.app.untrusted import make_output_dir

    console = Console(width=None if sys.stdout.isatty() else 120)
    run_dir, checkpoint = _run_dir_of(Path(args.run))
    out = args.out or run_dir / "search"
    overrides = [*run_overrides(run_dir), *args.overrides]
    cfg = compose_run_config(overrides, out)
    make_output_dir(out)  # before the work: a planted `search` link or file is refused at once
    model = instantiate(cfg.model, "model")
    load_weights(model, checkpoint)
    datamodule = instantiate(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    grads = None
    if args.criterion == "taylor":
        clip_val, algorithm = _clip_settings(cfg)
        grads = taylor_gradients(model, datamodule.train_dataloader(), batches=args.taylor_batches, clip_val=clip_val, clip_algorithm=algorithm)
    result = search_threshold(
        model, datamodule.val_dataloader(), tolerance=args.tolerance, grid=args.grid, resolution=args.resolution,
        criterion=args.criterion, grads=grads, progress=True,
        test_loader=None if args.no_test or not datamodule.has_test else datamodule.test_dataloader, apply=True,
    )
    console.print(result.to_table())
    result.write_csv(out / "search.csv")
    result.plot(out / "search.png")
    # the run's own prune choice is replaced by the one found; a fresh run resumes nothing
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0] not in ("prune", "ckpt_path")]
    base = " ".join(shlex.quote(o) for o in kept)  # overrides read from a file: pasted into a shell, quoted
    commands = [f"python -m lightning_clipprune.run {base} {o}".replace("  ", " ") for o in result.overrides()]
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint), "criterion": result.criterion, "tolerance_points": result.tolerance,
        "dense_val_acc": result.dense_val_acc, "sparsity": result.chosen.sparsity, "threshold": result.chosen.threshold,
        "val_acc": result.chosen.val_acc, "val_loss": result.chosen.val_loss,
        "test_acc_at_chosen_point": result.test_acc, "dense_test_acc": result.dense_test_acc,
        "evaluations": len(result.points), "commands": commands,
    }
    ckpt, lcps = save_pruned(model, out, {"sparsity": result.chosen.sparsity, "threshold": result.chosen.threshold})
    summary["pruned_checkpoint"], summary["pruned_lcps"] = str(ckpt), str(lcps)
    console.print("train at this point with:")
    for c in commands:
        console.print(f"  {c}", soft_wrap=True, highlight=False)
    if result.test_acc is not None:
        console.print(f"test accuracy at the chosen point (read once, after the search): {100 * result.test_acc:.2f} % "
                      f"(dense {100 * (result.dense_test_acc or 0):.2f} %)")
    if args.sensitivity:
        summary["allocation"] = _sensitivity_step(args, cfg, checkpoint, datamodule, result, out, console)
    if args.finetune_epochs > 0:
        summary["finetune"] = _finetune_step(args, cfg, model, datamodule, result, out, console)
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2) + "\n")
    console.print(f"written: {out}/search.csv, search.png, search.json, pruned.ckpt, pruned.lcps")
    return 0


def _sensitivity_step(
    args: argparse.Namespace, cfg: Any, checkpoint: Path, datamodule: Any, result: Any, out: Path, console: Any
) -> dict[str, Any]:
    """``--sensitivity``: one layer at a time, the suggested per-layer allocation and its comparison."""
    from lightning_clipprune.app.build import instantiate

    model_dense = instantiate(cfg.model, "model")
    load_weights(model_dense, checkpoint)
    sens = layer_sensitivity(model_dense, datamodule.val_dataloader(), sparsities=args.layer_grid, names=result.names, progress=True)
    console.print(sens.to_table())
    sens.write_csv(out / "sensitivity.csv")
    sens.plot(out / "sensitivity.png")
    target = args.target if args.target is not None else result.chosen.sparsity
    allocation = suggest_layer_sparsity(sens, target)
    comparison = compare_allocation(model_dense, datamodule.val_dataloader(), allocation)
    python, hydra_overrides = layer_sparsity_snippets(allocation)
    console.print(f"per-layer sparsities for {100 * target:.2f} % global: val acc {100 * comparison['layerwise_val_acc']:.2f} % "
                  f"vs global ranking {100 * comparison['global_val_acc']:.2f} % (no retraining)")
    console.print(f"  {python}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"  {hydra_overrides}", soft_wrap=True, highlight=False, markup=False)
    return {"target": target, "layer_sparsity": allocation, **comparison, "callback": python, "overrides": hydra_overrides}


def _finetune_step(
    args: argparse.Namespace, cfg: Any, model: Any, datamodule: Any, result: Any, out: Path, console: Any
) -> dict[str, Any]:
    """``--finetune-epochs N``: a short run at the sparsity found, masks fixed; before/after accuracy."""
    lr = args.finetune_lr
    if lr is None and cfg.model.get("optimizer") is not None and cfg.model.optimizer.get("lr") is not None:
        lr = float(cfg.model.optimizer.lr) / 10
    tuned = finetune(cfg, model, datamodule, result.chosen.sparsity, args.finetune_epochs, lr)
    console.print(
        f"fine-tuned {args.finetune_epochs} epoch(s) at {100 * result.chosen.sparsity:.2f} %: val acc "
        f"{100 * result.chosen.val_acc:.2f} % -> {100 * tuned['val_acc']:.2f} %"
        + (f", test acc {100 * tuned['test_acc']:.2f} %" if tuned["test_acc"] is not None else "")
    )
    summary = {"epochs": args.finetune_epochs, "lr": lr, "val_acc_before": result.chosen.val_acc, **tuned}
    ckpt, _ = save_pruned(model, out / "finetuned", {"sparsity": result.chosen.sparsity, "finetune_epochs": args.finetune_epochs})
    summary["checkpoint"] = str(ckpt)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
