"""How far can a trained model be pruned without retraining? Threshold search and layer sensitivity.

The library part, one module per job (torch and Lightning's neighbours only; nothing of the Hydra app):

* :mod:`~lightning_clipprune.search.ranking`: accuracy on a loader (:func:`evaluate`), the Taylor gradient
  (:func:`taylor_gradients`) and the one global ranking of the prunable weights (:class:`Ranking`).
* :mod:`~lightning_clipprune.search.threshold`: :func:`search_threshold`, a coarse grid of sparsities on the
  validation split, then a bisection; :class:`SearchResult`.
* :mod:`~lightning_clipprune.search.reconstruction`: :func:`search_reconstruction`, the same search with each
  point pruned by layer-wise reconstruction (:func:`~lightning_clipprune.posttrain.reconstruct_prune`).
* :mod:`~lightning_clipprune.search.sensitivity`: :func:`layer_sensitivity` (one layer pruned at a time),
  :func:`suggest_layer_sparsity`, :func:`compare_allocation`.
* :mod:`~lightning_clipprune.search.plots`: csv, matplotlib figures and rich tables (imported when drawn).

The command line, ``python -m lightning_clipprune.search RUN`` (rebuilding a run of the app from its folder,
loading its weights, fine-tuning), is the app's: :mod:`lightning_clipprune.app.search_cli`. Its public names
(``main``, ``compose_run_config``, ``run_overrides``, ``load_weights``, ``save_pruned``, ``finetune``) stay
importable from here for older code. Every name here is looked up on first use, so importing the search
imports neither Hydra nor (until a name is used) torch.

Example::

    from lightning_clipprune.search import search_threshold

    result = search_threshold(model, val_loader, tolerance=0.5)   # percentage points of val accuracy
    result.chosen.sparsity, result.chosen.threshold
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_clipprune.search.ranking import (
        Ranking,
        evaluate,
        loader_batches,
        prunable_parameters,
        taylor_gradients,
    )
    from lightning_clipprune.search.reconstruction import METHODS, search_reconstruction
    from lightning_clipprune.search.sensitivity import (
        DEFAULT_LAYER_GRID,
        SensitivityResult,
        compare_allocation,
        layer_sensitivity,
        layer_sparsity_snippets,
        suggest_layer_sparsity,
    )
    from lightning_clipprune.search.threshold import DEFAULT_GRID, SearchPoint, SearchResult, search_threshold

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_LAYER_GRID",
    "METHODS",
    "Ranking",
    "SearchPoint",
    "SearchResult",
    "SensitivityResult",
    "compare_allocation",
    "compose_run_config",
    "evaluate",
    "finetune",
    "layer_sensitivity",
    "layer_sparsity_snippets",
    "load_weights",
    "loader_batches",
    "main",
    "prunable_parameters",
    "run_overrides",
    "save_pruned",
    "search_reconstruction",
    "search_threshold",
    "suggest_layer_sparsity",
    "taylor_gradients",
]

# Every name is looked up on first use: `python -m lightning_clipprune.search --help` imports this package
# first and answers before torch loads. The command line's names live on the app side; the one place the
# library names the app, and only when asked.
_APP_CLI = "lightning_clipprune.app.search_cli"
_LAZY = {
    **dict.fromkeys(("Ranking", "evaluate", "loader_batches", "prunable_parameters", "taylor_gradients"),
                    "lightning_clipprune.search.ranking"),
    **dict.fromkeys(("METHODS", "search_reconstruction"), "lightning_clipprune.search.reconstruction"),
    **dict.fromkeys(("DEFAULT_LAYER_GRID", "SensitivityResult", "compare_allocation", "layer_sensitivity",
                     "layer_sparsity_snippets", "suggest_layer_sparsity"), "lightning_clipprune.search.sensitivity"),
    **dict.fromkeys(("DEFAULT_GRID", "SearchPoint", "SearchResult", "search_threshold"),
                    "lightning_clipprune.search.threshold"),
    **dict.fromkeys(("compose_run_config", "finetune", "load_weights", "main", "run_overrides", "save_pruned"), _APP_CLI),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_clipprune.search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
