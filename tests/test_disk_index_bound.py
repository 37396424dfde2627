"""The disk tier's in-memory index is bounded by ``max_entries``, not only by capacity: memory stays
flat over any number of distinct objects, and a new entry beyond the bound evicts, file included."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from array import array
from pathlib import Path

import pytest

from kvtier import LLM
from kvtier.cache.tiers.disk import ENTRY_BYTES, DiskTier
from kvtier.cache.tiers.disk_ledger import LEDGER_NAME, UsageLedger
from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.tiers import disk_max_entries

FULL = os.environ.get("KVTIER_FULL") == "1"


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def objects_on_disk(folder: Path) -> list[Path]:
    return list(folder.rglob("*.kvt"))


def traced_memory_over_puts(tier: DiskTier, count: int, every: int) -> array[int]:
    """Traced memory after each ``every`` distinct 64-byte objects, ``count`` in all (kept in an
    array allocated up front, so that the samples themselves do not read as growth)."""
    samples = array("q", bytes(8 * (count // every)))
    for n, start in enumerate(range(0, count, every)):
        tier.put([(key(i), i.to_bytes(8, "little") * 8) for i in range(start, start + every)])
        samples[n] = tracemalloc.get_traced_memory()[0]
    return samples


@pytest.mark.stress
def test_index_memory_stays_flat_over_many_distinct_objects(tmp_path: Path) -> None:
    """5,000 distinct objects (50,000 with KVTIER_FULL=1) through an index of 500 entries and a
    capacity that would hold them all: from 2,000 objects on (the index has churned four times, and its
    dict reached the size churn keeps it at), memory stays within a tenth of what the 500 entries
    cost, while an index without the bound (measured the same way) grows by
    about an entry's cost per object."""
    total, bound, every = (50_000 if FULL else 5_000), 500, 250
    tracemalloc.start()
    try:
        empty = tracemalloc.get_traced_memory()[0]
        tier = DiskTier(tmp_path / "bounded", "ns", 1 << 30, max_entries=bound, read_threads=0)
        samples = traced_memory_over_puts(tier, total, every)
        warm = 2_000 // every - 1  # the sample after 2,000 objects
        index_cost = samples[warm] - empty
        growth = max(samples[warm:]) - samples[warm]

        unbounded = DiskTier(tmp_path / "unbounded", "ns", 1 << 30, max_entries=1 << 40, read_threads=0)
        before = tracemalloc.get_traced_memory()[0]
        unbounded_growth = traced_memory_over_puts(unbounded, 2_000, every)[-1] - before
    finally:
        tracemalloc.stop()
    print(
        f"\n{total} objects through {bound} entries: the full index took {index_cost} B "
        f"({index_cost // bound} B an entry); from 2,000 objects on, memory grew by at most {growth} B "
        f"(unbounded: +{unbounded_growth} B over 2,000 objects)"
    )
    assert len(tier) == bound and len(objects_on_disk(tmp_path / "bounded")) == bound
    assert growth < index_cost // 10
    assert unbounded_growth > 2_000 * ENTRY_BYTES // 3  # the measurement sees an index that grows
    assert index_cost < bound * ENTRY_BYTES * 2  # ENTRY_BYTES (the documented cost) is about right
    st = tier.stats()
    assert st.evictions == total - bound == st.extra["entry_evictions"]
    folder = tmp_path / "bounded" / "ns"
    ledger = UsageLedger(str(folder / LEDGER_NAME))
    assert ledger.read() == sum(p.stat().st_size for p in objects_on_disk(folder)) == tier.used_bytes
    ledger.close()


def test_a_fuller_folder_is_trimmed_to_the_bound_at_start_up(tmp_path: Path) -> None:
    writer = DiskTier(tmp_path, "ns", 1 << 20, max_entries=300)
    writer.put([(key(i), bytes(100)) for i in range(300)])
    writer.close()
    reader = DiskTier(tmp_path, "ns", 1 << 20, max_entries=100)
    assert len(reader) == 100 and len(objects_on_disk(tmp_path)) == 100
    assert reader.used_bytes == 100 * 100 == UsageLedger(str(tmp_path / "ns" / LEDGER_NAME)).read()


def test_adopting_into_a_full_index_evicts_the_least_recently_used(tmp_path: Path) -> None:
    mine = DiskTier(tmp_path, "ns", 1 << 20, max_entries=10, policy="lru")
    mine.put([(key(i), bytes(50)) for i in range(10)])
    assert mine.get([key(0)]) == [bytes(50)]  # key 1 is now the least recently used
    other = DiskTier(tmp_path, "ns", 1 << 20, max_entries=100)  # another process on the folder
    other.put([(key(100), b"theirs")])
    assert mine.lookup([key(100)]) == 1  # adopted: the index is full, so key 1 went for it
    assert len(mine) == 10 and not os.path.exists(mine.path_of(key(1)))
    assert mine.get([key(0), key(100)]) == [bytes(50), b"theirs"]
    assert mine.stats().extra["adopted"] == 1 and mine.stats().extra["entry_evictions"] == 1


def test_max_entries_is_checked(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries"):
            DiskTier(tmp_path, "ns", 1 << 20, max_entries=bad)  # type: ignore[arg-type]
    assert DiskTier(tmp_path, "ns", 1 << 30).max_entries == (1 << 30) // 4096
    assert DiskTier(tmp_path, "ns", 1 << 20).max_entries == 1024  # the floor


def test_the_engine_derives_the_bound_from_its_smallest_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk_max_entries"):
        EngineConfig.load({"disk_max_entries": -1}, env={})
    llm = LLM("synthetic:tiny", tiers="disk", disk_path=str(tmp_path), disk_capacity=64 << 20,
              disk_codec="int8+zstd")  # fmt: skip
    try:
        assert llm.engine.hierarchy is not None
        disk = llm.engine.hierarchy.tiers[0]
        assert isinstance(disk, DiskTier)
        tiers = llm.engine.config.tiers
        assert disk.max_entries == disk_max_entries(tiers, llm.engine.namespace, llm.engine.layout)
        # the tiny model's int8 block is 2 KiB + scales: a quarter of it compressed, plus a header
        assert (64 << 20) // 4096 < disk.max_entries < (64 << 20) // 512
    finally:
        llm.close()
    llm = LLM("synthetic:tiny", tiers="disk", disk_path=str(tmp_path), disk_max_entries=2000)
    try:
        assert llm.engine.hierarchy is not None and llm.engine.hierarchy.tiers[0].max_entries == 2000  # type: ignore[attr-defined]
    finally:
        llm.close()
