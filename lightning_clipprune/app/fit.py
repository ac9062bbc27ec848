"""Fit, then evaluate: validation after post-training pruning, the test split once at the end.

Ctrl-C (SIGINT) and SIGTERM (what cluster schedulers send) do not end the process from inside Lightning:
the run stops at the end of the current batch and :func:`fit_and_evaluate` returns an
:class:`Outcome` marked ``"interrupted"``, so the caller can still write ``results.json`` and say how to
resume. A full disk or quota while training (a checkpoint, the metrics file) is one line naming the folder
(:class:`~lightning_clipprune._io.StorageFullError`); the checkpoints, written atomically
(:class:`~lightning_clipprune.checkpoint_io.AtomicCheckpointIO`), keep the last good one.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_clipprune._io import StorageFullError
from lightning_clipprune.app.build import Components

__all__ = ["Outcome", "fit_and_evaluate", "scalar"]


@dataclass
class Outcome:
    """What training and evaluation gave.

    Attributes:
        status: ``"completed"`` or ``"interrupted"``.
        val_acc: validation accuracy at the end (after post-training pruning when there was one).
        val_acc_before_prune: validation accuracy before post-training pruning, else None.
        test_acc: test accuracy, once at the end, when the data has a test split and ``test`` is on.
        signal: ``"SIGINT"`` or ``"SIGTERM"`` for an interrupted run.
    """

    status: str = "completed"
    val_acc: float | None = None
    val_acc_before_prune: float | None = None
    test_acc: float | None = None
    signal: str | None = None


def scalar(value: Any) -> float | None:
    """A metric (tensor or number) as a float; None stays None."""
    if value is None:
        return None
    return float(value.item()) if hasattr(value, "item") else float(value)


def _interrupt_signal(err: BaseException, trainer: Any) -> str | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(err, SIGTERMException):  # also a Ctrl-C during training, stopped at the end of its batch
        from lightning_clipprune.app.interrupts import stop_requested

        return "SIGINT" if stop_requested() == "SIGINT" else "SIGTERM"
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT"
    # Lightning turns Ctrl-C into sys.exit(1) after its own graceful shutdown, with the Trainer marked
    if isinstance(err, SystemExit) and getattr(trainer, "interrupted", False):
        return "SIGINT"
    return None


_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def _disk_full(err: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` error behind ``err`` (itself or what it wraps), else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def _on_full_disk(step: Callable[[], Any], trainer: Any) -> Any:
    """Run ``step``; a full disk or quota anywhere in it becomes one :class:`StorageFullError` line."""
    try:
        return step()
    except StorageFullError:
        raise
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        if full.filename:
            raise StorageFullError(full.filename, full.errno) from None
        raise StorageFullError(trainer.default_root_dir, full.errno, folder_only=True) from None


def fit_and_evaluate(parts: Components, *, ckpt_path: str | Path | None = None, test: bool = True) -> Outcome:
    """``trainer.fit``, validation again after post-training pruning, ``trainer.test`` once.

    Args:
        parts: what :func:`~lightning_clipprune.app.build.build` made.
        ckpt_path: a checkpoint to resume from.
        test: evaluate the test split at the end (when the data module has one).

    Returns:
        The :class:`Outcome`; an interrupted fit returns at once with ``status="interrupted"``.

    Raises:
        StorageFullError: (an ``OSError``) the disk or quota filled up while training or evaluating; one line
            naming the folder (the last checkpoint written before is intact).
    """
    import signal as signals

    from lightning_clipprune.checkpoint import safe_checkpoint_globals

    trainer, model, datamodule = parts.trainer, parts.model, parts.datamodule
    try:
        with safe_checkpoint_globals():  # the checkpoint is read with weights_only=True: no code runs from it
            _on_full_disk(lambda: trainer.fit(
                model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
            ), trainer)
    except (KeyboardInterrupt, SystemExit) as err:
        which = _interrupt_signal(err, trainer)
        if which is None:
            raise
        # Lightning set SIGINT to "ignore" during its shutdown; a later Ctrl-C should work again
        signals.signal(signals.SIGINT, signals.default_int_handler)
        return Outcome(status="interrupted", val_acc=scalar(trainer.callback_metrics.get("val/acc")), signal=which)
    out = Outcome(val_acc=scalar(trainer.callback_metrics.get("val/acc")))
    before = getattr(parts.prune, "metrics_before_pruning", None)
    if before is not None:  # post-training pruning happened in on_train_end: measure after it
        out.val_acc_before_prune = before.get("val/acc")
        _on_full_disk(lambda: trainer.validate(model, datamodule=datamodule, verbose=False), trainer)
        out.val_acc = scalar(trainer.callback_metrics.get("val/acc"))
    if test and datamodule.has_test:
        metrics = _on_full_disk(lambda: trainer.test(model, datamodule=datamodule, verbose=False), trainer)
        out.test_acc = scalar(metrics[0].get("test/acc")) if metrics else None
    return out
