"""The memcached tier against plain pymemcache on the same server, in one run.

    kvtier bench memcached [--total 128MiB --batch-blocks 16 --repeats 5 --item-size 1MiB]
    (python3 bench/bench_memcached.py [options]: the same)

For two KV layouts (synthetic:small in float32: 384 KiB blocks, one item each; and an 8B model's
layout, 32 layers x 8 KV heads x 128 in bfloat16: 2 MiB blocks, so three items each at memcached's
default 1 MiB item size) it stores --total bytes of encoded blocks (the tier's default codec,
``memcached_codec``) through the tier and reads them back, against the ceiling of the same bytes
moved by pymemcache's own ``set_many`` / ``get_many`` on the same server (the objects cut into the
same number of items as the tier's chunks, no manifest, no checks):
  put           vs  plain set_many
  get + decode  vs  plain get_many          (the issue's aim: >= 50% of the ceiling, printed, not asserted)
``get`` and ``decode`` alone and the hierarchy's load path break the time down. Each figure is the
median of --repeats; a ceiling is the best of its repeats. A memcached of its own on a free 127.0.0.1
port (stopped at the end), or --memcached-url. Prints the load average: on a busy machine compare the
ratios, measured in the same run, rather than the GB/s.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import pymemcache
import torch
from pymemcache.client.base import Client

from kvtier.bench import report, tiers
from kvtier.bench import tier_data as td
from kvtier.bench.servers import start_memcached
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.memcached import MemcachedTier
from kvtier.config import TierSettings, parse_bytes, parse_codec
from kvtier.engine.tiers import make_tier

AIM = 0.50
SET, GET = "plain set_many", "plain get_many"  # the ceilings
LAYOUTS = {
    "synthetic:small fp32": KVLayout(
        num_layers=12, num_kv_heads=4, head_dim=64, block_size=16, dtype="float32"
    ),
    "8B-shaped bf16": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16"),
}


def pieces_of(objects: list[bytes], chunk: int) -> list[dict[bytes, bytes]]:
    """Each object cut into ``chunk``-byte items under plain names: the ceiling's bytes."""
    return [
        {b"bench:%d:%d" % (i, j): o[j * chunk : (j + 1) * chunk] for j in range(max(1, -(-len(o) // chunk)))}
        for i, o in enumerate(objects)
    ]


def batches_of(items: list[dict[bytes, bytes]], blocks: int) -> list[dict[bytes, bytes]]:
    out = []
    for i in range(0, len(items), blocks):
        merged: dict[bytes, bytes] = {}
        for d in items[i : i + blocks]:
            merged.update(d)
        out.append(merged)
    return out


def plain_set(client: Client, batches: list[dict[bytes, bytes]]) -> Callable[[], int]:
    def run() -> int:
        return sum(len(client.set_many(b)) for b in batches)  # names not stored

    return run


def plain_get(client: Client, batches: list[dict[bytes, bytes]]) -> Callable[[], int]:
    names = [list(b) for b in batches]

    def run() -> int:
        return sum(len(n) - len(client.get_many(n)) for n in names)  # misses

    return run


def bench_layout(url: str, label: str, layout: KVLayout, args: argparse.Namespace) -> dict[str, Any]:
    blocks = td.make_blocks(layout, parse_bytes(args.total), args.seed)
    codec = parse_codec(TierSettings().memcached_codec)
    objects = blocks.objects(codec)
    stored = sum(len(o) for o in objects)
    tier = make_tier("memcached", TierSettings(memcached_url=url), td.FINGERPRINT, layout)
    assert isinstance(tier, MemcachedTier)
    host, port = url.removeprefix("memcached://").split(":")
    client = Client((host, int(port)), default_noreply=False, timeout=30, no_delay=True)
    b, repeats, kvb = args.batch_blocks, args.repeats, blocks.kv_bytes
    ceiling_batches = batches_of(pieces_of(objects, tier.chunk_bytes), b)
    items = sum(len(d) for d in ceiling_batches)
    print(
        f"\n{label}: {blocks.n} blocks of {layout.bytes_per_block / 1024:.0f} KiB "
        f"({stored / blocks.n / 1024:.0f} KiB objects, {items / blocks.n:.0f} item(s) each at item size "
        f"{tier.item_size / 1024:.0f} KiB), {b} blocks per call"
    )
    ceilings = {SET: td.timed(plain_set(client, ceiling_batches), repeats)}
    ceilings[GET] = td.timed(plain_get(client, ceiling_batches), repeats)
    ceiling_misses = plain_get(client, ceiling_batches)()
    client.delete_many([n for d in ceiling_batches for n in d])
    ceiling_bytes = {name: stored for name in ceilings}
    hier = KVHierarchy([tier], [codec], layout, td.FINGERPRINT)
    get_decode = td.op_get_decode(tier, blocks, b)
    rows = [
        td.measure("memcached", "put", td.tier_put(tier, blocks.keys, objects, b), kvb, repeats, SET, True),
        td.measure("memcached", "get", td.op_get(tier, blocks, b), kvb, repeats, GET),
        td.measure("memcached", "decode", td.op_decode(blocks, codec), kvb, repeats, GET),
        td.measure("memcached", "get + decode", get_decode, kvb, repeats, GET, True),
        td.measure("memcached", "hierarchy load", td.op_load(hier, blocks, b), kvb, repeats, GET),
    ]
    hier.close()
    stats = tier.stats().as_dict()
    tier.clear()
    tier.close()
    client.close()
    tiers.print_ceilings(ceilings, ceiling_bytes)
    tiers.print_rows(rows, ceilings, ceiling_bytes, blocks.n)
    if ceiling_misses:
        print(f"note: the plain get_many missed {ceiling_misses} items (memory too small? raise -m)")
    return {
        "blocks": blocks.n,
        "kv_bytes": kvb,
        "stored_bytes": stored,
        "items_per_block": items / blocks.n,
        "item_size": tier.item_size,
        "ceilings": {k: {"times_s": v, "bandwidth": stored / min(v)} for k, v in ceilings.items()},
        "rows": [
            {
                "operation": r.operation,
                "bandwidth": r.bandwidth,
                "times_s": r.times,
                "fraction": tiers.fraction_of(r, ceilings, ceiling_bytes),
                "misses": r.misses,
            }
            for r in rows
        ],
        "tier_stats": stats,
    }


def bench_memcached(args: argparse.Namespace) -> None:
    """``kvtier bench memcached``: the tier against plain pymemcache, for each layout in LAYOUTS."""
    td.AIMS.setdefault("memcached", AIM)  # the tier tables judge rows by tier name
    machine = report.machine_info(torch.device("cpu"))
    report.print_machine("memcached tier vs plain pymemcache on the same server", machine)
    print(f"pymemcache {pymemcache.__version__}, CPU threads {os.cpu_count()}")
    server = None
    if args.memcached_url:
        url = args.memcached_url
    else:
        server = start_memcached(parse_bytes(args.item_size), args.memory_mb)
        url = server.url
    try:
        results = {label: bench_layout(url, label, layout, args) for label, layout in LAYOUTS.items()}
    finally:
        if server is not None:
            server.stop()
    print(
        "\nGB/s = KV bytes delivered / median time (the ceiling: stored bytes / best time). The ceiling is "
        "pymemcache's get_many / set_many of the same stored bytes in the same number of items; the tier "
        "adds names with generations, the manifest and version checks, reassembly, and for get + decode "
        "the codec (lz4, checksum)."
    )
    ratios = {
        label: next(r["fraction"] for r in res["rows"] if r["operation"] == "get + decode")
        for label, res in results.items()
    }
    print("get + decode / plain get_many: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ratios.items()))
    report.finish(args, "memcached", machine, {"layouts": results})
