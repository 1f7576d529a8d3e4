"""The one key layout of a limiter in Redis, shared by the limiter, the CLI, the bench and the
tests (the scripts bind the same keys by position: see ``lua/README.md``).

Every key of limiter *name* is ``{prefix}:{<name>}:<suffix>``: the braces make Redis Cluster
hash only the escaped name, so all of a limiter's keys live in one slot and one script can
touch them all.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KEY_SUFFIXES", "KEY_TYPES", "KeyLayout", "limiter_keys", "mailbox_prefix"]

#: What each key holds, in the order the scripts receive them (KEYS[1] .. KEYS[8]).
KEY_TYPES: dict[str, str] = {
    "holders": "zset",  # lease id -> lease expiry (µs)
    "queue": "zset",  # waiter id -> ticket
    "waiters": "zset",  # waiter id -> liveness expiry (µs)
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


def mailbox_prefix(name: str, prefix: str = "aiometer") -> str:
    """The start of the mailbox list of each process of limiter *name* (the process id
    follows); in the same hash slot as :func:`limiter_keys`."""
    return f"{prefix}:{{{_escape_tag(name)}}}:mb:"


@dataclass(frozen=True)
class KeyLayout:
    """The keys of one limiter: the script keys, in order, and its mailboxes' prefix."""

    keys: tuple[str, ...]
    mailbox_prefix: str

    @classmethod
    def of(cls, name: str, prefix: str = "aiometer") -> KeyLayout:
        """The layout of limiter *name* under *prefix*."""
        return cls(tuple(limiter_keys(name, prefix)), mailbox_prefix(name, prefix))

    def mailbox(self, process_id: str) -> str:
        """The list that the grants for process *process_id*'s waiters are pushed to."""
        return self.mailbox_prefix + process_id

    def typed(self) -> list[tuple[str, str]]:
        """Each key with the Redis type the limiter writes there, in KEYS order."""
        return list(zip(self.keys, KEY_TYPES.values(), strict=True))
