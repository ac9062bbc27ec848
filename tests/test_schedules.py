"""Schedules: values at start, middle, end and past the end; event timing; fraction resolution."""

from __future__ import annotations

import math

import pytest

from lightning_clipprune.schedules import event_due, polynomial_sparsity, resolve_position, sparsity_at


@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_gradual_values_at_start_middle_end_and_past(schedule: str) -> None:
    start, end, s_i, s_f = 10, 30, 0.1, 0.9
    power = 1.0 if schedule == "linear" else 3.0
    assert sparsity_at(schedule, 9, start, end, s_f, s_i) == 0.0  # nothing before start
    assert sparsity_at(schedule, 10, start, end, s_f, s_i) == pytest.approx(s_i)
    mid = s_f + (s_i - s_f) * 0.5**power
    assert sparsity_at(schedule, 20, start, end, s_f, s_i) == pytest.approx(mid)
    assert sparsity_at(schedule, 30, start, end, s_f, s_i) == pytest.approx(s_f)
    assert sparsity_at(schedule, 1000, start, end, s_f, s_i) == pytest.approx(s_f)


def test_cubic_formula_and_monotone() -> None:
    values = [sparsity_at("cubic", t, 0, 100, 0.8) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3
    assert values[25] == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 0.25) ** 3)
    # cubic prunes faster early than linear
    assert values[25] > sparsity_at("linear", 25, 0, 100, 0.8)
    assert sparsity_at("cubic", 50, 0, 100, 0.8, power=2.0) == pytest.approx(0.8 - 0.8 * 0.25)


def test_oneshot_jumps_at_start_and_ignores_end() -> None:
    assert [sparsity_at("oneshot", t, 5, 1, 0.7) for t in (0, 4, 5, 6, 500)] == [0.0, 0.0, 0.7, 0.7, 0.7]


def test_degenerate_window_and_unknown_schedule() -> None:
    assert polynomial_sparsity(3, 3, 3, 0.0, 0.5) == 0.5
    with pytest.raises(ValueError, match="schedule.*'exp'"):
        sparsity_at("exp", 0, 0, 1, 0.5)


def test_event_timing_always_includes_end() -> None:
    def events(start: int, end: int, freq: int, ts) -> list[int]:
        last, out = None, []
        for t in ts:
            if event_due(t, last, start, end, freq):
                last = t
                out.append(t)
        return out

    assert events(0, 10, 4, range(20)) == [0, 4, 8, 10]
    assert events(3, 3, 100, range(10)) == [3]
    assert events(0, 300, 100, range(400)) == [0, 100, 200, 300]
    # skipped positions (resume, several steps per batch): the next position past the due one fires
    assert events(0, 10, 4, [0, 1, 5, 9, 11, 12]) == [0, 5, 9, 11]


def test_resolve_position() -> None:
    assert resolve_position(0.75, 32, "end") == 24
    assert resolve_position(1.0, 32, "end") == 32
    assert resolve_position(7, None, "end") == 7
    with pytest.raises(ValueError, match="end=0.5"):
        resolve_position(0.5, math.inf, "end")
