"""Stored object format for KV blocks: header, checksum / HMAC, quantization, compression.

One KV block (``[num_layers, 2, block_size, num_kv_heads, head_dim]``, see ``KVLayout``) becomes one
self-describing byte string that a tier stores without interpreting it::

    offset  field                     encoding (all little-endian)
    0       magic                     b"KVTB"
    4       format version            u16 (FORMAT_VERSION)
    6       flags                     u16; bit 0 = an HMAC follows the checksum; other bits must be 0
    8       key                       u16 length + bytes
            model fingerprint         u16 length + UTF-8
            KV layout                 u16 length + KVLayout.to_bytes() (dims and dtype)
            block token ids           u32 count + int32 each
            quantization, compression u8, u8 (ids below)
            payload length            u64 (bytes after the header)
            raw length                u64 (payload size before compression)
            checksum                  16 bytes, over every field above + payload (see _checksum)
            HMAC-SHA256               32 bytes when flag bit 0, over the same bytes as the checksum
            padding                   zero bytes up to a multiple of 16, so the payload is 8-aligned
    header_length  payload            payload_length bytes

The raw payload is the block in the layout dtype (quantization ``none``), or float32 scales followed by
the quantized values (``fp8``, ``int8``); compression, when any, applies to that raw payload.

Decoding never trusts a length before checking it against the bytes actually present, never executes
anything (no pickle, no eval) and verifies in this order: parse -> key, fingerprint, layout, tokens
against the requested ones -> checksum -> HMAC -> decompress (bounded by the expected raw length) ->
dequantize. Every failure raises ``CorruptObjectError`` (a ``ValueError``) naming what failed; the
hierarchy turns it into a counted miss and deletes the object. Invalid *arguments* (a caller's bug)
raise plain ``ValueError``/``TypeError`` instead, so they are never mistaken for a bad object.

Byte order: payload numbers are little-endian; like the rest of kvtier this assumes a little-endian
host (x86-64, aarch64), where tensor memory is written out as is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import lz4.frame
import numpy as np
import torch
import zstandard

from kvtier.cache.keys import KVLayout, tokens_to_bytes

MAGIC = b"KVTB"
FORMAT_VERSION = 1
SECRET_ENV = "KVTIER_CACHE_SECRET"

QUANTIZATIONS = ("none", "fp8", "int8")
COMPRESSIONS = ("none", "lz4", "zstd")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_DTYPES = tuple(_TORCH_DTYPES)

_QUANT_IDS = {name: i for i, name in enumerate(QUANTIZATIONS)}
_COMP_IDS = {name: i for i, name in enumerate(COMPRESSIONS)}
_FLAG_HMAC = 1
_CHECKSUM_SIZE = 16
_HMAC_SIZE = 32
_ALIGN = 16
_MAX_U16 = 0xFFFF
_LAYOUT_FIXED = struct.Struct("<IIIIB")  # KVLayout.to_bytes(): dims, then the dtype name's length
_PREFIX = struct.Struct("<4sHH")  # magic, version, flags
_VERSION_FLAGS = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TRAILER = struct.Struct("<BBQQ")  # quantization, compression, payload length, raw length
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127.0  # symmetric: -127..127, -128 unused
# float8_e4m3fn bit pattern -> float32 value, from torch's own conversion (so exactly the same values)
_FP8_TO_FLOAT32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_FP8_TO_FLOAT32.flags.writeable = False
_ZSTD_LEVELS = (-(1 << 17), 22)
_LZ4_LEVELS = (0, 16)


class CorruptObjectError(ValueError):
    """A stored object that must not be used: malformed, for another block, or failing verification.

    The message starts with what failed (``magic``, ``version``, ``flags``, ``key``, ``fingerprint``,
    ``layout``, ``tokens``, ``codec``, ``length``, ``truncated``, ``checksum``, ``hmac``,
    ``decompress``), which is also ``reason``, for counting in metrics.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message.split(":", 1)[0]


@dataclass(frozen=True)
class CodecConfig:
    """How blocks are stored: quantization (cold tiers) and compression of the result."""

    quantization: str = "none"  # none | fp8 | int8
    compression: str = "none"  # none | lz4 | zstd
    level: int | None = None  # compressor level; None = library default (zstd 3, lz4 0)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown KV quantization {self.quantization!r}; supported: {', '.join(QUANTIZATIONS)}"
            )
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"unknown KV compression {self.compression!r}; supported: {', '.join(COMPRESSIONS)}"
            )
        if self.level is None:
            return
        if isinstance(self.level, bool) or not isinstance(self.level, int):
            raise ValueError(f"compression level must be an int or None, got {self.level!r}")
        if self.compression == "none":
            raise ValueError("a compression level needs compression 'lz4' or 'zstd', not 'none'")
        low, high = _ZSTD_LEVELS if self.compression == "zstd" else _LZ4_LEVELS
        if not low <= self.level <= high:
            raise ValueError(f"{self.compression} level must be in [{low}, {high}], got {self.level}")


@dataclass(frozen=True)
class BlockHeader:
    """Everything in an object's header, parsed (the checksum and HMAC bytes themselves excepted)."""

    version: int
    key: bytes
    fingerprint: str
    layout: KVLayout
    tokens: tuple[int, ...]
    quantization: str
    compression: str
    payload_length: int
    raw_length: int
    has_hmac: bool

    @property
    def header_length(self) -> int:
        """Bytes before the payload (fields, checksum, HMAC, padding)."""
        fields = (
            _PREFIX.size
            + 2 + len(self.key)
            + 2 + len(self.fingerprint.encode())
            + 2 + len(self.layout.to_bytes())
            + 4 + 4 * len(self.tokens)
            + _TRAILER.size
        )  # fmt: skip
        return _align(fields + _CHECKSUM_SIZE + (_HMAC_SIZE if self.has_hmac else 0))

    @property
    def object_length(self) -> int:
        """Size of the whole object; a stored object of another size is truncated or has extra bytes."""
        return self.header_length + self.payload_length


def secret_from_env() -> bytes | None:
    """The HMAC secret from ``KVTIER_CACHE_SECRET`` (UTF-8), or None when unset or empty."""
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


# ---------------------------------------------------------------------------------------------------
# checksum


# The checksum only has to catch accidental corruption (bit rot, torn or truncated writes, a sector
# from another file): tampering is the HMAC's job. It must also run near memory bandwidth, because the
# host tier should move blocks at > 80% of memory-copy speed and encode/decode already pay one copy.
# Measured with bench/bench_codec.py on the 2-core dev box (AMD EPYC, one 512 KiB bf16 block in
# cache, GB/s): memcpy 40, zlib.crc32 6.6, adler32 4.0, sha256 1.9, blake2b 1.3: every stdlib hash
# would cap the host tier at a sixth of copy speed or less. We use a two-dimensional sum instead, which
# numpy runs at ~21 GB/s (3.3x crc32; encode/decode none/none stream at ~52%/44% of a plain copy of
# the same blocks, limited by this pass).
#
# The payload, read as little-endian u64 words, is cut into rows of _ROW_WORDS words; the sums (mod
# 2**64) of every row and of every column, then the bytes that do not fill a row, go into a
# BLAKE2b-128 after the header fields. An error escapes only if it leaves every row sum and every
# column sum unchanged, so it is always detected when it changes 1, 2 or 3 words, or any bytes within
# a burst of 4 KiB (_ROW_WORDS * 8), or swaps two unequal words; two whole rows swapped are caught
# unless their sums are equal mod 2**64; other random damage escapes with probability ~2**-64.
# (CRC32 guarantees 32-bit bursts, then 2**-32.) Changing this function changes the format: bump
# FORMAT_VERSION.
_ROW_WORDS = 512


def _checksum(fields: bytes | bytearray | memoryview, payload: memoryview) -> bytes:
    rows = len(payload) // (8 * _ROW_WORDS)
    row_sums = col_sums = b""
    if rows:
        words = np.frombuffer(payload, dtype="<u8", count=rows * _ROW_WORDS).reshape(rows, _ROW_WORDS)
        row_sums = words.sum(axis=1, dtype="<u8").tobytes()
        col_sums = words.sum(axis=0, dtype="<u8").tobytes()
    return checksum_from_sums(fields, row_sums, col_sums, payload[rows * _ROW_WORDS * 8 :])


def checksum_from_sums(
    fields: bytes | bytearray | memoryview,
    row_sums: bytes | memoryview,
    col_sums: bytes | memoryview,
    tail: bytes | memoryview,
) -> bytes:
    """The checksum from the payload's row and column sums (little-endian u64, as ``payload_sums``
    makes them on any device) and its bytes after the last whole row: a reader that moved the
    payload to a GPU verifies it there and hashes only these few bytes on the CPU."""
    h = hashlib.blake2b(fields, digest_size=_CHECKSUM_SIZE)
    h.update(row_sums)
    h.update(col_sums)
    h.update(tail)
    return h.digest()


def payload_sums(payloads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, payload_bytes]`` uint8 (rows 8-byte aligned, any device) -> the row and column sums
    of each payload's whole 512-word rows, ``[n, rows]`` and ``[n, 512]`` int64 (the checksum's
    u64 sums: two's complement wraps the same way)."""
    n, nbytes = payloads.shape
    rows = nbytes // (8 * _ROW_WORDS)
    words = payloads[:, : rows * _ROW_WORDS * 8].view(torch.int64).reshape(n, rows, _ROW_WORDS)
    return words.sum(2), words.sum(1)


def _mac(secret: bytes, fields: bytes | bytearray | memoryview, payload: memoryview) -> bytes:
    mac = hmac.new(secret, fields, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


# ---------------------------------------------------------------------------------------------------
# encode


def encode_block(
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    tokens: Sequence[int],
    kv: torch.Tensor,
    config: CodecConfig = CodecConfig(),  # frozen, so one shared default is safe
    secret: bytes | None = None,
) -> bytes:
    """Encode one KV block as a stored object.

    ``kv`` is a CPU tensor of shape ``layout.block_shape`` and dtype ``layout.dtype``; ``tokens`` are the
    block's ``layout.block_size`` token ids. With ``secret`` the object carries an HMAC-SHA256 and only
    readers with the same secret accept it.
    """
    dtype = _kv_dtype(layout)
    _check_secret(secret)
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.device.type != "cpu":
        raise ValueError(f"kv must be a CPU tensor, got device {kv.device}")
    if tuple(kv.shape) != layout.block_shape or kv.dtype != dtype:
        raise ValueError(
            f"kv has shape {tuple(kv.shape)} and dtype {kv.dtype}; "
            f"layout wants {layout.block_shape} and {dtype}"
        )
    if len(tokens) != layout.block_size:
        raise ValueError(f"a block has {layout.block_size} tokens, got {len(tokens)}")
    try:
        token_bytes = tokens_to_bytes(tokens)
    except (OverflowError, ValueError, TypeError) as e:
        raise ValueError(f"token ids must be int32: {e}") from None

    kv = kv.detach().contiguous()  # keeps the memory alive while `raw` views it
    raw = _quantize(kv, config.quantization)
    payload = _compress(raw, config)
    fields = _pack_fields(
        key, fingerprint, layout, token_bytes, config, len(payload), len(raw), secret is not None
    )
    parts: list[bytes | memoryview] = [fields, _checksum(fields, payload)]
    if secret is not None:
        parts.append(_mac(secret, fields, payload))
    used = len(fields) + _CHECKSUM_SIZE + (_HMAC_SIZE if secret is not None else 0)
    parts.append(bytes(_align(used) - used))
    parts.append(payload)
    return b"".join(parts)  # the one copy of the payload: the object must own its bytes


def _pack_fields(
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    token_bytes: bytes,
    config: CodecConfig,
    payload_length: int,
    raw_length: int,
    has_hmac: bool,
) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise TypeError(f"key must be bytes, got {type(key).__name__}")
    fp = fingerprint.encode()
    layout_bytes = layout.to_bytes()
    for name, value in (("key", key), ("fingerprint", fp)):
        if len(value) > _MAX_U16:
            raise ValueError(f"{name} is {len(value)} bytes; at most {_MAX_U16} fit the header")
    return b"".join(
        [
            _PREFIX.pack(MAGIC, FORMAT_VERSION, _FLAG_HMAC if has_hmac else 0),
            struct.pack("<H", len(key)),
            bytes(key),
            struct.pack("<H", len(fp)),
            fp,
            struct.pack("<H", len(layout_bytes)),
            layout_bytes,
            struct.pack("<I", len(token_bytes) // 4),
            token_bytes,
            _TRAILER.pack(
                _QUANT_IDS[config.quantization],
                _COMP_IDS[config.compression],
                payload_length,
                raw_length,
            ),
        ]
    )


def _quantize(kv: torch.Tensor, quantization: str) -> memoryview:
    """The raw payload: the block's own bytes, or float32 scales followed by fp8/int8 values."""
    if quantization == "none":
        return _as_bytes(kv)
    x = kv.float()
    if quantization == "fp8":
        # one scale per (layer, k/v, head): reduce over tokens and head_dim
        absmax = x.abs().amax(dim=(2, 4), keepdim=True)
        scale = _scale(absmax, _FP8_MAX, "fp8")
        q = (x / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    else:
        # one scale per (layer, k/v, token, head): reduce over head_dim
        absmax = x.abs().amax(dim=4, keepdim=True)
        scale = _scale(absmax, _INT8_MAX, "int8")
        q = (x / scale).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return memoryview(b"".join([_as_bytes(scale), _as_bytes(q)]))


def _scale(absmax: torch.Tensor, qmax: float, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} quantization needs finite KV values (got inf or nan)")
    scale = absmax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()


def _compress(raw: memoryview, config: CodecConfig) -> memoryview:
    if config.compression == "none":
        return raw
    if config.compression == "zstd":
        level = 3 if config.level is None else config.level
        # a compressor per call: ZstdCompressor is not safe to share between threads
        return memoryview(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw))
    return memoryview(lz4.frame.compress(raw, compression_level=config.level or 0, store_size=True))


# ---------------------------------------------------------------------------------------------------
# decode


def read_header(data: bytes | memoryview) -> BlockHeader:
    """Parse an object's header, bounds-checked, without verifying checksum or HMAC.

    ``data`` may be the whole object or any prefix holding the header; the payload is not read, so
    compare ``header.object_length`` with the stored size to spot truncated objects.
    """
    return _parse(_byte_view(data)).header


def decode_block(
    data: bytes | memoryview,
    *,
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    tokens: Sequence[int] | None = None,
    secret: bytes | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Verify a stored object against the requested block and return its KV as a new CPU tensor,
    or written into ``out`` (a contiguous CPU tensor of the block's shape and dtype: a loader's
    staging buffer, which saves allocating and faulting in a fresh tensor per block).

    Raises ``CorruptObjectError`` for anything that is not exactly that block, intact: another key,
    model, layout or tokens, a bad length, checksum or HMAC (required when ``secret`` is set, refused
    when it is not), or a payload that does not decompress to the expected size.
    """
    dtype = _kv_dtype(layout)
    if out is not None and (
        tuple(out.shape) != layout.block_shape or out.dtype != dtype or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {layout.block_shape}")
    obj = check_object(data, key=key, fingerprint=fingerprint, layout=layout, tokens=tokens, secret=secret)
    obj.verify_checksum()
    obj.verify_mac(secret)
    expected_raw = _raw_length(layout, obj.header.quantization)
    raw = _decompress(obj.payload, obj.header.compression, expected_raw)
    if out is not None and obj.header.quantization == "none":
        _copy_bytes(raw, out)  # straight into the caller's buffer: the one copy of the payload
        return out
    block = _dequantize(raw, obj.header.quantization, layout, dtype)
    return block if out is None else out.copy_(block)


class CheckedObject(NamedTuple):
    """A stored object whose header matched the requested block; checksum and HMAC still unchecked."""

    header: BlockHeader
    fields: memoryview  # the bytes the checksum and HMAC cover, payload excepted
    checksum: bytes
    mac: bytes | None
    payload: memoryview
    payload_offset: int

    def verify_checksum(self, sums: tuple[bytes, bytes] | None = None) -> None:
        """Check the checksum: over the payload here, or from its row and column sums (``payload_sums``
        as little-endian bytes) computed where the payload was moved to."""
        rows = len(self.payload) // (8 * _ROW_WORDS)
        if sums is None:
            digest = _checksum(self.fields, self.payload)
        else:
            row_sums, col_sums = sums if rows else (b"", b"")
            digest = checksum_from_sums(
                self.fields, row_sums, col_sums, self.payload[rows * _ROW_WORDS * 8 :]
            )
        if not hmac.compare_digest(digest, self.checksum):
            raise CorruptObjectError("checksum: mismatch, the object is corrupted")

    def verify_mac(self, secret: bytes | None) -> None:
        """The HMAC check (after the checksum's): required with a secret, refused without one."""
        if secret is not None:
            if self.mac is None:
                raise CorruptObjectError("hmac: a secret is configured but the object has no HMAC")
            if not hmac.compare_digest(_mac(secret, self.fields, self.payload), self.mac):
                raise CorruptObjectError("hmac: mismatch (tampered object or another secret)")
        elif self.mac is not None:
            raise CorruptObjectError(
                f"hmac: the object carries an HMAC but no secret is configured (set {SECRET_ENV})"
            )


def check_object(
    data: bytes | memoryview,
    *,
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    tokens: Sequence[int] | None = None,
    secret: bytes | None = None,
    payload: memoryview | None = None,
) -> CheckedObject:
    """Everything ``decode_block`` checks before reading the payload: header, key, fingerprint,
    layout, tokens and every length. Raises ``CorruptObjectError`` like it. With ``payload``,
    ``data`` is the header alone and the payload was read into a buffer of its own."""
    _kv_dtype(layout)
    _check_secret(secret)
    want_tokens = _token_bytes_arg(tokens)
    mv = _byte_view(data)
    parsed = _parse(mv)
    head = parsed.header

    if head.key != key:
        raise CorruptObjectError(f"key: object holds {head.key.hex()[:16]}..., wanted {key.hex()[:16]}...")
    if head.fingerprint != fingerprint:
        raise CorruptObjectError(
            f"fingerprint: object is for model {head.fingerprint!r}, wanted {fingerprint!r}"
        )
    if head.layout != layout:
        raise CorruptObjectError(f"layout: object has {head.layout}, wanted {layout}")
    if len(head.tokens) != layout.block_size:
        raise CorruptObjectError(
            f"tokens: object has {len(head.tokens)} tokens, a block has {layout.block_size}"
        )
    if want_tokens is not None and parsed.token_bytes != want_tokens:
        raise CorruptObjectError("tokens: the object's token ids differ from the requested block's")

    end = parsed.header_length + head.payload_length
    size = len(mv) if payload is None else len(mv) + len(payload)
    if payload is not None and len(mv) != parsed.header_length:
        raise CorruptObjectError(f"length: header of {parsed.header_length} bytes read as {len(mv)}")
    if size < end:
        raise CorruptObjectError(f"truncated: object is {size} bytes, its header says {end}")
    if size > end:
        raise CorruptObjectError(f"length: {size - end} bytes after the {end}-byte object")
    expected_raw = _raw_length(layout, head.quantization)
    if head.raw_length != expected_raw:
        raise CorruptObjectError(
            f"length: raw length {head.raw_length}, a {head.quantization} block of this layout has "
            f"{expected_raw}"
        )
    if head.compression == "none" and head.payload_length != expected_raw:
        raise CorruptObjectError(
            f"length: uncompressed payload of {head.payload_length} bytes, expected {expected_raw}"
        )
    if payload is None:
        payload = mv[parsed.header_length : end]
    return CheckedObject(head, parsed.fields, parsed.checksum, parsed.mac, payload, parsed.header_length)


def header_length(fingerprint: str, layout: KVLayout, has_hmac: bool) -> int:
    """Bytes before the payload in an uncompressed, unquantized object of this model and layout
    (32-byte keys): a reader splits such objects into header and payload buffers of its own."""
    fields = len(_pack_fields(bytes(32), fingerprint, layout, bytes(4 * layout.block_size),
                              CodecConfig(), 0, 0, has_hmac))  # fmt: skip
    return _align(fields + _CHECKSUM_SIZE + (_HMAC_SIZE if has_hmac else 0))


class _Parsed(NamedTuple):
    header: BlockHeader
    header_length: int
    fields: memoryview  # the bytes the checksum and HMAC cover, payload excepted
    token_bytes: bytes
    checksum: bytes
    mac: bytes | None


class _Reader:
    """Sequential, bounds-checked reads: running past the end is 'truncated', never an IndexError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise CorruptObjectError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, the object has "
                f"{len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def sized(self, what: str) -> memoryview:
        """A u16 length prefix, then that many bytes."""
        (n,) = _U16.unpack(self.take(2, what))
        return self.take(n, what)


def _parse(mv: memoryview) -> _Parsed:
    r = _Reader(mv)
    magic = bytes(r.take(4, "magic"))
    if magic != MAGIC:
        raise CorruptObjectError(f"magic: {magic!r} is not {MAGIC!r}, not a kvtier block object")
    version, flags = r.unpack(_VERSION_FLAGS, "version")
    if version != FORMAT_VERSION:
        raise CorruptObjectError(
            f"version: object has format version {version}, this build reads {FORMAT_VERSION}"
        )
    if flags & ~_FLAG_HMAC:
        raise CorruptObjectError(f"flags: unknown flag bits {flags:#06x}")
    key = bytes(r.sized("key"))
    try:
        fingerprint = str(r.sized("fingerprint"), "utf-8")
    except UnicodeDecodeError:
        raise CorruptObjectError("fingerprint: not valid UTF-8") from None
    layout = _parse_layout(r.sized("layout"))
    (count,) = r.unpack(_U32, "token count")
    if count > (len(mv) - r.pos) // 4:  # before multiplying into a length: never a huge slice
        raise CorruptObjectError(f"truncated: {count} token ids do not fit the {len(mv)}-byte object")
    token_bytes = bytes(r.take(4 * count, "tokens"))
    quant_id, comp_id, payload_length, raw_length = r.unpack(_TRAILER, "codec and lengths")
    if quant_id >= len(QUANTIZATIONS) or comp_id >= len(COMPRESSIONS):
        raise CorruptObjectError(f"codec: unknown quantization id {quant_id} or compression id {comp_id}")
    fields = mv[: r.pos]
    checksum = bytes(r.take(_CHECKSUM_SIZE, "checksum"))
    mac = bytes(r.take(_HMAC_SIZE, "hmac")) if flags & _FLAG_HMAC else None
    pad = r.take(_align(r.pos) - r.pos, "padding")
    if any(pad):
        raise CorruptObjectError("padding: non-zero bytes between header and payload")
    header = BlockHeader(
        version=version,
        key=key,
        fingerprint=fingerprint,
        layout=layout,
        tokens=tuple(np.frombuffer(token_bytes, dtype="<i4").tolist()),
        quantization=QUANTIZATIONS[quant_id],
        compression=COMPRESSIONS[comp_id],
        payload_length=payload_length,
        raw_length=raw_length,
        has_hmac=mac is not None,
    )
    return _Parsed(header, r.pos, fields, token_bytes, checksum, mac)


def _parse_layout(raw: memoryview) -> KVLayout:
    if len(raw) < _LAYOUT_FIXED.size:
        raise CorruptObjectError(f"layout: {len(raw)} bytes, too short for a KV layout")
    layers, heads, head_dim, block_size, dtype_len = _LAYOUT_FIXED.unpack(raw[: _LAYOUT_FIXED.size])
    if len(raw) != _LAYOUT_FIXED.size + dtype_len:
        raise CorruptObjectError(
            f"layout: {len(raw)} bytes, its dtype name says {_LAYOUT_FIXED.size + dtype_len}"
        )
    try:
        dtype = str(raw[_LAYOUT_FIXED.size :], "ascii")
    except UnicodeDecodeError:
        raise CorruptObjectError("layout: dtype name is not ASCII") from None
    return KVLayout(
        num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype
    )


def _decompress(payload: memoryview, compression: str, raw_length: int) -> memoryview:
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


def _dequantize(raw: memoryview, quantization: str, layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
    shape = layout.block_shape
    if quantization == "none":
        return _tensor_from(raw, dtype, shape)
    n_scales = _scale_count(layout, quantization)
    scale_shape = (shape[0], 2, 1, shape[3], 1) if quantization == "fp8" else (*shape[:4], 1)
    scale = _tensor_from(raw[: 4 * n_scales], torch.float32, scale_shape)
    if quantization == "fp8":
        # a 256-entry table beats torch's float8 -> float32 cast on CPU by ~5x (numbers in the bench)
        values = np.take(_FP8_TO_FLOAT32, np.frombuffer(raw[4 * n_scales :], dtype=np.uint8))
    else:
        values = np.frombuffer(raw[4 * n_scales :], dtype=np.int8).astype(np.float32)
    out = torch.from_numpy(values).reshape(shape).mul_(scale)  # `values` is a fresh, writable array
    return out if dtype == torch.float32 else out.to(dtype)


# ---------------------------------------------------------------------------------------------------
# helpers


def _raw_length(layout: KVLayout, quantization: str) -> int:
    n = layout.elements_per_block
    if quantization == "none":
        return n * _kv_dtype(layout).itemsize
    return 4 * _scale_count(layout, quantization) + n  # float32 scales + one byte per value


def _scale_count(layout: KVLayout, quantization: str) -> int:
    per_head = layout.num_layers * 2 * layout.num_kv_heads
    return per_head if quantization == "fp8" else per_head * layout.block_size


def _kv_dtype(layout: KVLayout) -> torch.dtype:
    if layout.dtype not in KV_DTYPES:
        raise ValueError(
            f"unsupported KV dtype {layout.dtype!r} for the codec; supported: {', '.join(KV_DTYPES)}"
        )
    return _TORCH_DTYPES[layout.dtype]


def _check_secret(secret: bytes | None) -> None:
    if secret is None:
        return
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes or None, got {type(secret).__name__}")
    if not secret:
        raise ValueError("an empty secret authenticates nothing; pass None for no HMAC")


def _token_bytes_arg(tokens: Sequence[int] | None) -> bytes | None:
    if tokens is None:
        return None
    try:
        return tokens_to_bytes(tokens)
    except (OverflowError, ValueError, TypeError) as e:
        raise ValueError(f"token ids must be int32: {e}") from None


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes, without copying (bfloat16 has no numpy dtype: go via uint8)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def _tensor_from(raw: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor holding a copy of ``raw`` (the caller checked the size); one copy, no warnings."""
    return _copy_bytes(raw, torch.empty(shape, dtype=dtype))


def _copy_bytes(raw: memoryview, out: torch.Tensor) -> torch.Tensor:
    np.copyto(out.reshape(-1).view(torch.uint8).numpy(), np.frombuffer(raw, dtype=np.uint8))
    return out


def _byte_view(data: bytes | memoryview) -> memoryview:
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
