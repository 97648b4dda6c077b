"""One way to validate config dataclasses: each check raises ``ValueError`` naming the
field, the allowed values and what was given (the CLI turns it into one line, exit 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices`` (strings are matched as given)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` must be an int (not bool) in ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_inclusive: bool = True
) -> float:
    """``value`` must be a finite real number (never NaN/Inf) within the given bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
        if high is not None:
            parts.append(f"<= {high:g}")
        raise ValueError(f"{name} must be a finite number{' ' + ' and '.join(parts) if parts else ''}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` must be a finite number > 0 (or >= 0 with ``allow_zero``)."""
    return check_number(name, value, low=0.0, low_inclusive=allow_zero)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
