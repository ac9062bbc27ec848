"""What pruning leaves dense, and why: the share of the model that the selection covers, in words.

A model whose prunable weights are a small share of its parameters (an embedding-heavy language model,
a layer type nobody registered) reaches its sparsity target while the model as a whole stays mostly
dense. :func:`dense_modules` names each module left dense and the reason, so that a callback can say so
once at set-up (``MagnitudePruneCallback`` warns below :data:`LOW_SHARE`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence
from typing import NamedTuple

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_clipprune.pruning.selection import PRUNABLE_TYPES, tied_names
from lightning_clipprune.pruning.wrappers import (
    SPECTRAL_REASON,
    adapter_prefixes,
    dense_wrapper_reason,
    is_hf_conv1d,
    parametrization_types,
)

__all__ = ["LOW_SHARE", "DenseModule", "dense_modules", "prunable_share"]

#: Below this share of all parameters, the prunable ones are "little": one warning at set-up.
LOW_SHARE = 0.5

_DEFAULT_DENSE = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RNNBase)


class DenseModule(NamedTuple):
    """A module with parameters left dense: its name, how many parameters, and why."""

    name: str
    numel: int
    reason: str


def prunable_share(module: nn.Module, selected: Collection[str]) -> float:
    """Fraction of ``module``'s parameters (each tensor once) that the names in ``selected`` hold.

    Example::

        >>> net = nn.Sequential(nn.Embedding(100, 4), nn.Linear(4, 4))
        >>> round(prunable_share(net, ["1.weight"]), 3)
        0.038
    """
    params = {n: p for n, p in module.named_parameters() if not is_lazy(p)}  # a lazy layer's size is not known yet
    total = sum(p.numel() for p in params.values())
    ids = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in set(selected)}
    return sum(p.numel() for p in params.values() if id(p) in ids) / total if total else 1.0


def _reason(mod: nn.Module, names: list[str], tied: dict[str, str], how: dict) -> str:
    """Why the parameters ``names`` of ``mod`` are left dense, in words (the first reason that applies)."""
    for n in names:
        if n in tied:
            return f"tied to `{tied[n]}`, which is pruned only with include_tied=True (or by naming it in `include`)"
    if type(mod).__name__ == "ParametrizationList" and parametrization_types(mod) == ["_SpectralNorm"]:
        return SPECTRAL_REASON
    if type(mod).__name__ == "ParametrizationList":
        return (
            "a parametrised weight (nn.utils.parametrize): a zero of `original` is not a zero of the weight;"
            " remove the parametrisation before pruning"
        )
    if any(n.startswith(how["adapters"]) for n in names) and how["adapters"]:
        return "LoRA adapter, never pruned (merge it into the base weight first)"
    if all(any(fnmatch.fnmatchcase(n, p) for p in how["exclude"]) for n in names):
        return "excluded by `exclude`"
    if how["include"] is not None:
        return "not named in `include`"
    prunable = isinstance(mod, PRUNABLE_TYPES) or is_hf_conv1d(mod)
    wrapped = dense_wrapper_reason(mod) if prunable else None
    if wrapped:
        return wrapped
    if all(not p.requires_grad for p in mod.parameters(recurse=False)):
        return "frozen (prune_frozen=True prunes it)"
    if prunable or isinstance(mod, nn.MultiheadAttention):
        return "biases (prune_bias=True prunes them)"
    if isinstance(mod, _DEFAULT_DENSE):
        return f"{type(mod).__name__}, left dense by default (name its weight in `include` to prune it)"
    return (
        f"type {type(mod).__name__} not recognised (name its weight in `include`, or"
        " `register_layout(..., prunable=True)`)"
    )


def dense_modules(
    module: nn.Module,
    selected: Collection[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[DenseModule]:
    """The modules whose own parameters are not in ``selected``, largest first, each with the reason.

    Args:
        module: the network.
        selected: the pruned parameter names (``select_prunable_parameters``).
        include: the ``include`` patterns the selection was made with (None: the default selection).
        exclude: the ``exclude`` patterns it was made with.

    Example::

        >>> net = nn.Sequential(nn.Embedding(100, 4), nn.Linear(4, 4))
        >>> dense_modules(net, ["1.weight"])[0]
        DenseModule(name='0', numel=400, reason='Embedding, left dense by default (name its weight in `include` to prune it)')
    """
    chosen = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in set(selected)}
    tied = {
        a: ", ".join(x for x in [name, *aliases] if x != a)
        for name, aliases in tied_names(module).items()
        for a in [name, *aliases]
    }
    how = {"include": include, "exclude": tuple(exclude), "adapters": tuple(adapter_prefixes(module))}
    seen: set[int] = set()
    out = []
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [(prefix + k, p) for k, p in mod.named_parameters(recurse=False) if id(p) not in chosen | seen]
        seen.update(id(p) for _, p in own)
        if own:
            names = [n for n, _ in own]
            size = sum(0 if is_lazy(p) else p.numel() for _, p in own)
            reason = "not materialised yet (a lazy layer)" if all(is_lazy(p) for _, p in own) else _reason(mod, names, tied, how)
            out.append(DenseModule(mod_name or "(root)", size, reason))
    return sorted(out, key=lambda d: -d.numel)
