"""A lean pipelining RESP2 client over blocking sockets, for the server-bound rows of
``bench/redis_cluster.py``.

redis-py spends several times more CPU on a command than redis-server does, so a few Python
processes on a small machine run out of CPU long before one server does, and a comparison of
one server against three shards then measures the clients. This client sends the limiter's own
script calls in pipelined batches and parses just enough of every reply to check and count it,
so that a couple of processes keep the servers busy instead.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiometer_redis import RedisLimiter
from aiometer_redis._client import encode_args
from aiometer_redis._scripts import decode_acquire_reply, load_script
from aiometer_redis.testing._resp import encode_command

_RECEIVE_BYTES = 1 << 16

Reply = bytes | int | list["Reply"] | None


# One command in the RESP2 wire format: the encoder the testing helpers use.
encode = encode_command


class RespError(Exception):
    """The server answered a command with an error reply."""


class Connection:
    """One blocking connection: send raw bytes, then read the replies one by one."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._position = 0

    def send(self, payload: bytes) -> None:
        self._socket.sendall(payload)

    def _fill(self) -> None:
        chunk = self._socket.recv(_RECEIVE_BYTES)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer = self._buffer[self._position :] + chunk
        self._position = 0

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._position)) < 0:
            self._fill()
        line = self._buffer[self._position : end]
        self._position = end + 2
        return line

    def read_reply(self) -> Reply:
        """Parse the next reply; raise :class:`RespError` for an error reply."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.read_reply() for _ in range(count)]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) - self._position < size + 2:
                self._fill()
            value = self._buffer[self._position : self._position + size]
            self._position += size + 2
            return value
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        raise RespError(f"unexpected reply type {line[:20]!r}")

    def close(self) -> None:
        self._socket.close()


@dataclass(frozen=True)
class LimiterCall:
    """The bytes of one limiter's script call, all but the trailing waiter or lease id."""

    sha1: str
    keys: Sequence[str]
    header: Sequence[str]

    @classmethod
    def of(cls, limiter: RedisLimiter, script: str) -> LimiterCall:
        """*script* (e.g. ``"acquire"``) with *limiter*'s keys and its private argument
        header, encoded as its client adapter does: the bytes the limiter itself sends."""
        return cls(load_script(script).sha1, limiter.keys, encode_args(limiter.script_header))

    def prefix(self) -> bytes:
        # The id comes last: count it in the array length, append it per call.
        args = ["EVALSHA", self.sha1, str(len(self.keys)), *self.keys, *self.header]
        return b"*%d\r\n" % (len(args) + 1) + encode(args).split(b"\r\n", 1)[1]


@dataclass
class Shard:
    """A connection and the limiters whose slot that server owns."""

    connection: Connection
    acquire: list[bytes]  # per limiter, from LimiterCall.prefix()
    release: list[bytes]  # empty: rate-only, nothing to give back


def _ids() -> Iterator[bytes]:
    stem = f"lean{os.getpid()}-{time.monotonic_ns()}:"
    for number in itertools.count():
        data = f"{stem}{number}".encode()
        yield b"$%d\r\n%s\r\n" % (len(data), data)


def _granted(reply: Reply) -> bool:
    # One id per call: one entry, [1, token, 0] when granted at once.
    if not isinstance(reply, bytes):
        return False
    (entry,) = decode_acquire_reply(reply.decode())
    return entry[0] == 1 and entry[-1] == 0


def run_pipelined(shards: Sequence[Shard], depth: int, until: float) -> int:
    """Acquire (and release) through every shard in batches of *depth*, until a batch ends
    after the wall-clock time *until*; return the acquisitions of the batches that ended
    by then (so ``until=0`` runs one uncounted batch: a warm-up).

    Each batch goes to every shard before any reply is read, so the shards work in parallel.
    An acquisition that was not granted at once raises: the limits are set never to wait.
    """
    ids = _ids()
    positions = [0] * len(shards)
    done = 0
    while True:
        for index, shard in enumerate(shards):
            payload = []
            for _ in range(depth):
                position = positions[index] % len(shard.acquire)
                positions[index] += 1
                waiter = next(ids)
                payload.append(shard.acquire[position] + waiter)
                if shard.release:
                    payload.append(shard.release[position] + waiter)
            shard.connection.send(b"".join(payload))
        for shard in shards:
            for _ in range(depth):
                reply = shard.connection.read_reply()
                if not _granted(reply):
                    raise RespError(f"an acquisition was not granted at once: {reply!r}")
                if shard.release:
                    shard.connection.read_reply()
        if time.time() > until:
            return done
        done += depth * len(shards)
