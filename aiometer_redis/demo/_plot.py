"""The demo's picture: requests in flight and arrivals over time, with the limits."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._target import Request

__all__ = ["plot"]


def plot(
    requests: Sequence[Request],
    path: str,
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    burst: int,
) -> None:
    """Draw in-flight requests and arrivals per 100 ms over time, with the limits as lines.

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
