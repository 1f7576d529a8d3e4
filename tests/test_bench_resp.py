"""The lean pipelining client behind bench/redis_cluster.py's server-bound rows, on a real server.

Its numbers are only worth something if it really runs the limiter's scripts: every call
granted, every lease given back, errors not swallowed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from aiometer_redis import RedisLimiter
from aiometer_redis._scripts import all_scripts
from aiometer_redis.testing import RedisServer
from bench._resp import Connection, LimiterCall, RespError, Shard, encode, run_pipelined

pytestmark = pytest.mark.redis


@pytest.fixture
def sync(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    for script in all_scripts().values():
        client.script_load(script.source)
    yield client
    client.close()


@pytest.fixture
def connection(server: RedisServer) -> Iterator[Connection]:
    opened = Connection("127.0.0.1", server.port)
    yield opened
    opened.close()


def test_replies_of_every_type(connection: Connection, name: str) -> None:
    commands: list[list[str | bytes | int]] = [
        ["SET", name, "v\r\nx"],  # a CRLF inside a bulk string
        ["GET", name],
        ["GET", name + "-missing"],
        ["RPUSH", name + "-list", "a", "b"],
        ["LRANGE", name + "-list", 0, -1],
    ]
    connection.send(b"".join(encode(command) for command in commands))
    replies = [connection.read_reply() for _ in commands]
    assert replies == [b"OK", b"v\r\nx", None, 2, [b"a", b"b"]]


def test_error_reply_raises(connection: Connection, name: str) -> None:
    connection.send(encode(["LPUSH", name, "a"]) + encode(["GET", name]))
    assert connection.read_reply() == 1
    with pytest.raises(RespError, match="WRONGTYPE"):
        connection.read_reply()


def _call(limiter: RedisLimiter, script: str) -> bytes:
    return LimiterCall.of(limiter, script).prefix()


def test_pipelined_acquire_and_release_leave_nothing_held(
    server: RedisServer, sync: redis.Redis, connection: Connection, name: str
) -> None:
    limiter = RedisLimiter.from_url(server.url, name, max_at_once=1000)
    shard = Shard(connection, [_call(limiter, "acquire")], [_call(limiter, "release")])
    done = run_pipelined([shard], 16, time.time() + 0.2)
    assert done > 0
    assert done % 16 == 0
    holders, *_ = limiter.keys
    assert sync.zcard(holders) == 0
    # Every acquisition took a fencing token, the uncounted last batch's too.
    assert int(sync.get(limiter.keys[4]) or 0) >= done + 16


def test_pipelined_acquire_refused_raises(
    server: RedisServer, sync: redis.Redis, connection: Connection, name: str
) -> None:
    # A limit of 3 without releases: the fourth acquisition of the first batch must wait.
    limiter = RedisLimiter.from_url(server.url, name, max_at_once=3)
    shard = Shard(connection, [_call(limiter, "acquire")], [])
    with pytest.raises(RespError, match="not granted"):
        run_pipelined([shard], 4, 0.0)
