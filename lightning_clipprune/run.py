"""The Hydra app: compose model, data, clip and prune schedule from the command line, train, report.

::

    python -m lightning_clipprune.run                                   # digits + MLP, seconds on a CPU
    python -m lightning_clipprune.run +experiment=cifar prune.sparsity=0.95 clip.clip_val=0.5
    python -m lightning_clipprune.run ~prune ~clip seed=1               # dense, unclipped baseline

Every run writes ``results.json`` (``val_acc``, ``test_acc``, ``sparsity``, ``params_total``,
``params_nonzero``, ``wall_time_s``, clip statistics, the overrides, ``status``) and ``checkpoints/``
into its own Hydra output folder, and prints one summary table. :func:`train` strings the stages of
:mod:`lightning_clipprune.app` together (check, build, fit and evaluate, report) and returns the
results; :func:`main` is the command-line entry point: configuration mistakes (Hydra's included: an
unknown key or group option, an override its grammar refuses) become one line on stderr and exit status 1
(``HYDRA_FULL_ERROR=1`` shows the traceback instead); weights that are no longer finite end the run the
same way, without ``results.json``. Ctrl-C or SIGTERM during training ends with ``results.json`` marked
interrupted and the command that resumes the run (exit status 130 or 143); a SIGTERM at any other point
ends with one line and status 143 too (:mod:`lightning_clipprune.app.interrupts`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_clipprune.app.checks import (
    ConfigError,
    DataNotFoundError,
    check_against_model,
    check_config,
    one_line,
)
from lightning_clipprune.app.interrupts import (
    begin_run,
    defer_signals,
    deferred_signal,
    install_sigterm_handler,
    is_sigterm,
)
from lightning_clipprune.app.rundir import (
    claim_output_dir,
    launching_process,
    merge_metrics,
    release_output_dir,
    run_id,
    set_aside_metrics,
    write_run_record,
)

__all__ = ["ConfigError", "config_dir", "main", "train"]

# `${run_id:}` in conf/config.yaml: two runs started in the same second get different folders. Cached, as
# Hydra's `now` is: a launcher that runs jobs in other processes (joblib) resolves `hydra.sweep.dir` again in
# each, from the sweep's config and its resolver cache, so every job lands in the one sweep folder.
OmegaConf.register_new_resolver("run_id", run_id, replace=True, use_cache=True)

#: Exit status of a run stopped by SIGINT / SIGTERM (the shell's 128 + signal number).
_INTERRUPTED_STATUS = {"SIGINT": 130, "SIGTERM": 143}


def config_dir() -> Path:
    """The folder of the Hydra configs: ``lightning_clipprune/conf`` in an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _resume_checkpoint(cfg: DictConfig) -> Any:
    """``ckpt_path``, read once (safely: no code runs from it) into its outline; None when not resuming."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    from lightning_clipprune.app.resume import outline_checkpoint

    # (check_config, which train() runs first, has refused a path that is not a file)
    return outline_checkpoint(Path(str(ckpt_path)).expanduser(), str(ckpt_path))


def train(cfg: DictConfig, overrides: Sequence[str] = (), job: str | None = None) -> dict[str, Any]:
    """Check, build, fit and evaluate, report: the whole run, returning what ``results.json`` holds.

    Every component is built and the data located before ``trainer.fit``, so a bad value fails in
    seconds, with a :class:`ConfigError` (or :class:`~lightning_clipprune.data.DataNotFoundError`).
    Process-wide torch settings the run changes (threads, deterministic algorithms) are restored after it.

    Args:
        cfg: the composed config (``conf/config.yaml`` and its groups). ``cfg.output_dir`` must resolve
            (``${hydra:runtime.output_dir}`` under ``@hydra.main``; tests set it).
        overrides: the command-line overrides, recorded in ``results.json`` and in the resume command.
        job: a label for the summary's title (the sweep job's varying overrides).

    Returns:
        The dict written to ``results.json``; ``status`` is ``"interrupted"`` after Ctrl-C or SIGTERM.

    Raises:
        ConfigError: for a bad value in the config (the message names the config key and the value).
        DataNotFoundError: when the data set is neither on disk nor downloadable.
    """
    check_config(cfg)  # before torch and Lightning load: a bad value is one line in about a second
    import torch

    resume = _resume_checkpoint(cfg)
    ckpt = resume.file if resume is not None else None
    output_dir = Path(cfg.output_dir)
    # DDP re-launches this command for ranks > 0 into the same folder: only the launching process claims it
    launcher = launching_process()
    if launcher:
        claim_output_dir(output_dir, ckpt)
        write_run_record(output_dir, overrides)  # the search reads this, not .hydra/ (a refused run rewrites that)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.get("cpu_threads"):
            from lightning_clipprune.app.build import on_cpu

            if on_cpu(cfg.trainer.get("accelerator")):
                torch.set_num_threads(int(cfg.cpu_threads))
        return _train(cfg, list(overrides), output_dir, resume, job)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if launcher:
            release_output_dir(output_dir)


def _train(cfg: DictConfig, overrides: list[str], output_dir: Path, resume: Any, job: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_clipprune.app.build import build
    from lightning_clipprune.app.resume import check_resume
    from lightning_clipprune.app.summary import collect_results, print_summary, write_results

    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = build(cfg)
    check_against_model(cfg, parts.model, parts.datamodule)
    ckpt = None
    if resume is not None:  # before Lightning indexes into the file: one line for a file that does not fit
        check_resume(resume, cfg, parts.model)
        ckpt = resume.file
    resumed_from = aside = None
    if ckpt is not None:
        resumed_from = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        if resumed_from.resolve() == output_dir.resolve():  # one folder, one metrics.csv for the whole run
            aside = set_aside_metrics(output_dir) if launching_process() else None
            warnings.filterwarnings("ignore", message=r".*(Experiment logs|Checkpoint) directory .* exists and is not empty.*")
        else:
            rank_zero_info(f"resuming the run of {resumed_from}; its earlier metrics are in that folder")
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in parts.trainer.loggers:
        logger.log_hyperparams({"config": config, "overrides": overrides})
    try:
        outcome = _fit(parts, ckpt, bool(cfg.get("test", True)))
    finally:
        if aside is not None:
            merge_metrics(output_dir, aside)
    if outcome.status == "completed":
        defer_signals()  # the training is over: a SIGTERM from here on ends the run after its results
        _check_finite(parts.model)
    if outcome.status == "completed" and cfg.get("callbacks") is not None and cfg.callbacks.get("checkpoint") is not None:
        parts.trainer.save_checkpoint(output_dir / "checkpoints" / "final.ckpt", weights_only=False)

    results = collect_results(
        cfg, parts, outcome, overrides=overrides, output_dir=output_dir,
        wall_time_s=time.perf_counter() - t0, resumed_from=resumed_from,
    )
    if parts.trainer.is_global_zero:
        path = write_results(output_dir, results)
        print_summary(results, job)
        logging.getLogger(__name__).info("results: %s", path)
    return results


def _fit(parts: Any, ckpt: Path | None, test: bool) -> Any:
    """fit_and_evaluate, where a callback's refusal at setup (before any step) is a ConfigError line, and a
    signal during the evaluation after ``fit`` (``fit`` itself returns an interrupted Outcome) is one too."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_clipprune.app.fit import Outcome, _interrupt_signal, fit_and_evaluate, scalar

    try:
        return fit_and_evaluate(parts, ckpt_path=ckpt, test=test)
    except (ValueError, MisconfigurationException) as err:
        if parts.trainer.global_step > 0 or isinstance(err, ConfigError):
            raise
        _forget_fresh_start(parts, ckpt)
        raise ConfigError(one_line(err)) from err
    except RuntimeError as err:  # a network that does not take the data's inputs fails in its first forward
        if parts.trainer.global_step > 0 or not any(s in str(err) for s in _SHAPE_ERRORS):
            raise
        _forget_fresh_start(parts, ckpt)
        raise ConfigError(
            f"the model does not take the data's inputs ({one_line(err)}): model={_choice(parts, 'model')} and"
            f" data={_choice(parts, 'data')} do not fit together; pick a model for this data set (or set the"
            f" network's input size: {_input_keys(parts)})"
        ) from err
    except (KeyboardInterrupt, SystemExit) as err:
        which = _interrupt_signal(err, parts.trainer)
        if which is None:
            raise
        return Outcome(status="interrupted", val_acc=scalar(parts.trainer.callback_metrics.get("val/acc")), signal=which)


def _input_keys(parts: Any) -> str:
    """The network's input-size arguments as overrides (``model.net.in_channels``, ``model.net.image_size``)."""
    import inspect

    net = getattr(parts.model, "net", None)
    try:
        names = inspect.signature(type(net).__init__).parameters if net is not None else {}
    except (TypeError, ValueError):
        names = {}
    keys = [f"model.net.{k}" for k in ("in_features", "in_channels", "image_size") if k in names]
    return " and ".join(keys) if keys else "its first layer's input size"


def _forget_fresh_start(parts: Any, ckpt: Path | None) -> None:
    """A new run refused before its first step: remove its loggers' folders (``csv/``, ``tensorboard/``: the
    hyperparameters only), so the same ``hydra.run.dir`` is free for the corrected command. A resumed run
    keeps them: they hold its earlier metrics."""
    import shutil

    if ckpt is not None or not parts.trainer.is_global_zero:
        return
    for logger in parts.trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and Path(log_dir).name in ("csv", "tensorboard") and Path(log_dir).is_dir():
            shutil.rmtree(log_dir, ignore_errors=True)


#: torch's words for inputs of the wrong size or number of channels.
_SHAPE_ERRORS = (
    "shapes cannot be multiplied", "expected input", "channels, but got", "size mismatch",
    "can't be greater than actual input size",  # a convolution's kernel larger than the (padded) image
)


def _choice(parts: Any, group: str) -> str:
    """The config group's choice (``lenet300``), else the class name of what was built."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choice = HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # not under Hydra (a test calling train() directly)
        choice = None
    return str(choice) if choice else type(getattr(parts, "model" if group == "model" else "datamodule")).__name__


def _check_finite(model: Any) -> None:
    """After training: weights holding NaN or inf end the run (one line, exit 1), before any result is written."""
    from lightning_clipprune.app.guards import (
        NonFiniteWeightsError,
        first_nonfinite_parameter,
        nonfinite_message,
    )

    name = first_nonfinite_parameter(model)
    if name is not None:
        raise NonFiniteWeightsError(nonfinite_message(name, "at the end of training"))


def _quiet_console(verbose: bool) -> None:
    """Keep the console to the progress bar, the tables and the summary; everything else goes to run.log.

    Lightning's info lines (accelerator, tips, "`Trainer.fit` stopped") and the prune callback's
    per-event lines are logged at INFO: with ``verbose=false`` they reach the run's ``run.log`` (Hydra's
    file handler on the root logger) and not the console. Warnings stay on the console.
    """
    if verbose:
        return
    import lightning.pytorch  # noqa: F401  # its console handlers are added when it is imported

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_clipprune"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        logger.setLevel(logging.INFO)
        logger.propagate = True  # to the root logger: run.log
    # a deprecation inside Lightning's own code, on every run, that a user can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _job_label() -> str | None:
    """For a sweep job: its number and overrides (the summary says which job it is)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"job {hc.job.num}: {' '.join(hc.overrides.task)}"


def _fail(err: BaseException, sweeping: bool) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    message = str(err) if isinstance(err, ConfigError) else one_line(err)
    print(f"error: {message}", file=sys.stderr)
    if sweeping:  # Hydra marks the job failed and goes on with the sweep (sys.exit would end the sweep)
        from lightning_clipprune.app.cli import mark_reported

        raise mark_reported(err)
    sys.exit(1)


def _refresh_sweep_report(hydra_cfg: Any, sweep_dir: Path) -> None:
    """An interrupted job ends its sweep (Hydra calls no ``on_job_end``), and a job run or resumed on its own
    into a sweep's folder ends no sweep: the SweepReport is refreshed here, so the sweep's summary lists the
    job as it is now, and the jobs the sweep has not run (one line on stderr)."""
    from lightning_clipprune.app.hydra_callbacks import SweepReport

    callbacks = hydra_cfg.get("callbacks") or {}
    if any(str(node.get("_target_", "")).endswith(".SweepReport") for node in callbacks.values() if node is not None):
        jobs = SweepReport(console=False).write(sweep_dir, console=False) or []
        waiting = sum(j.not_run for j in jobs)
        if waiting:
            print(f"the sweep has {waiting} of {len(jobs)} jobs not run: {sweep_dir / 'summary.md'} gives the "
                  "command for each", file=sys.stderr)


def _sweep_of(output_dir: Any) -> Path | None:
    """The sweep folder a single run writes into (a run resumed, or a job not run, in its sweep's job folder)."""
    parent = Path(str(output_dir)).parent
    return parent if (parent / "multirun.yaml").is_file() else None


def _interrupted_at_start(which: str) -> None:
    """A signal outside the training loop: during start-up, or (Ctrl-C) while the results were written."""
    from lightning_clipprune.app.interrupts import training_over

    if training_over():
        print(f"interrupted by {which} after the training had ended, while its results were written; results.json "
              "may be missing or from before", file=sys.stderr)
    else:
        print(f"interrupted by {which} during start-up; nothing was trained, nothing to resume", file=sys.stderr)
    sys.exit(_INTERRUPTED_STATUS[which])


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    """The Hydra task: one run (one job of a sweep).

    Returns:
        The validation accuracy (Hydra's convention, so sweepers such as Optuna can optimise it).
    """
    from lightning_clipprune.app.cli import hydra_task_started

    with hydra_task_started():
        return _run(cfg)


def _run(cfg: DictConfig) -> float | None:
    # OpenMP threads spin while they wait for work; on a shared or oversubscribed CPU (other jobs, DDP ranks
    # on one machine) the spinning threads starve the working ones: one Fashion-MNIST epoch took 110 s
    # instead of 3.5 s on 2 busy cores. Sleeping waiters cost nothing measurable here. Only effective
    # before torch is imported (it is not yet, here); a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from hydra.core.hydra_config import HydraConfig

    from lightning_clipprune._io import RefusedPathError, StorageFullError

    job = _job_label()
    stopped = begin_run()  # a sweep's jobs run in one process: each starts in the start-up phase
    if stopped is not None:
        _interrupted_at_start(stopped)
    try:
        check_config(cfg)  # before Lightning loads: a bad value is one line in about a second
        _quiet_console(bool(cfg.get("verbose", False)))
        results = train(cfg, list(HydraConfig.get().overrides.task), job=job)
    # FloatingPointError: NaN weights at a prune event; StorageFullError: disk full (one line naming the folder)
    except (ConfigError, FloatingPointError, StorageFullError, RefusedPathError) as err:
        _fail(err, sweeping=job is not None)
    except DataNotFoundError as err:
        _fail(err, sweeping=job is not None)
    except KeyboardInterrupt:
        _interrupted_at_start("SIGINT")
    except SystemExit as err:
        if not is_sigterm(err):
            raise
        _interrupted_at_start("SIGTERM")
    hydra_cfg = HydraConfig.get()
    sweep = Path(str(hydra_cfg.sweep.dir)) if job is not None else _sweep_of(hydra_cfg.runtime.output_dir)
    if sweep is not None and (job is None or results.get("status") == "interrupted"):
        _refresh_sweep_report(hydra_cfg, sweep)
    if results.get("status") == "interrupted":  # the summary printed the line that says how to resume
        sys.exit(_INTERRUPTED_STATUS.get(results.get("signal") or "", 1))
    which = deferred_signal()
    if which is not None:
        print(f"interrupted by {which} after the training had ended; the run finished first: results.json is complete",
              file=sys.stderr)
        sys.exit(_INTERRUPTED_STATUS[which])
    return results.get("val_acc")


def main() -> None:
    """``python -m lightning_clipprune.run [overrides]``: see the module docstring and ``conf/config.yaml``.

    SIGTERM is handled from the first line on. Overrides Hydra refuses, and those that would write outside
    the run's folder, are one line on stderr and exit status 1 before anything runs.
    """
    install_sigterm_handler()
    argv = sys.argv[1:]
    try:
        from lightning_clipprune.app.cli import check_overrides, fast_help, hydra_errors_raised
        from lightning_clipprune.app.sweep_check import check_sweep_values

        check_overrides(argv)
        check_sweep_values(argv, config_dir())  # a sweep's bad value before its first job trains
        with hydra_errors_raised(), fast_help(argv):
            _app()
    except SystemExit as err:
        if not is_sigterm(err):
            raise
        _interrupted_at_start("SIGTERM")
    except KeyboardInterrupt:
        _interrupted_at_start("SIGINT")
    except Exception as err:  # raised by Hydra before (or between) the runs (a bad override), or check_overrides
        from lightning_clipprune.app.cli import hydra_error_line, is_reported

        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user's own setting: the traceback
            raise
        if is_reported(err):  # a sweep job's error, already one line on stderr
            sys.exit(1)
        print(f"error: {err if isinstance(err, ConfigError) else hydra_error_line(err, argv)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
