"""HostTier: the Tier contract in process memory."""

from __future__ import annotations

import hashlib
import threading

import pytest

from kvtier.cache.policy import POLICIES
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.host import HostTier


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def test_protocol_conformance() -> None:
    tier = HostTier("model-a", 1 << 20)
    assert isinstance(tier, Tier)
    assert tier.name == "host"
    assert tier.capacity_bytes == 1 << 20
    assert tier.used_bytes == 0


def test_put_get_lookup_delete() -> None:
    tier = HostTier("m", 1 << 20)
    a, b, c = key(1), key(2), key(3)
    tier.put([(a, b"aaa"), (c, b"ccccc")])
    assert tier.get([a, b, c]) == [b"aaa", None, b"ccccc"]
    assert tier.lookup([a, b, c]) == 1  # longest leading run, b missing
    assert tier.lookup([b, a]) == 0
    assert tier.lookup([]) == 0
    assert len(tier) == 2 and tier.used_bytes == 8
    assert sorted(tier.keys()) == sorted([a, c])
    tier.put([(b, b"bb")])
    assert tier.lookup([a, b, c]) == 3
    tier.delete([a, key(99)])  # unknown keys are ignored
    assert tier.get([a]) == [None]
    assert len(tier) == 2 and tier.used_bytes == 7
    tier.put([(c, b"C")])  # replacing updates the byte count
    assert tier.get([c]) == [b"C"] and tier.used_bytes == 3


def test_put_copies_mutable_buffers() -> None:
    tier = HostTier("m", 1 << 20)
    buf = bytearray(b"xyz")
    tier.put([(key(1), buf)])  # type: ignore[list-item]
    buf[0] = ord("Q")
    assert tier.get([key(1)]) == [b"xyz"]


def test_bad_keys_raise() -> None:
    tier = HostTier("m", 100)
    with pytest.raises(ValueError):
        tier.put([(b"short", b"x")])
    with pytest.raises(TypeError):
        tier.put([("not bytes", b"x")])  # type: ignore[list-item]


def test_lru_eviction_order() -> None:
    tier = HostTier("m", 100, policy="lru")
    for i in range(4):
        tier.put([(key(i), bytes(25))])
    assert tier.used_bytes == 100
    tier.get([key(0)])  # 0 becomes most recent: 1 is the oldest now
    tier.put([(key(4), bytes(30))])  # needs 30 bytes: evicts 1 and 2
    assert tier.lookup([key(0)]) == 1
    assert tier.get([key(1), key(2)]) == [None, None]
    assert tier.lookup([key(3)]) == 1 and tier.lookup([key(4)]) == 1
    assert tier.used_bytes == 80
    assert tier.stats().evictions == 2


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_stays_within_capacity(policy: str) -> None:
    tier = HostTier("m", 10 * 100, policy=policy)
    for r in range(300):
        i = (r * 13) % 40
        tier.put([(key(i), bytes([i]) * 100)])
        if r % 3 == 0:
            got = tier.get([key((i + 5) % 40)])[0]
            assert got is None or got == bytes([(i + 5) % 40]) * 100
        assert tier.used_bytes <= tier.capacity_bytes
    assert len(tier) == 10 and tier.used_bytes == 1000
    assert tier.stats().evictions > 0
    held = tier.keys()
    assert all(tier.get([k])[0] is not None for k in held)


def test_oversize_object_dropped() -> None:
    tier = HostTier("m", 100)
    tier.put([(key(1), bytes(60))])
    tier.put([(key(2), bytes(101))])
    assert tier.get([key(2)]) == [None]
    assert tier.lookup([key(1)]) == 1  # nothing was evicted to make room for an impossible object
    assert tier.stats().extra["dropped"] == 1
    assert tier.stats().evictions == 0
    zero = HostTier("m", 0)
    zero.put([(key(1), b"x")])
    assert len(zero) == 0 and zero.used_bytes == 0


def test_namespaces_are_isolated() -> None:
    tier = HostTier("old-model", 1000)
    tier.put([(key(1), b"old1"), (key(2), b"old2")])
    tier.set_namespace("new-model")
    assert tier.namespace == "new-model"
    assert tier.lookup([key(1)]) == 0
    assert tier.get([key(1)]) == [None]
    assert len(tier) == 0 and tier.keys() == []
    tier.put([(key(1), b"new1"), (key(3), b"new3")])
    assert tier.get([key(1)]) == [b"new1"]
    assert tier.used_bytes == 16  # the capacity bounds the memory of every namespace
    tier.clear()  # only the current namespace
    assert len(tier) == 0 and tier.used_bytes == 8
    tier.put([(key(3), b"new3")])
    assert tier.drop_other_namespaces() == 2
    assert tier.used_bytes == 4 and tier.get([key(3)]) == [b"new3"]
    tier.set_namespace("old-model")
    assert tier.get([key(1), key(2)]) == [None, None]
    # Two tiers with different namespaces share nothing.
    other = HostTier("new-model", 1000)
    assert other.lookup([key(3)]) == 0


def test_stats_counters() -> None:
    tier = HostTier("m", 100)
    tier.put([(key(1), b"12345"), (key(2), b"678")])
    tier.get([key(1), key(2), key(3)])
    tier.lookup([key(1), key(3)])
    s = tier.stats()
    assert (s.puts, s.bytes_written) == (2, 8)
    assert (s.hits, s.misses, s.bytes_read) == (2, 1, 8)
    assert s.lookups == 5
    assert s.hit_rate == pytest.approx(2 / 3)
    assert s.read_seconds > 0 and s.write_seconds > 0
    assert s.errors == 0
    s.corrupt += 1  # the hierarchy counts rejected objects on the live stats
    assert tier.stats().corrupt == 1
    assert tier.stats().as_dict()["hits"] == 2


def test_threads_keep_counters_consistent() -> None:
    tier = HostTier("m", 50 * 64)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(500):
                k = key((t * 7 + i) % 120)
                tier.put([(k, bytes([t]) * 64)])
                got = tier.get([k])[0]
                assert got is None or len(got) == 64
                tier.lookup([k, key(i % 120)])
                if i % 50 == 0:
                    tier.delete([k])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert tier.used_bytes == 64 * len(tier) <= tier.capacity_bytes
    assert tier.stats().puts == 8 * 500


def test_close_releases_memory() -> None:
    tier = HostTier("m", 100)
    tier.put([(key(1), b"x" * 10)])
    tier.close()
    assert tier.used_bytes == 0 and len(tier) == 0
