"""Checks of hyper-parameters: the one place every public constructor validates its numbers.

Each check raises ``ValueError`` (``TypeError`` for a value that is not a number at all)
naming the transform (``who``), the argument, the value received and the range allowed,
so that a NaN, an infinity or an out-of-range value is refused when the transform is
built instead of stalling the run it is used in. A check returns the value unchanged
(a 0-d tensor or a NumPy scalar is accepted as a number; ``bool`` and ``str`` are not).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = [
    "check_finite",
    "check_in",
    "check_int_at_least",
    "check_interval",
    "check_nonnegative",
    "check_positive",
]


def _number(who: str, name: str, value: Any) -> float:
    """``value`` as a float, or ``TypeError`` naming ``who`` and ``name``."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{who}: {name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{who}: {name} must be a number, got {type(value).__name__} {value!r:.80}"
        ) from None


def _refuse(who: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{who}: {name} must be {allowed}, got {value!r}")


def check_finite(who: str, name: str, value: Any) -> Any:
    """A finite number (not NaN, not +-inf)."""
    if not math.isfinite(_number(who, name, value)):
        raise _refuse(who, name, value, "finite (a number, not NaN or inf)")
    return value


def check_positive(who: str, name: str, value: Any, *, allow_inf: bool = False) -> Any:
    """A number ``> 0``, finite unless ``allow_inf`` (``+inf`` then means "no limit")."""
    x = _number(who, name, value)
    if not (x > 0 and (allow_inf or math.isfinite(x))):
        raise _refuse(who, name, value, "> 0" + ("" if allow_inf else " and finite"))
    return value


def check_nonnegative(who: str, name: str, value: Any, *, allow_inf: bool = False) -> Any:
    """A number ``>= 0``, finite unless ``allow_inf``."""
    x = _number(who, name, value)
    if not (x >= 0 and (allow_inf or math.isfinite(x))):
        raise _refuse(who, name, value, ">= 0" + ("" if allow_inf else " and finite"))
    return value


def check_interval(
    who: str,
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    include_low: bool = False,
    include_high: bool = False,
) -> Any:
    """A number in the interval from ``low`` to ``high`` (open ends unless included); an
    infinite ``high`` or ``low`` bounds nothing on that side, but the value must be finite."""
    x = _number(who, name, value)
    above = x >= low if include_low else x > low
    below = x <= high if include_high else x < high
    if not (above and below and math.isfinite(x)):
        left, right = "[" if include_low else "(", "]" if include_high else ")"
        raise _refuse(who, name, value, f"in {left}{low}, {high}{right}")
    return value


def check_int_at_least(who: str, name: str, value: Any, minimum: int) -> int:
    """An ``int`` (not a ``bool``) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{who}: {name} must be {allowed}, got {value!r}")
    return value


def check_in(who: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value
