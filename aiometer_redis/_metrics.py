"""Prometheus metrics of the Redis limiters of this process (``RedisLimiter(..., metrics=True)``).

Off by default. ``prometheus_client`` (the ``metrics`` extra) is imported only when a limiter
is made with metrics on, and a limiter without them pays one ``None`` check per acquisition
and per release.

What a limiter reports, every series labelled with the limiter's ``name`` as ``limiter``
(limiter objects of one name in one process add up):

========================================  =========  ==========================================
``aiometer_acquisitions_total``           counter    permits handed out; ``source`` is ``redis``,
                                                     or ``fallback`` for the in-process
                                                     fallback of ``on_unavailable="local"``
``aiometer_acquire_errors_total``         counter    ``acquire()`` calls that raised, by
                                                     ``error`` (``AcquireTimeoutError``, ...)
``aiometer_wait_seconds``                 histogram  time spent in ``acquire()`` until a permit
``aiometer_held``                         gauge      permits of this process not yet released
``aiometer_waiting``                      gauge      coroutines of this process in ``acquire()``
``aiometer_leases_lost_total``            counter    leases found expired on renewal
``aiometer_fallbacks_total``              counter    switches to the in-process fallback
``aiometer_fallback_active``              gauge      1 while the in-process fallback is in use
``aiometer_redis_call_seconds``           histogram  one script call's round trip (each retry
                                                     counts), by ``script``
``aiometer_redis_errors_total``           counter    failed script calls, by ``error``:
                                                     ``no_reply`` (cut short),
                                                     ``unavailable``, ``pool_full``,
                                                     ``refused`` or ``reply``
========================================  =========  ==========================================

The gauges and the lost-lease count are read from the live limiter objects when the registry
is collected; the rest are counted as things happen.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal

from ._client import ScriptArg, ScriptClient, Subscription
from ._errors import ClientError, ErrorReply, PoolFull, Refused, Unavailable
from ._exceptions import RedisLimiterError
from ._scripts import Script

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from ._leases import LeaseTable
    from ._permit import RedisPermit

__all__ = [
    "CALL_BUCKETS",
    "WAIT_BUCKETS",
    "LimiterMetrics",
    "check_metrics",
    "limiter_metrics",
]

#: Buckets of ``aiometer_wait_seconds``: from an uncontended grant to minutes in a queue.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets of ``aiometer_redis_call_seconds``: a loopback round trip up to the retry window.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

_ERROR_KINDS: tuple[tuple[type[ClientError], str], ...] = (
    (PoolFull, "pool_full"),  # before Unavailable, of which it is a kind
    (Unavailable, "unavailable"),
    (Refused, "refused"),
    (ErrorReply, "reply"),
)

_INSTALL_HINT = "pip install 'aiometer[metrics]'"


def _registry_class() -> type[CollectorRegistry]:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        raise ImportError(
            f"metrics need prometheus_client, which is not installed: {_INSTALL_HINT}"
        ) from exc
    return CollectorRegistry


def check_metrics(value: object) -> None:
    """Check a ``metrics=`` value: ``False`` or ``None`` (off), ``True`` (the default
    registry of prometheus_client) or a ``prometheus_client.CollectorRegistry``.

    Raises:
        TypeError: *value* is none of those.
        ImportError: metrics are asked for and prometheus_client is not installed.
    """
    if value is None or isinstance(value, bool):
        if value:
            _registry_class()
        return
    if "prometheus_client" not in type(value).__module__:
        raise TypeError(
            "metrics must be True, False or a prometheus_client.CollectorRegistry, got "
            f"{type(value).__name__}"
        )
    if not isinstance(value, _registry_class()):
        raise TypeError(
            "metrics must be True, False or a prometheus_client.CollectorRegistry, got "
            f"{type(value).__name__}"
        )


class _Families:
    """The metric families of one registry, made once and shared by every limiter that
    reports to it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        names = ["limiter"]
        self.acquisitions = Counter(
            "aiometer_acquisitions",
            "Permits handed out, by source (redis, or the in-process fallback)",
            [*names, "source"],
            registry=registry,
        )
        self.acquire_errors = Counter(
            "aiometer_acquire_errors",
            "acquire() calls that raised, by error class",
            [*names, "error"],
            registry=registry,
        )
        self.wait = Histogram(
            "aiometer_wait_seconds",
            "Seconds spent in acquire() until a permit was handed out",
            names,
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.fallbacks = Counter(
            "aiometer_fallbacks",
            "Switches to the in-process fallback (on_unavailable='local')",
            names,
            registry=registry,
        )
        self.pushbacks = Counter(
            "aiometer_pushbacks",
            "Pauses and push-back reports of this process, by kind (pause, throttled, cut: a "
            "report that cut the adaptive rate)",
            [*names, "kind"],
            registry=registry,
        )
        self.calls = Histogram(
            "aiometer_redis_call_seconds",
            "Seconds one script call to Redis took (every retry counts), by script",
            [*names, "script"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.call_errors = Counter(
            "aiometer_redis_errors",
            "Script calls to Redis that failed, by kind (no_reply, unavailable, pool_full, "
            "refused, reply)",
            [*names, "error"],
            registry=registry,
        )
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[LimiterMetrics] = weakref.WeakSet()
        registry.register(_LiveCollector(self))

    def add(self, metrics: LimiterMetrics) -> None:
        with self._lock:
            self._live.add(metrics)

    def live(self) -> list[LimiterMetrics]:
        # The registry may be collected in another thread (prometheus_client's HTTP server).
        with self._lock:
            return list(self._live)


class _LiveCollector:
    """Reads the gauges and the lost-lease counts from the live limiters at collection."""

    def __init__(self, families: _Families) -> None:
        self._families = weakref.ref(families)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = self._families()
        totals: dict[str, list[int]] = {}
        for metrics in families.live() if families is not None else []:
            row = totals.setdefault(metrics.name, [0, 0, 0, 0])
            for i, value in enumerate(metrics.snapshot()):
                row[i] += value
        held = GaugeMetricFamily(
            "aiometer_held", "Permits of this process not yet released", labels=["limiter"]
        )
        waiting = GaugeMetricFamily(
            "aiometer_waiting",
            "Coroutines of this process waiting in acquire()",
            labels=["limiter"],
        )
        lost = CounterMetricFamily(
            "aiometer_leases_lost",
            "Leases of this process found expired on renewal",
            labels=["limiter"],
        )
        fallback = GaugeMetricFamily(
            "aiometer_fallback_active",
            "Limiter objects of this name using the in-process fallback now",
            labels=["limiter"],
        )
        for name, (n_held, n_waiting, n_lost, n_fallback) in sorted(totals.items()):
            held.add_metric([name], n_held)
            waiting.add_metric([name], n_waiting)
            lost.add_metric([name], n_lost)
            fallback.add_metric([name], n_fallback)
        yield from (held, waiting, lost, fallback)


_families_lock = threading.Lock()
_families_of: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


def _families(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        families = _families_of.get(registry)
        if families is None:
            families = _families_of[registry] = _Families(registry)
        return families


class LimiterMetrics:
    """The metrics of one limiter object: what its limiter calls as things happen, and what
    the collector reads from it.

    Args:
        name: the limiter's name (the ``limiter`` label).
        registry: where the metrics are registered.
        leases: the limiter's lease table (read for the lost-lease count).
    """

    def __init__(self, name: str, registry: CollectorRegistry, leases: LeaseTable) -> None:
        families = _families(registry)
        self.name = name
        self.waiting = 0
        # The permits handed out by acquire() and not yet released. A permit the limiter
        # makes and gives back itself (an acquisition cancelled at its last step) was never
        # handed out, so its release must not count.
        self._out: set[RedisPermit] = set()
        self.in_fallback = False
        self._leases = leases
        self._families = families
        self._from_redis = families.acquisitions.labels(name, "redis")
        self._from_fallback = families.acquisitions.labels(name, "fallback")
        self._wait = families.wait.labels(name)
        self._fallbacks = families.fallbacks.labels(name)
        self._calls: dict[str, Any] = {}
        self._call_errors = {
            kind: families.call_errors.labels(name, kind)
            for kind in [*(kind for _, kind in _ERROR_KINDS), "no_reply"]
        }
        families.add(self)

    def snapshot(self) -> tuple[int, int, int, int]:
        """``(held, waiting, leases lost, fallback active)`` of this limiter object now."""
        return (
            len(self._out),
            self.waiting,
            self._leases.lost_count,
            int(self.in_fallback and self._leases.open),
        )

    async def acquire(
        self, acquire: Callable[..., Awaitable[RedisPermit]], *args: Any
    ) -> RedisPermit:
        """Run the limiter's ``acquire(*args)`` and count it: waiting while it runs, then the
        wait, the acquisition and the held permit, or the error it raised."""
        self.waiting += 1
        start = time.perf_counter()
        try:
            permit = await acquire(*args)
        except RedisLimiterError as exc:
            self._families.acquire_errors.labels(self.name, type(exc).__name__).inc()
            raise
        finally:
            self.waiting -= 1
        self._out.add(permit)
        self._wait.observe(time.perf_counter() - start)
        (self._from_fallback if permit.fallback else self._from_redis).inc()
        return permit

    def released(self, permit: RedisPermit) -> None:
        """*permit*, of this limiter, was released."""
        self._out.discard(permit)

    def fell_back(self) -> None:
        """The limiter switched to the in-process fallback."""
        self.in_fallback = True
        self._fallbacks.inc()

    def pushed_back(self, kind: str) -> None:
        """A pause (``"pause"``), a push-back report (``"throttled"``) or a report that cut the
        adaptive rate (``"cut"``)."""
        self._families.pushbacks.labels(self.name, kind).inc()

    def recovered(self) -> None:
        """The limiter returned to Redis from the fallback."""
        self.in_fallback = False

    def timed(self, client: ScriptClient) -> ScriptClient:
        """*client*, with each script call's duration and failures recorded."""
        return _TimedClient(client, self)

    def _call_histogram(self, script: str) -> Any:
        child = self._calls.get(script)
        if child is None:
            child = self._calls[script] = self._families.calls.labels(self.name, script)
        return child

    def observe_call(
        self, script: str, seconds: float, error: ClientError | Literal["no_reply"] | None
    ) -> None:
        """Record one script call of *seconds*, failed with *error* (None: answered;
        ``"no_reply"``: cut short, by the limiter's deadline or a cancellation)."""
        self._call_histogram(script).observe(seconds)
        if error == "no_reply":
            self._call_errors["no_reply"].inc()
        elif error is not None:
            for kind_class, kind in _ERROR_KINDS:
                if isinstance(error, kind_class):
                    self._call_errors[kind].inc()
                    break


class _TimedClient:
    """A :class:`ScriptClient` that records each ``run_script`` in a :class:`LimiterMetrics`
    and passes everything else through."""

    def __init__(self, client: ScriptClient, metrics: LimiterMetrics) -> None:
        self._client = client
        self._metrics = metrics

    @property
    def client(self) -> Any:
        """The client library's own client, as the adapters expose it."""
        return getattr(self._client, "client", None)

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        start = time.perf_counter()
        try:
            reply = await self._client.run_script(script, keys, args, wake_first=wake_first)
        except ClientError as exc:
            self._metrics.observe_call(script.name, time.perf_counter() - start, exc)
            raise
        except BaseException:
            # Cancelled: almost always by the limiter's deadline for the call (the calls on
            # the wire are shielded from their callers' cancellation), so Redis did not
            # answer in time. anyio does not tell a passed deadline from a cancel().
            self._metrics.observe_call(script.name, time.perf_counter() - start, "no_reply")
            raise
        self._metrics.observe_call(script.name, time.perf_counter() - start, None)
        return reply

    async def blpop(self, key: str, timeout: float) -> str | None:
        return await self._client.blpop(key, timeout)

    @property
    def can_subscribe(self) -> bool:
        return self._client.can_subscribe

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        return self._client.subscribe(channel)

    async def ping(self) -> None:
        await self._client.ping()

    async def delete(self, *keys: str) -> int:
        return await self._client.delete(*keys)

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"_TimedClient({self._client!r})"


def limiter_metrics(name: str, metrics: object, leases: LeaseTable) -> LimiterMetrics | None:
    """The metrics of a limiter made with ``metrics=`` *metrics* (None when off)."""
    if not metrics:
        return None
    if metrics is True:
        from prometheus_client import REGISTRY

        registry: CollectorRegistry = REGISTRY
    else:
        registry = metrics  # type: ignore[assignment]  # checked by check_metrics
    return LimiterMetrics(name, registry, leases)
