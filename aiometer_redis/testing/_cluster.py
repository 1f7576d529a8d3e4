"""A throwaway three-shard Redis Cluster on loopback, for tests and benchmarks.

    with RedisCluster3() as cluster:
        client = redis.asyncio.RedisCluster.from_url(cluster.url)

With ``replicas=True`` every primary gets one replica (six nodes), and
:meth:`RedisCluster3.kill_primary` plus :meth:`RedisCluster3.wait_for_failover` stage a
primary crash and its replica's promotion.

The ``redis-server`` binary comes from :func:`find_redis_server`;
``redis-cli`` (needed for ``--cluster create``) is looked up next to it, then on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ._resp import send_command
from ._server import find_redis_server

__all__ = ["RedisCluster3", "find_redis_cli"]

_PRIMARIES = 3
_STOP_GRACE_SECONDS = 5.0


def find_redis_cli() -> str | None:
    """The ``redis-cli`` next to the ``redis-server`` in use, else the one on PATH."""
    try:
        server = find_redis_server()
    except RuntimeError:
        server = None
    if server is not None:
        candidate = Path(server).resolve().with_name("redis-cli")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("redis-cli")


def _free_ports(count: int) -> list[int]:
    # Cluster nodes also listen on port + 10000 (the cluster bus): pick ports whose bus port
    # is free as well. Holding every socket until all are chosen keeps the ports distinct.
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port + 10000 > 65535:
                continue
            bus = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(bus)
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


class RedisCluster3:
    """Three ``redis-server`` cluster primaries, all slots assigned; with ``replicas=True``
    each primary also has one replica (six nodes in all).

    Attributes:
        ports: the nodes' ports on 127.0.0.1 (all six with replicas, killed ones included).
        startup_nodes: ``(host, port)`` of every node.
        url: ``redis://`` URL of the first node, for ``RedisCluster.from_url``.
        node_timeout_ms: ``cluster-node-timeout``; with replicas, failover takes about this
            long plus the replica's election delay.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 20.0,
        replicas: bool = False,
        node_timeout_ms: int | None = None,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.replicas = replicas
        self.node_timeout_ms = (
            node_timeout_ms if node_timeout_ms is not None else (1000 if replicas else 2000)
        )
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._dir: Path | None = None

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        if not self.ports:
            raise RuntimeError("the cluster is not running")
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> RedisCluster3:
        if self._processes:
            raise RuntimeError("the cluster is already running")
        cli = find_redis_cli()
        if cli is None:
            raise RuntimeError("redis-cli not found (next to redis-server or on PATH)")
        server = find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="aiometer-cluster-"))
        try:
            self._launch(server, cli)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, server: str, cli: str) -> None:
        assert self._dir is not None
        self.ports = _free_ports(_PRIMARIES * (2 if self.replicas else 1))
        for port in self.ports:
            args = [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self._dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--daemonize",
                "no",
            ]
            with open(self._dir / f"redis-{port}.log", "ab") as log:
                self._processes.append(
                    subprocess.Popen(
                        args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        deadline = time.monotonic() + self.startup_timeout
        for port, process in zip(self.ports, self._processes, strict=True):
            while (reply := send_command(port, "PING")) is None or not reply.startswith("+PONG"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} did not start:\n{self._logs()}")
                time.sleep(0.02)
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "1" if self.replicas else "0",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.startup_timeout,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({create.returncode}):\n"
                f"{create.stdout.decode(errors='replace')}{create.stderr.decode(errors='replace')}"
            )
        for port in self.ports:
            while "cluster_state:ok" not in (send_command(port, "CLUSTER", "INFO") or ""):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} never reported cluster_state:ok")
                time.sleep(0.05)
        if self.replicas:
            self._wait_for_replicas(deadline)

    def _wait_for_replicas(self, deadline: float) -> None:
        # Every primary reports one online replica, and every replica its link to the
        # primary as up (so the replica holds the data and can be promoted).
        while True:
            roles = self.roles()
            primaries = [port for port, role in roles.items() if role == "master"]
            replicas = [port for port, role in roles.items() if role == "slave"]
            ready = (
                len(primaries) == _PRIMARIES
                and len(replicas) == _PRIMARIES
                and all(
                    "connected_slaves:1" in (send_command(port, "INFO", "replication") or "")
                    for port in primaries
                )
                and all(
                    "master_link_status:up" in (send_command(port, "INFO", "replication") or "")
                    for port in replicas
                )
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas never all attached: {roles}\n{self._logs()}")
            time.sleep(0.05)

    def _nodes(self, via: int) -> list[list[str]]:
        """CLUSTER NODES as seen by the node on port *via*, one split line per node."""
        reply = send_command(via, "CLUSTER", "NODES") or ""
        if not reply.startswith("$"):
            return []
        body = reply.partition("\r\n")[2]
        return [line.split() for line in body.splitlines() if len(line.split()) >= 8]

    def roles(self) -> dict[int, str]:
        """``"master"`` or ``"slave"`` for every live node's port, as it reports itself."""
        found: dict[int, str] = {}
        for port in self.alive_ports():
            for fields in self._nodes(port):
                if "myself" in fields[2].split(","):
                    flags = fields[2].split(",")
                    found[port] = "master" if "master" in flags else "slave"
        return found

    def alive_ports(self) -> list[int]:
        """Ports of the nodes whose process is still running."""
        return [
            port
            for port, process in zip(self.ports, self._processes, strict=True)
            if process.poll() is None
        ]

    def owner_of_slot(self, slot: int, *, via: int | None = None) -> int:
        """Port of the primary serving *slot*, per CLUSTER SLOTS-equivalent CLUSTER NODES."""
        ports = [via] if via is not None else self.alive_ports()
        for port in ports:
            for fields in self._nodes(port):
                flags = fields[2].split(",")
                if "master" not in flags or "fail" in flags or "fail?" in flags:
                    continue
                for part in fields[8:]:
                    if part.startswith("["):
                        continue  # a slot in migration
                    start, _, end = part.partition("-")
                    if int(start) <= slot <= int(end or start):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no live primary serves slot {slot}")

    def replica_of(self, primary: int) -> int:
        """Port of the replica attached to the primary on port *primary*."""
        for fields in self._nodes(primary):
            if "myself" in fields[2].split(","):
                node_id = fields[0]
                break
        else:
            raise RuntimeError(f"node {primary} did not list itself")
        for fields in self._nodes(primary):
            if fields[3] == node_id:
                return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"primary {primary} has no replica")

    def kill_primary(self, port: int) -> None:
        """SIGKILL the node on *port* (it stays dead; :meth:`stop` reaps it)."""
        process = self._processes[self.ports.index(port)]
        process.kill()
        process.wait()

    def wait_for_failover(self, replica: int, *, timeout: float = 15.0) -> None:
        """Wait until *replica* is a primary and every live node reports cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while True:
            promoted = self.roles().get(replica) == "master"
            if promoted and all(
                "cluster_state:ok" in (send_command(port, "CLUSTER", "INFO") or "")
                for port in self.alive_ports()
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica} was not promoted:\n{self._logs()}")
            time.sleep(0.02)

    def _logs(self) -> str:
        if self._dir is None:
            return "(no logs)"
        texts = []
        for path in sorted(self._dir.glob("redis-*.log")):
            lines = path.read_text(errors="replace").splitlines()[-10:]
            texts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(texts)

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after 5 s) and remove the directory."""
        processes, self._processes = self._processes, []
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.ports = []
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster3 ports={self.ports}>"
