"""RedisPermit: one slot held through a RedisLimiter."""

from __future__ import annotations

import anyio

from aiometer import Permit

from ._leases import Lease, LeaseTable

__all__ = ["RedisPermit"]


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

    __slots__ = ("_lease", "_leases", "_local", "_released", "fallback", "lease_id", "token")

    def __init__(
        self,
        leases: LeaseTable,
        lease: Lease | None,
        token: int,
        local: Permit | None,
        *,
        fallback: bool = False,
    ) -> None:
        self._leases = leases
        self._lease = lease
        self._local = local
        self._released = False
        self.lease_id = lease.lease_id if lease is not None else ""
        self.token = token
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"RedisPermit(lease_id={self.lease_id!r}, token={self.token}, lost={self.lost})"

    @property
    def lost(self) -> bool:
        """True if a renewal found the lease expired: the slot may have gone to another."""
        return self._lease is not None and self._lease.lost

    async def release(self) -> None:
        """Give the slot back (idempotent; completes even inside a cancelled scope).

        If Redis cannot be reached the lease is left to expire within ``lease_ttl``.
        """
        if self._released:
            return
        leases = self._leases
        if self._lease is not None and leases.open:
            leases.check_loop()
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
        with anyio.CancelScope(shield=True):
            try:
                await leases.release(self._lease)
            finally:
                if self._local is not None:
                    await self._local.release()
