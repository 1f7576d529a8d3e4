"""What a limiter's keys hold, read in one read-only script call (``status.lua``), and the
snapshot :meth:`RedisLimiter.statistics` makes of it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from aiometer import Rate

from ._client import ScriptArg, ScriptClient
from ._config import MAX_SECONDS, LimiterConfig, _check_count, _check_rate
from ._errors import ClientError, as_limiter_error
from ._exceptions import ConfigurationError, CorruptStateError
from ._scripts import load_script

__all__ = [
    "Control",
    "Holder",
    "LimiterState",
    "RedisLimiterStatistics",
    "decode_control_reply",
    "effective_limits",
    "limits_args",
    "next_start",
    "parse_control",
    "pause_us",
    "read_state",
    "run_control",
]


@dataclass(frozen=True)
class Control:
    """What a limiter's ``control`` key holds (see ``lua/README.md``: "Control").

    Attributes:
        paused_for: seconds until the fleet's pause ends (0.0: not paused).
        max_at_once: the max_at_once set at run time (None: none set).
        max_per_second: the max_per_second set at run time (None: none set).
        adaptive_rate: the fleet's adaptive rate now, per second (None: never cut, or no
            adaptive process reported a push-back within the key's lifetime).
        cut_ago: seconds since the latest adaptive cut (None: none).
    """

    paused_for: float = 0.0
    max_at_once: int | None = None
    max_per_second: float | None = None
    adaptive_rate: float | None = None
    cut_ago: float | None = None


def parse_control(now_us: int, fields: Sequence[object]) -> Control:
    """The :class:`Control` of the five strings that status.lua and control.lua return."""
    paused, max_at_once, interval, adaptive, rate = (
        f.decode() if isinstance(f, bytes) else str(f) for f in fields
    )
    cut_ago = None
    if adaptive:
        cut_ago = (now_us - int(adaptive.split("|")[1])) / 1e6
    return Control(
        max(0.0, (int(paused) - now_us) / 1e6) if paused else 0.0,
        int(max_at_once) if max_at_once else None,
        1e6 / float(interval) if interval else None,
        float(rate) if rate else None,
        cut_ago,
    )


@dataclass(frozen=True)
class LimiterState:
    """What status.lua reads: holders soonest expiry first, waiters in serving order, and
    the rate state as seconds from now (``tat``: None if no rate state is stored); ``issued``
    counts the tickets and fencing tokens handed out so far; ``spare``: seconds until the
    earliest rate start given back by a waiter that left before it (None: there is none)."""

    holders: tuple[Holder, ...]
    waiters: tuple[str, ...]
    tat: float | None
    issued: int
    spare: float | None = None
    #: Per window of the spec given to :func:`read_state`: the units started or reserved within
    #: its last ``per`` seconds (micro-units).
    window_used: tuple[int, ...] = ()
    #: The control key (given all the limiter's keys; else empty).
    control: Control = Control()


async def read_state(
    client: ScriptClient, keys: Sequence[str], name: str = "", window_spec: str = ""
) -> LimiterState:
    """Read one limiter's state from Redis in one read-only script call (with *window_spec*,
    ARGV[8] of the writers, and all the limiter's keys: the use of each window too).

    Raises:
        CorruptStateError: a key holds a value of the wrong type or form.
        RedisReplyError: Redis answered with another error.
        RedisUnavailableError: Redis did not answer.
        ConfigurationError: Redis refused the credentials.
    """
    label = name or keys[0].rpartition(":")[0]
    try:
        args = ["", window_spec] if window_spec else [""]
        reply = await client.run_script(load_script("status"), keys, args)
    except ClientError as exc:
        raise as_limiter_error(label, "reading the state", exc) from exc.__cause__
    try:
        now_us, holders_flat, queue_flat, tat, seq, *rest = reply
        now = int(now_us)
        holders = tuple(
            Holder(holders_flat[i], (int(holders_flat[i + 1]) - now) / 1e6)
            for i in range(0, len(holders_flat), 2)
        )
        waiters = tuple(queue_flat[i] for i in range(0, len(queue_flat), 2))
        spare = (int(rest[0]) - now) / 1e6 if rest and rest[0] else None
        used = tuple(int(units) for units in rest[1]) if len(rest) > 1 else ()
        control = parse_control(now, rest[2]) if len(rest) > 2 else Control()
        return LimiterState(
            holders,
            waiters,
            (float(tat) - now) / 1e6 if tat else None,
            int(seq or 0),
            spare,
            used,
            control,
        )
    except (ValueError, TypeError, IndexError) as exc:
        raise CorruptStateError(
            f"limiter {label!r}: its keys hold data no limiter wrote ({exc}); reset the "
            "limiter (limiter.reset() or `aiometer-redis reset`) to start afresh",
            "CORRUPT",
        ) from exc


@dataclass(frozen=True)
class Holder:
    """One held slot as seen in Redis.

    Attributes:
        lease_id: ``"<process id>:<n>"``, unique per acquisition.
        expires_in: seconds until the lease expires unless renewed.
    """

    lease_id: str
    expires_in: float


@dataclass(frozen=True)
class RedisLimiterStatistics:
    """A snapshot of one limiter, read from Redis by :meth:`RedisLimiter.statistics`.

    Attributes:
        name: the limiter's name.
        max_at_once, max_per_second, burst: the limits this process applies.
        holders: every live lease of every process, soonest expiry first.
        waiters: waiter ids of every process, in the order they will be served.
        next_start: seconds until the rate limit allows another start (0.0: now).
        local_held: slots held by this process through this object.
        local_waiting: coroutines of this process waiting in ``acquire()``.
        leases_lost: leases of this process found expired on renewal since it started.
        rates: the windows this process applies (``rates=``).
        rates_used: per Rate, in order: the cost (or, for ``counts="calls"``, the number of
            calls) started or reserved by the fleet within its last ``per`` seconds.
        paused_for: seconds until the fleet's pause ends (0.0: not paused).
        effective_max_at_once: the max_at_once the scripts apply now (one set at run time
            replaces the configured one).
        effective_max_per_second: the max_per_second the scripts apply now for this process's
            options: one set at run time replaces the configured one, and with ``adaptive`` the
            adaptive rate applies.
        limits_set: the limits set at run time (``set_limits``), as
            ``{"max_at_once": ..., "max_per_second": ...}`` (empty: none).
    """

    name: str
    max_at_once: int | None
    max_per_second: float | None
    burst: int
    holders: tuple[Holder, ...]
    waiters: tuple[str, ...]
    next_start: float
    local_held: int
    local_waiting: int
    leases_lost: int
    rates: tuple[Rate, ...] = ()
    rates_used: tuple[float, ...] = ()
    paused_for: float = 0.0
    effective_max_at_once: int | None = None
    effective_max_per_second: float | None = None
    limits_set: dict[str, float] = field(default_factory=dict)


def next_start(state: LimiterState, config: LimiterConfig) -> float:
    """Seconds until the rate limit of *config* allows another start (0.0: now)."""
    _, rate = effective_limits(config, state.control)
    paused = state.control.paused_for
    if state.tat is None or rate is None:
        return paused
    interval = 1 / rate
    start = max(0.0, state.tat - (config.burst - 1) * interval)
    if state.spare is not None:
        start = min(start, max(0.0, state.spare))
    return max(start, paused)


def effective_limits(config: LimiterConfig, control: Control) -> tuple[int | None, float | None]:
    """max_at_once and max_per_second as the scripts apply them now to a process configured
    with *config*: a limit set at run time replaces one the process has; with ``adaptive``, the
    adaptive rate (never above the maximum) applies."""
    max_at_once = config.max_at_once
    if max_at_once is not None and control.max_at_once is not None:
        max_at_once = control.max_at_once
    rate = config.max_per_second
    if rate is not None and control.max_per_second is not None:
        rate = control.max_per_second
    adaptive = config.adaptive_settings is not None and control.adaptive_rate is not None
    if rate is not None and adaptive and control.adaptive_rate is not None:
        rate = min(rate, control.adaptive_rate)
    return max_at_once, rate


def pause_us(seconds: object, name: str) -> int:
    """*seconds* (a pause) in whole microseconds.

    Raises:
        TypeError: not a number.
        ConfigurationError: not finite, negative or above a day.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_SECONDS:
        raise ConfigurationError(
            f"{name} must be a finite number between 0 and {MAX_SECONDS}, got {seconds!r}"
        )
    return math.ceil(seconds * 1e6)


def limits_args(max_at_once: object, max_per_second: object) -> list[ScriptArg]:
    """control.lua's 'set' arguments for these limits (None: leave as is).

    Raises:
        TypeError, ConfigurationError: a value is out of range, or both are None.
    """
    if max_at_once is None and max_per_second is None:
        raise ConfigurationError("give max_at_once, max_per_second or both")
    count = "" if max_at_once is None else _check_count(max_at_once, "max_at_once")
    interval = "" if max_per_second is None else 1e6 / _check_rate(max_per_second)
    return [count, interval]


def decode_control_reply(name: str, reply: Sequence[object]) -> tuple[bool, Control]:
    """control.lua's reply: whether the call cut the adaptive rate, and the control state."""
    try:
        now = int(cast("int", reply[0]))
        return int(cast("int", reply[1])) == 1, parse_control(now, reply[2:7])
    except (ValueError, TypeError, IndexError) as exc:
        raise CorruptStateError(
            f"limiter {name!r}: its control key holds data no limiter wrote ({exc}); reset the "
            "limiter (limiter.reset() or `aiometer-redis reset`) to start afresh",
            "CORRUPT",
        ) from exc


async def run_control(
    client: ScriptClient,
    keys: Sequence[str],
    name: str,
    operation: str,
    *args: ScriptArg,
    key_ttl: float = 60.0,
) -> tuple[bool, Control]:
    """Run control.lua once (the command line's way: no retry).

    Raises:
        RedisReplyError, RedisUnavailableError, ConfigurationError: as :func:`read_state`.
    """
    try:
        reply = await client.run_script(
            load_script("control"), keys, ["", math.ceil(key_ttl * 1000), operation, *args]
        )
    except ClientError as exc:
        raise as_limiter_error(name, operation, exc) from exc.__cause__
    return decode_control_reply(name, reply)
