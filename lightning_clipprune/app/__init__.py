"""The Hydra app behind ``python -m lightning_clipprune.run``, in stages that are tested one by one.

- :mod:`~lightning_clipprune.app.checks`: app-level values checked before anything is built
  (:class:`ConfigError`, one line naming the key and the value).
- :mod:`~lightning_clipprune.app.build`: config -> components (data, callbacks, model, logger, Trainer).
- :mod:`~lightning_clipprune.app.fit`: fit, validate after post-training pruning, test; Ctrl-C and
  SIGTERM end in an :class:`~lightning_clipprune.app.fit.Outcome` marked interrupted.
- :mod:`~lightning_clipprune.app.summary`: ``results.json`` (written atomically), the console summary,
  and the command that resumes an interrupted run.
- :mod:`~lightning_clipprune.app.rundir`: one output folder per run, never shared by two runs.
- :mod:`~lightning_clipprune.app.cli`: Hydra's own errors (unknown key or group option, bad grammar) as
  one line; overrides that would write outside the run's folder refused before Hydra acts.
- :mod:`~lightning_clipprune.app.resume`: ``ckpt_path`` checked against the built run before Lightning
  reads it (a state dict, a weights-only file, another model or optimizer: one line).
- :mod:`~lightning_clipprune.app.interrupts`, :mod:`~lightning_clipprune.app.guards`: SIGTERM at any
  point ends in one line and status 143 (after the last step the run finishes first); weights that turn
  NaN/inf end the run in one line, before a checkpoint or ``results.json`` holds them.
- :mod:`~lightning_clipprune.app.models`, :mod:`~lightning_clipprune.app.data`: the networks, the
  ``Classifier`` and the in-memory data modules the configs build (torch and Lightning only).
- :mod:`~lightning_clipprune.app.report`, :mod:`~lightning_clipprune.app.hydra_callbacks`: the sweep report
  and the Hydra callbacks; :mod:`~lightning_clipprune.app.search_cli`: ``python -m lightning_clipprune.search``.

:mod:`lightning_clipprune.run` strings them together (``train``) and is the command-line entry (``main``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_clipprune.app.checks import ConfigError

__all__ = ["ConfigError"]


def __getattr__(name: str) -> Any:
    # lazy: `lightning_clipprune.app.models` and `.data` need only torch and Lightning; the package must not
    # pull omegaconf (through app.checks) in for them
    if name == "ConfigError":
        return importlib.import_module("lightning_clipprune.app.checks").ConfigError
    raise AttributeError(f"module 'lightning_clipprune.app' has no attribute {name!r}")
