"""The demo's workers: processes that send requests to the target under one shared limiter."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any

import anyio

import aiometer

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["DEMO_ADAPTIVE", "WorkerFleet", "run_worker", "worker_main"]

#: The workers' adaptive options against ``--target-capacity``. The defaults (halve the rate)
#: are the safe choice against an unknown target, and average about three quarters of its
#: capacity once converged; a gentler cut and a slower climb stay closer to it.
DEMO_ADAPTIVE = aiometer.Adaptive(factor=0.8, cooldown=0.5, recovery=60.0)

#: Exit status of a worker that failed and said why in one line on stderr.
WORKER_FAILED = 3


async def run_worker(args: argparse.Namespace) -> None:
    """One worker: ``--requests`` GETs to the target under the shared limiter."""
    import httpx

    from .._limiter import RedisLimiter

    async with httpx.AsyncClient(base_url=args.target_url, timeout=60) as http:
        if args.target_capacity is not None:
            await _run_against_capacity(args, http)
            return

        async def fetch(n: int) -> None:
            # "sent": when the limiter let this request start, so that the target can measure
            # how long requests take to reach it (see TargetServer).
            params = {"worker": args.worker_id, "n": n, "sent": repr(time.time())}
            response = await http.get("/work", params=params)
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


def retry_after_of(response: Any) -> float | None:
    """The seconds of a 429 or 503 answer's ``Retry-After`` (a number of seconds; None if
    absent or not a number: an HTTP date is not worth a clock comparison here)."""
    text = response.headers.get("Retry-After")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def _run_against_capacity(args: argparse.Namespace, http: Any) -> None:
    """``--target-capacity``: every 429 is reported with ``throttled(retry_after=...)`` and the
    request tried again under the limiter; each request carries the effective rate its limiter
    applied (``&rate=``), for the plot."""
    from .._limiter import RedisLimiter

    adaptive: bool | aiometer.Adaptive = False if args.no_adaptive else DEMO_ADAPTIVE
    rate_now: list[float] = [args.max_per_second]
    pushback: Callable[[float | None], Awaitable[object]]
    slot: Callable[[], AbstractAsyncContextManager[object]]

    async def fetch(n: int) -> None:
        while True:
            async with slot():
                params = {
                    "worker": args.worker_id,
                    "n": n,
                    "rate": rate_now[0],
                    "sent": repr(time.time()),
                }
                response = await http.get("/work", params=params)
            if response.status_code not in (429, 503):
                response.raise_for_status()
                return
            await pushback(retry_after_of(response))

    if args.local:
        rate = aiometer.RateLimiter(args.max_per_second, burst=args.burst, adaptive=adaptive)
        concurrency = aiometer.ConcurrencyLimiter(args.max_at_once)

        @asynccontextmanager
        async def both() -> AsyncIterator[None]:
            async with concurrency.slot(), rate.slot():
                stats = rate.statistics()
                rate_now[0] = stats.effective_max_per_second or args.max_per_second
                yield

        async def report(retry_after: float | None) -> None:
            await rate.throttled(retry_after=retry_after)

        slot, pushback = both, report
        await aiometer.run_on_each(fetch, range(args.requests), max_at_once=args.max_at_once)
        return
    async with RedisLimiter.from_url(
        args.redis_url,
        args.name,
        max_at_once=args.max_at_once,
        max_per_second=args.max_per_second,
        burst=args.burst,
        adaptive=adaptive,
    ) as limiter:
        slot, pushback = limiter.slot, limiter.throttled

        async def follow_rate() -> None:
            # The fleet's effective rate, as this worker sees it: one read every 0.25 s.
            while True:
                stats = await limiter.statistics()
                if stats.effective_max_per_second is not None:
                    rate_now[0] = stats.effective_max_per_second
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_rate)
            await aiometer.run_on_each(fetch, range(args.requests), max_at_once=args.max_at_once)
            tg.cancel_scope.cancel()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_failure(exc: BaseException, args: argparse.Namespace) -> str:
    """One line saying why a worker stopped, naming what it could not use."""
    import httpx

    from .._cli import reason_of, redis_address
    from .._exceptions import RedisLimiterError, RedisUnavailableError

    leaf = _first_leaf(exc)
    if isinstance(leaf, RedisUnavailableError):
        return f"cannot use Redis at {redis_address(args.redis_url)}: {reason_of(leaf)}"
    if isinstance(leaf, RedisLimiterError):
        return str(leaf)
    if isinstance(leaf, httpx.HTTPStatusError):
        return f"the target answered {leaf.response.status_code} to {leaf.request.url}"
    if isinstance(leaf, httpx.HTTPError):
        return f"cannot reach the target at {args.target_url}: {reason_of(leaf)}"
    return f"{type(leaf).__name__}: {leaf}"


def worker_main(args: argparse.Namespace) -> int:
    """Entry of ``--role worker``: run, and on failure say why in one line (exit status 3)."""
    from .._cli import CommandError
    from ._options import settle_options

    settle_options(args)
    if args.target_url is None:
        raise CommandError("--role worker needs --target-url", 2)
    if args.redis_url is None and not args.local:
        args.redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        anyio.run(run_worker, args)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            return 130
        print(f"worker {args.worker_id}: {describe_failure(group, args)}", file=sys.stderr)
        return WORKER_FAILED
    except Exception as exc:
        print(f"worker {args.worker_id}: {describe_failure(exc, args)}", file=sys.stderr)
        return WORKER_FAILED
    return 0


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]


class WorkerFleet:
    """Worker subprocesses of the whole-demo role, each in its own session.

    Ctrl-C in the terminal reaches only the demo itself, which stops the workers
    (:meth:`stop`), so a worker never prints its own interrupted traceback. Each worker's
    stderr goes to a temporary file, read by :meth:`failures`.
    """

    def __init__(self, args: argparse.Namespace, redis_url: str, target_url: str) -> None:
        self._workers: list[_Worker] = []
        share, extra = divmod(args.requests, args.workers)
        try:
            for i in range(args.workers):
                command = [
                    sys.executable, "-m", "aiometer_redis", "demo", "--role", "worker",
                    "--worker-id", str(i), "--target-url", target_url,
                    "--requests", str(share + (1 if i < extra else 0)),
                    "--burst", str(args.burst), "--name", args.name,
                ]  # fmt: skip
                if redis_url:  # none with --local
                    command += ["--redis-url", redis_url]
                if args.max_at_once is not None:
                    command += ["--max-at-once", str(args.max_at_once)]
                if args.max_per_second is not None:
                    command += ["--max-per-second", repr(args.max_per_second)]
                if args.local:
                    command.append("--local")
                if args.target_capacity is not None:
                    command += ["--target-capacity", repr(args.target_capacity)]
                if args.no_adaptive:
                    command.append("--no-adaptive")
                stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stderr=stderr, start_new_session=True
                )
                self._workers.append(_Worker(process, stderr))
        except BaseException:
            self.stop()
            raise

    def running(self) -> bool:
        return any(worker.process.poll() is None for worker in self._workers)

    def stop(self) -> None:
        """Stop the workers still running (SIGTERM, SIGKILL after 5 s) and wait for all."""
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self._workers:
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.stderr.close()

    def failures(self) -> list[str]:
        """One line per thing the workers could not use, most frequent first:
        ``"<how many> worker(s): cannot use Redis at <address>: <reason>"``.

        Workers that lose the same Redis may word it differently (a refused connection, a
        call that timed out while retrying): they are counted together under the commonest
        reason, the others named once in parentheses. Call before :meth:`stop` (which closes
        the captured stderr).
        """
        reasons: dict[str, Counter[str]] = {}
        for worker in self._workers:
            status = worker.process.poll()
            if status in (None, 0):
                continue
            worker.stderr.seek(0)
            lines = worker.stderr.read().decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else f"exited with status {status}"
            # "worker 3: cannot use Redis at host:port: why" -> what = "cannot use Redis at
            # host:port" (addresses hold ":" but never ": "), why = the rest.
            text = last.partition(": ")[2] if last.startswith("worker ") else last
            what, _, why = text.partition(": ")
            reasons.setdefault(what, Counter())[why] += 1
        report = []
        for what, whys in sorted(reasons.items(), key=lambda item: -item[1].total()):
            (main, _), *others = whys.most_common()
            line = f"{whys.total()} worker(s): {what}" + (f": {main}" if main else "")
            if others:
                line += " (" + "; ".join(f"{n} of them: {why}" for why, n in others) + ")"
            report.append(line)
        return report
