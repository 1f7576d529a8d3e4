"""The demo's HTTP target: it serves work, and records when each request came and went."""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Capacity", "Recorder", "Rejection", "Request", "TargetServer"]

#: One served request: (arrival, end, worker), times from ``time.time()``.
Request = tuple[float, float, int]
#: One request answered 429: (arrival, worker, the worker's effective rate or -1 if unknown).
Rejection = tuple[float, int, float]


class Capacity:
    """The target's own limit: at most *per_second* requests admitted in any second.

    A sliding window over the admitted arrivals of the last second; a request beyond it is
    refused with the seconds until the window has room again (what ``Retry-After`` says).
    """

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self._limit = max(1, int(per_second))
        self._admitted: deque[float] = deque()
        self._lock = threading.Lock()

    def admit(self, now: float) -> float | None:
        """Admit a request arriving at *now* (None), or return the seconds to wait."""
        with self._lock:
            admitted = self._admitted
            while admitted and admitted[0] <= now - 1.0:
                admitted.popleft()
            if len(admitted) < self._limit:
                admitted.append(now)
                return None
            return admitted[0] + 1.0 - now


class Recorder:
    """Thread-safe log of the requests a target served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self.rejected: list[Rejection] = []
        #: (arrival, worker, effective rate) of each admitted request that said its rate.
        self.rates: list[tuple[float, int, float]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_activity = 0.0
        #: (arrival, seconds it took to arrive) of each served request whose worker said
        #: when it was sent (``&sent=``, on the worker's clock).
        self.transits: list[tuple[float, float]] = []

    def begin(self) -> float:
        """Count a request arriving now; return its arrival time (see :meth:`took`)."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            now = time.time()
            self.last_activity = now
            return now

    def took(self, arrival: float, sent: float) -> None:
        """Record that the request arriving at *arrival* was sent at *sent*."""
        with self._lock:
            self.transits.append((arrival, arrival - sent))

    def transit_log(self) -> list[tuple[float, float]]:
        """A copy of :attr:`transits`."""
        with self._lock:
            return list(self.transits)

    def end(self, arrival: float, worker: int) -> None:
        with self._lock:
            self.in_flight -= 1
            now = time.time()
            self.last_activity = now
            self.requests.append((arrival, now, worker))

    def reject(self, worker: int, rate: float) -> None:
        with self._lock:
            now = time.time()
            self.last_activity = now
            self.rejected.append((now, worker, rate))

    def note_rate(self, arrival: float, worker: int, rate: float) -> None:
        with self._lock:
            self.rates.append((arrival, worker, rate))

    def pushback(self) -> tuple[list[Rejection], list[tuple[float, int, float]]]:
        """The requests answered 429, and the effective rates the workers reported."""
        with self._lock:
            return list(self.rejected), list(self.rates)

    def snapshot(self) -> tuple[list[Request], int, int]:
        with self._lock:
            return list(self.requests), self.in_flight, self.max_in_flight

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.rejected.clear()
            self.rates.clear()
            self.max_in_flight = self.in_flight
            self.transits.clear()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A worker that goes away mid-request (Ctrl-C, a crash) breaks its connection; that is
        # the worker's story to tell, not a traceback from the target.
        return None


class TargetServer:
    """A real HTTP server that answers ``GET /work?worker=I`` after about ``task_time`` seconds
    (uniformly 0.5x to 1.5x, so that the concurrency and the rate limit take turns binding).

    With *capacity* (requests per second) the target also enforces a limit of its own, as a
    rate-limited API does: a request beyond it is answered at once with 429 and a
    ``Retry-After`` in seconds (fractional: the time until the target has room again). A
    worker may add ``&rate=R``, the effective rate its limiter applies, which the target
    records for the plot, and ``&sent=T``, the ``time.time()`` at which the request started:
    the target records how long each such request took to arrive (:attr:`Recorder.transits`).

    ``GET /stats`` returns what it recorded as JSON, for targets running in another process.

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        task_time: float = 0.05,
        capacity: float | None = None,
    ) -> None:
        self.recorder = Recorder()
        recorder = self.recorder
        limit = None if capacity is None else Capacity(capacity)
        #: Requests per second the target admits (None: no limit of its own).
        self.capacity = capacity

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/work":
                    query = parse_qs(url.query)
                    try:
                        worker = int(query.get("worker", ["0"])[0])
                        rate = float(query.get("rate", ["-1"])[0])
                        sent = float(query["sent"][0]) if "sent" in query else None
                    except ValueError:
                        self.send_error(400, "worker must be an integer, rate and sent numbers")
                        return
                    if sent is not None and not math.isfinite(sent):
                        self.send_error(400, "sent must be a finite number")
                        return
                    if limit is not None:
                        wait = limit.admit(time.time())
                        if wait is not None:
                            recorder.reject(worker, rate)
                            self._refuse(wait)
                            return
                    arrival = recorder.begin()
                    if sent is not None:
                        recorder.took(arrival, sent)
                    if rate >= 0:
                        recorder.note_rate(arrival, worker, rate)
                    try:
                        time.sleep(task_time * random.uniform(0.5, 1.5))
                    finally:
                        recorder.end(arrival, worker)
                    self._reply(b"ok")
                elif url.path == "/stats":
                    requests, in_flight, peak = recorder.snapshot()
                    rejected, _ = recorder.pushback()
                    body = {
                        "requests": requests,
                        "rejected": rejected,
                        "in_flight": in_flight,
                        "max_in_flight": peak,
                    }
                    self._reply(json.dumps(body).encode())
                else:
                    self.send_error(404)

            def _refuse(self, wait: float) -> None:
                body = b"too many requests"
                self.send_response(429)
                self.send_header("Retry-After", f"{wait:.3f}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_QuietServer,), {"address_family": family})
        self._server: ThreadingHTTPServer = server_class((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host_text = f"[{host!s}]" if ":" in str(host) else str(host)
        return f"http://{host_text}:{port}"

    def start(self) -> TargetServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
