"""Concurrency scheduling for asyncio and trio.

Run many async tasks while bounding how many run at once (``max_at_once``) and how many start
per second (``max_per_second``), and collect their results predictably. The limits can also
come from any :class:`Limiter`, such as ``aiometer_redis.RedisLimiter`` for limits that hold
across a fleet of processes.
"""

from ._adaptive import Adaptive
from ._limiters import (
    ConcurrencyLimiter,
    ConcurrencyStatistics,
    CostPermit,
    Limiter,
    Permit,
    RateLimiter,
    RateStatistics,
)
from ._rate import Rate
from ._run import amap, run_all, run_any, run_on_each

__version__ = "1.1.0.dev0"

__all__ = [
    "Adaptive",
    "ConcurrencyLimiter",
    "ConcurrencyStatistics",
    "CostPermit",
    "Limiter",
    "Permit",
    "Rate",
    "RateLimiter",
    "RateStatistics",
    "__version__",
    "amap",
    "run_all",
    "run_any",
    "run_on_each",
]
