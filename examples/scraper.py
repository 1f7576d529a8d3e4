"""A scraper fleet in one file: N processes fetch URLs under one limit kept in Redis.

    python examples/scraper.py --redis-url redis://localhost:6379/0 --processes 4 \\
        --max-at-once 8 --max-per-second 20 https://example.com/ https://example.org/ ...

Every process takes its share of the URLs (every N-th one), opens a RedisLimiter with the same
name on the same Redis and fetches its share with httpx through ``aiometer.run_on_each``,
printing one line per URL. Together, the processes never have more than ``--max-at-once``
requests in flight nor start more than ``--max-per-second`` per second: the limits are global,
so the same command run on several machines against one Redis stays within them too.
Processes are started with the "spawn" method, so they share nothing but their arguments, as
they would on separate machines. The exit status is 1 if a request could not be made (an
HTTP error status such as 404 is printed, not counted as a failure).

Needs the ``demo`` extra (``pip install "aiometer[demo]"``) and a Redis server.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence

import anyio
import httpx

import aiometer
from aiometer_redis import ConfigurationError, RedisLimiter


def _limiter(options: argparse.Namespace) -> RedisLimiter:
    return RedisLimiter.from_url(
        options.redis_url,
        options.name,
        max_at_once=options.max_at_once,
        max_per_second=options.max_per_second,
    )


async def scrape(process: int, urls: Sequence[str], options: argparse.Namespace) -> int:
    """Fetch *urls* under the shared limits, print each outcome; return the number of failures."""
    failures = 0
    async with (
        _limiter(options) as limiter,
        httpx.AsyncClient(timeout=options.timeout, follow_redirects=True) as client,
    ):

        async def fetch(url: str) -> None:
            nonlocal failures
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                failures += 1
                print(f"[{process}] error {url}: {exc!r}", flush=True)
            else:
                print(f"[{process}] {response.status_code} {url}", flush=True)

        await aiometer.run_on_each(fetch, urls, limiter=limiter)
    return failures


def work(process: int, urls: Sequence[str], options: argparse.Namespace) -> None:
    """The body of one process: its exit status is 1 if one of its requests failed."""
    try:
        failures = anyio.run(scrape, process, urls, options)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(1 if failures else 0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch URLs from several processes under one global limit kept in Redis."
    )
    parser.add_argument("urls", nargs="+", metavar="URL", help="the pages to fetch")
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--processes", type=_positive_int, default=4, help="default: 4")
    parser.add_argument(
        "--max-at-once", type=_positive_int, default=8, help="requests in flight, in all"
    )
    parser.add_argument(
        "--max-per-second", type=float, default=10.0, help="requests started per second, in all"
    )
    parser.add_argument("--name", default="scraper", help="the limiter's name in Redis")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    options = parser.parse_args(argv)
    try:
        _limiter(options)  # reports bad limits here, once, rather than in every process
    except ConfigurationError as exc:
        parser.error(str(exc))

    spawn = multiprocessing.get_context("spawn")
    count = min(options.processes, len(options.urls))
    processes = [
        spawn.Process(target=work, args=(i, options.urls[i::count], options), name=f"scraper-{i}")
        for i in range(count)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        # Ctrl-C reaches the children too; wait for them to cancel and release their slots.
        for process in processes:
            process.join()
        return 130
    return 0 if all(process.exitcode == 0 for process in processes) else 1


if __name__ == "__main__":
    sys.exit(main())
