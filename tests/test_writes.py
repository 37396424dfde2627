"""The write queue: bounded, drops the oldest pending writes when full, never blocks its caller."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from kvtier.cache.keys import BlockKey, KVLayout, chain_keys
from kvtier.cache.writes import WriteQueue

LAYOUT = KVLayout(2, 2, 8, 4, "float32")
BOUND_S = 30.0


def _pool(num_blocks: int) -> torch.Tensor:
    """A pool whose block b holds the value b everywhere."""
    pool = torch.empty(LAYOUT.num_layers, 2, num_blocks, *LAYOUT.block_shape[2:])
    for b in range(num_blocks):
        pool[:, :, b] = float(b)
    return pool


def _key(i: int) -> BlockKey:
    return bytes([i]) * 32


class GatedWriter:
    """A tier stand-in that records what it is handed and blocks until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.written: dict[BlockKey, float] = {}
        self.lock = threading.Lock()

    def __call__(self, key: BlockKey, tokens: list[int], kv: torch.Tensor, *_: object) -> None:
        self.started.set()
        assert self.gate.wait(BOUND_S)
        assert tuple(kv.shape) == LAYOUT.block_shape
        value = float(kv.flatten()[0])
        assert bool((kv == value).all())  # one whole block, copied before the pool changed
        with self.lock:
            self.written[key] = value


def test_blocks_are_copied_at_stage_and_written_later() -> None:
    writer = GatedWriter()
    queue = WriteQueue(LAYOUT, 8 * LAYOUT.bytes_per_block, torch.device("cpu"), writer, threads=1)
    pool = _pool(4)
    queue.stage(pool, [1, 3], [(_key(1), (0,) * 4, (0,)), (_key(3), (0,) * 4, (0,))])
    pool.fill_(-1.0)  # the engine reuses the blocks at once: the queue has its own copy
    assert not queue.flush(timeout=0.05)  # the writer is held at the gate
    writer.gate.set()
    assert queue.flush(timeout=BOUND_S)
    assert writer.written == {_key(1): 1.0, _key(3): 3.0}
    assert queue.dropped == 0 and queue.pending_bytes == 0
    assert queue.close(timeout=BOUND_S)


def test_a_full_queue_drops_the_oldest_pending_writes_without_blocking() -> None:
    writer = GatedWriter()
    queue = WriteQueue(LAYOUT, 3 * LAYOUT.bytes_per_block, torch.device("cpu"), writer, threads=1)
    pool = _pool(10)
    queue.stage(pool, [0], [(_key(0), (0,) * 4, (0,))])
    assert writer.started.wait(BOUND_S)  # block 0 is being written: in flight, not droppable
    for b in range(1, 10):
        queue.stage(pool, [b], [(_key(b), (0,) * 4, (0,))])  # returns at once: the writer is stuck
    # three slots: block 0 in flight, the two newest queued; 1..7 were dropped, oldest first
    assert queue.dropped == 7
    writer.gate.set()
    assert queue.flush(timeout=BOUND_S)
    assert writer.written == {_key(0): 0.0, _key(8): 8.0, _key(9): 9.0}
    queue.close(timeout=BOUND_S)


def test_close_within_its_timeout_drops_and_counts_what_is_left() -> None:
    writer = GatedWriter()
    queue = WriteQueue(LAYOUT, 8 * LAYOUT.bytes_per_block, torch.device("cpu"), writer, threads=1)
    pool = _pool(4)
    queue.stage(pool, [0, 1, 2], [(_key(b), (0,) * 4, (0,)) for b in range(3)])
    assert writer.started.wait(BOUND_S)
    start = time.monotonic()
    assert not queue.close(timeout=0.1)  # a hung tier cannot hold the caller
    assert time.monotonic() - start < BOUND_S
    assert queue.dropped == 2  # the two still queued; the one in flight is the tier's
    writer.gate.set()


def test_an_engine_counts_the_writes_its_full_queue_dropped(tmp_path: Path) -> None:
    """Write queue of two blocks, a prompt of 12: the step does not wait, 10 writes are dropped
    (counted in the metrics), the first two blocks of the prefix are stored."""
    from prometheus_client import CollectorRegistry

    from kvtier import LLM, SamplingParams
    from kvtier.metrics import EngineMetrics, render

    probe = LLM("synthetic:tiny", tiers="none", kv_cache_memory=1 << 20)
    block_bytes = probe.engine.layout.bytes_per_block
    llm = LLM(
        "synthetic:tiny",
        tiers="disk",
        disk_path=str(tmp_path),
        kv_cache_memory=1 << 20,
        write_queue_bytes=2 * block_bytes,
    )
    llm.generate([list(range(200))], SamplingParams(max_tokens=1, temperature=0.0))
    assert llm.engine.flush_writes(timeout=BOUND_S)
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    metrics.update(llm.engine)
    text = render(registry).decode()
    assert "kvtier:hierarchy_writes_dropped_total 10.0" in text
    assert "kvtier:hierarchy_write_queue_bytes 0.0" in text
    disk = llm.engine.hierarchy.tiers[0]
    keys = chain_keys(llm.engine.root_key(None), list(range(200)), llm.engine.layout.block_size)
    assert len(disk) == 2 and disk.lookup(keys) == 2  # a batch too big keeps its leading blocks
    llm.close()
