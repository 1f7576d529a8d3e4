"""The fleet demo in one command on a fresh machine: ``python3 examples/fleet_demo.py``.

Prepares the project's ``.venv`` with the ``demo`` extra (``tools/bootstrap.py``, the same
environment the tests use), then runs ``aiometer-redis demo`` in it with any arguments given
here, e.g. ``python3 examples/fleet_demo.py --workers 8 --plot fleet.png``. Without
``--redis-url`` the demo starts its own redis-server on a free loopback port.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bootstrap import ensure_venv


def main() -> None:
    python = ensure_venv("demo")
    os.execv(python, [python, "-m", "aiometer_redis", "demo", *sys.argv[1:]])


if __name__ == "__main__":
    main()
