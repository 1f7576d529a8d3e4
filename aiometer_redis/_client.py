"""A narrow async adapter over the supported Redis clients.

The limiters need only a handful of operations from a client: run a Lua script, block
on a list, listen on a pub/sub channel, ping, delete keys. :class:`ScriptClient` names
exactly those, and :func:`adapt` wraps a user's client in the matching implementation:

* :class:`RedisPyClient` for ``redis.asyncio.Redis`` and ``redis.asyncio.RedisCluster``
  (asyncio only);
* :class:`CoredisClient` for ``coredis.Redis`` and ``coredis.RedisCluster`` (anyio based,
  so it also runs on trio).

Both client libraries are optional and are never imported here at run time: a client
object can only be an instance of a class whose module is already imported.

Every reply is normalised with :func:`normalize_reply` (bytes become str, recursively),
so callers see the same shapes whatever ``decode_responses`` the client was built with, and
every error of the client library is mapped by the adapter to the neutral errors of
:mod:`aiometer_redis._errors` (chained from the library's own), so the limiter never needs to
know a client library's exception classes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import anyio
import anyio.lowlevel
import sniffio

from ._errors import ClientError, ErrorMap, ErrorReply
from ._scripts import Script
from ._urls import SentinelURL, parse_url

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import coredis
    import redis.asyncio

__all__ = [
    "CoredisClient",
    "RedisPyClient",
    "ScriptArg",
    "ScriptClient",
    "Subscription",
    "adapt",
    "client_from_url",
    "encode_args",
    "normalize_reply",
]

#: A value accepted in a script's ARGV.
ScriptArg = str | int | float


class Subscription(Protocol):
    """A channel subscription held by :meth:`ScriptClient.subscribe`.

    Attributes:
        confirmed: how many times Redis confirmed the subscription: 1 after the first
            SUBSCRIBE, one more after each re-subscription the client library made on its
            own after a reconnection. Messages published while it was not subscribed are
            lost: a caller that sees this number grow asks again for what it may have missed.
    """

    confirmed: int

    async def receive(self, timeout: float) -> str | None:
        """The next message published on the channel, waiting up to ``timeout`` seconds;
        None when none came (a confirmation also returns None, after counting it)."""
        ...


@runtime_checkable
class ScriptClient(Protocol):
    """What the Redis limiters need from a client.

    Implementations return replies normalised by :func:`normalize_reply` and raise the
    neutral errors of :mod:`aiometer_redis._errors` (``Unavailable``, ``PoolFull``,
    ``Refused``, ``ErrorReply``) in place of the client library's own.
    """

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        """Run ``script`` with EVALSHA, falling back to EVAL once on NOSCRIPT.

        With ``wake_first``, a PING goes in front of the EVALSHA, in the same write. Redis
        writes the replies of one event-loop turn to the newest client first, so a message
        the script publishes would otherwise reach its subscriber after this call's reply
        has reached the caller; with the PING queued first, the caller is the older client
        and the subscriber's message is written first. (On a machine with few cores, whoever
        is written first also runs first.)"""
        ...

    async def blpop(self, key: str, timeout: float) -> str | None:
        """Pop the head of list ``key``, waiting up to ``timeout`` seconds; None on timeout."""
        ...

    @property
    def can_subscribe(self) -> bool:
        """Whether :meth:`subscribe` may be used (False for cluster clients: a message
        published on a cluster goes to every node)."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to ``channel`` on a connection of its own (taken from the client's pool
        and given back on exit, unsubscribed)."""
        ...

    async def ping(self) -> None:
        """Round-trip a PING; raise the client's error if the server does not answer."""
        ...

    async def delete(self, *keys: str) -> int:
        """Delete ``keys``; return how many existed."""
        ...

    async def aclose(self) -> None:
        """Close the underlying client if this adapter owns it, else do nothing."""
        ...


def normalize_reply(reply: Any) -> Any:
    """Return ``reply`` with bytes decoded as UTF-8 and lists/tuples turned into lists.

    Applied recursively, so a script reply such as ``[b"id", [b"a", 1]]`` becomes
    ``["id", ["a", 1]]``. Other values (int, None, str) are returned unchanged.
    """
    if isinstance(reply, bytes):
        return reply.decode("utf-8")
    if isinstance(reply, (list, tuple)):
        return [normalize_reply(item) for item in reply]
    return reply


def encode_args(args: Sequence[ScriptArg]) -> list[str]:
    """Script arguments as the adapters send them: floats as repr (an exact round trip),
    the rest as str, so that both client libraries send byte-identical ARGV."""
    encoded: list[str] = []
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
            raise TypeError(f"script arguments must be str, int or float, got {arg!r}")
        encoded.append(repr(arg) if isinstance(arg, float) else str(arg))
    return encoded


def _check_timeout(timeout: float) -> float:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout must be a finite number >= 0, got {timeout!r}")
    return float(timeout)


def _popped_value(reply: Any) -> str | None:
    if reply is None:
        return None
    value = normalize_reply(reply)[1]
    assert isinstance(value, str)
    return value


#: PING in RESP, and the most (script, key list) heads a client keeps packed.
_PACKED_PING = b"*1\r\n$4\r\nPING\r\n"
_MAX_PACKED_HEADS = 256


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


@functools.cache
def _redis_py_errors() -> ErrorMap:
    import redis.exceptions as errors

    # ClusterError: redis-py gave up following redirections (e.g. TRYAGAIN while the limiter's
    # slot migrates); Redis refuses a script before running any of it then. MaxConnectionsError
    # and AuthenticationError derive from ConnectionError: ErrorMap looks at them first.
    return ErrorMap(
        refused=(errors.AuthenticationError,),
        pool=(errors.MaxConnectionsError,),
        unavailable=(errors.ConnectionError, errors.TimeoutError, errors.ClusterError),
        reply=(errors.ResponseError,),
    )


@functools.cache
def _coredis_errors() -> ErrorMap:
    import coredis.exceptions as errors

    return ErrorMap(
        refused=(errors.AuthenticationError,),
        pool=(),
        unavailable=(
            errors.ConnectionError,
            errors.BusyLoadingError,
            errors.TryAgainError,
            errors.ClusterDownError,
        ),
        reply=(errors.ResponseError,),
    )


class RedisPyClient:
    """:class:`ScriptClient` over ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``.

    Args:
        client: the redis-py asyncio client.
        owned: close ``client`` in :meth:`aclose` (set when the caller created the
            client for the limiter, e.g. from a URL).

    Note that :meth:`blpop` is subject to the client's ``socket_timeout``: a timeout
    longer than that raises the client's ``TimeoutError``.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        owned: bool = False,
    ) -> None:
        # Any from here on: redis-py's annotations mix sync and async return types.
        self._client: Any = client
        self._owned = owned
        # Only the cluster client has initialize(). Used concurrently before it has
        # discovered the cluster, redis-py 8 can drop a connection while it is still
        # connecting; discovering it once, first, avoids that.
        self._needs_init = hasattr(client, "initialize")
        self._is_cluster = _is_instance_from(client, "redis.asyncio", ("RedisCluster",))
        self._errors = _redis_py_errors()
        # What _packed_evalsha packed once: (sha1, keys, encoding, errors) -> RESP bytes.
        self._evalsha_heads: dict[tuple[str, tuple[str, ...], str, str], bytes] = {}

    async def _ready(self) -> None:
        if self._needs_init:
            await self._client.initialize()  # idempotent, and holds a lock
            self._needs_init = False

    @property
    def client(self) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
        """The wrapped redis-py client."""
        wrapped: redis.asyncio.Redis | redis.asyncio.RedisCluster = self._client
        return wrapped

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        """Run ``script`` with EVALSHA; on NOSCRIPT run it with EVAL (which caches it).
        ``wake_first``: see :meth:`ScriptClient.run_script` (ignored by a cluster client)."""
        from redis.exceptions import NoScriptError

        argv = encode_args(args)
        try:
            await self._ready()
            try:
                if self._is_cluster:
                    reply = await self._client.evalsha(script.sha1, len(keys), *keys, *argv)
                else:
                    reply = await self._evalsha(script, keys, argv, ping=wake_first)
            except NoScriptError:
                # EVAL goes to the node that owns the keys' slot and leaves the script
                # cached there, so this also repairs the cache after a flush or failover.
                reply = await self._client.eval(script.source, len(keys), *keys, *argv)
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
        return normalize_reply(reply)

    async def _evalsha(
        self, script: Script, keys: Sequence[str], argv: list[str], *, ping: bool
    ) -> Any:
        """EVALSHA (after a PING in the same write if *ping*) straight on a connection of
        the pool, as a redis-py pipeline would go (also for a single-connection client),
        packed here: redis-py's command path (packing each argument, its wrappers) cost
        tens of us per call more, on every acquisition and on the path of the grants a call
        hands to other processes. Any error while sending or reading disconnects the
        connection, as in redis-py; the limiter retries the call."""
        from redis.exceptions import ResponseError

        pool = self._client.connection_pool
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            conn = await pool.get_connection("EVALSHA")
        try:
            await conn.send_packed_command(
                self._packed_evalsha(conn, script.sha1, keys, argv, ping=ping)
            )
            if ping:
                with contextlib.suppress(ResponseError):  # a user the ACL denies PING
                    await conn.read_response()
            return await conn.read_response()
        finally:
            await pool.release(conn)

    def _packed_evalsha(
        self, conn: Any, sha1: str, keys: Sequence[str], argv: list[str], *, ping: bool
    ) -> bytes:
        """``EVALSHA sha1 len(keys) *keys *argv`` in RESP, after a PING if *ping*, as
        redis-py packs them (strings encoded with the connection's encoding), but packed
        here: the part up to the keys once per script and key list, the rest in one pass."""
        encoder = conn.encoder
        encoding, errors = encoder.encoding, encoder.encoding_errors
        cache_key = (sha1, tuple(keys), encoding, errors)
        head = self._evalsha_heads.get(cache_key)
        if head is None:
            if len(self._evalsha_heads) >= _MAX_PACKED_HEADS:
                self._evalsha_heads.clear()
            head = b"".join(
                _bulk(part.encode(encoding, errors))
                for part in ("EVALSHA", sha1, str(len(keys)), *keys)
            )
            self._evalsha_heads[cache_key] = head
        tail = [_bulk(arg.encode(encoding, errors)) for arg in argv]
        first = _PACKED_PING if ping else b""
        return b"%s*%d\r\n%s%s" % (first, 3 + len(keys) + len(argv), head, b"".join(tail))

    async def blpop(self, key: str, timeout: float) -> str | None:
        """Pop the head of list ``key``, waiting up to ``timeout`` seconds; None on timeout.

        ``timeout`` may be fractional; 0 waits forever (Redis semantics).
        """
        timeout = _check_timeout(timeout)
        try:
            await self._ready()
            reply = await self._client.blpop([key], timeout=timeout)
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
        return _popped_value(reply)

    @property
    def can_subscribe(self) -> bool:
        """False for ``redis.asyncio.RedisCluster``."""
        return not self._is_cluster

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        """Subscribe to ``channel`` on a connection taken from the client's pool (given back,
        disconnected, on exit). redis-py re-subscribes by itself after a reconnection within
        its retry policy; a connection it cannot restore raises ``Unavailable``."""
        if self._is_cluster:
            raise TypeError("pub/sub is not used with a cluster client")
        pubsub = self._client.pubsub()
        try:
            try:
                await pubsub.subscribe(channel)
            except Exception as exc:
                raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
            yield _Subscription(pubsub, self._errors)
        finally:
            # Closing drops the connection: Redis ends its subscriptions with it.
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()

    async def ping(self) -> None:
        """Round-trip a PING."""
        try:
            await self._ready()
            await self._client.ping()
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral

    async def delete(self, *keys: str) -> int:
        """Delete ``keys``; return how many existed."""
        if not keys:
            return 0
        try:
            await self._ready()
            return int(await self._client.delete(*keys))
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral

    async def aclose(self) -> None:
        """Close the client if this adapter owns it."""
        if not self._owned:
            return
        close = getattr(self._client, "aclose", None) or self._client.close
        await close()

    def __repr__(self) -> str:
        return f"RedisPyClient({self._client!r})"


class CoredisClient:
    """:class:`ScriptClient` over ``coredis.Redis`` or ``coredis.RedisCluster``.

    coredis is built on anyio, so this adapter works on asyncio and trio. coredis 6
    clients must be entered (``async with client:``) by their creator before use, and
    are closed when that block exits; :meth:`aclose` therefore does nothing.
    """

    def __init__(self, client: coredis.Redis[Any] | coredis.RedisCluster[Any]) -> None:
        self._client: Any = client
        self._errors = _coredis_errors()
        self._is_cluster = _is_instance_from(client, "coredis", ("RedisCluster",))

    @property
    def client(self) -> coredis.Redis[Any] | coredis.RedisCluster[Any]:
        """The wrapped coredis client."""
        wrapped: coredis.Redis[Any] | coredis.RedisCluster[Any] = self._client
        return wrapped

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        """Run ``script`` with EVALSHA; on NOSCRIPT run it with EVAL (which caches it).
        ``wake_first``: see :meth:`ScriptClient.run_script` (ignored by a cluster client)."""
        from coredis.exceptions import NoScriptError

        key_list = list(keys)
        argv = encode_args(args)
        try:
            try:
                if wake_first and not self._is_cluster:
                    async with self._client.pipeline(
                        transaction=False, raise_on_error=False
                    ) as pipe:
                        pipe.ping()
                        pending = pipe.evalsha(script.sha1, keys=key_list, args=argv)
                    reply = await pending
                else:
                    reply = await self._client.evalsha(script.sha1, keys=key_list, args=argv)
            except NoScriptError:
                reply = await self._client.eval(script.source, keys=key_list, args=argv)
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
        return normalize_reply(reply)

    async def blpop(self, key: str, timeout: float) -> str | None:
        """Pop the head of list ``key``, waiting up to ``timeout`` seconds; None on timeout.

        ``timeout`` may be fractional; 0 waits forever (Redis semantics).
        """
        timeout = _check_timeout(timeout)
        try:
            reply = await self._client.blpop([key], timeout=timeout)
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
        return _popped_value(reply)

    @property
    def can_subscribe(self) -> bool:
        """False for ``coredis.RedisCluster``."""
        return not self._is_cluster

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        """Subscribe to ``channel`` on a connection taken from the client's pool (given back
        on exit, unsubscribed). A lost connection raises ``Unavailable`` (coredis's own
        reconnections are turned off: their delays grow with each loss for the life of the
        subscription; the caller subscribes again after its own backoff)."""
        if self._is_cluster:
            raise TypeError("pub/sub is not used with a cluster client")
        from coredis.retry import NoRetryPolicy

        subscribed = False
        try:
            async with self._client.pubsub(
                channels=[channel], retry_policy=NoRetryPolicy(), subscription_timeout=5
            ) as pubsub:
                subscribed = True
                yield _Subscription(pubsub, self._errors)
        except BaseException as exc:
            if not isinstance(exc, (Exception, BaseExceptionGroup)):
                raise
            # coredis runs the subscription in a task group of its own: cancelled while
            # that group fails (a refused SUBSCRIBE), it raises both in one group, or its
            # failure alone. The cancellation goes on; the failure is dropped.
            await anyio.lowlevel.checkpoint_if_cancelled()
            if not isinstance(exc, Exception):
                raise
            leaf = _leaf(exc)
            if not subscribed and isinstance(leaf, TimeoutError) and await self._answers():
                # On asyncio, coredis reports a SUBSCRIBE that Redis refused (an ACL without
                # the channel) as an acknowledgement that never came.
                raise ErrorReply(
                    f"Redis answers, but did not acknowledge SUBSCRIBE {channel} (does the "
                    "user's ACL allow SUBSCRIBE and the channel?)",
                    "NOPERM",
                ) from leaf
            raise _neutral(self._errors, leaf)  # noqa: B904 - chained in _neutral

    async def _answers(self) -> bool:
        try:
            await self.ping()
        except ClientError:
            return False
        return True

    async def ping(self) -> None:
        """Round-trip a PING."""
        try:
            await self._client.ping()
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral

    async def delete(self, *keys: str) -> int:
        """Delete ``keys``; return how many existed."""
        if not keys:
            return 0
        try:
            return int(await self._client.delete(list(keys)))
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral

    async def aclose(self) -> None:
        """Do nothing: the coredis client is closed by the ``async with`` that opened it."""

    def __repr__(self) -> str:
        return f"CoredisClient({self._client!r})"


class _Subscription:
    """:class:`Subscription` over a subscribed ``PubSub`` of redis-py or coredis (both have
    ``get_message(timeout=...)`` returning a dict, or None when nothing came)."""

    def __init__(self, pubsub: Any, errors: ErrorMap) -> None:
        self._pubsub = pubsub
        self._errors = errors
        self.confirmed = 0

    async def receive(self, timeout: float) -> str | None:
        timeout = _check_timeout(timeout)
        try:
            message = await self._pubsub.get_message(timeout=timeout)
        except Exception as exc:
            raise _neutral(self._errors, exc)  # noqa: B904 - chained in _neutral
        return _published(self, message)


def _published(subscription: Subscription, message: Any) -> str | None:
    """The data of a published *message* (a dict of either library); a confirmation of the
    subscription is counted in *subscription* and gives None, as do other kinds."""
    if message is None:
        return None
    kind = normalize_reply(message["type"])
    if kind == "subscribe":
        subscription.confirmed += 1
        return None
    if kind != "message":
        return None
    data = normalize_reply(message["data"])
    assert isinstance(data, str)
    return data


def _leaf(exc: Exception) -> Exception:
    """The first error inside nested exception groups (coredis runs a subscription in a task
    group), or *exc* itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        first = exc.exceptions[0]
        if not isinstance(first, Exception):
            break
        exc = first
    return exc


def _neutral(errors: ErrorMap, exc: Exception) -> Exception:
    """The neutral error for the library's *exc*, chained from it; an error the map does not
    know (a bug, a TypeError) is returned as it is."""
    mapped = errors.map(exc)
    if mapped is None or mapped is exc:
        return exc
    mapped.__cause__ = exc
    return mapped


def _is_instance_from(client: object, module_name: str, class_names: Sequence[str]) -> bool:
    module = sys.modules.get(module_name)
    if module is None:
        return False
    classes = tuple(
        cls for name in class_names if isinstance(cls := getattr(module, name, None), type)
    )
    return bool(classes) and isinstance(client, classes)


def adapt(client: object) -> ScriptClient:
    """Wrap a Redis client in the matching :class:`ScriptClient`.

    Accepts ``redis.asyncio.Redis``, ``redis.asyncio.RedisCluster``, ``coredis.Redis``,
    ``coredis.RedisCluster``, or an adapter from this module (returned as is). The
    adapter does not own the client: closing it stays the caller's job.

    Raises:
        TypeError: ``client`` is of any other type, including redis-py's synchronous
            ``redis.Redis``.
    """
    if isinstance(client, (RedisPyClient, CoredisClient)):
        return client
    if _is_instance_from(client, "redis.asyncio", ("Redis", "RedisCluster")):
        return RedisPyClient(cast("redis.asyncio.Redis", client))
    if _is_instance_from(client, "coredis", ("Redis", "RedisCluster")):
        return CoredisClient(cast("coredis.Redis[Any]", client))
    if _is_instance_from(client, "redis", ("Redis", "RedisCluster")):
        raise TypeError(
            f"{type(client).__module__}.{type(client).__qualname__} is synchronous; "
            "pass a redis.asyncio.Redis or redis.asyncio.RedisCluster instead"
        )
    raise TypeError(
        "expected a redis.asyncio.Redis, redis.asyncio.RedisCluster, coredis.Redis or "
        f"coredis.RedisCluster client, got {type(client).__module__}."
        f"{type(client).__qualname__}"
    )


@asynccontextmanager
async def client_from_url(url: str) -> AsyncIterator[ScriptClient]:
    """Open a client for *url* (see :mod:`aiometer_redis._urls`), and close it on exit.

    On asyncio the client is redis-py's when it is installed, else coredis's; on trio it is
    coredis's. A Sentinel URL gives a client of the service's current primary, which follows
    a failover.
    """
    sentinel = parse_url(url)
    if sniffio.current_async_library() == "asyncio":
        try:
            import redis.asyncio
        except ImportError:
            pass
        else:
            async with AsyncExitStack() as stack:
                if sentinel is None:
                    client: Any = redis.asyncio.Redis.from_url(url, **_no_client_info())
                else:
                    client = _redis_py_primary(sentinel, stack)
                adapter = RedisPyClient(client, owned=True)
                stack.push_async_callback(_closed_shielded, adapter)
                yield adapter
            return
    import coredis

    async with AsyncExitStack() as stack:
        if sentinel is None:
            coredis_client = await stack.enter_async_context(coredis.Redis.from_url(url))
        else:
            coredis_client = await _coredis_primary(sentinel, stack)
        yield adapt(coredis_client)


@functools.cache
def _no_client_info() -> dict[str, Any]:
    """Options that keep redis-py from sending CLIENT SETINFO on every new connection (its
    library name and version): a Redis user made for the limiter may not run CLIENT, and each
    refused handshake would leave an entry in the ACL log. Empty for a redis-py without
    them."""
    import redis.asyncio

    parameters = inspect.signature(redis.asyncio.Redis.__init__).parameters
    if "driver_info" in parameters:  # redis-py 7.1 and later (lib_name is deprecated there)
        return {"driver_info": None}
    return {name: None for name in ("lib_name", "lib_version") if name in parameters}


async def _closed_shielded(adapter: RedisPyClient) -> None:
    with anyio.CancelScope(shield=True):
        await adapter.aclose()


def _credentials(username: str | None, password: str | None) -> dict[str, str]:
    return {
        key: value
        for key, value in (("username", username), ("password", password))
        if value is not None
    }


def _redis_py_primary(url: SentinelURL, stack: AsyncExitStack) -> Any:
    from redis.asyncio import sentinel

    sentinel_class: Any = sentinel.Sentinel  # redis.asyncio.sentinel is untyped
    manager = sentinel_class(
        list(url.sentinels),
        sentinel_kwargs=_credentials(url.sentinel_username, url.sentinel_password),
        db=url.db,
        **_credentials(url.username, url.password),
        **_no_client_info(),
    )

    async def close_sentinels() -> None:
        with anyio.CancelScope(shield=True):
            for node in manager.sentinels:
                await node.aclose()

    stack.push_async_callback(close_sentinels)
    return manager.master_for(url.service_name)


async def _coredis_primary(url: SentinelURL, stack: AsyncExitStack) -> Any:
    import coredis
    from coredis.connection import TCPLocation

    primary_options: dict[str, Any] = {"db": url.db, **_credentials(url.username, url.password)}
    manager = await stack.enter_async_context(
        coredis.Sentinel(
            [TCPLocation(host, port) for host, port in url.sentinels],
            sentinel_kwargs=_credentials(url.sentinel_username, url.sentinel_password),
            **primary_options,
        )
    )
    return await stack.enter_async_context(manager.primary_for(url.service_name))
