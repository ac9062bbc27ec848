"""The Hydra app behind ``python -m lightning_clipprune.run``, in stages that are tested one by one.

- :mod:`~lightning_clipprune.app.checks`: app-level values checked before anything is built
  (:class:`ConfigError`, one line naming the key and the value).
- :mod:`~lightning_clipprune.app.build`: config -> components (data, callbacks, model, logger, Trainer).
- :mod:`~lightning_clipprune.app.fit`: fit, validate after post-training pruning, test; Ctrl-C and
  SIGTERM end in an :class:`~lightning_clipprune.app.fit.Outcome` marked interrupted.
- :mod:`~lightning_clipprune.app.summary`: ``results.json`` (written atomically), the console summary,
  and the command that resumes an interrupted run.
- :mod:`~lightning_clipprune.app.rundir`: one output folder per run, never shared by two runs.

:mod:`lightning_clipprune.run` strings them together (``train``) and is the command-line entry (``main``).
"""

from lightning_clipprune.app.checks import ConfigError

__all__ = ["ConfigError"]
