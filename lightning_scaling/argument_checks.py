"""Argument checks shared by the public API: every rejection is a ``ValueError`` that names the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_INT = 2**53  # the largest whole number every float holds exactly


def positive_array(name: str, value: Any) -> np.ndarray:
    """Return ``value`` as a float array after checking every element is finite and > 0."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a positive number or an array of them, got {value!r}") from None
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf), got {value!r}")
    if not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return arr


def positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float after checking it is a finite number > 0 (a number, not text)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def non_negative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float after checking it is a finite number >= 0 (a number, not text)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return out


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int after checking it is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if value < 1 or value > MAX_INT:
        raise ValueError(f"{name} must be a whole number from 1 to 2**53, got {value!r}")
    return int(value)


def fraction(name: str, value: Any, *, inclusive_high: bool = True) -> float:
    """Return ``value`` as a float in (0, 1] (or (0, 1) when ``inclusive_high`` is False)."""
    out = positive_float(name, value)
    if out > 1 or (not inclusive_high and out == 1):
        bound = "(0, 1]" if inclusive_high else "(0, 1)"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
    return out


def one_of(name: str, value: Any, allowed: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` after checking it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """Return ``value`` after checking it is a real boolean: ``True``/``False`` (or a numpy bool).

    Strings such as ``"no"``, numbers such as ``0`` and ``None`` are refused: each is truthy or falsy in a way
    that silently flips the option it was meant to set."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")
