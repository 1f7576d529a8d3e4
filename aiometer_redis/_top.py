"""``aiometer-redis top``: every limiter under a prefix in one table, refreshed in place."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from ._exporter import DEFAULT_MAX_LIMITERS, Fleet, FleetLimiter, read_fleet

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._client import ScriptClient

__all__ = ["Rates", "fleet_table", "issue_rates", "watch"]

#: Tokens and tickets issued per second by limiter name, between two reads.
Rates = Mapping[str, float]

#: Seconds one read of the fleet may take before top reports Redis as not answering.
READ_TIMEOUT = 10.0


def issue_rates(before: Fleet, after: Fleet, seconds: float) -> dict[str, float]:
    """Tokens and tickets issued per second by each limiter read in both *before* and
    *after*, *seconds* apart. A counter that went down (the limiter was reset, or its keys
    expired) counts from zero."""
    if seconds <= 0:
        return {}
    earlier = {limiter.name: limiter.issued for limiter in before.limiters}
    rates = {}
    for limiter in after.limiters:
        if limiter.name in earlier:
            issued = limiter.issued - earlier[limiter.name]
            if issued < 0:
                issued = limiter.issued
            rates[limiter.name] = issued / seconds
    return rates


def fleet_table(
    fleet: Fleet, prefix: str, rates: Rates | None = None, error: str | None = None
) -> Table:
    """The table top shows for *fleet*; *rates* from :func:`issue_rates` (None: the first
    read, no rate yet); *error*: why the latest read failed (the table is then the last good
    one)."""
    from rich.table import Table

    title = f"aiometer limiters under {prefix!r}: {len(fleet.limiters)}"
    if fleet.truncated:
        title += f" (the first {len(fleet.limiters)} only: raise --max-limiters)"
    table = Table(title=title, title_justify="left")
    table.add_column("limiter", overflow="fold")
    table.add_column("held", justify="right")
    table.add_column("waiting", justify="right")
    table.add_column("next start", justify="right")
    table.add_column("issued", justify="right")
    table.add_column("issued/s", justify="right")
    table.add_column("control", overflow="fold")
    for limiter in fleet.limiters:
        rate = "-" if rates is None or limiter.name not in rates else f"{rates[limiter.name]:.1f}"
        table.add_row(
            limiter.name,
            str(limiter.holders),
            str(limiter.waiters),
            f"{limiter.next_start:.3f} s" if limiter.next_start > 0 else "now",
            str(limiter.issued),
            rate,
            _control_text(limiter),
        )
    notes = [
        "held and waiting: across every process; issued: fencing tokens and queue tickets "
        "(issued/s is the starts per second while nobody queues); next start: for a burst of "
        "1; control: a pause, limits set at run time, the adaptive rate after a push-back"
    ]
    if fleet.errors:
        notes.append(
            "unreadable (keys written by something else): " + ", ".join(map(repr, fleet.errors))
        )
    if error is not None:
        notes.append(f"Redis did not answer the latest read ({error}); showing the one before")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def _control_text(limiter: FleetLimiter) -> str:
    """What the limiter's control key says, in a few words ("-": nothing)."""
    parts = []
    if limiter.paused_for > 0:
        parts.append(f"paused {limiter.paused_for:.1f} s")
    if limiter.max_at_once_set is not None:
        parts.append(f"max_at_once set {limiter.max_at_once_set}")
    if limiter.max_per_second_set is not None:
        parts.append(f"max_per_second set {limiter.max_per_second_set:g}")
    if limiter.adaptive_rate is not None:
        parts.append(f"adaptive {limiter.adaptive_rate:.1f}/s")
    return ", ".join(parts) or "-"


async def watch(
    client: ScriptClient,
    console: Console,
    prefix: str,
    *,
    interval: float,
    once: bool,
    max_limiters: int = DEFAULT_MAX_LIMITERS,
) -> None:
    """Show the fleet under *prefix*: one table with *once*, else a live table refreshed
    every *interval* seconds until cancelled.

    The first read's failure is raised (Redis cannot be used at all); later failures are shown
    under the last good table while the reads go on.
    """
    from rich.live import Live

    from ._cli import reason_of, redis_errors
    from ._errors import ClientError
    from ._exceptions import RedisLimiterError

    failures: tuple[type[BaseException], ...] = (*redis_errors(), ClientError, RedisLimiterError)

    async def read() -> Fleet:
        with anyio.fail_after(READ_TIMEOUT):
            return await read_fleet(client, prefix, max_limiters=max_limiters)

    fleet = await read()
    read_at = time.monotonic()
    if once:
        console.print(fleet_table(fleet, prefix))
        return
    with Live(
        fleet_table(fleet, prefix), console=console, auto_refresh=False, transient=False
    ) as live:
        while True:
            await anyio.sleep(interval)
            try:
                latest = await read()
            except failures as exc:
                live.update(fleet_table(fleet, prefix, None, reason_of(exc)), refresh=True)
                continue
            now = time.monotonic()
            rates = issue_rates(fleet, latest, now - read_at)
            fleet, read_at = latest, now
            live.update(fleet_table(fleet, prefix, rates), refresh=True)
