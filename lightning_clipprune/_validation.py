"""Argument checks, written once: used by the pure cores and by the callbacks' ``__init__``.

Every check returns the value normalised (``float`` for reals, a tuple for patterns) and raises
``ValueError`` whose one-line message names the owner, the argument, what is allowed and what was given::

    `GradientClipCallback(clip_val=...)` must be a positive finite number, got -1.

No Lightning import here.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "bad_value",
    "check_bool",
    "check_choice",
    "check_int",
    "check_patterns",
    "check_position",
    "check_real",
]


def bad_value(owner: str, name: str, allowed: str, value: Any) -> ValueError:
    """The error every check raises: ```owner(name=...)` must be <allowed>, got <value>.``"""
    return ValueError(f"`{owner}({name}=...)` must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[str]) -> str:
    """``value`` must be one of the strings in ``allowed``.

    Example::

        >>> check_choice("MagnitudePruneCallback", "scope", "global", ("global", "local"))
        'global'
    """
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise bad_value(owner, name, f"one of {', '.join(repr(a) for a in allowed)}", value)
    return value


def check_bool(owner: str, name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` must be ``True`` or ``False`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise bad_value(owner, name, "True or False" + (" or None" if allow_none else ""), value)
    return value


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_int(
    owner: str,
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` must be an ``int`` (not a bool) in ``[low, high]`` (or ``None`` when ``allow_none``).

    Example::

        >>> check_int("SparsityLogger", "log_every_n_steps", 10, low=1)
        10
    """
    if value is None and allow_none:
        return None
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        what = " ".join(p for p in ("an integer", _interval(low, high, False, False)) if p)
        raise bad_value(owner, name, what + (" or None" if allow_none else ""), value)
    return value


def check_real(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """``value`` must be a real number (not bool or NaN) in the given interval.

    A real number is an ``int`` or ``float``, any :class:`numbers.Real` (NumPy scalars such as
    ``np.float32(0.5)``), or a 0-d real tensor or array (``torch.tensor(0.5)``); it is returned as a ``float``.
    Infinite values are refused unless ``allow_inf`` (a bound of ``inf`` alone is never reached by a
    finite number, so ``high=math.inf`` with ``allow_inf=False`` means "finite").

    Example::

        >>> check_real("GradientClipCallback", "clip_val", 1, low=0, low_open=True)
        1.0
        >>> check_real("X", "p", -1.0, low=0)
        Traceback (most recent call last):
        ...
        ValueError: `X(p=...)` must be a finite number >= 0, got -1.0.
    """
    if value is None and allow_none:
        return None
    number = _as_real(value)
    ok = (
        number is not None
        and (allow_inf or math.isfinite(number))
        and (low is None or (number > low if low_open else number >= low))
        and (high is None or (number < high if high_open else number <= high))
    )
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        what = " ".join(p for p in (kind, _interval(low, high, low_open, high_open)) if p)
        raise bad_value(owner, name, what + (" or None" if allow_none else ""), value)
    return number


def _as_real(value: Any) -> float | None:
    """``value`` as a ``float`` when it is a real number (see :func:`check_real`), else None (bools and NaN too)."""
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        detach = getattr(value, "detach", None)  # a tensor that requires grad converts without a warning
        value = (detach() if callable(detach) else value).item()  # a 0-d tensor or array: its Python scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def check_position(owner: str, name: str, value: Any) -> int | float:
    """A point of the training: an ``int >= 0`` (a step or an epoch) or a ``float`` in [0, 1] (a fraction).

    Example::

        >>> check_position("MagnitudePruneCallback", "end", 0.75)
        0.75
    """
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise bad_value(
        owner, name, "an int >= 0 (a step or an epoch) or a float in [0, 1] (a fraction of the training)", value
    )


def check_patterns(owner: str, name: str, value: Any, *, allow_none: bool = False) -> tuple[str, ...] | None:
    """``fnmatch`` patterns: a sequence of strings (a single string is one pattern).

    Example::

        >>> check_patterns("GradientClipCallback", "exclude", "fc.*")
        ('fc.*',)
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise bad_value(
        owner, name, "a list of fnmatch patterns (strings), e.g. ['fc.*']" + (" or None" if allow_none else ""), value
    )


def unmatched_patterns(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """The ``fnmatch`` patterns that match none of ``names`` (a typo, or a wrapper's prefix missed).

    Example::

        >>> unmatched_patterns(["fc.*", "*fc.*"], ["net.fc.weight"])
        ['fc.*']
    """
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
