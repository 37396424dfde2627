"""Lookup across tiers, the load-vs-recompute decision, promotion, write policy and async I/O.

The device pool is the top of the hierarchy and is not a Tier: the engine matches it first. For the
keys after the device hit, ``plan`` asks the tiers (cheapest first) for the longest consecutive run,
tier by tier, then keeps the leading segments whose predicted load time beats recomputing them.
``load`` runs on the I/O thread: it fetches, verifies (codec: key, fingerprint, layout, tokens,
checksum, HMAC) and returns the leading blocks that passed; anything that fails a check is a miss,
counted and deleted. Writes go through a bounded write queue with its own threads (``writes.py``),
so the engine loop never waits on a tier it did not choose to wait on. Each tier has a write policy:
write-through (stored as soon as the block is full: the default for the shared and persistent
tiers, so another process sees it a moment later and a crash loses nothing written), write-back
(stored when the device pool evicts it: the default for the host tier, which dies with the
process) or selective (write-back after N device hits). Below the device pool a block goes to every
tier that wants it (an inclusive hierarchy, as LMCache's storage manager does): tiers evict by
their own policies, a later lookup takes the cheapest copy, and no demotion ever has to read a
block back from a slower tier to pass it on.

Loads land on the engine's device, through each tier's ``load_into`` (the protocol's road, with a
plain default): the host tier copies raw blocks straight from its pinned slab to the device and
checks them there (``integrity_sums``), the disk tier reads uncompressed objects into place, and the
others' objects are verified by the codec into a pinned staging buffer, then copied to the device.
The hierarchy never asks which class a tier is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvtier.cache.codec import CodecConfig, CorruptObjectError
from kvtier.cache.file_writer import WriterSetup
from kvtier.cache.keys import BlockKey, KVLayout
from kvtier.cache.tiers.base import PendingDeviceCopy, Tier
from kvtier.cache.tiers.loading import BlockIO, EncodedBlock
from kvtier.cache.writes import FileWrites, WriteQueue

log = logging.getLogger(__name__)

WRITE_POLICIES = ("auto", "write-back", "write-through", "selective")
DEFAULT_WRITE_QUEUE_BYTES = 1 << 30


def tier_write_policy(policy: str, tier: Tier) -> str:
    """``auto``: blocks reach the tiers that outlive the process (disk, Redis, memcached) as soon as
    they are full (write-through), so another process, or this one after a crash, finds them a
    moment later; the host tier (``raw_blocks``: this process's memory) takes evicted blocks only
    (write-back), since it dies with the process and only extends the device pool."""
    if policy != "auto":
        return policy
    return "write-back" if tier.raw_blocks else "write-through"


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


@dataclass
class StepCost:
    """What a model step costs: ``fixed_s`` (weights read, kernel launches) plus ``per_token_s`` per
    token, fitted by least squares with exponential forgetting over the steps the engine reports.

    Recomputing L tokens costs their tokens' share of the step that runs anyway, plus a whole step
    for each extra step their prefill needs. A single seconds-per-token figure (step time / tokens)
    charges the fixed part to every token: on a launch-bound GPU it made recompute look 10x dearer
    than it was, and the engine loaded from disk what it could have recomputed faster.
    """

    per_token_s: float
    fixed_s: float = 0.0
    samples: int = 0
    _n: float = 0.0
    _t: float = 0.0
    _nn: float = 0.0
    _nt: float = 0.0
    _fitted: bool = False

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        w = 1.0 / (self.samples + 1) if self.samples < STEP_WINDOW else 1.0 / STEP_WINDOW
        self.samples += 1
        self._n += w * (tokens - self._n)
        self._t += w * (seconds - self._t)
        self._nn += w * (tokens * tokens - self._nn)
        self._nt += w * (tokens * seconds - self._nt)
        if self.samples < MIN_STEP_SAMPLES:
            return
        var = self._nn - self._n * self._n
        # A window of decode steps alone (1-4 tokens each) has too little spread in size for a
        # slope: its fit is timing noise. Fit only when step sizes differ by a block or more.
        slope = (self._nt - self._n * self._t) / var if var >= MIN_TOKEN_SPREAD**2 else 0.0
        if slope > 0:
            self.per_token_s = slope
            self.fixed_s = max(0.0, self._t - slope * self._n)
            self._fitted = True
        elif not self._fitted:  # no spread in step sizes yet: no fixed part can be told apart
            self.per_token_s, self.fixed_s = self._t / self._n, 0.0
        # else keep the last fit: time / tokens would charge the fixed part to every token

    def recompute_s(self, tokens: int, step_tokens: int) -> float:
        extra_steps = max(0, -(-tokens // max(1, step_tokens)) - 1)
        return tokens * self.per_token_s + extra_steps * self.fixed_s


RECYCLED_BUFFERS = 4  # CPU load buffers kept for reuse (each as large as one load)...
RECYCLED_BYTES = 512 << 20  # ...and at most this much memory held by them
STEP_WINDOW = 64  # steps the fit remembers (the weight of older ones decays as (1 - 1/64)^age)
MIN_STEP_SAMPLES = 8  # steps observed before the fit replaces the seed
MIN_TOKEN_SPREAD = 16  # tokens: the standard deviation of step sizes a slope is fitted from

# Seeds until the engine has measured its own numbers (replaced by real transfers and prefills).
SEED_COSTS = {
    "host": TierCost(20e-6, 5e9),
    "disk": TierCost(200e-6, 1e9),
    "redis": TierCost(1e-3, 3e8),
    "memcached": TierCost(1e-3, 3e8),
}


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
    loads_on_device: int = 0  # loads queued on a CUDA stream by the caller (``load_on_device``)
    loads_layered: int = 0  # loads copied layer by layer under a step's compute (``start_layered``)
    layered_copy_seconds: float = 0.0  # device time of their copies and checks (CUDA events)
    layered_copy_bytes: int = 0  # KV bytes those copies moved
    blocks_written: int = 0
    writes_skipped: int = 0  # blocks not staged: every tier they were for held them already
    corrupt: int = 0
    write_errors: int = 0
    predicted_load_s: float = 0.0
    actual_load_s: float = 0.0
    per_tier_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class PendingLoad(Protocol):
    """A load on its way: an I/O thread's future or a ``DeviceLoad``."""

    def done(self) -> bool: ...

    def result(self) -> torch.Tensor: ...

    def cancel(self) -> bool: ...


class DeviceLoad:
    """A load queued on a CUDA stream by the calling thread (``KVHierarchy.load_on_device``), with
    the ``done`` / ``result`` / ``cancel`` of the I/O threads' futures: the engine polls it at its
    next step instead of waiting for it."""

    def __init__(
        self,
        hierarchy: KVHierarchy,
        plan: LoadPlan,
        out: torch.Tensor,
        copies: list[tuple[Segment, PendingDeviceCopy]],
        queued: torch.cuda.Event | None,
    ) -> None:
        self._hierarchy = hierarchy
        self._plan = plan
        self._out = out
        self._copies = copies  # (segment, its copy), in plan order
        self._queued = queued  # recorded after the copies and their checks; None: nothing queued
        self._started = time.perf_counter()
        self._finished: torch.Tensor | None = None if queued is not None else out[:0]
        self.abandoned = False

    @property
    def finished(self) -> bool:
        return self._finished is not None

    def done(self) -> bool:
        return self._finished is not None or (self._queued is not None and self._queued.query())

    def cancel(self) -> bool:
        """Its request went away: the hierarchy releases the slots once the copy has run."""
        self.abandoned = True
        return True

    def result(self) -> torch.Tensor:
        """The leading blocks that arrived intact (waits for the copies if they are still running)."""
        if self._finished is None:
            self._finished = self._finish(counted=True)
        return self._finished

    def _finish(self, counted: bool) -> torch.Tensor:
        """Release every copy's slots; ``counted``: the blocks are used, count them as loaded."""
        if self._queued is not None:
            self._queued.synchronize()
        h = self._hierarchy
        n = 0
        whole = True  # every block so far arrived: the next segment's continue the prefix
        for segment, copy in self._copies:
            good = copy.finish(h.io[segment.tier])
            if whole:
                n += good
                whole = good == segment.count
                if counted:
                    h.stats.per_tier_loaded[h.tiers[segment.tier].name] += good
        self._copies = []
        if counted:
            h.stats.blocks_loaded += n
            h.stats.predicted_load_s += self._plan.predicted_load_s
            h.stats.actual_load_s += time.perf_counter() - self._started
        self._finished = self._out[:n]
        return self._finished


class LayeredLoad:
    """A load from a tier that copies layer by layer (``KVHierarchy.reserve_layered``): its slots
    are acquired when its request is admitted, its copies are queued with the step that first runs
    the request (``start_layered``), whose model waits for each layer's copy before that layer,
    and its verdict is read when that step is collected (``finish``): the blocks are the request's
    only if every one arrived intact (the engine recomputes otherwise)."""

    def __init__(self, hierarchy: KVHierarchy, tier: int, keys: list[BlockKey], slots: list[int]) -> None:
        self._hierarchy = hierarchy
        self.tier = tier
        self.keys = keys
        self.slots = slots
        self.count = len(slots)
        self.block_ids: list[int] = []  # the pool blocks it fills (set by the caller)
        self.copy: PendingDeviceCopy | None = None  # queued (start_layered)
        self.done: torch.cuda.Event | None = None  # recorded after the copies and their check
        # (start, done) timing events of the launch it was queued in; on its first load only
        self.timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._settled = False

    def cancel(self) -> None:
        """Its request was not admitted after all: let the slots go (nothing was queued)."""
        if not self._settled and self.copy is None:
            self._settled = True
            self._hierarchy.tiers[self.tier].release(self.slots)

    def finish(self) -> int:
        """Wait for the copies, let the slots go, reject the blocks that failed their check;
        returns how many leading blocks arrived intact (0 when nothing was queued)."""
        if self._settled:
            return 0
        self._settled = True
        h = self._hierarchy
        if self.copy is None:  # its launch failed before the copies were queued
            h.tiers[self.tier].release(self.slots)
            return 0
        assert self.done is not None
        try:
            self.done.synchronize()
        except BaseException:  # the device failed, or the wait was interrupted: the blocks are not
            h.tiers[self.tier].release(self.slots)  # the request's (it fails or is aborted)
            raise
        good = self.copy.finish(h.io[self.tier])
        if self.timing is not None:
            h.stats.layered_copy_seconds += self.timing[0].elapsed_time(self.timing[1]) / 1e3
        h.stats.layered_copy_bytes += self.count * h.layout.bytes_per_block
        h.stats.blocks_loaded += good
        h.stats.per_tier_loaded[h.tiers[self.tier].name] += good
        return good


class KVHierarchy:
    def __init__(
        self,
        tiers: Sequence[Tier],
        codecs: Sequence[CodecConfig | None],
        layout: KVLayout,
        fingerprint: str,
        write_policy: str = "auto",
        selective_hits: int = 2,
        secret: bytes | None = None,
        prefill_seconds_per_token: float = 1e-3,
        io_threads: int = 2,
        device: torch.device | str = "cpu",
        step_tokens: int = 2048,
        always_load: bool = False,
        write_queue_bytes: int = DEFAULT_WRITE_QUEUE_BYTES,
        load_at_once_s: float = 0.0,
        file_writer: bool = False,
        direct_host_writes: bool = True,
        device_loads: bool = True,
        layered_loads: bool = True,
    ) -> None:
        """``codecs``: one per tier, None for a tier of raw blocks (``raw_blocks``: the host tier).
        ``device``: where loads land (the engine's); on CUDA the staging buffer is page-locked, so
        the copy to the GPU is a real async DMA. ``step_tokens``: the scheduler's token budget per
        step. ``always_load``: load every hit, whatever the cost model predicts (deterministic;
        what LMCache does). ``write_policy``: auto (write-through to the tiers that outlive the
        process, write-back to the host tier), or one policy for every tier. ``write_queue_bytes``:
        blocks waiting to be written, at most (staging memory; full: the oldest pending writes
        are dropped). ``load_at_once_s``: a load from the raw-block tiers predicted to take at most
        this long is one the caller should run at once (``loads_at_once``): on the I/O threads it
        cost its request a whole step (~35-50 ms of the 8B's chat steps on an H200) for a copy of
        ~1 ms; a longer one would stall the caller's batch. 0: never. ``file_writer``: the writes
        of the tier whose objects are files (the disk's) are encoded and written by a process of
        their own (``file_writer.py``), off this process's interpreter lock. ``direct_host_writes``:
        on CUDA, blocks for the page-locked host tier are copied into its slots straight from the
        pool (``Tier.store_from_device``) instead of through the write queue's threads.
        ``device_loads``: on CUDA, loads from such page-locked tiers that are not run at once are
        queued on the device by the caller (``load_on_device``) instead of the I/O threads.
        ``layered_loads``: on CUDA, a load from a tier that ``takes_layered_loads`` is copied layer
        by layer under the compute of the step that runs its request (``reserve_layered``)."""
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown write policy {write_policy!r}; supported: {', '.join(WRITE_POLICIES)}")
        if write_queue_bytes < layout.bytes_per_block:
            raise ValueError(
                f"write_queue_bytes={write_queue_bytes} holds no block: "
                f"one takes {layout.bytes_per_block} bytes"
            )
        if len(codecs) != len(tiers):
            raise ValueError("one codec per tier")
        for tier, codec in zip(tiers, codecs, strict=True):
            if (codec is None) != tier.raw_blocks:
                raise ValueError(f"{tier.name} tier: every tier has a codec but those of raw blocks (None)")
        self.tiers = list(tiers)
        self.codecs = list(codecs)
        self.layout = layout
        self.fingerprint = fingerprint
        self.write_policy = write_policy
        self.write_policies = [tier_write_policy(write_policy, t) for t in self.tiers]
        self.commit_tiers = tuple(i for i, p in enumerate(self.write_policies) if p == "write-through")
        self.selective_hits = selective_hits
        self.secret = secret
        self.io = [BlockIO(layout, fingerprint, codec, secret, self._reject) for codec in self.codecs]
        self.costs = [TierCost(**vars(SEED_COSTS.get(t.name, SEED_COSTS["disk"]))) for t in tiers]
        self.step_cost = StepCost(prefill_seconds_per_token)
        self.step_tokens = step_tokens
        self.always_load = always_load
        self.load_at_once_s = load_at_once_s
        self.device_loads = device_loads
        self.layered_loads = layered_loads
        self._layered_stream: torch.cuda.Stream | None = None  # made at the first layered load
        self._device_loads: list[DeviceLoad] = []  # queued on the device, not finished when last reaped
        self._device_load_stream: torch.cuda.Stream | None = None  # made at the first device load
        self._raw_copy_bps = 0.0  # measured host-to-device copy rate (seed_bandwidth); 0: unknown
        self.device = torch.device(device)
        self.stats = HierarchyStats()
        self._hits: dict[BlockKey, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvtier-io")
        self.writes = WriteQueue(
            layout,
            write_queue_bytes,
            self.device,
            self._write,
            threads=io_threads,
            with_sums=self.wants_sums,
            # only the host tier stores the sums: a batch of write-through blocks for the disk
            # skips their kernels and copies
            sums_tiers=[i for i, t in enumerate(self.tiers) if t.raw_blocks],
            file_writes=self._file_writes() if file_writer else None,
        )
        # The tier that takes evicted blocks straight from the device (the page-locked host tier),
        # when there is one and the writes come from a GPU; -1: every write goes through the queue.
        self._direct_tier = -1
        if direct_host_writes and self.device.type == "cuda":
            self._direct_tier = next((i for i, t in enumerate(self.tiers) if t.takes_device_blocks), -1)
        self._thread_state = threading.local()
        self._free_buffers: list[torch.Tensor] = []  # CPU load outputs handed back by recycle()

    def _file_writes(self) -> FileWrites | None:
        """The first tier that takes files written elsewhere (``Tier.file_target``), if any."""
        for i, tier in enumerate(self.tiers):
            target = tier.file_target
            if target is not None:
                codec = self.codecs[i] or CodecConfig()
                setup = WriterSetup(self.layout, self.fingerprint, codec, self.secret, *target, slots=0)
                return FileWrites(i, setup, tier.commit_written)
        return None

    # -- cost model -------------------------------------------------------------------------------
    def seed_bandwidth(self, raw_blocks_bps: float) -> None:
        """Start the raw-block tiers' (host memory's) bandwidth from a measured copy instead of the
        fixed seed. The estimate only learns from loads it chose to make: from a seed far below the
        device's real copy rate (5 GB/s against 55 GB/s pinned on an H200) a long prefix looked
        dearer to load than to recompute, so it was never loaded and the seed was never corrected."""
        for i, tier in enumerate(self.tiers):
            if tier.raw_blocks and raw_blocks_bps > 0:
                self.costs[i].bandwidth_bps = raw_blocks_bps
        if raw_blocks_bps > 0:
            self._raw_copy_bps = raw_blocks_bps

    @property
    def prefill_seconds_per_token(self) -> float:
        """The marginal prefill cost of one token (the step cost's slope)."""
        return self.step_cost.per_token_s

    def observe_step(self, tokens: int, seconds: float) -> None:
        """The engine reports every model step: the recompute side of the decision."""
        self.step_cost.observe(tokens, seconds)

    # -- lookup and load -------------------------------------------------------------------------
    def plan(self, keys: Sequence[BlockKey]) -> LoadPlan:
        """Longest run of ``keys`` held below the device, cut where recomputing becomes cheaper."""
        segments = self._find_segments(keys)
        block_bytes = self.layout.bytes_per_block
        chosen: list[Segment] = []
        load_s = 0.0
        for seg in segments:
            seg_load = self.costs[seg.tier].predict(seg.count * block_bytes)
            tokens = (seg.start + seg.count) * self.layout.block_size
            if not self.always_load and load_s + seg_load >= self.step_cost.recompute_s(
                tokens, self.step_tokens
            ):
                break
            chosen.append(seg)
            load_s += seg_load
        if segments:
            if chosen:
                self.stats.load_decisions += 1
            else:
                self.stats.recompute_decisions += 1
        recompute_s = self.step_cost.recompute_s(
            sum(s.count for s in chosen) * self.layout.block_size, self.step_tokens
        )
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

    def loads_at_once(self, plan: LoadPlan) -> bool:
        """Whether the caller should run ``plan`` with ``load_now`` instead of ``load_async``: it
        reads only raw-block tiers (this process's memory) and its copy takes at most
        ``load_at_once_s`` at the measured copy rate (``seed_bandwidth``). Not at the learned rate:
        a load on an I/O thread measures its waits for the interpreter lock too (4 GB/s learned
        against 55 GB/s copied in the H200's chat run), and a plan judged by it would never be
        loaded at once, where it runs at the copy rate."""
        if not plan.segments or not all(self.tiers[s.tier].raw_blocks for s in plan.segments):
            return False
        nbytes = plan.num_blocks * self.layout.bytes_per_block
        copy_s = nbytes / self._raw_copy_bps if self._raw_copy_bps else plan.predicted_load_s
        return copy_s <= self.load_at_once_s

    def loads_on_device(self, plan: LoadPlan) -> bool:
        """Whether the caller should queue ``plan`` on the device (``load_on_device``) rather than
        hand it to the I/O threads: every segment is in memory the GPU copies from directly
        (``Tier.takes_device_blocks``: the page-locked host tier)."""
        return (
            self.device_loads
            and self.device.type == "cuda"
            and bool(plan.segments)
            and all(self.tiers[s.tier].takes_device_blocks for s in plan.segments)
        )

    def loads_layered(self, plan: LoadPlan) -> bool:
        """Whether the caller can load ``plan`` layer by layer under the compute of the step that
        runs its request (``reserve_layered``): one segment, from the start, of a tier that
        ``takes_layered_loads`` (the page-locked host tier), on CUDA."""
        return (
            self.layered_loads
            and self.device.type == "cuda"
            and len(plan.segments) == 1
            and plan.segments[0].start == 0
            and self.tiers[plan.segments[0].tier].takes_layered_loads
        )

    def reserve_layered(self, plan: LoadPlan, block_tokens: Sequence[Sequence[int]]) -> LayeredLoad | None:
        """Acquire the slots of a ``loads_layered`` plan's leading held blocks; None: none held."""
        segment = plan.segments[0]
        keys = plan.keys[: segment.count]
        slots = self.tiers[segment.tier].acquire(keys, block_tokens[: segment.count])
        if not slots:
            return None
        return LayeredLoad(self, segment.tier, list(keys[: len(slots)]), slots)

    def warm_layered(self, pool: torch.Tensor) -> None:
        """Before any request: compile the layered copies' kernel (``Tier.warm_layered_loads``),
        writing into ``pool``'s block 0, which must hold nothing yet."""
        if self.layered_loads and self.device.type == "cuda":
            for tier in self.tiers:
                if tier.takes_layered_loads:
                    tier.warm_layered_loads(pool)

    def start_layered(
        self, loads: Sequence[LayeredLoad], pool: torch.Tensor, layer_ready: Sequence[torch.cuda.Event]
    ) -> None:
        """Queue the copies of reserved ``loads`` (their ``block_ids`` set) into ``pool`` on the
        layered loads' stream, after everything the current stream has queued (the copies out of
        blocks this step's allocations evicted), one launch per layer for them all, recording
        ``layer_ready[i]`` after layer i: the model waits for event i before layer i."""
        if self._layered_stream is None:  # high priority: its copies hold up the step's layers
            self._layered_stream = torch.cuda.Stream(self.device, priority=-1)
        stream = self._layered_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        started = torch.cuda.Event(enable_timing=True)  # recorded after the waits for write-backs
        try:
            with torch.cuda.stream(stream):
                for tier in {load.tier for load in loads}:  # one tier in practice: the host's
                    mine = [load for load in loads if load.tier == tier]
                    jobs = [(load.keys, load.slots, load.block_ids) for load in mine]
                    copies = self.tiers[tier].start_layered_loads(jobs, pool, layer_ready, started)
                    for load, copy in zip(mine, copies, strict=True):
                        load.copy = copy
                done = torch.cuda.Event(enable_timing=True)
                done.record(stream)
        except BaseException:  # no copy may still run once the caller lets the slots go
            with contextlib.suppress(Exception):
                stream.synchronize()
            for load in loads:
                load.copy = None
            raise
        for load in loads:
            load.done = done
        loads[0].timing = (started, done)
        self.stats.loads_layered += len(loads)

    def load_on_device(self, plan: LoadPlan, block_tokens: Sequence[Sequence[int]]) -> DeviceLoad:
        """Queue the plan's copies and integrity checks on the device loads' own CUDA stream and
        return at once; the caller polls ``done()`` at its next step. Why: through an I/O thread a
        long host load (290 blocks, 580 MB on the 8B's long chat) took 33 ms of that thread's time
        in the engine's interpreter lock, then waited for a step; queued on the device it overlaps
        the step in flight and costs the engine thread a few launches. Never raises: a load that
        fails to queue (out of device memory for its buffer) comes back done and empty, a miss."""
        if self._device_load_stream is None:  # not the engine thread's load_now stream: a load at
            self._device_load_stream = torch.cuda.Stream(self.device)  # once must not wait for these
        stream = self._device_load_stream
        copies: list[tuple[Segment, PendingDeviceCopy]] = []
        try:
            self.reap()
            with torch.cuda.stream(stream):
                out = self._output_buffer(plan.num_blocks)
                for seg in plan.segments:
                    span = slice(seg.start, seg.start + seg.count)
                    tier = self.tiers[seg.tier]
                    copy = tier.start_load_to_device(plan.keys[span], block_tokens[span], out[span])
                    if copy is None:
                        break
                    copies.append((seg, copy))
                    if copy.count < seg.count:
                        break
                queued = torch.cuda.Event()
                queued.record(stream)
        except Exception:  # a failed load is a miss: what was queued is released, none used
            log.exception("load queued on the device failed; recomputing")
            with contextlib.suppress(Exception):
                stream.synchronize()
            for seg, copy in copies:
                with contextlib.suppress(Exception):
                    copy.finish(self.io[seg.tier])
            return DeviceLoad(self, plan, torch.empty(0), [], None)
        self.stats.loads_on_device += 1
        load = DeviceLoad(self, plan, out, copies, queued)
        self._device_loads.append(load)
        return load

    def reap(self, wait: bool = False) -> None:
        """Forget finished device loads; release the slots of those whose request went away once
        their copies have run. ``wait``: finish every one (the tiers are closing: no copy may
        read a slab given back; a load finished here is still installed by its ``result``)."""
        left = []
        for load in self._device_loads:
            if load.finished:
                continue
            if wait or (load.abandoned and load.done()):
                load._finish(counted=False)
            else:
                left.append(load)
        self._device_loads = left

    def load_now(self, plan: LoadPlan, block_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """``load_async``'s load on the calling thread: the tensor it returns is complete."""
        return self._load(plan, [list(t) for t in block_tokens])

    def load_async(self, plan: LoadPlan, block_tokens: Sequence[Sequence[int]]) -> Future[torch.Tensor]:
        """Fetch and verify the plan's blocks on the I/O thread.

        The future's tensor is ``[n, *layout.block_shape]`` on the hierarchy's device, n <=
        plan.num_blocks: the leading blocks that arrived whole and verified; the rest are recomputed.
        Its copies are complete when the future is.
        """
        return self._io.submit(self._load, plan, [list(t) for t in block_tokens])

    def _load(self, plan: LoadPlan, block_tokens: list[list[int]]) -> torch.Tensor:
        start = time.perf_counter()
        stream = self._io_stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            out = self._output_buffer(plan.num_blocks)
            n = 0
            for seg in plan.segments:
                tier = self.tiers[seg.tier]
                keys = plan.keys[seg.start : seg.start + seg.count]
                tokens = block_tokens[seg.start : seg.start + seg.count]
                t0 = time.perf_counter()
                good = tier.load_into(keys, tokens, out[n : n + seg.count], self.io[seg.tier])
                # The cost model learns what a load really costs: fetch and verification together,
                # in the units it predicts in (bytes of uncompressed KV).
                self.costs[seg.tier].observe(good * self.layout.bytes_per_block, time.perf_counter() - t0)
                self.stats.per_tier_loaded[tier.name] += good
                n += good
                if good < seg.count:
                    break
            if stream is not None:
                stream.synchronize()
        self.stats.blocks_loaded += n
        self.stats.predicted_load_s += plan.predicted_load_s
        self.stats.actual_load_s += time.perf_counter() - start
        return out[:n]

    def _output_buffer(self, num_blocks: int) -> torch.Tensor:
        """Where a load lands: on CUDA a fresh tensor (the caching allocator reuses memory); on the
        CPU a recycled one when there is one big enough, since fresh pages cost a fault each (a
        64-block disk load ran at 1.7 GB/s into fresh memory, 5.2 GB/s into reused)."""
        shape = (num_blocks, *self.layout.block_shape)
        dtype = getattr(torch, self.layout.dtype)
        if self.device.type == "cpu":
            with self._lock:
                for i, buffer in enumerate(self._free_buffers):
                    if buffer.shape[0] >= num_blocks:
                        return self._free_buffers.pop(i)[:num_blocks]
        return torch.empty(shape, dtype=dtype, device=self.device)

    def recycle(self, loaded: torch.Tensor) -> None:
        """The caller is done with a load's tensor (installed it): its memory can take the next
        load (CPU only; at most ``RECYCLED_BUFFERS`` of ``RECYCLED_BYTES`` in all are kept)."""
        if loaded.device.type != "cpu" or loaded.numel() == 0:
            return
        base = loaded if loaded._base is None else loaded._base
        if not isinstance(base, torch.Tensor) or base.dim() != len(self.layout.block_shape) + 1:
            return
        with self._lock:
            kept = sum(b.nbytes for b in self._free_buffers)
            fits = len(self._free_buffers) < RECYCLED_BUFFERS and kept + base.nbytes <= RECYCLED_BYTES
            if fits and all(b is not base for b in self._free_buffers):
                self._free_buffers.append(base)

    def _io_stream(self) -> torch.cuda.Stream | None:
        """This I/O thread's own CUDA stream (made once): loads overlap the engine's work."""
        if self.device.type != "cuda":
            return None
        stream: torch.cuda.Stream | None = getattr(self._thread_state, "stream", None)
        if stream is None:
            stream = self._thread_state.stream = torch.cuda.Stream(self.device)
        return stream

    def _reject(self, tier: Tier, key: BlockKey, error: CorruptObjectError) -> None:
        """An object that failed a check: a counted miss, deleted from its tier."""
        log.warning("%s tier: rejected object %s: %s", tier.name, key.hex()[:16], error)
        self.stats.corrupt += 1
        tier.record_corrupt()
        tier.delete([key])

    # -- writes ------------------------------------------------------------------------------------
    def note_hit(self, key: BlockKey) -> None:
        """A device-pool hit: selective writing stores a block once it has been reused enough."""
        if "selective" in self.write_policies:
            with self._lock:
                self._hits[key] += 1

    def wants_write_on_commit(self) -> bool:
        return bool(self.commit_tiers)

    def evict_tiers(self, key: BlockKey, persistent_only: bool = False) -> tuple[int, ...]:
        """The tiers an evicted block (or, at close, a cached one) goes to: the write-back ones, and
        the selective ones once the block has had enough hits. ``persistent_only``: leave out the
        host tier, which dies with the process (close writes only what outlives it)."""
        selective = False
        if "selective" in self.write_policies:
            with self._lock:
                selective = self._hits.pop(key, 0) >= self.selective_hits
        return tuple(
            i
            for i, policy in enumerate(self.write_policies)
            if (policy == "write-back" or (policy == "selective" and selective))
            and not (persistent_only and self.tiers[i].raw_blocks)
        )

    def wants_write_on_evict(self, key: BlockKey) -> bool:
        return bool(self.evict_tiers(key))

    @property
    def wants_sums(self) -> bool:
        """Whether writers should hand ``integrity_sums`` with each block (there is a host tier):
        computed where the blocks are, on the GPU, they cost the host tier's store nothing."""
        return any(t.raw_blocks for t in self.tiers)

    def stage_writes(
        self,
        kv_cache: torch.Tensor,
        block_ids: Sequence[int],
        entries: Sequence[tuple[BlockKey, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        """Queue pool blocks for writing: ``entries[i]`` = (key, tokens, tier indices) of block
        ``block_ids[i]`` of ``kv_cache`` (``[L, 2, num_blocks, ...]``). Costs the caller a copy of
        the blocks out of the pool, nothing more (see ``WriteQueue``).

        A tier that surely holds a block already (``Tier.holds``: the host tier's index) is not
        written again. In the chat benchmark 60% of the host tier's write-backs were such blocks
        (loaded from it, evicted again): each cost a copy out of the pool on the engine thread and
        a 2 MiB copy on a writer. The disk tier answers False: a rewrite is what heals an object
        corrupted on disk that no load has met yet."""
        ids: list[int] = []
        kept: list[tuple[BlockKey, tuple[int, ...], tuple[int, ...]]] = []
        direct_ids: list[int] = []  # for the tier that takes blocks from the device (the host's)
        direct: list[tuple[BlockKey, tuple[int, ...]]] = []
        tiers_of, direct_tier = self.tiers, self._direct_tier
        skipped = 0
        for block_id, (key, tokens, tiers) in zip(block_ids, entries, strict=True):
            wanted = tuple(i for i in tiers if not tiers_of[i].holds(key))
            skipped += not wanted
            if direct_tier in wanted:
                direct_ids.append(block_id)
                direct.append((key, tokens))
                wanted = tuple(i for i in wanted if i != direct_tier)
            if wanted:
                ids.append(block_id)
                kept.append((key, tokens, wanted))
        self.stats.writes_skipped += skipped
        if direct:
            self._store_direct(kv_cache, direct_ids, direct)
        if kept:
            self.writes.stage(kv_cache, ids, kept)

    def _store_direct(
        self, kv_cache: torch.Tensor, block_ids: list[int], entries: list[tuple[BlockKey, tuple[int, ...]]]
    ) -> None:
        """Pool blocks straight into the tier that takes them from the device (the host tier's
        page-locked slots, ``Tier.store_from_device``): a gather and one DMA a run of slots on the
        write queue's stream, no staging and no writer thread."""
        tier = self.tiers[self._direct_tier]
        keys = [k for k, _ in entries]
        tokens = [t for _, t in entries]

        def store(blocks: torch.Tensor, sums: torch.Tensor, stream: torch.cuda.Stream) -> None:
            tier.store_from_device(keys, tokens, blocks, sums, stream)

        try:
            self.writes.copy_direct(kv_cache, block_ids, store)
        except Exception:  # a tier failure must never reach the engine
            log.exception("%s tier: write from the device failed", tier.name)
            with self._lock:
                self.stats.write_errors += 1
            return
        with self._lock:
            self.stats.blocks_written += len(entries)

    def _write(
        self,
        key: BlockKey,
        tokens: list[int],
        kv: torch.Tensor,
        sums: torch.Tensor | None,
        tiers: tuple[int, ...],
    ) -> None:
        """On a writer thread: one block to each of ``tiers``."""
        encoded: dict[CodecConfig | None, EncodedBlock] = {}  # one encoding per codec, shared by its tiers
        for i in tiers:
            tier, io = self.tiers[i], self.io[i]
            encode = encoded.get(io.codec)
            if encode is None:
                encode = encoded[io.codec] = EncodedBlock(io, key, tokens, kv)  # encoded when first asked
            try:
                tier.put_block(key, tokens, kv, sums, encode)
            except Exception:  # a tier failure must never reach the engine
                log.exception("%s tier: write failed", tier.name)
                with self._lock:
                    self.stats.write_errors += 1
        with self._lock:
            self.stats.blocks_written += 1

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait for queued writes (tests, shutdown); False if ``timeout`` passed first."""
        return self.writes.flush(timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write what is queued (within ``timeout``: what is left is dropped and counted), then
        close the tiers. Returns whether every queued write made it."""
        done = self.writes.close(timeout)
        self._io.shutdown(wait=True)
        self.reap(wait=True)
        for tier in self.tiers:
            tier.close()
        return done
