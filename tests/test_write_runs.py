"""The write queue's staging in runs of slots: every staged block reaches its writer intact, with its
integrity sums on CUDA, whatever the free slots look like (fragmented by slow writes, cut by chunk
boundaries, taken from dropped writes). The CPU runs the same slot bookkeeping as the GPU; the
CUDA cases run on a GPU machine only."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import torch

from kvtier.cache import writes
from kvtier.cache.codec import integrity_sums
from kvtier.cache.keys import BlockKey, KVLayout
from kvtier.cache.writes import WriteQueue, slot_runs

BOUND_S = 30.0
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def test_slot_runs_cut_at_gaps_and_chunk_boundaries() -> None:
    assert slot_runs([], 4) == []
    assert slot_runs([5], 4) == [(0, 5, 1)]
    assert slot_runs([0, 1, 2], 8) == [(0, 0, 3)]
    assert slot_runs([0, 1, 3, 4, 5, 9], 8) == [(0, 0, 2), (2, 3, 3), (5, 9, 1)]
    assert slot_runs([2, 3, 4, 5, 6], 4) == [(0, 2, 2), (2, 4, 3)]  # chunk 0 ends at slot 3


def test_a_batch_takes_the_lowest_free_slots() -> None:
    layout = KVLayout(1, 1, 4, 2, "float32")
    gate = threading.Event()
    queue = WriteQueue(
        layout, 8 * layout.bytes_per_block, torch.device("cpu"), lambda *a: gate.wait(BOUND_S), threads=1
    )
    pool = torch.zeros(1, 2, 8, 2, 1, 4)
    seen: list[list[int]] = []
    real = writes.slot_runs
    try:
        writes.slot_runs = lambda slots, per_chunk: seen.append(list(slots)) or real(slots, per_chunk)  # type: ignore[assignment,func-returns-value]
        queue.stage(pool, [4, 2, 7], [(bytes([b]) * 32, (0, 0), (0,)) for b in (4, 2, 7)])
        queue.stage(pool, [1], [(b"\x01" * 32, (0, 0), (0,))])
    finally:
        writes.slot_runs = real  # type: ignore[assignment]
        gate.set()
    assert seen == [[0, 1, 2], [3]]
    assert queue.close(BOUND_S)


class RecordingWriter:
    """Clones what each job hands it; the writes of ``held`` keys wait until released."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written: dict[BlockKey, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.gates: dict[BlockKey, threading.Event] = {}

    def hold(self, key: BlockKey) -> None:
        with self.lock:
            self.gates[key] = threading.Event()

    def release_all(self) -> None:
        with self.lock:
            for gate in self.gates.values():
                gate.set()

    def __call__(
        self,
        key: BlockKey,
        tokens: list[int],
        kv: torch.Tensor,
        sums: torch.Tensor | None,
        tiers: tuple[int, ...],
    ) -> None:
        with self.lock:
            gate = self.gates.get(key)
        if gate is not None:
            assert gate.wait(BOUND_S)
        copy = kv.clone()  # a view of the slot, valid only during the call
        with self.lock:
            self.written[key] = (copy, None if sums is None else sums.clone())


def _random_blocks(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=gen) * 4
    return values.to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Five slots a staging chunk, so that runs are cut at chunk boundaries too."""
    monkeypatch.setattr(writes, "CHUNK_BYTES", 5 * LAYOUT_BYTES)
    yield


LAYOUTS = {
    "bfloat16": KVLayout(3, 2, 8, 4, "bfloat16"),
    "float8_e4m3fn": KVLayout(3, 2, 8, 4, "float8_e4m3fn"),
}
LAYOUT_BYTES = LAYOUTS["bfloat16"].bytes_per_block  # the larger of the two


@pytest.mark.parametrize("dtype", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_staged_blocks_and_sums_survive_many_fragmented_cycles(
    small_chunks: None, device: str, dtype: str
) -> None:
    layout = LAYOUTS[dtype]
    torch_dtype = getattr(torch, dtype)
    dev = torch.device(device)
    num_blocks, num_slots = 24, 13
    writer = RecordingWriter()
    queue = WriteQueue(
        layout, num_slots * layout.bytes_per_block, dev, writer, threads=2, with_sums=True, sums_tiers=[0]
    )
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    pool_shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    pool = _random_blocks(pool_shape, torch_dtype, gen).to(dev)
    runs_seen: list[list[tuple[int, int, int]]] = []
    real = writes.slot_runs

    def recording_runs(slots: list[int], per_chunk: int) -> list[tuple[int, int, int]]:
        runs = real(slots, per_chunk)
        runs_seen.append(runs)
        return runs

    expected: dict[BlockKey, tuple[torch.Tensor, bool]] = {}
    serial = 0
    writes.slot_runs = recording_runs  # type: ignore[assignment]
    try:
        for cycle in range(60):
            batch = rng.sample(range(num_blocks), rng.randint(1, 6))
            fresh = _random_blocks(
                (layout.num_layers, 2, len(batch), *layout.block_shape[2:]), torch_dtype, gen
            )
            pool_bytes = pool.view(torch.uint8)  # byte copies and fills: fp8 has few CUDA kernels
            for j, b in enumerate(batch):
                pool_bytes[:, :, b].copy_(fresh[:, :, j].view(torch.uint8).to(dev))
            with_sums = cycle % 2 == 0  # tier 0 wants sums, tier 1 does not
            entries = []
            for j in range(len(batch)):
                serial += 1
                key = serial.to_bytes(32, "little")
                if rng.random() < 0.15:  # a slow write: its slot stays taken for a while
                    writer.hold(key)
                expected[key] = (fresh[:, :, j].clone(), with_sums)
                entries.append((key, tuple(range(layout.block_size)), (0,) if with_sums else (1,)))
            queue.stage(pool, batch, entries)
            for b in batch:  # the engine reuses the blocks at once (on CUDA: ordered after the gather)
                pool_bytes[:, :, b].fill_(0x3C)
            if cycle % 5 == 4:
                writer.release_all()
        writer.release_all()
        assert queue.flush(BOUND_S)
    finally:
        writes.slot_runs = real  # type: ignore[assignment]
        writer.release_all()
    assert queue.close(BOUND_S)

    # the cycles really staged fragmented batches, and runs of several slots
    assert any(len(runs) > 1 for runs in runs_seen)
    assert any(count > 1 for runs in runs_seen for _, _, count in runs)
    assert len(writer.written) + queue.dropped == len(expected)
    assert writer.written  # (how many were dropped depends on the writers' pace; each written one is checked)
    for key, (kv, sums) in writer.written.items():
        want, want_sums = expected[key]
        assert torch.equal(_bytes(kv), _bytes(want)), f"block {int.from_bytes(key, 'little')} differs"
        if device == "cuda" and want_sums:
            assert sums is not None
            assert torch.equal(sums, integrity_sums(_bytes(want).unsqueeze(0))[0])
        else:
            assert sums is None  # no sums on the CPU, nor for batches no raw-block tier takes
