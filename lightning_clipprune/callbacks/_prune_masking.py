"""``MagnitudePruneCallback``'s per-step work: masking gradients, and weights after a step where needed.

Held apart from the callback so the hot path is all in one place: the parameters that have pruned
entries, their integer masks (:func:`~lightning_clipprune.pruning.mask_factors`, rebuilt at each event)
and one flag saying whether this step's gradients are masked already. No host synchronisation here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_clipprune.callbacks._prune_sharded import is_dtensor, local
from lightning_clipprune.pruning import (
    apply_masks_,
    keeps_pruned_weights_zero,
    mask_factors,
    mask_optimizer_state_,
)
from lightning_clipprune.pruning.ranking import count_kept


class MaskHotPath:
    """The parameters with pruned entries and their integer masks, for the per-step passes.

    Example::

        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> hot = MaskHotPath()
        >>> hot.build({"p": p}, {"p": torch.tensor([True, False])}, ["p"])
        >>> p.grad = torch.tensor([float("nan"), float("nan")])
        >>> hot.mask_gradients(); p.grad
        tensor([nan, 0.])
    """

    def __init__(self) -> None:
        self.drop()

    @property
    def built(self) -> bool:
        return self.live is not None

    def build(self, params: Mapping[str, torch.nn.Parameter], masks: Mapping[str, Tensor], names: Sequence[str]) -> None:
        """Cache the parameters of ``names`` that have pruned entries, and their integer masks.

        Sharded parameters (DTensors, ``ModelParallelStrategy``): the masks, factors and passes are those of
        this rank's rows (the local shards), and ``pruned`` counts this rank's rows only.
        """
        #: whether the parameters are DTensors: each pass then works on their local shards
        self.sharded = any(is_dtensor(params[n]) for n in names)
        if self.sharded:
            masks = {n: local(masks[n]) for n in names}
        pruned = {n: masks[n].numel() - count_kept(masks[n]) for n in names}
        live = [n for n in names if pruned[n]]
        #: how many entries of ``names`` are pruned, all together (the event line reads it)
        self.pruned = sum(pruned.values())
        self.params = params
        self.weights = {n: local(params[n]) for n in live} if self.sharded else params
        self.live: list[torch.nn.Parameter] | None = [params[n] for n in live]
        self.factors = [self._factor(n, masks[n]) for n in live]
        self.factor_of = dict(zip(live, self.factors, strict=True))
        self._owned = {n: f for n, f in self.factor_of.items() if f is not masks[n]}
        self.grads_masked = False

    def _factor(self, name: str, mask: Tensor) -> Tensor:
        """``mask``'s integer mask; on the CPU written into the last event's when it has the same shape (no
        fresh allocation: a 25 M-entry conversion 3x cheaper)."""
        weight = self.weights[name]
        old = self._owned.get(name)
        if (
            old is not None
            and mask.dtype == torch.bool
            and mask.device.type == old.device.type == "cpu"
            and mask.shape == old.shape
            and mask.is_contiguous()
            and old.element_size() == weight.element_size()
        ):
            np.copyto(old.numpy(), mask.numpy(), casting="unsafe")
            return old
        return mask_factors([mask], [weight])[0]

    def drop(self) -> None:
        """Forget the cache (its integer masks are a training-time cost)."""
        self.params: Mapping[str, torch.nn.Parameter] = {}
        self.weights: Mapping[str, Tensor] = {}
        self.sharded = False
        self.live = None
        self.factors: list[Tensor] = []
        self.factor_of: dict[str, Tensor] = {}
        self._owned: dict[str, Tensor] = {}  # integer masks this cache allocated: rewritten at the next build
        self.pruned = 0
        self.grads_masked = False  # mask_gradients() did its work since the last backward / optimizer step

    def mask_gradients(self) -> None:
        """Set the gradients of pruned entries to exactly zero (NaN included); once per step."""
        if self.grads_masked or not self.live:
            return
        self.grads_masked = True
        grads = [p.grad for p in self.live] if not self.sharded else [local(p.grad) if p.grad is not None else None for p in self.live]
        if any(g is None for g in grads):
            pairs = [(g, f) for g, f in zip(grads, self.factors, strict=True) if g is not None]
            apply_masks_([g for g, _ in pairs], [f for _, f in pairs])
        else:
            apply_masks_(grads, self.factors)

    def apply_weights(self, names: Sequence[str]) -> None:
        """Set the pruned weights of ``names`` to exactly ``+0.0``."""
        names = [n for n in names if n in self.factor_of]
        apply_masks_([self.weights[n] for n in names], [self.factor_of[n] for n in names])

    def mask_optimizer_states(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Set the optimizer state of the pruned entries to ``+0.0`` (after an event), by the integer masks.

        Only the parameters with pruned entries are visited: the others have nothing to zero.
        """
        for optimizer in optimizers:
            mask_optimizer_state_(optimizer, self.live or [], self.factors)

    def register(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        params: Mapping[str, torch.nn.Parameter],
        observe: Callable[[dict[str, Tensor]], None] | None,
    ) -> list[Any]:
        """Put :meth:`post_hook` on every optimizer; returns the handles.

        Each hook reads which of ``params`` its optimizer steps again when the optimizer's parameter list
        changes (``add_param_group`` mid-fit, as Lightning's ``BackboneFinetuning`` does), so parameters added
        later are re-masked too; an optimizer with none of them gets a hook that does nothing until it has.
        """
        return [
            optimizer.register_step_post_hook(
                self.post_hook(params, StepNames(optimizer, params), keeps_pruned_weights_zero(optimizer), observe)
            )
            for optimizer in optimizers
        ]

    def post_hook(
        self,
        params: Mapping[str, torch.nn.Parameter],
        names: Callable[[], list[str]],
        zero_keeping: bool,
        observe: Callable[[dict[str, Tensor]], None] | None,
    ) -> Any:
        """An ``optimizer.register_step_post_hook`` hook for the parameters ``names()`` (of ``params``) of one optimizer.

        ``zero_keeping`` (:func:`~lightning_clipprune.pruning.keeps_pruned_weights_zero`): with the gradients
        masked before the step and the state zeroed at the event, this optimizer's step provably leaves
        pruned weights at zero, so the weights need no second pass; any other optimizer is re-masked after
        every step. ``observe`` gets the step's gradients (a criterion that needs them).
        """

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            stepped = names()
            if not stepped:
                return
            if observe is not None:
                # after optimizer.step: `.grad` is what the step used (masked, clipped, AMP-unscaled). A step
                # *pre*-hook would be too early: Lightning passes the closure that runs backward to step().
                grads = {n: params[n].grad for n in stepped}
                observe({n: g for n, g in grads.items() if g is not None})
            if self.live:
                if not self.grads_masked:  # stepped without mask_gradients(): the state may have moved too
                    live = [n for n in stepped if n in self.factor_of]
                    self.apply_weights(live)
                    mask_optimizer_state_(optimizer, [self.params[n] for n in live], [self.factor_of[n] for n in live])
                elif not zero_keeping:
                    self.apply_weights(stepped)
            self.grads_masked = False

        return hook


class StepNames:
    """The names of ``params`` that ``optimizer`` steps, read again when its parameter count changes.

    Example::

        >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([a], lr=0.1)
        >>> names = StepNames(opt, {"a": a, "b": b})
        >>> names()
        ['a']
        >>> opt.add_param_group({"params": [b]}); names()
        ['a', 'b']
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self._ids = {id(p): n for n, p in params.items()}
        self._count = -1
        self._names: list[str] = []

    def __call__(self) -> list[str]:
        count = sum(len(group["params"]) for group in self.optimizer.param_groups)
        if count != self._count:
            self._count = count
            self._names = [
                self._ids[id(p)] for group in self.optimizer.param_groups for p in group["params"] if id(p) in self._ids
            ]
        return self._names
