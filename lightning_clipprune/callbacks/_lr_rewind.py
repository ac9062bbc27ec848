"""``MagnitudePruneCallback(lr_rewind=...)``: learning-rate rewinding once the pruning ramp is done.

After the ramp's last event the sparse network fine-tunes for the rest of the run. With a schedule that
decays over the whole run (the app's cosine), that fine-tuning starts at a rate already part-way down.
Learning-rate rewinding (Renda et al., ICLR 2020) restarts it: from the first step at or after ``end`` the
rate of every parameter group is ``factor`` times the group's base rate, decaying on a cosine to 0 at the
last step. Measured in ``benchmarks/bench_regrow.md`` (seventh round): at 98 % on Fashion-MNIST LeNet-300-100
it moves the pruned network closer to dense, while the same restart does not help the dense network.

The rate is set before every step from there on (``on_train_batch_start``) and again after the scheduler's step
(``on_train_batch_end``), so whatever the module's scheduler computed is overridden (a scheduler stepping from
the current rate, such as ``ReduceLROnPlateau``, sees the rewound one). A pure function of the step, the
recorded base rates and the first rewound step: a resumed run sets the same rates.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clipprune._validation import check_real
from lightning_clipprune.callbacks._prune_plan import OWNER, run_length, step_clock

__all__ = ["LrRewind", "make_rewind", "rewound_lr"]


def rewound_lr(base: float, factor: float, step: int, first: int, total: int) -> float:
    """The rewound rate at ``step``: ``factor * base`` at ``first``, a cosine down to 0 at ``total``.

    Example::

        >>> [round(rewound_lr(0.1, 1.0, step, 50, 100), 6) for step in (50, 75, 100)]
        [0.1, 0.05, 0.0]
    """
    progress = min(1.0, max(0.0, (step - first) / max(1, total - first)))
    return factor * base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_rewind(lr_rewind: Any) -> tuple[float | None, LrRewind | None]:
    """``MagnitudePruneCallback(lr_rewind=...)`` checked, and its state (None when off).

    Raises:
        ValueError: not a finite number > 0 (nor None).

    Example::

        >>> make_rewind(None)
        (None, None)
    """
    value = check_real(OWNER, "lr_rewind", lr_rewind, low=0, low_open=True, allow_none=True)
    return value, None if value is None else LrRewind(value)


class LrRewind:
    """The state of ``lr_rewind``: the base rates of the optimizers' groups and the first rewound step.

    Args:
        factor: the restarted rate as a fraction of each group's base rate (its ``initial_lr``, which torch's
            schedulers record, else its rate when training starts).
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.base: list[list[float]] | None = None  # per optimizer, per parameter group
        self.first: int | None = None  # the first global step with the rewound rate
        self._total: int | None = None
        self._restored = False  # a checkpoint's state was loaded for the coming fit

    def on_train_start(self, cb: Any, trainer: pl.Trainer) -> None:
        """Record the base rates (a resumed fit keeps the checkpoint's) and check the run can be rewound.

        Raises:
            ValueError: the training length is unknown (the cosine needs its last step).
        """
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                f"{OWNER}: `lr_rewind` needs a known training length to decay to its last step: give the Trainer"
                " `max_epochs` or `max_steps`, or set lr_rewind=None."
            )
        self._total = int(total)
        if not self._restored:  # a new fit (also a second one with this callback): its own base rates
            self.base = [[float(g.get("initial_lr", g["lr"])) for g in opt.param_groups] for opt in trainer.optimizers]
            self.first = None
        self._restored = False
        _, end, _ = cb._positions
        last = self._total if cb.unit == "step" else run_length("epoch", trainer)
        if last is not None and end >= last and self.first is None:
            rank_zero_warn(
                f"{OWNER}: `lr_rewind` has no effect: the pruning ramp ends at {cb.unit} {end}, at or after the"
                f" last {cb.unit} ({last:g}), so no {cb.unit} trains after it."
            )
        if any(type(c).__name__ == "StochasticWeightAveraging" for c in trainer.callbacks):
            # SWA sets its own learning rates with a scheduler of its own: the rewind overrides them
            rank_zero_warn(
                f"{OWNER}: `lr_rewind` sets the learning rate at every step after the ramp, so"
                " StochasticWeightAveraging's `swa_lrs` and its annealing never take effect (its epochs follow the"
                " rewind's cosine): drop one of the two (lr_rewind=None, or remove the averaging callback)."
            )

    def apply(self, cb: Any, trainer: pl.Trainer, t: int) -> None:
        """Set every group's rate for the step about to run (position ``t``), once ``t`` reached the ramp's ``end``.

        Called before each step (``on_train_batch_start``) and again after the scheduler's step
        (``on_train_batch_end``), so the step uses the rewound rate and so does whatever reads it in between
        (a ``LearningRateMonitor``, a checkpoint of the optimizer), whatever the callback order.
        """
        _, end, _ = cb._positions
        if t < end or self.base is None or self._total is None:
            return
        now = step_clock(trainer)
        if self.first is None:
            self.first = now
        for optimizer, bases in zip(trainer.optimizers, self.base, strict=False):
            for group, base in zip(optimizer.param_groups, bases, strict=False):
                group["lr"] = rewound_lr(base, self.factor, now, self.first, self._total)

    def state_dict(self) -> dict[str, Any]:
        """The base rates and the first rewound step (plain numbers): all a resumed run needs."""
        return {"base": self.base, "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s numbers; an empty state (a checkpoint without ``lr_rewind``) records afresh."""
        base = state.get("base")
        self.base = [[float(x) for x in bases] for bases in base] if base is not None else None
        self.first = None if state.get("first") is None else int(state["first"])
        self._restored = base is not None
