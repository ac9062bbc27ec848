"""Models reparametrised by forward pre-hooks (``torch.nn.utils.prune``, the old ``weight_norm``): copied and
stored as their effective weights; ``torch.compile``'d modules copied as the modules they wrap.

``torch.nn.utils.prune`` replaces ``weight`` by ``weight_orig`` (a parameter) and ``weight_mask`` (a buffer)
and recomputes ``weight = weight_orig * weight_mask`` as a plain attribute before each forward; Lightning's
``ModelPruning`` does the same until it makes the pruning permanent. ``copy.deepcopy`` refuses such a model
(the attribute is not a graph leaf), and its state dict holds the dense ``weight_orig`` beside the mask.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_clipprune.pruning.selection import torch_prune_hooks

__all__ = ["fold_pruning_masks", "inference_copy", "uncompiled"]


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode, the original untouched; ``torch.nn.utils.prune`` made permanent in it.

    Tensors that forward pre-hooks compute and keep as plain attributes (not graph leaves, which
    ``copy.deepcopy`` refuses) are copied detached. A ``torch.compile``'d module (``model`` itself or a
    submodule) is replaced in the copy by the module it wraps (``_orig_mod``): the layers' forward hooks
    fire there, which they do not inside dynamo's graph, and their names lose the ``_orig_mod.`` part.

    Example::

        >>> import torch.nn.utils.prune as tp
        >>> net = nn.Linear(4, 4); _ = tp.l1_unstructured(net, "weight", amount=0.5)
        >>> sorted(n for n, _ in inference_copy(net).named_parameters())
        ['bias', 'weight']
    """
    computed = [
        (m, k, v) for m in model.modules() for k, v in list(vars(m).items()) if isinstance(v, Tensor) and not v.is_leaf
    ]
    for m, k, v in computed:
        vars(m)[k] = v.detach()
    try:
        out = copy.deepcopy(model)
    finally:
        for m, k, v in computed:
            vars(m)[k] = v
    out = uncompiled(out)
    from torch.nn.utils import prune

    for _, m, hook in torch_prune_hooks(out):
        prune.remove(m, hook._tensor_name)
    return out.eval()


def uncompiled(module: nn.Module) -> nn.Module:
    """``module`` with every ``torch.compile``'d module in it (itself included) replaced by the module it wraps.

    Changes ``module`` in place (call it on a copy) and returns it, or the module it wraps when it is compiled.

    Example::

        >>> net = nn.Sequential(torch.compile(nn.Linear(4, 4)))
        >>> [n for n, _ in uncompiled(net).named_modules()]
        ['', '0']
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was ever compiled
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is None:
        return module
    while isinstance(module, wrapper):
        module = module._orig_mod
    for name, child in list(module.named_children()):
        plain = uncompiled(child)
        if plain is not child:
            setattr(module, name, plain)
    return module


def fold_pruning_masks(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each ``torch.nn.utils.prune`` pair ``<name>_orig`` / ``<name>_mask`` replaced by ``<name>``,
    their product (what ``prune.remove`` leaves), in the place of ``<name>_orig``; everything else as it is.

    A pair is folded only when both are tensors of the same shape, the mask holds only 0 and 1, and
    ``<name>`` itself is not in ``state``.

    Example::

        >>> fold_pruning_masks({"w_orig": torch.tensor([2.0, 3.0]), "w_mask": torch.tensor([0.0, 1.0])})
        {'w': tensor([0., 3.])}
    """
    pairs = {}
    for key, value in state.items():
        if not key.endswith("_orig"):
            continue
        base = key[: -len("_orig")]
        mask = state.get(base + "_mask")
        if (
            base not in state and isinstance(value, Tensor) and isinstance(mask, Tensor)
            and mask.shape == value.shape and bool(torch.logical_or(mask == 0, mask == 1).all())
        ):
            pairs[key] = base
    if not pairs:
        return dict(state)
    masks = {base + "_mask" for base in pairs.values()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in pairs:
            base = pairs[key]
            out[base] = (value * state[base + "_mask"].to(value.dtype)).detach()
        elif key not in masks:
            out[key] = value
    return out
