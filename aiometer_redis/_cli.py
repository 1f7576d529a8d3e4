"""The ``aiometer-redis`` command line: the fleet demo and two operator commands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import anyio

__all__ = ["build_parser", "main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``aiometer-redis`` (subcommands demo, status, reset)."""
    parser = argparse.ArgumentParser(
        prog="aiometer-redis",
        description="Fleet-wide concurrency and rate limits on Redis: demo and operator tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run worker processes that share one RedisLimiter and check the limits",
        description=(
            "Start an HTTP target that records what it sees, N worker processes that share one "
            "RedisLimiter, and judge the limits from the target's side. Without --redis-url an "
            "embedded redis-server is started on a free loopback port."
        ),
    )
    demo.add_argument("--role", choices=["all", "target", "worker"], default="all")
    demo.add_argument(
        "--redis-url",
        type=_redis_url,
        help="use this Redis instead of an embedded one (redis://, rediss://, unix:// or "
        "redis+sentinel://host:26379/service)",
    )
    demo.add_argument("--target-url", help="the target's URL (worker role)")
    demo.add_argument("--host", default="127.0.0.1", help="target role: address to listen on")
    demo.add_argument("--port", type=int, default=8000, help="target role: port to listen on")
    demo.add_argument("--workers", type=_positive_int, default=4)
    demo.add_argument(
        "--requests", type=_positive_int, default=400, help="requests in all (worker: its own)"
    )
    demo.add_argument("--max-at-once", type=_positive_int, default=8)
    demo.add_argument("--max-per-second", type=_positive_float, default=40.0)
    demo.add_argument("--burst", type=_positive_int, default=1)
    demo.add_argument(
        "--task-time",
        type=_positive_float,
        default=0.2,
        help="mean seconds the target takes per request",
    )
    demo.add_argument("--name", default="demo", help="the limiter's name")
    demo.add_argument(
        "--local",
        action="store_true",
        help="in-process limiters in each worker instead of Redis (the limits are then per "
        "worker, so the fleet as a whole breaks them)",
    )
    demo.add_argument("--no-progress", action="store_true", help="log lines, no live display")
    demo.add_argument("--plot", metavar="FILE", help="draw in-flight and arrivals (.png/.svg)")
    demo.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)

    for command, text in (
        ("status", "show a limiter's holders, waiters and rate state"),
        ("reset", "delete a limiter's keys"),
    ):
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument("name", help="the limiter's name")
        sub.add_argument(
            "--redis-url",
            type=_redis_url,
            default=DEFAULT_URL,
            help=f"redis://, rediss://, unix:// or redis+sentinel:// URL (default {DEFAULT_URL})",
        )
        sub.add_argument("--prefix", default="aiometer")
        if command == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
        else:
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _redis_url(text: str) -> str:
    from ._urls import parse_url

    try:
        parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


async def _with_client(url: str, action: Any) -> Any:
    from ._client import client_from_url

    async with client_from_url(url) as client:
        return await action(client)


def _status(args: argparse.Namespace) -> int:
    from ._limiter import limiter_keys, read_state

    keys = limiter_keys(args.name, args.prefix)
    state = anyio.run(_with_client, args.redis_url, lambda c: read_state(c, keys))
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "holders": [
                        {"lease_id": h.lease_id, "expires_in": h.expires_in} for h in state.holders
                    ],
                    "waiters": list(state.waiters),
                    "rate_tat_in": state.tat,
                    "issued": state.issued,
                },
                indent=2,
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    holders = Table(title=f"limiter {args.name!r}: {len(state.holders)} holder(s)")
    holders.add_column("lease id")
    holders.add_column("expires in", justify="right")
    for holder in state.holders:
        holders.add_row(holder.lease_id, f"{holder.expires_in:.2f} s")
    console.print(holders)
    waiters = Table(title=f"{len(state.waiters)} waiter(s), in serving order")
    waiters.add_column("#", justify="right")
    waiters.add_column("waiter id")
    for position, waiter in enumerate(state.waiters):
        waiters.add_row(str(position), waiter)
    console.print(waiters)
    if state.tat is None:
        console.print("rate: no rate state stored")
    elif state.tat > 0:
        console.print(f"rate: starts reserved until {state.tat:.3f} s from now")
    else:
        console.print("rate: idle (no start reserved ahead)")
    console.print(f"tickets and tokens issued: {state.issued}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    from ._limiter import limiter_keys

    keys = limiter_keys(args.name, args.prefix)
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to reset without --yes (no terminal to ask)", file=sys.stderr)
            return 2
        answer = input(f"Delete the keys of limiter {args.name!r} ({len(keys)} keys)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1

    async def delete(client: Any) -> int:
        deleted: int = await client.delete(*keys)
        return deleted

    deleted = anyio.run(_with_client, args.redis_url, delete)
    print(f"deleted {deleted} key(s) of limiter {args.name!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line and exit with its status."""
    args = build_parser().parse_args(argv)
    if args.command == "status":
        sys.exit(_status(args))
    if args.command == "reset":
        sys.exit(_reset(args))
    from . import _demo

    if args.role == "worker":
        sys.exit(_demo.worker_main(args))
    if args.role == "target":
        sys.exit(_demo.run_target(args))
    sys.exit(_demo.run_demo(args))
