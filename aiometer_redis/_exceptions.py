"""The exceptions raised by the Redis limiters: one base class, one class per failure."""

from __future__ import annotations

__all__ = [
    "AcquireTimeoutError",
    "ConfigurationError",
    "CorruptStateError",
    "LeaseLostError",
    "PoolExhaustedError",
    "RedisLimiterError",
    "RedisReplyError",
    "RedisUnavailableError",
    "WrongEventLoopError",
]


class RedisLimiterError(Exception):
    """Base class of every error raised by ``aiometer_redis``."""


class ConfigurationError(RedisLimiterError, ValueError):
    """A limiter was given options that cannot work: raised by its constructor, or by the
    first call that Redis answers by refusing the credentials (never retried).

    Also a :class:`ValueError`, so code that validates input generically catches it.
    """


class WrongEventLoopError(RedisLimiterError, RuntimeError):
    """A limiter (or one of its permits) was used from an event loop other than the one it
    was entered in. Its client's connections and background tasks belong to that loop, so
    the call would hang; it is refused at once instead. Use one limiter object per event
    loop (they share the limits through Redis).
    """


class RedisUnavailableError(RedisLimiterError):
    """Redis did not answer within the limiter's ``retry_window``.

    Raised by ``acquire()`` (and so by the run functions): the limiter fails closed and never
    lets a task start without Redis's agreement. The client's own error is chained as
    ``__cause__``.
    """


class AcquireTimeoutError(RedisLimiterError, TimeoutError):
    """``acquire()`` waited longer than the limiter's ``acquire_timeout``.

    The waiter has been withdrawn from the queue; nothing is left held.
    """


class LeaseLostError(RedisLimiterError):
    """A held slot's lease expired before it was renewed (the process was paused or cut off
    from Redis for longer than ``lease_ttl``), so another process may have been given the slot.

    Raised when leaving ``async with limiter.slot():`` whose lease was lost; the run functions
    log it instead (logger ``aiometer_redis``) and count it in ``statistics()``. A lost lease is
    never re-acquired silently.
    """


class RedisReplyError(RedisLimiterError):
    """Redis answered one of a limiter's calls with an error reply that waiting will not
    cure, e.g. ``OOM`` (``maxmemory`` reached with ``noeviction``) or ``NOPERM`` (an ACL
    forbids a command the limiter needs).

    Raised by ``acquire()`` and ``statistics()``, naming the limiter and the cause; never
    retried. ``BUSY`` (a long script) and ``LOADING`` (a restart reading its data) are
    transient instead: they are retried within ``retry_window`` like a connection error.

    Attributes:
        code: the error code Redis gave (``"OOM"``, ``"WRONGTYPE"``, ``"NOPERM"``, ...), or
            ``"ERR"`` when it gave none the limiter knows.
    """

    def __init__(self, message: str, code: str = "ERR") -> None:
        super().__init__(message)
        self.code = code


class CorruptStateError(RedisReplyError):
    """A key of the limiter holds something no limiter wrote: a value of the wrong type
    (``WRONGTYPE``) or of the wrong form (found by ``statistics()``).

    Another program wrote to the limiter's keys; ``limiter.reset()`` (or
    ``aiometer-redis reset``) deletes them so that the limiter starts afresh.
    """


class PoolExhaustedError(RedisLimiterError):
    """The Redis client's connection pool had no free connection for one of the limiter's
    calls within ``retry_window``: Redis itself may be healthy, the client is too small.

    Each limiter object with waiting tasks keeps one connection in a blocking BLPOP, and every
    call in flight needs one more: give the client a ``max_connections`` above the number of
    limiter objects plus the calls you expect in flight at once (a few per limiter suffice:
    the calls of one process are merged), or use ``redis.asyncio.BlockingConnectionPool``,
    which waits for a connection instead of failing.
    """
