"""The test command: ``python3 tests/run.py`` (extra arguments go to pytest).

``python3 tests/run.py --ensure-venv`` only prepares ``.venv`` and prints its interpreter (the
demo launcher ``examples/fleet_demo.py`` uses it, so both share one environment).

Creates ``.venv`` on first use and installs the project with its ``dev`` extra into it, then runs,
in order, ruff check, ruff format --check, mypy --strict and pytest (asyncio and trio). Stops at
the first step that fails and exits with its status. Set ``AIOMETER_PYTHON`` to an interpreter
that already has ``.[dev]`` installed to skip the virtualenv.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python() -> str:
    chosen = os.environ.get("AIOMETER_PYTHON")
    if chosen:
        return chosen
    env_dir = ROOT / ".venv"
    python = env_dir / "bin" / "python"
    stamp = env_dir / ".installed"
    if not python.exists():
        print(f"creating {env_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(env_dir)
    pyproject = ROOT / "pyproject.toml"
    if not stamp.exists() or stamp.stat().st_mtime < pyproject.stat().st_mtime:
        print("installing .[dev] into .venv", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True
        )
        stamp.touch()
    return str(python)


def main() -> int:
    if sys.argv[1:] == ["--ensure-venv"]:
        with contextlib.redirect_stdout(sys.stderr):
            python = _python()
        print(python)
        return 0
    python = _python()
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
