"""Stored object format for KV blocks (LMCache's ``serde/`` is the model): one file per job.

- ``header.py``: the byte layout of an object (documented there), packing and bounds-checked parsing;
- ``integrity.py``: every integrity sum (the codec checksum, its GPU-side sums, the host tier's
  per-slot sums) and the HMAC;
- ``quantization.py``: none | fp8 | int8 payloads;
- ``compression.py``: none | lz4 | zstd, bounded decompression;
- ``block.py``: ``encode_block`` / ``decode_block`` / ``check_object``, which put them together.

Decoding never trusts a length before checking it against the bytes present, never executes
anything (no pickle, no eval), and raises ``CorruptObjectError`` (a ``ValueError``) naming what
failed; invalid *arguments* raise plain ``ValueError`` / ``TypeError``.
"""

from kvtier.cache.codec.block import (
    CheckedObject,
    CodecConfig,
    check_object,
    decode_block,
    encode_block,
    encode_parts,
)
from kvtier.cache.codec.header import (
    COMPRESSIONS,
    FORMAT_VERSION,
    MAGIC,
    QUANTIZATIONS,
    BlockHeader,
    CorruptObjectError,
    header_length,
    read_header,
)
from kvtier.cache.codec.integrity import (
    SECRET_ENV,
    checksum_from_sums,
    integrity_sums,
    integrity_sums_width,
    payload_sums,
    secret_from_env,
)
from kvtier.cache.codec.quantization import KV_DTYPES

__all__ = [
    "COMPRESSIONS",
    "FORMAT_VERSION",
    "KV_DTYPES",
    "MAGIC",
    "QUANTIZATIONS",
    "SECRET_ENV",
    "BlockHeader",
    "CheckedObject",
    "CodecConfig",
    "CorruptObjectError",
    "check_object",
    "checksum_from_sums",
    "decode_block",
    "encode_block",
    "encode_parts",
    "header_length",
    "integrity_sums",
    "integrity_sums_width",
    "payload_sums",
    "read_header",
    "secret_from_env",
]
