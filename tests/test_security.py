"""RedisLimiter behind Redis's own protections, and what it exposes.

* a password (``requirepass``) in the URL, and what happens without it;
* an ACL user restricted to exactly the commands and keys the limiter needs;
* TLS with certificate (and host name) verification, certificates made here with openssl;
* the password never shows up in a repr, an error message or a log record;
* any name and prefix stays inside its own keys and its own hash tag (hypothesis).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import socket
import subprocess
import sys
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
import redis.exceptions
from helpers.capabilities import require_tls
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aiometer_redis import (
    AcquireTimeoutError,
    ConfigurationError,
    RedisLimiter,
    RedisUnavailableError,
)
from aiometer_redis._client import CoredisClient
from aiometer_redis._errors import ClientError
from aiometer_redis._keys import limiter_keys, mailbox_prefix
from aiometer_redis._scripts import all_scripts
from aiometer_redis.testing import RedisServer

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.redis

PASSWORD = "pw-7f3c9a1e-do-not-leak"

# The least a RedisLimiter needs, as one `ACL SETUSER` line (derived from lua/*.lua, then
# checked by running every code path as this user with an empty ACL LOG):
# - EVALSHA runs the scripts, EVAL only after NOSCRIPT; SUBSCRIBE (UNSUBSCRIBE on leaving)
#   listens on the process's channel, BLPOP waits on its mailbox list (cluster clients); DEL
#   is reset(); PING probes Redis while it is unavailable (on_unavailable="local") and goes
#   in front of a release that likely hands its slot to another process (refused, it is
#   only logged);
# - every other command is one the scripts call: Redis checks a script's inner commands, and
#   the keys and channels they touch (the mailboxes too, which are not in KEYS), against the
#   same user;
# - keys and channels: the default prefix only (use ~<prefix>:* &<prefix>:* for another).
# "reset" first makes the line idempotent; replace the password after ">".
ACL_RULES = (
    "limiter reset on >limiter-pw ~aiometer:* resetchannels &aiometer:* -@all"
    " +evalsha +eval +subscribe +unsubscribe +punsubscribe +blpop +del +ping"
    " +time +get +set +incrby +incrbyfloat +pexpire"
    " +zadd +zrem +zcard +zpopmin +zrange +zrangebyscore +zrank +zscore +zmscore"
    " +hset +hget +hmget +hdel +hscan +rpush +publish"
)
# The rules of the version before pub/sub and ZPOPMIN (no channel, no SUBSCRIBE, PUBLISH,
# ZPOPMIN, INCRBYFLOAT, HSCAN nor ZMSCORE): the limiter still works under them, through the
# mailbox lists, ZRANGE + ZREM, GET + SET of the TAT, and releases that delete their grants.
LIST_ONLY_RULES = (
    "limiter reset on >limiter-pw ~aiometer:* resetchannels -@all"
    " +evalsha +eval +blpop +del +ping"
    " +time +get +set +incr +incrby +pexpire"
    " +zadd +zrem +zcard +zrange +zrangebyscore +zrank +zscore"
    " +hset +hget +hmget +hdel +rpush"
)
ACL_USER = "limiter"
ACL_PASSWORD = "limiter-pw"

# What the limiter sends from the client side; the other commands of ACL_RULES are the
# scripts' own.
CLIENT_COMMANDS = frozenset(
    # PUNSUBSCRIBE: coredis sends it with UNSUBSCRIBE when a subscription ends.
    {"evalsha", "eval", "subscribe", "unsubscribe", "punsubscribe", "blpop", "del", "ping"}
)


# -- helpers -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def _error_chain(exc: BaseException) -> list[BaseException]:
    """*exc*, its causes and contexts, and the members of any exception group among them."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is other for other in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return seen


def _chain_text(exc: BaseException) -> str:
    return " | ".join(f"{type(e).__module__}.{type(e).__name__}: {e}" for e in _error_chain(exc))


async def exercise(url: str, name: str) -> None:
    """Drive every script and client command of a limiter through *url*.

    Rate only (acquire.lua's fast path), both limits with a second and a third "process"
    (separate limiter objects: their own process ids and mailboxes) so that a waiter queues in
    Redis, is renewed while queued (renew.lua), gets the slot handed over by release.lua
    (PUBLISH on its channel, read by its subscription), and a waiter gives up
    (AcquireTimeoutError: cancel.lua); statistics() (status.lua) and reset() (DEL).
    """
    with anyio.fail_after(20):
        async with RedisLimiter.from_url(url, name, max_per_second=200, burst=2) as rate_only:
            tokens: list[int] = []
            for _ in range(3):
                permit = await rate_only.acquire()
                tokens.append(permit.token)
                await permit.release()
            assert tokens == sorted(tokens)
            assert len(set(tokens)) == 3
            assert (await rate_only.statistics()).holders == ()
            await rate_only.reset()

        options: dict[str, Any] = {"max_at_once": 1, "max_per_second": 200, "lease_ttl": 0.6}
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(RedisLimiter.from_url(url, name, **options))
            second = await stack.enter_async_context(RedisLimiter.from_url(url, name, **options))
            third = await stack.enter_async_context(
                RedisLimiter.from_url(url, name, acquire_timeout=0.1, **options)
            )
            held = await first.acquire()
            handed: list[int] = []

            async def wait_in_queue() -> None:
                async with second.slot() as permit:
                    handed.append(permit.token)

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(wait_in_queue)
                while not (await first.statistics()).waiters:
                    await anyio.sleep(0.01)
                # Longer than lease_ttl: only the renewals (every lease_ttl / 3) keep the lease
                # and the queued waiter alive.
                await anyio.sleep(0.7)
                stats = await first.statistics()
                assert [h.lease_id for h in stats.holders] == [held.lease_id]
                assert len(stats.waiters) == 1
                assert not held.lost
                await held.release()
            assert len(handed) == 1
            assert handed[0] > held.token

            held = await first.acquire()
            with pytest.raises(AcquireTimeoutError):
                await third.acquire()
            assert (await first.statistics()).waiters == ()
            await held.release()
            stats = await first.statistics()
            assert stats.holders == ()
            assert stats.waiters == ()
            assert stats.leases_lost == 0
            await first.reset()


def _command(client: redis.Redis, *args: str) -> Any:
    """Send a raw command (redis-py leaves execute_command untyped)."""
    execute: Callable[..., Any] = client.execute_command
    return execute(*args)


def _keys_of(client: redis.Redis) -> set[bytes]:
    return {key for key in client.scan_iter(count=1000) if isinstance(key, bytes)}


# -- 1. a password in the URL ------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with RedisServer(["--requirepass", PASSWORD]) as running:
        yield running


def _password_url(server: RedisServer, credentials: str = f":{PASSWORD}@") -> str:
    return f"redis://{credentials}127.0.0.1:{server.port}/0"


@pytest.mark.anyio
async def test_password_url_runs_the_whole_flow(password_server: RedisServer) -> None:
    await exercise(_password_url(password_server), _unique("password"))


BAD_CREDENTIALS = pytest.mark.parametrize(
    "credentials", ["", ":wrong-password@"], ids=["no-password", "wrong-password"]
)


async def _acquire_with(
    url: str, name: str, retry_window: float = 0.3
) -> tuple[BaseException, float]:
    """Try one acquisition; return what it raised (inside the limiter's block) and how long
    it took."""
    start = time.monotonic()
    options = {"max_at_once": 1, "retry_window": retry_window}
    async with RedisLimiter.from_url(url, name, **options) as limiter:
        with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked below
            await limiter.acquire()
    return info.value, time.monotonic() - start


@BAD_CREDENTIALS
@pytest.mark.anyio
async def test_bad_password_fails_closed(password_server: RedisServer, credentials: str) -> None:
    """Without the right password nothing is granted and acquire() raises at once (no retry:
    refused credentials are a configuration error, not an outage), the same on both backends:
    ConfigurationError, chained from the client's own AuthenticationError.
    """
    name = _unique("bad-password")
    url = _password_url(password_server, credentials)
    error, elapsed = await _acquire_with(url, name, retry_window=10.0)
    assert isinstance(error, ConfigurationError), _chain_text(error)
    assert "refused the credentials" in str(error)
    # At once: an outage would be retried for the 10 s of the retry window.
    assert elapsed < 3.0
    admin = redis.Redis(port=password_server.port, password=PASSWORD)
    try:
        assert not any(key.startswith(f"aiometer:{{{name}}}".encode()) for key in _keys_of(admin))
    finally:
        admin.close()


@BAD_CREDENTIALS
@pytest.mark.anyio
async def test_bad_password_error_names_authentication(
    password_server: RedisServer,
    credentials: str,
    anyio_backend: str,
    request: pytest.FixtureRequest,
) -> None:
    error, _ = await _acquire_with(_password_url(password_server, credentials), _unique("login"))
    text = _chain_text(error)
    assert re.search(r"auth|password", text, re.IGNORECASE), text


# -- 2. an ACL user with exactly what the limiter needs ----------------------------------------


def _set_user(running: RedisServer, rules: str) -> None:
    """Create the limiter's ACL user on *running* with *rules*."""
    admin = redis.Redis(port=running.port)
    try:
        _command(admin, "ACL", "SETUSER", *rules.split())
    finally:
        admin.close()


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        _set_user(running, ACL_RULES)
        yield running


@pytest.fixture
def acl_admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    admin = redis.Redis(port=acl_server.port, decode_responses=True)
    yield admin
    admin.close()


def _acl_url(server: RedisServer) -> str:
    return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"


def _allowed_commands() -> set[str]:
    return {rule[1:] for rule in ACL_RULES.split() if rule.startswith("+")}


def test_acl_rules_allow_exactly_the_scripts_commands(acl_admin: redis.Redis) -> None:
    """Every command the scripts call is allowed, and nothing else is: a command added to or
    dropped from lua/*.lua must be added to or dropped from ACL_RULES (and the README)."""
    known = {str(command).lower() for command in acl_admin.command()}
    literals: set[str] = set()
    for script in all_scripts().values():
        literals.update(re.findall(r"""['"]([A-Za-z]+)['"]""", script.source))
    script_commands = {word.lower() for word in literals} & known
    assert "time" in script_commands  # the extraction finds something
    assert _allowed_commands() == script_commands | CLIENT_COMMANDS
    assert ACL_RULES.split()[:2] == [ACL_USER, "reset"]
    assert f">{ACL_PASSWORD}" in ACL_RULES.split()


@pytest.mark.anyio
async def test_acl_user_runs_the_whole_flow(
    acl_server: RedisServer, acl_admin: redis.Redis
) -> None:
    _command(acl_admin, "ACL", "LOG", "RESET")
    await exercise(_acl_url(acl_server), _unique("acl"))
    # Not even a denial that a client swallowed. The limiter never sends CLIENT, and the
    # redis-py clients it makes from URLs skip CLIENT SETINFO. One handshake command is left:
    # redis-py 8 asks for maintenance notifications (CLIENT MAINT_NOTIFICATIONS, RESP3) and
    # ignores a refusal; the limiter keeps that default, which helps on managed Redis. Redis 7
    # answers it "unknown subcommand" and logs nothing; 6.2, which checks CLIENT as a whole,
    # logs a denial of "client". Granting CLIENT would let the user kill other connections, so
    # the rules stay without it.
    denials = _command(acl_admin, "ACL", "LOG")
    if int(acl_admin.info("server")["redis_version"].split(".")[0]) >= 7:
        assert denials == []
    assert [entry for entry in denials if not _is_client_handshake(entry)] == []


def _is_client_handshake(entry: dict[str, Any]) -> bool:
    return (
        entry.get("object") == "client"
        and entry.get("username") == ACL_USER
        and " cmd=client " in f" {entry.get('client-info', '')} "
    )


@pytest.mark.anyio
async def test_acl_user_without_channels_runs_the_whole_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The rules of the previous version: SUBSCRIBE and the scripts' PUBLISH are refused, the
    # grants go to the mailbox lists and the limiter reads its own with BLPOP (and says so);
    # ZPOPMIN is refused too, and the hand-offs read the queue heads with ZRANGE + ZREM;
    # INCRBYFLOAT is refused too, and the rate starts read the TAT with GET (SET after);
    # so are HSCAN and ZMSCORE (the sweep of grants), and releases delete their entries.
    with RedisServer() as running:
        _set_user(running, LIST_ONLY_RULES)
        url, name = _acl_url(running), _unique("lists")
        await exercise(url, name)
        # The flow may end before a subscription attempt was answered: a waiter that stays
        # queued until its own limiter reports the refusal makes the warning certain. It waits
        # in another limiter than the holder's (in the holder's, the local limit would keep it
        # from Redis). coredis may take its subscription timeout (5 s) to report the refusal.
        caplog.clear()
        with anyio.fail_after(15):
            async with (
                RedisLimiter.from_url(url, name, max_at_once=1) as holder,
                RedisLimiter.from_url(url, name, max_at_once=1) as limiter,
            ):
                held = await holder.acquire()
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(limiter.acquire)
                    while "mailbox list of that name instead" not in caplog.text:
                        await anyio.sleep(0.01)
                    task_group.cancel_scope.cancel()
                await held.release()
    assert "mailbox list of that name instead" in caplog.text


@pytest.mark.anyio
@pytest.mark.backends("trio")
async def test_a_refused_subscription_cancelled_midway_raises_only_the_cancellation() -> None:
    # coredis runs a subscription in a task group of its own; cancelled just as Redis refuses
    # the SUBSCRIBE, that group raised the refusal out of the cancelled scope (on trio, about
    # 1 in 20 times), and out of the limiter's exit. Cancelled at moments spread over the first
    # milliseconds, the subscription must end with its scope's cancellation alone. (On asyncio
    # coredis reports the refusal only at its subscription timeout, so there is no race.)
    import coredis

    with RedisServer() as running:
        _set_user(running, LIST_ONLY_RULES)
        async with coredis.Redis.from_url(_acl_url(running)) as raw:
            client = CoredisClient(raw)
            outcomes: Counter[str] = Counter()

            async def subscribe() -> None:
                try:
                    async with client.subscribe(f"aiometer:{_unique('cancel')}:mb:1!"):
                        outcomes["subscribed"] += 1
                except ClientError as exc:
                    outcomes[type(exc).__name__] += 1

            for attempt in range(200):
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(subscribe)
                    await anyio.sleep(attempt % 20 * 0.0002)
                    task_group.cancel_scope.cancel()
            # The refusal was reported (not cancelled) in some attempts: the race was run.
            assert outcomes["ErrorReply"] > 0
            assert outcomes["subscribed"] == 0


@pytest.mark.anyio
async def test_acl_user_of_the_previous_rules_gets_a_slot_handed_over_at_once() -> None:
    # Without ZPOPMIN a release still hands the slot to the queued waiter in the same call: the
    # waiter has it within a round trip, not at a re-check or a lease expiry. (The waiter blocks
    # on its mailbox list from the start: how a refused subscription falls back to it is the
    # test above.)
    with RedisServer() as running:
        _set_user(running, LIST_ONLY_RULES)
        url, name = _acl_url(running), _unique("handoff")
        second = RedisLimiter.from_url(url, name, max_at_once=1)
        second._push = False
        with anyio.fail_after(10):
            async with RedisLimiter.from_url(url, name, max_at_once=1) as first, second:
                await _handed_over_at_once(first, second)


async def _handed_over_at_once(
    holder: RedisLimiter, waiter: RedisLimiter, ready: Callable[[], bool] = lambda: True
) -> None:
    """A task of *waiter* queues for the slot *holder* takes (and *ready* returns True);
    given back, the slot reaches that task within 0.5 s: within a round trip, not at a
    re-check or a lease expiry."""
    held = await holder.acquire()
    handed = anyio.Event()

    async def wait_in_queue() -> None:
        async with waiter.slot():
            handed.set()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(wait_in_queue)
        while not ready():
            await anyio.sleep(0.01)
        while not (await holder.statistics()).waiters:
            await anyio.sleep(0.01)
        released_at = anyio.current_time()
        await held.release()
        await handed.wait()
        assert anyio.current_time() - released_at < 0.5


@pytest.mark.anyio
async def test_acl_user_without_ping_still_hands_slots_over() -> None:
    # The PING sent in front of a release that hands its slot to another process is refused
    # for a user without +ping: the release and the hand-over go on as if it had not been sent.
    with RedisServer() as running:
        _set_user(running, ACL_RULES.replace(" +ping", ""))
        admin = redis.Redis(port=running.port, decode_responses=True)
        url, name = _acl_url(running), _unique("noping")
        order: list[str] = []

        async def take(limiter: RedisLimiter, label: str) -> None:
            for _ in range(5):
                async with limiter.slot():
                    order.append(label)
                    await anyio.sleep(0.005)

        with anyio.fail_after(20):
            async with (
                RedisLimiter.from_url(url, name, max_at_once=1) as first,
                RedisLimiter.from_url(url, name, max_at_once=1) as second,
                anyio.create_task_group() as task_group,
            ):
                task_group.start_soon(take, first, "first")
                task_group.start_soon(take, second, "second")
        try:
            denials = _command(admin, "ACL", "LOG")
        finally:
            admin.close()
    assert sorted(order) == ["first"] * 5 + ["second"] * 5
    # The two took turns: PINGs were sent in front of releases, and refused.
    assert sum(a != b for a, b in itertools.pairwise(order)) >= 4
    refused = {entry["object"] for entry in denials if not _is_client_handshake(entry)}
    assert refused == {"ping"}


@pytest.mark.anyio
async def test_acl_user_allowed_publish_but_not_subscribe_gets_slots_handed_over_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # SUBSCRIBE refused, PUBLISH allowed: the waiter's limiter blocks on its mailbox list
    # instead, and a grant published to nobody goes to that list too, so the waiter has it
    # within a round trip, not at its re-check (recheck_interval, 1 s).
    with RedisServer() as running:
        _set_user(running, ACL_RULES.replace(" +subscribe", ""))
        url, name = _acl_url(running), _unique("nosub")
        with anyio.fail_after(20):
            async with (
                RedisLimiter.from_url(url, name, max_at_once=1) as first,
                RedisLimiter.from_url(url, name, max_at_once=1) as second,
            ):
                for _ in range(3):
                    # coredis may take its subscription timeout (5 s) to report the refusal.
                    await _handed_over_at_once(
                        first, second, lambda: "mailbox list of that name instead" in caplog.text
                    )


def test_acl_user_cannot_touch_other_keys_or_commands(acl_server: RedisServer) -> None:
    user = redis.Redis(port=acl_server.port, username=ACL_USER, password=ACL_PASSWORD)
    try:
        assert user.ping()
        with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access"):
            user.set("other:key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access"):
            user.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError, match="'flushall' command"):
            user.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError, match="'keys' command"):
            user.keys("*")
        # A script runs with the user's rights, even on keys it does not declare.
        with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access"):
            user.eval("return redis.call('SET', KEYS[1], 'x')", 1, "other:key")
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            user.eval("return redis.call('SET', 'other:key', 'x')", 0)
        assert user.eval("return redis.call('SET', KEYS[1], 'x')", 1, "aiometer:ok") == b"OK"
        assert user.delete("aiometer:ok") == 1
    finally:
        user.close()


@pytest.mark.anyio
async def test_acl_user_cannot_use_another_prefix(acl_server: RedisServer) -> None:
    async with RedisLimiter.from_url(
        _acl_url(acl_server), _unique("prefix"), max_at_once=1, prefix="other", retry_window=0.3
    ) as limiter:
        # Redis refuses the script call itself (its KEYS are outside ~aiometer:*); the
        # client's NOPERM error surfaces at once, it is not retried as an outage.
        with pytest.raises(Exception, match="no permissions to access"):
            await limiter.acquire()


# -- 3. TLS ------------------------------------------------------------------------------------

_CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXTENSIONS = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    wrong_host_cert: Path
    wrong_host_key: Path


def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=directory, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _make_ca(directory: Path, stem: str) -> None:
    config = directory / f"{stem}.cnf"
    config.write_text(_CA_CONFIG.format(cn=f"aiometer test {stem}"))
    _openssl(directory, "req", "-x509", *_EC_KEY, "-config", config.name, "-days", "2",
             "-keyout", f"{stem}.key", "-out", f"{stem}.crt")  # fmt: skip


def _make_leaf(directory: Path, stem: str, common_name: str, san: str) -> None:
    (directory / f"{stem}.ext").write_text(_LEAF_EXTENSIONS.format(san=san))
    _openssl(directory, "req", *_EC_KEY, "-config", "ca.cnf", "-subj", f"/CN={common_name}",
             "-keyout", f"{stem}.key", "-out", f"{stem}.csr")  # fmt: skip
    _openssl(directory, "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{stem}.ext",
             "-out", f"{stem}.crt")  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    require_tls()  # before making certificates no server could use
    directory = tmp_path_factory.mktemp("tls")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _make_leaf(directory, "server", "127.0.0.1", "IP:127.0.0.1")
    _make_leaf(directory, "wrong-host", "redis.example", "DNS:redis.example,IP:192.0.2.1")
    return Certificates(
        ca=directory / "ca.crt",
        other_ca=directory / "other-ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        wrong_host_cert=directory / "wrong-host.crt",
        wrong_host_key=directory / "wrong-host.key",
    )


@dataclass(frozen=True)
class TlsServer:
    server: RedisServer
    tls_port: int


def _start_tls_server(ca: Path, cert: Path, key: Path) -> TlsServer:
    """A RedisServer with a TLS port besides its plain port (RedisServer checks readiness
    with a plain PING, so the plain port stays open; the tests only use the TLS port)."""
    require_tls()
    error: RuntimeError | None = None
    for _ in range(3):
        tls_port = _free_port()
        options = {
            "--tls-port": str(tls_port),
            "--tls-cert-file": str(cert),
            "--tls-key-file": str(key),
            "--tls-ca-cert-file": str(ca),
            "--tls-auth-clients": "no",
        }
        server = RedisServer([part for option in options.items() for part in option])
        try:
            server.start()
        except RuntimeError as exc:
            error = exc
            if "Address already in use" in str(exc):
                continue
            break
        return TlsServer(server, tls_port)
    pytest.fail(f"redis-server did not start with TLS (built without TLS support?): {error}")


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[TlsServer]:
    running = _start_tls_server(certificates.ca, certificates.server_cert, certificates.server_key)
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def wrong_host_server(certificates: Certificates) -> Iterator[TlsServer]:
    running = _start_tls_server(
        certificates.ca, certificates.wrong_host_cert, certificates.wrong_host_key
    )
    yield running
    running.server.stop()


def _tls_url(port: int, ca: Path, *, check_hostname: bool = False) -> str:
    query = {"ssl_ca_certs": str(ca), "ssl_cert_reqs": "required"}
    if check_hostname:
        query["ssl_check_hostname"] = "true"
    return f"rediss://127.0.0.1:{port}/0?{urllib.parse.urlencode(query)}"


async def _ping_error(url: str, anyio_backend: str) -> BaseException | None:
    """PING through the backend's own client; return what it raised (None if it answered)."""
    try:
        if anyio_backend == "asyncio":
            client = redis.asyncio.Redis.from_url(url)
            try:
                await client.ping()
            finally:
                await client.aclose()
        else:
            import coredis

            async with coredis.Redis.from_url(url) as other:
                await other.ping()
    except Exception as exc:
        return exc
    return None


@pytest.mark.anyio
async def test_tls_runs_the_whole_flow(tls_server: TlsServer, certificates: Certificates) -> None:
    url = _tls_url(tls_server.tls_port, certificates.ca, check_hostname=True)
    await exercise(url, _unique("tls"))


@pytest.mark.anyio
async def test_tls_rejects_a_server_from_another_ca(
    tls_server: TlsServer, certificates: Certificates, anyio_backend: str
) -> None:
    url = _tls_url(tls_server.tls_port, certificates.other_ca)
    error, _ = await _acquire_with(url, _unique("other-ca"))
    assert isinstance(error, RedisUnavailableError), _chain_text(error)
    # The limiter's own error does not say why (the same synthetic TimeoutError as in
    # test_bad_password_error_names_authentication); the client's error does.
    ping_error = await _ping_error(url, anyio_backend)
    assert ping_error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in _chain_text(ping_error)


@pytest.mark.anyio
async def test_tls_checks_the_host_name_when_asked(
    wrong_host_server: TlsServer, certificates: Certificates, anyio_backend: str
) -> None:
    url = _tls_url(wrong_host_server.tls_port, certificates.ca, check_hostname=True)
    error, _ = await _acquire_with(url, _unique("wrong-host"))
    assert isinstance(error, RedisUnavailableError), _chain_text(error)
    ping_error = await _ping_error(url, anyio_backend)
    assert ping_error is not None
    assert "mismatch" in _chain_text(ping_error)


@pytest.mark.anyio
async def test_tls_host_name_check_default_differs_by_client(
    wrong_host_server: TlsServer, certificates: Certificates, anyio_backend: str
) -> None:
    """Without ssl_check_hostname in the URL, redis-py (asyncio) checks the host name but
    coredis (trio) does not: it accepts any certificate the CA signed. A deployment on trio
    must put ssl_check_hostname=true in its rediss:// URL."""
    url = _tls_url(wrong_host_server.tls_port, certificates.ca)
    ping_error = await _ping_error(url, anyio_backend)
    if anyio_backend == "asyncio":
        assert ping_error is not None
        assert "mismatch" in _chain_text(ping_error)
    else:
        assert ping_error is None


# -- 4. the password never leaks ---------------------------------------------------------------


@pytest.mark.anyio
async def test_password_appears_in_no_repr_error_or_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    server = RedisServer(["--requirepass", PASSWORD]).start()
    try:
        url = _password_url(server)
        limiter = RedisLimiter.from_url(
            url, _unique("leak"), max_at_once=2, lease_ttl=0.3, retry_window=0.2
        )
        texts += [repr(limiter), str(limiter)]
        with anyio.fail_after(20):
            async with limiter:
                texts += [repr(limiter), str(limiter)]
                lost = await limiter.acquire()
                await limiter.reset()  # the lease is gone: the next renewal reports it lost
                while not lost.lost:
                    await anyio.sleep(0.02)
                await lost.release()
                kept = await limiter.acquire()
                texts += [repr(kept), repr(await limiter.statistics())]
                server.stop()
                await kept.release()  # fails: logged, left to expire
                with pytest.raises(RedisUnavailableError) as info:
                    await limiter.acquire()
                texts += [str(info.value), repr(info.value)]
                texts.append("".join(traceback.format_exception(info.value)))
    finally:
        server.stop()
    ours = [record.getMessage() for record in caplog.records if record.name == "aiometer_redis"]
    assert any(lost.lease_id in message for message in ours), ours
    assert any(kept.lease_id in message for message in ours), ours
    texts += ours
    texts.append(caplog.text)  # every logger, with the formatted tracebacks
    for text in texts:
        assert PASSWORD not in text


# -- 5. names and prefixes ---------------------------------------------------------------------

_SPECIAL = "{}:% \t\n\x00*?[]\\'\"é中😀"
# No lone surrogates: they cannot be encoded at all (see the last test).
_CHARACTERS = st.one_of(st.sampled_from(_SPECIAL), st.characters(codec="utf-8"))
_ANY_TEXT = st.text(_CHARACTERS, max_size=12)
_NAMES = st.text(_CHARACTERS, min_size=1, max_size=12)
_PREFIXES = st.one_of(
    st.just("aiometer"),
    st.text(_CHARACTERS.filter(lambda c: c not in "{}"), min_size=1, max_size=8),
)
_EDGE_VALUES: tuple[object, ...] = (
    *(0, 0.0, -0.0, -1, 0.1, 0.10000001, 86_400, 86_401.0),
    *(math.nan, math.inf, -math.inf, 10**30, 2**63, 1e300, 1e-300),
)
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.sampled_from(_EDGE_VALUES),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=1),
)
_VALID: dict[str, st.SearchStrategy[Any]] = {
    "name": _NAMES,
    "prefix": _PREFIXES,
    "max_at_once": st.one_of(st.none(), st.integers(1, 3)),
    "max_per_second": st.one_of(st.none(), st.floats(0.5, 1e6), st.integers(1, 1000)),
    "burst": st.integers(1, 5),
    "lease_ttl": st.one_of(st.floats(0.2, 120.0), st.integers(1, 120)),
}
_WILD: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(_ANY_TEXT, _ANY_VALUE),
    "prefix": st.one_of(_ANY_TEXT, _ANY_VALUE),
    "max_at_once": _ANY_VALUE,
    "max_per_second": _ANY_VALUE,
    "burst": _ANY_VALUE,
    "lease_ttl": _ANY_VALUE,
}


@st.composite
def _configurations(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly sensible options, with up to three of them replaced by anything at all."""
    config = {field: draw(strategy) for field, strategy in _VALID.items()}
    for field in sorted(draw(st.sets(st.sampled_from(sorted(_VALID)), max_size=3))):
        config[field] = draw(_WILD[field])
    return config


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _judge(config: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Return the options that are certainly wrong, and those that are legal but extreme
    (a limiter may reject them, or must work with them)."""
    wrong: set[str] = set()
    extreme: set[str] = set()
    name, prefix = config["name"], config["prefix"]
    if not isinstance(name, str) or not name:
        wrong.add("name")
    if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
        wrong.add("prefix")
    max_at_once, rate, burst = config["max_at_once"], config["max_per_second"], config["burst"]
    if max_at_once is None and rate is None:
        wrong |= {"max_at_once", "max_per_second"}
    if max_at_once is not None and not _is_count(max_at_once):
        wrong.add("max_at_once")
    elif _is_count(max_at_once) and max_at_once > 2**53:
        extreme.add("max_at_once")
    rate_ok = _is_number(rate) and math.isfinite(rate) and rate > 0
    if rate is not None and not rate_ok:
        wrong.add("max_per_second")
    elif rate_ok and rate > 1e12:
        extreme.add("max_per_second")
    if not _is_count(burst):
        wrong.add("burst")
    elif burst > 2**53:
        extreme.add("burst")
    elif rate_ok and burst / rate > 86_400:
        extreme |= {"burst", "max_per_second"}
    lease_ttl = config["lease_ttl"]
    if not (_is_number(lease_ttl) and math.isfinite(lease_ttl) and lease_ttl > 0.1):
        wrong.add("lease_ttl")
    elif lease_ttl > 86_400:
        extreme.add("lease_ttl")
    return wrong, extreme


def _can_queue(config: dict[str, Any]) -> bool:
    """Small enough max_at_once to fill, and no rate delay worth waiting for."""
    rate = config["max_per_second"]
    return (
        config["max_at_once"] is not None
        and config["max_at_once"] <= 2
        and (rate is None or rate >= 50 or config["burst"] >= 4)
    )


async def _use(url: str, config: dict[str, Any]) -> tuple[str, ...] | BaseException:
    """Build a limiter from *config*; if that works, acquire and release (and, when the
    limit is small, queue a second process behind it); return its keys."""
    try:
        limiter = RedisLimiter.from_url(url, **config)
    except (ConfigurationError, TypeError) as exc:
        return exc
    with anyio.fail_after(10):
        async with limiter:
            permit = await limiter.acquire()
            await permit.release()
            if _can_queue(config):
                async with RedisLimiter.from_url(url, **config) as other:
                    held = [await limiter.acquire() for _ in range(config["max_at_once"])]
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(_hold_once, other)
                        while not (await limiter.statistics()).waiters:
                            await anyio.sleep(0.005)
                        await held[0].release()
                    for permit in held:
                        await permit.release()
            stats = await limiter.statistics()
            assert stats.holders == ()
            assert stats.waiters == ()
    return limiter.keys


async def _hold_once(limiter: RedisLimiter) -> None:
    async with limiter.slot():
        pass


def _hash_tag(key: bytes) -> bytes:
    start = key.index(b"{")
    return key[start + 1 : key.index(b"}", start + 1)]


@pytest.fixture(scope="module")
def names_server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="module")
def names_admin(names_server: RedisServer) -> Iterator[redis.Redis]:
    admin = redis.Redis(port=names_server.port)
    yield admin
    admin.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=_configurations())
@example(config={**dict.fromkeys(_VALID), "name": "", "prefix": "", "burst": 1})
@example(config={"name": "a}b{c", "prefix": "p:q", "max_at_once": 1, "max_per_second": None,
                 "burst": 1, "lease_ttl": 0.2})  # fmt: skip
@example(config={"name": "%7B", "prefix": "aiometer", "max_at_once": 2, "max_per_second": 60.0,
                 "burst": 1, "lease_ttl": 1})  # fmt: skip
@example(config={"name": "x", "prefix": "aiometer", "max_at_once": None,
                 "max_per_second": 1e-300, "burst": 1, "lease_ttl": 1e300})  # fmt: skip
@example(config={"name": "{}", "prefix": "a b", "max_at_once": 10**30, "max_per_second": 1e300,
                 "burst": 2**63, "lease_ttl": 86_400})  # fmt: skip
def test_any_configuration_is_rejected_or_keeps_to_its_keys(
    names_server: RedisServer, names_admin: redis.Redis, config: dict[str, Any]
) -> None:
    names_admin.flushdb()
    wrong, extreme = _judge(config)
    outcome = anyio.run(_use, names_server.url, config, backend="asyncio")
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, ConfigurationError | TypeError)
        assert wrong or extreme, f"valid options rejected: {outcome!r}"
        # The message names the culprit before quoting the value it got.
        head = str(outcome).split(", got ")[0]
        named = {field for field in _VALID if re.search(rf"(?<!\w){field}(?!\w)", head)}
        assert named & (wrong | extreme), f"{outcome!r} names none of {wrong | extreme}"
        return
    assert not wrong, f"accepted although {wrong} are wrong"
    own = {key.encode() for key in outcome}
    assert len(own) == len(outcome)
    mailboxes = outcome[0][: outcome[0].index("}") + 1].encode() + b":mb:"
    present = _keys_of(names_admin)
    assert present, "the limiter wrote nothing"
    for key in present:
        assert key in own or key.startswith(mailboxes), key
    tags = {_hash_tag(key) for key in present | own}
    assert len(tags) == 1
    assert tags != {b""}


_PAIRS = st.tuples(_PREFIXES, _NAMES)


@settings(max_examples=500, deadline=None)
@given(first=_PAIRS, second=_PAIRS)
@example(first=("aiometer", "x}y"), second=("aiometer", "x%7Dy"))
@example(first=("aiometer", "%"), second=("aiometer", "%25"))
@example(first=("a:b", "c"), second=("a", "b:c"))
@example(first=("a", "b}:mb:c"), second=("a", "b"))
@example(first=("a", "{b}"), second=("a", "b"))
def test_different_names_or_prefixes_never_share_a_key(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    keys = {pair: limiter_keys(pair[1], pair[0]) for pair in (first, second)}
    for pair_keys in keys.values():
        assert len(set(pair_keys)) == len(pair_keys)
        assert len({_hash_tag(key.encode()) for key in pair_keys}) == 1
    if first == second:
        assert keys[first] == keys[second]
        return
    mailboxes = {pair: mailbox_prefix(pair[1], pair[0]) for pair in keys}
    assert not set(keys[first]) & set(keys[second])
    assert not mailboxes[first].startswith(mailboxes[second])
    assert not mailboxes[second].startswith(mailboxes[first])
    for key in keys[first]:
        assert not key.startswith(mailboxes[second])
    for key in keys[second]:
        assert not key.startswith(mailboxes[first])


def test_unencodable_name_is_rejected_at_construction() -> None:
    """A name with a lone surrogate cannot be sent to Redis at all."""
    with pytest.raises(ConfigurationError, match="name"):
        RedisLimiter.from_url("redis://127.0.0.1:1/0", "bad\ud800name", max_at_once=1)
