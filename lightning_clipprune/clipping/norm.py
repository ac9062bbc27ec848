"""Fixed-bound clipping: the global norm (:class:`NormClip`) and every entry (:class:`ValueClip`).

The same results as ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``, so the same as
``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm" | "value")``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from lightning_clipprune._sharded import local
from lightning_clipprune._validation import check_real
from lightning_clipprune.clipping.base import (
    _FOREACH_DEVICE_TYPES,
    ClipAlgorithm,
    _clip_to_norm_,
    _grads,
    _group_by_device_and_dtype,
    _nothing,
    _ratio,
    register_clipper,
    total_norm,
)

__all__ = ["NormClip", "ValueClip", "clip_grad_norm", "clip_grad_value"]


@torch.no_grad()
def clip_grad_norm(
    parameters: Iterable[Tensor] | Tensor, max_norm: float | Tensor, norm_type: float = 2.0
) -> tuple[Tensor, Tensor]:
    r"""Clip the global p-norm of the gradients to ``max_norm`` in place (``torch.nn.utils.clip_grad_norm_``).

    .. math::

        \|g\|_p = \Big(\sum_i |g_i|^p\Big)^{1/p}, \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\right)

    where :math:`g` is the concatenation of all gradients (Pascanu et al. 2013, "On the difficulty of
    training recurrent neural networks", https://arxiv.org/abs/1211.5063).

    Args:
        parameters: parameters whose ``.grad`` is clipped; those without a gradient are ignored.
        max_norm: the bound on the norm (a float, or a 0-d tensor such as an adaptive threshold).
        norm_type: p; ``float("inf")`` for the max-norm.

    Returns:
        ``(total_norm, clip_coef)``: the norm before clipping and the factor applied.

    Example::

        >>> w = torch.zeros(2, requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> norm, coef = clip_grad_norm([w], max_norm=1.0)
        >>> round(norm.item(), 4), round(torch.linalg.vector_norm(w.grad).item(), 4)
        (5.0, 1.0)
    """
    grads = _grads(parameters)
    return _clip_to_norm_(grads, max_norm, norm_type) if grads else _nothing()


@torch.no_grad()
def clip_grad_value(
    parameters: Iterable[Tensor] | Tensor, clip_value: float, norm_type: float = 2.0
) -> tuple[Tensor, Tensor]:
    r"""Clamp every gradient entry to ``[-clip_value, clip_value]`` in place (``torch.nn.utils.clip_grad_value_``).

    .. math:: g_i \leftarrow \max(-c, \min(c, g_i))

    Args:
        parameters: parameters whose ``.grad`` is clipped; those without a gradient are ignored.
        clip_value: c, the largest allowed magnitude of an entry.
        norm_type: p of the reported norms.

    Returns:
        ``(total_norm, clip_coef)``: the p-norm before clipping and ``||g_after||_p / ||g_before||_p``
        (1 when nothing changed or the norm is 0). Value clipping is not a scaling; this ratio says how
        much of the gradient's norm survived.

    Raises:
        ValueError: a gradient is complex (entries have no order to clamp to).
    """
    grads = _grads(parameters)
    if not grads:
        return _nothing()
    if any(g.is_complex() for g in grads):
        raise ValueError(
            "value clipping clamps real numbers and cannot clamp a complex gradient: clip complex parameters by"
            " norm (algorithm 'norm'), or leave them out of clipping (GradientClipCallback's `exclude`)."
        )
    clip_value = float(clip_value)
    pre = total_norm(grads, norm_type)
    # elementwise: each rank clamps its own shard of a sharded gradient; the two norms are global
    for (device, _), group in _group_by_device_and_dtype([local(g) for g in grads]).items():
        if device.type in _FOREACH_DEVICE_TYPES:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
    return pre, _ratio(total_norm(grads, norm_type), pre)


class NormClip(ClipAlgorithm):
    """Clip the global p-norm of the gradients to ``max_norm``: :func:`clip_grad_norm` as a clipper.

    What ``Trainer(gradient_clip_val=max_norm)`` does, bit for bit.

    Args:
        max_norm: the bound on the total norm (``GradientClipCallback``'s ``clip_val``). There is no
            published default (torch and Lightning require a value); 1.0 is the common choice.

    Raises:
        ValueError: ``max_norm`` is not a finite number > 0.

    Example::

        >>> w = torch.zeros(2, requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> [round(float(t), 4) for t in NormClip(max_norm=2.5).clip([w])]  # norm 5 before, scaled by 1/2
        [5.0, 0.5]
    """

    clip_val_option: ClassVar[str | None] = "max_norm"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_real("NormClip", "max_norm", max_norm, low=0, low_open=True)

    @torch.no_grad()
    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """See :func:`clip_grad_norm`."""
        grads = _grads(parameters)
        return _clip_to_norm_(grads, self.max_norm, norm_type) if grads else _nothing()


class ValueClip(ClipAlgorithm):
    """Clamp every gradient entry to ``[-clip_value, clip_value]``: :func:`clip_grad_value` as a clipper.

    What ``Trainer(gradient_clip_val=clip_value, gradient_clip_algorithm="value")`` does, bit for bit.

    Args:
        clip_value: the largest allowed magnitude of an entry (``GradientClipCallback``'s ``clip_val``);
            no published default, 1.0 here.

    Raises:
        ValueError: ``clip_value`` is not a finite number > 0.
    """

    clip_val_option: ClassVar[str | None] = "clip_value"

    def __init__(self, clip_value: float = 1.0) -> None:
        self.clip_value = check_real("ValueClip", "clip_value", clip_value, low=0, low_open=True)

    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """See :func:`clip_grad_value`."""
        return clip_grad_value(parameters, self.clip_value, norm_type)


register_clipper("norm", NormClip)
register_clipper("value", ValueClip)
