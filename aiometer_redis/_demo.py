"""The fleet demo: N worker processes, one RedisLimiter, one HTTP target that checks the limits.

Roles (``--role``): ``all`` runs everything on this machine (an embedded redis-server unless
``--redis-url`` is given, the target in a thread, the workers as subprocesses) and ends with a
verdict; ``target`` runs only the HTTP target and prints a verdict after each burst of traffic;
``worker`` runs one worker. The target is the judge: it records when each request arrived and
how many were in flight, so the verdict is what a rate-limited server would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio

import aiometer

__all__ = ["Recorder", "TargetServer", "Verdict", "judge", "run_demo"]


class Recorder:
    """Thread-safe log of the requests a target served: (arrival, end, worker) each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[float, float, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_activity = 0.0

    def begin(self) -> float:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            now = time.time()
            self.last_activity = now
            return now

    def end(self, arrival: float, worker: int) -> None:
        with self._lock:
            self.in_flight -= 1
            now = time.time()
            self.last_activity = now
            self.requests.append((arrival, now, worker))

    def snapshot(self) -> tuple[list[tuple[float, float, int]], int, int]:
        with self._lock:
            return list(self.requests), self.in_flight, self.max_in_flight

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight


class TargetServer:
    """A real HTTP server that answers ``GET /work?worker=I`` after about ``task_time`` seconds
    (uniformly 0.5x to 1.5x, so that the concurrency and the rate limit take turns binding).

    ``GET /stats`` returns what it recorded as JSON, for targets running in another process.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, task_time: float = 0.05) -> None:
        self.recorder = Recorder()
        recorder = self.recorder

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/work":
                    worker = int(parse_qs(url.query).get("worker", ["0"])[0])
                    arrival = recorder.begin()
                    try:
                        time.sleep(task_time * random.uniform(0.5, 1.5))
                    finally:
                        recorder.end(arrival, worker)
                    self._reply(b"ok")
                elif url.path == "/stats":
                    requests, in_flight, peak = recorder.snapshot()
                    body = {"requests": requests, "in_flight": in_flight, "max_in_flight": peak}
                    self._reply(json.dumps(body).encode())
                else:
                    self.send_error(404)

            def _reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> TargetServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowCheck:
    width: float
    seen: int
    allowed: float

    @property
    def ok(self) -> bool:
        return self.seen <= self.allowed


@dataclass(frozen=True)
class Verdict:
    """What the target saw, next to the limits."""

    requests: int
    max_at_once: int | None
    max_in_flight: int
    max_per_second: float | None
    burst: int
    windows: tuple[WindowCheck, ...]
    elapsed: float
    ideal: float
    per_worker: dict[int, int] = field(default_factory=dict)

    @property
    def concurrency_ok(self) -> bool:
        return self.max_at_once is None or self.max_in_flight <= self.max_at_once

    @property
    def ok(self) -> bool:
        return self.concurrency_ok and all(check.ok for check in self.windows)


def _max_in_window(times: Sequence[float], width: float) -> int:
    best = 0
    j = 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] <= start + width:
            j += 1
        best = max(best, j - i)
    return best


def _max_overlap(intervals: Sequence[tuple[float, float, int]]) -> int:
    events = sorted([(a, 1) for a, _, _ in intervals] + [(b, -1) for _, b, _ in intervals])
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def judge(
    requests: Sequence[tuple[float, float, int]],
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    burst: int,
    task_time: float,
) -> Verdict:
    """Compare what the target recorded with the limits.

    Arrivals in any window of width ``w`` (from ``1 / max_per_second`` up to 1 s) may not exceed
    ``burst + max_per_second * w + 1`` (the + 1 absorbs a start that lands exactly on the
    window's edge); requests in flight may not exceed ``max_at_once``.
    """
    arrivals = sorted(a for a, _, _ in requests)
    windows: list[WindowCheck] = []
    if max_per_second is not None and arrivals:
        widths = sorted({1 / max_per_second, 0.1, 0.25, 0.5, 1.0})
        for width in (w for w in widths if w <= 1.0 or w == 1 / max_per_second):
            allowed = burst + max_per_second * width + 1
            windows.append(WindowCheck(width, _max_in_window(arrivals, width), allowed))
    count = len(requests)
    elapsed = max((b for _, b, _ in requests), default=0.0) - (arrivals[0] if arrivals else 0.0)
    ideal = task_time
    if max_at_once is not None:
        ideal = max(ideal, math.ceil(count / max_at_once) * task_time)
    if max_per_second is not None:
        ideal = max(ideal, max(count - burst, 0) / max_per_second + task_time)
    per_worker: dict[int, int] = {}
    for _, _, worker in requests:
        per_worker[worker] = per_worker.get(worker, 0) + 1
    return Verdict(
        requests=count,
        max_at_once=max_at_once,
        max_in_flight=_max_overlap(requests),
        max_per_second=max_per_second,
        burst=burst,
        windows=tuple(windows),
        elapsed=elapsed,
        ideal=ideal,
        per_worker=dict(sorted(per_worker.items())),
    )


def render_verdict(verdict: Verdict, console: Any) -> None:
    """Print the verdict table with rich."""
    from rich.table import Table

    table = Table(title="Verdict: what the target server observed")
    table.add_column("check")
    table.add_column("limit", justify="right")
    table.add_column("observed", justify="right")
    table.add_column("", justify="center")

    def mark(ok: bool) -> str:
        return "[green]OK[/]" if ok else "[bold red]BROKEN[/]"

    if verdict.max_at_once is not None:
        table.add_row(
            "max in flight",
            str(verdict.max_at_once),
            str(verdict.max_in_flight),
            mark(verdict.concurrency_ok),
        )
    for check in verdict.windows:
        table.add_row(
            f"max arrivals in any {check.width * 1000:g} ms",
            f"{check.allowed:g}",
            str(check.seen),
            mark(check.ok),
        )
    table.add_row("requests", "", str(verdict.requests), "")
    table.add_row(
        "total time vs ideal",
        f"{verdict.ideal:.2f} s",
        f"{verdict.elapsed:.2f} s ({verdict.ideal / verdict.elapsed:.0%} of ideal speed)"
        if verdict.elapsed > 0
        else "-",
        "",
    )
    workers = ", ".join(f"w{w}: {n}" for w, n in verdict.per_worker.items())
    table.add_row("requests per worker", "", workers, "")
    console.print(table)
    if verdict.ok:
        console.print("[bold green]All limits held.[/]")
    else:
        console.print("[bold red]A limit was broken.[/]")


def plot(
    requests: Sequence[tuple[float, float, int]],
    path: str,
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    burst: int,
) -> None:
    """Draw in-flight requests and arrivals per 100 ms over time, with the limits as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not requests:
        raise ValueError("nothing to plot: the target saw no request")
    origin = min(a for a, _, _ in requests)
    end = max(b for _, b, _ in requests) - origin
    bins = max(1, math.ceil(end / 0.1))
    arrivals = [0] * bins
    for a, _, _ in requests:
        arrivals[min(int((a - origin) / 0.1), bins - 1)] += 1
    # In flight: the most requests open at once within each 100 ms bin.
    events = sorted(
        [(a - origin, 1) for a, _, _ in requests] + [(b - origin, -1) for _, b, _ in requests]
    )
    in_flight = [0] * bins
    current = 0
    position = 0
    for index in range(bins):
        peak = current
        while position < len(events) and events[position][0] < (index + 1) * 0.1:
            current += events[position][1]
            peak = max(peak, current)
            position += 1
        in_flight[index] = peak
    times = [i * 0.1 for i in range(bins)]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step(times, in_flight, where="post", label="in flight (max per 100 ms)")
    if max_at_once is not None:
        top.axhline(max_at_once, color="red", linestyle="--", label=f"max_at_once = {max_at_once}")
    top.set_ylabel("requests in flight")
    top.legend(loc="lower center")
    bottom.bar(times, arrivals, width=0.09, align="edge", label="arrivals per 100 ms")
    if max_per_second is not None:
        bottom.axhline(
            max_per_second * 0.1,
            color="red",
            linestyle="--",
            label=f"max_per_second x 0.1 s = {max_per_second * 0.1:g}",
        )
    bottom.set_ylabel("arrivals")
    bottom.set_xlabel("seconds since the first request")
    bottom.legend(loc="upper right")
    figure.suptitle(f"{len(requests)} requests seen by the target")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# -- roles ------------------------------------------------------------------------------------


async def run_worker(args: argparse.Namespace) -> None:
    """One worker: ``--requests`` GETs to the target under the shared limiter."""
    import httpx

    from ._limiter import RedisLimiter

    async with httpx.AsyncClient(base_url=args.target_url, timeout=60) as http:

        async def fetch(n: int) -> None:
            response = await http.get("/work", params={"worker": args.worker_id, "n": n})
            response.raise_for_status()

        if args.local:
            limiters: list[aiometer.Limiter] = []
            if args.max_at_once is not None:
                limiters.append(aiometer.ConcurrencyLimiter(args.max_at_once))
            if args.max_per_second is not None:
                limiters.append(aiometer.RateLimiter(args.max_per_second, burst=args.burst))
            await aiometer.run_on_each(fetch, range(args.requests), limiter=limiters)
            return
        async with RedisLimiter.from_url(
            args.redis_url,
            args.name,
            max_at_once=args.max_at_once,
            max_per_second=args.max_per_second,
            burst=args.burst,
        ) as limiter:
            await aiometer.run_on_each(
                fetch, range(args.requests), limiter=limiter, max_at_once=args.max_at_once or 64
            )


def _report(
    requests: Sequence[tuple[float, float, int]], args: argparse.Namespace, console: Any
) -> Verdict:
    verdict = judge(
        requests,
        max_at_once=args.max_at_once,
        max_per_second=args.max_per_second,
        burst=args.burst,
        task_time=args.task_time,
    )
    render_verdict(verdict, console)
    return verdict


def run_target(args: argparse.Namespace) -> int:
    """Serve as the target until interrupted; print a verdict after each burst of traffic."""
    from rich.console import Console

    console = Console()
    server = TargetServer(args.host, args.port, args.task_time).start()
    console.print(f"target listening on {server.url}")
    try:
        while True:
            time.sleep(0.5)
            recorder = server.recorder
            requests, in_flight, _ = recorder.snapshot()
            if requests and not in_flight and time.time() - recorder.last_activity > 2:
                _report(requests, args, console)
                recorder.clear()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _spawn_workers(args: argparse.Namespace, redis_url: str, target_url: str) -> list[Any]:
    share, extra = divmod(args.requests, args.workers)
    procs = []
    for i in range(args.workers):
        command = [
            sys.executable,
            "-m",
            "aiometer_redis",
            "demo",
            "--role",
            "worker",
            "--worker-id",
            str(i),
            "--target-url",
            target_url,
            "--requests",
            str(share + (1 if i < extra else 0)),
            "--burst",
            str(args.burst),
            "--name",
            args.name,
        ]
        if redis_url:  # none with --local
            command += ["--redis-url", redis_url]
        if args.max_at_once is not None:
            command += ["--max-at-once", str(args.max_at_once)]
        if args.max_per_second is not None:
            command += ["--max-per-second", repr(args.max_per_second)]
        if args.local:
            command.append("--local")
        procs.append(subprocess.Popen(command))
    return procs


def run_demo(args: argparse.Namespace) -> int:
    """The whole demo on this machine; returns the exit status (1 if a limit was broken)."""
    from rich.console import Console

    from .testing import RedisServer

    console = Console()
    server: RedisServer | None = None
    redis_url = args.redis_url
    if redis_url is None and not args.local:
        server = RedisServer().start()
        redis_url = server.url
        console.print(f"started an embedded redis-server at {redis_url}")
    target = TargetServer("127.0.0.1", 0, args.task_time).start()
    mode = (
        "in-process limiters per worker (--local)" if args.local else f"RedisLimiter {args.name!r}"
    )
    console.print(
        f"{args.workers} workers, {args.requests} requests, max_at_once={args.max_at_once}, "
        f"max_per_second={args.max_per_second}, burst={args.burst}: {mode}"
    )
    try:
        procs = _spawn_workers(args, redis_url or "", target.url)
        if args.no_progress:
            _log_progress(procs, target, args, console)
        else:
            _live_progress(procs, target, args, console)
        failed = [p.returncode for p in procs if p.returncode != 0]
        requests, _, _ = target.recorder.snapshot()
    finally:
        target.stop()
        if server is not None:
            server.stop()
    verdict = _report(requests, args, console)
    if args.plot:
        plot(
            requests,
            args.plot,
            max_at_once=args.max_at_once,
            max_per_second=args.max_per_second,
            burst=args.burst,
        )
        console.print(f"plot written to {args.plot}")
    if failed:
        console.print(f"[bold red]{len(failed)} worker(s) failed[/]")
        return 2
    return 0 if verdict.ok else 1


def _progress_counts(target: TargetServer, workers: int) -> tuple[list[int], int, int]:
    requests, in_flight, _ = target.recorder.snapshot()
    done = [0] * workers
    now = time.time()
    recent = 0
    for arrival, _, worker in requests:
        if 0 <= worker < workers:
            done[worker] += 1
        if now - arrival <= 1.0:
            recent += 1
    return done, in_flight, recent


def _log_progress(
    procs: list[Any], target: TargetServer, args: argparse.Namespace, console: Any
) -> None:
    last = 0.0
    while any(p.poll() is None for p in procs):
        time.sleep(0.1)
        if time.time() - last >= 1.0:
            last = time.time()
            done, in_flight, recent = _progress_counts(target, args.workers)
            console.print(
                f"done {sum(done)}/{args.requests}  in flight {in_flight}  "
                f"last second {recent} requests"
            )


def _live_progress(
    procs: list[Any], target: TargetServer, args: argparse.Namespace, console: Any
) -> None:
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    share, extra = divmod(args.requests, args.workers)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    bars = [
        progress.add_task(f"worker {i}", total=share + (1 if i < extra else 0))
        for i in range(args.workers)
    ]

    def view() -> Table:
        done, in_flight, recent = _progress_counts(target, args.workers)
        for bar, count in zip(bars, done, strict=True):
            progress.update(bar, completed=count)
        grid = Table.grid(padding=(0, 2))
        grid.add_row(progress)
        limit = f" / {args.max_at_once}" if args.max_at_once else ""
        rate = f" / {args.max_per_second:g}" if args.max_per_second else ""
        grid.add_row(f"in flight: {in_flight}{limit}    starts in the last second: {recent}{rate}")
        return grid

    with Live(view(), console=console, refresh_per_second=10) as live:
        while any(p.poll() is None for p in procs):
            time.sleep(0.1)
            live.update(view())
        live.update(view())


def worker_main(args: argparse.Namespace) -> int:
    """Entry of ``--role worker``."""
    if args.target_url is None:
        raise SystemExit("--role worker needs --target-url")
    if args.redis_url is None and not args.local:
        args.redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    anyio.run(run_worker, args)
    return 0
