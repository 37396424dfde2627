"""Integrity: every sum kvtier uses to tell a block is intact, and the HMAC that tells it is ours.

One two-dimensional sum serves three readers, so a block written by one is checked by another:

- ``checksum`` (CPU, numpy): the codec's 16-byte checksum of a stored object (fields, then the
  payload's row and column sums, then the bytes after the last whole row, in a BLAKE2b-128);
- ``payload_sums`` + ``checksum_from_sums``: the same checksum, the sums taken on whichever device
  the payload was moved to (a disk load verifies on the GPU and hashes only a few bytes here);
- ``integrity_sums``: the host tier's per-slot record (rows, a zero-padded last row, and columns),
  computed on the GPU at write-back and compared with the same sums of the copy a load received.

``mac`` is the HMAC-SHA256 over the same bytes as the checksum, keyed by ``KVTIER_CACHE_SECRET``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np
import torch

SECRET_ENV = "KVTIER_CACHE_SECRET"
CHECKSUM_SIZE = 16
HMAC_SIZE = 32

# The checksum only has to catch accidental corruption (bit rot, torn or truncated writes, a sector
# from another file): tampering is the HMAC's job. It must also run near memory bandwidth, because the
# host tier should move blocks at > 80% of memory-copy speed and encode/decode already pay one copy.
# Measured with `kvtier bench codec` on the 2-core dev box (AMD EPYC, one 512 KiB bf16 block in
# cache, GB/s): memcpy 40, zlib.crc32 6.6, adler32 4.0, sha256 1.9, blake2b 1.3: every stdlib hash
# would cap the host tier at a sixth of copy speed or less. We use a two-dimensional sum instead, which
# numpy runs at ~21 GB/s (3.3x crc32; encode/decode none/none stream at ~52%/44% of a plain copy of
# the same blocks, limited by this pass).
#
# The payload, read as little-endian u64 words, is cut into rows of ROW_WORDS words; the sums (mod
# 2**64) of every row and of every column, then the bytes that do not fill a row, go into a
# BLAKE2b-128 after the header fields. An error escapes only if it leaves every row sum and every
# column sum unchanged, so it is always detected when it changes 1, 2 or 3 words, or any bytes within
# a burst of 4 KiB (ROW_WORDS * 8), or swaps two unequal words; two whole rows swapped are caught
# unless their sums are equal mod 2**64; other random damage escapes with probability ~2**-64.
# (CRC32 guarantees 32-bit bursts, then 2**-32.) Changing this function changes the format: bump
# FORMAT_VERSION.
ROW_WORDS = 512
ROW_BYTES = 8 * ROW_WORDS


def secret_from_env() -> bytes | None:
    """The HMAC secret from ``KVTIER_CACHE_SECRET`` (UTF-8), or None when unset or empty."""
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def check_secret(secret: bytes | None) -> None:
    if secret is None:
        return
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes or None, got {type(secret).__name__}")
    if not secret:
        raise ValueError("an empty secret authenticates nothing; pass None for no HMAC")


def checksum(fields: bytes | bytearray | memoryview, payload: memoryview) -> bytes:
    """The stored object's checksum of its header ``fields`` and ``payload``, on the CPU."""
    rows = len(payload) // ROW_BYTES
    row_sums = col_sums = b""
    if rows:
        words = np.frombuffer(payload, dtype="<u8", count=rows * ROW_WORDS).reshape(rows, ROW_WORDS)
        row_sums = words.sum(axis=1, dtype="<u8").tobytes()
        col_sums = words.sum(axis=0, dtype="<u8").tobytes()
    return checksum_from_sums(fields, row_sums, col_sums, payload[rows * ROW_BYTES :])


def checksum_from_sums(
    fields: bytes | bytearray | memoryview,
    row_sums: bytes | memoryview,
    col_sums: bytes | memoryview,
    tail: bytes | memoryview,
) -> bytes:
    """The checksum from the payload's row and column sums (little-endian u64, as ``payload_sums``
    makes them on any device) and its bytes after the last whole row: a reader that moved the
    payload to a GPU verifies it there and hashes only these few bytes on the CPU."""
    h = hashlib.blake2b(fields, digest_size=CHECKSUM_SIZE)
    h.update(row_sums)
    h.update(col_sums)
    h.update(tail)
    return h.digest()


def payload_sums(payloads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, payload_bytes]`` uint8 (rows 8-byte aligned, any device) -> the row and column sums
    of each payload's whole 512-word rows, ``[n, rows]`` and ``[n, 512]`` int64 (the checksum's
    u64 sums: two's complement wraps the same way)."""
    n, nbytes = payloads.shape
    rows = nbytes // ROW_BYTES
    words = payloads[:, : rows * ROW_BYTES].view(torch.int64).reshape(n, rows, ROW_WORDS)
    return words.sum(2), words.sum(1)


def integrity_sums(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, block_bytes]`` uint8 (any device) -> ``[n, integrity_sums_width(block_bytes)]`` int64:
    the sums (mod 2**64) of every row and every column of the block's 64-bit words laid out in rows
    of 512, the last row zero-padded. The same numbers on CPU and GPU; an error escapes only if it
    leaves every row and column sum unchanged (never for 1-3 changed words, a burst within 4 KiB, or
    two unequal words swapped within a row)."""
    n = blocks.shape[0]
    words = blocks.reshape(n, -1).view(torch.int64)
    full = words.shape[1] // ROW_WORDS
    tail = words[:, full * ROW_WORDS :]
    body = words[:, : full * ROW_WORDS].reshape(n, full, ROW_WORDS)
    columns = body.sum(1)
    columns[:, : tail.shape[1]] += tail  # the padded last row, without copying the block
    sums = [body.sum(2), tail.sum(1, keepdim=True)] if tail.shape[1] else [body.sum(2)]
    return torch.cat([*sums, columns], dim=1)


def integrity_sums_width(block_bytes: int) -> int:
    """How many sums ``integrity_sums`` gives a block: one per (padded) row, one per column."""
    return -(-(block_bytes // 8) // ROW_WORDS) + ROW_WORDS


def mac(secret: bytes, fields: bytes | bytearray | memoryview, payload: memoryview) -> bytes:
    digest = hmac.new(secret, fields, hashlib.sha256)
    digest.update(payload)
    return digest.digest()
