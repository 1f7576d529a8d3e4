"""The demo's verdict: what the target saw, next to the limits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..testing import allowed_in_window, max_overlap
from ._target import Request

__all__ = [
    "TRANSPORT_SLACK",
    "PushbackVerdict",
    "Verdict",
    "WindowCheck",
    "judge",
    "judge_pushback",
    "render_pushback",
    "render_verdict",
]


#: Time a request may take from its start in a worker to its arrival at the target: the HTTP
#: round of a loopback connection and the target's thread scheduling. The rate limits are
#: judged on arrivals, so each window allows the starts of a window this much wider (at 100
#: per second: one more arrival); more where its requests were measured to take longer (a
#: pause of a worker or of the target, see :func:`judge`).
TRANSPORT_SLACK = 0.01


@dataclass(frozen=True)
class WindowCheck:
    """Arrivals in the window of one width closest to its limit (the busiest one, unless its
    requests were measured to take longer to arrive), and how many the rate limit allows
    there."""

    width: float
    seen: int
    allowed: float
    #: The time to arrive that the window allows for (seconds, see :func:`judge`).
    slack: float = TRANSPORT_SLACK

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
    #: Whether the windows allow for the measured time to arrive (see :func:`judge`).
    measured: bool = False

    @property
    def concurrency_ok(self) -> bool:
        return self.max_at_once is None or self.max_in_flight <= self.max_at_once

    @property
    def ok(self) -> bool:
        return self.concurrency_ok and all(check.ok for check in self.windows)


def judge(
    requests: Sequence[Request],
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    burst: int,
    task_time: float,
    transits: Sequence[tuple[float, float]] | None = None,
) -> Verdict:
    """Compare what the target recorded with the limits.

    Arrivals in any window of width ``w`` (from ``1 / max_per_second`` up to 1 s) may not exceed
    :func:`aiometer_redis.testing.allowed_in_window` for ``w`` plus the time its requests took
    to arrive (a start reaches the target a little later, and not always equally late): the
    longest of them, where *transits* (``(arrival, seconds it took)`` per request, measured
    with the workers' clocks, which must be the target's) says, and never less than
    :data:`TRANSPORT_SLACK`. The requests of a window started within that much before it, so
    this holds whenever the starts kept to the limit. Requests in flight may not exceed
    ``max_at_once``.
    """
    took: dict[float, float] = {}
    for arrival, seconds in transits or ():
        took[arrival] = max(seconds, took.get(arrival, seconds))
    arrivals = sorted(a for a, _, _ in requests)
    windows: list[WindowCheck] = []
    if max_per_second is not None and arrivals:
        delays = [max(TRANSPORT_SLACK, took.get(a, 0.0)) for a in arrivals]
        widths = sorted({1 / max_per_second, 0.1, 0.25, 0.5, 1.0})
        for width in (w for w in widths if w <= 1.0 or w == 1 / max_per_second):
            windows.append(_tightest(arrivals, delays, width, max_per_second, burst))
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
        max_in_flight=max_overlap((a, b) for a, b, _ in requests),
        max_per_second=max_per_second,
        burst=burst,
        windows=tuple(windows),
        elapsed=elapsed,
        ideal=ideal,
        per_worker=dict(sorted(per_worker.items())),
        measured=transits is not None,
    )


def _tightest(
    arrivals: Sequence[float], delays: Sequence[float], width: float, rate: float, burst: int
) -> WindowCheck:
    """Of the windows of *width*, the one with the least room under its limit, each limit
    allowing for the longest delay among that window's requests. A window is judged by the
    arrivals it holds: every run of consecutive *arrivals* (sorted) within *width* of its
    first one, not only the longest from each arrival, which may end with a slower request.

    From each first arrival the longest delay only grows as the run does, and within a stretch
    where it stays the same the longest run has the least room: so the runs ending just before
    each larger delay, and the longest, are the ones to judge (found with each arrival's next
    larger delay), not all of them.
    """
    count = len(arrivals)
    # next_larger[j]: the first arrival after j whose delay is larger than that of j (or count).
    next_larger = [count] * count
    pending: list[int] = []
    for j, delay in enumerate(delays):
        while pending and delays[pending[-1]] < delay:
            next_larger[pending.pop()] = j
        pending.append(j)
    best: WindowCheck | None = None
    end = 0  # one past the last arrival within width of the first one
    for first, opened in enumerate(arrivals):
        end = max(end, first + 1)
        while end < count and arrivals[end] <= opened + width:
            end += 1
        peak = first  # the run's longest delay so far is delays[peak]
        while True:
            stop = min(next_larger[peak], end)
            seen = stop - first
            allowed = math.floor(allowed_in_window(rate, burst, width + delays[peak]))
            if best is None or allowed - seen < best.allowed - best.seen:
                best = WindowCheck(width, seen, allowed, delays[peak])
            if stop >= end:
                break
            peak = stop
    assert best is not None
    return best


def render_verdict(verdict: Verdict, console: Any, *, expected: int | None = None) -> None:
    """Print the verdict table with rich.

    With *expected* (the requests the run should have made), a run that made fewer ends with
    "incomplete" instead of "All limits held.": limits are not shown to hold by requests that
    were never sent.
    """
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
            f"arrivals in any {check.width * 1000:g} ms",
            f"{check.allowed:g}",
            str(check.seen),
            mark(check.ok),
        )
    table.add_row("requests", "" if expected is None else str(expected), str(verdict.requests), "")
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
    if verdict.windows:
        if verdict.measured:
            longest = max(check.slack for check in verdict.windows)
            console.print(
                "(each row: the window of that width nearest its limit, which is burst + "
                "max_per_second x (window + the longest its requests took to arrive, at least "
                f"{TRANSPORT_SLACK * 1000:g} ms; {longest * 1000:.3g} ms at most in these rows) "
                "+ 1)"
            )
        else:
            console.print(
                "(each row: the busiest window of that width; limits: burst + max_per_second x "
                f"(window + {TRANSPORT_SLACK * 1000:g} ms to arrive) + 1)"
            )
    if not verdict.ok:
        console.print("[bold red]A limit was broken.[/]")
    elif expected is not None and verdict.requests < expected:
        console.print(
            f"[bold yellow]Incomplete: {verdict.requests} of {expected} requests were made; "
            "no verdict on the rest.[/]"
        )
    else:
        console.print("[bold green]All limits held.[/]")


#: The first seconds of a push-back run, while the fleet finds the target's capacity.
CONVERGENCE = 5.0
#: Targets of a push-back run after convergence: at most this share answered 429 ...
MAX_REFUSED_SHARE = 0.05
#: ... and at least this share of the target's capacity served.
MIN_THROUGHPUT_SHARE = 0.85


@dataclass(frozen=True)
class PushbackVerdict:
    """A run against a target with a capacity of its own, after the first ``CONVERGENCE`` s.

    Attributes:
        capacity: the target's requests per second.
        adaptive: whether the workers adapted their rate.
        served, refused: requests answered (200) and refused (429), in all.
        served_after, refused_after: the same, arriving after the first ``CONVERGENCE`` s.
        span_after: seconds from the end of convergence to the last served arrival.
    """

    capacity: float
    adaptive: bool
    served: int
    refused: int
    served_after: int
    refused_after: int
    span_after: float

    @property
    def refused_share(self) -> float | None:
        """Share of the requests after convergence answered 429 (None: none sent)."""
        sent = self.served_after + self.refused_after
        return self.refused_after / sent if sent else None

    @property
    def throughput_share(self) -> float | None:
        """Requests served per second after convergence, as a share of the capacity (None: the
        run ended before convergence)."""
        if self.span_after <= 0 or self.served_after < 2:
            return None
        return self.served_after / self.span_after / self.capacity

    @property
    def held(self) -> bool:
        refused, throughput = self.refused_share, self.throughput_share
        return (
            refused is not None
            and throughput is not None
            and refused < MAX_REFUSED_SHARE
            and throughput >= MIN_THROUGHPUT_SHARE
        )


def judge_pushback(
    requests: Sequence[Request],
    refused: Sequence[tuple[float, int, float]],
    *,
    capacity: float,
    adaptive: bool,
) -> PushbackVerdict:
    """Judge a run against a target of *capacity* requests per second from its record.

    Convergence ends ``CONVERGENCE`` seconds after the first arrival (served or refused).
    """
    arrivals = [a for a, _, _ in requests] + [a for a, _, _ in refused]
    if not arrivals:
        return PushbackVerdict(capacity, adaptive, 0, 0, 0, 0, 0.0)
    settled = min(arrivals) + CONVERGENCE
    served_after = [a for a, _, _ in requests if a >= settled]
    return PushbackVerdict(
        capacity=capacity,
        adaptive=adaptive,
        served=len(requests),
        refused=len(refused),
        served_after=len(served_after),
        refused_after=sum(1 for a, _, _ in refused if a >= settled),
        span_after=max(served_after, default=settled) - settled,
    )


def render_pushback(verdict: PushbackVerdict, console: Any) -> None:
    """Print the push-back verdict with rich, ending with "held" or what missed its target."""
    from rich.table import Table

    mode = "adaptive" if verdict.adaptive else "not adaptive (--no-adaptive)"
    table = Table(title=f"Push-back: a target of {verdict.capacity:g} requests/s")
    table.add_column(f"after the first {CONVERGENCE:g} s")
    table.add_column("target", justify="right")
    table.add_column("observed", justify="right")
    table.add_column("", justify="center")
    refused, throughput = verdict.refused_share, verdict.throughput_share

    def mark(ok: bool) -> str:
        return "[green]OK[/]" if ok else "[bold red]MISSED[/]"

    table.add_row("workers", "", mode, "")
    table.add_row(
        "share answered 429",
        f"< {MAX_REFUSED_SHARE:.0%}",
        "-"
        if refused is None
        else f"{refused:.1%} ({verdict.refused_after} of "
        f"{verdict.served_after + verdict.refused_after})",
        mark(refused is not None and refused < MAX_REFUSED_SHARE),
    )
    table.add_row(
        "throughput / capacity",
        f">= {MIN_THROUGHPUT_SHARE:.0%}",
        "-"
        if throughput is None
        else f"{throughput:.1%} ({verdict.served_after / verdict.span_after:.1f}/s)",
        mark(throughput is not None and throughput >= MIN_THROUGHPUT_SHARE),
    )
    table.add_row(
        "429s in all (first 5 s too)",
        "",
        f"{verdict.refused} of {verdict.served + verdict.refused}",
        "",
    )
    console.print(table)
    if verdict.held:
        console.print(
            "[bold green]Push-back held: the fleet converged on the target's capacity.[/]"
        )
    elif refused is None or throughput is None:
        console.print("[bold red]Push-back not shown: the run ended within its first 5 s.[/]")
    else:
        console.print("[bold red]Push-back missed its targets.[/]")
