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
``nn.utils.weight_norm`` (deprecated hook)  pruned through ``weight_v``, for the same reason
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

import torch  # noqa: F401  (the examples use it)
from torch import Tensor, nn

__all__ = [
    "STANDARDIZED_CONVS",
    "adapter_prefixes",
    "is_hf_conv1d",
    "is_standardized",
    "stored_weight_name",
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
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and "weight" in parametrizations:
        chain = list(parametrizations["weight"])
        return "parametrizations.weight.original1" if [type(p).__name__ for p in chain] == ["_WeightNorm"] else None
    if isinstance(getattr(module, "weight_v", None), nn.Parameter) and isinstance(getattr(module, "weight_g", None), Tensor):
        return "weight_v"
    return "weight"


def dense_wrapper_reason(module: nn.Module) -> str | None:
    """Why a layer of a prunable type is left dense by default (a parametrisation, a standardised weight), else None."""
    if is_standardized(module):
        return (
            f"{type(module).__name__} standardises its weight in forward, so a stored zero is not a zero in"
            " the convolution"
        )
    if stored_weight_name(module) is None:
        return (
            "its weight is computed by a parametrisation (nn.utils.parametrize), so a zero of `original` is"
            " not a zero of the weight: remove the parametrisation before pruning"
        )
    return None
