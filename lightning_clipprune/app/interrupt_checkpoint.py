"""A checkpoint written at the interrupt: Ctrl-C or SIGTERM during training resumes where it stopped.

Without it the last checkpoint is the one of the last epoch end: an interrupt in the first epoch left
nothing to resume, and a later one redid up to an epoch of steps. :class:`InterruptCheckpoint` does
what Lightning's ``OnExceptionCheckpoint`` does, limited to interrupts (an error, such as weights that
turned NaN, must not overwrite the last good checkpoint) and writing where the run's ``ModelCheckpoint``
writes (``checkpoints/last.ckpt``), so the printed resume command names it. It is not a subclass: with
an ``OnExceptionCheckpoint`` in the Trainer, Lightning turns ``fit(ckpt_path=None)`` into
``ckpt_path="last"`` (a resume nobody asked for) and deletes the file at teardown. On the resume it tells the
app's loader (:class:`~lightning_clipprune.app.data.tensors.TensorBatches`) to skip the batches the epoch had
trained on, so the resumed run is the uninterrupted one to the bit.
"""

from __future__ import annotations

import os
import warnings

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
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed from a checkpoint written mid-epoch: Lightning counts on from the saved batch but restarts the
        # loader's epoch at its first batch, so the run would train on other batches than the uninterrupted one.
        # The app's loader skips the batches this epoch already trained on (its order is a function of the epoch).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        loader = trainer.train_dataloader
        if getattr(trainer.fit_loop, "restarted_mid_epoch", False) and done > 0 and hasattr(loader, "skip_batches"):
            loader.skip_batches(done)
            # Lightning's warning that a mid-epoch resume of this loader is unreliable no longer holds
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt) or is_sigterm(exception)
        # After the last step the run finishes first (app/interrupts.py); outside fit there is nothing to resume.
        if not interrupted or training_over() or not trainer.training or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.ckpt_path)
