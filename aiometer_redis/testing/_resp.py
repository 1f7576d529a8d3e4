"""The few bytes of RESP that the testing helpers speak without a client library."""

from __future__ import annotations

import socket
from collections.abc import Sequence

__all__ = ["encode_command", "send_command"]


def encode_command(args: Sequence[str | bytes | int]) -> bytes:
    """One command in the RESP2 wire format (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _complete(reply: bytes) -> bool:
    # Enough for the simple, error, integer and bulk-string replies of the admin commands the
    # helpers send (PING, FLUSHALL, CLUSTER INFO, ...).
    if reply.startswith((b"+", b"-", b":")):
        return reply.endswith(b"\r\n")
    if reply.startswith(b"$"):
        header, _, rest = reply.partition(b"\r\n")
        return len(rest) >= int(header[1:]) + 2
    return False


def send_command(port: int, *args: str, timeout: float = 1.0) -> str | None:
    """Send one command to 127.0.0.1:*port*; return the raw reply text, None if unreachable."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(encode_command(args))
            chunks: list[bytes] = []
            sock.settimeout(0.5)
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace")
