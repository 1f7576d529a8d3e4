"""Argument checks shared by the run functions and the limiters.

Every check raises before any task starts, with a short exact message that names the argument
and the value that was given.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "check_actual_cost",
    "check_burst",
    "check_callable",
    "check_cost",
    "check_max_at_once",
    "check_max_per_second",
]


def _type_name(value: object) -> str:
    return type(value).__name__


def check_max_at_once(value: object, name: str = "max_at_once") -> int:
    """Return *value* if it is an int >= 1, else raise TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_max_per_second(value: object, name: str = "max_per_second") -> float:
    """Return *value* as a float if it is a finite number > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_burst(value: object) -> int:
    """Return *value* if it is an int >= 1, else raise TypeError or ValueError."""
    return check_max_at_once(value, "burst")


def check_callable(value: Any, name: str) -> None:
    """Raise TypeError unless *value* is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {_type_name(value)}")


def check_cost(value: object, name: str = "cost") -> float:
    """Return *value* as a float if it is a finite number > 0 (a cost), else raise."""
    return check_max_per_second(value, name)


def check_actual_cost(value: object, name: str = "actual") -> float:
    """Return *value* as a float if it is a finite number >= 0 (a settled cost), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
