"""A Lightning logger that keeps what it is given in memory: for tests, notebooks and benchmarks.

It lives in the library (it needs only Lightning), so the tests, ``benchmarks/bench_overhead.py`` and
``benchmarks/gpu_check.py`` (which must run with only torch, Lightning and this package) share one.

Example::

    import lightning as L
    from lightning_clipprune import GradientClipCallback
    from lightning_clipprune.loggers import MemoryLogger

    logger = MemoryLogger()
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[GradientClipCallback(clip_val=1.0)])
    trainer.fit(model, data)
    norms = [m["grad/norm"] for _, m in logger.rows_with("grad/norm")]
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger

__all__ = ["MemoryLogger"]


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in :attr:`rows`, and the latest values in :attr:`metrics`.

    Args:
        keep_rows: keep every call in :attr:`rows`. ``False`` keeps only :attr:`metrics` (the last value of
            each name) and :attr:`calls`, so that a long benchmark's memory and logging cost stay constant.

    Example::

        >>> logger = MemoryLogger()
        >>> logger.log_metrics({"grad/norm": 2.0}, step=0)
        >>> logger.rows_with("grad/norm"), logger.metrics, logger.calls
        ([(0, {'grad/norm': 2.0})], {'grad/norm': 2.0}, 1)
    """

    def __init__(self, keep_rows: bool = True) -> None:
        super().__init__()
        self.keep_rows = keep_rows
        self.rows: list[tuple[int | None, dict[str, float]]] = []
        self.metrics: dict[str, float] = {}
        self.calls = 0

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are not kept."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record one call: the latest value of each name, and the whole call when ``keep_rows``."""
        self.calls += 1
        self.metrics.update(metrics)
        if self.keep_rows:
            self.rows.append((step, dict(metrics)))

    def rows_with(self, key: str) -> list[tuple[int | None, dict[str, float]]]:
        """The logged rows that contain ``key``."""
        return [(s, m) for s, m in self.rows if key in m]
