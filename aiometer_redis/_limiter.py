"""RedisLimiter: max_at_once and max_per_second for every process sharing one Redis.

How a process takes a slot (all decisions are made by the Lua scripts in ``lua/`` on the
Redis clock):

1. A coroutine first takes a local permit (an in-process :class:`aiometer.ConcurrencyLimiter`
   of ``max_at_once``): a process can never hold more global slots than that, so no more of
   its coroutines need to contend in Redis, however many wait locally.
2. ``acquire.lua`` either grants a slot (a lease with an expiry, a fencing token and the delay
   until the rate limit allows the start) or queues the waiter with a ticket.
3. A queued waiter is woken by its process's mailbox: ``release.lua`` (and ``renew.lua`` /
   ``cancel.lua``) hand a freed slot straight to the oldest ticket and push the grant to the
   owner's mailbox list, which one dispatcher task per limiter per process blocks on with
   BLPOP. As a fallback against a lost wake-up, a waiter re-runs ``acquire.lua`` (idempotent
   for the same waiter id) after ``recheck_interval`` without news.
4. While tasks run, one renewal task per limiter per process extends all of the process's
   leases and queue entries in one call every ``lease_ttl / 3``. A process killed with
   SIGKILL stops renewing, so its slots come back within ``lease_ttl``.
5. The start happens after sleeping the returned delay: a rate-limited start costs one call.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from aiometer import ConcurrencyLimiter, Permit, RateLimiter
from aiometer._limiters import SlotMixin
from aiometer._validation import check_burst, check_max_at_once, check_max_per_second

from ._batch import Batcher
from ._client import ScriptArg, ScriptClient, adapt, client_from_url
from ._errors import (
    TRANSIENT_CODES,
    pool_errors,
    refused_errors,
    reply_code,
    reply_errors,
    transient_errors,
    translate_reply,
)
from ._exceptions import (
    AcquireTimeoutError,
    ConfigurationError,
    CorruptStateError,
    LeaseLostError,
    PoolExhaustedError,
    RedisLimiterError,
    RedisUnavailableError,
    WrongEventLoopError,
)
from ._scripts import Script, decode_acquire_reply, load_script
from ._urls import parse_url

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Holder",
    "LimiterState",
    "RedisLimiter",
    "RedisLimiterStatistics",
    "RedisPermit",
    "limiter_keys",
    "read_state",
]

logger = logging.getLogger("aiometer_redis")

# The longest lease, and the longest burst window, that a limiter accepts (a day).
_MAX_SECONDS = 86_400

_KEY_SUFFIXES = ("holders", "queue", "waiters", "tat", "seq", "grants", "recent", "spare")

# Passed as the client by from_url and by RedisLimiterGroup's check of its options: the
# client is made (or given) later. A user's None is refused.
_NO_CLIENT: Any = object()


def _escape_tag(name: str) -> str:
    # Redis hashes the text between the first "{" and the next "}"; escaping both braces
    # (and "%", to keep the mapping one-to-one) keeps any name inside its own tag.
    return name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def limiter_keys(name: str, prefix: str = "aiometer") -> list[str]:
    """The keys the scripts are given for limiter *name*, in KEYS order (one hash slot)."""
    tag = _escape_tag(name)
    return [f"{prefix}:{{{tag}}}:{suffix}" for suffix in _KEY_SUFFIXES]


def _mailbox_prefix(name: str, prefix: str) -> str:
    return f"{prefix}:{{{_escape_tag(name)}}}:mb:"


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


async def read_state(client: ScriptClient, keys: list[str], name: str = "") -> LimiterState:
    """Read one limiter's state from Redis in one read-only script call.

    Raises:
        CorruptStateError: a key holds a value of the wrong type or form.
        RedisReplyError: Redis answered with another error.
    """
    label = name or keys[0].rpartition(":")[0]
    try:
        reply = await client.run_script(load_script("status"), keys, [""])
    except reply_errors() as exc:
        raise translate_reply(label, "reading the state", exc) from exc
    try:
        now_us, holders_flat, queue_flat, tat, seq, *rest = reply
        now = int(now_us)
        holders = tuple(
            Holder(holders_flat[i], (int(holders_flat[i + 1]) - now) / 1e6)
            for i in range(0, len(holders_flat), 2)
        )
        waiters = tuple(queue_flat[i] for i in range(0, len(queue_flat), 2))
        spare = (int(rest[0]) - now) / 1e6 if rest and rest[0] else None
        return LimiterState(
            holders,
            waiters,
            (float(tat) - now) / 1e6 if tat else None,
            int(seq or 0),
            spare,
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


class _Waiter:
    __slots__ = ("event", "grant")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.grant: tuple[int, int] | None = None


class RedisPermit:
    """A slot held through a :class:`RedisLimiter`.

    Attributes:
        lease_id: the lease's id in Redis (empty for a rate-only limiter, which keeps no lease).
        token: a fencing token, increasing with every grant of this limiter; pass it to a
            downstream system that can reject writes from a holder whose lease was lost.
            0 for a permit taken in the in-process fallback.
        fallback: True if Redis was unavailable and the permit comes from the in-process
            fallback (``on_unavailable="local"``).
    """

    __slots__ = ("_limiter", "_local", "_lost", "_released", "fallback", "lease_id", "token")

    def __init__(
        self,
        limiter: RedisLimiter,
        lease_id: str,
        token: int,
        local: Permit | None,
        *,
        fallback: bool = False,
    ) -> None:
        self._limiter = limiter
        self._local = local
        self._lost = False
        self._released = False
        self.lease_id = lease_id
        self.token = token
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"RedisPermit(lease_id={self.lease_id!r}, token={self.token}, lost={self._lost})"

    def _forget(self) -> Permit | None:
        """Mark the permit released without a call (the limiter gives it back itself);
        return its local permit, for the limiter to release."""
        self._released = True
        local, self._local = self._local, None
        return local

    @property
    def lost(self) -> bool:
        """True if a renewal found the lease expired: the slot may have gone to another."""
        return self._lost

    async def release(self) -> None:
        """Give the slot back (idempotent; completes even inside a cancelled scope).

        If Redis cannot be reached the lease is left to expire within ``lease_ttl``.
        """
        if self._released:
            return
        limiter = self._limiter
        if self.lease_id and limiter._is_open():
            limiter._check_loop()
        self._released = True
        if not self.lease_id or not limiter._is_open():
            # Rate only, or the in-process fallback: nothing is held in Redis. Or the limiter
            # was left (its client may be closed): the lease, no longer renewed, expires
            # within lease_ttl.
            if self._local is not None:
                await self._local.release()
            return
        with anyio.CancelScope(shield=True):
            try:
                if self.lease_id:
                    limiter._held.pop(self.lease_id, None)
                    try:
                        await limiter._releases.submit(
                            self.lease_id, anyio.current_time() + limiter._retry_window
                        )
                    except (RedisLimiterError, TimeoutError) as exc:
                        limiter._orphans.add(self.lease_id)
                        logger.warning(
                            "limiter %r: could not release lease %s (%s); it is released "
                            "when Redis answers again, or expires within lease_ttl",
                            limiter.name,
                            self.lease_id,
                            exc,
                        )
            finally:
                if self._local is not None:
                    await self._local.release()


class RedisLimiter(SlotMixin):
    """``max_at_once`` and ``max_per_second`` enforced for every process that uses the same
    *name* on the same Redis.

    Use it as an async context manager (it runs a renewal task, and a dispatcher task that
    wakes this process's waiters) and pass it to any run function or take slots directly::

        async with RedisLimiter(redis, "api", max_at_once=10, max_per_second=5) as limiter:
            await aiometer.run_on_each(fetch, urls, limiter=limiter)
            async with limiter.slot():
                ...

    Args:
        redis: a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` (asyncio), or a
            ``coredis.Redis`` / ``coredis.RedisCluster`` (asyncio and trio; enter it with
            ``async with`` before use). The limiter does not close a client it was given.
            Each limiter object with waiting tasks keeps one pooled connection in a blocking
            BLPOP, so size the client's pool for one per limiter object plus headroom (a
            cluster client with 100 limiters needs ``max_connections`` above 100 per node).
        name: any string; processes using the same name and prefix share the limits.
        max_at_once: at most this many slots held at once across all processes.
        max_per_second: at most this many starts per second across all processes (GCRA).
        burst: starts allowed back to back after an idle period (default 1).
        lease_ttl: seconds a held slot survives without renewal; a killed process's slots
            come back within this time. Renewal runs every ``lease_ttl / 3``.
        prefix: the first part of every key (``{prefix}:{{{name}}}:...``); no braces.
        acquire_timeout: raise :class:`AcquireTimeoutError` after waiting this long for a
            slot (default: wait as long as it takes).
        retry_window: how long a Redis call is retried (with backoff) on connection errors
            and time-outs before :class:`RedisUnavailableError` is raised.
        recheck_interval: how long a queued waiter waits for its wake-up before asking Redis
            again (a fallback; normally the mailbox wakes it within a round trip).
        on_unavailable: ``"fail"`` (the default) raises :class:`RedisUnavailableError` when
            Redis does not answer within ``retry_window``: no task starts without Redis's
            agreement. ``"local"`` falls back to in-process limits instead (the same numbers,
            but per process: a fleet of N processes may then run N times the limits), probes
            Redis every second and returns to it when it answers; both transitions are logged
            as warnings on the ``aiometer_redis`` logger.
        on_lease_lost: called with a :class:`LeaseLostError` when a renewal finds one of this
            process's leases expired (besides the warning logged and the count in
            ``statistics().leases_lost``).

    The limits travel with every call: processes configured differently each apply their
    own numbers to their own calls (a rolling deploy converges as old processes leave).

    Raises:
        ConfigurationError: a value is out of range (also a ValueError).
        TypeError: a value has the wrong type, or *redis* is not a supported client.
    """

    def __init__(
        self,
        redis: Any,
        name: str,
        *,
        max_at_once: int | None = None,
        max_per_second: float | None = None,
        burst: int = 1,
        lease_ttl: float = 30.0,
        prefix: str = "aiometer",
        acquire_timeout: float | None = None,
        retry_window: float = 5.0,
        recheck_interval: float = 1.0,
        on_unavailable: Literal["fail", "local"] = "fail",
        on_lease_lost: Callable[[LeaseLostError], object] | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        try:
            if not name:
                raise ValueError("name must not be empty")
            for label, text in (("name", name), ("prefix", prefix)):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{label} must be encodable as UTF-8, got {text!r}") from None
            if not prefix or "{" in prefix or "}" in prefix:
                raise ValueError(f"prefix must be non-empty and without braces, got {prefix!r}")
            if max_at_once is None and max_per_second is None:
                raise ValueError("give max_at_once, max_per_second or both")
            if max_at_once is not None:
                check_max_at_once(max_at_once)
            if max_per_second is not None:
                check_max_per_second(max_per_second)
            check_burst(burst)
            lease_ttl = _check_seconds(lease_ttl, "lease_ttl", minimum=0.1)
            retry_window = _check_seconds(retry_window, "retry_window")
            recheck_interval = _check_seconds(recheck_interval, "recheck_interval")
            if acquire_timeout is not None:
                acquire_timeout = _check_seconds(acquire_timeout, "acquire_timeout")
            if lease_ttl > _MAX_SECONDS:
                raise ValueError(f"lease_ttl must be at most {_MAX_SECONDS} s, got {lease_ttl!r}")
            if max_per_second is not None and burst / max_per_second > _MAX_SECONDS:
                raise ValueError(
                    f"burst / max_per_second must be at most {_MAX_SECONDS} s (the rate state "
                    f"would outlive its keys), got {burst / max_per_second:g} s"
                )
            if on_unavailable not in ("fail", "local"):
                raise ValueError(
                    f"on_unavailable must be 'fail' or 'local', got {on_unavailable!r}"
                )
        except ConfigurationError:
            raise
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if on_lease_lost is not None and not callable(on_lease_lost):
            raise TypeError(f"on_lease_lost must be callable, got {type(on_lease_lost).__name__}")
        if redis is None:
            raise TypeError(
                "redis must be a Redis client (redis.asyncio.Redis, coredis.Redis, ...), got "
                "None; use RedisLimiter.from_url(url, name, ...) to have the limiter make one"
            )
        self._client: ScriptClient | None = None if redis is _NO_CLIENT else adapt(redis)
        self._url: str | None = None
        self._name = name
        self._max_at_once = max_at_once
        self._max_per_second = max_per_second
        self._burst = burst
        self._lease_ttl = lease_ttl
        self._acquire_timeout = acquire_timeout
        self._retry_window = retry_window
        self._recheck_interval = recheck_interval
        interval_us = 1e6 / max_per_second if max_per_second is not None else 0.0
        self._keys = limiter_keys(name, prefix)
        self._process_id = uuid.uuid4().hex[:16]
        mailbox_prefix = _mailbox_prefix(name, prefix)
        self._mailbox = mailbox_prefix + self._process_id
        # An abandoned limiter's keys vanish after this long; every call refreshes it.
        key_ttl = max(60.0, 2 * lease_ttl, 2 * burst * interval_us / 1e6)
        self._header: list[ScriptArg] = [
            "",
            max_at_once or 0,
            interval_us,
            burst,
            # Without max_at_once there are no leases; the scripts then use this span to
            # remember rate-only grants, so that a retry within the retry window finds them.
            math.ceil((lease_ttl if max_at_once else max(lease_ttl, 2 * retry_window)) * 1e6),
            math.ceil(key_ttl * 1000),
            mailbox_prefix,
        ]
        self._scripts: dict[str, Script] = {
            n: load_script(n) for n in ("acquire", "release", "renew", "cancel", "status")
        }
        self._transient = transient_errors()
        self._refused = refused_errors()
        self._replies = reply_errors()
        self._pool_errors = pool_errors()
        # When the current run of failed Redis calls began (None: the last call succeeded).
        self._failing_since: float | None = None
        # The event loop the limiter was entered in (see _check_loop).
        self._loop: object = None
        self._counter = itertools.count()
        self._local = ConcurrencyLimiter(max_at_once) if max_at_once is not None else None
        self._on_unavailable = on_unavailable
        self._on_lease_lost = on_lease_lost
        # The in-process stand-in while Redis is away (on_unavailable="local"): the local
        # concurrency gate above, plus a local rate limiter.
        self._fallback_rate = (
            RateLimiter(max_per_second, burst=burst) if max_per_second is not None else None
        )
        self._in_fallback = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._attached = False
        # Waiter and lease ids whose last call failed on the client side (see
        # _withdraw_orphans).
        self._orphans: set[str] = set()
        self._withdrawing = False
        self._acquires = Batcher(self._acquire_many)
        self._releases = Batcher(self._release_many)
        self._held: dict[str, RedisPermit] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._waiters_added = anyio.Event()
        self._leases_lost = 0
        self._stack: AsyncExitStack | None = None

    @classmethod
    def from_url(cls, url: str, name: str, **options: Any) -> RedisLimiter:
        """Build a limiter that creates (and closes) its own client for *url*.

        On asyncio the client is ``redis.asyncio.Redis`` when redis-py is installed, else
        coredis; on trio it is coredis. The client is made when the limiter is entered.
        """
        parse_url(url)  # a malformed URL fails here, not when the limiter is entered
        limiter = cls(_NO_CLIENT, name, **options)
        limiter._url = url
        return limiter

    def __repr__(self) -> str:
        return (
            f"RedisLimiter(name={self._name!r}, max_at_once={self._max_at_once}, "
            f"max_per_second={self._max_per_second}, burst={self._burst}, "
            f"lease_ttl={self._lease_ttl})"
        )

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key of this limiter that the scripts are given (all in one hash slot)."""
        return tuple(self._keys)

    # -- lifetime ------------------------------------------------------------------------------

    async def __aenter__(self) -> RedisLimiter:
        if self._stack is not None:
            raise RuntimeError("this RedisLimiter is already open")
        self._loop = _current_loop()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            task_group = await stack.enter_async_context(anyio.create_task_group())
            closing = anyio.Event()
            if self._url is not None:
                self._client = await task_group.start(self._own_client, self._url, closing)
            # On exit (last registered, first run): cancel the background tasks, then let the
            # client owner close the client.
            stack.callback(closing.set)
            stack.callback(task_group.cancel_scope.cancel)
            task_group.start_soon(self._renew_loop)
            self._task_group = task_group
            if self._max_at_once is not None:
                task_group.start_soon(self._dispatch_loop)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._task_group = None
        if stack is not None:
            await _exit_unwrapped(lambda: stack.__aexit__(exc_type, exc, tb), exc)

    async def _own_client(
        self,
        url: str,
        closing: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[ScriptClient] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        # A client made from a URL lives in this shielded task: coredis runs its connections
        # in background tasks, and a cancellation of the code around the limiter must not
        # take them down while cancelled tasks still release their slots through them.
        with anyio.CancelScope(shield=True):
            async with client_from_url(url) as client:
                task_status.started(client)
                await closing.wait()

    def _attach(self, task_group: anyio.abc.TaskGroup) -> anyio.CancelScope:
        """Run this limiter's background tasks in *task_group* (a group of limiters owns
        them); the returned scope stops them."""
        scope = anyio.CancelScope()

        async def background() -> None:
            with scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(self._renew_loop)
                    if self._max_at_once is not None:
                        inner.start_soon(self._dispatch_loop)

        task_group.start_soon(background)
        self._task_group = task_group
        self._attached = True
        self._loop = _current_loop()
        return scope

    def _is_open(self) -> bool:
        return self._stack is not None or self._attached

    def _check_open(self) -> None:
        if not self._is_open():
            raise RuntimeError(
                "enter the limiter first: `async with RedisLimiter(...) as limiter:`"
            )
        self._check_loop()

    def _check_loop(self) -> None:
        if _current_loop() is not self._loop:
            raise WrongEventLoopError(
                f"limiter {self._name!r} was entered in another event loop (another thread, "
                "or another anyio.run / asyncio.run); use one limiter object per event loop"
            )

    def _is_idle(self) -> bool:
        """True if nothing is held, awaited or left to withdraw through this limiter."""
        return (
            not self._held
            and not self._waiters
            and not self._orphans
            and not (self._local is not None and self._local.statistics().held)
        )

    # -- Redis calls ---------------------------------------------------------------------------

    async def _call(self, script: str, *args: ScriptArg, deadline: float | None = None) -> Any:
        """Run one script, retrying connection errors, time-outs and transient error replies
        (BUSY, LOADING, ...) until *deadline* (default: ``retry_window`` from now)."""
        client = self._client
        assert client is not None
        argv = [*self._header, *args]
        if deadline is None:
            deadline = anyio.current_time() + self._retry_window
        backoff = 0.05
        last: BaseException | None = None
        while True:
            try:
                # A plain scope with a deadline: cheaper than fail_after on this hot path.
                with anyio.CancelScope(deadline=deadline):
                    reply = await client.run_script(self._scripts[script], self._keys, argv)
                    self._failing_since = None
                    if self._orphans and not self._withdrawing and self._task_group is not None:
                        # Redis answers again: free what failed calls may have left behind.
                        self._withdrawing = True
                        self._task_group.start_soon(self._withdraw_orphans)
                    return reply
                # Cut short by the deadline: keep the failure of an earlier attempt, if any,
                # as the reason.
                if last is None:
                    last = TimeoutError(f"no reply within {self._retry_window:g}s")
            except self._refused as exc:
                raise ConfigurationError(
                    f"limiter {self._name!r}: Redis refused the credentials: {exc}"
                ) from exc
            except self._transient as exc:
                last = exc
            except self._replies as exc:
                if reply_code(exc) not in TRANSIENT_CODES:
                    raise translate_reply(self._name, script, exc) from exc
                last = exc
            now = anyio.current_time()
            if self._failing_since is None:
                self._failing_since = now
            if now >= deadline:
                raise self._unavailable(script, last)
            await anyio.sleep(min(backoff, deadline - now))
            backoff = min(backoff * 2, 1.0)

    def _unavailable(self, script: str, last: BaseException | None) -> RedisLimiterError:
        if isinstance(last, self._pool_errors):
            error: RedisLimiterError = PoolExhaustedError(
                f"limiter {self._name!r}: the Redis client's connection pool had no free "
                f"connection for {script} within {self._retry_window:g}s ({last}); Redis "
                "itself may be fine. Give the client a larger max_connections (one per "
                "limiter object for its BLPOP, plus the calls in flight at once) or a "
                "redis.asyncio.BlockingConnectionPool"
            )
        else:
            error = RedisUnavailableError(
                f"limiter {self._name!r}: Redis did not answer {script} within "
                f"{self._retry_window:g}s: {last!r}"
            )
        error.__cause__ = last
        return error

    # -- acquire / release ---------------------------------------------------------------------

    async def acquire(self) -> RedisPermit:
        """Wait until this process may start one more task under the global limits.

        Raises:
            AcquireTimeoutError: ``acquire_timeout`` passed first (nothing is left held).
            RedisUnavailableError: Redis did not answer within ``retry_window`` (unless
                ``on_unavailable="local"``, which falls back to in-process limits instead).
            RuntimeError: the limiter was not entered with ``async with``.
        """
        self._check_open()
        start = anyio.current_time()
        if self._acquire_timeout is None:
            return await self._acquire_or_fall_back(start, None)
        try:
            with anyio.fail_after(self._acquire_timeout):
                return await self._acquire_or_fall_back(start, start + self._acquire_timeout)
        except TimeoutError as exc:
            if isinstance(exc, RedisLimiterError):
                raise
            raise AcquireTimeoutError(
                f"limiter {self._name!r}: no slot within {self._acquire_timeout:g}s"
            ) from None

    async def _acquire_or_fall_back(self, start: float, deadline: float | None) -> RedisPermit:
        if not self._in_fallback:
            try:
                return await self._acquire(start, deadline)
            except RedisUnavailableError as exc:
                if self._on_unavailable != "local":
                    raise
                self._fall_back(exc)
        return await self._acquire_locally()

    def _fall_back(self, exc: RedisUnavailableError) -> None:
        if self._in_fallback:
            return
        self._in_fallback = True
        logger.warning(
            "limiter %r: %s; falling back to in-process limits (per process, not global) "
            "until Redis answers again",
            self._name,
            exc,
        )
        assert self._task_group is not None
        self._task_group.start_soon(self._probe_loop)

    async def _probe_loop(self) -> None:
        client = self._client
        assert client is not None
        while True:
            await anyio.sleep(min(1.0, self._retry_window))
            with anyio.move_on_after(self._retry_window):
                try:
                    await client.ping()
                except self._transient:
                    continue
                self._in_fallback = False
                logger.warning(
                    "limiter %r: Redis is back; leaving the in-process fallback", self._name
                )
                await self._withdraw_orphans()
                return

    async def _acquire_locally(self) -> RedisPermit:
        local = await self._local.acquire() if self._local is not None else None
        try:
            if self._fallback_rate is not None:
                await self._fallback_rate.acquire()
        except BaseException:
            if local is not None:
                await local.release()
            raise
        return RedisPermit(self, "", 0, local, fallback=True)

    async def _acquire(self, start: float, deadline: float | None) -> RedisPermit:
        local = await self._local_permit(start)
        waiter_id = f"{self._process_id}:{next(self._counter)}"
        try:
            token, delay_us = await self._take(waiter_id, start, deadline)
        except BaseException:
            if local is not None:
                await local.release()
            raise
        if self._max_at_once is None:
            permit = RedisPermit(self, "", token, None)
        else:
            permit = RedisPermit(self, waiter_id, token, local)
            self._held[waiter_id] = permit
        try:
            if delay_us > 0:
                if deadline is not None and anyio.current_time() + delay_us / 1e6 > deadline:
                    # A grant handed on from the queue, whose rate start lies past the
                    # deadline: give it back now rather than sleep towards it.
                    raise self._too_late()
                await anyio.sleep(delay_us / 1e6)
            else:
                # The grant may have arrived after the caller was cancelled (the call on the
                # wire is shielded): give it back rather than hand it to a cancelled caller.
                await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if delay_us > 0:
                await self._give_back(waiter_id, permit)
            else:
                await permit.release()
            raise
        return permit

    def _too_late(self) -> AcquireTimeoutError:
        return AcquireTimeoutError(
            f"limiter {self._name!r}: no slot within {self._acquire_timeout:g}s (the rate "
            "limit's next start is further away)"
        )

    async def _local_permit(self, start: float) -> Permit | None:
        """The local concurrency permit; raises RedisUnavailableError once Redis has failed
        every call for ``retry_window`` of this caller's wait (the holders it waits for
        cannot give their slots back meanwhile)."""
        if self._local is None:
            return None
        try:
            return self._local.acquire_nowait()
        except anyio.WouldBlock:
            pass
        check_at = start + self._retry_window
        while True:
            with anyio.move_on_at(check_at):
                return await self._local.acquire()
            since = self._failing_since
            now = anyio.current_time()
            if since is None:
                check_at = now + self._retry_window
            elif now - max(since, start) >= self._retry_window * 0.999:
                raise RedisUnavailableError(
                    f"limiter {self._name!r}: Redis did not answer any call within "
                    f"{self._retry_window:g}s while this caller waited for a slot"
                )
            else:
                check_at = max(since, start) + self._retry_window

    async def _give_back(self, waiter_id: str, permit: RedisPermit) -> None:
        """Withdraw a grant whose rate start has not come: its lease (if any) and its start
        are given back, so that later acquisitions may use them."""
        local = permit._forget()
        self._held.pop(waiter_id, None)
        with anyio.CancelScope(shield=True):
            try:
                await self._call("cancel", waiter_id)
            except RedisLimiterError as exc:
                self._orphans.add(waiter_id)
                logger.warning(
                    "limiter %r: could not give back grant %s (%s); it is given back when "
                    "Redis answers again",
                    self._name,
                    waiter_id,
                    exc,
                )
            finally:
                if local is not None:
                    await local.release()

    def _redis_deadline(self, start: float) -> float:
        # While Redis is failing, a caller's retry window runs from its own start: calls
        # queued behind others must not each get a fresh one.
        now = anyio.current_time()
        if self._failing_since is not None:
            return min(now + self._retry_window, max(start + self._retry_window, now))
        return now + self._retry_window

    async def _submit_acquire(self, waiter_id: str, start: float, deadline: float | None) -> Any:
        item = waiter_id
        if deadline is not None and self._max_per_second is not None:
            # Never reserve a rate start past the caller's deadline.
            item += f"/{max(0, int((deadline - anyio.current_time()) * 1e6))}"
        try:
            return await self._acquires.submit(item, self._redis_deadline(start))
        except TimeoutError as exc:
            if isinstance(exc, RedisLimiterError):
                raise
            raise RedisUnavailableError(
                f"limiter {self._name!r}: Redis did not answer within "
                f"{self._retry_window:g}s (the calls queued before this one were not answered)"
            ) from None

    async def _acquire_many(self, items: list[str], deadline: float) -> list[Any]:
        return decode_acquire_reply(await self._call("acquire", *items, deadline=deadline))

    async def _release_many(self, lease_ids: list[str], deadline: float) -> list[Any]:
        reply = await self._call("release", *lease_ids, deadline=deadline)
        return [reply] * len(lease_ids)

    async def _take(self, waiter_id: str, start: float, deadline: float | None) -> tuple[int, int]:
        """Get a grant ``(token, delay_us)`` for *waiter_id*, queueing until one comes."""
        try:
            reply = await self._submit_acquire(waiter_id, start, deadline)
        except (RedisUnavailableError, PoolExhaustedError):
            # The call may have run on the server after we gave up on its reply, leaving a
            # lease or a rate reservation: withdraw it when Redis answers again.
            self._orphans.add(waiter_id)
            raise
        if reply[0] == 1:
            return int(reply[1]), int(reply[2])
        if reply[0] == 2:
            raise self._too_late()
        waiter = _Waiter()
        self._waiters[waiter_id] = waiter
        self._waiters_added.set()
        try:
            while True:
                with anyio.move_on_after(self._recheck_interval):
                    await waiter.event.wait()
                if waiter.grant is not None:
                    return waiter.grant
                # No wake-up (lost, or the queue entry expired): ask again. The same waiter id
                # makes this idempotent: a grant already made is returned, not made twice.
                waiter.event = anyio.Event()
                reply = await self._submit_acquire(waiter_id, anyio.current_time(), deadline)
                if reply[0] == 1:
                    return int(reply[1]), int(reply[2])
                if reply[0] == 2:
                    raise self._too_late()
        except BaseException:
            # Withdraw from the queue; a grant that raced with us is freed by the script.
            with anyio.CancelScope(shield=True):
                try:
                    await self._call("cancel", waiter_id)
                except RedisLimiterError:
                    self._orphans.add(waiter_id)
                    logger.warning(
                        "limiter %r: could not withdraw waiter %s; it is withdrawn when "
                        "Redis answers again, or expires within lease_ttl",
                        self._name,
                        waiter_id,
                    )
            raise
        finally:
            del self._waiters[waiter_id]

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[RedisPermit]:
        """Hold one slot for the duration of the block.

        Raises:
            LeaseLostError: on leaving the block, if the lease expired while it ran.
        """
        permit = await self.acquire()
        try:
            yield permit
        finally:
            await permit.release()
        if permit.lost:
            raise LeaseLostError(
                f"limiter {self._name!r}: lease {permit.lease_id} expired while the block ran"
            )

    # -- background tasks ----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        client = self._client
        assert client is not None
        backoff = 0.05
        while True:
            if not self._waiters:
                self._waiters_added = anyio.Event()
                await self._waiters_added.wait()
            try:
                message = await client.blpop(self._mailbox, self._recheck_interval)
            except (*self._transient, *self._replies) as exc:
                if isinstance(exc, self._replies):
                    logger.warning("limiter %r: reading the mailbox failed: %s", self._name, exc)
                # The waiters' own re-checks cover the outage; just don't spin.
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if message is None:
                continue
            waiter_id, token, delay_us = message.split("|")
            waiter = self._waiters.get(waiter_id)
            if waiter is not None:
                waiter.grant = (int(token), int(delay_us))
                waiter.event.set()

    async def _withdraw_orphans(self) -> None:
        """Free what calls that failed on the client side may have taken on the server.

        A call whose reply never came (a dropped connection, Redis paused past the retry
        window) may still have run: an acquire may hold a lease nobody will release, a failed
        release or cancel left its entry. cancel.lua frees an id whatever state it is in.
        """
        self._withdrawing = True
        try:
            for entry_id in list(self._orphans):
                try:
                    await self._call("cancel", entry_id)
                except RedisLimiterError:
                    return
                self._orphans.discard(entry_id)
        finally:
            self._withdrawing = False

    async def _renew_loop(self) -> None:
        while True:
            await anyio.sleep(self._lease_ttl / 3)
            if self._orphans:
                await self._withdraw_orphans()
            leases = list(self._held)
            waiters = list(self._waiters)
            if not leases and not waiters:
                continue
            try:
                lost_leases, lost_waiters, _ = await self._call(
                    "renew", len(leases), *leases, *waiters
                )
            except RedisLimiterError as exc:
                logger.warning("limiter %r: renewal failed: %s", self._name, exc)
                continue
            for lease_id in lost_leases:
                permit = self._held.get(lease_id)
                if permit is not None and not permit._lost:
                    permit._lost = True
                    self._leases_lost += 1
                    logger.warning(
                        "limiter %r: lease %s expired before renewal; its slot may have "
                        "been given to another process",
                        self._name,
                        lease_id,
                    )
                    if self._on_lease_lost is not None:
                        self._report_lost(lease_id)
            for waiter_id in lost_waiters:
                waiter = self._waiters.get(waiter_id)
                if waiter is not None:
                    # Its queue entry expired: wake it so it queues again at once.
                    waiter.event.set()

    def _report_lost(self, lease_id: str) -> None:
        assert self._on_lease_lost is not None
        error = LeaseLostError(
            f"limiter {self._name!r}: lease {lease_id} expired before it was renewed"
        )
        try:
            self._on_lease_lost(error)
        except Exception:
            logger.exception("limiter %r: the on_lease_lost callback failed", self._name)

    # -- operator views ------------------------------------------------------------------------

    async def statistics(self) -> RedisLimiterStatistics:
        """Read the limiter's state from Redis (holders, waiters, next start)."""
        client = self._client
        if client is None:
            raise RuntimeError("enter the limiter first: `async with RedisLimiter(...)`")
        state = await read_state(client, self._keys, self._name)
        next_start = 0.0
        if state.tat is not None and self._max_per_second is not None:
            interval = 1 / self._max_per_second
            next_start = max(0.0, state.tat - (self._burst - 1) * interval)
            if state.spare is not None:
                next_start = min(next_start, max(0.0, state.spare))
        return RedisLimiterStatistics(
            name=self._name,
            max_at_once=self._max_at_once,
            max_per_second=self._max_per_second,
            burst=self._burst,
            holders=state.holders,
            waiters=state.waiters,
            next_start=next_start,
            local_held=len(self._held),
            local_waiting=len(self._waiters),
            leases_lost=self._leases_lost,
        )

    async def reset(self) -> None:
        """Delete the limiter's keys: every lease, queue entry and rate state is forgotten.

        Processes still holding slots keep running; their renewals will report the leases
        lost. Meant for operators and tests.
        """
        client = self._client
        if client is None:
            raise RuntimeError("enter the limiter first: `async with RedisLimiter(...)`")
        await client.delete(*self._keys, self._mailbox)


def _same(one: BaseException, other: BaseException) -> bool:
    """*one* is *other*, or a copy of the group *other* with the same leaves (trio splits
    groups on their way through a cancelled scope, which derives new group objects)."""
    if one is other:
        return True
    if not (isinstance(one, BaseExceptionGroup) and isinstance(other, BaseExceptionGroup)):
        return False
    return (
        one.message == other.message
        and len(one.exceptions) == len(other.exceptions)
        and all(_same(a, b) for a, b in zip(one.exceptions, other.exceptions, strict=True))
    )


def _only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """True if *group* is *exc*, or only wraps *exc* (itself possibly a group)."""
    return _same(group, exc) or all(
        _same(inner, exc) or (isinstance(inner, BaseExceptionGroup) and _only(inner, exc))
        for inner in group.exceptions
    )


def _current_loop() -> object:
    """The running event loop (asyncio) or run (trio), as an object compared by identity."""
    return anyio.lowlevel.current_token().native_token


async def _exit_unwrapped(
    aexit: Callable[[], Awaitable[bool | None]], exc: BaseException | None
) -> bool | None:
    """Run *aexit* (the exit of a task group, or of a stack holding one) for an ``async with``
    block that raised *exc*: a group that only wraps *exc* is handed back as *exc* itself, so
    ``except SomeError`` around the block works."""
    try:
        return await aexit()
    except BaseExceptionGroup as group:
        if exc is None or not _only(group, exc):
            raise
    # Raised here, outside the handler, so that the group is not chained onto it.
    raise exc


def _check_seconds(value: object, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
    return float(value)
