"""The KV hierarchy end to end: real engines on the tiny synthetic model, real files, real redis-server.

Every test compares greedy tokens with a cold run (no tiers, no prefix caching): loading KV from a
tier, recomputing after a rejected object, or surviving a dead Redis must never change the output.
Counts are exact where the block arithmetic makes them so (16-token blocks; the last prompt token is
always computed, so a P-token prompt can reuse at most ``(P - 1) // 16`` blocks).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.cache.codec import read_header
from kvtier.cache.keys import BlockKey, chain_keys
from kvtier.cache.tiers.host import HostTier
from kvtier.engine.engine import Engine
from kvtier.engine.request import RequestOutput

if TYPE_CHECKING:  # imported at run time by the root conftest's pytest_plugins
    from tests.redis_servers import RedisClusterServers, RedisServer

MODEL = "synthetic:tiny"
VOCAB = 320  # synthetic:tiny's vocabulary
BS = 16  # default block size
POOL_BYTES = 1 << 20  # 128 blocks of the tiny model: nothing is evicted unless a test shrinks it
MAX_TOKENS = 8
SUBPROCESS_TIMEOUT_S = 120

MakeLLM = Callable[..., LLM]
Cold = Callable[..., list[list[int]]]


# ---------------------------------------------------------------- helpers


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of random token ids (two of them sharing a whole 16-token block: never)."""
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(length)] for _ in range(n)]


def token_ids(outs: Sequence[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def cached(outs: Sequence[RequestOutput]) -> list[int]:
    return [o.num_cached_tokens for o in outs]


def loaded(outs: Sequence[RequestOutput]) -> list[int]:
    return [o.metrics["num_loaded_tokens"] for o in outs]


def block_keys(engine: Engine, tokens: Sequence[int], salt: str | None = None) -> list[BlockKey]:
    return chain_keys(engine.root_key(salt), list(tokens), BS)


def disk_objects(root: Path) -> dict[BlockKey, Path]:
    """Every stored object under a disk tier's root (all namespaces), by key."""
    return {bytes.fromhex(p.stem): p for p in root.rglob("*.kvt")}


def redis_objects(clients: Sequence[Any]) -> int:
    return sum(len(c.keys("kvtier:*")) for c in clients)


def run_until_done(engine: Engine) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tests run thousands of tiny steps (a 2-layer model, a few hundred tokens), where
    intra-op threads only add a barrier per op: on a busy 2-CPU box two threads made this file 7x
    slower (110 s against 16 s). Every engine compared here, in this process or a child, uses the
    same count, so the numerics stay comparable; the count is restored for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cold() -> Iterator[Cold]:
    """Reference outputs: an engine with no tiers and no prefix caching, per model seed."""
    llms: dict[int, LLM] = {}

    def run(prompts: Sequence[Sequence[int]], seed: int = 0, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
        if seed not in llms:
            llms[seed] = LLM(
                MODEL, seed=seed, tiers="none", enable_prefix_caching=False, kv_cache_memory=4 << 20
            )
        return token_ids(llms[seed].generate([list(p) for p in prompts], greedy(max_tokens)))

    yield run
    for llm in llms.values():
        llm.close()


@pytest.fixture
def make_llm() -> Iterator[MakeLLM]:
    """Builds engines (kv_cache_memory=POOL_BYTES unless given) and closes them all at the end."""
    made: list[LLM] = []

    def make(**settings: Any) -> LLM:
        # Exact load counts: the cost model's choice on a 2-layer model is a coin toss (tests/
        # test_cost_model.py tests it); here every hit is loaded.
        llm = LLM(MODEL, **{"kv_cache_memory": POOL_BYTES, "load_policy": "always", **settings})
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


# ---------------------------------------------------------------- 1. restart on disk


@pytest.mark.parametrize(
    ("codec", "read_codec"), [("none", "none"), ("zstd", "zstd"), ("zstd", "none"), ("none", "zstd")]
)
def test_restart_loads_from_disk(
    codec: str, read_codec: str, tmp_path: Path, make_llm: MakeLLM, cold: Cold
) -> None:
    """A restart loads what the last engine left on disk, whatever codec either was set to: the
    reader of uncompressed objects reads into its staging buffer, and falls back for others."""
    prompts = make_prompts(3, 200, seed=1)
    ref = cold(prompts)

    first = make_llm(tiers="disk", disk_path=str(tmp_path), disk_codec=codec, write_policy="write-back")
    outs = first.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert cached(outs) == [0, 0, 0]
    assert disk_objects(tmp_path) == {}  # write-back: nothing is written before eviction or close
    first.close()  # persists what the device still caches
    # 207 computed tokens per request: 12 full blocks each, all of them prompt tokens
    want = {k for p in prompts for k in block_keys(first.engine, p)[:12]}
    assert set(disk_objects(tmp_path)) == want

    assert {read_header(p.read_bytes()).compression for p in disk_objects(tmp_path).values()} == {codec}

    second = make_llm(tiers="disk", disk_path=str(tmp_path), disk_codec=read_codec)
    outs = second.generate(prompts, greedy())
    assert cached(outs) == [192, 192, 192]
    assert loaded(outs) == [192, 192, 192]
    assert token_ids(outs) == ref
    stats = second.engine.hierarchy.stats
    assert stats.blocks_loaded == 36 and stats.per_tier_loaded["disk"] == 36
    assert stats.corrupt == 0
    second.engine.pool.assert_idle()


def test_device_hit_then_the_rest_from_disk(tmp_path: Path, make_llm: MakeLLM, cold: Cold) -> None:
    prompt = make_prompts(1, 200, seed=19)[0]
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate([prompt], greedy())
    writer.close()

    llm = make_llm(tiers="disk", disk_path=str(tmp_path))
    short = llm.generate([prompt[:50]], greedy())  # loads blocks 0-2 into the device pool
    assert loaded(short) == [48] and token_ids(short) == cold([prompt[:50]])
    outs = llm.generate([prompt], greedy())  # blocks 0-2 from the device, 3-11 from disk
    assert cached(outs) == [192] and loaded(outs) == [144]
    assert token_ids(outs) == cold([prompt])
    assert llm.engine.hierarchy.stats.blocks_loaded == 3 + 9
    llm.engine.pool.assert_idle()


def test_restart_loads_what_the_file_writer_process_wrote(
    tmp_path: Path, make_llm: MakeLLM, cold: Cold
) -> None:
    """With ``disk_write_process`` a child process encodes and writes the disk's objects; the
    engine's disk tier indexes them (its own lookups hit), and a restart loads them."""
    prompts = make_prompts(2, 200, seed=23)
    ref = cold(prompts)
    writer = make_llm(tiers="disk", disk_path=str(tmp_path), disk_write_process=True)
    hierarchy = writer.engine.hierarchy
    assert hierarchy is not None and hierarchy.writes._files is not None
    assert token_ids(writer.generate(prompts, greedy())) == ref
    assert hierarchy.flush(60.0)
    want = {k for p in prompts for k in block_keys(writer.engine, p)[:12]}
    assert set(disk_objects(tmp_path)) == want  # write-through: on disk before any close
    disk = hierarchy.tiers[0]
    assert disk.lookup([block_keys(writer.engine, prompts[0])[0]]) == 1 and disk.stats().puts == 24
    writer.close()

    llm = make_llm(tiers="disk", disk_path=str(tmp_path))
    outs = llm.generate(prompts, greedy())
    assert loaded(outs) == [192, 192] and token_ids(outs) == ref
    assert llm.engine.hierarchy is not None and llm.engine.hierarchy.stats.corrupt == 0
    llm.engine.pool.assert_idle()


def hold_io_threads(engine: Engine) -> tuple[threading.Event, list[Any]]:
    """Occupy every I/O thread of the engine's hierarchy until the event is set, so that a load
    is planned (the lookup ran) but not yet fetched: the test can change the world in between."""
    assert engine.hierarchy is not None
    io = engine.hierarchy._io
    gate = threading.Event()
    return gate, [io.submit(gate.wait) for _ in range(io._max_workers)]


def test_partial_load_when_an_object_vanishes(tmp_path: Path, make_llm: MakeLLM, cold: Cold) -> None:
    prompt = make_prompts(1, 200, seed=20)[0]
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate([prompt], greedy())
    writer.close()

    llm = make_llm(tiers="disk", disk_path=str(tmp_path))
    engine = llm.engine
    gate, holds = hold_io_threads(engine)
    try:
        (rid,) = engine.add_request(prompt, greedy())
        engine.step()  # planned: all 12 blocks found on disk; the fetch waits for an I/O thread
        assert [r.request_id for r in engine.scheduler.loading] == [rid]
        disk_objects(tmp_path)[block_keys(engine, prompt)[3]].unlink()  # say, another process evicted it
    finally:
        gate.set()
    for h in holds:
        h.result(timeout=10)
    final = run_until_done(engine)
    assert final[rid].num_cached_tokens == 48  # the 3 blocks before the hole
    assert final[rid].metrics["num_loaded_tokens"] == 48
    assert final[rid].outputs[0].token_ids == cold([prompt])[0]
    assert engine.hierarchy.stats.corrupt == 0
    engine.pool.assert_idle()


# ---------------------------------------------------------------- 2. two processes, one Redis

_PROCESS_SCRIPT = """
import json, sys
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])  # as the test process: same numerics as its cold runs
from kvtier import LLM, SamplingParams
llm = LLM(args["model"], **args["settings"])
assert sys.stdin.readline().strip() == "go"  # start-up overlaps with the other process's work
outs = llm.generate(args["prompts"], SamplingParams(max_tokens=args["max_tokens"], temperature=0.0,
                                                    ignore_eos=True))
llm.close()
print(json.dumps([{"tokens": o.outputs[0].token_ids, "cached": o.num_cached_tokens,
                   "loaded": o.metrics["num_loaded_tokens"]} for o in outs]))
"""


class EngineProcess:
    """An engine in a fresh Python process (its own model, device pool and tier clients). It starts
    at once and generates when ``run`` is called, so that several start up side by side."""

    def __init__(self, log: Path, prompts: list[list[int]], **settings: Any) -> None:
        args = {
            "model": MODEL,
            "settings": settings,
            "prompts": prompts,
            "max_tokens": MAX_TOKENS,
            "threads": torch.get_num_threads(),
        }
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PROCESS_SCRIPT, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def run(self) -> list[dict[str, Any]]:
        out, _ = self.proc.communicate("go\n", timeout=SUBPROCESS_TIMEOUT_S)
        assert self.proc.returncode == 0, self.log.read_text()[-4000:]
        result: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.redis
def test_two_processes_share_one_redis(tmp_path: Path, redis_server: RedisServer, cold: Cold) -> None:
    prefix = make_prompts(1, 100, seed=2)[0]
    suffix = make_prompts(1, 40, seed=3)[0]
    settings = {
        "kv_cache_memory": POOL_BYTES,
        "tiers": "redis",
        "redis_url": redis_server.url,
        "write_policy": "write-through",
        "load_policy": "always",
    }
    a = EngineProcess(tmp_path / "a.log", [prefix], **settings)
    b = EngineProcess(tmp_path / "b.log", [prefix + suffix], **settings)
    client = redis_server.client()
    try:
        out_a = a.run()[0]
        assert out_a["tokens"] == cold([prefix])[0]
        assert out_a["cached"] == 0
        # 107 computed tokens: 6 full blocks, stored as soon as they were full
        assert redis_objects([client]) == 6

        out_b = b.run()[0]
        assert out_b["cached"] == 96  # exactly the 6 full blocks of the shared prefix
        assert out_b["loaded"] == 96
        assert out_b["tokens"] == cold([prefix + suffix])[0]
        # B wrote its own blocks after the shared ones: 140 + 7 computed tokens = 9 full blocks
        assert redis_objects([client]) == 9
    finally:
        a.kill()
        b.kill()
        client.close()


# ---------------------------------------------------------------- 3. eviction pressure


@pytest.mark.parametrize("tiers", ["disk", "host,disk"])
def test_eviction_pressure_writes_back_and_loads(
    tiers: str, tmp_path: Path, make_llm: MakeLLM, cold: Cold
) -> None:
    probe = make_llm(tiers="none", kv_cache_memory=POOL_BYTES)
    pool_blocks = 10
    llm = make_llm(
        tiers=tiers,
        disk_path=str(tmp_path),
        kv_cache_memory=pool_blocks * probe.engine.layout.bytes_per_block,
    )
    engine = llm.engine
    assert engine.pool.num_blocks == pool_blocks
    prompts = make_prompts(6, 100, seed=4)  # 7 blocks each: a 42-block working set, 4x the pool
    ref = cold(prompts)

    outs = llm.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert engine.pool.evictions >= len(prompts) * 6 - pool_blocks  # 6 full blocks each are cached
    engine.pool.assert_idle()
    engine.hierarchy.flush()
    first_keys = block_keys(engine, prompts[0])[:6]
    assert not any(engine.pool.contains(k) for k in first_keys)  # evicted from the device...
    assert set(first_keys) <= set(disk_objects(tmp_path))  # ...and written down on the way out

    again = llm.generate([prompts[0]], greedy())
    assert loaded(again) == [96] and cached(again) == [96]
    assert token_ids(again) == ref[:1]
    cheapest = tiers.split(",")[0]  # of the tiers that hold the blocks, the cheapest serves them
    assert engine.hierarchy.stats.per_tier_loaded[cheapest] == 6

    # the whole workload again: every prompt comes back from below (or the device), same tokens
    outs = llm.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert cached(outs) == [96] * len(prompts)
    assert sum(loaded(outs)) >= 96 * (len(prompts) - 1)
    engine.pool.assert_idle()


def test_loads_with_preemption_in_a_tiny_pool(tmp_path: Path, make_llm: MakeLLM, cold: Cold) -> None:
    """Requests that load, grow, get preempted and come back: same tokens, no leaked block."""
    base = make_prompts(3, 60, seed=21)
    prompts = base + [p[:48] + q for p, q in zip(base, make_prompts(3, 30, seed=22), strict=True)]
    ref = cold(prompts, max_tokens=24)
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate(base, greedy(4))
    writer.close()

    block_bytes = writer.engine.layout.bytes_per_block
    llm = make_llm(
        tiers="disk", disk_path=str(tmp_path), kv_cache_memory=8 * block_bytes, max_num_batched_tokens=48
    )
    outs = llm.generate(prompts, greedy(24))  # 6 requests of up to 6 blocks each in 8 blocks
    assert token_ids(outs) == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert all(c >= 48 for c in cached(outs))  # the shared 3 blocks: from disk or the device
    assert sum(loaded(outs)) >= 48 * 3
    llm.engine.pool.assert_idle()


def test_abort_while_loading(tmp_path: Path, make_llm: MakeLLM, cold: Cold) -> None:
    prompts = make_prompts(2, 200, seed=23)
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate(prompts, greedy())
    writer.close()

    llm = make_llm(tiers="disk", disk_path=str(tmp_path))
    engine = llm.engine
    gate, holds = hold_io_threads(engine)
    try:
        (rid,) = engine.add_request(prompts[0], greedy())
        engine.step()
        (req,) = engine.scheduler.loading
        assert req.request_id == rid and req.load_future is not None
        load = req.load_future
        engine.abort(rid)  # its blocks are released while the fetch is still queued
        assert not engine.scheduler.loading
        engine.pool.assert_idle()
    finally:
        gate.set()
    for h in holds:
        h.result(timeout=10)
    assert isinstance(load, Future) and load.cancelled()  # still queued: the abort cancelled it...
    engine.step()  # ...and nothing installs it
    engine.pool.assert_idle()
    outs = llm.generate(prompts, greedy())
    assert token_ids(outs) == cold(prompts)
    assert loaded(outs) == [192, 192]
    engine.pool.assert_idle()


def test_preemption_swaps_to_the_host_tier(make_llm: MakeLLM, cold: Cold) -> None:
    """A preempted request's blocks keep their keys; evicted, they are written back to the host
    tier, and its re-admission loads them instead of recomputing (prompts share nothing, so every
    host load is a swap-in)."""
    prompts = make_prompts(5, 40, seed=31)
    ref = cold(prompts, max_tokens=40)
    probe = make_llm(tiers="none")
    block_bytes = probe.engine.layout.bytes_per_block
    llm = make_llm(tiers="host", kv_cache_memory=9 * block_bytes, host_capacity=256 * block_bytes)
    outs = llm.generate(prompts, greedy(40))  # 5 requests growing to 5 blocks each in 9 blocks
    engine = llm.engine
    assert token_ids(outs) == ref
    assert engine.scheduler.num_preemptions > 0
    assert engine.hierarchy.stats.per_tier_loaded["host"] > 0
    assert engine.hierarchy.stats.corrupt == 0
    engine.pool.assert_idle()


@pytest.mark.parametrize("at_once", [True, False], ids=["in-the-step", "io-thread"])
def test_host_load_runs_in_the_step_that_admits_it(at_once: bool, make_llm: MakeLLM, cold: Cold) -> None:
    """A short load from the host tier (this process's memory) runs inside ``schedule``: its request
    is admitted with the loaded blocks in the same step, like a device hit, instead of waiting in
    LOADING for an I/O thread (a whole step). ``load_at_once_s=0`` keeps every load on the threads."""
    prompts = make_prompts(2, 100, seed=33)
    ref = cold(prompts)
    probe = make_llm(tiers="none")
    block_bytes = probe.engine.layout.bytes_per_block
    llm = make_llm(tiers="host", kv_cache_memory=8 * block_bytes, load_at_once_s=1.0 if at_once else 0.0)
    engine = llm.engine
    for prompt, expected in zip(prompts, ref, strict=True):  # the second evicts the first to the host
        assert token_ids(llm.generate([prompt], greedy())) == [expected]
    engine.hierarchy.flush()
    keys = block_keys(engine, prompts[0])[:6]
    on_device = sum(engine.pool.contains(k) for k in keys)
    assert on_device < 6 and engine.hierarchy.tiers[0].lookup(keys[on_device:]) == 6 - on_device

    (rid,) = engine.add_request(prompts[0], greedy())
    engine.step()
    (req,) = [r for r in engine.scheduler.running + engine.scheduler.loading if r.request_id == rid]
    if at_once:
        assert not engine.scheduler.loading and req in engine.scheduler.running
        assert req.num_computed_tokens == len(prompts[0])  # its whole prefill is in this step
    else:
        assert engine.scheduler.loading == [req] and req.num_computed_tokens == on_device * BS
    final = run_until_done(engine)
    assert final[rid].outputs[0].token_ids == ref[0]
    assert final[rid].num_cached_tokens == 6 * BS
    assert final[rid].metrics["num_loaded_tokens"] == (6 - on_device) * BS
    assert engine.hierarchy.stats.corrupt == 0
    engine.pool.assert_idle()


def test_a_loaded_prompt_waiting_for_a_step_of_its_own_holds_nothing(make_llm: MakeLLM, cold: Cold) -> None:
    """Chunked prefill off: a prompt whose prefix came from the host tier but whose rest is over the
    step's budget waits for a step of its own (a decode runs). Each step it waits, its loaded
    blocks must be let go, not pinned again: the pool ends idle and the tokens are the cold ones."""
    prefix, rest = make_prompts(1, 4 * BS, seed=41)[0], make_prompts(1, 60, seed=43)[0]
    long_prompt, short_prompt = prefix + rest, make_prompts(1, 20, seed=42)[0]
    ref = cold([long_prompt, short_prompt], max_tokens=24)
    llm = make_llm(
        tiers="host", write_policy="write-through", enable_chunked_prefill=False, max_num_batched_tokens=32
    )
    engine = llm.engine
    llm.generate([prefix], greedy(1))
    engine.pool.evict_all()  # the prefix is in the host tier only
    engine.hierarchy.flush()
    (decoding,) = engine.add_request(short_prompt, greedy(24))
    engine.step()  # the decode runs: the long prompt below is never first in a step while it does
    (waiting,) = engine.add_request(long_prompt, greedy(24))
    engine.step()
    assert engine.hierarchy.stats.blocks_loaded == 0  # nothing is loaded for a prompt that must wait
    final = run_until_done(engine)
    assert final[waiting].outputs[0].token_ids == ref[0]
    assert final[decoding].outputs[0].token_ids == ref[1]
    assert final[waiting].metrics["num_loaded_tokens"] == 4 * BS
    engine.pool.assert_idle()


def test_a_host_load_waits_until_its_request_has_room_for_the_rest(make_llm: MakeLLM, cold: Cold) -> None:
    """A load that runs in the admitting step is started only when the pool also has room for the
    tail computed in that step. Otherwise it would be copied and let go each step it waits (and a
    layered one, on CUDA, planned and counted again): here a decode holds 2 to 4 of 8 blocks, room
    for the 4 loaded blocks but not for the 3 of the tail, until it ends."""
    prefix, rest = make_prompts(1, 4 * BS, seed=51)[0], make_prompts(1, 3 * BS - 4, seed=53)[0]
    long_prompt, short_prompt = prefix + rest, make_prompts(1, 20, seed=52)[0]
    ref = cold([long_prompt], max_tokens=20) + cold([short_prompt], max_tokens=40)
    block_bytes = make_llm(tiers="none").engine.layout.bytes_per_block
    llm = make_llm(
        tiers="host", write_policy="write-through", kv_cache_memory=8 * block_bytes, load_at_once_s=1.0
    )
    engine = llm.engine
    llm.generate([prefix], greedy(1))
    engine.pool.evict_all()
    engine.hierarchy.flush()
    (decoding,) = engine.add_request(short_prompt, greedy(40))  # 20 -> 60 tokens: 2 -> 4 blocks
    engine.step()
    (waiting,) = engine.add_request(long_prompt, greedy(20))  # 108 -> 128 tokens: 7 -> 8 blocks
    for _ in range(3):
        engine.step()
        assert engine.hierarchy.stats.blocks_loaded == 0
        assert not any(engine.pool.contains(k) for k in block_keys(engine, prefix))
    final = run_until_done(engine)
    assert final[waiting].outputs[0].token_ids == ref[0]
    assert final[decoding].outputs[0].token_ids == ref[1]
    assert final[waiting].metrics["num_loaded_tokens"] == 4 * BS
    assert engine.hierarchy.stats.blocks_loaded == 4
    engine.pool.assert_idle()


# ---------------------------------------------------------------- 4. corruption and secrets


def flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = read_header(data).header_length
    data[start + (len(data) - start) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_disk_objects_are_rejected_deleted_and_recomputed(
    tmp_path: Path, make_llm: MakeLLM, cold: Cold
) -> None:
    prompts = make_prompts(3, 200, seed=5)
    ref = cold(prompts)
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate(prompts, greedy())
    writer.close()
    objects = disk_objects(tmp_path)
    assert len(objects) == 36
    for path in objects.values():
        flip_payload_byte(path)

    # write-back: the reader writes nothing before its close (write-through would heal at once)
    reader = make_llm(tiers="disk", disk_path=str(tmp_path), write_policy="write-back")
    outs = reader.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert loaded(outs) == [0, 0, 0] and cached(outs) == [0, 0, 0]
    stats = reader.engine.hierarchy.stats
    assert stats.corrupt == len(prompts)  # a load stops at its first bad block: one per prompt
    assert stats.blocks_loaded == 0
    assert reader.engine.hierarchy.tiers[0].stats().corrupt == len(prompts)
    firsts = [block_keys(reader.engine, p)[0] for p in prompts]
    assert not any(objects[k].exists() for k in firsts)  # the rejected objects were deleted
    reader.engine.pool.assert_idle()

    # the cache heals: the reader's close writes good copies over the rest, a restart loads them
    reader.close()
    healed = make_llm(tiers="disk", disk_path=str(tmp_path))
    outs = healed.generate(prompts, greedy())
    assert loaded(outs) == [192, 192, 192]
    assert token_ids(outs) == ref
    assert healed.engine.hierarchy.stats.corrupt == 0


def test_corrupt_host_blocks_are_rejected_deleted_and_recomputed(make_llm: MakeLLM, cold: Cold) -> None:
    """A bit flipped in the host tier's memory fails the integrity check of the load: the block
    is a counted miss, deleted, and recomputed; the output does not change."""
    prompts = make_prompts(2, 100, seed=32)
    ref = cold(prompts)
    probe = make_llm(tiers="none")
    block_bytes = probe.engine.layout.bytes_per_block
    llm = make_llm(tiers="host", kv_cache_memory=8 * block_bytes)
    engine = llm.engine
    for prompt, expected in zip(prompts, ref, strict=True):  # the second evicts the first
        assert token_ids(llm.generate([prompt], greedy())) == [expected]
    engine.hierarchy.flush()
    host = engine.hierarchy.tiers[0]
    assert isinstance(host, HostTier)
    keys = block_keys(engine, prompts[0])[:6]
    first = sum(engine.pool.contains(k) for k in keys)  # LRU kept the first blocks on the device
    held = keys[first:]
    tokens = [prompts[0][i * BS : (i + 1) * BS] for i in range(first, 6)]
    slots = host.acquire(held, tokens)
    assert len(held) >= 4 and len(slots) == len(held)
    host._row(slots[2])[block_bytes // 2] ^= 0x10  # a bit flip in RAM in the third held block
    host.release(slots)

    outs = llm.generate([prompts[0]], greedy())
    assert token_ids(outs) == ref[:1]
    assert loaded(outs) == [2 * BS]  # the two blocks before the bad one
    assert engine.hierarchy.stats.corrupt == 1 and host.stats().corrupt == 1
    assert host.lookup(held) == 2  # the bad block was deleted...
    engine.pool.assert_idle()
    assert token_ids(llm.generate([prompts[1]], greedy())) == ref[1:]  # ...stored again when evicted
    engine.hierarchy.flush()
    assert host.lookup(held) == len(held)


@pytest.mark.parametrize("read_secret", ["b", None])
def test_objects_of_another_secret_are_rejected(
    read_secret: str | None,
    tmp_path: Path,
    make_llm: MakeLLM,
    cold: Cold,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompts = make_prompts(2, 200, seed=6)
    ref = cold(prompts)
    monkeypatch.setenv("KVTIER_CACHE_SECRET", "a")
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer_ns = writer.engine.namespace
    writer.generate(prompts, greedy())
    writer.close()
    assert len(disk_objects(tmp_path)) == 24
    assert all(read_header(p.read_bytes()).has_hmac for p in disk_objects(tmp_path).values())

    if read_secret is None:
        monkeypatch.delenv("KVTIER_CACHE_SECRET")
    else:
        monkeypatch.setenv("KVTIER_CACHE_SECRET", read_secret)
    # write-back: the readers write nothing before their close (write-through would store their
    # own copies, in their own namespace, at once)
    reader = make_llm(tiers="disk", disk_path=str(tmp_path), write_policy="write-back")
    # Another secret is another namespace: the writer's objects are neither used nor touched...
    assert reader.engine.namespace != writer_ns
    outs = reader.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert loaded(outs) == [0, 0] and cached(outs) == [0, 0]
    assert reader.engine.hierarchy.stats.corrupt == 0
    assert len(disk_objects(tmp_path)) == 24
    # ...and the same objects planted in the reader's own namespace fail its HMAC check, are
    # counted and deleted (one per prompt: a load stops at its first bad block).
    theirs, ours = tmp_path / writer_ns, tmp_path / reader.engine.namespace
    shutil.rmtree(ours, ignore_errors=True)
    shutil.copytree(theirs, ours)
    again = make_llm(tiers="disk", disk_path=str(tmp_path), write_policy="write-back")
    outs = again.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert loaded(outs) == [0, 0] and cached(outs) == [0, 0]
    assert again.engine.hierarchy.stats.corrupt == len(prompts)
    assert len(list(ours.rglob("*.kvt"))) == 24 - len(prompts)
    assert len(list(theirs.rglob("*.kvt"))) == 24


def test_same_secret_is_accepted(
    tmp_path: Path, make_llm: MakeLLM, cold: Cold, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = make_prompts(2, 200, seed=6)
    monkeypatch.setenv("KVTIER_CACHE_SECRET", "a")
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate(prompts, greedy())
    writer.close()
    reader = make_llm(tiers="disk", disk_path=str(tmp_path))
    outs = reader.generate(prompts, greedy())
    assert loaded(outs) == [192, 192]
    assert token_ids(outs) == cold(prompts)
    assert reader.engine.hierarchy.stats.corrupt == 0


@pytest.mark.redis
def test_corrupt_redis_objects_are_rejected_and_deleted(
    redis_server: RedisServer, make_llm: MakeLLM, cold: Cold
) -> None:
    prompts = make_prompts(2, 100, seed=7)
    ref = cold(prompts)
    settings = {"tiers": "redis", "redis_url": redis_server.url, "write_policy": "write-through"}
    writer = make_llm(**settings)
    writer.generate(prompts, greedy())
    writer.close()
    client = redis_server.client()
    names = client.keys("kvtier:*")
    assert len(names) == 12
    for name in names:  # flip one byte of the (lz4-compressed) payload
        stored = client.get(name)
        assert isinstance(stored, bytes)
        data = bytearray(stored)
        data[-1] ^= 0x01
        client.set(name, bytes(data))
    corrupt = {name: client.get(name) for name in names}

    reader = make_llm(**{**settings, "write_policy": "write-back"})  # writes nothing until close
    outs = reader.generate(prompts, greedy())
    assert token_ids(outs) == ref
    assert loaded(outs) == [0, 0]
    stats = reader.engine.hierarchy.stats
    assert stats.corrupt == len(prompts)  # a load stops at its first bad block: one per prompt
    ns = reader.engine.fingerprint
    firsts = {f"kvtier:{ns}:{block_keys(reader.engine, p)[0].hex()}".encode() for p in prompts}
    assert set(client.keys("kvtier:*")) == set(names) - firsts  # the rejected objects were deleted
    # the reader's close writes good copies of every block it computed: the cache heals
    reader.close()
    assert set(client.keys("kvtier:*")) == set(names)
    assert all(client.get(name) != data for name, data in corrupt.items())
    healed = make_llm(**settings)
    outs = healed.generate(prompts, greedy())
    assert loaded(outs) == [96, 96] and token_ids(outs) == ref
    assert healed.engine.hierarchy.stats.corrupt == 0
    client.close()


@pytest.mark.redis
def test_redis_tier_counts_rejected_objects(redis_server: RedisServer, make_llm: MakeLLM) -> None:
    prompts = make_prompts(1, 40, seed=18)
    settings = {"tiers": "redis", "redis_url": redis_server.url, "write_policy": "write-through"}
    make_llm(**settings).generate(prompts, greedy())
    client = redis_server.client()
    for name in client.keys("kvtier:*"):
        client.set(name, b"not a kvtier object")
    client.close()
    reader = make_llm(**settings)
    reader.generate(prompts, greedy())
    assert reader.engine.hierarchy.stats.corrupt == 1
    assert reader.engine.hierarchy.tiers[0].stats().corrupt == 1


# ---------------------------------------------------------------- 5. other model, other tenant


@pytest.mark.redis
def test_other_model_fingerprint_never_hits(
    tmp_path: Path, redis_server: RedisServer, make_llm: MakeLLM, cold: Cold
) -> None:
    prompts = make_prompts(2, 200, seed=8)
    settings = {
        "tiers": "disk,redis",
        "disk_path": str(tmp_path),
        "redis_url": redis_server.url,
        "write_policy": "write-through",
    }
    writer = make_llm(seed=0, **settings)
    assert token_ids(writer.generate(prompts, greedy())) == cold(prompts, seed=0)
    writer.close()
    client = redis_server.client()
    assert len(disk_objects(tmp_path)) == 24 and redis_objects([client]) == 24

    other = make_llm(seed=1, **settings)
    assert other.engine.fingerprint != writer.engine.fingerprint
    outs = other.generate(prompts, greedy())
    ref1 = cold(prompts, seed=1)
    assert ref1 != cold(prompts, seed=0)  # the seed really makes another model
    assert token_ids(outs) == ref1
    assert cached(outs) == [0, 0] and loaded(outs) == [0, 0]
    stats = other.engine.hierarchy.stats
    assert stats.load_decisions == 0 and stats.blocks_loaded == 0 and stats.corrupt == 0
    assert [t.stats().hits for t in other.engine.hierarchy.tiers] == [0, 0]
    other.close()
    # each model keeps its own namespace: both sets of objects are there, untouched
    assert len(disk_objects(tmp_path)) == 48 and redis_objects([client]) == 48
    client.close()


def test_other_cache_salt_never_hits(tmp_path: Path, make_llm: MakeLLM, cold: Cold) -> None:
    prompts = make_prompts(2, 200, seed=9)
    writer = make_llm(tiers="disk", disk_path=str(tmp_path))
    writer.generate(prompts, greedy(), cache_salt="tenant-a")
    writer.close()

    reader = make_llm(tiers="disk", disk_path=str(tmp_path))
    outs = reader.generate(prompts, greedy(), cache_salt="tenant-b")
    assert cached(outs) == [0, 0]
    assert token_ids(outs) == cold(prompts)
    outs = reader.generate(prompts, greedy(), cache_salt="tenant-a")
    assert loaded(outs) == [192, 192]
    assert token_ids(outs) == cold(prompts)


# ---------------------------------------------------------------- 6. Redis dies mid-workload


def wait_for_breaker(engine: Engine) -> None:
    """Sleep until the Redis tier's breaker lets the next call through (its backoff has passed)."""
    assert engine.hierarchy is not None
    extra = engine.hierarchy.tiers[-1].stats().extra
    if extra["breaker_open"]:
        time.sleep(extra["breaker_backoff_seconds"] + 0.05)


def redis_write_through(server: RedisServer) -> dict[str, object]:
    """Engine settings for the Redis crash tests: every block stored at once, on this server."""
    return {
        "tiers": "redis",
        "redis_url": server.url,
        "write_policy": "write-through",
        "redis_timeout": 1.0,  # a dead server refuses at once; a busy CI box may be slow
    }


@pytest.mark.redis
def test_redis_killed_mid_workload(restartable_redis: RedisServer, make_llm: MakeLLM, cold: Cold) -> None:
    server = restartable_redis
    prompts = make_prompts(6, 100, seed=10)
    ref = cold(prompts)
    settings = redis_write_through(server)
    client = server.client()

    # killed during a batch: 64-token steps, so prefill and write-through go on after the kill
    # (steps not overlapped: each step's blocks are committed by the step itself, as counted below)
    llm = make_llm(max_num_batched_tokens=64, overlap_steps=False, **settings)
    engine = llm.engine
    ids = [engine.add_request(p, greedy())[0] for p in prompts[:3]]
    engine.step()
    engine.step()
    engine.hierarchy.flush()
    assert redis_objects([client]) == 7  # 100 + 28 tokens computed: 6 + 1 full blocks stored
    client.close()
    server.kill()
    final = run_until_done(engine)
    assert [final[i].outputs[0].token_ids for i in ids] == ref[:3]
    assert engine.hierarchy.tiers[0].stats().errors > 0
    engine.pool.assert_idle()

    # killed between calls: the same engine and a new one (started while Redis is down) recompute
    assert token_ids(llm.generate([prompts[3]], greedy())) == ref[3:4]
    fresh = make_llm(**settings)
    outs = fresh.generate(prompts[:2], greedy())
    assert token_ids(outs) == ref[:2] and cached(outs) == [0, 0]

    # restarted on the same port (empty: no persistence): once the backoff passes, writes work again
    server.start()
    client = server.client()
    wait_for_breaker(engine)
    assert token_ids(llm.generate([prompts[4]], greedy())) == ref[4:5]
    engine.hierarchy.flush()
    assert redis_objects([client]) == 6
    # ...and loads: a new engine gets the blocks the old one wrote, and the old one reads new blocks
    reader = make_llm(**settings)
    outs = reader.generate([prompts[4], prompts[5]], greedy())
    assert loaded(outs) == [96, 0] and token_ids(outs) == ref[4:6]
    reader.engine.hierarchy.flush()
    outs = llm.generate([prompts[5]], greedy())
    assert loaded(outs) == [96] and token_ids(outs) == ref[5:6]
    assert engine.hierarchy.tiers[0].stats().extra["breaker_state"] == 0
    client.close()


@pytest.mark.redis
def test_redis_killed_while_a_load_is_in_flight(
    restartable_redis: RedisServer, make_llm: MakeLLM, cold: Cold
) -> None:
    server = restartable_redis
    prompts = make_prompts(1, 100, seed=11)
    ref = cold(prompts)
    settings = redis_write_through(server)
    writer = make_llm(**settings)
    writer.generate(prompts, greedy())
    writer.close()

    llm = make_llm(**settings)
    engine = llm.engine
    hierarchy = engine.hierarchy
    gate, holds = hold_io_threads(engine)
    try:
        (rid,) = engine.add_request(prompts[0], greedy())
        engine.step()
        assert [r.request_id for r in engine.scheduler.loading] == [rid]
        server.kill()
    finally:
        gate.set()
    for h in holds:
        h.result(timeout=10)
    final = run_until_done(engine)
    assert final[rid].outputs[0].token_ids == ref[0]
    assert final[rid].metrics["num_loaded_tokens"] == 0  # the fetch failed: recomputed
    assert hierarchy.stats.corrupt == 0
    engine.pool.assert_idle()


# ---------------------------------------------------------------- 7. Redis Cluster


@pytest.mark.redis
def test_redis_cluster_write_through_then_load(
    redis_cluster: RedisClusterServers, make_llm: MakeLLM, cold: Cold
) -> None:
    clients = [n.client() for n in redis_cluster.nodes]
    for c in clients:
        c.flushall()
    prompts = make_prompts(3, 200, seed=12)
    ref = cold(prompts)
    settings = {"tiers": "redis", "redis_url": redis_cluster.url, "write_policy": "write-through"}

    writer = make_llm(**settings)
    assert token_ids(writer.generate(prompts, greedy())) == ref
    writer.close()
    assert redis_objects(clients) == 36
    assert all(len(c.keys("kvtier:*")) > 0 for c in clients)  # spread over every primary

    reader = make_llm(**settings)
    outs = reader.generate(prompts, greedy())
    assert cached(outs) == [192, 192, 192] and loaded(outs) == [192, 192, 192]
    assert token_ids(outs) == ref
    assert reader.engine.hierarchy.stats.corrupt == 0
    for c in clients:
        c.close()


# ---------------------------------------------------------------- 8. write policies


@pytest.mark.parametrize("hits_needed", [2, 3])
def test_selective_writes_only_blocks_hit_enough(
    hits_needed: int, tmp_path: Path, make_llm: MakeLLM, cold: Cold
) -> None:
    probe = make_llm(tiers="none")
    llm = make_llm(
        tiers="disk",
        disk_path=str(tmp_path),
        write_policy="selective",
        selective_hits=hits_needed,
        kv_cache_memory=12 * probe.engine.layout.bytes_per_block,
    )
    engine = llm.engine
    hot, warm = make_prompts(2, 64, seed=13)  # 71 computed tokens: 4 full blocks, 3 reusable
    for _ in range(hits_needed + 1):  # first run computes, the others hit blocks 0-2
        assert token_ids(llm.generate([hot], greedy())) == cold([hot])
    for _ in range(hits_needed):  # one hit short
        assert token_ids(llm.generate([warm], greedy())) == cold([warm])
    flood = make_prompts(6, 64, seed=14)  # 6 one-off prompts, 30 blocks: evicts everything
    assert token_ids(llm.generate(flood, greedy())) == cold(flood)
    engine.hierarchy.flush()

    hot_keys = block_keys(engine, hot)[:4]
    warm_keys = block_keys(engine, warm)[:4]
    assert not any(engine.pool.contains(k) for k in hot_keys + warm_keys)  # all evicted
    # hot blocks 0-2 were hit hits_needed times; hot block 3 (never matched), warm and flood: fewer
    assert set(disk_objects(tmp_path)) == set(hot_keys[:3])
    engine.pool.assert_idle()


def test_write_through_stores_before_any_eviction(tmp_path: Path, make_llm: MakeLLM) -> None:
    llm = make_llm(tiers="disk", disk_path=str(tmp_path), write_policy="write-through")
    prompts = make_prompts(3, 200, seed=15)
    llm.generate(prompts, greedy())
    llm.engine.hierarchy.flush()
    assert llm.engine.pool.evictions == 0
    want = {k for p in prompts for k in block_keys(llm.engine, p)[:12]}
    assert set(disk_objects(tmp_path)) == want
    llm.close()  # write-through stored everything already: close adds nothing
    assert set(disk_objects(tmp_path)) == want
    assert llm.engine.hierarchy is None


def test_write_back_stores_nothing_before_eviction(tmp_path: Path, make_llm: MakeLLM) -> None:
    llm = make_llm(tiers="disk", disk_path=str(tmp_path), write_policy="write-back")
    prompts = make_prompts(2, 200, seed=16)
    llm.generate(prompts, greedy())
    llm.engine.hierarchy.flush()
    assert llm.engine.pool.evictions == 0
    assert disk_objects(tmp_path) == {}
    llm.close()
    assert set(disk_objects(tmp_path)) == {k for p in prompts for k in block_keys(llm.engine, p)[:12]}


def test_cpu_loads_reuse_recycled_buffers_and_stay_correct(tmp_path: Path) -> None:
    """A CPU load lands in the memory of a load the engine handed back (no fresh pages), and the
    blocks are still exactly the stored ones."""
    from kvtier.cache.codec import CodecConfig, encode_block
    from kvtier.cache.hierarchy import KVHierarchy, LoadPlan, Segment
    from kvtier.cache.keys import KVLayout
    from kvtier.cache.tiers.disk import DiskTier

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=BS, dtype="float32")
    keys = chain_keys(bytes(32), list(range(8 * BS)), BS)
    tokens = [list(range(i * BS, (i + 1) * BS)) for i in range(8)]
    kv = torch.randn((8, *layout.block_shape), generator=torch.Generator().manual_seed(0))
    disk = DiskTier(tmp_path, "fp", 1 << 30)
    disk.put([(k, encode_block(k, "fp", layout, tokens[i], kv[i])) for i, k in enumerate(keys)])
    hierarchy = KVHierarchy([disk], [CodecConfig()], layout, "fp")
    try:
        first = hierarchy.load_async(LoadPlan(keys, [Segment(0, 0, 8)], 0.0, 0.0), tokens).result()
        assert torch.equal(first, kv)
        pointer = first.data_ptr()
        hierarchy.recycle(first)
        plan = LoadPlan(keys[2:7], [Segment(0, 0, 5)], 0.0, 0.0)
        second = hierarchy.load_async(plan, tokens[2:7]).result()
        assert second.data_ptr() == pointer  # the same memory, now holding other blocks
        assert torch.equal(second, kv[2:7])
        third = hierarchy.load_async(plan, tokens[2:7]).result()  # nothing recycled: new memory
        assert third.data_ptr() != pointer and torch.equal(third, kv[2:7])
    finally:
        hierarchy.close()


def test_in_place_disk_read_decodes_a_compressed_object_of_raw_size(tmp_path: Path) -> None:
    """An lz4 object whose compressed payload is exactly a raw block long has the file size the
    in-place reader expects; it must still be decompressed, never served as raw KV."""
    from kvtier.cache.codec import CodecConfig, encode_block
    from kvtier.cache.hierarchy import KVHierarchy
    from kvtier.cache.keys import KVLayout
    from kvtier.cache.tiers.disk import DiskTier

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=BS, dtype="bfloat16")
    raw_size, lz4 = layout.bytes_per_block, CodecConfig("none", "lz4")
    key, tokens = chain_keys(bytes(32), list(range(BS)), BS)[0], list(range(BS))
    noise = torch.randint(0, 256, (raw_size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def block(random_bytes: int) -> torch.Tensor:  # that many random bytes, zeros after
        b = torch.zeros(raw_size, dtype=torch.uint8)
        b[:random_bytes] = noise[:random_bytes]
        return b.view(torch.bfloat16).reshape(layout.block_shape)

    def payload(random_bytes: int) -> int:
        return read_header(encode_block(key, "fp", layout, tokens, block(random_bytes), lz4)).payload_length

    lo, hi = 0, raw_size  # the fewest random bytes whose lz4 payload is >= a raw block
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if payload(mid) >= raw_size else (mid + 1, hi)
    if payload(lo) != raw_size:
        pytest.skip("no lz4 payload of exactly the raw size for this data")
    kv = block(lo)
    disk = DiskTier(tmp_path, "fp", 1 << 30)
    disk.put([(key, encode_block(key, "fp", layout, tokens, kv, lz4))])
    hierarchy = KVHierarchy([disk], [CodecConfig()], layout, "fp", always_load=True)  # reads "none"
    try:
        out = hierarchy.load_async(hierarchy.plan([key]), [tokens]).result()
        as_bytes = out[0].reshape(-1).view(torch.uint8)  # random bytes: NaNs would never compare equal
        assert out.shape[0] == 1 and torch.equal(as_bytes, kv.reshape(-1).view(torch.uint8))
        assert hierarchy.stats.corrupt == 0
    finally:
        hierarchy.close()
