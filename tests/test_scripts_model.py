"""The Lua scripts against an independent pure-Python model, driven by hypothesis.

A rule-based state machine sends random calls to the scripts on fakeredis and to
:class:`helpers.redis_model.LimiterModel` with an injected clock, and checks that replies
and stored state agree after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fakeredis
from helpers.redis_model import UNIT, LimiterModel, Window, process_of, window_spec
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aiometer_redis._client import ScriptArg, encode_args, normalize_reply
from aiometer_redis._keys import control_key, costs_key, limiter_keys, mailbox_prefix
from aiometer_redis._scripts import (
    Script,
    all_scripts,
    decode_acquire_reply,
    decode_swap_reply,
    load_script,
)

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


# "d4!" listens on its channel: its grants are published, never put in its mailbox list.
# Nobody listens on the channel of "e5.!": its grants go to its mailbox list.
# "c3." and "e5.!" keep one liveness entry for all their queued waiters.
PROCESSES = ("a1", "b2", "c3.", "d4!", "e5.!")
PUSHED = "d4!"
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
#: Pauses (control.lua): none, shorter than an interval, a few intervals, longer than a lease.
pauses = st.sampled_from([0, 1_000, 300_000, 2 * SECOND])
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


def _pairs(flat: list[str]) -> dict[str, int]:
    return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}


def assert_first_eight_match(
    model: LimiterModel,
    holders: list[str],
    queue: list[str],
    waiters: list[str],
    tat: str,
    seq: str,
    grants: list[str],
    recent: list[str],
    spare: list[str],
) -> None:
    """The eight keys of every limiter (SNAPSHOT's reply) hold what *model* says."""
    assert _pairs(holders) == model.holders
    assert _pairs(queue) == model.queue
    assert _pairs(waiters) == model.waiters
    assert _pairs(recent) == model.recent
    assert _pairs(spare) == model.spare
    # Stored as '%.3f' by SET, or as INCRBYFLOAT leaves it: the same number either way.
    assert ("" if tat == "" else f"{float(tat):.3f}") == (
        "" if model.tat is None else f"{model.tat:.3f}"
    )
    assert seq == str(model.seq)
    assert dict(zip(grants[::2], grants[1::2], strict=True)) == model.grant_texts()


class ScriptsMatchModel(RuleBasedStateMachine):
    """Random operations on fakeredis and on :class:`LimiterModel` give equal results."""

    def __init__(self) -> None:
        super().__init__()
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        pubsub: Any = self.redis.pubsub  # untyped in redis-py
        self.channel = pubsub(ignore_subscribe_messages=True)
        self.channel.subscribe(mailbox_prefix("m") + PUSHED)
        for script in all_scripts().values():
            self.redis.script_load(script.source)
        self.redis.script_load(SNAPSHOT.source)
        self.model = LimiterModel(subscribed=frozenset({PUSHED}))
        self.now = NOW
        self.max_at_once = 1
        self.interval_us = 0.0
        self.burst = 1
        self.lease_ttl_us = SECOND
        # The last rate-only acquire: its ids, its now and its replies.
        self.last_rate_batch: tuple[list[str], int, list[list[int]]] | None = None

    def teardown(self) -> None:
        self.channel.close()
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
            "",
            "",  # ARGV[9]: not adaptive
        ]
        reply = self.run(load_script(name), [*header, *extra], [costs_key("m"), control_key("m")])
        if name == "acquire":
            return (
                decode_swap_reply(reply) if isinstance(reply, list) else decode_acquire_reply(reply)
            )
        return reply

    @initialize(
        max_at_once=st.integers(0, 4),
        interval_us=intervals,
        burst=bursts,
        lease_ttl_us=lease_ttls,
        # seq as earlier calls left it: from 100 on, a run crosses the multiple of 128 at
        # which a call sweeps grants.
        seq=st.sampled_from([0, 100, 120]),
    )
    def configure(
        self, max_at_once: int, interval_us: float, burst: int, lease_ttl_us: int, seq: int
    ) -> None:
        self.max_at_once = max_at_once
        self.interval_us = interval_us
        self.burst = burst
        self.lease_ttl_us = lease_ttl_us
        if seq:
            self.redis.set(limiter_keys("m")[4], seq, px=600_000)
            self.model.seq = seq

    @rule(dt=st.one_of(st.integers(0, 1_000), st.integers(0, 2 * SECOND)))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule()
    def seq_next_to_a_sweep(self) -> None:
        # As if other calls had taken numbers: the next number taken crosses a multiple of
        # 128, where the call sweeps grants.
        seq = (self.model.seq // 128 + 1) * 128 - 1
        self.redis.set(limiter_keys("m")[4], seq, px=600_000)
        self.model.seq = seq

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

    @rule(
        process=st.sampled_from(PROCESSES),
        extra=st.lists(lease_ids, max_size=2),
        numbers=st.lists(st.integers(0, 2), max_size=3),
        mark=st.sampled_from(["+", "^"]),
    )
    def swap(self, process: str, extra: list[str], numbers: list[int], mark: str) -> None:
        # What a process sends when it releases and acquires in one call: the leases it
        # holds (and maybe unknown ones), then waiter items of its own.
        held = [i for i in self.model.holders if process_of(i) == process]
        releases = [*held, *extra] or [f"{process}:0"]
        # An id neither held nor queued comes marked as a first ask ("+", or "^" when its
        # process expects it to queue), as a client sends it; a held or queued one is a
        # re-ask, never marked.
        known = {*self.model.holders, *self.model.queue}
        items = [
            f"{process}:{n}" if f"{process}:{n}" in known else f"{mark}{process}:{n}"
            for n in numbers
        ]
        expected = self.model.swap(self.now, releases, items, **self.limits())
        reply = self.call("acquire", *(f"-{r}" for r in releases), *items)
        assert reply == expected
        # A client retries a batch only until it has its reply, never after releasing it.
        self.last_rate_batch = None
        event("swap: a grant returned to its own process" if expected[1] else "swap")
        if any(entry == [0, -1] for entry in expected[2]):
            event("swap: queued first, not counted")
        elif mark == "^" and any(entry[0] == 1 for entry in expected[2]):
            event("swap: queued first, granted")

    @rule(process=st.sampled_from(PROCESSES))
    def swap_queue_first(self, process: str) -> None:
        # What a client with waiters queued already sends when a task ends: the leases it
        # holds, then its fresh ids marked "^" (queued before the handoff reads the heads).
        held = [i for i in self.model.holders if process_of(i) == process]
        known = {*self.model.holders, *self.model.queue}
        fresh = [f"{process}:{n}" for n in range(3) if f"{process}:{n}" not in known]
        if held and fresh:
            self.swap(process, [], [int(i.rsplit(":", 1)[1]) for i in fresh[:2]], "^")

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

    @rule(us=pauses)
    def pause(self, us: int) -> None:
        self.model.pause(self.now, us)
        control = [costs_key("m"), control_key("m")]
        reply = self.run(load_script("control"), [self.now, 60_000, "pause", us], control)
        assert reply[2] == paused_text(self.model, self.now)

    @invariant()
    def same_state(self) -> None:
        mailboxes = [mailbox_prefix("m") + process for process in PROCESSES]
        holders, queue, waiters, tat, seq, grants, recent, spare, *boxes = self.run(
            SNAPSHOT, [], mailboxes
        )
        model = self.model
        assert_first_eight_match(model, holders, queue, waiters, tat, seq, grants, recent, spare)
        assert boxes == [model.mailboxes.get(process, []) for process in PROCESSES]
        # A mailbox only ever receives grants for its own process's waiters.
        for process, box in zip(PROCESSES, boxes, strict=True):
            assert all(process_of(message.split("|")[0]) == process for message in box)
        # What was published on the pushed process's channel since the last step.
        published = []
        while (message := self.channel.get_message()) is not None:
            published.append(normalize_reply(message["data"]))
        assert published == model.published.pop(PUSHED, [])

    @invariant()
    def process_liveness_seen(self) -> None:
        if any(":" not in member for member in self.model.waiters):
            event("a process keeps one liveness for its waiters")
        if self.model.dead_processes:
            event("a process's liveness ended: its waiters left the queue")
        if self.model.grants_scan is not None:
            event("releases leave their grants entries to the sweep")
        if self.model.swept:
            event("a sweep deleted the grants entries of released leases")

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
        ScriptsMatchModel.configure(self, max_at_once, interval_us, burst, lease_ttl_us, 0)


RateOnlyScriptsMatchModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_rate_only_scripts_match_model = RateOnlyScriptsMatchModel.TestCase


# -- costs and windows ------------------------------------------------------------------

# Windows a machine draws 1-3 of: (per, counts calls?) pairs, distinct; the limit is drawn
# apart. Short windows so that time advancing crosses them often.
WINDOW_SHAPES = [
    (300_000, False),
    (SECOND, False),
    (2_500_000, False),
    (SECOND, True),
    (700_000, True),
]
window_shapes = st.lists(st.sampled_from(WINDOW_SHAPES), min_size=1, max_size=3, unique=True)
# Limits in units: whole and fractional costs.
window_limits = st.one_of(
    st.integers(2, 8).map(lambda n: n * UNIT), st.integers(2 * UNIT, 8 * UNIT)
)
# Costs: mostly small whole numbers, sometimes fractions or exactly the smallest limit.
cost_units = st.one_of(
    st.just(UNIT),
    st.integers(1, 4).map(lambda n: n * UNIT),
    st.integers(1, 3 * UNIT),
    st.just(-1),  # stands for "the most any limit admits"
)
max_delays = st.one_of(st.none(), st.sampled_from([0, 1, 100_000, 400_000, 2 * SECOND]))


def paused_text(model: LimiterModel, now: int) -> str:
    """control.lua's paused_until as the model has it ('' once it has passed)."""
    return str(model.paused_until) if model.paused_until > now else ""


def item_text(waiter_id: str, max_delay: int | None, cost: int) -> str:
    """A waiter item as the client sends it: no ``*`` for a cost of 1."""
    text = waiter_id if max_delay is None else f"{waiter_id}/{max_delay}"
    return text if cost == UNIT else f"{text}*{cost}"


def window_key(window: Window) -> str:
    kind = "calls" if window.calls else "cost"
    return f"aiometer:{{m}}:window:{window.per_us}:{kind}"


# Everything a limiter with windows stores besides the eight keys: the costs hash, then
# each window log (KEYS[2..]) with scores.
WINDOW_SNAPSHOT = Script.from_source(
    "test_window_snapshot",
    """
    local out = {redis.call('HGETALL', KEYS[1])}
    for i = 2, #KEYS do
      out[#out + 1] = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
    end
    return out
    """,
)


class CostsAndWindowsMatchModel(RuleBasedStateMachine):
    """Costs, 1-3 windows, settle and cancel: scripts and model agree, and every window's
    started cost (from the model's own record of starts) stays within its limit plus the
    overspend that settles added."""

    check_scripts = True

    def __init__(self) -> None:
        super().__init__()
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        for script in all_scripts().values():
            self.redis.script_load(script.source)
        for script in (SNAPSHOT, WINDOW_SNAPSHOT):
            self.redis.script_load(script.source)
        # Nobody subscribes here: a grant to a process whose id ends in "!" goes to its list.
        self.model = LimiterModel(subscribed=frozenset())
        self.now = NOW
        self.max_at_once = 1
        self.interval_us = 0.0
        self.burst = 1
        self.lease_ttl_us = SECOND
        self.windows: tuple[Window, ...] = ()
        self.next_n = dict.fromkeys(PROCESSES, 0)
        #: id -> the cost units it was acquired with (fixed per id, as a client does).
        self.cost_of: dict[str, int] = {}

    def teardown(self) -> None:
        self.redis.close()

    # -- plumbing --------------------------------------------------------------------

    def limits(self) -> dict[str, Any]:
        return {
            "max_at_once": self.max_at_once,
            "interval_us": self.interval_us,
            "burst": self.burst,
            "lease_ttl_us": self.lease_ttl_us,
            "windows": self.windows,
        }

    def keys(self) -> list[str]:
        return [
            *limiter_keys("m"),
            costs_key("m"),
            control_key("m"),
            *(window_key(w) for w in self.windows),
        ]

    def call(self, name: str, *extra: ScriptArg) -> Any:
        header: list[ScriptArg] = [
            self.now,
            self.max_at_once,
            self.interval_us,
            self.burst,
            self.lease_ttl_us,
            60_000,
            mailbox_prefix("m"),
            window_spec(self.windows),
            "",  # ARGV[9]: not adaptive
        ]
        keys = self.keys()
        argv = encode_args([*header, *extra])
        reply = normalize_reply(self.redis.evalsha(load_script(name).sha1, len(keys), *keys, *argv))
        return decode_acquire_reply(reply) if name == "acquire" else reply

    def most_cost(self) -> int:
        """The largest cost no limit refuses outright (what the client lets through)."""
        bounds = [w.limit for w in self.windows if not w.calls]
        if self.interval_us > 0:
            bounds.append(self.burst * UNIT)
        return min(bounds, default=8 * UNIT)

    def known_ids(self) -> list[str]:
        return sorted(self.cost_of)

    def retryable_ids(self) -> list[str]:
        """Ids a client may send again: queued, holding a live lease, or remembered with
        its grant (a retry). A client never reuses the id of an acquisition that ended:
        with windows, a new grant under an id already in a log would replace its entry."""
        model = self.model
        ids = set(model.queue)
        ids |= {i for i, expiry in model.holders.items() if expiry > self.now}
        ids |= {i for i, end in model.recent.items() if end > self.now}
        return sorted(i for i in ids if i in model.queue or i in model.grants)

    def check(self, name: str, expected: Any, *extra: ScriptArg) -> None:
        """Run script *name* and compare its reply with the model's (when checking)."""
        if self.check_scripts:
            assert self.call(name, *extra) == expected

    # -- rules -----------------------------------------------------------------------

    @initialize(
        max_at_once=st.integers(0, 3),
        interval_us=st.one_of(st.just(0.0), st.sampled_from([50_000.0, 1e6 / 3, 12_345.6789])),
        burst=st.integers(1, 4),
        lease_ttl_us=st.sampled_from([300_000, 3 * SECOND]),
        shapes=window_shapes,
        limits=st.lists(window_limits, min_size=3, max_size=3),
    )
    def configure(
        self,
        max_at_once: int,
        interval_us: float,
        burst: int,
        lease_ttl_us: int,
        shapes: list[tuple[int, bool]],
        limits: list[int],
    ) -> None:
        self.max_at_once = max_at_once
        self.interval_us = interval_us
        self.burst = burst
        self.lease_ttl_us = lease_ttl_us
        windows = [
            Window(limit, per_us, calls)
            for (per_us, calls), limit in zip(shapes, limits, strict=False)
        ]
        self.windows = tuple(windows)

    @rule(dt=st.one_of(st.integers(0, 2_000), st.integers(0, 600_000), st.integers(0, 3 * SECOND)))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(pick=st.integers(0, 7), offset=st.sampled_from([-1, 0, 1]))
    def advance_to_a_boundary(self, pick: int, offset: int) -> None:
        # Land on (or next to) the moment an entry leaves a window, or a start.
        starts = [r.start for r in self.model.started.values()]
        moments = [s + w.per_us for s in starts for w in self.windows] + starts
        later = sorted({m + offset for m in moments if m + offset > self.now})
        if later:
            self.now = later[pick % len(later)]

    @rule(
        wanted=st.lists(
            st.tuples(st.sampled_from(PROCESSES), st.integers(0, 9), max_delays, cost_units),
            min_size=1,
            max_size=3,
        )
    )
    def acquire(self, wanted: list[tuple[str, int, int | None, int]]) -> None:
        items = []
        for process, pick, max_delay, cost in wanted:
            live = [i for i in self.retryable_ids() if process_of(i) == process]
            if pick < len(live) and pick % 2:
                # A waiter asking again (queued, or a retry): same id, same cost.
                waiter_id = live[pick]
            else:
                self.next_n[process] += 1
                waiter_id = f"{process}:{self.next_n[process]}"
                self.cost_of[waiter_id] = min(self.most_cost(), cost if cost > 0 else 10**12)
            items.append(item_text(waiter_id, max_delay, self.cost_of[waiter_id]))
        expected = self.model.acquire(self.now, items, **self.limits())
        self.check("acquire", expected, *items)
        for reply in expected:
            kind = {0: "queued", 1: "granted", 2: "refused"}[reply[0]]
            event(f"acquire: {kind}" + (", delayed" if reply[0] == 1 and reply[2] else ""))

    @rule(process=st.sampled_from(PROCESSES), extra=st.integers(0, 30))
    def release(self, process: str, extra: int) -> None:
        held = [i for i in self.model.holders if process_of(i) == process]
        ids = self.known_ids()
        batch = held or ([ids[extra % len(ids)]] if ids else ["zz:0"])
        expected = self.model.release(self.now, batch, **self.limits())
        self.check("release", expected, *batch)

    @rule(process=st.sampled_from(PROCESSES))
    def renew(self, process: str) -> None:
        leases = [i for i in self.model.holders if process_of(i) == process]
        waiters = [i for i in self.model.waiters if process_of(i) == process]
        expected = self.model.renew(self.now, leases, waiters, **self.limits())
        self.check("renew", expected, len(leases), *leases, *waiters)

    @precondition(lambda self: bool(self.cost_of))
    @rule(pick=st.integers(0, 30))
    def cancel(self, pick: int) -> None:
        ids = self.known_ids()
        waiter_id = ids[pick % len(ids)]
        in_logs = any(waiter_id in self.model.log(w) for w in self.windows)
        expected = self.model.cancel(self.now, waiter_id, **self.limits())
        self.check("cancel", expected, waiter_id)
        event("cancel: " + ("withdrawn from the windows" if in_logs else "not in a window"))

    @precondition(lambda self: bool(self.model.started))
    @rule(
        pick=st.integers(0, 30),
        how=st.sampled_from(["zero", "down", "same", "up", "any"]),
        amount=st.integers(0, 6 * UNIT),
    )
    def settle(self, pick: int, how: str, amount: int) -> None:
        ids = sorted(self.model.started)
        waiter_id = ids[pick % len(ids)]
        estimate = self.cost_of[waiter_id]
        # What the client last charged: its estimate, or its last settle.
        previous = self.model.started[waiter_id].cost
        actual = {
            "zero": 0,
            "down": estimate * amount // (6 * UNIT),
            "same": estimate,
            "up": estimate + amount,
            "any": amount,
        }[how]
        tat = self.model.tat
        expected = self.model.settle(self.now, waiter_id, actual, previous, **self.limits())
        self.check("settle", expected, waiter_id, actual, previous)
        change = "none" if actual == previous else "up" if actual > previous else "down"
        moved = "TAT moved" if self.model.tat != tat else "TAT kept"
        event(f"settle {change}: reply {expected}, {moved}")

    @rule(us=pauses)
    def pause(self, us: int) -> None:
        self.model.pause(self.now, us)
        if self.check_scripts:
            keys = self.keys()
            argv = encode_args([self.now, 60_000, "pause", us])
            sha = load_script("control").sha1
            reply = normalize_reply(self.redis.evalsha(sha, len(keys), *keys, *argv))
            assert reply[2] == paused_text(self.model, self.now)

    @rule(process=st.sampled_from(PROCESSES))
    def drain_mailbox(self, process: str) -> None:
        expected = self.model.mailboxes.get(process, [])
        if not self.check_scripts:
            del expected[:1]
            return
        popped = self.redis.lpop(mailbox_prefix("m") + process)
        if popped is None:
            assert expected == []
        else:
            assert expected.pop(0) == normalize_reply(popped)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def windows_hold(self) -> None:
        for window in self.windows:
            used, allowed = self.model.worst_window(window)
            assert used <= window.limit + allowed, (window, used, allowed)
            if used == window.limit + allowed:
                event("a window exactly full")
            if allowed:
                event("a window with overspend")

    @invariant()
    def same_state(self) -> None:
        if not self.check_scripts:
            return
        keys = self.keys()
        holders, queue, waiters, tat, seq, grants, recent, spare = normalize_reply(
            self.redis.evalsha(SNAPSHOT.sha1, 8, *keys[:8])
        )
        model = self.model
        assert_first_eight_match(model, holders, queue, waiters, tat, seq, grants, recent, spare)
        costs_flat, *logs = normalize_reply(
            # costs, then the window logs (control, KEYS[10], is never written here).
            self.redis.evalsha(WINDOW_SNAPSHOT.sha1, len(keys) - 9, keys[8], *keys[10:])
        )
        costs = dict(zip(costs_flat[::2], costs_flat[1::2], strict=True))
        for window, log in zip(self.windows, logs, strict=True):
            entries = _pairs(log)
            assert entries == model.log(window), window
            # Each window's running sum is what its log holds (an id without a cost
            # record counts one unit).
            kind = int(window.calls)
            weights = [window.charge(int(costs.get(i, UNIT))) for i in entries]
            assert int(costs.get(f"sum:{window.per_us}:{kind}", "0")) == sum(weights), window
        assert costs.pop("last", None) == model.last_text()
        records = {i: int(c) for i, c in costs.items() if not i.startswith("sum:")}
        assert records == model.costs


CostsAndWindowsMatchModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_costs_and_windows_match_model = CostsAndWindowsMatchModel.TestCase


class WindowsHoldInTheModel(CostsAndWindowsMatchModel):
    """The same machine on the model alone, with more examples: the contract's reservation
    walk, all-or-nothing charges, withdrawals and settles keep every window's bound."""

    check_scripts = False


WindowsHoldInTheModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_windows_hold_in_the_model = WindowsHoldInTheModel.TestCase


def test_trimming_keeps_each_windows_sum_exact() -> None:
    # The longest window first, then a short one. Two half-unit entries (and nine whole
    # ones) start; a second later one call trims them from both windows at once.
    windows = (Window(100 * UNIT, SECOND), Window(2 * UNIT, 300_000))
    machine = CostsAndWindowsMatchModel()
    try:
        machine.max_at_once = 0
        machine.lease_ttl_us = 60 * SECOND
        machine.windows = windows
        items = ["x:1*500000", "x:2*500000", *(f"x:{n}" for n in range(3, 12))]
        replies = machine.call("acquire", *items)
        # The short window admits two units per 300 ms: pairs start 300 ms apart.
        delays = [0, 0, 0, 300_000, 300_000, 600_000, 600_000, 900_000, 900_000]
        assert [reply[2] for reply in replies] == [*delays, 1_200_000, 1_200_000]
        machine.now = NOW + SECOND
        # x:10 and x:11 start at NOW + 1.2 s and fill the short window: y:1 waits until
        # x:10 leaves it, at NOW + 1.5 s.
        # The first call (at NOW) chose the epoch: a token is NOW + its number of seq.
        assert machine.call("acquire", "y:1") == [[1, NOW + 12, 500_000]]
        machine.model.acquire(NOW, items, **machine.limits())
        machine.model.acquire(machine.now, ["y:1"], **machine.limits())
        machine.same_state()
    finally:
        machine.teardown()
