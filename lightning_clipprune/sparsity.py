"""Pure sparsity accounting: counting zeros, a per-layer report, and the compressed size of a tensor.

No Lightning import here. Two kinds of function live side by side:

- host functions (:func:`parameter_counts`, :func:`sparsity_report`, :func:`compressed_size_bytes`) that
  return Python numbers, for reports, tests and the end of training;
- device functions (:func:`nonzero_counts`, :func:`sparsity_metrics`) that return tensors on the
  parameters' device and never synchronise with the host, for logging during training.

The compressed size is the size of the payload that :mod:`lightning_clipprune.export` writes for a tensor:
a bitmask of the kept (non-zero) positions plus the kept values, or the dense values when that is smaller.
:func:`encoded_sizes` is the one place that formula lives; the exporter imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_clipprune._sharded import global_counts, local
from lightning_clipprune.pruning import PRUNABLE_TYPES, select_prunable_parameters

#: Signed integer dtype with the same element size, used to look at a tensor's bits (here and in the exporter).
BITS_DTYPE: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def encoded_sizes(numel, nonzero, itemsize: int, negative_zeros):
    """Payload bytes of the two encodings of the sparse file format for one tensor.

    * dense: every value, ``numel * itemsize``.
    * bitmask: one bit per position (``ceil(numel / 8)`` bytes) plus the non-zero values
      (``nonzero * itemsize``); when the tensor holds negative zeros (``-0.0``, which masking a negative
      weight by multiplication produces), one more bit per zero position records the sign so that the
      round trip stays bit-exact (``ceil((numel - nonzero) / 8)`` bytes).

    Only ``+``, ``*`` and ``//`` are used, so the arguments may be Python numbers (exact sizes on the host)
    or integer tensors (sizes on the device without a host synchronisation).

    Args:
        numel: number of elements.
        nonzero: number of non-zero elements (``-0.0`` counts as zero).
        itemsize: bytes per element.
        negative_zeros: whether any zero is a negative zero (bool, 0/1, or a bool/int tensor).

    Returns:
        ``(dense_bytes, bitmask_bytes)``; the exporter writes the bitmask encoding only when it is
        strictly smaller.

    Example::

        >>> encoded_sizes(1000, 100, 4, False)
        (4000, 525)
    """
    dense = numel * itemsize
    bitmask = (numel + 7) // 8 + nonzero * itemsize + ((numel - nonzero + 7) // 8) * negative_zeros
    return dense, bitmask


def has_negative_zero(tensor: Tensor) -> Tensor:
    """A 0-dim bool tensor on ``tensor``'s device: whether any element is ``-0.0`` (floating point only)."""
    if not tensor.is_floating_point():
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    bits = tensor.view(BITS_DTYPE[tensor.element_size()])
    return (bits == torch.iinfo(bits.dtype).min).any()  # the sign bit alone is -0.0 in every float format


def compressed_size_bytes(tensor: Tensor) -> int:
    """Bytes of the payload :func:`lightning_clipprune.export.save_sparse` writes for ``tensor``.

    The smaller of the dense and the bitmask encoding (see :func:`encoded_sizes`), without the small
    per-record header (name, dtype, shape).

    Example::

        >>> w = torch.zeros(1000)
        >>> w[:100] = 1.0
        >>> compressed_size_bytes(w)
        525
    """
    nonzero = int(torch.count_nonzero(tensor))
    dense, bitmask = encoded_sizes(tensor.numel(), nonzero, tensor.element_size(), bool(has_negative_zero(tensor)))
    return bitmask if bitmask < dense else dense


def storage_key(tensor: Tensor) -> tuple:
    """A key equal for two tensors exactly when they are the same view of the same memory (tied weights).

    Used to count a tied tensor once here and to store it once in the sparse export. Tensors without a
    plain storage (some subclasses) and empty or meta tensors (which all sit at address 0) get a key of
    their own: the object's identity.
    """
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return (id(tensor),)
    if ptr == 0:  # empty or meta tensors share address 0 without sharing data
        return (id(tensor),)
    return (ptr, tensor.device, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def named_weights(module: nn.Module) -> dict[str, Tensor]:
    """``named_parameters(remove_duplicate=False)``, with ``torch.nn.utils.prune``'s reparametrisation seen through.

    A module pruned by ``torch.nn.utils.prune`` holds the dense ``weight_orig`` as a parameter, a
    ``weight_mask`` buffer and the effective ``weight = weight_orig * weight_mask`` as a plain attribute
    (recomputed at each forward). Here the effective tensor stands in for ``weight_orig``, under the name
    ``weight``, so such a model is reported as it is used.
    """
    out: dict[str, Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        prefix, _, attr = name.rpartition(".")
        if attr.endswith("_orig"):
            base = attr[: -len("_orig")]
            owner = module.get_submodule(prefix) if prefix else module
            effective = getattr(owner, base, None)
            if isinstance(getattr(owner, base + "_mask", None), Tensor) and isinstance(effective, Tensor):
                out[f"{prefix}.{base}" if prefix else base] = effective
                continue
        out[name] = param
    return out


def prunable_names(module: nn.Module) -> list[str]:
    """The default reported set: :func:`~lightning_clipprune.pruning.select_prunable_parameters` (Linear and
    Conv weights, tied tensors once, frozen ones included: a report counts every such weight of the model),
    plus the effective weights of such layers pruned by ``torch.nn.utils.prune``.
    """
    selected = set(select_prunable_parameters(module, include_frozen=True))
    for mod_name, mod in module.named_modules():
        if isinstance(mod, PRUNABLE_TYPES) and isinstance(getattr(mod, "weight_mask", None), Tensor):
            selected.add(f"{mod_name}.weight" if mod_name else "weight")
    return [n for n in named_weights(module) if n in selected]


def unique_parameters(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``{name: parameter}`` with each tensor once (tied weights and shared modules under their first name).

    Parameters come from :func:`named_weights` (``named_parameters``, seeing through ``torch.nn.utils.prune``).

    Args:
        module: the network.
        names: parameter names (as in ``named_parameters``) to keep; ``None`` keeps all parameters. A name
            that reaches a tensor already listed under another name is dropped.

    Raises:
        KeyError: a name in ``names`` is not a parameter of ``module``.
    """
    all_params = named_weights(module)
    if names is None:
        wanted: Iterable[str] = all_params.keys()
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in all_params]
        if missing:
            raise KeyError(f"not parameters of {type(module).__name__}: {missing}")
    seen: set[tuple] = set()
    out: dict[str, Tensor] = {}
    for name in wanted:
        key = storage_key(all_params[name])
        if key not in seen:
            seen.add(key)
            out[name] = all_params[name]
    return out


def split_parameters(
    module: nn.Module, names: Iterable[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(selected, rest)``: the parameters named in ``names`` and all the others, each tensor once overall.

    ``names=None`` selects every parameter (``rest`` is empty).

    Raises:
        KeyError: a name in ``names`` is not a parameter of ``module``.
    """
    selected = unique_parameters(module, names)
    if names is None:
        return selected, {}
    keys = {storage_key(t) for t in selected.values()}
    rest = {n: p for n, p in unique_parameters(module).items() if storage_key(p) not in keys}
    return selected, rest


def parameter_counts(module: nn.Module, names: Iterable[str] | None = None) -> tuple[int, int]:
    """``(total, nonzero)`` element counts of ``module``'s parameters, each tensor counted once.

    Args:
        module: the network.
        names: parameter names to count; ``None`` counts all parameters.

    Example::

        >>> lin = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> parameter_counts(lin)
        (10, 2)
    """
    params = list(unique_parameters(module, names).values())
    if not params:
        return 0, 0
    total = sum(p.numel() for p in params)
    return total, int(nonzero_counts(params).sum())


def nonzero_counts(tensors: Sequence[Tensor]) -> Tensor:
    """Non-zero counts of ``tensors`` as one int64 tensor on the first tensor's device (no host sync).

    Sharded tensors (DTensors) are counted whole: each rank counts its shard and one ``all_reduce`` sums
    the counts (a collective: every rank calls it with the same list).
    """
    if not tensors:
        raise ValueError("`tensors` must not be empty")
    shards = [local(t.detach()) for t in tensors]
    device = shards[0].device
    return global_counts(torch.stack([torch.count_nonzero(t).to(device) for t in shards]), tensors)


def _negative_zeros(tensors: Sequence[Tensor]) -> Tensor:
    """Per tensor, whether any element is ``-0.0`` (int64 0/1 on the first tensor's device; whole for DTensors)."""
    shards = [local(t.detach()) for t in tensors]
    device = shards[0].device
    flags = torch.stack([has_negative_zero(t).to(device) for t in shards]).long()
    return global_counts(flags, tensors).clamp(max=1)


@dataclass(frozen=True)
class LayerSparsity:
    """One row of a :class:`SparsityReport`: a parameter tensor (or an aggregate of several)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    dense_bytes: int
    compressed_bytes: int

    @property
    def zeros(self) -> int:
        return self.numel - self.nonzero

    @property
    def sparsity(self) -> float:
        """Fraction of zeros; 0.0 for an empty tensor."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer sparsity of a module, from :func:`sparsity_report`.

    Attributes:
        rows: one row per reported parameter (each tensor once), in ``named_parameters`` order.
        other: the module's remaining parameters summed into one row (biases, norms, ... when only the
            prunable weights are reported), or ``None`` when every parameter has a row.
        numel, nonzero, sparsity: over ``rows`` (the reported parameters: the "global" sparsity).
        total_numel, total_nonzero: over all parameters (``rows`` and ``other``).
        dense_bytes, compressed_bytes: over all parameters: the dense size and the payload the sparse
            export writes for them (buffers and per-record headers not included).
    """

    rows: list[LayerSparsity]
    other: LayerSparsity | None = None
    title: str = "Sparsity"

    @property
    def _all(self) -> list[LayerSparsity]:
        return self.rows + ([self.other] if self.other is not None else [])

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.rows)

    @property
    def sparsity(self) -> float:
        return (self.numel - self.nonzero) / self.numel if self.numel else 0.0

    @property
    def total_numel(self) -> int:
        return sum(r.numel for r in self._all)

    @property
    def total_nonzero(self) -> int:
        return sum(r.nonzero for r in self._all)

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self._all)

    @property
    def compressed_bytes(self) -> int:
        return sum(r.compressed_bytes for r in self._all)

    def to_table(self):
        """A ``rich.table.Table``: per layer shape, parameters, non-zeros, sparsity; totals and sizes."""
        from rich.table import Table

        table = Table(title=f"{self.title}: {self.headline()}", show_footer=True, caption=self._caption())
        # long names fold onto a second line instead of being cut, so two rows never read the same
        table.add_column("Parameter", footer="Total", overflow="fold")
        table.add_column("Shape")
        table.add_column("Params", justify="right", footer=f"{self.total_numel:,}")
        table.add_column("Non-zero", justify="right", footer=f"{self.total_nonzero:,}")
        table.add_column("Sparsity", justify="right", footer=f"{self.total_sparsity:.2%}")
        for row in self.rows:
            table.add_row(row.name, "x".join(map(str, row.shape)) or "()", f"{row.numel:,}", f"{row.nonzero:,}",
                          f"{row.sparsity:.2%}")
        if self.other is not None:
            table.add_row(self.other.name, "", f"{self.other.numel:,}", f"{self.other.nonzero:,}",
                          f"{self.other.sparsity:.2%}", style="dim")
        return table

    @property
    def total_sparsity(self) -> float:
        """Fraction of zeros over all parameters (``rows`` and ``other``)."""
        return (self.total_numel - self.total_nonzero) / self.total_numel if self.total_numel else 0.0

    def headline(self) -> str:
        """Both figures in one line: the sparsity of the reported (prunable) weights and of all parameters.

        Example::

            >>> SparsityReport([LayerSparsity("w", (4,), 4, 1, 16, 5)], LayerSparsity("b", (4,), 4, 4, 16, 16)).headline()
            'prunable weights 75.00 % sparse, all parameters 37.50 % sparse'
        """
        if self.other is None:
            return f"{self.sparsity:.2%} sparse".replace("%", " %")
        return (f"prunable weights {self.sparsity:.2%} sparse, all parameters {self.total_sparsity:.2%} sparse"
                .replace("%", " %"))

    def _caption(self) -> str:
        ratio = self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0
        return (
            f"reported parameters: {self.sparsity:.2%} sparse ({self.numel - self.nonzero:,} of {self.numel:,} zero)"
            f"\nsize: dense {format_bytes(self.dense_bytes)}, compressed {format_bytes(self.compressed_bytes)}"
            f" ({ratio:.3f}x)"
        )


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _rows(params: Mapping[str, Tensor]) -> list[LayerSparsity]:
    if not params:
        return []
    tensors = list(params.values())
    nonzero = nonzero_counts(tensors).tolist()
    negative = _negative_zeros(tensors).bool().tolist()
    rows = []
    for (name, t), nz, neg in zip(params.items(), nonzero, negative, strict=True):
        dense, bitmask = encoded_sizes(t.numel(), nz, t.element_size(), neg)
        rows.append(LayerSparsity(name, tuple(t.shape), t.numel(), nz, dense, min(dense, bitmask)))
    return rows


def sparsity_report(module: nn.Module, names: Iterable[str] | None = None, title: str = "Sparsity") -> SparsityReport:
    """Per-layer and total sparsity and sizes of ``module``'s parameters, each tensor once.

    Args:
        module: the network.
        names: the parameters to report row by row (for example the prunable ones); the others are summed
            into ``report.other``. ``None`` reports every parameter.
        title: the table title.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight[:, :2].zero_()
        >>> report = sparsity_report(net, names=["0.weight", "1.weight"])
        >>> report.sparsity, report.other.numel
        (0.3333333333333333, 10)
    """
    selected, rest = split_parameters(module, names)
    rows = _rows(selected)
    other = None
    if rest:
        rest_rows = _rows(rest)
        other = LayerSparsity(
            f"(other parameters: {len(rest_rows)})",
            (),
            sum(r.numel for r in rest_rows),
            sum(r.nonzero for r in rest_rows),
            sum(r.dense_bytes for r in rest_rows),
            sum(r.compressed_bytes for r in rest_rows),
        )
    return SparsityReport(rows=rows, other=other, title=title)


def _fraction_zero(numel: Tensor, nonzero: Tensor) -> Tensor:
    """``(numel - nonzero) / numel`` in float32 (every backend has it), 0 where ``numel`` is 0."""
    frac = (numel - nonzero).float() / numel.clamp(min=1).float()
    return torch.where(numel > 0, frac, torch.zeros_like(frac))


def sparsity_metrics(
    params: Mapping[str, Tensor], selected: Sequence[str], per_layer: bool = False
) -> dict[str, Tensor]:
    """The logged sparsity metrics as 0-dim tensors on the parameters' device, without a host sync.

    Args:
        params: every parameter of the model, each tensor once (see :func:`unique_parameters`).
        selected: the names in ``params`` whose zeros make up ``sparsity/global`` (the prunable ones).
        per_layer: also return ``sparsity/<name>`` for each selected parameter.

    Returns:
        ``sparsity/global`` (zeros over the selected parameters; 0 when none is selected),
        ``params/total`` and ``params/nonzero`` (all parameters), ``size/dense_bytes`` and
        ``size/compressed_bytes`` (all parameters, see :func:`encoded_sizes`), and the per-layer values.

    Raises:
        KeyError: a selected name is not in ``params``.
    """
    if not params:
        raise ValueError("`params` must not be empty")
    names = list(params)
    tensors = [params[n].detach() for n in names]
    device = tensors[0].device
    nonzero = nonzero_counts(tensors)
    negative = _negative_zeros(tensors)
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=device)
    itemsize = torch.tensor([t.element_size() for t in tensors], dtype=torch.int64, device=device)
    dense, bitmask = encoded_sizes(numel, nonzero, itemsize, negative)
    metrics: dict[str, Tensor] = {}
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in selected if n not in index]
    if missing:
        raise KeyError(f"selected names not in params: {missing}")
    idx = torch.tensor([index[n] for n in selected], dtype=torch.long, device=device)
    metrics["sparsity/global"] = _fraction_zero(numel.index_select(0, idx).sum(), nonzero.index_select(0, idx).sum())
    metrics["params/total"] = numel.sum()
    metrics["params/nonzero"] = nonzero.sum()
    metrics["size/dense_bytes"] = dense.sum()
    metrics["size/compressed_bytes"] = torch.minimum(dense, bitmask).sum()
    if per_layer:
        layer = _fraction_zero(numel, nonzero)
        for n in selected:
            metrics[f"sparsity/{n}"] = layer[index[n]].float()
    return metrics
