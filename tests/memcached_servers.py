"""pytest fixtures over the real memcached processes of ``kvtier.bench.servers`` (one helper for tests
and benchmarks), like ``tests/redis_servers.py``. ``item_size`` is memcached's ``-I`` (the largest
item it accepts): the fixtures use 64 KiB, so that ordinary test blocks need chunks.

Ports are reserved until a server binds them and its start is checked (``kvtier.bench.servers``).

Use the fixtures from any test module (the root conftest loads this plugin), or the class directly:
``with MemcachedServer(item_size=4096) as server: ...``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.bench.servers import MemcachedServer, memcached_binary, start_memcached

TEST_ITEM_SIZE = 64 << 10


def start_server(item_size: int = TEST_ITEM_SIZE, attempts: int = 3, memory_mb: int = 64) -> MemcachedServer:
    """``kvtier.bench.servers.start_memcached``, failing the test with an install hint without memcached."""
    try:
        return start_memcached(item_size, memory_mb, attempts)
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


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
