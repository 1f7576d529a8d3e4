"""Rate starts reserved ahead: the bookkeeping of one process's pool (no I/O here).

A rate-only limiter's script call can reserve, besides the start its caller asked for, the
next few starts of the fleet for this process's next acquisitions. They wait here, each with
its local start time, and are handed out in order, never before that time, and dropped when
more than ``LATE`` behind it. How many to hold follows what the process used lately: about
``AHEAD`` seconds of its recent rate of starts, never more than ``HORIZON`` seconds of the
fleet's rate nor ``MAX_RESERVED``, and halved after a call interval in which a start was
dropped (the process could not keep up with starts that close together: a busy CPU, or a
fleet rate above its own pace); it doubles call after call until the first drop, and grows by
an eighth after that.
"""

from __future__ import annotations

import heapq

__all__ = ["AHEAD", "HORIZON", "LATE", "MAX_RESERVED", "ReservePool", "reserve_cap"]

#: About this many seconds of the process's recent rate are reserved ahead.
AHEAD = 0.020
#: No start reserved ahead lies further away than this (seconds).
HORIZON = 0.05
#: A reserved start is handed out at most this late (seconds); later, it is dropped (unused).
LATE = 0.005
#: At most this many starts are reserved in one call.
MAX_RESERVED = 64

#: How much one new measurement of the rate of starts weighs in the estimate (at least).
_SMOOTHING = 0.5


def reserve_cap(max_per_second: float) -> int:
    """The most starts one call may take for a limiter of *max_per_second* (1: none ahead)."""
    return max(1, min(MAX_RESERVED, int(HORIZON * max_per_second)))


class ReservePool:
    """The starts one process reserved ahead: ``(local start time, waiter id, token)``.

    Args:
        cap: the most starts one call may take (see :func:`reserve_cap`).
    """

    __slots__ = (
        "_doubling",
        "_dropped_before",
        "_entries",
        "_handed",
        "_rate",
        "_since",
        "_size",
        "_target",
        "cap",
        "dropped",
    )

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._entries: list[tuple[float, str, int]] = []
        #: Starts dropped because nobody took them in time (they are lost to the fleet).
        self.dropped = 0
        # Starts handed out since _since (the last reservation call), and the estimate of the
        # process's rate of starts per second (None: no call made yet).
        self._handed = 0
        self._since: float | None = None
        self._rate: float | None = None
        # The most the pool is filled to (halved after drops, doubled back), what the last call
        # aimed at, and `dropped` when it was made.
        self._size = 1
        self._doubling = True
        self._target = 0
        self._dropped_before = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, now: float, deadline: float | None) -> tuple[float, str, int] | None:
        """The earliest start not yet too late, if it lies before *deadline*; starts more
        than ``LATE`` behind *now* are dropped first."""
        self.drop_late(now)
        entries = self._entries
        if not entries or (deadline is not None and entries[0][0] > deadline):
            return None
        self._handed += 1
        return heapq.heappop(entries)

    def handed(self) -> None:
        """Count a start a call handed straight to its caller (not through the pool)."""
        self._handed += 1

    def put(self, at: float, waiter_id: str, token: int) -> None:
        """Add a reserved start (or one a cancelled caller did not use)."""
        heapq.heappush(self._entries, (at, waiter_id, token))

    def put_back(self, entry: tuple[float, str, int]) -> None:
        """Return a start taken with :meth:`take` that its caller did not use."""
        self._handed -= 1
        heapq.heappush(self._entries, entry)

    def given_back(self) -> None:
        """Uncount a start taken with :meth:`take` that its caller gave back unused."""
        self._handed -= 1

    def overslept(self) -> None:
        """Count a start taken with :meth:`take` and dropped: its caller woke up more than
        ``LATE`` after its time."""
        self._handed -= 1
        self.dropped += 1

    def drop_late(self, now: float) -> None:
        """Drop the starts more than ``LATE`` behind *now*."""
        entries = self._entries
        while entries and entries[0][0] < now - LATE:
            heapq.heappop(entries)
            self.dropped += 1

    def ahead(self, now: float) -> list[tuple[float, str, int]]:
        """Empty the pool; return the starts still ahead of *now*, latest first."""
        entries, self._entries = self._entries, []
        return sorted((entry for entry in entries if entry[0] > now), reverse=True)

    def wanted(self, now: float) -> int:
        """How many starts a call made at *now* should reserve for the process's next
        acquisitions (beyond the callers waiting): what tops the pool up to about ``AHEAD``
        seconds of its recent rate (within the size that drops allow). Call once per
        reservation call: it starts a new measurement."""
        since, handed = self._since, self._handed
        self._since, self._handed = now, 0
        if since is not None and now > since:
            measured = handed / (now - since)
            rate = self._rate
            # A measurement over a long interval is an average already: it replaces the
            # estimate (after a lull, the next call reserves little).
            weight = max(_SMOOTHING, min(1.0, (now - since) / HORIZON))
            self._rate = measured if rate is None else rate + weight * (measured - rate)
        if self.dropped > self._dropped_before:
            self._size = max(1, self._size // 2)
            self._doubling = False
        elif since is not None:
            # Doubling until a start is first dropped, then a slower climb back.
            grown = self._size * 2 if self._doubling else self._size + max(1, self._size // 8)
            self._size = min(self.cap - 1, grown)
        self._dropped_before = self.dropped
        demand = 1 if self._rate is None else round(self._rate * AHEAD)
        self._target = min(self._size, demand)
        self._size = max(1, self._target)  # grows from what was used, not past it
        return max(0, self._target - len(self._entries))

    def running_low(self) -> bool:
        """True when the pool holds less than half of what the last call aimed at: time to
        reserve more before a caller finds it empty."""
        return len(self._entries) * 2 < self._target
