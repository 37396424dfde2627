"""A block the host tier already holds is not written to it again (no copy out of the pool, no
writer time); the disk tier is always rewritten, which heals an object corrupted on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from kvtier.cache.codec import CodecConfig
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.host import HostTier

LAYOUT = KVLayout(2, 2, 8, 4, "float32")


def test_held_host_blocks_are_skipped_disk_blocks_rewritten(tmp_path: Path) -> None:
    host = HostTier(LAYOUT, "ns", capacity_bytes=8 * LAYOUT.bytes_per_block)
    disk = DiskTier(tmp_path, "ns", capacity_bytes=1 << 24)
    hierarchy = KVHierarchy([host, disk], [None, CodecConfig()], LAYOUT, "fp")
    pool = torch.randn(LAYOUT.num_layers, 2, 4, *LAYOUT.block_shape[2:])
    key, other, tokens = b"a" * 32, b"b" * 32, (1, 2, 3, 4)

    hierarchy.stage_writes(pool, [0], [(key, tokens, (0, 1))])
    assert hierarchy.flush(30)
    assert host.holds(key) and not host.holds(other)
    assert not disk.holds(key)  # the disk never claims it: a rewrite is its repair

    hierarchy.stage_writes(pool, [0, 1], [(key, tokens, (0, 1)), (other, tokens, (0,))])
    assert hierarchy.flush(30)
    assert host.stats().puts == 2  # key once, other once
    assert disk.stats().puts == 2  # key twice
    assert hierarchy.stats.writes_skipped == 0  # each block still went to some tier

    hierarchy.stage_writes(pool, [2, 3], [(key, tokens, (0,)), (other, tokens, (0,))])
    assert hierarchy.stats.writes_skipped == 2
    assert hierarchy.writes.pending_bytes == 0  # nothing was staged
    assert hierarchy.flush(30)
    assert host.stats().puts == 2 and hierarchy.stats.blocks_written == 3
    block = torch.empty((1, *LAYOUT.block_shape))
    assert host.load_into([key], [tokens], block, hierarchy.io[0]) == 1
    assert torch.equal(block[0], pool[:, :, 0])  # the held copy is the first one written
    hierarchy.close()
