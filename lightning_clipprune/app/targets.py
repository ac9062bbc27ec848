"""What a config read from a file may build: only the suite's own classes, checked on the composed config.

A run folder (its ``run_config.json``, ``.hydra/overrides.yaml``, ``results.json``) is a file from somewhere
else. Hydra's ``instantiate`` calls whatever ``_target_`` names, so an override such as
``model.net._target_=os.system`` read from such a file would run code. :func:`check_overrides` refuses
override strings that set Hydra's special keys or pick a group option that is not one of the suite's own
files; :func:`check_targets` then walks the whole composed config (every node, after composition and after
resolving interpolations) and refuses any ``_target_`` outside :data:`ALLOWED_TARGETS`, Hydra's other
special keys, and interpolation resolvers outside :data:`SAFE_RESOLVERS`. Each refusal is one line naming
the key.

Example::

    from lightning_clipprune.app.targets import check_overrides, check_targets

    overrides = check_overrides(overrides_from_the_file, source="RUN/run_config.json")
    cfg = check_targets(compose("config", overrides=overrides))  # build only from what it returns
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lightning_clipprune.app.checks import ConfigError, one_line

__all__ = ["ALLOWED_TARGETS", "SAFE_RESOLVERS", "UntrustedConfigError", "check_overrides", "check_targets"]

#: Every ``_target_`` a config read from a file may name: the ``_target_`` values of ``conf/**/*.yaml``
#: (the suite's callbacks, data modules, models, Hydra callbacks; Lightning's Trainer, ModelCheckpoint and
#: loggers; SGD) plus the documented optimizers ``model.optimizer._target_`` may be switched to, and the
#: app's classes under their older public paths (``lightning_clipprune.models.MLP``, kept as aliases).
#: ``tests/test_trust_runfolder.py`` checks that every ``_target_`` in ``conf/`` is listed here.
ALLOWED_TARGETS: frozenset[str] = frozenset({
    "lightning_clipprune.GradientClipCallback",
    "lightning_clipprune.MagnitudePruneCallback",
    "lightning_clipprune.SparsityLogger",
    "lightning_clipprune.app.data.CIFAR10DataModule",
    "lightning_clipprune.app.data.DigitsDataModule",
    "lightning_clipprune.app.data.FashionMNISTDataModule",
    "lightning_clipprune.app.data.MNISTDataModule",
    "lightning_clipprune.app.models.Classifier",
    "lightning_clipprune.app.models.CifarResNet",
    "lightning_clipprune.app.models.LeNet300100",
    "lightning_clipprune.app.models.LeNet5",
    "lightning_clipprune.app.models.MLP",
    "lightning_clipprune.app.models.SeedCNN",
    "lightning_clipprune.app.hydra_callbacks.ResultsObjective",
    "lightning_clipprune.app.hydra_callbacks.RunFolderGuard",
    "lightning_clipprune.app.hydra_callbacks.SweepReport",
    # the same classes under their paths before they moved into the app (run folders written then)
    "lightning_clipprune.data.CIFAR10DataModule",
    "lightning_clipprune.data.DigitsDataModule",
    "lightning_clipprune.data.FashionMNISTDataModule",
    "lightning_clipprune.data.MNISTDataModule",
    "lightning_clipprune.models.Classifier",
    "lightning_clipprune.models.CifarResNet",
    "lightning_clipprune.models.LeNet300100",
    "lightning_clipprune.models.LeNet5",
    "lightning_clipprune.models.MLP",
    "lightning_clipprune.models.SeedCNN",
    "lightning_clipprune.hydra_callbacks.ResultsObjective",
    "lightning_clipprune.hydra_callbacks.RunFolderGuard",
    "lightning_clipprune.hydra_callbacks.SweepReport",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "torch.optim.SGD",
    "torch.optim.Adam",  # documented alternatives for model.optimizer
    "torch.optim.AdamW",
})

#: Interpolation resolvers a config read from a file may use: they read values (another key, an
#: environment variable, the date, Hydra's runtime settings) and build nothing. ``oc.decode`` and
#: ``oc.create`` turn a string into config nodes, a way to smuggle a ``_target_`` in; any resolver
#: registered by other code is unknown. Both are refused.
SAFE_RESOLVERS: frozenset[str] = frozenset(
    {"oc.env", "oc.select", "oc.dict.keys", "oc.dict.values", "oc.deprecated", "now", "hydra", "run_id"}
)

#: Hydra's special keys: an override from a file may set none of them.
RESERVED_KEYS: tuple[str, ...] = ("_target_", "_partial_", "_args_", "_call_", "_recursive_", "_convert_")
#: Special keys the suite's own configs never use: refused anywhere in a composed config.
_REFUSED_IN_CONFIG = ("_args_", "_call_", "_recursive_", "_convert_")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
_OPTION_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class UntrustedConfigError(ConfigError):
    """A config read from a file asks for something only the user's own command line may ask for (one line)."""


def _config_dir() -> Path:
    # lazy: run.py imports app.rundir, which imports this module (an import cycle at the top)
    from lightning_clipprune.run import config_dir

    return config_dir()


def _walk_reserved(value: Any, path: str, source: str) -> None:
    """Refuse Hydra's special keys anywhere inside an override's value (a dict or list given inline)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) in RESERVED_KEYS:
                raise UntrustedConfigError(
                    f"{source}: override sets {path}.{k}: Hydra's `{k}` may not come from a file "
                    "(the search rebuilds the model only from the suite's own config groups)"
                )
            _walk_reserved(v, f"{path}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk_reserved(v, f"{path}[{i}]", source)


def _check_group_choice(group: str, value: Any, text: str, source: str) -> None:
    """A config-group override from a file must name one of the group's own YAML files."""
    if value is None:  # ~group: deleted
        return
    options = sorted(p.stem for p in (_config_dir() / group).glob("*.yaml"))
    if not isinstance(value, str) or not _OPTION_NAME.fullmatch(value) or value not in options:
        raise UntrustedConfigError(
            f"{source}: override {text!r}: {group}={value!r} is not one of the suite's {group} configs "
            f"({', '.join(options)})"
        )


def check_overrides(overrides: Iterable[str], *, source: str) -> list[str]:
    """Check override strings read from a file before they are composed; return them as a list.

    Refused: a key path through one of Hydra's special keys (``model.net._target_=...``, ``_partial_``,
    ``_args_``, ``_call_``, ``_recursive_``, ``_convert_``), an inline dict holding one, a sweep
    (``a=1,2``), and a config-group choice that is not one of the suite's own files (``model=../../x``
    would load any YAML file on the machine). ``hydra.``/``hydra/`` overrides are for the caller to drop.

    Args:
        overrides: the override strings, as written by the run.
        source: the file they came from, named in the message.

    Raises:
        UntrustedConfigError: (a ``ValueError``) one line naming the file and the override.
    """
    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except Exception as err:  # Hydra's grammar errors are several lines; the first says enough
            raise UntrustedConfigError(f"{source}: cannot read override {text!r}: {one_line(err).split(' See ')[0]}") from None
        key = override.key_or_group
        for part in re.split(r"[./@]", f"{key}@{override.package or ''}"):
            if part in RESERVED_KEYS:
                raise UntrustedConfigError(
                    f"{source}: override {text!r} sets {key}: Hydra's `{part}` may not come from a file "
                    "(the search rebuilds the model only from the suite's own config groups)"
                )
        if override.is_sweep_override():
            raise UntrustedConfigError(f"{source}: override {text!r} is a sweep; a run's record holds single values")
        value = None if override.is_delete() else override.value()
        if "/" in key or (_config_dir() / key).is_dir():
            _check_group_choice(key, value, text, source)
        _walk_reserved(value, key, source)
        out.append(str(text))
    return out


def _path(parent: str, key: Any) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else str(key))


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(path, text)`` of every string in a nested container of dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, _path(path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, _path(path, i))
    elif isinstance(value, str):
        yield path, value


def _check_resolvers(value: Any, path: str) -> None:
    for where, text in _strings(value, path):
        for name in _RESOLVER.findall(text):
            if name not in SAFE_RESOLVERS:
                raise UntrustedConfigError(
                    f"{where}={text!r}: the interpolation resolver {name!r} is not allowed in a config read from "
                    f"a file (allowed: {', '.join(sorted(SAFE_RESOLVERS))})"
                )


def _check_resolved(value: Any, path: str) -> None:
    """No interpolation may be left after resolving: a value that resolves to ``${...}`` (built from pieces, or
    escaped) would be resolved again when the config is used, by a resolver the first scan never saw."""
    for where, text in _strings(value, path):
        if "${" in text:
            raise UntrustedConfigError(
                f"{where}={text!r}: resolves to another interpolation; not allowed in a config read from a file"
            )


def _check_nodes(value: Any, path: str, allowed: frozenset[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            where = _path(path, k)
            if k == "_target_" and (not isinstance(v, str) or v not in allowed):
                raise UntrustedConfigError(
                    f"{where}={v!r}: not one of the suite's own classes; a config read from a file builds only "
                    "those (lightning_clipprune.app.targets.ALLOWED_TARGETS)"
                )
            if k in _REFUSED_IN_CONFIG:
                raise UntrustedConfigError(f"{where}={v!r}: Hydra's `{k}` is not allowed in a config read from a file")
            _check_nodes(v, where, allowed)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_nodes(v, _path(path, i), allowed)


def check_targets(cfg: Any, *, extra: Sequence[str] = ()) -> Any:
    """Check a composed config before anything is built from it; return the resolved copy that was checked.

    First every string is scanned for interpolation resolvers outside :data:`SAFE_RESOLVERS` (before any
    resolver runs); then a copy is resolved, and a value that resolved to a new ``${...}`` is refused (so no
    interpolation is left and no resolver runs again); then every node of it is walked:
    each ``_target_`` must be in :data:`ALLOWED_TARGETS` (or ``extra``), and Hydra's ``_args_``,
    ``_call_``, ``_recursive_`` and ``_convert_`` are refused. Build from the returned copy, so that what
    was checked is what is built.

    Args:
        cfg: the composed config (a ``DictConfig``).
        extra: further ``_target_`` values to admit (classes the caller trusts).

    Returns:
        A resolved deep copy of ``cfg``.

    Raises:
        UntrustedConfigError: (a ``ValueError``) one line naming the key and the value.
        ConfigError: an interpolation that does not resolve.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_targets(OmegaConf.create({"model": {"_target_": "os.system", "command": "id"}}))
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.targets.UntrustedConfigError: model._target_='os.system': not one of the suite's own classes; ...
    """
    _check_resolvers(OmegaConf.to_container(cfg, resolve=False), "")
    resolved = copy.deepcopy(cfg)
    try:
        OmegaConf.resolve(resolved)
    except Exception as err:  # a missing key or an unset environment variable: OmegaConf's error names it
        raise ConfigError(f"the config does not resolve: {one_line(err)}") from None
    container = OmegaConf.to_container(resolved, resolve=False)
    _check_resolved(container, "")
    _check_nodes(container, "", ALLOWED_TARGETS.union(extra))
    return resolved
