"""The clipper protocol, the registry of algorithm names, and the norm helpers every algorithm shares.

A *clipper* is any object with three methods (:class:`Clipper`): ``clip(parameters, norm_type)`` clips
the gradients of ``parameters`` in place and returns ``(total_norm, clip_coef)`` as 0-d tensors on the
gradients' device (the norm *before* clipping and the factor applied, ``<= 1``), without reading a value
back to the host; ``state_dict()`` and ``load_state_dict()`` carry whatever it remembers between steps, so
a run resumed from a checkpoint clips exactly as one that was not stopped. Built-in algorithms derive
from :class:`ClipAlgorithm` (which gives a stateless ``state_dict``) and those that clip the total norm to
a threshold of their own from :class:`ThresholdClip`. :func:`register_clipper` gives a class a name that
``GradientClipCallback(algorithm=...)`` and the Hydra config accept.

Sharded gradients (DTensors under FSDP2 / ``ModelParallelStrategy``) are first-class: the norms here are
then the whole gradient's, reduced over the ranks from each rank's local shard with one ``all_reduce`` of
one number per tensor (:mod:`lightning_clipprune._sharded`), and scaling and clamping act on the local
shards; no gradient is gathered. Without a DTensor the computation is the single-process one, bit for bit.

No Lightning import here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from lightning_clipprune._sharded import FOREACH_DEVICE_TYPES, any_sharded, global_norms, local, local_norms

__all__ = [
    "CLIPPERS",
    "ClipAlgorithm",
    "Clipper",
    "ThresholdClip",
    "clip_coefficient",
    "clipper_name",
    "option_defaults",
    "option_names",
    "register_clipper",
    "scale_grads_",
    "total_norm",
]

# torch's clip_grad_norm_ adds this to the norm before dividing; kept identical so results match bit for bit.
_NORM_EPS = 1e-6
# Device types whose foreach kernels are known to work; others use a per-tensor loop.
_FOREACH_DEVICE_TYPES = FOREACH_DEVICE_TYPES
_METHODS = ("clip", "state_dict", "load_state_dict")


@runtime_checkable
class Clipper(Protocol):
    """What ``GradientClipCallback`` needs from a clip algorithm (a structural type: no base class needed).

    Example::

        >>> class HalfEveryGradient:  # a complete, if useless, clipper
        ...     def clip(self, parameters, norm_type=2.0):
        ...         grads = [p.grad for p in parameters if p.grad is not None]
        ...         norm = total_norm(grads, norm_type)
        ...         scale_grads_(grads, torch.tensor(0.5))
        ...         return norm, torch.tensor(0.5)
        ...     def state_dict(self):
        ...         return {}
        ...     def load_state_dict(self, state_dict):
        ...         pass
        >>> isinstance(HalfEveryGradient(), Clipper)
        True
    """

    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """Clip the ``.grad`` of ``parameters`` in place; return ``(total_norm, clip_coef)``, 0-d tensors.

        ``total_norm`` is the global ``norm_type``-norm of the gradients before clipping; ``clip_coef``
        the factor applied (``<= 1``; for a clipping that is no uniform scaling, the ratio of the norms
        after and before). Parameters without a gradient are ignored. No host read (no ``.item()``).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the clipper remembers between steps (tensors on CPU); ``{}`` when stateless."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class ClipAlgorithm:
    """Base class of the built-in clippers: options checked in ``__init__``, a stateless default state.

    A subclass sets :attr:`clip_val_option` to the name of the constructor option that
    ``GradientClipCallback(clip_val=...)`` sets (the bound), implements :meth:`clip`, and overrides
    :meth:`state_dict`/:meth:`load_state_dict` when it remembers something between steps.
    """

    #: The constructor option that ``GradientClipCallback(clip_val=...)`` sets; None when there is none.
    clip_val_option: ClassVar[str | None] = None

    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """See :meth:`Clipper.clip`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Nothing to remember: ``{}``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore."""

    @property
    def clip_val(self) -> Any:
        """The value of :attr:`clip_val_option` (None when the algorithm has none)."""
        return None if self.clip_val_option is None else getattr(self, self.clip_val_option)

    def __repr__(self) -> str:
        names = inspect.signature(type(self).__init__).parameters
        options = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if n != "self" and hasattr(self, n))
        return f"{type(self).__name__}({options})"


#: Algorithm name -> clipper class, for ``GradientClipCallback(algorithm="name")``; see :func:`register_clipper`.
CLIPPERS: dict[str, type] = {}
_C = TypeVar("_C", bound=type)


def register_clipper(name: str, cls: _C | None = None, *, replace: bool = False) -> Any:
    """Give the clipper class ``cls`` the algorithm name ``name`` (also usable as a class decorator).

    ``GradientClipCallback(algorithm=name, clip_val=..., algorithm_options={...})`` then builds
    ``cls(**{cls.clip_val_option: clip_val}, **algorithm_options)``, and the Hydra config accepts
    ``clip.algorithm=name``.

    Args:
        name: the algorithm name, a non-empty string without spaces.
        cls: a class with ``clip``, ``state_dict`` and ``load_state_dict`` methods (see :class:`Clipper`).
        replace: allow ``name`` to move from the class it names now to ``cls``.

    Returns:
        ``cls`` (or, without ``cls``, a decorator that registers the class it decorates).

    Raises:
        ValueError: ``name`` is not a usable name, or already names another class and ``replace`` is False.
        TypeError: ``cls`` is not a class with the three methods.

    Example::

        >>> @register_clipper("half")
        ... class Half(ClipAlgorithm):
        ...     def clip(self, parameters, norm_type=2.0):
        ...         grads = [p.grad for p in parameters if p.grad is not None]
        ...         norm, coef = total_norm(grads, norm_type), torch.tensor(0.5)
        ...         scale_grads_(grads, coef)
        ...         return norm, coef
        >>> CLIPPERS["half"] is Half
        True
        >>> del CLIPPERS["half"]
    """
    if cls is None:
        return lambda c: register_clipper(name, c, replace=replace)
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"`register_clipper(name=...)` must be a non-empty string without spaces, got {name!r}.")
    missing = [m for m in _METHODS if not callable(getattr(cls, m, None))] if isinstance(cls, type) else _METHODS
    if missing:
        raise TypeError(f"`register_clipper(cls=...)` must be a class with {', '.join(_METHODS)}, got {cls!r}.")
    if CLIPPERS.get(name, cls) is not cls and not replace:
        raise ValueError(
            f"The clip algorithm name {name!r} is taken by {CLIPPERS[name].__qualname__}: pick another name, "
            "or pass replace=True."
        )
    CLIPPERS[name] = cls
    return cls


def clipper_name(clipper: Any) -> str:
    """The registered name of a clipper or clipper class (its class name when it has none)."""
    cls = clipper if isinstance(clipper, type) else type(clipper)
    return next((n for n, c in CLIPPERS.items() if c is cls), cls.__name__)


# ---------------------------------------------------------------------------------------- norm helpers


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    first = tensors[0]
    device, dtype = first.device, first.dtype
    if all(t.device == device and t.dtype == dtype for t in tensors):  # the usual case: one group, no copying
        return {(device, dtype): tensors if isinstance(tensors, list) else list(tensors)}
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _grouped_norm(
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]], first_device: torch.device, norm_type: float
) -> Tensor:
    if len(groups) == 1 and first_device.type in _FOREACH_DEVICE_TYPES:  # one kernel, no copies
        (group,) = groups.values()
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, norm_type)), norm_type)
    norms: list[Tensor] = []
    for (device, _), group in groups.items():
        if device.type in _FOREACH_DEVICE_TYPES:
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in group)
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The p-norm of ``tensors`` viewed as one concatenated vector, as ``torch.nn.utils.get_total_norm``.

    One ``torch._foreach_norm`` per (device, dtype) group, then the p-norm of the stacked per-tensor norms:
    ``||(||t_1||_p, ..., ||t_k||_p)||_p == ||concat(t_1, ..., t_k)||_p`` for every p, including inf.

    Args:
        tensors: the tensors (usually gradients).
        norm_type: p of the p-norm; ``float("inf")`` for the max-norm.

    Returns:
        A 0-d tensor on the first tensor's device (a CPU zero when ``tensors`` is empty). With DTensors
        among ``tensors``: the norm over all their shards, identical on every rank (a collective: every
        rank calls it with the same list).
    """
    if len(tensors) == 0:
        return torch.tensor(0.0)
    if any_sharded(tensors):  # the p-norm of the per-tensor global norms: one all_reduce, no gather
        return torch.linalg.vector_norm(global_norms(tensors, norm_type), float(norm_type))
    return _grouped_norm(_group_by_device_and_dtype(tensors), tensors[0].device, float(norm_type))


def clip_coefficient(max_norm: float | Tensor, norm: Tensor) -> Tensor:
    r"""The factor that scales a gradient of norm ``norm`` down to at most ``max_norm``.

    .. math:: c = \min\left(1, \frac{\text{max\_norm}}{\text{norm} + 10^{-6}}\right)

    ``max_norm = inf`` gives 1 (no clipping). The same expression as ``torch.nn.utils.clip_grad_norm_``.
    """
    return torch.clamp(max_norm / (norm + _NORM_EPS), max=1.0)


def _scale_groups_(groups: dict[tuple[torch.device, torch.dtype], list[Tensor]], coef: Tensor) -> None:
    for (device, _), group in groups.items():
        coef_d = coef if coef.device == device else coef.to(device)
        if device.type in _FOREACH_DEVICE_TYPES:
            torch._foreach_mul_(group, coef_d)
        else:
            for g in group:
                g.mul_(coef_d)


def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every tensor of ``grads`` in place by the 0-d tensor ``coef`` (foreach per device group)."""
    if len(grads):
        _scale_groups_(_group_by_device_and_dtype([local(g) for g in grads]), coef)


def _norm_and_groups(
    grads: list[Tensor], norm_type: float
) -> tuple[Tensor, dict[tuple[torch.device, torch.dtype], list[Tensor]]]:
    """The global p-norm of a non-empty gradient list and its (local shards') device groups, for scaling."""
    if any_sharded(grads):
        return total_norm(grads, norm_type), _group_by_device_and_dtype([local(g) for g in grads])
    groups = _group_by_device_and_dtype(grads)
    return _grouped_norm(groups, grads[0].device, float(norm_type)), groups


def _clip_to_norm_(grads: list[Tensor], max_norm: float | Tensor, norm_type: float) -> tuple[Tensor, Tensor]:
    """Norm clipping of a non-empty gradient list: one grouping pass shared by the norm and the scaling."""
    norm, groups = _norm_and_groups(grads, norm_type)
    if _surely_under(norm, max_norm):  # coef is exactly 1 and x * 1.0 is x: no pass over the gradients
        return norm, torch.ones((), dtype=norm.dtype)
    coef = clip_coefficient(max_norm, norm)
    _scale_groups_(groups, coef)
    return norm, coef


#: Relative margin under the bound within which :func:`_surely_under` leaves the decision to the tensor path:
#: far wider than the float32 rounding of ``max_norm / (norm + eps)`` (three roundings, about 2e-7).
_UNDER_MARGIN = 2.0**-20


def _surely_under(norm: Tensor, max_norm: float | Tensor) -> bool:
    """Whether :func:`clip_coefficient` would be exactly 1, decided on the host where reading ``norm`` is free.

    Only a CPU float32/float64 norm and a number bound (no device sync, no adaptive tensor bound), and only
    clearly under the bound; otherwise False and the tensor path decides (NaN and inf included).
    """
    if norm.device.type != "cpu" or norm.dtype not in (torch.float32, torch.float64) or isinstance(max_norm, Tensor):
        return False
    return float(norm) + _NORM_EPS <= max_norm * (1.0 - _UNDER_MARGIN)


def _ratio(post: Tensor, pre: Tensor) -> Tensor:
    """post/pre, and 1 where pre is 0 (nothing to clip)."""
    return torch.where(pre > 0, post / torch.where(pre > 0, pre, torch.ones_like(pre)), torch.ones_like(pre))


def _nothing() -> tuple[Tensor, Tensor]:
    """``(total_norm, clip_coef)`` of a step without any gradient."""
    return torch.tensor(0.0), torch.tensor(1.0)


def _per_tensor_norms(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The p-norm of each tensor, stacked in the order given, on the first tensor's device (global for DTensors)."""
    return global_norms(tensors, norm_type) if any_sharded(tensors) else local_norms(tensors, norm_type)


def _cap(threshold: Tensor, max_norm: float | None) -> Tensor:
    return threshold if max_norm is None else torch.clamp(threshold, max=max_norm)


class ThresholdClip(ClipAlgorithm):
    """Base of the algorithms that clip the total norm to a threshold they compute from the norm's history.

    A subclass implements :meth:`threshold` (update the statistics with this step's norm, return the
    bound) and :meth:`state_dict`/:meth:`load_state_dict`; :meth:`clip` does the rest. The bound is the
    callback's ``clip_val``-able hard cap ``max_norm`` (None: none) on top of the subclass's threshold.
    """

    clip_val_option: ClassVar[str | None] = "max_norm"
    max_norm: float | None = None

    def threshold(self, norm: Tensor) -> Tensor:
        """Record ``norm`` (a 0-d tensor on the gradients' device) and return this step's bound, 0-d."""
        raise NotImplementedError

    @torch.no_grad()
    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """Update the statistics with the gradients' norm, then clip them to the threshold.

        Returns:
            ``(total_norm, clip_coef)``, both 0-dim tensors on the gradients' device.
        """
        grads = _grads(parameters)
        if not grads:
            return _nothing()
        norm, groups = _norm_and_groups(grads, norm_type)  # global under sharding: every rank feeds the same norm
        coef = clip_coefficient(self.threshold(norm).to(norm.dtype), norm)
        _scale_groups_(groups, coef)
        return norm, coef


def option_names(cls: type) -> list[str]:
    """The keyword options of a clipper class's constructor, in order."""
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def option_defaults(cls: type) -> dict[str, Any]:
    """``{option: default}`` of a clipper class's constructor (options without a default are left out)."""
    params = inspect.signature(cls).parameters
    return {n: params[n].default for n in option_names(cls) if params[n].default is not inspect.Parameter.empty}

