"""Tier benchmarks: tier bandwidth against its ceiling, a multi-round chat workload, eviction policies.

    python3 bench/bench_tiers.py ceilings  [--model synthetic:small --total 256MiB --batch-blocks 64]
    python3 bench/bench_tiers.py chat      [--conversations 16 --turns 4 --pool-ratio 4 --rounds 3 --redis]
    python3 bench/bench_tiers.py policies  [--requests 3000 --capacities 0.02,0.04,0.08]

ceilings: for one realistic KV block (the layout of --model: synthetic:small is 12 layers, 4 KV heads,
head_dim 64, block 16; float32 on CPU, bfloat16 on CUDA; no weights are loaded) it stores --total bytes
of blocks in each tier and times reading them back, with the tier's codec, against the ceiling of the
medium underneath, measured in the same run on the same bytes:
  host   get + decode  vs  a plain memory copy (CPU: numpy, one thread, like the tier's I/O thread)
                           or a pinned host-to-device copy (CUDA)
  disk   get + decode  vs  a sequential read of one file of the same total size, cold (page cache
                           dropped with posix_fadvise DONTNEED on every file first) and warm
  redis  get + decode  vs  redis-py GETs of the same objects, pipelined, on the same server; and
         put           vs  pipelined SETs of the same objects
Each figure is the median of --repeats; a ceiling is the best of its repeats. The issue's aims (host
>= 80%, disk >= 70%, Redis >= 50% of the ceiling) are printed as met or not, never asserted. Rows
without an aim break the time down (get alone, decode alone, the hierarchy's whole load path).
Redis: a redis-server of its own on a free 127.0.0.1 port (stopped at the end), or --redis-url.

chat: several conversations sharing a system prompt, each round re-sending the whole history (built
at the token level, as kvtier.demo does), driven by --clients closed-loop clients. The device pool is
sized so that the blocks the workload can reuse are --pool-ratio times the pool. Three configurations
on one loaded model: the tiers below the pool (disk in a temp folder, + Redis with --redis), the
device pool alone (tiers none), and no prefix caching. After one untimed pass of the workload (the
first pass after loading runs slower), each configuration runs --rounds (3) times on a fresh engine
with empty tiers, the order rotating each round (ABC, BCA, CAB). Prints each run's wall time, then,
for the run with the median wall time of each configuration, TTFT p50/p95, output tokens/s, prompt
tokens computed / loaded from a tier / hit in the device pool, wall time; and whether the greedy
outputs of every run are identical.

policies: the block-key trace of a chat workload (hot shared system prompts, conversations that grow
turn by turn, one-off long "scan" requests) replayed against kvtier.cache.blocks.BlockPool with
match_prefix / pin / allocate / commit / release, as the scheduler drives it; no model. Prints the
block hit ratio of every eviction policy at a few pool capacities, next to an unbounded pool (the
best any policy can do: only first references miss).

Every subcommand prints the machine and its settings; --json PATH writes every raw figure. This script
never asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script from bench/: the engine benchmark's output helpers are shared, not copied.
from bench_engine import load_average, machine_info, parse_bytes, print_table, sync

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import redis

from kvtier.cache.blocks import BlockPool
from kvtier.cache.codec import CodecConfig, decode_block, encode_block
from kvtier.cache.hierarchy import KVHierarchy, LoadPlan, Segment
from kvtier.cache.keys import BlockKey, KVLayout, chain_keys, root_key
from kvtier.cache.policy import POLICIES
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.host import HostTier
from kvtier.cache.tiers.redis import KEY_PREFIX
from kvtier.config import EngineConfig, TierSettings
from kvtier.engine.engine import Engine, resolve_device
from kvtier.engine.request import RequestOutput, SamplingParams
from kvtier.engine.tiers import make_tier, parse_codec
from kvtier.model.loader import SYNTHETIC_MODELS, SYNTHETIC_PREFIX, load_model

GB = 1e9
MiB = 1 << 20
AIMS = {"host": 0.80, "disk": 0.70, "redis": 0.50}  # the issue's: achieved / ceiling
FINGERPRINT = "bench-tiers"  # stands in for a model fingerprint: namespace and codec header


# -- small helpers ---------------------------------------------------------------------------------


def print_machine(title: str, machine: dict[str, Any]) -> None:
    print(f"## {title}\n")
    cuda = f", CUDA {machine['cuda']}" if machine["cuda"] else ""
    load = machine["load_average_1m"]
    busy = f"; load average {load:.2f}" if load is not None else ""
    print(
        f"machine:  {machine['device']} ({machine['device_name']}); torch {machine['torch']}{cuda}; "
        f"{machine['torch_threads']} torch threads, {machine['cpu_count']} CPUs{busy}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def finish(args: argparse.Namespace, title: str, machine: dict[str, Any], results: dict[str, Any]) -> None:
    load = load_average()
    machine["load_average_1m_after"] = load
    if load is not None:
        print(f"\nload average at the end: {load:.2f}")
    if args.json:
        doc = {"bench": args.command, "title": title, "argv": sys.argv[1:], "machine": machine}
        doc["results"] = results
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


# -- a redis-server of our own -----------------------------------------------------------------------
class LocalRedis:
    """redis-server on a free 127.0.0.1 port, no persistence, in a temp folder (as tests/redis_servers.py).

    ``stop()`` terminates the process this object started, and nothing else.
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.folder = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3, timeout: float = 10.0) -> LocalRedis:
        for _ in range(attempts):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                self.port = int(s.getsockname()[1])
            argv = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--logfile", os.path.join(self.folder, "redis.log"),
            ]  # fmt: skip
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2)
                try:
                    if client.ping():
                        return self
                except (redis.RedisError, OSError):
                    time.sleep(0.02)
                finally:
                    client.close()
            self.stop()  # the port was taken meanwhile, or it did not come up: try another
        raise RuntimeError(f"redis-server did not start; see {self.folder}/redis.log")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    """The URL of a Redis to use (ours, started here, or --redis-url), or None when there is none."""
    if args.redis_url:
        yield args.redis_url
        return
    binary = args.redis_server or shutil.which("redis-server")
    if binary is None:
        print("note: no redis-server on PATH (install it or pass --redis-url): the Redis part is skipped\n")
        yield None
        return
    server = LocalRedis(binary).start()
    try:
        yield server.url
    finally:
        server.cleanup()


# -- ceilings: the layout of a model, without its weights -----------------------------------------------
def model_layout(model: str, block_size: int, dtype: str) -> KVLayout:
    """KV layout of ``synthetic:<name>`` (from SYNTHETIC_MODELS) or of a checkpoint's config.json."""
    if model.startswith(SYNTHETIC_PREFIX):
        name = model[len(SYNTHETIC_PREFIX) :]
        if name not in SYNTHETIC_MODELS:
            raise SystemExit(f"unknown synthetic model {name!r}; available: {', '.join(SYNTHETIC_MODELS)}")
        spec: dict[str, Any] = SYNTHETIC_MODELS[name]
    else:
        path = Path(model) / "config.json"
        if not path.exists():
            raise SystemExit(f"{model!r} is neither synthetic:<name> nor a folder with config.json")
        spec = json.loads(path.read_text())
        spec = spec.get("text_config", spec)
    heads = spec["num_attention_heads"]
    return KVLayout(
        num_layers=spec["num_hidden_layers"],
        num_kv_heads=spec.get("num_key_value_heads") or heads,
        head_dim=spec.get("head_dim") or spec["hidden_size"] // heads,
        block_size=block_size,
        dtype=dtype,
    )


@dataclass
class Blocks:
    """The data every tier stores: keys, token ids, KV and the encoded objects per codec."""

    layout: KVLayout
    keys: list[BlockKey]
    tokens: list[list[int]]
    kv: torch.Tensor  # [n, *block_shape] on the CPU
    encoded: dict[CodecConfig, list[bytes]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def kv_bytes(self) -> int:
        return self.n * self.layout.bytes_per_block

    def objects(self, codec: CodecConfig) -> list[bytes]:
        if codec not in self.encoded:
            self.encoded[codec] = [
                encode_block(k, FINGERPRINT, self.layout, t, self.kv[i], codec)
                for i, (k, t) in enumerate(zip(self.keys, self.tokens, strict=True))
            ]
        return self.encoded[codec]

    def batches(self, size: int) -> list[range]:
        return [range(i, min(i + size, self.n)) for i in range(0, self.n, size)]


def make_blocks(layout: KVLayout, total: int, seed: int) -> Blocks:
    n = max(1, total // layout.bytes_per_block)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((n, *layout.block_shape), generator=gen).to(getattr(torch, layout.dtype))
    tokens = [[rng.randrange(256) for _ in range(layout.block_size)] for _ in range(n)]
    flat = [t for block in tokens for t in block]
    keys = chain_keys(root_key(FINGERPRINT, layout), flat, layout.block_size)
    return Blocks(layout, keys, tokens, kv)


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls; ``before`` runs untimed ahead of each (cache drops)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


@dataclass
class Row:
    """One timed operation: moves ``nbytes`` per call; compared with ``ceiling`` (a key of the ceilings)."""

    tier: str
    operation: str
    nbytes: int
    times: list[float]
    ceiling: str | None = None
    judged: bool = False  # the aim applies to this row
    misses: int = 0

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def bandwidth(self) -> float:
        return self.nbytes / self.seconds


# The operations on one tier. Each returns how many blocks missed (must be 0 for a valid figure).
def op_get(tier: Tier, blocks: Blocks, batch: int) -> Callable[[], int]:
    def run() -> int:
        misses = 0
        for r in blocks.batches(batch):
            misses += sum(d is None for d in tier.get(blocks.keys[r.start : r.stop]))
        return misses

    return run


def op_decode(blocks: Blocks, codec: CodecConfig) -> Callable[[], int]:
    objects = blocks.objects(codec)

    def run() -> int:
        for i, data in enumerate(objects):
            decode_block(
                data,
                key=blocks.keys[i],
                fingerprint=FINGERPRINT,
                layout=blocks.layout,
                tokens=blocks.tokens[i],
            )
        return 0

    return run


def op_get_decode(tier: Tier, blocks: Blocks, batch: int) -> Callable[[], int]:
    def run() -> int:
        misses = 0
        for r in blocks.batches(batch):
            for i, data in zip(r, tier.get(blocks.keys[r.start : r.stop]), strict=True):
                if data is None:
                    misses += 1
                    continue
                decode_block(
                    data,
                    key=blocks.keys[i],
                    fingerprint=FINGERPRINT,
                    layout=blocks.layout,
                    tokens=blocks.tokens[i],
                )
        return misses

    return run


def op_load(hierarchy: KVHierarchy, blocks: Blocks, batch: int) -> Callable[[], int]:
    """The engine's load path: the hierarchy's I/O thread fetches, verifies and lands a segment on
    the hierarchy's device (the future completes when the copies have)."""

    def run() -> int:
        misses = 0
        for r in blocks.batches(batch):
            keys = blocks.keys[r.start : r.stop]
            plan = LoadPlan(keys, [Segment(0, 0, len(keys))], 0.0, 0.0)
            out = hierarchy.load_async(plan, blocks.tokens[r.start : r.stop]).result()
            misses += len(keys) - int(out.shape[0])
            hierarchy.recycle(out)  # as the engine does once it has installed the blocks
        return misses

    return run


def measure(
    tier: str,
    operation: str,
    fn: Callable[[], int],
    nbytes: int,
    repeats: int,
    ceiling: str | None = None,
    judged: bool = False,
    before: Callable[[], object] | None = None,
    warmup: bool = True,
) -> Row:
    misses = fn() if warmup else 0
    result: list[int] = []

    def call() -> None:
        result.append(fn())

    times = timed(call, repeats, before)
    return Row(tier, operation, nbytes, times, ceiling, judged, misses + sum(result))


# -- ceilings of the media ----------------------------------------------------------------------------
def memcpy_ceiling(nbytes: int, repeats: int) -> list[float]:
    """One thread copying ``nbytes`` between two large buffers (numpy's copyto is a memcpy)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return timed(lambda: np.copyto(dst, src), repeats)


def h2d_ceiling(nbytes: int, repeats: int, device: torch.device, pinned: bool) -> list[float]:
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        dst.copy_(src, non_blocking=pinned)
        sync(device)

    copy()
    return timed(copy, repeats)


def drop_page_cache(paths: Sequence[str]) -> None:
    """Ask the kernel to drop the cached pages of every file (they are clean: written and synced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(path: str, nbytes: int, chunk: int = 8 * MiB) -> Callable[[], object]:
    """Read the whole file in ``chunk``-sized reads into one buffer of its size (faulted in once, as
    the tier's reads land in memory too; a small reused buffer would stay in the CPU cache)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)

    def read() -> int:
        total = 0
        with open(path, "rb", buffering=0) as f:
            while total < nbytes and (n := f.readinto(view[total : total + chunk])):
                total += n
        return total

    return read


def redis_get_ceiling(client: redis.Redis, names: list[bytes], batch: int) -> Callable[[], int]:
    def run() -> int:
        misses = 0
        for i in range(0, len(names), batch):
            pipe = client.pipeline(transaction=False)
            for name in names[i : i + batch]:
                pipe.get(name)
            misses += sum(v is None for v in pipe.execute())
        return misses

    return run


def redis_set_ceiling(client: redis.Redis, objects: list[bytes], batch: int) -> Callable[[], int]:
    def run() -> int:
        for i in range(0, len(objects), batch):
            pipe = client.pipeline(transaction=False)
            for j, data in enumerate(objects[i : i + batch]):
                pipe.set(f"kvtier-bench:set:{i + j}", data)
            pipe.execute()
        return 0

    return run


def host_store(host: HostTier, blocks: Blocks) -> Callable[[], int]:
    """The host tier's write path (the hierarchy's I/O thread): copy into a slot, sum it."""

    def run() -> int:
        for i, key in enumerate(blocks.keys):
            host.store(key, blocks.tokens[i], blocks.kv[i])
        return 0

    return run


def tier_put(tier: Tier, keys: list[BlockKey], objects: list[bytes], batch: int) -> Callable[[], int]:
    def run() -> int:
        for i in range(0, len(keys), batch):
            tier.put(list(zip(keys[i : i + batch], objects[i : i + batch], strict=True)))
        return 0

    return run


# -- ceilings: the subcommand ---------------------------------------------------------------------------
def bench_ceilings(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    layout = model_layout(args.model, args.block_size, dtype)
    total = parse_bytes(args.total)
    blocks = make_blocks(layout, total, args.seed)
    defaults = TierSettings()
    codecs = {
        "disk": parse_codec(args.disk_codec or defaults.disk_codec),
        "redis": parse_codec(args.redis_codec or defaults.redis_codec),
    }
    title = (
        f"ceilings: {blocks.n} KV blocks of {args.model} ({layout.bytes_per_block / 1024:.0f} KiB each, "
        f"{blocks.kv_bytes / MiB:.0f} MiB), {args.batch_blocks} blocks per call, median of {args.repeats}"
    )
    machine = machine_info(device)
    print_machine(title, machine)
    print(
        f"layout:   {layout.num_layers} layers x 2 x {layout.block_size} tokens x {layout.num_kv_heads} "
        f"KV heads x {layout.head_dim} ({layout.dtype}); random normal KV (the worst case for compression)"
    )
    sizes = {name: statistics.mean(len(o) for o in blocks.objects(c)) for name, c in codecs.items()}
    print(
        "codecs:   "
        + ", ".join(
            f"{name} {c.quantization}+{c.compression} ({sizes[name] / 1024:.1f} KiB objects)"
            for name, c in codecs.items()
        )
    )
    print(f"redis-py: {redis.__version__}, parser {'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'python'}")
    repeats = args.repeats
    rows: list[Row] = []
    ceilings: dict[str, list[float]] = {}
    ceiling_bytes: dict[str, int] = {}
    fetch_device = device if device.type == "cuda" else None
    load_label = "hierarchy load to the GPU" if fetch_device is not None else "hierarchy load"
    cold_ok = hasattr(os, "posix_fadvise")

    kvb, b = blocks.kv_bytes, args.batch_blocks
    # host memory: raw blocks in the (pinned on CUDA) slab; a load lands on the device, checked there
    if "host" in args.only:
        host_bytes = blocks.kv_bytes
        if device.type == "cuda":
            ceilings["pinned H2D copy"] = h2d_ceiling(host_bytes, repeats, device, pinned=True)
            ceilings["pageable H2D copy"] = h2d_ceiling(host_bytes, repeats, device, pinned=False)
            ceiling_bytes["pinned H2D copy"] = ceiling_bytes["pageable H2D copy"] = host_bytes
            host_ceiling = "pinned H2D copy"
        else:
            host_ceiling = "memcpy, 1 thread"
        ceilings["memcpy, 1 thread"] = memcpy_ceiling(host_bytes, repeats)
        ceiling_bytes["memcpy, 1 thread"] = host_bytes
        settings = TierSettings(host_capacity=host_bytes + layout.bytes_per_block)
        host = make_tier("host", settings, FINGERPRINT, layout, pin_memory=device.type == "cuda")
        assert isinstance(host, HostTier)
        rows.append(measure("host", "store", host_store(host, blocks), blocks.kv_bytes, 1, warmup=False))
        hier = KVHierarchy([host], [None], layout, FINGERPRINT, device=device)
        rows.append(measure("host", load_label, op_load(hier, blocks, b), kvb, repeats, host_ceiling, True))
        hier.close()

    # local disk
    if "disk" in args.only:
        disk_root = tempfile.mkdtemp(prefix="kvtier-bench-disk-", dir=args.disk_path)
        try:
            objects = blocks.objects(codecs["disk"])
            disk_bytes = sum(len(o) for o in objects)
            big = os.path.join(disk_root, "sequential.bin")
            with open(big, "wb") as f:
                for o in objects:
                    f.write(o)
            settings = TierSettings(disk_path=disk_root, disk_capacity=2 * disk_bytes + (64 << 20))
            disk = make_tier("disk", settings, FINGERPRINT, layout)
            tier_put(disk, blocks.keys, objects, b)()
            os.sync()  # clean pages: DONTNEED drops only those
            paths = [disk.path_of(k) for k in blocks.keys]
            read_big = sequential_read(big, disk_bytes)
            drop_big = (lambda: drop_page_cache([big])) if cold_ok else None
            drop_tier = (lambda: drop_page_cache(paths)) if cold_ok else None
            hier = KVHierarchy([disk], [codecs["disk"]], layout, FINGERPRINT, device=device)
            modes = (("cold", True), ("warm", False)) if cold_ok else (("warm", False),)
            for mode, cold in modes:
                name = f"sequential read, {mode}"
                ceiling_bytes[name] = disk_bytes
                ceilings[name] = timed(read_big, repeats, drop_big if cold else None)
                before = drop_tier if cold else None
                rows.append(
                    measure(
                        f"disk {mode}", "get", op_get(disk, blocks, b), kvb, repeats, name, before=before,
                        warmup=not cold,
                    )
                )  # fmt: skip
                rows.append(
                    measure(
                        f"disk {mode}", "get + decode", op_get_decode(disk, blocks, b), kvb, repeats, name,
                        before=before, warmup=not cold,
                    )
                )  # fmt: skip
                rows.append(
                    measure(
                        f"disk {mode}", load_label, op_load(hier, blocks, b), kvb, repeats,
                        name, True, before=before, warmup=not cold,
                    )
                )  # fmt: skip
            hier.close()
        finally:
            shutil.rmtree(disk_root, ignore_errors=True)

    # Redis
    redis_info: dict[str, Any] = {}
    if "redis" in args.only:
        with redis_for(args) as url:
            if url is not None:
                redis_codec = codecs["redis"]
                rows += bench_redis(
                    url, blocks, fetch_device, redis_codec, layout, args, ceilings, ceiling_bytes, redis_info
                )

    if not cold_ok:
        print("note: os.posix_fadvise is not available here: no cold disk figures")
    print()
    print_ceilings(ceilings, ceiling_bytes)
    print()
    print_rows(rows, ceilings, ceiling_bytes, blocks.n)
    print(
        "\nGB/s = bytes of KV delivered (decoded blocks; for get and put: the same KV bytes) / median time. "
        "A ceiling moves the same stored bytes (objects, headers included); its GB/s is the best of its "
        "repeats. hierarchy load is KVHierarchy.load_async over "
        f"{args.batch_blocks}-block segments, landing on the {'GPU' if fetch_device else 'CPU'}: the "
        "engine's read path, judged for the host tier and for the disk tier (whose default, "
        "uncompressed objects are read into place and checked where they land); get + decode is the "
        "Tier protocol's path (compressed objects), judged for Redis, whose default codec is lz4."
    )
    results = {
        "layout": vars(layout) | {"bytes_per_block": layout.bytes_per_block},
        "blocks": blocks.n,
        "kv_bytes": blocks.kv_bytes,
        "batch_blocks": args.batch_blocks,
        "codecs": {k: vars(v) for k, v in codecs.items()},
        "object_bytes_mean": sizes,
        "ceilings": {
            k: {"bytes": ceiling_bytes[k], "times_s": v, "bandwidth": ceiling_bytes[k] / min(v)}
            for k, v in ceilings.items()
        },
        "rows": [
            {
                "tier": r.tier,
                "operation": r.operation,
                "bytes": r.nbytes,
                "times_s": r.times,
                "bandwidth": r.bandwidth,
                "ceiling": r.ceiling,
                "fraction": fraction_of(r, ceilings, ceiling_bytes),
                "aim": AIMS.get(r.tier.split()[0]) if r.judged else None,
                "misses": r.misses,
            }
            for r in rows
        ],
        "redis": redis_info,
    }
    finish(args, title, machine, results)


def bench_redis(
    url: str,
    blocks: Blocks,
    device: torch.device | None,
    codec: CodecConfig,
    layout: KVLayout,
    args: argparse.Namespace,
    ceilings: dict[str, list[float]],
    ceiling_bytes: dict[str, int],
    info: dict[str, Any],
) -> list[Row]:
    repeats, b = args.repeats, args.batch_blocks
    load_label = "hierarchy load to the GPU" if device is not None else "hierarchy load"
    objects = blocks.objects(codec)
    nbytes = sum(len(o) for o in objects)
    settings = TierSettings(redis_url=url)
    tier = make_tier("redis", settings, FINGERPRINT, layout)
    client = redis.Redis.from_url(url, socket_timeout=30)
    rows: list[Row] = []
    try:
        info["server"] = client.info("server").get("redis_version")
        info["url"] = url
        put = tier_put(tier, blocks.keys, objects, b)
        rows.append(measure("redis", "put", put, blocks.kv_bytes, repeats, "pipelined SET", True))
        set_ceiling = redis_set_ceiling(client, objects, b)
        set_ceiling()  # warm-up, as measure() does for put: later runs overwrite existing keys
        ceilings["pipelined SET"] = timed(set_ceiling, repeats)
        ceiling_bytes["pipelined SET"] = nbytes
        client.delete(*[f"kvtier-bench:set:{i}" for i in range(len(objects))])
        names = [f"{KEY_PREFIX}:{FINGERPRINT}:{k.hex()}".encode() for k in blocks.keys]
        get_ceiling = redis_get_ceiling(client, names, b)
        info["ceiling_get_misses"] = get_ceiling()  # warm-up; 0 unless the tier's names changed
        ceilings["pipelined GET"] = timed(get_ceiling, repeats)
        ceiling_bytes["pipelined GET"] = nbytes
        hier = KVHierarchy([tier], [codec], layout, FINGERPRINT, device=device or "cpu")
        rows.append(
            measure("redis", "get", op_get(tier, blocks, b), blocks.kv_bytes, repeats, "pipelined GET")
        )
        rows.append(
            measure("redis", "decode", op_decode(blocks, codec), blocks.kv_bytes, repeats, "pipelined GET")
        )
        rows.append(
            measure(
                "redis", "get + decode", op_get_decode(tier, blocks, b), blocks.kv_bytes, repeats,
                "pipelined GET", True,
            )
        )  # fmt: skip
        rows.append(
            measure(
                "redis", load_label, op_load(hier, blocks, b), blocks.kv_bytes, repeats,
                "pipelined GET",
            )
        )  # fmt: skip
        info["tier_stats"] = tier.stats().as_dict()
        tier.clear()
        hier.close()
    finally:
        client.close()
    return rows


def fraction_of(row: Row, ceilings: dict[str, list[float]], ceiling_bytes: dict[str, int]) -> float | None:
    if row.ceiling is None or row.ceiling not in ceilings:
        return None
    return row.bandwidth / (ceiling_bytes[row.ceiling] / min(ceilings[row.ceiling]))


def print_ceilings(ceilings: dict[str, list[float]], ceiling_bytes: dict[str, int]) -> None:
    rows = []
    for name, times in ceilings.items():
        nbytes = ceiling_bytes[name]
        rows.append(
            [
                name,
                f"{nbytes / MiB:.0f}",
                f"{nbytes / min(times) / GB:.2f}",
                f"{nbytes / statistics.median(times) / GB:.2f}",
                f"{nbytes / max(times) / GB:.2f}",
            ]
        )
    print_table(["ceiling", "MiB", "best GB/s", "median GB/s", "worst GB/s"], rows)


def print_rows(
    rows: list[Row], ceilings: dict[str, list[float]], ceiling_bytes: dict[str, int], n_blocks: int
) -> None:
    table = []
    for r in rows:
        frac = fraction_of(r, ceilings, ceiling_bytes)
        aim = AIMS.get(r.tier.split()[0]) if r.judged else None
        met = "-" if aim is None or frac is None else ("met" if frac >= aim else "NOT met")
        table.append(
            [
                r.tier,
                r.operation,
                f"{r.bandwidth / GB:.2f}",
                f"{1e6 * r.seconds / n_blocks:.0f}",
                r.ceiling or "-",
                f"{100 * frac:.1f}%" if frac is not None else "-",
                f">= {100 * aim:.0f}%" if aim is not None else "",
                met,
                str(r.misses) if r.misses else "",
            ]
        )
    print_table(
        ["tier", "operation", "GB/s", "us/block", "ceiling", "of ceiling", "aim", "aim met", "misses"],
        table,
    )


# -- chat workload --------------------------------------------------------------------------------------
WORDS = [
    "cache", "prefix", "token", "block", "layer", "memory", "tier", "disk", "host", "redis", "model",
    "answer", "question", "context", "system", "user", "assistant", "prompt", "policy", "evict", "load",
    "compute", "attention", "key", "value", "page", "batch", "schedule", "decode",
]  # fmt: skip


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class ChatWorkload:
    """Token ids of each conversation's first prompt, and of the user turn added before each later one."""

    first: list[list[int]]
    later: list[list[list[int]]]  # [conversation][turn - 1]: end-of-turn + the next user message
    max_tokens: int

    def final_lengths(self) -> list[int]:
        return [
            len(f) + sum(self.max_tokens + len(u) for u in later)
            for f, later in zip(self.first, self.later, strict=True)
        ]

    def reusable_blocks(self, block_size: int) -> tuple[int, int]:
        """(blocks any prompt can reuse: the union of every prompt's full blocks, shared ones)."""
        common = self.first[0]
        for p in self.first[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] == p[n]:
                n += 1
            common = common[:n]
        shared = len(common) // block_size
        own = sum(length // block_size - shared for length in self.final_lengths())
        return shared + own, shared


def chat_workload(engine: Engine, args: argparse.Namespace) -> ChatWorkload:
    rng = random.Random(args.seed)
    tok = engine.tokenizer
    system = tok.decode(tok.encode(words(rng, args.system_tokens))[: args.system_tokens])
    end = tok.convert_tokens_to_ids(["<|end|>"]) if "<|end|>" in tok.get_vocab() else [tok.eos_token_id]
    first, later = [], []
    for c in range(args.conversations):
        user = f"{c}: {words(rng, args.user_words)}"
        first.append(
            engine.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}]
            )
        )
        later.append(
            [
                end + engine.apply_chat_template([{"role": "user", "content": words(rng, args.user_words)}])
                for _ in range(args.turns - 1)
            ]
        )
    return ChatWorkload(first, later, args.max_tokens)


@dataclass
class ChatRun:
    label: str
    tiers: str
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    loaded_tokens: int = 0
    output_tokens: int = 0
    model_tokens: int = 0  # every token run through the model: prefill, decode, recompute
    preemptions: int = 0
    evictions: int = 0
    steps: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # per (conversation, turn), in that order
    hierarchy: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def device_hit_tokens(self) -> int:
        return self.cached_tokens - self.loaded_tokens


def run_chat(label: str, engine: Engine, work: ChatWorkload, clients: int) -> ChatRun:
    """Closed loop: each client owns every clients-th conversation and sends, round by round, one
    request at a time: turn t of its next conversation, once its previous request has finished."""
    run = ChatRun(label, engine.config.tiers.tiers if engine.hierarchy is not None else "none")
    n_conv, turns = len(work.first), len(work.later[0]) + 1
    queues = [deque((c, t) for t in range(turns) for c in range(k, n_conv, clients)) for k in range(clients)]
    prompts = [list(p) for p in work.first]
    outputs: dict[tuple[int, int], list[int]] = {}
    in_flight: dict[str, tuple[int, int, int]] = {}  # request id -> (client, conversation, turn)
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    steps0, computed0 = engine.stats.steps, engine.stats.computed_tokens
    preempt0, evict0 = engine.scheduler.num_preemptions, engine.pool.evictions
    start = time.perf_counter()

    def submit(k: int) -> None:
        if queues[k]:
            c, t = queues[k].popleft()
            (rid,) = engine.add_request(prompts[c], params)
            in_flight[rid] = (k, c, t)

    for k in range(clients):
        submit(k)
    while in_flight:
        for out in engine.step():
            if not out.finished or out.request_id not in in_flight:
                continue
            k, c, t = in_flight.pop(out.request_id)
            record(run, out)
            generated = out.outputs[0].token_ids
            outputs[c, t] = generated
            if t + 1 < turns:  # the client resends the whole history: prompt + answer + next user turn
                prompts[c] = prompts[c] + generated + work.later[c][t]
            submit(k)
    run.wall_s = time.perf_counter() - start
    run.model_tokens = engine.stats.computed_tokens - computed0
    run.preemptions = engine.scheduler.num_preemptions - preempt0
    run.evictions = engine.pool.evictions - evict0
    run.outputs = [outputs[c, t] for c in range(n_conv) for t in range(turns)]
    run.steps = engine.stats.steps - steps0
    if engine.hierarchy is not None:
        s = engine.hierarchy.stats
        run.hierarchy = {
            "load_decisions": s.load_decisions,
            "recompute_decisions": s.recompute_decisions,
            "blocks_loaded": s.blocks_loaded,
            "per_tier_loaded": dict(s.per_tier_loaded),
            "blocks_written": s.blocks_written,
            "corrupt": s.corrupt,
            "write_errors": s.write_errors,
            "predicted_load_s": s.predicted_load_s,
            "actual_load_s": s.actual_load_s,
            "prefill_s_per_token": engine.hierarchy.prefill_seconds_per_token,
            "tier_bandwidth": {
                t.name: c.bandwidth_bps
                for t, c in zip(engine.hierarchy.tiers, engine.hierarchy.costs, strict=True)
            },
        }
    return run


def record(run: ChatRun, out: RequestOutput) -> None:
    if out.error:
        run.errors.append(out.error)
    if "ttft" in out.metrics:
        run.ttft.append(float(out.metrics["ttft"]))
    run.prompt_tokens += len(out.prompt_token_ids)
    run.cached_tokens += out.num_cached_tokens
    run.loaded_tokens += int(out.metrics.get("num_loaded_tokens", 0))
    run.output_tokens += len(out.outputs[0].token_ids)


def warm_up(engine: Engine, rng: random.Random) -> None:
    """A few requests of their own (not the workload's tokens), then drop what they cached, in the
    pool and in the tiers: the disk and Redis tiers outlive an engine, and a closed engine writes its
    pool down, so without this a tiers run would start from the blocks of the round before."""
    vocab = min(256, engine.loaded.config.vocab_size)
    for n in (200, 60):
        engine.add_request(
            [rng.randrange(vocab) for _ in range(n)], SamplingParams(max_tokens=4, ignore_eos=True)
        )
    for _ in engine.run_until_done():
        pass
    engine.pool.reset_cache()
    if engine.hierarchy is not None:
        engine.hierarchy.flush()
        for tier in engine.hierarchy.tiers:
            tier.clear()


@dataclass
class ChatRounds:
    """One configuration's run in every round, in round order."""

    label: str
    runs: list[ChatRun] = field(default_factory=list)

    @property
    def reported_index(self) -> int:
        """The round whose run has the median wall time (the lower middle one for an even count)."""
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i].wall_s)
        return order[(len(order) - 1) // 2]

    @property
    def reported(self) -> ChatRun:
        return self.runs[self.reported_index]


def round_order(n_configs: int, r: int) -> list[int]:
    """Round r starts at configuration r mod n (ABC, BCA, CAB): on a machine whose later passes run
    faster, no configuration always goes first."""
    return [(r + j) % n_configs for j in range(n_configs)]


def bench_chat(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_model(args.model, device, dtype, args.model_seed)
    with contextlib.ExitStack() as stack:
        disk_root = tempfile.mkdtemp(prefix="kvtier-bench-chat-", dir=args.disk_path)
        stack.callback(shutil.rmtree, disk_root, True)
        url = stack.enter_context(redis_for(args)) if args.redis else None
        tiers = args.tiers or ("disk,redis" if url else "disk")
        if "redis" in tiers and url is None:
            raise SystemExit("--tiers names redis: pass --redis (and have redis-server) or --redis-url")
        base: dict[str, Any] = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.model_seed,
            "block_size": args.block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "disk_path": disk_root,
            "redis_url": url,
        }
        probe = Engine(EngineConfig.load(base | {"tiers": "none", "kv_cache_memory": 64 << 20}), loaded)
        layout = probe.layout
        work = chat_workload(probe, args)
        del probe
        reusable, shared = work.reusable_blocks(args.block_size)
        longest = max(work.final_lengths()) + args.max_tokens
        need = -(-longest // args.block_size)
        pool_blocks = max(math.ceil(reusable / args.pool_ratio), need)
        kv_bytes = pool_blocks * layout.bytes_per_block
        title = (
            f"chat: {args.conversations} conversations x {args.turns} rounds, {args.clients} clients, "
            f"{args.system_tokens}-token shared system prompt, {args.max_tokens} output tokens, greedy"
        )
        machine = machine_info(device)
        print_machine(title, machine)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(
            f"model:    {loaded.name} ({params / 1e6:.1f}M params, "
            f"{layout.dtype}); KV {layout.bytes_per_block / 1024:.0f} KiB per {args.block_size}-token block"
        )
        print(
            f"workload: {len(work.first) * args.turns} requests, prompts {min(len(p) for p in work.first)}-"
            f"{max(work.final_lengths())} tokens; {reusable} reusable blocks ({shared} shared by all, "
            f"{reusable * layout.bytes_per_block / MiB:.1f} MiB) = {reusable / pool_blocks:.2f}x the pool"
        )
        print(
            f"pool:     {pool_blocks} blocks ({kv_bytes / MiB:.1f} MiB; the longest request needs {need}); "
            f"tiers run: {tiers} ("
            + ", ".join(
                ([f"disk in {disk_root}"] if "disk" in tiers else [])
                + ([f"redis {url}"] if "redis" in tiers else [])
            )
            + ")"
        )
        if pool_blocks > math.ceil(reusable / args.pool_ratio):
            print(
                f"note: the pool was raised to {pool_blocks} blocks so that the longest request fits; "
                f"the working set is only {reusable / pool_blocks:.1f}x the pool"
            )
        print()
        configs = [
            ("tiers", {"tiers": tiers, "enable_prefix_caching": True}),
            ("device pool only", {"tiers": "none", "enable_prefix_caching": True}),
            ("no caching", {"tiers": "none", "enable_prefix_caching": False}),
        ]
        rng = random.Random(args.seed + 1)

        def engine_for(extra: dict[str, Any]) -> Engine:
            engine = Engine(EngineConfig.load(base | extra | {"kv_cache_memory": kv_bytes}), loaded)
            warm_up(engine, rng)
            return engine

        # The first pass over the workload after the model loads ran ~1.4x slower than the next on
        # an H200, warm-up requests or not: one untimed pass on an engine thrown away.
        print("untimed pass (device pool only) ...", flush=True)
        engine = engine_for(configs[1][1])
        run_chat(configs[1][0], engine, work, args.clients)
        engine.close()
        rounds = [ChatRounds(label) for label, _ in configs]
        orders = [round_order(len(configs), r) for r in range(args.rounds)]
        for r, order in enumerate(orders):
            for i in order:
                label, extra = configs[i]
                engine = engine_for(extra)
                print(f"round {r + 1}/{args.rounds}: {label} ...", end=" ", flush=True)
                rounds[i].runs.append(run_chat(label, engine, work, args.clients))
                print(f"{rounds[i].runs[-1].wall_s:.1f} s", flush=True)
                engine.close()
    print()
    print_chat(rounds)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("command", "json")},
        "pool_blocks": pool_blocks,
        "reusable_blocks": reusable,
        "shared_blocks": shared,
        "bytes_per_block": layout.bytes_per_block,
        "tiers": tiers,
        "round_orders": [[configs[i][0] for i in order] for order in orders],
        "runs": [
            {"label": c.label, "reported_index": c.reported_index, "rounds": [run_summary(r) for r in c.runs]}
            for c in rounds
        ],
        "identical_outputs": all(r.outputs == rounds[0].runs[0].outputs for c in rounds for r in c.runs),
    }
    finish(args, title, machine, results)


def run_summary(r: ChatRun) -> dict[str, Any]:
    return {
        "label": r.label,
        "tiers": r.tiers,
        "wall_s": r.wall_s,
        "ttft_s": r.ttft,
        "ttft_p50_s": statistics.median(r.ttft),
        "ttft_p95_s": percentile(r.ttft, 0.95),
        "output_tokens": r.output_tokens,
        "output_tokens_per_s": r.output_tokens / r.wall_s,
        "prompt_tokens": r.prompt_tokens,
        "computed_prompt_tokens": r.computed_tokens,
        "loaded_tokens": r.loaded_tokens,
        "device_hit_tokens": r.device_hit_tokens,
        "model_tokens": r.model_tokens,
        "preemptions": r.preemptions,
        "pool_evictions": r.evictions,
        "steps": r.steps,
        "hierarchy": r.hierarchy,
        "errors": r.errors,
    }


def print_chat(rounds: list[ChatRounds]) -> None:
    runs = [c.reported for c in rounds]
    headers = [
        "run", "TTFT p50 ms", "TTFT p95 ms", "out tok/s", "prompt tokens", "computed", "loaded",
        "device hit", "model tokens", "preempted", "wall s",
    ]  # fmt: skip
    rows = []
    for r in runs:
        rows.append(
            [
                r.label,
                f"{1e3 * statistics.median(r.ttft):.0f}",
                f"{1e3 * percentile(r.ttft, 0.95):.0f}",
                f"{r.output_tokens / r.wall_s:.1f}",
                str(r.prompt_tokens),
                str(r.computed_tokens),
                str(r.loaded_tokens),
                str(r.device_hit_tokens),
                str(r.model_tokens),
                str(r.preemptions),
                f"{r.wall_s:.1f}",
            ]
        )
    print_table(headers, rows)
    off = runs[-1]
    print()
    for r in runs[:-1]:
        print(
            f"{r.label} vs {off.label}: TTFT p50 "
            f"{statistics.median(off.ttft) / statistics.median(r.ttft):.2f}x "
            f"shorter, wall {off.wall_s / r.wall_s:.2f}x shorter, "
            f"{off.computed_tokens / max(1, r.computed_tokens):.2f}x fewer prompt tokens computed"
        )
    for r in runs:
        if r.hierarchy:
            h = r.hierarchy
            per_tier = ", ".join(f"{k} {v}" for k, v in h["per_tier_loaded"].items()) or "none"
            print(
                f"{r.label}: {h['blocks_written']} blocks written down, {h['blocks_loaded']} loaded "
                f"({per_tier}); "
                f"{h['load_decisions']} load / {h['recompute_decisions']} recompute decisions; load time "
                f"predicted {h['predicted_load_s']:.2f} s, actual {h['actual_load_s']:.2f} s (learned "
                + ", ".join(f"{k} {v / GB:.1f} GB/s" for k, v in h["tier_bandwidth"].items())
                + f", prefill {1e3 * h['prefill_s_per_token']:.2f} ms/token); "
                f"corrupt {h['corrupt']}, write errors {h['write_errors']}"
            )
    every = [(k + 1, r) for c in rounds for k, r in enumerate(c.runs)]  # (round, run)
    for k, r in every:
        if r.errors:
            print(f"{r.label}, round {k}: {len(r.errors)} requests failed, e.g. {r.errors[0]}")
    ref = rounds[0].runs[0]
    n = len(ref.outputs)
    if all(r.outputs == ref.outputs for _, r in every):
        print(f"identical greedy output in all {len(every)} runs ({n} completions each)")
    for k, r in every:
        if r.outputs != ref.outputs:
            diff = sum(a != b for a, b in zip(r.outputs, ref.outputs, strict=True))
            print(f"OUTPUTS DIFFER: {r.label}, round {k} vs {ref.label}, round 1: {diff} of {n} completions")
    n_rounds = len(rounds[0].runs)
    print(
        (
            f"\nEach row: the run with the median wall time of the configuration's {n_rounds} rounds "
            "(the order rotates each round; every run's wall time is printed above); the ratios "
            "compare those runs. "
            if n_rounds > 1
            else "\nOne round: each configuration ran once, in this order. "
        )
        + "TTFT: engine metric, arrival to first token (queueing behind the other clients included). "
        "computed = prompt tokens prefilled; loaded = from a tier below the pool; device hit = found in "
        "the pool; model tokens = every token the model ran (prefill, decode, recompute after preemption)."
    )


# -- policies ----------------------------------------------------------------------------------------------
@dataclass
class TraceRequest:
    tokens: list[int]  # prompt + output
    prompt_len: int
    scan: bool


def policy_trace(args: argparse.Namespace) -> list[TraceRequest]:
    """A chat service's requests: conversations on a few hot system prompts (apps, Zipf-popular),
    each turn resending the whole history, users of skewed activity, and one-off long prompts."""
    rng = random.Random(args.seed)
    vocab = 256
    apps = [[rng.randrange(vocab) for _ in range(args.system_tokens)] for _ in range(args.apps)]
    app_weights = [1 / (i + 1) for i in range(args.apps)]

    def new_conversation() -> dict[str, Any]:
        app = rng.choices(range(args.apps), app_weights)[0]
        return {
            "history": list(apps[app]),
            "turns_left": rng.randint(2, args.max_turns),
            "weight": rng.paretovariate(1.5),
            "app": app,
        }

    active = [new_conversation() for _ in range(args.active)]
    trace: list[TraceRequest] = []
    while len(trace) < args.requests:
        if rng.random() < args.scan_fraction:
            app = rng.choices(range(args.apps), app_weights)[0]
            doc = [rng.randrange(vocab) for _ in range(rng.randint(args.scan_min, args.scan_max))]
            prompt = apps[app] + doc
            trace.append(TraceRequest(prompt + [rng.randrange(vocab) for _ in range(16)], len(prompt), True))
            continue
        i = rng.choices(range(len(active)), [c["weight"] for c in active])[0]
        conv = active[i]
        prompt = conv["history"] + [rng.randrange(vocab) for _ in range(rng.randint(16, 128))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(16, 256))]
        trace.append(TraceRequest(prompt + output, len(prompt), False))
        conv["history"] = prompt + output
        conv["turns_left"] -= 1
        if conv["turns_left"] == 0:
            active[i] = new_conversation()
    return trace


@dataclass
class KeyedRequest:
    keys: list[BlockKey]
    block_tokens: list[tuple[int, ...]]
    lookup_blocks: int  # full prompt blocks a match may cover (the last prompt token is always computed)
    alloc_blocks: int  # blocks the request holds at its end
    commit_blocks: int  # full blocks of computed tokens
    scan: bool


def key_trace(trace: list[TraceRequest], block_size: int) -> list[KeyedRequest]:
    layout = KVLayout(12, 4, 64, block_size, "float32")
    root = root_key(FINGERPRINT, layout)
    out = []
    for r in trace:
        keys = chain_keys(root, r.tokens, block_size)
        computed = len(r.tokens) - 1  # the last sampled token is never run through the model
        bt = [tuple(r.tokens[i * block_size : (i + 1) * block_size]) for i in range(len(keys))]
        out.append(
            KeyedRequest(
                keys,
                bt,
                (r.prompt_len - 1) // block_size,
                -(-computed // block_size),
                computed // block_size,
                r.scan,
            )
        )
    return out


@dataclass
class ReplayResult:
    hits: int = 0
    lookups: int = 0
    scan_hits: int = 0
    scan_lookups: int = 0
    evictions: int = 0
    seconds: float = 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def chat_hit_ratio(self) -> float:
        n = self.lookups - self.scan_lookups
        return (self.hits - self.scan_hits) / n if n else 0.0


def replay(
    trace: list[KeyedRequest], num_blocks: int, block_size: int, policy: str, in_flight: int
) -> ReplayResult:
    """Drive a BlockPool as the scheduler does: match, pin the hits, allocate the rest, commit the
    full blocks, and release when the request finishes (``in_flight`` requests overlap)."""
    pool = BlockPool(num_blocks, block_size, policy)
    result = ReplayResult()
    running: deque[list[int]] = deque()
    t0 = time.perf_counter()
    for r in trace:
        hits = pool.match_prefix(r.keys[: r.lookup_blocks], r.block_tokens[: r.lookup_blocks])
        need = r.alloc_blocks - len(hits)
        while running and need + sum(1 for b in hits if pool.ref_counts[b] == 0) > pool.num_available:
            pool.release(running.popleft())
        pool.pin(hits)
        table = hits + pool.allocate(need)
        for i in range(len(hits), r.commit_blocks):
            pool.commit(table[i], r.keys[i], r.block_tokens[i])
        running.append(table)
        if len(running) > in_flight:
            pool.release(running.popleft())
        result.hits += len(hits)
        result.lookups += r.lookup_blocks
        if r.scan:
            result.scan_hits += len(hits)
            result.scan_lookups += r.lookup_blocks
    while running:
        pool.release(running.popleft())
    pool.assert_idle()
    result.evictions = pool.evictions
    result.seconds = time.perf_counter() - t0
    return result


def bench_policies(args: argparse.Namespace) -> None:
    bs = args.block_size
    trace = key_trace(policy_trace(args), bs)
    unique = len({k for r in trace for k in r.keys[: r.lookup_blocks]})
    committed = len({k for r in trace for k in r.keys[: r.commit_blocks]})
    biggest = max(r.alloc_blocks for r in trace)
    floor_blocks = biggest * (args.in_flight + 1)
    capacities = []
    for text in args.capacities.split(","):
        value = float(text)
        n = int(value * committed) if value <= 1 else int(value)
        capacities.append(max(n, floor_blocks))
    capacities = sorted(set(capacities))
    title = (
        f"policies: block hit ratio of the device pool, {len(trace)} requests "
        f"({sum(r.scan for r in trace)} one-off scans), {bs}-token blocks"
    )
    machine = machine_info(torch.device("cpu"))
    print_machine(title, machine)
    lookups = sum(r.lookup_blocks for r in trace)
    print(
        f"trace:    {args.apps} system prompts of {args.system_tokens} tokens (Zipf popularity), "
        f"{args.active} active conversations (Pareto activity, 2-{args.max_turns} turns, user 16-128 and "
        f"answer 16-256 tokens), scans {args.scan_fraction:.0%} of requests ({args.scan_min}-{args.scan_max} "
        f"tokens after a system prompt); seed {args.seed}"
    )
    print(
        f"blocks:   {lookups} looked up, {unique} distinct; {committed} distinct blocks committed (the "
        f"working set); capacities {', '.join(f'{c} ({c / committed:.0%})' for c in capacities)}; "
        f"{args.in_flight} requests in flight"
    )
    if any(c == floor_blocks for c in capacities):
        print(
            f"note: capacities were raised to {floor_blocks} blocks so that {args.in_flight + 1} of the "
            "largest requests fit"
        )
    print()
    infinite = replay(trace, committed + floor_blocks, bs, "lru", args.in_flight)
    results: dict[str, Any] = {"capacities": capacities, "working_set_blocks": committed, "policies": {}}
    rows = []
    for policy in POLICIES:
        cells, chat_cells = [], []
        results["policies"][policy] = {}
        for cap in capacities:
            r = replay(trace, cap, bs, policy, args.in_flight)
            results["policies"][policy][cap] = vars(r) | {
                "hit_ratio": r.hit_ratio,
                "chat_hit_ratio": r.chat_hit_ratio,
            }
            cells.append(f"{100 * r.hit_ratio:.1f}%")
            chat_cells.append(f"{100 * r.chat_hit_ratio:.1f}%")
        rows.append([policy, *cells, *chat_cells])
    rows.append(
        [
            "unbounded",
            *[f"{100 * infinite.hit_ratio:.1f}%"] * len(capacities),
            *[f"{100 * infinite.chat_hit_ratio:.1f}%"] * len(capacities),
        ]
    )
    results["unbounded"] = vars(infinite) | {
        "hit_ratio": infinite.hit_ratio,
        "chat_hit_ratio": infinite.chat_hit_ratio,
    }
    headers = ["policy", *[f"all @ {c}" for c in capacities], *[f"chat @ {c}" for c in capacities]]
    print_table(headers, rows)
    print(
        "\nblock hit ratio = prompt blocks found in the pool / prompt blocks looked up (all requests, "
        "then chat requests only: what the scans cost them). unbounded = a pool that never evicts: "
        "only first references miss."
    )
    finish(args, title, machine, results)


# -- command line -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    common.add_argument("--seed", type=int, default=0, help="seed of the data and the workload")
    common.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    common.add_argument("--block-size", type=int, default=16)
    red = argparse.ArgumentParser(add_help=False)
    red.add_argument("--redis-url", help="use this Redis (its kvtier namespace only) instead of starting one")
    red.add_argument("--redis-server", help="redis-server binary (default: the one on PATH)")
    red.add_argument("--disk-path", help="folder for the disk tier's temp folder (default: the system temp)")

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ceilings", parents=[common, red], help="tier bandwidth vs the ceiling of its medium")
    c.add_argument(
        "--model", default="synthetic:small", help="synthetic:<name> or a checkpoint folder (layout only)"
    )
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    c.add_argument("--dtype", default="auto", help="KV dtype: auto (bfloat16 on CUDA, float32 on CPU)")
    c.add_argument("--total", default="256MiB", help="KV bytes stored in each tier")
    c.add_argument("--batch-blocks", type=int, default=64, help="blocks per get / put call (a segment)")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument(
        "--only", type=lambda v: v.split(","), default=["host", "disk", "redis"], help="tiers to measure"
    )
    c.add_argument("--disk-codec", help="default: the engine's (TierSettings.disk_codec)")
    c.add_argument("--redis-codec", help="default: the engine's (TierSettings.redis_codec)")

    h = sub.add_parser(
        "chat", parents=[common, red], help="multi-round chat: tiers vs pool only vs no caching"
    )
    h.add_argument("--model", default="synthetic:small")
    h.add_argument("--model-seed", type=int, default=0)
    h.add_argument("--device", default="auto")
    h.add_argument("--dtype", default="auto")
    h.add_argument("--conversations", type=int, default=16)
    h.add_argument("--turns", type=int, default=4)
    h.add_argument("--clients", type=int, default=4, help="closed-loop clients sending requests")
    h.add_argument("--system-tokens", type=int, default=256)
    h.add_argument("--user-words", type=int, default=12, help="words per user message")
    h.add_argument("--max-tokens", type=int, default=32, help="tokens generated per answer")
    h.add_argument("--pool-ratio", type=float, default=4.0, help="reusable blocks / device pool blocks")
    h.add_argument("--max-num-batched-tokens", type=int, default=None)
    h.add_argument("--redis", action="store_true", help="add a Redis tier (a redis-server of its own)")
    h.add_argument("--tiers", help="tiers of the tiers run (default: disk, plus redis with --redis)")
    h.add_argument(
        "--rounds", type=int, default=3, help="runs of each configuration, the order rotating each round"
    )

    p = sub.add_parser("policies", parents=[common], help="hit ratio of each eviction policy on a chat trace")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--apps", type=int, default=4, help="distinct system prompts")
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--active", type=int, default=32, help="conversations active at a time")
    p.add_argument("--max-turns", type=int, default=10)
    p.add_argument("--scan-fraction", type=float, default=0.1, help="share of one-off long requests")
    p.add_argument("--scan-min", type=int, default=1024)
    p.add_argument("--scan-max", type=int, default=4096)
    p.add_argument("--in-flight", type=int, default=4, help="requests holding their blocks at once")
    p.add_argument(
        "--capacities",
        default="0.02,0.04,0.08",
        help="pool sizes: fractions of the working set (<= 1) or block counts",
    )
    args = parser.parse_args(argv)
    if args.command == "chat" and args.redis_url:
        args.redis = True
    if args.command == "chat" and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"ceilings": bench_ceilings, "chat": bench_chat, "policies": bench_policies}[args.command](args)


if __name__ == "__main__":
    main()
