"""Lookup across tiers, the load-vs-recompute decision, promotion, write policy and async I/O.

The device pool is the top of the hierarchy and is not a Tier: the engine matches it first. For the
keys after the device hit, ``plan`` asks the tiers (cheapest first) for the longest consecutive run,
tier by tier, then keeps the leading segments whose predicted load time beats recomputing them.
``load`` runs on the I/O thread: it fetches, verifies (codec: key, fingerprint, layout, tokens,
checksum, HMAC) and returns the leading blocks that passed; anything that fails a check is a miss,
counted and deleted. Writes (write-back on device eviction, write-through on commit, selective after
N hits) are queued to the I/O thread too, so the engine loop never waits on a tier it did not choose
to wait on. Below the device pool a written block goes to every tier (write-through within the
hierarchy): tiers evict by their own policies, and a later lookup takes the cheapest copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.cache.codec import CodecConfig, CorruptObjectError, decode_block, encode_block
from kvtier.cache.keys import BlockKey, KVLayout
from kvtier.cache.tiers.base import Tier

log = logging.getLogger(__name__)

WRITE_POLICIES = ("write-back", "write-through", "selective")
EMA_WEIGHT = 0.2  # weight of the newest measurement in the moving averages


@dataclass
class TierCost:
    """Moving averages of what a read from one tier costs: a fixed latency plus bytes / bandwidth."""

    latency_s: float
    bandwidth_bps: float

    def predict(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bps

    def observe(self, nbytes: int, seconds: float, n_requests: int = 1) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        per_byte = max(seconds - self.latency_s * n_requests, seconds * 0.5) / nbytes
        self.bandwidth_bps += EMA_WEIGHT * (1.0 / per_byte - self.bandwidth_bps)


# Seeds until the engine has measured its own numbers (replaced by real transfers and prefills).
SEED_COSTS = {"host": TierCost(20e-6, 5e9), "disk": TierCost(200e-6, 1e9), "redis": TierCost(1e-3, 3e8)}


@dataclass
class Segment:
    tier: int  # index into the hierarchy's tiers
    start: int  # index into the keys asked about
    count: int


@dataclass
class LoadPlan:
    keys: list[BlockKey]
    segments: list[Segment]  # only the segments worth loading
    predicted_load_s: float
    predicted_recompute_s: float

    @property
    def num_blocks(self) -> int:
        return sum(s.count for s in self.segments)


@dataclass
class HierarchyStats:
    load_decisions: int = 0
    recompute_decisions: int = 0
    blocks_loaded: int = 0
    blocks_written: int = 0
    corrupt: int = 0
    write_errors: int = 0
    predicted_load_s: float = 0.0
    actual_load_s: float = 0.0
    per_tier_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class KVHierarchy:
    def __init__(
        self,
        tiers: Sequence[Tier],
        codecs: Sequence[CodecConfig],
        layout: KVLayout,
        fingerprint: str,
        write_policy: str = "write-back",
        selective_hits: int = 2,
        secret: bytes | None = None,
        prefill_seconds_per_token: float = 1e-3,
        io_threads: int = 2,
        pin_memory: bool = False,
    ) -> None:
        """``pin_memory``: loads land in page-locked memory, so the copy to the GPU is a real async
        DMA instead of a staged copy through a driver bounce buffer (set it on CUDA)."""
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown write policy {write_policy!r}; supported: {', '.join(WRITE_POLICIES)}")
        if len(codecs) != len(tiers):
            raise ValueError("one codec per tier")
        self.tiers = list(tiers)
        self.codecs = list(codecs)
        self.layout = layout
        self.fingerprint = fingerprint
        self.write_policy = write_policy
        self.selective_hits = selective_hits
        self.secret = secret
        self.costs = [TierCost(**vars(SEED_COSTS.get(t.name, SEED_COSTS["disk"]))) for t in tiers]
        self.prefill_seconds_per_token = prefill_seconds_per_token
        self.pin_memory = pin_memory
        self.stats = HierarchyStats()
        self._hits: dict[BlockKey, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvtier-io")
        self._pending_writes: set[Future[None]] = set()

    # -- cost model -------------------------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine reports each prefill-heavy step: the recompute side of the decision."""
        if tokens > 0 and seconds > 0:
            per_token = seconds / tokens
            self.prefill_seconds_per_token += EMA_WEIGHT * (per_token - self.prefill_seconds_per_token)

    # -- lookup and load -------------------------------------------------------------------------
    def plan(self, keys: Sequence[BlockKey]) -> LoadPlan:
        """Longest run of ``keys`` held below the device, cut where recomputing becomes cheaper."""
        segments = self._find_segments(keys)
        block_bytes = self.layout.bytes_per_block
        chosen: list[Segment] = []
        load_s = recompute_s = 0.0
        for seg in segments:
            seg_load = self.costs[seg.tier].predict(seg.count * block_bytes)
            seg_recompute = seg.count * self.layout.block_size * self.prefill_seconds_per_token
            if seg_load >= seg_recompute:
                break
            chosen.append(seg)
            load_s, recompute_s = load_s + seg_load, recompute_s + seg_recompute
        if segments:
            if chosen:
                self.stats.load_decisions += 1
            else:
                self.stats.recompute_decisions += 1
        return LoadPlan(list(keys), chosen, load_s, recompute_s)

    def _find_segments(self, keys: Sequence[BlockKey]) -> list[Segment]:
        segments: list[Segment] = []
        pos = 0
        while pos < len(keys):
            for i, tier in enumerate(self.tiers):
                n = tier.lookup(keys[pos:])
                if n:
                    segments.append(Segment(i, pos, n))
                    pos += n
                    break
            else:
                break
        return segments

    def load_async(self, plan: LoadPlan, block_tokens: Sequence[Sequence[int]]) -> Future[torch.Tensor]:
        """Fetch and verify the plan's blocks on the I/O thread.

        The future's tensor is ``[n, *layout.block_shape]`` on the CPU, n <= plan.num_blocks: the
        leading blocks that arrived whole and verified; the rest are recomputed.
        """
        return self._io.submit(self._load, plan, [list(t) for t in block_tokens])

    def _load(self, plan: LoadPlan, block_tokens: list[list[int]]) -> torch.Tensor:
        start = time.perf_counter()
        # One staging buffer for the whole load, page-locked on CUDA (the caching host allocator
        # reuses it, so it is not faulted in again): each block is decoded straight into its slot.
        out = torch.empty(
            (plan.num_blocks, *self.layout.block_shape),
            dtype=getattr(torch, self.layout.dtype),
            pin_memory=self.pin_memory and plan.num_blocks > 0,
        )
        n = 0
        for seg in plan.segments:
            tier = self.tiers[seg.tier]
            keys = plan.keys[seg.start : seg.start + seg.count]
            t0 = time.perf_counter()
            datas = tier.get(keys)
            good = 0
            for j, (key, data) in enumerate(zip(keys, datas, strict=True)):
                if not self._verify(tier, key, data, block_tokens[seg.start + j], out[n]):
                    break
                n, good = n + 1, good + 1
            # The cost model learns what a load really costs: fetch and verification together,
            # in the units it predicts in (bytes of uncompressed KV).
            self.costs[seg.tier].observe(good * self.layout.bytes_per_block, time.perf_counter() - t0)
            self.stats.per_tier_loaded[tier.name] += good
            if good < seg.count:
                break
        self.stats.blocks_loaded += n
        self.stats.predicted_load_s += plan.predicted_load_s
        self.stats.actual_load_s += time.perf_counter() - start
        return out[:n]

    def _verify(
        self, tier: Tier, key: BlockKey, data: bytes | None, tokens: list[int], out: torch.Tensor
    ) -> bool:
        """Decode ``data`` into ``out`` if it is exactly the requested block; else count, delete, miss."""
        if data is None:
            return False
        try:
            decode_block(
                data,
                key=key,
                fingerprint=self.fingerprint,
                layout=self.layout,
                tokens=tokens,
                secret=self.secret,
                out=out,
            )
            return True
        except CorruptObjectError as e:
            log.warning("%s tier: rejected object %s: %s", tier.name, key.hex()[:16], e)
            self.stats.corrupt += 1
            tier.record_corrupt()
            tier.delete([key])
            return False

    # -- writes ------------------------------------------------------------------------------------
    def note_hit(self, key: BlockKey) -> None:
        """A device-pool hit: selective writing stores a block once it has been reused enough."""
        if self.write_policy == "selective":
            with self._lock:
                self._hits[key] += 1

    def wants_write_on_commit(self) -> bool:
        return self.write_policy == "write-through"

    def wants_write_on_evict(self, key: BlockKey) -> bool:
        if self.write_policy == "write-back":
            return True
        if self.write_policy == "selective":
            with self._lock:
                return self._hits.pop(key, 0) >= self.selective_hits
        return False  # write-through already stored it

    def write_async(self, key: BlockKey, tokens: Sequence[int], kv: torch.Tensor) -> None:
        """Queue one block (a CPU copy the caller no longer touches) for every tier."""
        future = self._io.submit(self._write, key, list(tokens), kv)
        with self._lock:
            self._pending_writes.add(future)
        future.add_done_callback(self._write_done)

    def _write_done(self, future: Future[None]) -> None:
        with self._lock:
            self._pending_writes.discard(future)

    def _write(self, key: BlockKey, tokens: list[int], kv: torch.Tensor) -> None:
        encoded: dict[CodecConfig, bytes] = {}
        for tier, codec in zip(self.tiers, self.codecs, strict=True):
            try:
                if codec not in encoded:
                    encoded[codec] = encode_block(
                        key, self.fingerprint, self.layout, tokens, kv, codec, self.secret
                    )
                tier.put([(key, encoded[codec])])
            except Exception:  # a tier failure must never reach the engine
                log.exception("%s tier: write failed", tier.name)
                self.stats.write_errors += 1
        self.stats.blocks_written += 1

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for queued writes (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending_writes)
            if not pending:
                return
            for f in pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                f.result(timeout=remaining)

    def close(self) -> None:
        self.flush()
        self._io.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()


ReadBlock = Callable[[int], torch.Tensor]
