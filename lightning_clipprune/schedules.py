"""Pure sparsity schedules: the target sparsity at training position ``t`` and when to update the mask.

No Lightning import. Positions are integers (optimizer steps or epochs, the caller decides which).

The gradual schedules follow Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
for model compression" (ICLR 2018 workshop, arXiv:1710.01878):

.. math::

    s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^{p}

with ``p = 3`` ("cubic", the paper's choice) or ``p = 1`` ("linear"), updated every ``frequency`` steps
between ``t_0`` (start) and ``t_1`` (end). "oneshot" jumps to ``s_f`` at ``t_0``.
"""

from __future__ import annotations

import math

#: The schedule names understood by :func:`sparsity_at`.
SCHEDULES: tuple[str, ...] = ("oneshot", "linear", "cubic")


def polynomial_sparsity(t: float, t0: float, t1: float, s_i: float, s_f: float, power: float = 3.0) -> float:
    """Zhu & Gupta's polynomial decay ``s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power``.

    ``t`` is clamped to ``[t0, t1]``: ``s_i`` at and before ``t0``, ``s_f`` at and after ``t1``
    (``s_f`` everywhere when ``t1 <= t0``).

    Args:
        t: the position (step or epoch).
        t0: where the ramp starts.
        t1: where the ramp ends.
        s_i: sparsity at ``t0``.
        s_f: sparsity at ``t1``.
        power: the exponent; 3 is the paper's cubic schedule, 1 a linear ramp.

    Example::

        >>> polynomial_sparsity(5, 0, 10, 0.0, 0.8, power=1.0)
        0.4
        >>> round(polynomial_sparsity(5, 0, 10, 0.0, 0.8), 4)
        0.7
    """
    if t1 <= t0 or t >= t1:
        return float(s_f)
    if t <= t0:
        return float(s_i)
    remaining = 1.0 - (t - t0) / (t1 - t0)
    return float(s_f + (s_i - s_f) * remaining**power)


def sparsity_at(
    schedule: str,
    t: float,
    start: float,
    end: float,
    final: float,
    initial: float = 0.0,
    power: float = 3.0,
) -> float:
    """Target sparsity of ``schedule`` at position ``t``; 0 before ``start`` (nothing is pruned yet).

    Args:
        schedule: ``"oneshot"`` (``final`` from ``start`` on; ``end`` is ignored), ``"linear"`` or
            ``"cubic"`` (:func:`polynomial_sparsity` with ``power`` 1, resp. ``power``).
        t: the position.
        start: the first pruning position ``t0``.
        end: the position ``t1`` where ``final`` is reached.
        final: the sparsity at and after ``end``.
        initial: the sparsity at ``start`` (``s_i``).
        power: exponent of the "cubic" schedule (3 by default).

    Raises:
        ValueError: if ``schedule`` is unknown.

    Example::

        >>> [sparsity_at("oneshot", t, 3, 9, 0.5) for t in (2, 3, 100)]
        [0.0, 0.5, 0.5]
        >>> [sparsity_at("linear", t, 0, 10, 0.5) for t in (0, 5, 10, 11)]
        [0.0, 0.25, 0.5, 0.5]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if t < start:
        return 0.0
    if schedule == "oneshot":
        return float(final)
    return polynomial_sparsity(t, start, end, initial, final, 1.0 if schedule == "linear" else power)


def event_due(t: int, last_event: int | None, start: int, end: int, frequency: int) -> bool:
    """Whether the mask should be updated at position ``t``.

    Events happen at ``start``, then every ``frequency`` positions after the previous event, and always
    at ``end`` (the last one, so the final target is reached even when ``end - start`` is not a multiple
    of ``frequency``). Nothing happens after the event at or past ``end``. Working from the last event
    (not ``t % frequency``) keeps this right when positions are skipped, e.g. on resume.

    Args:
        t: the current position.
        last_event: the position of the previous update, None if there was none.
        start: the first event.
        end: the last event (``start`` for a one-shot schedule).
        frequency: positions between two events, at least 1.

    Example::

        >>> last, events = None, []
        >>> for t in range(12):
        ...     if event_due(t, last, 2, 9, 3):
        ...         last = t
        ...         events.append(t)
        >>> events
        [2, 5, 8, 9]
    """
    if t < start:
        return False
    if last_event is None:
        return True
    if last_event >= end:
        return False
    return t >= min(last_event + frequency, end)


def resolve_position(value: int | float, total: float | None, name: str) -> int:
    """An ``int`` is a position as is; a ``float`` in [0, 1] is the fraction ``round(value * total)``.

    Args:
        value: the user's ``start`` or ``end``.
        total: the whole training in the same unit (estimated optimizer steps, or ``max_epochs``).
        name: the argument's name, for the error message.

    Raises:
        ValueError: for a fraction when ``total`` is unknown or infinite.

    Example::

        >>> resolve_position(0.75, 400, "end"), resolve_position(30, 400, "end")
        (300, 30)
    """
    if isinstance(value, int):
        return value
    if value == 0.0:  # the first position of any run, of known length or not
        return 0
    if total is None or not math.isfinite(total) or total < 0:
        raise ValueError(
            f"`{name}={value}` is a fraction of the whole training, but its length is unknown ({total!r}):"
            f" set `max_steps`/`max_epochs` on the Trainer or give `{name}` as an int"
        )
    return int(round(value * total))
