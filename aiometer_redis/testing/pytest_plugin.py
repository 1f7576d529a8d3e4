"""pytest fixtures that start a real ``redis-server`` for your tests.

Load them from a ``conftest.py``::

    pytest_plugins = ["aiometer_redis.testing.pytest_plugin"]

then::

    async def test_my_crawler(redis_url: str) -> None:
        async with RedisLimiter.from_url(redis_url, "crawler", max_at_once=2) as limiter:
            ...

The server listens on 127.0.0.1 only and is stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._resp import send_command
from ._server import RedisServer

__all__ = ["redis_server", "redis_url"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A :class:`~aiometer_redis.testing.RedisServer`, started once per test session."""
    with RedisServer() as running:
        yield running


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The ``redis://`` URL of the session's server, its data flushed before the test."""
    _flushall(redis_server.port)
    return redis_server.url


def _flushall(port: int) -> None:
    # Plain RESP over a socket: the fixture works whichever Redis client the user's code uses.
    reply = send_command(port, "FLUSHALL", timeout=5.0)
    if reply is None or not reply.startswith("+OK"):
        raise RuntimeError(f"FLUSHALL on 127.0.0.1:{port} answered {reply!r}")
