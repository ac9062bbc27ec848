"""Masks of parameters sharded along dim 0 (FSDP2 DTensors), equal to the masks of the whole tensors.

Each rank holds a block of consecutive rows of every pruned tensor (``Shard(0)``: FSDP2's
``fully_shard``, ``torch.chunk`` order, the last blocks shorter or empty). Nothing here gathers a
tensor: each rank scores its own rows, and the cut between pruned and kept is found by a
**distributed k-th selection** (radix select on the bits of the scores):

1. every score becomes an integer key of the same order (the IEEE-754 bits, negatives flipped);
2. for each byte of the key, from the top: each rank counts its candidates per byte value (a
   256-bin histogram), the histograms are summed over the ranks (one all-reduce of ``groups x 256``
   integers), and every rank keeps the candidates in the bin that holds the ``k``-th smallest;
   after 4 rounds (8 for float64) every rank knows the ``k``-th smallest key exactly;
3. the entries tied at the cut are pruned in global flat order, as :func:`~.ranking.keep_mask_by_count`
   does on one process: each rank counts its ties, one all-reduce shares the counts and the shard
   offsets, and each rank prunes the first ``need - (ties at lower flat indices)`` of its own.

So the masks are **bit for bit** those of :func:`~.masks.compute_masks` on the whole tensors, ties
included, for the same scores. Memory: one score tensor and one key tensor the size of the local
shard per pruned tensor, and the candidate subsets (smaller); no full-size tensor on any rank.

Supported: "global" scope (rankings "er", "erk", "raw", with or without the ceiling), "local" scope,
"N:M" and "channel" with "local" scope (rows and N:M groups lie inside one shard row block), and a
threshold. Not supported (:func:`sharded_refusal` says so in one line): ranking "layer_normalized"
(its per-layer RMS would be summed in another order, so the scores, and the masks, could differ in
the last bit), "channel" with "global" scope, weights stored transposed (``ConvTranspose``: their
output rows and input groups cross shards) with "N:M", "channel" or a ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_clipprune.pruning.masks import _nm_masks_candidates, parse_pattern, resolve_layer_sparsity
from lightning_clipprune.pruning.ranking import (
    PRUNED_SCORE,
    _protect_row_max_,
    erk_counts,
    flat_scores,
    layer_cap,
    uses_budgets,
)
from lightning_clipprune.pruning.selection import (
    STANDARD_LAYOUT,
    Layout,
    matrix_shape,
    output_rows,
    rows_to_mask,
)

__all__ = ["AllReduce", "Piece", "Shard", "compute_masks_sharded", "distributed_keep_by_count", "score_keys", "sharded_refusal"]

#: Sums a tensor over the ranks, in place (``torch.distributed.all_reduce`` on the shards' group).
AllReduce = Callable[[Tensor], Any]


class Shard(NamedTuple):
    """This rank's part of one tensor sharded along dim 0.

    ``local``: the rows held here (possibly none); ``shape``: the whole tensor's shape; ``offset``: the flat
    index, in the whole tensor, of ``local``'s first entry (first row held x row size).
    """

    local: Tensor
    shape: torch.Size
    offset: int


class Piece(NamedTuple):
    """One local block of flat scores in a selection group, and the global flat index of its first entry
    within its tensor. A group's order is its pieces' order, then the offsets."""

    scores: Tensor
    offset: int


def score_keys(scores: Tensor) -> Tensor:
    """Integers in the same order as the float ``scores`` (equal iff the floats are equal; no NaN).

    The bits of a float read as a signed integer are ordered for non-negative floats and reversed for
    negative ones: those are flipped (``x ^ 0x7FF..F``). ``-0.0`` is made ``+0.0`` first.

    Example::

        >>> score_keys(torch.tensor([-1.0, 0.0, 0.5, float("inf")])).argsort().tolist()
        [0, 1, 2, 3]
    """
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[scores.dtype]
    bits = (scores + 0.0).view(ints)  # (+ 0.0 turns -0.0 into +0.0; a fresh tensor, not a view of the input)
    sign = bits >> (8 * bits.element_size() - 1)  # -1 for negative floats, 0 otherwise
    return bits.bitwise_xor_(sign.bitwise_and_(torch.iinfo(ints).max))


def _digit(keys: Tensor, r: int, bits: int) -> Tensor:
    """Byte ``r`` (0: the top, as 0..255 in signed order) of the integer ``keys``, as uint8 (1 byte an entry)."""
    d = keys >> (bits - 8 * (r + 1))
    return (d.add_(128) if r == 0 else d.bitwise_and_(0xFF)).to(torch.uint8)


def _radix_select(
    keys: list[list[Tensor]], counts: Sequence[int], all_reduce: AllReduce, bits: int, device: torch.device
) -> tuple[list[int], list[int], list[int]]:
    """Per group, the k-th smallest key over all ranks (``k = counts[g]``), one byte a round from the top.

    Each round counts the candidates' current byte in a 256-bin histogram per group, sums the histograms
    over the ranks (one all-reduce) and keeps only the candidates in the bin that holds the k-th.

    Returns:
        ``(kth, remaining, sizes)``: the k-th key of each group; how many entries equal to it are still to
        prune (the rest of ``k`` lies strictly below it); each group's size over all ranks.
    """
    remaining = [int(k) for k in counts]
    cands = [list(g) for g in keys]
    prefix = [0] * len(keys)
    sizes = [0] * len(keys)
    for r in range(bits // 8):
        hist = torch.zeros(len(keys), 256, dtype=torch.int64, device=device)
        digits = [[_digit(c, r, bits) for c in pieces] for pieces in cands]
        for g, pieces in enumerate(digits):
            for dig in pieces:
                if dig.numel():
                    hist[g] += torch.bincount(dig, minlength=256)
        all_reduce(hist)
        cum = hist.cumsum(1).tolist()
        for g in range(len(keys)):
            if r == 0:
                sizes[g] = cum[g][-1]
                remaining[g] = min(max(remaining[g], 0), sizes[g])
            k = remaining[g]
            if k == 0:  # nothing to prune (or everything, decided by the caller): no cut to find
                cands[g] = [c[:0] for c in cands[g]]
                continue
            d = next(i for i, v in enumerate(cum[g]) if v >= k)
            remaining[g] = k - (cum[g][d - 1] if d else 0)
            prefix[g] = prefix[g] * 256 + d
            cands[g] = [c[dig == d] for c, dig in zip(cands[g], digits[g], strict=True)]
        del digits
    # the k-th key: the digits read back (the top one was shifted by 128 into signed order)
    return [p - (128 << (bits - 8)) for p in prefix], remaining, sizes


def distributed_keep_by_count(
    groups: Sequence[Sequence[Piece]],
    counts: Sequence[int],
    all_reduce: AllReduce,
    rank: int,
    world: int,
) -> list[list[Tensor]]:
    """For each group, the local keep-masks that prune exactly ``counts[g]`` lowest scores of the group.

    A group is a list of pieces (the local flat scores of one or more tensors, with their offsets); over all
    ranks, group ``g`` is the concatenation of its tensors in order. The result equals
    :func:`~.ranking.keep_mask_by_count` on that concatenation, split back into the local pieces: ties at
    the cut are broken by global flat index, the lower pruned first. Every rank must call it with the same
    number of groups, pieces per group and ``counts`` (collectives inside: ``bits / 8 + 1`` all-reduces).

    Args:
        groups: ``[[Piece(scores, offset), ...], ...]``; all scores float32, or all float64.
        counts: how many to prune in each group (clamped to ``[0, group size]``).
        all_reduce: sums a tensor over the ranks in place.
        rank: this rank's index among ``world``.
        world: the number of ranks.

    Example (one rank, a sum over one rank is the identity)::

        >>> distributed_keep_by_count([[Piece(torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0]), 0)]], [2], lambda t: t, 0, 1)
        [[tensor([ True, False, False,  True,  True])]]
    """
    dtypes = {p.scores.dtype for g in groups for p in g}
    if not dtypes:
        return [[] for _ in groups]
    if len(dtypes) > 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise ValueError(f"distributed_keep_by_count needs float32 or float64 scores, all alike, got {sorted(map(str, dtypes))}")
    bits = 32 if dtypes == {torch.float32} else 64
    keys = [[score_keys(p.scores.reshape(-1)) for p in g] for g in groups]
    device = keys[0][0].device if keys and keys[0] else torch.device("cpu")
    kth, remaining, sizes = _radix_select(keys, counts, all_reduce, bits, device)
    need = remaining  # entries equal to the k-th key still to prune, in global flat order
    n_pieces = [len(g) for g in groups]
    start = [sum(n_pieces[:g]) for g in range(len(groups))]
    table = torch.zeros(2, world, sum(n_pieces), dtype=torch.int64, device=device)
    ties: list[list[Tensor | None]] = []
    for g, pieces in enumerate(keys):
        row: list[Tensor | None] = []
        for j, key in enumerate(pieces):
            at = key == kth[g] if counts[g] > 0 and remaining[g] > 0 and sizes[g] > 0 else None
            row.append(at)
            table[0, rank, start[g] + j] = 0 if at is None else int(at.count_nonzero())
            table[1, rank, start[g] + j] = groups[g][j].offset
        ties.append(row)
    all_reduce(table)
    tie_counts, offsets = table[0].tolist(), table[1].tolist()
    out: list[list[Tensor]] = []
    for g, pieces in enumerate(keys):
        masks = []
        k = min(max(int(counts[g]), 0), sizes[g])
        for j, key in enumerate(pieces):
            if k == 0:
                masks.append(torch.ones_like(key, dtype=torch.bool))
                continue
            if k == sizes[g]:
                masks.append(torch.zeros_like(key, dtype=torch.bool))
                continue
            keep = key > kth[g]
            at = ties[g][j]
            if at is not None:
                col = start[g] + j
                earlier = sum(tie_counts[q][start[g] + i] for i in range(j) for q in range(world))
                mine = offsets[rank][col]
                earlier += sum(tie_counts[q][col] for q in range(world) if q != rank and tie_counts[q][col] and offsets[q][col] < mine)
                here = min(max(need[g] - earlier, 0), tie_counts[rank][col])
                keep |= at
                if here:
                    keep[at.nonzero().squeeze(1)[:here]] = False
            masks.append(keep)
        out.append(masks)
    return out


def sharded_refusal(
    *, scope: str, pattern: str, ranking: str, threshold: float | None, ceiling: float | None, layouts: Mapping[str, Layout]
) -> str | None:
    """Why masks of these options cannot be computed exactly on dim-0 shards, in one line; None when they can."""
    kind = parse_pattern(pattern)[0]
    if threshold is not None:
        return None
    if kind == "channel" and scope == "global":
        return (
            "pattern 'channel' with scope 'global' ranks rows of different sizes by one weighted prefix, not a"
            " k-th selection: use scope='local' (each tensor's rows ranked on its own, exact across shards)"
        )
    if scope == "global" and kind == "unstructured" and ranking == "layer_normalized":
        return (
            "ranking 'layer_normalized' divides by each layer's RMS, summed across shards in another order than"
            " on one process, so the masks could differ: use ranking 'er' (default), 'erk' or 'raw'"
        )
    transposed = sorted(n for n, lay in layouts.items() if lay.transposed)
    needs_rows = kind in ("nm", "channel") or (scope == "global" and ceiling is not None)
    if transposed and needs_rows:
        return (
            f"{', '.join(transposed)} store(s) output channels along dim 1, so their rows and N:M groups cross the"
            " dim-0 shards: leave them dense with `exclude`, or use pattern 'unstructured' without a ceiling"
            " (max_layer_sparsity=None)"
        )
    return None


def _scores(
    shards: Mapping[str, Shard], crit: Any, masks: Mapping[str, Tensor] | None, cand: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Each local shard's flat scores (pruned entries lowest, non-candidates ``+inf``), float64 if any weight is."""
    wide = any(s.local.dtype == torch.float64 for s in shards.values())
    out = {}
    for name, s in shards.items():
        part = flat_scores({name: s.local}, crit, masks, cand)
        out[name] = part.double() if wide and part.dtype != torch.float64 else part
    return out


def compute_masks_sharded(
    shards: Mapping[str, Shard],
    *,
    sparsity: float | None,
    threshold: float | None,
    scope: str,
    pattern: str,
    criterion: Any,
    masks: Mapping[str, Tensor] | None,
    ceiling: float | None,
    ranking: str,
    layer_sparsity: Mapping[str, float] | None,
    layouts: Mapping[str, Layout],
    all_reduce: AllReduce,
    rank: int,
    world: int,
) -> dict[str, Tensor]:
    """The local keep-masks of :func:`~.masks.compute_masks` for tensors sharded along dim 0, bit for bit.

    Arguments as ``compute_masks`` (``ceiling`` already resolved, ``criterion`` an object whose score of an
    entry depends on that entry alone, such as :class:`~.criteria.Magnitude`), with ``masks`` the local
    masks and the shards, collectives and rank of :func:`distributed_keep_by_count`. Every rank calls it with
    the same arguments but its own shards.

    Raises:
        ValueError: for options :func:`sharded_refusal` refuses, or an unreachable target under the ceiling.
    """
    why = sharded_refusal(scope=scope, pattern=pattern, ranking=ranking, threshold=threshold, ceiling=ceiling, layouts=layouts)
    if why is not None:
        raise ValueError(f"compute_masks_sharded: {why}")
    kind, n, m = parse_pattern(pattern)
    local = {name: s.local for name, s in shards.items()}
    with torch.no_grad():
        if threshold is not None:
            new = {name: criterion.score(name, w) > threshold for name, w in local.items()}
        elif kind == "channel":
            new = _channel_local(shards, sparsity, layer_sparsity, criterion, masks, layouts, all_reduce, rank, world)
        else:
            new = _sparsity_sharded(
                shards, sparsity, scope, (kind, n, m), criterion, masks, ceiling, ranking, layer_sparsity, layouts,
                all_reduce, rank, world,
            )
        if masks is not None:
            for name in new:
                if name in masks:
                    new[name] &= masks[name].to(new[name].device)
    return new


def _channel_local(shards, sparsity, layer_sparsity, crit, masks, layouts, all_reduce, rank, world) -> dict[str, Tensor]:
    targets = resolve_layer_sparsity(shards, layer_sparsity or {}, sparsity)
    groups, counts = [], []
    for name, s in shards.items():
        layout = layouts.get(name, STANDARD_LAYOUT)
        row_size = math.prod(s.shape[1:]) if len(s.shape) > 1 else 1
        rows = _rows(crit.score(name, s.local), layout, row_size)
        score = torch.linalg.vector_norm(rows, dim=1)
        if masks is not None and name in masks:
            kept_rows = _rows(masks[name].to(score.device), layout, row_size).any(dim=1)
            score.masked_fill_(~kept_rows, PRUNED_SCORE)
        groups.append([Piece(score, s.offset // row_size)])
        counts.append(int(round(targets[name] * s.shape[0])) if len(s.shape) > 1 else int(round(targets[name] * math.prod(s.shape))))
    _same_dtype(groups)
    keeps = distributed_keep_by_count(groups, counts, all_reduce, rank, world)
    return {
        name: rows_to_mask(keeps[i][0], s.local.shape, layouts.get(name, STANDARD_LAYOUT))
        for i, (name, s) in enumerate(shards.items())
    }


def _rows(t: Tensor, layout: Layout, row_size: int) -> Tensor:
    """``output_rows`` of a local shard, also when it holds no row (an empty shard cannot infer its row size)."""
    return t.reshape(0, row_size) if t.numel() == 0 else output_rows(t, layout)


def _same_dtype(groups: list[list[Piece]]) -> None:
    if any(p.scores.dtype == torch.float64 for g in groups for p in g):
        for g in groups:
            g[:] = [Piece(p.scores.double(), p.offset) for p in g]


def _global_counts(values: Sequence[int], all_reduce: AllReduce, device: torch.device) -> list[int]:
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    all_reduce(t)
    return t.tolist()


def _sparsity_sharded(
    shards, sparsity, scope, pattern, crit, masks, ceiling, ranking, layer_sparsity, layouts, all_reduce, rank, world
) -> dict[str, Tensor]:
    kind, n, m = pattern
    local = {name: s.local for name, s in shards.items()}
    cand = None
    if kind == "nm":
        cand = _nm_masks_candidates(local, n, m, crit, masks, layouts)
        sparsity = min(sparsity, 1.0 - n / m)
        ceiling = None
    parts = _scores(shards, crit, masks, cand)
    names = list(shards)
    sizes = {x: math.prod(s.shape) for x, s in shards.items()}
    device = next(iter(parts.values())).device
    if scope == "local":
        targets = resolve_layer_sparsity(names, layer_sparsity or {}, sparsity)
        counts = [
            int(round((min(targets[x], 1.0 - n / m) if kind == "nm" else targets[x]) * sizes[x])) for x in names
        ]
        keeps = distributed_keep_by_count([[Piece(parts[x], shards[x].offset)] for x in names], counts, all_reduce, rank, world)
        return {x: keeps[i][0].view(shards[x].local.shape) for i, x in enumerate(names)}
    k = int(round(sparsity * sum(sizes.values())))
    local_pruned = [
        shards[x].local.numel() - int(masks[x].count_nonzero()) if masks is not None and x in masks else 0 for x in names
    ]
    already = dict(zip(names, _global_counts(local_pruned, all_reduce, device), strict=True))
    caps = None
    if ceiling is not None:
        caps = {x: max(layer_cap(shards[x].shape, ceiling, layouts.get(x, STANDARD_LAYOUT)), already[x]) for x in names}
        for x in names:
            if len(shards[x].shape) >= 2 and shards[x].local.numel():
                _protect_row_max_(parts[x], shards[x].local.shape, layouts.get(x, STANDARD_LAYOUT))
        if sum(caps.values()) < k:
            raise ValueError(
                f"sparsity {sparsity} cannot be met with `max_layer_sparsity={ceiling}` and one weight kept per output"
                f" row: at most {sum(caps.values()) / sum(sizes.values()):.4f} can be pruned. Lower the sparsity, raise"
                " `max_layer_sparsity`, or pass `max_layer_sparsity=None` (no ceiling)."
            )
    if uses_budgets(ranking, scope, kind, None):
        shapes = {
            x: matrix_shape(shards[x].shape, layouts.get(x, STANDARD_LAYOUT)) if ranking == "er" else tuple(shards[x].shape)
            for x in names
        }
        counts = erk_counts(shapes, k, caps, already)
        keeps = distributed_keep_by_count(
            [[Piece(parts[x], shards[x].offset)] for x in names], [counts[x] for x in names], all_reduce, rank, world
        )
        return {x: keeps[i][0].view(shards[x].local.shape) for i, x in enumerate(names)}
    return _global_keep_sharded(shards, parts, k, caps, all_reduce, rank, world)


def _global_keep_sharded(shards, parts, k, caps, all_reduce, rank, world) -> dict[str, Tensor]:
    """``ranking._global_keep`` on shards: one cut over the free tensors, capped tensors fixed at their caps."""
    names = list(shards)
    device = next(iter(parts.values())).device
    free, fixed = list(names), {}

    def select(free: list[str], k: int) -> dict[str, Tensor]:
        keeps = distributed_keep_by_count([[Piece(parts[x], shards[x].offset) for x in free]], [k], all_reduce, rank, world)
        return dict(zip(free, keeps[0], strict=True))

    result = select(free, k)
    while caps is not None:
        pruned = _global_counts([int((~result[x]).count_nonzero()) for x in free], all_reduce, device)
        over = [x for x, p in zip(free, pruned, strict=True) if p > caps[x]]
        if not over:
            break
        keeps = distributed_keep_by_count([[Piece(parts[x], shards[x].offset)] for x in over], [caps[x] for x in over], all_reduce, rank, world)
        for i, x in enumerate(over):
            fixed[x] = keeps[i][0]
            k -= caps[x]
        free = [x for x in free if x not in over]
        if not free:
            break
        result = select(free, k)
    return {x: (fixed[x] if x in fixed else result[x]).view(shards[x].local.shape) for x in names}
