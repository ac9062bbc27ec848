"""Config -> components: the data module, the callbacks, the model, the logger and the Trainer.

Everything is built, and the data located, before anything trains: a bad value fails in seconds with a
one-line :class:`~lightning_clipprune.app.checks.ConfigError` naming the config key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from lightning_clipprune.app.checks import ConfigError, check_buildable, one_line, root_cause

__all__ = ["Components", "build", "instantiate", "on_cpu"]


@dataclass
class Components:
    """What :func:`build` makes from a config; ``clip`` and ``prune`` are None when the group is off."""

    datamodule: Any
    model: Any
    trainer: Any
    callbacks: list[Any] = field(default_factory=list)
    clip: Any | None = None
    prune: Any | None = None


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, with any error turned into a one-line :class:`ConfigError` naming ``key``.

    Raises:
        ConfigError: the object could not be built (bad value, unknown ``_target_``...), or ``node`` names nothing to
            build (no ``_target_``: Hydra would hand it on as a plain dict).
        DataNotFoundError: a data module could not find its files (already one line naming ``data.root``).
    """
    check_buildable(key, node)
    import hydra
    from hydra.errors import InstantiationException

    from lightning_clipprune.data.locate import DataNotFoundError

    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except (InstantiationException, ValueError, TypeError, FileNotFoundError) as err:
        root = root_cause(err)
        if isinstance(root, DataNotFoundError):
            raise root from None
        # an InstantiationException without a cause (a _target_ that does not import): its first line
        text = str(root).splitlines()[0] if isinstance(root, InstantiationException) else one_line(root)
        if key == "trainer" and "No supported gpu backend found" in text:  # Lightning's words, without a fix
            text += (f" (trainer.accelerator={node.get('accelerator')!r}: torch sees no GPU on this machine; "
                     "use trainer=cpu, or trainer=default to pick the device)")
        raise ConfigError(f"{key}: {text}") from err


def on_cpu(accelerator: Any) -> bool:
    """Whether a Trainer with this ``accelerator`` setting trains on the CPU."""
    import torch

    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _model_summary(cfg: DictConfig) -> list[Any]:
    """Lightning's layer table without its FLOPs column, which reads 0 for models without an example input."""
    if not cfg.trainer.get("enable_model_summary", True):
        return []
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    class _Summary(ModelSummary):
        @staticmethod
        def summarize(
            summary_data: list[tuple[str, list[str]]],
            total_parameters: int,
            trainable_parameters: int,
            model_size: float,
            total_training_modes: dict[str, int],
            total_flops: int,
            **kwargs: Any,
        ) -> None:
            from rich.console import Console
            from rich.table import Table

            columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
            table = Table(header_style="bold magenta")
            for name, _ in columns:
                table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left")
            for row in zip(*(values for _, values in columns), strict=True):
                table.add_row(*row)
            console = Console()
            console.print(table)
            console.print(
                f"params: {get_human_readable_count(trainable_parameters).strip()} trainable, "
                f"{get_human_readable_count(total_parameters - trainable_parameters).strip()} frozen, "
                f"{model_size:,.3f} MB" + (f"; FLOPs: {get_human_readable_count(total_flops)}" if total_flops else ""),
                highlight=False,
            )

    return [_Summary()]


def _interrupt_checkpoint(cfg: DictConfig) -> list[Any]:
    """A checkpoint at Ctrl-C or SIGTERM, where the run's ``callbacks.checkpoint`` writes (none without it)."""
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    if node is None or not node.get("dirpath"):
        return []
    from lightning_clipprune.app.interrupt_checkpoint import InterruptCheckpoint

    filename = str(node.get("filename") or "last")
    return [InterruptCheckpoint(str(node.dirpath), "last" if "{" in filename else filename)]


def build(cfg: DictConfig) -> Components:
    """Build every component of a run from the composed config (data located, nothing trained).

    Args:
        cfg: the composed config (``conf/config.yaml`` and its groups), checked by
            :func:`~lightning_clipprune.app.checks.check_config`.

    Returns:
        The components; the callbacks are in the Trainer in the order clip, prune, the ``callbacks`` group,
        then the app's own (model summary, :class:`~lightning_clipprune.app.guards.FiniteWeights`,
        :class:`~lightning_clipprune.app.guards.SigtermRelay`, and
        :class:`~lightning_clipprune.app.interrupt_checkpoint.InterruptCheckpoint` beside
        ``callbacks.checkpoint``: Ctrl-C or SIGTERM during training writes ``last.ckpt`` at that step).

    Raises:
        ConfigError: a value a component refuses (the message names the config key and the value).
        DataNotFoundError: the data set is neither on disk nor downloadable.
    """
    # 1. data: located (or downloaded) now, so a missing data set fails before anything else is built
    datamodule = instantiate(cfg.data, "data")
    datamodule.prepare_data()

    # 2. callbacks: clip, prune, then the others; a deleted group (~clip, ~prune) or a null entry is skipped
    clip = instantiate(cfg.clip, "clip") if cfg.get("clip") is not None else None
    prune = instantiate(cfg.prune, "prune") if cfg.get("prune") is not None else None
    callbacks: list[Any] = [cb for cb in (clip, prune) if cb is not None]
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            callbacks.append(instantiate(node, f"callbacks.{key}"))
    callbacks.extend(_model_summary(cfg))
    # the app's guards: weights that turn NaN/inf end the run before that epoch's checkpoint is written;
    # a SIGTERM after the last training step lets the run finish (app/interrupts.py says why)
    from lightning_clipprune.app.guards import FiniteWeights, SigtermRelay

    callbacks.extend([FiniteWeights(), SigtermRelay(), *_interrupt_checkpoint(cfg)])

    # 3. model, logger, trainer
    model = instantiate(cfg.model, "model")
    logger = instantiate(cfg.logger, "logger") if cfg.get("logger") is not None else False
    kwargs: dict[str, Any] = {}
    if cfg.trainer.get("deterministic") is None and cfg.get("seed") is not None and on_cpu(cfg.trainer.get("accelerator")):
        kwargs["deterministic"] = True
    from lightning_clipprune.checkpoint_io import AtomicCheckpointIO

    # checkpoints written in their own folder and renamed: never half-written, even on another filesystem
    kwargs["plugins"] = [AtomicCheckpointIO()]
    trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=logger, **kwargs)
    return Components(datamodule=datamodule, model=model, trainer=trainer, callbacks=callbacks, clip=clip, prune=prune)
