"""A checkpoint written at the interrupt: Ctrl-C or SIGTERM during training resumes where it stopped.

Without it the last checkpoint is the one of the last epoch end: an interrupt in the first epoch left
nothing to resume, and a later one redid up to an epoch of steps. :class:`InterruptCheckpoint` does
what Lightning's ``OnExceptionCheckpoint`` does, limited to interrupts (an error, such as weights that
turned NaN, must not overwrite the last good checkpoint) and writing where the run's ``ModelCheckpoint``
writes (``checkpoints/last.ckpt``), so the printed resume command names it. It is not a subclass: with
an ``OnExceptionCheckpoint`` in the Trainer, Lightning turns ``fit(ckpt_path=None)`` into
``ckpt_path="last"`` (a resume nobody asked for) and deletes the file at teardown.
"""

from __future__ import annotations

import os

import lightning as L
from typing_extensions import override

from lightning_clipprune.app.interrupts import is_sigterm, training_over

__all__ = ["InterruptCheckpoint"]


class InterruptCheckpoint(L.Callback):
    """Save ``dirpath/filename.ckpt`` when Ctrl-C or SIGTERM stops ``fit`` before its last training step.

    Args:
        dirpath: the folder of the run's checkpoints (its ``ModelCheckpoint``'s ``dirpath``).
        filename: the file name without ``.ckpt`` (its ``ModelCheckpoint``'s ``filename``, "last").

    Example::

        >>> cb = InterruptCheckpoint("outputs/run/checkpoints")
        >>> cb.ckpt_path.endswith("last.ckpt")
        True
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.dirpath = dirpath
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is written."""
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt) or is_sigterm(exception)
        # After the last step the run finishes first (app/interrupts.py); outside fit there is nothing to resume.
        if not interrupted or training_over() or not trainer.training or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.ckpt_path)
