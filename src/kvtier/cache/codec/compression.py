"""Compression of a block's raw payload: none, lz4 or zstd, bounded on the way back.

lz4 and zstandard are imported when a block is first (de)compressed with them, not with this
module: every part of kvtier imports the codec, and a machine without those packages (the GPU
image) must still run everything that stores uncompressed or stores nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvtier.cache.codec.header import CorruptObjectError

ZSTD_LEVELS = (-(1 << 17), 22)
LZ4_LEVELS = (0, 16)
_PACKAGES = {"lz4.frame": "lz4", "zstandard": "zstandard"}


def _library(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PACKAGES[module]
        raise RuntimeError(
            f"compression {package!r} needs the {package} package (pip install {package})"
        ) from None


def compress(raw: memoryview, compression: str, level: int | None) -> memoryview:
    if compression == "none":
        return raw
    if compression == "zstd":
        level = 3 if level is None else level
        # a compressor per call: ZstdCompressor is not safe to share between threads
        zstd = _library("zstandard")
        return memoryview(zstd.ZstdCompressor(level=level, write_content_size=True).compress(raw))
    return memoryview(_library("lz4.frame").compress(raw, compression_level=level or 0, store_size=True))


def decompress(payload: memoryview, compression: str, raw_length: int) -> memoryview:
    """Decompress to exactly ``raw_length`` bytes, never allocating more (no decompression bombs)."""
    if compression == "none":
        return payload
    out = _unzstd(payload, raw_length) if compression == "zstd" else _unlz4(payload, raw_length)
    if len(out) != raw_length:
        raise CorruptObjectError(f"decompress: {len(out)} bytes, expected {raw_length}")
    return memoryview(out)


def _unzstd(payload: memoryview, raw_length: int) -> bytes:
    zstd = _library("zstandard")
    try:
        # zstd's one-shot decompress sizes its output from the frame's content size and ignores
        # max_output_size when that is present, so check it before trusting it
        size = zstd.frame_content_size(payload)
        if size != raw_length:
            raise CorruptObjectError(f"decompress: zstd frame says {size} bytes, expected {raw_length}")
        return bytes(zstd.ZstdDecompressor().decompress(payload, max_output_size=raw_length))
    except CorruptObjectError:
        raise
    except (zstd.ZstdError, RuntimeError, ValueError) as e:
        raise CorruptObjectError(f"decompress: zstd: {e}") from None


def _unlz4(payload: memoryview, raw_length: int) -> bytes:
    lz4_frame = _library("lz4.frame")
    try:
        d = lz4_frame.LZ4FrameDecompressor()
        out = d.decompress(payload, max_length=raw_length)
    except (RuntimeError, ValueError) as e:
        raise CorruptObjectError(f"decompress: lz4: {e}") from None
    if not d.eof or d.unused_data:
        raise CorruptObjectError(f"decompress: lz4 frame does not end at {raw_length} bytes")
    return bytes(out)
