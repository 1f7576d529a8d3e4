"""A loopback TCP proxy between a Redis client and redis-server, for fault-injection tests.

It reads the RESP protocol in both directions, so it knows which reply answers which request.
For a request that its ``drop`` rule selects it forwards the request to Redis, waits until
Redis has answered (so the command has run), and then cuts both connections instead of
relaying the reply: the client sees a connection error for a command whose effect happened.
For a request that its ``delay`` rule selects it holds the reply for that many seconds, so the
call stays "on the wire" for as long as a test needs.

Runs on asyncio and trio (anyio), listens on 127.0.0.1 on a free port::

    async with TcpProxy(server.port, drop=every_nth(3, b"EVALSHA")) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url)

Leaving the ``async with`` block closes the listener and every connection.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = [
    "Dropped",
    "ProtocolError",
    "Request",
    "TcpProxy",
    "every_nth",
    "parse_request",
    "parse_value",
    "script_rule",
]

#: A request as the client sent it: the command name and its arguments, as bytes.
Request = tuple[bytes, ...]

#: Decides for each request, in the order the proxy sees them, whether to act on it.
DropRule = Callable[[Request], bool]
#: Returns how many seconds to hold the reply to a request (0: relay it at once).
DelayRule = Callable[[Request], float]

_CLOSED = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)
_MAX_LINE = 1 << 20


class ProtocolError(Exception):
    """The bytes seen are not RESP."""


def _line(buf: bytes | bytearray, pos: int) -> tuple[bytes, int] | None:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > _MAX_LINE:
            raise ProtocolError("a RESP line longer than 1 MiB")
        return None
    return bytes(buf[pos:end]), end + 2


def _length(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"bad RESP length {text!r}") from None


def parse_value(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """The offset just past one complete RESP2/RESP3 value starting at *pos*.

    None if *buf* does not hold all of it yet. An attribute (``|``) is returned together with
    the value it annotates.
    """
    if pos >= len(buf):
        return None
    kind = buf[pos : pos + 1]
    parsed = _line(buf, pos)
    if parsed is None:
        return None
    header, after = parsed
    header = header[1:]
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return after
    if kind in (b"$", b"!", b"="):
        size = _length(header)
        if size < 0:
            return after
        end = after + size + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = _length(header)
        if kind in (b"%", b"|"):
            count *= 2
        position: int | None = after
        for _ in range(max(count, 0)):
            assert position is not None
            position = parse_value(buf, position)
            if position is None:
                return None
        if kind == b"|" and position is not None:
            return parse_value(buf, position)
        return position
    raise ProtocolError(f"unknown RESP type {kind!r}")


def parse_request(buf: bytes | bytearray, pos: int = 0) -> tuple[Request, int] | None:
    """One complete request starting at *pos*: ``(arguments, offset past it)``, or None.

    Requests are arrays of bulk strings; an inline command (one line of words) is accepted
    too.
    """
    if pos >= len(buf):
        return None
    if buf[pos : pos + 1] != b"*":
        parsed = _line(buf, pos)
        if parsed is None:
            return None
        text, after = parsed
        return tuple(text.split()), after
    parsed = _line(buf, pos)
    if parsed is None:
        return None
    header, position = parsed
    args: list[bytes] = []
    for _ in range(max(_length(header[1:]), 0)):
        parsed = _line(buf, position)
        if parsed is None:
            return None
        bulk, start = parsed
        if bulk[:1] != b"$":
            raise ProtocolError(f"a request argument must be a bulk string, got {bulk!r}")
        end = start + _length(bulk[1:])
        if len(buf) < end + 2:
            return None
        args.append(bytes(buf[start:end]))
        position = end + 2
    return tuple(args), position


def every_nth(n: int, *commands: bytes) -> DropRule:
    """A rule selecting every *n*-th request whose command is one of *commands* (any case;
    all commands if none are given), counting from the first request the rule sees."""
    wanted = {c.upper() for c in commands}
    seen = 0

    def rule(request: Request) -> bool:
        nonlocal seen
        if wanted and (not request or request[0].upper() not in wanted):
            return False
        seen += 1
        return seen % n == 0

    return rule


@dataclass(frozen=True)
class Dropped:
    """A request that reached Redis and whose reply the proxy threw away."""

    request: Request
    reply: bytes


@dataclass
class _Pending:
    request: Request
    drop: bool
    delay: float


@dataclass(eq=False)
class _Link:
    client: anyio.abc.SocketStream
    server: anyio.abc.SocketStream
    pending: deque[_Pending] = field(default_factory=deque)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def _abort(stream: anyio.abc.SocketStream) -> None:
    # SO_LINGER 0: the close sends a RST, like a connection cut by the network or a crash.
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, anyio.TypedAttributeLookupError):
        pass


class TcpProxy:
    """Relays 127.0.0.1:<port> to *target_host*:*target_port*, cutting or delaying replies.

    Args:
        target_port: the port of the redis-server to relay to.
        target_host: its address (default 127.0.0.1).
        drop: for every request, in order: True to let Redis run it and then cut the client's
            and the server's connections before the reply reaches the client. Requests that
            the client pipelined behind it are not forwarded. Assignable at any time.
        delay: for every request: seconds to hold its reply (and so every later reply on
            that connection) before relaying it. Assignable at any time.

    Attributes:
        commands: how many requests of each command (upper case) the proxy has forwarded.
        dropped: the requests whose replies were thrown away, with those replies.
        connections: how many client connections were accepted.
        errors: bytes that were not RESP (the connection was cut); empty in a good run.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        drop: DropRule | None = None,
        delay: DelayRule | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.drop = drop
        self.delay = delay
        self.commands: Counter[bytes] = Counter()
        self.dropped: list[Dropped] = []
        self.connections = 0
        self.errors: list[str] = []
        self._links: set[_Link] = set()
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0 through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def in_flight(self) -> list[Request]:
        """The requests forwarded to Redis whose replies the client has not received yet."""
        return [p.request for link in list(self._links) for p in link.pending]

    def cut_all(self) -> None:
        """Cut every open connection now (RST both ways), as a network failure would."""
        for link in list(self._links):
            link.scope.cancel()

    async def __aenter__(self) -> TcpProxy:
        if self._task_group is not None:
            raise RuntimeError("the proxy is already running")
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        try:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
        except BaseException:
            await anyio.aclose_forcefully(listener)
            raise
        self._port = listener.extra(SocketAttribute.local_port)
        self._listener = listener
        self._task_group = task_group
        task_group.start_soon(listener.serve, self._serve, task_group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        listener, self._listener = self._listener, None
        self._port = None
        if task_group is None:
            return
        task_group.cancel_scope.cancel()
        try:
            await task_group.__aexit__(exc_type, exc, tb)
        finally:
            if listener is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(listener)

    # -- one client connection -------------------------------------------------------------

    async def _serve(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        streams = [client]
        link: _Link | None = None
        try:
            try:
                server = await anyio.connect_tcp(self.target_host, self.target_port)
            except OSError:
                return
            streams.append(server)
            link = _Link(client, server)
            self._links.add(link)
            with link.scope:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._upstream, link, task_group.cancel_scope)
                    task_group.start_soon(self._downstream, link, task_group.cancel_scope)
        finally:
            if link is not None:
                self._links.discard(link)
            # Shielded: in a cancelled task the first close would otherwise raise and skip
            # the second.
            with anyio.CancelScope(shield=True):
                for stream in streams:
                    _abort(stream)
                    await anyio.aclose_forcefully(stream)

    async def _upstream(self, link: _Link, done: anyio.CancelScope) -> None:
        """Client to Redis: forward whole requests; stop at one that is to be dropped."""
        buffer = bytearray()
        try:
            while True:
                try:
                    buffer += await link.client.receive()
                except _CLOSED:
                    return
                position = 0
                cut = False
                while not cut:
                    parsed = parse_request(buffer, position)
                    if parsed is None:
                        break
                    request, position = parsed
                    command = request[0].upper() if request else b""
                    self.commands[command] += 1
                    drop = self.drop is not None and self.drop(request)
                    delay = self.delay(request) if self.delay is not None else 0.0
                    link.pending.append(_Pending(request, drop, delay))
                    cut = drop
                try:
                    await link.server.send(bytes(buffer[:position]))
                except _CLOSED:
                    return
                del buffer[:position]
                if cut:
                    # Nothing more reaches Redis; the link is cut once the reply is in (or
                    # when the client gives up first).
                    while True:
                        try:
                            await link.client.receive()
                        except _CLOSED:
                            return
        except ProtocolError as exc:
            self.errors.append(f"request: {exc}")
        finally:
            done.cancel()

    async def _downstream(self, link: _Link, done: anyio.CancelScope) -> None:
        """Redis to client: relay whole replies, holding or throwing away the chosen ones."""
        buffer = bytearray()
        try:
            while True:
                try:
                    buffer += await link.server.receive()
                except _CLOSED:
                    return
                position = relayed = 0
                while True:
                    end = parse_value(buffer, position)
                    if end is None:
                        break
                    push = buffer[position : position + 1] == b">"
                    if not push and link.pending:
                        pending = link.pending[0]
                        if pending.drop:
                            self.dropped.append(
                                Dropped(pending.request, bytes(buffer[position:end]))
                            )
                            await self._send(link, buffer[relayed:position])
                            return
                        if pending.delay > 0:
                            # Still in flight (see in_flight()) while its reply is held.
                            await self._send(link, buffer[relayed:position])
                            relayed = position
                            await anyio.sleep(pending.delay)
                        link.pending.popleft()
                    position = end
                if not await self._send(link, buffer[relayed:position]):
                    return
                del buffer[:position]
        except ProtocolError as exc:
            self.errors.append(f"reply: {exc}")
        finally:
            done.cancel()

    @staticmethod
    async def _send(link: _Link, data: bytes | bytearray) -> bool:
        if not data:
            return True
        try:
            await link.client.send(bytes(data))
        except _CLOSED:
            return False
        return True


def script_rule(shas: Sequence[str], *, every: int = 1) -> DropRule:
    """A rule selecting every *every*-th EVALSHA of one of the scripts with SHA1 *shas*."""
    wanted = {sha.encode() for sha in shas}
    seen = 0

    def rule(request: Request) -> bool:
        nonlocal seen
        if len(request) < 2 or request[0].upper() != b"EVALSHA" or request[1] not in wanted:
            return False
        seen += 1
        return seen % every == 0

    return rule
