"""The exceptions raised by the Redis limiters: one base class, one class per failure."""

from __future__ import annotations

__all__ = [
    "AcquireTimeoutError",
    "ConfigurationError",
    "LeaseLostError",
    "RedisLimiterError",
    "RedisUnavailableError",
]


class RedisLimiterError(Exception):
    """Base class of every error raised by ``aiometer_redis``."""


class ConfigurationError(RedisLimiterError, ValueError):
    """A limiter was given options that cannot work: raised by its constructor, or by the
    first call that Redis answers by refusing the credentials (never retried).

    Also a :class:`ValueError`, so code that validates input generically catches it.
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
