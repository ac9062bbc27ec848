"""Pure pruning core: which parameters are prunable, importance criteria, mask computation, applying masks.

No Lightning import here: everything is tested on hand-built tensors and modules.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_prunable_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_bias: bool = False,
    keep_first_and_last: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters that pruning (and sparsity reporting) considers, by their ``named_parameters`` name.

    By default the ``weight`` of every ``Linear`` and ``Conv1d/2d/3d`` layer; biases only when
    ``prune_bias``; normalisation, embedding and recurrent layers never unless named in ``include``.
    A tensor reached through two modules (tied weights) appears once, under its first name.

    Args:
        module: the network.
        include: ``fnmatch`` patterns over parameter names (``"features.*.weight"``). When given, the
            parameters matching it are selected whatever their layer type (replaces the default).
        exclude: ``fnmatch`` patterns of parameter names to leave dense, applied after ``include``.
        prune_bias: also select the ``bias`` of the default layer types.
        keep_first_and_last: leave the first and the last selected layer (in module order) dense.

    Returns:
        An ordered ``{name: parameter}`` dict, in ``named_parameters`` order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> list(select_prunable_parameters(net))
        ['0.weight', '2.weight']
    """
    seen: set[int] = set()
    selected: dict[str, nn.Parameter] = {}
    default_names: set[str] = set()
    if include is None:
        for mod_name, mod in module.named_modules():
            if isinstance(mod, PRUNABLE_TYPES):
                prefix = f"{mod_name}." if mod_name else ""
                default_names.add(prefix + "weight")
                if prune_bias:
                    default_names.add(prefix + "bias")
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        chosen = _matches(name, include) if include is not None else name in default_names
        if chosen and not _matches(name, exclude):
            seen.add(id(param))
            selected[name] = param
    if keep_first_and_last and selected:
        weights = [n for n in selected if n.endswith("weight")] or list(selected)
        for n in {weights[0], weights[-1]}:
            layer = n.rsplit(".", 1)[0] if "." in n else ""
            for key in [k for k in selected if (k.rsplit(".", 1)[0] if "." in k else "") == layer]:
                del selected[key]
    return selected
