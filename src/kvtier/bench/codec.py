"""`kvtier bench codec`: the cost of the stored object format, per codec: size, encode and decode
speed, quantization error.

For one KV block of a realistic layout (default: 16 layers, 8 KV heads, head_dim 64, block 16, bfloat16,
i.e. 512 KiB) it prints, for every quantization x compression: object bytes, compression ratio against
the raw block, encode and decode speed in MB of raw block per second, and the relative error
||out - in|| / ||in|| of the round trip. Reference rows give the ceilings: a plain memory copy of the
block, and the throughput of the checksum next to the stdlib alternatives it was chosen over.

Speeds are the median over several timed batches, single-threaded, warm caches. Random normal KV is the
worst case for compression (real KV compresses somewhat better); pass --data outlier for KV with a few
large channels. This script never asserts on time.

    kvtier bench codec [--layers 16 --kv-heads 8 --head-dim 64 --block-size 16 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import zlib
from collections.abc import Callable
from functools import partial

import torch

from kvtier.bench.report import print_table
from kvtier.cache.codec import (
    COMPRESSIONS,
    QUANTIZATIONS,
    CodecConfig,
    decode_block,
    encode_block,
    integrity,
)
from kvtier.cache.keys import KVLayout


def seconds_per_call(fn: Callable[[], object], budget: float) -> float:
    """Median seconds per call over ~7 batches sized to fill ``budget`` seconds."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    per_batch = max(1, int(budget / 7 / one))
    samples = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - t) / per_batch)
    return statistics.median(samples)


def make_kv(layout: KVLayout, data: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layout.block_shape, generator=g)
    if data == "outlier":
        channels = torch.randperm(layout.head_dim, generator=g)[:4]
        x[..., channels] *= 20
    return x.to(getattr(torch, layout.dtype))


def bench_codec(args: argparse.Namespace) -> None:

    torch.set_num_threads(1)
    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    kv = make_kv(layout, args.data, args.seed)
    raw = layout.bytes_per_block
    key = hashlib.blake2b(b"bench", digest_size=32).digest()
    fingerprint = "bench-model"
    tokens = list(range(layout.block_size))
    mb = raw / 1e6

    def enc(config: CodecConfig, secret: bytes | None = None, block: torch.Tensor = kv) -> bytes:
        return encode_block(key, fingerprint, layout, tokens, block, config, secret=secret)

    def dec(obj: bytes, secret: bytes | None = None) -> torch.Tensor:
        return decode_block(
            obj, key=key, fingerprint=fingerprint, layout=layout, tokens=tokens, secret=secret
        )

    print(
        f"# layout: {layout.num_layers} layers x {layout.num_kv_heads} kv heads x {layout.head_dim} dim, "
        f"block {layout.block_size}, {layout.dtype}: {raw} bytes/block; data: {args.data}; "
        f"torch {torch.__version__}, 1 thread"
    )
    print()

    # ceilings: a plain copy of the block, and checksum candidates over the same bytes (one block,
    # repeated, so it stays in cache: the best case for every row)
    view = memoryview(kv.reshape(-1).view(torch.uint8).numpy().tobytes())
    dst = bytearray(raw)
    refs = {
        "memcpy into a buffer": lambda: dst.__setitem__(slice(None), view),
        "bytes() copy": lambda: bytes(view),
        "checksum: sum2d (used)": lambda: integrity.checksum(b"", view),
        "checksum: zlib.crc32": lambda: zlib.crc32(view),
        "checksum: zlib.adler32": lambda: zlib.adler32(view),
        "checksum: blake2b-128": lambda: hashlib.blake2b(view, digest_size=16).digest(),
        "hmac-sha256": lambda: integrity.mac(b"secret", b"", view),
    }
    ref_s = {name: seconds_per_call(fn, args.budget) for name, fn in refs.items()}
    copy_s = ref_s["memcpy into a buffer"]
    _table(
        ["one block, in cache", "GB/s", "% of memcpy"],
        [[name, f"{raw / s / 1e9:.2f}", f"{100 * copy_s / s:.0f}%"] for name, s in ref_s.items()],
    )

    combos: list[tuple[str, str, bytes | None]] = [(q, c, None) for q in QUANTIZATIONS for c in COMPRESSIONS]
    combos.insert(1, ("none", "none", b"bench secret"))
    rows = []
    for quant, comp, secret in combos:
        config = CodecConfig(quant, comp)
        obj = enc(config, secret)
        enc_s = seconds_per_call(partial(enc, config, secret), args.budget)
        dec_s = seconds_per_call(partial(dec, obj, secret), args.budget)
        out = dec(obj, secret)
        err = float((out.double() - kv.double()).norm() / kv.double().norm())
        rows.append(
            [
                quant,
                comp,
                "yes" if secret else "no",
                str(len(obj)),
                f"{raw / len(obj):.2f}",
                f"{mb / enc_s:.0f}",
                f"{mb / dec_s:.0f}",
                f"{100 * copy_s / enc_s:.0f}%",
                f"{100 * copy_s / dec_s:.0f}%",
                f"{err:.2e}",
            ]
        )
    headers = ["quant", "compress", "hmac", "object B", "ratio", "encode MB/s", "decode MB/s"]
    _table([*headers, "enc % memcpy", "dec % memcpy", "rel error"], rows)

    # many distinct blocks, more than the caches hold: what a host tier moving a batch of blocks sees
    count = max(1, args.stream_mib * 2**20 // raw)
    blocks = [make_kv(layout, args.data, args.seed + 1 + i) for i in range(count)]
    sources = [b.reshape(-1).view(torch.uint8).numpy().data for b in blocks]
    plain = CodecConfig()

    def timed(fn: Callable[[], object]) -> float:
        fn()
        return min(_elapsed(fn) for _ in range(3))

    copies: list[object] = [None] * count
    objs = [enc(plain, block=b) for b in blocks]

    def copy_all() -> None:
        for i, src in enumerate(sources):
            copies[i] = bytes(src)

    def encode_all() -> None:
        for i, b in enumerate(blocks):
            copies[i] = enc(plain, block=b)

    def decode_all() -> None:
        for i, o in enumerate(objs):
            copies[i] = dec(o)

    total = count * raw
    stream = {"bytes() copy of each block": timed(copy_all)}
    stream["encode none/none"] = timed(encode_all)
    stream["decode none/none"] = timed(decode_all)
    base = stream["bytes() copy of each block"]
    _table(
        [f"{count} blocks, {total >> 20} MiB", "GB/s", "% of copy"],
        [[name, f"{total / s / 1e9:.2f}", f"{100 * base / s:.0f}%"] for name, s in stream.items()],
    )


def _table(headers: list[str], rows: list[list[str]]) -> None:
    print_table(headers, rows)
    print()  # a blank line ends a markdown table


def _elapsed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
