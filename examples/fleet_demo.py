"""The fleet demo in one command on a fresh machine: ``python3 examples/fleet_demo.py``.

Prepares the project's ``.venv`` (through ``tests/run.py --ensure-venv``, the same environment
the tests use), then runs ``aiometer-redis demo`` in it with any arguments given here, e.g.
``python3 examples/fleet_demo.py --workers 8 --plot fleet.png``. Without ``--redis-url`` the
demo starts its own redis-server on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    python = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "run.py"), "--ensure-venv"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.strip()
    os.execv(python, [python, "-m", "aiometer_redis", "demo", *sys.argv[1:]])


if __name__ == "__main__":
    main()
