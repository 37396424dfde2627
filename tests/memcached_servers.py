"""Real memcached processes for tests, like ``tests/redis_servers.py``.

Every server binds 127.0.0.1 on a free port, is ready when ``version`` answers, and is stopped at
teardown (terminate, wait, kill) even when the test fails. ``item_size`` is memcached's ``-I`` (the
largest item it accepts): tests use small ones (64 KiB) so that ordinary test blocks need chunks.

Use the fixtures with ``pytest_plugins = ["tests.memcached_servers"]``, or the class directly:
``with MemcachedServer() as server: ...``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from pymemcache.client.base import Client

from tests.redis_servers import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_INSTALL_HINT = (
    "memcached not found on PATH: run scripts/test.sh, which installs the Debian package memcached"
)


def memcached_binary() -> str:
    path = shutil.which("memcached")
    if path is None:
        pytest.fail(_INSTALL_HINT, pytrace=False)
    return path


def _answers(port: int, timeout: float = 0.2) -> bool:
    client = Client(("127.0.0.1", port), connect_timeout=timeout, timeout=timeout)
    try:
        return bool(client.version())
    except (OSError, Exception):
        return False
    finally:
        client.close()


class MemcachedServer:
    """One memcached on 127.0.0.1. ``stop()``/``kill()`` then ``start()`` reuses the port (data is gone)."""

    def __init__(self, port: int | None = None, item_size: int = 64 << 10, memory_mb: int = 64) -> None:
        self.binary = memcached_binary()
        self.port = port if port is not None else free_port()
        self.item_size = item_size
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"memcached://{self.address}"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "-l", "127.0.0.1",
            "-p", str(self.port),
            "-U", "0",  # no UDP
            "-m", str(self.memory_mb),
            "-I", str(self.item_size),
            "-t", "2",
        ]  # fmt: skip
        if self.item_size < 1 << 20:  # memcached's slab chunk (512 KiB) must not exceed -I
            argv += ["-o", f"slab_chunk_max={self.item_size // 2}"]
        if os.geteuid() == 0:  # memcached refuses to run as root without naming a user
            argv += ["-u", "root"]
        return argv

    def start(self, timeout: float = START_TIMEOUT_S) -> MemcachedServer:
        if self.running:
            return self
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _answers(self.port):
                return self
            time.sleep(0.02)
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()[-2000:]
        self.stop()
        raise RuntimeError(f"memcached on port {self.port} did not start: {err.decode(errors='replace')}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL): clients see their connections reset."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as on a hung host."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> Client:
        return Client(("127.0.0.1", self.port), default_noreply=False, timeout=2.0)

    def __enter__(self) -> MemcachedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(item_size: int = 64 << 10, attempts: int = 3, memory_mb: int = 64) -> MemcachedServer:
    """Start one, retrying with a new port if the one picked was taken meanwhile."""
    last: Exception | None = None
    for _ in range(attempts):
        server = MemcachedServer(item_size=item_size, memory_mb=memory_mb)
        try:
            return server.start()
        except RuntimeError as e:
            last = e
    raise RuntimeError(f"could not start memcached after {attempts} attempts") from last


@pytest.fixture
def memcached_server() -> Iterator[MemcachedServer]:
    """A fresh server (item size 64 KiB) for one test; the test may kill and restart it."""
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
