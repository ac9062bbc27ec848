"""Every value of a command-line sweep checked before the first job starts: :func:`check_sweep_values`.

``python -m lightning_clipprune.run -m prune.sparsity=0.9,1.5`` would otherwise train the 0.9 job and only
then report that 1.5 is not a sparsity. Each value of each comma-separated sweep is composed once (the other
sweeps at their first value) and checked with :func:`~lightning_clipprune.app.checks.check_config`, the same
check each job runs before torch loads; the first bad one is the usual one line, naming the swept value of its
job when it is not the first job (``in the sweep's job with prune.sparsity=1.5: ...``). A ``hydra.sweep.dir`` that
holds an earlier sweep's runs is refused here too, in one line naming it
(:func:`~lightning_clipprune.app.rundir.check_sweep_dir`), instead of every job being refused in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_clipprune.app.checks import ConfigError, check_config
from lightning_clipprune.app.cli import _overrides
from lightning_clipprune.app.rundir import check_sweep_dir, launching_process

__all__ = ["check_sweep_values"]

#: Options that choose another config: the sweep is then left to its jobs.
_OTHER_CONFIG = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def check_sweep_values(argv: Sequence[str], config_dir: Path, config_name: str = "config") -> None:
    """With ``-m``/``--multirun``: compose and check every value of the command line's ``key=a,b,c`` sweeps (and
    the bounds of its ``range(...)`` sweeps).

    Args:
        argv: the command line's arguments (without the program).
        config_dir: the app's config folder.
        config_name: its primary config.

    Raises:
        ConfigError: the first bad value, in the words of the job's own check; a ``hydra.sweep.dir`` that holds an
            earlier sweep's runs.

    Example::

        check_sweep_values(["-m", "prune.sparsity=0.9,1.5"], config_dir())  # ConfigError: ... got 1.5.
    """
    if not any(arg in ("-m", "--multirun") for arg in argv) or any(arg in _OTHER_CONFIG for arg in argv):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    try:
        parsed = OverridesParser.create().parse_overrides(_overrides(argv))
    except Exception:  # Hydra reports a malformed override itself, in its own words
        return
    # a sweep of the sweeper's own settings (hydra.sweeper.params...) is its search space, not a job's value
    # a glob(...) over a group's options needs Hydra's config loader to expand: left to Hydra and the jobs
    sweeps = [
        o for o in parsed
        if o.is_sweep_override() and (o.is_choice_sweep() or o.is_range_sweep())
        and not o.key_or_group.startswith("hydra.") and o.value_type is not ValueType.GLOB_CHOICE_SWEEP
    ]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    values = {id(o): _values(o) for o in sweeps}
    if not sweeps or not all(values.values()):  # an empty range: Hydra says so
        first = _compose(config_dir, config_name, fixed)
        _check_ranks_draw_alike(first)
        _check_sweep_dir(first)
        return
    firsts = {id(o): f"{_key(o)}={values[id(o)][0]}" for o in sweeps}
    # every other job differs from the first in one swept value: a failure there is that value's, and says so
    jobs = [("", [*fixed, *firsts.values()])] + [
        (f"{_key(sweep)}={value}", [*fixed, *(firsts[id(o)] for o in sweeps if o is not sweep), f"{_key(sweep)}={value}"])
        for sweep in sweeps for value in values[id(sweep)][1:]
    ]
    configs = [(label, cfg) for label, job in jobs if (cfg := _compose(config_dir, config_name, job)) is not None]
    _check_ranks_draw_alike(configs[0][1] if configs and not configs[0][0] else None)  # the first job's config
    _check_sweep_dir(configs[0][1] if configs and not configs[0][0] else None)
    for optimizer in (False, True):  # every value's quick checks first; the optimizer's (torch) after
        for label, cfg in configs:
            try:
                _check(cfg, optimizer)
            except ConfigError as err:
                if not label:
                    raise
                raise ConfigError(f"in the sweep's job with {label}: {err}") from None


def _check_ranks_draw_alike(cfg: Any) -> None:
    """Refuse a sweeper that draws trials at random, unseeded, under a multi-process DDP Trainer.

    Lightning relaunches the whole command, ``-m`` included, once per extra process, so every process runs the
    sweep itself: with an unseeded sampler each draws other trials, and one DDP job would train two different
    models (their metrics averaged, rank zero's checkpoint saved). ``cfg``: a job's config (None: not composed).
    """
    if cfg is None:
        return
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices")
    if "ddp" not in str(trainer.get("strategy", "")) or devices in (1, "1", [0]):
        return
    sweeper = cfg.hydra.get("sweeper") or {}
    target = str(sweeper.get("_target_", ""))
    sampler = sweeper.get("sampler")
    if "BasicSweeper" in target or not hasattr(sampler, "get") or sampler.get("seed") is not None:
        return
    raise ConfigError(
        f"hydra.sweeper.sampler.seed=null with trainer.strategy={trainer.get('strategy')!r}: Lightning starts every"
        " extra DDP process with the same command, -m included, so each process runs the sweep and an unseeded"
        " sampler draws other trials in each; set hydra.sweeper.sampler.seed=<an integer>"
    )


def _check_sweep_dir(cfg: Any) -> None:
    """Refuse the sweep's folder when it holds an earlier sweep's runs (``cfg``: the first job's config; None: not
    composed). Only in the launching process: a DDP process Lightning starts runs this command again, into the
    folder this sweep is filling."""
    if cfg is None or not launching_process():
        return
    try:
        sweep_dir = str(cfg.hydra.sweep.dir)
    except Exception:  # refers to something only the running sweep knows: left to the jobs
        return
    check_sweep_dir(Path(sweep_dir))


def _values(override: Any) -> list[str]:
    """A choice sweep's values as typed; a range's first and last (its bounds are what a check can refuse)."""
    if override.is_choice_sweep():
        return list(override.sweep_string_iterator())
    first = last = None
    for value in override.sweep_string_iterator():
        first = value if first is None else first
        last = value
    return [v for v in dict.fromkeys((first, last)) if v is not None]


def _key(override: Any) -> str:
    return f"{override.get_key_element()}"


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> Any:
    """One job's config as Hydra composes it, or None when it cannot be composed here (Hydra reports that)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception:  # a missing group option, a bad override: Hydra reports it in its own words
        return None
    # a job's run-time values (its number, its output folder) do not exist before it starts: placeholders,
    # so that the checks can resolve what refers to them
    cfg.hydra.job.num, cfg.hydra.job.id, cfg.hydra.runtime.output_dir = 0, "0", str(config_dir)
    return cfg


def _check(cfg: Any, optimizer: bool) -> None:
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    try:
        check_config(cfg, optimizer=optimizer)
    except ConfigError:
        raise
    except Exception:  # a check that needs the running job: left to the job
        return
    finally:
        HydraConfig.instance().cfg = None
