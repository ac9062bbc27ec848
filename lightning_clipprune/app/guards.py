"""Run-time guards of the app, as callbacks: a SIGTERM after the last training step, non-finite weights.

- :class:`SigtermRelay`: during training a first Ctrl-C stops the run at the end of the batch, every process
  at the same one; once the last training step is taken, a SIGTERM no longer stops Lightning's loops: the
  run finishes, then exits with 143 (:mod:`lightning_clipprune.app.interrupts` says why).
- :class:`FiniteWeights`: the weights are checked at every validation and epoch end, before that epoch's
  checkpoint is written; NaN or inf ends the run with one line naming the parameter
  (:func:`first_nonfinite_parameter` is the check itself).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_clipprune.app.interrupts import (
    defer_signals,
    sigterm_installed,
    stop_at_batch_end,
    stop_requested,
)

__all__ = ["FiniteWeights", "NonFiniteWeightsError", "SigtermRelay", "first_nonfinite_parameter", "nonfinite_message"]


class SigtermRelay(L.Callback):
    """A first Ctrl-C or a SIGTERM during training stops the run at the end of the batch, on every process at the
    same one; once the last training step is taken, a SIGTERM no longer stops the run (the module docstring).

    Only active in a process where :func:`~lightning_clipprune.app.interrupts.install_sigterm_handler` ran
    (the app's entry point); elsewhere (library use, in-process tests) it does nothing.
    """

    def __init__(self) -> None:
        self.active = sigterm_installed()
        self.deferring = False

    def _last_step_taken(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if trainer.max_steps not in (-1, None) and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (-1, None) and trainer.current_epoch + 1 >= trainer.max_epochs
        return bool(last_epoch and batch_idx + 1 >= trainer.num_training_batches) or trainer.should_stop

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            stop_at_batch_end()  # a Ctrl-C from here on stops at the end of a batch (on_train_batch_end)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        if self._last_step_taken(trainer, batch_idx):
            self.deferring = True
            defer_signals(trainer)
        elif _agreed_stop(trainer) and not _mid_accumulation(trainer):
            # Lightning's own end-of-batch stop (its SIGTERM path: the batch counted, then SIGTERMException), on
            # every process at the same batch; the app reports the signal it was (a Ctrl-C: exit 130). Never
            # inside an accumulation window: its gradient is in no checkpoint, so the resumed step would miss it.
            trainer._signal_connector.received_sigterm = True

    def _keep_deferring(self, trainer: L.Trainer) -> None:
        # each Trainer stage installs Lightning's handler again: take the signal back from it
        if self.active and self.deferring:
            defer_signals(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self.deferring = True
            defer_signals(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_deferring(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._keep_deferring(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_deferring(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._keep_deferring(trainer)


def _mid_accumulation(trainer: L.Trainer) -> bool:
    """Whether this batch's gradient waits for the next ones (``accumulate_grad_batches``: no optimizer step yet)."""
    if trainer.accumulate_grad_batches <= 1:
        return False
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return bool(should_accumulate()) if callable(should_accumulate) else False


def _agreed_stop(trainer: L.Trainer) -> bool:
    """Whether a Ctrl-C asked to stop, on any process: one all-reduce of a flag per batch under several
    processes, so all stop at the same batch (each stopping on its own left one waiting in a collective)."""
    stop = stop_requested() is not None
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if stop else 0.0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN or inf: the run ends (exit status 1) and ``results.json`` is not written."""


def first_nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None when all are finite (one host sync).

    Example::

        >>> layer = torch.nn.Linear(2, 2)
        >>> first_nonfinite_parameter(layer) is None
        True
        >>> with torch.no_grad():
        ...     layer.bias[0] = float("nan")
        >>> first_nonfinite_parameter(layer)
        'bias'
    """
    named = [(n, p) for n, p in module.named_parameters() if p.numel() and not isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def nonfinite_message(name: str, where: str) -> str:
    """The one line that ends a run whose weights are not finite."""
    return (
        f"the weights are not finite {where}: {name} holds NaN or inf (training diverged); lower "
        "model.optimizer.lr, or clip the gradients (clip=norm skips non-finite steps); results.json is not written"
    )


class FiniteWeights(L.Callback):
    """Stop the run with :class:`NonFiniteWeightsError` when a weight is NaN or inf, whatever the other callbacks.

    Checked at the end of each validation and each training epoch, before Lightning's ``ModelCheckpoint``
    (always last in the callback list) writes that epoch's checkpoint: ``last.ckpt`` stays finite.
    """

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = first_nonfinite_parameter(pl_module)
        if name is not None:
            where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
            raise NonFiniteWeightsError(nonfinite_message(name, where))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)
