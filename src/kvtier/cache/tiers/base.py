"""The Tier protocol: one contract for host memory, local disk and Redis.

A tier stores opaque, self-describing objects (the bytes made by ``cache.codec``) under block keys.
It never interprets them: verification is the hierarchy's job (decode checks header, checksum, HMAC),
which then calls ``delete`` on anything that fails. A tier never raises on a backend failure during
``lookup``/``get``/``put``/``delete``: it reports a miss (or drops the write), counts the error in its
stats, and lets the engine recompute. Programming errors (wrong types) still raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from kvtier.cache.keys import BlockKey


@dataclass
class TierStats:
    """Counters every tier keeps; the metrics and ``kvtier cache stats`` read them."""

    lookups: int = 0  # keys asked about (lookup and get)
    hits: int = 0  # keys found by get
    misses: int = 0  # keys not found by get
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0  # backend failures turned into misses
    corrupt: int = 0  # objects the hierarchy rejected and deleted (reported by record_corrupt)
    read_seconds: float = 0.0  # total wall time spent in get
    write_seconds: float = 0.0  # total wall time spent in put
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@runtime_checkable
class Tier(Protocol):
    """A store of encoded KV blocks below the device pool.

    Contract:
    - ``lookup(keys)`` returns how many *leading* keys are held (the longest consecutive run from
      ``keys[0]``); it is a hint, a later ``get`` may still miss (eviction, another process).
    - ``get(keys)`` returns one entry per key, ``None`` for a miss; it counts as an access for the
      eviction policy of tiers that have one.
    - ``put(items)`` stores ``(key, data)`` pairs, evicting by the tier's policy to stay within
      ``capacity_bytes``; an object larger than the capacity is dropped. Writing an existing key
      replaces it atomically: a reader sees the old or the new object, never a mix.
    - ``delete(keys)`` removes keys that exist and ignores the rest.
    - ``keys()`` lists every held key (for ``kvtier cache ls`` and ``gc``); may be slow.
    """

    name: str

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def lookup(self, keys: Sequence[BlockKey]) -> int: ...

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]: ...

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None: ...

    def delete(self, keys: Sequence[BlockKey]) -> None: ...

    def keys(self) -> list[BlockKey]: ...

    def __len__(self) -> int: ...

    def stats(self) -> TierStats:
        """The counters; may be a snapshot, so callers read it and never write to it."""
        ...

    def record_corrupt(self, count: int = 1) -> None:
        """The hierarchy rejected ``count`` objects read from this tier (and deleted them)."""
        ...

    def clear(self) -> None: ...

    def close(self) -> None: ...
