"""Showing the searches: csv files, matplotlib figures, rich tables and progress bars.

matplotlib and rich are imported inside the functions that draw: importing the search (or the package)
does not pay for them, and the numeric search works where matplotlib is not installed. Every file is
written to a temporary name and renamed (a planted link at the final name is never written through).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_clipprune._io import atomic_path

if TYPE_CHECKING:
    from lightning_clipprune.search.sensitivity import SensitivityResult
    from lightning_clipprune.search.threshold import SearchResult

__all__ = [
    "new_axes",
    "progress_bar",
    "save_figure",
    "search_plot",
    "search_table",
    "sensitivity_plot",
    "sensitivity_table",
    "write_csv",
]


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts; the header is the union of their keys, in first-seen order) as csv to ``path``."""
    path = Path(path)
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
        from matplotlib.figure import Figure  # lazy: matplotlib is slow to import and optional for the search

        return Figure(figsize=figsize).subplots()
    import matplotlib.pyplot as plt  # lazy: as above

    return plt.subplots(figsize=figsize)[1]


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save ``fig`` to ``path`` (format from the suffix, png by default) through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a fresh temporary name: a planted `*.tmp.png` link is never written through
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")


def progress_bar(enabled: bool) -> Any:
    """A transient rich progress bar (description, bar, n/total, elapsed); a no-op when not ``enabled``."""
    # lazy: rich costs start-up time that only the command line needs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


def _stage(point: Any) -> str:
    """The stage column: "dense", or "start" for a model that was sparse already when the search began."""
    return "start" if point.stage == "dense" and point.sparsity > 0 else point.stage


def search_table(result: SearchResult, title: str | None = None) -> Any:
    """A ``rich.table.Table`` of every evaluated point, by sparsity, the chosen one highlighted."""
    from rich.table import Table  # lazy: start-up time, as in progress_bar

    title = title or f"Threshold search ({result.criterion}, tolerance {result.tolerance:g} points)"
    table = Table(title=title, title_justify="left")
    for col in ("sparsity %", "threshold", "val acc %", "val loss", "drop (points)", "stage", ""):
        table.add_column(col, justify="right" if col not in ("stage", "") else "left")
    for p in result.sorted_points():
        mark = "chosen" if p is result.chosen else ("" if p.within_tolerance else "over")
        table.add_row(
            f"{100 * p.sparsity:.2f}", "-" if math.isnan(p.threshold) else f"{p.threshold:.4g}", f"{100 * p.val_acc:.2f}", f"{p.val_loss:.4f}",
            f"{100 * (result.dense_val_acc - p.val_acc):+.2f}", _stage(p), mark,
            style="bold green" if p is result.chosen else None,
        )
    chosen = result.chosen
    caption = f"chosen: sparsity {100 * chosen.sparsity:.2f} %, val acc {100 * chosen.val_acc:.2f} %"
    if result.test_acc is not None:
        caption += f"; test acc at the chosen point (evaluated once, after the search): {100 * result.test_acc:.2f} %"
        if result.dense_test_acc is not None:
            start = _stage(result.sorted_points()[0])
            caption += f" ({start} {100 * result.dense_test_acc:.2f} %)"
    table.caption = caption
    return table


def search_plot(result: SearchResult, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """Validation accuracy against sparsity, the tolerance band and the chosen point marked."""
    ax = ax if ax is not None else new_axes(path is not None)
    pts, chosen = result.sorted_points(), result.chosen
    ax.plot([100 * p.sparsity for p in pts], [100 * p.val_acc for p in pts], "o-", ms=4, label="val accuracy, no retraining")
    band = 100 * (result.dense_val_acc - result.tolerance / 100)
    ax.axhline(band, color="grey", ls="--", lw=1, label=f"{_stage(pts[0])} - {result.tolerance:g} points")
    ax.plot([100 * chosen.sparsity], [100 * chosen.val_acc], "r*", ms=14, label=f"chosen: {100 * chosen.sparsity:.1f} %")
    ax.set_xlabel("global sparsity (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Threshold search ({result.criterion})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if path is not None:
        save_figure(ax.figure, path)
    return ax


def sensitivity_table(result: SensitivityResult) -> Any:
    """A ``rich.table.Table``: one row per layer, val accuracy at each sparsity of that layer alone."""
    from rich.table import Table  # lazy: start-up time, as in progress_bar

    title = f"Layer sensitivity: val acc % with one layer pruned (dense {100 * result.dense_val_acc:.2f} %)"
    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    table.add_column("weights", justify="right")
    for s in result.sparsities:
        table.add_column(f"{100 * s:g} %", justify="right")
    for n, accs in result.accuracy.items():
        table.add_row(n, f"{result.numel[n]:,}", *(f"{100 * a:.2f}" for a in accs))
    return table


def sensitivity_plot(result: SensitivityResult, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """One line per layer: validation accuracy against that layer's sparsity."""
    ax = ax if ax is not None else new_axes(path is not None)
    xs = [100 * s for s in result.sparsities]
    for n, accs in result.accuracy.items():
        ax.plot(xs, [100 * a for a in accs], "o-", ms=4, label=f"{n} ({result.numel[n]:,})")
    ax.axhline(100 * result.dense_val_acc, color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity of the one pruned layer (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Layer sensitivity (others dense, no retraining)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    if path is not None:
        save_figure(ax.figure, path)
    return ax
