"""The demo's roles: the whole demo on one machine, the target alone, one worker."""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._options import settle_options
from ._target import Request, TargetServer
from ._verdict import (
    PushbackVerdict,
    Verdict,
    judge,
    judge_pushback,
    render_pushback,
    render_verdict,
)
from ._workers import WorkerFleet

__all__ = ["run_demo", "run_target"]


def _report(
    requests: list[Request],
    args: argparse.Namespace,
    console: Any,
    expected: int | None = None,
    transits: list[tuple[float, float]] | None = None,
) -> Verdict:
    verdict = judge(
        requests,
        max_at_once=args.max_at_once,
        max_per_second=args.max_per_second,
        burst=args.burst,
        task_time=args.task_time,
        transits=transits,
    )
    render_verdict(verdict, console, expected=expected)
    return verdict


def _report_pushback(
    target: TargetServer, args: argparse.Namespace, console: Any
) -> PushbackVerdict:
    requests, _, _ = target.recorder.snapshot()
    refused, _ = target.recorder.pushback()
    verdict = judge_pushback(
        requests, refused, capacity=args.target_capacity, adaptive=not args.no_adaptive
    )
    render_pushback(verdict, console)
    return verdict


def _listen(host: str, port: int, task_time: float, capacity: float | None) -> TargetServer:
    from .._cli import CommandError

    try:
        return TargetServer(host, port, task_time, capacity).start()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise CommandError(f"the target cannot listen on {host}:{port}: {why}") from None


def run_target(args: argparse.Namespace) -> int:
    """Serve as the target until interrupted; print a verdict after each burst of traffic."""
    from rich.console import Console

    settle_options(args)
    console = Console()
    server = _listen(args.host, args.port, args.task_time, args.target_capacity)
    console.print(f"target listening on {server.url}")
    try:
        while True:
            time.sleep(0.5)
            recorder = server.recorder
            requests, in_flight, _ = recorder.snapshot()
            if requests and not in_flight and time.time() - recorder.last_activity > 2:
                _report(requests, args, console)
                if args.target_capacity is not None:
                    _report_pushback(server, args, console)
                recorder.clear()
    except KeyboardInterrupt:
        # Ctrl-C is how this role is stopped: not a failure.
        return 0
    finally:
        server.stop()


@contextmanager
def _no_second_interrupt() -> Iterator[None]:
    # A second Ctrl-C while the workers and servers are being stopped would interrupt the
    # clean-up itself (and leave processes behind); the first one already said "stop".
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_demo(args: argparse.Namespace) -> int:
    """The whole demo on this machine.

    Returns 0 when every request was made and the limits held (and, with
    ``--target-capacity``, the push-back targets were met), else 1.

    Raises:
        CommandError: Redis cannot be used (checked once, before any worker starts), a worker
            failed (each distinct reason reported once), or the plot cannot be written.
    """
    from rich.console import Console

    from .._cli import CommandError, check_redis
    from ..testing import RedisServer

    settle_options(args)
    console = Console()
    server: RedisServer | None = None
    redis_url = args.redis_url
    target: TargetServer | None = None
    fleet: WorkerFleet | None = None
    try:
        if redis_url is not None and not args.local:
            check_redis(redis_url)
        if redis_url is None and not args.local:
            try:
                server = RedisServer().start()
            except RuntimeError as exc:
                raise CommandError(f"cannot start an embedded redis-server: {exc}") from None
            redis_url = server.url
            console.print(f"started an embedded redis-server at {redis_url}")
        target = _listen("127.0.0.1", 0, args.task_time, args.target_capacity)
        mode = (
            "in-process limiters per worker (--local)"
            if args.local
            else f"RedisLimiter {args.name!r}"
        )
        console.print(
            f"{args.workers} workers, {args.requests} requests, max_at_once={args.max_at_once}, "
            f"max_per_second={args.max_per_second}, burst={args.burst}: {mode}"
        )
        if args.target_capacity is not None:
            console.print(
                f"the target answers 429 beyond {args.target_capacity:g} requests/s; the "
                + (
                    "workers report each one and adapt their rate"
                    if not args.no_adaptive
                    else "workers honour Retry-After but do not adapt (--no-adaptive)"
                )
            )
        fleet = WorkerFleet(args, redis_url or "", target.url)
        if args.no_progress:
            _log_progress(fleet, target, args, console)
        else:
            _live_progress(fleet, target, args, console)
        failures = fleet.failures()
        requests, _, _ = target.recorder.snapshot()
        refused, rates = target.recorder.pushback()
        # The workers run on this machine: their clock is the target's.
        transits = target.recorder.transit_log()
    finally:
        with _no_second_interrupt():
            if fleet is not None:
                fleet.stop()
            if target is not None:
                target.stop()
            if server is not None:
                server.stop()
    pushback: PushbackVerdict | None = None
    if requests:
        verdict: Verdict | None = _report(
            requests, args, console, expected=args.requests, transits=transits
        )
        if args.target_capacity is not None:
            pushback = judge_pushback(
                requests, refused, capacity=args.target_capacity, adaptive=not args.no_adaptive
            )
            render_pushback(pushback, console)
    else:
        verdict = None
    if args.plot and requests:
        from ._plot import plot

        try:
            plot(
                requests,
                args.plot,
                max_at_once=args.max_at_once,
                max_per_second=args.max_per_second,
                burst=args.burst,
                refused=refused,
                rates=rates,
                capacity=args.target_capacity,
                fleet_rate=not args.local,
            )
        except OSError as exc:
            raise CommandError(f"cannot write the plot {args.plot!r}: {exc.strerror}") from None
        console.print(f"plot written to {args.plot}")
    if failures:
        raise CommandError("; ".join(failures))
    if verdict is None:
        raise CommandError("the target saw no request")
    held = pushback is None or pushback.held
    return 0 if verdict.ok and verdict.requests == args.requests and held else 1


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


def _refused_lately(target: TargetServer) -> str:
    """The progress line's count of 429s in the last second (empty without a capacity)."""
    refused, _ = target.recorder.pushback()
    if target.capacity is None:
        return ""
    now = time.time()
    return f"  429s in the last second {sum(1 for a, _, _ in refused if now - a <= 1.0)}"


def _log_progress(
    fleet: WorkerFleet, target: TargetServer, args: argparse.Namespace, console: Any
) -> None:
    last = 0.0
    while fleet.running():
        time.sleep(0.1)
        if time.time() - last >= 1.0:
            last = time.time()
            done, in_flight, recent = _progress_counts(target, args.workers)
            console.print(
                f"done {sum(done)}/{args.requests}  in flight {in_flight}  "
                f"last second {recent} requests{_refused_lately(target)}"
            )


def _live_progress(
    fleet: WorkerFleet, target: TargetServer, args: argparse.Namespace, console: Any
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
        grid.add_row(
            f"in flight: {in_flight}{limit}    starts in the last second: {recent}{rate}"
            + _refused_lately(target)
        )
        return grid

    with Live(view(), console=console, refresh_per_second=10) as live:
        while fleet.running():
            time.sleep(0.1)
            live.update(view())
        live.update(view())
