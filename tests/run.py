"""The test command: ``python3 tests/run.py`` (extra arguments go to pytest).

Creates ``.venv`` on first use and installs the project with its ``dev`` extra into it (see
``tools/bootstrap.py``), then runs, in order, ruff check, ruff format --check, mypy --strict and
pytest (asyncio and trio). Stops at the first step that fails and exits with its status. Set
``AIOMETER_PYTHON`` to an interpreter that already has ``.[dev]`` installed to skip the
virtualenv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bootstrap import ROOT, ensure_venv


def main() -> int:
    python = ensure_venv("dev")
    steps = [
        [python, "-m", "ruff", "check", "."],
        [python, "-m", "ruff", "format", "--check", "."],
        [python, "-m", "mypy"],
        [python, "-m", "pytest", *sys.argv[1:]],
    ]
    for step in steps:
        print("+", " ".join(step[2:]), flush=True)
        status = subprocess.run(step, cwd=ROOT).returncode
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
