"""What a tier holds, across every namespace: per-namespace counts and bytes, and what a sample of
object headers says about codecs and compression. Works on any ``Tier`` through its maintenance
operations (``scan``, ``read_prefixes``); ``kvtier cache stats`` / ``ls`` only format the result."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.cache.codec import BlockHeader, CorruptObjectError, read_header
from kvtier.cache.tiers.base import StoredObject, Tier, TierError

HEADER_READ_BYTES = 1 << 16  # a header is ~100 bytes + 4 per token: 64 KiB covers 16k-token blocks


@dataclass
class NamespaceSummary:
    namespace: str
    entries: int = 0
    bytes: int = 0


@dataclass
class TierSummary:
    tier: str
    where: str
    entries: int = 0
    bytes: int = 0
    namespaces: dict[str, NamespaceSummary] = field(default_factory=dict)
    sampled: int = 0
    unreadable: int = 0  # sampled objects whose header did not parse
    raw_bytes: int = 0  # sum of raw_length over the readable sample (after quantization)
    payload_bytes: int = 0  # sum of payload_length over the same objects
    dense_bytes: int = 0  # what those blocks take unquantized and uncompressed
    codecs: Counter[str] = field(default_factory=Counter)

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.payload_bytes if self.payload_bytes else None

    @property
    def dense_ratio(self) -> float | None:
        """Quantization and compression together: unquantized block bytes per stored payload byte."""
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "where": self.where,
            "entries": self.entries,
            "bytes": self.bytes,
            "namespaces": [
                {"namespace": n.namespace, "entries": n.entries, "bytes": n.bytes}
                for n in sorted(self.namespaces.values(), key=lambda n: n.namespace)
            ],
            "sampled": self.sampled,
            "unreadable": self.unreadable,
            "raw_bytes": self.raw_bytes,
            "payload_bytes": self.payload_bytes,
            "compression_ratio": self.compression_ratio,
            "dense_ratio": self.dense_ratio,
            "codecs": dict(sorted(self.codecs.items())),
        }


def codec_name(header: BlockHeader) -> str:
    """The codec as settings spell it: ``none``, ``lz4``, ``int8+zstd``..."""
    parts = [p for p in (header.quantization, header.compression) if p != "none"]
    return "+".join(parts) or "none"


def read_headers(tier: Tier, objects: Sequence[StoredObject]) -> list[BlockHeader | None]:
    """Each object's header, None for one that is gone or does not parse."""
    out: list[BlockHeader | None] = []
    for prefix in tier.read_prefixes(objects, HEADER_READ_BYTES):
        try:
            out.append(None if prefix is None else read_header(prefix))
        except CorruptObjectError:
            out.append(None)
    return out


def summarize(tier: Tier, sample: int, seed: int = 0) -> TierSummary:
    """Counts and bytes of every object, per namespace; codec figures from ``sample`` headers."""
    objects = tier.scan()
    summary = TierSummary(tier.name, tier.where)
    for obj in objects:
        ns = summary.namespaces.setdefault(obj.namespace, NamespaceSummary(obj.namespace))
        ns.entries += 1
        ns.bytes += obj.size
        summary.entries += 1
        summary.bytes += obj.size
    picked = random.Random(seed).sample(objects, min(sample, len(objects)))
    for header in read_headers(tier, picked):
        summary.sampled += 1
        if header is None:
            summary.unreadable += 1
            continue
        summary.codecs[codec_name(header)] += 1
        summary.raw_bytes += header.raw_length
        summary.payload_bytes += header.payload_length
        with contextlib.suppress(ValueError, KeyError):  # an unknown dtype name: not in the dense ratio
            summary.dense_bytes += header.layout.bytes_per_block
    return summary


def drop_namespaces(tier: Tier, keep: str | None) -> int:
    """``tier.drop_namespaces(keep)``, with a failure raised as ``TierError`` (a tool must say that
    part of the cache is still there) instead of only counted."""
    errors = tier.stats().errors
    dropped = tier.drop_namespaces(keep)
    failed = tier.stats().errors - errors
    if failed:
        raise TierError(
            f"{tier.name} tier at {tier.where}: {failed} operation(s) failed; {dropped} objects were removed"
        )
    return dropped


# -- tiers that cannot list their objects (memcached): what they tell instead ------------------------

NO_LISTING = "cannot list its objects (memcached has no key listing)"


def lists_objects(tier: Tier) -> bool:
    """False for a tier whose ``scan`` and ``read_prefixes`` always raise (``lists_objects = False``)."""
    return bool(getattr(tier, "lists_objects", True))


def server_summary(store: Tier) -> dict[str, Any]:
    """What a tier that cannot list tells instead: each server's own numbers, the namespaces that
    registered on it. Raises TierError when no server answers."""
    servers: dict[str, dict[str, Any]] = store.server_stats(max_age=0)  # type: ignore[attr-defined]
    if not servers:
        raise TierError(f"cannot reach {store.name} at {store.where}")
    rows = {}
    for address, st in servers.items():
        hits, misses = int(st.get("get_hits", 0)), int(st.get("get_misses", 0))
        rows[address] = {
            "items": int(st.get("curr_items", 0)),
            "bytes": int(st.get("bytes", 0)),
            "limit_bytes": int(st.get("limit_maxbytes", 0)),
            "evictions": int(st.get("evictions", 0)),
            "get_hits": hits,
            "get_misses": misses,
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "item_size_max": int(st.get("item_size_max", 0)),
        }
    namespaces: list[str] = store.registered_namespaces()  # type: ignore[attr-defined]
    return {"tier": store.name, "where": store.where, "note": NO_LISTING, "servers": rows,
            "namespaces": namespaces}  # fmt: skip
