"""HostTier: raw KV blocks in fixed-size slots of a host slab, and the Tier contract on top of it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from kvtier.cache import codec
from kvtier.cache.codec import (
    CodecConfig,
    CorruptObjectError,
    decode_block,
    encode_block,
    integrity_sums,
    read_header,
)
from kvtier.cache.keys import KVLayout
from kvtier.cache.policy import POLICIES
from kvtier.cache.tiers import host as host_module
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.host import HostTier

NS = "model-a"
# 2 * 2 * 4 * 2 * 8 * 4 = 1024 bytes: 128 words, less than one 512-word row (all tail).
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
# 10 layers: 5120 bytes, not a multiple of 4096: one full row, then a 128-word tail.
TAIL_LAYOUT = KVLayout(num_layers=10, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
# 16 layers: 8192 bytes, a multiple of 4096: two full rows, empty tail.
ROWS_LAYOUT = KVLayout(num_layers=16, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
BB = LAYOUT.bytes_per_block
ROW_WORDS = 512


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def toks(i: int, layout: KVLayout = LAYOUT) -> list[int]:
    return [i * 1000 + j for j in range(layout.block_size)]


def block(seed: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.block_shape, generator=g, dtype=getattr(torch, layout.dtype))


def raw(kv: torch.Tensor) -> torch.Tensor:
    """The block's bytes as a [block_bytes] uint8 tensor."""
    return kv.contiguous().reshape(-1).view(torch.uint8)


def random_bytes(n: int, nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=g)


def read_slots(tier: HostTier, slots: list[int]) -> torch.Tensor:
    out = torch.full((len(slots), tier.block_bytes), 0xAB, dtype=torch.uint8)  # sentinel: every row written
    tier.copy_out(slots, out)
    return out


def fill(tier: HostTier, ids: range | list[int], layout: KVLayout = LAYOUT) -> dict[int, torch.Tensor]:
    blocks = {i: block(i, layout) for i in ids}
    for i, kv in blocks.items():
        tier.store(key(i), toks(i, layout), kv)
    return blocks


def check_held(tier: HostTier, ids: list[int], layout: KVLayout = LAYOUT) -> None:
    """Every id is held with exactly block(id)'s bytes."""
    slots = tier.acquire([key(i) for i in ids], [toks(i, layout) for i in ids])
    try:
        assert len(slots) == len(ids)
        got = read_slots(tier, slots)
        for row, i in zip(got, ids, strict=True):
            assert torch.equal(row, raw(block(i, layout)))
    finally:
        tier.release(slots)


def reference_sums(data: np.ndarray) -> np.ndarray:
    """numpy reference of integrity_sums: [n, block_bytes] uint8 -> the sums (mod 2**64) of every
    row of 512 little-endian u64 words (the last one zero-padded), then of every column."""
    n = data.shape[0]
    words = np.ascontiguousarray(data).reshape(n, -1).view("<u8")
    rows = -(-words.shape[1] // ROW_WORDS)
    padded = np.zeros((n, rows * ROW_WORDS), dtype="<u8")
    padded[:, : words.shape[1]] = words
    grid = padded.reshape(n, rows, ROW_WORDS)
    return np.concatenate([grid.sum(axis=2, dtype=np.uint64), grid.sum(axis=1, dtype=np.uint64)], axis=1)


# -- protocol and the block interface -----------------------------------------------------------------


def test_protocol_conformance() -> None:
    tier = HostTier(LAYOUT, NS, 1 << 20)
    assert isinstance(tier, Tier)
    assert tier.name == "host"
    assert tier.namespace == NS
    assert tier.capacity_bytes == 1 << 20
    assert tier.block_bytes == BB == 1024
    assert tier.used_bytes == 0 and len(tier) == 0 and tier.keys() == []
    tier.close()


@pytest.mark.parametrize("layout", [LAYOUT, TAIL_LAYOUT, ROWS_LAYOUT], ids=["1k", "5k", "8k"])
def test_store_acquire_copy_out_round_trip(layout: KVLayout) -> None:
    bb = layout.bytes_per_block
    tier = HostTier(layout, NS, 8 * bb)
    blocks = fill(tier, range(5), layout)
    assert len(tier) == 5 and tier.used_bytes == 5 * bb
    ids = [0, 1, 2, 3, 4]
    slots = tier.acquire([key(i) for i in ids], [toks(i, layout) for i in ids])
    assert len(slots) == 5 and len(set(slots)) == 5
    expected = torch.stack([raw(blocks[i]) for i in ids])
    assert torch.equal(read_slots(tier, slots), expected)
    for s, i in zip(slots, ids, strict=True):
        got = tier.read_block(s)
        assert got.shape == layout.block_shape and got.dtype == torch.float32
        assert torch.equal(got, blocks[i])
    sums = tier.expected_sums(slots)
    assert torch.equal(sums, integrity_sums(expected))
    assert torch.equal(sums, integrity_sums(read_slots(tier, slots)))
    tier.release(slots)
    tier.close()


def test_store_copies_the_block() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    kv = block(1)
    original = kv.clone()
    tier.store(key(1), toks(1), kv)
    kv.fill_(0.0)  # the caller reuses its buffer
    slots = tier.acquire([key(1)], [toks(1)])
    assert torch.equal(tier.read_block(slots[0]), original)
    tier.release(slots)


def test_lookup_is_longest_leading_run_and_delete_ignores_unknown_keys() -> None:
    tier = HostTier(LAYOUT, NS, 8 * BB)
    fill(tier, [0, 2])
    a, b, c = key(0), key(1), key(2)
    assert tier.lookup([a, b, c]) == 1  # b missing
    assert tier.lookup([b, a]) == 0
    assert tier.lookup([a, c]) == 2
    assert tier.lookup([]) == 0
    assert sorted(tier.keys()) == sorted([a, c])
    fill(tier, [1])
    assert tier.lookup([a, b, c]) == 3
    tier.delete([a, key(99)])  # the unknown key is ignored
    assert tier.lookup([a]) == 0 and tier.lookup([b, c]) == 2
    assert len(tier) == 2 and tier.used_bytes == 2 * BB
    tier.delete([key(98)])
    assert len(tier) == 2


def test_acquire_returns_leading_run_only() -> None:
    tier = HostTier(LAYOUT, NS, 8 * BB)
    fill(tier, [0, 1, 3])
    ids = [0, 1, 2, 3]
    slots = tier.acquire([key(i) for i in ids], [toks(i) for i in ids])
    assert len(slots) == 2  # stops at 2, although 3 is held
    assert torch.equal(read_slots(tier, slots), torch.stack([raw(block(0)), raw(block(1))]))
    tier.release(slots)
    s = tier.stats()
    assert (s.lookups, s.hits, s.misses, s.bytes_read) == (4, 2, 2, 2 * BB)
    assert tier.acquire([key(7)], [toks(7)]) == []
    assert tier.acquire([], []) == []
    assert tier.lookup([key(3)]) == 1  # a miss before it does not remove it


def test_acquire_with_wrong_tokens_is_a_corrupt_miss() -> None:
    tier = HostTier(LAYOUT, NS, 8 * BB)
    fill(tier, [0, 1, 2])
    wrong = [t + 1 for t in toks(1)]
    slots = tier.acquire([key(0), key(1), key(2)], [toks(0), wrong, toks(2)])
    assert len(slots) == 1
    assert torch.equal(read_slots(tier, slots)[0], raw(block(0)))
    tier.release(slots)
    s = tier.stats()
    assert s.corrupt == 1
    assert (s.hits, s.misses) == (1, 2)
    assert tier.lookup([key(1)]) == 0  # the colliding block is gone
    assert tier.acquire([key(1)], [toks(1)]) == []
    assert tier.lookup([key(0)]) == 1 and tier.lookup([key(2)]) == 1
    assert len(tier) == 2 and tier.used_bytes == 2 * BB
    tier.record_corrupt(2)
    assert tier.stats().corrupt == 3


def test_bad_keys_and_blocks_raise() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    with pytest.raises(ValueError):
        tier.store(b"short", toks(0), block(0))
    with pytest.raises(TypeError):
        tier.store("not bytes", toks(0), block(0))  # type: ignore[arg-type]
    obj = encode_block(key(0), NS, LAYOUT, toks(0), block(0))
    with pytest.raises(ValueError):
        tier.put([(b"short", obj)])
    with pytest.raises(TypeError):
        tier.put([("not bytes", obj)])  # type: ignore[list-item]
    with pytest.raises(ValueError):  # a block of another size
        tier.store(key(0), toks(0), block(0, TAIL_LAYOUT))
    assert len(tier) == 0 and tier.stats().puts == 0


def test_constructor_errors_and_tiny_capacities() -> None:
    with pytest.raises(ValueError):
        HostTier(LAYOUT, NS, -1)
    odd = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, dtype="float16")  # 4 bytes
    with pytest.raises(ValueError):
        HostTier(odd, NS, 1 << 20)
    for capacity in (0, BB - 1):
        tier = HostTier(LAYOUT, NS, capacity)
        tier.store(key(1), toks(1), block(1))
        tier.put([(key(2), encode_block(key(2), NS, LAYOUT, toks(2), block(2)))])
        assert len(tier) == 0 and tier.used_bytes == 0 and tier.keys() == []
        assert tier.lookup([key(1)]) == 0 and tier.acquire([key(1)], [toks(1)]) == []
        assert tier.get([key(1), key(2)]) == [None, None]
        assert tier.stats().extra["dropped"] == 2
        assert tier.stats().puts == 2 and tier.stats().evictions == 0
    # Capacity is a whole number of slots: 2.5 blocks hold 2.
    tier = HostTier(LAYOUT, NS, 2 * BB + BB // 2)
    fill(tier, range(5))
    assert len(tier) == 2 and tier.used_bytes == 2 * BB <= tier.capacity_bytes
    assert tier.stats().extra["dropped"] == 0 and tier.stats().evictions == 3


# -- pinning ----------------------------------------------------------------------------------------


def test_pinned_blocks_are_not_evicted_until_release() -> None:
    """Eviction passes over blocks a load is copying out of (under LRU the hottest ones): their
    slots stay intact and indexed, the unpinned ones go; after release they are evictable again."""
    tier = HostTier(LAYOUT, NS, 4 * BB)
    fill(tier, range(4))
    pinned = tier.acquire([key(0), key(1)], [toks(0), toks(1)])
    assert len(pinned) == 2
    for i in range(4, 16):  # three times the capacity
        tier.store(key(i), toks(i), block(i))
        assert tier.used_bytes <= tier.capacity_bytes
        assert torch.equal(read_slots(tier, pinned), torch.stack([raw(block(0)), raw(block(1))]))
    assert tier.lookup([key(0), key(1)]) == 2
    held = [i for i in range(16) if tier.lookup([key(i)])]
    assert held == [0, 1, 14, 15]  # the two pinned, and the two newest in the other two slots
    assert tier.stats().extra["dropped"] == 0
    tier.release(pinned)
    fill(tier, range(16, 20))
    assert len(tier) == 4 and tier.used_bytes == tier.capacity_bytes
    ids = [16, 17, 18, 19]
    slots = tier.acquire([key(i) for i in ids], [toks(i) for i in ids])
    assert set(pinned) <= set(slots)  # the released slots were reused
    assert sorted(slots) == [0, 1, 2, 3]
    tier.release(slots)
    check_held(tier, ids)


def test_deleted_pinned_slot_needs_every_release() -> None:
    tier = HostTier(LAYOUT, NS, 2 * BB)
    fill(tier, [0, 1])
    first = tier.acquire([key(0)], [toks(0)])
    second = tier.acquire([key(0)], [toks(0)])
    assert first == second
    tier.delete([key(0)])
    assert tier.lookup([key(0)]) == 0 and len(tier) == 1
    fill(tier, range(2, 6))
    assert len(tier) == 1  # only one usable slot while the deleted one is pinned twice
    tier.release(first)
    fill(tier, range(6, 9))
    assert len(tier) == 1  # one reader still copying
    assert torch.equal(read_slots(tier, second)[0], raw(block(0)))
    tier.release(second)
    fill(tier, range(9, 11))
    assert len(tier) == 2 and tier.used_bytes == 2 * BB
    check_held(tier, [9, 10])


def test_replacing_a_pinned_key_keeps_the_old_bytes_for_the_reader() -> None:
    tier = HostTier(LAYOUT, NS, 3 * BB)
    fill(tier, [0])
    old = tier.acquire([key(0)], [toks(0)])
    new_kv = block(100)
    tier.store(key(0), toks(0), new_kv)
    assert len(tier) == 1
    assert torch.equal(read_slots(tier, old)[0], raw(block(0)))
    fresh = tier.acquire([key(0)], [toks(0)])
    assert fresh != old
    assert torch.equal(read_slots(tier, fresh)[0], raw(new_kv))
    assert torch.equal(tier.expected_sums(fresh), integrity_sums(raw(new_kv).unsqueeze(0)))
    tier.release(old)
    tier.release(fresh)


def test_store_when_every_slot_is_pinned_drops() -> None:
    tier = HostTier(LAYOUT, NS, 2 * BB)
    fill(tier, [0, 1])
    slots = tier.acquire([key(0), key(1)], [toks(0), toks(1)])
    tier.store(key(2), toks(2), block(2))
    assert tier.stats().extra["dropped"] == 1
    assert tier.lookup([key(2)]) == 0
    assert torch.equal(read_slots(tier, slots), torch.stack([raw(block(0)), raw(block(1))]))
    tier.release(slots)
    tier.store(key(2), toks(2), block(2))
    check_held(tier, [2])


# -- copy_out -------------------------------------------------------------------------------------


def test_copy_out_runs_and_scattered_slots() -> None:
    tier = HostTier(LAYOUT, NS, 16 * BB)
    fill(tier, range(16))
    ids = list(range(16))
    slots = tier.acquire([key(i) for i in ids], [toks(i) for i in ids])
    assert slots == list(range(16))  # a fresh tier hands out consecutive slots: one run
    check_held(tier, ids)
    tier.release(slots)
    # Churn: free every third slot and refill in another order, so the run is broken up.
    tier.delete([key(i) for i in range(0, 16, 3)])
    fill(tier, [31, 29, 27, 25, 23, 21])
    order = [29, 1, 2, 31, 4, 5, 21, 7, 8, 23, 10, 11, 25, 13, 14, 27]
    slots = tier.acquire([key(i) for i in order], [toks(i) for i in order])
    assert len(slots) == 16
    assert slots != sorted(slots)  # scattered, partly in runs (1, 2), (4, 5), ...
    assert torch.equal(read_slots(tier, slots), torch.stack([raw(block(i)) for i in order]))
    # The same slots in reverse order, and a list with a slot repeated.
    rev = slots[::-1]
    assert torch.equal(read_slots(tier, rev), torch.stack([raw(block(i)) for i in order[::-1]]))
    dup = [slots[1], slots[1], slots[2], slots[0]]
    want = torch.stack([raw(block(i)) for i in (order[1], order[1], order[2], order[0])])
    assert torch.equal(read_slots(tier, dup), want)
    tier.release(slots)


def test_copy_out_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "CHUNK_BYTES", 3 * BB)  # chunks of 3 slots: 3, 3, 3, 1
    tier = HostTier(LAYOUT, NS, 10 * BB)
    fill(tier, range(10))
    ids = list(range(10))
    slots = tier.acquire([key(i) for i in ids], [toks(i) for i in ids])
    assert slots == ids
    assert torch.equal(read_slots(tier, slots), torch.stack([raw(block(i)) for i in ids]))
    for sub in ([2, 3, 4], [5, 6], [8, 9], [9], [1, 2, 3, 4, 5, 6, 7]):
        got = read_slots(tier, [slots[i] for i in sub])
        assert torch.equal(got, torch.stack([raw(block(i)) for i in sub]))
    assert torch.equal(tier.expected_sums(slots), integrity_sums(read_slots(tier, slots)))
    tier.release(slots)
    fill(tier, range(10, 13))  # the full tier evicts across chunks
    assert len(tier) == 10
    check_held(tier, list(range(3, 13)))


# -- integrity_sums ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [LAYOUT, TAIL_LAYOUT, ROWS_LAYOUT], ids=["1k", "5k", "8k"])
def test_integrity_sums_match_numpy_reference(layout: KVLayout) -> None:
    bb = layout.bytes_per_block
    data = random_bytes(3, bb, seed=bb)  # random words: the sums wrap around 2**64
    got = integrity_sums(data)
    rows = -(-bb // (8 * ROW_WORDS))  # the last one zero-padded
    assert got.dtype == torch.int64 and got.shape == (3, rows + ROW_WORDS)
    ref = reference_sums(data.numpy())
    np.testing.assert_array_equal(got.numpy().view(np.uint64), ref)
    # The sums of the blocks one by one are the same as of the batch.
    for i in range(3):
        assert torch.equal(integrity_sums(data[i : i + 1]), got[i : i + 1])
    # The tier records exactly these sums.
    tier = HostTier(layout, NS, 4 * bb)
    for i in range(3):
        tier.store(key(i), toks(i, layout), data[i].view(torch.float32).reshape(layout.block_shape))
    slots = tier.acquire([key(i) for i in range(3)], [toks(i, layout) for i in range(3)])
    np.testing.assert_array_equal(tier.expected_sums(slots).numpy().view(np.uint64), ref)
    tier.release(slots)


def _damaged(data: torch.Tensor, how: str, layout: KVLayout) -> torch.Tensor:
    bad = data.clone()
    flat = bad[0]
    words = flat.view(torch.int64)
    nwords = words.numel()
    tail_start = (nwords // ROW_WORDS) * ROW_WORDS
    if how == "bit-first":
        flat[0] ^= 1
    elif how == "bit-last":
        flat[-1] ^= 0x80  # the top bit of the last word
    elif how == "bit-middle":
        flat[flat.numel() // 2 + 3] ^= 0x10
    elif how == "byte-tail":
        assert tail_start < nwords, "this layout has no tail"
        flat[tail_start * 8 + 5] ^= 0xFF
    elif how == "swap-row":  # two unequal words of one row
        assert tail_start > 0
        a, b = 3, 400
        assert words[a] != words[b]
        words[[a, b]] = words[[b, a]]
    elif how == "swap-rows":  # two unequal words of different rows and columns
        assert tail_start >= 2 * ROW_WORDS
        a, b = 7, ROW_WORDS + 100
        assert words[a] != words[b]
        words[[a, b]] = words[[b, a]]
    else:
        raise AssertionError(how)
    assert not torch.equal(bad, data)
    return bad


@pytest.mark.parametrize(
    ("layout", "how"),
    [
        (LAYOUT, "bit-first"),
        (LAYOUT, "bit-last"),
        (LAYOUT, "bit-middle"),
        (LAYOUT, "byte-tail"),
        (TAIL_LAYOUT, "bit-first"),
        (TAIL_LAYOUT, "bit-last"),
        (TAIL_LAYOUT, "bit-middle"),
        (TAIL_LAYOUT, "byte-tail"),
        (TAIL_LAYOUT, "swap-row"),
        (ROWS_LAYOUT, "bit-first"),
        (ROWS_LAYOUT, "bit-last"),
        (ROWS_LAYOUT, "bit-middle"),
        (ROWS_LAYOUT, "swap-row"),
        (ROWS_LAYOUT, "swap-rows"),
    ],
)
def test_integrity_sums_detect_damage(layout: KVLayout, how: str) -> None:
    data = random_bytes(1, layout.bytes_per_block, seed=7)
    bad = _damaged(data, how, layout)
    assert not torch.equal(integrity_sums(bad), integrity_sums(data))


@pytest.mark.parametrize("layout", [LAYOUT, TAIL_LAYOUT], ids=["1k", "5k"])
def test_integrity_sums_detect_two_swapped_tail_words(layout: KVLayout) -> None:
    data = random_bytes(1, layout.bytes_per_block, seed=11)
    bad = data.clone()
    words = bad[0].view(torch.int64)
    a, b = words.numel() - 2, words.numel() - 1  # both in the tail
    assert words[a] != words[b]
    words[[a, b]] = words[[b, a]]
    assert not torch.equal(bad, data)
    assert not torch.equal(integrity_sums(bad), integrity_sums(data))


# -- Tier protocol: encoded objects ---------------------------------------------------------------


def test_get_returns_decodable_objects() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    blocks = fill(tier, [0, 1])
    got = tier.get([key(0), key(5), key(1)])
    assert got[1] is None
    for i, obj in ((0, got[0]), (1, got[2])):
        assert isinstance(obj, bytes)
        header = read_header(obj)
        assert header.key == key(i) and header.fingerprint == NS and header.layout == LAYOUT
        assert list(header.tokens) == toks(i) and not header.has_hmac
        kv = decode_block(obj, key=key(i), fingerprint=NS, layout=LAYOUT, tokens=toks(i))
        assert torch.equal(kv, blocks[i])
        with pytest.raises(CorruptObjectError):
            decode_block(obj, key=key(i), fingerprint="model-b", layout=LAYOUT)
    s = tier.stats()
    assert (s.hits, s.misses, s.lookups) == (2, 1, 3)
    # get pins only while it copies: the slots are reusable afterwards.
    fill(tier, range(10, 14))
    assert len(tier) == 4


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(),
        CodecConfig(quantization="fp8"),
        CodecConfig(compression="zstd"),
        CodecConfig(quantization="int8", compression="lz4"),
    ],
    ids=["none", "fp8", "zstd", "int8-lz4"],
)
def test_put_encoded_object_is_readable_by_acquire(config: CodecConfig) -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    obj = encode_block(key(3), NS, LAYOUT, toks(3), block(3), config)
    expected = decode_block(obj, key=key(3), fingerprint=NS, layout=LAYOUT)
    if config.quantization == "none":
        assert torch.equal(expected, block(3))
    tier.put([(key(3), obj)])
    assert tier.lookup([key(3)]) == 1 and tier.stats().puts == 1
    assert tier.acquire([key(3)], [[t + 1 for t in toks(3)]]) == []  # the object's tokens were kept
    tier.put([(key(3), obj)])
    slots = tier.acquire([key(3)], [toks(3)])
    assert len(slots) == 1
    assert torch.equal(read_slots(tier, slots)[0], raw(expected))
    assert torch.equal(tier.read_block(slots[0]), expected)
    tier.release(slots)


def test_put_refuses_bad_objects_and_stores_nothing() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    kv = block(1)
    bad = {
        "hmac": encode_block(key(1), NS, LAYOUT, toks(1), kv, secret=b"s"),
        "other namespace": encode_block(key(1), "model-b", LAYOUT, toks(1), kv),
        "other key": encode_block(key(2), NS, LAYOUT, toks(1), kv),
        "other layout": encode_block(key(1), NS, TAIL_LAYOUT, toks(1, TAIL_LAYOUT), block(1, TAIL_LAYOUT)),
        "not an object": b"\x00" * 64,
    }
    good = encode_block(key(1), NS, LAYOUT, toks(1), kv)
    flipped = bytearray(good)
    flipped[-3] ^= 0x01
    bad["bit flip"] = bytes(flipped)
    for what, obj in bad.items():
        with pytest.raises(CorruptObjectError):
            tier.put([(key(1), obj)])
        assert len(tier) == 0 and tier.lookup([key(1)]) == 0, what
    assert tier.stats().puts == 0 and tier.used_bytes == 0
    assert issubclass(codec.CorruptObjectError, ValueError)
    tier.put([(key(1), good)])
    check_held(tier, [1])


# -- policies -----------------------------------------------------------------------------------


def test_lru_eviction_order() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB, policy="lru")
    fill(tier, range(4))
    slots = tier.acquire([key(0)], [toks(0)])  # 0 becomes most recent: 1 is the oldest now
    tier.release(slots)
    fill(tier, [4, 5])  # evicts 1, then 2
    assert [i for i in range(6) if tier.lookup([key(i)])] == [0, 3, 4, 5]
    assert tier.stats().evictions == 2
    assert tier.used_bytes == 4 * BB
    check_held(tier, [0, 3, 4, 5])


def test_get_counts_as_an_access() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB, policy="lru")
    fill(tier, range(4))
    assert tier.get([key(0)])[0] is not None
    fill(tier, [4])
    assert tier.lookup([key(0)]) == 1
    assert tier.lookup([key(1)]) == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_stays_within_capacity(policy: str) -> None:
    tier = HostTier(LAYOUT, NS, 10 * BB, policy=policy)
    new_stores = 0
    for r in range(300):
        i = (r * 13) % 40
        new_stores += tier.lookup([key(i)]) == 0
        tier.store(key(i), toks(i), block(i))
        assert tier.used_bytes <= tier.capacity_bytes
        if r % 3 == 0:
            j = (i + 5) % 40
            slots = tier.acquire([key(j)], [toks(j)])
            if slots:
                assert torch.equal(read_slots(tier, slots)[0], raw(block(j)))
            tier.release(slots)
        if r % 7 == 0:
            obj = tier.get([key(i)])[0]
            assert obj is not None
            assert torch.equal(decode_block(obj, key=key(i), fingerprint=NS, layout=LAYOUT), block(i))
    assert len(tier) == 10 and tier.used_bytes == 10 * BB
    # Replacing a held key reuses its slot; every other store past the first 10 evicts exactly one.
    assert tier.stats().evictions == new_stores - 10 > 0
    ids = [i for i in range(40) if tier.lookup([key(i)])]
    assert len(ids) == 10 and set(tier.keys()) == {key(i) for i in ids}
    check_held(tier, ids)


# -- namespaces -----------------------------------------------------------------------------------


def test_namespaces_are_isolated() -> None:
    tier = HostTier(LAYOUT, "old-model", 8 * BB)
    fill(tier, [1, 2])
    tier.set_namespace("new-model")
    assert tier.namespace == "new-model"
    assert tier.lookup([key(1)]) == 0
    assert tier.acquire([key(1)], [toks(1)]) == []
    assert tier.get([key(1)]) == [None]
    assert len(tier) == 0 and tier.keys() == []
    # Objects must be for the namespace served now.
    with pytest.raises(CorruptObjectError):
        tier.put([(key(5), encode_block(key(5), "old-model", LAYOUT, toks(5), block(5)))])
    tier.put([(key(5), encode_block(key(5), "new-model", LAYOUT, toks(5), block(5)))])
    new_kv = block(101)
    tier.store(key(1), toks(1), new_kv)  # same key, other namespace: a separate block
    slots = tier.acquire([key(1)], [toks(1)])
    assert torch.equal(read_slots(tier, slots)[0], raw(new_kv))
    tier.release(slots)
    obj = tier.get([key(1)])[0]
    assert obj is not None and read_header(obj).fingerprint == "new-model"
    assert tier.used_bytes == 4 * BB  # the capacity bounds the memory of every namespace
    assert len(tier) == 2
    tier.clear()  # only the current namespace
    assert len(tier) == 0 and tier.used_bytes == 2 * BB
    fill(tier, [3])
    assert tier.drop_namespaces(keep=tier.namespace) == 2
    assert tier.used_bytes == BB and tier.lookup([key(3)]) == 1
    tier.set_namespace("old-model")
    assert tier.lookup([key(1)]) == 0 and tier.lookup([key(2)]) == 0
    assert tier.drop_namespaces(keep=tier.namespace) == 1
    assert tier.used_bytes == 0
    # Two tiers with different namespaces share nothing.
    other = HostTier(LAYOUT, "new-model", 8 * BB)
    assert other.lookup([key(3)]) == 0


def test_other_namespace_blocks_are_evicted_for_the_current_one() -> None:
    tier = HostTier(LAYOUT, "old-model", 4 * BB)
    fill(tier, range(4))
    tier.set_namespace("new-model")
    fill(tier, range(10, 14))
    assert len(tier) == 4 and tier.used_bytes == 4 * BB
    check_held(tier, [10, 11, 12, 13])
    tier.set_namespace("old-model")
    assert len(tier) == 0


# -- stats, threads, close ------------------------------------------------------------------------


def test_stats_counters() -> None:
    tier = HostTier(LAYOUT, NS, 3 * BB)
    fill(tier, range(4))  # 4 puts into 3 slots: one eviction
    slots = tier.acquire([key(1), key(2), key(0)], [toks(1), toks(2), toks(0)])
    tier.release(slots)
    tier.lookup([key(1), key(9)])
    tier.get([key(3), key(9)])
    s = tier.stats()
    assert (s.puts, s.bytes_written, s.evictions) == (4, 4 * BB, 1)
    assert s.lookups == 3 + 2 + 2
    assert (s.hits, s.misses) == (2 + 1, 1 + 1)
    assert s.bytes_read >= 2 * BB
    assert s.hit_rate == pytest.approx(3 / 5)
    assert s.write_seconds > 0
    assert s.errors == 0 and s.corrupt == 0 and s.extra["dropped"] == 0
    assert tier.stats() is s  # live counters
    tier.record_corrupt()
    assert s.corrupt == 1
    d = s.as_dict()
    assert d["hits"] == 3 and d["extra"] == {"dropped": 0.0}


def test_get_counts_bytes_read_and_read_seconds() -> None:
    tier = HostTier(LAYOUT, NS, 4 * BB)
    fill(tier, [0, 1])
    tier.get([key(0), key(1), key(2)])
    s = tier.stats()
    assert s.bytes_read > 0
    assert s.read_seconds > 0


def test_threads_keep_counters_consistent() -> None:
    capacity_slots = 40  # more than the 8 threads * 3 slots they can pin at once: no store drops
    tier = HostTier(LAYOUT, NS, capacity_slots * BB)
    blocks = {i: block(i) for i in range(60)}
    expected = {i: raw(kv) for i, kv in blocks.items()}
    errors: list[BaseException] = []
    tallies: list[dict[str, int]] = []

    def work(t: int) -> None:
        c = {"stores": 0, "acq_keys": 0, "acq_hits": 0, "lookup_keys": 0, "get_keys": 0, "get_hits": 0}
        try:
            for r in range(250):
                i = (t * 7 + r * 3) % 60
                tier.store(key(i), toks(i), blocks[i])
                c["stores"] += 1
                ids = [i, (i + 1) % 60, (i + 2) % 60]
                slots = tier.acquire([key(j) for j in ids], [toks(j) for j in ids])
                c["acq_keys"] += 3
                c["acq_hits"] += len(slots)
                try:
                    got = read_slots(tier, slots)
                    for row, j in zip(got, ids, strict=False):
                        assert torch.equal(row, expected[j])
                    sums = tier.expected_sums(slots)
                    if slots:
                        assert torch.equal(sums, integrity_sums(got))
                finally:
                    tier.release(slots)
                tier.lookup([key(i), key(r % 60)])
                c["lookup_keys"] += 2
                if r % 10 == 0:
                    obj = tier.get([key((i + 5) % 60)])[0]
                    c["get_keys"] += 1
                    if obj is not None:
                        c["get_hits"] += 1
                        j = (i + 5) % 60
                        assert torch.equal(
                            decode_block(obj, key=key(j), fingerprint=NS, layout=LAYOUT), blocks[j]
                        )
                if r % 25 == 0:
                    tier.delete([key(i)])
                assert tier.used_bytes <= tier.capacity_bytes
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        tallies.append(c)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    total = {k: sum(c[k] for c in tallies) for k in tallies[0]}
    s = tier.stats()
    assert s.puts == total["stores"] == 8 * 250
    assert s.lookups == total["acq_keys"] + total["lookup_keys"] + total["get_keys"]
    assert s.hits == total["acq_hits"] + total["get_hits"]
    assert s.hits + s.misses == total["acq_keys"] + total["get_keys"]
    assert total["acq_hits"] * BB <= s.bytes_read <= (total["acq_hits"] + total["get_hits"]) * BB
    assert s.bytes_written == s.puts * BB
    assert tier.used_bytes == BB * len(tier) <= tier.capacity_bytes
    assert s.corrupt == 0 and s.extra["dropped"] == 0
    # Every pin was released: the tier can fill all its slots again.
    fill(tier, range(100, 100 + capacity_slots))
    assert len(tier) == capacity_slots
    check_held(tier, list(range(100, 100 + capacity_slots)))


def test_close_releases_memory() -> None:
    tier = HostTier(LAYOUT, NS, 8 * BB)
    fill(tier, range(5))
    slots = tier.acquire([key(0)], [toks(0)])
    tier.release(slots)
    tier.close()
    assert tier.used_bytes == 0 and len(tier) == 0 and tier.keys() == []
    assert tier.lookup([key(0)]) == 0 and tier.acquire([key(0)], [toks(0)]) == []
    assert tier._chunks == []  # the slab itself is given back
    # A closed tier still works (allocating again on demand).
    fill(tier, range(8, 16))
    assert len(tier) == 8
    check_held(tier, list(range(8, 16)))
    tier.close()
    assert tier._chunks == []


def test_the_host_tier_runs_without_triton() -> None:
    """A CPU install has no triton (it comes with CUDA torch, or with the test extras): the engine
    with a host tier must import and run without it (the layered copy's kernel needs it, and is
    imported only where it runs). A fresh interpreter in which importing triton fails."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "from kvtier import LLM, SamplingParams\n"
        "llm = LLM('synthetic:tiny', tiers='host', kv_cache_memory=1 << 20)\n"
        "out = llm.generate(['the cache'], SamplingParams(max_tokens=3, temperature=0))\n"
        "assert len(out[0].outputs[0].token_ids) == 3\n"
        "assert not llm.engine.hierarchy.tiers[0].takes_layered_loads\n"
        "llm.close()\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
