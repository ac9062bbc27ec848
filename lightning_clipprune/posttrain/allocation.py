"""Per-layer sparsities of a post-training prune: how many entries each layer loses, ``round(s * n)`` in all.

- ``"global_magnitude"`` (the default): the counts one global magnitude threshold gives at the target
  (``compute_masks(..., ranking="raw")``, with its default ceiling: each layer keeps at least 1 % and the
  largest weight of every output row). On LeNet-300-100 this did best (issue #23, and
  ``benchmarks/bench_posttrain.md``): layers the network needs less of are pruned further.
- ``"er"``: Erdos-Renyi budgets (:func:`~lightning_clipprune.pruning.erk_counts` over each weight's
  ``(out, fan-in)`` matrix): narrow layers stay denser.
- ``"uniform"``: the same sparsity in every layer.
- a dict ``{parameter name or fnmatch pattern: sparsity}``: those layers at those sparsities, the others
  sharing the rest of the target uniformly.

Every allocation prunes exactly ``round(sparsity * total)`` entries over the selected weights.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_clipprune._validation import bad_value
from lightning_clipprune.pruning import (
    STANDARD_LAYOUT,
    Layout,
    check_layer_sparsity,
    compute_masks,
    erk_counts,
    matrix_shape,
    most_under_ceiling,
    resolve_layer_sparsity,
)
from lightning_clipprune.pruning.ranking import DEFAULT_MAX_LAYER_SPARSITY, round_to_total

__all__ = ["ALLOCATIONS", "layer_counts", "most_prunable", "spread"]

#: The named allocations (a dict is also accepted).
ALLOCATIONS: tuple[str, ...] = ("global_magnitude", "er", "uniform")


def spread(sizes: Mapping[str, int], k: int) -> dict[str, int]:
    """``k`` spread over tensors of ``sizes`` in proportion, rounded by largest remainder: exactly ``k``.

    Example::

        >>> spread({"a": 10, "b": 30}, 7)
        {'a': 2, 'b': 5}
    """
    total = sum(sizes.values())
    if total == 0:
        return dict.fromkeys(sizes, 0)
    return round_to_total({x: k * n / total for x, n in sizes.items()}, k, sizes, sizes)


def _from_dict(
    weights: Mapping[str, Tensor], sparsity: float | None, mapping: Mapping[str, Any]
) -> dict[str, int]:
    owner = "reconstruct_prune"
    checked = check_layer_sparsity(owner, mapping, "allocation") or {}
    names = list(weights)
    named = {n for n in names if n in checked or any(fnmatch.fnmatchcase(n, k) for k in checked)}
    fixed_rates = resolve_layer_sparsity(names, checked, 0.0, "allocation")
    fixed = {n: int(round(fixed_rates[n] * weights[n].numel())) for n in named}
    rest = {n: weights[n].numel() for n in names if n not in named}
    if sparsity is None:
        if rest:
            raise bad_value(
                owner,
                "sparsity",
                f"a number when `allocation` does not name every layer (unnamed: {list(rest)})",
                None,
            )
        return fixed
    k = int(round(sparsity * sum(w.numel() for w in weights.values())))
    left = k - sum(fixed.values())
    if not 0 <= left < max(1, sum(rest.values())) or (not rest and left):
        reach = (
            "no other layer is left"
            if not rest
            else f"the other layers {list(rest)} would need {left} of {sum(rest.values())}"
        )
        raise ValueError(
            f"`reconstruct_prune(allocation=...)` cannot reach sparsity={sparsity}: {reach} entries pruned; "
            "change the dict or the sparsity (or pass sparsity=None with every layer named)."
        )
    return {**fixed, **spread(rest, left)}


def layer_counts(
    weights: Mapping[str, Tensor],
    sparsity: float | None,
    allocation: str | Mapping[str, Any],
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, int]:
    """How many entries of each weight to prune under ``allocation`` (see this module's docstring).

    Args:
        weights: ``{name: weight}``, in order.
        sparsity: target fraction of pruned entries over all of them, in [0, 1) (None: a dict naming every layer).
        allocation: "global_magnitude", "er", "uniform" or ``{name or fnmatch pattern: sparsity}``.
        layouts: ``{name: Layout}`` of weights not stored ``(out, in, *k)``.

    Raises:
        ValueError: for an unknown allocation or a target it cannot reach.

    Example::

        >>> import torch
        >>> w = {"a": torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "b": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
        >>> layer_counts(w, 0.5, "global_magnitude")
        {'a': 2, 'b': 2}
        >>> layer_counts(w, 0.5, {"a": 0.25})
        {'a': 1, 'b': 3}
    """
    layouts = dict(layouts or {})
    if isinstance(allocation, Mapping):
        return _from_dict(weights, sparsity, allocation)
    if allocation not in ALLOCATIONS:
        raise bad_value(
            "reconstruct_prune",
            "allocation",
            f"one of {', '.join(map(repr, ALLOCATIONS))} or a dict",
            allocation,
        )
    if sparsity is None:
        raise bad_value("reconstruct_prune", "sparsity", "a number in [0, 1) with a named allocation", None)
    k = int(round(sparsity * sum(w.numel() for w in weights.values())))
    if allocation == "uniform":
        return spread({n: w.numel() for n, w in weights.items()}, k)
    if allocation == "er":
        shapes = {n: matrix_shape(w.shape, layouts.get(n, STANDARD_LAYOUT)) for n, w in weights.items()}
        return erk_counts(shapes, k)
    most = most_prunable(weights, allocation, layouts)
    if k > most:
        total = sum(w.numel() for w in weights.values())
        raise ValueError(
            f"`reconstruct_prune`: sparsity {sparsity} cannot be met with allocation='global_magnitude' (each"
            f" layer keeps at least {1 - DEFAULT_MAX_LAYER_SPARSITY:.0%} of its weights and the largest weight of"
            f" every output row): at most {most / total:.4f} of these weights can be pruned. Lower the sparsity,"
            " or pass allocation='er', 'uniform' or a dict of per-layer sparsities."
        )
    masks = compute_masks(dict(weights), sparsity=sparsity, ranking="raw", layouts=layouts)
    return {n: m.numel() - int(m.count_nonzero()) for n, m in masks.items()}


def most_prunable(
    weights: Mapping[str, Tensor], allocation: str | Mapping[str, Any], layouts: Mapping[str, Layout] | None = None
) -> int:
    """The most entries of ``weights`` that ``allocation`` can prune.

    Under "global_magnitude" each layer keeps at least 1 % of its weights and the largest weight of every
    output row (:func:`~lightning_clipprune.pruning.layer_cap`); the other allocations can prune every entry.

    Example::

        >>> import torch
        >>> w = {"a": torch.zeros(10, 10)}
        >>> most_prunable(w, "global_magnitude"), most_prunable(w, "er")
        (90, 100)
    """
    if allocation != "global_magnitude":
        return sum(w.numel() for w in weights.values())
    return most_under_ceiling(weights, DEFAULT_MAX_LAYER_SPARSITY, layouts)
