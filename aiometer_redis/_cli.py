"""The ``aiometer-redis`` command line: the fleet demo and the operator commands (status, reset,
set, pause, exporter, top).

Every failure a user can cause (an unreachable or refusing Redis, a bad option, keys in Redis
that are not what the limiter wrote, Ctrl-C) ends in one line on stderr that starts with
``aiometer-redis:`` and a non-zero exit status: 2 for a bad command line, 130 for Ctrl-C, 3
for everything else (1 is the demo's "a limit was broken").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio

from ._config import name_problem, prefix_problem
from ._errors import ClientError
from ._exceptions import RedisLimiterError
from ._keys import KeyLayout

if TYPE_CHECKING:
    from ._state import LimiterState

__all__ = ["CommandError", "build_parser", "main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: Exit statuses besides 0 and the demo's 1 ("a limit was broken").
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130

#: Seconds a status or reset may take before the command gives up on Redis.
REDIS_TIMEOUT = 10.0

_T = TypeVar("_T")


class CommandError(Exception):
    """A failure the command line reports as one line (no traceback) and exits with."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; one line that points at --help is
    # easier to read in a terminal full of other output.
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(
    minimum: int, maximum: int | None = None, *, expected: str, bounds: str
) -> Callable[[str], int]:
    """An argparse type for a whole number from *minimum* to *maximum* (inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1, expected="a whole number >= 1", bounds=">= 1")
_port = _whole_number(0, 65535, expected="a port number", bounds="0 (any free port) to 65535")
_worker_id = _whole_number(0, expected="a whole number >= 0", bounds=">= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _pause_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or value > 86_400:
        raise argparse.ArgumentTypeError(f"must be from 0 to 86400 seconds, got {text}")
    return value


def _limiter_name(text: str) -> str:
    # The library's own rules, checked before anything connects.
    problem = name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _key_prefix(text: str) -> str:
    problem = prefix_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _plot_path(text: str) -> str:
    """``--plot FILE``: a format matplotlib writes, in a directory this user can write to."""
    from pathlib import Path

    path = Path(text)
    suffix = path.suffix.lower().lstrip(".")
    known = ("png", "svg", "pdf")
    if suffix not in known:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown image type {path.suffix or '(none)'!r}, expected "
            + ", ".join(f".{s}" for s in known)
        )
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    # Create the file now (and remove it again if it was not there): permissions, read-only
    # file systems and missing directories all show up here instead of after the run.
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
    if not existed:
        path.unlink()
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``aiometer-redis`` (subcommands demo, status, reset, set, pause,
    exporter, top)."""
    parser = _Parser(
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
    demo.add_argument("--port", type=_port, default=8000, help="target role: port to listen on")
    demo.add_argument("--workers", type=_positive_int, default=4)
    demo.add_argument(
        "--requests", type=_positive_int, default=400, help="requests in all (worker: its own)"
    )
    demo.add_argument(
        "--max-at-once", type=_positive_int, help="default 8 (16 with --target-capacity)"
    )
    demo.add_argument(
        "--max-per-second", type=_positive_float, help="default 40 (100 with --target-capacity)"
    )
    demo.add_argument("--burst", type=_positive_int, default=1)
    demo.add_argument(
        "--task-time",
        type=_positive_float,
        default=0.2,
        help="mean seconds the target takes per request",
    )
    demo.add_argument("--name", type=_limiter_name, default="demo", help="the limiter's name")
    demo.add_argument(
        "--local",
        action="store_true",
        help="in-process limiters in each worker instead of Redis (the limits are then per "
        "worker, so the fleet as a whole breaks them)",
    )
    demo.add_argument("--no-progress", action="store_true", help="log lines, no live display")
    demo.add_argument(
        "--target-capacity",
        type=_positive_float,
        metavar="PER_SECOND",
        help="the target answers 429 with Retry-After beyond this many requests per second; "
        "the workers report each 429 with throttled() and adapt their rate",
    )
    demo.add_argument(
        "--no-adaptive",
        action="store_true",
        help="with --target-capacity: honour Retry-After (a fleet-wide pause) without cutting "
        "the rate",
    )
    demo.add_argument(
        "--plot",
        metavar="FILE",
        type=_plot_path,
        help="draw in-flight and arrivals (.png, .svg or .pdf)",
    )
    demo.add_argument("--worker-id", type=_worker_id, default=0, help=argparse.SUPPRESS)

    for command, text in (
        ("status", "show a limiter's holders, waiters, rate state, pause and limits set"),
        ("reset", "delete a limiter's keys"),
        (
            "set",
            "change a running fleet's limits: every process applies them from its next call "
            "(--clear: back to each process's configured limits)",
        ),
        ("pause", "pause the whole fleet: nothing starts for SECONDS (extends, never shortens)"),
    ):
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument("name", type=_limiter_name, help="the limiter's name")
        if command == "pause":
            sub.add_argument("seconds", type=_pause_seconds, help="seconds from now (Redis clock)")
        sub.add_argument(
            "--redis-url",
            type=_redis_url,
            default=DEFAULT_URL,
            help=f"redis://, rediss://, unix:// or redis+sentinel:// URL (default {DEFAULT_URL})",
        )
        sub.add_argument(
            "--prefix", type=_key_prefix, default="aiometer", help="the limiter's key prefix"
        )
        if command == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
        elif command == "reset":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        elif command == "set":
            sub.add_argument("--max-at-once", type=_positive_int, help="slots held at once")
            sub.add_argument("--max-per-second", type=_positive_float, help="starts per second")
            sub.add_argument(
                "--clear", action="store_true", help="remove the limits set at run time"
            )

    exporter = commands.add_parser(
        "exporter",
        help="serve the state of every limiter under a prefix as Prometheus metrics",
        description=(
            "Serve /metrics for Prometheus: on each scrape, find the limiters under --prefix "
            "(SCAN, on every primary of a cluster) and read each one's holders, waiters, next "
            "start and tokens issued from Redis. Each scrape reads at most --max-limiters "
            "limiters."
        ),
    )
    top = commands.add_parser(
        "top",
        help="show every limiter under a prefix in a live table",
        description=(
            "Every limiter under --prefix in one table (holders, waiters, next start, tokens "
            "issued and issued per second), refreshed every --interval seconds; Ctrl-C quits."
        ),
    )
    for sub in (exporter, top):
        sub.add_argument(
            "--redis-url",
            type=_redis_url,
            default=DEFAULT_URL,
            help=f"redis://, rediss://, unix:// or redis+sentinel:// URL (default {DEFAULT_URL})",
        )
        sub.add_argument(
            "--cluster",
            action="store_true",
            help="the URL names a node of a Redis Cluster: scan every primary",
        )
        sub.add_argument(
            "--prefix", type=_key_prefix, default="aiometer", help="the limiters' key prefix"
        )
        sub.add_argument(
            "--max-limiters",
            type=_positive_int,
            default=1000,
            help="read at most this many limiters per scrape or refresh (default 1000)",
        )
    exporter.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)",
    )
    exporter.add_argument(
        "--port", type=_port, default=9464, help="port to listen on (default 9464; 0: any free)"
    )
    top.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    top.add_argument("--once", action="store_true", help="print one table and exit")
    return parser


def _redis_url(text: str) -> str:
    from ._urls import parse_url

    try:
        sentinel = parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if sentinel is None:
        # The client library reads host and port later, and a bad port would surface there as
        # a bare ValueError; check them now. The URL is not repeated: it may hold a password.
        parts = urllib.parse.urlsplit(text)
        try:
            parts.port  # noqa: B018 - the property parses and checks the port
        except ValueError:
            scheme = parts.scheme
            raise argparse.ArgumentTypeError(
                f"invalid {scheme} URL: the port must be a number from 0 to 65535"
            ) from None
    return text


def redis_address(url: str) -> str:
    """Where *url* points, for messages: ``host:port``, a socket path or the sentinels and the
    service. Never the credentials."""
    from ._urls import parse_url

    sentinel = parse_url(url)
    if sentinel is not None:
        hosts = ",".join(f"{host}:{port}" for host, port in sentinel.sentinels)
        return f"{sentinel.service_name} via sentinels {hosts}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{host}:{port}"


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of the installed client libraries that mean "Redis failed"."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import redis.exceptions
    except ImportError:
        pass
    else:
        errors.append(redis.exceptions.RedisError)
    try:
        import coredis.exceptions
    except ImportError:
        pass
    else:
        errors.append(coredis.exceptions.RedisError)
    return tuple(errors)


def reason_of(exc: BaseException) -> str:
    """The most specific words among *exc* and its causes ("Connection refused")."""
    current: BaseException | None = exc
    seen = 0
    while current is not None and seen < 10:
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno)
        current = current.__cause__ or current.__context__
        seen += 1
    text = str(exc).strip() or type(exc).__name__
    # Some client errors append the repr of the client (" : <redis.asyncio.client.Redis(...").
    text = text.splitlines()[0].split(" : <", 1)[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _run_against_redis(
    url: str,
    action: Callable[[Any], Awaitable[_T]],
    *,
    timeout: float | None = REDIS_TIMEOUT,
    cluster: bool = False,
) -> _T:
    """Run *action* with a client of *url* (a cluster client with *cluster*), for at most
    *timeout* seconds (None: as long as it takes); any Redis failure becomes a
    :class:`CommandError`."""
    from ._exporter import fleet_client

    async def run() -> _T:
        with anyio.fail_after(timeout):
            async with fleet_client(url, cluster=cluster) as client:
                return await action(client)

    address = redis_address(url)
    try:
        return anyio.run(run)
    except CommandError:
        raise
    except _failures() as caught:
        raise _command_error(caught, address) from None


def _failures() -> tuple[type[BaseException], ...]:
    return (*redis_errors(), ClientError, RedisLimiterError)


def _command_error(caught: BaseException, address: str) -> CommandError:
    """The one line that says why the Redis at *address* could not be used."""
    exc = _library_error(caught)
    if isinstance(exc, TimeoutError) and not str(exc):
        return CommandError(f"Redis at {address} did not answer within {REDIS_TIMEOUT:g} s")
    if _needs_password(exc):
        return CommandError(f"Redis at {address} needs a password, and the URL gives none")
    if _is_auth_error(exc):
        return CommandError(f"Redis at {address} refused the credentials: {reason_of(exc)}")
    return CommandError(f"cannot use Redis at {address}: {reason_of(exc)}")


def _library_error(exc: BaseException) -> BaseException:
    """The client library's own error behind the adapter's neutral one and the limiter's."""
    while isinstance(exc, (ClientError, RedisLimiterError)) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _needs_password(exc: BaseException) -> bool:
    text = str(exc)
    return text.startswith("NOAUTH") or "HELLO must be called with the client already" in text


def check_redis(url: str) -> None:
    """PING the Redis at *url* once; raise :class:`CommandError` saying why it cannot be used."""

    async def ping(client: Any) -> None:
        await client.ping()

    _run_against_redis(url, ping)


def _is_auth_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    return bool(
        names & {"AuthenticationError", "AuthenticationFailureError", "AuthorizationError"}
        or text.startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
        or "invalid username-password" in text
    )


async def _read_checked_state(client: Any, layout: KeyLayout) -> LimiterState:
    from ._exceptions import CorruptStateError
    from ._scripts import load_script
    from ._state import read_state

    keys = list(layout.keys)
    try:
        types = await client.run_script(load_script("key_types"), keys, [])
    except ClientError:
        # An ACL user made for the limiter may not run TYPE; the state is still readable, and
        # a key of the wrong type then fails in status.lua with Redis's own WRONGTYPE words.
        types = []
    for (key, expected), found in zip(layout.typed(), types, strict=False):
        if found not in ("none", expected):
            raise CommandError(
                f"key {key!r} holds a {found}, not the {expected} the limiter writes "
                "(written by something else? `aiometer-redis reset` deletes it)"
            )
    try:
        return await read_state(client, list(layout.script_keys))
    except CorruptStateError:
        numbers = keys[3:5]
        stored = await client.run_script(load_script("stored_numbers"), numbers, [])
        for key, value, kind in zip(numbers, stored, (float, int), strict=True):
            try:
                kind(value or 0)
            except ValueError:
                raise CommandError(
                    f"key {key!r} holds {value!r}, not the number the limiter writes "
                    "(written by something else? `aiometer-redis reset` deletes it)"
                ) from None
        raise


def _status(args: argparse.Namespace) -> int:
    layout = KeyLayout.of(args.name, args.prefix)
    state = _run_against_redis(args.redis_url, lambda c: _read_checked_state(c, layout))
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
                    "paused_for": state.control.paused_for,
                    "limits_set": _limits_set(state),
                    "adaptive_rate": state.control.adaptive_rate,
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
    control = state.control
    if control.paused_for > 0:
        console.print(f"paused: {control.paused_for:.3f} s left (nothing starts before)")
    limits = _limits_set(state)
    if limits:
        text = ", ".join(f"{k}={v:g}" for k, v in limits.items())
        console.print(f"limits set at run time: {text} (they replace the configured ones)")
    else:
        console.print("limits: as each process is configured (none set at run time)")
    if control.adaptive_rate is not None:
        ago = control.cut_ago if control.cut_ago is not None else 0.0
        console.print(
            f"adaptive rate: {control.adaptive_rate:g}/s now (last cut {ago:.1f} s ago; "
            "adaptive processes apply it, never above their max_per_second)"
        )
    return 0


def _limits_set(state: LimiterState) -> dict[str, float]:
    limits: dict[str, float] = {}
    if state.control.max_at_once is not None:
        limits["max_at_once"] = state.control.max_at_once
    if state.control.max_per_second is not None:
        limits["max_per_second"] = state.control.max_per_second
    return limits


def _control(args: argparse.Namespace, operation: str, *extra: Any) -> Any:
    from ._config import OVERRIDE_KEEP
    from ._state import run_control

    keys = list(KeyLayout.of(args.name, args.prefix).script_keys)
    if operation == "set":
        extra = (*extra, round(OVERRIDE_KEEP * 1e6))

    async def call(client: Any) -> Any:
        return await run_control(client, keys, args.name, operation, *extra)

    return _run_against_redis(args.redis_url, call)


def _set(args: argparse.Namespace) -> int:
    if args.clear:
        _control(args, "clear")
        print(f"limiter {args.name!r}: limits set at run time removed")
        return 0
    interval: Any = "" if args.max_per_second is None else 1e6 / args.max_per_second
    count: Any = "" if args.max_at_once is None else args.max_at_once
    _, control = _control(args, "set", count, interval)
    limits = []
    if control.max_at_once is not None:
        limits.append(f"max_at_once={control.max_at_once}")
    if control.max_per_second is not None:
        limits.append(f"max_per_second={control.max_per_second:g}")
    print(f"limiter {args.name!r}: {', '.join(limits)} from each process's next call")
    return 0


def _pause(args: argparse.Namespace) -> int:
    _, control = _control(args, "pause", math.ceil(args.seconds * 1e6))
    print(f"limiter {args.name!r}: paused, {control.paused_for:.3f} s left")
    return 0


def _reset(args: argparse.Namespace) -> int:
    keys = list(KeyLayout.of(args.name, args.prefix).script_keys)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError("refusing to reset without --yes (no terminal to ask)", EXIT_USAGE)
        try:
            answer = input(f"Delete the keys of limiter {args.name!r} ({len(keys)} keys)? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1

    async def delete(client: Any) -> int:
        deleted: int = await client.delete(*keys)
        return deleted

    deleted = _run_against_redis(args.redis_url, delete)
    print(f"deleted {deleted} key(s) of limiter {args.name!r}")
    return 0


def _exporter(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401 - only whether it is there
    except ImportError:
        raise CommandError(
            "the exporter needs prometheus_client: pip install 'aiometer[metrics]'"
        ) from None
    from ._exporter import serve

    address = redis_address(args.redis_url)

    def ready(url: str) -> None:
        print(
            f"serving {url} for the limiters under {args.prefix!r} on Redis at {address}",
            flush=True,
        )

    try:
        serve(
            args.redis_url,
            host=args.host,
            port=args.port,
            prefix=args.prefix,
            cluster=args.cluster,
            max_limiters=args.max_limiters,
            ready=ready,
        )
    except CommandError:
        raise
    except _failures() as caught:
        raise _command_error(caught, address) from None
    return 0


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._top import watch

    console = Console()
    interrupted = False

    async def show(client: Any) -> None:
        nonlocal interrupted
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def stop_on_ctrl_c() -> None:
                # Ctrl-C cancels the whole scope, which no library code can swallow (the event
                # loop's own handler cancels the main task once, and a client library that
                # catches that one cancellation would leave top running).
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_ctrl_c)
            try:
                await watch(
                    client,
                    console,
                    args.prefix,
                    interval=args.interval,
                    once=args.once,
                    max_limiters=args.max_limiters,
                )
            except Exception as exc:  # raised as itself below, not in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    _run_against_redis(args.redis_url, show, timeout=None, cluster=args.cluster)
    if interrupted:
        raise KeyboardInterrupt
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(args)
    if args.command == "reset":
        return _reset(args)
    if args.command == "set":
        return _set(args)
    if args.command == "pause":
        return _pause(args)
    if args.command == "exporter":
        return _exporter(args)
    if args.command == "top":
        return _top(args)
    from . import demo

    if args.role == "worker":
        return demo.worker_main(args)
    if args.role == "target":
        return demo.run_target(args)
    return demo.run_demo(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line and exit with its status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "set":
        given = args.max_at_once is not None or args.max_per_second is not None
        if args.clear == given:
            parser.error("give --max-at-once, --max-per-second (or both), or --clear alone")
    try:
        status = _dispatch(args)
    except CommandError as exc:
        _fail(str(exc), exc.status)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(status)


def _fail(message: str, status: int) -> NoReturn:
    print(f"aiometer-redis: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
