"""The jobs a ``-m`` sweep planned, read back from its ``multirun.yaml``: which of them have no folder yet.

A sweep stopped by Ctrl-C or SIGTERM (or still running) has fewer job folders than jobs; the sweep report lists
the missing ones with the command that runs each into the folder the sweep would have given it. Only Hydra's
basic sweeper (a grid: every combination of the swept values, in order) is read; another sweeper's plan is not
known ahead, nor a ``shuffle(...)`` sweep's order or a ``glob(...)``'s options, and nothing is listed for them.

``multirun.yaml`` is a file from somewhere else like the job folders: it is read bounded with the safe YAML
loader and its override strings are parsed by Hydra's own grammar (no interpolation is resolved, nothing is run).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_clipprune.app.untrusted import UntrustedFileError, read_string_list, read_yaml

__all__ = ["MAX_PLANNED", "config_arguments", "planned_jobs", "planned_sweep"]

#: a grid with more jobs than this is not expanded (the report lists nothing missing for it)
MAX_PLANNED = 10_000
_BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def planned_jobs(sweep_dir: str | os.PathLike) -> list[list[str]] | None:
    """The task overrides of every job the basic sweeper planned for ``sweep_dir``, in job order (job ``i`` is
    entry ``i``); None when there is no readable ``multirun.yaml``, the sweeper is another one, or the plan
    cannot be expanded (a sweep Hydra's grammar refuses without the config, more than :data:`MAX_PLANNED` jobs).

    Example::

        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> _ = (d / "multirun.yaml").write_text(
        ...     "hydra:\\n  sweeper: {_target_: " + _BASIC + "}\\n  overrides: {task: ['a=1,2', b=x]}\\n")
        >>> planned_jobs(d)
        [['a=1', 'b=x'], ['a=2', 'b=x']]
    """
    return planned_sweep(sweep_dir)[0]


def planned_sweep(sweep_dir: str | os.PathLike) -> tuple[list[list[str]] | None, list[str]]:
    """:func:`planned_jobs` and the sweep's :func:`config_arguments`, from one read of its ``multirun.yaml``
    (``(None, [])`` without a readable one)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not os.path.lexists(path) or path.is_symlink():
        return None, []
    try:
        hydra = (read_yaml(path) or {}).get("hydra")
        config = config_arguments(hydra or {})
        sweeper = hydra.get("sweeper") or {}
        if sweeper.get("_target_") != _BASIC:
            return None, config
        params = sweeper.get("params") or {}
        task = read_string_list((hydra.get("overrides") or {}).get("task"), path)
        return _expand([f"{k}={v}" for k, v in params.items()] + task), config
    except (UntrustedFileError, AttributeError, TypeError):
        return None, []


def config_arguments(hydra: Any) -> list[str]:
    """The command-line options that chose the configs of a run, from its Hydra config ``hydra`` (the ``hydra``
    node of ``multirun.yaml``, or ``HydraConfig.get()``): ``--config-dir`` for each folder given on the command
    line, ``--config-name`` for another primary config than the app's. A command printed without them would not
    find ``+experiment=NAME`` from the user's folder.

    Example::

        >>> config_arguments({"runtime": {"config_sources": [{"path": "/my/conf", "schema": "file",
        ...     "provider": "command-line"}]}, "job": {"config_name": "config"}})
        ['--config-dir', '/my/conf']
    """
    try:
        sources = (hydra.get("runtime") or {}).get("config_sources") or []
        args = []
        for source in sources:
            if source.get("provider") == "command-line" and source.get("schema") == "file" and source.get("path"):
                args += ["--config-dir", str(source.get("path"))]
        name = (hydra.get("job") or {}).get("config_name")
        if isinstance(name, str) and name and name != "config":
            args += ["--config-name", name]
        return args
    except (AttributeError, TypeError):
        return []


def _expand(overrides: Sequence[str]) -> list[list[str]] | None:
    """The basic sweeper's grid of ``overrides`` (its ``split_arguments``), or None."""
    from hydra.core.override_parser.overrides_parser import (
        OverridesParser,  # lazy: only a sweep report needs it
    )

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        lists: dict[str, list[str]] = {}
        for o in parsed:
            key = o.get_key_element()
            if o.is_sweep_override():
                # shuffle(...) draws another order each time: which job went to which folder is not known
                if not o.is_discrete_sweep() or getattr(o.value(), "shuffle", False):
                    return None
                values = list(itertools.islice(o.sweep_string_iterator(), MAX_PLANNED + 1))
                lists[key] = [f"{key}={v}" for v in values]
            else:
                lists[key] = [f"{key}={o.get_value_element_as_str()}"]
    except Exception:  # Hydra's grammar refused a string (or needs the config to expand it): no plan
        return None
    if math.prod(len(v) for v in lists.values()) > MAX_PLANNED:
        return None
    return [list(x) for x in itertools.product(*lists.values())]
