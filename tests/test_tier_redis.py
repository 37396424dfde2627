"""RedisTier against real redis-server processes: a single node, a restartable node, a 3-node cluster."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.breaker import MAX_BACKOFF_S, CircuitBreaker
from kvtier.cache.tiers.redis import RedisTier, parse_url, ping
from tests.clocks import ManualClock

if TYPE_CHECKING:  # imported at run time by pytest_plugins (so that pytest can rewrite it first)
    from tests.redis_servers import RedisClusterServers, RedisServer

pytest_plugins = ["tests.redis_servers"]
pytestmark = pytest.mark.redis

TIMEOUT = 0.5


def make_keys(n: int, tag: str = "k") -> list[bytes]:
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=32).digest() for i in range(n)]


def make_items(keys: list[bytes], size: int = 64) -> list[tuple[bytes, bytes]]:
    return [(k, os.urandom(size)) for k in keys]


@dataclass
class Backend:
    kind: str
    url: str
    clients: list[redis.Redis]  # one per primary, for checking the server side

    def total_keys(self) -> int:
        return sum(int(c.dbsize()) for c in self.clients)

    def set_raw(self, names: list[bytes], value: bytes) -> None:
        """SET outside kvtier (a cluster client routes each name to its slot's node)."""
        plain, is_cluster = parse_url(self.url)
        client = redis.RedisCluster.from_url(plain) if is_cluster else redis.Redis.from_url(plain)
        try:
            for name in names:
                client.set(name, value)
        finally:
            client.close()


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each test runs on a fresh single node and on the (module-shared, flushed) 3-node cluster."""
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        clients = [server.client()]
        url = server.url
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        clients = [n.client() for n in cluster.nodes]
        for c in clients:
            c.flushall()
        url = cluster.url
    try:
        yield Backend(request.param, url, clients)
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def tiers() -> Iterator[list[RedisTier]]:
    """Collects the tiers a test makes and closes them at the end."""
    made: list[RedisTier] = []
    yield made
    for t in made:
        t.close()


def new_tier(tiers: list[RedisTier], url: str, namespace: str = "test", **kwargs: object) -> RedisTier:
    tier = RedisTier(url, namespace, **kwargs)  # type: ignore[arg-type]
    tiers.append(tier)
    return tier


# ------------------------------------------------------------------ basic operations


def test_put_get_lookup_delete_keys_clear(backend: Backend, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, backend.url)
    assert isinstance(tier, Tier)
    assert tier.name == "redis" and tier.capacity_bytes == 0
    keys = make_keys(300)
    items = make_items(keys)

    assert tier.lookup(keys) == 0
    assert tier.get(keys[:3]) == [None, None, None]
    assert tier.lookup([]) == 0 and tier.get([]) == []
    tier.put([])

    tier.put(items)
    assert tier.lookup(keys) == 300
    assert tier.get(keys) == [d for _, d in items]
    assert sorted(tier.keys()) == sorted(keys)
    assert len(tier) == 300
    assert backend.total_keys() == 300
    if backend.kind == "cluster":  # the keys really are spread over the slots of every primary
        assert all(c.dbsize() > 0 for c in backend.clients)

    # longest leading run: a hole at index 10 stops the count there
    tier.delete([keys[10]])
    assert tier.lookup(keys) == 10
    assert tier.get(keys[9:12]) == [items[9][1], None, items[11][1]]
    tier.delete([keys[10], make_keys(1, "never-stored")[0]])  # absent keys are ignored

    # replacing an existing key
    tier.put([(keys[0], b"new")])
    assert tier.get([keys[0]]) == [b"new"]

    st = tier.stats()
    assert st.errors == 0
    assert st.puts == 301 and st.bytes_written == 300 * 64 + 3
    assert st.hits == 300 + 2 + 1 and st.misses == 3 + 1
    assert st.extra["breaker_state"] == 0 and st.extra["breaker_trips"] == 0
    assert tier.used_bytes > 0

    tier.clear()
    assert tier.keys() == [] and len(tier) == 0 and tier.lookup(keys) == 0
    assert backend.total_keys() == 0


def test_namespace_isolation_and_drop_other_namespaces(backend: Backend, tiers: list[RedisTier]) -> None:
    a = new_tier(tiers, backend.url, "tenant-a")
    b = new_tier(tiers, backend.url, "tenant-b")
    ab = new_tier(tiers, backend.url, "tenant-a.b")  # not a prefix match of "tenant-a"
    keys = make_keys(50)
    a.put([(k, b"a") for k in keys])
    b.put([(k, b"b") for k in keys[:20]])
    ab.put([(k, b"ab") for k in keys[:5]])
    # keys kvtier does not own, or that are not block objects, must survive everything
    foreign = [b"other:thing", b"kvtier:results:abc", b"kvtier:tenant-b:not-a-block-key"]
    backend.set_raw(foreign, b"x")

    assert a.get(keys[:1]) == [b"a"] and b.get(keys[:1]) == [b"b"] and ab.get(keys[:1]) == [b"ab"]
    assert len(a) == 50 and len(b) == 20 and len(ab) == 5
    assert b.lookup(keys) == 20

    b.clear()
    assert len(b) == 0 and len(a) == 50 and len(ab) == 5

    b.put([(k, b"b") for k in keys[:7]])
    dropped = a.drop_namespaces(keep=a.namespace)
    assert dropped == 7 + 5
    assert len(a) == 50 and len(b) == 0 and len(ab) == 0
    assert backend.total_keys() == 50 + len(foreign)

    with pytest.raises(ValueError):
        RedisTier(backend.url, "bad:namespace")
    with pytest.raises(ValueError):
        RedisTier(backend.url, "glob*")


def test_ttl_expiry(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    # The TTL is read back, not raced: with a 1 s TTL, a loaded machine could expire the objects
    # before the first lookup after the write.
    tier = new_tier(tiers, redis_server.url, ttl_seconds=60)
    keys = make_keys(5)
    tier.put(make_items(keys))
    assert tier.lookup(keys) == 5
    c = redis_server.client()
    names = [b"kvtier:test:" + k.hex().encode() for k in keys]
    assert all(0 < c.pttl(n) <= 60_000 for n in names)
    for n in names:  # expired by the server's clock: misses
        c.pexpire(n, 1)
    deadline = time.monotonic() + 30  # each expires 1 ms after its PEXPIRE; the bound only ends a hang
    while tier.get(keys) != [None] * 5:  # (lookup counts the leading run: 0 once the first is gone)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert tier.lookup(keys) == 0
    c.close()


def test_capacity_drops_objects_larger_than_it(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, redis_server.url, capacity_bytes=100)
    small, big = make_keys(2)
    tier.put([(small, b"s" * 100), (big, b"b" * 101)])
    assert tier.get([small, big]) == [b"s" * 100, None]
    assert tier.stats().extra["dropped_too_large"] == 1


def test_programming_errors_raise(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, redis_server.url)
    with pytest.raises(ValueError):
        tier.get([b"short"])
    with pytest.raises(TypeError):
        tier.lookup(["not bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        tier.put([(make_keys(1)[0], "str data")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        RedisTier("http://127.0.0.1:1", "ns")
    assert parse_url("rediss+cluster://h:1") == ("rediss://h:1", True)
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", False)
    assert tier.stats().errors == 0


# ------------------------------------------------------------------ one round trip per batch


def _reads(client: redis.Redis) -> int:
    """Read events the server processed, over all clients. N request/reply round trips need at least N
    reads; one pipelined batch needs one per chunk the client writes (redis-py sends ~6 KB chunks),
    so a 200-key batch of ~20 KB takes a handful while 200 round trips take >= 200."""
    return int(client.info("stats")["total_reads_processed"])


def test_batches_are_pipelined_single_node(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, redis_server.url)
    keys = make_keys(200)
    items = make_items(keys, size=16)
    tier.lookup(keys[:1])  # connect first: the handshake is not part of the batch
    probe = redis_server.client()
    _reads(probe)

    deltas = {}
    for op_name, op in [
        ("put", lambda: tier.put(items)),
        ("lookup", lambda: tier.lookup(keys)),
        ("get", lambda: tier.get(keys)),
        ("delete", lambda: tier.delete(keys)),
    ]:
        before = _reads(probe)
        op()
        deltas[op_name] = _reads(probe) - before - 1  # minus the INFO call of the probe itself
    assert all(d <= 10 for d in deltas.values()), deltas

    # the measure does tell one round trip per key apart: 200 separate calls cost >= 200 reads
    before = _reads(probe)
    for k in keys:
        tier.lookup([k])
    assert _reads(probe) - before - 1 >= 200
    probe.close()


def test_batches_are_pipelined_cluster(redis_cluster: RedisClusterServers, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, redis_cluster.url, namespace="pipelined")
    keys = make_keys(200, "pipelined")
    tier.lookup(keys)  # discover the cluster and connect to every primary
    probes = [n.client() for n in redis_cluster.nodes]
    for op in (lambda: tier.put(make_items(keys, size=16)), lambda: tier.get(keys)):
        before = [_reads(p) for p in probes]
        op()
        after = [_reads(p) for p in probes]
        deltas = [a - b - 1 for a, b in zip(after, before, strict=True)]
        assert all(d <= 10 for d in deltas), deltas  # ~67 keys per node, one batch per node
    tier.clear()
    for p in probes:
        p.close()


# ------------------------------------------------------------------ failures


def test_server_killed_breaker_opens_then_recovers_after_restart(
    restartable_redis: RedisServer, tiers: list[RedisTier]
) -> None:
    server = restartable_redis
    tier = new_tier(
        tiers,
        server.url,
        timeout_seconds=TIMEOUT,
        connect_timeout_seconds=TIMEOUT,
        breaker_failures=3,
        breaker_backoff_seconds=0.5,
        breaker_max_backoff_seconds=2.0,
    )
    clock = tier._breaker._clock = ManualClock()  # the backoffs pass when the test says so
    keys = make_keys(20)
    items = make_items(keys)
    tier.put(items)
    assert tier.lookup(keys) == 20

    server.kill()

    # each failing operation is a miss, returned promptly (refused at once; a hang has no bound)
    for op, miss in [
        (lambda: tier.get(keys), [None] * 20),
        (lambda: tier.lookup(keys), 0),
        (lambda: tier.put(items), None),
    ]:
        t0 = time.monotonic()
        assert op() == miss
        assert time.monotonic() - t0 < 10 * TIMEOUT  # the margin is for a busy machine
    st = tier.stats()
    assert st.errors == 3
    assert st.extra["breaker_open"] == 1 and st.extra["breaker_trips"] == 1

    # open: no network attempts at all (a probe would count an error)
    for _ in range(25):
        assert tier.lookup(keys) == 0
        assert tier.get(keys[:2]) == [None, None]
        tier.put(items[:2])
        tier.delete(keys[:2])
    st = tier.stats()
    assert st.errors == 3  # nothing was attempted
    assert st.extra["breaker_short_circuits"] == 100
    assert tier.keys() == [] and len(tier) == 0 and tier.drop_namespaces(keep=tier.namespace) == 0
    tier.clear()

    # a probe after the backoff fails (server still down): the backoff doubles
    clock.now += 0.51
    assert tier.lookup(keys) == 0
    st = tier.stats()
    assert st.errors == 4 and st.extra["breaker_trips"] == 2 and st.extra["breaker_backoff_seconds"] == 1.0

    # back on the same port (empty: no persistence): skipped until the backoff has passed, then used
    server.start()
    clock.now += 0.5
    assert tier.lookup(keys[:1]) == 0 and tier.stats().extra["breaker_state"] == 1
    clock.now += 0.51
    assert tier.lookup(keys[:1]) == 0 and tier.stats().extra["breaker_state"] == 0  # the probe closed it
    tier.put(items)
    assert tier.get(keys) == [d for _, d in items]
    st = tier.stats()
    assert st.extra["breaker_state"] == 0 and st.extra["breaker_backoff_seconds"] == 0.5


def test_concurrent_workload_survives_crash_and_restart(
    restartable_redis: RedisServer, tiers: list[RedisTier]
) -> None:
    server = restartable_redis
    tier = new_tier(tiers, server.url, breaker_backoff_seconds=0.2, breaker_max_backoff_seconds=0.4)
    stop = threading.Event()
    errors: list[BaseException] = []
    slowest = [0.0]

    def worker(w: int) -> None:
        keys = make_keys(16, f"worker{w}")
        items = make_items(keys, size=256)
        while not stop.is_set():
            for op in (lambda: tier.put(items), lambda: tier.lookup(keys), lambda: tier.get(keys)):
                t0 = time.monotonic()
                try:
                    op()
                except BaseException as e:
                    errors.append(e)
                    return
                slowest[0] = max(slowest[0], time.monotonic() - t0)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        server.kill()
        time.sleep(0.8)
        server.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert slowest[0] < 10 * TIMEOUT  # bounded by the timeout (a hang has no bound); margin for load
    st = tier.stats()
    assert st.errors > 0 and st.extra["breaker_trips"] >= 1
    # back up: once the breaker lets a probe through (its backoff <= 0.4 s), calls succeed again
    keys = make_keys(3, "after")
    deadline = time.monotonic() + 30
    while True:
        tier.put([(k, b"v") for k in keys])
        if tier.get(keys) == [b"v"] * 3:
            break
        assert time.monotonic() < deadline, tier.stats()
        time.sleep(0.05)
    assert tier.stats().extra["breaker_state"] == 0


def test_cluster_node_killed_then_restarted(tmp_path: Path, tiers: list[RedisTier]) -> None:
    from tests.redis_servers import RedisClusterServers

    with RedisClusterServers(tmp_path / "cluster") as cluster:
        tier = new_tier(tiers, cluster.url, breaker_backoff_seconds=0.2, breaker_max_backoff_seconds=0.5)
        keys = make_keys(60)
        items = make_items(keys)
        tier.put(items)
        assert tier.lookup(keys) == 60

        cluster.nodes[1].kill()  # a third of the slots are gone: batches miss, nothing raises
        for _ in range(10):
            t0 = time.monotonic()
            assert tier.lookup(keys) < 60
            assert None in tier.get(keys)
            tier.put(items)
            assert time.monotonic() - t0 < 10 * TIMEOUT  # bounded (a hang is not); margin for load
        st = tier.stats()
        assert st.errors >= 3 and st.extra["breaker_trips"] >= 1

        cluster.nodes[1].start()  # rejoins with its old identity (nodes.conf), empty
        deadline = time.monotonic() + 15
        while True:
            tier.put(items)
            if tier.lookup(keys) == 60:
                break
            assert time.monotonic() < deadline, "cluster tier did not recover"
            time.sleep(0.1)
        assert tier.get(keys) == [d for _, d in items]


def test_nothing_listening_never_raises(tiers: list[RedisTier]) -> None:
    from tests.redis_servers import free_port

    port = free_port()
    for url in (f"redis://127.0.0.1:{port}", f"redis+cluster://127.0.0.1:{port}"):
        tier = new_tier(tiers, url, breaker_failures=2)
        keys = make_keys(4)
        t0 = time.monotonic()
        assert tier.lookup(keys) == 0
        assert tier.get(keys) == [None] * 4
        tier.put(make_items(keys))
        tier.delete(keys)
        assert tier.keys() == [] and len(tier) == 0 and tier.drop_namespaces(keep=tier.namespace) == 0
        tier.clear()
        assert tier.used_bytes == 0
        assert time.monotonic() - t0 < 10 * TIMEOUT  # bounded (a hang is not); margin for load
        st = tier.stats()
        assert st.errors == 2 and st.extra["breaker_open"] == 1 and st.misses == 4
        assert not ping(url)


def test_ping(redis_server: RedisServer, redis_cluster: RedisClusterServers) -> None:
    assert ping(redis_server.url)
    assert ping(redis_cluster.url)


def test_circuit_breaker_states() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=2, backoff=1.0, max_backoff=3.0, clock=lambda: now[0])
    assert b.allow() and not b.record_failure()
    assert b.allow() and b.record_failure()  # second in a row: opens
    assert not b.allow()
    now[0] = 0.99
    assert not b.allow()
    now[0] = 1.0
    assert b.allow()  # the single half-open probe
    assert not b.allow()  # nobody else meanwhile
    assert b.record_failure() and b.backoff == 2.0  # probe failed: reopened, backoff doubled
    now[0] = 3.0
    assert b.allow() and b.record_failure() and b.backoff == 3.0  # capped
    now[0] = 6.0
    assert b.allow()
    assert b.record_success()  # probe succeeded: closed, backoff reset
    assert b.state == CircuitBreaker.CLOSED and b.backoff == 1.0 and b.allow() and b.allow()
    assert b.trips == 3
    now[0] = 6.0
    b.record_failure()
    b.record_failure()
    now[0] = 7.0
    assert b.allow()
    b.release_probe()  # the probe died of a programming error: another caller may probe
    assert b.allow()


def test_a_key_of_another_redis_type_is_a_miss_and_removed(backend: Backend, tiers: list[RedisTier]) -> None:
    tier = new_tier(tiers, backend.url)
    keys = make_keys(4, "wrongtype")
    tier.put(make_items(keys[:1]) + make_items(keys[2:]))
    plain, is_cluster = parse_url(backend.url)
    raw = redis.RedisCluster.from_url(plain) if is_cluster else redis.Redis.from_url(plain)
    try:
        wrong = tier._name(keys[1])
        raw.rpush(wrong, b"not", b"a", b"string")  # EXISTS says yes; GET can never read it
        assert tier.lookup(keys) == 1  # the run of held blocks stops at the wrong-type key
        assert raw.exists(wrong) == 0  # and it is gone: the next lookup sees the truth
        assert tier.stats().corrupt == 1 and tier.stats().extra["wrong_type_removed"] == 1
        assert tier.lookup(keys) == 1
        assert tier.get(keys[:1]) != [None]
        tier.put(make_items(keys[1:2]))
        assert tier.lookup(keys) == 4
    finally:
        raw.close()


def test_breaker_waits_at_most_a_few_seconds() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=1, backoff=0.5, clock=lambda: now[0])
    assert b.max_backoff == MAX_BACKOFF_S <= 2.0
    b.allow()
    b.record_failure()
    for _ in range(20):  # a long outage: every probe fails
        now[0] += b.backoff
        assert b.allow() and b.probing
        b.record_failure()
        assert b.backoff <= MAX_BACKOFF_S
    assert b.backoff == MAX_BACKOFF_S
    assert RedisTier.__init__.__defaults__ is not None
    assert MAX_BACKOFF_S in RedisTier.__init__.__defaults__


def test_the_probe_after_an_outage_is_a_ping(restartable_redis: RedisServer, tiers: list[RedisTier]) -> None:
    server = restartable_redis
    tier = new_tier(tiers, server.url, breaker_failures=1, breaker_backoff_seconds=0.2)
    keys = make_keys(8, "probe")
    server.kill()
    assert tier.lookup(keys) == 0 and tier.stats().extra["breaker_open"] == 1
    server.start()
    for _ in range(200):  # bounded: the backoff is 0.2 s
        time.sleep(0.01)
        tier.lookup(keys)
        if tier.stats().extra["breaker_state"] == 0:
            break
    assert tier.stats().extra["breaker_state"] == 0
    client = server.client()
    try:
        stats = client.info("commandstats")
        assert stats["cmdstat_ping"]["calls"] >= 1  # the probe
        assert stats["cmdstat_type"]["calls"] == len(keys)  # then the one real lookup
    finally:
        client.close()
