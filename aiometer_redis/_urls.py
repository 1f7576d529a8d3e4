"""The Redis URLs that ``RedisLimiter.from_url`` and the command line accept.

Plain URLs (``redis://``, ``rediss://``, ``unix://``) are handed to the client library as
they are. A Sentinel URL names the sentinels and the monitored service instead of one
server::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service[/db]
        [?sentinel_username=...&sentinel_password=...]

The credentials before ``@`` and the ``db`` are those of the Redis primary; the query
parameters are the sentinels' own credentials, when they have any. A port left out is
26379, the sentinel default. Percent-encode reserved characters in names and passwords.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

__all__ = ["SENTINEL_SCHEME", "SentinelURL", "parse_url"]

SENTINEL_SCHEME = "redis+sentinel"
_PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
_SENTINEL_QUERY = frozenset({"sentinel_username", "sentinel_password"})
_DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        # Never show the passwords (this may end up in a log or a traceback).
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"SentinelURL({SENTINEL_SCHEME}://{hosts}/{self.service_name}/{self.db})"


def _bad(url: str, why: str) -> ValueError:
    # The URL is not repeated whole: it may carry a password.
    scheme = url.partition("://")[0]
    return ValueError(f"invalid {scheme or 'Redis'} URL: {why}")


def _host_port(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6 address]:port
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise _bad(url, f"expected ':port' after ']', got {rest!r}")
        port_text = rest[1:]
    else:
        host, colon, port_text = item.partition(":")
        if colon and not port_text:
            raise _bad(url, f"empty port in {item!r}")
    if not host:
        raise _bad(url, f"a sentinel address has no host: {item!r}")
    if not port_text:
        return host, _DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"a sentinel port must be an integer from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def _parse_sentinel(url: str) -> SentinelURL:
    parts = urllib.parse.urlsplit(url)
    if parts.fragment:
        raise _bad(url, "a fragment ('#...') has no meaning here")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    if not hostlist:
        raise _bad(url, "no sentinel address (expected host[:port][,host[:port]...])")
    sentinels = tuple(_host_port(url, item) for item in hostlist.split(","))

    segments = parts.path.split("/")[1:] if parts.path else []
    if not segments or not segments[0]:
        raise _bad(url, "no service name (expected .../service_name[/db])")
    if len(segments) > 2:
        raise _bad(url, "expected the path /service_name or /service_name/db")
    service_name = urllib.parse.unquote(segments[0])
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise _bad(url, f"db must be an integer >= 0, got {segments[1]!r}")
        db = int(segments[1])

    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in _SENTINEL_QUERY:
            allowed = ", ".join(sorted(_SENTINEL_QUERY))
            raise _bad(url, f"unknown query parameter {key!r} (allowed: {allowed})")
        if key in query:
            raise _bad(url, f"query parameter {key!r} given twice")
        query[key] = value
    return SentinelURL(
        sentinels=sentinels,
        service_name=service_name,
        db=db,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


# A host name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6 address.
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?\]")
# The largest database number Redis can be configured with (``databases`` is an int).
_MAX_DB = 2**31 - 1


def _check_db(url: str, text: str) -> None:
    if not text.isdigit() or int(text) > _MAX_DB:
        raise _bad(url, f"db must be an integer from 0 to {_MAX_DB}, got {text!r}")


def _check_plain(url: str) -> None:
    """Check the host, port and db of a ``redis://`` or ``rediss://`` URL."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    bracketed = netloc.startswith("[")
    host = netloc[: netloc.find("]") + 1] if bracketed else netloc.partition(":")[0]
    if host and not _HOST.fullmatch(host):
        raise _bad(url, f"malformed host {host!r}")
    try:
        port = parts.port
    except ValueError:
        port_text = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise _bad(url, f"port must be an integer from 1 to 65535, got {port_text!r}") from None
    if port == 0:
        raise _bad(url, "port must be an integer from 1 to 65535, got '0'")
    path = parts.path.strip("/")
    if path:
        _check_db(url, path)
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "db":
            _check_db(url, value)


def parse_url(url: str) -> SentinelURL | None:
    """Check *url*'s form; return the parsed Sentinel URL, or None for a plain Redis URL.

    Raises:
        TypeError: *url* is not a str.
        ValueError: an unknown scheme, a malformed host, a port out of 1-65535, a db that is
            not an integer from 0 to 2**31 - 1, or a malformed Sentinel URL.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    scheme, separator, _ = url.partition("://")
    if not separator:
        raise ValueError("expected a Redis URL such as redis://127.0.0.1:6379/0 (no '://' found)")
    scheme = scheme.lower()
    if scheme in _PLAIN_SCHEMES:
        if scheme != "unix":
            _check_plain(url)
        return None
    if scheme == SENTINEL_SCHEME:
        return _parse_sentinel(url)
    if scheme == "rediss+sentinel":
        raise _bad(
            url,
            "TLS through Sentinel is not supported in a URL; build the client with "
            "redis.asyncio.sentinel.Sentinel(..., ssl=True) and pass it to RedisLimiter",
        )
    accepted = ", ".join(f"{name}://" for name in (*sorted(_PLAIN_SCHEMES), SENTINEL_SCHEME))
    raise ValueError(f"unsupported Redis URL scheme {scheme!r}; expected one of {accepted}")
