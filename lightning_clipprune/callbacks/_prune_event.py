"""Parts of a ``MagnitudePruneCallback`` pruning event: the finiteness check, the new masks and their application,
calibration, the event line.

Moved out of :mod:`~lightning_clipprune.callbacks.magnitude_prune` to keep that module short; each takes
the callback (``cb``) and reads its attributes, never another callback's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_clipprune.callbacks._prune_coupling import check_outputs, event_groups
from lightning_clipprune.callbacks._prune_plan import (
    OWNER,
    check_finite,
    event_layouts,
    keep_norm_slices,
    settle_at_end,
    state_tensors,
    warn_saturated,
)
from lightning_clipprune.callbacks._prune_sharded import pruned_counts, sharded_event_masks
from lightning_clipprune.pruning import Magnitude, compute_masks
from lightning_clipprune.schedules import sparsity_at

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Per-event lines go here at INFO (the app writes this logger to ``run.log``); the console gets them
#: only with ``verbose=True``.
log = logging.getLogger("lightning_clipprune")


def check_event_finite(cb: Any, t: int, trainer: Any = None) -> None:
    """Raise before an event at position ``t`` when a pruned weight (or the criterion's state) holds NaN or inf.

    Raises:
        FloatingPointError: naming the tensors (see ``check_finite``).
    """
    # A NaN ranks nowhere (every comparison is False): the event would prune everything and keep the NaNs.
    scored = {n: p.detach() for n, p in cb._params.items()}
    if cb._criterion.ready():
        scored.update({f"{n} (criterion state)": v for n, v in state_tensors(cb._criterion.state_dict())})
    check_finite(scored, f"at {cb.unit} {t}", ", so the pruning event cannot rank them", sharding=cb._sharding, trainer=trainer)


def check_first_batch(cb: Any, batch: Any) -> None:
    """At the fit's first training batch: a criterion that will calibrate on these batches at the end of
    training (``check_batch``, the "obs" criterion) says now, not after the whole fit, if it cannot read them."""
    if cb._batch_checked:
        return
    cb._batch_checked = True
    check = getattr(cb._criterion, "check_batch", None)
    if callable(check):
        check(batch)


def event_masks(cb: Any, trainer: pl.Trainer, t: int) -> tuple[dict[str, Tensor], float | None]:
    """The masks of ``cb``'s event at position ``t`` and the sparsity target they reach (None: a threshold).

    Checks the weights are finite first; a criterion with nothing observed yet ranks by magnitude (one
    warning). Sharded parameters get a distributed selection, a calibration criterion prunes and updates the
    weights; with a criterion that reads gradients, every rank takes rank 0's masks.
    """
    start, end, _ = cb._positions
    check_event_finite(cb, t, trainer)
    criterion = cb._criterion
    if not criterion.ready():
        rank_zero_warn(f"{OWNER}: criterion {criterion!r} has no {criterion.needs} yet, this event ranks by magnitude")
        criterion = Magnitude()
    target = None
    if cb.sparsity is not None:
        target = sparsity_at(cb.schedule, t, start, end, cb.sparsity, cb.initial_sparsity, cb.power)
    layer_sparsity = None if cb.layer_sparsity is None else {
        k: sparsity_at(cb.schedule, t, start, end, v, min(cb.initial_sparsity, v), cb.power)
        for k, v in cb.layer_sparsity.items()
    }
    layouts = event_layouts(cb, trainer.lightning_module)  # computed once per module
    check_outputs(cb, trainer.lightning_module)  # "channel": pruning the model's own outputs is said once
    if cb._sharding is not None:  # DTensor shards: a distributed selection, no gather (_prune_sharded)
        return sharded_event_masks(cb, cb._sharding, criterion, target, layer_sparsity, layouts), target
    new = calibrate(cb, trainer, criterion, target) if criterion.needs == "calibration" else compute_masks(
        {n: p.detach() for n, p in cb._params.items()},
        sparsity=target,
        threshold=cb.threshold,
        scope=cb.scope,
        pattern=cb.pattern,
        criterion=criterion,
        masks=cb.masks if cb._active else None,
        max_layer_sparsity=cb._ceiling,
        ranking=cb.ranking,
        layer_sparsity=layer_sparsity,
        layouts=layouts,
        channel_groups=event_groups(cb, trainer.lightning_module, layouts),
        followers=cb._followers,
    )
    keep_norm_slices(cb, trainer.lightning_module, new)
    cb._saturated_layers.update(warn_saturated(cb, new, layouts, cb._saturated_layers))
    if criterion.needs != "nothing" and trainer.world_size > 1:
        # scores from gradient history may differ between ranks: take rank 0's masks so every rank agrees
        new = {n: m.to(cb._params[n].device) for n, m in trainer.strategy.broadcast(new, src=0).items()}
    return new, target


def apply_event(cb: Any, trainer: pl.Trainer, t: int, target: float | None) -> None:
    """Apply ``cb``'s new masks (already in ``cb.masks``): weights (exact +0.0), optimizer state, criterion
    state, the hot-path cache; then the event line."""
    cb._active = True
    cb._last_event = t
    cb.current_target = target
    cb._build_cache()
    if cb._sharding is not None:
        cb._pruned_counts = pruned_counts(cb, cb._sharding)  # the hot path counted the local rows
        cb._hot.pruned = sum(cb._pruned_counts.values())
    cb._apply_weights()
    cb._hot.mask_optimizer_states(trainer.optimizers)  # the layers with pruned entries, by their int masks
    cb._criterion.masked(cb.masks)
    if cb.verbose or log.isEnabledFor(logging.INFO):
        cb._say(event_line(cb, t, target))


def calibrate(cb: Any, trainer: pl.Trainer, criterion: Any, target: float | None) -> dict[str, Tensor]:
    """Post-training (``__init__`` checked it): the criterion prunes and updates the weights in place on
    calibration batches of the TRAINING loader (never validation), and returns the masks.

    Raises:
        ValueError: under several processes.
    """
    if trainer.world_size > 1:
        raise ValueError(f"{OWNER}: criterion {criterion!r} runs on one process only; prune after `fit` with `reconstruct_prune`.")
    return criterion.calibrate(trainer.lightning_module, trainer.train_dataloader, cb._params, target, cb.pattern)


def event_line(cb: Any, t: int, target: float | None) -> str:
    """The line of one event: position, target (or threshold) and how many prunable weights are pruned."""
    pruned, total = pruned_counts_now(cb)
    goal = f"target {target:.4f}" if target is not None else f"threshold {cb.threshold:g}"
    return f"{OWNER}: {cb.unit} {t}: {goal}, {pruned}/{total} prunable weights pruned ({pruned / max(total, 1):.4f})"


def pruned_counts_now(cb: Any) -> tuple[int, int]:
    """``(pruned, total)`` prunable weights: the pruned ones counted when the masks were last cached."""
    return cb._hot.pruned, sum(m.numel() for m in cb.masks.values())


def end_of_training(cb: Any, trainer: pl.Trainer, t: int) -> bool:
    """At ``on_train_end``, position ``t``: whether the post-training event runs now. A post-training event
    (``schedule="oneshot"``, ``start=1.0``) runs at the run's real end even when the run ended before the length
    Lightning estimated (EarlyStopping, a Timer, an accumulation schedule, an SWA epoch added to ``max_epochs``).
    A ramp the run ended before is named in one warning: its target was not reached."""
    cb._positions = settle_at_end(cb._positions, t)
    start, end, _ = cb._positions
    if cb.schedule == "oneshot" and isinstance(cb.start, float) and cb.start >= 1.0 and t < end:
        cb._positions = (t, t, 1)  # "after training": whenever training ended
        end = t
    due = t >= end and (cb._last_event is None or cb._last_event < end)
    if not due and t < end and cb.sparsity is not None and cb._last_event is not None:
        why = "it was stopped early (trainer.should_stop: EarlyStopping, a Timer, max_time)" if trainer.should_stop else (
            "it took fewer steps than Lightning estimated at its start (an accumulation schedule, an epoch"
            " added by a callback)")
        pruned, total = pruned_counts_now(cb)
        reached = pruned / max(total, 1)
        rank_zero_warn(
            f"{OWNER}: training ended at {cb.unit} {t}, before the prune ramp's end at {cb.unit} {end}: {why}. The"
            f" prunable weights are {reached:.4f} sparse, not the target {cb.sparsity:g}. To reach it in such runs,"
            " end the ramp earlier (a smaller `end`, or an int within the run), or prune after training"
            " (schedule='oneshot', start=1.0)."
        )
    return due


def remask_after_averaging(cb: Any, trainer: pl.Trainer) -> None:
    """At ``on_fit_end``: a callback that replaced the weights after training (Lightning's
    ``StochasticWeightAveraging`` or ``WeightAveraging`` copy an average in at ``on_train_end``) may have put
    back pruned entries of a dense past; they are pruned again, with one warning naming the callbacks."""
    if not cb._active or cb._sharding is not None:
        return
    pruned = {n: cb._params[n].detach()[~m] for n, m in cb.masks.items() if n in cb._params}
    leaked = [n for n, values in pruned.items() if bool((values != 0).any())]
    if not leaked or not all(bool(torch.isfinite(pruned[n]).all()) for n in leaked):
        return  # (a NaN or inf is not an average: the run's finiteness check names it)
    if not cb._hot.built:
        cb._build_cache()
    cb._apply_weights()
    averaging = sorted({type(c).__name__ for c in trainer.callbacks if "Averag" in type(c).__name__}) or ["a callback"]
    rank_zero_warn(
        f"{OWNER}: after training, {', '.join(averaging)} put weights back into {len(leaked)} pruned tensor(s)"
        f" ({', '.join(leaked[:3])}{', ...' if len(leaked) > 3 else ''}): their average covers steps before the"
        " pruning ramp's end, when those weights were live. They are pruned again, so the model keeps its"
        " sparsity; the checkpoint written at the end of training and any validation on the averaged weights"
        " saw them dense. Start the averaging after the ramp's `end` (swa_epoch_start, or the averaging"
        " callback's own start) for an average of the pruned network."
    )


def warn_best_checkpoint(cb: Any, trainer: pl.Trainer) -> None:
    """At ``on_fit_end``: one warning when a monitoring ``ModelCheckpoint``'s best checkpoint was written before the
    prune ramp's end (read off its file name's ``step=``/``epoch=``): that model is denser than the target, and
    ``ckpt_path="best"`` or ``load_from_checkpoint(best_model_path)`` loads it."""
    import re

    from lightning.pytorch.callbacks import ModelCheckpoint

    end = cb._positions[1] if cb._positions is not None else None
    if end is None or cb.sparsity is None or cb._last_event is None:
        return
    key = "step" if cb.unit == "step" else "epoch"
    for ckpt in (c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor and c.best_model_path):
        found = re.search(rf"{key}=(\d+)", Path(ckpt.best_model_path).name)
        at = int(found.group(1)) + (1 if key == "epoch" else 0) if found else None  # an epoch's checkpoint: after it
        if at is not None and at < end:
            rank_zero_warn(
                f"{OWNER}: ModelCheckpoint(monitor={ckpt.monitor!r})'s best checkpoint ({ckpt.best_model_path}) was"
                f" written at {key} {at}, before the prune ramp reached its target at {cb.unit} {end}: that model is"
                f" denser than {cb.sparsity:g}, and ckpt_path='best' or load_from_checkpoint loads it. Monitor from the"
                " ramp's end on (a ModelCheckpoint with monitor=None, or end the ramp earlier), or use the last"
                " checkpoint."
            )


def after_fit(cb: Any, trainer: pl.Trainer) -> None:
    """At ``on_fit_end``, after every callback's ``on_train_end``: :func:`remask_after_averaging`, then
    :func:`warn_best_checkpoint`."""
    remask_after_averaging(cb, trainer)
    warn_best_checkpoint(cb, trainer)
