"""What a limiter's keys hold, read in one read-only script call (``status.lua``), and the
snapshot :meth:`RedisLimiter.statistics` makes of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiometer import Rate

from ._client import ScriptClient
from ._config import LimiterConfig
from ._errors import ClientError, as_limiter_error
from ._exceptions import CorruptStateError
from ._scripts import load_script

__all__ = ["Holder", "LimiterState", "RedisLimiterStatistics", "next_start", "read_state"]


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
        return LimiterState(
            holders,
            waiters,
            (float(tat) - now) / 1e6 if tat else None,
            int(seq or 0),
            spare,
            used,
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


def next_start(state: LimiterState, config: LimiterConfig) -> float:
    """Seconds until the rate limit of *config* allows another start (0.0: now)."""
    if state.tat is None or config.max_per_second is None:
        return 0.0
    interval = 1 / config.max_per_second
    start = max(0.0, state.tat - (config.burst - 1) * interval)
    if state.spare is not None:
        start = min(start, max(0.0, state.spare))
    return start
