"""``reconstruct_prune``: post-training pruning that repairs each layer it prunes (SparseGPT / OBS).

For each prunable layer, in the order the forward pass reaches them: its inputs are seen on the
calibration batches through the layers before it (already pruned), its Hessian ``2 X^T X / n`` is
accumulated, and :func:`~lightning_clipprune.posttrain.obs.reconstruct_matrix_` prunes it and updates its
kept weights to preserve its outputs. No gradient step, no labels.

Cost: one forward pass over the calibration set per layer, plus ``O(rows * cols^2 / block)`` for each
layer's update; memory: each layer's Hessian ``groups * cols^2 * 4`` bytes (checked against
``max_hessian_bytes`` before anything is allocated) and about twice that while it is inverted.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune._choices import DEFAULT_MAX_HESSIAN_BYTES, DEFAULT_NUM_SAMPLES
from lightning_clipprune._hooks import evaluating, forward_pre_hooks
from lightning_clipprune._validation import (
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_patterns,
    check_real,
    unmatched_patterns,
)
from lightning_clipprune.posttrain.allocation import ALLOCATIONS, layer_counts, spread
from lightning_clipprune.posttrain.calibration import (
    batch_input,
    collect_calibration,
    hessian_shape,
    layer_hessian,
    weight_from_groups,
    weight_to_groups,
)
from lightning_clipprune.posttrain.fallback import magnitude_layer_, split_layers, warn_fallback
from lightning_clipprune.posttrain.obs import reconstruct_matrix_, refit_rows_, refit_to_reference
from lightning_clipprune.pruning import (
    check_not_torch_pruned,
    check_pattern_fits,
    check_prunable_kinds,
    parse_pattern,
    select_prunable_parameters,
    weight_layouts,
)

__all__ = [
    "DEFAULT_MAX_HESSIAN_BYTES",
    "DEFAULT_NUM_SAMPLES",
    "REFERENCES",
    "LayerReport",
    "PostTrainReport",
    "ReconstructionOptions",
    "reconstruct_prune",
]

OWNER = "reconstruct_prune"
#: What each layer's reconstruction preserves: "dense" (the dense model's outputs of that layer, on the
#: dense inputs: repairs the drift of the earlier pruned layers too; keeps a copy of the model) or "layer"
#: (the layer's own outputs on its current inputs, as SparseGPT).
REFERENCES: tuple[str, ...] = ("dense", "layer")


@dataclass(frozen=True)
class ReconstructionOptions:
    """The settings of :func:`reconstruct_prune`, written once: its keyword defaults and the "obs" criterion's.

    Every field is the keyword argument of the same name of :func:`reconstruct_prune` (see there); the
    defaults are the ones measured best on LeNet-300-100 (``benchmarks/bench_posttrain.md``).

    Example::

        >>> ReconstructionOptions(num_samples=512).damp
        0.01
    """

    allocation: str | Mapping[str, float] = "global_magnitude"
    num_samples: int = DEFAULT_NUM_SAMPLES
    damp: float = 0.01  # SparseGPT's relative damping
    block_size: int = 128  # SparseGPT's column block
    max_hessian_bytes: int = DEFAULT_MAX_HESSIAN_BYTES
    seed: int = 0
    progress: bool = True
    reference: str = "dense"
    update_bias: bool = True
    refit: bool = True
    steps: int = 1

    def __post_init__(self) -> None:
        # checked when built, so the "obs" criterion refuses a bad value before training, not after it
        for key in ("num_samples", "block_size", "max_hessian_bytes", "steps", "seed"):
            check_int(OWNER, key, getattr(self, key), low=1 if key != "seed" else None)
        check_real(OWNER, "damp", self.damp, low=0.0, low_open=True)
        check_choice(OWNER, "reference", self.reference, REFERENCES)
        for key in ("update_bias", "refit", "progress"):
            check_bool(OWNER, key, getattr(self, key))
        if not isinstance(self.allocation, Mapping) and self.allocation not in ALLOCATIONS:
            raise bad_value(OWNER, "allocation", f"one of {', '.join(map(repr, ALLOCATIONS))} or a dict", self.allocation)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :func:`reconstruct_prune`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_DEFAULTS = ReconstructionOptions()


@dataclass
class LayerReport:
    """What happened to one layer: entries pruned, the OBS estimate of the output error added, time, and
    ``method``: "obs" (reconstructed) or "magnitude" (a weight it cannot reconstruct; ``error`` None)."""

    name: str
    shape: tuple[int, ...]
    pruned: int
    numel: int
    error: float | None
    seconds: float
    method: str = "obs"

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class PostTrainReport:
    """The result of :func:`reconstruct_prune`: the target, what was reached, each layer, the time."""

    target: float
    sparsity: float
    pruned: int
    total: int
    allocation: str
    pattern: str
    num_samples: int
    wall_time_s: float
    layers: list[LayerReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready), each layer with its sparsity."""
        out = asdict(self)
        for row, layer in zip(out["layers"], self.layers, strict=True):
            row["sparsity"] = layer.sparsity
        return out

    def table(self) -> str:
        """A plain-text table, one line per layer, then the total."""
        width = max([32, *(len(r.name) for r in self.layers)])  # long names (GPT-2's) keep the columns aligned
        lines = [f"{'layer':<{width}} {'shape':<18} {'sparsity':>8} {'obs error':>10} {'s':>6}"]
        for r in self.layers:
            lines.append(
                f"{r.name:<{width}} {str(r.shape):<18} {r.sparsity:8.4f} "
                f"{'magnitude' if r.error is None else format(r.error, '.4g'):>10} {r.seconds:6.2f}"
            )
        lines.append(f"{'total':<{width}} {'':<18} {self.sparsity:8.4f} {'':>10} {self.wall_time_s:6.2f}")
        return "\n".join(lines)


def _check_hessians(modules: Mapping[str, nn.Module], max_bytes: int, update_bias: bool) -> None:
    for name, mod in modules.items():
        groups, cols = hessian_shape(mod)
        cols += int(update_bias and getattr(mod, "bias", None) is not None)
        need = groups * cols * cols * 4
        if need > max_bytes:
            raise ValueError(
                f"`{name}` needs a {groups}x{cols}x{cols} float32 Hessian ({need / 2**20:.0f} MiB), more than "
                f"max_hessian_bytes={max_bytes} ({max_bytes / 2**20:.0f} MiB): raise `max_hessian_bytes` or "
                f"leave it dense with `exclude=[{name!r}]`."
            )


def _forward_order(
    model: nn.Module, modules: Mapping[str, nn.Module], x: Tensor, forward: Callable
) -> list[str]:
    """The layers in the order one forward pass first calls them; those it never calls are left out."""
    seen: list[str] = []
    if not modules:
        return seen
    hooks = ((mod, lambda _m, _a, n=name: seen.append(n) if n not in seen else None) for name, mod in modules.items())
    with forward_pre_hooks(hooks), torch.no_grad():
        forward(model, x.to(next(iter(modules.values())).weight.device))
    return seen


@dataclass
class _Options:
    block_size: int
    damp: float
    steps: int
    refit: bool
    update_bias: bool
    reference: nn.Module | None
    progress: bool


def _grouped(module: nn.Module, bias: bool) -> Tensor:
    """The weight as ``(groups, rows, cols)`` float32, the bias appended as a last column when ``bias``."""
    grouped = weight_to_groups(module, module.weight)
    if bias:
        grouped = torch.cat([grouped, module.bias.detach().float().reshape(grouped.shape[0], -1, 1)], dim=2)
    return grouped


def _write_back(module: nn.Module, grouped: Tensor, bias: bool) -> None:
    with torch.no_grad():
        if bias:
            module.bias.copy_(grouped[:, :, -1].reshape(-1).to(module.bias.dtype))
            grouped = grouped[:, :, :-1]
        module.weight.copy_(weight_from_groups(module, grouped, module.weight.shape).to(module.weight.dtype))


def _reconstruct_group(
    w: Tensor,
    hessian: Tensor,
    cross: Tensor | None,
    n_prune: int | None,
    nm: tuple[int, int] | None,
    frozen: int,
    opts: _Options,
    name: str,
    on_block: Callable[[], None],
) -> float:
    """Prune one group's matrix ``w`` in place (``opts.steps`` rounds, each refit); return its output error."""
    # the zeros the model has (pruned by its run) are pruned first and stay zero: no update may revive them
    earlier = None
    if nm is None:
        earlier = w == 0
        earlier[:, w.shape[1] - frozen :] = False  # a bias column is never pruned
    if cross is not None:
        w.copy_(refit_to_reference(w, hessian, cross, opts.damp))
    target = w.clone()
    keep, steps = None, opts.steps if nm is None else 1
    for step in range(1, steps + 1):
        count = None if nm is not None else round(n_prune * step / steps)
        keep, _ = reconstruct_matrix_(
            w,
            hessian,
            n_prune=count,
            nm=nm,
            block_size=opts.block_size,
            damp=opts.damp,
            name=f"`{name}`",
            on_block=on_block,
            frozen=frozen,
            prior=earlier if keep is None else ~keep,
        )
        if opts.refit:
            refit_rows_(w, target, hessian, keep, opts.damp)
    diff = (target - w).double()
    return float(((diff @ hessian.double()) * diff).sum() / 2)


def _prune_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    batches: list[Tensor],
    forward: Callable,
    n_prune: int | None,
    nm: tuple[int, int] | None,
    opts: _Options,
) -> LayerReport:
    """Collect the layer's Hessian, reconstruct each group, write the weight back; return its report."""
    start = time.perf_counter()
    bias = opts.update_bias and getattr(module, "bias", None) is not None
    ref = (
        None
        if opts.reference is None
        else (opts.reference, opts.reference.get_submodule(name.rpartition(".")[0]))
    )
    hessian, cross = layer_hessian(model, module, batches, forward, name, bias=bias, reference=ref)
    grouped = _grouped(module, bias)
    groups, rows, cols = grouped.shape
    per_group = (
        [None] * groups
        if nm is not None
        else list(spread(dict.fromkeys(range(groups), rows * (cols - bias)), n_prune).values())
    )
    blocks = groups * math.ceil(cols / opts.block_size) * (opts.steps if nm is None else 1)
    error = 0.0
    with _progress_bar()(total=blocks, desc=name, disable=not opts.progress, leave=False) as bar:
        for g in range(groups):
            c = None if cross is None else cross[g]
            error += _reconstruct_group(
                grouped[g], hessian[g], c, per_group[g], nm, int(bias), opts, name, bar.update
            )
    del hessian, cross
    _write_back(module, grouped, bias)
    pruned = int((module.weight == 0).sum())  # zeros the model had before count too: the report tells the truth
    return LayerReport(
        name, tuple(module.weight.shape), pruned, module.weight.numel(), error, time.perf_counter() - start
    )


def _restore(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """Put back the parameters named in ``saved``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)


def _magnitude_report(
    name: str, weight: Tensor, counts: Mapping[str, int] | None, nm: tuple[int, int] | None, layout: Any
) -> LayerReport:
    pruned, seconds = magnitude_layer_(name, weight, None if counts is None else counts[name], nm, layout)
    return LayerReport(name, tuple(weight.shape), pruned, weight.numel(), None, seconds, "magnitude")


def _check_args(sparsity: Any, pattern: str, options: ReconstructionOptions) -> tuple | None:
    """Check the arguments of :func:`reconstruct_prune` beyond ``options``; return ``(N, M)`` or None."""
    kind, n, m = parse_pattern(pattern, owner=OWNER)
    if kind == "channel":
        raise bad_value(OWNER, "pattern", "'unstructured' or 'N:M' (such as '2:4')", pattern)
    nm = (n, m) if kind == "nm" else None
    if nm is not None and sparsity is not None and not math.isclose(sparsity, 1 - n / m):
        raise bad_value(
            OWNER,
            "sparsity",
            f"None or {1 - n / m} with pattern {pattern!r} (every layer keeps {n} of {m})",
            sparsity,
        )
    if nm is None and not isinstance(options.allocation, Mapping):
        check_real(OWNER, "sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    if nm is not None and options.block_size % m:
        raise bad_value(OWNER, "block_size", f"a multiple of {m} with pattern {pattern!r}", options.block_size)
    return nm


def _select(model: nn.Module, include: Any, exclude: Any) -> dict[str, nn.Parameter]:
    """The weights to prune; a pattern of ``include`` or ``exclude`` that matches no parameter name is refused
    (a typo would otherwise prune the layer meant to stay dense, and pruning cannot be undone).

    Raises:
        ValueError: a pattern matching nothing (it and some real names), or no prunable weight selected.
    """
    include = check_patterns(OWNER, "include", include, allow_none=True)
    exclude = check_patterns(OWNER, "exclude", exclude)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for key, patterns in (("include", include or ()), ("exclude", exclude)):
        unmatched = unmatched_patterns(patterns, names)
        if unmatched:
            raise ValueError(
                f"`{OWNER}`: {key} pattern(s) {unmatched} match no parameter name of the model (names look like"
                f" {names[:4]}): fix the pattern (fnmatch over these names) or drop it"
            )
    params = select_prunable_parameters(model, include=include, exclude=list(exclude), include_frozen=True)
    if not params:
        raise ValueError(f"`{OWNER}` found no prunable weight in the model (check `include`/`exclude`).")
    check_prunable_kinds(model, params, f"`{OWNER}`")
    return params


def _progress_bar() -> Callable[..., Any]:
    from tqdm.auto import tqdm  # a Lightning dependency

    return tqdm


def reconstruct_prune(
    model: nn.Module,
    calibration_loader: Iterable[Any],
    sparsity: float | None,
    *,
    allocation: str | Mapping[str, float] = _DEFAULTS.allocation,
    pattern: str = "unstructured",
    num_samples: int = _DEFAULTS.num_samples,
    damp: float = _DEFAULTS.damp,
    block_size: int = _DEFAULTS.block_size,
    max_hessian_bytes: int = _DEFAULTS.max_hessian_bytes,
    seed: int = _DEFAULTS.seed,
    progress: bool = _DEFAULTS.progress,
    reference: str = _DEFAULTS.reference,
    update_bias: bool = _DEFAULTS.update_bias,
    refit: bool = _DEFAULTS.refit,
    steps: int = _DEFAULTS.steps,
    include: list[str] | None = None,
    exclude: list[str] = (),
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
    inputs: Callable[[Any], Tensor] = batch_input,
) -> tuple[nn.Module, PostTrainReport]:
    """Prune ``model`` in place after training and update its kept weights to preserve each layer's outputs.

    SparseGPT (Frantar & Alistarh, ICML 2023): layer by layer in forward order, the OBS saliency
    ``w^2 / [H^-1]_jj^2`` chooses the mask in blocks of columns and the error of every pruned weight is
    spread over the weights still to be visited (:mod:`~lightning_clipprune.posttrain.obs`). The
    calibration samples come from ``calibration_loader`` only: give it (part of) the training split,
    never validation or test data.

    Args:
        model: the trained network; its prunable weights (``select_prunable_parameters``, with ``include``
            and ``exclude``; frozen ones too: ``requires_grad`` is not consulted after training) of
            ``Linear``, ``Conv1d`` and ``Conv2d`` layers are reconstructed (``groups`` respected); any other
            (attention projections, ``Conv3d``, ``ConvTranspose``, registered types) is pruned to its share
            by magnitude, with one warning (:mod:`~lightning_clipprune.posttrain.fallback`). A model carrying
            ``torch.nn.utils.prune`` reparametrisations is refused (``prune.remove`` first).
        calibration_loader: yields batches (a tensor, or a tuple whose first element is the input).
        sparsity: fraction of the selected weights pruned, exactly ``round(sparsity * n)`` entries; None
            with an "N:M" pattern or a dict naming every layer.
        allocation: the per-layer sparsities: "global_magnitude" (default, best on LeNet-300-100), "er",
            "uniform" or ``{name or fnmatch pattern: sparsity}``
            (:mod:`~lightning_clipprune.posttrain.allocation`). Ignored under "N:M".
        pattern: "unstructured" or "N:M" such as "2:4" (keep N of every M consecutive input channels, chosen
            with the update).
        num_samples: calibration samples, the first ones of the loader in its order.
        damp: relative damping of the Hessian (SparseGPT's 0.01).
        block_size: columns per block of the adaptive mask selection (SparseGPT's 128).
        max_hessian_bytes: refuse a layer whose float32 Hessian(s) would be larger (checked first).
        seed: the random state while the loader is iterated (a shuffling loader is then deterministic).
        progress: show a progress bar per layer (tqdm).
        reference: "dense" (match the dense model's outputs of each layer; default) or "layer" (the layer's
            own outputs on its current inputs, plain SparseGPT); see :data:`REFERENCES`.
        update_bias: the bias takes part in the update as a never-pruned column.
        refit: after the mask is chosen, the exact least-squares kept weights of every row.
        steps: rounds per layer (each prunes a share of its count and refits).
        include: ``fnmatch`` patterns replacing the default selection.
        exclude: ``fnmatch`` patterns of weights to leave dense.
        forward: how to run the model on a batch input (default ``model(x)``).
        inputs: how to get the model input from a batch (default: the batch or its first element).

    Returns:
        ``(model, report)``: the same model object, pruned, and a :class:`PostTrainReport`.

    Raises:
        ValueError: for bad arguments (an ``include``/``exclude`` pattern that matches no parameter name
            too), a Hessian over ``max_hessian_bytes``, an empty loader, or calibration inputs (or a layer's
            inputs) holding NaN or inf; nothing has changed in the model then.

    Example::

        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(64, 16) for _ in range(4)]
        >>> net, report = reconstruct_prune(net, data, 0.5, num_samples=256, progress=False)
        >>> report.pruned, report.total
        (320, 640)
    """
    options = ReconstructionOptions(
        allocation, num_samples, damp, block_size, max_hessian_bytes, seed, progress, reference, update_bias, refit, steps
    )
    nm = _check_args(sparsity, pattern, options)
    start = time.perf_counter()
    check_not_torch_pruned(model, OWNER)
    params = _select(model, include, exclude)
    modules, fallback = split_layers(model, params)
    layouts = weight_layouts(model, params)
    if nm is not None:
        check_pattern_fits(params, pattern, layouts)
    _check_hessians(modules, max_hessian_bytes, update_bias)
    counts = None if nm is not None else layer_counts(params, sparsity, allocation, layouts)
    forward = forward or (lambda net, x: net(x))
    batches = collect_calibration(calibration_loader, num_samples, seed, inputs)
    with evaluating(model):
        ref = copy.deepcopy(model) if reference == "dense" else None
        opts = _Options(block_size, damp, steps, refit, update_bias, ref, progress)
        names = [f"{x.rpartition('.')[0]}.{k}".lstrip(".") for x, m in modules.items() for k, _ in m.named_parameters()]
        saved = {n: t.detach().clone() for n, t in model.named_parameters() if n in set(names) | set(fallback)}
        try:
            order = _forward_order(model, modules, batches[0], forward)
            fallback.update({n: "never called as a module in the forward pass" for n in modules if n not in order})
            warn_fallback(fallback)
            layers = [_magnitude_report(n, params[n], counts, nm, layouts.get(n)) for n in fallback]
            layers += [
                _prune_layer(
                    model, n, modules[n], batches, forward, None if counts is None else counts[n], nm, opts
                )
                for n in order
            ]
        except BaseException:
            _restore(model, saved)  # a failure half-way (a Hessian that cannot be factorised): no half-pruned model
            raise
    pruned, total = sum(r.pruned for r in layers), sum(r.numel for r in layers)
    target = sparsity if sparsity is not None else pruned / total
    name = allocation if isinstance(allocation, str) else "dict"
    report = PostTrainReport(
        target,
        pruned / total,
        pruned,
        total,
        name,
        pattern,
        sum(b.shape[0] for b in batches),
        time.perf_counter() - start,
        layers,
    )
    return model, report
