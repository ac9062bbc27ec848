"""Gradient clipping: one class per algorithm behind a small protocol, and pure functions (no Lightning import).

A clipper (:class:`Clipper`) clips the gradients of the parameters it is given in place and returns two
0-d tensors on the gradients' device, ``(total_norm, clip_coef)``: the global p-norm of the gradients
*before* clipping and the factor the clipping applied (``<= 1``). Nothing here reads a value back to the
host, so a training step that clips does not synchronise with the accelerator. A clipper that remembers
something between steps carries it in ``state_dict()``/``load_state_dict()``.

Algorithms, by the name :data:`CLIPPERS` gives them (``GradientClipCallback(algorithm=name)``):

- ``"norm"``, :class:`NormClip`: global norm clipping, the same result as ``torch.nn.utils.clip_grad_norm_``.
- ``"value"``, :class:`ValueClip`: element-wise clamp, the same result as ``torch.nn.utils.clip_grad_value_``.
- ``"agc"``, :class:`AGC`: unit-wise adaptive gradient clipping, Brock et al. 2021.
- ``"autoclip"``, :class:`AutoClip`: a percentile of the recent history of norms, Seetharaman et al. 2020.
- ``"zclip"``, :class:`ZClip`: z-score of the norm against an EMA mean and variance, Kumar et al. 2025.

A new algorithm is one new class (derive from :class:`ClipAlgorithm`, or :class:`ThresholdClip` for a
threshold on the total norm), given a name with :func:`register_clipper`; no other code changes.

Modules: :mod:`.base` (protocol, registry, norm helpers), :mod:`.norm`, :mod:`.agc`, :mod:`.autoclip`,
:mod:`.zclip`.
"""

from __future__ import annotations

# norm first: the registry lists the algorithms in this order (norm, value, agc, autoclip, zclip)
from lightning_clipprune.clipping.norm import NormClip, ValueClip, clip_grad_norm, clip_grad_value

# isort: split
from lightning_clipprune.clipping.agc import AGC, adaptive_grad_clip
from lightning_clipprune.clipping.autoclip import AutoClip
from lightning_clipprune.clipping.base import (
    CLIPPERS,
    ClipAlgorithm,
    Clipper,
    ThresholdClip,
    clip_coefficient,
    clipper_name,
    option_defaults,
    option_names,
    register_clipper,
    scale_grads_,
    total_norm,
)
from lightning_clipprune.clipping.zclip import ZCLIP_MODES, ZCLIP_OPTIONS, ZClip

__all__ = [
    "AGC",
    "CLIPPERS",
    "ZCLIP_MODES",
    "ZCLIP_OPTIONS",
    "AutoClip",
    "ClipAlgorithm",
    "Clipper",
    "NormClip",
    "ThresholdClip",
    "ValueClip",
    "ZClip",
    "adaptive_grad_clip",
    "clip_coefficient",
    "clip_grad_norm",
    "clip_grad_value",
    "clipper_name",
    "option_defaults",
    "option_names",
    "register_clipper",
    "scale_grads_",
    "total_norm",
]
