"""An LLM fleet under requests per minute AND tokens per minute: ``python3 examples/llm_fleet.py``.

An LLM API states two limits, e.g. 500 requests and 200,000 tokens per minute, and a call's
token count is known only after the call. This example runs, on this machine:

* an emulated LLM endpoint (loopback HTTP, standard library only) that allows ``--rpm``
  requests and ``--tpm`` tokens in any sliding window of ``--window`` seconds (a minute,
  scaled down to 6 s so that the run takes about half a minute). It decides how many tokens
  each call uses (the prompt's tokens plus a random completion of up to ``max_tokens``),
  charges them to its windows when the request arrives, and answers 429 to every request
  that would break a window, counting it;
* a redis-server of its own (unless ``--redis-url`` is given);
* ``--workers`` worker processes (default 4) that share ONE ``RedisLimiter``::

      rates=[Rate(rpm, per=window + margin, counts="calls"), Rate(tpm, per=window + margin)]

  Each call is charged up front with an estimate of its tokens (``cost=``) and settled to
  the tokens the endpoint reports after it (``settle=``)::

      await aiometer.run_on_each(
          call, prompts, limiter=limiter,
          cost=lambda p: p.prompt_tokens + p.max_tokens,   # the most it can use
          settle=lambda p, used: used,                       # what it did use
      )

and prints a verdict from the endpoint's own record: requests and tokens in the busiest
window next to the limits, and the requests refused. "All limits held." and exit status 0
when nothing was refused; 1 when something was. ``--local`` gives each worker an in-process
``RateLimiter`` with the same rates instead: each keeps the limits for itself, and the
endpoint refuses what the fleet sends on top.

Estimate high, settle down. The limiter charges the estimate when a call starts; settling
refunds the unused part at the call's original start, so the window holds what was really
used and starts reserved after the refund come sooner. Starts already reserved while earlier
calls were in flight were placed by those calls' estimates, so with estimates well above use
the fleet stays somewhat below the token limit: the price of never being refused. An
estimate that is too LOW is charged afterwards as debt (starts reserved later wait for it),
but calls admitted in the meantime can push a window over the limit by that call's overspend;
the endpoint, which counts real tokens, then refuses. So estimate with an upper bound (prompt
tokens + ``max_tokens``, which an LLM API never exceeds), as this example does by default;
``--estimate typical`` (half of ``max_tokens``) shows what happens otherwise: the verdict
reports the overspend and, when the windows are full, refusals.

Margin. The endpoint judges a window by when requests arrive; a call the limiter starts
exactly one window after another may reach the endpoint relatively early, by the difference
in the two calls' way from the limiter's decision to the endpoint (a few milliseconds; tens on
a busy machine). The fleet's windows are therefore ``--margin`` (0.25 s) longer than the
endpoint's. With a real API, whose clock you do not share, keep a margin too.

Exit statuses: 0 all limits held, 1 a request was refused or a limit broken, 2 a bad option,
3 something needed could not be used (Redis, a worker), 130 Ctrl-C. Like
``examples/fleet_demo.py``, the first run prepares the project's ``.venv`` with the ``demo``
extra (``tools/bootstrap.py``) and re-runs itself in it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bootstrap import ensure_venv

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

PROG = "llm_fleet"

#: Set in the environment of a run that already is in the prepared interpreter.
_BOOTSTRAPPED = "AIOMETER_LLM_FLEET_READY"

#: Prompt lengths in characters; the endpoint (like the workers) counts 4 characters a token.
PROMPT_CHARS = (200, 1600)
MAX_TOKENS = (128, 256)
CHARS_PER_TOKEN = 4

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130


class Failure(Exception):
    """Something the run needed could not be used: one line, exit status 3."""


def count_tokens(prompt: str) -> int:
    """The prompt's tokens, as both the endpoint and the workers count them."""
    return math.ceil(len(prompt) / CHARS_PER_TOKEN)


# -- the emulated endpoint --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request the endpoint answered (or refused, with ``tokens`` it would have used)."""

    arrival: float
    worker: int
    tokens: int
    estimate: int
    refused_by: str = ""  # "requests" or "tokens": the window that refused it


class Endpoint:
    """An LLM-style HTTP endpoint on loopback with a requests window and a tokens window.

    ``POST /v1/completions`` with JSON ``{"prompt", "max_tokens", "worker", "estimate"}``
    (the last two only for the record) answers ``{"usage": {"prompt_tokens",
    "completion_tokens", "total_tokens"}}`` after a delay that grows with the completion, or
    429 when the request would put more than ``rpm`` requests or ``tpm`` tokens into a window
    of ``window`` seconds (two arrivals share a window when less than ``window`` apart).
    Tokens are charged when the request arrives.
    """

    def __init__(self, rpm: int, tpm: int, window: float, seed: int | None = None) -> None:
        self.rpm, self.tpm, self.window = rpm, tpm, window
        self.answered: list[Call] = []
        self.refused: list[Call] = []
        self._recent: deque[Call] = deque()
        self._recent_tokens = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if self.path != "/v1/completions":
                    self._reply(404, {"error": "not found"})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    prompt, max_tokens = str(body["prompt"]), int(body["max_tokens"])
                    worker, estimate = int(body.get("worker", -1)), int(body.get("estimate", 0))
                except (TypeError, KeyError, ValueError):
                    self._reply(400, {"error": "expected JSON with prompt and max_tokens"})
                    return
                status, usage = endpoint.admit(prompt, max_tokens, worker, estimate)
                if status != 200:
                    self._reply(status, {"error": usage.pop("error")}, retry_after=True)
                    return
                time.sleep(0.05 + usage["completion_tokens"] * 0.0005)
                self._reply(200, {"usage": usage})

            def _reply(self, status: int, body: dict[str, Any], retry_after: bool = False) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after:
                    self.send_header("Retry-After", f"{endpoint.window:g}")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            # socketserver's default backlog of 5 drops connections when a fleet opens dozens
            # at once (after a pause, say): clients then see the connection reset.
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                return None  # a worker stopped mid-request: the worker tells its own story

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Endpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def admit(
        self, prompt: str, max_tokens: int, worker: int, estimate: int
    ) -> tuple[int, dict[str, Any]]:
        """Decide the call's tokens and charge them, or refuse it: (status, usage or error)."""
        with self._lock:
            now = time.monotonic()
            prompt_tokens = count_tokens(prompt)
            # Some answers are short, some use most of max_tokens.
            completion = round(max_tokens * self._random.uniform(0.1, 1.0))
            call = Call(now, worker, prompt_tokens + completion, estimate)
            while self._recent and now - self._recent[0].arrival >= self.window:
                self._recent_tokens -= self._recent.popleft().tokens
            if len(self._recent) + 1 > self.rpm:
                self.refused.append(replace(call, refused_by="requests"))
                return 429, {"error": f"more than {self.rpm} requests in {self.window:g} s"}
            if self._recent_tokens + call.tokens > self.tpm:
                self.refused.append(replace(call, refused_by="tokens"))
                return 429, {"error": f"more than {self.tpm} tokens in {self.window:g} s"}
            self._recent.append(call)
            self._recent_tokens += call.tokens
            self.answered.append(call)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": call.tokens,
        }
        return 200, usage

    def snapshot(self) -> tuple[list[Call], list[Call]]:
        """Copies of the answered and the refused calls."""
        with self._lock:
            return list(self.answered), list(self.refused)


# -- the verdict ------------------------------------------------------------------------------


def busiest_window(calls: Sequence[Call], window: float, weight: str) -> int:
    """The most requests (``weight="requests"``) or tokens (``"tokens"``) that arrived in any
    window of *window* seconds (arrivals less than *window* apart)."""
    ordered = sorted(calls, key=lambda call: call.arrival)
    best = total = 0
    first = 0
    for call in ordered:
        total += 1 if weight == "requests" else call.tokens
        while call.arrival - ordered[first].arrival >= window:
            total -= 1 if weight == "requests" else ordered[first].tokens
            first += 1
        best = max(best, total)
    return best


@dataclass(frozen=True)
class Verdict:
    """What the endpoint observed, next to its limits."""

    rpm: int
    tpm: int
    expected: int
    answered: int
    refused: int
    refused_by: dict[str, int]
    tokens: int
    estimated: int
    max_requests: int
    max_tokens: int
    overspent: int
    overspend: int
    elapsed: float
    per_worker: dict[int, int]

    @property
    def held(self) -> bool:
        """Every request answered, none refused, no window over a limit."""
        return (
            self.refused == 0
            and self.answered == self.expected
            and self.max_requests <= self.rpm
            and self.max_tokens <= self.tpm
        )


def judge(endpoint: Endpoint, expected: int) -> Verdict:
    """Judge what *endpoint* recorded, for a run that asked for *expected* requests."""
    answered, refused = endpoint.snapshot()
    arrivals = [call.arrival for call in answered]
    per_worker: dict[int, int] = {}
    for call in answered:
        per_worker[call.worker] = per_worker.get(call.worker, 0) + 1
    over = [call.tokens - call.estimate for call in answered if call.tokens > call.estimate]
    return Verdict(
        rpm=endpoint.rpm,
        tpm=endpoint.tpm,
        expected=expected,
        answered=len(answered),
        refused=len(refused),
        refused_by=dict(Counter(call.refused_by for call in refused)),
        tokens=sum(call.tokens for call in answered),
        estimated=sum(call.estimate for call in answered),
        max_requests=busiest_window(answered, endpoint.window, "requests"),
        max_tokens=busiest_window(answered, endpoint.window, "tokens"),
        overspent=len(over),
        overspend=sum(over),
        elapsed=max(arrivals) - min(arrivals) if arrivals else 0.0,
        per_worker=dict(sorted(per_worker.items())),
    )


def render(verdict: Verdict, window: float) -> list[str]:
    """The verdict as lines of text: label, observed / limit, OK or BROKEN, notes."""

    def mark(ok: bool) -> str:
        return "OK" if ok else "BROKEN"

    rpm, tpm = verdict.rpm, verdict.tpm
    workers = ", ".join(f"w{w}: {n}" for w, n in verdict.per_worker.items())
    over = f"overspend {verdict.overspend:,} tokens" if verdict.overspent else ""
    rows = [
        ("requests answered", f"{verdict.answered:,} of {verdict.expected:,}", workers),
        ("tokens used", f"{verdict.tokens:,}", f"estimated {verdict.estimated:,}, then settled"),
        (
            f"max requests in any {window:g} s",
            f"{verdict.max_requests:,} / {rpm:,}",
            mark(verdict.max_requests <= rpm),
        ),
        (
            f"max tokens in any {window:g} s",
            f"{verdict.max_tokens:,} / {tpm:,}",
            mark(verdict.max_tokens <= tpm),
        ),
        (
            "refused (429)",
            f"{verdict.refused:,}",
            mark(verdict.refused == 0)
            + "".join(f" ({n} by the {which} window)" for which, n in verdict.refused_by.items()),
        ),
        ("calls above their estimate", f"{verdict.overspent:,}", over),
        ("first to last request", f"{verdict.elapsed:.1f} s", ""),
    ]
    left = max(len(label) for label, _, _ in rows)
    middle = max(len(value) for _, value, _ in rows)
    lines = ["Verdict: what the endpoint observed"]
    lines += [
        f"  {label:<{left}}  {value:>{middle}}  {note}".rstrip() for label, value, note in rows
    ]
    if verdict.held:
        lines.append("All limits held.")
    elif verdict.refused:
        lines.append(f"{verdict.refused} request(s) refused: a limit would have been broken.")
    elif verdict.max_requests > rpm or verdict.max_tokens > tpm:
        lines.append("A limit was broken.")
    else:
        lines.append(
            f"Incomplete: {verdict.answered} of {verdict.expected} requests were made; "
            "no verdict on the rest."
        )
    return lines


# -- a worker process -------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return count_tokens(self.text)


def make_prompts(count: int, seed: str) -> list[Prompt]:
    rng = random.Random(seed)
    words = ["summarise", "the", "quarterly", "report", "in", "plain", "words", "for", "a", "board"]
    prompts = []
    for _ in range(count):
        size = rng.randint(*PROMPT_CHARS)
        text = " ".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
        prompts.append(Prompt(text, rng.choice(MAX_TOKENS)))
    return prompts


def largest_estimate(estimate: str) -> int:
    """The largest estimate a worker can make, to refuse impossible limits up front."""
    most = PROMPT_CHARS[1] // CHARS_PER_TOKEN + MAX_TOKENS[1]
    return most if estimate == "max" else most - MAX_TOKENS[1] // 2


def fleet_rates(args: argparse.Namespace) -> list[Any]:
    from aiometer import Rate

    per = args.window + args.margin
    return [Rate(args.rpm, per=per, counts="calls"), Rate(args.tpm, per=per)]


async def run_worker(args: argparse.Namespace) -> None:
    import httpx

    import aiometer
    from aiometer_redis import RedisLimiter

    prompts = make_prompts(args.requests, f"{args.seed}-{args.worker_id}")

    def estimate(prompt: Prompt) -> int:
        # An LLM API never returns more than max_tokens: prompt + max_tokens is an upper bound.
        if args.estimate == "max":
            return prompt.prompt_tokens + prompt.max_tokens
        return prompt.prompt_tokens + prompt.max_tokens // 2

    limiter: Any = (
        aiometer.RateLimiter(rates=fleet_rates(args))
        if args.local
        else RedisLimiter.from_url(args.redis_url, args.name, rates=fleet_rates(args))
    )
    async with (
        limiter if not args.local else contextlib.nullcontext(limiter),
        httpx.AsyncClient(base_url=args.endpoint, timeout=60) as http,
    ):

        async def call(prompt: Prompt) -> int:
            body = {
                "prompt": prompt.text,
                "max_tokens": prompt.max_tokens,
                "worker": args.worker_id,
                "estimate": estimate(prompt),
            }
            response = await http.post("/v1/completions", json=body)
            if response.status_code == 429:
                return 0  # refused: nothing used (the endpoint counts it for the verdict)
            response.raise_for_status()
            used: int = response.json()["usage"]["total_tokens"]
            return used

        await aiometer.run_on_each(
            call,
            prompts,
            limiter=limiter,
            max_at_once=8,
            cost=estimate,
            settle=lambda prompt, used: used,
        )


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def worker_main(args: argparse.Namespace) -> int:
    """A worker process: run, and on failure say why in one line on stderr (status 3)."""
    import anyio
    import httpx

    from aiometer_redis import RedisUnavailableError

    try:
        anyio.run(run_worker, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        leaf = _first_leaf(exc)
        if isinstance(leaf, RedisUnavailableError):
            why = f"cannot use Redis at {redis_address(args.redis_url)}: {leaf}"
        elif isinstance(leaf, httpx.HTTPError):
            why = f"cannot use the endpoint at {args.endpoint}: {leaf!r}"
        else:
            why = f"{type(leaf).__name__}: {leaf}"
        print(f"worker {args.worker_id}: {why.splitlines()[0]}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0


# -- the whole run ----------------------------------------------------------------------------


def redis_address(url: str) -> str:
    """host:port of *url*, never its credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.hostname or 'localhost'}:{port}"


def check_redis(url: str) -> None:
    """PING *url* once; raise :class:`Failure` saying why it cannot be used."""
    import redis
    import redis.exceptions

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Failure(f"cannot use Redis at {redis_address(url)}: {why}") from None


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]


class Fleet:
    """The worker processes, each in its own session: Ctrl-C reaches only this process,
    which stops them (:meth:`stop`), so no worker prints an interrupted traceback."""

    def __init__(self, args: argparse.Namespace, redis_url: str, endpoint: str) -> None:
        self.workers: list[_Worker] = []
        share, extra = divmod(args.requests, args.workers)
        environment = {**os.environ, _BOOTSTRAPPED: "1"}
        try:
            self._start(args, redis_url, endpoint, share, extra, environment)
        except BaseException:
            self.stop()
            raise

    def _start(
        self,
        args: argparse.Namespace,
        redis_url: str,
        endpoint: str,
        share: int,
        extra: int,
        environment: dict[str, str],
    ) -> None:
        script = os.path.abspath(__file__)
        for i in range(args.workers):
            command = [
                sys.executable, script, "--role", "worker", "--worker-id", str(i),
                "--requests", str(share + (1 if i < extra else 0)),
                "--endpoint", endpoint, "--name", args.name,
                "--rpm", str(args.rpm), "--tpm", str(args.tpm),
                "--window", repr(args.window), "--margin", repr(args.margin),
                "--estimate", args.estimate, "--seed", str(args.seed),
            ]  # fmt: skip
            command += ["--local"] if args.local else ["--redis-url", redis_url]
            stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stderr=stderr,
                    env=environment,
                    start_new_session=True,
                )
            except BaseException:
                stderr.close()
                raise
            self.workers.append(_Worker(process, stderr))

    def running(self) -> bool:
        return any(worker.process.poll() is None for worker in self.workers)

    def failures(self) -> list[str]:
        """One line per distinct reason a worker stopped, with how many stopped for it."""
        reasons: dict[str, int] = {}
        for worker in self.workers:
            status = worker.process.poll()
            if status in (None, 0):
                continue
            worker.stderr.seek(0)
            lines = worker.stderr.read().decode(errors="replace").strip().splitlines()
            text = lines[-1] if lines else f"exited with status {status}"
            if text.startswith("worker "):
                text = text.partition(": ")[2]
            reasons[text] = reasons.get(text, 0) + 1
        return [f"{n} worker(s): {why}" for why, n in reasons.items()]

    def stop(self) -> None:
        """Stop the workers still running (SIGTERM, SIGKILL after 5 s) and wait for all."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.stderr.close()


@contextlib.contextmanager
def _no_second_interrupt() -> Iterator[None]:
    # A second Ctrl-C during clean-up would leave processes behind; the first said "stop".
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    """Start Redis (unless given), the endpoint and the workers; print the verdict."""
    from aiometer_redis.testing import RedisServer

    server: RedisServer | None = None
    endpoint: Endpoint | None = None
    fleet: Fleet | None = None
    redis_url = args.redis_url
    try:
        if args.local:
            redis_url = ""
        elif redis_url is not None:
            check_redis(redis_url)
        else:
            try:
                server = RedisServer().start()
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0]
                raise Failure(f"cannot start an embedded redis-server: {reason}") from None
            redis_url = server.url
            print(f"started an embedded redis-server at {redis_url}")
        endpoint = Endpoint(args.rpm, args.tpm, args.window, seed=args.seed).start()
        print(
            f"endpoint {endpoint.url} allows {args.rpm:,} requests and {args.tpm:,} tokens "
            f"in any {args.window:g} s window"
        )
        rates = ", ".join(repr(rate) for rate in fleet_rates(args))
        how = "prompt + max_tokens" if args.estimate == "max" else "prompt + max_tokens / 2"
        shared = (
            "an in-process RateLimiter EACH (--local)"
            if args.local
            else f"one RedisLimiter {args.name!r}"
        )
        print(
            f"{args.workers} worker processes, {args.requests} requests, {shared} with "
            f"rates=[{rates}]\n"
            f"cost = estimated tokens ({how}), settled to the tokens used",
            flush=True,
        )
        fleet = Fleet(args, redis_url, endpoint.url)
        started = time.monotonic()
        next_report = started + args.report_every
        while fleet.running():
            time.sleep(0.1)
            if fleet.failures():
                break
            if time.monotonic() >= next_report:
                next_report += args.report_every
                answered, refused = endpoint.snapshot()
                print(
                    f"  {time.monotonic() - started:5.1f} s: {len(answered)} of "
                    f"{args.requests} answered, {sum(c.tokens for c in answered):,} tokens, "
                    f"{len(refused)} refused",
                    flush=True,
                )
        failures = fleet.failures()
    finally:
        with _no_second_interrupt():
            if fleet is not None:
                fleet.stop()
            if endpoint is not None:
                endpoint.stop()
            if server is not None:
                server.stop()
    if failures:
        raise Failure("; ".join(failures))
    assert endpoint is not None
    verdict = judge(endpoint, args.requests)
    print("\n".join(render(verdict, args.window)))
    return 0 if verdict.held else EXIT_REFUSED


# -- the command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see --help)\n")


def _number(kind: type[int] | type[float], minimum: float, strict: bool) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low = value <= minimum if strict else value < minimum
        if not math.isfinite(value) or low:
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum:g}, got {text}"
            )
        return value

    return parse


def _redis_url(text: str) -> str:
    if urllib.parse.urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(f"expected a redis://, rediss:// or unix:// URL: {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Worker processes call an emulated LLM endpoint under one RedisLimiter "
        "with a requests window and a tokens window; the endpoint judges.",
    )
    count = _number(int, 1, strict=False)
    parser.add_argument("--workers", type=count, default=4, help="worker processes (4)")
    parser.add_argument("--requests", type=count, default=150, help="calls in all (150)")
    parser.add_argument("--rpm", type=count, default=30, help="requests per window (30)")
    parser.add_argument("--tpm", type=count, default=12_000, help="tokens per window (12000)")
    parser.add_argument(
        "--window", type=_number(float, 0, strict=True), default=6.0,
        help="the window in seconds: a minute, scaled down (6)",
    )  # fmt: skip
    parser.add_argument(
        "--margin", type=_number(float, 0, strict=False), default=0.25,
        help="seconds the fleet's windows are longer than the endpoint's (0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--estimate", choices=["max", "typical"], default="max",
        help="cost before a call: prompt + max_tokens (max, the default) or + max_tokens/2",
    )  # fmt: skip
    parser.add_argument("--redis-url", type=_redis_url, help="default: start a redis-server")
    parser.add_argument(
        "--local", action="store_true",
        help="for comparison: each worker keeps the limits for itself (no Redis); as a fleet, "
        "they break them",
    )  # fmt: skip
    parser.add_argument("--name", default="llm-fleet", help="the limiter's name in Redis")
    parser.add_argument("--seed", type=int, default=13, help="prompts and token counts")
    parser.add_argument(
        "--report-every", type=_number(float, 0, strict=True), default=5.0,
        help="seconds between progress lines (5)",
    )  # fmt: skip
    parser.add_argument("--role", choices=["all", "worker"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role == "worker":
        return worker_main(args)
    args.workers = min(args.workers, args.requests)  # a worker per request at most
    most = largest_estimate(args.estimate)
    if most > args.tpm:
        parser.error(f"--tpm {args.tpm} is below the largest estimate of a call ({most} tokens)")
    if not args.local:
        from aiometer_redis import ConfigurationError, RedisLimiter

        try:  # reports a bad name here, once, rather than from every worker
            RedisLimiter.from_url(
                args.redis_url or "redis://127.0.0.1:6379/0", args.name, rates=fleet_rates(args)
            )
        except ConfigurationError as exc:
            parser.error(str(exc))
    try:
        return run(args)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _prepared() -> None:
    """Re-run this file in the project's ``.venv`` (made on first use) unless already there."""
    if os.environ.get(_BOOTSTRAPPED):
        return
    try:
        python = ensure_venv("demo")
    except subprocess.CalledProcessError as exc:
        print(f"{PROG}: preparing .venv failed (pip exited {exc.returncode})", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    os.environ[_BOOTSTRAPPED] = "1"
    if os.path.abspath(python) != os.path.abspath(sys.executable):
        os.execv(python, [python, __file__, *sys.argv[1:]])


if __name__ == "__main__":
    try:
        _prepared()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(main())
