"""Unit-wise adaptive gradient clipping (AGC), Brock et al. 2021: :class:`AGC` and :func:`adaptive_grad_clip`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clipprune._sharded import (
    any_sharded,
    counts_here,
    global_norms,
    is_rank_zero,
    is_sharded,
    local,
    reduce_norm_parts,
)
from lightning_clipprune._validation import check_real
from lightning_clipprune.clipping.base import _NORM_EPS, ClipAlgorithm, _nothing, _ratio, register_clipper

__all__ = ["AGC", "adaptive_grad_clip"]


def _unitwise_norm(x: Tensor, norm_type: float) -> Tensor:
    """Norm per output unit (over all dims but 0, kept for broadcasting); whole-tensor norm for ndim <= 1."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def _transposed_units(x: Tensor, groups: int) -> Tensor:
    """``x`` stored ``(in, out / groups, *k)`` (ConvTranspose, Hugging Face ``Conv1D``) as ``(groups, in / groups,
    out / groups, *k)``: an output unit is one ``[g, :, j]`` slice, its norm over dims 1 and 3+."""
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def _transposed_norm(x: Tensor, norm_type: float) -> Tensor:
    return torch.linalg.vector_norm(x, norm_type, dim=(1, *range(3, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip(
    parameters: Iterable[Tensor] | Tensor,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    layouts: Mapping[int, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Unit-wise adaptive gradient clipping (AGC), in place.

    Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization", https://arxiv.org/abs/2102.06171, eq. 3. For every unit :math:`i` (a row of a
    weight: all dimensions but the first; a whole bias or other 1-d/0-d tensor):

    .. math::

        G_i \leftarrow \begin{cases}
            \lambda \dfrac{\max(\|W_i\|, \epsilon)}{\max(\|G_i\|, 10^{-6})} G_i
                & \text{if } \dfrac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda \\
            G_i & \text{otherwise}
        \end{cases}

    The same computation as timm's ``utils/agc.py``. The paper does not clip the final classifier
    layer; leave it out of ``parameters``.

    Args:
        parameters: parameters whose ``.grad`` is clipped against their own values.
        clip_factor: lambda, the largest allowed ratio of gradient norm to weight norm per unit.
        eps: epsilon, the floor on the weight norm (so zero-initialised weights can move).
        norm_type: p of the unit-wise and the reported norms.
        layouts: ``{id(parameter): Layout}`` for weights stored ``(in, out, *k)`` (a
            :class:`~lightning_clipprune.pruning.Layout` with ``transposed=True``: ``ConvTranspose``, Hugging
            Face ``Conv1D``), whose units are columns, not rows; others are ``(out, in, *k)``.

    Returns:
        ``(total_norm, clip_coef)``: the global p-norm of the gradients before clipping and
        ``||g_after||_p / ||g_before||_p``.

    Raises:
        ValueError: with sharded parameters (DTensors), a weight whose units are split across ranks: any
            placement ``Shard(d)`` with ``d != 0`` (tensor parallelism), or a transposed layout sharded at
            all. Under dim-0 sharding (FSDP2's ``fully_shard``) a row lives in one shard and is clipped
            there; a sharded 1-d unit (a bias) gets its weight and gradient norms reduced over the ranks.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return _nothing()
    sharded = any_sharded(p.grad for p in params)
    # Under sharding a row lives in one shard (dim-0 sharding), but a 1-d or 0-d unit (a whole bias) is split
    # across ranks: its weight and gradient norms are reduced first, one all_reduce for all of them.
    whole: dict[int, tuple[Tensor, Tensor]] = {}
    if sharded:
        vectors = [p for p in params if p.ndim <= 1 and is_sharded(p.grad)]
        if vectors:
            norms = global_norms([p.detach() for p in vectors] + [p.grad for p in vectors], norm_type)
            whole = {id(p): (norms[i], norms[len(vectors) + i]) for i, p in enumerate(vectors)}
    first_device = local(params[0].grad).device
    unit_pre: list[Tensor] = []
    unit_post: list[Tensor] = []
    for p in params:
        layout = layouts.get(id(p)) if layouts else None
        transposed = layout is not None and layout.transposed and p.ndim >= 2
        if id(p) in whole:  # global unit norms, the same on every rank: counted once, by rank 0
            w_norm, grad_norm = whole[id(p)]
            max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
            g = local(p.grad)
            counted = is_rank_zero()
        else:
            if sharded:
                _check_units_whole(p, transposed)
            g = _transposed_units(local(p.grad), layout.groups) if transposed else local(p.grad)
            w = _transposed_units(local(p.detach()), layout.groups) if transposed else local(p.detach())
            unit_norm = _transposed_norm if transposed else _unitwise_norm
            max_norm = unit_norm(w, norm_type).clamp(min=eps).mul_(clip_factor)
            grad_norm = unit_norm(g, norm_type)
            counted = counts_here(p.grad) if sharded else True
        # scale 1 where the unit is within bounds, so those entries stay bit-identical
        scale = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=_NORM_EPS))
        if transposed:
            p.grad.copy_((g * scale).reshape(p.grad.shape))
        else:
            g.mul_(scale)
        if counted:
            unit_pre.append(grad_norm.flatten().to(first_device))
            unit_post.append((grad_norm * scale).flatten().to(first_device))
    # The p-norm of all units' p-norms is the global p-norm: no extra pass over the gradients.
    if not sharded:
        pre = torch.linalg.vector_norm(torch.cat(unit_pre), norm_type)
        return pre, _ratio(torch.linalg.vector_norm(torch.cat(unit_post), norm_type), pre)
    # Sharded: this rank's counted units, then one all_reduce for the norms before and after.
    dtype = local(params[0].grad).dtype
    parts = [torch.linalg.vector_norm(torch.cat(u), norm_type) if u else torch.zeros((), dtype=dtype,
             device=first_device) for u in (unit_pre, unit_post)]
    pre, post = reduce_norm_parts(torch.stack(parts), norm_type).unbind()
    return pre, _ratio(post, pre)


def _check_units_whole(p: Tensor, transposed: bool) -> None:
    """Refuse a sharded weight whose units (rows; columns when ``transposed``) are split across ranks."""
    placements = tuple(getattr(p.grad, "placements", ())) or tuple(getattr(p, "placements", ()))
    if any(pl.is_shard() and (transposed or pl.dim != 0) for pl in placements):
        unit = "column of an (in, out) weight" if transposed else "row"
        raise ValueError(
            f"AGC needs each unit (a {unit}) on one rank, but a weight of shape {tuple(p.shape)} has the "
            f"placements {placements}, which split units across ranks: shard weights on dim 0 only (FSDP2's "
            "fully_shard, tensor_parallel_size=1), exclude this weight, or use algorithm='norm'."
        )


class AGC(ClipAlgorithm):
    r"""Unit-wise adaptive gradient clipping: :func:`adaptive_grad_clip` as a clipper.

    Each unit's gradient norm is held to ``clip_factor`` times the norm of its weights (floored at
    ``eps``); the formula and the paper are in :func:`adaptive_grad_clip`.

    Args:
        clip_factor: lambda (``GradientClipCallback``'s ``clip_val``). The default is NFNets' value,
            tuned for batch 4096; smaller batches have noisier gradients and want a larger lambda,
            about ``0.01 * sqrt(4096 / batch_size)`` (0.08 at batch 64).
        eps: the floor on the weight norm, so zero-initialised (or pruned) units can still move.

    Raises:
        ValueError: an argument is not a finite number > 0.
    """

    clip_val_option: ClassVar[str | None] = "clip_factor"

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        self.clip_factor = check_real("AGC", "clip_factor", clip_factor, low=0, low_open=True)
        self.eps = check_real("AGC", "eps", eps, low=0, low_open=True)
        self._layouts: dict[int, Any] = {}

    def set_layouts(self, layouts: Mapping[int, Any]) -> None:
        """Which parameters store ``(in, out, *k)`` (``{id(parameter): Layout}``); ``GradientClipCallback`` calls
        it at fit start from :func:`~lightning_clipprune.pruning.weight_layouts`, so units follow the layout."""
        self._layouts = dict(layouts)

    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """See :func:`adaptive_grad_clip`."""
        return adaptive_grad_clip(parameters, self.clip_factor, self.eps, norm_type, self._layouts)

    def __deepcopy__(self, memo: dict) -> AGC:
        clone = AGC(self.clip_factor, self.eps)
        clone._layouts = dict(self._layouts)  # parameter ids: the copy clips the same parameters
        return clone


register_clipper("agc", AGC)
