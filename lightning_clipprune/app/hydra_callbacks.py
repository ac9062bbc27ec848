"""Hydra callbacks of the app: the sweep report at the end of a multirun, results as objectives for sweepers.

Enable them from the command line (or in ``conf/config.yaml``'s defaults: ``- hydra/callbacks: sweep_report``)::

    python -m lightning_clipprune.run -m prune.sparsity=0.5,0.9 +hydra/callbacks=sweep_report

They are Hydra callbacks, not launcher features, so they work with any launcher (basic, joblib, submitit).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_clipprune.app.checks import ConfigError
from lightning_clipprune.app.report import Job, write_report
from lightning_clipprune.app.rundir import check_output_dir, launching_process
from lightning_clipprune.app.untrusted import UntrustedFileError, read_json_object

__all__ = ["ResultsObjective", "RunFolderGuard", "SweepReport"]

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Writes ``summary.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into the sweep folder.

    The files are written at the end of the multirun and refreshed after every job (a sweep that Hydra
    aborts because a job failed still leaves its report). A failed job is a row with status ``failed``; an
    error while writing the report is logged, never raised, so it cannot turn a finished sweep into a failed
    command.

    Args:
        console: also print the summary table.
    """

    def __init__(self, console: bool = True) -> None:
        self.console = console

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra's basic sweeper raises at the end of a batch with a failed job, before on_multirun_end:
        # the report written after each job is then the one left, failed jobs included.
        if config.hydra.mode == RunMode.MULTIRUN:
            self.write(Path(config.hydra.sweep.dir), console=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write(Path(config.hydra.sweep.dir), console=self.console)

    def write(self, sweep_dir: Path, console: bool) -> list[Job] | None:
        """Write the report into ``sweep_dir`` and return its jobs (rank zero only; an error is logged, never
        raised, and gives None)."""
        # A DDP process Lightning started for a rank > 0 runs the same command, sweep included: rank zero reports
        if not launching_process():
            return None
        try:
            jobs = write_report(sweep_dir, console=console)
        except Exception as err:  # a report must not fail the sweep it summarises
            log.warning(f"sweep report not written into {sweep_dir}: {type(err).__name__}: {err}")
            return None
        log.info(f"sweep report: {sweep_dir / 'summary.md'} ({len(jobs)} jobs)")
        return jobs


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
        if job_return.status != JobStatus.COMPLETED:
            return
        path = Path(config.hydra.runtime.output_dir) / "results.json"
        if not os.path.lexists(path):
            return
        try:
            values = self._values(path)
        except ValueError as err:  # the sweeper records the trial as failed, with this one line
            log.error(f"objectives not read: {err}")
            job_return.status = JobStatus.FAILED
            job_return.return_value = err
            return
        job_return.return_value = values[0] if len(values) == 1 else values

    def _values(self, path: Path) -> list[float]:
        """The metrics from ``path``, read bounded; each must be a finite number."""
        results = read_json_object(path)
        values = []
        for m in self.metrics:
            value = results.get(m)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UntrustedFileError(path, f"{m}={value!r} is not a finite number (the sweeper's objective)")
            values.append(float(value))
        return values


class RunFolderGuard(Callback):
    """Refuses a single run's ``hydra.run.dir`` before Hydra writes anything into it.

    Hydra writes ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml`` and the job's log into the run folder
    before the app starts, so a second run in a folder another run holds (or finished in) would rewrite the
    first run's ``.hydra/overrides.yaml`` even though the app then refuses it, and a planted link there would
    be written through. At ``on_run_start`` (before Hydra writes) this callback applies the app's checks
    (:func:`lightning_clipprune.app.rundir.check_output_dir`) and ends the command with one line and exit
    status 1. Enable it in ``hydra.callbacks``::

        hydra:
          callbacks:
            run_folder_guard:
              _target_: lightning_clipprune.app.hydra_callbacks.RunFolderGuard
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ckpt = config.get("ckpt_path")
        try:
            check_output_dir(
                Path(str(config.hydra.run.dir)), Path(str(ckpt)).expanduser() if ckpt else None,
                log_name=f"{config.hydra.job.name}.log",
            )
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)  # SystemExit passes Hydra's error report: one line, before anything is written
