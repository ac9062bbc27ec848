"""Which parameters are prunable, and how each weight stores its channels (its layout).

What is prunable by default (:func:`select_prunable_parameters`): the ``weight`` of ``Linear``,
``Conv1d/2d/3d`` (grouped and depthwise included), ``ConvTranspose1d/2d/3d``, the Q/K/V projections of
``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
separate; its ``out_proj`` is a ``Linear``), and the ``weight`` of every layer type given to
:func:`register_layout` with ``prunable=True``. Embeddings, normalisation layers and recurrent layers
(``LSTM``/``GRU``/``RNN``) are left dense unless named in ``include``. Frozen parameters
(``requires_grad=False``) are left out unless ``include_frozen``.

Layouts: ``Linear``, ``Conv`` and the attention projections store ``(out, in, *k)``, ``ConvTranspose``
stores ``(in, out / groups, *k)``. Output channels ("channel" pattern, one weight kept per output row) and
input channels ("N:M" groups) are read through :class:`Layout`, from :func:`weight_layouts`. The layouts
are a registry (:func:`register_layout`): a layer type of your own, such as a ``Conv1D`` whose weight is
stored ``(in, out)``, is one call::

    register_layout(Conv1D, lambda module: Layout(transposed=True), prunable=True)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_clipprune.pruning.wrappers import adapter_prefixes, is_hf_conv1d, stored_weight_name

__all__ = [
    "ATTENTION_WEIGHTS",
    "PRUNABLE_TYPES",
    "STANDARD_LAYOUT",
    "TRANSPOSED_TYPES",
    "Layout",
    "check_not_torch_pruned",
    "check_prunable_kinds",
    "frozen_names",
    "layout_of",
    "matrix_shape",
    "output_rows",
    "register_layout",
    "rows_to_mask",
    "select_prunable_parameters",
    "tied_names",
    "torch_prune_hooks",
    "uninitialized_names",
    "weight_layouts",
]

#: Module types whose ``weight`` is prunable by default (see also :func:`register_layout`).
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


class Layout(NamedTuple):
    """How a weight stores its channels.

    ``transposed=False`` (``Linear``, ``Conv``, attention projections, the default): ``(out, in / groups,
    *k)``, output channels along dim 0, input channels along dim 1. ``transposed=True`` (``ConvTranspose``, or
    a ``(in, out)`` matrix with ``groups=1``): ``(in, out / groups, *k)``, input channels along dim 0 and
    output channel ``g * (out / groups) + j`` at ``[g * in / groups : (g + 1) * in / groups, j]``.
    """

    transposed: bool = False
    groups: int = 1


#: The layout of ``Linear``, ``Conv`` and attention weights.
STANDARD_LAYOUT = Layout()

# {module type: its weight's layout}, looked up along the MRO; types registered as prunable also join
# the default selection.
_LAYOUTS: dict[type[nn.Module], Callable[[nn.Module], Layout]] = {
    t: (lambda m: Layout(True, m.groups)) for t in TRANSPOSED_TYPES
}
_EXTRA_PRUNABLE: list[type[nn.Module]] = []


def register_layout(
    module_type: type[nn.Module], layout: Callable[[nn.Module], Layout] | Layout, *, prunable: bool = False
) -> None:
    """Declare how the ``weight`` of ``module_type`` (and its subclasses) stores its channels.

    Args:
        module_type: the layer class.
        layout: a :class:`Layout`, or a function of the module instance returning one (for a ``groups``
            read from the module).
        prunable: also select this type's ``weight`` by default (:func:`select_prunable_parameters`).

    Raises:
        TypeError: if ``module_type`` is not an ``nn.Module`` subclass or ``layout`` neither a Layout nor callable.

    Example::

        >>> class RowsIn(nn.Module):  # weight stored (in, out)
        ...     def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(3, 2))
        >>> register_layout(RowsIn, Layout(transposed=True), prunable=True)
        >>> weight_layouts(nn.Sequential(RowsIn()))
        {'0.weight': Layout(transposed=True, groups=1)}
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"`module_type` must be an nn.Module subclass, got {module_type!r}")
    if isinstance(layout, Layout):
        fixed = layout
        layout = lambda m: fixed  # noqa: E731
    elif not callable(layout):
        raise TypeError(f"`layout` must be a Layout or a function of the module, got {layout!r}")
    _LAYOUTS[module_type] = layout
    if prunable and module_type not in _EXTRA_PRUNABLE:
        _EXTRA_PRUNABLE.append(module_type)


def layout_of(module: nn.Module) -> Layout:
    """The :class:`Layout` of ``module.weight``: the registered one of the nearest class in its MRO, else standard."""
    for cls in type(module).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls](module)
    return Layout(transposed=True) if is_hf_conv1d(module) else STANDARD_LAYOUT


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the ``fnmatch`` ``patterns`` (case-sensitive), as ``include``/``exclude`` do."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _default_names(module: nn.Module, prune_bias: bool) -> set[str]:
    names: set[str] = set()
    types = PRUNABLE_TYPES + tuple(_EXTRA_PRUNABLE)
    for mod_name, mod in module.named_modules(remove_duplicate=False):  # a module used twice: both names
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, types) or is_hf_conv1d(mod):
            weight = stored_weight_name(mod)
            names.update(prefix + k for k in ([weight] if weight else []) + (["bias"] if prune_bias else []))
        elif isinstance(mod, nn.MultiheadAttention):
            names.update(prefix + k for k in ATTENTION_WEIGHTS)
            if prune_bias:
                names.add(prefix + "in_proj_bias")
    adapters = tuple(adapter_prefixes(module))  # LoRA adapters are never pruned by default
    return {n for n in names if not n.startswith(adapters)} if adapters else names


def select_prunable_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_bias: bool = False,
    keep_first_and_last: bool = False,
    include_frozen: bool = False,
    include_tied: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters that pruning (and sparsity reporting) considers, by their ``named_parameters`` name.

    By default the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` layer and
    the Q/K/V projections of ``nn.MultiheadAttention`` (:data:`ATTENTION_WEIGHTS`); biases only when
    ``prune_bias``. Embedding, normalisation and recurrent (``LSTM``, ``GRU``) layers are never selected
    unless named in ``include``: to add an embedding to the default set, name both, for example
    ``include=["*weight"], exclude=["*norm*", "*LayerNorm*", "*ln_*"]`` (GPT-2 names its norms ``ln_1``, BERT
    ``LayerNorm``). Hugging Face ``Conv1D``, weight-norm parametrisations and LoRA wrappers are seen through
    (:mod:`~lightning_clipprune.pruning.wrappers`). A tensor reached through two modules (tied weights) appears
    once, under its first selected name; when one of its names would be left dense (an output head tied to an
    input embedding), the tensor is left dense unless ``include_tied`` or one of its names matches ``include``
    (:func:`tied_names` lists them). Frozen parameters (``requires_grad=False``) are left out unless
    ``include_frozen`` (pruning would change values the user froze; :func:`frozen_names` lists them).

    Args:
        module: the network.
        include: ``fnmatch`` patterns over parameter names (``"features.*.weight"``). When given, the
            parameters matching it are selected whatever their layer type (replaces the default).
        exclude: ``fnmatch`` patterns of parameter names to leave dense, applied after ``include``; a tensor
            with several names (tied weights, a module registered twice) is left dense when any name matches.
        prune_bias: also select the ``bias`` of the default layer types (``in_proj_bias`` for attention).
        keep_first_and_last: leave the first and the last selected layer (in module order) dense.
        include_frozen: also select parameters with ``requires_grad=False``.
        include_tied: also select a tensor tied to a parameter the default selection leaves dense.

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
    tied = set() if include is not None or include_tied else {id(p) for p in _tied(module, default_names).values()}
    # a tensor with several names (tied, or a module registered twice) is left dense when any of them is excluded
    excluded = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if exclude and matches_any(n, exclude)}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen or id(param) in tied or not (param.requires_grad or include_frozen):
            continue
        chosen = matches_any(name, include) if include is not None else name in default_names
        if chosen and id(param) not in excluded:
            seen.add(id(param))
            selected[name] = param
    if keep_first_and_last and selected:
        weights = [n for n in selected if n.endswith("weight")] or list(selected)
        for n in {weights[0], weights[-1]}:
            layer = n.rsplit(".", 1)[0] if "." in n else ""
            for key in [k for k in selected if (k.rsplit(".", 1)[0] if "." in k else "") == layer]:
                del selected[key]
    return selected


def _tied(module: nn.Module, default_names: set[str]) -> dict[str, nn.Parameter]:
    """``{default-selected name: tensor}`` for the tensors that also have a name outside ``default_names``."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    out = {}
    for key, names in aliases.items():
        inside = [n for n in names if n in default_names]
        if inside and len(inside) < len(names):
            out[inside[0]] = params[key]
    return out


def tied_names(module: nn.Module, prune_bias: bool = False) -> dict[str, list[str]]:
    """``{prunable name: [its other names]}`` for the tensors the default selection leaves dense because they
    are tied to a parameter of a layer it does not prune (GPT-2's ``lm_head.weight`` is ``wte.weight``).

    Example::

        >>> net = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
        >>> net.head.weight = net.emb.weight
        >>> tied_names(net)
        {'head.weight': ['emb.weight']}
    """
    default_names = _default_names(module, prune_bias)
    tied = _tied(module, default_names)
    every = list(module.named_parameters(remove_duplicate=False))
    return {name: [n for n, p in every if p is param and n != name] for name, param in tied.items()}


def frozen_names(module: nn.Module, **selection: object) -> list[str]:
    """The parameters :func:`select_prunable_parameters` would select with ``include_frozen=True`` but not without.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> net[0].weight.requires_grad_(False) is not None
        True
        >>> frozen_names(net)
        ['0.weight']
    """
    selection.pop("include_frozen", None)
    everything = select_prunable_parameters(module, include_frozen=True, **selection)  # type: ignore[arg-type]
    return [n for n, p in everything.items() if not p.requires_grad]


def uninitialized_names(params: dict[str, Tensor]) -> list[str]:
    """The names of lazy parameters not materialised yet (``nn.LazyLinear`` before its first forward).

    Example::

        >>> uninitialized_names(dict(nn.LazyLinear(3).named_parameters()))
        ['weight', 'bias']
    """
    return [n for n, p in params.items() if is_lazy(p)]


def weight_layouts(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, Layout]:
    """``{parameter name: Layout}`` for the weights of ``module`` not stored ``(out, in, *k)``.

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
        stored = stored_weight_name(mod) or "weight"
        name = f"{mod_name}.{stored}" if mod_name else stored
        if wanted is not None and name not in wanted:
            continue
        layout = layout_of(mod)
        if layout != STANDARD_LAYOUT:
            out[name] = layout
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


def rows_to_mask(row_keep: Tensor, shape: torch.Size, layout: Layout = STANDARD_LAYOUT) -> Tensor:
    """The element mask of ``shape`` that keeps the output rows where ``row_keep`` (inverse of :func:`output_rows`).

    Example::

        >>> rows_to_mask(torch.tensor([True, False]), torch.Size([2, 3])).tolist()
        [[True, True, True], [False, False, False]]
    """
    if len(shape) < 2:
        return row_keep.reshape(shape).clone()
    if not layout.transposed:
        return row_keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    g = layout.groups
    k = math.prod(shape[2:])
    grid = row_keep.view(g, 1, shape[1], 1).expand(g, shape[0] // g, shape[1], k)
    return grid.reshape(shape[0], shape[1], *shape[2:]).clone()


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


def check_not_torch_pruned(module: nn.Module, owner: str) -> None:
    """Refuse a model with weights reparametrised by ``torch.nn.utils.prune`` (``weight_orig * weight_mask``).

    Such a ``weight`` is a plain attribute recomputed before each forward, not a parameter: it would be left
    out of the selection, and a value written to it would be overwritten by the next forward.

    Raises:
        ValueError: naming the weights and the fix (``torch.nn.utils.prune.remove``, which keeps the zeros).

    Example::

        >>> import torch.nn.utils.prune as tp
        >>> net = nn.Sequential(nn.Linear(4, 4)); _ = tp.l1_unstructured(net[0], "weight", amount=0.5)
        >>> check_not_torch_pruned(net, "f")
        Traceback (most recent call last):
        ...
        ValueError: `f`: 0.weight is reparametrised by torch.nn.utils.prune (weight_orig * weight_mask); ...
    """
    found = [
        (f"{name}.{hook._tensor_name}".lstrip("."), hook._tensor_name) for name, _, hook in torch_prune_hooks(module)
    ]
    if found:
        names = ", ".join(n for n, _ in found)
        verb = "is" if len(found) == 1 else "are"
        raise ValueError(
            f"`{owner}`: {names} {verb} reparametrised by torch.nn.utils.prune ({found[0][1]}_orig *"
            f" {found[0][1]}_mask); make the pruning permanent first: `torch.nn.utils.prune.remove("
            f'model.get_submodule(name), "{found[0][1]}")` for each (its zeros are kept)'
        )


def check_prunable_kinds(module: nn.Module, names: Iterable[str], owner: str, leave: str = "exclude={}") -> None:
    """Refuse selected parameters that masks cannot keep right: complex ones, and sparse-gradient embeddings.

    A complex weight has no order to rank by (``|w|`` would be taken of its real part) and its optimizer
    state is not masked; a layer built with ``sparse=True`` (``nn.Embedding``, ``nn.EmbeddingBag``) gets sparse
    gradients, which cannot be masked in place. ``leave`` is the fix's wording, ``{}`` the names' list.

    Raises:
        ValueError: naming the parameters and the fix.

    Example::

        >>> check_prunable_kinds(nn.Sequential(nn.Embedding(4, 2, sparse=True)), ["0.weight"], "f")
        Traceback (most recent call last):
        ...
        ValueError: f cannot prune `0.weight`: its layer is built with `sparse=True` (sparse gradients ...
    """
    names = set(names)
    complex_ = [n for n, p in module.named_parameters(remove_duplicate=False) if n in names and p.is_complex()]
    if complex_:
        raise ValueError(
            f"{owner} cannot prune {', '.join(f'`{n}`' for n in complex_)}: complex weights are not supported (it"
            f" ranks, masks and checks real weights); leave them dense with {leave.format(complex_)}."
        )
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse and name in names:
            raise ValueError(
                f"{owner} cannot prune `{name}`: its layer is built with `sparse=True` (sparse gradients cannot"
                f" be masked); build it with `sparse=False`, or leave it dense with {leave.format([name])}."
            )


def torch_prune_hooks(module: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """``(module name, module, hook)`` of every ``torch.nn.utils.prune`` reparametrisation in ``module``.

    Example::

        >>> import torch.nn.utils.prune as tp
        >>> net = nn.Sequential(nn.Linear(4, 4)); _ = tp.l1_unstructured(net[0], "weight", amount=0.5)
        >>> [(name, hook._tensor_name) for name, _, hook in torch_prune_hooks(net)]
        [('0', 'weight')]
    """
    from torch.nn.utils import prune

    return [
        (name, mod, hook)
        for name, mod in module.named_modules()
        for hook in list(mod._forward_pre_hooks.values())
        if isinstance(hook, prune.BasePruningMethod)
    ]
