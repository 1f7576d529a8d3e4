"""RedisLimiterGroup: one RedisLimiter per key (per site, per customer), made on demand."""

from __future__ import annotations

from collections import OrderedDict
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ._client import ScriptClient, adapt
from ._config import LimiterConfig
from ._exceptions import ConfigurationError
from ._exits import exit_unwrapped
from ._limiter import RedisLimiter

__all__ = ["RedisLimiterGroup"]

# How many of the oldest limiters each new key looks at (see _drop_idle): more than one, so
# that the idle ones shrink back to max_idle when busy ones stand in front of them.
_SCAN_PER_KEY = 4


class RedisLimiterGroup:
    """A :class:`RedisLimiter` per key, all with the same options, made when first asked for.

    Meant for scrapers that limit each site on its own::

        async with RedisLimiterGroup(redis, max_at_once=2, max_per_second=5) as sites:
            await aiometer.run_on_each(
                fetch, urls, max_at_once=50, limiter=lambda url: sites[host(url)]
            )

    ``group[key]`` (or ``group.for_key(key)``) returns the limiter named *key*: every process
    that uses the same key, prefix and Redis shares its limits. The group runs the background
    tasks of all its limiters, so enter it with ``async with``. At most *max_idle* limiters
    that nobody holds or waits for and nobody asked for in the last *idle_after* seconds are
    kept; older idle ones are dropped (and made again if asked for), so memory stays bounded
    however many keys pass through. Always go through ``group[key]``: a dropped limiter
    object refuses to be used.

    Args:
        redis: the client, as for :class:`RedisLimiter` (the group does not close it).
        max_idle: how many idle limiters to keep.
        idle_after: seconds without use after which a limiter counts as idle.
        **options: any keyword of :class:`RedisLimiter` (``max_at_once``, ``max_per_second``,
            ``burst``, ``rates``, ``adaptive``, ``lease_ttl``, ``prefix``, ...), checked now; every
            key's limiter has the same windows (``rates=[Rate(5000, per=3600)]``: 5000 an hour per
            key).

    Raises:
        ConfigurationError, TypeError: as :class:`RedisLimiter` for the options.
    """

    def __init__(
        self, redis: Any, *, max_idle: int = 1024, idle_after: float = 60.0, **options: Any
    ) -> None:
        if isinstance(max_idle, bool) or not isinstance(max_idle, int):
            raise TypeError(f"max_idle must be an int, got {type(max_idle).__name__}")
        if max_idle < 0:
            raise ConfigurationError(f"max_idle must be >= 0, got {max_idle}")
        if isinstance(idle_after, bool) or not isinstance(idle_after, (int, float)):
            raise TypeError(f"idle_after must be a number, got {type(idle_after).__name__}")
        if not idle_after >= 0:
            raise ConfigurationError(f"idle_after must be >= 0, got {idle_after!r}")
        self._config = LimiterConfig(**options)
        self._client: ScriptClient = adapt(redis)
        self._options = options
        self._max_idle = max_idle
        self._idle_after = float(idle_after)
        self._limiters: dict[str, tuple[RedisLimiter, anyio.CancelScope]] = {}
        # The keys used within idle_after (key -> last use, oldest first), and the older ones
        # (least recently used first): see _drop_idle.
        self._young: OrderedDict[str, float] = OrderedDict()
        self._old: OrderedDict[str, None] = OrderedDict()
        self._task_group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"RedisLimiterGroup(keys={len(self._limiters)}, options={self._options!r})"

    async def __aenter__(self) -> RedisLimiterGroup:
        if self._task_group is not None:
            raise RuntimeError("this RedisLimiterGroup is already open")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        limiters = [limiter for limiter, _ in self._limiters.values()]
        self._limiters.clear()
        self._young.clear()
        self._old.clear()
        if task_group is None:
            return None
        # The starts reserved ahead and not used go back to the fleet (each limiter within
        # one retry window, all at once), as when a RedisLimiter is left.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as giving_back:
                for limiter in limiters:
                    giving_back.start_soon(limiter._give_back_reserved)
        for limiter in limiters:
            limiter.detach()
        task_group.cancel_scope.cancel()
        return await exit_unwrapped(lambda: task_group.__aexit__(exc_type, exc, tb), exc)

    def __getitem__(self, key: str) -> RedisLimiter:
        return self.for_key(key)

    def __len__(self) -> int:
        return len(self._limiters)

    def for_key(self, key: str) -> RedisLimiter:
        """The limiter of *key*, made (and started) if this group has none for it yet."""
        if self._task_group is None:
            raise RuntimeError("enter the group first: `async with RedisLimiterGroup(...)`")
        now = anyio.current_time()
        entry = self._limiters.get(key)
        self._touch(key, now)
        if entry is not None:
            return entry[0]
        limiter = RedisLimiter.with_config(self._client, key, self._config)
        self._limiters[key] = (limiter, limiter.attach(self._task_group))
        self._drop_idle(now)
        return limiter

    def _touch(self, key: str, now: float) -> None:
        self._old.pop(key, None)
        self._young.pop(key, None)
        self._young[key] = now

    def _drop_idle(self, now: float) -> None:
        # Each new key does O(1) amortized work: keys move once from young to old as they
        # age, and at most _SCAN_PER_KEY of the oldest are looked at. An old one that is idle
        # (nothing held or awaited through it; not asked for in the last idle_after seconds,
        # as a run may still hold on to a limiter it got a moment ago) is dropped while more
        # than max_idle old ones are kept; a busy one counts as used now. So the limiters kept
        # are the young and busy ones plus at most max_idle idle ones (give or take the busy
        # ones a scan steps over before it reaches idle ones).
        horizon = now - self._idle_after
        while self._young:
            key, used = next(iter(self._young.items()))
            if used > horizon:
                break
            del self._young[key]
            self._old[key] = None
        for _ in range(_SCAN_PER_KEY):
            if len(self._old) <= self._max_idle:
                return
            key = next(iter(self._old))
            limiter, scope = self._limiters[key]
            if not limiter.is_idle():
                self._touch(key, now)
                continue
            del self._old[key]
            del self._limiters[key]
            scope.cancel()
            limiter.detach()  # an old reference now fails loudly instead of quietly
