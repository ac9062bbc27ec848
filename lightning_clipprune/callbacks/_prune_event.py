"""Parts of a ``MagnitudePruneCallback`` pruning event: the finiteness check, calibration, the event line.

Moved out of :mod:`~lightning_clipprune.callbacks.magnitude_prune` to keep that module short; each takes
the callback (``cb``) and reads its attributes, never another callback's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_clipprune.callbacks._prune_plan import OWNER, check_finite, state_tensors

if TYPE_CHECKING:
    import lightning.pytorch as pl


def check_event_finite(cb: Any, t: int) -> None:
    """Raise before an event at position ``t`` when a pruned weight (or the criterion's state) holds NaN or inf.

    Raises:
        FloatingPointError: naming the tensors (see ``check_finite``).
    """
    # A NaN ranks nowhere (every comparison is False): the event would prune everything and keep the NaNs.
    scored = {n: p.detach() for n, p in cb._params.items()}
    if cb._criterion.ready():
        scored.update({f"{n} (criterion state)": v for n, v in state_tensors(cb._criterion.state_dict())})
    check_finite(scored, f"at {cb.unit} {t}", ", so the pruning event cannot rank them", sharding=cb._sharding)


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
    pruned = cb._hot.pruned  # counted when the masks were cached, a moment before
    total = sum(m.numel() for m in cb.masks.values())
    goal = f"target {target:.4f}" if target is not None else f"threshold {cb.threshold:g}"
    return f"{OWNER}: {cb.unit} {t}: {goal}, {pruned}/{total} prunable weights pruned ({pruned / max(total, 1):.4f})"
