"""Lightning callbacks, one file per callback: each hook reads trainer state, calls the pure core, logs.

The public names are re-exported from the package root: ``from lightning_clipprune import ...``.
"""
