"""This process's side of one limiter in Redis: the leases it holds, its queued waiters, the
ids left to withdraw, and the background loops that keep them.

* The renewal loop extends every lease and queue entry of the process in one call every
  ``lease_ttl / 3``, and reports the leases it finds expired (a warning, a count, the
  ``on_lease_lost`` callback, and :attr:`Lease.lost` for the permit).
* The dispatch loop hands the grants made for this process's waiters by other processes'
  calls to those waiters: pushed by Redis on the process's channel (pub/sub, see
  :meth:`LeaseTable.push_loop`), or, with a cluster client, popped from its mailbox list
  (BLPOP).
* Orphans are ids whose last call failed on the client side: the call may still have run on
  the server (an acquire holding a lease nobody will release, a release or cancel that did
  not happen). ``cancel.lua`` frees an id whatever state it is in, so they are cancelled when
  Redis answers again.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from ._batch import Batcher
from ._client import ScriptArg, ScriptClient
from ._config import LimiterConfig
from ._errors import ClientError, Unavailable
from ._exceptions import LeaseLostError, RedisLimiterError, WrongEventLoopError
from ._exits import LoopCheck
from ._metrics import LimiterMetrics

__all__ = ["Lease", "LeaseTable", "ScriptCall", "Waiter"]

logger = logging.getLogger("aiometer_redis")

#: Seconds a subscription is kept after the last waiter of the process left: a limiter
#: nobody waits on holds no connection, one in steady use does not subscribe again and again.
PUSH_LINGER = 5.0
# How often the push loop looks whether it may unsubscribe (seconds).
_PUSH_POLL = 1.0

#: Runs one of the limiter's scripts with these ARGV after the header, retrying until the
#: deadline (default: the retry window); raises RedisLimiterError.
ScriptCall = Callable[..., Awaitable[Any]]


def _never() -> bool:
    return False


class Lease:
    """One slot held in Redis by this process.

    Attributes:
        lease_id: ``"<process id>:<n>"``, the id of the lease in Redis.
        lost: set when a renewal found the lease expired, or when it is given back after
            ``expires``.
        expires: when the lease has expired in Redis at the latest, on this process's clock
            (``anyio.current_time()``): ``lease_ttl`` after the reply that granted or last
            renewed it arrived (plus the grant's delay to its rate start), so a time past
            it means that Redis has let the lease go.
    """

    __slots__ = ("expires", "lease_id", "lost")

    def __init__(self, lease_id: str, expires: float = math.inf) -> None:
        self.lease_id = lease_id
        self.lost = False
        self.expires = expires


class Waiter:
    """A coroutine of this process queued in Redis; the dispatch loop sets *grant*."""

    __slots__ = ("event", "grant")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.grant: tuple[int, int] | None = None


class LeaseTable:
    """The leases, waiters and orphans of one limiter object, and its background loops.

    Args:
        name: the limiter's name, for messages.
        config: the limiter's options.
        call: runs a script of the limiter (see :data:`ScriptCall`).
    """

    def __init__(self, name: str, config: LimiterConfig, call: ScriptCall) -> None:
        self.name = name
        self._config = config
        self._call = call
        #: True while the limiter is entered (or attached to a group).
        self.open = False
        #: The event loop the limiter was entered in (bound on entry), and its clock.
        self.loop_check = LoopCheck()
        self.held: dict[str, Lease] = {}
        self.waiters: dict[str, Waiter] = {}
        #: Waiter ids whose acquire call failed (it may have run): cancelled when Redis
        #: answers again (cancel.lua frees what it left, and refunds its cost).
        self.orphans: set[str] = set()
        #: Leases whose release call failed (it may have run): released again when Redis
        #: answers (release.lua ignores a lease no longer held). Never cancelled: their
        #: tasks started, and a cancellation would refund their starts to the windows.
        self.unreleased: set[str] = set()
        # Waiter ids whose first acquire call is in flight or just answered (see expect),
        # and grants that came for them before they were queued here.
        self._expected: set[str] = set()
        self._early: dict[str, tuple[int, int]] = {}
        #: Leases found expired on renewal since the limiter was made.
        self.lost_count = 0
        #: The limiter's metrics (None: off), told of each permit released.
        self.metrics: LimiterMetrics | None = None
        self._withdrawing = False
        self._waiters_added = anyio.Event()
        # Push (pub/sub) wake-ups: whether the subscription is confirmed now, and how many
        # times it was confirmed (a grant published before a confirmation may be lost).
        self._push_live = False
        self._push_epoch = 0
        self._releases = Batcher(self._release_many)
        #: The limiter's acquire batcher when releases ride with acquisitions (swaps: a
        #: release is posted, not awaited); None: each release awaits its own call.
        self.swap_batcher: Batcher | None = None
        #: Asked as a release is posted: True sends it at once rather than with this
        #: process's next acquisition (set by the limiter, see RedisLimiter._release_at_once).
        self.release_at_once: Callable[[], bool] = _never

    # -- what the limiter and its permits ask -----------------------------------------------------

    def check_loop(self) -> None:
        """Raise WrongEventLoopError unless the running event loop is the limiter's."""
        if not self.loop_check.in_loop():
            raise WrongEventLoopError(
                f"limiter {self.name!r} was entered in another event loop (another thread, "
                "or another anyio.run / asyncio.run); use one limiter object per event loop"
            )

    def hold(self, lease_id: str, start_at: float) -> Lease:
        """Record a lease granted to this process, whose grant just arrived: its lease runs
        from its rate start, *start_at* (on ``anyio.current_time()``). It is renewed until
        released."""
        lease = self.held[lease_id] = Lease(lease_id, start_at + self._config.lease_ttl)
        return lease

    def check_expired(self, lease: Lease) -> None:
        """Report *lease* lost if it is given back after it expired in Redis (a block that
        kept the event loop busy, or a stalled process, beyond its lease while no renewal
        could run)."""
        if not lease.lost and anyio.current_time() > lease.expires:
            self._lose(lease, "expired before it was given back (no renewal in time)")

    def forget(self, lease_id: str) -> None:
        """Stop renewing *lease_id* (it is being given back)."""
        self.held.pop(lease_id, None)

    def orphan(self, entry_id: str) -> None:
        """Withdraw *entry_id* when Redis answers again (its last call failed)."""
        self.orphans.add(entry_id)

    @property
    def leftovers(self) -> bool:
        """Whether failed calls left something to withdraw or release in Redis."""
        return bool(self.orphans or self.unreleased)

    def push_ticket(self) -> int:
        """Taken before an acquire call that may queue a waiter (give it to :meth:`wait`):
        which confirmed subscription was live then (-1: none)."""
        return self._push_epoch if self._push_live else -1

    def expect(self, waiter_id: str) -> None:
        """*waiter_id*'s first acquire call is about to be sent: a grant for it that comes
        before :meth:`wait` queues it (pushed as soon as the call queued it in Redis, and
        read first by the push loop) is kept for :meth:`wait` instead of dropped.
        Call :meth:`unexpect` once the call is answered and the waiter queued."""
        self._expected.add(waiter_id)

    def unexpect(self, waiter_id: str) -> None:
        """See :meth:`expect`."""
        self._expected.discard(waiter_id)
        self._early.pop(waiter_id, None)

    def wait(self, waiter_id: str, ticket: int | None = None) -> Waiter:
        """Queue a waiter of this process: the dispatch loop wakes it on a grant.

        *ticket* (from :meth:`push_ticket` before its acquire call was sent): if the
        subscription live now was not live then, a grant may have been published for it
        before anyone listened, and the confirmation's re-check did not know the waiter yet:
        it is woken at once to ask again."""
        waiter = self.waiters[waiter_id] = Waiter()
        early = self._early.pop(waiter_id, None)
        if early is not None:
            waiter.grant = early
            waiter.event.set()
        elif ticket is not None and self._push_live and ticket != self._push_epoch:
            waiter.event.set()
        self._waiters_added.set()
        return waiter

    def stop_waiting(self, waiter_id: str) -> None:
        """Remove a waiter queued with :meth:`wait`."""
        del self.waiters[waiter_id]

    def is_idle(self) -> bool:
        """True if nothing is held, awaited, left to release or left to withdraw."""
        return (
            not self.held
            and not self.waiters
            and not self.leftovers
            and not (self.swap_batcher is not None and self.swap_batcher.pending)
        )

    def post_release(self, lease: Lease) -> bool:
        """Give *lease* back with the next acquire call of this process (or alone, a few
        scheduler ticks later, if none comes): see :class:`Batcher`. Not waited for; if the
        call fails the lease is withdrawn later or expires within lease_ttl.

        Returns whether the release should go at once instead (:attr:`release_at_once`):
        the caller then sends it with :meth:`flush_releases`."""
        assert self.swap_batcher is not None
        self.held.pop(lease.lease_id, None)
        self.swap_batcher.post(
            f"-{lease.lease_id}", anyio.current_time() + self._config.retry_window
        )
        return self.release_at_once()

    def releases_lost(self, items: list[str], error: BaseException) -> None:
        """A call carrying posted releases (``-<lease id>`` items) failed: release them
        again when Redis answers."""
        lease_ids = [item[1:] for item in items]
        self.unreleased.update(lease_ids)
        logger.warning(
            "limiter %r: could not release lease%s %s (%s); released when Redis answers "
            "again, or expired within lease_ttl",
            self.name,
            "s" if len(lease_ids) > 1 else "",
            ", ".join(lease_ids),
            error,
        )

    async def flush_releases(self) -> None:
        """Send the posted releases now (and wait for the call in flight, if any)."""
        if self.swap_batcher is not None:
            # A failure was reported (and the leases orphaned) by releases_lost.
            with contextlib.suppress(RedisLimiterError, TimeoutError):
                await self.swap_batcher.flush()

    def recheck_waiters(self) -> None:
        """Wake every waiter to ask Redis again (a grant may have been lost with a reply)."""
        for waiter in self.waiters.values():
            waiter.event.set()

    def deliver(self, message: str) -> None:
        """Hand each grant ``"<waiter id>|<token>|<delay_us>"`` of *message* (from the mailbox
        or the channel, where several are joined by ``,``, or returned by a swap) to its
        waiter, if it still waits."""
        for grant in message.split(","):
            waiter_id, token, delay_us = grant.split("|")
            waiter = self.waiters.get(waiter_id)
            if waiter is not None:
                waiter.grant = (int(token), int(delay_us))
                waiter.event.set()
            elif waiter_id in self._expected:
                self._early[waiter_id] = (int(token), int(delay_us))

    async def release(self, lease: Lease) -> None:
        """Give *lease* back in Redis (merged with the releases of other coroutines); if
        Redis does not answer, it is released again later or expires within lease_ttl."""
        self.held.pop(lease.lease_id, None)
        try:
            await self._releases.submit(
                lease.lease_id, anyio.current_time() + self._config.retry_window
            )
        except (RedisLimiterError, TimeoutError) as exc:
            self.unreleased.add(lease.lease_id)
            logger.warning(
                "limiter %r: could not release lease %s (%s); it is released when Redis "
                "answers again, or expires within lease_ttl",
                self.name,
                lease.lease_id,
                exc,
            )

    def withdraw_soon(self, task_group: anyio.abc.TaskGroup | None) -> None:
        """Redis answers again: free in the background what failed calls left behind."""
        if self.leftovers and not self._withdrawing and task_group is not None:
            self._withdrawing = True
            task_group.start_soon(self.withdraw_orphans)

    async def _release_many(self, lease_ids: list[str], deadline: float) -> list[Any]:
        reply = await self._call("release", *lease_ids, deadline=deadline)
        return [reply] * len(lease_ids)

    # -- background tasks ----------------------------------------------------------------------

    async def withdraw_orphans(self) -> None:
        """Release the unreleased leases (one call) and cancel every orphan in Redis; stop
        at the first call that fails."""
        self._withdrawing = True
        try:
            if self.unreleased:
                lease_ids = sorted(self.unreleased)
                try:
                    await self._call("release", *lease_ids)
                except RedisLimiterError:
                    return
                self.unreleased.difference_update(lease_ids)
            for entry_id in list(self.orphans):
                try:
                    await self._call("cancel", entry_id)
                except RedisLimiterError:
                    return
                self.orphans.discard(entry_id)
        finally:
            self._withdrawing = False

    async def renew_loop(self) -> None:
        """Every ``lease_ttl / 3``: renew every lease and queue entry, then withdraw orphans
        (after: a withdrawal waiting out an outage must not hold the renewal back)."""
        while True:
            await anyio.sleep(self._config.lease_ttl / 3)
            await self._renew()
            if self.leftovers:
                await self.withdraw_orphans()

    async def _renew(self) -> None:
        leases = list(self.held)
        waiters = list(self.waiters)
        if not leases and not waiters:
            return
        args: list[ScriptArg] = [len(leases), *leases, *waiters]
        try:
            lost_leases, lost_waiters, _ = await self._call("renew", *args)
        except RedisLimiterError as exc:
            logger.warning("limiter %r: renewal failed: %s", self.name, exc)
            return
        # Renewed at the latest when the reply came: the leases last until then + lease_ttl.
        expires = anyio.current_time() + self._config.lease_ttl
        lost = set(lost_leases)
        for lease_id in leases:
            lease = self.held.get(lease_id)
            if lease is None or lease.lost:
                continue
            if lease_id in lost:
                self._lose(lease, "expired before renewal")
            else:
                lease.expires = expires
        for waiter_id in lost_waiters:
            waiter = self.waiters.get(waiter_id)
            if waiter is not None:
                # Its queue entry expired: wake it so it queues again at once.
                waiter.event.set()

    def _lose(self, lease: Lease, how: str) -> None:
        lease.lost = True
        self.lost_count += 1
        logger.warning(
            "limiter %r: lease %s %s; its slot may have been given to another process",
            self.name,
            lease.lease_id,
            how,
        )
        if self._config.on_lease_lost is not None:
            self._report_lost(lease.lease_id)

    def _report_lost(self, lease_id: str) -> None:
        callback = self._config.on_lease_lost
        assert callback is not None
        error = LeaseLostError(
            f"limiter {self.name!r}: lease {lease_id} expired before it was renewed"
        )
        try:
            callback(error)
        except Exception:
            logger.exception("limiter %r: the on_lease_lost callback failed", self.name)

    async def push_loop(self, client: ScriptClient, channel: str) -> None:
        """Hand the grants Redis publishes on this process's *channel* to their waiters.

        Subscribed while this process has waiters (and :data:`PUSH_LINGER` seconds after
        the last one left). A grant published while nobody listened is not kept: every
        confirmation of the subscription (the first, and each one the client library makes
        after reconnecting) wakes every waiter to ask again, and so does a waiter queued by
        a call sent before it (see :meth:`wait`). A subscription that fails is made again
        after a backoff (50 ms, doubling to 1 s); the waiters' own re-checks after
        ``recheck_interval`` cover what happens meanwhile. A subscription Redis refuses (not
        one it could not answer) turns this into :meth:`dispatch_loop` on the mailbox list
        of the same name, where the scripts post the grants their PUBLISH could not send.
        """
        backoff = 0.05
        while True:
            if not self.waiters:
                self._waiters_added = anyio.Event()
                await self._waiters_added.wait()
            try:
                async with client.subscribe(channel) as subscription:
                    confirmed = 0
                    idle_since: float | None = None
                    while True:
                        message = await subscription.receive(_PUSH_POLL)
                        if subscription.confirmed != confirmed:
                            confirmed = subscription.confirmed
                            self._push_epoch += 1
                            self._push_live = True
                            backoff = 0.05
                            self.recheck_waiters()
                            # The grants published while this process was not subscribed
                            # went to the list of the channel's name (see handoff in
                            # lua/_shared.lua): its waiters ask again instead, so the list
                            # would only grow until it expires.
                            with contextlib.suppress(ClientError):
                                await client.delete(channel)
                        if message is not None:
                            self.deliver(message)
                            # Let the waiter just woken run before this loop reads on.
                            await anyio.lowlevel.checkpoint()
                        now = anyio.current_time()
                        if self.waiters:
                            idle_since = None
                        elif idle_since is None:
                            idle_since = now
                        elif now - idle_since >= PUSH_LINGER:
                            break
            except ClientError as exc:
                self._push_live = False
                if not isinstance(exc, Unavailable):
                    # Refused (an ACL without SUBSCRIBE or the channel): the scripts post to
                    # the list of the same name when their PUBLISH is refused too.
                    logger.warning(
                        "limiter %r: cannot subscribe to %s (%s); its waiters are woken "
                        "through the mailbox list of that name instead (BLPOP). Allow the "
                        "Redis user SUBSCRIBE, PUBLISH and the channels of the limiter's "
                        "prefix (&<prefix>:*) to have the grants pushed",
                        self.name,
                        channel,
                        exc,
                    )
                    await self.dispatch_loop(client, channel)
                    return
                # The waiters' own re-checks cover the outage; just don't spin.
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                self._push_live = False

    async def dispatch_loop(self, client: ScriptClient, mailbox: str) -> None:
        """Hand the grants pushed to this process's *mailbox* (a list) to their waiters."""
        recheck_interval = self._config.recheck_interval
        backoff = 0.05
        while True:
            if not self.waiters:
                self._waiters_added = anyio.Event()
                await self._waiters_added.wait()
            try:
                message = await client.blpop(mailbox, recheck_interval)
            except ClientError as exc:
                if not isinstance(exc, Unavailable):
                    logger.warning("limiter %r: reading the mailbox failed: %s", self.name, exc)
                # The waiters' own re-checks cover the outage; just don't spin.
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if message is not None:
                self.deliver(message)
