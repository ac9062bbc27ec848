"""Pure pruning core: which parameters are prunable, importance criteria, mask computation, applying masks.

No Lightning import here: everything is tested on hand-built tensors and modules.

What is prunable by default (:func:`select_prunable_parameters`): the ``weight`` of ``Linear``,
``Conv1d/2d/3d`` (grouped and depthwise included), ``ConvTranspose1d/2d/3d``, and the Q/K/V projections
of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
when separate; its ``out_proj`` is a ``Linear``). Embeddings, normalisation layers and recurrent layers
(``LSTM``/``GRU``/``RNN``) are left dense unless named in ``include``.

Layouts: ``Linear``, ``Conv`` and the attention projections store ``(out, in, *k)``, ``ConvTranspose``
stores ``(in, out / groups, *k)``. Output channels ("channel" pattern, one weight kept per output row) and
input channels ("N:M" groups) are read through :class:`Layout`, from :func:`weight_layouts`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_clipprune._validation import bad_value, check_choice, check_real

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Transposed convolutions: weight ``(in, out / groups, *k)``.
TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: ``nn.MultiheadAttention`` parameters prunable by default: the Q/K/V projections, each ``(out, in)``
#: (``in_proj_weight`` is the three stacked, ``(3 * embed_dim, embed_dim)``).
ATTENTION_WEIGHTS: tuple[str, ...] = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: The default ceiling on any one layer's sparsity under global ranking (see :func:`compute_masks`): a
#: global target of 0.9 to 0.98 (the usual range) leaves it far from binding on layers of similar scale,
#: while a layer whose weights are all smaller than the rest (an output layer, often initialised smaller)
#: keeps at least 1 % of its weights instead of collapsing to 100 %.
DEFAULT_MAX_LAYER_SPARSITY = 0.99


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _default_names(module: nn.Module, prune_bias: bool) -> set[str]:
    names: set[str] = set()
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, PRUNABLE_TYPES):
            names.update(prefix + k for k in (("weight", "bias") if prune_bias else ("weight",)))
        elif isinstance(mod, nn.MultiheadAttention):
            names.update(prefix + k for k in ATTENTION_WEIGHTS)
            if prune_bias:
                names.add(prefix + "in_proj_bias")
    return names


def select_prunable_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_bias: bool = False,
    keep_first_and_last: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters that pruning (and sparsity reporting) considers, by their ``named_parameters`` name.

    By default the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` layer and
    the Q/K/V projections of ``nn.MultiheadAttention`` (:data:`ATTENTION_WEIGHTS`); biases only when
    ``prune_bias``. Embedding, normalisation and recurrent (``LSTM``, ``GRU``) layers are never selected
    unless named in ``include``: to add an embedding to the default set, name both, for example
    ``include=["*weight"], exclude=["*norm*"]``. A tensor reached through two modules (tied weights)
    appears once, under its first name.

    Args:
        module: the network.
        include: ``fnmatch`` patterns over parameter names (``"features.*.weight"``). When given, the
            parameters matching it are selected whatever their layer type (replaces the default).
        exclude: ``fnmatch`` patterns of parameter names to leave dense, applied after ``include``.
        prune_bias: also select the ``bias`` of the default layer types (``in_proj_bias`` for attention).
        keep_first_and_last: leave the first and the last selected layer (in module order) dense.

    Returns:
        An ordered ``{name: parameter}`` dict, in ``named_parameters`` order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> list(select_prunable_parameters(net))
        ['0.weight', '2.weight']
        >>> list(select_prunable_parameters(nn.MultiheadAttention(8, 2)))
        ['in_proj_weight', 'out_proj.weight']
    """
    seen: set[int] = set()
    selected: dict[str, nn.Parameter] = {}
    default_names = _default_names(module, prune_bias) if include is None else set()
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
# Layouts: where the output and input channels of a weight are
# ---------------------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """How a weight stores its channels.

    ``transposed=False`` (``Linear``, ``Conv``, attention projections, the default): ``(out, in / groups,
    *k)``, output channels along dim 0, input channels along dim 1. ``transposed=True`` (``ConvTranspose``):
    ``(in, out / groups, *k)``, input channels along dim 0 and output channel ``g * (out / groups) + j`` at
    ``[g * in / groups : (g + 1) * in / groups, j]``.
    """

    transposed: bool = False
    groups: int = 1


#: The layout of ``Linear``, ``Conv`` and attention weights.
STANDARD_LAYOUT = Layout()


def weight_layouts(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, Layout]:
    """``{parameter name: Layout}`` for the ``ConvTranspose`` weights of ``module`` (others are the default).

    Args:
        module: the network.
        names: keep only these parameter names (None: all).

    Example::

        >>> weight_layouts(nn.Sequential(nn.Linear(2, 2), nn.ConvTranspose2d(4, 6, 3, groups=2)))
        {'1.weight': Layout(transposed=True, groups=2)}
    """
    wanted = None if names is None else set(names)
    out = {}
    for mod_name, mod in module.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(mod, TRANSPOSED_TYPES) and (wanted is None or name in wanted):
            out[name] = Layout(True, mod.groups)
    return out


def output_rows(t: Tensor, layout: Layout = STANDARD_LAYOUT) -> Tensor:
    """``t`` as ``(output channels, weights of each)``: a view, or a copy for a grouped ``ConvTranspose``.

    A 1-D tensor (a bias) is one row per entry.

    Example::

        >>> output_rows(torch.arange(12).reshape(2, 3, 2), Layout(transposed=True)).tolist()  # (in=2, out=3, k=2)
        [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    """
    if t.dim() < 2:
        return t.reshape(-1, 1)
    if not layout.transposed:
        return t.reshape(t.shape[0], -1)
    g = layout.groups
    return t.reshape(g, t.shape[0] // g, t.shape[1], -1).permute(0, 2, 1, 3).reshape(g * t.shape[1], -1)


def _rows_to_mask(row_keep: Tensor, shape: torch.Size, layout: Layout) -> Tensor:
    """The element mask of ``shape`` that keeps the output rows where ``row_keep`` (inverse of :func:`output_rows`)."""
    if len(shape) < 2:
        return row_keep.reshape(shape).clone()
    if not layout.transposed:
        return row_keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    g = layout.groups
    k = math.prod(shape[2:])
    grid = row_keep.view(g, 1, shape[1], 1).expand(g, shape[0] // g, shape[1], k)
    return grid.reshape(shape[0], shape[1], *shape[2:]).clone()


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
            note = " (depthwise: one input channel per group)" if width == 1 and w.dim() > 2 else ""
            bad.append(f"`{name}` {tuple(w.shape)}: {width} input channels per group{note}")
    if bad:
        raise ValueError(
            f"pattern {pattern!r} groups {m} consecutive input channels, so the input channels per group must be"
            f" a multiple of {m}: {'; '.join(bad)}. Leave them dense with"
            f" `exclude={[b.split('`')[1] for b in bad]!r}`."
        )


# ---------------------------------------------------------------------------------------------------------
# Importance, mask computation and mask application
# ---------------------------------------------------------------------------------------------------------

#: Importance criteria understood by :func:`compute_masks`.
CRITERIA: tuple[str, ...] = ("magnitude", "taylor")
#: Scopes understood by :func:`compute_masks`.
SCOPES: tuple[str, ...] = ("global", "local")
#: Pattern kinds returned by :func:`parse_pattern` (``"nm"`` for an ``"N:M"`` string such as ``"2:4"``).
PATTERNS: tuple[str, ...] = ("unstructured", "nm", "channel")
#: How global scope compares scores across layers: "raw" (one threshold on the scores),
#: "layer_normalized" (each score divided by the RMS of its layer's live scores, so layers of different
#: scale are pruned alike), "erk" (each layer's pruned count set by Erdos-Renyi-Kernel, :func:`erk_counts`,
#: then its lowest scores pruned) or "er" (the same with every weight seen as its (out, fan-in) matrix,
#: Erdos-Renyi: a convolution's kernel size counts in its fan-in, :func:`matrix_shape`).
RANKINGS: tuple[str, ...] = ("raw", "layer_normalized", "erk", "er")
#: The rankings that set per-layer budgets (:func:`erk_counts`) instead of one global threshold.
BUDGET_RANKINGS: tuple[str, ...] = ("erk", "er")

# Score given to entries that are already pruned: below every real importance (all are >= 0), so they
# are selected first and a mask only ever grows.
_PRUNED_SCORE = -1.0


def parse_pattern(pattern: str, owner: str | None = None) -> tuple[str, int, int]:
    """``"unstructured"`` -> ``("unstructured", 0, 0)``, ``"2:4"`` -> ``("nm", 2, 4)``, ``"channel"`` -> ``("channel", 0, 0)``.

    Args:
        pattern: the pattern string.
        owner: who checks, named in the error message as ```owner(pattern=...)``` (None: ```pattern```).

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
    allowed = "'unstructured', 'channel' or 'N:M' with integers 0 < N < M (such as '2:4')"
    if owner is None:
        raise ValueError(f"`pattern` must be {allowed}, got {pattern!r}.")
    raise bad_value(owner, "pattern", allowed, pattern)


def check_layer_sparsity(owner: str, value: Any) -> dict[str, float] | None:
    """A ``{parameter name or fnmatch pattern: sparsity in [0, 1)}`` mapping, or None.

    Example::

        >>> check_layer_sparsity("MagnitudePruneCallback", {"fc.*": 0.9})
        {'fc.*': 0.9}
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise bad_value(owner, "layer_sparsity", "a {parameter name or fnmatch pattern: sparsity} mapping or None", value)
    return {
        k: check_real(owner, f"layer_sparsity[{k!r}]", v, low=0.0, high=1.0, high_open=True) for k, v in value.items()
    }


def resolve_layer_sparsity(names: Iterable[str], mapping: Mapping[str, float], default: float) -> dict[str, float]:
    """``{name: sparsity}`` for every name: an exact key first, else the first matching ``fnmatch`` key, else ``default``.

    Raises:
        ValueError: a key that matches no name (a typo would otherwise leave a layer silently at ``default``).

    Example::

        >>> resolve_layer_sparsity(["a.weight", "b.weight"], {"a.*": 0.9}, 0.5)
        {'a.weight': 0.9, 'b.weight': 0.5}
    """
    names = list(names)
    unused = [k for k in mapping if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)]
    if unused:
        raise ValueError(f"`layer_sparsity` keys {unused} match no prunable parameter; the prunable ones are {names}")
    out = {}
    for n in names:
        key = n if n in mapping else next((k for k in mapping if fnmatch.fnmatchcase(n, k)), None)
        out[n] = float(mapping[key]) if key is not None else float(default)
    return out


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
    raise bad_value("importance", "criterion", f"one of {', '.join(map(repr, CRITERIA))}", criterion)


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
    if n <= 8 * sample_size:
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
    """The ``k``-th smallest of the 1-D ``x``: ``x.kthvalue(k).values``, by a partial ``topk`` of the shorter side.

    On CPU ``topk(sorted=False)`` is about 3x faster than ``kthvalue`` (measured on 266 k entries, the
    LeNet-300-100 weights), and it is exact: the largest of the ``k`` smallest is the ``k``-th smallest.
    """
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
    kth = kth_smallest(scores, n_prune)
    keep = scores > kth
    n_at_or_below = n - int(keep.count_nonzero())
    if n_at_or_below > n_prune:  # ties at the cut: keep the last ones by flat index
        ties = (scores == kth).nonzero().squeeze(1)  # ascending flat indices
        keep[ties[ties.numel() - (n_at_or_below - n_prune) :]] = True
    return keep


def _flat_scores(
    weights: Mapping[str, Tensor],
    criterion: str,
    grad_avgs: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
    blocked: Mapping[str, Tensor] | None = None,
    normalize: bool = False,
) -> Tensor:
    """All scores in one preallocated flat tensor (the only full-size temporary); already-pruned entries
    score lowest, entries where ``blocked`` is False score ``+inf`` (never chosen). ``normalize`` divides
    each tensor's scores by the RMS of its live scores."""
    first = next(iter(weights.values()))
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights.values()) else torch.float32
    flat = torch.empty(sum(w.numel() for w in weights.values()), dtype=dtype, device=first.device)
    offset = 0
    for name, w in weights.items():
        part = flat[offset : offset + w.numel()]
        offset += w.numel()
        if criterion == "magnitude":
            if w.dtype == part.dtype:
                torch.abs(w.detach().reshape(-1), out=part)
            else:  # bf16/fp16 weights (precision="bf16-true"): scored in the buffer's float32
                part.copy_(w.detach().reshape(-1)).abs_()
        else:
            g = grad_avgs.get(name) if grad_avgs is not None else None
            part.copy_(importance(w, criterion, g).reshape(-1))
        live = masks[name].reshape(-1).to(part.device) if masks is not None and name in masks else None
        if normalize:
            rms = (part[live] if live is not None else part).square().mean().sqrt()
            part.div_(torch.where(rms > 0, rms, torch.ones_like(rms)))
        if live is not None:
            part.masked_fill_(~live, _PRUNED_SCORE)
        if blocked is not None and name in blocked:
            part.masked_fill_(~blocked[name].reshape(-1).to(part.device), math.inf)
    return flat


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


def saturated_layers(
    masks: Mapping[str, Tensor],
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout] | None = None,
    level: float = DEFAULT_MAX_LAYER_SPARSITY,
) -> dict[str, float]:
    """``{name: sparsity}`` of the tensors pruned up to their ceiling (:func:`layer_cap`), or, with no
    ceiling (None), to ``level`` or more: the layers a warning should name.

    Example::

        >>> saturated_layers({"a": torch.tensor([[False, True], [False, True]])}, 0.99)
        {'a': 0.5}
    """
    layouts = layouts or {}
    out = {}
    for name, m in masks.items():
        pruned = m.numel() - int(m.count_nonzero())
        if max_layer_sparsity is not None:
            hit = pruned > 0 and pruned >= layer_cap(m.shape, max_layer_sparsity, layouts.get(name, STANDARD_LAYOUT))
        else:
            hit = pruned >= level * m.numel()
        if hit:
            out[name] = pruned / m.numel()
    return out


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
        over = [n for n in free if result[n].numel() - int(result[n].count_nonzero()) > caps[n]]
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


def _capped_global(
    weights: Mapping[str, Tensor],
    flat: Tensor,
    sparsity: float,
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout],
    masks: Mapping[str, Tensor] | None,
    budget: str | None = None,
) -> dict[str, Tensor]:
    parts = dict(zip(weights, flat.split([w.numel() for w in weights.values()]), strict=True))
    k = int(round(sparsity * flat.numel()))
    already = _already_pruned(weights, masks)
    caps = None
    if max_layer_sparsity is not None:
        caps = {}
        for name, w in weights.items():
            layout = layouts.get(name, STANDARD_LAYOUT)
            caps[name] = max(layer_cap(w.shape, max_layer_sparsity, layout), already[name])
            if w.dim() >= 2:
                _protect_row_max_(parts[name], w.shape, layout)
        if sum(caps.values()) < k:
            raise ValueError(
                f"sparsity {sparsity} cannot be met with `max_layer_sparsity={max_layer_sparsity}` and one weight"
                f" kept per output row: at most {sum(caps.values()) / flat.numel():.4f} can be pruned. Lower the"
                " sparsity, raise `max_layer_sparsity`, or pass `max_layer_sparsity=None` (no ceiling)."
            )
    if budget is not None:  # "erk" or "er"
        shapes = {
            x: matrix_shape(w.shape, layouts.get(x, STANDARD_LAYOUT)) if budget == "er" else tuple(w.shape)
            for x, w in weights.items()
        }
        counts = erk_counts(shapes, k, caps, already)
        return {x: keep_mask_by_count(parts[x], counts[x]).view(w.shape) for x, w in weights.items()}
    keep = _global_keep(flat, parts, k, caps)
    return {name: keep[name].view(w.shape) for name, w in weights.items()}


def _already_pruned(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> dict[str, int]:
    return {x: w.numel() - int(masks[x].count_nonzero()) if masks is not None and x in masks else 0 for x, w in weights.items()}


def matrix_shape(shape: Sequence[int], layout: Layout = STANDARD_LAYOUT) -> tuple[int, ...]:
    """``(output channels, fan-in)`` of a weight: the matrix that Erdos-Renyi budgets ("er") see.

    Example::

        >>> matrix_shape((64, 32, 3, 3))  # a convolution: its kernel counts in the fan-in
        (64, 288)
        >>> matrix_shape((16, 8, 3, 3), Layout(transposed=True))  # ConvTranspose (in, out, k, k)
        (8, 144)
    """
    n = math.prod(shape)
    if len(shape) < 2:
        return (n,)
    out = shape[1] * layout.groups if layout.transposed else shape[0]
    return (out, n // out)


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

    a, b = 0.0, 1.0 / min(raw.values())
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(pruned(mid).values()) > k else (a, mid)
    real = pruned(b)
    counts = {x: min(math.floor(v + 1e-9), n[x]) for x, v in real.items()}
    upper = {x: n[x] if caps is None else caps[x] for x in n}
    for x in sorted(n, key=lambda x: counts[x] - real[x]):  # largest remainder first, ties in order
        if sum(counts.values()) >= k:
            break
        if counts[x] < upper[x]:
            counts[x] += 1
    return counts


def _check_compute_args(
    sparsity: float | None,
    threshold: float | None,
    scope: str,
    criterion: str,
    ranking: str,
    max_layer_sparsity: float | None,
    layer_sparsity: Mapping[str, float] | None,
) -> None:
    owner = "compute_masks"
    if (sparsity is None) == (threshold is None):
        raise ValueError(f"give exactly one of `sparsity` and `threshold`, got sparsity={sparsity}, threshold={threshold}")
    check_real(owner, "sparsity", sparsity, low=0.0, high=1.0, allow_none=True)
    check_real(owner, "threshold", threshold, allow_none=True)
    check_choice(owner, "scope", scope, SCOPES)
    check_choice(owner, "criterion", criterion, CRITERIA)
    check_choice(owner, "ranking", ranking, RANKINGS)
    check_real(owner, "max_layer_sparsity", max_layer_sparsity, low=0.0, high=1.0, low_open=True, allow_none=True)
    if check_layer_sparsity(owner, layer_sparsity) and (scope != "local" or threshold is not None):
        raise bad_value(owner, "layer_sparsity", "None unless scope='local' with a `sparsity`", layer_sparsity)


def compute_masks(
    weights: Mapping[str, Tensor],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "global",
    pattern: str = "unstructured",
    criterion: str = "magnitude",
    grad_avgs: Mapping[str, Tensor] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    max_layer_sparsity: float | None = None,
    ranking: str = "raw",
    layer_sparsity: Mapping[str, float] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, Tensor]:
    """New keep-masks (bool, True = kept) for ``weights``; they only grow: what ``masks`` pruned stays pruned.

    Exactly one of ``sparsity`` and ``threshold``:

    - ``sparsity=s``, "unstructured": prune exactly ``round(s * n)`` entries with the lowest score, ``n``
      all the entries ("global": one threshold over every tensor, the semantics of
      ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=s)``) or each tensor's own
      size ("local", each tensor at its ``layer_sparsity`` if named there). Ties by flat index (in
      ``weights`` order), lower index pruned first.
    - ``max_layer_sparsity=c`` ("global" only): no tensor is pruned past :func:`layer_cap` (``floor(c * n_i)``
      entries, and one weight kept in every output row); what a capped tensor would have lost is taken
      from the others, so exactly ``round(s * n)`` entries are still pruned. Raises when that is impossible.
    - ``ranking="layer_normalized"`` ("global"): scores are divided by their tensor's RMS before ranking;
      ``ranking="erk"`` ("global" unstructured): each tensor's pruned count comes from :func:`erk_counts`
      (exact total, within the ceiling), its lowest scores are pruned; ``ranking="er"`` likewise with each
      tensor seen as its :func:`matrix_shape`. N:M and "channel" ignore ``ranking``.
    - "N:M": only entries among the ``M - N`` lowest of their group of ``M`` (:func:`nm_candidates`) can be
      pruned; ``round(s * n)`` of them are, so at ``s = 1 - N/M`` every group keeps exactly ``N``.
    - "channel": whole output rows, scored by the L2 norm of their scores. "local" prunes
      ``round(s * rows)`` rows of each tensor; "global" ranks all rows by RMS (the L2 norm over
      ``sqrt(row size)``, so layers of different fan-in compare fairly) and prunes the longest prefix
      whose weight count does not exceed ``round(s * n)`` (with a ceiling: skipping rows of capped tensors).
    - ``threshold=eps`` ("unstructured" only): prune where the score is ``<= eps`` (``|w| <= eps`` for
      "magnitude"); no ceiling.

    Args:
        weights: ``{name: tensor}``, in a fixed order (ties are broken in it).
        sparsity: target fraction of pruned entries, in [0, 1].
        threshold: prune entries scoring ``<= threshold``.
        scope: "global" or "local".
        pattern: "unstructured", "channel" or an "N:M" string such as "2:4".
        criterion: "magnitude" or "taylor".
        grad_avgs: ``{name: running gradient average}`` for "taylor".
        masks: the current masks; entries they prune stay pruned.
        max_layer_sparsity: the per-tensor ceiling of "global" scope, in (0, 1]; None: no ceiling (the
            plain global ranking). The callback's default is :data:`DEFAULT_MAX_LAYER_SPARSITY`.
        ranking: "raw" (default here), "layer_normalized", "erk" or "er" (:data:`RANKINGS`).
        layer_sparsity: ``{name or fnmatch pattern: sparsity}`` ("local" only, :func:`resolve_layer_sparsity`);
            tensors not named get ``sparsity``.
        layouts: ``{name: Layout}`` for weights not stored ``(out, in, *k)`` (:func:`weight_layouts`).

    Returns:
        ``{name: bool tensor}`` of the weights' shapes (for "global" unstructured, views of one flat
        tensor when no ceiling binds: no more memory than one bool per weight).

    Raises:
        ValueError: for bad arguments, shapes that do not fit the pattern, or an unreachable target.

    Example::

        >>> w = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([[0.2, -0.05]])}
        >>> compute_masks(w, sparsity=0.4)
        {'a': tensor([False,  True,  True]), 'b': tensor([[ True, False]])}
    """
    _check_compute_args(sparsity, threshold, scope, criterion, ranking, max_layer_sparsity, layer_sparsity)
    kind, n, m = parse_pattern(pattern, owner="compute_masks")
    if threshold is not None and kind != "unstructured":
        raise ValueError(f"`threshold` works with pattern 'unstructured' only, got pattern={pattern!r}")
    if not weights:
        return {}
    layouts = dict(layouts or {})
    check_pattern_fits(weights, pattern, layouts)
    with torch.no_grad():
        if threshold is not None:
            return _threshold_masks(weights, threshold, criterion, grad_avgs, masks)
        targets = resolve_layer_sparsity(weights, layer_sparsity or {}, sparsity) if scope == "local" else None
        if kind == "channel":
            return _channel_masks(weights, sparsity, targets, criterion, grad_avgs, masks, max_layer_sparsity, layouts)
        cand = None
        if kind == "nm":
            cand = _nm_masks_candidates(weights, n, m, criterion, grad_avgs, masks, layouts)
            sparsity = min(sparsity, 1.0 - n / m)
            max_layer_sparsity = None  # every group keeps N: never binds
        if targets is None:
            flat = _flat_scores(weights, criterion, grad_avgs, masks, cand, normalize=ranking == "layer_normalized")
            # N:M fixes every layer's count at M - N per group: per-layer budgets would break the pattern
            budget = ranking if ranking in BUDGET_RANKINGS and kind == "unstructured" else None
            new = _capped_global(weights, flat, sparsity, max_layer_sparsity, layouts, masks, budget=budget)
        else:
            new = {}
            for name, w in weights.items():
                flat = _flat_scores({name: w}, criterion, grad_avgs, masks, cand)
                target = min(targets[name], 1.0 - n / m) if kind == "nm" else targets[name]
                new[name] = keep_mask_by_count(flat, int(round(target * flat.numel()))).view(w.shape)
        if masks is not None:
            for name in new:
                if name in masks:
                    new[name] &= masks[name]
        return new


def _threshold_masks(
    weights: Mapping[str, Tensor],
    threshold: float,
    criterion: str,
    grad_avgs: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    new = {}
    for name, w in weights.items():
        g = grad_avgs.get(name) if grad_avgs is not None else None
        keep = importance(w, criterion, g) > threshold
        new[name] = keep & masks[name] if masks is not None and name in masks else keep
    return new


def _nm_masks_candidates(
    weights: Mapping[str, Tensor],
    n: int,
    m: int,
    criterion: str,
    grad_avgs: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
    layouts: Mapping[str, Layout],
) -> dict[str, Tensor]:
    cand = {}
    for name, w in weights.items():
        g = grad_avgs.get(name) if grad_avgs is not None else None
        s = importance(w, criterion, g)
        if masks is not None and name in masks:
            s.masked_fill_(~masks[name], _PRUNED_SCORE)
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
    criterion: str,
    grad_avgs: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
    max_layer_sparsity: float | None,
    layouts: Mapping[str, Layout],
) -> dict[str, Tensor]:
    row_scores, row_sizes = {}, {}
    for name, w in weights.items():
        g = grad_avgs.get(name) if grad_avgs is not None else None
        rows = output_rows(importance(w, criterion, g), layouts.get(name, STANDARD_LAYOUT))
        score = torch.linalg.vector_norm(rows, dim=1)
        if targets is None:
            score = score / math.sqrt(rows.shape[1])
        if masks is not None and name in masks:
            kept_rows = output_rows(masks[name], layouts.get(name, STANDARD_LAYOUT)).any(dim=1)
            score.masked_fill_(~kept_rows, _PRUNED_SCORE)
        row_scores[name], row_sizes[name] = score, rows.shape[1]
    if targets is not None:
        new_rows = {
            name: keep_mask_by_count(score, int(round(targets[name] * score.numel()))) for name, score in row_scores.items()
        }
    else:
        new_rows = _global_rows(row_scores, row_sizes, sparsity, max_layer_sparsity)
    new = {}
    for name, w in weights.items():
        mask = _rows_to_mask(new_rows[name], w.shape, layouts.get(name, STANDARD_LAYOUT))
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
