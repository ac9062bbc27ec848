"""``python -m lightning_clipprune.search RUN [options] [overrides]``: the command line lives in the app.

See :mod:`lightning_clipprune.app.search_cli` (``--help`` lists the options).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: idle threads do not spin
    from lightning_clipprune.app.search_args import early_exit  # --help and bad options: before torch loads

    status = early_exit()
    if status is not None:
        sys.exit(status)
    from lightning_clipprune.app.search_cli import main  # the app's entry: only when run as a command

    sys.exit(main())
