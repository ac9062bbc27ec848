"""``MagnitudePruneCallback(regrow=...)``: the hook side of dynamic sparse training (RigL, SET).

The math is :mod:`lightning_clipprune.pruning.regrow`; this module decides when, takes the gradients and
applies the result. Per optimizer step the callback pays one ``is None`` test when regrowth is off, and
one attribute test plus one no-op hook call when it is on, except at a regrowth step:

1. ``on_train_batch_start`` arms the step when the step about to run is a regrowth event;
2. ``mask_gradients`` (the ``GradientMasker`` contract, called before any clip reads the gradients)
   copies the dense gradients of the layers with pruned entries before masking them, so the clip norm
   still sees the live weights only (DESIGN rule 4 holds at regrowth steps too);
3. after ``optimizer.step`` (a step post-hook, registered after the masking one) the clipped live
   gradient is in ``.grad``: the clip's per-row effect is applied to the copy's pruned positions
   (:func:`~lightning_clipprune.pruning.regrow.clipped_pruned_scores`), each layer drops and regrows as
   many weights, and dropped and regrown weights and their optimizer state are set to zero.

The event completes inside the step, so a checkpoint never falls between its two halves: the masks saved
by the callback are all the state there is, besides two counters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_clipprune._choices import check_regrow_fields
from lightning_clipprune._validation import bad_value, check_choice
from lightning_clipprune.callbacks._prune_masking import MaskHotPath
from lightning_clipprune.callbacks._prune_plan import (
    OWNER,
    event_layouts,
    keep_norm_slices,
    run_length,
    step_clock,
    steps_per_epoch,
)
from lightning_clipprune.pruning import STANDARD_LAYOUT, apply_masks_, mask_optimizer_state_
from lightning_clipprune.pruning.regrow import (
    REGROW_METHODS,
    clipped_pruned_scores,
    cosine_fraction,
    random_scores,
    regrow_due,
    regrow_masks,
)
from lightning_clipprune.schedules import resolve_position

#: The metric logged at each regrowth event: how many weights were regrown (as many were dropped).
REGROWN_METRIC = "prune/regrown"


@dataclasses.dataclass(frozen=True)
class RegrowConfig:
    """When and how ``MagnitudePruneCallback`` drops and regrows weights (``regrow=RegrowConfig(...)``).

    Args:
        method: "rigl" (regrow where the clipped gradient is largest, Evci et al. 2020) or "set" (at
            random, Mocanu et al. 2018).
        fraction: the drop fraction of each layer's live weights at ``start``, decaying on a cosine to 0 at
            ``end`` (RigL's alpha, 0.3 there), in (0, 1].
        interval: optimizer steps between two regrowth events (RigL's delta T, 100 there).
        start: where regrowth starts (first event ``interval`` steps later). None (default): the pruning
            schedule's ``end``, once the target is reached. An ``int`` is an optimizer step, a ``float`` in
            [0, 1] a fraction of the whole training.
        end: where it ends (no event at or after it), as ``start``; default 0.75 as in RigL.
        seed: the seed of SET's draws (each event draws from ``seed`` and its step, the same on every rank).

    Raises:
        ValueError: for a bad value.

    Example::

        >>> RegrowConfig(method="set", fraction=0.1).interval
        100
    """

    method: str = "rigl"
    fraction: float = 0.3
    interval: int = 100
    start: int | float | None = None
    end: int | float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        check_regrow_fields(vars(self))  # torch-free: the app checks a `prune.regrow` mapping with it, early


def make_regrow(value: Any, cb: Any, kind: str) -> Regrowth | None:
    """The ``regrow`` argument of ``cb`` as a :class:`Regrowth` (None: off), checked against the callback's other arguments.

    Accepts None/False, "rigl"/"set", a mapping of :class:`RegrowConfig` fields (what Hydra gives) or a
    :class:`RegrowConfig`.

    Raises:
        ValueError: for a bad value, or with a threshold, a structured pattern or a calibration criterion.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str):
        config = RegrowConfig(method=check_choice(OWNER, "regrow", value, REGROW_METHODS))
    elif isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(RegrowConfig)}
        unknown = sorted(set(map(str, value)) - fields)
        if unknown:
            raise bad_value(OWNER, "regrow", f"a mapping of {sorted(fields)}", dict(value))
        config = RegrowConfig(**dict(value))
    elif isinstance(value, RegrowConfig):
        config = value
    else:
        raise bad_value(OWNER, "regrow", f"None, one of {REGROW_METHODS}, a RegrowConfig or a mapping of its fields", value)
    if cb.threshold is not None or kind != "unstructured" or cb._criterion.needs == "calibration":
        raise ValueError(
            f"`{OWNER}(regrow={config.method!r})` keeps each layer's sparsity by dropping and regrowing single"
            f" weights: it needs a `sparsity` target, pattern='unstructured' and a criterion applied during"
            f" training; got threshold={cb.threshold!r}, pattern={cb.pattern!r}, criterion={cb.criterion!r}."
        )
    return Regrowth(config)


class Regrowth:
    """The regrowth state of one ``MagnitudePruneCallback``: the window, the armed step, the counters.

    Attributes:
        config: the :class:`RegrowConfig`.
        events: regrowth events so far (with at least one weight regrown or not).
        regrown_total: weights regrown so far (as many were dropped).
        last_regrown: weights regrown at the last event.
    """

    def __init__(self, config: RegrowConfig) -> None:
        self.config = config
        self.events = 0
        self.regrown_total = 0
        self.last_regrown = 0
        self._window: tuple[int, int] | None = None  # resolved (start, end) in optimizer steps, per fit
        self._raw: dict[str, Tensor] | None = None  # dense gradients of the armed step
        self.armed = False

    # ------------------------------------------------------------------ called from the callback's hooks

    def on_fit_start(self, cb: Any, trainer: pl.Trainer) -> None:
        """Register the event's step post-hook on every optimizer (after the masking one: removed with it)."""
        self._window, self._raw, self.armed = None, None, False
        ids = {id(p) for p in cb._params.values()}
        for optimizer in trainer.optimizers:
            if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                cb._handles.append(optimizer.register_step_post_hook(self._hook(cb, trainer)))

    def on_train_batch_start(self, cb: Any, trainer: pl.Trainer) -> None:
        """Arm the step about to run when it is a regrowth event (the masks exist and the window is open)."""
        if self._window is None:
            self._window = self._resolve(cb, trainer)
        self._raw = None
        self.armed = cb._active and regrow_due(step_clock(trainer), *self._window, self.config.interval)

    def before_mask(self, hot: MaskHotPath) -> None:
        """At an armed step, copy the dense gradients of the layers with pruned entries before they are masked."""
        if self.armed and not hot.grads_masked and hot.live:
            self._raw = {n: hot.params[n].grad.detach().clone() for n in hot.factor_of if hot.params[n].grad is not None}
            self.armed = False  # once per step: a second optimizer stepped in the same batch masks by the new masks

    def state_dict(self) -> dict[str, int]:
        return {"events": self.events, "regrown_total": self.regrown_total, "last_regrown": self.last_regrown}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.events = int(state.get("events", 0))
        self.regrown_total = int(state.get("regrown_total", 0))
        self.last_regrown = int(state.get("last_regrown", 0))

    # ------------------------------------------------------------------ internals

    def _resolve(self, cb: Any, trainer: pl.Trainer) -> tuple[int, int]:
        total = run_length("step", trainer)
        prune_end = cb._positions[1] if cb.unit == "step" else None
        if self.config.start is not None:
            start = resolve_position(self.config.start, total, "regrow start")
        elif prune_end is not None:
            start = prune_end
        else:  # an epoch schedule: its end in steps
            per_epoch = steps_per_epoch(trainer)
            if per_epoch is None:
                raise ValueError(
                    f"`{OWNER}(unit='epoch', regrow=...)`: the training dataloader has no length, so the end of the"
                    " pruning schedule cannot be placed in steps: give the regrowth a `start` (a step, or a fraction"
                    " of a run of known length)."
                )
            start = cb._positions[1] * per_epoch
        end = resolve_position(self.config.end, total, "regrow end")
        if end - start <= self.config.interval:
            rank_zero_warn(
                f"{OWNER}(regrow={self.config.method!r}): no regrowth event fits between step {start} and step"
                f" {end} every {self.config.interval} steps: lower `interval` or move `start`/`end`."
            )
        return start, end

    def _hook(self, cb: Any, trainer: pl.Trainer) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._raw is not None:
                raw, self._raw = self._raw, None
                self._event(cb, trainer, raw)

        return hook

    def _event(self, cb: Any, trainer: pl.Trainer, raw: dict[str, Tensor]) -> None:
        """Drop and regrow in every layer of ``raw``; zero the weights and optimizer state that changed."""
        t, config = step_clock(trainer), self.config
        fraction = cosine_fraction(t, *self._window, config.fraction)
        masks = {n: cb.masks[n] for n in raw}
        layouts = event_layouts(cb, trainer.lightning_module)  # output channels of ConvTranspose / HF Conv1D
        if config.method == "rigl":
            scores = {
                n: clipped_pruned_scores(g, cb._params[n].grad, masks[n], layouts.get(n, STANDARD_LAYOUT))
                for n, g in raw.items()
            }
        else:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + t)
            scores = {n: random_scores(masks[n], generator) for n in raw}
        new, grown = regrow_masks({n: cb._params[n].detach() for n in raw}, masks, scores, fraction, layouts)
        if trainer.world_size > 1:  # float sums of gradients may differ in the last bit between ranks
            new, grown = trainer.strategy.broadcast((new, grown), src=0)
        new = {n: m.to(masks[n].device) for n, m in new.items()}
        keep_norm_slices(cb, trainer.lightning_module, new, grown)  # a weight-normed layer keeps a weight in every slice
        clean = [new[n] & ~grown[n].to(masks[n].device) for n in raw]  # dropped and regrown entries start at zero
        params = [cb._params[n] for n in raw]
        apply_masks_(params, clean)
        for opt in trainer.optimizers:
            mask_optimizer_state_(opt, params, clean)
        cb.masks.update(new)
        cb._build_cache()
        cb._criterion.masked(cb.masks)
        self.events += 1
        self.last_regrown = sum(int(g.sum()) for g in grown.values())
        self.regrown_total += self.last_regrown
        for logger in trainer.loggers:
            logger.log_metrics({REGROWN_METRIC: float(self.last_regrown)}, step=t)
        cb._say(f"{OWNER}: step {t}: {config.method} dropped and regrew {self.last_regrown} weights (fraction {fraction:.4f})")
