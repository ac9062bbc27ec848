"""The weights :func:`~lightning_clipprune.posttrain.reconstruct_prune` cannot reconstruct: magnitude, with a warning.

The reconstruction needs a layer whose weight multiplies the layer's own input, seen through a forward hook:
``Linear``, ``Conv1d``, ``Conv2d`` and Hugging Face ``Conv1D`` (:func:`~lightning_clipprune.posttrain.calibration.reconstructable`)
called as modules. Every other weight the suite prunes (the Q/K/V projections of ``nn.MultiheadAttention``,
whose ``out_proj`` is also never called as a module; ``Conv3d``; ``ConvTranspose``; layer types given to
``register_layout``) is pruned to its share of the allocation by magnitude within the layer (or by N:M
magnitude), with no update, before the reconstruction starts, so the reconstructed layers after it
compensate. One warning names them and says how to keep them dense instead.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_clipprune.posttrain.calibration import reconstructable
from lightning_clipprune.pruning import Layout, compute_masks

__all__ = ["magnitude_layer_", "split_layers", "warn_fallback"]


def split_layers(model: nn.Module, params: Mapping[str, Tensor]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: layer} reconstructed, {name: why not} left to magnitude)`` of the selected weights.

    Example::

        >>> split_layers(nn.Sequential(nn.Linear(2, 2), nn.ConvTranspose1d(2, 2, 1)),
        ...              {"0.weight": None, "1.weight": None})[1]
        {'1.weight': 'a ConvTranspose1d'}
    """
    modules = dict(model.named_modules())
    supported, fallback = {}, {}
    for name in params:
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        if leaf == "weight" and reconstructable(mod):
            supported[name] = mod
        else:
            fallback[name] = f"a {type(mod).__name__}" + ("" if leaf == "weight" else f" {leaf}")
    return supported, fallback


def warn_fallback(fallback: Mapping[str, str]) -> None:
    """One warning naming the weights pruned by magnitude, why, and how to keep them dense instead."""
    if not fallback:
        return
    what = ", ".join(f"{n} ({why})" for n, why in fallback.items())
    warnings.warn(
        f"reconstruct_prune cannot reconstruct {what}: pruned by magnitude within the layer to its share, without "
        f"update (the reconstructed layers after it compensate); keep them dense with `exclude={list(fallback)!r}`.",
        stacklevel=3,
    )


@torch.no_grad()
def magnitude_layer_(
    name: str, weight: Tensor, n_prune: int | None, nm: tuple[int, int] | None, layout: Layout | None
) -> tuple[int, float]:
    """Zero the ``n_prune`` smallest ``|w|`` of ``weight`` (or keep its N largest of every M); ``(zeros, s)``.

    ``zeros`` counts every zero of the weight afterwards, those it had before included.

    Example::

        >>> w = torch.tensor([[0.1, -2.0], [0.3, 0.05]])
        >>> magnitude_layer_("w", w, 2, None, None)[0], w.tolist()
        (2, [[0.0, -2.0], [0.30000001192092896, 0.0]])
    """
    start = time.perf_counter()
    if nm is not None:
        layouts = {} if layout is None else {name: layout}
        keep = compute_masks({name: weight}, sparsity=1 - nm[0] / nm[1], pattern=f"{nm[0]}:{nm[1]}", scope="local",
                             layouts=layouts)[name]
        weight.mul_(keep)
    else:
        order = torch.sort(weight.detach().abs().flatten(), stable=True).indices[:n_prune]
        weight.detach().view(-1)[order] = 0
    return int((weight == 0).sum()), time.perf_counter() - start
