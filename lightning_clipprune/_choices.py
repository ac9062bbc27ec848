"""The names that choice-valued arguments accept, the pattern syntax, the defaults the command lines show and the
few checks that need nothing else (the ceiling, the regrowth fields): torch-free.

The library checks its arguments with these, and the app checks the composed config with the same code before
torch and Lightning load (:mod:`lightning_clipprune.app.checks`): a misspelled scope, ranking, pattern or clip
algorithm on the command line is one line in about a second instead of after the heavy imports; the search
command's ``--help`` and option errors come before them the same way
(:mod:`lightning_clipprune.app.search_args`). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_clipprune._validation import (
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_position,
    check_real,
)

__all__ = [
    "BUDGET_RANKINGS",
    "CEILING",
    "CLIP_ALGORITHMS",
    "CLIP_BOUNDS",
    "CRITERIA",
    "DEFAULT_GRID",
    "DEFAULT_LAYER_GRID",
    "DEFAULT_MAX_HESSIAN_BYTES",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_RANKING",
    "PATTERNS",
    "PATTERN_HELP",
    "RANKINGS",
    "REGROW_METHODS",
    "SCOPES",
    "SEARCH_METHODS",
    "UNCAPPED_CLIP_ALGORITHMS",
    "check_regrow_fields",
    "check_sparsity_logger_fields",
    "parse_pattern",
    "resolve_max_layer_sparsity",
    "uses_budgets",
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

#: The coarse grid of global sparsities the threshold search evaluates before its bisection.
DEFAULT_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: The per-layer sparsities of the layer sensitivity.
DEFAULT_LAYER_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
#: The search methods by name (the search command's ``--method``); "obs" is another name of "sparsegpt".
SEARCH_METHODS: dict[str, str] = {"magnitude": "magnitude", "sparsegpt": "sparsegpt", "obs": "sparsegpt"}
#: Default calibration size of the layer-wise reconstruction: SparseGPT used 128 sequences of 2048 tokens
#: (262 k rows); a few thousand images give a well-conditioned Hessian for layers up to a few thousand inputs.
DEFAULT_NUM_SAMPLES = 2048
#: Default memory allowed for one layer's Hessian: 2 GiB (a 23 k-input layer); the seed CNN's
#: ``Linear(9216, 100)`` needs 340 MB.
DEFAULT_MAX_HESSIAN_BYTES = 2 * 1024**3


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


def uses_budgets(ranking: str, scope: str, kind: str, threshold: float | None) -> bool:
    """Whether per-layer budgets decide the counts: "er"/"erk" for a global, unstructured sparsity target."""
    return ranking in BUDGET_RANKINGS and scope == "global" and kind == "unstructured" and threshold is None


def resolve_max_layer_sparsity(value: Any, budgets: bool, owner: str = "compute_masks") -> float | None:
    """``max_layer_sparsity`` as a number or None: ``"auto"`` is None under per-layer budgets, else :data:`CEILING`.

    Raises:
        ValueError: for anything but "auto", a number in (0, 1] or None.

    Example::

        >>> resolve_max_layer_sparsity("auto", budgets=False), resolve_max_layer_sparsity("auto", budgets=True)
        (0.99, None)
    """
    if isinstance(value, str) and value == "auto":
        return None if budgets else CEILING
    try:
        return check_real(owner, "max_layer_sparsity", value, low=0.0, high=1.0, low_open=True, allow_none=True)
    except ValueError:
        raise bad_value(owner, "max_layer_sparsity", "'auto', a number in (0, 1] or None", value) from None


def check_threshold_ceiling(owner: str, threshold: float | None, max_layer_sparsity: Any) -> None:
    """Refuse a ``max_layer_sparsity`` given with a ``threshold``: a threshold prunes every ``|w| <= threshold``,
    whatever the layer, so the ceiling would never be applied.

    Raises:
        ValueError: naming both values and the ways out.

    Example::

        >>> check_threshold_ceiling("prune", 0.01, "auto")
    """
    if threshold is not None and not (max_layer_sparsity is None or max_layer_sparsity == "auto"):
        raise ValueError(
            f"`{owner}(threshold={threshold!r}, max_layer_sparsity={max_layer_sparsity!r})`: a threshold prunes every"
            " weight with |w| <= threshold, whatever the layer, so no ceiling applies. Leave `max_layer_sparsity`"
            " out, or prune by `sparsity=` (its ceiling keeps part of every layer)."
        )


def check_regrow_fields(values: Mapping[str, Any]) -> None:
    """The checks of :class:`~lightning_clipprune.RegrowConfig`'s fields, on those present in ``values``.

    Raises:
        ValueError: naming the field, the allowed values and the value received.

    Example::

        >>> check_regrow_fields({"method": "rigl", "fraction": 0.3})
    """
    owner = "MagnitudePruneCallback(regrow=...)"
    if "method" in values:
        check_choice(owner, "method", values["method"], REGROW_METHODS)
    if "fraction" in values:
        check_real(owner, "fraction", values["fraction"], low=0, high=1, low_open=True)
    if "interval" in values:
        check_int(owner, "interval", values["interval"], low=1)
    if values.get("start") is not None:
        check_position(owner, "start", values["start"])
    if "end" in values:
        check_position(owner, "end", values["end"])
    if "seed" in values:
        check_int(owner, "seed", values["seed"], low=0)


def check_sparsity_logger_fields(values: Mapping[str, Any]) -> None:
    """The checks of ``SparsityLogger.__init__``'s arguments, on those present in ``values``.

    Raises:
        ValueError: naming the argument, the allowed values and the value received.

    Example::

        >>> check_sparsity_logger_fields({"inference_latency": "auto", "latency_batch_size": 64})
        >>> check_sparsity_logger_fields({"inference_latency": "yes"})
        Traceback (most recent call last):
        ...
        ValueError: `SparsityLogger(inference_latency=...)` must be True, False or 'auto', got 'yes'.
    """
    owner = "SparsityLogger"
    if "per_layer" in values:
        check_bool(owner, "per_layer", values["per_layer"], allow_none=True)
    if "max_layers_per_layer_logging" in values:
        check_int(owner, "max_layers_per_layer_logging", values["max_layers_per_layer_logging"], low=0)
    if "log_every_n_steps" in values:  # 0 is meaningful: log at epoch ends only
        check_int(owner, "log_every_n_steps", values["log_every_n_steps"], low=0, allow_none=True)
    if "print_table" in values:
        check_bool(owner, "print_table", values["print_table"])
    latency = values.get("inference_latency", "auto")
    if latency != "auto" and not isinstance(latency, bool):
        raise bad_value(owner, "inference_latency", "True, False or 'auto'", latency)
    if "latency_batch_size" in values:
        check_int(owner, "latency_batch_size", values["latency_batch_size"], low=1, allow_none=True)
