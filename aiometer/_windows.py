"""The bookkeeping of a rate limit, without a clock: GCRA with cost, sliding-window logs, settle.

:class:`Schedule` decides when an acquisition of a given cost may start, given ``now``. It
knows nothing about waiting or about time passing: the caller passes the current time in, so
the same code serves the in-process :class:`~aiometer.RateLimiter` (which passes
``anyio.current_time()``) and models driven by an injected clock.

Rules (one set for every limiter):

- **GCRA with cost.** With an interval ``T = 1 / max_per_second`` and a burst ``b``, a cost
  ``c`` may start at ``t >= tat - (b - c) * T``; starting it sets
  ``tat = max(tat, t) + c * T``.
- **Windows.** A :class:`~aiometer.Rate` keeps a log of the starts of the last ``per``
  seconds. A cost ``c`` may start at ``t`` when the log's entries with a start in
  ``(t - per, t]`` plus ``c`` stay within the limit (``counts="calls"`` windows count 1 per
  start). Finding the earliest such ``t`` walks the log oldest first.
- **First come, first served.** No start is ever earlier than the latest start already
  reserved, so a large cost at the head of the line is never overtaken by small ones. (The
  GCRA alone never reserves out of order, so only schedules with windows track it.)
- **All or nothing.** The start is the latest of the GCRA's and every window's earliest; it is
  charged to all of them, or (past the caller's deadline) to none.
- **Pause.** No start is earlier than ``paused_until`` (see :meth:`Schedule.pause`), and the GCRA
  counts the first start after a pause from the pause's end, so the burst after a pause is
  the same as after an idle period, never a catch-up of the paused time.
- **Settle.** Settling a reservation to its actual cost changes its entry, at its original
  start, in every ``counts="cost"`` window still holding it. The GCRA takes a debt at once
  (``tat += d * T``); a refund (``d < 0``) moves ``tat`` back only while no later start was
  reserved, since a later start already counted from the higher ``tat``.

Floating-point sums: each window keeps a running total, which is exact for whole-number costs.
For fractional costs, a decision whose margin is within a hair (1e-9 relative) of the limit is
taken again on a sum recomputed with :func:`math.fsum` from the entries, and the running total
is recomputed the same way after as many changes as the window has entries (at least 1024), so
rounding never drifts.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice
from typing import Any, Generic, TypeVar

from ._rate import Rate

__all__ = ["Reservation", "Schedule"]

# Relative margin under which a window's decision is taken again on an exact sum.
_CLOSE = 1e-9
# How many changes of a window's running total (at least, and at least one per entry, so the
# recomputation costs O(1) per change) before it is recomputed from the entries.
_RESYNC_EVERY = 1024


class Reservation:
    """One charged start: its time and the cost the windows hold for it.

    A limiter may hand out a subclass of its own as the permit (see ``Schedule``), which saves
    an object per acquisition.
    """

    __slots__ = ("actual", "schedule", "start")

    def __init__(self, schedule: Schedule[Any], start: float, cost: float) -> None:
        #: The schedule that charged it.
        self.schedule = schedule
        self.start = start
        #: The cost charged now: the cost acquired until settled, then the settled value.
        self.actual = cost


class _Window:
    """The log of one Rate: the reservations started in the last ``per`` seconds, in order."""

    __slots__ = ("calls", "changes", "cut", "entries", "limit", "per", "rate", "total")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.limit = float(rate.limit)
        self.per = float(rate.per)
        self.calls = rate.counts == "calls"
        self.entries: deque[Reservation] = deque()
        # Every entry with start <= cut has been dropped; every later one is still here.
        self.cut = -math.inf
        # Running sum of the entries' actual costs (unused by a calls window: len(entries)).
        self.total = 0.0
        self.changes = 0

    def used(self) -> float:
        return float(len(self.entries)) if self.calls else self.total

    def holds(self, reservation: Reservation) -> bool:
        return reservation.start > self.cut

    def trim(self, now: float) -> None:
        cut = now - self.per
        if cut <= self.cut:
            return
        self.cut = cut
        entries = self.entries
        if not entries or entries[0].start > cut:
            return
        if self.calls:
            while entries and entries[0].start <= cut:
                entries.popleft()
            return
        total = self.total
        while entries and entries[0].start <= cut:
            total -= entries.popleft().actual
        self._set_total(total)

    def _set_total(self, total: float) -> None:
        if not self.entries:
            self.total = 0.0
            self.changes = 0
            return
        self.changes += 1
        if self.changes >= _RESYNC_EVERY and self.changes >= len(self.entries):
            self.changes = 0
            total = math.fsum(entry.actual for entry in self.entries)
        self.total = total

    def add(self, reservation: Reservation) -> None:
        self.entries.append(reservation)
        if not self.calls:
            self.changes += 1
            if self.changes < _RESYNC_EVERY or self.changes < len(self.entries):
                self.total += reservation.actual
            else:
                self.changes = 0
                self.total = math.fsum(entry.actual for entry in self.entries)

    def change(self, reservation: Reservation, delta: float) -> None:
        """*reservation* (held here) now costs *delta* more (less if negative)."""
        if not self.calls:
            self._set_total(self.total + delta)

    def remove(self, reservation: Reservation) -> None:
        entries = self.entries
        if entries and entries[-1] is reservation:
            entries.pop()
        else:
            try:
                entries.remove(reservation)
            except ValueError:
                return
        if not self.calls:
            self._set_total(self.total - reservation.actual)

    def _fits(self, total: float, need: float, skip: int) -> bool:
        """Whether the entries from index *skip* on, summing to about *total*, leave room for
        *need*; decided exactly when the margin is within rounding."""
        margin = self.limit - (total + need)
        if abs(margin) > _CLOSE * self.limit:
            return margin >= 0
        if self.calls:
            return margin >= 0
        exact = math.fsum([*(entry.actual for entry in islice(self.entries, skip, None)), need])
        return exact <= self.limit

    def earliest(self, t0: float, cost: float) -> float:
        """The earliest start >= *t0* at which this window has room for *cost*."""
        calls = self.calls
        need = 1.0 if calls else cost
        entries = self.entries
        if not entries or entries[0].start > t0 - self.per:
            # Nothing stale to skip: a clear fit is decided on the running total.
            used = len(entries) if calls else self.total
            if used + need <= self.limit * (1 - _CLOSE):
                return t0
        if need > self.limit:
            return math.inf
        total = self.used()
        stale = t0 - self.per
        last = -math.inf
        for skip, entry in enumerate(self.entries):
            if entry.start > stale:
                if self._fits(total, need, skip):
                    break
                # Past the stale ones, each entry dropped moves the start to its end of window.
                last = entry.start
            total -= 1.0 if calls else entry.actual
        return max(t0, last + self.per)


R = TypeVar("R", bound="Reservation")


class Schedule(Generic[R]):
    """When starts of a given cost may happen: a GCRA and any number of windows, charged
    together.

    Args:
        interval: ``1 / max_per_second``, or None for no GCRA.
        burst: the GCRA's burst, in cost units.
        rates: the windows; each keeps one entry per start of its last ``per`` seconds.
        reservation: the class of the reservations handed out (a subclass of Reservation).
    """

    __slots__ = (
        "_gcra_owner",
        "_new",
        "_windows",
        "burst",
        "interval",
        "latest",
        "paused_until",
        "tat",
        "whole_calls",
    )

    def __init__(
        self,
        interval: float | None,
        burst: int,
        rates: tuple[Rate, ...],
        reservation: type[R],
    ) -> None:
        self._new = reservation
        #: If true, a cost above the burst is not refused: it starts once the GCRA has caught
        #: up (``t >= tat``), taking ``cost * interval`` of the schedule, which keeps
        #: ``max_per_second`` a spacing of calls by their cost (the run functions' local limit).
        self.whole_calls = False
        self.interval = interval
        self.burst = burst
        #: Theoretical arrival time of the GCRA; -inf: idle for ever.
        self.tat = -math.inf
        #: The latest start reserved (no later reservation may start before it).
        self.latest = -math.inf
        #: No start before this time (-inf: no pause).
        self.paused_until = -math.inf
        self._windows = tuple(_Window(rate) for rate in rates)
        # The reservation that last moved tat (its settle may refund the GCRA).
        self._gcra_owner: R | None = None

    @property
    def rates(self) -> tuple[Rate, ...]:
        """The windows, in the order given."""
        return tuple(window.rate for window in self._windows)

    def impossible(self, cost: float) -> str | None:
        """Why *cost* can never start, or None if it can."""
        if self.interval is not None and cost > self.burst and not self.whole_calls:
            return (
                f"cost {cost:g} can never start: max_per_second allows bursts of at most "
                f"{self.burst} (raise burst, or use rates=[Rate(...)])"
            )
        for window in self._windows:
            if not window.calls and cost > window.limit:
                return (
                    f"cost {cost:g} can never start: {window.rate!r} allows at most "
                    f"{window.limit:g} per window"
                )
        return None

    def set_interval(self, interval: float | None, now: float) -> None:
        """Change the GCRA's interval; the backlog is rescaled so the new rate applies now."""
        old = self.interval
        if interval is not None and old is not None and self.tat > now:
            self.tat = now + (self.tat - now) * interval / old
        self.interval = interval

    def pause(self, until: float) -> None:
        """No start before *until*; a pause in force that ends later is kept (never shortened)."""
        if until > self.paused_until:
            self.paused_until = until

    def trim(self, now: float) -> None:
        """Drop the window entries that no start from *now* on can see."""
        for window in self._windows:
            window.trim(now)

    def used(self, now: float) -> tuple[float, ...]:
        """What each window holds in ``(now - per, now]``: cost, or calls."""
        self.trim(now)
        return tuple(window.used() for window in self._windows)

    def _headroom(self, cost: float) -> float:
        room = self.burst - cost
        return 0.0 if room < 0 and self.whole_calls else room

    def earliest(self, now: float, cost: float) -> float:
        """The earliest start of *cost* from *now* (inf if it can never start)."""
        start = self.latest if self.latest > now else now
        if self.paused_until > start:
            start = self.paused_until
        interval = self.interval
        if interval is not None:
            allowed = self.tat - self._headroom(cost) * interval
            if allowed > start:
                start = allowed
        if self._windows:
            t0 = start
            for window in self._windows:
                window.trim(now)
                allowed = window.earliest(t0, cost)
                if allowed > start:
                    start = allowed
        return start

    def reserve(
        self,
        now: float,
        cost: float,
        deadline: float = math.inf,
        gcra_from: float | None = None,
    ) -> R | None:
        """Charge *cost* at its earliest start, unless that is later than *deadline*.

        Returns the reservation, or None (nothing charged anywhere). *gcra_from* is the time
        the GCRA counts the start from, if not the start itself (a late waiter keeping the
        schedule).
        """
        if self._windows:
            start = self.earliest(now, cost)
        else:
            # The GCRA alone (the common case), inline.
            start = now if now >= self.paused_until else self.paused_until
            if self.interval is not None:
                room = self.burst - cost
                if room < 0 and self.whole_calls:
                    room = 0
                allowed = self.tat - room * self.interval
                if allowed > start:
                    start = allowed
        if start > deadline:
            return None
        reservation = self._new(self, start, cost)
        interval = self.interval
        if interval is not None:
            tat = self.tat
            base = start if gcra_from is None else gcra_from
            if base < self.paused_until:
                base = self.paused_until
            self.tat = (tat if tat > base else base) + cost * interval
            self._gcra_owner = reservation
        if self._windows:
            self.latest = start
            for window in self._windows:
                window.add(reservation)
        return reservation

    def settle(self, reservation: R, actual: float) -> None:
        """Charge or refund *reservation* to *actual* (see the module's rules)."""
        delta = actual - reservation.actual
        if not delta:
            return
        reservation.actual = actual
        for window in self._windows:
            if window.holds(reservation):
                window.change(reservation, delta)
        interval = self.interval
        if interval is not None and (delta > 0 or self._gcra_owner is reservation):
            self.tat += delta * interval
            self._gcra_owner = reservation

    def withdraw(self, reservation: R) -> None:
        """Take back a reservation that will not start: removed from every window, and from
        the GCRA if no later start moved it. A withdrawn reservation must not be settled."""
        for window in self._windows:
            if window.holds(reservation):
                window.remove(reservation)
        if self.interval is not None and self._gcra_owner is reservation:
            self.tat -= reservation.actual * self.interval
            self._gcra_owner = None
        if self._windows and reservation.start >= self.latest:
            # The latest start still reserved is the newest entry of some window (one trimmed
            # from all of them is in the past, where it no longer matters).
            self.latest = max(
                (window.entries[-1].start for window in self._windows if window.entries),
                default=-math.inf,
            )
