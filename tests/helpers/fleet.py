"""Running a fleet of worker processes that start their work together (not collected)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def run_workers(
    worker: Path,
    common: Sequence[str],
    per_process: Sequence[Sequence[str]],
    tmp_path: Path,
    *,
    duration: float,
    lead: float = 1.5,
) -> tuple[list[Path], float]:
    """Run the script *worker* once per entry of *per_process* (its own options), each with
    *common* options, ``--start-at`` (now + *lead*), ``--duration`` and ``--out``; wait for
    all of them to exit 0 (a process left running is killed). Return their ``--out`` files
    and the common start time."""
    start_at = time.time() + lead
    outs = [tmp_path / f"worker{i}.json" for i in range(len(per_process))]
    timing = ["--start-at", repr(start_at), "--duration", repr(duration)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *common, *timing, "--out", str(out), *options]
        )
        for out, options in zip(outs, per_process, strict=True)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=duration + 60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs, start_at
