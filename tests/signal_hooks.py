"""Test-only callbacks that send the run a signal, or poison its weights, at a chosen moment (tests/test_trust_app.py).

Added to an app run on the command line, for example::

    python -m lightning_clipprune.run +callbacks.kill._target_=tests.signal_hooks.SignalAt \\
        +callbacks.kill.hook=on_train_epoch_end +callbacks.kill.epoch=1

The signal goes to the process itself, so it arrives at that exact point of the run (no sleeps, no races).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L

_HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_epoch_end", "on_validation_end", "on_train_end", "on_test_start", "teardown")


class SignalAt(L.Callback):
    """Send ``signum`` to this process at ``hook`` (at the epoch ``epoch`` and the step ``step`` when given).

    Args:
        hook: one of the Lightning hooks in ``_HOOKS``.
        epoch: the ``trainer.current_epoch`` at which to send it (None: any).
        step: the ``trainer.global_step`` at which to send it (None: any).
        signum: the signal, by name ("SIGTERM", "SIGINT").
        batch: the ``batch_idx`` of ``on_train_batch_end`` at which to send it (None: any).
        once: a file path: the signal is sent only while no such file exists, and the file is created (one
            signal across the jobs of a sweep and the runs after it).
    """

    def __init__(
        self,
        hook: str,
        epoch: int | None = None,
        step: int | None = None,
        signum: str = "SIGTERM",
        once: str | None = None,
        batch: int | None = None,
    ) -> None:
        if hook not in _HOOKS:
            raise ValueError(f"SignalAt: hook must be one of {_HOOKS}, got {hook!r}")
        self.hook, self.epoch, self.step, self.signum = hook, epoch, step, getattr(signal, signum)
        self.once = once  # a file: sent only while it does not exist (created when sent), across processes
        self.batch = batch
        self.sent = False

    def _maybe_send(self, hook: str, trainer: L.Trainer, batch_idx: int | None = None) -> None:
        if hook != self.hook or self.sent or (self.epoch is not None and trainer.current_epoch != self.epoch):
            return
        if self.batch is not None and batch_idx != self.batch:
            return
        if self.step is not None and trainer.global_step != self.step:
            return
        if self.once is not None:
            if os.path.exists(self.once):
                return
            open(self.once, "w").close()
        self.sent = True
        os.kill(os.getpid(), self.signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._maybe_send("setup", trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_send("on_train_start", trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_send("on_train_batch_end", trainer, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_send("on_train_epoch_end", trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_send("on_validation_end", trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_send("on_train_end", trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_send("on_test_start", trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._maybe_send("teardown", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {}


class PoisonAt(L.Callback):
    """Write a NaN into the model's first parameter at ``hook`` (a run whose weights turn non-finite there).

    Args:
        hook: ``"on_train_epoch_end"`` or ``"on_train_end"`` (after the last epoch-end check).
    """

    def __init__(self, hook: str = "on_train_end") -> None:
        if hook not in ("on_train_epoch_end", "on_train_end"):
            raise ValueError(f"PoisonAt: hook must be on_train_epoch_end or on_train_end, got {hook!r}")
        self.hook = hook

    def _poison(self, pl_module: L.LightningModule) -> None:
        import torch

        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] = float("nan")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook == "on_train_epoch_end":
            self._poison(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook == "on_train_end":
            self._poison(pl_module)
