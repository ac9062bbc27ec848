"""Keep-masks for each pattern: unstructured, N:M and whole output channels, by sparsity or by threshold.

What :func:`compute_masks` does, option by option (every default is shared with ``MagnitudePruneCallback``):

- ``sparsity=s``, "unstructured": prune exactly ``round(s * n)`` entries with the lowest score, ``n``
  all the entries ("global", shared between tensors by ``ranking``) or each tensor's own size
  ("local", each tensor at its ``layer_sparsity`` if named there). Ties by flat index (in ``weights``
  order), lower index pruned first.
- ``ranking``, "global" unstructured: "er" (default, :data:`~.ranking.DEFAULT_RANKING`) and "erk" give
  each tensor its pruned count (:func:`~.ranking.erk_counts`, exact total), its lowest scores go; "raw"
  is one threshold over every tensor (``torch.nn.utils.prune.global_unstructured(..., L1Unstructured,
  amount=s)``); "layer_normalized" divides scores by their tensor's RMS first. N:M and "channel" ignore it.
- ``max_layer_sparsity=c`` ("global" only): no tensor is pruned past :func:`~.ranking.layer_cap`
  (``floor(c * n_i)`` entries, and one weight kept in every output row); what a capped tensor would have
  lost is taken from the others, so exactly ``round(s * n)`` entries are still pruned. Raises when that
  is impossible. "auto" (default): no ceiling where per-layer budgets decide, else 0.99
  (:func:`~.ranking.resolve_max_layer_sparsity`).
- "N:M": only entries among the ``M - N`` lowest of their group of ``M`` (:func:`nm_candidates`) can be
  pruned; ``round(s * n)`` of them are, so at ``s = 1 - N/M`` every group keeps exactly ``N``.
- "channel": whole output rows, scored by the L2 norm of their scores. "local" prunes
  ``round(s * rows)`` rows of each tensor; "global" ranks all rows by RMS (the L2 norm over
  ``sqrt(row size)``, so layers of different fan-in compare fairly) and prunes the longest prefix
  whose weight count does not exceed ``round(s * n)`` (with a ceiling: skipping rows of capped tensors). A
  1-D ``<layer>.bias`` whose layer's weight is in ``weights`` is pruned with its channel, never ranked.
- ``channel_groups`` ("channel" only, :mod:`~.coupling`): output channels coupled across layers (the layers
  whose outputs a residual addition sums) are pruned together: each position of a group is scored by the RMS
  of all the weights it would remove (the coupled rows of every member: the square root of the sum of their
  squared L2 norms over their total size; for a group of one, the "global" row score above), and the same
  positions are pruned in every member. "local" prunes ``round(s * width)`` positions of each group; "global"
  ranks the positions of all groups as it ranks rows (each weighing the rows it removes). A position with
  a row already pruned in one member is pruned in all (masks only grow). Weights in no group stand alone.
- ``threshold=eps`` ("unstructured" only): prune where the score is ``<= eps`` (``|w| <= eps`` for
  "magnitude"); no ceiling.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_clipprune._choices import PATTERNS, SCOPES, parse_pattern
from lightning_clipprune._validation import bad_value, check_choice, check_real
from lightning_clipprune.pruning.coupling import check_channel_groups
from lightning_clipprune.pruning.criteria import Taylor, make_criterion
from lightning_clipprune.pruning.ranking import (
    DEFAULT_RANKING,
    PRUNED_SCORE,
    RANKINGS,
    capped_global,
    count_kept,
    flat_scores,
    keep_mask_by_count,
    layer_keep,
    magnitude_budget_masks,
    resolve_max_layer_sparsity,
    uses_budgets,
)
from lightning_clipprune.pruning.selection import STANDARD_LAYOUT, Layout, output_rows, rows_to_mask
from lightning_clipprune.pruning.wrappers import STORED_WEIGHT_NAMES

__all__ = [
    "PATTERNS",
    "SCOPES",
    "check_layer_sparsity",
    "check_pattern_fits",
    "compute_masks",
    "nm_candidates",
    "parse_pattern",
    "resolve_layer_sparsity",
]

def check_pattern_fits(weights: Mapping[str, Tensor], pattern: str, layouts: Mapping[str, Layout] | None = None) -> None:
    """Raise a clear ``ValueError`` when a weight's shape does not fit ``pattern``.

    "N:M" groups run along each weight's input channels (dim 1, or dim 0 for ``ConvTranspose``), within
    one convolution group, so the input channels per group must be a multiple of ``M``: a depthwise
    convolution (one input channel per group) never fits. "unstructured" and "channel" fit every shape.

    Raises:
        ValueError: naming every weight that does not fit, with the ``exclude`` list that leaves them dense.
    """
    kind, _, m = parse_pattern(pattern)
    if kind != "nm":
        return
    layouts = layouts or {}
    bad = []
    for name, w in weights.items():
        layout = layouts.get(name, STANDARD_LAYOUT)
        width = w.shape[0] // layout.groups if layout.transposed else (w.shape[1] if w.dim() >= 2 else w.shape[0])
        if width % m:
            note = " (a one-channel input, or a depthwise convolution)" if width == 1 and w.dim() > 2 else ""
            bad.append(f"`{name}` {tuple(w.shape)}: {width} input channels per group{note}")
    if bad:
        raise ValueError(
            f"pattern {pattern!r} groups {m} consecutive input channels, so the input channels per group must be"
            f" a multiple of {m}: {'; '.join(bad)}. Leave them dense with"
            f" `exclude={[b.split('`')[1] for b in bad]!r}`."
        )


def check_layer_sparsity(owner: str, value: Any, what: str = "layer_sparsity") -> dict[str, float] | None:
    """A ``{parameter name or fnmatch pattern: sparsity in [0, 1)}`` mapping, or None (``what``: its argument's name).

    Example::

        >>> check_layer_sparsity("MagnitudePruneCallback", {"fc.*": 0.9})
        {'fc.*': 0.9}
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise bad_value(owner, what, "a {parameter name or fnmatch pattern: sparsity} mapping or None", value)
    return {k: check_real(owner, f"{what}[{k!r}]", v, low=0.0, high=1.0, high_open=True) for k, v in value.items()}


def resolve_layer_sparsity(
    names: Iterable[str], mapping: Mapping[str, float], default: float, what: str = "layer_sparsity"
) -> dict[str, float]:
    """``{name: sparsity}`` for every name: an exact key first, else the first matching ``fnmatch`` key, else ``default``.

    ``what``: the argument's name in the error.

    Raises:
        ValueError: a key that matches no name (a typo would otherwise leave a layer silently at ``default``).

    Example::

        >>> resolve_layer_sparsity(["a.weight", "b.weight"], {"a.*": 0.9}, 0.5)
        {'a.weight': 0.9, 'b.weight': 0.5}
    """
    names = list(names)
    unused = [k for k in mapping if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)]
    if unused:
        raise ValueError(f"`{what}` keys {unused} match no prunable parameter; the prunable ones are {names}")
    out = {}
    for n in names:
        key = n if n in mapping else next((k for k in mapping if fnmatch.fnmatchcase(n, k)), None)
        out[n] = float(mapping[key]) if key is not None else float(default)
    return out


def nm_candidates(scores: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """True where an entry is among the ``m - n`` lowest of its group of ``m`` consecutive input weights.

    Groups run along the input dimension ``dim``: dim 1 of a ``Linear`` (out, in) or ``Conv`` (out, in, *k)
    weight, at a fixed output row and kernel position; dim 0 of a ``ConvTranspose`` (in, out, *k); the only
    dim of a 1-D tensor. Ties are broken by position (the earlier is pruned first, stable sort).

    Raises:
        ValueError: if the input dimension is not a multiple of ``m``.

    Example::

        >>> nm_candidates(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[False,  True, False,  True]])
    """
    s = scores.movedim(dim, -1) if scores.dim() >= 2 else scores
    if s.shape[-1] % m:
        raise ValueError(f"pattern '{n}:{m}' needs an input dimension divisible by {m}, got shape {tuple(scores.shape)}")
    groups = s.reshape(-1, m)
    order = groups.argsort(dim=1, stable=True)
    cand = torch.zeros_like(groups, dtype=torch.bool)
    cand.scatter_(1, order[:, : m - n], True)
    cand = cand.view(s.shape)
    return cand.movedim(-1, dim) if scores.dim() >= 2 else cand


def _criterion_of(criterion: Any, grad_avgs: Mapping[str, Tensor] | None) -> Any:
    if isinstance(criterion, str) and criterion == "taylor":
        if grad_avgs is None:
            raise ValueError("criterion 'taylor' needs `grad_avgs`, the running averages of the gradients")
        return Taylor(grad_avgs=grad_avgs)
    return make_criterion(criterion)


def _check_compute_args(
    sparsity: float | None,
    threshold: float | None,
    scope: str,
    pattern: str,
    ranking: str,
    max_layer_sparsity: float | str | None,
    layer_sparsity: Mapping[str, float] | None,
    channel_groups: Any = None,
) -> float | None:
    """Check the arguments of :func:`compute_masks`; return the ceiling ("auto" resolved)."""
    owner = "compute_masks"
    if (sparsity is None) == (threshold is None):
        raise ValueError(f"give exactly one of `sparsity` and `threshold`, got sparsity={sparsity}, threshold={threshold}")
    check_real(owner, "sparsity", sparsity, low=0.0, high=1.0, allow_none=True)
    check_real(owner, "threshold", threshold, allow_none=True)
    check_choice(owner, "scope", scope, SCOPES)
    check_choice(owner, "ranking", ranking, RANKINGS)
    if check_layer_sparsity(owner, layer_sparsity) and (scope != "local" or threshold is not None):
        raise bad_value(owner, "layer_sparsity", "None unless scope='local' with a `sparsity`", layer_sparsity)
    kind = parse_pattern(pattern, owner=owner)[0]
    if threshold is not None and kind != "unstructured":
        raise ValueError(f"`threshold` works with pattern 'unstructured' only, got pattern={pattern!r}")
    if channel_groups is not None and (kind != "channel" or threshold is not None or layer_sparsity):
        raise ValueError(
            f"`{owner}(channel_groups=...)` works with pattern 'channel' and a `sparsity` only (no `layer_sparsity`),"
            f" got pattern={pattern!r}, threshold={threshold!r}, layer_sparsity={layer_sparsity!r}."
        )
    return resolve_max_layer_sparsity(max_layer_sparsity, uses_budgets(ranking, scope, kind, threshold))


def compute_masks(
    weights: Mapping[str, Tensor],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "global",
    pattern: str = "unstructured",
    criterion: Any = "magnitude",
    grad_avgs: Mapping[str, Tensor] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    max_layer_sparsity: float | str | None = "auto",
    ranking: str = DEFAULT_RANKING,
    layer_sparsity: Mapping[str, float] | None = None,
    layouts: Mapping[str, Layout] | None = None,
    channel_groups: Sequence[Mapping[str, Tensor]] | None = None,
    followers: Collection[str] = (),
) -> dict[str, Tensor]:
    """New keep-masks ``{name: bool tensor}`` (True = kept) for ``weights``; options: this module's docstring.

    Args:
        weights: ``{name: tensor}``, in a fixed order (ties are broken in it).
        sparsity: target fraction of pruned entries, in [0, 1] (exactly one of it and ``threshold``).
        threshold: prune entries scoring ``<= threshold``.
        scope: "global" or "local".
        pattern: "unstructured", "channel" or an "N:M" string such as "2:4".
        criterion: a registered name ("magnitude", "taylor", ...) or a criterion object (:mod:`.criteria`).
        grad_avgs: ``{name: running gradient average}`` for the name "taylor".
        masks: the current masks; entries they prune stay pruned (masks only grow).
        max_layer_sparsity: the per-tensor ceiling of "global" scope: "auto", a number in (0, 1], or None.
        ranking: "er", "erk", "raw" or "layer_normalized" (:data:`~.ranking.RANKINGS`).
        layer_sparsity: ``{name or fnmatch pattern: sparsity}`` ("local" only), others at ``sparsity``.
        layouts: ``{name: Layout}`` for weights not stored ``(out, in, *k)`` (:func:`~.selection.weight_layouts`).
        channel_groups: "channel" only: coupled output channels, ``[{name: LongTensor of its channels}, ...]``
            (:func:`~.coupling.channel_groups`); the same positions are pruned in every member.
        followers: with ``channel_groups``: names of ``weights`` pruned only with their group, never scored (a
            BatchNorm's ``weight`` and ``bias``): a group of followers alone is kept whole.

    Raises:
        ValueError: for bad arguments, shapes that do not fit the pattern, or an unreachable target.

    Example::

        >>> w = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([[0.2, -0.05]])}
        >>> compute_masks(w, sparsity=0.4, ranking="raw")
        {'a': tensor([False,  True,  True]), 'b': tensor([[ True, False]])}
    """
    kind, n, m = parse_pattern(pattern, owner="compute_masks")
    ceiling = _check_compute_args(
        sparsity, threshold, scope, pattern, ranking, max_layer_sparsity, layer_sparsity, channel_groups
    )
    if followers and channel_groups is None:
        raise ValueError("compute_masks: `followers` are pruned with their channel group: pass `channel_groups` too")
    crit = _criterion_of(criterion, grad_avgs)
    if not weights:
        return {}
    layouts = dict(layouts or {})
    check_pattern_fits(weights, pattern, layouts)
    within: Collection[str] = ()  # the names whose new mask is already ANDed with the old one
    with torch.no_grad():
        if threshold is not None:
            new = {name: crit.score(name, w) > threshold for name, w in weights.items()}
        elif channel_groups is not None:
            groups = check_channel_groups(channel_groups, weights, layouts)
            new = _coupled_masks(weights, sparsity, scope, groups, crit, masks, ceiling, layouts, set(followers))
        elif kind == "channel":
            targets = resolve_layer_sparsity(weights, layer_sparsity or {}, sparsity) if scope == "local" else None
            new = _channel_masks(weights, sparsity, targets, crit, masks, ceiling, layouts)
        else:
            new, within = _sparsity_masks(
                weights, sparsity, scope, (kind, n, m), crit, masks, ceiling, ranking, layer_sparsity, layouts
            )
        if masks is not None:
            for name in new:
                if name in masks and name not in within:
                    new[name] &= masks[name].to(new[name].device)
        return new


def _sparsity_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    pattern: tuple[str, int, int],
    crit: Any,
    masks: Mapping[str, Tensor] | None,
    ceiling: float | None,
    ranking: str,
    layer_sparsity: Mapping[str, float] | None,
    layouts: Mapping[str, Layout],
) -> tuple[dict[str, Tensor], Collection[str]]:
    """Unstructured and N:M masks for a sparsity target, and the names whose mask is already within ``masks``."""
    kind, n, m = pattern
    cand = None
    if kind == "nm":
        cand = _nm_masks_candidates(weights, n, m, crit, masks, layouts)
        sparsity = min(sparsity, 1.0 - n / m)
        ceiling = None  # every group keeps N: never binds
    if scope == "global":
        # N:M fixes every layer's count at M - N per group: per-layer budgets would break the pattern
        budget = ranking if uses_budgets(ranking, scope, kind, None) else None
        if budget is not None and ceiling is None:  # each layer alone: no flat buffer of the whole model
            new = magnitude_budget_masks(weights, crit, sparsity, layouts, masks, budget)
            if new is not None:
                return new, new.keys()
        flat = flat_scores(weights, crit, masks, cand, normalize=ranking == "layer_normalized")
        return capped_global(weights, flat, sparsity, ceiling, layouts, masks, budget=budget), ()
    targets = resolve_layer_sparsity(weights, layer_sparsity or {}, sparsity)
    new, within = {}, set()
    for name, w in weights.items():
        target = min(targets[name], 1.0 - n / m) if kind == "nm" else targets[name]
        n_prune = int(round(target * w.numel()))
        if cand is None:
            live = w.numel() if masks is None or name not in masks else count_kept(masks[name])
            new[name] = layer_keep(name, w, crit, masks, n_prune, live).view(w.shape)
            within.add(name)
        else:
            new[name] = keep_mask_by_count(flat_scores({name: w}, crit, masks, cand), n_prune).view(w.shape)
    return new, within


def _nm_masks_candidates(
    weights: Mapping[str, Tensor],
    n: int,
    m: int,
    crit: Any,
    masks: Mapping[str, Tensor] | None,
    layouts: Mapping[str, Layout],
) -> dict[str, Tensor]:
    cand = {}
    for name, w in weights.items():
        s = crit.score(name, w)
        if masks is not None and name in masks:
            s.masked_fill_(~masks[name].to(s.device), PRUNED_SCORE)
        cand[name] = nm_candidates(s, n, m, dim=0 if layouts.get(name, STANDARD_LAYOUT).transposed else 1)
    return cand


def _global_rows(
    row_scores: Mapping[str, Tensor], row_sizes: Mapping[str, int], sparsity: float, max_layer_sparsity: float | None
) -> dict[str, Tensor]:
    """Prune the lowest rows over all tensors, the longest prefix whose weight count fits ``sparsity``; with a
    ceiling, at most ``floor(c * rows)`` rows (and never the last one) of each tensor."""
    scores = torch.cat(list(row_scores.values()))
    sizes = torch.cat([torch.full_like(s, row_sizes[n], dtype=torch.long) for n, s in row_scores.items()])
    order = scores.argsort(stable=True)
    if max_layer_sparsity is not None:
        layer = torch.cat([torch.full_like(s, i, dtype=torch.long) for i, s in enumerate(row_scores.values())])
        caps = torch.tensor(
            [max(min(math.floor(max_layer_sparsity * s.numel() + 1e-9), s.numel() - 1), int((s < 0).sum()))
             for s in row_scores.values()],
            device=scores.device,
        )
        ranked = layer[order]
        rank = torch.zeros_like(ranked)
        for i in range(len(row_scores)):
            at = (ranked == i).nonzero().squeeze(1)
            rank[at] = torch.arange(at.numel(), device=at.device)
        order = order[rank < caps[ranked]]
    budget = int(round(sparsity * int(sizes.sum())))
    n_rows = int((sizes[order].cumsum(0) <= budget).sum())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:n_rows]] = False
    return dict(zip(row_scores, keep.split([s.numel() for s in row_scores.values()]), strict=True))


def _channel_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    targets: Mapping[str, float] | None,
    crit: Any,
    masks: Mapping[str, Tensor] | None,
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout],
) -> dict[str, Tensor]:
    row_scores, row_sizes = {}, {}
    biases = _channel_biases(weights, layouts)  # a bias goes with its layer's channels, never ranked on its own
    for name, w in weights.items():
        if name in biases:
            continue
        rows = output_rows(crit.score(name, w), layouts.get(name, STANDARD_LAYOUT))
        score = torch.linalg.vector_norm(rows, dim=1)
        if targets is None:
            score = score / math.sqrt(rows.shape[1])
        if masks is not None and name in masks:
            kept_rows = output_rows(masks[name].to(score.device), layouts.get(name, STANDARD_LAYOUT)).any(dim=1)
            score.masked_fill_(~kept_rows, PRUNED_SCORE)
        row_scores[name], row_sizes[name] = score, rows.shape[1]
    for weight in biases.values():
        row_sizes[weight] += 1  # each channel carries its bias entry
    if targets is not None:
        new_rows = {
            name: keep_mask_by_count(score, int(round(targets[name] * score.numel()))) for name, score in row_scores.items()
        }
    else:
        new_rows = _global_rows(row_scores, row_sizes, sparsity, max_layer_sparsity)
    new_rows.update({bias: new_rows[weight] for bias, weight in biases.items()})
    return {name: rows_to_mask(new_rows[name], w.shape, layouts.get(name, STANDARD_LAYOUT)) for name, w in weights.items()}


def _channel_biases(weights: Mapping[str, Tensor], layouts: Mapping[str, Layout]) -> dict[str, str]:
    """``{bias name: weight name}`` for the 1-D ``<layer>.bias`` in ``weights`` whose layer's weight is in
    ``weights`` too with one output channel per bias entry: the bias is pruned with its channel."""
    out = {}
    for name, b in weights.items():
        if b.dim() != 1 or not name.endswith("bias"):
            continue
        layer = name[: -len("bias")]
        for stored in STORED_WEIGHT_NAMES:
            w = weights.get(layer + stored)
            if w is not None and w.dim() >= 2 and output_rows(w, layouts.get(layer + stored, STANDARD_LAYOUT)).shape[0] == b.numel():
                out[name] = layer + stored
                break
    return out


def _coupled_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    groups: Sequence[Mapping[str, Tensor]],
    crit: Any,
    masks: Mapping[str, Tensor] | None,
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout],
    followers: set[str],
) -> dict[str, Tensor]:
    """"channel" masks over coupled groups: one score per group position, the same positions pruned in every
    member; ``followers`` count in the sparsity but not in the score."""
    scores, sizes = {}, {}
    for i, group in enumerate(groups):
        total, size, scored, pruned = None, 0, 0, None
        for name, channels in group.items():
            layout = layouts.get(name, STANDARD_LAYOUT)
            rows = output_rows(weights[name] if name in followers else crit.score(name, weights[name]), layout)
            at = channels.to(rows.device)
            size += rows.shape[1]
            if name not in followers:
                part = rows.square().sum(dim=1, dtype=torch.float64)[at]
                total = part if total is None else total + part
                scored += rows.shape[1]
            if masks is not None and name in masks:
                dead = ~output_rows(masks[name].to(rows.device), layout).any(dim=1)[at]
                pruned = dead if pruned is None else pruned | dead
        if total is None:  # followers only: nothing ranks the group, it is kept whole
            continue
        score = (total / scored).sqrt()  # the RMS of every ranked weight the position would remove
        if pruned is not None:
            score.masked_fill_(pruned, PRUNED_SCORE)
        scores[str(i)], sizes[str(i)] = score, size
    if scope == "local":
        keep = {k: keep_mask_by_count(s, int(round(sparsity * s.numel()))) for k, s in scores.items()}
    else:
        keep = _global_rows(scores, sizes, sparsity, max_layer_sparsity) if scores else {}
    new = {}
    for i, group in enumerate(groups):
        for name, channels in group.items():
            w = weights[name]
            layout = layouts.get(name, STANDARD_LAYOUT)
            row_keep = torch.ones(channels.numel(), dtype=torch.bool, device=w.device)
            if str(i) in keep:
                row_keep[channels.to(w.device)] = keep[str(i)].to(w.device)
            new[name] = rows_to_mask(row_keep, w.shape, layout)
    return new
