"""Layer types known by their shape rather than their class, and the wrappers pruning must see through.

No import of ``transformers``, ``timm`` or ``peft``: each is recognised by duck typing, so a model built
with them is pruned correctly whether or not this package knows the library's version. What each case does
(one test each in ``tests/test_zoo.py`` with a stand-in module, and on the real library when installed):

==========================================  ==============================================================
layer                                       decision
==========================================  ==============================================================
Hugging Face ``Conv1D`` (GPT-2, weight      pruned; layout ``(in, out)`` (:func:`is_hf_conv1d`): N:M groups
``(in, out)``)                              along the input dim 0, output channels are columns, AGC units
                                            are columns
``nn.utils.parametrizations.weight_norm``   pruned through ``parametrizations.weight.original1`` (``v``):
                                            ``w = g * v / ||v||`` keeps every zero of ``v``
``nn.utils.weight_norm`` (deprecated hook)  pruned through ``weight_v``, for the same reason; a slice of ``v``
                                            (along the norm's ``dim``) is never emptied: ``0 / 0`` is NaN
                                            (:func:`keep_one_per_norm_slice_`)
spectral norm (``parametrizations`` or      left dense by default, with the reason: ``w = original / sigma``
hook form)                                  keeps the zeros, ``include`` prunes ``original`` / ``weight_orig``
any other ``nn.utils.parametrize``          left dense, with the reason: a zero of ``original`` is not a
                                            zero of the weight the layer uses
``torch.ao`` QAT / fake-quant modules       pruned as their float class (``qat.Linear`` is a ``Linear``):
                                            affine fake-quantisation maps 0 to the zero point, and back to 0
peft LoRA (``lora_A``/``lora_B``)           the adapters are never pruned; the base weight is pruned when
                                            trainable or with ``prune_frozen=True`` (peft freezes it). Merging
                                            adds ``B @ A`` to the base weight, which is dense again: prune
                                            after ``merge_and_unload()`` to ship a sparse model
timm ``StdConv2d``/``ScaledStdConv2d``      left dense, with the reason: the weight is standardised in
                                            ``forward``, so a stored zero is not a zero in the convolution
timm ``Linear``, ``Conv2dSame``,            pruned: subclasses of ``nn.Linear``/``nn.Conv2d`` with the same
``CondConv2d`` experts etc.                 layout (``CondConv2d`` and ``MixedConv2d`` are not: name them in
                                            ``include``)
==========================================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "STANDARDIZED_CONVS",
    "STORED_WEIGHT_NAMES",
    "adapter_prefixes",
    "is_hf_conv1d",
    "is_standardized",
    "keep_one_per_norm_slice_",
    "parametrization_types",
    "parametrized_zeros_reason",
    "stored_weight_name",
    "weight_norm_dim",
    "weight_norm_dims",
]

#: Class names (timm) whose ``forward`` standardises the weight: pruning the stored weight would not sparsify it.
STANDARDIZED_CONVS: frozenset[str] = frozenset({"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"})
_ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D``: class name ``Conv1D``, an int ``nf`` and a weight ``(nx, nf)``.

    Example::

        >>> class Conv1D(nn.Module):
        ...     def __init__(self, nf, nx):
        ...         super().__init__(); self.nf = nf; self.weight = nn.Parameter(torch.zeros(nx, nf))
        >>> is_hf_conv1d(Conv1D(8, 4)), is_hf_conv1d(nn.Conv1d(4, 8, 1))
        (True, False)
    """
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


def is_standardized(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` standardises its weight (timm's weight-standardised convolutions)."""
    return type(module).__name__ in STANDARDIZED_CONVS


def adapter_prefixes(module: nn.Module) -> list[str]:
    """Name prefixes (ending in ``.``) of the LoRA-style adapter sub-modules of ``module`` (peft ``lora.Linear``).

    Example::

        >>> class LoraLinear(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.base_layer = nn.Linear(4, 4)
        ...         self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2)})
        ...         self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4)})
        >>> adapter_prefixes(nn.Sequential(LoraLinear()))
        ['0.lora_A.', '0.lora_B.']
    """
    out = []
    for mod_name, mod in module.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B")):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        out += [f"{prefix}{attr}." for attr in _ADAPTER_ATTRS if isinstance(getattr(mod, attr, None), nn.Module)]
    return out


def stored_weight_name(module: nn.Module) -> str | None:
    """The parameter (relative to ``module``) that holds its weight's zeros, or None when there is none to prune.

    ``"weight"`` for a plain layer; ``"parametrizations.weight.original1"`` under
    ``nn.utils.parametrizations.weight_norm`` and ``"weight_v"`` under the deprecated hook; None for any other
    parametrisation and for weight-standardised convolutions (see the module docstring for why).

    Example::

        >>> stored_weight_name(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
        'parametrizations.weight.original1'
    """
    if is_standardized(module):
        return None
    chain = parametrization_types(module)
    if chain is not None:
        return WEIGHT_NORM_V if chain == ["_WeightNorm"] else None
    if isinstance(getattr(module, "weight_v", None), nn.Parameter) and isinstance(getattr(module, "weight_g", None), Tensor):
        return WEIGHT_NORM_HOOK_V
    return "weight"


#: Where a weight norm keeps ``v`` (relative to its layer): under ``nn.utils.parametrizations.weight_norm``, and
#: under the deprecated hook.
WEIGHT_NORM_V = "parametrizations.weight.original1"
WEIGHT_NORM_HOOK_V = "weight_v"
#: Every name :func:`stored_weight_name` gives a layer's weight.
STORED_WEIGHT_NAMES = ("weight", WEIGHT_NORM_V, WEIGHT_NORM_HOOK_V)


def parametrization_types(module: nn.Module, tensor: str = "weight") -> list[str] | None:
    """The class names of the parametrisations of ``module.<tensor>``, in order, or None when it has none.

    ``module`` may also be the ``ParametrizationList`` itself.

    Example::

        >>> parametrization_types(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
        ['_WeightNorm']
    """
    if type(module).__name__ == "ParametrizationList":
        return [type(p).__name__ for p in module]
    parametrizations = getattr(module, "parametrizations", None)
    if not (isinstance(parametrizations, nn.ModuleDict) and tensor in parametrizations):
        return None
    return [type(p).__name__ for p in parametrizations[tensor]]


def dense_wrapper_reason(module: nn.Module) -> str | None:
    """Why a layer of a prunable type is left dense by default (a parametrisation, a standardised weight), else None."""
    if is_standardized(module):
        return (
            f"{type(module).__name__} standardises its weight in forward, so a stored zero is not a zero in"
            " the convolution"
        )
    if _spectral_chain(module):
        return SPECTRAL_REASON
    if stored_weight_name(module) is None:
        return (
            "its weight is computed by a parametrisation (nn.utils.parametrize), so a zero of `original` is"
            " not a zero of the weight: remove the parametrisation before pruning"
        )
    if any(type(h).__name__ == "SpectralNorm" for h in module._forward_pre_hooks.values()):
        return (
            "spectral norm (the hook form) stores the weight as `weight_orig` (w = weight_orig / sigma keeps its"
            " zeros): name `*.weight_orig` in `include` to prune it"
        )
    return None


#: Why a layer under ``nn.utils.parametrizations.spectral_norm`` is left dense by default.
SPECTRAL_REASON = (
    "spectral norm (w = original / sigma) keeps the zeros of `original`, but it is left dense by default:"
    " name `*.parametrizations.weight.original` in `include` to prune it"
)


def _spectral_chain(module: nn.Module) -> bool:
    return parametrization_types(module) == ["_SpectralNorm"]


def parametrized_zeros_reason(module: nn.Module, name: str) -> str | None:
    """Why the zeros of the parameter ``name`` (relative to ``module``, ``parametrizations.<tensor>.original[N]``)
    are not zeros of the tensor the layer uses, or None when they are (weight norm's ``v``, spectral norm's
    ``original``) or ``name`` is not a parametrisation's.

    Example::

        >>> net = nn.utils.parametrizations.orthogonal(nn.Linear(2, 2))
        >>> parametrized_zeros_reason(net, "parametrizations.weight.original")
        'the layer uses weight = _Orthogonal(original), whose zeros are not those of original'
    """
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "parametrizations" or not parts[2].startswith("original"):
        return None
    types = parametrization_types(module, parts[1])
    if types is None:
        return None
    if (types == ["_WeightNorm"] and parts[2] == "original1") or (types == ["_SpectralNorm"] and parts[2] == "original"):
        return None
    applied = parts[2]
    for t in reversed(types):
        applied = f"{t}({applied})"
    return f"the layer uses {parts[1]} = {applied}, whose zeros are not those of {parts[2]}"


def weight_norm_dim(module: nn.Module) -> int | None:
    """The ``dim`` of ``module``'s weight norm (``-1``: one norm over the whole tensor), or None without one.

    ``w = g * v / ||v||``, the norm taken over every dimension but ``dim``: a slice of ``v`` along ``dim`` that
    pruning empties is ``0 / 0`` (NaN) in the weight the layer uses.

    Example::

        >>> weight_norm_dim(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))), weight_norm_dim(nn.Linear(2, 2))
        (0, None)
    """
    stored = stored_weight_name(module)
    if stored == WEIGHT_NORM_V:
        dim, v = int(module.parametrizations["weight"][0].dim), module.parametrizations["weight"].original1
    elif stored == WEIGHT_NORM_HOOK_V:
        hooks = [h for h in module._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm" and h.name == "weight"]
        if not hooks:
            return None
        dim, v = int(hooks[0].dim), module.weight_v
    else:
        return None
    # torch reads -1 as "the whole tensor"; any other negative dim counts from the end (-2 of a Linear: its rows)
    return dim + v.dim() if dim < -1 else dim


def keep_one_per_norm_slice_(mask: Tensor, v: Tensor, dim: int) -> int:
    """Keep, in place, the entry of largest ``|v|`` in each slice of ``v`` along ``dim`` that ``mask`` empties
    (``-1``: the whole tensor is one slice); returns how many slices it kept an entry in.

    Example::

        >>> mask = torch.tensor([[True, False], [False, False]])
        >>> keep_one_per_norm_slice_(mask, torch.tensor([[3.0, 1.0], [1.0, -2.0]]), 0), mask.tolist()
        (1, [[True, False], [False, True]])
    """
    index = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
    if dim == -1:
        rows, index, scores = mask.reshape(1, -1), index.reshape(1, -1), v.detach().abs().reshape(1, -1)
    else:
        rows = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
        index = index.movedim(dim, 0).reshape(mask.shape[dim], -1)
        scores = v.detach().abs().movedim(dim, 0).reshape(mask.shape[dim], -1)
    empty = ~rows.any(dim=1)
    if not bool(empty.any()):
        return 0
    best = scores[empty].to(mask.device).argmax(dim=1, keepdim=True)
    flat = mask.view(-1) if mask.is_contiguous() else None
    chosen = index[empty].gather(1, best).reshape(-1)
    if flat is not None:
        flat[chosen] = True
    else:
        mask.copy_(mask.reshape(-1).index_fill(0, chosen, True).reshape(mask.shape))
    return int(chosen.numel())


def weight_norm_dims(module: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """``{name: dim}`` for the names among ``names`` that are the ``v`` of a weight-normed layer of ``module``
    (:func:`weight_norm_dim`).

    Example::

        >>> net = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)), nn.Linear(2, 2))
        >>> weight_norm_dims(net, ["0.parametrizations.weight.original1", "1.weight"])
        {'0.parametrizations.weight.original1': 0}
    """
    out = {}
    for name in names:
        for suffix in (f".{WEIGHT_NORM_V}", f".{WEIGHT_NORM_HOOK_V}"):
            if name.endswith(suffix):
                try:
                    dim = weight_norm_dim(module.get_submodule(name[: -len(suffix)]))
                except AttributeError:
                    dim = None
                if dim is not None:
                    out[name] = dim
    return out
