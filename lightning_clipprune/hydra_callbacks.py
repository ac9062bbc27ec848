"""Old import path of :mod:`lightning_clipprune.app.hydra_callbacks` (the app's Hydra callbacks).

Kept so that older configs (``_target_: lightning_clipprune.hydra_callbacks.SweepReport``) and user code keep
working: importing this name gives the very module :mod:`lightning_clipprune.app.hydra_callbacks`.
"""

from __future__ import annotations

import sys

from lightning_clipprune.app import hydra_callbacks as _module
from lightning_clipprune.app.hydra_callbacks import *  # noqa: F403
from lightning_clipprune.app.hydra_callbacks import __all__  # noqa: F401

sys.modules[__name__] = _module  # one module under both names: a class or a monkeypatch is the same on either
