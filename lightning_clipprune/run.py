"""The Hydra app: compose model, data, clip and prune schedule from the command line, train, report.

::

    python -m lightning_clipprune.run                                   # digits + MLP, seconds on a CPU
    python -m lightning_clipprune.run +experiment=cifar prune.sparsity=0.95 clip.clip_val=0.5
    python -m lightning_clipprune.run ~prune ~clip seed=1               # dense, unclipped baseline

Every run writes ``results.json`` (``val_acc``, ``test_acc``, ``sparsity``, ``params_total``,
``params_nonzero``, ``wall_time_s``, clip statistics, the overrides, ``status``) and ``checkpoints/``
into its own Hydra output folder, and prints one summary table. :func:`train` strings the stages of
:mod:`lightning_clipprune.app` together (check, build, fit and evaluate, report) and returns the
results; :func:`main` is the command-line entry point: configuration mistakes become one line on stderr
and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback instead); Ctrl-C or SIGTERM ends with
``results.json`` marked interrupted and the command that resumes the run.
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

from lightning_clipprune.app.checks import ConfigError, check_config, one_line
from lightning_clipprune.app.rundir import (
    claim_output_dir,
    merge_metrics,
    release_output_dir,
    run_id,
    set_aside_metrics,
)

__all__ = ["ConfigError", "config_dir", "main", "train"]

# `${run_id:}` in conf/config.yaml: two runs started in the same second get different folders.
OmegaConf.register_new_resolver("run_id", run_id, replace=True)

#: Exit status of a run stopped by SIGINT / SIGTERM (the shell's 128 + signal number).
_INTERRUPTED_STATUS = {"SIGINT": 130, "SIGTERM": 143}


def config_dir() -> Path:
    """The folder of the Hydra configs: ``lightning_clipprune/conf`` in an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _checkpoint_path(cfg: DictConfig) -> Path | None:
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    from lightning_clipprune.checkpoint import CheckpointError, check_checkpoint_file

    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file")
    try:  # read without unpickling anything but tensors and plain values: a hostile file runs no code
        check_checkpoint_file(path)
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r}: {one_line(err)}") from None
    return path


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
    import torch

    check_config(cfg)
    ckpt = _checkpoint_path(cfg)
    output_dir = Path(cfg.output_dir)
    # DDP re-launches this command for ranks > 0 into the same folder: only the launching process claims it
    launcher = _launching_process()
    if launcher:
        claim_output_dir(output_dir, ckpt)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.get("cpu_threads"):
            from lightning_clipprune.app.build import on_cpu

            if on_cpu(cfg.trainer.get("accelerator")):
                torch.set_num_threads(int(cfg.cpu_threads))
        return _train(cfg, list(overrides), output_dir, ckpt, job)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if launcher:
            release_output_dir(output_dir)


def _train(cfg: DictConfig, overrides: list[str], output_dir: Path, ckpt: Path | None, job: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_clipprune.app.build import build
    from lightning_clipprune.app.summary import collect_results, print_summary, write_results

    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    resumed_from = aside = None
    if ckpt is not None:
        resumed_from = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        if resumed_from.resolve() == output_dir.resolve():  # one folder, one metrics.csv for the whole run
            aside = set_aside_metrics(output_dir) if _launching_process() else None
            warnings.filterwarnings("ignore", message=r".*(Experiment logs|Checkpoint) directory .* exists and is not empty.*")
        else:
            rank_zero_info(f"resuming the run of {resumed_from}; its earlier metrics are in that folder")
    parts = build(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in parts.trainer.loggers:
        logger.log_hyperparams({"config": config, "overrides": overrides})
    try:
        outcome = _fit(parts, ckpt, bool(cfg.get("test", True)))
    finally:
        if aside is not None:
            merge_metrics(output_dir, aside)
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


def _launching_process() -> bool:
    """Whether this process is the launching one (DDP re-launches the command for ranks > 0)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _fit(parts: Any, ckpt: Path | None, test: bool) -> Any:
    """fit_and_evaluate, where a callback's refusal at setup (before any step) is a ConfigError line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_clipprune.app.fit import fit_and_evaluate

    try:
        return fit_and_evaluate(parts, ckpt_path=ckpt, test=test)
    except (ValueError, MisconfigurationException) as err:
        if parts.trainer.global_step > 0 or isinstance(err, ConfigError):
            raise
        raise ConfigError(one_line(err)) from err


def _quiet_console(verbose: bool) -> None:
    """Keep the console to the progress bar, the tables and the summary; everything else goes to run.log.

    Lightning's info lines (accelerator, tips, "`Trainer.fit` stopped") and the prune callback's
    per-event lines are logged at INFO: with ``verbose=false`` they reach the run's ``run.log`` (Hydra's
    file handler on the root logger) and not the console. Warnings stay on the console.
    """
    if verbose:
        return
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
        raise err
    sys.exit(1)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``python -m lightning_clipprune.run [overrides]``: see the module docstring and ``conf/config.yaml``.

    Returns:
        The validation accuracy (Hydra's convention, so sweepers such as Optuna can optimise it).
    """
    # OpenMP threads spin while they wait for work; on a shared or oversubscribed CPU (other jobs, DDP ranks
    # on one machine) the spinning threads starve the working ones: one Fashion-MNIST epoch took 110 s
    # instead of 3.5 s on 2 busy cores. Sleeping waiters cost nothing measurable here. Only effective
    # before torch is imported (it is not yet, here); a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from hydra.core.hydra_config import HydraConfig

    from lightning_clipprune.data.locate import DataNotFoundError

    _quiet_console(bool(cfg.get("verbose", False)))
    job = _job_label()
    try:
        results = train(cfg, list(HydraConfig.get().overrides.task), job=job)
    except (ConfigError, DataNotFoundError, FloatingPointError) as err:  # FloatingPointError: NaN weights at a prune event
        _fail(err, sweeping=job is not None)
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was trained", file=sys.stderr)
        sys.exit(_INTERRUPTED_STATUS["SIGINT"])
    if results.get("status") == "interrupted":
        sys.exit(_INTERRUPTED_STATUS.get(results.get("signal") or "", 1))
    return results.get("val_acc")


if __name__ == "__main__":
    main()
