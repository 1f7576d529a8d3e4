"""Merging the script calls that the coroutines of one process make at the same time."""

from __future__ import annotations

import copy
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

__all__ = ["Batcher"]


class _Entry:
    __slots__ = ("deadline", "error", "items", "reply", "wake")

    def __init__(self, items: list[str], deadline: float) -> None:
        self.items = items
        self.deadline = deadline
        self.wake = anyio.Event()
        self.reply: list[Any] = _PENDING
        self.error: BaseException | None = None


_PENDING: Any = object()

# Ids per script call: large enough to carry a busy process's calls, small enough that one call
# stays short (the scripts handle thousands, the tests send 2500).
_MAX_BATCH = 256


class Batcher:
    """Merges the script calls that the coroutines of one process make at the same time.

    The first caller leads: it sends one call for every entry queued so far and, when the
    reply comes, hands each entry its part. Entries queued while that call was in flight go
    out together in the next call, sent by the oldest of them. Under load a call carries many
    acquisitions (or releases) for the price of one round trip, which is what keeps the client
    cost per acquisition near that of a PING; alone, a caller pays no delay.

    ``submit`` is shielded from cancellation: a call that has been sent is always answered
    and accounted for. Each entry has a deadline: a call is given the earliest deadline of
    the entries it carries, and an entry still queued when its deadline passes leaves the
    queue and raises ``TimeoutError`` (nothing was sent for it). So no caller waits past its
    own deadline, however many calls were queued before it.

    Items handed over with :meth:`post` (a release) are not waited for: they ride in front of
    the entries of the next call, whoever sends it, and :meth:`flush_loop` (a background task)
    sends them alone when no call takes them along within a few scheduler ticks. *run* gets
    the posted items first and returns replies for the submitted ones only; when a call that
    carried posted items fails, *lost* is told which (they may or may not have run).
    """

    def __init__(
        self,
        run: Callable[[list[str], float], Awaitable[list[Any]]],
        lost: Callable[[list[str], BaseException], None] | None = None,
    ) -> None:
        self._run = run
        self._lost = lost
        self._queue: list[_Entry] = []
        # The items of the queued entries, and the deadline of the call in flight (inf: none,
        # or between two calls).
        self._queued_items = 0
        self._in_flight_deadline = math.inf
        self._busy = False
        # Posted items not yet sent, with their deadlines; and how many are in a call in flight.
        self._posted: list[tuple[str, float]] = []
        self._posted_in_flight = 0
        # How many items were ever posted, and how many of them were in a call that ended
        # (answered or failed): they go out in the order posted (see flush).
        self._posted_count = 0
        self._posted_done = 0
        # Set when a posted item waits for the flusher; set (and replaced) when a call ends.
        self._flush_needed = anyio.Event()
        self._call_ended = anyio.Event()

    @property
    def pending(self) -> int:
        """Posted items not yet answered (queued or in a call in flight)."""
        return len(self._posted) + self._posted_in_flight

    def post(self, item: str, deadline: float) -> None:
        """Send *item* with the next call, without waiting for it (see the class docstring)."""
        self._posted.append((item, deadline))
        self._posted_count += 1
        self._flush_needed.set()

    async def submit(self, item: str, deadline: float) -> Any:
        """Send *item* in the next call, and return its part of the reply.

        Raises:
            TimeoutError: *deadline* passed while the item was still queued.
        """
        replies = await self.submit_many([item], deadline)
        return replies[0]

    async def submit_many(self, items: list[str], deadline: float) -> list[Any]:
        """Send *items* (not empty) together in the next call, in this order, and return
        their parts of the reply.

        Raises:
            TimeoutError: *deadline* passed while the items were still queued.
        """
        entry = _Entry(items, deadline)
        self._queue.append(entry)
        self._queued_items += len(items)
        if self._busy:
            # Shielded from the caller's cancellation, and ended by the deadline; but the
            # deadline needs no timer when the call in flight ends before it and the next
            # call takes this entry along (every entry queued fits in it), with a deadline
            # no later than this one's (the path of every caller but the leader, under load).
            own = deadline
            if deadline >= self._in_flight_deadline and self._queued_items <= _MAX_BATCH:
                own = math.inf
            with anyio.CancelScope(shield=True, deadline=own):
                await entry.wake.wait()
            if not entry.wake.is_set():
                if entry in self._queue:
                    self._queue.remove(entry)
                    self._queued_items -= len(items)
                    raise TimeoutError("not sent before the deadline (calls queued before)")
                # Sent in a call with an earlier deadline: its answer is due.
                with anyio.CancelScope(shield=True):
                    await entry.wake.wait()
            if entry.error is not None:
                raise _own_copy(entry.error)
            if entry.reply is not _PENDING:
                return entry.reply
        # Leading: either nobody was, or the previous leader handed over to us.
        with anyio.CancelScope(shield=True):
            await self._lead(entry)
        return entry.reply

    async def flush(self) -> None:
        """Send the items posted so far now (or with the call a leader sends next), and wait
        until the calls carrying them have ended; not for items posted later, nor for other
        calls (under steady load some call is always in flight). Shielded from cancellation;
        raises what a call it sent itself raised (after telling *lost*)."""
        target = self._posted_count
        with anyio.CancelScope(shield=True):
            while self._posted_done < target:
                if self._busy:
                    # The leader's next call takes them along (posted items go first).
                    await self._call_ended.wait()
                else:
                    await self._lead(None)

    async def flush_loop(self, ticks: int = 3) -> None:
        """Runs in the background: sends posted items that no call took along within *ticks*
        scheduler ticks. Failures were reported to *lost*; the loop goes on."""
        while True:
            await self._flush_needed.wait()
            self._flush_needed = anyio.Event()
            # Mostly a call took the items along by now (the poster's next acquisition): then
            # this is the only wake-up, and it costs no CPU while that call is on the wire. A
            # leader busy now sets the event again if its calls leave items behind.
            for _ in range(ticks):
                if not self._posted or self._busy:
                    break
                await anyio.lowlevel.checkpoint()
            if self._posted and not self._busy:
                try:
                    await self.flush()
                except Exception:
                    if self._lost is None:
                        raise

    async def _lead(self, entry: _Entry | None) -> None:
        """Send calls until *entry* is answered (None: one call for the posted items)."""
        if not self._busy:
            self._busy = True
        try:
            while True:
                # Whole entries, up to _MAX_BATCH items (an entry of more goes alone).
                taken = size = 0
                for queued in self._queue:
                    size += len(queued.items)
                    if taken and size > _MAX_BATCH:
                        break
                    taken += 1
                batch = self._queue[:taken]
                del self._queue[:taken]
                self._queued_items -= sum(len(e.items) for e in batch)
                posted = self._posted[:_MAX_BATCH]
                del self._posted[:_MAX_BATCH]
                deadlines = [e.deadline for e in batch] + [d for _, d in posted]
                items = [i for i, _ in posted] + [i for e in batch for i in e.items]
                self._posted_in_flight += len(posted)
                self._in_flight_deadline = min(deadlines)
                try:
                    replies = await self._run(items, self._in_flight_deadline)
                    if len(replies) != sum(len(e.items) for e in batch):
                        raise ValueError("a reply for each submitted item was expected")
                except BaseException as exc:
                    for e in batch:
                        e.error = exc
                        e.wake.set()
                    if posted and self._lost is not None:
                        self._lost([i for i, _ in posted], exc)
                    raise
                finally:
                    self._in_flight_deadline = math.inf
                    self._posted_in_flight -= len(posted)
                    self._posted_done += len(posted)
                    self._call_ended.set()
                    self._call_ended = anyio.Event()
                at = 0
                for e in batch:
                    e.reply = replies[at : at + len(e.items)]
                    at += len(e.items)
                    e.wake.set()
                if entry is None or entry.reply is not _PENDING or entry.error is not None:
                    break
        finally:
            if self._queue:
                self._queue[0].wake.set()  # hands over: still busy
            else:
                self._busy = False
                if self._posted:
                    self._flush_needed.set()


def _own_copy(error: BaseException) -> BaseException:
    """An exception of its own for one waiter of a failed call, chained from *error* (which
    the leader raises): raising one object in many coroutines would pile their tracebacks onto
    it, and an ExceptionGroup of those coroutines would hold the same object many times."""
    try:
        own = copy.copy(error)
    except Exception:  # an exception class whose constructor its args do not fit
        return error
    own.__traceback__ = None
    own.__cause__ = error
    own.__suppress_context__ = True
    return own
