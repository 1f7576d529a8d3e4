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
from typing import Literal, Protocol, cast

from aiometer import Rate

from ._client import ScriptArg
from ._exceptions import ConfigurationError, LeaseLostError
from ._metrics import check_metrics

__all__ = [
    "MAX_SECONDS",
    "OVERRIDE_KEEP",
    "UNIT",
    "AdaptiveLike",
    "AdaptiveSettings",
    "LimiterConfig",
    "check_adaptive_option",
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


#: How long limits set at run time are kept at least (then as long as the limiter is used).
OVERRIDE_KEEP = 86_400.0


class AdaptiveLike(Protocol):
    """The options of ``adaptive=`` (``aiometer.Adaptive`` has these attributes)."""

    @property
    def factor(self) -> float: ...
    @property
    def cooldown(self) -> float: ...
    @property
    def floor(self) -> float | None: ...
    @property
    def recovery(self) -> float: ...


@dataclass(frozen=True)
class AdaptiveSettings:
    """The checked options of ``adaptive=``: a cut multiplies the fleet's effective rate by
    *factor* (at most once per *cooldown* seconds), never below *floor* per second (None:
    max_per_second / 20); the rate climbs back linearly from the floor to max_per_second in
    *recovery* seconds."""

    factor: float = 0.5
    cooldown: float = 1.0
    floor: float | None = None
    recovery: float = 30.0

    @property
    def spec(self) -> str:
        """ARGV[9] of the scripts: ``<factor>,<floor per s, 0: default>,<cooldown us>,<recovery
        us>``."""
        floor = 0.0 if self.floor is None else self.floor
        return (
            f"{self.factor:.6f},{floor:.6f},{round(self.cooldown * 1e6)},"
            f"{max(1, round(self.recovery * 1e6))}"
        )


def _adaptive_number(name: str, value: object, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"adaptive {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigurationError(f"adaptive {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_adaptive_option(value: object, max_per_second: float | None) -> AdaptiveSettings | None:
    """The settings meant by ``adaptive=`` (None: not adaptive).

    *value* is a bool or an object with the attributes ``factor``, ``cooldown``, ``floor`` and
    ``recovery`` (``aiometer.Adaptive``).

    Raises:
        TypeError: *value* is neither, or an option is not a number.
        ConfigurationError: adaptive without max_per_second; factor not strictly between 0 and
            1; cooldown negative; floor or recovery not > 0; floor above max_per_second;
            recovery longer than a day.
    """
    if value is None or value is False:
        return None
    if value is True:
        settings = AdaptiveSettings()
    else:
        try:
            raw = (value.factor, value.cooldown, value.floor, value.recovery)  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(
                "adaptive must be a bool or an aiometer.Adaptive (factor, cooldown, floor, "
                f"recovery), got {type(value).__name__}"
            ) from None
        factor = _adaptive_number("factor", raw[0])
        if factor >= 1 or factor < 1e-6:
            raise ConfigurationError(
                f"adaptive factor must be between 1e-06 and 1 (a cut), got {raw[0]!r}"
            )
        floor = None if raw[2] is None else _adaptive_number("floor", raw[2])
        settings = AdaptiveSettings(
            factor,
            _adaptive_number("cooldown", raw[1], zero_ok=True),
            floor,
            _adaptive_number("recovery", raw[3]),
        )
    if max_per_second is None:
        raise ConfigurationError("adaptive needs max_per_second (the rate it cuts and recovers)")
    if settings.floor is not None and settings.floor > max_per_second:
        raise ConfigurationError(
            f"adaptive floor must be <= max_per_second ({max_per_second:g}), got {settings.floor:g}"
        )
    if settings.recovery > MAX_SECONDS or settings.cooldown > MAX_SECONDS:
        raise ConfigurationError(
            f"adaptive recovery and cooldown must be at most {MAX_SECONDS} s, got "
            f"{settings.recovery:g} and {settings.cooldown:g}"
        )
    return settings


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
    metrics: object = False
    adaptive: bool | AdaptiveLike | AdaptiveSettings | None = False

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
        check_metrics(self.metrics)
        adaptive = (
            self.adaptive
            if isinstance(self.adaptive, AdaptiveSettings)
            else check_adaptive_option(self.adaptive, self.max_per_second)
        )
        if isinstance(adaptive, AdaptiveSettings) and self.max_per_second is None:
            raise ConfigurationError("adaptive needs max_per_second")
        object.__setattr__(self, "adaptive", adaptive)
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

    @property
    def adaptive_settings(self) -> AdaptiveSettings | None:
        """The checked ``adaptive=`` settings (None: not adaptive)."""
        return self.adaptive if isinstance(self.adaptive, AdaptiveSettings) else None

    @property
    def key_ttl(self) -> float:
        """Seconds an abandoned limiter's keys live after its last call."""
        # Every call refreshes it. The window logs must outlive the longest window.
        per_max = max((r.per for r in self.rates), default=0.0)
        return max(
            60.0,
            2 * self.lease_ttl,
            2 * self.burst * self.interval_us / 1e6,
            per_max + 60.0 if self.rates else 0.0,
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
        """ARGV[1..9] of every writing script (see ``lua/README.md``)."""
        key_ttl = self.key_ttl
        adaptive = self.adaptive_settings
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
            adaptive.spec if adaptive is not None else "",
        ]
