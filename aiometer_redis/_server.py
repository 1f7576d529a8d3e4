"""Former home of :mod:`aiometer_redis.testing`'s server helpers (kept for old imports)."""

from __future__ import annotations

from .testing._server import ENV_VAR, RedisServer, find_redis_server

__all__ = ["ENV_VAR", "RedisServer", "find_redis_server"]
