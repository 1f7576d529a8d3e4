"""aiometer's limits across a fleet: every process sharing one Redis obeys one ``max_at_once``
and one ``max_per_second``.

The decisions are made by atomic Lua scripts on the Redis server's clock; held slots are
leases renewed in the background, so a crashed worker gives its slots back within
``lease_ttl``. See :class:`RedisLimiter`.
"""

from ._config import LimiterConfig
from ._exceptions import (
    AcquireTimeoutError,
    ConfigurationError,
    CorruptStateError,
    LeaseLostError,
    PoolExhaustedError,
    RedisLimiterError,
    RedisReplyError,
    RedisUnavailableError,
    WrongEventLoopError,
)
from ._group import RedisLimiterGroup
from ._limiter import RedisLimiter
from ._permit import RedisPermit
from ._state import Holder, RedisLimiterStatistics

__all__ = [
    "AcquireTimeoutError",
    "ConfigurationError",
    "CorruptStateError",
    "Holder",
    "LeaseLostError",
    "LimiterConfig",
    "PoolExhaustedError",
    "RedisLimiter",
    "RedisLimiterError",
    "RedisLimiterGroup",
    "RedisLimiterStatistics",
    "RedisPermit",
    "RedisReplyError",
    "RedisUnavailableError",
    "WrongEventLoopError",
]
