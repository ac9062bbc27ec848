"""App-level checks of the composed config, before anything is built or trained.

The callbacks, models and data modules check their own arguments when they are built; this module
checks what only the app knows about: the Trainer's length, the seed, thread counts, the optimizer's
hyper-parameters, and settings that contradict each other. Every failure is one :class:`ConfigError`
line naming the config key, the value and the fix.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

__all__ = ["ConfigError", "check_config", "one_line", "root_cause"]


class ConfigError(ValueError):
    """A bad value in the composed config, raised before training starts; the message is one line."""


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's ``InstantiationException`` wrappers (the one that names the bad value)."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    """The error's message on one line (the exception's type name when it has no message)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _int_or_none(cfg: DictConfig, key: str, value: Any, *, low: int, allow_none: bool, what: str) -> None:
    ok = (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value >= low)
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {what}")


def check_config(cfg: DictConfig) -> None:
    """Check the app-level values of ``cfg``; the groups' own values are checked when they are built.

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_config(OmegaConf.create({"trainer": {"max_epochs": 0}}))
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: trainer.max_epochs=0: must be an integer >= 1 ...
    """
    trainer = cfg.get("trainer") or {}
    _int_or_none(cfg, "trainer.max_epochs", trainer.get("max_epochs"), low=1, allow_none=True,
                 what="an integer >= 1 (the app trains for a fixed number of epochs; -1, 'infinite', is not supported)")
    max_steps = trainer.get("max_steps", -1)
    if max_steps != -1:
        _int_or_none(cfg, "trainer.max_steps", max_steps, low=1, allow_none=True, what="-1 (no limit) or an integer >= 1")
    if trainer.get("max_epochs") is None and max_steps in (-1, None):
        raise ConfigError("trainer.max_epochs=null and trainer.max_steps=-1: the run would never end; set one of them")
    _int_or_none(cfg, "seed", cfg.get("seed"), low=0, allow_none=True, what="an integer >= 0 or null (unseeded)")
    _int_or_none(cfg, "cpu_threads", cfg.get("cpu_threads"), low=1, allow_none=True,
                 what="an integer >= 1 or null (torch's default: one thread per core)")
    for key in ("test", "verbose"):
        if key in cfg and not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key}={cfg.get(key)!r}: must be true or false")
    if trainer.get("gradient_clip_val") and cfg.get("clip") is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.get('gradient_clip_val')!r} and the clip group both clip gradients: "
            "drop one (`trainer.gradient_clip_val=null`, or `~clip` to use Lightning's clipping)"
        )
    prune = cfg.get("prune")
    if prune is not None and prune.get("sparsity") is not None and prune.get("threshold") is not None:
        raise ConfigError(
            f"prune.sparsity={prune.sparsity!r} and prune.threshold={prune.threshold!r} are both set: for the threshold "
            f"rule use `prune=threshold prune.threshold={prune.threshold}` (or add `prune.sparsity=null`); "
            "for a sparsity target, leave prune.threshold out"
        )
    _check_optimizer(cfg)


def _check_optimizer(cfg: DictConfig) -> None:
    """Build the model's optimizer on a dummy parameter: torch checks lr, momentum, betas, ... there."""
    model = cfg.get("model")
    node = model.get("optimizer") if model is not None and hasattr(model, "get") else None
    if node is None or not hasattr(node, "get") or node.get("_target_") is None:
        return
    import hydra
    import torch
    from hydra.errors import InstantiationException

    try:
        factory = hydra.utils.instantiate(node, _convert_="all")
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (InstantiationException, ValueError, TypeError) as err:
        raise ConfigError(f"model.optimizer: {one_line(root_cause(err))}") from None
