from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from aiometer_redis.testing import RedisServer


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, one per test module."""
    with RedisServer() as running:
        yield running


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A limiter name no other test uses, so tests can share a server without flushing."""
    return f"{request.node.module.__name__}-{uuid.uuid4().hex[:8]}"
