"""The project's virtualenv, made on first use: shared by the test command and the demo launcher.

``tests/run.py`` needs the ``dev`` extra, ``examples/fleet_demo.py`` the ``demo`` extra; both
live in one ``.venv`` at the repository root, so running one after the other installs nothing
twice (``dev`` includes ``demo``). Only the standard library is used: this runs on a fresh
machine with nothing but ``python3``. Set ``AIOMETER_PYTHON`` to an interpreter that already
has the extra installed to skip the virtualenv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["ROOT", "ensure_venv"]

ROOT = Path(__file__).resolve().parent.parent

# Which extras a stamp stands for: an environment stamped for "dev" has "demo" too.
_PROVIDES = {"dev": {"dev", "demo"}, "demo": {"demo"}}


def ensure_venv(extra: str) -> str:
    """Return the interpreter of ``.venv`` with the project and *extra* installed.

    Creates ``.venv`` if missing and (re)installs ``.[extra]`` when it was never installed or
    ``pyproject.toml`` changed since. Progress goes to stderr.

    Raises:
        ValueError: *extra* is not "dev" or "demo".
        subprocess.CalledProcessError: pip failed (its output is above).
    """
    if extra not in _PROVIDES:
        raise ValueError(f"extra must be one of {', '.join(sorted(_PROVIDES))}, got {extra!r}")
    chosen = os.environ.get("AIOMETER_PYTHON")
    if chosen:
        return chosen
    env_dir = ROOT / ".venv"
    python = env_dir / "bin" / "python"
    if not python.exists():
        print(f"creating {env_dir}", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(env_dir)
    changed = (ROOT / "pyproject.toml").stat().st_mtime
    fresh = [
        name
        for name, provides in _PROVIDES.items()
        if extra in provides
        and (env_dir / f".installed-{name}").exists()
        and (env_dir / f".installed-{name}").stat().st_mtime >= changed
    ]
    if not fresh:
        print(f"installing .[{extra}] into {env_dir}", file=sys.stderr, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extra}]"],
            check=True,
            stdout=sys.stderr,
        )
        (env_dir / f".installed-{extra}").touch()
    return str(python)
