"""Old import path of :mod:`lightning_clipprune.app.report` (sweep summaries); ``python -m`` still works here.

::

    python -m lightning_clipprune.report multirun/2026-11-29/01-00-00

Importing this name gives the very module :mod:`lightning_clipprune.app.report`, so user code (and a
monkeypatch) written for the old path keeps working.
"""

from __future__ import annotations

import sys

from lightning_clipprune.app import report as _module
from lightning_clipprune.app.report import *  # noqa: F403
from lightning_clipprune.app.report import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = _module  # one module under both names: a class or a monkeypatch is the same on either
