"""The tier benchmarks' data and operations: a model's KV layout without its weights, blocks and
their encoded objects, timed tier operations, and the ceilings of the media underneath."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from kvtier.bench.report import MiB, progress, sync
from kvtier.bench.servers import start_server
from kvtier.cache.codec import CodecConfig, decode_block, encode_block
from kvtier.cache.hierarchy import KVHierarchy, LoadPlan, Segment
from kvtier.cache.keys import BlockKey, KVLayout, chain_keys, root_key
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.host import HostTier
from kvtier.model.loader import SYNTHETIC_MODELS, SYNTHETIC_PREFIX

AIMS = {"host": 0.80, "disk": 0.70, "redis": 0.50}  # the issue's: achieved / ceiling
FINGERPRINT = "bench-tiers"  # stands in for a model fingerprint: namespace and codec header


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    """The URL of a Redis to use (ours, started here and stopped at the end, or --redis-url), or
    None when there is none."""
    if args.redis_url:
        yield args.redis_url
        return
    if shutil.which("redis-server") is None:
        print("note: no redis-server on PATH (install it or pass --redis-url): the Redis part is skipped\n")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-redis-") as folder:
        server = start_server(Path(folder))
        try:
            yield server.url
        finally:
            server.stop()


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

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        """Block ``i``'s stored object, verified against its key and tokens and decoded."""
        return decode_block(
            data, key=self.keys[i], fingerprint=FINGERPRINT, layout=self.layout, tokens=self.tokens[i]
        )


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
    for _ in progress(range(repeats), "repeats"):
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
            blocks.decode(i, data)
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
                blocks.decode(i, data)
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
