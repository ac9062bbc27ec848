"""Which tensors a global ranking pruned up to their ceiling: :func:`saturated_layers`, the layers a warning names.

Moved out of :mod:`~lightning_clipprune.pruning.ranking` (which caps the ranking, :func:`~.ranking.layer_cap`) to
keep that module to the ranking itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from lightning_clipprune._choices import CEILING
from lightning_clipprune.pruning.ranking import count_kept, layer_cap
from lightning_clipprune.pruning.selection import STANDARD_LAYOUT, Layout, output_rows

__all__ = ["saturated_layers"]


def saturated_layers(
    masks: Mapping[str, Tensor],
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout] | None = None,
    level: float = CEILING,
    channels: bool = False,
) -> dict[str, float]:
    """``{name: sparsity}`` of the tensors pruned up to their ceiling (:func:`layer_cap`), or, with no
    ceiling (None), to ``level`` or more: the layers a warning should name. With ``channels`` (the "channel"
    pattern) the ceiling counts output rows, as the global row ranking does: ``floor(c * rows)``, never all.

    Example::

        >>> import torch
        >>> saturated_layers({"a": torch.tensor([[False, True], [False, True]])}, 0.99)
        {'a': 0.5}
    """
    layouts = layouts or {}
    out = {}
    for name, m in masks.items():
        pruned = m.numel() - count_kept(m)
        if channels and m.dim() >= 2:
            rows = output_rows(m, layouts.get(name, STANDARD_LAYOUT))
            dead, n_rows = int((~rows.any(dim=1)).sum()), rows.shape[0]
            cap = n_rows * level if max_layer_sparsity is None else min(
                math.floor(max_layer_sparsity * n_rows + 1e-9), n_rows - 1
            )
            hit = dead > 0 and dead >= cap
        elif max_layer_sparsity is not None:
            hit = pruned > 0 and pruned >= layer_cap(m.shape, max_layer_sparsity, layouts.get(name, STANDARD_LAYOUT))
        else:
            hit = pruned >= level * m.numel()
        if hit:
            out[name] = pruned / m.numel()
    return out
