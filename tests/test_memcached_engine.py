"""Engines on a memcached tier whose item size is smaller than a KV block, so every block is chunked.

The tiny model's block is 8 KiB; these servers accept 4 KiB items (``-I 4k``): each block is a head and
two chunks. Greedy output is compared with a cold run (no tiers, no prefix caching) every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.cache.keys import BlockKey
from kvtier.cache.tiers import memcached_wire as wire
from kvtier.cache.tiers.memcached import MemcachedTier
from kvtier.engine.engine import Engine
from tests import test_hierarchy
from tests.memcached_servers import MemcachedServer, start_server
from tests.test_hierarchy import (
    POOL_BYTES,
    Cold,
    EngineProcess,
    MakeLLM,
    block_keys,
    cached,
    greedy,
    loaded,
    make_prompts,
    run_until_done,
    token_ids,
    wait_for_breaker,
)

pytestmark = pytest.mark.memcached

# The hierarchy tests' fixtures, under the names the tests ask for (pytest registers module attributes).
cold = test_hierarchy.cold
make_llm = test_hierarchy.make_llm
one_torch_thread = test_hierarchy.one_torch_thread

ITEM = 4 << 10


@pytest.fixture
def small_items() -> Iterator[list[MemcachedServer]]:
    """Two servers with 4 KiB items; a test uses the first alone or both as a ring."""
    servers = [start_server(item_size=ITEM), start_server(item_size=ITEM)]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def ring_url(servers: list[MemcachedServer]) -> str:
    return "memcached://" + ",".join(s.address for s in servers)


def settings(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "tiers": "memcached",
        "memcached_url": url,
        "write_policy": "write-through",
        "load_policy": "always",
        **extra,
    }


def memcached_tier(engine: Engine) -> MemcachedTier:
    assert engine.hierarchy is not None
    tier = engine.hierarchy.tiers[0]
    assert isinstance(tier, MemcachedTier)
    return tier


def spread_over_the_ring(tier: MemcachedTier, keys: list[BlockKey], servers: int) -> list[bytes]:
    """The head names of ``keys`` under a generation that puts them on all ``servers`` of the ring.

    The ring places an object by its name, and the name carries the namespace's generation, which a
    fresh ring seeds from the clock: 6 blocks all land on one of two servers once in 32 runs (and with
    them, for some ports, the 3 counters: one server held nothing in about 1 run of 300). Bumping the
    generation here, as ``clear()`` does, until the blocks are spread makes the test's placement its
    own; the engine processes read the generation from the ring."""
    for _ in range(100):  # each try spreads them with odds 31/32 (2 servers)
        heads = tier._head_names(keys)
        if len({tier._owner(h).address for h in heads}) == servers:
            return heads
        tier.clear()
    raise AssertionError("no generation spread the blocks over the ring in 100 tries")


@pytest.mark.parametrize("servers", [1, 2])
def test_two_processes_share_chunked_blocks(
    servers: int, tmp_path: Path, small_items: list[MemcachedServer], make_llm: MakeLLM, cold: Cold
) -> None:
    prefix = make_prompts(1, 100, seed=2)[0]
    suffix = make_prompts(1, 40, seed=3)[0]
    ring = small_items[:servers]
    config = settings(ring_url(ring), kv_cache_memory=POOL_BYTES)
    local = make_llm(**config)  # the processes' namespace and keys, seen from here
    tier = memcached_tier(local.engine)
    heads = spread_over_the_ring(tier, block_keys(local.engine, prefix)[:6], servers)
    a = EngineProcess(tmp_path / "a.log", [prefix], **config)
    b = EngineProcess(tmp_path / "b.log", [prefix + suffix], **config)
    try:
        out_a = a.run()[0]
        assert out_a["tokens"] == cold([prefix])[0] and out_a["cached"] == 0
        # 6 full blocks of > 4 KiB each, every one whole (head + 2 chunks) on the server the ring
        # names for it; beside them only the generation counters and the namespace registry
        raw = {s.address: s.client() for s in ring}
        expected = dict.fromkeys(raw, 0)
        for name in (wire.EPOCH_KEY, wire.generation_key(tier._ns_id), wire.REGISTRY_KEY):
            expected[tier._owner(name).address] += 1
        for head in heads:
            owner = tier._owner(head).address
            assert wire.chunk_count(raw[owner].get(head)) == 3
            expected[owner] += 3
        items = {address: int(c.stats()[b"curr_items"]) for address, c in raw.items()}
        assert items == expected and all(items.values())

        out_b = b.run()[0]
        assert out_b["cached"] == 96 and out_b["loaded"] == 96  # the 6 shared blocks, from memcached
        assert out_b["tokens"] == cold([prefix + suffix])[0]
    finally:
        a.kill()
        b.kill()


@pytest.mark.parametrize("damage", ["evicted", "corrupted"])
def test_each_chunk_evicted_or_corrupted_is_a_counted_miss(
    damage: str, small_items: list[MemcachedServer], make_llm: MakeLLM, cold: Cold
) -> None:
    server = small_items[0]
    raw = server.client()
    prompt = make_prompts(1, 100, seed=5)[0]  # 6 full blocks
    ref = cold([prompt])
    writer = make_llm(**settings(server.url))
    writer.generate([prompt], greedy())
    writer.engine.hierarchy.flush()
    keys = block_keys(writer.engine, prompt)[:6]
    tier = memcached_tier(writer.engine)
    hole = 2  # damage block 2: a reader loads blocks 0 and 1, recomputes the rest
    head = tier._head_names([keys[hole]])[0]
    count = wire.chunk_count(raw.get(head))
    assert count == 3
    for index in range(count):
        name = head if index == 0 else wire.chunk_name(head, index)
        if damage == "evicted":
            raw.delete(name)
        else:  # flip a KV byte past the version and manifest: only the checksum can tell
            value = bytearray(raw.get(name))
            value[-10] ^= 0xFF
            raw.set(name, bytes(value))
        reader = make_llm(**settings(server.url))
        outs = reader.generate([prompt], greedy())
        assert token_ids(outs) == ref, (damage, index)
        assert loaded(outs) == [hole * 16], (damage, index)
        got = memcached_tier(reader.engine).stats()
        if damage == "corrupted":  # rejected by the codec, counted and deleted by the hierarchy
            assert reader.engine.hierarchy.stats.corrupt == 1 and got.corrupt == 1
        elif index == 0:  # no head: a plain miss (lookup already stops there)
            assert got.extra["partial_objects"] == 0
        else:  # a head without its chunk: a miss the tier counts
            assert got.extra["partial_objects"] == 1
        # the reader recomputed block 2 and wrote it through: whole again for the next round
        reader.engine.hierarchy.flush()
        reader.close()
        assert memcached_tier(writer.engine).get([keys[hole]])[0] is not None


def test_memcached_killed_mid_workload(
    small_items: list[MemcachedServer], make_llm: MakeLLM, cold: Cold
) -> None:
    server = small_items[0]
    prompts = make_prompts(6, 100, seed=10)
    ref = cold(prompts)
    config = settings(server.url, memcached_timeout=1.0)

    # killed during a batch: 64-token steps, so prefill and write-through go on after the kill
    llm = make_llm(max_num_batched_tokens=64, **config)
    engine = llm.engine
    ids = [engine.add_request(p, greedy())[0] for p in prompts[:3]]
    engine.step()
    engine.step()
    engine.hierarchy.flush()
    server.kill()
    final = run_until_done(engine)
    assert [final[i].outputs[0].token_ids for i in ids] == ref[:3]
    assert memcached_tier(engine).stats().errors > 0
    engine.pool.assert_idle()

    # killed between calls: the same engine and a new one (started while it is down) recompute
    assert token_ids(llm.generate([prompts[3]], greedy())) == ref[3:4]
    fresh = make_llm(**config)
    outs = fresh.generate(prompts[:2], greedy())
    assert token_ids(outs) == ref[:2] and cached(outs) == [0, 0]

    # back on the same port (empty): once the backoff passes, writes and loads work again
    server.start()
    wait_for_breaker(engine)
    assert token_ids(llm.generate([prompts[4]], greedy())) == ref[4:5]
    engine.hierarchy.flush()
    reader = make_llm(**config)
    outs = reader.generate([prompts[4], prompts[5]], greedy())
    assert loaded(outs) == [96, 0] and token_ids(outs) == ref[4:6]
    reader.engine.hierarchy.flush()
    outs = llm.generate([prompts[5]], greedy())
    assert loaded(outs) == [96] and token_ids(outs) == ref[5:6]
    assert memcached_tier(engine).stats().extra["breaker_state"] == 0
