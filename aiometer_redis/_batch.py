"""Merging the script calls that the coroutines of one process make at the same time."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

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
    """

    def __init__(self, run: Callable[[list[str], float], Awaitable[list[Any]]]) -> None:
        self._run = run
        self._queue: list[_Entry] = []
        self._busy = False

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
        with anyio.CancelScope(shield=True):
            if self._busy:
                with anyio.move_on_at(deadline):
                    await entry.wake.wait()
                if not entry.wake.is_set():
                    if entry in self._queue:
                        self._queue.remove(entry)
                        raise TimeoutError("not sent before the deadline (calls queued before)")
                    # Sent in a call with an earlier deadline: its answer is due.
                    await entry.wake.wait()
                if entry.error is not None:
                    raise _own_copy(entry.error)
                if entry.reply is not _PENDING:
                    return entry.reply
            # Leading: either nobody was, or the previous leader handed over to us.
            self._busy = True
            try:
                while entry.reply is _PENDING and entry.error is None:
                    taken = 1
                    size = len(self._queue[0].items)
                    while taken < len(self._queue):
                        size += len(self._queue[taken].items)
                        if size > _MAX_BATCH:
                            break
                        taken += 1
                    batch = self._queue[:taken]
                    del self._queue[:taken]
                    try:
                        replies = await self._run(
                            [item for e in batch for item in e.items],
                            min(e.deadline for e in batch),
                        )
                        if len(replies) != sum(len(e.items) for e in batch):
                            raise ValueError("a reply for each item was expected")
                    except BaseException as exc:
                        for e in batch:
                            e.error = exc
                            e.wake.set()
                        raise
                    at = 0
                    for e in batch:
                        e.reply = replies[at : at + len(e.items)]
                        at += len(e.items)
                        e.wake.set()
            finally:
                self._busy = False
                if self._queue:
                    self._busy = True
                    self._queue[0].wake.set()
        return entry.reply


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
