"""The one key layout of a limiter in Redis, shared by the limiter, the CLI, the bench and the
tests (the scripts bind the same keys by position: see ``lua/README.md``).

Every key of limiter *name* is ``{prefix}:{<name>}:<suffix>``: the braces make Redis Cluster
hash only the escaped name, so all of a limiter's keys live in one slot and one script can
touch them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiometer import Rate

__all__ = [
    "KEY_SUFFIXES",
    "KEY_TYPES",
    "KeyLayout",
    "control_key",
    "costs_key",
    "limiter_keys",
    "mailbox_prefix",
    "window_keys",
]

#: What each key holds, in the order the scripts receive them (KEYS[1] .. KEYS[8]).
KEY_TYPES: dict[str, str] = {
    "holders": "zset",  # lease id -> lease expiry (µs)
    "queue": "zset",  # waiter id -> ticket
    "waiters": "zset",  # waiter id (or process id: its queued waiters) -> liveness expiry (µs)
    "tat": "string",  # GCRA theoretical arrival time (µs)
    "seq": "string",  # ticket and fencing-token counter
    "grants": "hash",  # lease or rate-only waiter id -> "<token>|<start_at_us>"
    "recent": "zset",  # rate-only waiter id -> end of its memory (µs)
    "spare": "zset",  # rate starts given back -> start (µs)
}

#: The keys' suffixes in KEYS order.
KEY_SUFFIXES: tuple[str, ...] = tuple(KEY_TYPES)


def _escape_tag(name: str) -> str:
    # Redis hashes the text between the first "{" and the next "}"; escaping both braces
    # (and "%", to keep the mapping one-to-one) keeps any name inside its own tag.
    return name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def limiter_keys(name: str, prefix: str = "aiometer") -> list[str]:
    """The keys the scripts are given for limiter *name*, in KEYS order (one hash slot)."""
    tag = _escape_tag(name)
    return [f"{prefix}:{{{tag}}}:{suffix}" for suffix in KEY_SUFFIXES]


def costs_key(name: str, prefix: str = "aiometer") -> str:
    """KEYS[9]: the HASH of reservation costs and window sums of limiter *name*."""
    return f"{prefix}:{{{_escape_tag(name)}}}:costs"


def control_key(name: str, prefix: str = "aiometer") -> str:
    """KEYS[10]: the HASH of limiter *name*'s pause, limits set at run time and adaptive rate."""
    return f"{prefix}:{{{_escape_tag(name)}}}:control"


def window_keys(name: str, prefix: str, rates: Sequence[Rate]) -> list[str]:
    """KEYS[11..]: the window log (a ZSET) of each of *rates*, in order."""
    tag = _escape_tag(name)
    return [f"{prefix}:{{{tag}}}:window:{round(r.per * 1e6)}:{r.counts}" for r in rates]


def mailbox_prefix(name: str, prefix: str = "aiometer") -> str:
    """The start of the mailbox list of each process of limiter *name* (the process id
    follows); in the same hash slot as :func:`limiter_keys`."""
    return f"{prefix}:{{{_escape_tag(name)}}}:mb:"


@dataclass(frozen=True)
class KeyLayout:
    """The keys of one limiter: the eight it always has, in order, its mailboxes' prefix,
    and the keys of costs, control and windows (``script_keys``: all that the writing scripts
    are given: the eight, ``costs``, ``control``, then one window log per Rate)."""

    keys: tuple[str, ...]
    mailbox_prefix: str
    script_keys: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, prefix: str = "aiometer", rates: Sequence[Rate] = ()) -> KeyLayout:
        """The layout of limiter *name* under *prefix*, with the windows of *rates*."""
        keys = tuple(limiter_keys(name, prefix))
        extra = (
            costs_key(name, prefix),
            control_key(name, prefix),
            *window_keys(name, prefix, rates),
        )
        return cls(keys, mailbox_prefix(name, prefix), keys + extra)

    def mailbox(self, process_id: str) -> str:
        """The list that the grants for process *process_id*'s waiters are pushed to."""
        return self.mailbox_prefix + process_id

    def typed(self) -> list[tuple[str, str]]:
        """Each key with the Redis type the limiter writes there, in KEYS order."""
        return list(zip(self.keys, KEY_TYPES.values(), strict=True))
