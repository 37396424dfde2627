"""HostTier: KV blocks resident in (pinned) host memory, in fixed-size slots, bounded by a policy.

Why blocks and not encoded objects: this tier sits between the device pool and everything else, and
its job is to be as fast as the host-to-device link. An encoded object must be verified on the CPU
(checksum pass + copy), which on the H100 host ran at 5% of a pinned H2D copy. Here a block is kept
as raw KV bytes in a slot of a page-locked slab, so a load is one DMA per run of slots, and its
integrity check runs where the data lands (on the GPU, at device bandwidth).

What the design's verification invariant asks of a stored object holds per slot:
- key, model fingerprint (the namespace) and layout: the slot index is reached only through
  ``(namespace, key)`` in a tier whose slots all have the tier's layout;
- tokens: ``acquire`` compares the block's token ids with the requested ones;
- checksum: ``integrity_sums`` (row and column sums of the block's 64-bit words, the same 2D sum as
  the codec's checksum, without the BLAKE2b fold) is computed when a block is stored and compared
  with the same sums of the copy the reader received; a mismatch is a counted miss and a delete.
No HMAC: the slab is this process's own memory, which nobody else can write.

Namespaces: the tier serves only its current namespace (the model fingerprint), like the others.
Slots are allocated in chunks on demand, so a large capacity costs nothing until it is used.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch

from kvtier.cache.codec import (
    CodecConfig,
    CorruptObjectError,
    decode_block,
    encode_block,
    header_length,
    integrity_sums,
    integrity_sums_width,
    read_header,
)
from kvtier.cache.keys import BlockKey, KVLayout, check_key, check_namespace, tokens_to_bytes
from kvtier.cache.policy import make_policy
from kvtier.cache.tiers.base import LiveStats, StoredObject, Tier, TierStats
from kvtier.cache.tiers.loading import BlockIO
from kvtier.cache.writes import slot_runs
from kvtier.model.kernels import triton_installed

_Entry = tuple[str, BlockKey]
CHUNK_BYTES = 256 << 20  # slab chunk (on CUDA all are made at start-up: _allocate_all)


class DeviceCopy:
    """Acquired slots being copied to the GPU by ``HostTier.start_load_to_device``, with the
    verdict of their integrity check on its way to page-locked memory."""

    def __init__(self, tier: HostTier, keys: list[BlockKey], slots: list[int], verdict: torch.Tensor) -> None:
        self.tier = tier
        self.keys = keys
        self.slots = slots
        self.verdict = verdict
        self.count = len(slots)

    def finish(self, io: BlockIO) -> int:
        """Once the stream the copy was queued on has passed it: release the slots, reject the
        blocks whose check failed; returns how many leading blocks arrived intact."""
        self.tier.release(self.slots)
        return leading_intact(self.tier, self.keys, self.verdict.tolist(), io)


def leading_intact(tier: Tier, keys: Sequence[BlockKey], intact: list[bool], io: BlockIO) -> int:
    """Reject each block whose integrity check failed; how many leading blocks passed."""
    for key, ok in zip(keys, intact, strict=False):
        if not ok:
            io.reject(tier, key, CorruptObjectError("checksum: the block's integrity sums differ"))
    return intact.index(False) if False in intact else len(intact)


class HostTier(LiveStats, Tier):
    """Tier of raw KV blocks in host memory; ``pin_memory`` page-locks the slab (on CUDA)."""

    name = "host"
    raw_blocks = True

    def __init__(
        self,
        layout: KVLayout,
        namespace: str,
        capacity_bytes: int,
        policy: str = "lru",
        *,
        pin_memory: bool = False,
        expected_entries: int | None = None,
        seed: int = 0,
    ) -> None:
        """``expected_entries`` sizes the ghost lists / queues of adaptive policies (s3fifo, arc);
        None lets the policy choose (the slot count)."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        block_bytes = layout.bytes_per_block
        if block_bytes % 8:
            raise ValueError(f"a host-tier block must be a whole number of 8-byte words, got {block_bytes}")
        self.layout = layout
        self.block_bytes = block_bytes
        check_namespace(namespace)
        self.pin_memory = pin_memory
        self._namespace = namespace
        self._capacity = int(capacity_bytes)
        self._num_slots = self._capacity // block_bytes
        self._chunk_slots = max(1, CHUNK_BYTES // block_bytes)
        self._chunks: list[torch.Tensor] = []  # [chunk_slots, block_bytes] uint8
        self._chunk_sums: list[torch.Tensor] = []  # [chunk_slots, S] int64
        self._next_slot = 0  # slots below this were allocated once
        self._free: list[int] = []
        self._slot_of: dict[_Entry, int] = {}
        self._tokens: dict[int, tuple[int, ...]] = {}  # slot -> the block's token ids
        self._pins: dict[int, int] = {}  # slot -> readers copying out of it
        self._retired: set[int] = set()  # slots removed while pinned: freed on release
        self._copying: dict[int, torch.cuda.Event] = {}  # slot -> its device copy (store_from_device)
        self._policy = make_policy(policy, expected_entries or max(1, self._num_slots), seed)
        self._lock = threading.Lock()
        self._stats = TierStats()
        self._stats.extra["dropped"] = 0.0  # stores that found no slot (capacity below one block)
        if pin_memory:
            self._allocate_all()

    # -- properties -----------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def where(self) -> str:
        return "host memory of this process"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return len(self._slot_of) * self.block_bytes

    def set_namespace(self, namespace: str) -> None:
        """Serve ``namespace`` from now on; blocks of the previous one are kept but never served."""
        check_namespace(namespace)
        with self._lock:
            self._namespace = namespace

    # -- the block interface the hierarchy loads through -------------------------------------------

    def store(
        self, key: BlockKey, tokens: Sequence[int], kv: torch.Tensor, sums: torch.Tensor | None = None
    ) -> None:
        """Keep one block (a CPU tensor of the layout's shape and dtype) under ``key``. ``sums``: its
        ``integrity_sums`` when the writer computed them where the block came from (the GPU);
        otherwise they are computed here."""
        check_key(key)
        t0 = time.perf_counter()
        dtype = getattr(torch, self.layout.dtype)
        if tuple(kv.shape) != self.layout.block_shape or kv.dtype != dtype:
            raise ValueError(
                f"kv has shape {tuple(kv.shape)} and dtype {kv.dtype}; "
                f"the layout wants {self.layout.block_shape} and {dtype}"
            )
        data = kv.detach().contiguous().reshape(-1).view(torch.uint8)
        tokens_to_bytes(tokens)  # raises for ids that are not int32, like every tier's codec
        token_ids = tuple(int(t) for t in tokens)
        with self._lock:
            entry = (self._namespace, key)
            self._stats.puts += 1
            self._remove(entry)
            slot = self._take_slot()
            if slot is None:
                self._stats.extra["dropped"] += 1
                return
            # Filled under the lock: the slot is unreachable until indexed, and no reader can pin
            # it before then; the copy is a memcpy of one block.
            event = self._copying.pop(slot, None)
            if event is not None:  # the slot's previous block may still be arriving
                event.synchronize()
            row = self._row(slot)
            row.copy_(data)
            self._sums_row(slot).copy_(integrity_sums(row.unsqueeze(0))[0] if sums is None else sums)
            self._slot_of[entry] = slot
            self._tokens[slot] = token_ids
            self._policy.insert(entry)
            self._stats.bytes_written += self.block_bytes
            self._stats.write_seconds += time.perf_counter() - t0

    @property
    def takes_device_blocks(self) -> bool:
        """Blocks can be copied into the slab straight from the device (``store_from_device``):
        the slab is page-locked, so the copy is a DMA that no thread of this process waits on."""
        return self.pin_memory

    def store_from_device(
        self,
        keys: Sequence[BlockKey],
        tokens: Sequence[Sequence[int]],
        blocks: torch.Tensor,
        sums: torch.Tensor,
        stream: torch.cuda.Stream,
    ) -> int:
        """Keep the leading blocks of ``blocks`` (``[n, *block_shape]`` or their bytes, on the GPU)
        with their ``integrity_sums``, copied into their slots on ``stream``, one DMA per run of
        slots. They are indexed at once: a load orders its copy after theirs on the GPU (each slot
        remembers its copy's event), a CPU read waits for it. Returns how many found a slot.

        Why: through the write queue each block took a staging slot, a writer thread and a 2 MiB
        copy under the interpreter lock that the engine thread needs to launch its steps; on the
        H200's longer chat those writes cost the engine's prefill steps ~2x their launch time."""
        n = len(keys)
        data = blocks.reshape(n, -1).view(torch.uint8)
        token_ids = [tuple(int(t) for t in toks) for toks in tokens]
        t0 = time.perf_counter()
        with self._lock:
            ns = self._namespace
            slots: list[int] = []
            for key in keys:
                self._remove((ns, key))
                slot = self._take_slot()
                if slot is None:
                    self._stats.extra["dropped"] += len(keys) - len(slots)
                    break
                slots.append(slot)
            # Launched under the lock, before the slots are indexed: a reader can only find a
            # slot whose copy's event is already recorded.
            done = torch.cuda.Event()
            with torch.cuda.stream(stream):
                for i, chunk, first, run in self._runs(slots):
                    self._chunks[chunk][first : first + run].copy_(data[i : i + run], non_blocking=True)
                    self._chunk_sums[chunk][first : first + run].copy_(sums[i : i + run], non_blocking=True)
                done.record(stream)
            for key, toks, slot in zip(keys, token_ids, slots, strict=False):
                entry = (ns, key)
                self._slot_of[entry] = slot
                self._tokens[slot] = toks
                self._copying[slot] = done
                self._policy.insert(entry)
            self._stats.puts += len(slots)
            self._stats.bytes_written += len(slots) * self.block_bytes
            self._stats.write_seconds += time.perf_counter() - t0
        return len(slots)

    def _copies_into(self, slots: Sequence[int]) -> list[torch.cuda.Event]:
        """The events of the device copies still filling acquired ``slots`` (finished ones are
        forgotten)."""
        if not self._copying:
            return []
        pending: dict[int, tuple[torch.cuda.Event, bool]] = {}  # one query per batch's event
        with self._lock:
            for slot in slots:
                event = self._copying.get(slot)
                if event is None:
                    continue
                if id(event) not in pending:
                    pending[id(event)] = (event, not event.query())
                if not pending[id(event)][1]:
                    del self._copying[slot]
        return [event for event, running in pending.values() if running]

    def acquire(self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]]) -> list[int]:
        """Slots of the leading ``keys`` held with exactly these ``tokens``, pinned against reuse
        until ``release``. A held key with other tokens (a hash collision) is a corrupt miss."""
        with self._lock:
            stats = self._stats
            stats.lookups += len(keys)
            ns = self._namespace
            slots: list[int] = []
            for key, toks in zip(keys, tokens, strict=True):
                entry = (ns, key)
                slot = self._slot_of.get(entry)
                if slot is None:
                    break
                if self._tokens[slot] != tuple(toks):
                    stats.corrupt += 1
                    self._remove(entry)
                    break
                self._pins[slot] = self._pins.get(slot, 0) + 1
                self._policy.access(entry)
                slots.append(slot)
            stats.hits += len(slots)
            stats.misses += len(keys) - len(slots)
            stats.bytes_read += len(slots) * self.block_bytes
            return slots

    def copy_out(self, slots: Sequence[int], out: torch.Tensor, sums_out: torch.Tensor | None = None) -> None:
        """Copy acquired slots into ``out`` (``[len(slots), block_bytes]`` uint8 on any device), and
        their recorded ``integrity_sums`` into ``sums_out`` when given: one copy of each per run of
        consecutive slots, asynchronous from pinned memory to a GPU."""
        non_blocking = self.pin_memory and out.device.type == "cuda"
        for event in self._copies_into(slots):  # blocks still arriving from the device
            if non_blocking:
                torch.cuda.current_stream(out.device).wait_event(event)
            else:
                event.synchronize()
        for i, chunk, first, run in self._runs(slots):
            out[i : i + run].copy_(self._chunks[chunk][first : first + run], non_blocking=non_blocking)
        if sums_out is not None:
            self._copy_sums(slots, sums_out)

    def _copy_sums(self, slots: Sequence[int], sums_out: torch.Tensor) -> None:
        """The recorded ``integrity_sums`` of acquired slots into ``sums_out`` (any device): one copy
        per run of consecutive slots, asynchronous from pinned memory to a GPU."""
        non_blocking = self.pin_memory and sums_out.device.type == "cuda"
        for i, chunk, first, run in self._runs(slots):
            sums = self._chunk_sums[chunk][first : first + run]
            sums_out[i : i + run].copy_(sums, non_blocking=non_blocking)

    def expected_sums(self, slots: Sequence[int]) -> torch.Tensor:
        """The ``integrity_sums`` recorded when each acquired slot was stored (CPU)."""
        out = torch.empty((len(slots), self._sums_width()), dtype=torch.int64)
        for i, chunk, first, run in self._runs(slots):
            out[i : i + run].copy_(self._chunk_sums[chunk][first : first + run])
        return out

    def _runs(self, slots: Sequence[int]) -> Iterator[tuple[int, int, int, int]]:
        """(index into ``slots``, chunk, first row in it, length) of each run of consecutive slots
        within one chunk: what one copy can move (the write queue's ``slot_runs``)."""
        for i, start, run in slot_runs(slots, self._chunk_slots):
            chunk, first = divmod(start, self._chunk_slots)
            yield i, chunk, first, run

    def release(self, slots: Sequence[int]) -> None:
        """The reader's copies are complete: slots removed meanwhile can be reused."""
        with self._lock:
            for slot in slots:
                left = self._pins[slot] - 1
                if left:
                    self._pins[slot] = left
                    continue
                del self._pins[slot]
                if slot in self._retired:
                    self._retired.discard(slot)
                    self._free.append(slot)

    def read_block(self, slot: int) -> torch.Tensor:
        """An acquired slot's KV as a new CPU tensor of the layout's shape (tests, ``get``)."""
        dtype = getattr(torch, self.layout.dtype)
        for event in self._copies_into([slot]):
            event.synchronize()
        return self._row(slot).clone().view(dtype).reshape(self.layout.block_shape)

    # -- Tier protocol (encoded objects in and out; the hierarchy uses the block interface) ---------

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            self._stats.lookups += len(keys)
            ns = self._namespace
            n = 0
            for key in keys:
                if (ns, check_key(key)) not in self._slot_of:
                    break
                n += 1
            return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """Each held block encoded as a stored object (codec ``none``, no HMAC); None for a miss."""
        with self._lock:
            namespace = self._namespace  # the blocks' model, even if set_namespace runs meanwhile
        return [self._encoded(namespace, check_key(key), count=True) for key in keys]

    def _encoded(self, namespace: str, key: BlockKey, count: bool) -> bytes | None:
        """One held block as a stored object; ``count``: a read of the protocol (stats, policy)."""
        with self._lock:
            slot = self._slot_of.get((namespace, key))
            if count:
                self._stats.lookups += 1
                if slot is None:
                    self._stats.misses += 1
                else:
                    self._stats.hits += 1
                    self._policy.access((namespace, key))
            if slot is None:
                return None
            self._pins[slot] = self._pins.get(slot, 0) + 1
            tokens = list(self._tokens[slot])
        t0 = time.perf_counter()
        try:
            block = self.read_block(slot)
        finally:
            self.release([slot])
        data = encode_block(key, namespace, self.layout, tokens, block, CodecConfig())
        if count:
            with self._lock:
                self._stats.bytes_read += self.block_bytes
                self._stats.read_seconds += time.perf_counter() - t0
        return data

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        """Store encoded objects (any codec; HMAC objects are refused: this tier has no secret).
        An object that fails verification raises ``CorruptObjectError``: it came from the caller."""
        for key, data in items:
            check_key(key)
            tokens = read_header(data).tokens
            kv = decode_block(data, key=key, fingerprint=self._namespace, layout=self.layout)
            self.store(key, tokens, kv)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            ns = self._namespace
            for key in keys:
                self._remove((ns, key))

    def keys(self) -> list[BlockKey]:
        with self._lock:
            ns = self._namespace
            return [key for (n, key) in self._slot_of if n == ns]

    def __len__(self) -> int:
        with self._lock:
            ns = self._namespace
            return sum(1 for (n, _) in self._slot_of if n == ns)

    def clear(self) -> None:
        """Remove every block of the current namespace."""
        with self._lock:
            ns = self._namespace
            for entry in [e for e in self._slot_of if e[0] == ns]:
                self._remove(entry)

    def close(self) -> None:
        """Drop everything and give the slab back."""
        with self._lock:
            for entry in list(self._slot_of):
                self._remove(entry)
            for event in self._copying.values():  # no DMA may write into a slab given back
                event.synchronize()
            self._copying.clear()
            self._chunks.clear()
            self._chunk_sums.clear()
            self._pins.clear()
            self._free.clear()
            self._retired.clear()
            self._next_slot = 0

    # -- maintenance ----------------------------------------------------------------------------

    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        with self._lock:
            entries = [e for e in self._slot_of if namespace is None or e[0] == namespace]
        # the size of what get returns: an uncompressed object of the block's model
        return [
            StoredObject(ns, key, header_length(ns, self.layout, False) + self.block_bytes)
            for ns, key in entries
        ]

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        found = [self._encoded(o.namespace, o.key, count=False) for o in objects]
        return [None if data is None else data[:nbytes] for data in found]

    def drop_namespaces(self, keep: str | None) -> int:
        with self._lock:
            doomed = [e for e in self._slot_of if e[0] != keep]
            for entry in doomed:
                self._remove(entry)
            return len(doomed)

    # -- the hierarchy's roads: raw blocks, checked where they land -------------------------------

    def load_into(
        self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor, io: BlockIO
    ) -> int:
        """Copy the leading held blocks straight into ``out`` (one DMA per run of slots from the
        pinned slab) and compare their ``integrity_sums`` where they landed."""
        slots = self.acquire(keys, tokens)
        if not slots:
            return 0
        try:
            intact = self._copy_checked(slots, out).tolist()  # waits for the copies
        finally:
            self.release(slots)
        return leading_intact(self, keys, intact, io)

    def _copy_checked(self, slots: list[int], out: torch.Tensor) -> torch.Tensor:
        """Queue the acquired ``slots``' copies into ``out`` and the check of their integrity sums
        where they landed; returns the per-block verdict (bool, on ``out``'s device)."""
        dst = out[: len(slots)].reshape(len(slots), -1).view(torch.uint8)
        # the recorded sums travel with the blocks, run by run (from pinned memory on CUDA): a
        # gather of them on the CPU was a dozen more tensor ops per load, each of which gives up
        # and retakes the interpreter lock that the writer threads compete for
        expected = torch.empty((len(slots), self._sums_width()), dtype=torch.int64, device=dst.device)
        self.copy_out(slots, dst, expected)
        return (integrity_sums(dst) == expected).all(dim=1)

    def start_load_to_device(
        self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor
    ) -> DeviceCopy | None:
        """``load_into`` without a wait: the copies into ``out`` (on the GPU) and the integrity
        check are queued on the current stream, the check's verdict lands in page-locked memory.
        The slots stay pinned until ``DeviceCopy.finish`` (after the stream has passed them).
        None: the first key is not held."""
        slots = self.acquire(keys, tokens)
        if not slots:
            return None
        try:
            verdict = torch.empty(len(slots), dtype=torch.bool, pin_memory=True)
            verdict.copy_(self._copy_checked(slots, out), non_blocking=True)
        except BaseException:  # no copy may still read the slots when they are let go
            with contextlib.suppress(Exception):
                torch.cuda.current_stream(out.device).synchronize()
            self.release(slots)
            raise
        return DeviceCopy(self, list(keys[: len(slots)]), slots, verdict)

    @property
    def takes_layered_loads(self) -> bool:
        """Whether ``start_layered_loads`` can copy this tier's blocks into a pool layer by layer:
        the slab is page-locked (the GPU reads it) and a layer's K and V pieces of a block are
        whole rows of its ``integrity_sums`` (so they are checked a layer at a time). The copy is a
        Triton kernel: without triton (a CPU install) loads copy whole blocks."""
        if not self.pin_memory or not triton_installed():
            return False
        from kvtier.cache.tiers.host_gather import layer_rows_align  # imports triton

        return layer_rows_align(self.block_bytes // (2 * self.layout.num_layers))

    def warm_layered_loads(self, pool: torch.Tensor) -> None:
        """Run a layered load's every launch once now, not in the first load's TTFT: the copy
        kernel's compile (~0.3 s on the H200), and the first use of the check's kernels and of
        the page-locked buffers. Slot 0 into block 0 of ``pool``, which holds nothing yet (the
        verdict is not read)."""
        if not self.takes_layered_loads or not self._chunks:
            return
        events = [torch.cuda.Event() for _ in range(self.layout.num_layers)]
        self._queue_layered_copies([0], [0], pool, events)
        torch.cuda.synchronize(pool.device)

    def start_layered_loads(
        self,
        loads: Sequence[tuple[list[BlockKey], list[int], list[int]]],
        pool: torch.Tensor,
        layer_done: Sequence[torch.cuda.Event],
        started: torch.cuda.Event | None = None,
    ) -> list[DeviceCopy]:
        """Queue on the current stream the copies of acquired slots into ``pool`` (``[L, 2,
        num_blocks, ...]``), one launch per layer for all ``loads`` (keys, slots, pool block ids
        each), recording ``layer_done[i]`` after layer i; then the comparison of the blocks'
        ``integrity_sums`` (computed by the copy) with the recorded ones, whose verdict lands in
        page-locked memory. ``started`` is recorded once the copies may start (after the blocks
        still arriving from the device are in): the copy's time is timed from it. The slots stay
        pinned until each ``DeviceCopy.finish``."""
        slots = [s for _, load_slots, _ in loads for s in load_slots]
        stream = torch.cuda.current_stream(pool.device)
        for event in self._copies_into(slots):  # blocks still arriving from the device
            stream.wait_event(event)
        if started is not None:
            started.record(stream)
        verdict = self._queue_layered_copies(slots, [b for _, _, ids in loads for b in ids], pool, layer_done)
        copies, start = [], 0
        for keys, load_slots, _ in loads:
            copies.append(DeviceCopy(self, keys, load_slots, verdict[start : start + len(load_slots)]))
            start += len(load_slots)
        return copies

    def _queue_layered_copies(
        self,
        slots: list[int],
        block_ids: list[int],
        pool: torch.Tensor,
        layer_done: Sequence[torch.cuda.Event],
    ) -> torch.Tensor:
        """The launches of ``start_layered_loads`` for ``slots`` into ``block_ids``; returns the
        page-locked verdict, one bool a slot, filled once the current stream gets there."""
        from kvtier.cache.tiers.host_gather import LayerGather

        stream = torch.cuda.current_stream(pool.device)
        n = len(slots)
        rows = [divmod(s, self._chunk_slots) for s in slots]
        table = [self._chunks[c].data_ptr() + r * self.block_bytes for c, r in rows]
        # the pool ids from an even index: 16-byte aligned, as Triton specialises its pointers
        width = n + n % 2
        table += [0] * (width - n) + block_ids
        on_device = torch.tensor(table, dtype=torch.int64, pin_memory=True).to(pool.device, non_blocking=True)
        gather = LayerGather(pool, on_device[:n], on_device[width:])
        for layer, done in enumerate(layer_done):
            gather.copy_layer(layer)
            done.record(stream)
        expected = torch.empty((n, self._sums_width()), dtype=torch.int64, device=pool.device)
        self._copy_sums(slots, expected)
        verdict = torch.empty(n, dtype=torch.bool, pin_memory=True)
        verdict.copy_((gather.sums() == expected).all(dim=1), non_blocking=True)
        return verdict

    def holds(self, key: BlockKey) -> bool:
        """An indexed block (a dict read, safe without the lock); refreshed in the policy when the
        lock is free at once (a writer may hold it for a block's copy: the engine never waits)."""
        entry = (self._namespace, key)
        if entry not in self._slot_of:
            return False
        if self._lock.acquire(blocking=False):
            try:
                if entry in self._slot_of:
                    self._policy.access(entry)
            finally:
                self._lock.release()
        return True

    def put_block(
        self,
        key: BlockKey,
        tokens: Sequence[int],
        kv: torch.Tensor,
        sums: torch.Tensor | None,
        encode: Callable[[], bytes],
    ) -> None:
        self.store(key, tokens, kv, sums)

    # -- internals (called with the lock held) --------------------------------------------------

    def _sums_width(self) -> int:
        return integrity_sums_width(self.block_bytes)

    def _row(self, slot: int) -> torch.Tensor:
        chunk, row = divmod(slot, self._chunk_slots)
        return self._chunks[chunk][row]

    def _sums_row(self, slot: int) -> torch.Tensor:
        chunk, row = divmod(slot, self._chunk_slots)
        return self._chunk_sums[chunk][row]

    def _remove(self, entry: _Entry) -> None:
        slot = self._slot_of.pop(entry, None)
        if slot is None:
            return
        self._policy.remove(entry)
        del self._tokens[slot]
        if slot in self._pins:
            self._retired.add(slot)  # a reader is still copying out of it
        else:
            self._free.append(slot)

    def _take_slot(self) -> int | None:
        """A free slot: a recycled one, a new one, or the slot of the policy's first victim that no
        reader is copying out of. Pinned victims go back to the policy: evicting them frees nothing
        until their load ends, and under LRU they are the hottest blocks (the ones being loaded)."""
        if self._free:
            return self._free.pop()
        if self._next_slot < self._num_slots:
            return self._new_slot()
        skipped: list[_Entry] = []
        try:
            while (victim := cast(_Entry | None, self._policy.evict())) is not None:
                if self._slot_of[victim] in self._pins:
                    skipped.append(victim)
                    continue
                self._stats.evictions += 1
                self._remove(victim)  # the policy forgot it already: remove is a no-op there
                return self._free.pop()
            return None  # every slot is being read: the store is dropped
        finally:
            for entry in skipped:
                self._policy.insert(entry)

    def _allocate_all(self) -> None:
        """Page-lock the whole slab now, at start-up, not chunk by chunk while the engine runs. On
        the H200 page-locking runs at ~1.5 GB/s (64 MiB in 43 ms), and kernel launches from another
        thread meanwhile took 640 us instead of 10 (``cudaHostAlloc`` holds the driver): the 8B
        chat benchmark's host tier made its 256 MiB chunks mid-run, and the run took 7.5 s against
        5.0 s with the slab made up front (docs/benchmarks.md, issue 12). So a 4 GiB tier costs
        ~3 s of start-up instead, as vLLM's page-locked swap space does. Pageable memory (the CPU)
        stays lazy: its untouched pages cost nothing."""
        while len(self._chunks) * self._chunk_slots < self._num_slots:
            self._add_chunk(len(self._chunks) * self._chunk_slots)

    def _add_chunk(self, first_slot: int) -> None:
        rows = min(self._chunk_slots, self._num_slots - first_slot)
        self._chunks.append(
            torch.empty((rows, self.block_bytes), dtype=torch.uint8, pin_memory=self.pin_memory)
        )
        sums = torch.empty((rows, self._sums_width()), dtype=torch.int64, pin_memory=self.pin_memory)
        self._chunk_sums.append(sums)

    def _new_slot(self) -> int:
        slot = self._next_slot
        if slot // self._chunk_slots == len(self._chunks):
            self._add_chunk(slot)
        self._next_slot += 1
        return slot
