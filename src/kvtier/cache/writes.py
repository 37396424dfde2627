"""The write queue: blocks on their way from the device pool down to the tiers, off the engine loop.

The engine hands ``stage`` the pool tensor and the ids of the blocks to store. What the step pays is
the copy of those blocks out of the pool into staging slots, and nothing more:

- CUDA: the gather and the copy to page-locked slots run on the queue's own stream, ordered after
  the engine's work by an event; the engine's stream waits only for the gather (a device-to-device
  copy at memory bandwidth) before it may overwrite a block, never for the copy to the host.
- CPU: the blocks are copied into slots (a memcpy of the block, a few ms for a long prompt).

Few launches a call. A batch's slots are the lowest free ones, so they mostly form contiguous runs:
one gather kernel puts the blocks in slot order, and each run is one copy (one DMA on CUDA) rather
than one a block; the block ids go up from reused page-locked buffers and the integrity sums (only
for batches that a raw-block tier takes) land in page-locked rows beside their slots. On the H200
the per-block copies and the per-call page-locked allocations cost the engine thread 1.5 s of an
8.9 s chat run (``docs/benchmarks.md``, issue 12). The CPU takes the same runs (one
``index_select`` into each), so the CPU suite checks the slot bookkeeping the GPU relies on.

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

import bisect
import contextlib
import logging
import math
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvtier.cache.codec import integrity_sums, integrity_sums_width
from kvtier.cache.file_writer import FileResult, FileWriterProcess, SharedSlots, WriterSetup
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


@dataclass(frozen=True)
class FileWrites:
    """One tier's writes made by file writer processes: the tier's index, what a child needs (its
    ``slots`` filled in by the queue), the tier's ``commit_written`` and how many children."""

    tier: int
    setup: WriterSetup
    commit: Callable[[list[tuple[BlockKey, int, float]]], None]
    processes: int = 2


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
        sums_tiers: Collection[int] | None = None,
        file_writes: FileWrites | None = None,
    ) -> None:
        """``with_sums``: on CUDA, hand writers each block's ``integrity_sums`` (computed on the
        device); ``sums_tiers``: only for batches with a job for one of these tiers (None: all).
        ``file_writes``: one tier's writes go to a file writer process (``file_writer.py``)."""
        self.layout = layout
        self.device = device
        self.num_slots = max(1, capacity_bytes // layout.bytes_per_block)
        self._write = write
        self._with_sums = with_sums and device.type == "cuda"
        self._sums_tiers = None if sums_tiers is None else frozenset(sums_tiers)
        cuda = device.type == "cuda"
        width = integrity_sums_width(layout.bytes_per_block) if self._with_sums else 0
        shared = self._shared = SharedSlots(layout, self.num_slots) if file_writes is not None else None
        self._slab = StagingSlots(layout, self.num_slots, pin=cuda, sums_width=width, shared=shared)
        self._free = list(range(self.num_slots))  # sorted: a batch takes the lowest, in runs
        self._indices = PinnedIndices(self.num_slots) if cuda else None
        self._queued: deque[WriteJob] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0  # blocks whose write was dropped: queue full, or shut down before written
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The file writers' jobs, by slot, with their child: each slot stays taken until the child
        # answers for it. At most half the slots wait for them: beyond, the file tier's part of a
        # job is dropped (``files_skipped``), so a disk slower than the engine cannot take the
        # slots that the host tier's write-backs need.
        self._in_child: dict[int, tuple[WriteJob, FileWriterProcess]] = {}
        self._child_limit = max(1, self.num_slots // 2)
        self.files_skipped = 0  # file-tier writes dropped because the file writers were behind
        self._file_tier = file_writes.tier if file_writes is not None else -1
        self._files: list[FileWriterProcess] = []
        self._next_child = 0
        if file_writes is not None and shared is not None and self._slab.shared:
            self._commit_files = file_writes.commit
            setup = replace(file_writes.setup, slots=self.num_slots)
            self._files = [self._start_child(setup, shared) for _ in range(file_writes.processes)]
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
        runs = slot_runs(slots, self._slab.per_chunk)
        if self._stream is None:
            self._stage_cpu(kv_cache, ids, runs)
            sums: list[torch.Tensor | None] = [None] * n
            ready = None
        else:
            want_sums = self._with_sums and (
                self._sums_tiers is None or any(self._sums_tiers.intersection(e[2]) for e in entries)
            )
            ready = self._stage_cuda(kv_cache, ids, runs, want_sums)
            sums = [self._slab.sums(slot) for slot in slots] if want_sums else [None] * n
        jobs = [
            WriteJob(key, tokens, tiers, slot, s, ready)
            for (key, tokens, tiers), slot, s in zip(entries, slots, sums, strict=True)
        ]
        with self._cond:
            self._queued.extend(jobs)
            self._cond.notify_all()

    def _stage_cpu(self, kv_cache: torch.Tensor, ids: list[int], runs: list[tuple[int, int, int]]) -> None:
        """Each run of slots filled by one ``index_select`` straight from the pool."""
        raw = _raw(kv_cache).permute(2, 0, 1, 3, 4, 5)  # [num_blocks, L, 2, bs, H, D], a view
        for pos, start, count in runs:
            index = torch.tensor(ids[pos : pos + count], dtype=torch.int64)
            torch.index_select(raw, 0, index, out=self._slab.run(start, count).view(raw.dtype))

    def _stage_cuda(
        self, kv_cache: torch.Tensor, ids: list[int], runs: list[tuple[int, int, int]], want_sums: bool
    ) -> torch.cuda.Event:
        """Gather, sums, one copy per run: a handful of launches whatever the batch. Returns the
        event after which the slots (and their sums rows) hold the blocks."""
        ready = torch.cuda.Event()
        with self._gathered(kv_cache, ids, want_sums) as (blocks, sums_dev):
            for pos, start, count in runs:
                self._slab.run(start, count).view(blocks.dtype).copy_(
                    blocks[pos : pos + count], non_blocking=True
                )
                if sums_dev is not None:
                    self._slab.sums_run(start, count).copy_(sums_dev[pos : pos + count], non_blocking=True)
            ready.record(self._stream)
        return ready

    def copy_direct(
        self,
        kv_cache: torch.Tensor,
        block_ids: Sequence[int],
        sink: Callable[[torch.Tensor, torch.Tensor, torch.cuda.Stream], None],
    ) -> None:
        """CUDA: gather pool blocks on the queue's stream and hand them, ``[n, L, 2, ...]`` with their
        ``integrity_sums``, to ``sink`` on that stream (the host tier copies them into its slots:
        ``HostTier.store_from_device``), no staging slot and no writer thread. Returns once the
        blocks may be overwritten (the engine's stream is ordered after the gather)."""
        with self._gathered(kv_cache, list(block_ids), True) as (blocks, sums):
            assert sums is not None and self._stream is not None
            sink(blocks, sums, self._stream)

    @contextlib.contextmanager
    def _gathered(
        self, kv_cache: torch.Tensor, ids: list[int], want_sums: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """On the queue's stream, ordered after the engine's work: the blocks ``ids`` of the pool as
        ``[n, L, 2, bs, H, D]`` (each contiguous, in one kernel) and their sums; afterwards the
        engine's stream waits for the gather only, before it may overwrite a block."""
        assert self._stream is not None and self._indices is not None
        engine_stream = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(engine_stream)  # the blocks' KV has been written
        gathered_event = torch.cuda.Event()
        with torch.cuda.stream(self._stream):
            index = self._indices.to_device(ids, self.device, self._stream)
            # Made on this stream, so the caching allocator reuses its memory only after the
            # copies the caller makes on it.
            blocks = torch.index_select(_raw(kv_cache).permute(2, 0, 1, 3, 4, 5), 0, index)
            gathered_event.record(self._stream)
            sums = integrity_sums(blocks.view(len(ids), -1).view(torch.uint8)) if want_sums else None
            yield blocks, sums
        engine_stream.wait_event(gathered_event)  # the pool may be overwritten after the gather only

    def _reserve(self, n: int) -> list[int]:
        """Up to ``n`` free slots, taking those of the oldest queued writes (dropped) if need be."""
        dropped = 0
        with self._cond:
            while len(self._free) < n and self._queued:
                bisect.insort(self._free, self._queued.popleft().slot)
                dropped += 1
            k = min(n, len(self._free))
            slots = self._free[:k]  # the lowest: contiguous runs, and the staging chunks stay few
            del self._free[:k]
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
            in_child = False
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                in_child = self._write_job(job)
            except Exception:  # a tier failure must never reach the engine (the hierarchy counts)
                log.exception("write of block %s failed", job.key.hex()[:16])
            finally:
                if not in_child:
                    self._finish([job])

    def _write_job(self, job: WriteJob) -> bool:
        """Write ``job`` to its tiers here, but the file writers' tier, whose part goes to a child;
        True when it went (the slot is then freed by the child's answer)."""
        tiers = job.tiers
        child, skipped = self._child_for(job) if self._file_tier in tiers else (None, False)
        if child is not None or skipped:  # the file tier's part is the children's, or skipped
            tiers = tuple(t for t in tiers if t != self._file_tier)
        self._write(job.key, list(job.tokens), self._slab[job.slot], job.sums, tiers)
        if child is None:
            return False
        if child.submit([(job.slot, job.key, job.tokens)]):
            return True
        with self._cond:  # the child is gone: this process writes the file itself
            self._in_child.pop(job.slot, None)
        self._write(job.key, list(job.tokens), self._slab[job.slot], job.sums, (self._file_tier,))
        return False

    def wait_for_file_writers(self, timeout: float = 30.0) -> bool:
        """Wait until every file writer process has started (a benchmark's warm-up: a server
        starts them long before its load comes); True at once without them."""
        deadline = time.monotonic() + timeout
        return all(c.wait_ready(max(0.0, deadline - time.monotonic())) for c in list(self._files))

    def _child_for(self, job: WriteJob) -> tuple[FileWriterProcess | None, bool]:
        """(the child that takes ``job``'s file, in turn: its slot then waits for the answer;
        whether the file is skipped instead, the children being behind: ``files_skipped``). No
        child and not skipped: none has started yet (or all died), the file is written here."""
        with self._cond:
            ready = [c for c in self._files if c.ready]
            if not ready:
                return None, False
            if len(self._in_child) >= self._child_limit:
                self.files_skipped += 1
                return None, True
            child = ready[self._next_child % len(ready)]
            self._next_child += 1
            self._in_child[job.slot] = (job, child)
            return child, False

    def _finish(self, jobs: Sequence[WriteJob]) -> None:
        with self._cond:
            for job in jobs:
                self._running -= 1
                bisect.insort(self._free, job.slot)
            self._cond.notify_all()

    def _start_child(self, setup: WriterSetup, shared: SharedSlots) -> FileWriterProcess:
        child: FileWriterProcess | None = None

        def gone() -> None:
            assert child is not None
            self._child_gone(child)

        child = FileWriterProcess(setup, shared, self._files_done, gone)
        return child

    def _files_done(self, results: list[FileResult]) -> None:
        """A child's answers (on its channel's thread): the tier indexes the files, then the
        slots are free."""
        try:
            self._commit_files([(key, size, seconds) for _, key, size, seconds in results])
        finally:
            with self._cond:
                done = [entry[0] for entry in (self._in_child.pop(r[0], None) for r in results) if entry]
            self._finish(done)

    def _child_gone(self, child: FileWriterProcess) -> None:
        """A child exited: its unanswered jobs are dropped writes; when none is left, this
        process writes the file tier again."""
        with self._cond:
            if child in self._files:
                self._files.remove(child)
            lost = [job for job, c in self._in_child.values() if c is child]
            for job in lost:
                del self._in_child[job.slot]
        self._finish(lost)
        if lost:
            self._count_dropped(len(lost))

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
        for child in list(self._files):
            child.close()
        if self._shared is not None:
            if self._stream is not None:
                self._stream.synchronize()  # no copy may still fill the memory unregistered next
            self._shared.close()  # the children are gone; the mapping lives while the slots do
        if done:
            for t in self._threads:
                t.join(timeout=1.0)
        return done


CHUNK_BYTES = 64 << 20  # staging memory is allocated in chunks of this size (CPU: when first needed)


class StagingSlots:
    """``num_slots`` block-sized slots, ``slots[i]`` a ``block_shape`` tensor. Page-locked on CUDA
    (a real async DMA); on the CPU anonymous mappings, whose pages cost nothing until first used.
    On the CPU chunks are allocated when a slot in them is first asked for: a queue of 1 GiB that
    never holds more than a prefill's blocks costs only those (the queue hands out the lowest free
    slots first). Page-locked chunks are all made at once, at start-up: on the H200 a 64 MiB
    page-locked allocation took 43 ms, and launches on the engine thread stalled meanwhile.
    With ``sums_width`` each slot also has a row of that many int64 (its ``integrity_sums``), in
    page-locked chunks made with the slots'."""

    def __init__(
        self,
        layout: KVLayout,
        num_slots: int,
        pin: bool,
        sums_width: int = 0,
        shared: SharedSlots | None = None,
    ) -> None:
        """``shared``: the slots are views of this memory file's mapping (another process reads
        them), page-locked in place when ``pin``."""
        self.layout = layout
        self.pin = pin
        self.sums_width = sums_width
        self.num_slots = num_slots
        self.per_chunk = max(1, min(num_slots, CHUNK_BYTES // layout.bytes_per_block))
        self._chunks: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * -(
            -num_slots // self.per_chunk
        )
        self._lock = threading.Lock()
        self._shared = _map_shared(layout, shared, pin) if shared is not None else None
        if pin or self._shared is not None:  # made at start-up, never mid-run (HostTier._allocate_all)
            for c in range(len(self._chunks)):
                self._chunk(c)

    @property
    def shared(self) -> bool:
        """Whether the slots are in the shared memory file (False: it could not be page-locked)."""
        return self._shared is not None

    def __getitem__(self, slot: int) -> torch.Tensor:
        c, i = divmod(slot, self.per_chunk)
        return self._chunk(c)[0][i]

    def run(self, start: int, count: int) -> torch.Tensor:
        """Slots ``start .. start + count - 1`` (one chunk) as one ``[count, *block_shape]`` tensor."""
        c, i = divmod(start, self.per_chunk)
        assert i + count <= self.per_chunk, "a run never crosses a chunk (slot_runs cuts it)"
        return self._chunk(c)[0][i : i + count]

    def sums(self, slot: int) -> torch.Tensor:
        c, i = divmod(slot, self.per_chunk)
        rows = self._chunk(c)[1]
        assert rows is not None, "made without sums_width"
        return rows[i]

    def sums_run(self, start: int, count: int) -> torch.Tensor:
        c, i = divmod(start, self.per_chunk)
        rows = self._chunk(c)[1]
        assert rows is not None, "made without sums_width"
        return rows[i : i + count]

    def _chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunk = self._chunks[c]
        if chunk is None:
            with self._lock:
                chunk = self._chunks[c]
                if chunk is None:
                    sums = None
                    if self.sums_width:
                        sums = torch.empty(
                            (self.per_chunk, self.sums_width), dtype=torch.int64, pin_memory=self.pin
                        )
                    if self._shared is not None:
                        start = c * self.per_chunk
                        slots = self._shared[start : min(start + self.per_chunk, self.num_slots)]
                    else:
                        slots = _allocate(self.layout, self.per_chunk, self.pin)
                    chunk = self._chunks[c] = (slots, sums)
        return chunk


def slot_runs(slots: Sequence[int], per_chunk: int) -> list[tuple[int, int, int]]:
    """``(position in slots, first slot, count)`` of each run of consecutive slots within one chunk
    of ``per_chunk`` slots: what one copy can fill."""
    runs: list[tuple[int, int, int]] = []
    pos = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1 or slots[i] % per_chunk == 0:
            runs.append((pos, slots[pos], i - pos))
            pos = i
    return runs


class PinnedIndices:
    """Page-locked int64 buffers that carry a batch's block ids to the device, reused round-robin
    once the copy out of them has run (a per-call ``torch.tensor(ids, pin_memory=True)`` cost 58 us
    of the H200 host's engine thread). A buffer whose copy is still queued behind the engine's work
    is not touched: that call takes a fresh one."""

    def __init__(self, size: int, count: int = 8) -> None:
        self._buffers = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(count)]
        self._views = [b.numpy() for b in self._buffers]
        self._events: list[torch.cuda.Event | None] = [None] * count
        self._next = 0
        self.fresh = 0  # calls that found their buffer still in use

    def to_device(self, ids: list[int], device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
        """``ids`` on ``device``, copied on ``stream`` (the current one)."""
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        event = self._events[i]
        if event is not None and not event.query():
            self.fresh += 1
            return torch.tensor(ids, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
        n = len(ids)
        self._views[i][:n] = ids
        out = self._buffers[i][:n].to(device, non_blocking=True)
        event = self._events[i] = torch.cuda.Event()
        event.record(stream)
        return out


def _raw(kv_cache: torch.Tensor) -> torch.Tensor:
    """The pool as index_select can gather it: an fp8 pool as its bytes (no fp8 kernels there)."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache


def _map_shared(layout: KVLayout, shared: SharedSlots, pin: bool) -> torch.Tensor | None:
    """The shared memory file as ``[slots, *block_shape]``, page-locked in place when ``pin``;
    None if it cannot be (the caller stages in memory of its own)."""
    if pin and not shared.pin():
        return None
    dtype = getattr(torch, layout.dtype)
    return torch.frombuffer(shared.mapping, dtype=dtype).view(-1, *layout.block_shape)


def _allocate(layout: KVLayout, num_slots: int, pin: bool) -> torch.Tensor:
    dtype = getattr(torch, layout.dtype)
    shape = (num_slots, *layout.block_shape)
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
