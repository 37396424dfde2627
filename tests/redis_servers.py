"""pytest fixtures over the real redis-server processes of ``kvtier.bench.servers`` (one helper for
tests and benchmarks): a single node per test, one per module, and a 3-node cluster per module.

Use them from any test module with ``pytest_plugins = ["tests.redis_servers"]`` (or from the root
conftest), or the classes directly: ``with RedisServer(tmp_path) as server: ...``.

Ports. A port found free and handed to a server that binds it later can be taken in between: by
another server this suite starts, by a suite running beside it on the machine, or by any socket the
kernel gives an ephemeral port (``bind`` to port 0, ``connect``). Here every port a test hands to a
server comes from ``free_port()``, which *reserves* it: the port is left with a connection in
TIME_WAIT, and for that minute the kernel gives it to no ``bind(0)`` and no ``connect()``, while a
server that sets ``SO_REUSEADDR`` (redis-server, memcached, uvicorn all do) still binds it. A server
stopped or killed re-reserves its port for its restart. And a start is checked, not assumed: a
server that could not bind ("Address already in use") is retried on a new port where the port is
ours to choose, and one whose port was answered by another process (the ``process_id`` in INFO is
not the one started) counts as not started.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvtier.bench import servers as bench
from kvtier.bench.servers import redis_binaries

HOST = "127.0.0.1"
ADDRESS_IN_USE = "address already in use"  # redis-server, memcached and uvicorn say it so (any case)


class PortTaken(RuntimeError):
    """The server could not have its port: another socket bound it, or another process answers it."""


def reserve_port(port: int = 0) -> int:
    """``port`` (0: one the kernel picks) on 127.0.0.1, left reserved for about a minute: bound and
    listening with ``SO_REUSEADDR``, connected to once and closed from the accepting side, so that
    the port is in TIME_WAIT. Raises OSError if ``port`` is in use."""
    with contextlib.closing(socket.socket()) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(8)
        listener.settimeout(5.0)
        address = listener.getsockname()
        with contextlib.closing(socket.create_connection(address, timeout=5.0)):
            accepted, _ = listener.accept()  # ours, or a client of a server just killed there
            accepted.close()  # the accepting side closes first: its end is the one in TIME_WAIT
        return int(address[1])


def free_port() -> int:
    """A loopback port for a server a test starts: nothing listens there, and nothing the kernel
    hands out takes it for a minute (see the module doc); the server must set ``SO_REUSEADDR``."""
    return reserve_port()


def rereserve(port: int) -> None:
    """Keep a stopped server's port for its restart (best effort: it may be gone already)."""
    with contextlib.suppress(OSError):
        reserve_port(port)


def answered_by(client: redis.Redis) -> int:
    """The pid of the redis-server that answers ``client``."""
    return int(client.info("server")["process_id"])


class RedisServer(bench.RedisServer):
    """``kvtier.bench.servers.RedisServer`` on reserved ports, whose ``start()`` raises PortTaken when
    the port was not to be had, and whose ``stop()``/``kill()`` keep the port for ``start()`` again."""

    def __init__(self, directory: Path, port: int | None = None, cluster: bool = False) -> None:
        super().__init__(directory, port if port is not None else free_port(), cluster)
        if cluster:  # the parent's pick was a plain free port: bound only when this node starts
            self.cluster_bus_port = free_port()

    def start(self, timeout: float = bench.START_TIMEOUT_S) -> RedisServer:
        if self.running:
            return self
        try:
            super().start(timeout)
        except RuntimeError as e:
            if ADDRESS_IN_USE in str(e).lower():
                raise PortTaken(str(e)) from e
            raise
        self._check_owner()
        return self

    def _check_owner(self) -> None:
        """PING answered: but by the process started here? One that could not bind exits a moment
        later, while a server already on that port answered."""
        assert self.proc is not None
        client = self.client(socket_timeout=5.0)
        try:
            pid = answered_by(client)
        except (redis.RedisError, OSError):
            pid = -1
        finally:
            client.close()
        if pid != self.proc.pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)  # it is exiting (its bind failed): its log says so
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            super().stop()
            raise PortTaken(f"port {self.port} is answered by pid {pid}, not by our redis-server:\n{log}")

    def stop(self) -> None:
        was_running = self.proc is not None
        super().stop()
        if was_running:
            rereserve(self.port)
            if self.cluster:
                rereserve(self.cluster_bus_port)

    def kill(self) -> None:
        was_running = self.proc is not None
        super().kill()
        if was_running:
            rereserve(self.port)
            if self.cluster:
                rereserve(self.cluster_bus_port)


class RedisClusterServers(bench.RedisClusterServers):
    """``kvtier.bench.servers.RedisClusterServers`` of this module's nodes; a start that lost a port
    to another socket starts over on new ports (``attempts`` in all)."""

    def __init__(self, directory: Path, size: int = 3, attempts: int = 3) -> None:
        self.directory = Path(directory)
        self.size = size
        self.attempts = attempts
        self._tries = 0
        self.nodes: list[bench.RedisServer] = self._new_nodes()

    def _new_nodes(self) -> list[bench.RedisServer]:
        base = self.directory / f"try{self._tries}" if self._tries else self.directory
        self._tries += 1
        return [RedisServer(base / f"node{i}", cluster=True) for i in range(self.size)]

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        while True:
            try:
                super().start(timeout)
                return self
            except PortTaken:
                if self._tries >= self.attempts:
                    raise
                self.nodes = self._new_nodes()


def start_server(directory: Path, attempts: int = 3) -> RedisServer:
    """A started single node, on a new port for each try whose port was taken; fails the test with
    an install hint without redis."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            server = RedisServer(directory / f"try{i}")
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        try:
            return server.start()
        except PortTaken as e:
            last = e
    raise RuntimeError(f"could not start redis-server after {attempts} attempts") from last


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh single node for one test; it may ``kill()``/``stop()`` and ``start()``/``restart()``
    it on the same port."""
    server = start_server(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_redis(redis_server: RedisServer) -> RedisServer:
    """The same fresh node, by the name the crash tests read better with."""
    return redis_server


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A single node shared by the tests of one module (use distinct namespaces or flush it)."""
    server = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A 3-primary cluster shared by the tests of one module (use distinct namespaces)."""
    try:
        cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


__all__ = [
    "ADDRESS_IN_USE",
    "PortTaken",
    "RedisClusterServers",
    "RedisServer",
    "free_port",
    "redis_binaries",
    "redis_cluster",
    "redis_server",
    "redis_server_module",
    "reserve_port",
    "restartable_redis",
    "start_server",
]
