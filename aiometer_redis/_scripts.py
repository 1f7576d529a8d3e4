"""Loading of the limiter's Lua scripts.

The scripts live in the repository's top-level ``lua/`` directory; the wheel ships them
as ``aiometer_redis/lua/`` (see ``force-include`` in ``pyproject.toml``). Both places are
looked up, the packaged one first, so a source checkout and an installed wheel behave
the same.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "PRELUDES",
    "SCRIPT_NAMES",
    "TOOL_SCRIPTS",
    "WRITERS",
    "Script",
    "all_scripts",
    "decode_acquire_reply",
    "decode_swap_reply",
    "load_script",
    "script_dir",
]

#: Names of every script, one ``<name>.lua`` file each.
SCRIPT_NAMES: tuple[str, ...] = (
    "acquire",
    "release",
    "renew",
    "cancel",
    "settle",
    "status",
    "control",
)

#: Read-only scripts of the command line (``aiometer-redis status``), not of the limiter.
TOOL_SCRIPTS: tuple[str, ...] = ("key_types", "stored_numbers")

#: The scripts that write and take the common header (control.lua writes too, but takes
#: arguments of its own: the command line calls it without knowing the fleet's options).
WRITERS = frozenset({"acquire", "release", "renew", "cancel", "settle"})

#: Redis scripts cannot include one another, so each script of the limiter is sent after its
#: preludes, as one script (see ``lua/README.md``): ``_read.lua`` (the key and ARGV[1]
#: bindings and the helpers a read-only script needs) for all of them, then ``_shared.lua``
#: (the rest of the header, the writers' helpers) for the writers.
PRELUDES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        **dict.fromkeys(WRITERS, ("_read", "_shared")),
        "status": ("_read",),
        "control": ("_read",),
    }
)


def decode_acquire_reply(reply: str) -> list[list[int]]:
    """acquire.lua's reply string as one list per waiter id: ``[1, token, delay_us]`` when
    granted, ``[0, ahead]`` when queued."""
    return [[int(field) for field in entry.split(",")] for entry in reply.split(";")]


def decode_swap_reply(reply: list[Any]) -> tuple[int, list[str], list[list[int]]]:
    """The reply of an acquire.lua call with release items: how many of them were held, the
    grants handed off to the caller's own queued waiters (``"<waiter id>|<token>|<delay_us>"``,
    as in a mailbox) and the entries of its waiter items (see :func:`decode_acquire_reply`)."""
    released, grants, entries = reply
    return (
        int(released),
        grants.split(";") if grants else [],
        decode_acquire_reply(entries) if entries else [],
    )


@dataclass(frozen=True)
class Script:
    """One Lua script: its name, its exact source and the SHA1 that EVALSHA uses.

    ``sha1`` is the hex digest of ``source`` encoded as UTF-8, which is what Redis
    computes in ``SCRIPT LOAD``.
    """

    name: str
    source: str
    sha1: str

    @classmethod
    def from_source(cls, name: str, source: str) -> Script:
        """Build a script from its source text, computing its SHA1."""
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


def _candidate_dirs() -> tuple[Path, Path]:
    here = Path(__file__).resolve().parent
    return here / "lua", here.parent / "lua"


def script_dir() -> Path:
    """Return the directory the scripts are read from.

    Raises:
        FileNotFoundError: neither the packaged ``aiometer_redis/lua/`` nor the
            repository's ``lua/`` directory holds the scripts.
    """
    for candidate in _candidate_dirs():
        if (candidate / f"{SCRIPT_NAMES[0]}.lua").is_file():
            return candidate
    searched = ", ".join(str(p) for p in _candidate_dirs())
    raise FileNotFoundError(f"aiometer_redis Lua scripts not found (searched {searched})")


@functools.cache
def load_script(name: str) -> Script:
    """Return the script called ``name`` (e.g. ``"acquire"``), read once and cached.

    Raises:
        ValueError: ``name`` is not one of :data:`SCRIPT_NAMES` or :data:`TOOL_SCRIPTS`.
        FileNotFoundError: the script files are missing from the installation.
    """
    if name not in SCRIPT_NAMES and name not in TOOL_SCRIPTS:
        raise ValueError(f"unknown script {name!r}, expected one of {', '.join(SCRIPT_NAMES)}")
    # Bytes, not text mode: the SHA1 must match the bytes Redis receives.
    directory = script_dir()
    source = (directory / f"{name}.lua").read_bytes().decode("utf-8")
    for prelude in reversed(PRELUDES.get(name, ())):
        source = (directory / f"{prelude}.lua").read_bytes().decode("utf-8") + "\n" + source
    return Script.from_source(name, source)


def all_scripts() -> Mapping[str, Script]:
    """Return every script by name (a read-only mapping, in :data:`SCRIPT_NAMES` order)."""
    return MappingProxyType({name: load_script(name) for name in SCRIPT_NAMES})
