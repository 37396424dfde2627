"""The disk's writes made by a process of their own (cache/file_writer.py): what it writes loads
back bit for bit, the engine's disk tier indexes it, and a writer that dies costs only the writes it
held (the rest go on, on threads), never a slot of the staging memory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from kvtier.cache.codec import CodecConfig
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import BlockKey, KVLayout
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.disk_files import TEMP_SUFFIX

LAYOUT = KVLayout(2, 2, 8, 4, "float32")
BOUND_S = 60.0  # the child imports torch before its first answer


def _hierarchy(
    tmp_path: Path, codec: CodecConfig | None = None, slots: int = 64
) -> tuple[KVHierarchy, DiskTier]:
    disk = DiskTier(tmp_path, "ns", 1 << 30)
    hierarchy = KVHierarchy(
        [disk],
        [codec or CodecConfig()],
        LAYOUT,
        "fp",
        file_writer=True,
        write_queue_bytes=slots * LAYOUT.bytes_per_block,
    )
    return hierarchy, disk


def _wait_ready(hierarchy: KVHierarchy) -> None:
    """Until the children have started the queue writes the files itself: wait for them."""
    deadline = time.monotonic() + BOUND_S
    while not all(c.ready for c in hierarchy.writes._files) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hierarchy.writes._files and all(c.ready for c in hierarchy.writes._files)


def _keys(n: int, base: int = 0) -> list[BlockKey]:
    return [bytes([base + i]) * 32 for i in range(n)]


def _tokens(i: int) -> tuple[int, ...]:
    return tuple(range(4 * i, 4 * i + 4))


def _stage(hierarchy: KVHierarchy, pool: torch.Tensor, keys: list[BlockKey]) -> None:
    entries = [(k, _tokens(i), (0,)) for i, k in enumerate(keys)]
    hierarchy.stage_writes(pool, list(range(len(keys))), entries)


def _load(hierarchy: KVHierarchy, keys: list[BlockKey]) -> torch.Tensor:
    plan = hierarchy.plan(keys)
    return hierarchy.load_now(plan, [list(_tokens(i)) for i in range(len(keys))])


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_blocks_written_by_the_child_load_back_exactly(tmp_path: Path) -> None:
    for codec in (CodecConfig(), CodecConfig(compression="zstd")):
        root = tmp_path / codec.compression
        hierarchy, disk = _hierarchy(root, codec)
        children = list(hierarchy.writes._files)
        assert len(children) == 2 and all(c.pid != os.getpid() for c in children)
        _wait_ready(hierarchy)
        pool = torch.randn(2, 2, 12, 4, 2, 8)
        blocks = pool.permute(2, 0, 1, 3, 4, 5).clone()  # [block, L, 2, ...], as a load returns them
        keys = _keys(12)
        _stage(hierarchy, pool, keys)
        pool.fill_(-1.0)  # the engine reuses its blocks at once: the child reads the staged copy
        assert hierarchy.flush(BOUND_S)
        assert hierarchy.writes._next_child == 12  # every file went to a child, in turn
        stats = disk.stats()
        assert len(disk) == 12 and stats.puts == 12 and stats.errors == 0
        assert stats.bytes_written == sum(os.path.getsize(disk.path_of(k)) for k in keys)
        assert hierarchy.writes.pending_bytes == 0 and hierarchy.writes.dropped == 0
        assert _temp_files(root) == []  # every temp file the child wrote was renamed
        assert torch.equal(_load(hierarchy, keys), blocks)
        assert hierarchy.stats.corrupt == 0
        assert hierarchy.close()
        assert [c._proc.poll() for c in children] == [0, 0]  # the children exit when the queue closes


def test_writers_that_die_lose_only_what_they_held(tmp_path: Path) -> None:
    hierarchy, disk = _hierarchy(tmp_path, slots=16)
    writes = hierarchy.writes
    _wait_ready(hierarchy)
    pool = torch.randn(2, 2, 8, 4, 2, 8)
    _stage(hierarchy, pool, _keys(8))
    assert hierarchy.flush(BOUND_S) and len(disk) == 8
    for round_, child in enumerate(list(writes._files)):
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + BOUND_S
        while child in writes._files and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child not in writes._files  # noticed: the other child, then this process, writes
        keys = _keys(8, base=100 + 10 * round_)
        _stage(hierarchy, pool, keys)
        assert hierarchy.flush(BOUND_S)
        assert torch.equal(_load(hierarchy, keys), pool.permute(2, 0, 1, 3, 4, 5))
    assert writes._files == [] and len(disk) == 24
    assert writes.pending_bytes == 0 and sorted(writes._free) == list(range(writes.num_slots))
    assert hierarchy.close()


def test_a_disk_behind_the_engine_skips_its_writes_not_the_slots(tmp_path: Path) -> None:
    """With every child's answer outstanding for half the slots, a job's file part is skipped
    (counted) and its slot freed at once, for the tiers that keep up."""
    hierarchy, disk = _hierarchy(tmp_path, slots=8)
    writes = hierarchy.writes
    _wait_ready(hierarchy)
    for child in writes._files:
        os.kill(child.pid, signal.SIGSTOP)  # alive but answering nothing
    try:
        pool = torch.randn(2, 2, 8, 4, 2, 8)
        _stage(hierarchy, pool, _keys(8))
        deadline = time.monotonic() + BOUND_S
        while writes.pending_bytes > 4 * LAYOUT.bytes_per_block and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writes.pending_bytes == 4 * LAYOUT.bytes_per_block  # the half that went to a child
        assert writes.files_skipped == 4 and writes.dropped == 0
    finally:
        for child in writes._files:
            os.kill(child.pid, signal.SIGCONT)
    assert hierarchy.flush(BOUND_S) and len(disk) == 4
    assert hierarchy.close()
