"""The fleet demo: N worker processes, one RedisLimiter, one HTTP target that checks the limits.

Roles (``aiometer-redis demo --role``): ``all`` runs everything on this machine (an embedded
redis-server unless ``--redis-url`` is given, the target in a thread, the workers as
subprocesses) and ends with a verdict; ``target`` runs only the HTTP target and prints a
verdict after each burst of traffic; ``worker`` runs one worker. The target is the judge: it
records when each request arrived and how many were in flight, so the verdict is what a
rate-limited server would have seen.

Modules: ``_target`` (the HTTP target and its recorder), ``_workers`` (a worker, and the fleet
of worker processes), ``_options`` (defaults that depend on ``--target-capacity``),
``_verdict`` (judging the record against the limits, with the window
arithmetic of :mod:`aiometer_redis.testing`), ``_plot`` (the picture), ``_run`` (the roles).

With ``--target-capacity`` the target also enforces a limit of its own (429 with Retry-After)
while the workers are configured far above it and report each 429 with ``throttled()``; the
push-back verdict says how close the fleet came to the target's capacity, and at what cost in
429s, once the first seconds of convergence are over.
"""

from __future__ import annotations

from ._run import run_demo, run_target
from ._target import Capacity, Recorder, TargetServer
from ._verdict import (
    PushbackVerdict,
    Verdict,
    WindowCheck,
    judge,
    judge_pushback,
    render_pushback,
    render_verdict,
)
from ._workers import run_worker, worker_main

__all__ = [
    "Capacity",
    "PushbackVerdict",
    "Recorder",
    "TargetServer",
    "Verdict",
    "WindowCheck",
    "judge",
    "judge_pushback",
    "render_pushback",
    "render_verdict",
    "run_demo",
    "run_target",
    "run_worker",
    "worker_main",
]
