"""RedisLimiter: max_at_once and max_per_second for every process sharing one Redis.

How a process takes a slot (all decisions are made by the Lua scripts in ``lua/`` on the
Redis clock):

1. A coroutine first takes a local permit (an in-process :class:`aiometer.ConcurrencyLimiter`
   of ``max_at_once``): a process can never hold more global slots than that, so no more of
   its coroutines need to contend in Redis, however many wait locally.
2. ``acquire.lua`` either grants a slot (a lease with an expiry, a fencing token and the delay
   until the rate limit allows the start) or queues the waiter with a ticket.
3. A queued waiter is woken by a grant pushed to its process: ``release.lua`` (and
   ``renew.lua`` / ``cancel.lua``) hand a freed slot straight to the oldest ticket and PUBLISH
   the grant on the owner's channel, to which one dispatcher task per limiter per process
   subscribes while the process has waiters (a re-subscription makes every waiter ask again:
   a message published meanwhile is dropped). With a cluster client the grant goes to the
   owner's mailbox list instead, which the dispatcher blocks on with BLPOP. As a fallback
   against a lost wake-up, a waiter re-runs ``acquire.lua`` (idempotent for the same waiter
   id) after ``recheck_interval`` without news. A release is not awaited: it rides in front
   of the process's next ``acquire.lua`` call (a swap), whose handoff returns the grants to
   this process's own waiters in its reply instead.
4. While tasks run, one renewal task per limiter per process extends all of the process's
   leases and queue entries in one call every ``lease_ttl / 3``. A process killed with
   SIGKILL stops renewing, so its slots come back within ``lease_ttl``.
5. The start happens after sleeping the returned delay: a rate-limited start costs one call.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from aiometer import ConcurrencyLimiter, CostPermit, Permit, Rate, RateLimiter

from ._batch import Batcher
from ._client import ScriptArg, ScriptClient, adapt, client_from_url
from ._config import OVERRIDE_KEEP, UNIT, AdaptiveLike, LimiterConfig, check_name, cost_units
from ._errors import (
    ClientError,
    ErrorReply,
    PoolFull,
    Refused,
    Unavailable,
    as_limiter_error,
    translate_reply,
)
from ._exceptions import (
    AcquireTimeoutError,
    ConfigurationError,
    LeaseLostError,
    PoolExhaustedError,
    RedisLimiterError,
    RedisUnavailableError,
)
from ._exits import exit_unwrapped
from ._keys import KeyLayout
from ._leases import LeaseTable
from ._metrics import limiter_metrics
from ._permit import RedisPermit
from ._reserve import HORIZON, LATE, ReservePool, reserve_cap
from ._scripts import Script, decode_acquire_reply, decode_swap_reply, load_script
from ._state import (
    Control,
    RedisLimiterStatistics,
    decode_control_reply,
    effective_limits,
    limits_args,
    next_start,
    read_state,
)
from ._state import pause_us as _pause_us
from ._urls import parse_url

__all__ = ["RedisLimiter"]

logger = logging.getLogger("aiometer_redis")


class RedisLimiter:
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
            Each limiter object with waiting tasks keeps one pooled connection for its
            wake-ups (a pub/sub subscription, kept 5 s after the last waiter left; a
            blocking BLPOP with a cluster client), so size the client's pool for one per
            limiter object plus headroom (a cluster client with 100 limiters needs
            ``max_connections`` above 100 per node).
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
            again (a fallback; normally a pushed grant wakes it within a round trip).
        on_unavailable: ``"fail"`` (the default) raises :class:`RedisUnavailableError` when
            Redis does not answer within ``retry_window``: no task starts without Redis's
            agreement. ``"local"`` falls back to in-process limits instead (the same numbers,
            but per process: a fleet of N processes may then run N times the limits), probes
            Redis every second and returns to it when it answers; both transitions are logged
            as warnings on the ``aiometer_redis`` logger.
        on_lease_lost: called with a :class:`LeaseLostError` when a renewal finds one of this
            process's leases expired (besides the warning logged and the count in
            ``statistics().leases_lost``).
        rates: windows of a rate limit, each an :class:`aiometer.Rate` (``Rate(5000,
            per=3600)``: at most 5000 units of cost started in any hour), across all processes,
            next to (or instead of) ``max_per_second``. Every acquisition is charged to all of
            them or, while any is full, waits; starts are served first come, first served.
            Each window keeps one entry per start of its last ``per`` seconds in Redis.
        metrics: ``True`` reports Prometheus metrics of this limiter to prometheus_client's
            default registry, a ``prometheus_client.CollectorRegistry`` to that one (needs the
            ``metrics`` extra); off by default. See the README's "Observability".
        adaptive: ``True`` (default options) or an ``aiometer.Adaptive``: each
            :meth:`throttled` report cuts the fleet's effective rate by ``factor`` (at most once
            per ``cooldown`` seconds, never below ``floor``), and the rate climbs back linearly
            to ``max_per_second`` over ``recovery`` seconds while no push-back arrives. Needs
            ``max_per_second``. See the README's "When the target pushes back".

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
        rates: Sequence[Rate] = (),
        metrics: object = False,
        adaptive: bool | AdaptiveLike = False,
    ) -> None:
        check_name(name)
        config = LimiterConfig(
            max_at_once=max_at_once,
            max_per_second=max_per_second,
            burst=burst,
            lease_ttl=lease_ttl,
            prefix=prefix,
            acquire_timeout=acquire_timeout,
            retry_window=retry_window,
            recheck_interval=recheck_interval,
            on_unavailable=on_unavailable,
            on_lease_lost=on_lease_lost,
            rates=rates,
            metrics=metrics,
            adaptive=adaptive,
        )
        if redis is None:
            raise TypeError(
                "redis must be a Redis client (redis.asyncio.Redis, coredis.Redis, ...), got "
                "None; use RedisLimiter.from_url(url, name, ...) to have the limiter make one"
            )
        self._setup(name, config, adapt(redis), None)

    @classmethod
    def from_url(cls, url: str, name: str, **options: Any) -> RedisLimiter:
        """Build a limiter that creates (and closes) its own client for *url*.

        On asyncio the client is ``redis.asyncio.Redis`` when redis-py is installed, else
        coredis; on trio it is coredis. The client is made when the limiter is entered.
        """
        parse_url(url)  # a malformed URL fails here, not when the limiter is entered
        check_name(name)
        return cls._made(name, LimiterConfig(**options), None, url)

    @classmethod
    def with_config(cls, redis: Any, name: str, config: LimiterConfig) -> RedisLimiter:
        """A limiter with the options of *config* (checked once, and shared by many limiters:
        what :class:`RedisLimiterGroup` makes for each key).

        Raises:
            TypeError, ConfigurationError: *name* cannot name a limiter, or *redis* is not a
                supported client.
        """
        return cls._made(check_name(name), config, adapt(redis), None)

    @classmethod
    def _made(
        cls, name: str, config: LimiterConfig, client: ScriptClient | None, url: str | None
    ) -> RedisLimiter:
        limiter = cls.__new__(cls)
        limiter._setup(name, config, client, url)
        return limiter

    def _setup(
        self, name: str, config: LimiterConfig, client: ScriptClient | None, url: str | None
    ) -> None:
        """The one path of construction (the constructor, from_url and groups): *name* and
        *config* are checked, and exactly one of *client* and *url* is given."""
        self._name = name
        self._config = config
        self._client = client
        self._url = url
        layout = KeyLayout.of(name, config.prefix, config.rates)
        self._keys = list(layout.script_keys)
        self._layout = layout
        # The "." at its end: the scripts keep one liveness entry for all the waiters this
        # process has queued, not one per waiter (see "Process liveness" in lua/README.md).
        self._process_id = uuid.uuid4().hex[:16] + "."
        self._mailbox = layout.mailbox(self._process_id)
        # Whether this process's waiters are woken by grants pushed on a channel (pub/sub), not
        # popped from a mailbox list (BLPOP). Cluster clients always use the mailbox. Set to
        # False after construction, before entering, to keep the mailbox (the previous scheme,
        # for side-by-side measurements).
        self._push = True
        self._header = config.script_header(layout.mailbox_prefix)
        self._scripts: dict[str, Script] = {
            n: load_script(n)
            for n in ("acquire", "release", "renew", "cancel", "settle", "status", "control")
        }
        # Read on every call: kept as plain attributes rather than looked up in the config.
        self._retry_window = config.retry_window
        self._max_per_second = config.max_per_second
        # Whether a grant reserves a rate start (GCRA or windows) that settle can adjust.
        self._rate_limited = config.max_per_second is not None or bool(config.rates)
        # When the current run of failed Redis calls began: when its first failed attempt was
        # sent (Redis has not answered since; None: the last call succeeded), and the client
        # library's error of its latest attempt.
        self._failing_since: float | None = None
        self._last_failure: BaseException | None = None
        # Attempts of calls that failed on the client side (their call may have run).
        self._failed_attempts = 0
        self._counter = itertools.count()
        max_at_once = config.max_at_once
        self._local = ConcurrencyLimiter(max_at_once) if max_at_once is not None else None
        # The in-process stand-in while Redis is away (on_unavailable="local"): the local
        # concurrency gate above, plus a local rate limiter.
        self._fallback_rate = _local_rate_limiter(config)
        self._in_fallback = False
        self._task_group: anyio.abc.TaskGroup | None = None
        # Closed by its RedisLimiterGroup (dropped as idle, or the group left): its permits
        # may still be settled, through the group's client.
        self._detached = False
        self._leases = LeaseTable(name, config, self._call)
        self._metrics = self._leases.metrics = limiter_metrics(name, config.metrics, self._leases)
        if client is not None and self._metrics is not None:
            self._client = self._metrics.timed(client)
        # One batcher carries the acquisitions and the releases of this process: a release is
        # posted and rides with the next acquire call (a swap, see lua/README.md).
        self._acquires = Batcher(self._acquire_many, self._leases.releases_lost)
        self._leases.swap_batcher = self._acquires
        self._leases.release_at_once = self._release_at_once
        self._stack: AsyncExitStack | None = None
        # Rate reservations (rate only, max_per_second set): a call for a start of one unit
        # also reserves the next few starts of the fleet for this process's next acquisitions.
        cap = reserve_cap(config.max_per_second) if config.max_per_second is not None else 1
        self._reserving = config.max_at_once is None and cap > 1
        self._pool = ReservePool(cap)
        self._falls_back = config.on_unavailable == "local"
        # anyio.current_time() of the loop the limiter is entered in (see LoopCheck).
        self._clock: Callable[[], float] = anyio.current_time
        self._refill: anyio.Event | None = None  # set when the reservation in flight is answered
        # A _prefetch task is scheduled and has not run yet (so one more is not).
        self._prefetch_scheduled = False
        self._rate_waiters = 0  # callers that found no start in the pool and wait for a call
        self._refill_waiters = 0  # those of them that wait for the call of another caller
        # Whether the last acquire call that carried waiters queued one of them: slots are
        # scarce, so a release is likely to hand its slot to a waiter of another process.
        self._queued_lately = False

    @property
    def _swap(self) -> bool:
        """Whether releases ride with acquisitions (the default). Set to False (before use) to
        give each release a call of its own, awaited by ``release()`` (the previous scheme,
        for side-by-side measurements)."""
        return self._leases.swap_batcher is not None

    @_swap.setter
    def _swap(self, value: bool) -> None:
        self._leases.swap_batcher = self._acquires if value else None

    def _release_at_once(self) -> bool:
        """Whether a release posted now goes alone at once, rather than with this process's
        next acquisition (a swap).

        At once when slots are scarce (this process's last acquisition queued: the freed
        slot likely goes to a waiter of another process, which waits for it) and no
        acquisition of this process is in sight: none of its waiters is queued in Redis
        or at the local gate, so the call would wait for an acquisition that may not
        come soon. A process with waiters keeps swapping: their acquisitions keep coming,
        and each release rides with one of them."""
        if not self._queued_lately or self._leases.waiters:
            return False
        local = self._local
        return local is None or local.statistics().waiting == 0

    def __repr__(self) -> str:
        config = self._config
        return (
            f"RedisLimiter(name={self._name!r}, max_at_once={config.max_at_once}, "
            f"max_per_second={config.max_per_second}, burst={config.burst}, "
            f"lease_ttl={config.lease_ttl}"
            + (f", rates={list(config.rates)!r})" if config.rates else ")")
        )

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key of this limiter that the scripts are given (all in one hash slot)."""
        return tuple(self._keys)

    @property
    def script_header(self) -> tuple[ScriptArg, ...]:
        """The arguments every script call of this limiter begins with (ARGV[1..8] of
        ``lua/README.md``), for tools that call the scripts the way the limiter does."""
        return tuple(self._header)

    # -- lifetime ------------------------------------------------------------------------------

    async def __aenter__(self) -> RedisLimiter:
        if self._stack is not None:
            raise RuntimeError("this RedisLimiter is already open")
        self._bind_loop()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            # The client's owner lives in a task group of its own, outside the background
            # tasks' group: on exit (last registered, first run) the background tasks are
            # cancelled and their shielded cleanup ends (a subscription closed, the last
            # releases sent) before the owner is told to close the client.
            client_group = await stack.enter_async_context(anyio.create_task_group())
            closing = anyio.Event()
            if self._url is not None:
                self._client = await client_group.start(self._own_client, self._url, closing)
            stack.callback(closing.set)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            self._pick_wakeups()
            self._start_background(task_group)
            self._task_group = task_group
            self._prefetch_scheduled = False
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._leases.open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._give_back_reserved()
        stack, self._stack = self._stack, None
        self._leases.open = False
        self._task_group = None
        if stack is not None:
            # The releases still pending go now, while the client is open.
            with anyio.CancelScope(shield=True):
                await self._leases.flush_releases()
            await exit_unwrapped(lambda: stack.__aexit__(exc_type, exc, tb), exc)

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
                task_status.started(
                    client if self._metrics is None else self._metrics.timed(client)
                )
                await closing.wait()

    def _pick_wakeups(self) -> None:
        """Choose how this process's waiters are woken (before any waiter id is made): a
        channel, or the mailbox list.

        The scripts tell the two apart by the process id in the waiter ids: one ending in "!"
        has its grants published on the channel of that name (see handoff in
        lua/_shared.lua), any other has them pushed to its mailbox list of that name. (The
        "." before it: the process keeps one liveness entry for all its queued waiters.)"""
        assert self._client is not None
        base = self._process_id.rstrip("!")
        push = self._push and self._client.can_subscribe and self._config.max_at_once is not None
        self._process_id = base + "!" if push else base
        self._mailbox = self._layout.mailbox(self._process_id)

    def _start_background(self, task_group: anyio.abc.TaskGroup) -> None:
        task_group.start_soon(self._leases.renew_loop)
        if self._config.max_at_once is not None:
            assert self._client is not None
            if self._process_id.endswith("!"):
                task_group.start_soon(self._leases.push_loop, self._client, self._mailbox)
            else:
                task_group.start_soon(self._leases.dispatch_loop, self._client, self._mailbox)
            task_group.start_soon(self._flush_loop)

    async def _flush_loop(self) -> None:
        # Sends the posted releases that no acquisition took along; stopped (a group closing,
        # or the limiter left), it sends those still pending.
        try:
            await self._acquires.flush_loop()
        finally:
            with anyio.CancelScope(shield=True):
                await self._leases.flush_releases()

    def attach(self, task_group: anyio.abc.TaskGroup) -> anyio.CancelScope:
        """Open the limiter with its background tasks in *task_group*, instead of with
        ``async with`` (what :class:`RedisLimiterGroup` does); the returned scope stops them.
        Undo with :meth:`detach`."""
        scope = anyio.CancelScope()
        self._pick_wakeups()

        async def background() -> None:
            with scope:
                async with anyio.create_task_group() as inner:
                    self._start_background(inner)

        task_group.start_soon(background)
        self._task_group = task_group
        self._prefetch_scheduled = False
        self._bind_loop()
        self._leases.open = True
        return scope

    def detach(self) -> None:
        """Close a limiter opened with :meth:`attach`: using it afterwards fails loudly, but
        for settling the permits it gave (which goes through the group's client)."""
        self._leases.open = False
        self._detached = True

    def is_idle(self) -> bool:
        """True if nothing is held, awaited or left to withdraw through this limiter (nor
        reserved ahead, nor being reserved)."""
        if self._refill is not None:
            return False
        if self._pool:
            self._pool.drop_late(self._clock())
            if self._pool:
                return False
        return self._leases.is_idle() and not (
            self._local is not None and self._local.statistics().held
        )

    def _bind_loop(self) -> None:
        """Bind the limiter to the running event loop, and its clock to that loop's."""
        self._leases.loop_check.bind()
        self._clock = self._leases.loop_check.clock

    def _check_open(self) -> None:
        if not self._leases.open:
            raise RuntimeError(
                "enter the limiter first: `async with RedisLimiter(...) as limiter:`"
            )
        self._leases.check_loop()

    # -- Redis calls ---------------------------------------------------------------------------

    async def _call(
        self,
        script: str,
        *args: ScriptArg,
        deadline: float | None = None,
        header: bool = True,
        wake_first: bool = False,
    ) -> Any:
        """Run one script, retrying connection errors, time-outs and transient error replies
        (BUSY, LOADING, ...) until *deadline* (default: ``retry_window`` from now). *header*:
        whether ARGV begins with the common header (control.lua takes its own).
        *wake_first*: the grants the script publishes reach their subscribers before its
        reply reaches this process (see :meth:`ScriptClient.run_script`)."""
        client = self._client
        assert client is not None
        argv = [*self._header, *args] if header else list(args)
        if deadline is None:
            deadline = self._clock() + self._retry_window
        backoff = 0.05
        last: BaseException | None = None
        while True:
            sent = self._clock()
            try:
                # A plain scope with a deadline: cheaper than fail_after on this hot path.
                with anyio.CancelScope(deadline=deadline):
                    reply = await client.run_script(
                        self._scripts[script], self._keys, argv, wake_first=wake_first
                    )
                    self._failing_since = self._last_failure = None
                    if self._leases.leftovers:
                        self._leases.withdraw_soon(self._task_group)
                    return reply
                # Cut short by the deadline: keep the failure of an earlier attempt, if any,
                # as the reason.
                if last is None:
                    last = TimeoutError(f"no reply within {self._retry_window:g}s")
            except Refused as exc:
                raise ConfigurationError(
                    f"limiter {self._name!r}: Redis refused the credentials: {exc}"
                ) from exc.__cause__
            except Unavailable as exc:
                last = exc
                self._last_failure = exc.__cause__ or exc
                self._failed_attempts += 1
            except ErrorReply as exc:
                raise translate_reply(self._name, script, exc) from exc.__cause__
            now = self._clock()
            if self._failing_since is None:
                self._failing_since = sent
            if now >= deadline:
                raise self._unavailable(script, last)
            await anyio.sleep(min(backoff, deadline - now))
            backoff = min(backoff * 2, 1.0)

    def _unavailable(self, script: str, last: BaseException | None) -> RedisLimiterError:
        # The client library's own error, as the reason (the neutral one only wraps it).
        reason = last.__cause__ or last if isinstance(last, ClientError) else last
        if isinstance(last, PoolFull):
            error: RedisLimiterError = PoolExhaustedError(
                f"limiter {self._name!r}: the Redis client's connection pool had no free "
                f"connection for {script} within {self._retry_window:g}s ({reason}); Redis "
                "itself may be fine. Give the client a larger max_connections (one per "
                "limiter object for its BLPOP, plus the calls in flight at once) or a "
                "redis.asyncio.BlockingConnectionPool"
            )
        else:
            error = RedisUnavailableError(
                f"limiter {self._name!r}: Redis did not answer {script} within "
                f"{self._retry_window:g}s: {reason!r}"
            )
        error.__cause__ = reason
        return error

    # -- acquire / release ---------------------------------------------------------------------

    async def acquire(self, cost: float = 1) -> RedisPermit:
        """Wait until this process may start one more task under the global limits.

        Args:
            cost: what the task counts for in ``max_per_second`` and in every Rate that
                counts cost (``max_at_once`` counts tasks, whatever their cost). Settle it
                later with :meth:`RedisPermit.settle` if the estimate was off.

        Raises:
            TypeError: *cost* is not a number.
            ConfigurationError: *cost* is not a finite number > 0, or no limit can ever
                admit it (above ``burst`` with ``max_per_second``, or above the limit of a
                Rate counting cost); raised at once, before anything is asked of Redis.
            AcquireTimeoutError: ``acquire_timeout`` passed first (nothing is left held).
            RedisUnavailableError: Redis did not answer within ``retry_window`` (unless
                ``on_unavailable="local"``, which falls back to in-process limits instead).
            RuntimeError: the limiter was not entered with ``async with``.
        """
        units = UNIT if cost == 1 and type(cost) is int else self._check_cost(cost)
        if self._metrics is not None:
            return await self._metrics.acquire(self._acquire_checked, units)
        return await self._acquire_checked(units)

    async def _acquire_checked(self, units: int) -> RedisPermit:
        self._check_open()
        start = self._clock()
        timeout = self._config.acquire_timeout
        if timeout is None:
            if self._reserving and units == UNIT and not self._falls_back:
                # What _acquire_or_fall_back and _acquire would do, two calls fewer: the
                # path of every start of a rate-only limiter taken one at a time.
                return await self._acquire_reserved(start, None)
            return await self._acquire_or_fall_back(start, None, units)
        try:
            with anyio.fail_after(timeout):
                return await self._acquire_or_fall_back(start, start + timeout, units)
        except TimeoutError as exc:
            if isinstance(exc, RedisLimiterError):
                raise
            raise AcquireTimeoutError(
                f"limiter {self._name!r}: no slot within {self._config.acquire_timeout:g}s"
            ) from None

    def check_cost(self, cost: object) -> float:
        """Return *cost* as a float if this limiter can ever admit it, else raise.

        The run functions call it before any work for a constant ``cost=``.

        Raises:
            TypeError: *cost* is not a number.
            ConfigurationError: *cost* is not a finite number > 0, or no limit can ever admit
                it (above ``burst`` with ``max_per_second``, or above the limit of a Rate
                counting cost).
        """
        return self._check_cost(cost) / UNIT

    def _check_cost(self, cost: object) -> int:
        units = cost_units(cost)
        problem = self._config.cost_problem(units)
        if problem is not None:
            raise ConfigurationError(f"limiter {self._name!r}: {problem}")
        return units

    async def _acquire_or_fall_back(
        self, start: float, deadline: float | None, units: int
    ) -> RedisPermit:
        if not self._in_fallback:
            try:
                return await self._acquire(start, deadline, units)
            except RedisUnavailableError as exc:
                if self._config.on_unavailable != "local":
                    raise
                self._fall_back(exc)
        return await self._acquire_locally(units)

    def _fall_back(self, exc: RedisUnavailableError) -> None:
        if self._in_fallback:
            return
        self._in_fallback = True
        if self._metrics is not None:
            self._metrics.fell_back()
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
                except ClientError:
                    continue
                self._in_fallback = False
                if self._metrics is not None:
                    self._metrics.recovered()
                logger.warning(
                    "limiter %r: Redis is back; leaving the in-process fallback", self._name
                )
                await self._leases.withdraw_orphans()
                return

    async def _acquire_locally(self, units: int) -> RedisPermit:
        local = await self._local.acquire() if self._local is not None else None
        rate_permit: CostPermit | None = None
        try:
            if self._fallback_rate is not None:
                rate_permit = await self._fallback_rate.acquire(units / UNIT)
        except BaseException:
            if local is not None:
                await local.release()
            raise
        return RedisPermit(
            self._leases, None, 0, local, fallback=True, units=units, local_rate=rate_permit
        )

    async def _settle(self, waiter_id: str, actual: int, previous: int) -> Any:
        if not self._detached:
            self._check_open()
        return await self._call("settle", waiter_id, actual, previous)

    async def _acquire(self, start: float, deadline: float | None, units: int) -> RedisPermit:
        if self._reserving and units == UNIT:
            return await self._acquire_reserved(start, deadline)
        permit = await self._acquire_granted(start, deadline, units, drop_stale=True)
        if permit is None:
            # Its rate start went by while the process was held up: one new acquisition,
            # whose grant is used even if the process is held up again (no livelock on a
            # machine that is always late).
            permit = await self._acquire_granted(start, deadline, units, drop_stale=False)
            assert permit is not None
        return permit

    async def _acquire_granted(
        self, start: float, deadline: float | None, units: int, *, drop_stale: bool
    ) -> RedisPermit | None:
        """One grant from Redis, its rate start waited for. With *drop_stale*, a grant whose
        caller woke up more than ``LATE`` after its rate start (the event loop or the CPU
        held the process up) is given back and None returned: starting it then would start
        it next to the fleet's later starts, and a process held up with several such grants
        would start them all at once."""
        local = await self._local_permit(start)
        waiter_id = f"{self._process_id}:{next(self._counter)}"
        try:
            token, delay_us = await self._take(waiter_id, start, deadline, units)
        except BaseException:
            if local is not None:
                await local.release()
            raise
        start_at = self._clock() + delay_us / 1e6
        settler = self._settle if self._rate_limited else None
        if self._config.max_at_once is None:
            permit = RedisPermit(
                self._leases, None, token, None, waiter_id=waiter_id, units=units, settler=settler
            )
        else:
            permit = RedisPermit(
                self._leases,
                self._leases.hold(waiter_id, start_at),
                token,
                local,
                waiter_id=waiter_id,
                units=units,
                settler=settler,
            )
        try:
            if delay_us > 0:
                if deadline is not None and self._clock() + delay_us / 1e6 > deadline:
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
                await self._give_back(waiter_id, permit.lease_id, local)
            else:
                await permit.release()
            raise
        late = self._clock() - start_at
        if drop_stale and delay_us > 0 and late > LATE:
            logger.debug(
                "limiter %r: grant %s woke %.1f ms after its rate start; asking again",
                self._name,
                waiter_id,
                late * 1000,
            )
            await self._give_back(waiter_id, permit.lease_id, local)
            return None
        return permit

    async def _acquire_reserved(self, start: float, deadline: float | None) -> RedisPermit:
        """A start of one unit on a rate-only limiter: from the starts this process reserved
        ahead if one lies before the deadline, else from a call that reserves the next few
        starts of the fleet as well. A start reserved ahead is handed out at most ``LATE``
        after its time: one this caller overslept (a busy event loop or CPU) is dropped and
        the caller takes the next."""
        pool = self._pool
        while True:
            entry = pool.take(self._clock(), deadline)
            reserved_ahead = entry is not None
            if entry is None:
                self._rate_waiters += 1
                try:
                    if self._refill is not None and self._failing_since is None:
                        # The call in flight reserves for this caller too. (While Redis
                        # fails, every caller makes its own call, bounded by its own retry
                        # window.)
                        self._refill_waiters += 1
                        try:
                            await self._refill.wait()
                        finally:
                            self._refill_waiters -= 1
                        continue
                    # The caller's own start: while Redis fails, its retry window runs from
                    # there.
                    entry = await self._reserve(start, deadline, own=True)
                    assert entry is not None
                finally:
                    self._rate_waiters -= 1
            if (
                pool.running_low()
                and self._refill is None
                and not self._prefetch_scheduled
                and self._task_group is not None
            ):
                # Starts handed out back to back (all due) would each schedule a task.
                self._prefetch_scheduled = True
                self._task_group.start_soon(self._prefetch)
            at, waiter_id, token = entry
            try:
                delay = at - self._clock()
                if delay > 0:
                    if deadline is not None and at > deadline:
                        raise self._too_late()
                    await anyio.sleep(delay)
                else:
                    await anyio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                if self._leases.open and self._refill_waiters:
                    # Another caller of this process waits for the call in flight: when it
                    # is answered, that caller takes this start (the earliest in the pool).
                    # (One making its own call would not look at the pool: the start would
                    # pass unused.)
                    pool.put_back(entry)
                else:
                    # Back to the fleet: the next reservation of any process may use it.
                    pool.given_back()
                    await self._give_back(waiter_id, waiter_id, None)
                raise
            if reserved_ahead and self._clock() - at > LATE:
                pool.overslept()
                continue
            return RedisPermit(
                self._leases,
                None,
                token,
                None,
                waiter_id=waiter_id,
                units=UNIT,
                settler=self._settle,
            )

    async def _prefetch(self) -> None:
        """Reserve the next starts before the pool runs dry (in the background)."""
        self._prefetch_scheduled = False
        if self._refill is not None or self._failing_since is not None:
            return
        if not self._leases.open:
            # Scheduled just before the limiter was left (or dropped by its group): starts
            # reserved now would be given back by nobody.
            return
        try:
            await self._reserve(self._clock(), None, own=False)
        except RedisLimiterError as exc:
            # The callers that find the pool empty make their own calls and see the failure.
            logger.debug("limiter %r: reserving starts ahead failed: %s", self._name, exc)

    async def _reserve(
        self, start: float, deadline: float | None, *, own: bool
    ) -> tuple[float, str, int] | None:
        """One call for this caller's start (if *own*) and the next few, which go to the
        pool; returns the caller's ``(local start time, waiter id, token)``."""
        refill = anyio.Event()
        if self._refill is None:
            self._refill = refill
        try:
            pool = self._pool
            extra = 0
            if self._failing_since is None:
                # As many as the recent rate uses in a few ms, and at least one for each
                # (other) caller waiting now.
                waiting = self._rate_waiters - 1 if own else self._rate_waiters
                extra = max(pool.wanted(self._clock()), waiting)
                extra = min(extra, pool.cap - 1)
            if not own and extra == 0:
                return None
            items: list[str] = []
            if own:
                item = f"{self._process_id}:{next(self._counter)}"
                if deadline is not None:
                    item += _max_delay(deadline)
                items.append(item)
            # Starts reserved ahead never lie further away than the horizon.
            horizon = f"/{int(HORIZON * 1e6)}"
            items.extend(f"{self._process_id}:{next(self._counter)}{horizon}" for _ in range(extra))
            ids = [item.partition("/")[0] for item in items]
            try:
                replies = await self._submit_items(items, start)
            except (RedisUnavailableError, PoolExhaustedError):
                # The call may have run: withdraw what it reserved when Redis answers again.
                for waiter_id in ids:
                    self._leases.orphan(waiter_id)
                raise
            now = self._clock()
            first = 1 if own else 0
            for waiter_id, reply in zip(ids[first:], replies[first:], strict=True):
                if reply[0] == 1:
                    pool.put(now + reply[2] / 1e6, waiter_id, int(reply[1]))
            if not own:
                return None
            reply = replies[0]
            if reply[0] != 1:
                raise self._too_late()
            pool.handed()
            return now + reply[2] / 1e6, ids[0], int(reply[1])
        finally:
            if self._refill is refill:
                self._refill = None
            refill.set()

    async def _give_back_reserved(self) -> None:
        """Give back the starts this process reserved ahead and did not use (on exit, and
        when its :class:`RedisLimiterGroup` is left), latest first (each rolls the rate state
        back), within one retry window in all."""
        if not self._pool and self._refill is None:
            return
        if self._refill is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._retry_window):
                await self._refill.wait()
        ahead = self._pool.ahead(self._clock())
        if self._in_fallback or not ahead:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._retry_window):
            for _, waiter_id, _ in ahead:
                try:
                    await self._call("cancel", waiter_id)
                except RedisLimiterError:
                    return  # the rest stay reserved: lost, like a killed process's

    def _too_late(self) -> AcquireTimeoutError:
        return AcquireTimeoutError(
            f"limiter {self._name!r}: no slot within {self._config.acquire_timeout:g}s (the rate "
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
            now = self._clock()
            if since is None:
                check_at = now + self._retry_window
            elif now - max(since, start) >= self._retry_window * 0.999:
                raise RedisUnavailableError(
                    f"limiter {self._name!r}: Redis did not answer any call within "
                    f"{self._retry_window:g}s while this caller waited for a slot"
                )
            else:
                check_at = max(since, start) + self._retry_window

    async def _give_back(self, waiter_id: str, lease_id: str, local: Permit | None) -> None:
        """Withdraw a grant that will not be used: its lease (if any) is released and its rate
        start given back if it has not come (later acquisitions may use it; one already gone
        is lost, its cost refunded to the windows). Its permit is never handed out; *local*
        is the permit's local part."""
        self._leases.forget(lease_id)
        with anyio.CancelScope(shield=True):
            try:
                await self._call("cancel", waiter_id)
            except RedisLimiterError as exc:
                self._leases.orphan(waiter_id)
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
        # While Redis is failing, a caller's retry window runs from its own start, or from
        # the first failure if that came later (the caller may have waited for a local
        # slot meanwhile): calls queued behind others must not each get a fresh one, and a
        # caller must not give up on a failure younger than the window.
        now = self._clock()
        since = self._failing_since
        if since is not None:
            return min(now + self._retry_window, max(max(start, since) + self._retry_window, now))
        return now + self._retry_window

    async def _submit_acquire(
        self,
        waiter_id: str,
        start: float,
        deadline: float | None,
        units: int = UNIT,
        *,
        fresh: bool = False,
    ) -> Any:
        # '+': the first ask for this id. A swap that is sure to be its call's first run
        # (every lease it releases was held) then skips looking the id up among the holders.
        # '^' (this process has waiters queued already, or its last acquisition queued: this
        # one will likely queue too): such a swap queues it before handing off the freed
        # slots, which spares counting the queue, and keeps a queue that the handoff would
        # empty from being deleted and created again (with its TTLs).
        item = waiter_id
        if fresh:
            likely_queued = self._leases.waiters or self._queued_lately
            item = f"^{waiter_id}" if likely_queued and units == UNIT else f"+{waiter_id}"
        if deadline is not None and self._rate_limited:
            # Never reserve a rate start past the caller's deadline.
            item += _max_delay(deadline)
        if units != UNIT:
            item += f"*{units}"
        (reply,) = await self._submit_items([item], start)
        return reply

    async def _submit_items(self, items: list[str], start: float) -> list[Any]:
        """Send acquire *items* together in the next call (see :class:`Batcher`); a caller
        that began waiting at *start* gives up ``retry_window`` after it while Redis fails."""
        try:
            return await self._acquires.submit_many(items, self._redis_deadline(start))
        except TimeoutError as exc:
            if isinstance(exc, RedisLimiterError):
                raise
            # Chained to the failure of the call in flight, if any: it says why (an entry's
            # deadline can pass a moment before the failing call it queued behind gives up).
            raise RedisUnavailableError(
                f"limiter {self._name!r}: Redis did not answer within "
                f"{self._retry_window:g}s (the calls queued before this one were not answered)"
            ) from self._last_failure

    async def _acquire_many(self, items: list[str], deadline: float) -> list[Any]:
        failed_before = self._failed_attempts
        # Release items (posted, so first) whose freed slots are likely to go to waiters of
        # other processes, woken on their channels: those grants go out before this reply.
        wake_first = (
            self._queued_lately and items[0].startswith("-") and self._process_id[-1] == "!"
        )
        reply = await self._call("acquire", *items, deadline=deadline, wake_first=wake_first)
        if isinstance(reply, str):
            entries = decode_acquire_reply(reply)
            self._queued_lately = _any_queued(entries)
            return entries
        # A swap: release items went first. The handoff's grants to this process's own
        # queued waiters come back here instead of through the mailbox.
        _, grants, entries = decode_swap_reply(reply)
        if entries:
            self._queued_lately = _any_queued(entries)
        for message in grants:
            self._leases.deliver(message)
        if self._failed_attempts != failed_before:
            # An attempt whose reply was lost may have run: the grants it returned are
            # recorded in Redis only. Every waiter asks again now (acquire returns a grant
            # already made) rather than at its next re-check.
            self._leases.recheck_waiters()
        return entries

    async def _take(
        self, waiter_id: str, start: float, deadline: float | None, units: int = UNIT
    ) -> tuple[int, int]:
        """Get a grant ``(token, delay_us)`` for *waiter_id* (a cost of *units*), queueing
        until one comes."""
        ticket = self._leases.push_ticket()
        # A grant pushed for the waiter before it is queued here is kept for it.
        self._leases.expect(waiter_id)
        try:
            try:
                reply = await self._submit_acquire(waiter_id, start, deadline, units, fresh=True)
            except (RedisUnavailableError, PoolExhaustedError):
                # The call may have run on the server after we gave up on its reply, leaving
                # a lease or a rate reservation: withdraw it when Redis answers again.
                self._leases.orphan(waiter_id)
                raise
            if reply[0] == 1:
                return int(reply[1]), int(reply[2])
            if reply[0] == 2:
                raise self._too_late()
            waiter = self._leases.wait(waiter_id, ticket)
        finally:
            self._leases.unexpect(waiter_id)
        try:
            while True:
                with anyio.move_on_after(self._config.recheck_interval):
                    await waiter.event.wait()
                if waiter.grant is not None:
                    return waiter.grant
                # No wake-up (lost, or the queue entry expired): ask again. The same waiter id
                # makes this idempotent: a grant already made is returned, not made twice.
                waiter.event = anyio.Event()
                reply = await self._submit_acquire(waiter_id, self._clock(), deadline, units)
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
                    self._leases.orphan(waiter_id)
                    logger.warning(
                        "limiter %r: could not withdraw waiter %s; it is withdrawn when "
                        "Redis answers again, or expires within lease_ttl",
                        self._name,
                        waiter_id,
                    )
            raise
        finally:
            self._leases.stop_waiting(waiter_id)

    @asynccontextmanager
    async def slot(self, cost: float = 1) -> AsyncIterator[RedisPermit]:
        """Hold one slot for the duration of the block (a start of *cost*, see
        :meth:`acquire`); the permit yielded can be settled inside the block.

        Raises:
            LeaseLostError: on leaving the block, if the lease expired while it ran.
            ConfigurationError, TypeError: as :meth:`acquire`, for *cost*.
        """
        permit = await self.acquire(cost)
        try:
            yield permit
        finally:
            await permit.release()
        if permit.lost:
            raise LeaseLostError(
                f"limiter {self._name!r}: lease {permit.lease_id} expired while the block ran"
            )

    # -- operator views ------------------------------------------------------------------------

    async def statistics(self) -> RedisLimiterStatistics:
        """Read the limiter's state from Redis (holders, waiters, next start). The releases
        of this process still pending (see :meth:`RedisPermit.release`) are sent first."""
        client = self._client
        if client is None:
            raise RuntimeError("enter the limiter first: `async with RedisLimiter(...)`")
        if self._leases.open:
            await self._leases.flush_releases()
        config = self._config
        state = await read_state(client, self._keys, self._name, config.window_spec)
        control = state.control
        max_at_once, max_per_second = effective_limits(config, control)
        limits_set: dict[str, float] = {}
        if control.max_at_once is not None:
            limits_set["max_at_once"] = control.max_at_once
        if control.max_per_second is not None:
            limits_set["max_per_second"] = control.max_per_second
        return RedisLimiterStatistics(
            name=self._name,
            max_at_once=config.max_at_once,
            max_per_second=config.max_per_second,
            burst=config.burst,
            holders=state.holders,
            waiters=state.waiters,
            next_start=next_start(state, config),
            local_held=len(self._leases.held),
            local_waiting=len(self._leases.waiters),
            leases_lost=self._leases.lost_count,
            rates=tuple(config.rates),
            rates_used=tuple(units / UNIT for units in state.window_used),
            paused_for=control.paused_for,
            effective_max_at_once=max_at_once,
            effective_max_per_second=max_per_second,
            limits_set=limits_set,
        )

    # -- push-back and limits at run time ------------------------------------------------------

    async def _control(self, operation: str, *args: ScriptArg) -> tuple[bool, Control]:
        self._check_open()
        key_ttl_ms = math.ceil(self._config.key_ttl * 1000)
        reply = await self._call("control", "", key_ttl_ms, operation, *args, header=False)
        return decode_control_reply(self._name, reply)

    async def pause(self, seconds: float) -> float:
        """Pause the whole fleet: no acquisition of any process starts before *seconds* from
        now on the Redis clock.

        A pause extends, never shortens, the one in force. Waiters keep their place in the
        queue; a slot or rate start granted during the pause carries a delay to its end (the
        holder sleeps it out), and the rate limit counts from the pause's end. Starts granted
        before the call keep their time.

        Returns:
            Seconds until the pause in force ends (at least *seconds*).

        Raises:
            TypeError, ConfigurationError: *seconds* is not a finite number >= 0 (at most a
                day).
            RedisUnavailableError: Redis did not answer within ``retry_window``.
        """
        us = _pause_us(seconds, "seconds")
        _, control = await self._control("pause", us)
        if self._metrics is not None:
            self._metrics.pushed_back("pause")
        return control.paused_for

    async def throttled(self, retry_after: float | None = None) -> bool:
        """Report that the target pushed back (an HTTP 429 or 503, say).

        With *retry_after* (seconds, e.g. the ``Retry-After`` header), the fleet pauses that
        long (:meth:`pause`). With ``adaptive``, the fleet's effective rate is cut by the
        factor, at most once per cool-down however many processes report the same burst, never
        below the floor; it recovers while no push-back arrives. Decided in one script call.

        Returns:
            True if this report cut the adaptive rate.

        Raises:
            TypeError, ConfigurationError: *retry_after* is not None or a finite number >= 0
                (at most a day).
            RedisUnavailableError: Redis did not answer within ``retry_window``.
        """
        retry: ScriptArg = "" if retry_after is None else _pause_us(retry_after, "retry_after")
        adaptive = self._config.adaptive_settings
        if adaptive is None and retry_after is None:
            self._check_open()
            if self._metrics is not None:
                self._metrics.pushed_back("throttled")
            return False  # nothing to decide: no round trip
        cut, _ = await self._control(
            "throttled",
            retry,
            self._config.interval_us,
            adaptive.spec if adaptive is not None else "",
        )
        if self._metrics is not None:
            self._metrics.pushed_back("throttled")
            if cut:
                self._metrics.pushed_back("cut")
        return cut

    async def set_limits(
        self, *, max_at_once: int | None = None, max_per_second: float | None = None
    ) -> None:
        """Change the fleet's limits at run time: stored in Redis, applied by every process
        from its next call, without a restart (:meth:`clear_limits` undoes it).

        A limit set here replaces the configured one of every process that has that limit; it
        cannot add a limit that the processes were not given (a process without
        ``max_per_second`` stays without one). ``burst`` and ``rates`` stay as configured, so
        :meth:`check_cost` keeps its answer. The limits are kept while the limiter is in use,
        and at least a day.

        Raises:
            TypeError, ConfigurationError: a value is out of range, or neither is given.
            RedisUnavailableError: Redis did not answer within ``retry_window``.
        """
        args = limits_args(max_at_once, max_per_second)
        await self._control("set", *args, round(OVERRIDE_KEEP * 1e6))

    async def clear_limits(self) -> None:
        """Remove the limits set by :meth:`set_limits`: every process applies its configured
        ones again from its next call.

        Raises:
            RedisUnavailableError: Redis did not answer within ``retry_window``.
        """
        await self._control("clear")

    async def reset(self) -> None:
        """Delete the limiter's keys: every lease, queue entry and rate state is forgotten.

        Processes still holding slots keep running; their renewals will report the leases
        lost. Meant for operators and tests.
        """
        client = self._client
        if client is None:
            raise RuntimeError("enter the limiter first: `async with RedisLimiter(...)`")
        try:
            await client.delete(*self._keys, self._mailbox)  # the window logs too
        except ClientError as exc:
            raise as_limiter_error(self._name, "reset", exc) from exc.__cause__


def _any_queued(entries: list[list[int]]) -> bool:
    """Whether acquire.lua queued any of the waiters these reply entries are for."""
    return any(entry[0] == 0 for entry in entries)


def _max_delay(deadline: float) -> str:
    """The ``/<max delay us>`` suffix of an acquire item whose caller gives up at
    *deadline*: no rate start further away than that is reserved for it."""
    return f"/{max(0, int((deadline - anyio.current_time()) * 1e6))}"


def _local_rate_limiter(config: LimiterConfig) -> RateLimiter | None:
    """The in-process rate limiter standing in while Redis is away (None: no rate limit)."""
    if config.max_per_second is None and not config.rates:
        return None
    return RateLimiter(config.max_per_second, burst=config.burst, rates=config.rates)
