"""Importance criteria: objects that score every weight entry, behind one small protocol.

A criterion says what it needs (:data:`NEEDS`): ``"nothing"`` (the weights alone, :class:`Magnitude`),
``"gradients"`` (it is shown the gradient of every optimizer step, :class:`Taylor`) or ``"calibration"``
(a pass over calibration data, for post-training methods such as "obs", :mod:`lightning_clipprune.posttrain`:
``MagnitudePruneCallback`` runs those once, after training, on its training loader).
It carries its own state for checkpoints (``state_dict``/``load_state_dict``), so a run resumed from a
checkpoint ranks exactly as one that was not stopped.

A new criterion is one class, registered by name with :func:`register_criterion` (or passed to
``MagnitudePruneCallback(criterion=...)`` as a class or an instance)::

    class Fisher(Taylor):  # w^2 * EMA(g^2), ranked as |w| * sqrt(EMA(g^2))
        def observe(self, grads):
            ...

    register_criterion("fisher", Fisher)

Scores are non-negative (entries already pruned are given a lower score by the ranking); lower is pruned
first.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from lightning_clipprune._choices import CRITERIA
from lightning_clipprune._validation import bad_value, check_real
from lightning_clipprune.pruning.apply import apply_masks_

__all__ = [
    "CRITERIA",
    "NEEDS",
    "Criterion",
    "CriterionProtocol",
    "Magnitude",
    "Taylor",
    "criterion_names",
    "importance",
    "make_criterion",
    "register_criterion",
]

#: What a criterion may need before it can score.
NEEDS: tuple[str, ...] = ("nothing", "gradients", "calibration")


@runtime_checkable
class CriterionProtocol(Protocol):
    """What ``compute_masks`` and ``MagnitudePruneCallback`` call on a criterion (subclass :class:`Criterion`)."""

    name: str
    needs: str

    def score(self, name: str, weight: Tensor) -> Tensor:
        """Non-negative importance of every entry of ``weight`` (named ``name``), same shape, float32 or wider."""

    def prepare(self, params: Mapping[str, Tensor]) -> None:
        """Allocate (or move to the parameters' devices) the state kept per parameter; at train start."""

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        """Fold one optimizer step's gradients (as the step used them) into the state, in place, no sync."""

    def ready(self) -> bool:
        """Whether the state is usable (False: the event falls back to magnitude, with a warning)."""

    def masked(self, masks: Mapping[str, Tensor]) -> None:
        """After a pruning event: forget what was seen of the pruned entries (bool masks, True = kept)."""

    def state_dict(self) -> dict[str, Any]:
        """The state, as references (the caller copies it to the CPU for a checkpoint)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors may be on the CPU until :meth:`prepare`)."""


class Criterion:
    """Base class: a criterion that needs nothing and has no state. Subclasses override :meth:`score`.

    Example::

        >>> class Square(Criterion):
        ...     name = "square"
        ...     def score(self, name, weight):
        ...         return weight.detach().float().square()
        >>> Square().score("w", torch.tensor([-2.0, 1.0]))
        tensor([4., 1.])
    """

    name: ClassVar[str] = "criterion"
    needs: ClassVar[str] = "nothing"

    def score(self, name: str, weight: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement `score(name, weight)`")

    def score_into(self, name: str, weight: Tensor, out: Tensor) -> None:
        """Write the flat scores into ``out`` (1-D, ``weight.numel()`` entries). Override to skip a temporary."""
        out.copy_(self.score(name, weight).reshape(-1))

    def prepare(self, params: Mapping[str, Tensor]) -> None:
        pass

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        pass

    def ready(self) -> bool:
        return True

    def masked(self, masks: Mapping[str, Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _scoring_dtype(weight: Tensor) -> Tensor:
    w = weight.detach()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


class Magnitude(Criterion):
    """``|w|``: the weights alone (Han et al. 2015; Zhu & Gupta 2017). Low precision is scored in float32."""

    name = "magnitude"

    def score(self, name: str, weight: Tensor) -> Tensor:
        return _scoring_dtype(weight).abs()

    def score_into(self, name: str, weight: Tensor, out: Tensor) -> None:
        w = weight.detach().reshape(-1)
        if w.dtype == out.dtype == torch.float32 and w.device.type == out.device.type == "cpu":
            np.abs(w.numpy(), out=out.numpy())  # numpy's is faster on the CPU
        elif w.dtype == out.dtype:
            torch.abs(w, out=out)
        else:  # bf16/fp16 weights (precision="bf16-true"): scored in the buffer's float32
            out.copy_(w).abs_()


class Taylor(Criterion):
    """``|w * g|``, ``g`` an exponential moving average of the gradient the optimizer stepped with.

    The first-order estimate of the loss change when ``w`` is set to 0 (Molchanov et al., "Pruning
    Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017). ``g`` is folded in after
    every optimizer step, so it is the clipped, AMP-unscaled gradient; pruned entries of ``g`` are zeroed at
    each event.

    Args:
        beta: EMA factor, in [0, 1): ``g = beta * g + (1 - beta) * grad``.
        grad_avgs: start from these averages (``{name: tensor}``), as :func:`importance` does.

    Example::

        >>> t = Taylor(grad_avgs={"w": torch.tensor([0.5, -3.0])})
        >>> t.score("w", torch.tensor([-2.0, 1.0]))
        tensor([1., 3.])
    """

    name = "taylor"
    needs = "gradients"

    def __init__(self, beta: float = 0.9, grad_avgs: Mapping[str, Tensor] | None = None) -> None:
        self.beta = check_real("Taylor", "beta", beta, low=0, high=1, high_open=True)
        self.grad_avg: dict[str, Tensor] = dict(grad_avgs or {})
        self.ema_steps = 1 if grad_avgs else 0

    def score(self, name: str, weight: Tensor) -> Tensor:
        g = self.grad_avg.get(name)
        if g is None:
            raise ValueError(f"criterion 'taylor' has no gradient average for `{name}`: it needs `grad_avgs`")
        w = _scoring_dtype(weight)
        return (w * g.to(w.dtype)).abs_()

    def prepare(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            avg = self.grad_avg.get(name)
            self.grad_avg[name] = torch.zeros_like(p) if avg is None else avg.to(p.device, p.dtype)

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        pairs = [(self.grad_avg[n], g) for n, g in grads.items() if n in self.grad_avg]
        if not pairs:
            return
        with torch.no_grad():
            self.fold([a for a, _ in pairs], [g for _, g in pairs])
        self.ema_steps += 1

    def fold(self, avgs: list[Tensor], grads: list[Tensor]) -> None:
        """One EMA step of the running averages, in place: ``avg = beta * avg + (1 - beta) * g`` (foreach)."""
        torch._foreach_mul_(avgs, self.beta)
        torch._foreach_add_(avgs, grads, alpha=1.0 - self.beta)

    def ready(self) -> bool:
        return self.ema_steps > 0

    def masked(self, masks: Mapping[str, Tensor]) -> None:
        names = [n for n in self.grad_avg if n in masks]
        apply_masks_([self.grad_avg[n] for n in names], [masks[n] for n in names])

    def state_dict(self) -> dict[str, Any]:
        return {"grad_avg": self.grad_avg, "ema_steps": self.ema_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.grad_avg = dict(state.get("grad_avg", {}))
        self.ema_steps = int(state.get("ema_steps", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta})"


_REGISTRY: dict[str, type] = {"magnitude": Magnitude, "taylor": Taylor}
# Criteria defined above this package (they import it): the module registers its class when imported.
_LAZY: dict[str, str] = {"obs": "lightning_clipprune.posttrain.criterion"}
_METHODS = ("score", "prepare", "observe", "ready", "masked", "state_dict", "load_state_dict")


def register_criterion(name: str, cls: type) -> None:
    """Make ``cls`` available by ``name`` (``MagnitudePruneCallback(criterion=name)``, ``compute_masks``).

    Raises:
        ValueError: if ``name`` is not a non-empty string, or ``cls`` is not a class following the protocol.

    Example::

        >>> class Square(Criterion):
        ...     name = "square"
        ...     def score(self, name, weight):
        ...         return weight.detach().float().square()
        >>> register_criterion("square", Square)
        >>> "square" in criterion_names()
        True
    """
    if not isinstance(name, str) or not name:
        raise bad_value("register_criterion", "name", "a non-empty string", name)
    missing = [m for m in _METHODS if not callable(getattr(cls, m, None))] if isinstance(cls, type) else list(_METHODS)
    if missing:
        raise bad_value("register_criterion", "cls", f"a class with {', '.join(_METHODS)} (subclass Criterion)", cls)
    _REGISTRY[name] = cls


def criterion_names() -> tuple[str, ...]:
    """Every registered criterion name, built-in first."""
    return tuple(_REGISTRY)


def make_criterion(value: Any, owner: str = "compute_masks", **options: Any) -> Any:
    """A criterion object from a registered name, a class or an instance (returned as it is).

    ``options`` go to the constructor of a name or class, those its signature accepts (``beta`` for
    "taylor"; the others are ignored).

    Raises:
        ValueError: an unknown name, or an object that does not follow :class:`CriterionProtocol`, or a
            ``needs`` that is not one of :data:`NEEDS`.

    Example::

        >>> make_criterion("taylor", beta=0.99)
        Taylor(beta=0.99)
    """
    if isinstance(value, str):
        if value not in _REGISTRY and value in _LAZY:
            importlib.import_module(_LAZY[value])
        if value not in _REGISTRY:
            raise bad_value(owner, "criterion", f"one of {', '.join(map(repr, _REGISTRY))} or a Criterion", value)
        value = _REGISTRY[value]
    if isinstance(value, type):
        accepted = inspect.signature(value).parameters
        value = value(**{k: v for k, v in options.items() if k in accepted})
    missing = [m for m in _METHODS if not callable(getattr(value, m, None))]
    if missing:
        allowed = f"one of {', '.join(map(repr, _REGISTRY))}, a Criterion subclass or instance (missing {missing})"
        raise bad_value(owner, "criterion", allowed, value)
    if getattr(value, "needs", None) not in NEEDS:
        raise bad_value(owner, "criterion.needs", f"one of {NEEDS}", getattr(value, "needs", None))
    return value


def importance(weight: Tensor, criterion: str = "magnitude", grad_avg: Tensor | None = None) -> Tensor:
    """The importance score of every entry: ``|w|`` ("magnitude") or ``|w * g|`` ("taylor").

    The Taylor score is the first-order estimate of the loss change when ``w`` is set to 0 (Molchanov
    et al., ICLR 2017), with ``g`` a running average of the (clipped) gradient. Low-precision inputs are
    scored in float32. Any registered name works (:func:`register_criterion`).

    Raises:
        ValueError: for an unknown criterion or "taylor" without ``grad_avg``.

    Example::

        >>> importance(torch.tensor([-2.0, 1.0]), "taylor", torch.tensor([0.5, -3.0]))
        tensor([1., 3.])
    """
    if criterion == "taylor":
        if grad_avg is None:
            raise ValueError("criterion 'taylor' needs `grad_avg`, the running average of the gradient")
        return Taylor(grad_avgs={"w": grad_avg}).score("w", weight)
    return make_criterion(criterion, owner="importance").score("w", weight)
