"""The contract between the callbacks: what one callback may ask of another, and nothing else.

Callbacks never look each other up by class or attribute name. A callback that offers something to the
others implements one of the :class:`typing.Protocol` classes below; a callback that needs it finds the
providers with :func:`find_callbacks`, an ``isinstance`` check against the protocol. An author of a
fourth callback implements a protocol to take part, without the others changing.

Who does what, per optimizer step:

1. A :class:`GradientMasker` (``MagnitudePruneCallback``) zeroes the gradients of pruned weights in
   :meth:`GradientMasker.mask_gradients`. The call is idempotent between two optimizer steps: the first
   call of a step does the work, later ones return at once.
2. A callback that reads gradients (``GradientClipCallback``, to compute the clip norm over live weights
   only) calls ``mask_gradients()`` of every masker first thing in its ``on_before_optimizer_step``.
   The masker also calls it in its own ``on_before_optimizer_step``. Whatever the order of the callback
   list, the gradients are masked once, before anybody reads them.
3. A :class:`PruneState` (``MagnitudePruneCallback``) tells reporting callbacks (``SparsityLogger``)
   which parameters it prunes and its current target.

Example::

    from lightning_clipprune.callbacks.contract import GradientMasker, find_callbacks

    class MyGradientReader(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for masker in find_callbacks(trainer, GradientMasker, exclude=self):
                masker.mask_gradients()
            ...  # the gradients of pruned weights are zero from here on
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["GradientMasker", "PruneState", "find_callbacks"]

T = TypeVar("T")


@runtime_checkable
class GradientMasker(Protocol):
    """A callback that keeps some gradient entries at zero (the gradients of pruned weights)."""

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned entries in place, without host synchronisation.

        Idempotent between two optimizer steps: only the first call of a step does work.
        """


@runtime_checkable
class PruneState(Protocol):
    """A callback that prunes parameters and can say which, and how far along its schedule it is."""

    @property
    def parameter_names(self) -> list[str]:
        """The pruned parameters, by ``named_parameters`` name, in module order (empty before ``setup``)."""

    @property
    def current_target(self) -> float | None:
        """The scheduled sparsity at the last pruning event; ``None`` when it prunes by threshold."""


def find_callbacks(trainer: Any, protocol: type[T], exclude: object | None = None) -> list[T]:
    """The Trainer's callbacks that implement ``protocol`` (``isinstance``), in list order, minus ``exclude``.

    Example::

        >>> class Trainer:
        ...     callbacks = [object()]
        >>> find_callbacks(Trainer(), GradientMasker)
        []
    """
    return [cb for cb in getattr(trainer, "callbacks", []) if cb is not exclude and isinstance(cb, protocol)]
