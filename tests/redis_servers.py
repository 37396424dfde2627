"""pytest fixtures over the real redis-server processes of ``kvtier.bench.servers`` (one helper for
tests and benchmarks): a single node per test, one per module, and a 3-node cluster per module.

Use them from any test module with ``pytest_plugins = ["tests.redis_servers"]`` (or from the root
conftest), or the classes directly: ``with RedisServer(tmp_path) as server: ...``.

Ports are reserved until a server binds them and its start is checked (``kvtier.bench.servers``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.bench import servers as bench
from kvtier.bench.servers import (
    ADDRESS_IN_USE,
    PortTaken,
    RedisClusterServers,
    RedisServer,
    free_port,
    redis_binaries,
    reserve_port,
)


def start_server(directory: Path, attempts: int = 3) -> RedisServer:
    """``kvtier.bench.servers.start_server``, failing the test with an install hint without redis."""
    try:
        return bench.start_server(directory, attempts)
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


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
