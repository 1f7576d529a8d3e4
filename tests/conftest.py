"""Fixtures of the whole test suite: event-loop backends, Redis servers and clusters.

Helpers the tests share are modules of ``tests/helpers/``; what users need to test their own
code against Redis is public in :mod:`aiometer_redis.testing` (its pytest plugin, loaded here,
provides ``redis_server`` and ``redis_url``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from helpers.capabilities import require

from aiometer_redis.testing import RedisCluster3, RedisServer, find_redis_cli

pytest_plugins = ["aiometer_redis.testing.pytest_plugin"]

#: Every async test runs on each of these unless marked ``@pytest.mark.backends(...)``.
BACKENDS = ("asyncio", "trio")


@pytest.hookimpl(tryfirst=True)  # before pytest parametrizes anyio's own anyio_backend fixture
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``anyio_backend``: the one place that decides which event loops a test runs on.

    A module whose tests pick a client library per backend lists ``FLAVOURS``, pairs of
    (flavour, backend); its tests take a ``flavour`` argument and run once per pair. Otherwise
    ``@pytest.mark.backends("asyncio")`` (on a test or as ``pytestmark``) narrows
    :data:`BACKENDS`, e.g. for redis-py-only tests.
    """
    names = metafunc.fixturenames
    flavours = getattr(metafunc.module, "FLAVOURS", None)
    if flavours is not None and "flavour" in names:
        # Plain (flavour, backend) pairs are named by their flavour; pytest.param entries keep
        # their own id and marks.
        metafunc.parametrize(
            ("flavour", "anyio_backend"),
            [
                pair if hasattr(pair, "marks") else pytest.param(*pair, id=pair[0])
                for pair in flavours
            ],
        )
        return
    if "anyio_backend" in names:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("anyio_backend", marker.args if marker else BACKENDS)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, one per test module."""
    with RedisServer() as running:
        yield running


@pytest.fixture
async def raw(server: RedisServer, anyio_backend: str) -> AsyncIterator[Any]:
    """A plain client for poking at Redis from a test: redis-py on asyncio, coredis on trio."""
    if anyio_backend == "asyncio":
        import redis.asyncio

        client: Any = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        yield client
        await client.aclose()
    else:
        import coredis

        async with coredis.Redis.from_url(server.url, decode_responses=True) as other:
            yield other


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A limiter name no other test uses, so tests can share a server without flushing."""
    return f"{request.node.module.__name__}-{uuid.uuid4().hex[:8]}"


def _require_redis_cli() -> None:
    require(
        find_redis_cli() is not None,
        "redis-cli (for redis-cli --cluster create) is not next to redis-server nor on PATH",
        "complete (redis-server and redis-cli)",
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster3]:
    """A three-shard Redis Cluster on loopback, one per test module."""
    _require_redis_cli()
    with RedisCluster3() as running:
        yield running


@pytest.fixture
def replicated_cluster() -> Iterator[RedisCluster3]:
    """A three-shard cluster with one replica per primary, fresh for each test (they kill
    primaries)."""
    _require_redis_cli()
    with RedisCluster3(replicas=True, node_timeout_ms=1000) as running:
        yield running
