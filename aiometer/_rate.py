"""Rate: one window of a rate limit, as metered APIs state them ("5000 per hour")."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Rate"]


@dataclass(frozen=True)
class Rate:
    """At most ``limit`` units started in any window of ``per`` seconds.

    ``Rate(5000, per=3600)`` is GitHub's 5,000 requests an hour; ``Rate(200_000, per=60)`` an
    LLM API's 200,000 tokens a minute. Pass several to a limiter's ``rates=`` and every one of
    them holds: an acquisition is charged to all of them or, while any of them is full, waits.

    Attributes:
        limit: the most that may start in any window of ``per`` seconds.
        per: the length of the window, in seconds. Two starts share a window when they are
            less than ``per`` seconds apart.
        counts: what a start adds to the window: ``"cost"`` (the default) adds the cost of the
            acquisition, ``"calls"`` adds 1 whatever the cost, so one limiter can bound both an
            API's requests per minute and its tokens per minute. Settling a permit never
            changes a ``"calls"`` window.

    Raises:
        TypeError: ``limit`` or ``per`` is not a number, or ``counts`` is not a str.
        ValueError: ``limit`` or ``per`` is not finite and > 0, ``counts`` is neither
            ``"cost"`` nor ``"calls"``, or a ``"calls"`` window has a limit below 1 (it could
            never admit a call).
    """

    limit: float
    per: float
    counts: Literal["cost", "calls"] = "cost"

    def __post_init__(self) -> None:
        for field in ("limit", "per"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Rate {field} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"Rate {field} must be a finite number > 0, got {value!r}")
        if not isinstance(self.counts, str):
            raise TypeError(f"Rate counts must be a str, got {type(self.counts).__name__}")
        if self.counts not in ("cost", "calls"):
            raise ValueError(f"Rate counts must be 'cost' or 'calls', got {self.counts!r}")
        if self.counts == "calls" and self.limit < 1:
            raise ValueError(
                f"Rate limit must be >= 1 when it counts calls (it could never admit one), "
                f"got {self.limit!r}"
            )

    def __repr__(self) -> str:
        counts = "" if self.counts == "cost" else f", counts={self.counts!r}"
        return f"Rate({self.limit:g}, per={self.per:g}{counts})"


def check_rates(rates: Iterable[Rate]) -> tuple[Rate, ...]:
    """Return *rates* as a tuple if it is an iterable of distinct windows, else raise.

    Raises:
        TypeError: *rates* is a str or a Rate (not a sequence of them), or holds something
            other than Rate.
        ValueError: two rates share the same ``per`` and ``counts`` (keep the smaller limit).
    """
    if isinstance(rates, (str, bytes, Rate)):
        raise TypeError(f"rates must be a sequence of Rate, got {type(rates).__name__}")
    try:
        items = tuple(rates)
    except TypeError:
        raise TypeError(f"rates must be a sequence of Rate, got {type(rates).__name__}") from None
    seen: dict[tuple[float, str], Rate] = {}
    for rate in items:
        if not isinstance(rate, Rate):  # a caller without a type checker
            raise TypeError(f"rates must hold Rate objects, got {type(rate).__name__}")
        key = (float(rate.per), rate.counts)
        if key in seen:
            raise ValueError(
                f"rates has two windows of per={rate.per:g} counting {rate.counts}: "
                f"{seen[key]!r} and {rate!r} (keep the smaller limit)"
            )
        seen[key] = rate
    return items
