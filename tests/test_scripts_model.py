"""The Lua scripts against an independent pure-Python model, driven by hypothesis.

A rule-based state machine sends random calls to the scripts on fakeredis and to
:class:`helpers.redis_model.LimiterModel` with an injected clock, and checks that replies
and stored state agree after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fakeredis
from helpers.redis_model import LimiterModel, process_of
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aiometer_redis._client import ScriptArg, encode_args, normalize_reply
from aiometer_redis._keys import limiter_keys, mailbox_prefix
from aiometer_redis._scripts import Script, all_scripts, decode_acquire_reply, load_script

NOW = 1_700_000_000_000_000
SECOND = 1_000_000

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
      out[#out + 1] = redis.call('LRANGE', KEYS[i], 0, -1)
    end
    return out
    """,
)


PROCESSES = ("a1", "b2", "c3")
WAITER_IDS = [f"{process}:{n}" for process in PROCESSES for n in range(3)]
waiter_ids = st.sampled_from(WAITER_IDS)
# Some ids carry a max delay (a caller with acquire_timeout): '<id>/<max delay us>'.
acquire_ids = st.one_of(
    waiter_ids,
    st.builds("{}/{}".format, waiter_ids, st.sampled_from([0, 1, 50_000, 150_000, 400_000])),
)
# Mostly single ids, sometimes a batch of up to four (repeats included).
acquire_batches = st.one_of(
    st.lists(acquire_ids, min_size=1, max_size=1), st.lists(acquire_ids, min_size=1, max_size=4)
)
lease_ids = st.one_of(waiter_ids, st.just("zz:0"))
release_batches = st.one_of(
    st.lists(lease_ids, min_size=1, max_size=1), st.lists(lease_ids, min_size=1, max_size=4)
)


# The configuration a state machine draws, but for max_at_once.
intervals = st.one_of(
    st.just(0.0),
    st.floats(1_000, 100_000, allow_nan=False),
    st.sampled_from([1e6 / 3, 1e6 / 7, 12_345.6789]),
)
bursts = st.integers(1, 3)
lease_ttls = st.sampled_from([200_000, SECOND])


class ScriptsMatchModel(RuleBasedStateMachine):
    """Random operations on fakeredis and on :class:`LimiterModel` give equal results."""

    def __init__(self) -> None:
        super().__init__()
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        for script in all_scripts().values():
            self.redis.script_load(script.source)
        self.redis.script_load(SNAPSHOT.source)
        self.model = LimiterModel()
        self.now = NOW
        self.max_at_once = 1
        self.interval_us = 0.0
        self.burst = 1
        self.lease_ttl_us = SECOND
        # The last rate-only acquire: its ids, its now and its replies.
        self.last_rate_batch: tuple[list[str], int, list[list[int]]] | None = None

    def teardown(self) -> None:
        self.redis.close()

    def limits(self) -> dict[str, Any]:
        return {
            "max_at_once": self.max_at_once,
            "interval_us": self.interval_us,
            "burst": self.burst,
            "lease_ttl_us": self.lease_ttl_us,
        }

    def run(self, script: Script, args: Sequence[ScriptArg], keys: Sequence[str] = ()) -> Any:
        all_keys = [*limiter_keys("m"), *keys]
        argv = encode_args(args)
        return normalize_reply(self.redis.evalsha(script.sha1, len(all_keys), *all_keys, *argv))

    def call(self, name: str, *extra: ScriptArg) -> Any:
        header: list[ScriptArg] = [
            self.now,
            self.max_at_once,
            self.interval_us,
            self.burst,
            self.lease_ttl_us,
            60_000,
            mailbox_prefix("m"),
        ]
        reply = self.run(load_script(name), [*header, *extra])
        return decode_acquire_reply(reply) if name == "acquire" else reply

    @initialize(
        max_at_once=st.integers(0, 4),
        interval_us=intervals,
        burst=bursts,
        lease_ttl_us=lease_ttls,
    )
    def configure(
        self, max_at_once: int, interval_us: float, burst: int, lease_ttl_us: int
    ) -> None:
        self.max_at_once = max_at_once
        self.interval_us = interval_us
        self.burst = burst
        self.lease_ttl_us = lease_ttl_us

    @rule(dt=st.one_of(st.integers(0, 1_000), st.integers(0, 2 * SECOND)))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(pick=st.integers(0, 7), offset=st.sampled_from([-1, 0, 1]))
    def advance_to_a_deadline(self, pick: int, offset: int) -> None:
        # Land on (or next to) a lease or waiter expiry: the boundaries matter.
        deadlines = [
            *self.model.holders.values(),
            *self.model.waiters.values(),
            *self.model.recent.values(),
        ]
        later = sorted({d + offset for d in deadlines if d + offset > self.now})
        if later:
            self.now = later[pick % len(later)]

    @rule(batch=acquire_batches)
    def acquire(self, batch: list[str]) -> None:
        expected = self.model.acquire(self.now, batch, **self.limits())
        assert self.call("acquire", *batch) == expected
        if self.max_at_once == 0:
            self.last_rate_batch = (batch, self.now, expected)

    @precondition(lambda self: self.last_rate_batch is not None)
    @rule(dt=st.one_of(st.just(0), st.integers(0, 1_000), st.integers(0, 2 * SECOND)))
    def retry_last_rate_batch(self, dt: int) -> None:
        # The reply to the last rate-only call was lost: the same ids are sent again, at
        # the same or a later now.
        assert self.last_rate_batch is not None
        batch, sent_at, replies = self.last_rate_batch
        self.now += dt
        model = self.model
        ids = [item.partition("/")[0] for item in batch]
        known = all(model.recent.get(i, self.now) > self.now and i in model.grants for i in ids)
        remembered = known and all(reply[0] == 1 for reply in replies)
        tat_key, seq_key = limiter_keys("m")[3:5]
        before = (self.redis.get(tat_key), self.redis.get(seq_key))
        seq_before = model.seq
        expected = model.acquire(self.now, batch, **self.limits())
        reply = self.call("acquire", *batch)
        assert reply == expected
        if remembered:
            # The same grants, their delays shorter by the time gone by; nothing reserved.
            elapsed = self.now - sent_at
            assert reply == [[1, token, max(0, delay - elapsed)] for _, token, delay in replies]
            assert (self.redis.get(tat_key), self.redis.get(seq_key)) == before
        elif not known and all(entry[0] == 1 for entry in reply):
            # A memory ended (or its grant was deleted, or the id was refused before): that
            # id took a new token.
            assert model.seq > seq_before
        self.last_rate_batch = (batch, self.now, reply)

    @rule(batch=release_batches)
    def release(self, batch: list[str]) -> None:
        expected = self.model.release(self.now, batch, **self.limits())
        assert self.call("release", *batch) == expected

    @rule(process=st.sampled_from(PROCESSES), extra=st.lists(lease_ids, max_size=2))
    def release_held(self, process: str, extra: list[str]) -> None:
        # What a process batching its releases sends: several leases it holds at once.
        held = [i for i in self.model.holders if process_of(i) == process]
        if held or extra:
            self.release([*held, *extra])

    @rule(leases=st.lists(waiter_ids, max_size=4), waiters=st.lists(waiter_ids, max_size=4))
    def renew(self, leases: list[str], waiters: list[str]) -> None:
        expected = self.model.renew(self.now, leases, waiters, **self.limits())
        assert self.call("renew", len(leases), *leases, *waiters) == expected

    @rule(process=st.sampled_from(PROCESSES))
    def renew_process(self, process: str) -> None:
        # What a live process sends: every lease it holds and every waiter it has.
        leases = [i for i in self.model.holders if process_of(i) == process]
        waiters = [i for i in self.model.waiters if process_of(i) == process]
        self.renew(leases, waiters)

    @rule(pick=st.integers(0, 7), offset=st.sampled_from([-1, 0, 1]))
    def renew_at_lease_expiry(self, pick: int, offset: int) -> None:
        # The renewal that arrives right at (or next to) a lease's expiry.
        leases = sorted(self.model.holders.items(), key=lambda item: item[1])
        due = [(lease, expiry + offset) for lease, expiry in leases if expiry + offset >= self.now]
        if due:
            lease, self.now = due[pick % len(due)]
            self.renew_process(process_of(lease))

    @rule(waiter_id=waiter_ids)
    def cancel(self, waiter_id: str) -> None:
        expected = self.model.cancel(self.now, waiter_id, **self.limits())
        assert self.call("cancel", waiter_id) == expected

    @rule(process=st.sampled_from(PROCESSES))
    def drain_mailbox(self, process: str) -> None:
        popped = self.redis.lpop(mailbox_prefix("m") + process)
        expected = self.model.mailboxes.get(process, [])
        if popped is None:
            assert expected == []
        else:
            assert expected.pop(0) == normalize_reply(popped)

    @rule()
    def status(self) -> None:
        assert self.run(load_script("status"), [self.now]) == self.model.status(self.now)

    @invariant()
    def same_state(self) -> None:
        mailboxes = [mailbox_prefix("m") + process for process in PROCESSES]
        holders, queue, waiters, tat, seq, grants, recent, spare, *boxes = self.run(
            SNAPSHOT, [], mailboxes
        )
        model = self.model

        def pairs(flat: list[str]) -> dict[str, int]:
            return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

        assert pairs(holders) == model.holders
        assert pairs(queue) == model.queue
        assert pairs(waiters) == model.waiters
        assert pairs(recent) == model.recent
        assert pairs(spare) == model.spare
        assert tat == ("" if model.tat is None else f"{model.tat:.3f}")
        assert seq == str(model.seq)
        assert dict(zip(grants[::2], grants[1::2], strict=True)) == {
            lease: f"{token}|{start}" for lease, (token, start) in model.grants.items()
        }
        assert boxes == [model.mailboxes.get(process, []) for process in PROCESSES]
        # A mailbox only ever receives grants for its own process's waiters.
        for process, box in zip(PROCESSES, boxes, strict=True):
            assert all(process_of(message.split("|")[0]) == process for message in box)

    @invariant()
    def every_key_has_a_ttl(self) -> None:
        # Whatever the scripts wrote (or did not need to refresh) expires some day.
        for key in self.redis.keys("*"):
            assert self.redis.pttl(key) > 0, key

    @invariant()
    def concurrency_is_bounded(self) -> None:
        if self.max_at_once > 0:
            assert len(self.model.holders) <= self.max_at_once
        else:
            assert self.model.holders == {}

    @invariant()
    def only_rate_only_calls_remember(self) -> None:
        if self.max_at_once > 0:
            assert self.model.recent == {}
        assert set(self.model.recent).isdisjoint(self.model.holders)


ScriptsMatchModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scripts_match_model = ScriptsMatchModel.TestCase


class RateOnlyScriptsMatchModel(ScriptsMatchModel):
    """The same machine, always rate only: remembered grants, their retries and ends."""

    @initialize(
        max_at_once=st.just(0), interval_us=intervals, burst=bursts, lease_ttl_us=lease_ttls
    )
    def configure(
        self, max_at_once: int, interval_us: float, burst: int, lease_ttl_us: int
    ) -> None:
        ScriptsMatchModel.configure(self, max_at_once, interval_us, burst, lease_ttl_us)


RateOnlyScriptsMatchModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_rate_only_scripts_match_model = RateOnlyScriptsMatchModel.TestCase
