"""Moving KV between the device pool and the tiers below it.

Three movements, all batched so a step pays at most one device synchronisation for each:

- loads: a finished tier load is copied into its device blocks (``install_loads``), then the
  request runs; a short load from this process's memory runs at once, in the step that admits
  its request (``load_now``); a load from the page-locked host tier is copied layer by layer
  under that step's compute (``start_layered``);
- writes: blocks evicted from the pool (write-back) or just committed (write-through) are queued
  and handed to the hierarchy's write queue together, before anything can overwrite them
  (``flush``): the step pays their copy out of the pool, the tiers are written on other threads;
- close: every block the device still caches is written down, so a restart finds it.
"""

from __future__ import annotations

import logging

import torch

from kvtier.cache.blocks import BlockPool
from kvtier.cache.hierarchy import KVHierarchy, LoadPlan
from kvtier.cache.keys import BlockKey
from kvtier.engine.request import Request
from kvtier.engine.runner import to_device_async
from kvtier.engine.scheduler import ScheduledChunk, Scheduler

log = logging.getLogger(__name__)


class KVTransfer:
    """The engine's side of the hierarchy: owns the queue of blocks waiting to be written down."""

    def __init__(self, hierarchy: KVHierarchy, pool: BlockPool, kv_cache: torch.Tensor) -> None:
        self.hierarchy = hierarchy
        self.pool = pool
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, H, D]
        # index_copy_ has no fp8 kernels: an fp8 pool is moved as its bytes (same shape)
        self._bytes = kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache
        self.device = kv_cache.device
        # (block id, key, tokens, tier indices) waiting for this step's flush
        self._pending: list[tuple[int, BlockKey, tuple[int, ...], tuple[int, ...]]] = []
        pool.on_evict = self.write_back
        hierarchy.warm_layered(kv_cache)  # the pool holds nothing yet

    def install_loads(self, scheduler: Scheduler) -> None:
        """Copy finished loads into their device blocks; the requests then run."""
        self.hierarchy.reap()  # device loads done with, or whose request went away, let go
        for req in list(scheduler.loading):
            future = req.load_future
            if future is None or not future.done():
                continue
            try:
                blocks = future.result()
            except Exception:  # a failed load is a miss: recompute
                log.exception("load of request %s failed; recomputing", req.request_id)
                blocks = torch.empty(0)
            base = req.num_committed_blocks
            n = self._install(req.block_table[base:], blocks)
            scheduler.complete_load(req, n)

    def load_now(self, block_ids: list[int], plan: LoadPlan, block_tokens: list[list[int]]) -> int:
        """Load ``plan`` from this process's memory into ``block_ids`` at once, in the step that
        admits its request (``KVHierarchy.loads_at_once``). Returns how many leading blocks arrived
        verified. A block just allocated for it may have been evicted by this very allocation: the
        queued write-backs are staged first, so they copy the evicted KV out before it is overwritten."""
        self.flush()
        try:
            blocks = self.hierarchy.load_now(plan, block_tokens)
        except Exception:  # a failed load is a miss: recompute
            log.exception("load from memory failed; recomputing")
            return 0
        return self._install(block_ids, blocks)

    def start_layered(
        self, chunks: list[ScheduledChunk], layer_ready: list[torch.cuda.Event]
    ) -> list[Request]:
        """Queue the layer-by-layer copies of the layered loads reserved for this step's requests
        (after the copies out of the blocks this step's allocations evicted, which ``flush`` has
        queued), recording ``layer_ready[i]`` once layer i has landed; returns those requests."""
        reqs = [c.request for c in chunks if c.request.layered_load is not None]
        loads = [r.layered_load for r in reqs if r.layered_load is not None]
        if loads:
            self.hierarchy.start_layered(loads, self.kv_cache, layer_ready)
        return reqs

    def _install(self, block_ids: list[int], blocks: torch.Tensor) -> int:
        """Copy a load's ``[n, L, 2, ...]`` blocks into the first n of ``block_ids``; returns n."""
        n = int(blocks.shape[0]) if blocks.numel() else 0
        if n:
            ids = to_device_async(block_ids[:n], torch.int64, self.device)
            if blocks.is_cuda:  # made on an I/O stream: keep it alive for ours
                blocks.record_stream(torch.cuda.current_stream(self.device))
            # already on our device (the hierarchy loads onto it): [n, L, 2, ...] -> [L, 2, n, ...]
            self._bytes.index_copy_(2, ids, blocks.view(self._bytes.dtype).permute(1, 2, 0, 3, 4, 5))
        self.hierarchy.recycle(blocks)  # on the CPU the copy above is done: reuse its memory
        return n

    def write_back(self, block_id: int, key: BlockKey, tokens: tuple[int, ...]) -> None:
        """An evicted block: queued for its write-back tiers, and copied out with the step's others
        before the model runs (nothing overwrites a block between its allocation in ``schedule``
        and the forward pass)."""
        tiers = self.hierarchy.evict_tiers(key)
        if tiers:
            self._pending.append((block_id, key, tokens, tiers))

    def write_through(self, blocks: list[int]) -> None:
        """Blocks just committed: queued for the write-through tiers (disk, Redis), staged with the
        rest of the step's at its ``flush`` (the engine's, after the step's requests advanced)."""
        tiers = self.hierarchy.commit_tiers
        if not tiers:
            return
        for b in blocks:
            cached = self.pool.cached(b)
            if cached is not None:
                self._pending.append((b, cached.key, cached.tokens, tiers))

    def flush(self) -> None:
        """Hand the queued blocks to the hierarchy's write queue in one batch: the step pays their
        copy out of the pool (on CUDA an ordering of streams, not a wait), the tiers get them on
        the queue's threads."""
        if not self._pending:
            return
        ids = [b for b, _, _, _ in self._pending]
        self.hierarchy.stage_writes(self.kv_cache, ids, [(k, t, tiers) for _, k, t, tiers in self._pending])
        self._pending.clear()

    def close(self, timeout: float | None = None) -> bool:
        """Write what the device still caches to the write-back tiers that outlive the process
        (a restart or another instance finds it), wait for the queued writes (``timeout``: then
        drop what is left), and close the tiers. Returns whether every write made it."""
        for block_id, cached in self.pool.cached_blocks():
            tiers = self.hierarchy.evict_tiers(cached.key, persistent_only=True)
            if tiers:
                self._pending.append((block_id, cached.key, cached.tokens, tiers))
        self.flush()
        self.pool.on_evict = None
        return self.hierarchy.close(timeout)
