"""The tiers' CUDA paths against their CPU reference (skipped where there is no GPU).

On CUDA the host tier's slab is page-locked, a load is copied straight from it to the GPU and its
integrity sums are computed there; objects from the other tiers are decoded into pinned staging
and copied. Each must give exactly what the CPU path gives.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.cache.codec import CodecConfig, encode_block, integrity_sums
from kvtier.cache.hierarchy import KVHierarchy, LoadPlan, Segment
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.host import HostTier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")


def keys_and_blocks(n: int, seed: int) -> tuple[list[bytes], list[list[int]], torch.Tensor]:
    keys = [hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=32).digest() for i in range(n)]
    rng = random.Random(seed)
    tokens = [[rng.randrange(1000) for _ in range(LAYOUT.block_size)] for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((n, *LAYOUT.block_shape), generator=gen).to(torch.bfloat16)
    return keys, tokens, kv


def test_integrity_sums_match_on_cuda() -> None:
    gen = torch.Generator().manual_seed(0)
    for nbytes in (LAYOUT.bytes_per_block, 4096 * 3 + 8 * 5):  # with and without a tail
        data = torch.randint(0, 256, (7, nbytes), dtype=torch.uint8, generator=gen)
        assert torch.equal(integrity_sums(data.cuda()).cpu(), integrity_sums(data))


def test_host_tier_loads_to_the_gpu_and_rejects_a_flipped_bit() -> None:
    keys, tokens, kv = keys_and_blocks(12, seed=1)
    host = HostTier(LAYOUT, "fp", 64 * LAYOUT.bytes_per_block, pin_memory=True)
    assert host.pin_memory
    for i, key in enumerate(keys):
        host.store(key, tokens[i], kv[i])
    hierarchy = KVHierarchy([host], [None], LAYOUT, "fp", device="cuda")
    try:
        plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
        out = hierarchy.load_async(plan, tokens).result(timeout=30)
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), kv)

        slots = host.acquire(keys[5:6], tokens[5:6])
        host._row(slots[0])[1000] ^= 0x01
        host.release(slots)
        out = hierarchy.load_async(plan, tokens).result(timeout=30)
        assert out.shape[0] == 5 and torch.equal(out.cpu(), kv[:5])
        assert hierarchy.stats.corrupt == 1 and host.lookup(keys) == 5
    finally:
        hierarchy.close()


def test_host_loads_queued_on_the_device_match_and_reject_a_flipped_bit() -> None:
    """``load_on_device`` queues the copies and their check on a stream and returns at once: the
    blocks match the CPU path's, a flipped bit ends the run there (a counted, deleted miss), and
    the slots are pinned until the result is read, then free."""
    keys, tokens, kv = keys_and_blocks(12, seed=6)
    host = HostTier(LAYOUT, "fp", 64 * LAYOUT.bytes_per_block, pin_memory=True)
    for i, key in enumerate(keys):
        host.store(key, tokens[i], kv[i])
    hierarchy = KVHierarchy([host], [None], LAYOUT, "fp", device="cuda")
    try:
        plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
        assert hierarchy.loads_on_device(plan)
        torch.cuda._sleep(50_000_000)  # the load's stream waits for nothing of this one
        load = hierarchy.load_on_device(plan, tokens)
        assert len(host._pins) == 12  # held while the copy may still run
        out = load.result()
        assert load.done() and torch.equal(out.cpu(), kv) and not host._pins
        assert hierarchy.stats.blocks_loaded == 12 and hierarchy.stats.per_tier_loaded["host"] == 12

        slots = host.acquire(keys[8:9], tokens[8:9])
        host._row(slots[0])[77] ^= 0x10
        host.release(slots)
        out = hierarchy.load_on_device(plan, tokens).result()
        assert out.shape[0] == 8 and torch.equal(out.cpu(), kv[:8])
        assert hierarchy.stats.corrupt == 1 and host.lookup(keys) == 8 and not host._pins
    finally:
        hierarchy.close()


def test_a_device_load_whose_request_went_away_releases_its_slots() -> None:
    """A cancelled device load gives its slots back once its copy has run (the next load reaps
    it); one still queued when the hierarchy closes is finished first, and its blocks are whole."""
    keys, tokens, kv = keys_and_blocks(6, seed=7)
    host = HostTier(LAYOUT, "fp", 16 * LAYOUT.bytes_per_block, pin_memory=True)
    for i, key in enumerate(keys):
        host.store(key, tokens[i], kv[i])
    hierarchy = KVHierarchy([host], [None], LAYOUT, "fp", device="cuda")
    plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
    abandoned = hierarchy.load_on_device(plan, tokens)
    abandoned.cancel()
    torch.cuda.synchronize()
    kept = hierarchy.load_on_device(plan, tokens)  # reaps the cancelled one
    assert all(count == 1 for count in host._pins.values()) and len(host._pins) == 6
    hierarchy.close()
    assert torch.equal(kept.result().cpu(), kv)
    assert hierarchy.stats.blocks_loaded == 0  # neither was counted as used: the close finished them


def test_evicted_blocks_go_into_the_host_tier_straight_from_the_pool() -> None:
    """``stage_writes`` on CUDA copies host-tier blocks from the pool into the page-locked slots
    (``store_from_device``): a load right after, with no wait in between, gets exactly the blocks
    (its copy is ordered after theirs on the GPU), the pool may be overwritten at once, and the
    CPU path of the same tier (``read_block``) reads the same bytes."""
    keys, tokens, kv = keys_and_blocks(24, seed=4)
    host = HostTier(LAYOUT, "fp", 64 * LAYOUT.bytes_per_block, pin_memory=True)
    hierarchy = KVHierarchy([host], [None], LAYOUT, "fp", device="cuda")
    assert hierarchy._direct_tier == 0
    try:
        pool = kv.permute(1, 2, 0, 3, 4, 5).contiguous().cuda()  # [L, 2, blocks, bs, H, D]
        torch.cuda.synchronize()
        ids = list(range(23, -1, -1))  # out of order: the gather puts them in the entries' order
        entries = [(keys[b], tuple(tokens[b]), (0,)) for b in ids]
        for _ in range(3):  # a slow stream makes the copy still pending when the load comes
            torch.cuda._sleep(50_000_000)
        hierarchy.stage_writes(pool, ids, entries)
        pool.zero_()  # the engine may reuse the blocks at once: ordered after the gather
        assert host.lookup(keys) == 24 and hierarchy.writes.pending_bytes == 0
        plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
        out = hierarchy.load_now(plan, tokens)
        assert torch.equal(out.cpu(), kv) and hierarchy.stats.corrupt == 0
        slot = host.acquire(keys[3:4], tokens[3:4])
        assert torch.equal(host.read_block(slot[0]), kv[3])
        host.release(slot)
        assert hierarchy.stats.blocks_written == 24
    finally:
        hierarchy.close()


def test_disk_objects_are_checked_on_the_gpu(tmp_path: object) -> None:
    """Uncompressed disk objects go straight into pinned staging and are checksummed on the GPU:
    the same blocks as the CPU path, and a flipped payload bit is a deleted miss."""
    keys, tokens, kv = keys_and_blocks(10, seed=2)
    disk = DiskTier(str(tmp_path), "fp", 1 << 30)
    disk.put([(k, encode_block(k, "fp", LAYOUT, tokens[i], kv[i])) for i, k in enumerate(keys)])
    hierarchy = KVHierarchy([disk], [CodecConfig()], LAYOUT, "fp", device="cuda")
    try:
        plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
        out = hierarchy.load_async(plan, tokens).result(timeout=30)
        assert out.device.type == "cuda" and torch.equal(out.cpu(), kv)
        path = Path(disk.path_of(keys[7]))
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x04
        path.write_bytes(bytes(data))
        out = hierarchy.load_async(plan, tokens).result(timeout=30)
        assert out.shape[0] == 7 and torch.equal(out.cpu(), kv[:7])
        assert hierarchy.stats.corrupt == 1 and disk.lookup(keys) == 7
    finally:
        hierarchy.close()


def test_engine_on_cuda_loads_from_host_and_disk_with_the_same_tokens(tmp_path: object) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rng = random.Random(3)
    prompts = [[rng.randrange(320) for _ in range(100)] for _ in range(6)]
    cold = LLM(
        "synthetic:tiny", device="cuda", tiers="none", enable_prefix_caching=False, kv_cache_memory=64 << 20
    )
    ref = [o.outputs[0].token_ids for o in cold.generate(prompts, greedy)]
    block_bytes = cold.engine.layout.bytes_per_block
    cold.close()
    # host at once (in the admitting step), host queued on the device (load_at_once_s=0), disk
    for tiers, at_once in (("host", 2e-3), ("host", 0.0), ("disk", 2e-3)):
        llm = LLM(
            "synthetic:tiny",
            device="cuda",
            tiers=tiers,
            disk_path=str(tmp_path),
            kv_cache_memory=10 * block_bytes,
            load_policy="always",
            load_at_once_s=at_once,
        )
        try:
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == ref
            again = llm.generate(prompts[:1], greedy)  # evicted from the 10-block pool: from below
            assert again[0].outputs[0].token_ids == ref[0]
            assert again[0].metrics["num_loaded_tokens"] == 96
            hierarchy = llm.engine.hierarchy
            assert hierarchy is not None
            assert hierarchy.stats.per_tier_loaded[tiers] == 6
            assert hierarchy.stats.loads_on_device == (1 if tiers == "host" and not at_once else 0)
            llm.engine.pool.assert_idle()
        finally:
            llm.close()


def test_a_request_aborted_while_its_device_load_runs_leaves_nothing_held() -> None:
    """Abort a request whose load is queued on the device: its pool blocks are free, its host
    slots are released once the copy has run, and the next request with the prefix is exact."""
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    rng = random.Random(9)
    prompt = [rng.randrange(320) for _ in range(100)]
    other = [rng.randrange(320) for _ in range(100)]
    llm = LLM("synthetic:tiny", device="cuda", tiers="host", kv_cache_memory=64 << 20, load_policy="always")
    block_bytes = llm.engine.layout.bytes_per_block
    llm.close()
    llm = LLM(
        "synthetic:tiny",
        device="cuda",
        tiers="host",
        kv_cache_memory=8 * block_bytes,
        load_policy="always",
        load_at_once_s=0.0,
    )
    try:
        ref = llm.generate([prompt], greedy)[0].outputs[0].token_ids
        llm.generate([other], greedy)  # pushes the prompt's blocks down to the host tier
        engine, hierarchy = llm.engine, llm.engine.hierarchy
        assert hierarchy is not None
        (request_id,) = engine.add_request(prompt, greedy)
        engine.step()
        assert engine.scheduler.loading and hierarchy.stats.loads_on_device == 1
        engine.abort(request_id)
        torch.cuda.synchronize()
        while engine.has_unfinished():
            engine.step()
        engine.pool.assert_idle()
        again = llm.generate([prompt], greedy)[0]  # its load reaps the abandoned one first
        assert again.outputs[0].token_ids == ref and again.metrics["num_loaded_tokens"] > 0
        host = hierarchy.tiers[0]
        assert isinstance(host, HostTier) and not host._pins
    finally:
        llm.close()


def test_a_step_synchronises_with_the_gpu_once() -> None:
    """The engine reads its sampled tokens back once per step; nothing else in a step (prefill
    attention included) may wait for the GPU: each wait stalls the launch-bound engine loop."""
    import warnings

    llm = LLM(
        "synthetic:tiny", device="cuda", tiers="none", max_num_batched_tokens=64, kv_cache_memory=64 << 20
    )
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # lazily initialised state
    engine = llm.engine
    rng = random.Random(5)
    for _ in range(3):  # 210 prompt tokens: chunked prefill over several steps, then decodes
        engine.add_request([rng.randrange(320) for _ in range(70)], SamplingParams(max_tokens=4))
    steps = 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while engine.has_unfinished():
                engine.step()
                steps += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
        llm.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert steps > 0 and len(syncs) <= steps


def test_shared_staging_is_unregistered_when_it_closes() -> None:
    """The file writers' shared staging is page-locked in place (``cudaHostRegister``); closing it
    unregisters it, so the next one's mapping (often at the same address) registers as well and
    no stale CUDA error reaches the next kernel launch (the H200's chat bench: "resource already
    mapped" at the engine after the second with file writers)."""
    from kvtier.cache.file_writer import SharedSlots
    from kvtier.cache.writes import _map_shared

    for _ in range(3):
        shared = SharedSlots(LAYOUT, 8)
        slots = _map_shared(LAYOUT, shared, pin=True)
        assert slots is not None and shared.registered
        slots[1].copy_(torch.ones(LAYOUT.block_shape, dtype=torch.bfloat16, device="cuda"), non_blocking=True)
        torch.cuda.synchronize()
        assert slots[1].float().sum().item() == LAYOUT.bytes_per_block // 2
        shared.close()
        assert not shared.registered
        del slots, shared
        assert torch.ones(1, device="cuda").add_(1).item() == 2
