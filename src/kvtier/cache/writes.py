"""The write queue: blocks on their way from the device pool down to the tiers, off the engine loop.

The engine hands ``stage`` the pool tensor and the ids of the blocks to store. What the step pays is
the copy of those blocks out of the pool into staging slots, and nothing more:

- CUDA: the gather and the copy to page-locked slots run on the queue's own stream, ordered after
  the engine's work by an event; the engine's stream waits only for the gather (a device-to-device
  copy at memory bandwidth) before it may overwrite a block, never for the copy to the host.
- CPU: the blocks are copied into slots (a memcpy of the block, a few ms for a long prompt).

Writer threads then wait for a job's copy (CUDA event) and hand the slot to the tiers (the codec's
encoding, a file, a Redis SET). Before, the step did the device-to-host copy into pageable memory
and waited for it, once per committed request: on the H200 a cold 4k prefill of an 8B model took
791 ms with write-through instead of 151.

Backpressure: the staging slots are the queue's capacity (``capacity_bytes``). A block that finds
no free slot takes the slot of the oldest write not yet started, which is dropped and counted
(``dropped``): a slow tier loses its oldest pending writes, the step never waits for it. A batch
larger than all the slots not in flight keeps its leading blocks (a prefix lookup needs those
first) and drops the rest.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvtier.cache.codec import integrity_sums
from kvtier.cache.keys import BlockKey, KVLayout

log = logging.getLogger(__name__)


@dataclass
class WriteJob:
    key: BlockKey
    tokens: tuple[int, ...]
    tiers: tuple[int, ...]  # indices into the hierarchy's tiers
    slot: int
    sums: torch.Tensor | None  # integrity sums (CPU), computed on the device on CUDA
    ready: torch.cuda.Event | None  # the copy into the slot is complete once this has fired


WriteFn = Callable[[BlockKey, list[int], torch.Tensor, "torch.Tensor | None", tuple[int, ...]], None]


class WriteQueue:
    """Bounded, drop-oldest queue of block writes with its own staging memory and writer threads.

    ``write(key, tokens, kv, sums, tiers)`` is called on a writer thread for each job, with ``kv`` a
    CPU view of the job's slot that is valid only during the call.
    """

    def __init__(
        self,
        layout: KVLayout,
        capacity_bytes: int,
        device: torch.device,
        write: WriteFn,
        threads: int = 2,
        with_sums: bool = False,
    ) -> None:
        self.layout = layout
        self.device = device
        self.num_slots = max(1, capacity_bytes // layout.bytes_per_block)
        self._write = write
        self._with_sums = with_sums and device.type == "cuda"
        self._slab = StagingSlots(layout, self.num_slots, pin=device.type == "cuda")
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._queued: deque[WriteJob] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0  # blocks whose write was dropped: queue full, or shut down before written
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Daemon threads: a tier that hangs must not hold the interpreter at exit (the exit
        # flush waits for them with a deadline instead).
        self._threads = [
            threading.Thread(target=self._run, name=f"kvtier-write-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    # -- the engine's side -----------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return (len(self._queued) + self._running) * self.layout.bytes_per_block

    def stage(
        self,
        kv_cache: torch.Tensor,
        block_ids: Sequence[int],
        entries: Sequence[tuple[BlockKey, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        """Queue ``entries[i]`` = (key, tokens, tiers) for pool block ``block_ids[i]``; ``kv_cache``
        is the pool, ``[L, 2, num_blocks, block_size, H, D]``. Returns once the blocks may be
        overwritten (on CUDA: once the engine's stream is ordered after their gather)."""
        slots = self._reserve(len(block_ids))
        if len(slots) < len(block_ids):  # the queue is all in flight: the newest go too
            self._count_dropped(len(block_ids) - len(slots))
        n = len(slots)
        if n == 0:
            return
        ids, entries = list(block_ids[:n]), list(entries[:n])
        if self._stream is None:
            sums: list[torch.Tensor | None] = [None] * n
            for slot, b in zip(slots, ids, strict=True):
                self._slab[slot].copy_(kv_cache[:, :, b])
            ready = None
        else:
            sums, ready = self._stage_cuda(kv_cache, ids, slots)
        jobs = [
            WriteJob(key, tokens, tiers, slot, s, ready)
            for (key, tokens, tiers), slot, s in zip(entries, slots, sums, strict=True)
        ]
        with self._cond:
            self._queued.extend(jobs)
            self._cond.notify_all()

    def _stage_cuda(
        self, kv_cache: torch.Tensor, ids: list[int], slots: list[int]
    ) -> tuple[list[torch.Tensor | None], torch.cuda.Event]:
        assert self._stream is not None
        engine_stream = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(engine_stream)  # the blocks' KV has been written
        gathered_event = torch.cuda.Event()
        ready = torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            # from page-locked memory: a pageable copy would make the host wait for this stream,
            # which waits for the engine's
            index = torch.tensor(ids, pin_memory=True).to(self.device, non_blocking=True)
            # [L, 2, n, bs, H, D] -> [n, L, 2, bs, H, D]: each block contiguous for the codec. Made on
            # this stream, so the caching allocator reuses its memory only after the copies below.
            # an fp8 pool is gathered as its bytes: index_select has no fp8 kernels
            raw = kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache
            blocks = raw.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()
            gathered_event.record(self._stream)
            sums_host: torch.Tensor | None = None
            if self._with_sums:
                sums_dev = integrity_sums(blocks.view(len(ids), -1).view(torch.uint8))
                sums_host = torch.empty(sums_dev.shape, dtype=sums_dev.dtype, pin_memory=True)
                sums_host.copy_(sums_dev, non_blocking=True)
            for i, slot in enumerate(slots):
                self._slab[slot].view(blocks.dtype).copy_(blocks[i], non_blocking=True)
            ready.record(self._stream)
        engine_stream.wait_event(gathered_event)  # the pool may be overwritten after the gather only
        sums = [None if sums_host is None else sums_host[i] for i in range(len(ids))]
        return sums, ready

    def _reserve(self, n: int) -> list[int]:
        """Up to ``n`` free slots, taking those of the oldest queued writes (dropped) if need be."""
        dropped = 0
        with self._cond:
            while len(self._free) < n and self._queued:
                self._free.append(self._queued.popleft().slot)
                dropped += 1
            k = min(n, len(self._free))
            slots = [self._free.pop() for _ in range(k)]
        if dropped:
            self._count_dropped(dropped)
        return slots

    def _count_dropped(self, n: int) -> None:
        with self._cond:
            self.dropped += n
        log.warning("write queue full: dropped %d pending block writes (tiers slower than the engine)", n)

    # -- writer threads --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closed:
                    self._cond.wait()
                if not self._queued:
                    return
                job = self._queued.popleft()
                self._running += 1
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                self._write(job.key, list(job.tokens), self._slab[job.slot], job.sums, job.tiers)
            except Exception:  # a tier failure must never reach the engine (the hierarchy counts)
                log.exception("write of block %s failed", job.key.hex()[:16])
            finally:
                with self._cond:
                    self._running -= 1
                    self._free.append(job.slot)
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queued or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush (within ``timeout``), then stop the threads; writes still queued are dropped."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._queued)
            self._queued.clear()
            self._cond.notify_all()
        if left:
            self._count_dropped(left)
        if done:
            for t in self._threads:
                t.join(timeout=1.0)
        return done


CHUNK_BYTES = 64 << 20  # staging memory is allocated in chunks of this size, when first needed


class StagingSlots:
    """``num_slots`` block-sized slots, ``slots[i]`` a ``block_shape`` tensor. Page-locked on CUDA
    (a real async DMA); on the CPU anonymous mappings, whose pages cost nothing until first used.
    Chunks are allocated when a slot in them is first asked for: a queue of 1 GiB that never holds
    more than a prefill's blocks costs only those (the free list hands out low slots first)."""

    def __init__(self, layout: KVLayout, num_slots: int, pin: bool) -> None:
        self.layout = layout
        self.pin = pin
        self.per_chunk = max(1, min(num_slots, CHUNK_BYTES // layout.bytes_per_block))
        self._chunks: list[torch.Tensor | None] = [None] * -(-num_slots // self.per_chunk)
        self._lock = threading.Lock()

    def __getitem__(self, slot: int) -> torch.Tensor:
        c, i = divmod(slot, self.per_chunk)
        chunk = self._chunks[c]
        if chunk is None:
            with self._lock:
                chunk = self._chunks[c]
                if chunk is None:
                    chunk = self._chunks[c] = _allocate(self.layout, self.per_chunk, self.pin)
        return chunk[i]


def _allocate(layout: KVLayout, num_slots: int, pin: bool) -> torch.Tensor:
    dtype = getattr(torch, layout.dtype)
    shape = (num_slots, *layout.block_shape)
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
