"""The CPU paths of a pruning event's selection: numpy on the tensors' own memory.

torch's CPU ``topk``/``kthvalue``, float comparisons and bool -> int conversions are several times slower
than numpy's ``partition``, ``greater`` and ``copyto`` on the same memory, and torch's CPU allocator does not
ask the kernel for huge pages where numpy does; every full-size pass here is done slice by slice in
cache-sized buffers (``benchmarks/overhead.md``, pruning events). Each function gives exactly what the torch
path in :mod:`~lightning_clipprune.pruning.ranking` gives.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_clipprune.pruning.criteria import Magnitude

#: numpy dtypes of the tensors whose selection and comparisons run in numpy on the CPU (no bfloat16 there).
HOST_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int32, torch.int64, torch.bool)


def host_array(x: Tensor) -> np.ndarray | None:
    """``x`` as a numpy array sharing its memory when it is a contiguous CPU tensor numpy can hold, else None.

    torch's CPU ``topk``/``kthvalue`` and float comparisons are several times slower than numpy's
    ``partition`` and ``greater`` on the same memory (``benchmarks/overhead.md``, pruning events).
    """
    if x.device.type != "cpu" or x.dtype not in HOST_DTYPES or not x.is_contiguous():
        return None
    return x.detach().numpy()


def host_select(a: np.ndarray, k: int) -> Any:
    """The ``k``-th smallest of the 1-D numpy ``a`` (1-based), by ``numpy.partition``.

    A float array is selected negated, as the ``(n - k + 1)``-th largest: ``numpy.partition`` slows down
    up to a hundredfold when a large block of equal *lowest* values (the entries already pruned, all at
    ``PRUNED_SCORE``) lies on its way, and not when the block is on top (``benchmarks/overhead.md``).
    A large float array is first narrowed to the band around the answer (:func:`host_band`).
    """
    if a.dtype.kind == "f":
        if a.size >= BAND_MIN:
            band = host_band(a, k)
            if band is not None:
                a, k = band
        at = a.size - k
        negated = np.negative(a)  # the one copy: partitioned in place
        negated.partition(at)
        return -negated[at]
    return np.partition(a, k - 1)[k - 1]


def host_keep_by_count(a: np.ndarray, n_prune: int) -> np.ndarray:
    """``keep_mask_by_count`` on a 1-D numpy ``a`` (``0 < n_prune < a.size``): the bool mask that prunes exactly the
    ``n_prune`` lowest, ties at the cut pruned by lowest flat index first.

    Example::

        >>> host_keep_by_count(np.array([3.0, 1.0, 1.0, 2.0, 1.0]), 2)
        array([ True, False, False,  True,  True])
    """
    kth = host_select(a, n_prune)
    keep = a > kth
    ties_kept = a.size - int(np.count_nonzero(keep)) - n_prune
    if ties_kept > 0:  # ties at the cut: the last ones by flat index stay
        ties = np.flatnonzero(a == kth)
        keep[ties[ties.size - ties_kept :]] = True
    return keep


#: Float arrays at least this long are narrowed to a band before the partition (a 30k-entry layer: 2.5x faster).
BAND_MIN = 1 << 14


def host_band(a: np.ndarray, k: int) -> tuple[np.ndarray, int] | None:
    """``(band, k')``: the entries of ``a`` strictly above a low bracket and at most a high one, where the
    ``k``-th smallest of ``a`` is the ``k'``-th smallest of the band; None when the brackets miss.

    The brackets are order statistics of an evenly strided sample, widened by four standard deviations of
    the sample quantile, so the band holds a few percent of ``a``: two comparisons and one extraction, then a
    partition of the band, cost less than partitioning ``a`` (a 235k-entry layer: 1.1-1.7 ms -> 0.2-0.4
    ms). Exact whatever the sample: a miss only costs the time of the narrowing.
    """
    n = a.size
    sample = np.sort(a[:: max(1, n // min(max(2048, 8 * math.isqrt(n)), n // 8))])
    m, q = sample.size, k / n
    delta = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
    lo_rank, hi_rank = math.floor((q - delta) * m), math.ceil((q + delta) * m)
    lo = sample[lo_rank - 1] if lo_rank >= 1 else None
    hi = sample[hi_rank - 1] if hi_rank <= m else None
    if lo is None and hi is None:
        return None
    band, below = between(a, lo, hi)  # a block equal to lo stays out of the band
    if below >= k:  # the answer is lo itself when fewer than k lie under it
        return (sample[lo_rank - 1 : lo_rank], 1) if int(np.count_nonzero(a < lo)) < k else None
    return (band, k - below) if k - below <= band.size else None


def between(a: np.ndarray, lo: Any, hi: Any) -> tuple[np.ndarray, int]:
    """The entries ``lo < x <= hi`` of ``a`` in order (a None bound is open) and how many are ``<= lo``.

    Slice by slice, the comparisons written into two small reused buffers (no full-size temporary).
    """
    above, at_most = np.empty(min(BAND_CHUNK, a.size), dtype=bool), np.empty(min(BAND_CHUNK, a.size), dtype=bool)
    below, pieces = 0, []
    for start in range(0, a.size, BAND_CHUNK):
        part = a[start : start + BAND_CHUNK]
        keep = above[: part.size]
        if lo is None:
            keep.fill(True)
        else:
            np.greater(part, lo, out=keep)
            below += part.size - int(np.count_nonzero(keep))
        if hi is not None:
            np.less_equal(part, hi, out=at_most[: part.size])
            keep &= at_most[: part.size]
        pieces.append(np.compress(keep, part))  # (faster than part[keep])
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)), below


#: Entries per slice of :func:`between` (measured: 1.3x faster than 64k slices or whole arrays on 4-16 M).
BAND_CHUNK = 1 << 18


def host_empty(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(n, dtype=dtype, device=device)``; on the CPU allocated by numpy, which asks the kernel for huge
    pages for large arrays (torch's allocator does not): a first pass over 25 M fresh floats costs 3x less."""
    if torch.device(device).type == "cpu" and dtype in NUMPY_FLOATS:
        return torch.from_numpy(np.empty(n, dtype=NUMPY_FLOATS[dtype]))
    return torch.empty(n, dtype=dtype, device=device)


NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}

#: Entries per slice of :func:`~.ranking.fill_pruned_`'s CPU path: its integer temporary stays in the L2 cache.
FILL_CHUNK = 1 << 16


def magnitude_filled(criterion: Any, weight: Tensor, part: Tensor, live: Tensor, pruned_bits: int) -> bool:
    """``part = |weight|`` with :func:`~.ranking.fill_pruned_` by ``live`` (``pruned_bits``: their score's bits), slice by slice, when ``criterion`` scores by
    :class:`~.criteria.Magnitude` and all three are contiguous float32/bool CPU tensors; False otherwise."""
    if getattr(type(criterion), "score_into", None) is not Magnitude.score_into:
        return False
    if weight.dtype != torch.float32 or part.dtype != torch.float32:
        return False
    w, out, keep = host_array(weight), host_array(part), host_array(live)
    if w is None or out is None or keep is None or keep.dtype != np.bool_:
        return False
    w, bits = w.reshape(-1), out.view(np.int32)
    for start in range(0, w.size, FILL_CHUNK):
        np.abs(w[start : start + FILL_CHUNK], out=out[start : start + FILL_CHUNK])
        fill_pruned_host(bits[start : start + FILL_CHUNK], keep[start : start + FILL_CHUNK], pruned_bits)
    return True


def fill_pruned_host(bits: np.ndarray, live: np.ndarray, pruned_bits: int) -> None:
    factor = np.empty(min(FILL_CHUNK, bits.size), dtype=bits.dtype)
    for start in range(0, bits.size, FILL_CHUNK):
        b = bits[start : start + FILL_CHUNK]
        f = factor[: b.size]
        np.copyto(f, live[start : start + FILL_CHUNK], casting="unsafe")
        b *= f
        b += pruned_bits
        f *= pruned_bits
        b -= f


#: Entries per slice of :func:`magnitude_keep` (2^16 and 2^17 measured no faster).
KEEP_CHUNK = 1 << 18
#: Layers smaller than this are selected whole (a partition of all their scores), larger ones by the band.
KEEP_MIN = 1 << 14


def magnitude_keep(criterion: Any, weight: Tensor, live: Tensor | None, n_prune: int, n_live: int) -> Tensor | None:
    """``keep_mask_by_count(scores, n_prune) & live`` (flat, bool) without the flat scores, or None.

    ``scores`` are those :func:`~.ranking.flat_scores` gives ``weight`` with its mask ``live`` (None: all live,
    ``n_live`` of them True): ``|w|``, the pruned entries at ``PRUNED_SCORE``, below every live one. So the
    ``n_prune - (n - n_live)`` lowest live ``|w|`` go, ties at the cut pruned by lowest flat index first. One
    pass over slices: the live entries above a low bracket are written straight into the mask and the band up
    to a high bracket is extracted with its indices; a partition of the band gives the cut, and the band's
    entries at or under it are cleared.

    Args:
        criterion: the event's criterion.
        weight: the layer's weight.
        live: its current mask, flat (True = kept), or None (nothing pruned yet).
        n_prune: how many entries of ``weight`` the new mask prunes, those ``live`` prunes included.
        n_live: how many entries ``live`` keeps.

    Returns:
        The new flat mask, or None (the caller takes the flat scores) when ``criterion`` is not
        :class:`~.criteria.Magnitude` on contiguous float32/bool CPU tensors, the brackets miss or a live
        weight is NaN. A layer under :data:`KEEP_MIN` entries is selected whole (:func:`_small_keep`).

    Example::

        >>> w = torch.linspace(-1.0, 1.0, KEEP_MIN)
        >>> keep = magnitude_keep(Magnitude(), w, None, KEEP_MIN // 2, KEEP_MIN)
        >>> bool(keep[0]), bool(keep[KEEP_MIN // 2]), int(keep.sum())
        (True, False, 8192)
    """
    if getattr(type(criterion), "score_into", None) is not Magnitude.score_into or weight.dtype != torch.float32:
        return None
    w, keep = host_array(weight), host_array(live) if live is not None else None
    if w is None or (live is not None and (keep is None or keep.dtype != np.bool_)):
        return None
    w, n = w.reshape(-1), w.size
    r = n_prune - (n - n_live)  # the pruned entries score lowest: they go first
    if r <= 0:
        return torch.ones(n, dtype=torch.bool) if keep is None else torch.from_numpy(keep.copy())
    if r >= n_live:
        return torch.zeros(n, dtype=torch.bool)
    if n < KEEP_MIN:
        return _small_keep(w, keep, n_prune)
    bracket = _live_bracket(w, keep, r, n_live)
    if bracket is None:
        return None
    out = np.empty(n, dtype=bool)
    above, index, values = _keep_above(w, keep, bracket[0], bracket[1], out)
    below = n_live - above  # live entries at or under the low bracket
    if not 1 <= r - below <= values.size or np.isnan(values).any():
        return None
    at = values.size - (r - below)
    negated = np.negative(values)
    negated.partition(at)
    kth = -negated[at]
    cut = values <= kth
    ties_kept = below + int(np.count_nonzero(cut)) - r
    if ties_kept > 0:  # ties at the cut: the last ones by flat index stay (the band is in flat order)
        ties = np.flatnonzero(values == kth)
        cut[ties[ties.size - ties_kept :]] = False
    out[index[cut]] = False
    return torch.from_numpy(out)


def _small_keep(w: np.ndarray, live: np.ndarray | None, n_prune: int) -> Tensor | None:
    """:func:`magnitude_keep` of a layer under :data:`KEEP_MIN` entries: the flat path's selection
    (``keep_mask_by_count``) on this layer's scores alone, in a few numpy calls (a small layer's cost is the
    calls, not the arithmetic); None when a weight is NaN."""
    scores = np.abs(w)
    if np.isnan(scores).any():
        return None
    if live is not None:
        scores[~live] = -1.0  # under every |w|, as the flat path's pruned score
    return torch.from_numpy(host_keep_by_count(scores, n_prune))


def _live_bracket(w: np.ndarray, live: np.ndarray | None, r: int, n_live: int) -> tuple[Any, Any] | None:
    """``(lo, hi)`` around the ``r``-th smallest live ``|w|`` from an evenly strided sample, as :func:`host_band`
    (a None bound is open); None when the sample is too small to bracket or holds a NaN."""
    # odd: a power-of-two stride would sample a few columns of a power-of-two row only
    stride = max(1, w.size // min(max(2048, 8 * math.isqrt(w.size)), w.size // 8)) | 1
    sample = np.sort(np.abs(w[::stride] if live is None else w[::stride][live[::stride]]))
    m, q = sample.size, r / n_live
    if m < 64 or np.isnan(sample[-1]):
        return None
    delta = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
    lo_rank, hi_rank = math.floor((q - delta) * m), math.ceil((q + delta) * m)
    lo = sample[lo_rank - 1] if lo_rank >= 1 else None
    hi = sample[hi_rank - 1] if hi_rank <= m else None
    return None if lo is None and hi is None else (lo, hi)


def _keep_above(
    w: np.ndarray, live: np.ndarray | None, lo: Any, hi: Any, out: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """``out = live & ~(|w| <= lo)``; returns its count and the flat indices and ``|w|`` of its entries with
    ``not |w| > hi`` (a None bound is open). A NaN is in ``out`` and in the band (the caller's check)."""
    size = min(KEEP_CHUNK, w.size)
    a, side = np.empty(size, dtype=w.dtype), np.empty(size, dtype=bool)
    above, indices, values = 0, [], []
    for start in range(0, w.size, KEEP_CHUNK):
        stop = min(start + KEEP_CHUNK, w.size)
        part, o, s = a[: stop - start], out[start:stop], side[: stop - start]
        np.abs(w[start:stop], out=part)
        if lo is None:
            o[...] = True if live is None else live[start:stop]
        else:
            np.less_equal(part, lo, out=s)
            if live is None:
                np.logical_not(s, out=o)
            else:
                np.greater(live[start:stop], s, out=o)  # live & ~(|w| <= lo)
        above += int(np.count_nonzero(o))
        if hi is not None:
            np.greater(part, hi, out=s)
            np.greater(o, s, out=s)  # o & ~(|w| > hi)
        band = (s if hi is not None else o).nonzero()[0]
        indices.append(band + start)
        values.append(part[band])
    return above, np.concatenate(indices), np.concatenate(values)
