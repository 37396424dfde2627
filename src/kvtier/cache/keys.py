"""Block keys: a chained cryptographic digest over explicit bytes.

Block i's key is ``digest(key[i-1] || tokens of block i)``; the root is
``digest("kvtier/1" || model fingerprint || KV layout and dtype || cache salt)``. Tokens are
encoded as int32 little-endian, the digest is BLAKE2b-256: never Python's ``hash()`` or
pickle, so two processes (or two machines) always agree on a key. Only full blocks get keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_VERSION = b"kvtier/1"
DIGEST_SIZE = 32
BlockKey = bytes
# A namespace (the model fingerprint) is a folder name on disk and part of a Redis or memcached key:
# no separators ("/", ":"), no leading dot, no spaces, short enough for every backend's key limit.
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,127}")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one KV block as stored and moved: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``.

    The device pool keeps the same numbers as ``[num_layers, 2, num_blocks, block_size, heads, dim]``;
    one block is the slice ``[:, :, block_id]``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def elements_per_block(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _dtype_size(self.dtype)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def to_bytes(self) -> bytes:
        """Explicit, versioned encoding used in the root key and in stored-object headers."""
        dtype = self.dtype.encode()
        return (
            struct.pack(
                "<IIIIB", self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, len(dtype)
            )
            + dtype
        )


_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "int8": 1}


def _dtype_size(dtype: str) -> int:
    try:
        return _DTYPE_SIZES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype!r}; supported: {sorted(_DTYPE_SIZES)}") from None


def root_key(fingerprint: str, layout: KVLayout, salt: str | None = None) -> BlockKey:
    """The key every chain starts from: ties blocks to one model, one KV layout and one tenant."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in (KEY_VERSION, fingerprint.encode(), layout.to_bytes(), (salt or "").encode()):
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def next_key(parent: BlockKey, block_tokens: Sequence[int]) -> BlockKey:
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(tokens_to_bytes(block_tokens))
    return h.digest()


def chain_keys(
    root: BlockKey, tokens: Sequence[int], block_size: int, start: int = 0, parent: BlockKey | None = None
) -> list[BlockKey]:
    """Keys of every full block of ``tokens`` from block index ``start`` on.

    ``parent`` is the key of block ``start - 1`` (the root when ``start == 0``); passing it lets a
    running request extend its chain one block at a time without rehashing the prefix.
    """
    keys: list[BlockKey] = []
    prev = root if start == 0 else parent
    if prev is None:
        raise ValueError("chain_keys: parent key is required when start > 0")
    for i in range(start, len(tokens) // block_size):
        prev = next_key(prev, tokens[i * block_size : (i + 1) * block_size])
        keys.append(prev)
    return keys


def check_key(key: object) -> BlockKey:
    """A block key is exactly ``DIGEST_SIZE`` bytes; anything else is a programming error."""
    if not isinstance(key, bytes):
        raise TypeError(f"block key must be bytes, got {type(key).__name__}")
    if len(key) != DIGEST_SIZE:
        raise ValueError(f"block key must be {DIGEST_SIZE} bytes, got {len(key)}")
    return key


def valid_namespace(namespace: str) -> bool:
    """Whether ``namespace`` is usable by every tier (see ``NAMESPACE_RE``)."""
    return NAMESPACE_RE.fullmatch(namespace) is not None


def check_namespace(namespace: str) -> str:
    if not valid_namespace(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1-128 characters from A-Z a-z 0-9 . _ + = - "
            "(not starting with a dot or a dash)"
        )
    return namespace


KEY_ID_LABEL = b"kvtier/key-id"


def key_id(secret: bytes) -> str:
    """A public name for a secret: the first 8 bytes of HMAC-SHA256(secret, "kvtier/key-id"), hex.

    It reveals nothing usable about the secret (HMAC is a PRF) and is stable across processes, so
    instances with the same secret agree on it and instances with different ones never do.
    """
    return "k" + hmac.new(secret, KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def tier_namespace(fingerprint: str, secret: bytes | None) -> str:
    """Where a model's objects live in a shared tier: its fingerprint, plus the key id of the
    secret that signs them. Readers with another secret (or none) then never see, and so never
    delete as unverifiable, the objects of another configuration: each one's own namespace only."""
    return fingerprint if secret is None else f"{fingerprint}.{key_id(secret)}"
