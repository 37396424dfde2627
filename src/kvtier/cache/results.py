"""Exact-match caches of whole answers and embeddings, on the same tiers as the KV blocks.

Two kinds of value, one store:
- a *result*: the answer to a deterministic request (greedy, or sampling with a seed), keyed by the
  model fingerprint, tenant salt, prompt token ids and every sampling parameter that changes the
  output (``result_key``);
- an *embedding*: one input's vector, keyed by the model fingerprint (which covers pooling and
  normalisation) and the text (``embedding_key``).

Stored object (little-endian), like the KV codec's: a header that names what it holds, a checksum
over header and payload, an HMAC-SHA256 when a secret is set::

    magic b"KVTR" | u16 version | u16 flags (bit 0: HMAC) | u8 kind | u8 compression
    | u16 len + key | u16 len + fingerprint | u64 payload length | u64 raw length
    | 16-byte BLAKE2b checksum | 32-byte HMAC (flag) | payload

Results are JSON (never pickle: an object from a shared tier is untrusted input); embeddings are raw
float32. Decoding checks key, fingerprint, kind, lengths, checksum and HMAC; any failure is a
``CorruptObjectError``, which ``ResultStore`` turns into a counted miss and a delete, as the KV
hierarchy does. BLAKE2b rather than the KV codec's 2D sum: these objects are small, so its speed
does not matter, and it is the simpler check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvtier.cache.codec import CorruptObjectError
from kvtier.cache.codec.compression import compress, decompress
from kvtier.cache.keys import DIGEST_SIZE, BlockKey, tokens_to_bytes
from kvtier.cache.tiers.base import Tier

MAGIC = b"KVTR"
FORMAT_VERSION = 1
KIND_RESULT = 1
KIND_EMBEDDING = 2
KINDS = {KIND_RESULT: "result", KIND_EMBEDDING: "embedding"}
COMPRESSIONS = ("none", "lz4", "zstd")
_FLAG_HMAC = 1
_CHECKSUM = 16
_MAC = 32
_PREFIX = struct.Struct("<4sHHBB")
_LENGTHS = struct.Struct("<QQ")
MAX_OBJECT_BYTES = 64 << 20  # a result larger than this is not cached (and never decompressed to)


# -- keys ----------------------------------------------------------------------------------------------


def _digest(*parts: bytes) -> BlockKey:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


def result_key(
    fingerprint: str, salt: str | None, prompt_token_ids: Sequence[int], params: Mapping[str, Any]
) -> BlockKey:
    """``params``: every setting that affects the output, by name (JSON-serialisable values)."""
    canonical = json.dumps(dict(params), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return _digest(
        b"kvtier-result/1",
        fingerprint.encode(),
        (salt or "").encode(),
        tokens_to_bytes(prompt_token_ids),
        canonical.encode(),
    )


def embedding_key(fingerprint: str, text: str, salt: str | None = None) -> BlockKey:
    """``salt``: a tenant's (the server's), so no tenant is answered from another's embeddings;
    None keeps the unsalted key of earlier stores."""
    parts = [b"kvtier-embedding/1", fingerprint.encode(), text.encode("utf-8", "surrogatepass")]
    if salt:
        parts.append(salt.encode("utf-8", "surrogatepass"))
    return _digest(*parts)


# -- values --------------------------------------------------------------------------------------------


@dataclass
class CachedResult:
    """What a finished completion needs to be served again, exactly."""

    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: str | int | None = None
    logprobs: list[Any] | None = None  # as the engine returned them (JSON-shaped), when it did

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> CachedResult:
        try:
            raw = json.loads(bytes(data))
            result = cls(**raw) if isinstance(raw, dict) else None
        except (ValueError, TypeError) as e:
            raise CorruptObjectError(f"payload: not a stored result ({e})") from None
        if (
            result is None
            or not isinstance(result.token_ids, list)
            or not all(isinstance(t, int) for t in result.token_ids)
            or not isinstance(result.text, str)
            or not isinstance(result.finish_reason, str)
        ):
            raise CorruptObjectError("payload: a stored result with fields of the wrong types")
        return result


def embedding_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def embedding_from_bytes(data: bytes | memoryview, dim: int) -> np.ndarray:
    if len(data) != 4 * dim:
        raise CorruptObjectError(f"length: embedding of {len(data)} bytes, a {dim}-vector has {4 * dim}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


# -- object format -------------------------------------------------------------------------------------


def encode_object(
    key: BlockKey,
    fingerprint: str,
    kind: int,
    payload: bytes,
    compression: str = "none",
    secret: bytes | None = None,
) -> bytes:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; supported: {', '.join(COMPRESSIONS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind}")
    body = _compress(payload, compression)
    fp = fingerprint.encode()
    fields = b"".join(
        [
            _PREFIX.pack(
                MAGIC, FORMAT_VERSION, _FLAG_HMAC if secret else 0, kind, COMPRESSIONS.index(compression)
            ),
            struct.pack("<H", len(key)),
            key,
            struct.pack("<H", len(fp)),
            fp,
            _LENGTHS.pack(len(body), len(payload)),
        ]
    )
    parts = [fields, _checksum(fields, body)]
    if secret:
        parts.append(_mac(secret, fields, body))
    parts.append(body)
    return b"".join(parts)


def decode_object(
    data: bytes, *, key: BlockKey, fingerprint: str, kind: int, secret: bytes | None = None
) -> bytes:
    """The payload of an intact object for exactly this key, model and kind; else CorruptObjectError."""
    mv = memoryview(data)
    pos = _PREFIX.size
    if len(mv) < pos:
        raise CorruptObjectError(f"truncated: {len(mv)} bytes, shorter than a header")
    magic, version, flags, got_kind, comp = _PREFIX.unpack(mv[:pos])
    if magic != MAGIC:
        raise CorruptObjectError(f"magic: {bytes(magic)!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptObjectError(f"version: format {version}, this build reads {FORMAT_VERSION}")
    if flags & ~_FLAG_HMAC or comp >= len(COMPRESSIONS):
        raise CorruptObjectError(f"flags: unknown flags {flags:#x} or compression id {comp}")
    got_key, pos = _sized(mv, pos, "key")
    got_fp, pos = _sized(mv, pos, "fingerprint")
    if len(mv) < pos + _LENGTHS.size:
        raise CorruptObjectError("truncated: no lengths")
    body_len, raw_len = _LENGTHS.unpack(mv[pos : pos + _LENGTHS.size])
    fields = mv[: pos + _LENGTHS.size]
    pos += _LENGTHS.size
    checksum = bytes(mv[pos : pos + _CHECKSUM])
    pos += _CHECKSUM
    mac = None
    if flags & _FLAG_HMAC:
        mac = bytes(mv[pos : pos + _MAC])
        pos += _MAC
    if got_key != key:
        raise CorruptObjectError("key: the object is stored for another key")
    if got_fp != fingerprint.encode():
        raise CorruptObjectError(f"fingerprint: object is for model {bytes(got_fp)!r}")
    if got_kind != kind:
        raise CorruptObjectError(
            f"kind: object holds a {KINDS.get(got_kind, got_kind)}, wanted {KINDS[kind]}"
        )
    if len(mv) != pos + body_len or raw_len > MAX_OBJECT_BYTES:
        raise CorruptObjectError(f"length: {len(mv)} bytes, its header says {pos + body_len}")
    body = mv[pos:]
    if not hmac.compare_digest(_checksum(fields, body), checksum):
        raise CorruptObjectError("checksum: mismatch, the object is corrupted")
    if secret is not None:
        if mac is None or not hmac.compare_digest(_mac(secret, fields, body), mac):
            raise CorruptObjectError("hmac: missing or mismatched (tampered object or another secret)")
    elif mac is not None:
        raise CorruptObjectError("hmac: the object carries an HMAC but no secret is configured")
    return _decompress(body, COMPRESSIONS[comp], raw_len)


def _sized(mv: memoryview, pos: int, what: str) -> tuple[bytes, int]:
    if len(mv) < pos + 2:
        raise CorruptObjectError(f"truncated: no {what} length")
    (n,) = struct.unpack("<H", mv[pos : pos + 2])
    if len(mv) < pos + 2 + n:
        raise CorruptObjectError(f"truncated: {what} of {n} bytes")
    return bytes(mv[pos + 2 : pos + 2 + n]), pos + 2 + n


def _checksum(fields: bytes | memoryview, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(fields, digest_size=_CHECKSUM)
    h.update(body)
    return h.digest()


def _mac(secret: bytes, fields: bytes | memoryview, body: bytes | memoryview) -> bytes:
    m = hmac.new(secret, fields, hashlib.sha256)
    m.update(body)
    return m.digest()


def _compress(payload: bytes, compression: str) -> bytes:
    # the KV codec's compressors at their default levels: one bounded decompressor for both formats
    return bytes(compress(memoryview(payload), compression, None))


def _decompress(body: memoryview, compression: str, raw_len: int) -> bytes:
    if compression == "none" and len(body) != raw_len:
        raise CorruptObjectError(f"length: payload of {len(body)} bytes, header says {raw_len}")
    return bytes(decompress(body, compression, raw_len))


# -- the store -----------------------------------------------------------------------------------------


@dataclass
class ResultStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # objects rejected by decode (and deleted from their tier)
    puts: int = 0
    bytes_written: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class ResultStore:
    """Keyed objects of one kind across tiers, fastest first.

    ``get_many`` asks each tier in turn for the keys still missing; an object that fails to decode
    is deleted from its tier, counted in ``stats.corrupt`` and the tier's ``record_corrupt``, and
    looked for further down. A hit below the first tier is copied up into the faster ones.
    ``put_many`` writes to every tier (inclusive, like the KV hierarchy). Tiers never raise on
    backend failures, so neither does the store: a tier that is down only misses.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        fingerprint: str,
        kind: int,
        *,
        compression: str = "none",
        secret: bytes | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; supported: {', '.join(COMPRESSIONS)}")
        self.tiers = list(tiers)
        self.fingerprint = fingerprint
        self.kind = kind
        self.compression = compression
        self.secret = secret
        self.stats = ResultStats(tier_hits={t.name: 0 for t in self.tiers})
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[BlockKey]) -> list[tuple[bytes, str] | None]:
        """Per key: ``(payload, tier name)`` or None."""
        found: list[tuple[bytes, str] | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            objects = tier.get([keys[i] for i in missing])
            still: list[int] = []
            bad: list[BlockKey] = []
            promote: list[tuple[BlockKey, bytes]] = []
            for i, obj in zip(missing, objects, strict=True):
                if obj is None:
                    still.append(i)
                    continue
                payload = self._decode(keys[i], obj)
                if payload is None:
                    still.append(i)
                    bad.append(keys[i])
                    continue
                found[i] = (payload, tier.name)
                if depth:
                    promote.append((keys[i], obj))
            if bad:
                tier.delete(bad)
                tier.record_corrupt(len(bad))
            for upper in self.tiers[:depth]:
                if promote:
                    upper.put(promote)
            missing = still
        with self._lock:
            s = self.stats
            s.lookups += len(keys)
            s.misses += len(missing)
            s.hits += len(keys) - len(missing)
            for hit in found:
                if hit is not None:
                    s.tier_hits[hit[1]] = s.tier_hits.get(hit[1], 0) + 1
        return found

    def get(self, key: BlockKey) -> tuple[bytes, str] | None:
        return self.get_many([key])[0]

    def put_many(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        objects = [
            (key, encode_object(key, self.fingerprint, self.kind, payload, self.compression, self.secret))
            for key, payload in items
            if len(payload) <= MAX_OBJECT_BYTES
        ]
        for tier in self.tiers:
            tier.put(objects)
        with self._lock:
            self.stats.puts += len(objects)
            self.stats.bytes_written += sum(len(o) for _, o in objects)

    def put(self, key: BlockKey, payload: bytes) -> None:
        self.put_many([(key, payload)])

    def reject(self, key: BlockKey, tier_name: str) -> None:
        """A payload that decoded but is not a valid value (the caller parses it): a corrupt miss."""
        for tier in self.tiers:
            if tier.name == tier_name:
                tier.delete([key])
                tier.record_corrupt(1)
        with self._lock:
            self.stats.corrupt += 1
            self.stats.hits -= 1
            self.stats.misses += 1
            self.stats.tier_hits[tier_name] -= 1

    def _decode(self, key: BlockKey, obj: bytes) -> bytes | None:
        try:
            return decode_object(
                obj, key=key, fingerprint=self.fingerprint, kind=self.kind, secret=self.secret
            )
        except CorruptObjectError:
            with self._lock:
                self.stats.corrupt += 1
            return None

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
