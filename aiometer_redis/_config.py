"""The options of a Redis limiter, checked once.

:class:`LimiterConfig` holds every option of :class:`~aiometer_redis.RedisLimiter` except the
name and the client. A limiter makes one; a :class:`~aiometer_redis.RedisLimiterGroup` makes
one and shares it with all its limiters. The name and the prefix are checked here too (see
:func:`name_problem`), so the command line refuses what the library refuses, in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from aiometer import Rate

from ._client import ScriptArg
from ._exceptions import ConfigurationError, LeaseLostError

__all__ = [
    "MAX_SECONDS",
    "UNIT",
    "LimiterConfig",
    "check_name",
    "cost_units",
    "name_problem",
    "prefix_problem",
]

#: The longest lease, and the longest burst window, that a limiter accepts (a day).
MAX_SECONDS = 86_400

#: Costs and limits travel to the scripts as integer micro-units: one unit of cost is this many.
UNIT = 1_000_000

# The scripts do exact integer arithmetic on micro-units in Lua's doubles: keep below 2**52.
_MAX_UNITS = 2**52


def cost_units(value: object, name: str = "cost", *, zero: bool = False) -> int:
    """*value* (a cost; with *zero*, an actual cost, which may be 0) in micro-units.

    Raises:
        TypeError: *value* is not a number.
        ConfigurationError: *value* is not finite, not above 0 (>= 0 for an actual cost), or
            too small (below one micro-unit) or too large to count exactly.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    units = round(value * UNIT)
    if units < 1 and not zero:
        raise ConfigurationError(f"{name} must be at least 1e-06 (one micro-unit), got {value!r}")
    if units > _MAX_UNITS:
        raise ConfigurationError(f"{name} must be at most {_MAX_UNITS // UNIT}, got {value!r}")
    return units


def _check_rates(rates: object) -> tuple[Rate, ...]:
    if isinstance(rates, (str, bytes, Rate)):
        raise TypeError(f"rates must be a sequence of Rate, got {type(rates).__name__}")
    try:
        items = tuple(cast("Iterable[object]", rates))
    except TypeError:
        raise TypeError(f"rates must be a sequence of Rate, got {type(rates).__name__}") from None
    seen: dict[tuple[int, str], Rate] = {}
    checked: list[Rate] = []
    for rate in items:
        if not isinstance(rate, Rate):
            raise TypeError(f"rates must hold aiometer.Rate objects, got {type(rate).__name__}")
        per_us = round(rate.per * 1e6)
        if per_us < 1:
            raise ConfigurationError(f"Rate per must be at least 1e-06 s, got {rate.per!r}")
        if round(rate.limit * UNIT) > _MAX_UNITS:
            raise ConfigurationError(
                f"Rate limit must be at most {_MAX_UNITS // UNIT}, got {rate.limit!r}"
            )
        key = (per_us, rate.counts)
        if key in seen:
            raise ConfigurationError(
                f"rates has two windows of per={rate.per:g} counting {rate.counts}: "
                f"{seen[key]!r} and {rate!r} (keep the smaller limit)"
            )
        seen[key] = rate
        checked.append(rate)
    return tuple(checked)


def _encoding_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"must be encodable as UTF-8, got {text!r}"
    return None


def name_problem(name: str) -> str | None:
    """What is wrong with limiter name *name* ("must not be empty"), or None."""
    if not name:
        return "must not be empty"
    return _encoding_problem(name)


def prefix_problem(prefix: str) -> str | None:
    """What is wrong with key prefix *prefix*, or None. Braces would end the hash tag early."""
    if not prefix or "{" in prefix or "}" in prefix:
        return f"must be non-empty and without braces, got {prefix!r}"
    return _encoding_problem(prefix)


def check_name(name: object) -> str:
    """Return *name* if it can name a limiter.

    Raises:
        TypeError: *name* is not a str.
        ConfigurationError: *name* is empty or not encodable as UTF-8.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    problem = name_problem(name)
    if problem is not None:
        raise ConfigurationError(f"name {problem}")
    return name


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ConfigurationError(f"{name} must be >= 1, got {value}")
    return value


def _check_rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_per_second must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"max_per_second must be a finite number > 0, got {value!r}")
    return float(value)


def _check_seconds(value: object, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= minimum:
        raise ConfigurationError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LimiterConfig:
    """Every option of a Redis limiter but its name and client, checked when made.

    The fields are those of :class:`~aiometer_redis.RedisLimiter`, which documents them.

    Raises:
        ConfigurationError: a value is out of range (also a ValueError).
        TypeError: a value has the wrong type.
    """

    max_at_once: int | None = None
    max_per_second: float | None = None
    burst: int = 1
    lease_ttl: float = 30.0
    prefix: str = "aiometer"
    acquire_timeout: float | None = None
    retry_window: float = 5.0
    recheck_interval: float = 1.0
    on_unavailable: Literal["fail", "local"] = "fail"
    on_lease_lost: Callable[[LeaseLostError], object] | None = None
    rates: Sequence[Rate] = ()

    def __post_init__(self) -> None:
        rates = _check_rates(self.rates)
        if not isinstance(self.prefix, str):
            raise TypeError(f"prefix must be a str, got {type(self.prefix).__name__}")
        problem = prefix_problem(self.prefix)
        if problem is not None:
            raise ConfigurationError(f"prefix {problem}")
        if self.max_at_once is None and self.max_per_second is None and not rates:
            raise ConfigurationError("give max_at_once, max_per_second or both (or rates)")
        if self.max_at_once is not None:
            _check_count(self.max_at_once, "max_at_once")
        if self.max_per_second is not None:
            _check_rate(self.max_per_second)
        _check_count(self.burst, "burst")
        normalized = {
            "lease_ttl": _check_seconds(self.lease_ttl, "lease_ttl", minimum=0.1),
            "retry_window": _check_seconds(self.retry_window, "retry_window"),
            "recheck_interval": _check_seconds(self.recheck_interval, "recheck_interval"),
        }
        if self.acquire_timeout is not None:
            normalized["acquire_timeout"] = _check_seconds(self.acquire_timeout, "acquire_timeout")
        if normalized["lease_ttl"] > MAX_SECONDS:
            raise ConfigurationError(
                f"lease_ttl must be at most {MAX_SECONDS} s, got {normalized['lease_ttl']!r}"
            )
        if self.max_per_second is not None and self.burst / self.max_per_second > MAX_SECONDS:
            raise ConfigurationError(
                f"burst / max_per_second must be at most {MAX_SECONDS} s (the rate state "
                f"would outlive its keys), got {self.burst / self.max_per_second:g} s"
            )
        if self.on_unavailable not in ("fail", "local"):
            raise ConfigurationError(
                f"on_unavailable must be 'fail' or 'local', got {self.on_unavailable!r}"
            )
        if self.on_lease_lost is not None and not callable(self.on_lease_lost):
            raise TypeError(
                f"on_lease_lost must be callable, got {type(self.on_lease_lost).__name__}"
            )
        for field, value in normalized.items():
            object.__setattr__(self, field, value)
        object.__setattr__(self, "rates", rates)

    @property
    def interval_us(self) -> float:
        """Microseconds between two starts at ``max_per_second`` (0.0: no rate limit)."""
        return 1e6 / self.max_per_second if self.max_per_second is not None else 0.0

    @property
    def window_spec(self) -> str:
        """ARGV[8] of the scripts: ``<limit units>,<per us>,<1 calls|0 cost>`` per Rate, joined
        by ``;`` ('' without rates)."""
        return ";".join(
            f"{round(r.limit * UNIT)},{round(r.per * 1e6)},{1 if r.counts == 'calls' else 0}"
            for r in self.rates
        )

    def cost_problem(self, units: int) -> str | None:
        """Why a cost of *units* micro-units can never start under these limits, or None."""
        cost = f"{units / UNIT:g}"
        if self.max_per_second is not None and units > self.burst * UNIT:
            return (
                f"cost {cost} can never start: max_per_second allows bursts of at most "
                f"{self.burst} (raise burst, or use rates=[Rate(...)])"
            )
        for rate in self.rates:
            if rate.counts == "cost" and units > round(rate.limit * UNIT):
                return f"cost {cost} can never start: {rate!r} allows at most {rate.limit:g}"
        return None

    def script_header(self, mailbox_prefix: str) -> list[ScriptArg]:
        """ARGV[1..8] of every writing script (see ``lua/README.md``)."""
        # An abandoned limiter's keys vanish after this long; every call refreshes it. The
        # window logs must outlive the longest window.
        per_max = max((r.per for r in self.rates), default=0.0)
        key_ttl = max(
            60.0,
            2 * self.lease_ttl,
            2 * self.burst * self.interval_us / 1e6,
            per_max + 60.0 if self.rates else 0.0,
        )
        # Without max_at_once there are no leases; the scripts then use this span to remember
        # rate-only grants, so that a retry within the retry window finds them.
        span = self.lease_ttl if self.max_at_once else max(self.lease_ttl, 2 * self.retry_window)
        return [
            "",
            self.max_at_once or 0,
            self.interval_us,
            self.burst,
            math.ceil(span * 1e6),
            math.ceil(key_ttl * 1000),
            mailbox_prefix,
            self.window_spec,
        ]
