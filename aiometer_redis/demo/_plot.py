"""The demo's picture: requests in flight and arrivals over time, with the limits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._target import Request

__all__ = ["plot"]


def plot(
    requests: Sequence[Request],
    path: str,
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    burst: int,
    refused: Sequence[tuple[float, int, float]] = (),
    rates: Sequence[tuple[float, int, float]] = (),
    capacity: float | None = None,
    fleet_rate: bool = True,
) -> None:
    """Draw in-flight requests and arrivals per 100 ms over time, with the limits as lines.

    With *capacity* (a target that pushes back), a third panel shows per second the requests
    served and refused (429), the capacity, and the effective rate the workers applied, from
    *rates* (arrival, worker, rate): the fleet's shared rate if *fleet_rate* (the lowest of the
    workers' latest reads), else the sum of each worker's own latest rate.

    Raises:
        ValueError: no request to draw.
    """
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
    panels = 3 if capacity is not None else 2
    figure, axes = plt.subplots(panels, 1, figsize=(9, 3 * panels), sharex=True)
    top, bottom = axes[0], axes[1]
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
    bottom.legend(loc="upper right")
    if capacity is not None:
        _pushback_panel(axes[2], requests, refused, rates, capacity, fleet_rate, origin)
    axes[-1].set_xlabel("seconds since the first request")
    figure.suptitle(f"{len(requests)} requests seen by the target")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _pushback_panel(
    axis: Any,
    requests: Sequence[Request],
    refused: Sequence[tuple[float, int, float]],
    rates: Sequence[tuple[float, int, float]],
    capacity: float,
    fleet_rate: bool,
    origin: float,
) -> None:
    end = max([b for _, b, _ in requests] + [a for a, _, _ in refused], default=origin) - origin
    seconds = max(1, math.ceil(end))
    served = [0] * seconds
    for a, _, _ in requests:
        served[min(int(a - origin), seconds - 1)] += 1
    answered_429 = [0] * seconds
    for a, _, _ in refused:
        answered_429[min(max(int(a - origin), 0), seconds - 1)] += 1
    times = [float(i) for i in range(seconds)]
    axis.bar(times, served, width=0.9, align="edge", label="served per second")
    axis.bar(
        times, answered_429, width=0.9, align="edge", bottom=served, color="tab:orange",
        label="answered 429 per second",
    )  # fmt: skip
    axis.axhline(capacity, color="red", linestyle="--", label=f"target capacity = {capacity:g}/s")
    # The effective rate: the fleet's shared rate, as the lowest of the workers' latest reads
    # (they read it every 0.25 s, so right after a cut some still report the rate before it),
    # or, for limiters of their own, the sum of each worker's latest.
    latest: dict[int, float] = {}
    points: list[tuple[float, float]] = []
    for arrival, worker, rate in sorted(rates):
        latest[worker] = rate
        value = min(latest.values()) if fleet_rate else sum(latest.values())
        points.append((arrival - origin, value))
    if points:
        axis.step(
            [t for t, _ in points], [v for _, v in points], where="post", color="black",
            label="effective rate of the workers' limiter" + ("" if fleet_rate else "s (sum)"),
        )  # fmt: skip
    axis.set_ylabel("requests per second")
    axis.legend(loc="upper right")
