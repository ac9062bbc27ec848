"""The Hydra app: compose model, data, clip and prune schedule from the command line, train, report.

::

    python -m lightning_clipprune.run                                   # digits + MLP, < 1 min on a CPU
    python -m lightning_clipprune.run +experiment=cifar prune.sparsity=0.95 clip.clip_val=0.5
    python -m lightning_clipprune.run ~prune ~clip seed=1               # dense, unclipped baseline

Every run writes ``results.json`` (``val_acc``, ``test_acc``, ``sparsity``, ``params_total``,
``params_nonzero``, ``wall_time_s``, clip statistics, the overrides) and ``checkpoints/`` into its
Hydra output folder, and prints one summary table. :func:`train` does the work and returns the results;
:func:`main` is the command-line entry point and turns configuration mistakes into one line on stderr
and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback instead).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["ConfigError", "config_dir", "main", "train"]


def config_dir() -> Path:
    """The folder of the Hydra configs: ``lightning_clipprune/conf`` in an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A bad value in the composed config, raised before training starts; the message is one line."""


def _root_cause(err: BaseException) -> BaseException:
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, with any error turned into a one-line :class:`ConfigError` naming ``key``."""
    from hydra.errors import InstantiationException

    from lightning_clipprune.data.locate import DataNotFoundError

    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except (InstantiationException, ValueError, TypeError, FileNotFoundError) as err:
        root = _root_cause(err)
        if isinstance(root, DataNotFoundError):  # already one line naming data.root
            raise root from None
        # an InstantiationException without a cause (a _target_ that does not import): its first line
        text = str(root).splitlines()[0] if isinstance(root, InstantiationException) else _one_line(root)
        raise ConfigError(f"{key}: {text}") from err


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _prune_node(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig | None:
    """``cfg.prune``, where ``prune.threshold=X`` on a config with a default sparsity switches to the threshold rule.

    A prune config carries a default ``sparsity``; a user who writes ``prune.threshold=0.02`` means the
    threshold rule, so ``sparsity`` becomes null unless ``prune.sparsity`` was given too (then the
    callback's "exactly one of" error stands).
    """
    node = cfg.get("prune")
    if node is None:
        return None
    if node.get("threshold") is not None and node.get("sparsity") is not None:
        keys = {_override_key(o) for o in overrides}
        if "prune.threshold" in keys and "prune.sparsity" not in keys:
            node = node.copy()
            with open_dict(node):
                node.sparsity = None
    return node


def _on_cpu(accelerator: Any) -> bool:
    import torch

    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _experiment_name(cfg: DictConfig, overrides: Sequence[str]) -> str:
    for o in overrides:
        if _override_key(o) == "experiment":
            return o.split("=", 1)[1]
    return "digits"


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if hasattr(value, "item") else float(value)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build everything from ``cfg``, train, validate, test, write ``results.json``, print the summary.

    Every component is built and the data located before ``trainer.fit``, so a bad value fails in
    seconds, with a :class:`ConfigError` (or :class:`~lightning_clipprune.data.DataNotFoundError`).

    Args:
        cfg: the composed config (``conf/config.yaml`` and its groups). ``cfg.output_dir`` must resolve
            (``${hydra:runtime.output_dir}`` under ``@hydra.main``; tests set it).
        overrides: the command-line overrides, recorded in ``results.json``; ``prune.threshold`` among
            them switches the prune config to the threshold rule (see :func:`_prune_node`).

    Returns:
        The dict written to ``results.json``.

    Raises:
        ConfigError: for a bad value in the config (the message names the config key and the value).
        DataNotFoundError: when the data set is neither on disk nor downloadable.
    """
    import torch

    # process-wide torch settings this run changes, restored after it (train() may run inside a test session)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if cfg.get("cpu_threads") and _on_cpu(cfg.trainer.get("accelerator")):
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        return _train(cfg, overrides)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback
    from lightning_clipprune.sparsity import parameter_counts, prunable_names

    overrides = list(overrides)
    output_dir = Path(cfg.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # 1. data: located (or downloaded) now, so a missing data set fails before anything else is built
    datamodule = _instantiate(cfg.data, "data")
    datamodule.prepare_data()

    # 2. callbacks: clip, prune, then the others; a deleted group (~clip, ~prune) or null entry is skipped
    callbacks: list[Any] = []
    clip_cb = prune_cb = None
    if cfg.get("clip") is not None:
        clip_cb = _instantiate(cfg.clip, "clip")
        callbacks.append(clip_cb)
    prune_cfg = _prune_node(cfg, overrides)
    if prune_cfg is not None:
        prune_cb = _instantiate(prune_cfg, "prune")
        callbacks.append(prune_cb)
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            callbacks.append(_instantiate(node, f"callbacks.{key}"))

    # 3. model, logger, trainer
    model = _instantiate(cfg.model, "model")
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") is not None else False
    trainer_kwargs: dict[str, Any] = {}
    if cfg.trainer.get("deterministic") is None and cfg.get("seed") is not None and _on_cpu(cfg.trainer.get("accelerator")):
        trainer_kwargs["deterministic"] = True
    trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=logger, **trainer_kwargs)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams({"config": config_dict, "overrides": overrides})

    # 4. train; post-training pruning (oneshot at start=1.0) happens in on_train_end: validate again after
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(Path(ckpt_path).expanduser()) if ckpt_path else None)
    val_acc = _scalar(trainer.callback_metrics.get("val/acc"))
    val_acc_before = None
    if prune_cb is not None and getattr(prune_cb, "metrics_before_pruning", None) is not None:
        val_acc_before = prune_cb.metrics_before_pruning.get("val/acc")
        trainer.validate(model, datamodule=datamodule, verbose=False)
        val_acc = _scalar(trainer.callback_metrics.get("val/acc"))
    test_acc = None
    if cfg.get("test", True) and datamodule.has_test:
        test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)
        test_acc = _scalar(test_metrics[0].get("test/acc")) if test_metrics else None
    if cfg.get("callbacks") is not None and cfg.callbacks.get("checkpoint") is not None:
        trainer.save_checkpoint(output_dir / "checkpoints" / "final.ckpt", weights_only=False)

    # 5. report
    if isinstance(prune_cb, MagnitudePruneCallback) and prune_cb.parameter_names:
        prunable = list(prune_cb.parameter_names)
    else:
        prunable = prunable_names(model)  # what SparsityLogger reports without a prune callback
    params_total, params_nonzero = parameter_counts(model)
    prunable_total, prunable_nonzero = parameter_counts(model, prunable)
    results: dict[str, Any] = {
        "experiment": _experiment_name(cfg, overrides),
        "val_acc": val_acc,
        "val_acc_before_prune": val_acc_before,
        "test_acc": test_acc,
        "sparsity": 1.0 - prunable_nonzero / prunable_total if prunable_total else 0.0,
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "prunable_total": prunable_total,
        "prunable_nonzero": prunable_nonzero,
        "clip": clip_cb.summary() if isinstance(clip_cb, GradientClipCallback) else None,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seed": cfg.get("seed"),
        "wall_time_s": time.perf_counter() - t0,
        "overrides": overrides,
        "output_dir": str(output_dir),
    }
    if val_acc_before is None:
        del results["val_acc_before_prune"]
    if test_acc is None:
        del results["test_acc"]
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _print_summary(results)
        rank_zero_info(f"results: {output_dir / 'results.json'}")
    return results


def _print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    table = Table(title=f"lightning-clipprune: {results['experiment']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("val accuracy", pct(results["val_acc"]))
    if "val_acc_before_prune" in results:
        table.add_row("val accuracy before pruning", pct(results["val_acc_before_prune"]))
    if "test_acc" in results:
        table.add_row("test accuracy", pct(results["test_acc"]))
    table.add_row("sparsity (prunable weights)", pct(results["sparsity"]))
    table.add_row(
        "parameters kept",
        f"{results['params_nonzero']:,} / {results['params_total']:,} "
        f"({pct(results['params_nonzero'] / max(results['params_total'], 1))})",
    )
    clip = results.get("clip")
    if clip:
        table.add_row(
            "gradient clipping",
            f"{pct(clip['clipped_fraction'])} of {int(clip['steps'])} steps; "
            f"norm mean {clip['mean_norm']:.3g}, max {clip['max_norm']:.3g}"
            + (f"; {int(clip['nonfinite_skipped'])} non-finite skipped" if clip["nonfinite_skipped"] else ""),
        )
    else:
        table.add_row("gradient clipping", "off")
    table.add_row("epochs / steps", f"{results['epochs']} / {results['steps']}")
    table.add_row("wall time", f"{results['wall_time_s']:.1f} s")
    Console().print(table)


def _fail(err: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {_one_line(_root_cause(err)) if not isinstance(err, ConfigError) else err}", file=sys.stderr)
    sys.exit(1)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``python -m lightning_clipprune.run [overrides]``: see the module docstring and ``conf/config.yaml``."""
    # OpenMP threads spin while they wait for work; on a shared or oversubscribed CPU (other jobs, DDP ranks
    # on one machine) the spinning threads starve the working ones: one Fashion-MNIST epoch took 110 s
    # instead of 3.5 s on 2 busy cores. Sleeping waiters cost nothing measurable here. Only effective
    # before torch is imported (it is not yet, here); a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_clipprune.data.locate import DataNotFoundError

    try:
        train(cfg, list(HydraConfig.get().overrides.task))
    except (ConfigError, DataNotFoundError, MisconfigurationException) as err:
        _fail(err)


if __name__ == "__main__":
    main()
