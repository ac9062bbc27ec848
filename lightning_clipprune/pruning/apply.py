"""Applying masks in place and keeping optimizer state clean.

Masked entries become exactly ``+0.0``, whatever they held (NaN and infinities included): a mask is
applied by multiplying the tensor's *bits*, seen as integers of the same width, by 1 (kept) or 0
(pruned). A float multiply would leave ``NaN * 0 = NaN`` (a gradient that went NaN would poison the
pruned weight and its momentum) and ``-0.0`` for negative weights. It is one foreach multiply over the
tensor list, as fast as the float one, and needs no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_clipprune._sharded import local

__all__ = [
    "ZERO_KEEPING_OPTIMIZERS",
    "apply_masks_",
    "int_mask",
    "keeps_pruned_weights_zero",
    "mask_factors",
    "mask_optimizer_state_",
    "nonfinite_names",
]

#: Signed integer dtype of each element size: how a float tensor's bits are seen.
_BITS: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_INTS = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def _as_bits_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` as 1/0 integers of ``like``'s element size (itself when it already is one)."""
    dtype = _BITS[like.element_size()]
    if mask.dtype == dtype and mask.device == like.device:
        return mask
    if mask.dtype == torch.bool:  # already 0/1: one conversion (``mask != 0`` first costs 3x more on the CPU)
        return int_mask(mask, dtype, like.device)
    return (mask != 0).to(device=like.device, dtype=dtype)


def int_mask(mask: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The bool ``mask`` as 1/0 integers of ``dtype`` on ``device``: numpy converts on the CPU, 3x faster than torch.

    Example::

        >>> int_mask(torch.tensor([True, False]), torch.int32, torch.device("cpu"))
        tensor([1, 0], dtype=torch.int32)
    """
    if mask.device.type == "cpu" and torch.device(device).type == "cpu" and mask.is_contiguous():
        return torch.from_numpy(mask.numpy().astype(_NUMPY_INTS[dtype]))
    return mask.to(device=device, dtype=dtype)


def apply_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Set, in place, the entries of each tensor where its mask is zero to exactly ``+0.0`` (no sync).

    Used for weights, gradients and optimizer state. ``masks`` are bool (True = kept), float (non-zero =
    kept) or, on the hot path, the integer masks of :func:`mask_factors` (no conversion then). NaN and
    infinities in masked entries become ``+0.0`` too; kept entries are left bit for bit.

    Example::

        >>> t = torch.tensor([float("nan"), -2.0, float("inf")])
        >>> apply_masks_([t], [torch.tensor([False, True, False])])
        >>> t
        tensor([ 0., -2.,  0.])
    """
    if not tensors:
        return
    with torch.no_grad():  # (no_grad lets a parameter be viewed as integers and changed in place)
        bits = [t.view(_BITS[t.element_size()]) for t in tensors]
        ints = [m if m.dtype is b.dtype else _as_bits_mask(m, b) for m, b in zip(masks, bits, strict=True)]
        torch._foreach_mul_(bits, ints)


def mask_optimizer_state_(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Set the optimizer state of pruned entries to ``+0.0``: every floating state tensor of the parameter's shape.

    That covers SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``... while scalars such as ``step`` are
    left alone. Without it a pruned weight would move again at the next step from its stale momentum.
    ``masks`` are bool, float or :func:`mask_factors` masks.
    """
    tensors, their_masks = [], []
    for p, m in zip(params, masks, strict=True):
        for value in (optimizer.state.get(p) or {}).values():
            if isinstance(value, Tensor) and value.is_floating_point() and value.shape == p.shape:
                tensors.append(local(value))  # a sharded parameter: its local shard
                their_masks.append(m)
    apply_masks_(tensors, their_masks)


def mask_factors(masks: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Bool ``masks`` as the integer masks :func:`apply_masks_` multiplies by on the hot path.

    1 (kept) or 0 (pruned), of the element size of ``like`` (``int32`` for float32, ``int16`` for
    bfloat16) and on its device: 4 bytes per fp32 weight, bought for a gradient pass much faster than with
    the bool mask on CPU (measured in ``benchmarks/bench_prune_step.md``), and multiplying the bits makes a
    pruned entry +0.0 even where the gradient is NaN or inf.

    Example::

        >>> mask_factors([torch.tensor([True, False])], [torch.zeros(2, dtype=torch.float16)])
        [tensor([1, 0], dtype=torch.int16)]
    """
    return [_as_bits_mask(m, t) for m, t in zip(masks, like, strict=True)]


def nonfinite_names(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (one host synchronisation for all of them).

    Example::

        >>> nonfinite_names({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
        ['b']
    """
    tensors = {n: t for n, t in tensors.items() if t.is_floating_point() and t.numel()}
    if not tensors:
        return []
    first = next(iter(tensors.values()))
    with torch.no_grad():
        values = [t.detach() for t in tensors.values()]
        # A tensor holding NaN or inf has a non-finite 2-norm: one fast foreach pass and one sync for all.
        # Only when some 2-norm is not finite (NaN, inf, or a finite overflow) the exact max-abs norm decides.
        if bool(torch.stack([n.to(first.device, torch.float32) for n in torch._foreach_norm(values, 2)]).isfinite().all()):
            return []
        norms = torch._foreach_norm(values, math.inf)
        flags = torch.stack([n.to(first.device, torch.float32) for n in norms]).isfinite().tolist()
    return [name for name, ok in zip(tensors, flags, strict=True) if not ok]


#: Optimizers (exact classes, not subclasses) whose step leaves an entry at exactly zero when its weight,
#: its gradient and its state are zero: every update term is a multiple of the gradient, of the state or
#: of the weight (weight decay), and every division has ``eps > 0`` in its denominator. Each is shown to
#: keep pruned weights and state at exactly zero over many steps in ``tests/test_prune_hardening.py``
#: (and with NaN gradients in ``tests/test_trust_numerics.py``: masked gradients are exact zeros).
ZERO_KEEPING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)


def keeps_pruned_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step of ``optimizer`` provably keeps pruned weights at zero once their gradients are zeroed
    before the step and their optimizer state was zeroed at the pruning event.

    True only for the exact classes in :data:`ZERO_KEEPING_OPTIMIZERS` with ``eps > 0`` in every parameter's
    dtype (Adam's ``0 / (sqrt(0) + eps)``; its default 1e-8 is 0 in float16), and neither ``fused`` (a separate kernel, not verified here) nor
    ``differentiable``. ``maximize``, ``amsgrad``, momentum, Nesterov, weight decay (L2 or decoupled) and
    ``foreach`` keep zeros. Anything else (a subclass, another optimizer) is not trusted: the caller
    re-masks the weights after every step. (Adamax is left out: its weights stay zero but its ``exp_inf``
    state becomes ``eps``, not zero.)

    Example::

        >>> from torch import nn
        >>> p = [nn.Parameter(torch.zeros(2))]
        >>> keeps_pruned_weights_zero(torch.optim.AdamW(p)), keeps_pruned_weights_zero(torch.optim.LBFGS(p))
        (True, False)
    """
    if type(optimizer) not in ZERO_KEEPING_OPTIMIZERS:
        return False
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("differentiable"):
            return False
        eps = group.get("eps", 1.0)
        if not (isinstance(eps, (int, float)) and eps > 0):
            return False
        # the step adds eps in the parameter's dtype: Adam's 1e-8 is 0 in float16, and 0 / 0 is NaN
        dtypes = {p.dtype for p in group["params"] if p.is_floating_point()}
        if any(torch.tensor(eps, dtype=dtype).item() == 0 for dtype in dtypes):
            return False
    return True
