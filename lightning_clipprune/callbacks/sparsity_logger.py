"""SparsityLogger: log how sparse the model is, and print a per-layer table at the end of ``fit``.

The counting lives in :mod:`lightning_clipprune.sparsity`; this file decides when and where to log.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_clipprune._choices import check_sparsity_logger_fields
from lightning_clipprune._sharded import any_sharded
from lightning_clipprune.callbacks._strategy import check_model_sharded, check_strategy
from lightning_clipprune.callbacks.contract import PruneState, find_callbacks
from lightning_clipprune.sparsity import (
    SparsityReport,
    named_weights,
    prunable_names,
    sparsity_metrics,
    sparsity_report,
    split_parameters,
)

#: The end-of-fit latency line: 3 interleaved rounds of samples of at least 0.5 ms. With samples of 2 ms it
#: cost LeNet-300-100 at batch 128 about 115 ms inside a fit (a sixth of a 100-step fit), now 55-60 ms.
_LATENCY_ROUNDS, _LATENCY_SAMPLE_S = 3, 5e-4
#: ``inference_latency="auto"`` measures after fits of at least this many seconds, where the line costs under
#: 1 % of the fit for small models (a short fit pays 55-60 ms for LeNet-300-100, 7 % of a 100-step fit).
AUTO_LATENCY_MIN_FIT_S = 10.0


class SparsityLogger(Callback):
    r"""Log the sparsity, parameter counts and compressed size of the model through the Trainer's loggers.

    Logged every ``log_every_n_steps`` optimizer steps and at the end of each training epoch, with the
    step the Trainer uses for its own metrics (at an epoch's end, the epoch's last step, as Lightning's epoch
    metrics):

    - ``sparsity/global``: the fraction of zeros over the prunable weights: those of the first callback
      in the Trainer that implements :class:`~lightning_clipprune.callbacks.contract.PruneState` (a
      ``MagnitudePruneCallback``) when there is one, otherwise the weights of every
      ``Linear`` and ``Conv`` layer (see :func:`~lightning_clipprune.pruning.select_prunable_parameters`);
      a model pruned some other way, or a dense one, is reported as it is.
    - ``sparsity/target``: the prune callback's current target (absent without one, or in threshold mode).
    - ``sparsity/<parameter name>``: per prunable weight, when ``per_layer``.
    - ``params/total``, ``params/nonzero``: all parameters of the model.
    - ``size/dense_bytes``, ``size/compressed_bytes``: all parameters, dense and as
      :func:`lightning_clipprune.export.save_sparse` writes them (bitmask of kept positions plus kept values).

    Each tensor is counted once (tied weights, a module used twice). The counts are computed on the
    device and reach the host once per logging step; nothing is computed on the other steps, on ranks
    other than zero, or when the Trainer has no logger. At the end of ``fit``, rank zero prints one table
    (rich): per layer shape, parameters, non-zeros and sparsity, totals, dense and compressed size; and,
    with ``inference_latency``, one line of measured CPU inference latency at ``latency_batch_size``: the
    model as it is (dense compute) against :func:`~lightning_clipprune.to_inference`'s model (CSR layers where
    they are faster, zero channels removed), also kept in :attr:`inference_latency`. It runs three short
    interleaved rounds on the first training batch's first input, repeated to the batch size (about 60 ms for
    LeNet-300-100 at batch 128), by default only after fits of 10 s or more; a model on a GPU is not measured.

    Sharded models (``ModelParallelStrategy``: FSDP2, DTensor parameters, ``tensor_parallel_size=1``): every
    rank counts the zeros of its own shards and one ``all_reduce`` sums them, so the logged metrics and the
    table (printed by rank zero) are the whole model's numbers; no parameter is gathered. The latency line
    is skipped there (it would measure a CPU copy of the whole model), with one info line saying so.

    Args:
        per_layer: log ``sparsity/<parameter name>`` for each prunable weight. ``None`` (default): when
            there are at most ``max_layers_per_layer_logging`` of them.
        max_layers_per_layer_logging: the limit for ``per_layer=None``.
        log_every_n_steps: log every this many optimizer steps (``trainer.global_step``); ``None`` follows
            ``Trainer(log_every_n_steps=...)``; ``0`` logs only at the end of each training epoch.
        print_table: print the table at the end of ``fit`` (rank zero only).
        inference_latency: measure and print the inference latency line with the table. ``"auto"`` (default):
            after a fit of at least :data:`AUTO_LATENCY_MIN_FIT_S` seconds (10 s); a shorter fit gets a
            one-line note instead, so quick fits do not pay for the measurement. ``True``: after every fit;
            ``False``: never. Nothing is measured when ``print_table`` is ``False``.
        latency_batch_size: the batch size of that measurement; ``None``: the training batch size.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> import lightning as L
        >>> from lightning_clipprune import SparsityLogger
        >>> trainer = L.Trainer(callbacks=[SparsityLogger(log_every_n_steps=10)], logger=False)
    """

    def __init__(
        self,
        *,
        per_layer: bool | None = None,
        max_layers_per_layer_logging: int = 50,
        log_every_n_steps: int | None = None,
        print_table: bool = True,
        inference_latency: bool | Literal["auto"] = "auto",
        latency_batch_size: int | None = None,
    ) -> None:
        # the app checks its config with the same code before torch loads
        check_sparsity_logger_fields({
            "per_layer": per_layer, "max_layers_per_layer_logging": max_layers_per_layer_logging,
            "log_every_n_steps": log_every_n_steps, "print_table": print_table,
            "inference_latency": inference_latency, "latency_batch_size": latency_batch_size,
        })
        self.per_layer = per_layer
        self.max_layers_per_layer_logging = max_layers_per_layer_logging
        self.log_every_n_steps = log_every_n_steps
        self.print_table = print_table
        self.measure_latency: bool | str = inference_latency
        self.latency_batch_size = latency_batch_size
        #: The end-of-fit inference measurement (:func:`~lightning_clipprune.export.latency.measure_inference`).
        self.inference_latency: dict[str, Any] | None = None
        self._example: torch.Tensor | None = None
        self._train_batch_size: int | None = None
        #: The metrics of the last logging step, as Python numbers (rank zero).
        self.last_metrics: dict[str, float] = {}
        self._prune_callback: PruneState | None = None
        self._names: list[str] | None = None
        self._log_per_layer = False
        self._last_step = -1
        self._fit_started = 0.0

    def _selected_names(self, pl_module: pl.LightningModule) -> list[str]:
        names = self._prune_callback.parameter_names if self._prune_callback is not None else None
        if not names:
            return prunable_names(pl_module)
        known = set(named_weights(pl_module))
        unknown = [n for n in names if n not in known]
        if unknown:
            rank_zero_warn(f"SparsityLogger: the prune callback names parameters the model lacks, ignored: {unknown}")
        return [n for n in names if n not in unknown]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, "log")  # sharded strategies are refused here
        # The prune state comes through the typed contract (callbacks/contract.py), not a class import.
        found = find_callbacks(trainer, PruneState)
        self._prune_callback = found[0] if found else None
        self._names = None
        self._last_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_model_sharded(trainer, pl_module, type(self).__name__)
        self._fit_started = time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup: the prune callback's parameter list is known by now.
        self._names = self._selected_names(pl_module)
        # a resumed run logged its current step before the checkpoint: with accumulation, the first batch after
        # the resume (no optimizer step yet) would log that step again
        self._last_step = trainer.global_step
        self._log_per_layer = (
            self.per_layer if self.per_layer is not None else len(self._names) <= self.max_layers_per_layer_logging
        )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # One input sample of the first batch, for the end-of-fit latency line: nothing on the later batches.
        if self._example is None and self.print_table and self.measure_latency and trainer.is_global_zero:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                self._example, self._train_batch_size = x[:1].detach().clone(), int(x.shape[0])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        step = trainer.global_step
        # global_step stays put across accumulated batches: log once per optimizer step.
        if not every or step == 0 or step % every or step == self._last_step:
            return
        self._last_step = step
        self._log(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, epoch_end=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every on_train_end: what post-training pruning (schedule="oneshot", end=1.0) left is logged too.
        self._log(trainer, pl_module, if_changed=True, epoch_end=True)
        if not self.print_table:
            return
        if _sharded(pl_module):
            # every rank counts its shards for the table (a collective); rank zero prints the global numbers
            report = self._report(pl_module)
            if trainer.is_global_zero:
                _print(report.to_table())
            if self.measure_latency:  # a measurement of a CPU copy of the whole model: not for a sharded one
                rank_zero_info("SparsityLogger: inference latency not measured: the model is sharded (DTensors).")
            return
        self._print_table(pl_module)
        if self.measure_latency and self._example is None and pl_module.device.type == "cpu":
            rank_zero_info(
                "SparsityLogger: inference latency not measured: no training batch held a tensor input (a batch"
                " of (x, ...) or a tensor; a dict is not read). `lightning_clipprune.to_inference(model,"
                " example_input=x)` measures it on an input you give."
            )
        if not self.measure_latency or self._example is None or pl_module.device.type != "cpu":
            return  # no tensor input seen, or a GPU model (the CPU measurement would not be its latency)
        elapsed = time.perf_counter() - self._fit_started
        if self.measure_latency == "auto" and elapsed < AUTO_LATENCY_MIN_FIT_S:
            self._print_skipped(elapsed)
        else:
            self._print_latency(pl_module)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, if_changed: bool = False, epoch_end: bool = False
    ) -> None:
        # Sharded parameters are counted by every rank (one all_reduce); replicated ones by rank zero alone.
        if not trainer.loggers or not (trainer.is_global_zero or _sharded(pl_module)):
            return
        if self._names is None:
            self.on_train_start(trainer, pl_module)
        selected, rest = split_parameters(pl_module, self._names)
        if not selected and not rest:
            return
        metrics = sparsity_metrics({**selected, **rest}, list(selected), per_layer=self._log_per_layer)
        if not trainer.is_global_zero:
            return
        target = self._prune_callback.current_target if self._prune_callback is not None else None
        # The logging step's only host synchronisation: one transfer for the counts, one for the fractions.
        counts = [k for k, v in metrics.items() if not v.is_floating_point()]
        fractions = [k for k, v in metrics.items() if v.is_floating_point()]
        previous, self.last_metrics = self.last_metrics, {}
        for keys in (fractions, counts):
            if keys:
                values = torch.stack([metrics[k] for k in keys]).tolist()
                self.last_metrics.update(zip(keys, values, strict=True))
        if target is not None:
            self.last_metrics["sparsity/target"] = float(target)
        if if_changed and self.last_metrics == previous:
            return
        # The step Lightning logs its own metrics at (what LearningRateMonitor uses too); its epoch-end metrics
        # go one step back (fit_loop's update_train_epoch_metrics), to the epoch's last step.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        step = max(step - 1, 0) if epoch_end else step
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=step)

    def _report(self, pl_module: pl.LightningModule) -> SparsityReport:
        names = self._names if self._names is not None else prunable_names(pl_module)
        return sparsity_report(pl_module, names, title=f"Sparsity of {type(pl_module).__name__} at the end of fit")

    @rank_zero_only
    def _print_table(self, pl_module: pl.LightningModule) -> None:
        _print(self._report(pl_module).to_table())

    @rank_zero_only
    def _print_skipped(self, elapsed: float) -> None:
        _print(
            f"Inference latency (CPU): not measured after a fit of {elapsed:.1f} s (inference_latency='auto' "
            f"measures after fits of {AUTO_LATENCY_MIN_FIT_S:g} s or more); SparsityLogger(inference_latency=True) "
            "measures it after every fit (in the app: callbacks.sparsity.inference_latency=true).",
            highlight=False,
        )

    @rank_zero_only
    def _print_latency(self, pl_module: pl.LightningModule) -> None:
        from lightning_clipprune.export._timing import call_timer
        from lightning_clipprune.export.latency import format_latency, measure_inference

        batch_size = self.latency_batch_size or self._train_batch_size
        try:
            self.inference_latency = measure_inference(
                pl_module, self._example, batch_size=batch_size, rounds=_LATENCY_ROUNDS, timer=call_timer(_LATENCY_SAMPLE_S)
            )
        except Exception as err:  # the run's result stands; the measurement is a bonus, say why it is missing
            rank_zero_warn(f"SparsityLogger: inference latency not measured: {' '.join(str(err).split())}")
            return
        _print(f"Inference latency (CPU): {format_latency(self.inference_latency)}", highlight=False)


def _sharded(pl_module: pl.LightningModule) -> bool:
    """Whether the model's parameters are DTensors (FSDP2 / ModelParallelStrategy): counting is then collective."""
    return any_sharded(pl_module.parameters())


def _print(renderable: Any, **options: Any) -> None:
    from rich.console import Console

    Console().print(renderable, **options)
