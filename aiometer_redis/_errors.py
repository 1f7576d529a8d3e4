"""The few neutral errors the limiter understands, and how error replies become typed errors.

Each client adapter (``_client.py``) maps its own library's exceptions to these with an
:class:`ErrorMap`, as httpx's transports map httpcore's: the limiter catches only
:class:`Unavailable` (retry), :class:`Refused` (wrong credentials) and :class:`ErrorReply`
(Redis refused the call), and never imports a client library.
"""

from __future__ import annotations

import re

import anyio

from ._exceptions import (
    ConfigurationError,
    CorruptStateError,
    RedisLimiterError,
    RedisReplyError,
    RedisUnavailableError,
)

__all__ = [
    "TRANSIENT_CODES",
    "ClientError",
    "ErrorMap",
    "ErrorReply",
    "PoolFull",
    "Refused",
    "Unavailable",
    "as_limiter_error",
    "reply_code",
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


class ClientError(Exception):
    """A client library's error, as a client adapter hands it to the limiter (the library's
    own exception is its ``__cause__``). The limiter catches only these."""


class Unavailable(ClientError):
    """No answer for now: a connection error, a time-out, a failover or migration under
    way (``BUSY``, ``LOADING``, ``TRYAGAIN``, ...). Worth retrying."""


class PoolFull(Unavailable):
    """The client's own connection pool had no free connection; Redis itself may be fine."""


class Refused(ClientError):
    """Redis refused the credentials: never worth a retry."""


class ErrorReply(ClientError):
    """Redis answered with an error reply that is not transient.

    Attributes:
        code: the reply's error code (``"WRONGTYPE"``, ``"NOPERM"``, ... ``"ERR"``).
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ErrorMap:
    """How one client library's exceptions map to the neutral ones; each adapter has one.

    Args:
        refused: the library's "wrong credentials" errors.
        pool: its "connection pool exhausted" errors.
        unavailable: its connection, time-out and "try again later" errors (besides the
            ones every library raises: OSError, TimeoutError, anyio's stream errors).
        reply: its error-reply class(es).
    """

    __slots__ = ("_pool", "_refused", "_reply", "_unavailable")

    def __init__(
        self,
        *,
        refused: tuple[type[BaseException], ...],
        pool: tuple[type[BaseException], ...],
        unavailable: tuple[type[BaseException], ...],
        reply: tuple[type[BaseException], ...],
    ) -> None:
        self._refused = refused
        self._pool = pool
        self._unavailable: tuple[type[BaseException], ...] = (
            OSError,
            TimeoutError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            *unavailable,
        )
        self._reply = reply

    def map(self, exc: BaseException) -> ClientError | None:
        """The neutral error for *exc* (None: not one of the library's Redis errors). The
        order matters: the libraries derive their credential and pool errors from their
        connection errors."""
        if isinstance(exc, ClientError):
            return exc
        if isinstance(exc, self._refused):
            return Refused(str(exc))
        if isinstance(exc, self._pool):
            return PoolFull(str(exc))
        if isinstance(exc, self._unavailable):
            return Unavailable(str(exc) or type(exc).__name__)
        if isinstance(exc, self._reply):
            code = reply_code(exc)
            if code in TRANSIENT_CODES:
                return Unavailable(str(exc))
            return ErrorReply(str(exc), code)
        return None


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


def translate_reply(name: str, what: str, exc: ErrorReply) -> RedisLimiterError:
    """The typed error for an error reply to limiter *name*'s call *what* (not transient)."""
    code = exc.code
    text = str(exc)
    if "DB index is out of range" in text:
        return ConfigurationError(
            f"limiter {name!r}: Redis refused the database number of the client: {text}"
        )
    hint = _HINTS.get(code, "Redis refused the call")
    message = f"limiter {name!r}: {what} failed with {code}: {hint} ({text})"
    error_type = CorruptStateError if code == "WRONGTYPE" else RedisReplyError
    return error_type(message, code)


def as_limiter_error(name: str, what: str, exc: ClientError) -> RedisLimiterError:
    """The typed error for a failed call *what* of limiter *name* that is not retried."""
    if isinstance(exc, ErrorReply):
        return translate_reply(name, what, exc)
    if isinstance(exc, Refused):
        return ConfigurationError(f"limiter {name!r}: Redis refused the credentials: {exc}")
    return RedisUnavailableError(f"limiter {name!r}: Redis did not answer {what}: {exc}")
