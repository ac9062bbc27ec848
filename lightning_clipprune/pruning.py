"""Pure pruning core: which parameters are prunable, importance criteria, mask computation, applying masks.

No Lightning import here: everything is tested on hand-built tensors and modules.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_prunable_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_bias: bool = False,
    keep_first_and_last: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters that pruning (and sparsity reporting) considers, by their ``named_parameters`` name.

    By default the ``weight`` of every ``Linear`` and ``Conv1d/2d/3d`` layer; biases only when
    ``prune_bias``; normalisation, embedding and recurrent layers never unless named in ``include``.
    A tensor reached through two modules (tied weights) appears once, under its first name.

    Args:
        module: the network.
        include: ``fnmatch`` patterns over parameter names (``"features.*.weight"``). When given, the
            parameters matching it are selected whatever their layer type (replaces the default).
        exclude: ``fnmatch`` patterns of parameter names to leave dense, applied after ``include``.
        prune_bias: also select the ``bias`` of the default layer types.
        keep_first_and_last: leave the first and the last selected layer (in module order) dense.

    Returns:
        An ordered ``{name: parameter}`` dict, in ``named_parameters`` order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> list(select_prunable_parameters(net))
        ['0.weight', '2.weight']
    """
    seen: set[int] = set()
    selected: dict[str, nn.Parameter] = {}
    default_names: set[str] = set()
    if include is None:
        for mod_name, mod in module.named_modules():
            if isinstance(mod, PRUNABLE_TYPES):
                prefix = f"{mod_name}." if mod_name else ""
                default_names.add(prefix + "weight")
                if prune_bias:
                    default_names.add(prefix + "bias")
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        chosen = _matches(name, include) if include is not None else name in default_names
        if chosen and not _matches(name, exclude):
            seen.add(id(param))
            selected[name] = param
    if keep_first_and_last and selected:
        weights = [n for n in selected if n.endswith("weight")] or list(selected)
        for n in {weights[0], weights[-1]}:
            layer = n.rsplit(".", 1)[0] if "." in n else ""
            for key in [k for k in selected if (k.rsplit(".", 1)[0] if "." in k else "") == layer]:
                del selected[key]
    return selected


# ---------------------------------------------------------------------------------------------------------
# Importance, mask computation and mask application
# ---------------------------------------------------------------------------------------------------------

#: Importance criteria understood by :func:`compute_masks`.
CRITERIA: tuple[str, ...] = ("magnitude", "taylor")
#: Scopes understood by :func:`compute_masks`.
SCOPES: tuple[str, ...] = ("global", "local")
#: Pattern names (besides ``"N:M"`` strings such as ``"2:4"``).
PATTERNS: tuple[str, ...] = ("unstructured", "N:M", "channel")

# Score given to entries that are already pruned: below every real importance (all are >= 0), so they
# are selected first and a mask only ever grows.
_PRUNED_SCORE = -1.0


def parse_pattern(pattern: str) -> tuple[str, int, int]:
    """``"unstructured"`` -> ``("unstructured", 0, 0)``, ``"2:4"`` -> ``("nm", 2, 4)``, ``"channel"`` -> ``("channel", 0, 0)``.

    Raises:
        ValueError: for anything else, or ``N:M`` without ``0 < N < M``.

    Example::

        >>> parse_pattern("2:4")
        ('nm', 2, 4)
    """
    if pattern in ("unstructured", "channel"):
        return pattern, 0, 0
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return "nm", n, m
    raise ValueError(
        f"`pattern` must be 'unstructured', 'channel' or 'N:M' with integers 0 < N < M (such as '2:4'),"
        f" got {pattern!r}"
    )


def importance(weight: Tensor, criterion: str = "magnitude", grad_avg: Tensor | None = None) -> Tensor:
    """The importance score of every entry: ``|w|`` ("magnitude") or ``|w * g|`` ("taylor").

    The Taylor score is the first-order estimate of the loss change when ``w`` is set to 0 (Molchanov
    et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017), with
    ``g`` a running average of the (clipped) gradient. Low-precision inputs are scored in float32.

    Raises:
        ValueError: for an unknown criterion or "taylor" without ``grad_avg``.

    Example::

        >>> importance(torch.tensor([-2.0, 1.0]), "taylor", torch.tensor([0.5, -3.0]))
        tensor([1., 3.])
    """
    w = weight.detach()
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    if criterion == "magnitude":
        return w.abs()
    if criterion == "taylor":
        if grad_avg is None:
            raise ValueError("criterion 'taylor' needs `grad_avg`, the running average of the gradient")
        return (w * grad_avg.to(w.dtype)).abs_()
    raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}")


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
        sample_size: sample used to bracket; inputs smaller than 8 samples use ``kthvalue`` directly.
        seed: seed of the sample (the result does not depend on it, only the speed).

    Example::

        >>> kth_smallest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 3)
        tensor(2.)
    """
    n = x.numel()
    if n <= 8 * sample_size:
        return x.kthvalue(k).values
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
                return band.kthvalue(k - below).values
    return x.kthvalue(k).values


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
    kth = kth_smallest(scores, n_prune)
    keep = scores > kth
    n_at_or_below = n - int(keep.count_nonzero())
    if n_at_or_below > n_prune:  # ties at the cut: keep the last ones by flat index
        ties = (scores == kth).nonzero().squeeze(1)  # ascending flat indices
        keep[ties[ties.numel() - (n_at_or_below - n_prune) :]] = True
    return keep


def _flat_scores(
    weights: dict[str, Tensor],
    criterion: str,
    grad_avgs: dict[str, Tensor] | None,
    masks: dict[str, Tensor] | None,
    blocked: dict[str, Tensor] | None = None,
) -> Tensor:
    """All scores in one preallocated flat tensor (the only full-size temporary); already-pruned entries
    score lowest, entries where ``blocked`` is False score ``+inf`` (never chosen)."""
    first = next(iter(weights.values()))
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights.values()) else torch.float32
    flat = torch.empty(sum(w.numel() for w in weights.values()), dtype=dtype, device=first.device)
    offset = 0
    for name, w in weights.items():
        part = flat[offset : offset + w.numel()]
        offset += w.numel()
        if criterion == "magnitude":
            torch.abs(w.detach().reshape(-1), out=part)
        else:
            g = grad_avgs.get(name) if grad_avgs is not None else None
            part.copy_(importance(w, criterion, g).reshape(-1))
        if masks is not None and name in masks:
            part.masked_fill_(~masks[name].reshape(-1).to(part.device), _PRUNED_SCORE)
        if blocked is not None and name in blocked:
            part.masked_fill_(~blocked[name].reshape(-1).to(part.device), math.inf)
    return flat


def _split_like(flat: Tensor, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    sizes = [w.numel() for w in weights.values()]
    return {name: part.view(w.shape) for (name, w), part in zip(weights.items(), flat.split(sizes), strict=True)}


def nm_candidates(scores: Tensor, n: int, m: int) -> Tensor:
    """True where an entry is among the ``m - n`` lowest of its group of ``m`` consecutive input weights.

    Groups run along the input dimension: dim 1 of a ``Linear`` (out, in) or ``Conv`` (out, in, *k)
    weight, at a fixed output row and kernel position; the only dim of a 1-D tensor. Ties are broken by
    position (the earlier is pruned first, stable sort).

    Raises:
        ValueError: if the input dimension is not a multiple of ``m``.

    Example::

        >>> nm_candidates(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[False,  True, False,  True]])
    """
    s = scores.movedim(1, -1) if scores.dim() >= 2 else scores
    if s.shape[-1] % m:
        raise ValueError(f"pattern '{n}:{m}' needs an input dimension divisible by {m}, got shape {tuple(scores.shape)}")
    groups = s.reshape(-1, m)
    order = groups.argsort(dim=1, stable=True)
    cand = torch.zeros_like(groups, dtype=torch.bool)
    cand.scatter_(1, order[:, : m - n], True)
    cand = cand.view(s.shape)
    return cand.movedim(-1, 1) if scores.dim() >= 2 else cand


def compute_masks(
    weights: dict[str, Tensor],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "global",
    pattern: str = "unstructured",
    criterion: str = "magnitude",
    grad_avgs: dict[str, Tensor] | None = None,
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """New keep-masks (bool, True = kept) for ``weights``; they only grow: what ``masks`` pruned stays pruned.

    Exactly one of ``sparsity`` and ``threshold``:

    - ``sparsity=s``, "unstructured": prune exactly ``round(s * n)`` entries with the lowest score, ``n``
      all the entries ("global": one threshold over every tensor, the semantics of
      ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=s)``) or each tensor's own
      size ("local"). Ties by flat index (in ``weights`` order), lower index pruned first.
    - "N:M": only entries among the ``M - N`` lowest of their group of ``M`` (:func:`nm_candidates`) can be
      pruned; ``round(s * n)`` of them are, so at ``s = 1 - N/M`` every group keeps exactly ``N``.
    - "channel": whole output rows (dim 0), scored by the L2 norm of their scores. "local" prunes
      ``round(s * rows)`` rows of each tensor; "global" ranks all rows by RMS (the L2 norm over
      ``sqrt(row size)``, so layers of different fan-in compare fairly) and prunes the longest prefix
      whose weight count does not exceed ``round(s * n)``.
    - ``threshold=eps`` ("unstructured" only): prune where the score is ``<= eps`` (``|w| <= eps`` for
      "magnitude").

    Args:
        weights: ``{name: tensor}``, in a fixed order (ties are broken in it).
        sparsity: target fraction of pruned entries, in [0, 1].
        threshold: prune entries scoring ``<= threshold``.
        scope: "global" or "local".
        pattern: "unstructured", "channel" or an "N:M" string such as "2:4".
        criterion: "magnitude" or "taylor".
        grad_avgs: ``{name: running gradient average}`` for "taylor".
        masks: the current masks; entries they prune stay pruned.

    Returns:
        ``{name: bool tensor}`` of the weights' shapes (for "global" unstructured, views of one flat
        tensor: no more memory than one bool per weight).

    Raises:
        ValueError: for bad arguments.

    Example::

        >>> w = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([[0.2, -0.05]])}
        >>> compute_masks(w, sparsity=0.4)
        {'a': tensor([False,  True,  True]), 'b': tensor([[ True, False]])}
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError(f"give exactly one of `sparsity` and `threshold`, got sparsity={sparsity}, threshold={threshold}")
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}")
    kind, n, m = parse_pattern(pattern)
    if not weights:
        return {}
    with torch.no_grad():
        if threshold is not None:
            if kind != "unstructured":
                raise ValueError(f"`threshold` works with pattern 'unstructured' only, got pattern={pattern!r}")
            new = {}
            for name, w in weights.items():
                g = grad_avgs.get(name) if grad_avgs is not None else None
                keep = importance(w, criterion, g) > threshold
                new[name] = keep & masks[name] if masks is not None and name in masks else keep
            return new
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity}")
        if kind == "channel":
            return _channel_masks(weights, sparsity, scope, criterion, grad_avgs, masks)
        cand = None
        if kind == "nm":
            cand = {}
            for name, w in weights.items():
                g = grad_avgs.get(name) if grad_avgs is not None else None
                s = importance(w, criterion, g)
                if masks is not None and name in masks:
                    s.masked_fill_(~masks[name], _PRUNED_SCORE)
                cand[name] = nm_candidates(s, n, m)
            sparsity = min(sparsity, 1.0 - n / m)
        if scope == "global":
            flat = _flat_scores(weights, criterion, grad_avgs, masks, cand)
            keep = keep_mask_by_count(flat, int(round(sparsity * flat.numel())))
            del flat
            new = _split_like(keep, weights)
        else:
            new = {}
            for name, w in weights.items():
                one = {name: w}
                flat = _flat_scores(one, criterion, grad_avgs, masks, cand)
                new[name] = keep_mask_by_count(flat, int(round(sparsity * flat.numel()))).view(w.shape)
        if masks is not None:
            for name in new:
                if name in masks:
                    new[name] &= masks[name]
        return new


def _channel_masks(
    weights: dict[str, Tensor],
    sparsity: float,
    scope: str,
    criterion: str,
    grad_avgs: dict[str, Tensor] | None,
    masks: dict[str, Tensor] | None,
) -> dict[str, Tensor]:
    row_scores, row_sizes = {}, {}
    for name, w in weights.items():
        g = grad_avgs.get(name) if grad_avgs is not None else None
        rows = importance(w, criterion, g).reshape(w.shape[0], -1) if w.dim() else importance(w).reshape(1, 1)
        score = torch.linalg.vector_norm(rows, dim=1)
        if scope == "global":
            score = score / math.sqrt(rows.shape[1])
        if masks is not None and name in masks:
            kept_rows = masks[name].reshape(rows.shape[0], -1).any(dim=1)
            score.masked_fill_(~kept_rows, _PRUNED_SCORE)
        row_scores[name], row_sizes[name] = score, rows.shape[1]
    new_rows: dict[str, Tensor] = {}
    if scope == "local":
        for name, score in row_scores.items():
            new_rows[name] = keep_mask_by_count(score, int(round(sparsity * score.numel())))
    else:
        scores = torch.cat(list(row_scores.values()))
        sizes = torch.cat([torch.full_like(s, row_sizes[n], dtype=torch.long) for n, s in row_scores.items()])
        order = scores.argsort(stable=True)
        budget = int(round(sparsity * int(sizes.sum())))
        n_rows = int((sizes[order].cumsum(0) <= budget).sum())
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[order[:n_rows]] = False
        new_rows = dict(zip(row_scores, keep.split([s.numel() for s in row_scores.values()]), strict=True))
    new = {}
    for name, w in weights.items():
        rows_keep = new_rows[name]
        mask = rows_keep.view(-1, *([1] * (w.dim() - 1))).expand(w.shape).clone() if w.dim() else rows_keep.view(())
        if masks is not None and name in masks:
            mask &= masks[name]
        new[name] = mask
    return new


def apply_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero, in place, the entries of each tensor where its mask is zero (one foreach multiply, no sync).

    Used for weights and gradients. ``masks`` are bool (True = kept) or, much faster on CPU, float masks of
    the tensors' dtype (:func:`mask_factors`): ``_foreach_mul_`` with a bool mask takes a slow
    type-promoting path (about 5x a float mask on CPU, see ``benchmarks/bench_prune_step.md``).
    Entries become ``+-0.0``.
    """
    if tensors:
        with torch.no_grad():
            torch._foreach_mul_(list(tensors), list(masks))


def mask_optimizer_state_(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero the optimizer state of pruned entries: every state tensor of the parameter's shape.

    That covers SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``... while scalars such as ``step`` are
    left alone. Without it a pruned weight would move again at the next step from its stale momentum.
    ``masks`` are bool or float masks.
    """
    with torch.no_grad():
        for p, m in zip(params, masks, strict=True):
            state = optimizer.state.get(p)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.mul_(m.to(value.dtype) if value.dtype != m.dtype else m)


def mask_factors(masks: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Float copies of bool ``masks`` (1.0 kept, 0.0 pruned), of the dtype and device of ``like``.

    What :func:`apply_masks_` multiplies by on the hot path: 4 bytes per fp32 weight, bought for a gradient
    pass about 5x faster than with the bool mask on CPU.

    Example::

        >>> mask_factors([torch.tensor([True, False])], [torch.zeros(2, dtype=torch.float16)])
        [tensor([1., 0.], dtype=torch.float16)]
    """
    return [m.to(device=t.device, dtype=t.dtype) for m, t in zip(masks, like, strict=True)]


def nonfinite_names(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (one host synchronisation for all of them).

    Example::

        >>> nonfinite_names({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
        ['b']
    """
    if not tensors:
        return []
    first = next(iter(tensors.values()))
    with torch.no_grad():
        # the max-abs norm is NaN or inf exactly when the tensor holds one, and needs no bool temporaries
        norms = torch._foreach_norm([t.detach() for t in tensors.values()], math.inf)
        flags = torch.stack([n.to(first.device) for n in norms]).isfinite().tolist()
    return [name for name, ok in zip(tensors, flags, strict=True) if not ok]


#: Optimizers (exact classes, not subclasses) whose step leaves an entry at exactly zero when its weight,
#: its gradient and its state are zero: every update term is a multiple of the gradient, of the state or
#: of the weight (weight decay), and every division has ``eps > 0`` in its denominator. Each is shown to
#: keep pruned weights and state at exactly zero over many steps in ``tests/test_prune_hardening.py``.
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

    True only for the exact classes in :data:`ZERO_KEEPING_OPTIMIZERS` with ``eps > 0`` (Adam's
    ``0 / (sqrt(0) + eps)``), and neither ``fused`` (a separate kernel, not verified here) nor
    ``differentiable``. ``maximize``, ``amsgrad``, momentum, Nesterov, weight decay (L2 or decoupled) and
    ``foreach`` keep zeros. Anything else (a subclass, another optimizer) is not trusted: the caller
    re-masks the weights after every step. (Adamax is left out: its weights stay zero but its ``exp_inf``
    state becomes ``eps``, not zero.)

    Example::

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
    return True
