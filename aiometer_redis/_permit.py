"""RedisPermit: one slot held through a RedisLimiter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from aiometer import CostPermit, Permit

from ._config import UNIT, cost_units
from ._leases import Lease, LeaseTable

__all__ = ["RedisPermit", "Settler"]

#: Runs settle.lua for (waiter id, actual units, units charged so far); retried like every call.
Settler = Callable[[str, int, int], Awaitable[Any]]


class RedisPermit:
    """A slot held through a :class:`RedisLimiter`.

    Attributes:
        lease_id: the lease's id in Redis (empty for a rate-only limiter, which keeps no lease).
        token: a fencing token, increasing with every grant of this limiter; pass it to a
            downstream system that can reject writes from a holder whose lease was lost.
            0 for a permit taken in the in-process fallback.
        fallback: True if Redis was unavailable and the permit comes from the in-process
            fallback (``on_unavailable="local"``).
        cost: the cost this permit was acquired with (its estimate), or its last settled value.
    """

    __slots__ = (
        "_lease",
        "_leases",
        "_local",
        "_local_rate",
        "_released",
        "_settler",
        "_units",
        "_waiter_id",
        "fallback",
        "lease_id",
        "token",
    )

    def __init__(
        self,
        leases: LeaseTable,
        lease: Lease | None,
        token: int,
        local: Permit | None,
        *,
        fallback: bool = False,
        waiter_id: str = "",
        units: int = UNIT,
        settler: Settler | None = None,
        local_rate: CostPermit | None = None,
    ) -> None:
        self._leases = leases
        self._lease = lease
        self._local = local
        self._released = False
        self._waiter_id = waiter_id
        self._units = units
        self._settler = settler
        self._local_rate = local_rate
        self.lease_id = lease.lease_id if lease is not None else ""
        self.token = token
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"RedisPermit(lease_id={self.lease_id!r}, token={self.token}, lost={self.lost})"

    @property
    def lost(self) -> bool:
        """True if a renewal found the lease expired: the slot may have gone to another."""
        return self._lease is not None and self._lease.lost

    @property
    def cost(self) -> float:
        """The cost charged for this permit: its estimate, or the value it was last settled to."""
        return self._units / UNIT

    async def settle(self, actual: float) -> None:
        """Charge or refund the difference between the permit's cost and *actual*.

        The difference is applied at the permit's original start, in every rate window that
        counts cost (windows that count calls never change) and in ``max_per_second``: a
        charge is a debt that later starts wait for; a refund frees room in the windows at
        once, and in ``max_per_second`` only while no later start was reserved (and only for
        a permit acquired with a cost other than 1, or from a limiter with rates). Settling
        again replaces the previous settle. Allowed after :meth:`release`. On a permit that
        holds no rate reservation (a limiter with only ``max_at_once``) it only checks
        *actual*. Completes even inside a cancelled scope.

        Raises:
            TypeError: *actual* is not a number.
            ConfigurationError: *actual* is not a finite number >= 0 (also a ValueError).
            RedisUnavailableError: Redis did not answer within ``retry_window``.
        """
        units = cost_units(actual, "actual", zero=True)
        if self.fallback:
            if self._local_rate is not None:
                with anyio.CancelScope(shield=True):
                    await self._local_rate.settle(actual)
            self._units = units
            return
        if self._settler is None or units == self._units:
            self._units = units
            return
        with anyio.CancelScope(shield=True):
            await self._settler(self._waiter_id, units, self._units)
        self._units = units

    async def release(self) -> None:
        """Give the slot back (idempotent; completes even inside a cancelled scope).

        The release is not waited for: it goes to Redis with this process's next acquisition
        (one call for both), or alone a few scheduler ticks later; leaving the limiter sends
        the releases still pending. Except when this process's last acquisition had to queue
        and none of its tasks waits: the slot likely goes to a task of another process, so
        the release is sent at once, and its call awaited (shielded). If Redis cannot be
        reached the lease is given back when it answers again, or expires within
        ``lease_ttl``. The permit's rate reservation stays counted in its windows (it may
        still be settled).
        """
        if self._released:
            return
        leases = self._leases
        if self._lease is not None and leases.open:
            leases.check_loop()
            leases.check_expired(self._lease)
        self._released = True
        if leases.metrics is not None:
            leases.metrics.released(self)
        if self._lease is None or not leases.open:
            # Rate only, or the in-process fallback: nothing is held in Redis. Or the limiter
            # was left (its client may be closed): the lease, no longer renewed, expires
            # within lease_ttl.
            if self._local is not None:
                await self._local.release()
            return
        if leases.swap_batcher is not None:
            # Posted, not sent; and the local permit gives its place back without suspending:
            # nothing here can be cancelled, so no shield (this runs before the swap is sent).
            at_once = leases.post_release(self._lease)
            if self._local is not None:
                await self._local.release()
            if at_once:
                # Sent now, from this task (no hop through the flusher task); its reply is
                # awaited, shielded: the next acquisition would wait for this call anyway.
                await leases.flush_releases()
            return
        with anyio.CancelScope(shield=True):
            try:
                await leases.release(self._lease)
            finally:
                if self._local is not None:
                    await self._local.release()
