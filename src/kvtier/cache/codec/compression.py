"""Compression of a block's raw payload: none, lz4 or zstd, bounded on the way back."""

from __future__ import annotations

import lz4.frame
import zstandard

from kvtier.cache.codec.header import CorruptObjectError

ZSTD_LEVELS = (-(1 << 17), 22)
LZ4_LEVELS = (0, 16)


def compress(raw: memoryview, compression: str, level: int | None) -> memoryview:
    if compression == "none":
        return raw
    if compression == "zstd":
        level = 3 if level is None else level
        # a compressor per call: ZstdCompressor is not safe to share between threads
        return memoryview(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw))
    return memoryview(lz4.frame.compress(raw, compression_level=level or 0, store_size=True))


def decompress(payload: memoryview, compression: str, raw_length: int) -> memoryview:
    """Decompress to exactly ``raw_length`` bytes, never allocating more (no decompression bombs)."""
    if compression == "none":
        return payload
    try:
        if compression == "zstd":
            # zstd's one-shot decompress sizes its output from the frame's content size and ignores
            # max_output_size when that is present, so check it before trusting it
            size = zstandard.frame_content_size(payload)
            if size != raw_length:
                raise CorruptObjectError(f"decompress: zstd frame says {size} bytes, expected {raw_length}")
            out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_length)
        else:
            d = lz4.frame.LZ4FrameDecompressor()
            out = d.decompress(payload, max_length=raw_length)
            if not d.eof or d.unused_data:
                raise CorruptObjectError(f"decompress: lz4 frame does not end at {raw_length} bytes")
    except (zstandard.ZstdError, RuntimeError, ValueError) as e:
        if isinstance(e, CorruptObjectError):
            raise
        raise CorruptObjectError(f"decompress: {compression}: {e}") from None
    if len(out) != raw_length:
        raise CorruptObjectError(f"decompress: {len(out)} bytes, expected {raw_length}")
    return memoryview(out)
