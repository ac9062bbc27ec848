"""``MagnitudePruneCallback``'s words to the user at set-up and around post-training pruning.

- At set-up (:func:`announce_coverage`): one line naming the tensors left dense because they are tied to
  a layer that is not pruned, and one warning when the prunable weights are under
  :data:`~lightning_clipprune.pruning.LOW_SHARE` of the model's parameters, naming the largest modules
  left dense and why.
- Around a post-training event (:func:`before_post_training`, :func:`after_validation`): the metrics
  before pruning are printed on rank zero and kept in ``trainer.callback_metrics`` as
  ``<metric>_before_pruning`` (the progress bar and ``callback_metrics`` still show the values from before
  the event, which no validation has measured since), and the next ``trainer.validate`` prints the
  metrics after beside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_clipprune.pruning import LOW_SHARE, dense_modules, prunable_share, tied_names

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

OWNER = "MagnitudePruneCallback"
_NAMED = 3  # the largest modules left dense named in the low-share warning


def announce_coverage(cb: Any, module: nn.Module, selected: list[str]) -> None:
    """The tie line and the low-share warning for ``cb`` (a ``MagnitudePruneCallback``) pruning ``selected``."""
    ties = {} if cb.include is not None or cb.include_tied else tied_names(module, cb.prune_bias)
    if ties:
        rank_zero_info(
            f"{OWNER}: left dense because tied to a layer that is not pruned: "
            + "; ".join(f"`{name}` (the same tensor as {', '.join(f'`{a}`' for a in other)})" for name, other in ties.items())
            + ". include_tied=True prunes it (both names then share its zeros)."
        )
    share = prunable_share(module, selected)
    if share >= LOW_SHARE:
        return
    dense = dense_modules(module, selected, include=cb.include, exclude=cb.exclude)
    total = sum(p.numel() for p in module.parameters())
    named = "; ".join(f"`{d.name}` ({d.numel:,} parameters: {d.reason})" for d in dense[:_NAMED])
    effect = f": sparsity={cb.sparsity:g} prunes about {share * cb.sparsity:.1%} of the model" if cb.sparsity else ""
    rank_zero_warn(
        f"{OWNER}: the prunable weights are only {share:.1%} of the model's {total:,} parameters{effect}."
        f" Largest left dense: {named}."
    )


def before_post_training(cb: Any, trainer: pl.Trainer) -> dict[str, float]:
    """The scalar ``callback_metrics`` just before a post-training event, also kept as ``<name>_before_pruning``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
    cb._after_reported = False  # the next validate reports after -> before, once
    for k, v in metrics.items():
        if not k.endswith("_before_pruning"):
            trainer.callback_metrics[f"{k}_before_pruning"] = torch.tensor(v)
    return metrics


def post_training_line(before: dict[str, float]) -> str:
    """The rank-zero line printed after post-training pruning."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in before.items() if not k.endswith("_before_pruning")) or "none logged"
    return (
        f"{OWNER}: pruned after training, without retraining. Metrics before pruning: {shown} (the progress bar"
        " still shows them; they are kept as `<name>_before_pruning`). Run `trainer.validate(model, ...)` for the"
        " metrics after pruning."
    )


def after_validation(cb: Any, trainer: pl.Trainer) -> None:
    """After a ``trainer.validate`` that follows post-training pruning: print each metric after beside its before."""
    before = cb.metrics_before_pruning
    if not before or trainer.sanity_checking or getattr(cb, "_after_reported", False):
        return  # (a later validate, of a checkpoint perhaps written before the event, is not compared)
    if trainer.state.fn != TrainerFn.VALIDATING:  # a later fit's own validation compares retrained metrics
        return
    cb._after_reported = True
    pairs = []
    for k, v in trainer.callback_metrics.items():
        if k in before and isinstance(v, Tensor) and v.numel() == 1:
            pairs.append(f"{k} {before[k]:.4g} -> {float(v):.4g}")
    if pairs:
        rank_zero_info(f"{OWNER}: after post-training pruning: {', '.join(pairs)} (before -> after).")
