"""`kvtier bench tiers`: each tier's bandwidth next to the ceiling of its medium, measured in the same run."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from typing import Any

import redis
import torch

from kvtier.bench.report import GB, MiB, finish, machine_info, print_machine, print_table
from kvtier.bench.tier_data import (
    AIMS,
    FINGERPRINT,
    Blocks,
    Row,
    drop_page_cache,
    h2d_ceiling,
    host_store,
    make_blocks,
    measure,
    memcpy_ceiling,
    model_layout,
    op_decode,
    op_get,
    op_get_decode,
    op_load,
    redis_for,
    redis_get_ceiling,
    redis_set_ceiling,
    sequential_read,
    tier_put,
    timed,
)
from kvtier.cache.codec import CodecConfig
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.host import HostTier
from kvtier.cache.tiers.redis import KEY_PREFIX
from kvtier.config import TierSettings, parse_bytes
from kvtier.engine.engine import resolve_device
from kvtier.engine.tiers import make_tier, parse_codec


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
            assert isinstance(disk, DiskTier)  # for path_of: the files the cold reads drop
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
