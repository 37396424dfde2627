"""Encoding and decoding one KV block as a stored object: the codec's public entry points.

``encode_block``: quantize -> compress -> header fields -> checksum -> HMAC -> padding -> payload.
``decode_block``: parse -> key, fingerprint, layout, tokens against the requested ones -> checksum
-> HMAC -> decompress (bounded by the expected raw length) -> dequantize. ``check_object`` is the
part before the payload, for readers that verify the payload elsewhere (on the GPU).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvtier.cache.codec import integrity
from kvtier.cache.codec.compression import LZ4_LEVELS, ZSTD_LEVELS, compress, decompress
from kvtier.cache.codec.header import (
    COMPRESSIONS,
    QUANTIZATIONS,
    BlockHeader,
    CorruptObjectError,
    align,
    byte_view,
    pack_fields,
    parse,
)
from kvtier.cache.codec.integrity import CHECKSUM_SIZE, HMAC_SIZE, ROW_BYTES, SECRET_ENV, check_secret
from kvtier.cache.codec.quantization import copy_bytes, dequantize, kv_dtype, quantize, raw_length
from kvtier.cache.keys import KVLayout, tokens_to_bytes


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
        low, high = ZSTD_LEVELS if self.compression == "zstd" else LZ4_LEVELS
        if not low <= self.level <= high:
            raise ValueError(f"{self.compression} level must be in [{low}, {high}], got {self.level}")


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
    head, payload = encode_parts(key, fingerprint, layout, tokens, kv, config, secret)
    return b"".join((head, payload))  # the one copy of the payload: the object must own its bytes


def encode_parts(
    key: bytes,
    fingerprint: str,
    layout: KVLayout,
    tokens: Sequence[int],
    kv: torch.Tensor,
    config: CodecConfig = CodecConfig(),
    secret: bytes | None = None,
) -> tuple[bytes, memoryview]:
    """``encode_block``'s object as (everything before the payload, the payload): their
    concatenation is the object. Uncompressed and unquantized, the payload is a view of ``kv``'s
    memory (valid while ``kv`` is): a writer that can write both parts as they are (``os.writev``)
    skips the object's copy, a 2 MiB ``memcpy`` under the interpreter lock per 8B block."""
    dtype = kv_dtype(layout)
    check_secret(secret)
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

    if kv.requires_grad:
        kv = kv.detach()
    if not kv.is_contiguous():
        kv = kv.contiguous()  # (the payload's view keeps this copy alive)
    raw = quantize(kv, config.quantization)
    payload = compress(raw, config.compression, config.level)
    fields = pack_fields(
        key,
        fingerprint,
        layout,
        token_bytes,
        config.quantization,
        config.compression,
        len(payload),
        len(raw),
        secret is not None,
    )
    parts: list[bytes] = [fields, integrity.checksum(fields, payload)]
    if secret is not None:
        parts.append(integrity.mac(secret, fields, payload))
    used = len(fields) + CHECKSUM_SIZE + (HMAC_SIZE if secret is not None else 0)
    parts.append(bytes(align(used) - used))
    return b"".join(parts), payload


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
    dtype = kv_dtype(layout)
    if out is not None and (
        tuple(out.shape) != layout.block_shape or out.dtype != dtype or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {layout.block_shape}")
    obj = check_object(data, key=key, fingerprint=fingerprint, layout=layout, tokens=tokens, secret=secret)
    obj.verify_checksum()
    obj.verify_mac(secret)
    expected_raw = raw_length(layout, obj.header.quantization)
    raw = decompress(obj.payload, obj.header.compression, expected_raw)
    if out is not None and obj.header.quantization == "none":
        copy_bytes(raw, out)  # straight into the caller's buffer: the one copy of the payload
        return out
    block = dequantize(raw, obj.header.quantization, layout, dtype)
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
        rows = len(self.payload) // ROW_BYTES
        if sums is None:
            digest = integrity.checksum(self.fields, self.payload)
        else:
            row_sums, col_sums = sums if rows else (b"", b"")
            digest = integrity.checksum_from_sums(
                self.fields, row_sums, col_sums, self.payload[rows * ROW_BYTES :]
            )
        if not hmac.compare_digest(digest, self.checksum):
            raise CorruptObjectError("checksum: mismatch, the object is corrupted")

    def verify_mac(self, secret: bytes | None) -> None:
        """The HMAC check (after the checksum's): required with a secret, refused without one."""
        if secret is not None:
            if self.mac is None:
                raise CorruptObjectError("hmac: a secret is configured but the object has no HMAC")
            if not hmac.compare_digest(integrity.mac(secret, self.fields, self.payload), self.mac):
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
    kv_dtype(layout)
    check_secret(secret)
    want_tokens = _token_bytes_arg(tokens)
    mv = byte_view(data)
    parsed = parse(mv)
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
    expected_raw = raw_length(layout, head.quantization)
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


def _token_bytes_arg(tokens: Sequence[int] | None) -> bytes | None:
    if tokens is None:
        return None
    try:
        return tokens_to_bytes(tokens)
    except (OverflowError, ValueError, TypeError) as e:
        raise ValueError(f"token ids must be int32: {e}") from None
