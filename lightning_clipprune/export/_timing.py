"""Interleaved latency comparisons for :func:`~lightning_clipprune.export.inference.to_inference`."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Timer", "call_timer", "compare_latencies", "compare_latency", "compare_swapped"]

#: ``timer(module, x) -> seconds`` for one call; the default runs it once under ``perf_counter``.
Timer = Callable[[nn.Module, Tensor], float]


def _one_call_timer(module: nn.Module, x: Tensor, min_seconds: float = 2e-3) -> float:
    # Seconds per call, over as many calls as fill ``min_seconds``: one sub-millisecond call is mostly noise.
    calls, start = 0, time.perf_counter()
    while True:
        module(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= 1000:
            return elapsed / calls


def call_timer(min_seconds: float) -> Timer:
    """A :data:`Timer` whose samples last at least ``min_seconds`` (the default timer's is 2 ms).

    Shorter samples make a cheaper, noisier measurement: what an end-of-fit report can afford.

    Example::

        >>> t = call_timer(1e-4)(nn.Linear(4, 4), torch.randn(2, 4))
        >>> 0 < t < 1
        True
    """
    if not min_seconds > 0:
        raise ValueError(f"call_timer: `min_seconds` must be > 0, got {min_seconds!r}")
    return functools.partial(_one_call_timer, min_seconds=min_seconds)


def compare_latencies(
    modules: Sequence[nn.Module], x: Tensor, *, rounds: int = 7, timer: Timer | None = None, warmup: bool = True
) -> list[float]:
    """Median seconds per call of each ``module(x)``, timed interleaved under ``torch.inference_mode``.

    One warm-up call each (unless ``warmup=False``: they ran already), then ``rounds`` rounds that time each
    module once, so that a change in machine load hits all alike.

    Example::

        >>> t = compare_latencies([nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity()], torch.randn(2, 4), rounds=3)
        >>> len(t), all(s > 0 for s in t)
        (3, True)
    """
    timer = timer or _one_call_timer
    times: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        for module in modules if warmup else ():
            module(x)
        for _ in range(rounds):
            for module, seconds in zip(modules, times, strict=True):
                seconds.append(timer(module, x))
    return [statistics.median(seconds) for seconds in times]


def compare_latency(
    first: nn.Module, second: nn.Module, x: Tensor, *, rounds: int = 7, timer: Timer | None = None
) -> tuple[float, float]:
    """Median seconds per call of ``first(x)`` and ``second(x)``, timed interleaved (:func:`compare_latencies`).

    Example::

        >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> t_a, t_b = compare_latency(a, b, torch.randn(2, 4), rounds=3)
        >>> t_a > 0 and t_b > 0
        True
    """
    first_s, second_s = compare_latencies([first, second], x, rounds=rounds, timer=timer)
    return first_s, second_s


def compare_swapped(
    model: nn.Module, put: Callable[[nn.Module], None], first: nn.Module, second: nn.Module, x: Tensor, *,
    rounds: int = 7, timer: Timer | None = None,
) -> tuple[float, float]:
    """Median seconds per call of the whole ``model(x)`` with ``put(first)`` and with ``put(second)`` done,
    interleaved as :func:`compare_latency`; ``model`` is left with ``second`` put in."""
    timer = timer or _one_call_timer
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for i in range(rounds + 1):  # the first round warms up
            for j, module in enumerate((first, second)):
                put(module)
                seconds = timer(model, x)
                if i:
                    times[j].append(seconds)
    return statistics.median(times[0]), statistics.median(times[1])

