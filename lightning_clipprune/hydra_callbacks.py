"""Hydra callbacks of the app: the sweep report at the end of a multirun, results as objectives for sweepers.

Enable them from the command line (or in ``conf/config.yaml``'s defaults: ``- hydra/callbacks: sweep_report``)::

    python -m lightning_clipprune.run -m prune.sparsity=0.5,0.9 +hydra/callbacks=sweep_report

They are Hydra callbacks, not launcher features, so they work with any launcher (basic, joblib, submitit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ResultsObjective", "SweepReport"]

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Writes ``summary.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into the sweep folder.

    The files are written at the end of the multirun and refreshed after every job (a sweep that Hydra
    aborts because a job failed still leaves its report). A failed job is a row with status ``failed``; an error while writing the report is logged, never raised,
    so it cannot turn a finished sweep into a failed command.

    Args:
        console: also print the summary table.
    """

    def __init__(self, console: bool = True) -> None:
        self.console = console

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra's basic sweeper raises at the end of a batch with a failed job, before on_multirun_end:
        # the report written after each job is then the one left, failed jobs included.
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(Path(config.hydra.sweep.dir), console=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.sweep.dir), console=self.console)

    def _write(self, sweep_dir: Path, console: bool) -> None:
        from lightning_clipprune.report import write_report

        try:
            jobs = write_report(sweep_dir, console=console)
        except Exception as err:  # a report must not fail the sweep it summarises
            log.warning(f"sweep report not written into {sweep_dir}: {type(err).__name__}: {err}")
            return
        log.info(f"sweep report: {sweep_dir / 'summary.md'} ({len(jobs)} jobs)")


class ResultsObjective(Callback):
    """Sets each finished job's return value to metrics read from its ``results.json``.

    Hydra's sweepers (Optuna) optimise what the task function returns; this makes the return value
    ``(results[m] for m in metrics)`` (one metric: a float) whatever ``main`` returns, so a
    multi-objective study of accuracy against sparsity needs nothing from the app.

    Args:
        metrics: keys of ``results.json``, in the order of the sweeper's ``direction`` list.

    Raises:
        ValueError: ``metrics`` is empty.
    """

    def __init__(self, metrics: Sequence[str] = ("val_acc", "sparsity")) -> None:
        if not metrics:
            raise ValueError(f"`metrics` must name at least one key of results.json, got {metrics!r}")
        self.metrics = list(metrics)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED:
            return
        path = Path(config.hydra.runtime.output_dir) / "results.json"
        if not path.is_file():
            return
        results = json.loads(path.read_text())
        values = [float(results[m]) for m in self.metrics]
        job_return.return_value = values[0] if len(values) == 1 else values
