"""Scores, rankings, per-layer budgets and the per-layer ceiling: how many entries of which tensor go.

The defaults of every entry point (``compute_masks``, ``MagnitudePruneCallback``) are stated once, in the
torch-free :mod:`lightning_clipprune._choices` (the app checks a config against them before torch loads) and
re-exported here: :data:`DEFAULT_RANKING`, :data:`RANKINGS`, :data:`CEILING` and
:data:`DEFAULT_MAX_LAYER_SPARSITY` (``"auto"``, resolved by :func:`resolve_max_layer_sparsity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_clipprune._choices import (
    BUDGET_RANKINGS,
    CEILING,
    DEFAULT_RANKING,
    RANKINGS,
    resolve_max_layer_sparsity,
    uses_budgets,  # noqa: F401  (masks, distributed and the callback import it from here)
)
from lightning_clipprune.pruning._host import fill_pruned_host as _fill_pruned_host
from lightning_clipprune.pruning._host import host_array as _host_array
from lightning_clipprune.pruning._host import host_empty as _host_empty
from lightning_clipprune.pruning._host import host_keep_by_count as _host_keep_by_count
from lightning_clipprune.pruning._host import host_select as _host_select
from lightning_clipprune.pruning._host import magnitude_filled as _magnitude_filled
from lightning_clipprune.pruning._host import magnitude_keep as _magnitude_keep
from lightning_clipprune.pruning.apply import int_mask
from lightning_clipprune.pruning.criteria import Magnitude
from lightning_clipprune.pruning.selection import STANDARD_LAYOUT, Layout, matrix_shape, output_rows

__all__ = [
    "BUDGET_RANKINGS",
    "CEILING",
    "DEFAULT_MAX_LAYER_SPARSITY",
    "DEFAULT_RANKING",
    "RANKINGS",
    "erk_counts",
    "keep_mask_by_count",
    "kth_smallest",
    "layer_cap",
    "most_under_ceiling",
    "resolve_max_layer_sparsity",
]

#: Kept under its historical name: the number "auto" resolves to where a ceiling applies.
DEFAULT_MAX_LAYER_SPARSITY = CEILING

# Score given to entries that are already pruned: below every real importance (all are >= 0), so they
# are selected first and a mask only ever grows.
PRUNED_SCORE = -1.0


def kth_smallest(x: Tensor, k: int, sample_size: int = 2**18, seed: int = 0) -> Tensor:
    """The ``k``-th smallest value of the 1-D ``x`` (1-based, as ``torch.kthvalue``), exactly.

    For large ``x``, ``torch.kthvalue`` on CPU copies the input and an int64 index (12 bytes per entry)
    and is slow. Instead: estimate the quantile ``k / n`` from a fixed-seed random sample, bracket it
    with a safety margin ``[lo, hi]``, count the entries below ``lo`` and run ``kthvalue`` on the few
    entries inside the bracket. The answer is exact whatever the sample: when the bracket misses
    (very unlikely), it falls back to ``kthvalue`` on the whole input.

    Args:
        x: 1-D tensor.
        k: rank in ``[1, x.numel()]``.
        sample_size: sample used to bracket; inputs smaller than 8 samples are selected directly
            (:func:`_select`).
        seed: seed of the sample (the result does not depend on it, only the speed).

    Example::

        >>> kth_smallest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 3)
        tensor(2.)
    """
    n = x.numel()
    if n <= 8 * sample_size or _host_array(x) is not None:  # on the CPU one numpy selection beats the bracket
        return _select(x, k)
    g = torch.Generator(device=x.device).manual_seed(seed)
    sample = x[torch.randint(n, (sample_size,), generator=g, device=x.device)]
    q = k / n
    delta = 6.0 * math.sqrt(q * (1.0 - q) / sample_size) + 2.0 / sample_size
    lo_rank, hi_rank = math.floor((q - delta) * sample_size), math.ceil((q + delta) * sample_size)
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else None
    hi = sample.kthvalue(hi_rank).values if hi_rank <= sample_size else None
    below = int((x < lo).count_nonzero()) if lo is not None else 0
    if below < k:
        if lo is not None and hi is not None and bool(lo == hi):
            # the bracket is one value (e.g. the already-pruned entries): no band to extract
            if k <= int((x <= hi).count_nonzero()):
                return lo
        else:
            in_band = x <= hi if hi is not None else torch.ones_like(x, dtype=torch.bool)
            if lo is not None:
                in_band &= x >= lo
            band = x[in_band]
            del in_band
            if k - below <= band.numel():
                return _select(band, k - below)
    return _select(x, k)


def _select(x: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest of the 1-D ``x``: ``x.kthvalue(k).values``, by selection.

    On the CPU ``numpy.partition`` (introselect, O(n)); elsewhere a partial ``topk`` of the shorter side,
    faster than ``kthvalue`` (``benchmarks/bench_prune.md``). Both are exact: the largest of the ``k``
    smallest is the ``k``-th smallest.
    """
    a = _host_array(x)
    if a is not None:
        return torch.as_tensor(_host_select(a, k))
    n = x.numel()
    if k <= n - k + 1:
        return x.topk(k, largest=False, sorted=False).values.max()
    return x.topk(n - k + 1, largest=True, sorted=False).values.min()


def keep_mask_by_count(scores: Tensor, n_prune: int) -> Tensor:
    """A flat bool mask (True = kept) that prunes exactly the ``n_prune`` lowest of ``scores`` (1-D).

    Ties at the cut are broken by flat index: the lower index is pruned first, so the result does not
    depend on the selection algorithm. The cut is found by selection (:func:`kth_smallest`, O(n)), not
    by a full sort or ``topk``, which is what makes global masks fast on large models.

    Args:
        scores: 1-D importance scores.
        n_prune: how many to prune; clamped to ``[0, scores.numel()]``.

    Example::

        >>> keep_mask_by_count(torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0]), 2)
        tensor([ True, False, False,  True,  True])
    """
    n = scores.numel()
    if n_prune <= 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_prune >= n:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    a = _host_array(scores)
    if a is not None:  # numpy's selection, comparison and count are several times faster on the CPU
        return torch.from_numpy(_host_keep_by_count(a, n_prune))
    kth = kth_smallest(scores, n_prune)
    keep = scores > kth
    n_at_or_below = n - int(keep.count_nonzero())
    at_cut = scores == kth if n_at_or_below > n_prune else None
    if at_cut is not None:  # ties at the cut: keep the last ones by flat index
        ties = at_cut.nonzero().squeeze(1)  # ascending flat indices
        keep[ties[ties.numel() - (n_at_or_below - n_prune) :]] = True
    return keep


def flat_scores(
    weights: Mapping[str, Tensor],
    criterion: Any,
    masks: Mapping[str, Tensor] | None,
    blocked: Mapping[str, Tensor] | None = None,
    normalize: bool = False,
) -> Tensor:
    """All scores of ``criterion`` in one preallocated flat tensor (the only full-size temporary).

    Already-pruned entries score lowest, entries where ``blocked`` is False score ``+inf`` (never chosen).
    ``normalize`` divides each tensor's scores by the RMS of its live scores.
    """
    first = next(iter(weights.values()))
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights.values()) else torch.float32
    flat = _host_empty(sum(w.numel() for w in weights.values()), dtype, first.device)
    offset = 0
    for name, w in weights.items():
        part = flat[offset : offset + w.numel()]
        offset += w.numel()
        live = masks[name].reshape(-1).to(part.device) if masks is not None and name in masks else None
        # |w| and the pruned entries' score in one pass over cache-sized slices, where it can
        done = live is not None and not normalize and _magnitude_filled(criterion, w, part, live, _PRUNED_BITS[4])
        score_into = getattr(criterion, "score_into", None)
        if not done and score_into is not None:
            score_into(name, w, part)
        elif not done:
            part.copy_(criterion.score(name, w).reshape(-1))
        if normalize:
            rms = (part[live] if live is not None else part).square().mean().sqrt()
            part.div_(torch.where(rms > 0, rms, torch.ones_like(rms)))
        if live is not None and not done:
            fill_pruned_(part, live)
        if blocked is not None and name in blocked:
            part.masked_fill_(~blocked[name].reshape(-1).to(part.device), math.inf)
    return flat


#: Bit patterns of ``PRUNED_SCORE`` per element size, as the signed integers of that width.
_PRUNED_BITS = {
    4: int(torch.tensor(PRUNED_SCORE, dtype=torch.float32).view(torch.int32)),
    8: int(torch.tensor(PRUNED_SCORE, dtype=torch.float64).view(torch.int64)),
}
_INTS = {4: torch.int32, 8: torch.int64}


def fill_pruned_(part: Tensor, live: Tensor) -> None:
    """``part.masked_fill_(~live, PRUNED_SCORE)`` for a float32/float64 ``part`` (``live``: bool, True = kept).

    By integer arithmetic on the bits (``bits * live + P - P * live``, ``P`` the bits of ``PRUNED_SCORE``):
    branch-free passes, about 5x faster on the CPU than ``masked_fill_`` with a scattered mask, and exact
    (kept entries keep their bits, whatever they hold). On the CPU numpy does it slice by slice, the mask's
    integer copy reused from one slice to the next (no full-size temporary: 2x faster on 16 M entries).

    Example::

        >>> s = torch.tensor([0.5, 2.0, 0.0])
        >>> fill_pruned_(s, torch.tensor([True, False, True])); s
        tensor([ 0.5000, -1.0000,  0.0000])
    """
    size = part.element_size()
    if size not in _INTS or not part.is_floating_point():
        part.masked_fill_(~live, PRUNED_SCORE)
        return
    bits = part.view(_INTS[size])
    host_bits, host_live = _host_array(bits), _host_array(live)
    if host_bits is not None and host_live is not None and host_live.dtype == np.bool_:
        _fill_pruned_host(host_bits, host_live, _PRUNED_BITS[size])
        return
    factor = int_mask(live, bits.dtype, bits.device)
    # kept: bits + P - P; pruned: 0 + P. No intermediate leaves the range (bits >= 0 for scores >= 0, P < 0).
    bits.mul_(factor).add_(_PRUNED_BITS[size]).sub_(factor, alpha=_PRUNED_BITS[size])


def layer_cap(shape: Sequence[int], max_layer_sparsity: float, layout: Layout = STANDARD_LAYOUT) -> int:
    """The most entries global ranking may prune in one tensor: ``floor(max_layer_sparsity * n)``, and for a
    tensor of 2 or more dims at most ``n - rows`` (one weight of every output row is kept).

    Example::

        >>> layer_cap((100, 32), 0.99), layer_cap((1000, 1000), 0.99)
        (3100, 990000)
    """
    n = math.prod(shape)
    cap = math.floor(max_layer_sparsity * n + 1e-9)
    if len(shape) >= 2:
        rows = shape[1] * layout.groups if layout.transposed else shape[0]
        cap = min(cap, n - rows)
    return cap


def most_under_ceiling(
    weights: Mapping[str, Tensor], max_layer_sparsity: float, layouts: Mapping[str, Layout] | None = None
) -> int:
    """The most entries of ``weights`` global ranking may prune under the ceiling: the sum of :func:`layer_cap`.

    Example::

        >>> most_under_ceiling({"a": torch.zeros(10, 10), "b": torch.zeros(100, 32)}, 0.99)
        3190
    """
    layouts = layouts or {}
    return sum(layer_cap(w.shape, max_layer_sparsity, layouts.get(n, STANDARD_LAYOUT)) for n, w in weights.items())


def _protect_row_max_(part: Tensor, shape: torch.Size, layout: Layout) -> None:
    """Give the best live entry of every output row the score ``+inf`` (never pruned): ties by lowest index."""
    rows = output_rows(part.view(shape), layout)
    best, at = rows.max(dim=1)
    if layout.transposed:  # rows are a permuted copy: map back through the same permutation of indices
        index = output_rows(torch.arange(part.numel(), device=part.device).view(shape), layout)
        flat_at = index.gather(1, at.unsqueeze(1)).squeeze(1)
    else:
        flat_at = torch.arange(rows.shape[0], device=part.device) * rows.shape[1] + at
    part[flat_at[best >= 0]] = math.inf


def _global_keep(flat: Tensor, parts: dict[str, Tensor], k: int, caps: Mapping[str, int] | None) -> dict[str, Tensor]:
    """Prune the ``k`` lowest of ``flat`` (whose consecutive ``parts`` are the tensors), no tensor past its cap.

    A tensor that would go past its cap is pruned to exactly its cap (its lowest entries) and the rest of
    ``k`` is ranked again over the other tensors; repeated until no cap is passed. This is one threshold
    over the uncapped tensors, so the count is exactly ``k``.
    """
    free = list(parts)
    keep = keep_mask_by_count(flat, k)
    result = dict(zip(free, keep.split([parts[n].numel() for n in free]), strict=True))
    fixed: dict[str, Tensor] = {}
    while caps is not None:
        over = [n for n in free if result[n].numel() - count_kept(result[n]) > caps[n]]
        if not over:
            break
        for n in over:
            fixed[n] = keep_mask_by_count(parts[n], caps[n])
            k -= caps[n]
        free = [n for n in free if n not in over]
        if not free:
            break
        keep = keep_mask_by_count(torch.cat([parts[n] for n in free]), k)
        result = dict(zip(free, keep.split([parts[n].numel() for n in free]), strict=True))
    return {n: fixed[n] if n in fixed else result[n] for n in parts}


def _ceiling_caps(
    weights: Mapping[str, Tensor],
    parts: Mapping[str, Tensor],
    k: int,
    sparsity: float,
    max_layer_sparsity: float,
    layouts: Mapping[str, Layout],
    already: Mapping[str, int],
) -> dict[str, int]:
    """Each tensor's cap under the ceiling (never below what it already lost); protects each row's best entry."""
    caps = {}
    for name, w in weights.items():
        layout = layouts.get(name, STANDARD_LAYOUT)
        caps[name] = max(layer_cap(w.shape, max_layer_sparsity, layout), already[name])
        if w.dim() >= 2:
            _protect_row_max_(parts[name], w.shape, layout)
    if sum(caps.values()) < k:
        total = sum(w.numel() for w in weights.values())
        raise ValueError(
            f"sparsity {sparsity} cannot be met with `max_layer_sparsity={max_layer_sparsity}` and one weight"
            f" kept per output row: at most {sum(caps.values()) / total:.4f} can be pruned. Lower the"
            " sparsity, raise `max_layer_sparsity`, or pass `max_layer_sparsity=None` (no ceiling)."
        )
    return caps


def capped_global(
    weights: Mapping[str, Tensor],
    flat: Tensor,
    sparsity: float,
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout],
    masks: Mapping[str, Tensor] | None,
    budget: str | None = None,
) -> dict[str, Tensor]:
    """Global unstructured masks from the flat scores: one threshold, or per-layer ``budget`` counts."""
    parts = dict(zip(weights, flat.split([w.numel() for w in weights.values()]), strict=True))
    k = int(round(sparsity * flat.numel()))
    already = _already_pruned(weights, masks)
    caps = None
    if max_layer_sparsity is not None:
        caps = _ceiling_caps(weights, parts, k, sparsity, max_layer_sparsity, layouts, already)
    if budget is not None:  # "erk" or "er"
        shapes = {
            x: matrix_shape(w.shape, layouts.get(x, STANDARD_LAYOUT)) if budget == "er" else tuple(w.shape)
            for x, w in weights.items()
        }
        counts = erk_counts(shapes, k, caps, already)
        return {x: keep_mask_by_count(parts[x], counts[x]).view(w.shape) for x, w in weights.items()}
    keep = _global_keep(flat, parts, k, caps)
    return {name: keep[name].view(w.shape) for name, w in weights.items()}


def magnitude_budget_masks(
    weights: Mapping[str, Tensor],
    criterion: Any,
    sparsity: float,
    layouts: Mapping[str, Layout],
    masks: Mapping[str, Tensor] | None,
    budget: str,
) -> dict[str, Tensor] | None:
    """``capped_global(weights, flat_scores(weights, criterion, masks), sparsity, None, layouts, masks, budget)``
    ANDed with ``masks``, layer by layer (:func:`layer_keep`): no flat scores of the whole model.

    Args:
        weights: ``{name: tensor}``.
        criterion: the criterion object.
        sparsity: the global target.
        layouts: ``{name: Layout}`` of the weights not stored ``(out, in, *k)`` ("er" budgets).
        masks: the current masks, or None.
        budget: "er" or "erk".

    Returns:
        None (take that path) unless ``criterion`` scores by :class:`~.criteria.Magnitude` and no weight is
        float64: the flat scores' dtype is then each layer's own, so a layer's scores rank alone as in the
        flat buffer.
    """
    if getattr(type(criterion), "score_into", None) is not Magnitude.score_into:
        return None
    if any(w.dtype == torch.float64 for w in weights.values()):
        return None
    k = int(round(sparsity * sum(w.numel() for w in weights.values())))
    already = _already_pruned(weights, masks)
    shapes = {
        x: matrix_shape(w.shape, layouts.get(x, STANDARD_LAYOUT)) if budget == "er" else tuple(w.shape)
        for x, w in weights.items()
    }
    counts = erk_counts(shapes, k, None, already)
    return {
        x: layer_keep(x, w, criterion, masks, counts[x], w.numel() - already[x]).view(w.shape)
        for x, w in weights.items()
    }


def layer_keep(
    name: str, weight: Tensor, criterion: Any, masks: Mapping[str, Tensor] | None, n_prune: int, n_live: int
) -> Tensor:
    """``keep_mask_by_count(flat_scores({name: weight}, criterion, masks), n_prune) & masks[name]`` (flat): by
    :func:`~._host.magnitude_keep` where it can.

    Args:
        name: the weight's name in ``masks``.
        weight: the weight.
        criterion: the criterion object.
        masks: the current masks, or None.
        n_prune: how many entries the new mask prunes, those already pruned included.
        n_live: how many entries ``masks[name]`` keeps (``weight.numel()`` without one).

    Returns:
        The flat bool mask, True = kept.

    Example::

        >>> layer_keep("w", torch.tensor([0.3, -0.1, 0.2]), Magnitude(), None, 1, 3)
        tensor([ True, False,  True])
    """
    live = masks[name].reshape(-1) if masks is not None and name in masks else None
    keep = _magnitude_keep(criterion, weight, live, n_prune, n_live)
    if keep is None:
        keep = keep_mask_by_count(flat_scores({name: weight}, criterion, masks), n_prune)
        if live is not None:
            keep &= live.to(keep.device)
    return keep


def _already_pruned(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> dict[str, int]:
    return {x: w.numel() - count_kept(masks[x]) if masks is not None and x in masks else 0 for x, w in weights.items()}


def count_kept(mask: Tensor) -> int:
    """``int(mask.count_nonzero())``, by numpy on the CPU (several times faster there); one sync elsewhere.

    Example::

        >>> count_kept(torch.tensor([True, False, True]))
        2
    """
    a = _host_array(mask)
    return int(np.count_nonzero(a)) if a is not None else int(mask.count_nonzero())


def erk_counts(
    shapes: Mapping[str, Sequence[int]],
    k: int,
    caps: Mapping[str, int] | None = None,
    already: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """How many entries of each tensor to prune, ``k`` in all, by Erdos-Renyi-Kernel (ERK).

    Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020): the density of a tensor
    is ``eps * sum(shape) / prod(shape)`` (``(n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)`` for a
    convolution), so small and narrow layers stay denser. Here each density is clamped to ``[1 - cap / n,
    1 - already / n]`` (a tensor whose ERK density passes 1 stays dense), ``eps`` is found by bisection so
    the clamped counts add up to ``k``, and the rounding is distributed by largest remainder: exactly ``k``.

    Example::

        >>> erk_counts({"wide": (100, 100), "narrow": (20, 100)}, 8800)  # eps = 10: densities 0.2 and 0.6
        {'wide': 8000, 'narrow': 800}
    """
    n = {x: math.prod(s) for x, s in shapes.items()}
    raw = {x: sum(s) / n[x] for x, s in shapes.items()}
    lo = {x: 1.0 - (caps[x] if caps is not None else n[x]) / n[x] for x in n}
    hi = {x: 1.0 - (already[x] if already is not None else 0) / n[x] for x in n}

    def pruned(eps: float) -> dict[str, float]:
        return {x: n[x] * (1.0 - min(max(eps * raw[x], lo[x]), hi[x])) for x in n}

    rows = [(n[x], raw[x], lo[x], hi[x]) for x in n]  # plain lists: the bisection runs at every pruning event
    a, b = _erk_bracket(rows, k) or (0.0, 1.0 / min(raw.values()))
    for _ in range(100):
        mid = (a + b) / 2
        below, above = mid == a, mid == b
        a, b = (mid, b) if _erk_total(rows, mid) > k else (a, mid)
        if below or above:  # no float left between a and b: every further step leaves (a, b) as it is
            break
    upper = {x: n[x] if caps is None else caps[x] for x in n}
    return round_to_total(pruned(b), k, n, upper)


def _erk_total(rows: Sequence[tuple[int, float, float, float]], eps: float) -> float:
    """How many entries ``eps`` prunes in all: the one float expression the bisection and its bracket share."""
    return sum(size * (1.0 - min(max(eps * r, low), high)) for size, r, low, high in rows)


def _erk_bracket(rows: Sequence[tuple[int, float, float, float]], k: int) -> tuple[float, float] | None:
    """A narrow ``(a, b)`` with ``total(a) > k >= total(b)`` around the root of ``erk_counts``' clamped total.

    The total is piecewise linear in ``eps`` (each tensor's pruned count falls between its two clamps), so a
    sweep over the clamps' breakpoints solves it; the bisection then only has the last ~14 bits to find
    instead of ~60. The total, as evaluated, is monotone in ``eps`` (each rounding step is), so the boundary
    between adjacent floats it ends on is the one the full bisection reaches. None (the caller bisects from
    the whole range) when the bracket cannot be checked on both sides.
    """
    total, events = _erk_total(rows, 0.0), []
    for size, r, low, high in rows:
        if r > 0 and low < high:
            events += [(max(low, 0.0) / r, -size * r), (high / r, size * r)]
    eps, slope = 0.0, 0.0
    for at, change in sorted(events):
        reach = total + slope * (at - eps)
        if slope < 0 and reach <= k:
            break
        total, eps, slope = reach, at, slope + change
    if slope >= 0 or total <= k:
        return None
    root = eps + (k - total) / slope
    a, b = max(root * (1 - 1e-12) - 1e-300, 0.0), root * (1 + 1e-12) + 1e-300
    return (a, b) if _erk_total(rows, a) > k >= _erk_total(rows, b) else None


def round_to_total(
    real: Mapping[str, float], k: int, sizes: Mapping[str, int], upper: Mapping[str, int]
) -> dict[str, int]:
    """Whole counts from ``real`` ones summing to ``k``: floors (at most ``sizes``), then one more for the
    largest remainders first (ties in order), never past ``upper``.

    Example::

        >>> round_to_total({"a": 1.75, "b": 5.25}, 7, {"a": 10, "b": 30}, {"a": 10, "b": 30})
        {'a': 2, 'b': 5}
    """
    counts = {x: min(math.floor(v + 1e-9), sizes[x]) for x, v in real.items()}
    for x in sorted(real, key=lambda x: counts[x] - real[x]):
        if sum(counts.values()) >= k:
            break
        if counts[x] < upper[x]:
            counts[x] += 1
    return counts
