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
    for tiers in ("host", "disk"):
        llm = LLM(
            "synthetic:tiny",
            device="cuda",
            tiers=tiers,
            disk_path=str(tmp_path),
            kv_cache_memory=10 * block_bytes,
            load_policy="always",
        )
        try:
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == ref
            again = llm.generate(prompts[:1], greedy)  # evicted from the 10-block pool: from below
            assert again[0].outputs[0].token_ids == ref[0]
            assert again[0].metrics["num_loaded_tokens"] == 96
            assert llm.engine.hierarchy is not None
            assert llm.engine.hierarchy.stats.per_tier_loaded[tiers] == 6
            llm.engine.pool.assert_idle()
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
