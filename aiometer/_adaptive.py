"""Adaptive rate: the options, and the state that follows a target's push-back.

The rule is additive increase, multiplicative decrease, as TCP's congestion control:

- **Cut.** A push-back (``throttled()``) multiplies the effective rate by ``factor``, never
  below ``floor``, and at most once per ``cooldown`` seconds: the many 429s of one burst (every
  request in flight when the target filled up) answer a single excess, so they make one cut.
- **Recovery.** While no push-back arrives, the effective rate climbs back linearly toward the
  configured ``max_per_second``, at ``(max_per_second - floor) / recovery`` per second: from
  the floor to the maximum in ``recovery`` seconds.

:class:`AdaptiveRate` keeps that state without a clock (the caller passes ``now``), so the
in-process limiter and the tests drive it the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Adaptive", "AdaptiveRate", "check_adaptive"]


def _check_number(name: str, value: object, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Adaptive {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"Adaptive {name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Adaptive:
    """How a limiter's effective rate follows the target's push-back (``adaptive=``).

    ``adaptive=True`` means ``Adaptive()``, these defaults.

    Attributes:
        factor: each cut multiplies the effective rate by this (0 < factor < 1; 0.5 halves it).
        cooldown: seconds after a cut during which further push-back makes no new cut, so that
            one burst of 429s (every request in flight when the target filled up) cuts once.
        floor: the lowest effective rate, in cost units per second; None: 1/20 of
            ``max_per_second``.
        recovery: seconds to climb from the floor back to ``max_per_second`` while no
            push-back arrives (the climb is linear: additive increase).

    Raises:
        TypeError: an option is not a number (``floor`` may be None).
        ValueError: ``factor`` is not strictly between 0 and 1, ``cooldown`` is negative or not
            finite, ``floor`` or ``recovery`` is not finite and > 0.

    Example::

        limiter = RateLimiter(100, adaptive=Adaptive(factor=0.7, recovery=60))
    """

    factor: float = 0.5
    cooldown: float = 1.0
    floor: float | None = None
    recovery: float = 30.0

    def __post_init__(self) -> None:
        factor = _check_number("factor", self.factor)
        if factor >= 1:
            raise ValueError(f"Adaptive factor must be < 1 (a cut), got {self.factor!r}")
        _check_number("cooldown", self.cooldown, zero_ok=True)
        if self.floor is not None:
            _check_number("floor", self.floor)
        _check_number("recovery", self.recovery)

    def floor_for(self, max_per_second: float) -> float:
        """The floor that applies under *max_per_second*."""
        return max_per_second / 20 if self.floor is None else float(self.floor)


def check_adaptive(value: object, max_per_second: float | None) -> Adaptive | None:
    """Return the options meant by ``adaptive=`` (None: not adaptive), else raise.

    Raises:
        TypeError: *value* is neither a bool nor an :class:`Adaptive`.
        ValueError: adaptive without ``max_per_second``, or a floor above it.
    """
    if value is None or value is False:
        return None
    if value is True:
        options = Adaptive()
    elif isinstance(value, Adaptive):
        options = value
    else:
        raise TypeError(f"adaptive must be a bool or an Adaptive, got {type(value).__name__}")
    if max_per_second is None:
        raise ValueError("adaptive needs max_per_second (the rate it cuts and recovers)")
    check_floor(options, max_per_second)
    return options


def check_floor(options: Adaptive, max_per_second: float) -> None:
    """Raise ValueError if the floor of *options* is above *max_per_second*."""
    if options.floor is not None and options.floor > max_per_second:
        raise ValueError(
            f"Adaptive floor must be <= max_per_second ({max_per_second:g}), got {options.floor:g}"
        )


class AdaptiveRate:
    """The effective rate under :class:`Adaptive` options, as a function of time."""

    __slots__ = ("_changed", "_rate", "cuts", "last_cut", "maximum", "options")

    def __init__(self, options: Adaptive, maximum: float) -> None:
        self.options = options
        #: The configured max_per_second: the rate recovers toward it.
        self.maximum = maximum
        self._rate = maximum
        self._changed = -math.inf
        #: When the latest cut happened (-inf: never).
        self.last_cut = -math.inf
        #: How many cuts so far.
        self.cuts = 0

    def rate(self, now: float) -> float:
        """The effective rate at *now* (recovery included)."""
        rate = self._rate
        maximum = self.maximum
        if rate >= maximum:
            return maximum
        options = self.options
        slope = (maximum - options.floor_for(maximum)) / options.recovery
        rate += slope * (now - self._changed)
        return maximum if rate >= maximum else rate

    def cut(self, now: float) -> bool:
        """Report a push-back at *now*; return whether it cut the rate (not in a cool-down)."""
        if now < self.last_cut + self.options.cooldown:
            return False
        floor = self.options.floor_for(self.maximum)
        self._rate = max(floor, min(self.rate(now) * self.options.factor, self.maximum))
        self._changed = now
        self.last_cut = now
        self.cuts += 1
        return True

    def set_maximum(self, maximum: float, now: float) -> None:
        """A new configured rate: the effective rate stays where it is, at most *maximum*."""
        self._rate = min(self.rate(now), maximum)
        self._changed = now
        self.maximum = maximum
