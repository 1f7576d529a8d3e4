"""The fleet view: every limiter under a key prefix, read from Redis, for
``aiometer-redis exporter`` (Prometheus ``/metrics``) and ``aiometer-redis top``.

One read of the fleet is a SCAN for the limiters' keys (on every primary of a cluster), then one
read-only ``status.lua`` call per limiter. Both are bounded, so that a scrape costs the same
however many keys the database holds: at most ``max_limiters`` limiters are read, and the SCAN
stops after ``max_scanned`` keys (``truncated`` says when either cut the read short).

What Redis knows of a limiter is its state, not its options: the holders, the queue, the rate
state, the counter of tokens and tickets, and its ``control`` key: a pause in force, the limits
set at run time (``aiometer-redis set``) and the adaptive rate after a push-back. The limits a
process was configured with travel with each of its calls and are not stored, so they are not
exported here; the processes' own metrics (``RedisLimiter(..., metrics=True)``) cover them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ._client import ScriptClient, adapt, client_from_url, normalize_reply
from ._errors import ClientError
from ._exceptions import CorruptStateError, RedisLimiterError
from ._keys import control_key, costs_key, limiter_keys
from ._state import LimiterState, read_state

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from prometheus_client.metrics_core import Metric

__all__ = [
    "DEFAULT_MAX_LIMITERS",
    "DEFAULT_MAX_SCANNED",
    "DEFAULT_SCAN_COUNT",
    "Fleet",
    "FleetCollector",
    "FleetLimiter",
    "fleet_client",
    "limiter_names",
    "read_fleet",
]

#: Limiters read per scrape at most.
DEFAULT_MAX_LIMITERS = 1000
#: Keys looked at per scrape at most (SCAN's COUNT hint is DEFAULT_SCAN_COUNT per call).
DEFAULT_MAX_SCANNED = 100_000
DEFAULT_SCAN_COUNT = 1000

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_UNESCAPE = {"25": "%", "7B": "{", "7D": "}"}


@dataclass(frozen=True)
class FleetLimiter:
    """One limiter as Redis holds it.

    Attributes:
        name: the limiter's name.
        holders: leases held now, across every process.
        waiters: waiters queued now, across every process.
        next_start: seconds until the rate limit allows another start, for a burst of 1 (the
            stored rate state does not say the burst; with a larger burst the next start may
            be sooner). 0.0 without rate state.
        issued: fencing tokens and queue tickets handed out so far (the ``seq`` counter).
        paused_for: seconds until the fleet's pause ends (0.0: not paused).
        max_at_once_set: the ``max_at_once`` set at run time (None: none set).
        max_per_second_set: the ``max_per_second`` set at run time (None: none set).
        adaptive_rate: the fleet's adaptive rate per second after a push-back (None: none).
    """

    name: str
    holders: int
    waiters: int
    next_start: float
    issued: int
    paused_for: float = 0.0
    max_at_once_set: int | None = None
    max_per_second_set: float | None = None
    adaptive_rate: float | None = None

    @classmethod
    def of(cls, name: str, state: LimiterState) -> FleetLimiter:
        """The summary of *state*, read for limiter *name*."""
        start = max(0.0, state.tat) if state.tat is not None else 0.0
        if state.spare is not None:
            start = min(start, max(0.0, state.spare))
        control = state.control
        return cls(
            name,
            len(state.holders),
            len(state.waiters),
            max(start, control.paused_for),
            state.issued,
            control.paused_for,
            control.max_at_once,
            control.max_per_second,
            control.adaptive_rate,
        )


@dataclass(frozen=True)
class Fleet:
    """One read of every limiter under a prefix.

    Attributes:
        limiters: the limiters read, by name.
        truncated: True if ``max_limiters`` or ``max_scanned`` stopped the read early.
        errors: names whose state could not be read (keys written by something else).
        seconds: how long the read took.
    """

    limiters: tuple[FleetLimiter, ...]
    truncated: bool
    errors: tuple[str, ...]
    seconds: float


def _unescape_tag(tag: str) -> str:
    return re.sub(r"%(25|7B|7D)", lambda match: _UNESCAPE[match[1]], tag)


async def limiter_names(
    client: ScriptClient,
    prefix: str,
    *,
    max_limiters: int = DEFAULT_MAX_LIMITERS,
    max_scanned: int = DEFAULT_MAX_SCANNED,
    scan_count: int = DEFAULT_SCAN_COUNT,
) -> tuple[list[str], bool]:
    """The names of the limiters with keys under *prefix*, sorted, and whether the scan was
    cut short by *max_limiters* or *max_scanned*.

    The SCAN runs on every primary when the client is a cluster client (redis-py's and
    coredis's ``scan_iter`` both visit each node). It runs on the library's own client, so a
    failure raises the library's own error.
    """
    raw: Any = getattr(client, "client", None)
    if raw is None:
        raise TypeError(f"cannot scan through {client!r}: not a redis-py or coredis adapter")
    pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + ":{*"
    shape = re.compile(re.escape(prefix) + r":\{([^}]*)\}:")
    names: set[str] = set()
    scanned = 0
    truncated = False
    async with aclosing(raw.scan_iter(match=pattern, count=scan_count)) as keys:
        async for key in keys:
            scanned += 1
            found = shape.match(normalize_reply(key))
            if found is not None:
                names.add(_unescape_tag(found[1]))
            if len(names) > max_limiters or scanned >= max_scanned:
                truncated = True
                break
    ordered = sorted(names)
    return ordered[:max_limiters], truncated


async def read_fleet(
    client: ScriptClient,
    prefix: str,
    *,
    max_limiters: int = DEFAULT_MAX_LIMITERS,
    max_scanned: int = DEFAULT_MAX_SCANNED,
    scan_count: int = DEFAULT_SCAN_COUNT,
) -> Fleet:
    """Read every limiter under *prefix* (see the module's notes on the bounds).

    Raises:
        RedisLimiterError: Redis did not answer a limiter's read.
        Exception: the client library's own error, if Redis did not answer the SCAN.
    """
    start = time.perf_counter()
    names, truncated = await limiter_names(
        client, prefix, max_limiters=max_limiters, max_scanned=max_scanned, scan_count=scan_count
    )
    limiters: list[FleetLimiter] = []
    errors: list[str] = []
    for name in names:
        try:
            keys = [*limiter_keys(name, prefix), costs_key(name, prefix), control_key(name, prefix)]
            state = await read_state(client, keys, name)
        except CorruptStateError:
            errors.append(name)
            continue
        limiters.append(FleetLimiter.of(name, state))
    return Fleet(tuple(limiters), truncated, tuple(errors), time.perf_counter() - start)


@asynccontextmanager
async def fleet_client(url: str, *, cluster: bool = False) -> AsyncIterator[ScriptClient]:
    """A client of *url* for the fleet view: :func:`client_from_url`'s, or with *cluster* a
    cluster client (redis-py's on asyncio when installed, else coredis's)."""
    if not cluster:
        async with client_from_url(url) as client:
            yield client
        return
    import sniffio

    if sniffio.current_async_library() == "asyncio":
        try:
            from redis.asyncio import RedisCluster
        except ImportError:
            pass
        else:
            raw: Any = RedisCluster.from_url(url)
            try:
                yield adapt(raw)
            finally:
                with anyio.CancelScope(shield=True):
                    await raw.aclose()
            return
    import coredis

    async with coredis.RedisCluster.from_url(url) as coredis_client:
        yield adapt(coredis_client)


class FleetCollector:
    """A prometheus_client collector that reads the fleet from Redis on every collection.

    The client lives in the event loop of *portal*; collections (from the HTTP server's
    thread) run one at a time, so that concurrent scrapes never multiply the load on Redis.
    """

    def __init__(
        self,
        portal: BlockingPortal,
        client: ScriptClient,
        prefix: str,
        *,
        max_limiters: int = DEFAULT_MAX_LIMITERS,
        max_scanned: int = DEFAULT_MAX_SCANNED,
        scan_count: int = DEFAULT_SCAN_COUNT,
        timeout: float = 10.0,
    ) -> None:
        self._portal = portal
        self._client = client
        self._prefix = prefix
        self._bounds = {
            "max_limiters": max_limiters,
            "max_scanned": max_scanned,
            "scan_count": scan_count,
        }
        self._timeout = timeout
        self._lock = threading.Lock()
        self.failures = 0
        #: Why the latest read failed (None: it succeeded).
        self.last_error: str | None = None

    def describe(self) -> list[Metric]:
        return []

    async def _read(self) -> Fleet:
        with anyio.fail_after(self._timeout):
            return await read_fleet(self._client, self._prefix, **self._bounds)

    def read(self) -> Fleet | None:
        """Read the fleet now; None if Redis did not answer (counted, and kept as
        :attr:`last_error`)."""
        from ._cli import reason_of, redis_errors

        failures: tuple[type[BaseException], ...] = (
            *redis_errors(),
            ClientError,
            RedisLimiterError,
        )
        try:
            fleet = self._portal.call(self._read)
        except failures as exc:
            self.failures += 1
            self.last_error = reason_of(exc)
            return None
        self.last_error = None
        return fleet

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            fleet = self.read()
            failures = self.failures
        labels = ["limiter"]
        up = GaugeMetricFamily(
            "aiometer_fleet_up", "1 if the latest read of the fleet from Redis succeeded"
        )
        up.add_metric([], 0 if fleet is None else 1)
        yield up
        read_errors = CounterMetricFamily(
            "aiometer_fleet_read_errors", "Reads of the fleet that failed since the start"
        )
        read_errors.add_metric([], failures)
        yield read_errors
        if fleet is None:
            return
        summary = {
            "aiometer_fleet_limiters": ("Limiters read from Redis", len(fleet.limiters)),
            "aiometer_fleet_truncated": (
                "1 if the scan was cut short by --max-limiters or the scan budget",
                int(fleet.truncated),
            ),
            "aiometer_fleet_unreadable": (
                "Limiters whose keys hold data no limiter wrote",
                len(fleet.errors),
            ),
            "aiometer_fleet_read_seconds": ("Seconds the read of the fleet took", fleet.seconds),
        }
        for name, (text, value) in summary.items():
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge
        holders = GaugeMetricFamily(
            "aiometer_fleet_holders", "Leases held now, across every process", labels=labels
        )
        waiters = GaugeMetricFamily(
            "aiometer_fleet_waiters", "Waiters queued now, across every process", labels=labels
        )
        next_start = GaugeMetricFamily(
            "aiometer_fleet_next_start_seconds",
            "Seconds until the rate limit allows another start (for a burst of 1; sooner "
            "with a larger burst)",
            labels=labels,
        )
        issued = CounterMetricFamily(
            "aiometer_fleet_tokens_issued",
            "Fencing tokens and queue tickets handed out (the limiter's seq counter)",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "aiometer_fleet_paused_seconds",
            "Seconds until the fleet's pause ends (0: not paused)",
            labels=labels,
        )
        max_at_once_set = GaugeMetricFamily(
            "aiometer_fleet_max_at_once_set",
            "max_at_once set at run time (aiometer-redis set); absent when none is set",
            labels=labels,
        )
        max_per_second_set = GaugeMetricFamily(
            "aiometer_fleet_max_per_second_set",
            "max_per_second set at run time (aiometer-redis set); absent when none is set",
            labels=labels,
        )
        adaptive_rate = GaugeMetricFamily(
            "aiometer_fleet_adaptive_rate",
            "The fleet's adaptive rate per second after a push-back; absent when none",
            labels=labels,
        )
        for limiter in fleet.limiters:
            label = [limiter.name]
            holders.add_metric(label, limiter.holders)
            waiters.add_metric(label, limiter.waiters)
            next_start.add_metric(label, limiter.next_start)
            issued.add_metric(label, limiter.issued)
            paused.add_metric(label, limiter.paused_for)
            if limiter.max_at_once_set is not None:
                max_at_once_set.add_metric(label, limiter.max_at_once_set)
            if limiter.max_per_second_set is not None:
                max_per_second_set.add_metric(label, limiter.max_per_second_set)
            if limiter.adaptive_rate is not None:
                adaptive_rate.add_metric(label, limiter.adaptive_rate)
        yield from (holders, waiters, next_start, issued, paused)
        yield from (max_at_once_set, max_per_second_set, adaptive_rate)


async def _ping(client: ScriptClient) -> None:
    with anyio.fail_after(10.0):
        await client.ping()


def serve(
    url: str,
    *,
    host: str,
    port: int,
    prefix: str,
    cluster: bool = False,
    max_limiters: int = DEFAULT_MAX_LIMITERS,
    ready: Callable[[str], object] = print,
) -> None:
    """Serve ``/metrics`` for the limiters under *prefix* on the Redis at *url* until
    interrupted (KeyboardInterrupt).

    The port is bound first and Redis is pinged once before *ready* is called with the URL
    of the metrics; scrapes are answered one at a time.

    Raises:
        CommandError: the port cannot be bound.
        Exception: the client library's error, if Redis cannot be used at the start.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from anyio.from_thread import start_blocking_portal
    from prometheus_client import CollectorRegistry, make_wsgi_app

    from ._cli import CommandError

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    registry = CollectorRegistry(auto_describe=False)
    try:
        httpd = make_server(host, port, make_wsgi_app(registry), handler_class=QuietHandler)
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with (
        httpd,
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fleet_client(url, cluster=cluster)) as client,
    ):
        portal.call(_ping, client)
        registry.register(FleetCollector(portal, client, prefix, max_limiters=max_limiters))
        shown_host = f"[{host}]" if ":" in host else host
        ready(f"http://{shown_host}:{httpd.server_port}/metrics")
        # Served from a thread of its own: wsgiref's handler swallows any exception raised
        # while it answers, a KeyboardInterrupt too, so Ctrl-C must reach this thread instead.
        server = threading.Thread(target=httpd.serve_forever, name="exporter", daemon=True)
        server.start()
        try:
            while server.is_alive():
                server.join(0.5)
        finally:
            httpd.shutdown()
