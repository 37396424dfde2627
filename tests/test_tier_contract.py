"""The Tier contract (cache/tiers/base.py), one suite run against every tier: disk, host, Redis
on a single node and on a 3-node cluster (real redis-server processes), memcached on one server and
on a two-server ring (real memcached processes, 1 KiB items: every object here is chunked). A new
tier adds its factory to ``make_tier`` and must pass the same tests. memcached cannot list its
objects (``lists_objects`` False): the listing assertions and the maintenance tests that need a
listing are skipped for it (tests/test_tier_memcached.py covers its generations instead).

Objects are real codec objects (the host tier decodes what it is given), encoded for a model whose
fingerprint is the tier's namespace, so every tier gives back exactly the bytes it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvtier.cache.codec import CodecConfig, encode_block
from kvtier.cache.inventory import drop_namespaces, lists_objects, read_headers, summarize
from kvtier.cache.keys import KVLayout, chain_keys, root_key
from kvtier.cache.tiers.base import StoredObject, Tier, TierError
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.host import HostTier
from kvtier.cache.tiers.loading import BlockIO
from kvtier.cache.tiers.memcached import MemcachedTier
from kvtier.cache.tiers.redis import RedisTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
NS_A, NS_B = "model-a", "model-b"
MakeTier = Callable[[str], Tier]


def blocks(namespace: str, n: int, seed: int = 0) -> list[tuple[bytes, list[int], torch.Tensor]]:
    """n chained blocks of one model: (key, tokens, kv)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (n * LAYOUT.block_size,), generator=g).tolist()
    keys = chain_keys(root_key(namespace, LAYOUT), tokens, LAYOUT.block_size)
    kvs = torch.randn((n, *LAYOUT.block_shape), generator=g)
    bs = LAYOUT.block_size
    return [(k, tokens[i * bs : (i + 1) * bs], kvs[i]) for i, k in enumerate(keys)]


def objects(namespace: str, n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    return [(k, encode_block(k, namespace, LAYOUT, t, kv)) for k, t, kv in blocks(namespace, n, seed)]


@pytest.fixture(params=["disk", "host", "redis", "redis-cluster", "memcached", "memcached-ring"])
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeTier]:
    """Tiers of one backend, one per namespace asked for, sharing the backend; closed at the end."""
    made: list[Tier] = []

    def make(namespace: str) -> Tier:
        tier: Tier
        if request.param == "disk":
            tier = DiskTier(tmp_path / "disk", namespace, 1 << 30)
        elif request.param == "host":  # one process's memory: tiers of one slab switch namespaces
            tier = HostTier(LAYOUT, namespace, 1 << 24)
        elif request.param.startswith("memcached"):
            tier = MemcachedTier(url, namespace, timeout_seconds=2.0, connect_timeout_seconds=2.0)
        else:
            tier = RedisTier(url, namespace, timeout_seconds=2.0, connect_timeout_seconds=2.0)
        made.append(tier)
        return tier

    url = ""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:  # shared by the module: start empty
            client = node.client()
            client.flushall()
            client.close()
        url = cluster.url
    servers = []
    if request.param.startswith("memcached"):
        from tests.memcached_servers import start_server

        servers = [start_server(item_size=1024) for _ in range(2 if request.param.endswith("ring") else 1)]
        url = "memcached://" + ",".join(s.address for s in servers)
    yield make
    for tier in made:
        tier.close()
    for server in servers:
        server.stop()


def one_tier_two_namespaces(make_tier: MakeTier) -> tuple[Tier, Tier]:
    """Two namespaces of one store. The host tier is process memory: one tier object holds every
    namespace and serves one at a time, so the "other" model is the same tier switched over."""
    a = make_tier(NS_A)
    if isinstance(a, HostTier):
        return a, a
    return a, make_tier(NS_B)


def put_in(tier: Tier, namespace: str, items: list[tuple[bytes, bytes]]) -> None:
    if isinstance(tier, HostTier):
        tier.set_namespace(namespace)
    tier.put(items)


# -- the serving path ----------------------------------------------------------------------------


def test_put_get_lookup_delete_keys_clear(make_tier: MakeTier) -> None:
    tier = make_tier(NS_A)
    items = objects(NS_A, 5)
    keys = [k for k, _ in items]
    assert tier.lookup(keys) == 0 and tier.get(keys[:2]) == [None, None]
    tier.put(items[:3])
    assert tier.lookup(keys) == 3  # the leading run only
    assert tier.get(keys) == [d for _, d in items[:3]] + [None, None]
    tier.put(items[3:])
    tier.delete([keys[1], keys[1]])  # twice: the second is ignored
    assert tier.lookup(keys) == 1 and tier.get([keys[1]]) == [None]
    if lists_objects(tier):
        assert sorted(tier.keys()) == sorted(k for i, k in enumerate(keys) if i != 1) and len(tier) == 4
    tier.clear()
    assert tier.keys() == [] and len(tier) == 0 and tier.lookup(keys) == 0
    s = tier.stats()
    assert s.hits == 3 and s.misses >= 3 and s.errors == 0


def test_replacing_an_object(make_tier: MakeTier) -> None:
    tier = make_tier(NS_A)
    ((key, first),) = objects(NS_A, 1, seed=1)
    _, tokens, kv = blocks(NS_A, 1, seed=2)[0]
    second = encode_block(key, NS_A, LAYOUT, tokens, kv)  # other KV under the same key
    tier.put([(key, first)])
    tier.put([(key, second)])
    assert tier.get([key]) == [second] and (len(tier) == 1 or not lists_objects(tier))


def test_namespaces_do_not_mix(make_tier: MakeTier) -> None:
    a, b = one_tier_two_namespaces(make_tier)
    items_a, items_b = objects(NS_A, 3), objects(NS_B, 2, seed=5)
    put_in(a, NS_A, items_a)
    put_in(b, NS_B, items_b)
    if isinstance(b, HostTier):
        b.set_namespace(NS_B)
    assert b.lookup([k for k, _ in items_a]) == 0 and (len(b) == 2 or not lists_objects(b))
    if isinstance(a, HostTier):
        a.set_namespace(NS_A)
    assert a.get([k for k, _ in items_a]) == [d for _, d in items_a] and (len(a) == 3 or not lists_objects(a))


def test_programming_errors_raise(make_tier: MakeTier) -> None:
    tier = make_tier(NS_A)
    with pytest.raises((TypeError, ValueError)):
        tier.get([b"short"])
    with pytest.raises(TypeError):
        tier.lookup(["not bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="namespace"):
        make_tier("bad/namespace")


# -- the hierarchy's roads ---------------------------------------------------------------------------


def io_for(tier: Tier, rejected: list[bytes]) -> BlockIO:
    return BlockIO(LAYOUT, NS_A, None if tier.raw_blocks else CodecConfig(), None,
                   lambda t, key, e: (rejected.append(key), t.delete([key])))  # fmt: skip


def test_put_block_then_load_into(make_tier: MakeTier) -> None:
    tier = make_tier(NS_A)
    rejected: list[bytes] = []
    io = io_for(tier, rejected)
    stored = blocks(NS_A, 4)
    for key, tokens, kv in stored[:3]:
        tier.put_block(
            key, tokens, kv, None, lambda key=key, tokens=tokens, kv=kv: io.encode(key, tokens, kv)
        )
    out = torch.full((4, *LAYOUT.block_shape), float("nan"))
    n = tier.load_into([k for k, _, _ in stored], [t for _, t, _ in stored], out, io)
    assert n == 3 and rejected == []
    assert torch.equal(out[:3], torch.stack([kv for _, _, kv in stored[:3]]))


def test_load_into_rejects_a_block_of_other_tokens(make_tier: MakeTier) -> None:
    tier = make_tier(NS_A)
    rejected: list[bytes] = []
    io = io_for(tier, rejected)
    stored = blocks(NS_A, 3)
    tier.put(objects(NS_A, 3))
    tokens = [t for _, t, _ in stored]
    tokens[1] = [t + 1 for t in tokens[1]]  # the caller wants other tokens under the same key
    out = torch.empty((3, *LAYOUT.block_shape))
    n = tier.load_into([k for k, _, _ in stored], tokens, out, io)
    assert n == 1 and torch.equal(out[0], stored[0][2])
    assert tier.lookup([stored[1][0]]) == 0  # the bad one is gone (rejected, or dropped by the tier)


# -- maintenance, across namespaces ------------------------------------------------------------------


def skip_unless_listing(tier: Tier) -> None:
    if not lists_objects(tier):
        with pytest.raises(TierError, match="cannot list"):
            tier.scan()
        pytest.skip(f"{tier.name} cannot list its objects (scan raises TierError, checked)")


def test_scan_read_prefixes_and_summary(make_tier: MakeTier) -> None:
    a, b = one_tier_two_namespaces(make_tier)
    skip_unless_listing(a)
    items_a, items_b = objects(NS_A, 3), objects(NS_B, 2, seed=5)
    put_in(a, NS_A, items_a)
    put_in(b, NS_B, items_b)
    found = a.scan()
    assert sorted((o.namespace, o.key) for o in found) == sorted(
        [(NS_A, k) for k, _ in items_a] + [(NS_B, k) for k, _ in items_b]
    )
    sizes = {o.key: o.size for o in found}
    assert all(sizes[k] == len(d) for k, d in items_a + items_b)
    assert {o.namespace for o in b.scan(NS_B)} == {NS_B} and len(b.scan(NS_B)) == 2
    headers = read_headers(a, found)
    assert all(h is not None and h.key == o.key for h, o in zip(headers, found, strict=True))
    gone = StoredObject(NS_A, bytes(32), 10)
    assert a.read_prefixes([gone], 64) == [None]
    summary = summarize(a, sample=100)
    assert summary.entries == 5 and summary.namespaces[NS_B].entries == 2
    assert summary.bytes == sum(len(d) for _, d in items_a + items_b) and summary.codecs == {"none": 5}


def test_drop_namespaces_keeps_one_or_none(make_tier: MakeTier) -> None:
    a, b = one_tier_two_namespaces(make_tier)
    skip_unless_listing(a)
    put_in(a, NS_A, objects(NS_A, 3))
    put_in(b, NS_B, objects(NS_B, 2, seed=5))
    assert drop_namespaces(a, keep=NS_A) == 2
    assert {o.namespace for o in a.scan()} == {NS_A}
    assert drop_namespaces(a, keep=NS_A) == 0  # nothing else left
    assert drop_namespaces(a, keep=None) == 3 and a.scan() == []
    if isinstance(a, HostTier):
        a.set_namespace(NS_A)
    assert len(a) == 0  # its own namespace went too


def test_unreachable_backend_raises_tier_error_for_tools(tmp_path: Path) -> None:
    from tests.redis_servers import free_port

    tier = RedisTier(
        f"redis://127.0.0.1:{free_port()}", NS_A, timeout_seconds=0.2, connect_timeout_seconds=0.2
    )
    try:
        with pytest.raises(TierError, match="cannot reach Redis"):
            tier.scan()
        assert tier.get([bytes(32)]) == [None]  # the serving path still never raises
        with pytest.raises(TierError, match="operation"):
            drop_namespaces(tier, keep=None)
    finally:
        tier.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(TierError, match="not a folder"):
        DiskTier(tmp_path / "file", NS_A, 1 << 20, create=False).scan()


def test_every_tier_is_a_tier(make_tier: MakeTier) -> None:
    assert isinstance(make_tier(NS_A), Tier)
