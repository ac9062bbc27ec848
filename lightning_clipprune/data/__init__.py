"""Old import path of :mod:`lightning_clipprune.app.data` (the in-memory data modules of the app).

Kept so that user code and older configs (``_target_: lightning_clipprune.data.DigitsDataModule``) keep
working: ``lightning_clipprune.data`` and its submodules (``.cifar``, ``.digits``, ``.idx``, ``.locate``,
``.tensors``) are the very modules of :mod:`lightning_clipprune.app.data`, so a class, a module attribute
and a monkeypatch are the same whichever path is used.
"""

from __future__ import annotations

import importlib
import sys

from lightning_clipprune.app.data import *  # noqa: F403
from lightning_clipprune.app.data import __all__  # noqa: F401

for _sub in ("cifar", "digits", "idx", "locate", "tensors"):
    _module = importlib.import_module(f"lightning_clipprune.app.data.{_sub}")
    sys.modules[f"{__name__}.{_sub}"] = _module
    globals()[_sub] = _module
