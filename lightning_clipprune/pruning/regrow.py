r"""Dynamic sparse training: drop the weakest live weights, regrow as many pruned ones (RigL, SET).

Pure math on hand-built tensors; the hook-side glue is :mod:`lightning_clipprune.callbacks._regrow`.

At a regrowth event each layer drops the ``k`` live weights of smallest ``|w|`` and regrows ``k`` of the
positions that were pruned before the event: those of largest score. RigL (Evci et al. 2020, "Rigging
the Lottery") scores a pruned position by the magnitude of its gradient, here the *clipped* gradient
(:func:`clipped_pruned_scores`); SET (Mocanu et al. 2018) draws them at random. ``k`` is the drop
fraction times the layer's live count, the fraction decaying on a cosine (:func:`cosine_fraction`), so
every layer keeps its sparsity exactly. Regrown weights start at zero (the caller also zeroes their
optimizer state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_clipprune._choices import REGROW_METHODS
from lightning_clipprune.pruning.selection import STANDARD_LAYOUT, Layout, output_rows

__all__ = [
    "REGROW_METHODS",
    "clipped_pruned_scores",
    "cosine_fraction",
    "drop_and_grow",
    "random_scores",
    "regrow_due",
    "regrow_masks",
]



def cosine_fraction(t: int, start: int, end: int, fraction: float) -> float:
    r"""The drop fraction at step ``t``: RigL's cosine decay, :math:`\frac{\alpha}{2}(1 + \cos(\pi\frac{t - t_0}{t_1 - t_0}))`.

    ``fraction`` (:math:`\alpha`) at ``start``, 0 at ``end`` and after, ``fraction`` before ``start``.

    Example::

        >>> cosine_fraction(50, 0, 100, 0.3)
        0.15
    """
    if end <= start:
        return 0.0 if t >= end else fraction
    x = min(max((t - start) / (end - start), 0.0), 1.0)
    return round(0.5 * fraction * (1.0 + math.cos(math.pi * x)), 12)


def regrow_due(t: int, start: int, end: int, interval: int) -> bool:
    """Whether step ``t`` is a regrowth event: ``start + k * interval`` for ``k >= 1``, up to ``end`` excluded.

    ``end`` is excluded because the cosine fraction is 0 there.

    Example::

        >>> [t for t in range(0, 400) if regrow_due(t, 100, 350, 100)]
        [200, 300]
    """
    return start < t < end and (t - start) % interval == 0


def _rows(t: Tensor, layout: Layout) -> Tensor:
    """``t`` as ``(output channels, weights of each)``: a view for weights stored ``(out, in, *k)``, a copy for
    the others (:func:`~.selection.output_rows`); a 1-D tensor is one row."""
    return output_rows(t, layout) if t.dim() > 1 else t.reshape(1, -1)


def _unrows(rows: Tensor, shape: torch.Size, layout: Layout) -> Tensor:
    """The inverse of :func:`_rows`: ``rows`` back in the weight's ``shape``."""
    if len(shape) < 2 or not layout.transposed:
        return rows.reshape(shape)
    index = output_rows(torch.arange(math.prod(shape), device=rows.device).reshape(shape), layout)
    out = torch.empty(math.prod(shape), dtype=rows.dtype, device=rows.device)
    out[index.reshape(-1)] = rows.reshape(-1)
    return out.reshape(shape)


def clipped_pruned_scores(
    raw: Tensor, clipped: Tensor | None, mask: Tensor, layout: Layout = STANDARD_LAYOUT
) -> Tensor:
    """RigL's growth score of a layer: the magnitude of the clipped gradient at its pruned positions.

    The clip runs on the live gradients only (pruned ones are zeroed before its norm, whatever the
    callback order). ``raw`` is the layer's dense gradient taken just before that masking, ``clipped`` its
    live gradient after the clip (None: the step was skipped, nothing grows from it). The clip's effect
    on an output row is the ratio of the row's live-gradient norms after and before it; that is exactly the
    clip coefficient of the clippers that scale ("norm", "autoclip", "zclip": one factor for all; "agc": one
    per output row), and an approximation for "value" (element by element). A row without a live gradient
    scores 0, and so do non-finite raw entries: neither is regrown. ``layout`` says where the output channels
    of a weight not stored ``(out, in, *k)`` lie (a ``ConvTranspose``, a Hugging Face ``Conv1D``).

    Returns:
        ``|raw| * row ratio`` on the pruned positions, 0 on the live ones (float32, ``raw``'s shape).

    Example::

        >>> raw = torch.tensor([[3.0, 4.0, 10.0]])
        >>> clipped_pruned_scores(raw, torch.tensor([[0.3, 0.4, 0.0]]), torch.tensor([[True, True, False]]))
        tensor([[0., 0., 1.]])
    """
    zero = torch.zeros((), device=raw.device)
    rows = _rows(torch.where(torch.isfinite(raw), raw.float(), zero), layout)
    keep = _rows(mask, layout)
    after = torch.zeros_like(rows) if clipped is None else _rows(clipped.detach().float(), layout) * keep
    after = torch.where(torch.isfinite(after), after, zero)
    num, den = after.square().sum(1, keepdim=True), (rows * keep).square().sum(1, keepdim=True)
    ratio = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), zero).sqrt()
    return _unrows(rows.abs() * ratio * ~keep, raw.shape, layout)


def random_scores(mask: Tensor, generator: torch.Generator) -> Tensor:
    """SET: uniform scores in (0, 1] on the pruned positions of ``mask`` (0 on live ones), from ``generator`` on the CPU.

    Drawn on the CPU and moved to the mask's device, so every rank and device draws the same positions.

    Example::

        >>> s = random_scores(torch.tensor([True, False]), torch.Generator().manual_seed(0))
        >>> bool(s[0] == 0 and s[1] > 0)
        True
    """
    u = 1.0 - torch.rand(mask.shape, generator=generator)  # (0, 1]: every pruned position can be drawn
    return (u.to(mask.device) * ~mask).float()


def _protected(weight: Tensor, mask: Tensor, layout: Layout = STANDARD_LAYOUT) -> Tensor:
    """The largest live ``|w|`` of each output row (``layout``'s): never dropped, so no row loses its last weight."""
    if weight.dim() < 2:
        return torch.zeros_like(mask)
    rows = _rows(weight.detach().abs().float() * mask, layout)
    best = torch.zeros_like(rows, dtype=torch.bool)
    best.scatter_(1, rows.argmax(1, keepdim=True), True)
    return _unrows(best, mask.shape, layout) & mask


def _top_k_by_index(values: Tensor, k: int) -> Tensor:
    """The flat indices of the ``k`` largest ``values``, ties to the lower index: one ``topk`` pass, no full sort."""
    kth = torch.topk(values, k, sorted=False).values.min()
    above = (values > kth).nonzero().flatten()
    tied = (values == kth).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, tied])


def drop_and_grow(
    weight: Tensor, mask: Tensor, score: Tensor, fraction: float, layout: Layout = STANDARD_LAYOUT
) -> tuple[Tensor, Tensor]:
    """One layer's regrowth: drop the ``k`` live weights of smallest ``|w|``, grow ``k`` pruned positions of largest score.

    ``k = round(fraction * live)``, lowered to the number of pruned positions with a positive score (no
    signal, no growth) and to what can be dropped: the largest live weight of each output row is kept, so
    no row ends with none. Ties go to the lower flat index (stable sorts). The live count is unchanged.

    Args:
        weight: the layer's weights (their magnitude decides what is dropped).
        mask: bool, True = kept.
        score: the growth score of every position (only pruned positions with a score > 0 can grow).
        fraction: the drop fraction of the live weights, in [0, 1].
        layout: where the weight's output channels lie, when it is not stored ``(out, in, *k)``.

    Returns:
        ``(new_mask, grown)``: the mask after the event and the bool positions regrown (pruned before,
        kept now; their weights and optimizer state must start at zero).

    Example::

        >>> w = torch.tensor([[0.1, 0.0, 0.5, 0.0]])
        >>> m = torch.tensor([[True, False, True, False]])
        >>> new, grown = drop_and_grow(w, m, torch.tensor([[0.0, 2.0, 0.0, 1.0]]), 0.5)
        >>> new.tolist(), grown.tolist()
        ([[False, True, True, False]], [[False, True, False, False]])
    """
    flat_mask, flat_score = mask.reshape(-1), score.reshape(-1).float()
    live = int(flat_mask.sum())
    growable = ~flat_mask & (flat_score > 0)
    droppable = flat_mask & ~_protected(weight, mask, layout).reshape(-1)
    k = min(round(fraction * live), int(growable.sum()), int(droppable.sum()))
    if k <= 0:
        return mask.clone(), torch.zeros_like(mask)
    candidates = droppable.nonzero().flatten()  # the live weights: few at high sparsity, sorted in full
    magnitude = weight.detach().reshape(-1)[candidates].abs().float()
    drop = candidates[torch.sort(magnitude, stable=True).indices[:k]]
    grow = _top_k_by_index(torch.where(growable, flat_score, torch.full_like(flat_score, -1.0)), k)
    new = flat_mask.clone()
    new[drop] = False
    new[grow] = True
    grown = torch.zeros_like(flat_mask)
    grown[grow] = True
    return new.reshape(mask.shape), grown.reshape(mask.shape)


def regrow_masks(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    fraction: float,
    layouts: Mapping[str, Layout] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`drop_and_grow` over every layer of ``scores``: ``(new masks, grown positions)`` of those layers.

    ``layouts`` gives the layout of each weight not stored ``(out, in, *k)`` (:func:`~.selection.weight_layouts`).

    Example::

        >>> new, grown = regrow_masks({"w": torch.tensor([0.1, 0.0])}, {"w": torch.tensor([True, False])},
        ...                           {"w": torch.tensor([0.0, 1.0])}, 1.0)
        >>> new["w"].tolist(), int(grown["w"].sum())
        ([False, True], 1)
    """
    new, grown = {}, {}
    for name, score in scores.items():
        layout = (layouts or {}).get(name, STANDARD_LAYOUT)
        new[name], grown[name] = drop_and_grow(weights[name], masks[name], score, fraction, layout)
    return new, grown
