"""A pure-Python model of the Redis limiter scripts in ``lua/``.

:class:`LimiterModel` keeps the same state as the eight Redis keys of one limiter (plus
the per-process mailboxes) in plain dicts and implements each script's contract as
documented in the scripts' headers. It is written from that contract, not from the
Lua, so that the hypothesis tests in ``test_scripts.py`` compare two independent
implementations. ``acquire`` and ``release`` take a batch (a list) of ids, as the
scripts do. Replies have the shape the scripts return after
:func:`aiometer_redis._client.normalize_reply`.

Key TTLs are not modelled; they are checked by dedicated tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["HANDOFF_BATCH", "PURGE_BATCH", "LimiterModel", "Limits", "process_of"]

#: At most this many expired leases (and, separately, dead waiters, and ended rate-only
#: memories) go per call.
PURGE_BATCH = 100
#: At most this many queue heads are granted per handoff.
HANDOFF_BATCH = 100


def process_of(waiter_id: str) -> str:
    """Return the process part of a waiter id ``"<process>:<n>"`` (the mailbox suffix)."""
    process, sep, _ = waiter_id.partition(":")
    return process if sep else waiter_id


def _split_max_delay(item: str) -> tuple[str, int | None]:
    """``"<id>/<max delay us>"`` as (id, max delay); a plain id has no max delay."""
    waiter_id, slash, max_delay = item.rpartition("/")
    if slash and max_delay.isdigit():
        return waiter_id, int(max_delay)
    return item, None


def _member_order(item: tuple[str, float]) -> tuple[float, bytes]:
    # Sorted-set order: by score, ties broken by the member's bytes.
    member, score = item
    return score, member.encode()


@dataclass(frozen=True)
class Limits:
    """The configuration every script call carries in its ARGV header."""

    max_at_once: int
    interval_us: float
    burst: int
    lease_ttl_us: int


@dataclass
class LimiterModel:
    """State of one limiter and the semantics of acquire/release/renew/cancel/status."""

    holders: dict[str, int] = field(default_factory=dict)
    queue: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, int] = field(default_factory=dict)
    tat: float | None = None
    seq: int = 0
    grants: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Rate-only waiter id -> end of its memory (µs); its grant is in ``grants``.
    recent: dict[str, int] = field(default_factory=dict)
    #: Rate starts given back: waiter id -> start (µs).
    spare: dict[str, int] = field(default_factory=dict)
    mailboxes: dict[str, list[str]] = field(default_factory=dict)

    # -- building blocks -------------------------------------------------------------

    @staticmethod
    def _due(entries: dict[str, int], now: int) -> list[str]:
        due = sorted(((m, s) for m, s in entries.items() if s <= now), key=_member_order)
        return [member for member, _ in due[:PURGE_BATCH]]

    def _purge(self, now: int) -> None:
        for lease_id in self._due(self.holders, now):
            del self.holders[lease_id]
            self.grants.pop(lease_id, None)
        for waiter_id in self._due(self.waiters, now):
            del self.waiters[waiter_id]
            self.queue.pop(waiter_id, None)

    def _forget_ended(self, now: int) -> None:
        for waiter_id in self._due(self.recent, now):
            del self.recent[waiter_id]
            self.grants.pop(waiter_id, None)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _reserve(self, now: int, limits: Limits, max_delay: int | None) -> int | None:
        """The next rate start's delay (µs), reserved; None (nothing reserved) if it would
        exceed *max_delay*. A start given back and still ahead comes first."""
        ahead = [(m, s) for m, s in self.spare.items() if s >= now]
        if ahead:
            member, start = min(ahead, key=_member_order)
            delay = math.ceil(start - now)
            if max_delay is not None and delay > max_delay:
                return None
            del self.spare[member]
            return delay
        interval = float(limits.interval_us)
        # GCRA: the request is allowed once the theoretical arrival time, less the burst
        # tolerance, has been reached; each grant pushes the TAT by one interval.
        arrival = max(self.tat if self.tat is not None else 0.0, float(now))
        delay = math.ceil(max(0.0, arrival - (limits.burst - 1) * interval - now))
        if max_delay is not None and delay > max_delay:
            return None
        self.tat = float(f"{arrival + interval:.3f}")
        return delay

    def _give_back(self, waiter_id: str, start_at: int, now: int, limits: Limits) -> None:
        interval = float(limits.interval_us)
        if interval <= 0 or start_at <= now:
            return
        passed = sorted(((m, s) for m, s in self.spare.items() if s < now), key=_member_order)
        for member, _ in passed[:PURGE_BATCH]:
            del self.spare[member]
        if not self.tat:
            return

        def is_latest(start: float) -> bool:
            assert self.tat is not None
            latest = self.tat - limits.burst * interval
            return start - 1.001 < latest <= start + 0.001

        if not is_latest(start_at):
            self.spare[waiter_id] = start_at
            return
        self.tat = float(f"{self.tat - interval:.3f}")
        while self.spare:
            member, start = max(self.spare.items(), key=_member_order)
            if not is_latest(start):
                break
            del self.spare[member]
            self.tat = float(f"{self.tat - interval:.3f}")

    def _grant(
        self, waiter_id: str, now: int, limits: Limits, max_delay: int | None = None
    ) -> tuple[int, int] | None:
        """Turn ``waiter_id`` into a holder; return (fencing token, start delay in µs), or
        None (nothing changed) if its rate start would be more than *max_delay* away."""
        delay = 0
        if limits.interval_us > 0:
            reserved = self._reserve(now, limits, max_delay)
            if reserved is None:
                return None
            delay = reserved
        self.queue.pop(waiter_id, None)
        self.waiters.pop(waiter_id, None)
        token = self._next_seq()
        start_at = now + delay
        if limits.max_at_once > 0:
            self.holders[waiter_id] = start_at + limits.lease_ttl_us
            self.grants[waiter_id] = (token, start_at)
        return token, delay

    def _queue_order(self) -> list[str]:
        return [m for m, _ in sorted(self.queue.items(), key=_member_order)]

    def _handoff(self, now: int, limits: Limits) -> int:
        if limits.max_at_once <= 0:
            return 0
        granted = 0
        while (
            granted < min(limits.max_at_once, HANDOFF_BATCH)
            and len(self.holders) < limits.max_at_once
            and self.queue
        ):
            head = self._queue_order()[0]
            granted_now = self._grant(head, now, limits)
            assert granted_now is not None
            token, delay = granted_now
            self.mailboxes.setdefault(process_of(head), []).append(f"{head}|{token}|{delay}")
            granted += 1
        return granted

    # -- the scripts -----------------------------------------------------------------

    def _acquire_rate_only(
        self, now: int, waiter_id: str, limits: Limits, max_delay: int | None
    ) -> list[int]:
        ends = self.recent.get(waiter_id)
        stored = self.grants.get(waiter_id)
        if ends is not None and ends > now and stored is not None:
            # A retry: the remembered grant, nothing reserved.
            token, start_at = stored
            return [1, token, max(0, start_at - now)]
        granted = self._grant(waiter_id, now, limits, max_delay)
        if granted is None:
            return [2, 0]
        token, delay = granted
        self.recent[waiter_id] = now + limits.lease_ttl_us
        self.grants[waiter_id] = (token, now + delay)
        return [1, token, delay]

    def _acquire_one(
        self, now: int, waiter_id: str, limits: Limits, max_delay: int | None
    ) -> list[int]:
        if waiter_id in self.holders:
            if waiter_id not in self.grants:
                return [1, 0, 0]
            token, start_at = self.grants[waiter_id]
            return [1, token, max(0, start_at - now)]
        order = self._queue_order()
        queued = waiter_id in self.queue
        ahead = order.index(waiter_id) if queued else len(order)
        if len(self.holders) + ahead < limits.max_at_once:
            granted = self._grant(waiter_id, now, limits, max_delay)
            return [2, 0] if granted is None else [1, *granted]
        if not queued:
            self.queue[waiter_id] = self._next_seq()
        self.waiters[waiter_id] = now + limits.lease_ttl_us
        return [0, ahead]

    def acquire(
        self,
        now: int,
        waiter_ids: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
    ) -> list[list[int]]:
        """Model of acquire.lua: per waiter id, ``[1, token, delay_us]``, ``[0, ahead]``
        or ``[2, 0]`` (refused: an id ``"<id>/<max delay us>"`` whose rate start would be
        further away than that).

        One purge, then each id in turn as if acquired alone. Rate only
        (``max_at_once == 0``) keeps no leases but remembers each grant for
        ``lease_ttl_us``: ended memories are forgotten first (at most
        :data:`PURGE_BATCH`), then an id remembered (memory ending after ``now``, grant
        still stored) gets its grant again with the delay left, and any other id is
        granted the next token and rate slot and remembered.
        """
        if not waiter_ids:
            raise ValueError("acquire takes at least one waiter id")
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us)
        split = [_split_max_delay(item) for item in waiter_ids]
        if max_at_once == 0:
            self._forget_ended(now)
            return [self._acquire_rate_only(now, i, limits, m) for i, m in split]
        self._purge(now)
        return [self._acquire_one(now, i, limits, m) for i, m in split]

    def release(
        self,
        now: int,
        lease_ids: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
    ) -> list[int]:
        """Model of release.lua: ``[released, granted]``.

        Every id leaves holders and grants (``released`` counts those that were held),
        then one purge and one handoff.
        """
        if not lease_ids:
            raise ValueError("release takes at least one lease id")
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us)
        released = 0
        for lease_id in lease_ids:
            released += self.holders.pop(lease_id, None) is not None
            self.grants.pop(lease_id, None)
        self._purge(now)
        return [released, self._handoff(now, limits)]

    def renew(
        self,
        now: int,
        lease_ids: list[str],
        waiter_ids: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
    ) -> list[object]:
        """Model of renew.lua: ``[lost_lease_ids, lost_waiter_ids, granted]``."""
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us)
        lost_leases: list[str] = []
        for lease_id in lease_ids:
            expiry = self.holders.get(lease_id)
            if expiry is not None and expiry > now:
                self.holders[lease_id] = max(expiry, now + lease_ttl_us)
            else:
                lost_leases.append(lease_id)
                self.holders.pop(lease_id, None)
                self.grants.pop(lease_id, None)
        lost_waiters: list[str] = []
        for waiter_id in waiter_ids:
            if waiter_id in self.waiters:
                self.waiters[waiter_id] = now + lease_ttl_us
            elif waiter_id not in self.holders:
                lost_waiters.append(waiter_id)
        self._purge(now)
        return [lost_leases, lost_waiters, self._handoff(now, limits)]

    def cancel(
        self,
        now: int,
        waiter_id: str,
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
    ) -> list[int]:
        """Model of cancel.lua: ``[was_granted, granted]``."""
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us)
        self.queue.pop(waiter_id, None)
        self.waiters.pop(waiter_id, None)
        was_granted = int(self.holders.pop(waiter_id, None) is not None)
        stored = self.grants.pop(waiter_id, None)
        if stored is not None:
            self.recent.pop(waiter_id, None)
            self._give_back(waiter_id, stored[1], now, limits)
        if max_at_once == 0:
            return [0, 0]
        self._purge(now)
        return [was_granted, self._handoff(now, limits)]

    def status(self, now: int) -> list[object]:
        """Model of status.lua: ``[now, holders_flat, queue_flat, tat, seq, spare]``."""

        def flat(entries: dict[str, int]) -> list[str]:
            out: list[str] = []
            for member, score in sorted(entries.items(), key=_member_order):
                out += [member, str(score)]
            return out

        tat = "" if self.tat is None else f"{self.tat:.3f}"
        ahead = [s for s in self.spare.values() if s >= now]
        spare = str(min(ahead)) if ahead else ""
        return [now, flat(self.holders), flat(self.queue), tat, str(self.seq), spare]
