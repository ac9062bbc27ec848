"""Old import path of :mod:`lightning_clipprune.app.models` (the networks and the ``Classifier`` of the app).

Kept so that user code, older configs (``_target_: lightning_clipprune.models.MLP``) and checkpoints keep
working: ``lightning_clipprune.models`` and its submodules (``.classifier``, ``.networks``) are the very
modules of :mod:`lightning_clipprune.app.models`, so a class, a module attribute and a monkeypatch are the
same whichever path is used.
"""

from __future__ import annotations

import importlib
import sys

from lightning_clipprune.app.models import *  # noqa: F403
from lightning_clipprune.app.models import __all__  # noqa: F401

for _sub in ("classifier", "networks"):
    _module = importlib.import_module(f"lightning_clipprune.app.models.{_sub}")
    sys.modules[f"{__name__}.{_sub}"] = _module
    globals()[_sub] = _module
