"""The names that choice-valued arguments accept, and the pattern syntax: torch-free.

The library checks its arguments against these, and the app checks the composed config against the same
names before torch and Lightning load (:mod:`lightning_clipprune.app.checks`): a misspelled scope, ranking,
pattern or clip algorithm on the command line is one line in about a second instead of after the heavy
imports. Nothing here imports torch.
"""

from __future__ import annotations

from lightning_clipprune._validation import bad_value

__all__ = [
    "BUDGET_RANKINGS",
    "CEILING",
    "CLIP_ALGORITHMS",
    "CLIP_BOUNDS",
    "CRITERIA",
    "DEFAULT_RANKING",
    "PATTERNS",
    "PATTERN_HELP",
    "RANKINGS",
    "REGROW_METHODS",
    "SCOPES",
    "UNCAPPED_CLIP_ALGORITHMS",
    "parse_pattern",
]

#: Scopes of ``compute_masks`` and ``MagnitudePruneCallback``: one ranking over all layers, or per layer.
SCOPES: tuple[str, ...] = ("global", "local")
#: Pattern kinds returned by :func:`parse_pattern` (``"nm"`` for an ``"N:M"`` string such as ``"2:4"``).
PATTERNS: tuple[str, ...] = ("unstructured", "nm", "channel")
#: What a ``pattern`` may be, as the error messages say it.
PATTERN_HELP = "'unstructured', 'channel' or 'N:M' with integers 0 < N < M (such as '2:4')"
#: How global scope compares scores across layers: "raw" (one threshold on the scores),
#: "layer_normalized" (each score divided by the RMS of its layer's live scores, so layers of different
#: scale are pruned alike), "erk" (each layer's pruned count set by Erdos-Renyi-Kernel,
#: :func:`~lightning_clipprune.pruning.ranking.erk_counts`, then its lowest scores pruned) or "er" (the same
#: with every weight seen as its (out, fan-in) matrix, Erdos-Renyi: a convolution's kernel size counts in its
#: fan-in, :func:`~lightning_clipprune.pruning.selection.matrix_shape`).
RANKINGS: tuple[str, ...] = ("raw", "layer_normalized", "erk", "er")
#: The rankings that set per-layer budgets instead of one global threshold.
BUDGET_RANKINGS: tuple[str, ...] = ("erk", "er")
#: The default ranking of ``compute_masks`` and ``MagnitudePruneCallback``: Erdos-Renyi budgets.
DEFAULT_RANKING = "er"
#: The ceiling that ``max_layer_sparsity="auto"`` (the default everywhere) gives where no per-layer budget
#: decides ("raw" / "layer_normalized" ranking, N:M, "channel"): a global target of 0.9 to 0.98 (the usual
#: range) leaves it far from binding on layers of similar scale, while a layer whose weights are all
#: smaller than the rest (an output layer, often initialised smaller) keeps at least 1 % of its weights
#: instead of collapsing to 100 %. Under budgets ("er", "erk") "auto" is no ceiling.
CEILING = 0.99
#: The criteria built in (more can be registered: :func:`~lightning_clipprune.pruning.criteria.criterion_names`).
CRITERIA: tuple[str, ...] = ("magnitude", "taylor")
#: "rigl": regrow where the clipped gradient is largest; "set": regrow at random.
REGROW_METHODS: tuple[str, ...] = ("rigl", "set")
#: The clip algorithms built in (``lightning_clipprune.clipping.CLIPPERS``) and the option of each that
#: ``clip_val`` sets (its ``clip_val_option``).
CLIP_BOUNDS: dict[str, str] = {
    "norm": "max_norm", "value": "clip_value", "agc": "clip_factor", "autoclip": "max_norm", "zclip": "max_norm",
}
CLIP_ALGORITHMS: tuple[str, ...] = tuple(CLIP_BOUNDS)
#: The algorithms whose bound may be None (``clip_val=None``: spikes only, no hard cap).
UNCAPPED_CLIP_ALGORITHMS: tuple[str, ...] = ("autoclip", "zclip")


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
    if owner is None:
        raise ValueError(f"`pattern` must be {PATTERN_HELP}, got {pattern!r}.")
    raise bad_value(owner, "pattern", PATTERN_HELP, pattern)
