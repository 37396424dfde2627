"""Moving KV between the device pool and the tiers below it.

Three movements, all batched so a step pays at most one device synchronisation for each:

- loads: a finished tier load is copied into its device blocks (``install_loads``), then the
  request runs;
- writes: blocks evicted from the pool (write-back) or just committed (write-through) are queued
  and copied out together, before anything can overwrite them (``flush``);
- close: every block the device still caches is written down, so a restart finds it.
"""

from __future__ import annotations

import logging

import torch

from kvtier.cache.blocks import BlockPool
from kvtier.cache.codec import integrity_sums
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import BlockKey
from kvtier.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class KVTransfer:
    """The engine's side of the hierarchy: owns the queue of blocks waiting to be written down."""

    def __init__(self, hierarchy: KVHierarchy, pool: BlockPool, kv_cache: torch.Tensor) -> None:
        self.hierarchy = hierarchy
        self.pool = pool
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, H, D]
        self.device = kv_cache.device
        self._pending: list[tuple[int, BlockKey, tuple[int, ...]]] = []
        pool.on_evict = self.write_back

    def install_loads(self, scheduler: Scheduler) -> None:
        """Copy finished loads into their device blocks; the requests then run."""
        for req in list(scheduler.loading):
            future = req.load_future
            if future is None or not future.done():
                continue
            try:
                blocks = future.result()
            except Exception:  # a failed load is a miss: recompute
                log.exception("load of request %s failed; recomputing", req.request_id)
                blocks = torch.empty(0)
            n = int(blocks.shape[0]) if blocks.numel() else 0
            base = req.num_committed_blocks
            if n:
                ids = torch.tensor(req.block_table[base : base + n], device=self.device)
                if blocks.is_cuda:  # made on the I/O thread's stream: keep it alive for ours
                    blocks.record_stream(torch.cuda.current_stream(self.device))
                # already on our device (the hierarchy loads onto it): [n, L, 2, ...] -> [L, 2, n, ...]
                self.kv_cache.index_copy_(2, ids, blocks.permute(1, 2, 0, 3, 4, 5))
            self.hierarchy.recycle(blocks)  # on the CPU the copy above is done: reuse its memory
            scheduler.complete_load(req, n)

    def write_back(self, block_id: int, key: BlockKey, tokens: tuple[int, ...]) -> None:
        """An evicted block: queued, and copied out with the step's others before the model runs
        (nothing overwrites a block between its allocation in ``schedule`` and the forward pass)."""
        if self.hierarchy.wants_write_on_evict(key):
            self._pending.append((block_id, key, tokens))

    def write_through(self, blocks: list[int]) -> None:
        """Blocks just committed: stored below at once (write-through)."""
        if not self.hierarchy.wants_write_on_commit():
            return
        for b in blocks:
            cached = self.pool.cached(b)
            if cached is not None:
                self._pending.append((b, cached.key, cached.tokens))
        self.flush()

    def flush(self) -> None:
        """Copy the queued blocks to the host in one transfer (one device sync per step, not one
        per block) and hand them to the hierarchy's I/O threads."""
        if not self._pending:
            return
        ids = torch.tensor([b for b, _, _ in self._pending], device=self.device)
        # [L, 2, n, bs, H, D] -> [n, L, 2, bs, H, D]: each block contiguous for the codec
        blocks = self.kv_cache.index_select(2, ids).permute(2, 0, 1, 3, 4, 5).contiguous()
        sums = None
        if self.device.type == "cuda" and self.hierarchy.wants_sums:  # ~free here, a CPU pass there
            sums = integrity_sums(blocks.view(len(ids), -1).view(torch.uint8)).to("cpu", non_blocking=True)
        data = blocks.cpu()  # waits for the sums' copy too (same stream)
        for i, (_, key, tokens) in enumerate(self._pending):
            self.hierarchy.write_async(key, tokens, data[i], None if sums is None else sums[i])
        self._pending.clear()

    def close(self) -> None:
        """Write every block the device still caches down the hierarchy (so a restart or another
        instance finds it), wait for the writes, and close the tiers."""
        if not self.hierarchy.wants_write_on_commit():
            for block_id, cached in self.pool.cached_blocks():
                self.write_back(block_id, cached.key, cached.tokens)
        self.flush()
        self.hierarchy.close()
        self.pool.on_evict = None
