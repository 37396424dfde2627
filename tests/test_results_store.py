"""The result/embedding store: object format, corruption handling, tiers (memory, disk, real Redis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtier.cache.codec import CorruptObjectError
from kvtier.cache.results import (
    KIND_EMBEDDING,
    KIND_RESULT,
    CachedResult,
    ResultStore,
    decode_object,
    embedding_from_bytes,
    embedding_key,
    embedding_to_bytes,
    encode_object,
    result_key,
)
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.memory import MemoryTier
from kvtier.cache.tiers.redis import RedisTier
from tests.redis_servers import RedisServer

FP = "model-a"
PARAMS = {"max_tokens": 8, "temperature": 0.0}


def _result() -> CachedResult:
    return CachedResult([5, 6, 7], "héllo", "length", None, None)


def test_keys_change_with_every_input() -> None:
    base = result_key(FP, None, [1, 2, 3], PARAMS)
    assert base == result_key(FP, None, [1, 2, 3], dict(reversed(PARAMS.items())))  # order-free
    others = [
        result_key("model-b", None, [1, 2, 3], PARAMS),
        result_key(FP, "tenant", [1, 2, 3], PARAMS),
        result_key(FP, None, [1, 2, 4], PARAMS),
        result_key(FP, None, [1, 2, 3], {**PARAMS, "max_tokens": 9}),
        result_key(FP, None, [1, 2, 3], {**PARAMS, "stop": ["x"]}),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert embedding_key(FP, "a") != embedding_key(FP, "b") != embedding_key("model-b", "a")


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_object_round_trip(compression: str, secret: bytes | None) -> None:
    key = result_key(FP, None, [1], PARAMS)
    payload = _result().to_bytes()
    obj = encode_object(key, FP, KIND_RESULT, payload, compression, secret)
    assert decode_object(obj, key=key, fingerprint=FP, kind=KIND_RESULT, secret=secret) == payload
    assert CachedResult.from_bytes(payload) == _result()


def test_every_mismatch_and_damage_is_corrupt() -> None:
    key, other = result_key(FP, None, [1], PARAMS), result_key(FP, None, [2], PARAMS)
    obj = encode_object(key, FP, KIND_RESULT, _result().to_bytes(), "none", b"k")
    bad_calls = [
        dict(data=obj, key=other, fingerprint=FP, kind=KIND_RESULT, secret=b"k"),
        dict(data=obj, key=key, fingerprint="model-b", kind=KIND_RESULT, secret=b"k"),
        dict(data=obj, key=key, fingerprint=FP, kind=KIND_EMBEDDING, secret=b"k"),
        dict(data=obj, key=key, fingerprint=FP, kind=KIND_RESULT, secret=b"other"),
        dict(data=obj, key=key, fingerprint=FP, kind=KIND_RESULT, secret=None),
        dict(data=obj[:-1], key=key, fingerprint=FP, kind=KIND_RESULT, secret=b"k"),
        dict(data=obj[:10], key=key, fingerprint=FP, kind=KIND_RESULT, secret=b"k"),
        dict(data=b"", key=key, fingerprint=FP, kind=KIND_RESULT, secret=b"k"),
    ]
    for i in range(0, len(obj), 7):  # a flipped bit anywhere
        damaged = bytearray(obj)
        damaged[i] ^= 0x10
        bad_calls.append(dict(data=bytes(damaged), key=key, fingerprint=FP, kind=KIND_RESULT, secret=b"k"))
    for call in bad_calls:
        with pytest.raises(CorruptObjectError):
            decode_object(call.pop("data"), **call)  # type: ignore[arg-type]


def test_payload_that_is_not_a_result_is_corrupt() -> None:
    for payload in (b"not json", b"[1, 2]", b'{"token_ids": "x", "text": "", "finish_reason": "stop"}'):
        with pytest.raises(CorruptObjectError):
            CachedResult.from_bytes(payload)
    with pytest.raises(CorruptObjectError):
        embedding_from_bytes(b"\0" * 12, 4)
    v = np.arange(4, dtype=np.float32)
    assert np.array_equal(embedding_from_bytes(embedding_to_bytes(v), 4), v)


def _store(tiers: list, kind: int = KIND_RESULT) -> ResultStore:
    return ResultStore(tiers, FP, kind, compression="lz4")


def test_store_corrupted_object_is_a_counted_miss_and_deleted(tmp_path: Path) -> None:
    memory, disk = MemoryTier(1 << 20), DiskTier(tmp_path, FP, 1 << 20, read_threads=0)
    store = _store([memory, disk])
    key = result_key(FP, None, [1], PARAMS)
    store.put(key, _result().to_bytes())
    assert store.get(key) == (_result().to_bytes(), "memory")
    memory.delete([key])  # only the disk copy is left; damage it
    path = Path(disk.path_of(key))
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get(key) is None
    assert store.stats.corrupt == 1 and disk.stats().corrupt == 1
    assert not path.exists()  # deleted: the next lookup does not pay for it again
    assert store.stats.hits == 1 and store.stats.misses == 1


def test_store_promotes_lower_hits_and_memory_evicts_by_capacity(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, FP, 1 << 20, read_threads=0)
    store = _store([MemoryTier(1 << 20), disk])
    key = embedding_key(FP, "x")
    ResultStore([disk], FP, KIND_RESULT).put(key, b"payload")  # written by "another process"
    assert store.get(key) == (b"payload", "disk")
    assert store.get(key) == (b"payload", "memory")
    assert store.stats.tier_hits == {"memory": 1, "disk": 1}

    small = MemoryTier(600)
    tiny = _store([small])
    keys = [embedding_key(FP, str(i)) for i in range(10)]
    tiny.put_many([(k, bytes(100)) for k in keys])
    assert 0 < len(small) < 10 and small.used_bytes <= 600
    assert tiny.get(keys[-1]) is not None and tiny.get(keys[0]) is None  # lru: the oldest went


@pytest.mark.redis
def test_store_on_a_real_redis(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, f"{FP}.results")
    try:
        store = _store([tier])
        key = result_key(FP, "t", [1, 2], PARAMS)
        store.put(key, _result().to_bytes())
        assert store.get(key) == (_result().to_bytes(), "redis")
        other_model = ResultStore([tier], "model-b", KIND_RESULT)  # same namespace, another model
        assert other_model.get(key) is None and other_model.stats.corrupt == 1
        redis_server.stop()  # a tier that is down only misses
        assert store.get(key) is None
    finally:
        tier.close()
