"""How the limiters read the client libraries' errors: retry, refuse, or report.

The limiter never imports a client library for this: each function looks up the classes of
the libraries that are installed.
"""

from __future__ import annotations

import re

import anyio

from ._exceptions import (
    ConfigurationError,
    CorruptStateError,
    RedisLimiterError,
    RedisReplyError,
)

__all__ = [
    "TRANSIENT_CODES",
    "pool_errors",
    "refused_errors",
    "reply_code",
    "reply_errors",
    "transient_errors",
    "translate_reply",
]

#: Error replies that mean "not now": a script running too long (BUSY), a restart loading
#: its data (LOADING), a replica being promoted (READONLY, MASTERDOWN) or a slot migrating
#: (TRYAGAIN, CLUSTERDOWN). They are retried within the limiter's retry window.
TRANSIENT_CODES = frozenset(
    {"BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}
)

# Redis 7 passes a script's failing command's code on ("WRONGTYPE Operation ..."); Redis 6
# wraps it ("ERR Error running script ...: @user_script:95: WRONGTYPE Operation ..."), and
# the client libraries strip the codes they map to classes. So the code is looked for as an
# upper-case word anywhere in the text, after the class's own.
_CODE = re.compile(r"(?:^|[\s:-])([A-Z][A-Z_]{2,})(?=\s)")
_KNOWN_CODES = TRANSIENT_CODES | {"OOM", "WRONGTYPE", "NOPERM", "NOSCRIPT", "ERR_ARG"}
_CLASS_CODES = {
    "BusyLoadingError": "LOADING",
    "OutOfMemoryError": "OOM",
    "NoPermissionError": "NOPERM",
    "ReadOnlyError": "READONLY",
    "MasterDownError": "MASTERDOWN",
    "TryAgainError": "TRYAGAIN",
    "WrongTypeError": "WRONGTYPE",
}


def transient_errors() -> tuple[type[BaseException], ...]:
    """The client errors that mean "Redis is not reachable right now"."""
    errors: list[type[BaseException]] = [
        OSError,
        TimeoutError,
        anyio.ClosedResourceError,
        anyio.BrokenResourceError,
    ]
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - depends on the installed extras
        pass
    else:
        # ClusterError: redis-py gave up following redirections (e.g. TRYAGAIN while the
        # limiter's slot migrates); Redis refuses a script before running any of it then.
        errors += [
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ClusterError,
        ]
    try:
        import coredis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [
            coredis.exceptions.ConnectionError,
            coredis.exceptions.BusyLoadingError,
            coredis.exceptions.TryAgainError,
            coredis.exceptions.ClusterDownError,
        ]
    return tuple(errors)


def refused_errors() -> tuple[type[BaseException], ...]:
    """The client errors that mean "wrong credentials": never worth a retry."""
    errors: list[type[BaseException]] = []
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [redis.exceptions.AuthenticationError]
    try:
        import coredis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [coredis.exceptions.AuthenticationError]
    return tuple(errors)


def pool_errors() -> tuple[type[BaseException], ...]:
    """The client errors that mean "the client's own connection pool is full"."""
    errors: list[type[BaseException]] = []
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [redis.exceptions.MaxConnectionsError]
    return tuple(errors)


def reply_errors() -> tuple[type[BaseException], ...]:
    """The client errors that carry an error reply from Redis."""
    errors: list[type[BaseException]] = []
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [redis.exceptions.ResponseError]
    try:
        import coredis.exceptions
    except ImportError:  # pragma: no cover
        pass
    else:
        errors += [coredis.exceptions.ResponseError]
    return tuple(errors)


def reply_code(exc: BaseException) -> str:
    """The Redis error code of an error reply (``"ERR"`` if none the limiter knows)."""
    for match in _CODE.finditer(f"{exc} "):
        if match.group(1) in _KNOWN_CODES:
            return match.group(1)
    for cls in type(exc).__mro__:
        if cls.__name__ in _CLASS_CODES:
            return _CLASS_CODES[cls.__name__]
    return "ERR"


_HINTS = {
    "OOM": "Redis is out of memory (maxmemory reached under the noeviction policy); free "
    "memory or raise maxmemory",
    "WRONGTYPE": "a key of the limiter holds a value of the wrong type, written by another "
    "program; reset the limiter (limiter.reset() or `aiometer-redis reset`) to start afresh",
    "NOPERM": "the Redis user lacks a permission the limiter needs (see the ACL section of "
    "the README)",
    "ERR_ARG": "the script refused its arguments",
}


def translate_reply(name: str, what: str, exc: BaseException) -> RedisLimiterError:
    """The typed error for an error reply to limiter *name*'s call *what* (not transient)."""
    code = reply_code(exc)
    text = str(exc)
    if "DB index is out of range" in text:
        return ConfigurationError(
            f"limiter {name!r}: Redis refused the database number of the client: {text}"
        )
    hint = _HINTS.get(code, "Redis refused the call")
    message = f"limiter {name!r}: {what} failed with {code}: {hint} ({text})"
    error_type = CorruptStateError if code == "WRONGTYPE" else RedisReplyError
    return error_type(message, code)
