"""pytest fixtures over the real memcached processes of ``kvtier.bench.servers`` (one helper for tests
and benchmarks), like ``tests/redis_servers.py``. ``item_size`` is memcached's ``-I`` (the largest
item it accepts): the fixtures use 64 KiB, so that ordinary test blocks need chunks.

Ports as in ``tests/redis_servers.py``: reserved until the server binds them, re-reserved while a
stopped server waits for its restart, and a start checked (a failed bind is retried on a new port;
a port answered by another process, whose ``stats`` pid is not ours, is no start).

Use the fixtures from any test module (the root conftest loads this plugin), or the class directly:
``with MemcachedServer(item_size=4096) as server: ...``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from kvtier.bench import servers as bench
from kvtier.bench.servers import memcached_binary
from tests.redis_servers import ADDRESS_IN_USE, PortTaken, free_port, rereserve

TEST_ITEM_SIZE = 64 << 10


class MemcachedServer(bench.MemcachedServer):
    """``kvtier.bench.servers.MemcachedServer`` on a reserved port, whose ``start()`` raises PortTaken
    when the port was not to be had, and whose ``stop()``/``kill()`` keep the port for a restart."""

    def __init__(self, port: int | None = None, item_size: int = 1 << 20, memory_mb: int = 64) -> None:
        super().__init__(port if port is not None else free_port(), item_size, memory_mb)

    def start(self, timeout: float = bench.START_TIMEOUT_S) -> MemcachedServer:
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
        """``version`` answered: but from the process started here, not one already on the port?"""
        assert self.proc is not None
        client = self.client()
        try:
            pid = int(client.stats()[b"pid"])
        except Exception:  # refused, reset, timed out: not ours either way
            pid = -1
        finally:
            client.close()
        if pid != self.proc.pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)  # it is exiting (its bind failed)
            super().stop()
            raise PortTaken(f"port {self.port} is answered by pid {pid}, not by our memcached")

    def stop(self) -> None:
        was_running = self.proc is not None
        super().stop()
        if was_running:
            rereserve(self.port)

    def kill(self) -> None:
        was_running = self.proc is not None
        super().kill()
        if was_running:
            rereserve(self.port)


def start_server(item_size: int = TEST_ITEM_SIZE, attempts: int = 3, memory_mb: int = 64) -> MemcachedServer:
    """A started memcached, on a new port for each try whose port was taken; fails the test with an
    install hint without memcached."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            server = MemcachedServer(item_size=item_size, memory_mb=memory_mb)
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        try:
            return server.start()
        except PortTaken as e:
            last = e
    raise RuntimeError(f"could not start memcached after {attempts} attempts") from last


@pytest.fixture
def memcached_server() -> Iterator[MemcachedServer]:
    """A fresh server (item size 64 KiB) for one test; the test may kill, pause and restart it."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def memcached_pair() -> Iterator[tuple[MemcachedServer, MemcachedServer]]:
    """Two servers (item size 64 KiB) for a two-server ring."""
    first = start_server()
    try:
        second = start_server()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


__all__ = ["MemcachedServer", "memcached_binary", "memcached_pair", "memcached_server", "start_server"]
