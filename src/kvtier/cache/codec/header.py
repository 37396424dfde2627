"""The stored object's byte layout: packing and bounds-checked parsing of its header.

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
            checksum                  16 bytes, over every field above + payload (integrity.py)
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

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvtier.cache.codec.integrity import CHECKSUM_SIZE, HMAC_SIZE
from kvtier.cache.keys import KVLayout

MAGIC = b"KVTB"
FORMAT_VERSION = 1

# The ids a header stores: the position in these tuples. Append only (a change is a new format).
QUANTIZATIONS = ("none", "fp8", "int8")
COMPRESSIONS = ("none", "lz4", "zstd")

_QUANT_IDS = {name: i for i, name in enumerate(QUANTIZATIONS)}
_COMP_IDS = {name: i for i, name in enumerate(COMPRESSIONS)}
FLAG_HMAC = 1
_ALIGN = 16
_MAX_U16 = 0xFFFF
_LAYOUT_FIXED = struct.Struct("<IIIIB")  # KVLayout.to_bytes(): dims, then the dtype name's length
_PREFIX = struct.Struct("<4sHH")  # magic, version, flags
_VERSION_FLAGS = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TRAILER = struct.Struct("<BBQQ")  # quantization, compression, payload length, raw length


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
        return align(fields + CHECKSUM_SIZE + (HMAC_SIZE if self.has_hmac else 0))

    @property
    def object_length(self) -> int:
        """Size of the whole object; a stored object of another size is truncated or has extra bytes."""
        return self.header_length + self.payload_length


def read_header(data: bytes | memoryview) -> BlockHeader:
    """Parse an object's header, bounds-checked, without verifying checksum or HMAC.

    ``data`` may be the whole object or any prefix holding the header; the payload is not read, so
    compare ``header.object_length`` with the stored size to spot truncated objects.
    """
    return parse(byte_view(data)).header


def pack_fields(
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    token_bytes: bytes,
    quantization: str,
    compression: str,
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
            _PREFIX.pack(MAGIC, FORMAT_VERSION, FLAG_HMAC if has_hmac else 0),
            struct.pack("<H", len(key)),
            bytes(key),
            struct.pack("<H", len(fp)),
            fp,
            struct.pack("<H", len(layout_bytes)),
            layout_bytes,
            struct.pack("<I", len(token_bytes) // 4),
            token_bytes,
            _TRAILER.pack(
                _QUANT_IDS[quantization],
                _COMP_IDS[compression],
                payload_length,
                raw_length,
            ),
        ]
    )


def header_length(fingerprint: str, layout: KVLayout, has_hmac: bool) -> int:
    """Bytes before the payload in an uncompressed, unquantized object of this model and layout
    (32-byte keys): a reader splits such objects into header and payload buffers of its own."""
    fields = len(pack_fields(bytes(32), fingerprint, layout, bytes(4 * layout.block_size),
                              "none", "none", 0, 0, has_hmac))  # fmt: skip
    return align(fields + CHECKSUM_SIZE + (HMAC_SIZE if has_hmac else 0))


class Parsed(NamedTuple):
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


def parse(mv: memoryview) -> Parsed:
    r = _Reader(mv)
    magic = bytes(r.take(4, "magic"))
    if magic != MAGIC:
        raise CorruptObjectError(f"magic: {magic!r} is not {MAGIC!r}, not a kvtier block object")
    version, flags = r.unpack(_VERSION_FLAGS, "version")
    if version != FORMAT_VERSION:
        raise CorruptObjectError(
            f"version: object has format version {version}, this build reads {FORMAT_VERSION}"
        )
    if flags & ~FLAG_HMAC:
        raise CorruptObjectError(f"flags: unknown flag bits {flags:#06x}")
    key = bytes(r.sized("key"))
    try:
        fingerprint = str(r.sized("fingerprint"), "utf-8")
    except UnicodeDecodeError:
        raise CorruptObjectError("fingerprint: not valid UTF-8") from None
    layout = parse_layout(r.sized("layout"))
    (count,) = r.unpack(_U32, "token count")
    if count > (len(mv) - r.pos) // 4:  # before multiplying into a length: never a huge slice
        raise CorruptObjectError(f"truncated: {count} token ids do not fit the {len(mv)}-byte object")
    token_bytes = bytes(r.take(4 * count, "tokens"))
    quant_id, comp_id, payload_length, raw_length = r.unpack(_TRAILER, "codec and lengths")
    if quant_id >= len(QUANTIZATIONS) or comp_id >= len(COMPRESSIONS):
        raise CorruptObjectError(f"codec: unknown quantization id {quant_id} or compression id {comp_id}")
    fields = mv[: r.pos]
    checksum = bytes(r.take(CHECKSUM_SIZE, "checksum"))
    mac = bytes(r.take(HMAC_SIZE, "hmac")) if flags & FLAG_HMAC else None
    pad = r.take(align(r.pos) - r.pos, "padding")
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
    return Parsed(header, r.pos, fields, token_bytes, checksum, mac)


def parse_layout(raw: memoryview) -> KVLayout:
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


def byte_view(data: bytes | memoryview) -> memoryview:
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
