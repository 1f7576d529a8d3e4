"""A pure-Python model of the Redis limiter scripts in ``lua/``.

:class:`LimiterModel` keeps the same state as the Redis keys of one limiter (plus the
per-process mailboxes) in plain dicts and implements each script's contract as documented
in the scripts' headers and in the issue-13 contract (costs in integer micro-units,
sliding-log windows charged all-or-nothing, settle, cancel). It is written from that
contract, not from the Lua, so that the hypothesis tests in ``test_scripts_model.py``
compare two independent implementations. ``acquire`` and ``release`` take a batch (a list)
of items, as the scripts do. Replies have the shape the scripts return after
:func:`aiometer_redis._client.normalize_reply`.

Besides the Redis state, the model keeps its own log of every start it granted
(:attr:`LimiterModel.started`), which the tests use to check each window's bound.

Key TTLs are not modelled; they are checked by dedicated tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "HANDOFF_BATCH",
    "PURGE_BATCH",
    "UNIT",
    "LimiterModel",
    "Limits",
    "Start",
    "Window",
    "parse_item",
    "process_of",
    "window_spec",
]

#: At most this many expired leases (and, separately, dead waiters, and ended rate-only
#: memories) go per call.
PURGE_BATCH = 100
#: At most this many queue heads are granted per handoff.
HANDOFF_BATCH = 100
#: Costs and limits travel as integer micro-units: a cost of 1 is this many units.
UNIT = 1_000_000


@dataclass(frozen=True)
class Window:
    """One Rate as the scripts see it: ``limit`` units started per ``per_us``.

    A calls-window (``calls=True``) charges every start :data:`UNIT`, whatever its cost,
    and settle never changes it.
    """

    limit: int
    per_us: int
    calls: bool = False

    def charge(self, cost: int) -> int:
        """What a start of *cost* units counts in this window."""
        return UNIT if self.calls else cost


def window_spec(windows: tuple[Window, ...]) -> str:
    """ARGV[8]: ``''`` or ``'<limit units>,<per_us>,<k>;...'`` in the order of the logs."""
    return ";".join(f"{w.limit},{w.per_us},{int(w.calls)}" for w in windows)


@dataclass
class Start:
    """One start the model granted (its own record, not Redis state)."""

    start: int
    #: Reservation order: later reservations have larger numbers.
    order: int
    #: Cost units as last settled (the estimate until then).
    cost: int
    #: Units the window bound may be exceeded by because of this call: every increase
    #: it settled (a settle down then up again counts the way up: starts admitted in
    #: between saw the lower cost).
    overspend: int = 0


#: A sweep of grants runs in a call whose numbers of seq cross a multiple of this.
SWEEP_EVERY = 128


def process_of(waiter_id: str) -> str:
    """Return the process part of a waiter id ``"<process>:<n>"`` (the mailbox suffix)."""
    process, sep, _ = waiter_id.partition(":")
    return process if sep else waiter_id


def one_liveness(process: str) -> bool:
    """Whether *process* keeps one liveness entry for all its queued waiters (its id ends
    in "." before any final "!"), instead of one per waiter."""
    return process.removesuffix("!").endswith(".")


def _split_max_delay(item: str) -> tuple[str, int | None]:
    """``"<id>/<max delay us>"`` as (id, max delay); a plain id has no max delay."""
    waiter_id, slash, max_delay = item.rpartition("/")
    if slash and max_delay.isdigit():
        return waiter_id, int(max_delay)
    return item, None


def parse_item(item: str) -> tuple[str, int | None, int]:
    """A waiter item ``"[+|^]<id>[/<max delay us>][*<cost units>]"`` as (id, max delay,
    cost). The "+" (the first ask for the id) changes nothing the model keeps: it only spares
    the script a lookup whose answer is known. "^" is a "+" that may queue the items first
    (see :meth:`LimiterModel.swap`)."""
    item = item.removeprefix("+").removeprefix("^")
    rest, star, cost = item.rpartition("*")
    if star and cost.isdigit():
        waiter_id, max_delay = _split_max_delay(rest)
        return waiter_id, max_delay, int(cost)
    waiter_id, max_delay = _split_max_delay(item)
    return waiter_id, max_delay, UNIT


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
    windows: tuple[Window, ...] = ()


@dataclass
class LimiterModel:
    """State of one limiter and the semantics of acquire/release/renew/cancel/settle/status."""

    holders: dict[str, int] = field(default_factory=dict)
    queue: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, int] = field(default_factory=dict)
    tat: float | None = None
    seq: int = 0
    #: Lease (or remembered rate-only) id -> (token, start µs, cost units).
    grants: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: Rate-only waiter id -> end of its memory (µs); its grant is in ``grants``.
    recent: dict[str, int] = field(default_factory=dict)
    #: Rate starts given back: waiter id -> start (µs).
    spare: dict[str, int] = field(default_factory=dict)
    mailboxes: dict[str, list[str]] = field(default_factory=dict)
    #: Process (an id ending in "!") -> the messages published on its channel, in order: one
    #: per handoff that granted its waiters, their grants joined by ",".
    published: dict[str, list[str]] = field(default_factory=dict)
    #: The processes (ids ending in "!") whose channel has a subscriber; None: all of them. A
    #: PUBLISH that reaches nobody goes to the process's mailbox list instead.
    subscribed: frozenset[str] | None = None
    #: One log per window, by (per_us, calls): id -> start (µs), ended entries included
    #: until a call that loads the windows trims them.
    logs: dict[tuple[int, bool], dict[str, int]] = field(default_factory=dict)
    #: ``costs`` hash, id fields only: cost units (when not one unit) of a window entry
    #: (as last settled) or of a queued waiter.
    costs: dict[str, int] = field(default_factory=dict)
    #: ``costs`` field ``last``: (id, TAT text, TAT text before) of the reservation (or
    #: its settle) that last moved the TAT.
    last: tuple[str, str, str] | None = None
    #: The model's own record of every start it granted and that was not withdrawn.
    started: dict[str, Start] = field(default_factory=dict)
    reservations: int = 0
    #: ``control`` field ``paused_until`` (µs; 0: never paused): no start before it.
    paused_until: int = 0
    #: ``control`` fields ``live:<process>``: the liveness expiry last written for a
    #: process that keeps one liveness entry (written by the calls it makes).
    live: dict[str, int] = field(default_factory=dict)
    #: The process of the call being run, when it keeps one liveness entry, and the
    #: expiry this call wrote for it (recorded in ``live`` when the call ends).
    _caller: str | None = None
    _caller_live: int | None = None
    #: How many processes' liveness ended in purges (their waiters left the queue).
    dead_processes: int = 0
    #: ``control`` field ``grants_scan``: the sweep's cursor (None: absent); while it is
    #: present, releases leave their grants entries to the sweep.
    grants_scan: int | None = None
    #: How many grants entries sweeps deleted.
    swept: int = 0
    #: ``control`` field ``epoch``: what a fencing token adds to its number of seq (None:
    #: absent; the first grant chooses it).
    epoch: int | None = None

    # -- building blocks -------------------------------------------------------------

    @staticmethod
    def _due(entries: dict[str, int], now: int) -> list[str]:
        due = sorted(((m, s) for m, s in entries.items() if s <= now), key=_member_order)
        return [member for member, _ in due[:PURGE_BATCH]]

    def _purge(self, now: int) -> None:
        for lease_id in self._due(self.holders, now):
            del self.holders[lease_id]
            self.grants.pop(lease_id, None)
        dead: set[str] = set()
        for member in self._due(self.waiters, now):
            del self.waiters[member]
            if ":" not in member:
                dead.add(member)  # a process's liveness: all its queued waiters go
                continue
            self.queue.pop(member, None)
            self.costs.pop(member, None)
        for waiter_id in [w for w in self.queue if process_of(w) in dead]:
            del self.queue[waiter_id]
            self.costs.pop(waiter_id, None)
        for process in dead:
            self.live.pop(process, None)
        self.dead_processes += len(dead)

    def _release_ids(self, lease_ids: list[str], limits: Limits) -> int:
        """The ids leave holders (and grants, unless the sweep is on): how many were held."""
        released = 0
        for lease_id in lease_ids:
            released += self.holders.pop(lease_id, None) is not None
            if limits.max_at_once == 0 or self.grants_scan is None:
                self.grants.pop(lease_id, None)
        return released

    def _sweep(self, seq_before: int) -> None:
        """The sweep of a call whose numbers crossed a multiple of :data:`SWEEP_EVERY`: every
        grants entry neither held nor remembered (rate only) goes (a small hash is read
        whole), and the cursor is back at 0."""
        if self.seq == seq_before or seq_before // SWEEP_EVERY == self.seq // SWEEP_EVERY:
            return
        for waiter_id in [w for w in self.grants if w not in self.holders and w not in self.recent]:
            del self.grants[waiter_id]
            self.swept += 1
        self.grants_scan = 0

    def _begin(self, first_id: str | None) -> None:
        """A call of the process of *first_id* begins."""
        process = None if first_id is None else process_of(first_id)
        self._caller = process if process is not None and one_liveness(process) else None
        self._caller_live = None

    def _end(self) -> None:
        if self._caller is not None and self._caller_live is not None:
            self.live[self._caller] = self._caller_live
        self._caller = self._caller_live = None

    def _keep_alive(self, now: int, process: str, limits: Limits, always: bool = False) -> None:
        """The liveness entry of *process* for a waiter queued or renewed: written when
        *always*, or when the caller's record of it is absent or less than 3/4 of the lease
        TTL ahead; another process's is always written, and not recorded."""
        ttl = limits.lease_ttl_us
        if process == self._caller:
            known = self._caller_live if self._caller_live is not None else self.live.get(process)
            if self._caller_live == now + ttl:
                return  # written by this call already
            if not always and known is not None and known >= now + ttl * 3 / 4:
                return
            self._caller_live = now + ttl
        self.waiters[process] = now + ttl

    def _mark_alive(self, now: int, waiter_id: str, limits: Limits, always: bool = False) -> None:
        """What queueing *waiter_id* writes for its liveness (*always*: its item was not
        marked '^', so its process may have had nothing queued at its last renewal)."""
        process = process_of(waiter_id)
        if one_liveness(process):
            self._keep_alive(now, process, limits, always)
        else:
            self.waiters[waiter_id] = now + limits.lease_ttl_us

    def _forget_ended(self, now: int) -> None:
        for waiter_id in self._due(self.recent, now):
            del self.recent[waiter_id]
            self.grants.pop(waiter_id, None)

    def _next_seq(self, now: int) -> int:
        """The next number of seq; the call that creates seq takes *now* as the epoch."""
        if self.seq == 0:
            self.epoch = now
        self.seq += 1
        return self.seq

    def _next_token(self, now: int) -> int:
        """The next number of seq as a fencing token: the epoch plus the number. Without an
        epoch (control lost while seq lived on) the first token is ``now + 1``."""
        number = self._next_seq(now)
        if self.epoch is None:
            self.epoch = max(0, now - (number - 1))
        return self.epoch + number

    def _tat_text(self) -> str:
        return "" if self.tat is None else f"{self.tat:.3f}"

    def _set_tat(self, value: float) -> None:
        self.tat = float(f"{value:.3f}")

    def _is_last(self, waiter_id: str) -> bool:
        """Whether *waiter_id*'s reservation (or settle) is the last that moved the TAT."""
        return self.last is not None and self.last[:2] == (waiter_id, self._tat_text())

    def log(self, window: Window) -> dict[str, int]:
        """The log of *window*: id -> start."""
        return self.logs.setdefault((window.per_us, window.calls), {})

    def _cost_of(self, waiter_id: str) -> int:
        return self.costs.get(waiter_id, UNIT)

    def _load_windows(self, now: int, limits: Limits) -> int:
        """Trim what ended from every window log (at most :data:`PURGE_BATCH` each; an
        entry leaving the longest window ends its cost record); return the latest start."""
        longest = max(range(len(limits.windows)), key=lambda j: (limits.windows[j].per_us, j))
        for j, window in enumerate(limits.windows):
            log = self.log(window)
            for member in self._due(log, now - window.per_us):
                del log[member]
                if j == longest:
                    self.costs.pop(member, None)
        return max(self.log(limits.windows[0]).values(), default=0)

    def window_start(self, t0: int, cost: int, window: Window) -> int:
        """The earliest start >= t0 at which *window* admits *cost* more units: the walk of
        the contract (drop the oldest live entries until the rest plus the cost fit)."""
        live = sorted(
            ((m, s) for m, s in self.log(window).items() if s > t0 - window.per_us),
            key=_member_order,
        )
        total = sum(window.charge(self._cost_of(m)) for m, _ in live)
        need = window.charge(cost)
        start = t0
        for member, entry_start in live:
            if total + need <= window.limit:
                break
            total -= window.charge(self._cost_of(member))
            start = max(start, entry_start + window.per_us)
        return start

    def _reserve_spare_or_gcra(self, now: int, limits: Limits, max_delay: int | None) -> int | None:
        """One unit, no windows (as before costs): a start given back and still ahead, else
        the next GCRA slot. Leaves ``last`` alone."""
        not_before = max(now, self.paused_until)
        ahead = [(m, s) for m, s in self.spare.items() if s >= not_before]
        if ahead:
            member, start = min(ahead, key=_member_order)
            delay = math.ceil(start - now)
            if max_delay is not None and delay > max_delay:
                return None
            del self.spare[member]
            return delay
        interval = float(limits.interval_us)
        arrival = max(self.tat if self.tat is not None else 0.0, float(now))
        # In a pause the start is its end, and the GCRA counts the start from there.
        first = max(arrival - (limits.burst - 1) * interval, float(not_before))
        delay = math.ceil(first - now)
        if max_delay is not None and delay > max_delay:
            return None
        self._set_tat(max(arrival, first) + interval)
        return delay

    def _reserve(
        self, waiter_id: str, now: int, limits: Limits, max_delay: int | None, cost: int
    ) -> int | None:
        """The next rate start's delay (µs), reserved and charged to every window and the
        GCRA; None (nothing reserved) if it would exceed *max_delay*."""
        if cost == UNIT and not limits.windows:
            return self._reserve_spare_or_gcra(now, limits, max_delay)
        # Never before the latest start reserved (first come, first served), each window's
        # walk, and the GCRA with cost c: allowed once TAT - (burst - c) * interval.
        window_t = max(now, self.paused_until)
        if limits.windows:
            window_t = max(window_t, self._load_windows(now, limits))
            t0 = window_t
            for window in limits.windows:
                window_t = max(window_t, self.window_start(t0, cost, window))
        t = float(window_t)
        interval = float(limits.interval_us)
        arrival = 0.0
        units = cost / UNIT
        if interval > 0:
            arrival = max(self.tat if self.tat is not None else 0.0, float(now))
            t = max(t, arrival - (limits.burst - units) * interval)
        delay = math.ceil(max(0.0, t - now))
        if max_delay is not None and delay > max_delay:
            return None
        if interval > 0:
            before = f"{self.tat if self.tat is not None else 0.0:.3f}"
            self._set_tat(max(arrival, float(window_t)) + units * interval)
            self.last = (waiter_id, self._tat_text(), before)
        if limits.windows:
            for window in limits.windows:
                self.log(window)[waiter_id] = now + delay
            if cost != UNIT:
                self.costs[waiter_id] = cost
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
        self._set_tat(self.tat - interval)
        while self.spare:
            member, start = max(self.spare.items(), key=_member_order)
            if not is_latest(start):
                break
            del self.spare[member]
            self._set_tat(self.tat - interval)

    def _withdraw(
        self, waiter_id: str, start_at: int | None, cost: int, now: int, limits: Limits
    ) -> None:
        """Withdraw the reservation of *waiter_id* (*start_at*: its grant's start, None if
        the grant is gone): out of every window log, and the TAT back to what it was before
        if that reservation was the last to move it. One unit without windows goes through
        the given-back starts, as before costs."""
        if cost == UNIT and not limits.windows:
            if start_at is not None:
                self._give_back(waiter_id, start_at, now, limits)
        else:
            if limits.windows:
                self._load_windows(now, limits)
                for window in limits.windows:
                    self.log(window).pop(waiter_id, None)
            if start_at is not None and limits.interval_us > 0 and self._is_last(waiter_id):
                assert self.last is not None
                before = float(self.last[2])
                self.tat = before if before > 0 else None
                self.last = None
        self.costs.pop(waiter_id, None)
        self.started.pop(waiter_id, None)

    def _grant(
        self,
        waiter_id: str,
        now: int,
        limits: Limits,
        max_delay: int | None = None,
        cost: int = UNIT,
    ) -> tuple[int, int] | None:
        """Turn ``waiter_id`` into a holder; return (fencing token, start delay in µs), or
        None (nothing changed) if its rate start would be more than *max_delay* away."""
        delay = 0
        if limits.interval_us > 0 or limits.windows:
            reserved = self._reserve(waiter_id, now, limits, max_delay, cost)
            if reserved is None:
                return None
            delay = reserved
        elif self.paused_until > now:
            # A pause without a rate limit: the grant waits for its end.
            delay = self.paused_until - now
            if max_delay is not None and delay > max_delay:
                return None
        self.queue.pop(waiter_id, None)
        self.waiters.pop(waiter_id, None)
        token = self._next_token(now)
        start_at = now + delay
        self.reservations += 1
        self.started[waiter_id] = Start(start_at, self.reservations, cost)
        if limits.max_at_once > 0:
            self.holders[waiter_id] = start_at + limits.lease_ttl_us
            self.grants[waiter_id] = (token, start_at, cost)
            if not limits.windows:
                # A queued waiter's cost record: in its grants entry from now on.
                self.costs.pop(waiter_id, None)
        return token, delay

    def _queue_order(self) -> list[str]:
        return [m for m, _ in sorted(self.queue.items(), key=_member_order)]

    def _handoff(
        self, now: int, limits: Limits, own: str | None = None, kept: list[str] | None = None
    ) -> int:
        """Grants queue heads the free slots; a grant to process *own* goes to *kept*
        instead of its mailbox, and those to a process whose id ends in "!" are published
        on its channel (one message per process) if someone listens there, else put in its
        mailbox too."""
        if limits.max_at_once <= 0:
            return 0
        granted = 0
        to_publish: dict[str, list[str]] = {}
        while (
            granted < min(limits.max_at_once, HANDOFF_BATCH)
            and len(self.holders) < limits.max_at_once
            and self.queue
        ):
            head = self._queue_order()[0]
            granted_now = self._grant(head, now, limits, None, self._cost_of(head))
            assert granted_now is not None
            token, delay = granted_now
            message = f"{head}|{token}|{delay}"
            process = process_of(head)
            if kept is not None and process == own:
                kept.append(message)
            elif process.endswith("!") and (self.subscribed is None or process in self.subscribed):
                to_publish.setdefault(process, []).append(message)
            else:
                self.mailboxes.setdefault(process, []).append(message)
            granted += 1
        for process, messages in to_publish.items():
            self.published.setdefault(process, []).append(",".join(messages))
        return granted

    # -- the scripts -----------------------------------------------------------------

    def pause(self, now: int, us: int) -> None:
        """control.lua 'pause': extends the pause to now + us, never shortens it."""
        self.paused_until = max(self.paused_until, now + us)

    def _acquire_rate_only(
        self, now: int, waiter_id: str, limits: Limits, max_delay: int | None, cost: int
    ) -> list[int]:
        ends = self.recent.get(waiter_id)
        stored = self.grants.get(waiter_id)
        if ends is not None and ends > now and stored is not None:
            # A retry: the remembered grant, nothing reserved.
            token, start_at, _ = stored
            return [1, token, max(0, start_at - now)]
        granted = self._grant(waiter_id, now, limits, max_delay, cost)
        if granted is None:
            return [2, 0]
        token, delay = granted
        self.recent[waiter_id] = now + limits.lease_ttl_us
        self.grants[waiter_id] = (token, now + delay, cost)
        return [1, token, delay]

    def _acquire_one(
        self,
        now: int,
        waiter_id: str,
        limits: Limits,
        max_delay: int | None,
        cost: int,
        marked: bool = False,
    ) -> list[int]:
        if waiter_id in self.holders:
            if waiter_id not in self.grants:
                return [1, 0, 0]
            token, start_at, _ = self.grants[waiter_id]
            return [1, token, max(0, start_at - now)]
        order = self._queue_order()
        queued = waiter_id in self.queue
        ahead = order.index(waiter_id) if queued else len(order)
        if len(self.holders) + ahead < limits.max_at_once:
            granted = self._grant(waiter_id, now, limits, max_delay, cost)
            return [2, 0] if granted is None else [1, *granted]
        if not queued:
            self.queue[waiter_id] = self._next_seq(now)
        if cost != UNIT:
            self.costs[waiter_id] = cost
        self._mark_alive(now, waiter_id, limits, always=not marked)
        return [0, ahead]

    def acquire(
        self,
        now: int,
        items: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        windows: tuple[Window, ...] = (),
    ) -> list[list[int]]:
        """Model of acquire.lua: per item, ``[1, token, delay_us]``, ``[0, ahead]`` or
        ``[2, 0]`` (refused: an item with a max delay whose rate start would be further
        away than that).

        An item is ``"<id>[/<max delay us>][*<cost units>]"`` (no cost: :data:`UNIT`).
        One purge, then each item in turn as if acquired alone. A rate start is the
        latest of: now, the latest start reserved (with windows), each window's walk and
        the GCRA with cost; it is charged to every window and the GCRA, or (refused) to
        none. Rate only (``max_at_once == 0``) keeps no leases but remembers each grant
        for ``lease_ttl_us``: ended memories are forgotten first (at most
        :data:`PURGE_BATCH`), then an id remembered (memory ending after ``now``, grant
        still stored) gets its grant again with the delay left, and any other id is
        granted the next token and rate slot and remembered.
        """
        if not items:
            raise ValueError("acquire takes at least one waiter id")
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us, windows)
        split = [parse_item(item) for item in items]
        if max_at_once == 0:
            self._forget_ended(now)
            return [self._acquire_rate_only(now, i, limits, m, c) for i, m, c in split]
        seq_before = self.seq
        self._begin(split[0][0])
        self._purge(now)
        entries = [
            self._acquire_one(now, i, limits, m, c, item.startswith("^"))
            for (i, m, c), item in zip(split, items, strict=True)
        ]
        self._end()
        self._sweep(seq_before)
        return entries

    def swap(
        self,
        now: int,
        lease_ids: list[str],
        items: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        windows: tuple[Window, ...] = (),
    ) -> tuple[int, list[str], list[list[int]]]:
        """Model of acquire.lua with release items: ``(released, own grants, entries)``.

        The ids leave holders and grants first (as :meth:`release`); then, rate only, the
        items as :meth:`acquire`; else one purge, one handoff whose grants to the caller's
        process (that of the first lease id) are returned instead of posted, and each item
        in turn.
        """
        if not lease_ids:
            raise ValueError("a swap takes at least one lease id")
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us, windows)
        seq_before = self.seq
        released = self._release_ids(lease_ids, limits)
        split = [parse_item(item) for item in items]
        if max_at_once == 0:
            self._forget_ended(now)
            entries = [self._acquire_rate_only(now, i, limits, m, c) for i, m, c in split]
            return released, [], entries
        self._begin(lease_ids[0])
        self._purge(now)
        kept: list[str] = []
        ids = [i for i, _, _ in split]
        queue_first = (
            released == len(lease_ids)
            and all(item.startswith("^") for item in items)
            and all(m is None and c == UNIT for _, m, c in split)
            and len(set(ids)) == len(ids)
            and all(process_of(i) == process_of(lease_ids[0]) for i in ids)
            and len(self.holders) < max_at_once
        )
        if not queue_first:
            self._handoff(now, limits, process_of(lease_ids[0]), kept)
            entries = [
                self._acquire_one(now, i, limits, m, c, item.startswith("^"))
                for (i, m, c), item in zip(split, items, strict=True)
            ]
            self._end()
            self._sweep(seq_before)
            return released, kept, entries
        # Queue first: the items take their tickets and liveness at the tail, then the
        # handoff reaches those within the free slots; their grants are their entries.
        for waiter_id in ids:
            self.queue[waiter_id] = self._next_seq(now)
            self._mark_alive(now, waiter_id, limits)
        self._end()
        self._handoff(now, limits, process_of(lease_ids[0]), kept)
        mine = {m.split("|")[0]: m for m in kept if m.split("|")[0] in set(ids)}
        kept = [m for m in kept if m.split("|")[0] not in mine]
        order = self._queue_order()
        answers: list[list[int]] = []
        for waiter_id in ids:
            if waiter_id in mine:
                _, token, delay = mine[waiter_id].split("|")
                answers.append([1, int(token), int(delay)])
            else:
                answers.append([0, order.index(waiter_id) if mine else -1])
        self._sweep(seq_before)
        return released, kept, answers

    def release(
        self,
        now: int,
        lease_ids: list[str],
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        windows: tuple[Window, ...] = (),
    ) -> list[int]:
        """Model of release.lua: ``[released, granted]``.

        Every id leaves holders and grants (``released`` counts those that were held;
        window entries stay: a start is charged whether or not its task still runs),
        then one purge and one handoff.
        """
        if not lease_ids:
            raise ValueError("release takes at least one lease id")
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us, windows)
        seq_before = self.seq
        released = self._release_ids(lease_ids, limits)
        self._purge(now)
        granted = self._handoff(now, limits)
        self._sweep(seq_before)
        return [released, granted]

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
        windows: tuple[Window, ...] = (),
    ) -> list[object]:
        """Model of renew.lua: ``[lost_lease_ids, lost_waiter_ids, granted]``."""
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us, windows)
        self._begin(next(iter([*lease_ids, *waiter_ids]), None))
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
        kept: set[str] = set()
        for waiter_id in waiter_ids:
            process = process_of(waiter_id)
            if one_liveness(process):
                # One liveness for the process: written once per call that finds one of
                # its waiters queued.
                if waiter_id in self.queue:
                    if process not in kept:
                        kept.add(process)
                        self._keep_alive(now, process, limits, always=True)
                elif waiter_id not in self.holders:
                    lost_waiters.append(waiter_id)
            elif waiter_id in self.waiters:
                self.waiters[waiter_id] = now + lease_ttl_us
            elif waiter_id not in self.holders:
                lost_waiters.append(waiter_id)
        self._end()
        self._purge(now)
        seq_before = self.seq
        granted = self._handoff(now, limits)
        self._sweep(seq_before)
        return [lost_leases, lost_waiters, granted]

    def cancel(
        self,
        now: int,
        waiter_id: str,
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        windows: tuple[Window, ...] = (),
    ) -> list[int]:
        """Model of cancel.lua: ``[was_granted, granted]``.

        The waiter leaves the queue; its reservation is withdrawn (see :meth:`_withdraw`):
        out of every window log and ``costs``, and the TAT rolled back if it was the last
        to move it (a reservation whose grant is gone still leaves the window logs).
        """
        limits = Limits(max_at_once, interval_us, burst, lease_ttl_us, windows)
        self.queue.pop(waiter_id, None)
        self.waiters.pop(waiter_id, None)
        was_granted = int(self.holders.pop(waiter_id, None) is not None)
        stored = self.grants.pop(waiter_id, None)
        if max_at_once > 0 and not was_granted:
            stored = None  # the entry of a lease released already, left to the sweep
        if stored is None:
            self._withdraw(waiter_id, None, UNIT, now, limits)
        else:
            self.recent.pop(waiter_id, None)
            self._withdraw(waiter_id, stored[1], stored[2], now, limits)
        if max_at_once == 0:
            return [0, 0]
        self._purge(now)
        seq_before = self.seq
        granted = self._handoff(now, limits)
        self._sweep(seq_before)
        return [was_granted, granted]

    def settle(
        self,
        now: int,
        waiter_id: str,
        actual: int,
        previous: int,
        *,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        windows: tuple[Window, ...] = (),
    ) -> int:
        """Model of settle.lua: 1 if a window log held the reservation or the TAT changed,
        else 0.

        d = actual - (the cost as last settled: the logs' record if a log holds the entry,
        else the grants entry's while it is kept, else *previous*, the caller's); the grants
        entry then records *actual*. Every counts-cost window holding the entry (ended or
        not: settle does not trim) changes it by d. GCRA: d > 0 is debt (TAT + d
        intervals); d < 0 is refunded only while this reservation (or its settle) is the
        last that moved the TAT.
        """
        held = [w for w in windows if waiter_id in self.log(w)]
        stored = self.grants.get(waiter_id)
        if held:
            previous = self._cost_of(waiter_id)
        elif stored is not None:
            previous = stored[2]
        diff = actual - previous
        if diff != 0 and stored is not None:
            self.grants[waiter_id] = (stored[0], stored[1], actual)
        if diff != 0 and held:
            if actual == UNIT:
                self.costs.pop(waiter_id, None)
            else:
                self.costs[waiter_id] = actual
        applied = False
        if diff != 0 and interval_us > 0 and self.tat:
            is_last = self._is_last(waiter_id)
            if diff > 0 or is_last:
                self._set_tat(self.tat + diff / UNIT * float(interval_us))
                applied = True
                if is_last:
                    assert self.last is not None
                    self.last = (waiter_id, self._tat_text(), self.last[2])
        record = self.started.get(waiter_id)
        if record is not None and diff != 0:
            # What the work spent, whether or not a window still counts it.
            record.overspend += max(0, diff)
            record.cost = actual
        return int(bool(held) or applied)

    def status(self, now: int) -> list[object]:
        """Model of status.lua: ``[now, holders_flat, queue_flat, tat, seq, spare]``."""

        def flat(entries: dict[str, int]) -> list[str]:
            out: list[str] = []
            for member, score in sorted(entries.items(), key=_member_order):
                out += [member, str(score)]
            return out

        ahead = [s for s in self.spare.values() if s >= now]
        spare = str(min(ahead)) if ahead else ""
        return [now, flat(self.holders), flat(self.queue), self._tat_text(), str(self.seq), spare]

    # -- what the tests check --------------------------------------------------------

    def grant_texts(self) -> dict[str, str]:
        """The ``grants`` hash as stored: ``"<token>|<start>"``, then ``"|<cost>"`` when the
        cost is not one unit."""
        return {
            lease: f"{token}|{start}" if cost == UNIT else f"{token}|{start}|{cost}"
            for lease, (token, start, cost) in self.grants.items()
        }

    def last_text(self) -> str | None:
        """The ``costs`` field ``last`` as stored."""
        return None if self.last is None else "|".join(self.last)

    def worst_window(self, window: Window) -> tuple[int, int]:
        """Over every window of length ``per`` anchored at a recorded start: the most units
        started in one, and the overspend allowed there; as (started, allowed overspend)
        of the window that exceeds ``limit + allowed`` by the most."""
        records = sorted(self.started.values(), key=lambda r: r.start)
        worst = (0, 0)
        for anchor in records:
            inside = [r for r in records if anchor.start <= r.start < anchor.start + window.per_us]
            used = sum(window.charge(r.cost) for r in inside)
            allowed = 0 if window.calls else sum(r.overspend for r in inside)
            if used - allowed > worst[0] - worst[1]:
                worst = (used, allowed)
        return worst
